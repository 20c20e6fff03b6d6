"""Re-training on the ONNX graph itself: the graph as a torch module, distillation losses and loops.

torch is an optional extra (`pip install 'onnxprune[train]'`): nothing here imports it until a function that
needs it runs, and then `require_torch` gives an install hint when it is missing. The engine is
`graph_module.to_torch` (the graph run in torch, op for op, its float initializers as parameters) and
`graph_module.write_back` (the trained values back into the same graph).
"""

from __future__ import annotations

from onnxprune.errors import require_torch  # noqa: F401 - the package's import hint, importable from here


def __getattr__(name: str):
    # `from onnxprune.train import to_torch` works without importing torch at package import time
    if name in ("to_torch", "write_back", "GraphModule", "UnsupportedOpError"):
        from onnxprune.train import graph_module

        return getattr(graph_module, name)
    raise AttributeError(name)
