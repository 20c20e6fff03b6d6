"""Bounded memory: a model with external data prunes in a child process whose peak RSS stays under 1.5x its
weights plus the fixed cost of the Python process and its libraries; lazily loaded models keep every
guarantee (oracle, output with external data that runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune.graph.ir import ancestor_nodes
from onnxprune.graph.kvcache import empty_cache
from onnxprune.io.model_io import load_model
from onnxprune.io.weights import TensorWriter, is_external, is_lazy, nbytes
from onnxprune.runtime.feeds import sample_feed
from onnxprune.runtime.session import run
from onnxprune.testing import zero_channel_oracle

ROOT = Path(__file__).resolve().parents[1]


def mlp_with_external_data(folder: Path, width: int, layers: int, seed: int = 0) -> Path:
    """x [N, width] -> (MatMul -> Add bias -> Relu) x layers -> MatMul -> y [N, 10], every weight in one
    external data file written tensor by tensor (the test process never holds the model's weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = folder / "model.onnx.data"
    writer = TensorWriter(data)
    nodes, inits, x = [], [], "x"
    for i in range(layers + 1):
        out = width if i < layers else 10
        w = (rng.standard_normal((width, out), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
        inits.append(writer.write(f"w{i}", w))
        del w
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal(out).astype(np.float32), f"b{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"bias{i}")]
        x = f"a{i}"
        if i < layers:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    writer.close()
    for t in inits:  # locations relative to the model's folder, as on disk
        for e in t.external_data:
            if e.key == "location":
                e.value = data.name
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    onnx.save(model, path)
    return path


_MEASURE = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def peak_rss_of_prune(model: Path, out: Path, *options: str) -> int:
    """Peak RSS (bytes) of `onnxprune prune MODEL --ratio 0.5 [options]` run as a fresh grandchild (so no other
    child of this test process counts)."""
    cmd = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "onnxprune.cli", "prune", str(model),
           "--ratio", "0.5", "-o", str(out), "--overwrite", *options]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    rc, peak = done.stdout.strip().splitlines()[-1].split()
    assert rc == "0", done.stderr
    return int(peak)


def test_external_data_model_prunes_within_one_and_a_half_times_its_weights(tmp_path):
    big = mlp_with_external_data(tmp_path / "big", width=4096, layers=6)  # 7 x 64 MiB of weights
    small = mlp_with_external_data(tmp_path / "small", width=64, layers=6)
    weights = (tmp_path / "big" / "model.onnx.data").stat().st_size
    assert weights > 350 << 20
    allowance = peak_rss_of_prune(small, tmp_path / "small" / "p.onnx")  # interpreter, onnx, onnxruntime ...
    peak = peak_rss_of_prune(big, tmp_path / "big" / "p.onnx")
    assert peak < 1.5 * weights + allowance + (64 << 20), (peak / weights, allowance >> 20)
    out = tmp_path / "big" / "p.onnx"
    assert out.stat().st_size < 1 << 20 and (tmp_path / "big" / "p.onnx.data").exists()
    pruned = load_model(out)
    assert is_lazy(pruned)
    assert sum(nbytes(t) for t in pruned.graph.initializer) < 0.6 * weights
    feed = {"x": np.random.default_rng(0).standard_normal((2, 4096)).astype(np.float32)}
    assert run(pruned, feed)[0].shape == (2, 10)
    assert not [p for p in (tmp_path / "big").iterdir() if p.name.startswith(".")]  # no workspace left behind


def test_lazily_loaded_models_prune_exactly(tmp_path):
    path = mlp_with_external_data(tmp_path / "m", width=96, layers=3)
    model = load_model(path)
    assert all(is_external(t) for t in model.graph.initializer if t.name.startswith("w"))
    result = zero_channel_oracle(model, seed=1)
    assert result.groups == 3 and result.max_rel_err < 1e-5
    assert is_lazy(result.pruned)  # sliced weights went to a workspace file, not into the protobuf
    feed = sample_feed(model)
    assert not np.allclose(run(result.zeroed, feed)[0], run(model, feed)[0], atol=1e-3)  # zeroing did matter


def test_the_report_of_a_lazy_prune_counts_bytes_of_external_weights(tmp_path):
    path = mlp_with_external_data(tmp_path / "m", width=128, layers=2)
    out = tmp_path / "m" / "p.onnx"
    report = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "onnxprune.cli", "prune", str(path), "--ratio", "0.5", "-o",
                           str(out), "--json", str(report)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    stats = json.loads(report.read_text())["stats"]
    assert stats["bytes_before"] > (tmp_path / "m" / "model.onnx.data").stat().st_size * 0.95
    assert 0.2 < stats["bytes_after"] / stats["bytes_before"] < 0.6


def test_a_small_memory_budget_spills_and_gives_the_same_model(tmp_path, digits):
    model = digits.cnn_path
    cmd = [sys.executable, "-m", "onnxprune.cli", "prune", str(model), "--ratio", "0.5", "--data",
           str(digits.calib_path), "--recover", "lstsq"]
    outputs = []
    for budget in (None, "1200K"):  # the default keeps everything in memory; 1.2 MB spills the frontier
        out = tmp_path / f"p{budget}.onnx"
        done = subprocess.run(cmd + ["-o", str(out)] + (["--memory-budget", budget] if budget else []),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert ("spilled" in done.stdout) == (budget is not None)
        outputs.append(onnx.load(out))
    a, b = outputs
    assert len(a.graph.initializer) == len(b.graph.initializer)
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_allclose(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y), atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # spill files and workspace are gone


def test_a_sweep_takes_a_model_with_external_data(tmp_path, digits):
    from onnxprune.cli import main
    from onnxprune.io.model_io import save_model

    model = tmp_path / "ext" / "digits.onnx"
    model.parent.mkdir()
    save_model(digits.cnn(), model, external_data=True)
    out = tmp_path / "sweep"
    assert main(["sweep", str(model), "--eval-data", str(digits.heldout_path), "-o", str(out),
                 "--ratio", "0.25,0.5", "--no-latency"]) == 0
    report = json.loads((out / "sweep.json").read_text())
    assert [c["status"] for c in report["candidates"]] == ["ok", "ok"]
    assert report["candidates"][0]["metrics"]["value"] > 80  # ratio 0.25 without recovery: about 89 %


def test_a_lazy_model_whose_dims_cannot_be_guessed_is_a_one_line_error(tmp_path, cli_error):
    path = mlp_with_external_data(tmp_path / "m", width=64, layers=2)
    model = onnx.load(path, load_external_data=False)
    model.graph.input[0].type.tensor_type.shape.dim[1].ClearField("dim_value")
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"  # guessed as 1: the MatMul fails
    onnx.save(model, path)
    out = tmp_path / "m" / "p.onnx"
    cli_error(["prune", str(path), "--ratio", "0.5", "-o", str(out)], "--input-shapes x:")
    assert not out.exists()
    assert main_ok(["prune", str(path), "--ratio", "0.5", "-o", str(out), "--input-shapes", "x:2x64"])


def main_ok(argv) -> bool:
    from onnxprune.cli import main

    return main(argv) == 0


@pytest.fixture(scope="module")
def big_vocabulary(tiny_decoder, tmp_path_factory) -> tuple[Path, Path]:
    """A decoder with a 32,000-token vocabulary and 65,536 tokens of data for it (their logits: 8 GiB)."""
    model = tiny_decoder(vocab=32000, hidden=64, intermediate=128, heads=4, kv_heads=2, layers=2)
    rng = np.random.default_rng(0)
    windows, seq = 512, 128
    assert windows * seq >= 65536
    data = tmp_path_factory.mktemp("tokens") / "calib.npz"
    np.savez(data, input_ids=rng.integers(0, 32000, (windows, seq)).astype(np.int64),
             attention_mask=np.ones((windows, seq), np.int64))
    return model, data


def test_decoder_calibration_memory_does_not_grow_with_tokens_times_vocabulary(tmp_path, big_vocabulary):
    """The decoder prunes on those 65,536 calibration tokens with data-aware scores, least-squares recovery and
    the quality report within its weights + the memory budget + 1 GiB: statistics never run the LM head,
    recovery stops at the last refit layer, validation runs one sample, and perplexity reduces each batch of
    logits as it comes."""
    model, data = big_vocabulary
    weights = model.stat().st_size
    budget = 256 << 20
    report = tmp_path / "report.json"
    peak = peak_rss_of_prune(model, tmp_path / "p.onnx", "--data", str(data), "--recover", "lstsq",
                             "--memory-budget", "256M", "--batch-size", "8", "--json", str(report))
    assert peak < weights + budget + (1 << 30), peak >> 20
    result = json.loads(report.read_text())
    assert result["stats"]["channels_removed"] > 0
    assert 0 < result["stats"]["passes"]["statistics"] < 1.0  # the head and what only it needs never ran
    ppl = result["quality"]["calibration"]
    assert ppl["metric"] == "perplexity" and np.isfinite(ppl["before"]) and np.isfinite(ppl["after"])


def test_statistics_run_only_the_nodes_their_tensors_need(tiny_decoder):
    """Stages after the last tensor a statistic reads are not run: the node evaluations counted are exactly the
    ancestors of those tensors, once per batch, and the LM head is not among them."""
    from onnxprune.pipeline.activations import consumer_inputs
    from onnxprune.pipeline.prepare import prepare
    from onnxprune.pipeline.statistics import channel_stats

    prep = prepare(onnx.load(tiny_decoder(vocab=500)))
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 500, (2, 16)).astype(np.int64),
              "attention_mask": np.ones((2, 16), np.int64)} for _ in range(3)]
    feeds = [empty_cache(prep.model, f) for f in feeds]  # the past starts empty, as the data loader feeds it
    names = consumer_inputs(prep)
    nodes = list(prep.model.graph.node)
    needed = ancestor_nodes(nodes, names)
    head = next(i for i, n in enumerate(nodes) if prep.model.graph.output[0].name in n.output)
    assert head not in needed
    stats = channel_stats(prep, feeds)
    assert stats.passes * len(nodes) * len(feeds) == pytest.approx(len(needed) * len(feeds))
    assert stats.passes < 1.0


def test_staged_statistics_hold_one_stage_of_activations_not_every_layer(tiny_decoder):
    """The frontier of a staged statistics run keeps a tensor only until the last stage that reads it: on a
    6-layer decoder its peak is a few tensors' worth, not the sum over the layers (a stage whose caller stopped
    reading at the last batch used to keep its frontier to the end)."""
    from onnxprune.pipeline.prepare import prepare
    from onnxprune.pipeline.statistics import channel_stats

    prep = prepare(onnx.load(tiny_decoder(vocab=200, layers=6, hidden=64, intermediate=256)))
    rng = np.random.default_rng(0)
    feeds = [empty_cache(prep.model, {"input_ids": rng.integers(0, 200, (4, 32)).astype(np.int64),
                                      "attention_mask": np.ones((4, 32), np.int64)}) for _ in range(3)]
    stats = channel_stats(prep, feeds, staged=True)
    mlp_input = 3 * 4 * 32 * 256 * 4  # one MLP activation over the three batches, float32
    assert 0 < stats.frontier_peak_bytes < 3 * mlp_input, stats.frontier_peak_bytes


def test_evaluating_a_decoder_on_many_tokens_holds_one_batch_of_logits(tmp_path, big_vocabulary):
    """`eval --reference` on the 65,536 tokens: perplexity of both models and their comparison, every batch
    reduced as it comes, within both models' weights + 1 GiB (all logits of one model would be 8 GiB)."""
    model, data = big_vocabulary
    report = tmp_path / "eval.json"
    cmd = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "onnxprune.cli", "eval", str(model),
           "--reference", str(model), "--data", str(data), "--batch-size", "8", "--no-latency", "--quiet",
           "--json", str(report)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    rc, peak = done.stdout.strip().splitlines()[-1].split()
    assert rc == "0", done.stderr
    assert int(peak) < 2 * model.stat().st_size + (1 << 30), int(peak) >> 20
    result = json.loads(report.read_text())
    ppl = result["candidate"]["perplexity"]
    assert ppl["tokens"] == 512 * 127 and ppl["perplexity"] == result["reference"]["perplexity"]["perplexity"]
    logits = result["agreement"]["outputs"]["logits"]
    assert logits["shape"] == [512, 128, 32000] and logits["max_abs_err"] == 0.0 and logits["cosine"] == 1.0


def test_preparing_a_model_does_not_import_torch():
    """onnxruntime's symbolic shape inference is loaded from its file: importing it through onnxruntime.tools
    imports torch when torch is installed (about 0.5 GiB of memory for nothing onnxprune uses)."""
    code = ("import sys; from onnxprune.io.model_io import load_model; from onnxprune.pipeline.prepare import prepare; "
            "p = prepare(load_model('models/stdlib_llama.onnx')); "
            "print(len(p.analysis.prunable), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    groups, torch_loaded = done.stdout.split()
    assert int(groups) > 0 and torch_loaded == "False"
