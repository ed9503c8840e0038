"""Where a conversion reads from: a local or hub Hugging Face checkpoint, or an mlx-lm checkpoint.

Owns locating the directory, reading config.json, checking the shard set against its index, and
opening every shard lazily (`mx.load` maps tensors; bytes are read only when a tensor is evaluated).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from flashmoe_mlx.hub import NotFound, resolve_path
from flashmoe_mlx.layout import check_safetensors_file

# Files that travel with a checkpoint besides its weights and config.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "*.tiktoken",
)


class SourceError(ValueError):
    pass


@dataclass
class Source:
    path: Path
    config: dict
    weights: dict[str, mx.array]  # lazy; keys as stored in the shards
    shard_of: dict[str, str]  # tensor key -> shard file name (for error messages)
    quantized: bool  # an mlx-lm checkpoint with a `quantization` block

    def side_files(self) -> list[Path]:
        found = {p for pattern in SIDE_FILES for p in self.path.glob(pattern) if p.is_file()}
        return sorted(found)


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    try:
        config = json.loads(cfg.read_text())
    except FileNotFoundError:
        raise SourceError(f"{cfg}: missing; a checkpoint directory needs its config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise SourceError(f"{cfg}: should hold a JSON object")
    return config


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise SourceError(f"{index}: unreadable weight_map ({e})") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise SourceError(f"{path}: shard {missing[0]} listed in {index.name} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SourceError(f"{path}: no *.safetensors weight files")
    return files


def open_source(src: str, *, expect_quantized: bool) -> Source:
    try:
        path = resolve_path(src, ["*.json", "*.safetensors", *SIDE_FILES])
    except NotFound as e:
        raise SourceError(str(e)) from None
    config = _read_config(path)
    quantized = "quantization" in config
    if expect_quantized and not quantized:
        raise SourceError(f"{path / 'config.json'}: no 'quantization' block; --mlx-path expects a quantized "
                          "mlx-lm checkpoint (use --hf-path for an unquantized Hugging Face one)")
    if not expect_quantized and quantized:
        raise SourceError(f"{path}: already an mlx-lm quantized checkpoint; repack it with --mlx-path")
    weights, shard_of = {}, {}
    for shard in _shard_files(path):
        check_safetensors_file(shard)
        try:
            tensors = mx.load(str(shard))
        except Exception as e:  # noqa: BLE001 - mlx raises RuntimeError/ValueError for bad headers
            raise SourceError(f"{shard}: unreadable safetensors file ({e})") from None
        for key, value in tensors.items():
            weights[key] = value
            shard_of[key] = shard.name
    return Source(path, config, weights, shard_of, quantized)
