"""The distribution: the wheel carries the converter as flashmoe_mlx.convert and the Metal sources as data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import mlx_lm

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_converter_and_metal_kernels(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("flashmoe_mlx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ROOT.joinpath("convert").glob("*.py"):
        assert f"flashmoe_mlx/convert/{module.name}" in names
    for module in ROOT.joinpath("flashmoe_mlx").rglob("*.py"):  # every subpackage, e.g. flashmoe_mlx.bench
        assert module.relative_to(ROOT).as_posix() in names
    assert "flashmoe_mlx/metal_kernels/__init__.py" in names
    for source in [*ROOT.joinpath("metal_kernels").glob("*.metal"), *ROOT.joinpath("metal_kernels").glob("*.cu")]:
        assert f"flashmoe_mlx/metal_kernels/{source.name}" in names
    assert not any(n.startswith(("convert/", "metal_kernels/", "tests/")) for n in names)


def test_converter_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "flashmoe_mlx.convert", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--hf-path" in result.stdout and "LOSSY" in result.stdout


def test_pinned_mlx_versions():
    """We hook mlx-lm internals (SwitchGLU, model classes); an upgrade must fail here, loudly, first."""
    import mlx.core as mx

    assert mx.__version__.startswith("0.32."), mx.__version__
    assert mlx_lm.__version__.startswith("0.32."), mlx_lm.__version__
