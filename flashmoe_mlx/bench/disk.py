"""The machine's side of the bounds: dropping the page cache, raw parallel preads of expert records (the I/O
bound) and a large memory copy (the bandwidth the compute bound divides by). examples/bench_store.py uses the
same reader."""

from __future__ import annotations

import mmap
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


class CacheError(RuntimeError):
    pass


def drop_caches():
    """Empty the page cache (needs root): the next reads come from the disk."""
    subprocess.run(["sync"], check=True)
    try:
        DROP_CACHES.write_text("3\n")
    except OSError as e:
        raise CacheError(f"cannot drop the page cache ({DROP_CACHES}: {e.strerror}); cold runs need root") from None


def workload(layouts, batch: int, seed: int = 0):
    """[(layer, expert ids)]: every record once (whole batches only), in random batches of `batch` per layer, layers interleaved."""
    rng = np.random.default_rng(seed)
    per_layer = {l.layer: rng.permutation(l.num_experts)[: l.num_experts // batch * batch].reshape(-1, batch)
                 for l in layouts}
    rounds = max(len(v) for v in per_layer.values())
    return [(layer, ids[r]) for r in range(rounds) for layer, ids in per_layer.items() if r < len(ids)]


class RawPread:
    """Whole packed records, `os.preadv` into page-aligned buffers on a thread pool: the I/O bound."""

    def __init__(self, layouts, threads, batch):
        self.layouts = {l.layer: l for l in layouts}
        self.fds = {l.layer: os.open(l.segments[0].file, os.O_RDONLY) for l in layouts}
        for fd in self.fds.values():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        size = max(l.segments[0].length for l in layouts)
        self.buffers = [np.frombuffer(mmap.mmap(-1, size), np.uint8) for _ in range(batch)]
        self.pool = ThreadPoolExecutor(threads)

    def __call__(self, layer, ids) -> int:
        seg = self.layouts[layer].segments[0]
        jobs = [(self.fds[layer], self.buffers[i][: seg.length], int(seg.offsets[e])) for i, e in enumerate(ids)]
        return sum(self.pool.map(lambda j: os.preadv(j[0], [j[1]], j[2]), jobs))

    def close(self):
        self.pool.shutdown()
        for fd in self.fds.values():
            os.close(fd)


def pread_gbps(layouts, *, threads: int = 4, batch: int = 8, max_bytes: float = 2e9, cold: bool = True) -> float:
    """GB/s of raw parallel record reads, in decode-sized batches, over up to `max_bytes` of records: from the
    disk after dropping the page cache (`cold`), else from wherever the records are (read them twice for the
    page cache's speed)."""
    reader = RawPread(layouts, threads, batch)
    if cold:
        drop_caches()
    nbytes, t0 = 0, time.perf_counter()
    try:
        for layer, ids in workload(layouts, batch):
            nbytes += reader(layer, ids)
            if nbytes >= max_bytes:
                break
    finally:
        reader.close()
    return nbytes / (time.perf_counter() - t0) / 1e9


def copy_gbps(nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """Memory bandwidth, GB/s counting bytes read plus bytes written, of the best of a few large copies."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def device_copy_gbps(nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """The GPU's memory bandwidth as MLX sees it (read + write of a large array), for the compute bound."""
    a = mx.zeros((nbytes // 4,), mx.uint32)
    mx.eval(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(a + 1)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def upload_gbps(nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """Host memory -> GPU: GB/s of turning a numpy buffer (as the store's staged reads hold records) into an
    MLX array that a GPU op has read."""
    host = np.ones(nbytes, np.uint8)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(mx.array(host).sum())
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9
