"""Real text for decoders: the Python standard library's own sources, as byte tokens in fixed windows.

The sources are on every machine. Files are split by a hash of their path into three parts, training (5 in 8
files), calibration (1 in 8) and held-out (2 in 8), never the same file in two of them, read as UTF-8 bytes (a
byte-level vocabulary: token = byte, plus <s>, </s>, <pad>, <unk> at 256..259), and cut into windows of `seq`
tokens, each starting with <s>. A window holds text of
one file only; the last window of a file is padded on the right (attention_mask 0), so perplexity honours the mask.

    python tools/stdlib_text.py --seq 128 --windows 256 --part calibration -o calib.npz
    python tools/stdlib_text.py --seq 128 --windows 256 --part heldout -o heldout.npz

`byte_tokenizer()` is the same vocabulary as a Hugging Face `tokenizers` WordLevel tokenizer (for model folders
that onnxruntime-genai's builder and runtime read).
"""

from __future__ import annotations

import argparse
import hashlib
import sysconfig
from pathlib import Path

import numpy as np

BOS, EOS, PAD, UNK = 256, 257, 258, 259
VOCAB = 260
PARTS = ("train", "calibration", "heldout")
_PART_OF = {0: "heldout", 1: "heldout", 2: "calibration"} | {b: "train" for b in range(3, 8)}


def stdlib_files(part: str) -> list[Path]:
    """The standard library's .py files (tests and site-packages left out) of one part, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts
                   and "tests" not in p.parts and "idlelib" not in p.parts)
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    # a stable split by path
    bucket = [int(hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest(), 16) % 8 for p in files]
    return [p for p, b in zip(files, bucket) if _PART_OF[b] == part]


def windows(files: list[Path], seq: int, count: int | None = None, seed: int = 0, skip: int = 0) -> dict:
    """`count` windows of `seq` tokens (all when None), chosen at random (seed) after the first `skip` ones:
    {'input_ids': [n, seq] int64, 'attention_mask': [n, seq] int64}."""
    ids, masks = [], []
    for path in files:
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int64)
        step = seq - 1
        for start in range(0, len(data), step):
            chunk = data[start:start + step]
            if len(chunk) < 16:
                continue
            row = np.full(seq, PAD, np.int64)
            row[0] = BOS
            row[1:1 + len(chunk)] = chunk
            mask = np.zeros(seq, np.int64)
            mask[:1 + len(chunk)] = 1
            ids.append(row)
            masks.append(mask)
    order = np.random.default_rng(seed).permutation(len(ids))[skip:]
    if count is not None:
        order = order[:count]
    return {"input_ids": np.stack([ids[i] for i in order]), "attention_mask": np.stack([masks[i] for i in order])}


def byte_tokenizer():
    """The byte vocabulary as a `tokenizers` WordLevel tokenizer: GPT-2's byte-to-character map, one token per
    byte (id = byte value)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)} | {"<s>": BOS, "</s>": EOS, "<pad>": PAD, "<unk>": UNK}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                                                 pre_tokenizers.Split(Regex("."), behavior="isolated")])
    tok.decoder = decoders.ByteLevel()
    return tok


def save_hf_folder(model, folder: str | Path) -> Path:
    """`model` (a transformers PreTrainedModel) with the byte tokenizer, as a Hugging Face folder."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS, required=True)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    arrays = windows(stdlib_files(args.part), args.seq, args.windows, args.seed)
    np.savez(args.output, **arrays)
    print(f"{args.output}: {len(arrays['input_ids'])} windows of {args.seq} tokens")


if __name__ == "__main__":
    main()
