"""Refit factorisations on a GPU through torch (runtime/linalg.py): the torch path gives numpy's results (run
here on torch's CPU device, the code a CUDA device runs), `auto` stays on numpy without importing torch where no
GPU is visible, and a GPU that is not there is a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from onnxprune.evaluate.data import load_data
from onnxprune.pipeline.prune import RunSettings, prune_model
from onnxprune.recipe import Recipe
from onnxprune.runtime import linalg

torch = pytest.importorskip("torch")


def test_torch_factorisations_equal_numpys():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 40))
    a, b = x.T @ x, rng.standard_normal((40, 3))
    with linalg.on_torch("cpu"):
        e, v = linalg.eigh(a)
        inverse = linalg.inv(a)
        solved = linalg.solve(a, b)
        with pytest.raises(np.linalg.LinAlgError):
            linalg.inv(np.zeros((4, 4)))
    assert isinstance(e, np.ndarray) and e.dtype == np.float64
    np.testing.assert_allclose(e, np.linalg.eigvalsh(a), rtol=1e-10)
    np.testing.assert_allclose((v * e) @ v.T, a, atol=1e-9)
    np.testing.assert_allclose(inverse, np.linalg.inv(a), rtol=1e-8)
    np.testing.assert_allclose(solved, np.linalg.solve(a, b), rtol=1e-8)
    assert linalg.current() is None  # the device goes with the block


def test_a_prune_refit_through_torch_equals_numpys(digits):
    """Hybrid refit scores (inverse covariances) and least-squares refits (eigendecompositions, solves) of the
    digits CNN through torch give numpy's model."""
    model = digits.cnn()
    feeds = list(load_data(digits.calib_path, model, batch_size=100).feeds)[:4]
    recipe = Recipe(ratio=0.5, criterion="hybrid", recover="lstsq")
    on_numpy = prune_model(model, recipe, RunSettings(calibration=feeds, linalg_device="cpu"))
    with linalg.on_torch("cpu"):
        calls = []
        real = linalg._torch_for
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(linalg, "_torch_for", lambda a: calls.append(a.shape) or real(a))
            mp.setattr(linalg, "resolve", lambda device: "cpu")  # prune_model's own device: torch's CPU
            on_torch = prune_model(model, recipe, RunSettings(calibration=feeds))
    assert calls, "no factorisation went through runtime/linalg"
    assert on_numpy.plan.kept.keys() == on_torch.plan.kept.keys()
    assert all(np.array_equal(on_numpy.plan.kept[r], on_torch.plan.kept[r]) for r in on_numpy.plan.kept)
    want = {t.name: t for t in on_numpy.model.graph.initializer}
    from onnx import numpy_helper

    for t in on_torch.model.graph.initializer:
        np.testing.assert_allclose(numpy_helper.to_array(t), numpy_helper.to_array(want[t.name]), rtol=1e-4,
                                   atol=1e-6, err_msg=t.name)


def test_auto_without_a_visible_gpu_stays_on_numpy_and_leaves_torch_unimported():
    code = ("import sys; from onnxprune.runtime import linalg; "
            "print(__import__('json').dumps([linalg.resolve('auto'), 'torch' in sys.modules]))")
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == [None, False]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_a_missing_gpu_is_a_one_line_error(digits_file, tmp_path, cli_error):
    out = tmp_path / "out.onnx"
    cli_error(["prune", str(digits_file), "--linalg-device", "cuda", "-o", str(out)], "sees no CUDA GPU")
    cli_error(["prune", str(digits_file), "--linalg-device", "tpu", "-o", str(out)], "expected one of auto")
    assert not out.exists()
