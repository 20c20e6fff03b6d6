"""Shared pytest setup: the `--runslow` option for the long zoo cases. The checkout's root is on the import path
(pyproject.toml's `pythonpath`), so tests import the generators as `from tools import fuzz`."""

from __future__ import annotations

import pytest


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
