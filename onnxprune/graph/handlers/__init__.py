"""One handler per ONNX op type: how channels flow through the op and how to fix it after slicing.

A handler's `analyze(node, ctx)` reads the channel axes of the node's inputs from `ctx`, sets those of its
outputs, records the constants to slice (`ctx.add_member`) and freezes what it cannot follow
(`ctx.freeze_inputs`). Its `rewrite(node, ctx)` runs after the initializers are sliced and fixes
attributes and shape constants. Registering an op type twice is an error.
"""

from __future__ import annotations

import importlib

_REGISTRY: dict[tuple[str, str], "Handler"] = {}
_MODULES = ("conv", "norm", "elementwise", "pooling", "concat", "reshape", "matmul", "attention", "contrib")


class Handler:
    op_types: tuple[str, ...] = ()

    def analyze(self, node, ctx) -> None:  # pragma: no cover - every handler overrides it
        raise NotImplementedError

    def rewrite(self, node, ctx) -> None:
        """Fix attributes and shape constants after slicing; most ops need nothing."""


def register(*op_types: str, domain: str = ""):
    def deco(cls):
        instance = cls()
        for op in op_types:
            key = (domain, op)
            if key in _REGISTRY:
                raise RuntimeError(f"a handler for {domain or 'ai.onnx'}::{op} is already registered")
            _REGISTRY[key] = instance
        cls.op_types = tuple(op_types)
        return cls
    return deco


def get_handler(op_type: str, domain: str = "") -> Handler | None:
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
            importlib.import_module(f"onnxprune.graph.handlers.{mod}")
