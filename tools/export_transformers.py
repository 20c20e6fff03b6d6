"""Export small transformers the way users do, for tests and benchmarks.

BERT-like and GPT-2-like models (Hugging Face `transformers`, random weights, small configs) and torchvision's
VisionTransformer (also with timm-style split-qkv attention), each with the TorchScript-based exporter
(opset 17) or the dynamo exporter (opset 18). Decoders: LLaMA-like (grouped-query attention when kv_heads < heads),
also as causal LMs with explicit past/present key-value inputs and outputs in optimum's layout (`export_cache`),
and a grouped-query self-attention block calling torch's sdpa with enable_gqa (`gqa_attention`; dynamo only:
the TorchScript exporter refuses enable_gqa; opset 23 turns it into ONNX's Attention op).
Every parameter, biases and LayerNorm included, gets random values: zero biases would be deduplicated into one
shared initializer by the dynamo exporter and would hide slicing mistakes.

    python tools/export_transformers.py bert --dynamo -o .cache/bert_dyn.onnx
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

TOKENS = {"vocab_size": 100, "max_position_embeddings": 64}


class _LastHidden(torch.nn.Module):
    """A Hugging Face model as (input_ids[, attention_mask]) -> last_hidden_state (or BERT's pooler_output)."""

    def __init__(self, model, with_mask: bool, pooled: bool = False):
        super().__init__()
        self.model, self.with_mask, self.pooled = model, with_mask, pooled

    def forward(self, input_ids, attention_mask=None):
        if self.with_mask:
            kwargs = {"attention_mask": attention_mask}
        else:
            # explicit positions and an all-ones mask keep transformers' packed-sequence detection (aten::diff,
            # which the TorchScript exporter lacks) out of the graph
            kwargs = {"use_cache": False, "attention_mask": torch.ones_like(input_ids),
                      "position_ids": torch.arange(input_ids.shape[1]).unsqueeze(0)}
        out = self.model(input_ids=input_ids, **kwargs)
        return out.pooler_output if self.pooled else out.last_hidden_state


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def bert(hidden: int = 32, heads: int = 4, layers: int = 2, intermediate: int = 64, seed: int = 0,
         attn: str = "sdpa", pooled: bool = False) -> torch.nn.Module:
    """A small random BERT; `pooled` outputs pooler_output (tanh(W·h_CLS)) instead of the hidden states."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, attn_implementation=attn, **TOKENS)
    model = BertModel(cfg).eval()
    _randomize(model, seed)
    return _LastHidden(model, with_mask=True, pooled=pooled).eval()


def encoder(kind: str, seed: int = 0) -> torch.nn.Module:
    """Other BERT-family encoders, small and random: `distilbert`, `roberta` or `albert` (layers sharing weights,
    a factorised embedding)."""
    import transformers as tf

    torch.manual_seed(seed)
    size = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32, "intermediate_size": 64}
    cfg = {"distilbert": lambda: tf.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, **TOKENS),
           "roberta": lambda: tf.RobertaConfig(**size, vocab_size=TOKENS["vocab_size"], max_position_embeddings=70),
           "albert": lambda: tf.AlbertConfig(**size, embedding_size=16, **TOKENS)}[kind]()
    cfg._attn_implementation = "sdpa"
    model = {"distilbert": tf.DistilBertModel, "roberta": tf.RobertaModel, "albert": tf.AlbertModel}[kind](cfg).eval()
    _randomize(model, seed)
    return _LastHidden(model, with_mask=True).eval()


def gpt2(hidden: int = 32, heads: int = 4, layers: int = 2, seed: int = 0, attn: str = "sdpa") -> torch.nn.Module:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=TOKENS["vocab_size"],
                     n_positions=TOKENS["max_position_embeddings"], attn_implementation=attn, use_cache=False)
    model = GPT2Model(cfg).eval()
    _randomize(model, seed)
    return _LastHidden(model, with_mask=False).eval()


def llama(hidden: int = 32, heads: int = 4, kv_heads: int = 4, layers: int = 2, intermediate: int = 64,
          seed: int = 0) -> torch.nn.Module:
    """A small random LLaMA-like decoder (RMSNorm, rotary embeddings, SwiGLU MLP; grouped-query attention when
    kv_heads < heads), no past key/values."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, attn_implementation="sdpa",
                      vocab_size=TOKENS["vocab_size"], max_position_embeddings=TOKENS["max_position_embeddings"])
    model = LlamaModel(cfg).eval()
    _randomize(model, seed)
    return _LastHidden(model, with_mask=False).eval()


def llama_lm(hidden: int = 32, heads: int = 4, kv_heads: int = 2, layers: int = 2, intermediate: int = 64,
             vocab: int = 100, seed: int = 0, config: dict | None = None) -> torch.nn.Module:
    """A small random LlamaForCausalLM (logits over `vocab` tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, attn_implementation="sdpa",
                      vocab_size=vocab, max_position_embeddings=128, **(config or {}))
    model = LlamaForCausalLM(cfg).eval()
    _randomize(model, seed)
    return model


class WithCache(torch.nn.Module):
    """A causal LM as (input_ids, attention_mask, past_key_values.N.key, past_key_values.N.value, ...) ->
    (logits, present.N.key, present.N.value, ...), the cache [batch, kv_heads, sequence, head_size] as optimum
    lays it out; positions continue after the past."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)],
                             config=self.model.config)
        positions = (torch.arange(input_ids.shape[1]) + past[0].shape[2]).unsqueeze(0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                         position_ids=positions, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kv}" for i in range(layers)
                                                for kv in ("key", "value")]
    return inputs, ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def export_cache(model: torch.nn.Module, path: str | Path, dynamo: bool) -> Path:
    """Write causal LM `model` with its key/value cache as explicit inputs and outputs (see WithCache)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    layers, kv = cfg.num_hidden_layers, cfg.num_key_value_heads
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    wrapper = WithCache(model).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 3))
    mask = torch.ones(2, 5, dtype=torch.long)
    past = tuple(torch.randn(2, kv, 2, head) for _ in range(2 * layers))
    names_in, names_out = cache_names(layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            b, s = torch.export.Dim("batch"), torch.export.Dim("seq", max=128)
            p, t = torch.export.Dim("past", max=128), torch.export.Dim("total", max=256)
            shapes = ({0: b, 1: s}, {0: b, 1: t}, tuple({0: b, 2: p} for _ in past))
            torch.onnx.export(wrapper, (ids, mask, *past), str(path), input_names=names_in, output_names=names_out,
                              dynamo=True, opset_version=18, dynamic_shapes=shapes, verbose=False)
        else:
            axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                    "logits": {0: "batch", 1: "seq"}}
            axes |= {n: {0: "batch", 2: "past"} for n in names_in[2:]}
            axes |= {n: {0: "batch", 2: "total"} for n in names_out[1:]}
            torch.onnx.export(wrapper, (ids, mask, *past), str(path), input_names=names_in, output_names=names_out,
                              dynamo=False, opset_version=17, dynamic_axes=axes)
    return path


class GQAttention(torch.nn.Module):
    """Grouped-query self-attention with torch's sdpa(enable_gqa=True): x [batch, seq, hidden] -> same."""

    def __init__(self, hidden: int = 32, heads: int = 4, kv_heads: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.kv_heads, self.head = heads, kv_heads, hidden // heads
        self.q = torch.nn.Linear(hidden, heads * self.head)
        self.k = torch.nn.Linear(hidden, kv_heads * self.head)
        self.v = torch.nn.Linear(hidden, kv_heads * self.head)
        self.o = torch.nn.Linear(heads * self.head, hidden)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv_heads, self.head).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv_heads, self.head).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, n, self.heads * self.head))


def export_attention(module: torch.nn.Module, path: str | Path, opset: int = 18, hidden: int = 32) -> Path:
    """Write a [batch, seq, hidden] -> [batch, seq, hidden] block with the dynamo exporter (opset 18, or 23)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shapes = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", min=2, max=64)},)
        torch.onnx.export(module.eval(), (torch.randn(2, 5, hidden),), str(path), input_names=["x"],
                          output_names=["y"], dynamo=True, opset_version=opset, dynamic_shapes=shapes, verbose=False)
    return path


def vit(small: bool = True, seed: int = 0) -> torch.nn.Module:
    from torchvision.models import vit_b_16
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    if not small:
        return vit_b_16().eval()
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10).eval()
    _randomize(model, seed)
    return model


def split_attention(mha):
    """A timm-style attention module equal to torch's nn.MultiheadAttention `mha` (batch_first, self-attention):
    one qkv nn.Linear and an output projection, with the head count an attribute Torch-Pruning can update."""
    class Split(torch.nn.Module):
        def __init__(self):
            super().__init__()
            e = mha.embed_dim
            self.num_heads, self.head_dim = mha.num_heads, e // mha.num_heads
            self.scale = self.head_dim ** -0.5
            self.qkv = torch.nn.Linear(e, 3 * e)
            self.proj = torch.nn.Linear(e, e)
            with torch.no_grad():
                self.qkv.weight.copy_(mha.in_proj_weight)
                self.qkv.bias.copy_(mha.in_proj_bias)
                self.proj.weight.copy_(mha.out_proj.weight)
                self.proj.bias.copy_(mha.out_proj.bias)

        def forward(self, x, *_, **__):
            b, n, _ = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            out = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
            return self.proj(out), None

    return Split()


def vit_split(small: bool = True, seed: int = 0) -> torch.nn.Module:
    """`vit` with every nn.MultiheadAttention replaced by the equivalent timm-style module (split_attention)."""
    from torchvision.models.vision_transformer import EncoderBlock

    model = vit(small, seed)
    for block in [m for m in model.modules() if isinstance(m, EncoderBlock)]:
        block.self_attention = split_attention(block.self_attention)
    return model.eval()


def export(model: torch.nn.Module, kind: str, path: str | Path, dynamo: bool, image_size: int = 32) -> Path:
    """Write `model` to `path`; token models take [batch, seq] ids (and mask), ViT [batch, 3, size, size]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "vit":
        args = (torch.randn(2, 3, image_size, image_size),)
        names, dims = ["pixel_values"], [{0: "batch"}]
    else:
        ids = torch.randint(0, TOKENS["vocab_size"], (2, 8))
        args = (ids, torch.ones(2, 8, dtype=torch.long)) if kind == "bert" else (ids,)
        names = ["input_ids", "attention_mask"][:len(args)]
        dims = [{0: "batch", 1: "seq"}] * len(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = tuple({k: torch.export.Dim(v) if v != "seq" else torch.export.Dim(v, min=2, max=60)
                            for k, v in d.items()} for d in dims)
            torch.onnx.export(model, args, str(path), input_names=names, output_names=["output"], dynamo=True,
                              opset_version=18, dynamic_shapes=shapes, verbose=False)
        else:
            # a pooled output is [batch, hidden]: only its first axis is dynamic
            axes = dict(zip(names, dims)) | {"output": {0: "batch"} if getattr(model, "pooled", False) else dims[0]}
            torch.onnx.export(model, args, str(path), input_names=names, output_names=["output"], dynamo=False,
                              opset_version=17, dynamic_axes=axes)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["bert", "gpt2", "vit", "vit_split", "vit_b_16"])
    parser.add_argument("--dynamo", action="store_true", help="dynamo exporter (opset 18) instead of TorchScript")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    if args.kind == "vit_b_16":
        export(vit(small=False), "vit", args.output, args.dynamo, image_size=224)
    else:
        model = {"bert": bert, "gpt2": gpt2, "vit": vit, "vit_split": vit_split}[args.kind]()
        export(model, "vit" if args.kind == "vit_split" else args.kind, args.output, args.dynamo)
    print(args.output)


if __name__ == "__main__":
    main()
