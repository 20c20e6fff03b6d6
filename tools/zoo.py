"""The torchvision model zoo used by the zoo tests and benchmarks (issue 2).

Each model is built with random weights (`weights=None`, a fixed seed, `.eval()`) and exported with both
torch exporters:

* ``torchscript``: ``torch.onnx.export(..., dynamo=False, opset_version=17)``, dynamic batch axis;
* ``dynamo``: ``torch.onnx.export(..., dynamo=True, opset_version=18)``, dynamic batch axis.

BatchNorm statistics and every constant-initialised parameter are randomised (seeded) after construction
(see `randomize_params`). With torchvision's default init (gamma=1, beta=0, mean=0, var=1, zero biases)
many folded conv biases are identical zeros, the exporters deduplicate those initializers (TorchScript behind
``Identity`` nodes), and a zero bias hides bias-propagation bugs in pruning. ``resnet18_plain`` keeps the
default init on purpose, to cover the deduplicated case.

``resnet18_bn`` is exported with ``training=TrainingMode.PRESERVE`` and no constant folding, so its
``BatchNormalization`` nodes survive (TorchScript exporter only: the dynamo exporter has no such mode).

Exports are cached under ``.cache/zoo/torch-<version>-tv-<version>/`` (git-ignored; ``ONNXPRUNE_ZOO_CACHE``
overrides ``.cache/zoo``), keyed by name, exporter, opset, input size and ``ZOO_REVISION``, so repeated test
runs reuse them.

CLI::

    python tools/zoo.py export [--out DIR] [--names resnet18 ...] [--exporter torchscript|dynamo|both]
    python tools/zoo.py census [--out DIR] [--names ...] [--exporter ...] [--census-file /tmp/zoo_census.txt]
    python tools/zoo.py list
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("ONNXPRUNE_ZOO_CACHE", REPO_ROOT / ".cache" / "zoo"))
EXPORTERS = ("torchscript", "dynamo")
OPSET = {"torchscript": 17, "dynamo": 18}
SEED = 0
# Bump when build(), randomize_params() or the export settings change, so stale cached exports are not reused.
ZOO_REVISION = 1


@dataclass(frozen=True)
class ZooSpec:
    """One zoo model: how to build it, its input size, which exporters apply, and what to expect."""

    name: str
    torchvision_name: str
    size: int = 64
    exporters: tuple[str, ...] = EXPORTERS
    randomize: bool = True
    preserve_bn: bool = False
    # Besides the group that reaches the graph output, the channel groups this architecture cannot prune, as
    # substrings of their reasons, and why (the zero-channel oracle only covers the prunable groups).
    frozen: tuple[str, ...] = ()
    frozen_note: str | None = None
    kwargs: dict = field(default_factory=dict)


def _specs() -> dict[str, ZooSpec]:
    specs = [
        ZooSpec("resnet18", "resnet18"),
        ZooSpec("resnet50", "resnet50"),
        ZooSpec("mobilenet_v2", "mobilenet_v2"),
        ZooSpec("mobilenet_v3_small", "mobilenet_v3_small"),
        ZooSpec("efficientnet_b0", "efficientnet_b0"),
        ZooSpec("densenet121", "densenet121"),
        ZooSpec(
            "shufflenet_v2",
            "shufflenet_v2_x1_0",
            frozen=("splits the channel axis", "Concat"),
            frozen_note="channel shuffle (Reshape to [N, 2, C/2, H, W], Transpose, Reshape back) interleaves the "
            "two branches, so the concatenated stream of every stage is frozen; the branch-internal convs prune",
        ),
        ZooSpec("squeezenet", "squeezenet1_1"),
        # aux_logits are only used in training mode; eval returns the main logits.
        ZooSpec("googlenet", "googlenet", kwargs={"aux_logits": False, "init_weights": True}),
        ZooSpec("resnext50", "resnext50_32x4d"),
        ZooSpec("regnet_y_400mf", "regnet_y_400mf"),
        # VGG ends in AdaptiveAvgPool2d(7): the TorchScript exporter only exports it when 7 divides the
        # feature size, so VGG needs a 224 input (7x7 features).
        ZooSpec("vgg11", "vgg11", size=224),
        ZooSpec(
            "convnext_tiny",
            "convnext_tiny",
            frozen=("LayerNormalization", "entries on the channel axis"),
            frozen_note="LayerNorm normalises over the channel axis, so a removed channel changes the mean and "
            "variance of the others: the residual stream (and the downsampling layers on it) is frozen; the "
            "4x MLP inside each block prunes",
        ),
        ZooSpec("resnet18_bn", "resnet18", exporters=("torchscript",), preserve_bn=True),
        ZooSpec("resnet18_plain", "resnet18", exporters=("torchscript",), randomize=False),
    ]
    return {s.name: s for s in specs}


ZOO: dict[str, ZooSpec] = _specs()


def build(name: str):
    """The torch module for a zoo name: random weights, fixed seed, eval mode."""
    import torch
    import torchvision

    spec = ZOO[name]
    torch.manual_seed(SEED)
    model = getattr(torchvision.models, spec.torchvision_name)(weights=None, **spec.kwargs)
    if spec.randomize:
        randomize_params(model, seed=SEED)
    return model.eval()


def randomize_params(model, seed: int = 0) -> None:
    """Give the model trained-looking parameters where torchvision initialises them to a constant (seeded).

    BatchNorm gets random running statistics. Every parameter that holds a single repeated value c gets
    c * U(0.5, 1.5) (BatchNorm and LayerNorm weights of one), or N(0, 0.1^2) when |c| < 1e-3 (zero biases,
    ConvNeXt's layer_scale of 1e-6). Exporters deduplicate identical initializers, so constant parameters
    would turn into shared initializers (behind `Identity` nodes with TorchScript), and a layer_scale of 1e-6
    would make ConvNeXt's residual branches numerically invisible to the oracle.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                mod.running_var.copy_(0.5 + torch.rand(n, generator=gen))
        for param in model.parameters():
            if param.numel() > 1 and bool((param == param.reshape(-1)[0]).all()):
                value = float(param.reshape(-1)[0])
                if abs(value) < 1e-3:
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))
                else:
                    param.copy_(value * (0.5 + torch.rand(param.shape, generator=gen)))


def example_input(name: str, batch: int = 1) -> np.ndarray:
    """A seeded float32 NCHW input of the model's zoo size."""
    size = ZOO[name].size
    return np.random.default_rng(SEED).standard_normal((batch, 3, size, size)).astype(np.float32)


def cache_path(name: str, exporter: str, out_dir: str | os.PathLike | None = None) -> Path:
    import torch
    import torchvision

    spec = ZOO[name]
    versions = f"torch-{torch.__version__}-tv-{torchvision.__version__}".replace("+", "_")
    base = Path(out_dir) if out_dir is not None else DEFAULT_CACHE / versions
    return base / f"{name}-{exporter}-op{OPSET[exporter]}-{spec.size}-r{ZOO_REVISION}.onnx"


def cases() -> list[tuple[str, str]]:
    """Every (name, exporter) pair of the zoo."""
    return [(name, exp) for name, spec in ZOO.items() for exp in spec.exporters]


def export(name: str, exporter: str, out_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Export one zoo model (or reuse the cached file) and return its path.

    The file is written beside its target and renamed into place, so concurrent test workers never read
    a half-written model.
    """
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    spec = ZOO[name]
    if exporter not in spec.exporters:
        raise ValueError(f"{name} is not exported with {exporter} (only {', '.join(spec.exporters)})")
    path = cache_path(name, exporter, out_dir)
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build(name)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        if exporter == "torchscript":
            _export_torchscript(model, spec, tmp)
        else:
            _export_dynamo(model, spec, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _export_torchscript(model, spec: ZooSpec, path: str) -> None:
    import torch

    x = torch.from_numpy(example_input(spec.name))
    extra = {}
    if spec.preserve_bn:
        # PRESERVE keeps BatchNormalization nodes (in eval mode they carry training_mode=0); constant
        # folding off so nothing is folded into the convs.
        extra = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            x,
            path,
            dynamo=False,
            opset_version=OPSET["torchscript"],
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            **extra,
        )


def _export_dynamo(model, spec: ZooSpec, path: str) -> None:
    """Dynamo export with a dynamic batch axis; falls back to a static batch if that fails."""
    import contextlib
    import io

    import torch

    # Batch 2 as the example: torch.export specialises a dimension whose example value is 0 or 1.
    x = torch.from_numpy(example_input(spec.name, batch=2))
    common = dict(dynamo=True, opset_version=OPSET["dynamo"], input_names=["input"], output_names=["output"])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), **common
            )
        except Exception:  # noqa: BLE001 - a static batch is the documented fallback
            program = torch.onnx.export(model, (x[:1],), **common)
        program.save(path)


# --------------------------------------------------------------------------------------------- reporting


def run_onnxruntime(path: str | os.PathLike, x: np.ndarray, threads: int = 0) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def census(path: str | os.PathLike) -> dict:
    """Op types and the quirks the pruning core has to handle, for one exported model."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    inits = {i.name for i in g.initializer}
    ops = Counter(n.op_type for n in g.node)
    ident_init = sum(1 for n in g.node if n.op_type == "Identity" and n.input[0] in inits)
    init_uses = Counter(i for n in g.node for i in n.input if i in inits)
    shared = sorted(name for name, k in init_uses.items() if k > 1)
    reshape_dynamic = sum(
        1 for n in g.node if n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] not in inits
    )
    group_convs = Counter()
    for n in g.node:
        if n.op_type == "Conv":
            grp = next((a.i for a in n.attribute if a.name == "group"), 1)
            if grp > 1:
                group_convs["depthwise" if _is_depthwise(n, g) else f"group={grp}"] += 1
    return {
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "functions": [f"{f.domain}:{f.name}" for f in model.functions],
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "identity_of_initializer": ident_init,
        "shared_initializers": shared,
        "constant_nodes": ops.get("Constant", 0),
        "reshape_with_computed_shape": reshape_dynamic,
        "grouped_convs": dict(group_convs),
        "initializers": len(inits),
        "input_shape": _shape(g.input[0]),
        "output_shape": _shape(g.output[0]),
    }


def _is_depthwise(node, graph) -> bool:
    w = next((i for i in graph.initializer if i.name == node.input[1]), None)
    return w is not None and w.dims[1] == 1


def _shape(value_info) -> list:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_param if d.dim_param else d.dim_value for d in dims]


def _cmd_export(args) -> int:
    rows = []
    for name, exporter in _selected(args):
        row = {"name": name, "exporter": exporter}
        t0 = time.perf_counter()
        try:
            path = export(name, exporter, args.out, force=args.force)
        except Exception as exc:  # noqa: BLE001 - reported per case
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(row)
            print(f"{name:20s} {exporter:12s} EXPORT FAILED {row['error']}", flush=True)
            continue
        row["export_s"] = time.perf_counter() - t0
        x = example_input(name, batch=2)
        try:
            t0 = time.perf_counter()
            out = run_onnxruntime(path, x)
            row["ort_s"] = time.perf_counter() - t0
            row["out_shape"] = list(out[0].shape)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"onnxruntime: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        row["mb"] = path.stat().st_size / 2**20
        rows.append(row)
        print(
            f"{name:20s} {exporter:12s} export {row['export_s']:6.2f}s  ort(load+run b=2) "
            f"{row.get('ort_s', float('nan')):5.2f}s  {row['mb']:7.1f} MB  out {row.get('out_shape')}"
            + (f"  ERROR {row['error']}" if "error" in row else ""),
            flush=True,
        )
    return 1 if any("error" in r for r in rows) else 0


def _cmd_census(args) -> int:
    lines = []
    for name, exporter in _selected(args):
        path = export(name, exporter, args.out)
        c = census(path)
        lines.append(f"== {name} [{exporter}] opsets={c['opsets']} in={c['input_shape']} out={c['output_shape']}")
        lines.append("   ops: " + ", ".join(f"{k}:{v}" for k, v in c["ops"].items()))
        for key in ("functions", "identity_of_initializer", "constant_nodes", "reshape_with_computed_shape",
                    "grouped_convs"):
            if c[key]:
                lines.append(f"   {key}: {c[key]}")
        shared = c["shared_initializers"]
        if shared:
            more = " ..." if len(shared) > 6 else ""
            lines.append(f"   shared_initializers ({len(shared)}): " + ", ".join(shared[:6]) + more)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.census_file:
        Path(args.census_file).write_text(text)
    return 0


def _selected(args) -> list[tuple[str, str]]:
    names = args.names or list(ZOO)
    exporters = EXPORTERS if args.exporter == "both" else (args.exporter,)
    return [(n, e) for n in names for e in exporters if e in ZOO[n].exporters]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd in ("export", "census"):
        p = sub.add_parser(cmd)
        p.add_argument("--out", default=None, help="output folder (default: the cache under .cache/zoo)")
        p.add_argument("--names", nargs="*", choices=list(ZOO), help="zoo models (default: all)")
        p.add_argument("--exporter", choices=[*EXPORTERS, "both"], default="both")
        if cmd == "export":
            p.add_argument("--force", action="store_true", help="re-export even if cached")
        else:
            p.add_argument("--census-file", default=None, help="also write the census here")
    sub.add_parser("list")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for spec in ZOO.values():
            print(f"{spec.name:20s} {spec.torchvision_name:20s} {spec.size:4d}  {','.join(spec.exporters)}")
        return 0
    return _cmd_export(args) if args.cmd == "export" else _cmd_census(args)


if __name__ == "__main__":
    sys.exit(main())
