"""Issue 18, the training bridge on exported models: torchvision, timm, Hugging Face, YOLO, the decoders in their
forms (GQA, KV cache of both exporters, ONNX Attention at opset 23, onnxruntime-genai's contrib ops) and a sample
of the fuzzer's generated models run in torch with outputs equal to onnxruntime's within 1e-5 relative.

The cases come from tools/bench_bridge.py (which runs them all, and the peers, for docs/BENCHMARKS.md); exports
are cached under .cache/zoo like the zoo tests'. Slow: `pytest --runslow`.
"""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("torch")
from tools import bench_bridge  # noqa: E402

pytestmark = pytest.mark.slow

# a representative sample (the tool runs every case): residual, depthwise, dense concat, channel shuffle, inception,
# preserved BatchNorm, LayerNorm convnets, ViT/Swin/SegFormer attention, YOLO's Resize/Split heads, decoders
CASES = ["tv/resnet18-torchscript", "tv/resnet18-dynamo", "tv/mobilenet_v2-dynamo", "tv/densenet121-torchscript",
         "tv/shufflenet_v2-dynamo", "tv/googlenet-torchscript", "tv/resnet18_bn-torchscript",
         "tv/convnext_tiny-dynamo", "tv/efficientnet_b0-torchscript",
         "timm/resnet18", "timm/mobilenetv3_small_100", "timm/convnext_atto", "timm/vit_tiny_patch16",
         "timm/ghostnet_100", "hf/vit", "hf/resnet", "hf/segformer", "hf/swin", "ultralytics/yolov8n",
         "hf/bert-torchscript", "hf/bert-dynamo", "hf/gpt2-torchscript", "hf/llama_gqa-dynamo",
         "hf/vit_split-torchscript", "hf/llama_kv_cache-torchscript", "hf/llama_kv_cache-dynamo",
         "torch/sdpa_gqa-op23-Attention", "genai/llama_gqa_builder"]
FUZZ_SEEDS = 40
ALL = bench_bridge.cases()
LIBRARY = {"timm": "timm", "hf": "transformers", "ultralytics": "ultralytics", "genai": "onnxruntime_genai"}


@pytest.mark.parametrize("name", CASES)
def test_exported_model_runs_exactly_in_torch(name):
    library = LIBRARY.get(name.split("/")[0])
    if library and importlib.util.find_spec(library) is None:
        pytest.skip(f"needs {library}")
    model, feed = ALL[name]()
    ref = bench_bridge.ort_run(model, feed)
    assert bench_bridge.rel_error(bench_bridge.ours(model, feed), ref) <= bench_bridge.REL


def test_fuzz_sample_runs_exactly_in_torch():
    """Generated models (every float dtype, opsets 11-21) and mutated ones: exact where onnxruntime gives a
    reference, or the one-line UnsupportedOpError for an op the bridge lacks; never a crash or a difference."""
    import onnx

    from onnxprune.errors import UnsupportedOpError

    compared = 0
    for seed, how, model, feed, tol in bench_bridge.fuzz_cases(FUZZ_SEEDS):
        try:
            onnx.checker.check_model(model, full_check=True)
            ref = bench_bridge.ort_run(model, feed)
        except Exception:  # noqa: BLE001 - an invalid case, or no onnxruntime kernel: nothing to compare with
            continue
        try:
            got = bench_bridge.ours(model, feed)
        except UnsupportedOpError as exc:
            assert "\n" not in str(exc)
            continue
        err = bench_bridge.rel_error(got, ref)
        assert err <= tol, f"fuzz seed {seed} ({how}): relative error {err:.2e}"
        compared += 1
    assert compared >= FUZZ_SEEDS // 2
