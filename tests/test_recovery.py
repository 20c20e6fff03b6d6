"""Retraining-free recovery: exact least squares on linear toys, bias folding, lambda selection, a real model."""

from __future__ import annotations


import numpy as np
import pytest
from onnx import numpy_helper

from onnxprune.evaluate.data import from_arrays, load_data
from onnxprune.evaluate.metrics import accuracy
from onnxprune.io.model_io import load_model
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import Reuse, RunSettings, prune_model
from onnxprune.pipeline.recover.ridge import Gram, select_alpha, solve
from onnxprune.recipe import Recipe
from onnxprune.runtime.session import run, run_batches
from tests.onnx_builders import build



def two_layer(w1, b1, w2, b2):
    """x [N, 8] -> Gemm(W1) -> h [N, 16] -> Gemm(W2) -> y [N, 4], PyTorch Linear layout (transB=1)."""
    return build([("Gemm", ["x", "w1", "b1"], ["h"], {"transB": 1}),
                  ("Gemm", ["h", "w2", "b2"], ["y"], {"transB": 1})],
                 {"x": ["N", 8]}, ["y"], {"w1": w1, "b1": b1, "w2": w2, "b2": b2})


def weights(name, model):
    node = next(n for n in model.graph.node if n.name == name)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return inits[node.input[1]], inits[node.input[2]]


def calib(n=256, seed=1):
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    return from_arrays({"x": x}, batch_size=64)


def test_lstsq_recovers_exact_weights_on_a_linear_toy():
    # channels 8..15 of h are an affine function of channels 0..7: h_r = M h_k + c, so after removing them
    # y = (W2_k + W2_r M) h_k + (b2 + W2_r c) exactly, and least squares must find those weights
    rng = np.random.default_rng(0)
    w1k = rng.standard_normal((8, 8)).astype(np.float32)
    m = (0.5 * rng.standard_normal((8, 8))).astype(np.float32)
    b1 = rng.standard_normal(16).astype(np.float32)
    w1 = np.vstack([w1k, m @ w1k])
    b1[8:] = m @ b1[:8] + 0.3
    w2 = rng.standard_normal((4, 16)).astype(np.float32)
    b2 = rng.standard_normal(4).astype(np.float32)
    model = two_layer(w1, b1, w2, b2)
    root = prepare(model).analysis.prunable[0].spaces[0]
    removed = {root: np.arange(8, 16)}
    data = calib()
    plain = prune_model(model, Recipe(), RunSettings(removed=removed))
    fixed = prune_model(model, Recipe(recover="lstsq"), RunSettings(removed=removed, calibration=data))
    got_w, got_b = weights("gemm_1", fixed.model)
    want_w = w2[:, :8].astype(np.float64) + w2[:, 8:] @ m
    want_b = b2 + w2[:, 8:] @ np.full(8, 0.3)
    np.testing.assert_allclose(got_w, want_w, atol=2e-3)
    np.testing.assert_allclose(got_b, want_b, atol=2e-3)
    feed = {"x": calib(64, seed=7).feeds[0]["x"]}  # fresh inputs, not the calibration set
    want = run(model, feed)[0]
    assert np.abs(run(plain.model, feed)[0] - want).max() > 1.0
    assert np.abs(run(fixed.model, feed)[0] - want).max() < 1e-2 * np.abs(want).max()
    assert [entry["node"] for entry in fixed.recovery] == ["gemm_1"]


def test_bias_folds_constant_channels_exactly():
    # removed channels are constant (zero weights, bias 2): their contribution W2_r * 2 is a bias shift
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w1[8:] = 0
    b1 = np.zeros(16, np.float32)
    b1[8:] = 2.0
    w2 = rng.standard_normal((4, 16)).astype(np.float32)
    model = two_layer(w1, b1, w2, np.zeros(4, np.float32))
    root = prepare(model).analysis.prunable[0].spaces[0]
    result = prune_model(model, Recipe(recover="bias"), RunSettings(removed={root: np.arange(8, 16)}, calibration=calib()))
    feed = {"x": calib(32, seed=3).feeds[0]["x"]}
    np.testing.assert_allclose(run(result.model, feed)[0], run(model, feed)[0], atol=1e-4)
    _, bias = weights("gemm_1", result.model)
    np.testing.assert_allclose(bias, 2.0 * w2[:, 8:].sum(axis=1), rtol=1e-5)


def grams(n, noise, seed=0, d=12):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, 3))
    theta0 = w + 0.05 * rng.standard_normal(w.shape)  # the pruned layer's weights: close to the truth
    parts = []
    for rows in (n, max(n // 3, 2)):
        x = rng.standard_normal((rows, d))
        y = x @ w + noise * rng.standard_normal((rows, 3))
        g = Gram(np.zeros((d, d)), np.zeros((d, 3)))
        g.add(x, y)
        parts.append(g)
    return parts, theta0


def test_coarse_to_fine_strength_is_the_full_sweeps():
    """select_alpha tries 6-8 of the 10 strengths and picks the one the held-out errors of all 10 pick, from
    clean and plentiful rows (the smallest strengths) to few and noisy ones (large strengths)."""
    from onnxprune.pipeline.recover.ridge import ALPHAS

    picked = set()
    for seed in range(4):
        for n, noise in ((4000, 0.01), (400, 1.0), (60, 2.0), (14, 2.0), (4000, 20.0), (30, 50.0)):
            (fit, held), theta0 = grams(n, noise, seed=seed)
            chosen, errors = select_alpha(fit, held, theta0, intercept=False)
            full = [held.error(solve(fit.a, fit.b, theta0, a, False)) for a in ALPHAS]
            lowest = min(full)
            want = ALPHAS[max(i for i, e in enumerate(full) if e <= lowest + 1e-9 * abs(lowest))]
            assert chosen == want, (n, noise, chosen, want)
            assert 6 <= len(errors) <= 8 and min(errors) == pytest.approx(lowest, rel=1e-6)
            picked.add(chosen)
    assert len(picked) >= 3  # the cases span the grid


def test_lambda_is_larger_when_calibration_is_tiny_or_noisy():
    (fit, held), theta0 = grams(4000, 0.01)
    clean, _ = select_alpha(fit, held, theta0, intercept=False)
    (fit, held), theta0 = grams(14, 2.0)
    tiny_noisy, _ = select_alpha(fit, held, theta0, intercept=False)
    (fit, held), theta0 = grams(4000, 20.0)
    noisy, _ = select_alpha(fit, held, theta0, intercept=False)
    assert clean <= 1e-4
    assert tiny_noisy > clean and noisy > clean


def test_infinite_lambda_keeps_weights_and_fits_the_bias():
    rng = np.random.default_rng(2)
    x = np.hstack([rng.standard_normal((50, 4)), np.ones((50, 1))])
    y = x[:, :4] @ np.ones((4, 2)) + 5.0
    g = Gram(np.zeros((5, 5)), np.zeros((5, 2)))
    g.add(x, y)
    theta0 = np.vstack([np.ones((4, 2)), np.zeros((1, 2))])
    theta = solve(g.a, g.b, theta0, float("inf"), intercept=True)
    np.testing.assert_allclose(theta[:4], 1.0)
    np.testing.assert_allclose(theta[4], 5.0, atol=1e-9)


def test_grouped_consumer_is_not_refit_and_says_so():
    nodes = [("Conv", ["x", "w1"], ["c1"], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
             ("Conv", ["c1", "gw"], ["c2"], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": 2}),
             ("Relu", ["c2"], ["r"]),
             ("Conv", ["r", "w3"], ["y"], {"kernel_shape": [1, 1]})]
    model = build(nodes, {"x": ["N", 3, 6, 6]}, ["y"], {"w1": (8, 3, 3, 3), "gw": (8, 4, 3, 3), "w3": (4, 8, 1, 1)})
    data = from_arrays({"x": np.random.default_rng(0).standard_normal((16, 3, 6, 6)).astype(np.float32)})
    result = prune_model(model, Recipe(ratio=0.5, recover="lstsq", criterion="l1"), RunSettings(calibration=data))
    assert any("conv_1" in note and "not refit" in note for note in result.notes)
    assert "conv_3" in [entry["node"] for entry in result.recovery]


def test_lstsq_restores_accuracy_of_the_shipped_digits_model(digits):
    model = digits.cnn()
    cal = load_data(digits.calib_path, model, batch_size=100)
    held = load_data(digits.heldout_path, model, batch_size=450)
    prep = prepare(model)

    def acc(m):
        return 100 * accuracy(run_batches(m, held), held.labels, (1,))["top1"]

    base = acc(model)
    plain = prune_model(model, Recipe(target_macs=0.5, allocate="uniform"), RunSettings(reuse=Reuse(prepared=prep)))
    fixed = prune_model(model, Recipe(target_macs=0.5, allocate="uniform", recover="lstsq", criterion="l1"), RunSettings(calibration=cal, reuse=Reuse(prepared=prep)))
    assert plain.stats["macs_after"] <= 0.5 * plain.stats["macs_before"]
    assert acc(plain.model) < base - 3
    assert acc(fixed.model) >= base - 2


@pytest.mark.parametrize("criterion", ["activation", "apoz", "hybrid"])
def test_data_criteria_need_data(criterion, digits):
    from onnxprune.errors import InputError

    model = digits.cnn()
    with pytest.raises(InputError, match="--data"):
        prune_model(model, Recipe(criterion=criterion))


def test_prune_recover_then_quantize_with_the_same_data(tmp_path, capsys, digits):
    import json
    import shutil

    from onnxprune.cli import main

    model = tmp_path / "digits.onnx"
    shutil.copy(digits.cnn_path, model)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["prune", str(model), "--quantize", "int8", "--dry-run"]) == 2  # int8 needs calibration data
    assert "--data" in capsys.readouterr().err
    assert main(["prune", str(model), "-o", str(out), "--ratio", "0.3", "--data",
                 str(digits.calib_path), "--recover", "lstsq", "--quantize", "int8",
                 "--json", str(report)]) == 0
    ops = {n.op_type for n in load_model(out).graph.node}
    assert "QuantizeLinear" in ops
    data = json.loads(report.read_text())
    assert data["quantize"]["mode"] == "static"
    assert data["quality"]["calibration"]["after"] >= data["quality"]["calibration"]["before"] - 3
    assert [entry["method"] for entry in data["recovery"]] == ["lstsq"] * 5


def test_hybrid_finds_the_neuron_a_refit_can_replace():
    """Two hidden neurons compute the same thing (equal fc1 columns) and both have the largest fc2 rows:
    magnitude keeps both, but either can go at no cost once fc2 is refit — `hybrid` scores one of them lowest,
    and pruning it with `--recover lstsq` leaves the output unchanged."""
    from onnxprune.pipeline.score import score_groups
    from onnxprune.pipeline.statistics import channel_stats

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 8)).astype(np.float32)
    w1[:, 1] = w1[:, 0]
    w2 = rng.standard_normal((8, 3)).astype(np.float32)
    w2[:2] *= 5.0
    m = build([("MatMul", ["x", "w1"], ["h"]), ("Relu", ["h"], ["r"]), ("MatMul", ["r", "w2"], ["y"])],
              {"x": [4, 6]}, ["y"], {"w1": w1, "w2": w2})
    feeds = [{"x": rng.standard_normal((4, 6)).astype(np.float32)} for _ in range(50)]
    prep = prepare(m)
    (group,) = prep.analysis.prunable
    hybrid = score_groups(prep.analysis, prep.view, "hybrid", stats=channel_stats(prep, feeds))[group.spaces[0]]
    l1 = score_groups(prep.analysis, prep.view, "l1")[group.spaces[0]]
    assert int(np.argmin(hybrid)) in (0, 1) and int(np.argmin(l1)) not in (0, 1)
    result = prune_model(m, Recipe(ratio=1 / 8, criterion="hybrid", recover="lstsq"), RunSettings(calibration=feeds))
    test = {"x": rng.standard_normal((4, 6)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, test)[0], run(m, test)[0], rtol=1e-3, atol=1e-3)


def _strengths_both_ways(model, feeds, monkeypatch, ratio):
    """Every layer's strength as lstsq picks it (one eigendecomposition per shared Gram matrix, RidgePath) and
    as a separate solve per strength picks it (np.linalg.solve of (A + lam I) for each alpha, held-out error)."""
    import onnxprune.pipeline.recover.lstsq as lstsq
    from onnxprune.pipeline.recover.ridge import ALPHAS

    seen = []
    real = lstsq.select_alpha
    built = []
    path_class = lstsq.RidgePath
    monkeypatch.setattr(lstsq, "RidgePath", lambda *a: built.append(a) or path_class(*a))

    def recording(fit, held, theta0, intercept, alphas=ALPHAS, path=None):
        chosen = real(fit, held, theta0, intercept, alphas, path)
        errors = [held.error(solve(fit.a, fit.b, theta0, a, intercept)) for a in alphas]
        lowest = min(errors)
        direct = alphas[max(i for i, e in enumerate(errors) if e <= lowest + 1e-9 * abs(lowest))]
        seen.append((chosen[0], direct))
        return chosen

    monkeypatch.setattr(lstsq, "select_alpha", recording)
    prune_model(model, Recipe(ratio=ratio, criterion="l1", recover="lstsq"), RunSettings(calibration=feeds))
    return seen, len(built)


def _grid_steps(a: float, b: float) -> int:
    from onnxprune.pipeline.recover.ridge import ALPHAS

    return abs(ALPHAS.index(a) - ALPHAS.index(b))


def test_one_factorisation_picks_the_strength_a_solve_per_strength_picks_on_the_digits_cnn(monkeypatch, digits):
    model = digits.cnn()
    feeds = list(load_data(digits.calib_path, model, batch_size=100).feeds)
    seen, _ = _strengths_both_ways(model, feeds, monkeypatch, 0.5)
    assert len(seen) >= 3
    assert all(_grid_steps(chosen, direct) <= 1 for chosen, direct in seen), seen


def test_one_factorisation_picks_the_strength_a_solve_per_strength_picks_on_a_small_bert(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from tools.export_transformers import bert, export

    model = load_model(export(bert(layers=2), "bert", tmp_path / "bert.onnx", dynamo=False))
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 100, (8, 16)).astype(np.int64),
              "attention_mask": np.ones((8, 16), np.int64)} for _ in range(4)]
    seen, factorisations = _strengths_both_ways(model, feeds, monkeypatch, 0.25)
    assert len(seen) >= 4
    assert all(_grid_steps(chosen, direct) <= 1 for chosen, direct in seen), seen
    # q, k and v read the same rows: one eigendecomposition for the fit and one for the final solve serve the
    # three, where a factorisation per layer and per solve would be two per layer
    assert factorisations < 2 * len(seen), (factorisations, len(seen))
