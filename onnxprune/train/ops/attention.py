"""Attention ops: ONNX Attention (opset 23) and the com.microsoft ops of onnxruntime-genai and the transformer
optimizer (MultiHeadAttention, GroupQueryAttention, RotaryEmbedding)."""

from __future__ import annotations
