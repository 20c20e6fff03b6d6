"""The op table of the training bridge: one torch function per ONNX op type, keyed by (domain, op type).

A function receives a `Node` (attributes, opset, output count) and the node's input tensors (None for an
omitted optional input) and returns one tensor or a tuple (one per output). `static` lists the input positions
that are shapes, indices, axes or scales rather than values a gradient flows into: a float initializer read
only there stays a constant. `check(node)` may refuse a form the function does not implement (a reason string),
so an unsupported attribute fails when the module is built, never as a silent difference. Registering a key
twice is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from onnxprune.registry import OpRegistry

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


_REGISTRY: OpRegistry[OpSpec] = OpRegistry("a torch op", "onnxprune.train.ops", _MODULES)


def register(*op_types: str, domain: str = "", static: tuple[int, ...] = (), check: Callable | None = None):
    def deco(fn):
        _REGISTRY.add(op_types, domain, OpSpec(fn, static, check))
        return fn
    return deco


def get_op(op_type: str, domain: str = "") -> OpSpec | None:
    return _REGISTRY.get(op_type, domain)


def supported_ops() -> list[str]:
    return _REGISTRY.supported()
