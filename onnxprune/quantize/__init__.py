"""Quantization through onnxruntime's tools: int8 (static QDQ, dynamic), int4, fp16."""
