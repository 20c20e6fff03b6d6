"""Shared pytest setup: the `--runslow` option for the long zoo cases, and the shared models, each built or
loaded once per session: `digits` (the shipped digits CNN and ResNet with their calibration and held-out
data), `stdlib_llama` (the shipped trained decoder) and `tiny_decoder` (small random LLaMA-style decoders with
a key/value cache, exported by tools/export_transformers.py). The checkout's root is on the import path
(pyproject.toml's `pythonpath`), so tests import the generators as `from tools import fuzz`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.shipped_models import DIGITS, STDLIB_LLAMA, Digits, StdlibLlama


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (the whole model zoo; tools/run_zoo.py prints the table)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (or tools/run_zoo.py)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def cli_error(capsys):
    """Run the CLI and expect exit `code` with one line on stderr (no traceback) containing `needle`."""
    from onnxprune.cli import main

    def check(argv: list[str], needle: str, code: int = 2) -> str:
        assert main(argv) == code
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and needle in err, err
        return err

    return check


@pytest.fixture(scope="session")
def digits() -> Digits:
    """The shipped digits models and data (tests/shipped_models.py), loaded once per session."""
    return DIGITS


@pytest.fixture()
def digits_file(tmp_path, digits) -> Path:
    """A copy of the shipped digits CNN's file in the test's tmp_path (commands write beside their input)."""
    return digits.cnn_file(tmp_path)


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory):
    """`tiny_decoder(dynamo=False, **config)`: the path of a small random LLaMA-style causal LM with grouped-query
    attention and its key/value cache as explicit inputs and outputs (tools/export_transformers.py llama_lm and
    export_cache; config: hidden, heads, kv_heads, layers, intermediate, vocab), exported once per session and
    configuration. Tests load it (`onnx.load`), so each gets its own copy."""
    pytest.importorskip("transformers")
    from tools import export_transformers as et

    built: dict[tuple, Path] = {}

    def get(dynamo: bool = False, **config) -> Path:
        key = (dynamo, *sorted(config.items()))
        if key not in built:
            name = "_".join(f"{k}{v}" for k, v in sorted(config.items())) or "default"
            path = tmp_path_factory.mktemp("decoder") / f"llama_{name}_{'dyn' if dynamo else 'ts'}.onnx"
            built[key] = et.export_cache(et.llama_lm(**config), path, dynamo=dynamo)
        return built[key]

    return get


@pytest.fixture(scope="session")
def stdlib_llama() -> StdlibLlama:
    """The shipped tiny trained decoder (tests/shipped_models.py), loaded once per session."""
    return STDLIB_LLAMA
