"""Shared pytest fixtures: tiny checkpoints built once per session (offline) and helpers to run the CLIs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fixtures import make_hf_checkpoint, make_mlx_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(family) -> path of that family's tiny float32 HF checkpoint (built once)."""
    built = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_hf_checkpoint(family, tmp_path_factory.mktemp(f"hf-{family}") / "model")
        return built[family]

    return get


@pytest.fixture(scope="session")
def mlx_checkpoint(tmp_path_factory):
    """mlx_checkpoint(family, bits, group_size) -> a stock mlx-lm quantized checkpoint (built once)."""
    built = {}

    def get(family: str, bits: int = 4, group_size: int = 64) -> Path:
        key = (family, bits, group_size)
        if key not in built:
            built[key] = make_mlx_checkpoint(
                family, tmp_path_factory.mktemp(f"mlx-{family}-{bits}-{group_size}") / "model",
                bits=bits, group_size=group_size,
            )
        return built[key]

    return get


def run_cli(module: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, **kwargs)
