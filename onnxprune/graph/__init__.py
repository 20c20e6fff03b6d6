"""Dependency analysis: which channel dimensions of an ONNX graph are coupled."""
