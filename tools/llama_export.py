"""Generate a LLaMA-like causal LM as an ONNX model with external data, for the memory benchmark.

Random weights (the benchmark measures memory and time, not accuracy). The TorchScript exporter needs an
explicit all-ones attention_mask input: without it transformers' packed-sequence check emits `aten::diff`,
which that exporter lacks. The export is re-saved so that every weight lies in one external data file.

    python tools/llama_export.py -o .cache/llama3g/model.onnx              # 16 layers, hidden 2048: 3.4 GB
    python tools/llama_export.py -o /tmp/tiny/model.onnx --hidden 256 --layers 2 --intermediate 688
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path


def logits_module(model):
    """A transformers causal LM as (input_ids, attention_mask) -> logits without a cache: the form the exporters
    trace (tools/smollm2.py uses it too)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits()


def build(path: str | os.PathLike, hidden: int = 2048, layers: int = 16, intermediate: int = 5504, heads: int = 16,
          kv_heads: int = 4, vocab: int = 32000, seed: int = 0) -> Path:
    """Export a random LlamaForCausalLM (input_ids, attention_mask -> logits) to `path` + `path`.data."""
    import onnx
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=2048, attn_implementation="eager", tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)  # its buffers were left empty on the meta device

    ids = torch.randint(0, vocab, (1, 8))
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(logits_module(model).eval(), (ids, torch.ones_like(ids)),
                          str(raw), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                        "logits": {0: "batch", 1: "seq"}})
        del model
        proto = onnx.load(str(raw))  # the exporter writes one file per weight past 2 GB: gather them in one
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    start = time.perf_counter()
    out = build(args.output, args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads, args.vocab)
    size = sum(f.stat().st_size for f in out.parent.iterdir() if f.name.startswith(out.name))
    print(f"{out}: {size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
