"""Runs the Metal kernel bodies on the CPU: each body is compiled with g++ against metal_kernels/prelude_cpu.h
(threads for SIMD lanes, barriers for SIMD sums) and called through ctypes. A drop-in `runner` for
flashmoe_mlx.kernels: the same Launch the Metal and CUDA runners take. `run_emulated` is a Metal device;
`run_emulated_cuda` a CUDA one, which also takes the CUDA-only tensor-core bodies (their MMA emulated element
by element). Also measures a body's threadgroup memory (`shared_bytes`), to hold the wrappers' accounting of it
to what the body declares. Every array of a launch lies in memory of its own that ends within 16 bytes of an
inaccessible page, so a body that reads or writes past an array's end is caught and the array named."""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import re
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from flashmoe_mlx.kernels import Launch, body_source, constant_definitions, prelude

C_TYPES = {mx.float32: ("float", np.float32), mx.uint32: ("uint32_t", np.uint32), mx.bfloat16: ("bfloat16", np.uint16)}
POISON = {mx.float32: np.nan, mx.uint32: 0xFFFFFFFF, mx.bfloat16: 0xFFFF}  # NaN where a float
BUILD_DIR = Path(tempfile.gettempdir()) / "flashmoe-kernel-emulator"


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
        constant_definitions(launch.constants, {dtype: c_type for dtype, (c_type, _) in C_TYPES.items()}),
        f"static void body({', '.join(params)}, uint32_t LANE, uint32_t SIMD_IN_TG, uint32_t TG, uint32_t TG_THREADS) {{",
        f'#line 1 "{launch.kernel}"',
        body_source(launch.kernel),
        "}",
        GUARD_SOURCE,
        'extern "C" uintptr_t run(void** args, uint32_t groups, uint32_t tg_threads, const uintptr_t* guards,',
        "                         int n_guards, int* faults) {",
        "  flashmoe_guard_begin(guards, n_guards);",
        "  flashmoe_launch(groups, tg_threads, [&](uint32_t lane, uint32_t simd, uint32_t tg, uint32_t n) {",
        f"    body({', '.join(args)}, lane, simd, tg, n);",
        "  });",
        "  *faults = flashmoe_faults.exchange(0);",
        "  return flashmoe_guard_end();",
        "}",
    ])


# While a launch runs, a fault on one of its guard pages is recorded (the first address) and the page opened so
# the run finishes; run() returns the address. A fault anywhere else goes to the handler that was there before.
GUARD_SOURCE = r"""
#include <csignal>
#include <sys/mman.h>
static const uintptr_t* flashmoe_guards;
static int flashmoe_guard_count;
static std::atomic<uintptr_t> flashmoe_guard_hit;
static struct sigaction flashmoe_before;
static void flashmoe_on_fault(int, siginfo_t* info, void*) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(info->si_addr), page = at & ~uintptr_t(FLASHMOE_PAGE - 1);
  for (int i = 0; i < flashmoe_guard_count; ++i) {
    if (flashmoe_guards[i] == page) {
      uintptr_t none = 0;
      flashmoe_guard_hit.compare_exchange_strong(none, at);
      mprotect(reinterpret_cast<void*>(page), FLASHMOE_PAGE, PROT_READ | PROT_WRITE);
      return;
    }
  }
  sigaction(SIGSEGV, &flashmoe_before, nullptr);  // returning re-runs the access, which faults as it would have
}
static void flashmoe_guard_begin(const uintptr_t* guards, int n) {
  flashmoe_guards = guards;
  flashmoe_guard_count = n;
  flashmoe_guard_hit = 0;
  struct sigaction on_fault {};
  on_fault.sa_sigaction = flashmoe_on_fault;
  on_fault.sa_flags = SA_SIGINFO;
  sigemptyset(&on_fault.sa_mask);
  sigaction(SIGSEGV, &on_fault, &flashmoe_before);
}
static uintptr_t flashmoe_guard_end() {
  sigaction(SIGSEGV, &flashmoe_before, nullptr);
  return flashmoe_guard_hit.exchange(0);
}
""".replace("FLASHMOE_PAGE", str(mmap.PAGESIZE))


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
    lib.run.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint32, ctypes.c_uint32,
                        ctypes.POINTER(ctypes.c_size_t), ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.run.restype = ctypes.c_size_t
    return lib


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class GuardedArrays:
    """A launch's arrays, each in an anonymous mapping of its own: it starts on a 16-byte boundary (GPU
    allocations start on 256; numpy and MLX's CPU allocator may start 8 bytes past one, where a 16-byte cp.async
    would fault) and ends within 16 bytes of the mapping's last page, which is inaccessible (the guard)."""

    def __init__(self):
        self.maps = []  # (name, base, size, end of the array)

    def copy(self, name: str, a: np.ndarray) -> np.ndarray:
        """`a`'s elements, its strides kept, in a mapping of their own; the mapping's other bytes all ones, so
        whatever lies between a view's elements (a cache's spare keys) reads as NaN scales or all-ones words."""
        extent = sum((n - 1) * step for n, step in zip(a.shape, a.strides)) + a.itemsize
        body = -(-max(extent, 1) // 16) * 16
        size = -(-body // mmap.PAGESIZE) * mmap.PAGESIZE + mmap.PAGESIZE
        base = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                          -1, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {size} bytes for {name}")
        guard = base + size - mmap.PAGESIZE
        if _libc.mprotect(guard, mmap.PAGESIZE, 0) != 0:  # PROT_NONE
            raise OSError(ctypes.get_errno(), f"mprotect of {name}'s guard page")
        start = guard - body
        self.maps.append((name, base, size, start + extent))
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * body).from_address(start))
        raw[:] = 0xFF
        placed = np.lib.stride_tricks.as_strided(raw.view(a.dtype), a.shape, a.strides)
        placed[...] = a
        return placed

    def guards(self):
        """The guard pages' addresses, for run()."""
        return (ctypes.c_size_t * len(self.maps))(*[base + size - mmap.PAGESIZE for _, base, size, _ in self.maps])

    def owner(self, address: int) -> str:
        """Which array a guard-page address is past, and by how much."""
        name, end = next((name, end) for name, base, size, end in self.maps if base <= address < base + size)
        return f"`{name}` at byte {address - end} past its end"

    def close(self):
        for _, base, size, _ in self.maps:
            _libc.munmap(base, size)
        self.maps = []


def run_emulated(launch: Launch) -> list[mx.array]:
    """Execute `launch` on the CPU. Outputs start poisoned (NaN, or all ones for integers) so unwritten
    elements show. bfloat16 travels as its 16 bits. Inputs whose strides the body reads go with their strides
    (in elements); the others as row-contiguous copies, as MLX makes them. Every array lies before a guard page
    (GuardedArrays): a read or write past an array's end raises, naming the array."""
    lib = _compile(_source(launch))
    strided = _described(launch, "strides")
    memory = GuardedArrays()
    try:
        inputs = {n: np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a) for n, a in launch.inputs.items()}
        inputs = {n: memory.copy(n, a if n in strided else np.ascontiguousarray(a)) for n, a in inputs.items()}
        outputs = [memory.copy(n, np.full(shape, POISON[dtype], C_TYPES[dtype][1]))
                   for n, (shape, dtype) in launch.outputs.items()]
        shapes = [np.array(launch.inputs[n].shape, np.int32) for n in _described(launch, "shape")]
        strides = [np.array(inputs[n].strides, np.int64) // inputs[n].itemsize for n in strided]
        arrays = [*inputs.values(), *outputs, *shapes, *strides]
        pointers = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        faults = ctypes.c_int(0)
        hit = lib.run(pointers, launch.grid // launch.threadgroup, launch.threadgroup, memory.guards(),
                      len(memory.maps), ctypes.byref(faults))
        if hit:
            raise RuntimeError(f"{launch.kernel}: an access to {memory.owner(hit)}")
        if faults.value:
            raise RuntimeError(f"{launch.kernel}: {faults.value} cp.async copies with an end not aligned to their size")
        return [mx.array(o.copy()).view(mx.bfloat16) if dtype == mx.bfloat16 else mx.array(o.copy())
                for o, (_, dtype) in zip(outputs, launch.outputs.values())]
    finally:
        memory.close()


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
