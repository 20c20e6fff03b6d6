"""Train a small LLaMA-style decoder with grouped-query attention on the Python standard library's sources.

8 query heads share 2 key/value heads (4 per KV group), 4 layers, hidden size 128, SwiGLU MLP of 384, rotary
embeddings, RMSNorm, a byte-level vocabulary (tools/stdlib_text.py: token = byte). Trained from scratch with AdamW
on random 128-byte crops of the *training* files of the split (never the calibration or held-out ones) for a fixed
budget of CPU time on 2 threads, then exported with its key/value cache as explicit inputs and outputs (optimum's
layout, TorchScript exporter, opset 17) and the calibration / held-out windows written beside it:

    python tools/train_llm.py --cpu-minutes 20 -o models/stdlib_llama.onnx

The budget is CPU time (both threads together): 20 CPU-minutes are 10 minutes on 2 threads of an idle machine,
and the same compute, the same model, when other jobs share the cores (then it takes longer).

writes models/stdlib_llama.onnx, models/stdlib_calib.npz (128 windows of 128 tokens from the calibration files)
and models/stdlib_heldout.npz (256 windows from the held-out files), and prints the held-out perplexity.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python tools/train_llm.py`: the checkout's root, for `tools.*` and onnxprune
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import export_transformers as et  # noqa: E402
from tools import stdlib_text as st  # noqa: E402

CONFIG = {"hidden": 128, "heads": 8, "kv_heads": 2, "layers": 4, "intermediate": 384}


def build(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=st.VOCAB, hidden_size=CONFIG["hidden"], intermediate_size=CONFIG["intermediate"],
                      num_hidden_layers=CONFIG["layers"], num_attention_heads=CONFIG["heads"],
                      num_key_value_heads=CONFIG["kv_heads"], max_position_embeddings=256,
                      bos_token_id=st.BOS, eos_token_id=st.EOS, pad_token_id=st.PAD, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def loss_of(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def stream(files) -> np.ndarray:
    """The training files as one token stream, each file after a <s>."""
    parts = []
    for path in files:
        parts += [np.array([st.BOS]), np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int64)]
    return np.concatenate(parts)


@torch.no_grad()
def perplexity(model, data: dict, batch: int = 64) -> float:
    total, count = 0.0, 0
    for i in range(0, len(data["input_ids"]), batch):
        ids = torch.from_numpy(data["input_ids"][i:i + batch])
        mask = torch.from_numpy(data["attention_mask"][i:i + batch])
        n = int((mask[:, 1:] & mask[:, :-1]).sum())
        total += float(loss_of(model, ids, mask)) * n
        count += n
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-minutes", type=float, default=20.0,
                        help="Training budget in CPU time of this process (both threads together).")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", default="models/stdlib_llama.onnx")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    train = stream(st.stdlib_files("train"))
    calib = st.windows(st.stdlib_files("calibration"), args.seq, 128)
    held = st.windows(st.stdlib_files("heldout"), args.seq, 256)
    print(f"training text: {len(train):,} tokens")
    model = build()
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {params:,}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    budget, start, wall, step = args.cpu_minutes * 60, time.process_time(), time.monotonic(), 0
    model.train()
    while (elapsed := time.process_time() - start) < budget:
        # warmup over the first 3 %, then cosine decay to 10 % over the time budget
        progress = elapsed / budget
        lr = args.lr * (min(1.0, progress / 0.03) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, len(train) - args.seq, args.batch)
        loss = loss_of(model, torch.from_numpy(np.stack([train[s:s + args.seq] for s in starts])))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            print(f"step {step}  {elapsed:.0f} CPU-s  lr {lr:.2e}  loss {float(loss):.3f}", flush=True)
    model.eval()
    print(f"{step} steps ({step * args.batch * args.seq:,} tokens) in {time.process_time() - start:.0f} CPU-s, "
          f"{time.monotonic() - wall:.0f} s wall")
    print(f"held-out perplexity {perplexity(model, held):.4f}, calibration {perplexity(model, calib):.4f}")
    et.export_cache(model, out, dynamo=False)
    np.savez(out.with_name("stdlib_calib.npz"), **calib)
    np.savez(out.with_name("stdlib_heldout.npz"), **held)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
