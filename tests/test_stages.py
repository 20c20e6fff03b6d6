"""Stage-wise calibration (runtime/stages.py): each node runs once, the frontier stays under its budget, and
recovery and statistics computed stage by stage equal the per-stage re-runs they replace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.pipeline.activations import GRAM_ROWS, MAX_GRAM, Probe
from onnxprune.pipeline.statistics import channel_stats
from onnxprune.evaluate.data import load_data
from onnxprune.errors import InputError
from onnxprune.io.model_io import load_model
from onnxprune.runtime.stages import FrontierStore, StagedRun, parse_bytes
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import prune_model
from onnxprune.pipeline.score import score_groups
from onnxprune.recipe import Recipe
from onnxprune.pipeline.prune import RunSettings
from tests.onnx_builders import build



@pytest.fixture(scope="module")
def cnn_feeds(digits):
    model = digits.cnn()
    return model, list(load_data(digits.calib_path, model, batch_size=64).feeds)


def _conv_inputs(model):
    return [n.input[0] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]


def _staged_run_checked(model, feeds, names) -> StagedRun:
    """A StagedRun asked for `names` one at a time, each batch's value checked against a whole run (the run is
    returned stepped to its end, not closed)."""
    run = StagedRun(model, feeds, [[n] for n in names])
    probe = Probe(model, names)
    want = [probe.run(f) for f in feeds]
    for name in names:
        for b, got in enumerate(run.step()):
            np.testing.assert_allclose(got[name], want[b][name], rtol=1e-4, atol=1e-5)
    return run


def test_staged_run_equals_a_whole_run_and_runs_every_node_once(cnn_feeds):
    model, feeds = cnn_feeds
    prep = prepare(model)
    run = _staged_run_checked(prep.model, feeds, _conv_inputs(prep.model) + [prep.model.graph.output[0].name])
    assert run.passes == pytest.approx(1.0)  # the last request needs the whole model: each node ran once
    assert run.store.in_memory == 0  # nothing left on the frontier once no stage reads it
    run.close()


def test_the_frontier_keeps_copies_in_pages_of_their_own(cnn_feeds, monkeypatch):
    """A kept output is copied out of onnxruntime's arena (runtime.stages.kept_copy): from MAPPED_BYTES on into an
    anonymous map of its own, so dropping it hands its pages back; the values later stages read are still right
    after the sessions that made them are gone."""
    import mmap

    from onnxprune.runtime import stages

    monkeypatch.setattr(stages, "MAPPED_BYTES", 1024)
    model, feeds = cnn_feeds
    prep = prepare(model)
    names = _conv_inputs(prep.model)
    run = StagedRun(prep.model, feeds, [[names[1]], [names[-1]]])  # names[0] is the graph input
    list(run.step())
    kept = [v for batches in run.store._values.values() for v in batches.values()]
    assert kept and all(isinstance(_memory_owner(v), mmap.mmap) for v in kept if v.nbytes >= 1024)
    assert any(v.nbytes >= 1024 for v in kept)
    want = [Probe(prep.model, [names[-1]]).run(f)[names[-1]] for f in feeds]
    for b, got in enumerate(run.step()):
        np.testing.assert_allclose(got[names[-1]], want[b], rtol=1e-4, atol=1e-5)
    run.close()
    small = np.arange(10.0)
    assert stages.kept_copy(small) is small  # owns its memory and under the size: kept as it is
    view = np.arange(2048.0)[::2]
    copied = stages.kept_copy(view)
    assert isinstance(_memory_owner(copied), mmap.mmap) and np.array_equal(copied, view)


def test_dropped_frontier_pages_are_refilled_unless_a_caller_still_holds_them(monkeypatch):
    """A dropped frontier tensor's pages are refilled by a later put of a fitting size instead of mapping fresh
    ones (runtime.stages.FrontierStore._pages_for), but never while a caller still holds the array or a view
    of it; spare pages never take the store past the highest its live maps reached."""
    from onnxprune.runtime import stages

    monkeypatch.setattr(stages, "MAPPED_BYTES", 1024)
    store = FrontierStore(budget=1 << 30)
    first = np.arange(512.0)  # 4 KiB
    store.put("a", 0, first)
    held = store.get("a", 0)[:10]  # a caller keeps a view
    a_pages = _memory_owner(held)
    store.drop("a")
    store.put("b", 0, np.full(512, 7.0))
    b = store.get("b", 0)
    assert _memory_owner(b) is not a_pages and store.reused == 0
    np.testing.assert_array_equal(held, first[:10])  # the held view still reads what it read
    b_pages = _memory_owner(b)
    del b
    store.drop("b")  # nobody holds it: its pages wait to be refilled
    store.put("c", 0, np.full(400, 3.0))  # smaller, under twice: fits b's pages
    c = store.get("c", 0)
    assert _memory_owner(c) is b_pages and store.reused == c.nbytes
    np.testing.assert_array_equal(c, np.full(400, 3.0))
    store.put("d", 0, np.full(100, 1.0))  # far smaller than anything spare: fresh pages
    assert store.reused == c.nbytes
    assert store._mapped + store._spare_bytes <= store._peak_mapped
    store.close()
    assert not store._spare and store.in_memory == 0


def test_a_staged_run_refills_frontier_pages_and_gives_the_same_values(cnn_feeds, monkeypatch):
    from onnxprune.runtime import stages

    monkeypatch.setattr(stages, "MAPPED_BYTES", 1024)
    model, feeds = cnn_feeds
    prep = prepare(model)
    run = _staged_run_checked(prep.model, feeds, _conv_inputs(prep.model)[1:] + [prep.model.graph.output[0].name])
    assert run.store.reused > 0
    assert run.store._mapped + run.store._spare_bytes <= run.store._peak_mapped
    run.close()


def test_frontier_outputs_are_written_into_the_store_and_value_dependent_shapes_fall_back(cnn_feeds, monkeypatch):
    """From a stage's second batch on, onnxruntime writes the outputs the frontier keeps straight into the
    store's pages (StagedRun._run): the same values as a whole run. An output whose shape depends on the values
    (NonZero) fails to bind on a batch whose count differs, and that batch runs again the plain way."""
    from onnx import TensorProto, helper

    from onnxprune.runtime import stages

    monkeypatch.setattr(stages, "MAPPED_BYTES", 8)
    model, feeds = cnn_feeds
    prep = prepare(model)
    run = _staged_run_checked(prep.model, feeds, _conv_inputs(prep.model)[1:] + [prep.model.graph.output[0].name])
    assert len(feeds) > 1 and run.bound > 0
    run.close()

    graph = helper.make_graph(
        [helper.make_node("Greater", ["x", "zero"], ["pos"]), helper.make_node("NonZero", ["pos"], ["nz"]),
         helper.make_node("Cast", ["nz"], ["nzf"], to=TensorProto.FLOAT),
         helper.make_node("ReduceSum", ["nzf"], ["y"], keepdims=0)],
        "nonzero", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    nonzero = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    xs = [np.array([1, -1, 2, -2, 3, -3, -4, -5], np.float32), np.array([1, 1, 1, 1, 1, -1, -1, 1], np.float32)]
    run = StagedRun(nonzero, [{"x": x} for x in xs], [["nzf"], ["y"]])
    got = [out["nzf"].copy() for out in run.step()]
    assert [g.shape for g in got] == [(1, 3), (1, 6)]
    for x, g, out in zip(xs, got, run.step()):
        np.testing.assert_array_equal(g[0], np.flatnonzero(x > 0))
        assert float(out["y"]) == float(np.flatnonzero(x > 0).sum())
    run.close()


def test_a_runner_writes_into_given_arrays_from_a_non_contiguous_feed():
    from onnx import TensorProto, helper

    from onnxprune.runtime.session import Runner, internal_session

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])], "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 6])])
    runner = Runner(internal_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32).T  # a transposed view
    out = np.full((4, 6), np.nan, np.float32)
    got = runner.run({"x": x}, ["y", "z"], into={"y": out})
    assert runner.binds and got["y"] is out
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    np.testing.assert_array_equal(got["z"], -x)


def test_staged_sessions_plan_no_memory_pattern(cnn_feeds):
    """onnxruntime's memory pattern maps fresh pages on a session's first two runs; a stage runs once a batch,
    so its sessions allocate from the shared arena instead (runtime.session.open_session)."""
    from onnxprune.runtime.session import internal_session, use_shared_arena

    model, _ = cnn_feeds
    if not use_shared_arena():
        pytest.fail("this onnxruntime cannot register a shared CPU arena")
    assert internal_session(model, shared_arena=True).get_session_options().enable_mem_pattern is False
    assert internal_session(model).get_session_options().enable_mem_pattern is True


def _memory_owner(array: np.ndarray):
    """What holds an array's memory: the end of its chain of bases (through a memoryview)."""
    owner = array
    while isinstance(owner, np.ndarray):
        owner = owner.base
    return owner.obj if isinstance(owner, memoryview) else owner


def test_frontier_spills_past_its_budget_and_gives_the_same_values(cnn_feeds, tmp_path):
    model, feeds = cnn_feeds
    prep = prepare(model)
    names = _conv_inputs(prep.model)
    store = FrontierStore(budget=600_000, folder=tmp_path)  # one batch fits, the five do not
    run = StagedRun(prep.model, feeds, [[n] for n in names], store)
    probe = Probe(prep.model, names)
    for name in names:
        for b, got in enumerate(run.step()):
            np.testing.assert_allclose(got[name], probe.run(feeds[b])[name], rtol=1e-4, atol=1e-5)
    assert store.spilled > 0 and store.peak_in_memory <= 600_000
    store.close()
    assert not list(tmp_path.iterdir())  # the spill folder is gone


def test_a_stage_that_cannot_fit_is_a_one_line_error(cnn_feeds):
    model, feeds = cnn_feeds
    prep = prepare(model)
    run = StagedRun(prep.model, feeds, [[_conv_inputs(prep.model)[-1]]], FrontierStore(budget=100))
    with pytest.raises(InputError, match="--memory-budget .* too small"):
        list(run.step())


def test_the_model_may_change_between_requests():
    w1 = np.eye(4, dtype=np.float32)
    w2 = np.eye(4, dtype=np.float32)
    m = build([("MatMul", ["x", "w1"], ["h"]), ("Relu", ["h"], ["r"]), ("MatMul", ["r", "w2"], ["y"])],
              {"x": [2, 4]}, ["y"], {"w1": w1, "w2": w2})
    feeds = [{"x": np.ones((2, 4), np.float32)}]
    run = StagedRun(m, feeds, [["h"], ["y"]])
    assert np.allclose(next(run.step())["h"], 1.0)
    w2_tensor = next(t for t in m.graph.initializer if t.name == "w2")
    w2_tensor.CopyFrom(onnx.numpy_helper.from_array(3 * w2, "w2"))  # as a refit edits a layer not yet run
    assert np.allclose(next(run.step())["y"], 3.0)


def test_parse_bytes():
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("2GiB") == 2 << 30 and parse_bytes("1000") == 1000
    with pytest.raises(InputError, match="--memory-budget"):
        parse_bytes("lots")


def _recovered_weights(model, feeds, staged, monkeypatch, ratio=0.5):
    import onnxprune.pipeline.recover as recovery

    real = recovery.fit_lstsq
    monkeypatch.setattr(recovery, "fit_lstsq", lambda *a, **k: real(*a[:8], staged, None))
    result = prune_model(model, Recipe(ratio=ratio, criterion="l1", recover="lstsq"), RunSettings(calibration=feeds))
    monkeypatch.setattr(recovery, "fit_lstsq", real)
    return result, {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        scale = max(float(np.abs(a[name]).max()), 1e-6) if a[name].size else 1.0
        np.testing.assert_allclose(b[name], a[name], atol=2e-5 * scale, err_msg=name)


def test_stagewise_recovery_equals_per_stage_reruns_on_the_digits_cnn(cnn_feeds, monkeypatch):
    model, feeds = cnn_feeds
    rerun, want = _recovered_weights(model, feeds, False, monkeypatch)
    staged, got = _recovered_weights(model, feeds, True, monkeypatch)
    _assert_same_weights(want, got)
    assert staged.recovery and len(staged.recovery) == len(rerun.recovery)
    # each node at most once (the nodes after the last refit layer's input never need to run)
    assert 0.5 < staged.stats["passes"]["recovery_pruned"] <= 1.0 + 1e-9
    assert 0.5 < staged.stats["passes"]["recovery_original"] <= 1.0 + 1e-9


def test_stagewise_recovery_equals_per_stage_reruns_on_a_transformer(monkeypatch):
    torch = pytest.importorskip("torch")
    from tools.export_transformers import bert, export

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = export(bert(), "bert", Path(tmp) / "bert.onnx", dynamo=False)
        model = load_model(path)
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(3):
        mask = np.ones((4, 12), np.int64)
        mask[1, 7:] = 0
        feeds.append({"input_ids": rng.integers(0, 100, (4, 12)).astype(np.int64), "attention_mask": mask})
    rerun, want = _recovered_weights(model, feeds, False, monkeypatch, ratio=0.25)
    staged, got = _recovered_weights(model, feeds, True, monkeypatch, ratio=0.25)
    _assert_same_weights(want, got)
    assert any(r["node"].endswith("MatMul") or "dense" in r["node"] for r in staged.recovery)
    del torch


def test_a_data_aware_prune_costs_at_most_four_passes(cnn_feeds):
    model, feeds = cnn_feeds
    result = prune_model(model, Recipe(ratio=0.5, criterion="hybrid", recover="lstsq"), RunSettings(calibration=feeds))
    passes = result.stats["passes"]
    # statistics: one pass, less the classifier after the last tensor a statistic reads (never run)
    assert 0.5 < passes["statistics"] < 1.0, passes
    assert passes["total"] <= 4.0, passes


def _wide_mlp(width: int, rng):
    """x [N, width] -> MatMul -> h [N, width] -> MatMul -> y [N, 6]: h copies x, except that channel 0 is
    channel 1 plus a little of x's channel 0 (so a refit of fc2 can nearly replace it), and both have the
    largest fc2 rows."""
    w1 = np.eye(width, dtype=np.float32)
    w1[:, 0] = 0.0
    w1[1, 0], w1[0, 0] = 1.0, 0.05
    w2 = rng.standard_normal((width, 6)).astype(np.float32)
    w2[:2] *= 4.0
    return build([("MatMul", ["x", "w1"], ["h"]), ("MatMul", ["h", "w2"], ["y"])], {"x": ["N", width]}, ["y"],
                 {"w1": w1, "w2": w2}), w1, w2


def test_refit_scores_on_an_input_wider_than_max_gram_agree_with_a_direct_least_squares_fit():
    from onnxprune.pipeline.score import DataInputs, _refit_losses

    rng = np.random.default_rng(0)
    width = MAX_GRAM + 28
    model, w1, w2 = _wide_mlp(width, rng)
    feeds = [{"x": rng.standard_normal((2048, width)).astype(np.float32)} for _ in range(4)]
    prep = prepare(model)
    (group,) = prep.analysis.prunable
    stats = channel_stats(prep, feeds, staged=False)  # the Gram matrix kept whole, to look at
    entry = stats.tensors["h"]
    assert entry.gram.dtype == np.float32 and entry.gram_rows == 4 * 2048 <= GRAM_ROWS
    data = DataInputs(prep.view, prep.analysis.find, prep.analysis.context.axes,
                      {n.name: n for n in prep.view.nodes}, stats)
    (m,) = [m for m in group.members if m.role == "in"]
    losses = _refit_losses(group, m, data.axes["h"], entry.covariance(), data, prep.analysis.find(group.spaces[0]))
    assert int(np.argmin(losses)) == 0  # the near-copy goes first; magnitude alone would keep it
    # the greedy removal takes the cheapest 1/64 of the channels first, channel 0 among them: their common
    # score is the error left by removing them and refitting fc2 (with a bias) on the rest
    first = np.flatnonzero(losses == losses.min())
    assert len(first) == width // 64
    # the same error from the data directly: float64 normal equations of fc2's refit on the kept channels
    h = np.vstack([f["x"] for f in feeds]).astype(np.float64) @ w1
    design = np.hstack([np.delete(h, first, axis=1), np.ones((len(h), 1))])
    y = h @ w2
    beta = np.linalg.solve(design.T @ design, design.T @ y)
    direct = float(((design @ beta - y) ** 2).sum())
    assert losses[0] == pytest.approx(direct, rel=0.03)


def test_statistics_stage_by_stage_equal_one_pass_and_drop_their_gram_matrices():
    rng = np.random.default_rng(1)
    model, _, _ = _wide_mlp(MAX_GRAM + 64, rng)
    feeds = [{"x": rng.standard_normal((512, MAX_GRAM + 64)).astype(np.float32)} for _ in range(3)]
    prep = prepare(model)
    (group,) = prep.analysis.prunable
    one = channel_stats(prep, feeds, staged=False)
    width = MAX_GRAM + 64
    staged = channel_stats(prep, feeds, memory_budget=width * width * 4 + (8 << 20))  # one Gram, not two
    assert staged.tensors["h"].gram is None and staged.tensors["h"].refit
    assert one.passes == pytest.approx(1.0) and staged.passes <= 1.0 + 1e-9
    root = group.spaces[0]
    a = score_groups(prep.analysis, prep.view, "hybrid", stats=one)[root]
    b = score_groups(prep.analysis, prep.view, "hybrid", stats=staged)[root]
    np.testing.assert_allclose(b, a, rtol=1e-6)
    with pytest.raises(InputError, match="--memory-budget .* too small: the Gram matrix of h"):
        channel_stats(prep, feeds, memory_budget=1 << 20)
