"""Compiles the CUDA twins here, without a GPU: each Launch's body is wrapped the way `run_on_gpu` and MLX's
`mx.fast.cuda_kernel` wrap it (typed pointer arguments, the constants as the source's first lines, the prelude's
header and prologue) and built by nvcc for the H200 (sm_90). ptxas reports each kernel's registers, which must fit
the launch: a threadgroup's threads times registers per thread within the 64K registers of an SM, or the launch
fails."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from flashmoe_mlx.kernels import TYPE_NAMES, Launch, mlx_sources

CUDA_TYPES = TYPE_NAMES["cuda"]
REGISTERS_PER_SM = 64 * 1024
ARCH = "sm_90"


def nvcc() -> str | None:
    return shutil.which("nvcc")


def _kernel(launch: Launch, name: str) -> str:
    """One launch as MLX's CUDA backend writes it (mlx/backend/cuda/custom_kernel.cpp, build_kernel)."""
    _, body = mlx_sources("cuda", launch.kernel, launch.constants)
    params = []
    for n, a in launch.inputs.items():
        params.append(f"const {CUDA_TYPES[a.dtype]}* {n}")
        if f"{n}_shape" in body:
            params.append(f"const __grid_constant__ Shape {n}_shape")
        if f"{n}_strides" in body:
            params.append(f"const __grid_constant__ Strides {n}_strides")
    params += [f"{CUDA_TYPES[d]}* {n}" for n, (_, d) in launch.outputs.items()]
    return "\n".join([f"__global__ void {name}({', '.join(params)}) {{", body, "}"])


def compile_launches(launches: list[Launch]) -> dict[str, int]:
    """nvcc every launch into one module for ARCH, each with its own header (what mlx_sources gives its body)
    in a namespace of its own; returns each launch's registers per thread, keyed by `k<index>`. Raises with
    nvcc's message when a body does not compile."""
    source = "\n".join([
        "#include <cstdint>",
        "#include <cuda_bf16.h>",
        "#include <cuda_fp16.h>",
        "struct Shape { int32_t values[8]; __device__ int32_t operator[](int i) const { return values[i]; } };",
        "struct Strides { int64_t values[8]; __device__ int64_t operator[](int i) const { return values[i]; } };",
        *(f"namespace n{i} {{\n{mlx_sources('cuda', launch.kernel, launch.constants)[0]}"
          f"extern \"C\" {_kernel(launch, f'k{i}')}\n}}" for i, launch in enumerate(launches)),
    ])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernels.cu"
        path.write_text(source)
        build = subprocess.run([nvcc(), f"-arch={ARCH}", "-std=c++17", "-Xptxas", "-v", "-c", "-o",
                                str(path.with_suffix(".o")), str(path)], capture_output=True, text=True)
    if build.returncode:
        raise RuntimeError(f"nvcc rejected the CUDA twins:\n{build.stderr[-4000:]}")
    # ptxas: "Compiling entry function 'k0' for 'sm_90'" ... "Used 48 registers, ..."
    registers, current = {}, None
    for line in build.stderr.splitlines():
        entry = re.search(r"entry function '(k\d+)'", line)
        if entry:
            current = entry.group(1)
        used = re.search(r"Used (\d+) registers", line)
        if used and current:
            registers[current] = int(used.group(1))
    return registers
