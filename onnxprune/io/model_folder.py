"""Model folders: a decoder beside its config.json (Hugging Face / optimum) or genai_config.json (onnxruntime-genai).

Those runtimes read the sizes of the model from the config (onnxruntime-genai allocates the key/value cache from
num_key_value_heads and head_size), so a pruned model needs a config that says what was pruned. `write_folder`
gives the output folder updated copies (num_attention_heads, num_key_value_heads, intermediate_size, hidden_size
where they changed; genai's decoder filename too) and copies the other files (tokenizer, generation config), so
the pruned folder loads exactly as the original does. The original folder is never written to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from onnxprune.errors import InputError

CONFIGS = ("config.json", "genai_config.json")


def has_config(model_path: str | os.PathLike) -> bool:
    folder = Path(model_path).resolve().parent
    return any((folder / name).is_file() for name in CONFIGS)


def pruned_sizes(result) -> dict[str, set[int]]:
    """Sizes of the pruned model per kind, over its layers: attention heads, key/value heads, MLP neurons and the
    hidden size (each a set: one value when every layer agrees)."""
    analysis, plan = result.analysis, result.plan
    approximate = {analysis.find(s) for s in analysis.context.approximate}
    sizes: dict[str, set[int]] = {"heads": set(), "kv_heads": set(), "intermediate": set(), "hidden": set(),
                                  "layers": set()}
    depth = getattr(result, "depth", None)
    if depth and depth["dropped"] and depth["attention_blocks"] == depth["blocks"]:  # decoder layers dropped
        sizes["layers"].add(depth["blocks"] - len(depth["dropped"]))
    for group in analysis.groups:
        root = group.spaces[0]
        kept = len(plan.kept[root]) if root in plan.kept else group.size
        if group.kv_groups:
            heads = kept // group.head_dim
            sizes["heads"].add(heads)
            per_group = group.size // group.head_dim // group.kv_groups
            sizes["kv_heads"].add(group.kv_groups if group.gqa_mode == "query-heads" else heads // per_group)
        elif group.unit > 1:
            sizes["heads"].add(kept // group.unit)
            sizes["kv_heads"].add(kept // group.unit)
        elif root in approximate:
            sizes["hidden"].add(kept)
        elif group.prunable:
            sizes["intermediate"].add(kept)
    return sizes


_HF_KEYS = {"heads": ("num_attention_heads", "n_head"), "kv_heads": ("num_key_value_heads",),
            "intermediate": ("intermediate_size", "n_inner"), "hidden": ("hidden_size", "n_embd"),
            "layers": ("num_hidden_layers", "n_layer")}
_GENAI_KEYS = {"heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "hidden": "hidden_size",
               "layers": "num_hidden_layers"}


def _update(config: dict, keys: dict, sizes: dict[str, set[int]], where: str, notes: list[str]) -> None:
    for kind, names in keys.items():
        names = (names,) if isinstance(names, str) else names
        values = sizes.get(kind, set())
        present = [n for n in names if n in config]
        if not values or not present:
            continue
        if len(values) > 1:
            notes.append(f"{where}: layers now differ in {present[0]} ({', '.join(map(str, sorted(values)))}); "
                         "a config holds one value, so it was left as it was and runtimes that read it may fail")
            continue
        (value,) = values
        for name in present:
            if config[name] != value:
                notes.append(f"{where}: {name} {config[name]} -> {value}")
                config[name] = value


def _plan(source: Path, output: Path) -> list[tuple[Path, Path]]:
    """(source file, target) pairs the folder copy writes, configs included; empty when nothing is to be done."""
    src_dir, dst_dir = source.parent, output.parent
    if not has_config(source) or src_dir == dst_dir:
        return []
    skip = {source.name, source.name + ".data", output.name, output.name + ".data"}
    return [(entry, dst_dir / entry.name) for entry in sorted(src_dir.iterdir())
            if entry.is_file() and entry.name not in skip and not _references_model(entry, source.name)]


def check_targets(source_model: str | os.PathLike, output_model: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before anything is written, to replace files of an existing output folder without `overwrite`."""
    for _, target in _plan(Path(source_model).resolve(), Path(output_model).resolve()):
        if target.exists() and not overwrite:
            raise InputError(f"{target} exists (pass --overwrite to replace the model folder's files)")


def write_folder(source_model: str | os.PathLike, output_model: str | os.PathLike, result,
                 overwrite: bool = False) -> list[str]:
    """Give the output model's folder the source folder's files, with config.json / genai_config.json updated to
    the pruned sizes. Returns notes (what changed). Nothing happens when the source has no config; the output must
    then be in another folder than the source."""
    source, output = Path(source_model).resolve(), Path(output_model).resolve()
    if not has_config(source):
        return []
    if source.parent == output.parent:
        return [f"{source.parent} holds {', '.join(n for n in CONFIGS if (source.parent / n).is_file())} "
                "describing the original model; write the pruned model into another folder (-o DIR/model.onnx) to "
                "get an updated copy of the folder"]
    check_targets(source, output, overwrite)
    sizes = pruned_sizes(result)
    notes: list[str] = []
    for entry, target in _plan(source, output):
        if entry.name == "config.json":
            config = _read(entry)
            _update(config, _HF_KEYS, sizes, "config.json", notes)
            _write(target, config)
        elif entry.name == "genai_config.json":
            config = _read(entry)
            decoder = config.get("model", {}).get("decoder", {})
            _update(decoder, _GENAI_KEYS, sizes, "genai_config.json", notes)
            if decoder.get("filename") not in (None, output.name):
                notes.append(f"genai_config.json: decoder filename {decoder['filename']} -> {output.name}")
                decoder["filename"] = output.name
            _write(target, config)
        else:
            shutil.copy2(entry, target)
    notes.append(f"model folder: {len(_plan(source, output))} files of {source.parent} written to {output.parent}")
    return notes


def _references_model(path: Path, model_name: str) -> bool:
    """A file that is the source model's external data under another name (model.onnx_data and the like)."""
    stem = model_name.rsplit(".", 1)[0]
    return path.name.startswith(stem + ".onnx") or path.name.startswith(model_name)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None


def _write(path: Path, config: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    os.replace(tmp, path)
