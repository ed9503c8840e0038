"""Runs the Metal kernel bodies on the CPU: each body is compiled with g++ against metal_kernels/prelude_cpu.h
(threads for SIMD lanes, barriers for SIMD sums) and called through ctypes. A drop-in `runner` for
flashmoe_mlx.kernels: the same Launch the Metal and CUDA runners take. `run_emulated` is a Metal device;
`run_emulated_cuda` a CUDA one, which also takes the CUDA-only tensor-core bodies (their MMA emulated element
by element). Also measures a body's threadgroup memory (`shared_bytes`), to hold the wrappers' accounting of it
to what the body declares."""

from __future__ import annotations

import ctypes
import hashlib
import re
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from flashmoe_mlx.kernels import Launch, body_source, prelude

C_TYPES = {mx.float32: ("float", np.float32), mx.uint32: ("uint32_t", np.uint32), mx.bfloat16: ("bfloat16", np.uint16)}
POISON = {mx.float32: np.nan, mx.uint32: 0xFFFFFFFF, mx.bfloat16: 0xFFFF}  # NaN where a float
BUILD_DIR = Path(tempfile.gettempdir()) / "flashmoe-kernel-emulator"


def _constant(name: str, value) -> str:
    if isinstance(value, mx.Dtype):
        return f"using {name} = {C_TYPES[value][0]};"
    return f"constexpr int {name} = {int(value)};"


def _described(launch: Launch, what: str) -> list[str]:
    """Inputs whose shape or strides (`what`) the body reads as `<name>_<what>`, which MLX then passes to Metal
    and CUDA kernels too. A body that reads strides gets its inputs as they are, views included."""
    body = body_source(launch.kernel)
    return [n for n in launch.inputs if f"{n}_{what}" in body]


def _source(launch: Launch) -> str:
    header, _ = prelude("cpu")
    params = [f"const {C_TYPES[a.dtype][0]}* {n}" for n, a in launch.inputs.items()]
    params += [f"{C_TYPES[d][0]}* {n}" for n, (_, d) in launch.outputs.items()]
    params += [f"const int* {n}_shape" for n in _described(launch, "shape")]
    params += [f"const int64_t* {n}_strides" for n in _described(launch, "strides")]
    args = [f"({p.rsplit(' ', 1)[0]})args[{i}]" for i, p in enumerate(params)]
    return "\n".join([
        header,
        *(_constant(n, v) for n, v in launch.constants.items()),
        f"static void body({', '.join(params)}, uint32_t LANE, uint32_t SIMD_IN_TG, uint32_t TG, uint32_t TG_THREADS) {{",
        f'#line 1 "{launch.kernel}"',
        body_source(launch.kernel),
        "}",
        'extern "C" int run(void** args, uint32_t groups, uint32_t tg_threads) {',
        "  flashmoe_launch(groups, tg_threads, [&](uint32_t lane, uint32_t simd, uint32_t tg, uint32_t n) {",
        f"    body({', '.join(args)}, lane, simd, tg, n);",
        "  });",
        "  return flashmoe_faults.exchange(0);",
        "}",
    ])


@lru_cache(maxsize=None)
def _compile(source: str) -> ctypes.CDLL:
    BUILD_DIR.mkdir(exist_ok=True)
    stem = BUILD_DIR / hashlib.sha256(source.encode()).hexdigest()[:16]
    if not stem.with_suffix(".so").exists():
        stem.with_suffix(".cpp").write_text(source)
        build = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Werror",
                                "-Wno-unused-variable", "-o", str(stem.with_suffix(".tmp.so")),
                                str(stem.with_suffix(".cpp"))], capture_output=True, text=True)
        if build.returncode:
            raise RuntimeError(f"g++ rejected the kernel body:\n{build.stderr}")
        stem.with_suffix(".tmp.so").rename(stem.with_suffix(".so"))
    lib = ctypes.CDLL(str(stem.with_suffix(".so")))
    lib.run.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint32, ctypes.c_uint32]
    lib.run.restype = ctypes.c_int
    return lib


def _aligned(a: np.ndarray, alignment: int = 256) -> np.ndarray:
    """`a` (its strides kept) in memory starting on an `alignment`-byte boundary, as GPU allocations start: numpy
    and MLX's CPU allocator may start an array 8 bytes past one, where a 16-byte cp.async would fault."""
    extent = sum((n - 1) * step for n, step in zip(a.shape, a.strides)) + a.itemsize if a.size else 0
    raw = np.empty(extent + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    if extent:
        raw[start:start + extent] = np.ctypeslib.as_array((ctypes.c_uint8 * extent).from_address(a.ctypes.data))
    return np.lib.stride_tricks.as_strided(raw[start:].view(a.dtype), a.shape, a.strides)


def run_emulated(launch: Launch) -> list[mx.array]:
    """Execute `launch` on the CPU. Outputs start poisoned (NaN, or all ones for integers) so unwritten
    elements show. bfloat16 travels as its 16 bits. Inputs whose strides the body reads go with their strides
    (in elements); the others as row-contiguous copies, as MLX makes them; each starts where a GPU allocation
    would (_aligned)."""
    lib = _compile(_source(launch))
    strided = _described(launch, "strides")
    inputs = {n: np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a) for n, a in launch.inputs.items()}
    inputs = {n: _aligned(a if n in strided else np.ascontiguousarray(a)) for n, a in inputs.items()}
    outputs = [np.full(shape, POISON[dtype], C_TYPES[dtype][1]) for shape, dtype in launch.outputs.values()]
    shapes = [np.array(launch.inputs[n].shape, np.int32) for n in _described(launch, "shape")]
    strides = [np.array(inputs[n].strides, np.int64) // inputs[n].itemsize for n in strided]
    arrays = [*inputs.values(), *outputs, *shapes, *strides]
    pointers = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
    faults = lib.run(pointers, launch.grid // launch.threadgroup, launch.threadgroup)
    if faults:
        raise RuntimeError(f"{launch.kernel}: {faults} cp.async copies with an end not aligned to their size")
    return [mx.array(o).view(mx.bfloat16) if dtype == mx.bfloat16 else mx.array(o)
            for o, (_, dtype) in zip(outputs, launch.outputs.values())]


def run_emulated_cuda(launch: Launch) -> list[mx.array]:
    """run_emulated as a CUDA device: expert_swiglu then also picks the tensor-core bodies."""
    return run_emulated(launch)


run_emulated_cuda.tensor_cores = True


def shared_bytes(launch: Launch) -> int:
    """Threadgroup memory that the body declares for `launch`'s constants: the C++ prelude makes each SHARED
    array a static local of `body`, so the compiled library's symbol table lists them with their sizes."""
    library = _compile(_source(launch))._name
    symbols = subprocess.run(["nm", "-S", "-C", library], capture_output=True, text=True, check=True).stdout
    sizes = re.findall(r"^[0-9a-f]+ ([0-9a-f]+) [bBdD] body\(.*\)::\w+$", symbols, re.MULTILINE)
    return sum(int(size, 16) for size in sizes)
