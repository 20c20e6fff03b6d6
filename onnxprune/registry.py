"""A table keyed by ONNX op type (and domain), filled by the modules that register into it.

Both op tables of onnxprune use it: the pruning handlers (graph/handlers/) and the torch ops of the training
bridge (train/ops/). Registering a key twice is an error, "ai.onnx" and "" are the same domain, and the modules
that fill the table are imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class OpRegistry(Generic[T]):
    def __init__(self, what: str, package: str, modules: Iterable[str]):
        self.what = what              # "a handler", "a torch op": for the duplicate-key error
        self.package = package
        self.modules = tuple(modules)
        self._entries: dict[tuple[str, str], T] = {}
        self._loaded = False

    def add(self, op_types: Iterable[str], domain: str, entry: T) -> None:
        for op in op_types:
            key = (domain, op)
            if key in self._entries:
                raise RuntimeError(f"{self.what} for {domain or 'ai.onnx'}::{op} is already registered")
            self._entries[key] = entry

    def get(self, op_type: str, domain: str = "") -> T | None:
        self._load()
        return self._entries.get(("" if domain == "ai.onnx" else domain, op_type))

    def supported(self) -> list[str]:
        self._load()
        return sorted(op if not d else f"{d}::{op}" for d, op in self._entries)

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self.modules:
                importlib.import_module(f"{self.package}.{module}")
