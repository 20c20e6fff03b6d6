"""int8 through onnxruntime: static QDQ calibrated on feeds (minmax, entropy, percentile) and dynamic, with the
defaults per target (cpu, gpu, tensorrt) the module quantize.py documents."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import InputError

METHODS = ("minmax", "entropy", "percentile")


TARGETS = ("cpu", "gpu", "tensorrt")


# Dynamic quantization on CPU: MatMulInteger is U8S8, but ConvInteger only has a uint8 x uint8 kernel, so
# Conv stays float in dynamic mode (static QDQ is the right tool for CNNs).

_DYNAMIC_OPS = ["MatMul", "Attention", "LSTM", "Gather", "EmbedLayerNormalization"]


def run_static(src: Path, out: Path, feeds: list[dict[str, np.ndarray]], method: str, per_channel: bool,
                reduce_range: bool, target: str, excluded: list[str], large: bool) -> str:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    symmetric_act = target != "cpu"  # TensorRT (and the GPU int8 paths) need zero points of 0
    quantize_static(
        str(src), str(out), _FeedReader(feeds), quant_format=QuantFormat.QDQ,
        per_channel=per_channel, reduce_range=reduce_range,
        activation_type=QuantType.QInt8 if symmetric_act else QuantType.QUInt8,
        weight_type=QuantType.QInt8, nodes_to_exclude=excluded, use_external_data_format=large,
        calibrate_method=_calibration_method(method), calibration_providers=["CPUExecutionProvider"],
        extra_options={"ActivationSymmetric": symmetric_act, "WeightSymmetric": True},
    )
    act = "int8 symmetric" if symmetric_act else "uint8 asymmetric"
    note = (f"static int8 QDQ for target {target}: activations {act}, weights int8 symmetric "
            f"{'per channel' if per_channel else 'per tensor'}; calibration {method} on {len(feeds)} batch(es)")
    if symmetric_act:
        # Measured on the digits CNN: 99.6% with Q/DQ evaluated as float (what TensorRT computes) but 94.9%
        # through onnxruntime's fused CPU int8 kernels, so CPU numbers misjudge a GPU-targeted model.
        note += (f"; judge its accuracy on {target}: onnxruntime's CPU kernels for int8 activations can lose "
                 "accuracy that the target would not")
    return note


def run_dynamic(src: Path, out: Path, work: onnx.ModelProto, per_channel: bool, reduce_range: bool, target: str,
                 excluded: list[str], large: bool) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(out), op_types_to_quantize=_DYNAMIC_OPS, per_channel=per_channel,
        reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
        use_external_data_format=large,
    )
    notes = [f"dynamic int8: weights int8 symmetric {'per channel' if per_channel else 'per tensor'}, "
             "activations quantized at run time"]
    if any(n.op_type == "Conv" for n in work.graph.node):
        notes.append("Conv nodes stay float32 in dynamic mode (onnxruntime's CPU ConvInteger has no "
                     "int8-weight kernel); use --mode static for convolutional models")
    if target != "cpu":
        notes.append(f"dynamic int8 has no {target} kernels; it runs on the CPU provider")
    return notes


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol (get_next returns a feed dict, then None) over a list."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)


def collect_feeds(model: onnx.ModelProto, calibration: Iterable[dict[str, np.ndarray]] | None):
    if calibration is None:
        raise InputError("static int8 quantization needs calibration data: pass --data FILE "
                         "(or use --mode dynamic, which needs none)")
    inits = {t.name for t in model.graph.initializer}
    needed = [i.name for i in model.graph.input if i.name not in inits]
    feeds = []
    for k, feed in enumerate(calibration):
        missing = [n for n in needed if n not in feed]
        if missing:
            raise InputError(f"calibration batch {k} lacks model input(s) {', '.join(missing)} "
                             f"(it has {', '.join(feed) or 'nothing'})")
        feeds.append({n: np.asarray(feed[n]) for n in needed})
    if not feeds:
        raise InputError("static int8 quantization needs calibration data, but the data given is empty")
    return feeds


def equal_batches(feeds: list[dict[str, np.ndarray]], notes: list[str]) -> list[dict[str, np.ndarray]]:
    """Re-split feeds into batches of one shape: onnxruntime's histogram calibrators stack every batch's
    outputs into one array, which fails when the last batch is shorter. The batch size becomes the gcd of
    the batch sizes, so no sample is lost; feeds whose inputs disagree on axis 0 are dropped instead."""
    shapes = {_shapes_of(f) for f in feeds}
    if len(shapes) == 1:
        return feeds
    sizes = set()
    for f in feeds:
        first = {v.shape[0] if v.ndim else -1 for v in f.values()}
        sizes.add(first.pop() if len(first) == 1 else -1)
    if -1 in sizes:
        ref = _shapes_of(feeds[0])
        kept = [f for f in feeds if _shapes_of(f) == ref]
        notes.append(f"histogram calibration needs equal batch shapes: used {len(kept)} of {len(feeds)} batches")
        return kept
    step = int(np.gcd.reduce(sorted(sizes)))
    return [{k: v[i:i + step] for k, v in f.items()} for f in feeds
            for i in range(0, next(iter(f.values())).shape[0], step)]


def _shapes_of(feed: dict[str, np.ndarray]) -> tuple:
    return tuple((k, v.shape) for k, v in sorted(feed.items()))


def _calibration_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]
