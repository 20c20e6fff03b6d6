"""One handler per ONNX op type: how channels flow through the op and how to fix it after slicing.

A handler's `analyze(node, ctx)` reads the channel axes of the node's inputs from `ctx`, sets those of its
outputs, records the constants to slice (`ctx.add_member`) and freezes what it cannot follow
(`ctx.freeze_inputs`). Its `rewrite(node, ctx)` runs after the initializers are sliced and fixes
attributes and shape constants. Registering an op type twice is an error.
"""

from __future__ import annotations

from onnxprune.registry import OpRegistry


class Handler:
    op_types: tuple[str, ...] = ()

    def analyze(self, node, ctx) -> None:  # pragma: no cover - every handler overrides it
        raise NotImplementedError

    def rewrite(self, node, ctx) -> None:
        """Fix attributes and shape constants after slicing; most ops need nothing."""


_REGISTRY: OpRegistry[Handler] = OpRegistry(
    "a handler", "onnxprune.graph.handlers",
    ("conv", "norm", "elementwise", "pooling", "concat", "reshape", "matmul", "attention", "contrib"))


def register(*op_types: str, domain: str = ""):
    def deco(cls):
        _REGISTRY.add(op_types, domain, cls())
        cls.op_types = tuple(op_types)
        return cls
    return deco


def get_handler(op_type: str, domain: str = "") -> Handler | None:
    return _REGISTRY.get(op_type, domain)


def supported_ops() -> list[str]:
    return _REGISTRY.supported()
