"""The expert store: a fixed pool of slots per MoE layer, filled from disk on demand.

Owns the pools (MLX arrays shaped like mlx-lm's stacked experts, `[slots, ...]`, held by the layer's
projection modules so mlx-lm's own SwitchGLU math runs on them), the expert->slot maps, eviction, the
reads (positional reads on a small thread pool into reusable page-aligned buffers, adjacent spans merged),
and the stats. Bookkeeping is numpy arrays per layer: no Python object per expert on the hot path.
"""

from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .format import DTYPES, FormatError, checksum
from .layout import LayerLayout

STAGING_BYTES = 64 << 20  # misses are read in batches of at most this many bytes
MAX_READ = 8 << 20  # merged reads are split so the thread pool keeps several in flight


class LRU:
    """Evict the slot used longest ago; free slots first. The policy interface is `touch` and `victims`."""

    def __init__(self, num_slots: int):
        self.last_use = np.full(num_slots, -1, np.int64)
        self.clock = 0

    def touch(self, slots: np.ndarray):
        self.clock += 1
        self.last_use[slots] = self.clock

    def victims(self, count: int, protected: np.ndarray) -> np.ndarray:
        age = self.last_use.astype(np.float64)
        age[protected] = np.inf
        return np.argsort(age, kind="stable")[:count]


POLICIES = {"lru": LRU}


@dataclass
class LayerPool:
    layout: LayerLayout
    tensors: dict[str, mx.array]  # name -> [slots, ...]; the same objects the projection modules hold
    slot_of: np.ndarray  # int32 [num_experts], -1 when not resident
    expert_of: np.ndarray  # int32 [slots], -1 when free
    policy: LRU
    fds: list[int] = field(default_factory=list)


class ExpertStore:
    def __init__(self, layouts: list[LayerLayout], slots_per_layer: int, *, threads: int = 4, policy: str = "lru",
                 verify_reads: bool = False, float_dtype=None):
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; known: {', '.join(POLICIES)}")
        self.slots_per_layer = slots_per_layer
        self.verify_reads = verify_reads
        self.float_dtype = float_dtype  # None keeps the stored dtype of scales/biases
        self.pools: dict[int, LayerPool] = {}
        for layout in layouts:
            slots = min(slots_per_layer, layout.num_experts)
            tensors = {t.name: mx.zeros((slots, *t.shape), self._pool_dtype(t.dtype)) for t in layout.tensors}
            fds = [os.open(s.file, os.O_RDONLY) for s in layout.segments]
            for fd in fds:
                # Reads are random and exact: kernel read-ahead would only pull in bytes nobody asked for.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self.pools[layout.layer] = LayerPool(layout, tensors, np.full(layout.num_experts, -1, np.int32),
                                                 np.full(slots, -1, np.int32), POLICIES[policy](slots), fds)
        mx.eval([p.tensors for p in self.pools.values()])
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="flashmoe-read")
        self._staging = {}
        self.reset_stats()

    def _pool_dtype(self, dtype: str):
        if dtype in ("uint32", "uint8"):
            return getattr(mx, dtype)
        return self.float_dtype or getattr(mx, dtype)

    # ---------------------------------------------------------------- stats

    def reset_stats(self):
        self._stats = {"hits": 0, "misses": 0, "evictions": 0, "bytes_read": 0, "read_seconds": 0.0, "reads": 0}

    def counters(self) -> dict:
        """The running counters alone (hits, misses, evictions, bytes_read, read_seconds, reads)."""
        return dict(self._stats)

    def stats(self) -> dict:
        pool_bytes = sum(a.nbytes for p in self.pools.values() for a in p.tensors.values())
        lookups = self._stats["hits"] + self._stats["misses"]
        return {
            **self._stats,
            "hit_rate": self._stats["hits"] / lookups if lookups else 0.0,
            "pool_bytes": pool_bytes,
            "slots_per_layer": self.slots_per_layer,
            "layers": len(self.pools),
        }

    # ---------------------------------------------------------------- lookups

    def capacity(self, layer: int) -> int:
        return len(self.pools[layer].expert_of)

    def fetch(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """Make the given distinct experts resident (at most `capacity(layer)`); return their slots."""
        pool = self.pools[layer]
        slots = pool.slot_of[experts]
        missing = slots < 0
        n_miss = int(missing.sum())
        self._stats["hits"] += len(experts) - n_miss
        self._stats["misses"] += n_miss
        if n_miss:
            victims = pool.policy.victims(n_miss, slots[~missing])
            evicted = pool.expert_of[victims]
            evicted = evicted[evicted >= 0]
            self._stats["evictions"] += len(evicted)
            pool.slot_of[evicted] = -1
            pool.expert_of[victims] = experts[missing]
            pool.slot_of[experts[missing]] = victims
            self._load(pool, experts[missing], victims)
            slots = pool.slot_of[experts]
        pool.policy.touch(slots)
        return slots

    # ---------------------------------------------------------------- reads

    def _buffers(self, layout: LayerLayout, rows: int) -> list[np.ndarray]:
        """Page-aligned reusable staging, one [rows, segment length] array per segment."""
        key = tuple(s.length for s in layout.segments)
        have = self._staging.get(key)
        if have is None or have[0].shape[0] < rows:
            have = []
            for seg in layout.segments:
                raw = mmap.mmap(-1, max(rows * seg.length, 1))
                have.append(np.frombuffer(raw, np.uint8)[: rows * seg.length].reshape(rows, seg.length))
            self._staging[key] = have
        return have

    def _load(self, pool: LayerPool, experts: np.ndarray, slots: np.ndarray):
        """Read the given experts into the given slots. Each expert is installed into the pool as soon as
        its bytes are in, so the copies overlap the reads still in flight."""
        layout = pool.layout
        order = np.argsort(experts)  # sorted ids make adjacent spans adjacent rows
        experts, slots = experts[order], slots[order]
        batch = max(1, STAGING_BYTES // sum(s.length for s in layout.segments))
        for start in range(0, len(experts), batch):
            ids, dst = experts[start : start + batch], slots[start : start + batch]
            buffers = self._buffers(layout, len(ids))
            jobs = self._read_jobs(pool, ids, buffers)
            waiting = np.full(len(ids), len(layout.segments))  # segments still to arrive, per row
            t0 = time.perf_counter()
            futures = {self._threads.submit(_pread, job[:3]): job for job in jobs}
            for future in as_completed(futures):
                fd, view, offset, rows, file = futures[future]
                if future.result() != view.nbytes:
                    raise FormatError(f"{file}: layer {layout.layer} expert {ids[rows.start]}: short read of "
                                      f"{view.nbytes} bytes at offset {offset}; is the file truncated?")
                waiting[rows] -= 1
                for row in np.nonzero(waiting[rows] == 0)[0] + rows.start:
                    self._install(pool, buffers, row, int(ids[row]), int(dst[row]))
            self._stats["read_seconds"] += time.perf_counter() - t0
            self._stats["bytes_read"] += sum(j[1].nbytes for j in jobs)
            self._stats["reads"] += len(jobs)

    def _install(self, pool: LayerPool, buffers: list[np.ndarray], row: int, expert: int, slot: int):
        layout = pool.layout
        if self.verify_reads and layout.checksums is not None and checksum(buffers[0][row]) != layout.checksums[expert]:
            raise FormatError(f"{layout.segments[0].file}: layer {layout.layer} expert {expert}: checksum mismatch")
        for t in layout.tensors:
            raw = buffers[t.segment][row, t.offset : t.offset + t.nbytes]
            value = mx.array(raw.view(DTYPES[t.dtype]).reshape(t.shape))
            if t.dtype == "bfloat16":
                value = value.view(mx.bfloat16)
            target = pool.tensors[t.name]
            # A slot is a contiguous slice: the update is a memcpy, and in place because the pool array is
            # held once (by its module), so MLX donates its buffer.
            target[slot] = value if value.dtype == target.dtype else value.astype(target.dtype)

    @staticmethod
    def _read_jobs(pool: LayerPool, experts: np.ndarray, buffers: list[np.ndarray]) -> list[tuple]:
        """(fd, destination view, file offset, rows, file) per read; runs of adjacent spans merged up to MAX_READ."""
        jobs = []
        for seg, fd, buf in zip(pool.layout.segments, pool.fds, buffers):
            offsets = seg.offsets[experts]
            limit = max(1, MAX_READ // seg.length)
            row = 0
            while row < len(experts):
                end = row + 1
                while end < len(experts) and end - row < limit and offsets[end] == offsets[end - 1] + seg.length:
                    end += 1
                jobs.append((fd, buf[row:end].reshape(-1), int(offsets[row]), slice(row, end), seg.file))
                row = end
        return jobs

    def close(self):
        self._threads.shutdown()
        for pool in self.pools.values():
            for fd in pool.fds:
                os.close(fd)
            pool.fds.clear()


def _pread(job) -> int:
    fd, view, offset = job
    return os.preadv(fd, [view], offset)  # releases the GIL while the kernel copies
