"""The op table of the training bridge: one torch function per ONNX op type, keyed by (domain, op type).

A function receives a `Node` (attributes, opset, output count) and the node's input tensors (None for an
omitted optional input) and returns one tensor or a tuple (one per output). `static` lists the input positions
that are shapes, indices, axes or scales rather than values a gradient flows into: a float initializer read
only there stays a constant. `check(node)` may refuse a form the function does not implement (a reason string),
so an unsupported attribute fails when the module is built, never as a silent difference. Registering a key
twice is an error.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

_MODULES = ("math", "shape", "nn", "resize", "attention")


@dataclass(frozen=True)
class OpSpec:
    fn: Callable
    static: tuple[int, ...] = ()
    check: Callable | None = None


@dataclass
class Node:
    """What an op function knows of its node: op type, name, attributes (plain Python values), the opset of
    its domain, and how many outputs the graph uses (trailing optional outputs may be absent)."""

    op_type: str
    name: str
    attrs: dict = field(default_factory=dict)
    opset: int = 17
    n_outputs: int = 1
    domain: str = ""

    def get(self, key: str, default=None):
        return self.attrs.get(key, default)


_REGISTRY: dict[tuple[str, str], OpSpec] = {}


def register(*op_types: str, domain: str = "", static: tuple[int, ...] = (), check: Callable | None = None):
    def deco(fn):
        for op in op_types:
            key = (domain, op)
            if key in _REGISTRY:
                raise RuntimeError(f"a torch op for {domain or 'ai.onnx'}::{op} is already registered")
            _REGISTRY[key] = OpSpec(fn, static, check)
        return fn
    return deco


def get_op(op_type: str, domain: str = "") -> OpSpec | None:
    _load()
    return _REGISTRY.get(("" if domain == "ai.onnx" else domain, op_type))


def supported_ops() -> list[str]:
    _load()
    return sorted(op if not d else f"{d}::{op}" for d, op in _REGISTRY)


_loaded = False


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _MODULES:
            importlib.import_module(f"onnxprune.train.ops.{mod}")
