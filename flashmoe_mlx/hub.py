"""Turning a path-or-repo argument into a local directory: a local path, or a hub snapshot when online."""

from __future__ import annotations

import os
from pathlib import Path


class NotFound(ValueError):
    """Neither a local directory nor a repo the hub could provide."""


def resolve_path(src: str, allow_patterns: list[str]) -> Path:
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotFound(f"{src}: not a directory")
        return path
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise NotFound(f"{src}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src, allow_patterns=allow_patterns))
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one clear message
        text = str(e).lower()
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in text or "connect" in text
        why = "the hub cannot be reached (offline?)" if offline else f"{type(e).__name__}: {e}"
        raise NotFound(f"{src}: not a local directory, and fetching it from the hub failed: {why}") from None
