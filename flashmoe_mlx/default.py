"""The embedded default model: the project's own small MoE, bundled as HF safetensors in `default_model/`,
converted to a 4-bit flashmoe checkpoint in the user's cache on first use, then streamed under a budget
smaller than its experts so the default run exercises every part offline."""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

BUNDLED = Path(__file__).parent / "default_model"


def cache_dir() -> Path:
    root = os.environ.get("FLASHMOE_MLX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flashmoe-mlx"
    return Path(root)


def _fingerprint() -> str:
    """Changes whenever the bundled files do, so a retrained model is converted again."""
    from . import __version__

    crc = zlib.crc32(__version__.encode())
    for f in sorted(BUNDLED.iterdir()):
        if f.is_file() and f.suffix not in (".md", ".txt"):  # docs and the held-out text are not the model
            crc = zlib.crc32(f.name.encode() + f.read_bytes(), crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def ensure_default_model() -> tuple[Path, int]:
    """(path of the converted default checkpoint, its default memory budget: half the expert bytes)."""
    if not (BUNDLED / "config.json").is_file():
        raise FileNotFoundError(f"{BUNDLED}: the bundled default model is missing from this installation")
    out = cache_dir() / f"default-4bit-{_fingerprint()}"
    if not (out / "config.json").is_file():
        from .convert import convert

        print(f"first use: converting the bundled demo MoE to 4-bit in {out}", file=sys.stderr, flush=True)
        convert(out, hf_path=str(BUNDLED), overwrite=True, progress=True)
    hints = json.loads((out / "config.json").read_text())["flashmoe"]["memory_hints"]
    return out, hints["expert_bytes"] // 2
