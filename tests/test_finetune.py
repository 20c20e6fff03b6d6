"""Re-training by distillation (issue 18): the finetune stage, its command and the Taylor criterion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnxprune.cli import main
from onnxprune.evaluate.data import load_data
from onnxprune.pipeline.finetune import finetune
from onnxprune.pipeline.search import measure
from onnxprune.pipeline.prepare import prepare
from onnxprune.pipeline.prune import prune_model
from onnxprune.runtime.session import run
from onnxprune.recipe import Recipe
from onnxprune.testing import zero_channels
from onnxprune.pipeline.prune import RunSettings

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN, RESNET, LLAMA = MODELS / "digits_cnn.onnx", MODELS / "digits_resnet.onnx", MODELS / "stdlib_llama.onnx"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine more threads spin against each other (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _digits(name: str):
    return load_data(str(MODELS / name), onnx.load(CNN))


def test_self_distillation_leaves_outputs_unchanged():
    """The unpruned model distilled from itself (block-wise then end to end) computes what it did."""
    model = onnx.load(CNN)
    calib = _digits("digits_calib.npz")
    result = finetune(model, model, calib, Recipe(finetune="both", finetune_steps=5, finetune_lr=1e-3))
    x = calib.feeds[0]
    np.testing.assert_allclose(run(result.model, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-5)
    llama = onnx.load(LLAMA)
    lm = load_data(str(MODELS / "stdlib_calib.npz"), llama, limit=4, batch_size=2)
    out = finetune(llama, llama, lm, Recipe(finetune="blockwise", finetune_steps=2, finetune_batch_size=2))
    assert len(out.report["blockwise"]["blocks"]) > 4  # cut at the residual joins of the decoder layers
    feed = lm.feeds[0]
    np.testing.assert_allclose(run(out.model, feed)[0], run(llama, feed)[0], rtol=1e-4, atol=1e-4)


def test_write_back_keeps_the_graph_and_changes_values():
    model = onnx.load(CNN)
    calib = _digits("digits_calib.npz")
    pruned = prune_model(model, Recipe(ratio=0.5, recover="bias"), RunSettings(calibration=calib)).model
    tuned = finetune(pruned, model, calib, Recipe(finetune="end-to-end", finetune_steps=30, finetune_lr=1e-3),
                     eval_data=_digits("digits_heldout.npz"))
    assert not tuned.rolled_back
    out = tuned.model
    assert [n.SerializeToString() for n in out.graph.node] == [n.SerializeToString() for n in pruned.graph.node]
    assert [(i.name, i.SerializeToString()) for i in out.graph.input] == \
        [(i.name, i.SerializeToString()) for i in pruned.graph.input]
    assert out.graph.output == pruned.graph.output
    before = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert list(before) == list(after)
    assert all(before[k].dtype == after[k].dtype and before[k].shape == after[k].shape for k in before)
    assert sum(not np.array_equal(before[k], after[k]) for k in before) >= 4
    q = tuned.report["quality"]
    assert set(q) == {"calibration", "held_out"} and q["held_out"]["after"] >= q["held_out"]["before"]
    onnx.checker.check_model(out, full_check=True)


def test_rolled_back_run_writes_the_input_bytes(tmp_path, cli_error):
    pruned = tmp_path / "pruned.onnx"
    model = onnx.load(CNN)
    calib = _digits("digits_calib.npz")
    onnx.save(prune_model(model, Recipe(ratio=0.5, recover="bias"), RunSettings(calibration=calib)).model, pruned)
    out = tmp_path / "tuned.onnx"
    argv = ["finetune", str(pruned), "--teacher", str(CNN), "--data", str(MODELS / "digits_calib.npz"),
            "--finetune", "end-to-end", "--finetune-steps", "5", "--finetune-lr", "50", "-o", str(out),
            "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    assert out.read_bytes() == pruned.read_bytes()  # a learning rate that wrecks the model: nothing kept
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["finetune"]["rolled_back"] and report["finetune"]["end_to_end"]["status"] == "rolled back"
    cli_error(argv, "output exists")
    cli_error(["finetune", str(pruned), "--teacher", str(CNN), "-o", str(tmp_path / "x.onnx")], "--data")


@pytest.mark.slow  # about 45 s on 2 shared cores: 1,047 samples through lstsq and 300 training steps
def test_digits_finetune_beats_lstsq_on_held_out(tmp_path):
    """The shipped CNN at --ratio 0.75 with lstsq: block-wise distillation on the training split (unlabelled
    use; 1,047 samples) raises held-out accuracy. The unpruned model is at 99.56 % (2 errors in 450) and lstsq
    alone at 98.89 %, so the room is 3 samples: the margin asserted is one sample (seeds 0-3 measured: +0.22 to
    +0.44 points)."""
    from tools.train_digits import make_splits

    x, y = make_splits()["train"]
    data = tmp_path / "train.npz"
    np.savez(data, input=x, labels=y)
    held = _digits("digits_heldout.npz")
    accuracy = {}
    for name, extra in (("lstsq", []), ("tuned", ["--finetune", "--finetune-steps", "300",
                                                  "--finetune-lr", "1e-3", "--finetune-batch-size", "32"])):
        out = tmp_path / f"{name}.onnx"
        assert main(["prune", str(CNN), "--ratio", "0.75", "--recover", "lstsq", "--data", str(data),
                     "-o", str(out), *extra]) == 0
        accuracy[name] = measure(onnx.load(out), held)["value"]
    assert accuracy["tuned"] >= accuracy["lstsq"] + 0.2, accuracy


@pytest.mark.parametrize("path", [RESNET, LLAMA], ids=["resnet", "llama"])
def test_taylor_plans_pass_the_zero_channel_oracle(path):
    """Channels chosen by Taylor scores, zeroed then removed: the outputs stay (float rounding)."""
    from onnxprune.graph.kvcache import follow
    from onnxprune.pipeline.plan import plan_uniform
    from onnxprune.pipeline.score import score_groups
    from onnxprune.pipeline.statistics import criterion_stats

    model = onnx.load(path)
    data = "stdlib_calib.npz" if path == LLAMA else "digits_calib.npz"
    feeds = load_data(str(MODELS / data), model, limit=8, batch_size=4).feeds
    prep = prepare(model)
    stats = criterion_stats("taylor", prep, feeds)
    scores = score_groups(prep.analysis, prep.view, "taylor", stats=stats)
    assert scores and all(np.isfinite(s).all() and (s >= 0).all() and s.any() for s in scores.values())
    plan = plan_uniform(prep.analysis, scores, 0.4)
    removed = {r: np.setdiff1d(np.arange(plan.sizes[r]), kept) for r, kept in plan.kept.items()}
    zeroed = zero_channels(prep, removed)
    result = prune_model(zeroed, Recipe(), RunSettings(removed=removed))
    want = run(zeroed, feeds[0])[0]
    got = run(result.model, follow(result, feeds[0]))[0]
    assert np.max(np.abs(want - got)) <= 1e-4 * max(np.max(np.abs(want)), 1.0)


def test_device_resolution(monkeypatch):
    """auto is CUDA exactly when torch sees a GPU; cuda without one and unknown names are one-line errors."""
    from onnxprune.errors import InputError
    from onnxprune.train.distill import resolve_device

    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(InputError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="expected one of"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(InputError, match="1 CUDA GPU"):
        resolve_device("cuda:1")


def test_missing_device_fails_before_any_work(tmp_path, cli_error, monkeypatch):
    """--finetune-device cuda on a machine without one: exit 2, one line, nothing written (prune and finetune)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out.onnx"
    data = str(MODELS / "digits_calib.npz")
    cli_error(["finetune", str(CNN), "--teacher", str(CNN), "--data", data, "--finetune-device", "cuda",
               "-o", str(out)], "--finetune-device cuda")
    cli_error(["prune", str(CNN), "--ratio", "0.5", "--data", data, "--finetune", "--finetune-device", "cuda",
               "-o", str(out)], "sees no CUDA GPU")
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_matches_cpu():
    """The same end-to-end run on the GPU and on the CPU: losses and re-trained weights agree closely (float32
    kernels differ, so not bit for bit)."""
    from onnxprune.train.endtoend import distill_end_to_end

    model = onnx.load(CNN)
    calib = _digits("digits_calib.npz")
    pruned = prune_model(model, Recipe(ratio=0.5, recover="bias"), RunSettings(calibration=calib)).model
    feeds = list(calib.feeds)
    train, held = list(range(len(feeds) - 2)), [len(feeds) - 2, len(feeds) - 1]
    rows = {device: distill_end_to_end(pruned, model, feeds, train, held, steps=20, lr=1e-3, show_progress=False,
                                       device=device) for device in ("cpu", "cuda")}
    assert rows["cuda"].row["device"] == "cuda"
    a, b = rows["cpu"].row["held_out_after"], rows["cuda"].row["held_out_after"]
    assert abs(a - b) <= 1e-3 * max(abs(a), 1e-6) + 1e-5, (a, b)
    ref = {t.name: onnx.numpy_helper.to_array(t) for t in rows["cpu"].model.graph.initializer}
    for t in rows["cuda"].model.graph.initializer:
        np.testing.assert_allclose(onnx.numpy_helper.to_array(t), ref[t.name], rtol=1e-3, atol=1e-4)
