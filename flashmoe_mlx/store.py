"""The expert store: a fixed pool of slots per MoE layer, filled from disk on demand.

Owns the pools (MLX arrays shaped like mlx-lm's stacked experts, `[slots, ...]`, held by the layer's
projection modules so mlx-lm's own SwitchGLU math runs on them), the reads, and the stats. Which expert sits
in which slot, and whom to evict, is residency.py's SlotMap (numpy arrays: no per-expert Python objects).

Reads are positional (`preadv`) on a small thread pool, one per packed record (its iovecs scatter the
record's tensors), adjacent spans of stock checkpoints merged. Where the backend's arrays live in host
memory that numpy can address (checked by a probe at start: the CPU backend; unified memory), a read lands
directly in the slot: no copy at all. Otherwise (another dtype on the pool, a discrete GPU, or
`verify_reads`) it lands in page-aligned reusable staging and is copied into the slot. Callers must not
fetch into a layer while an unevaluated graph still reads its pool (StreamedSwitchGLU guarantees it).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .format import DTYPES, FormatError, checksum
from .layout import LayerLayout
from .residency import POLICIES, SlotMap

STAGING_BYTES = 64 << 20  # misses are read in batches of at most this many bytes
MAX_READ = 8 << 20  # merged reads are split so the thread pool keeps several in flight


@dataclass
class LayerPool:
    layout: LayerLayout
    tensors: dict[str, mx.array]  # name -> [slots, ...]; the same objects the projection modules hold
    slots: SlotMap
    fds: list[int] = field(default_factory=list)
    host: dict[str, np.ndarray | None] = field(default_factory=dict)  # direct-read views of `tensors`


class ExpertStore:
    def __init__(self, layouts: list[LayerLayout], slots_per_layer: int, *, threads: int = 4, policy: str = "lru",
                 verify_reads: bool = False, float_dtype=None):
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; known: {', '.join(POLICIES)}")
        self.slots_per_layer = slots_per_layer
        self.verify_reads = verify_reads
        self.float_dtype = float_dtype  # None keeps the stored dtype of scales/biases
        self.pools: dict[int, LayerPool] = {}
        self._files: dict = {}  # one descriptor per file: a stock checkpoint's shards serve many segments
        for layout in layouts:
            slots = min(slots_per_layer, layout.num_experts)
            tensors = {t.name: mx.zeros((slots, *t.shape), self.pool_dtype(t.dtype, float_dtype))
                       for t in layout.tensors}
            fds = [self._open(s.file) for s in layout.segments]
            self.pools[layout.layer] = LayerPool(layout, tensors, SlotMap(layout.num_experts, slots, policy), fds)
        mx.eval([p.tensors for p in self.pools.values()])
        for pool in self.pools.values():
            pool.host = {t.name: self._host_view(pool.tensors[t.name], t.dtype) for t in pool.layout.tensors}
        self.direct = all(v is not None for p in self.pools.values() for v in p.host.values())
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="flashmoe-read")
        self._staging = {}
        gaps = [t.offset - end for l in layouts if l.packed for t, end in _gaps(l)]
        self._gap = np.empty(max(gaps, default=0), np.uint8)  # sink for the padding between a record's tensors
        self.reset_stats()

    def _open(self, path) -> int:
        if path not in self._files:
            fd = os.open(path, os.O_RDONLY)
            # Reads are random and exact: kernel read-ahead would only pull in bytes nobody asked for.
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            elif sys.platform == "darwin":
                fcntl.fcntl(fd, getattr(fcntl, "F_RDAHEAD", 45), 0)
            self._files[path] = fd
        return self._files[path]

    @staticmethod
    def pool_dtype(dtype: str, float_dtype=None):
        """A pool tensor's dtype: packed integers as stored; floats as stored or as `float_dtype`."""
        if dtype in ("uint32", "uint8"):
            return getattr(mx, dtype)
        return float_dtype or getattr(mx, dtype)

    @classmethod
    def slot_bytes(cls, layout: LayerLayout, float_dtype=None) -> int:
        """Bytes one slot of a layer's pool holds (its tensors, without record padding)."""
        return sum(int(np.prod(t.shape)) * cls.pool_dtype(t.dtype, float_dtype).size for t in layout.tensors)

    @staticmethod
    def _host_view(array: mx.array, stored: str) -> np.ndarray | None:
        """[slots, nbytes] uint8 numpy view of a pool array's own memory, or None where reads cannot land there
        (the pool holds another dtype than the record, or the backend's memory is not host memory)."""
        if array.dtype != (mx.bfloat16 if stored == "bfloat16" else getattr(mx, stored)):
            return None
        bits = array.view(mx.uint16) if stored == "bfloat16" else array
        try:
            host = np.asarray(memoryview(bits)).reshape(array.shape[0], -1).view(np.uint8)
        except (TypeError, ValueError, BufferError):
            return None
        # Probe: a byte written through the view must be what MLX then computes with.
        before = int(host[0, 0])
        host[0, 0] = before ^ 0x5A
        seen = int(np.array(array.reshape(-1).view(mx.uint8)[:1])[0])
        host[0, 0] = before
        return host if seen == before ^ 0x5A else None

    # ---------------------------------------------------------------- stats

    def reset_stats(self):
        # Seconds: `sync` waiting for router ids (the graph up to each router), `fetch` in fetch() (slot
        # bookkeeping and reads), `read` of those in the reads themselves.
        self._stats = {"hits": 0, "misses": 0, "evictions": 0, "bytes_read": 0, "read_seconds": 0.0, "reads": 0,
                       "sync_seconds": 0.0, "fetch_seconds": 0.0}

    def counters(self) -> dict:
        """The running counters alone (hits, misses, evictions, bytes_read, reads and the seconds)."""
        return dict(self._stats)

    def note_sync(self, seconds: float):
        self._stats["sync_seconds"] += seconds

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
        return self.pools[layer].slots.num_slots

    def fetch(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """Make the given distinct experts resident (at most `capacity(layer)`); return their slots."""
        t0 = time.perf_counter()
        pool = self.pools[layer]
        slots, missing, victims, evicted = pool.slots.assign(experts)
        self._stats["hits"] += len(experts) - len(missing)
        self._stats["misses"] += len(missing)
        self._stats["evictions"] += evicted
        if len(missing):
            try:
                self._load(pool, missing, victims)
            except BaseException:
                pool.slots.forget(missing, victims)  # a failed checksum, Ctrl-C mid-read
                raise
        self._stats["fetch_seconds"] += time.perf_counter() - t0
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
        """Read the given experts into the given slots, in batches that fit the staging buffers."""
        layout = pool.layout
        order = np.argsort(experts)  # sorted ids make adjacent spans adjacent rows
        experts, slots = experts[order], slots[order]
        batch = max(1, STAGING_BYTES // sum(s.length for s in layout.segments))
        for start in range(0, len(experts), batch):
            ids, dst = experts[start : start + batch], slots[start : start + batch]
            staged = self.verify_reads or any(pool.host[t.name] is None for t in layout.tensors)
            staging = self._buffers(layout, len(ids)) if staged else None
            jobs = self._read_jobs(pool, ids, dst, staging)
            waiting = np.full(len(ids), len(layout.segments))  # segments still to arrive, per row
            t0 = time.perf_counter()
            futures = {self._threads.submit(_preadv, job[:3]): job for job in jobs}
            try:
                for future in as_completed(futures):
                    fd, offset, views, rows, file = futures[future]
                    expected = sum(v.nbytes for v in views)
                    if future.result() != expected:
                        raise FormatError(f"{file}: layer {layout.layer} expert {ids[rows.start]}: short read of "
                                          f"{expected} bytes at offset {offset}; is the file truncated?")
                    waiting[rows] -= 1
                    for row in np.nonzero(waiting[rows] == 0)[0] + rows.start:
                        self._install(pool, staging, row, int(ids[row]), int(dst[row]))
            finally:
                for future in futures:  # no read may still be writing into slots after we return
                    future.cancel()
                wait(futures)
            self._stats["read_seconds"] += time.perf_counter() - t0
            self._stats["bytes_read"] += sum(v.nbytes for j in jobs for v in j[2])
            self._stats["reads"] += len(jobs)

    def _direct(self, pool: LayerPool, name: str) -> np.ndarray | None:
        """The slot view a read lands in directly, or None when it goes through staging."""
        return None if self.verify_reads else pool.host[name]

    def _read_jobs(self, pool: LayerPool, experts: np.ndarray, slots: np.ndarray, staging: list[np.ndarray]):
        """(fd, file offset, destination views, staging rows, file) per read.

        A packed record is one read whose iovecs put each tensor straight into its slot (or staging); a stock
        tensor span is one read, merged with the next expert's when both file and slot are adjacent."""
        layout = pool.layout
        jobs = []
        if layout.packed:  # one segment, one read per expert
            seg, fd = layout.segments[0], pool.fds[0]
            for row, (expert, slot) in enumerate(zip(experts, slots)):
                if self.verify_reads:  # the checksum covers the whole record: read it whole into staging
                    views = [staging[0][row]]
                else:
                    views = []
                    for t, end in _gaps(layout):
                        if t.offset > end:
                            views.append(self._gap[: t.offset - end])
                        host = self._direct(pool, t.name)
                        views.append(host[slot] if host is not None else staging[0][row, t.offset : t.offset + t.nbytes])
                jobs.append((fd, int(seg.offsets[expert]), views, slice(row, row + 1), seg.file))
            return jobs
        for t in layout.tensors:  # stock checkpoints: one segment per tensor
            seg, fd, host = layout.segments[t.segment], pool.fds[t.segment], self._direct(pool, t.name)
            offsets = seg.offsets[experts]
            limit = max(1, MAX_READ // seg.length)
            row = 0
            while row < len(experts):
                end = row + 1
                while (end < len(experts) and end - row < limit and offsets[end] == offsets[end - 1] + seg.length
                       and (host is None or slots[end] == slots[end - 1] + 1)):
                    end += 1
                dest = host[slots[row] : slots[row] + end - row] if host is not None else staging[t.segment][row:end]
                jobs.append((fd, int(offsets[row]), [dest.reshape(-1)], slice(row, end), seg.file))
                row = end
        return jobs

    def _install(self, pool: LayerPool, staging: list[np.ndarray], row: int, expert: int, slot: int):
        """Finish one expert whose bytes are in: check its checksum, copy what was staged into its slot."""
        layout = pool.layout
        if self.verify_reads and layout.checksums is not None and checksum(staging[0][row]) != layout.checksums[expert]:
            raise FormatError(f"{layout.segments[0].file}: layer {layout.layer} expert {expert}: checksum mismatch")
        for t in layout.tensors:
            if self._direct(pool, t.name) is not None:
                continue  # already in its slot
            raw = staging[t.segment][row, t.offset : t.offset + t.nbytes]
            if pool.host[t.name] is not None:
                pool.host[t.name][slot] = raw
                continue
            value = mx.array(raw.view(DTYPES[t.dtype]).reshape(t.shape))
            if t.dtype == "bfloat16":
                value = value.view(mx.bfloat16)
            target = pool.tensors[t.name]
            # A slot is a contiguous slice: the update is a memcpy, and in place because the pool array is
            # held once (by its module), so MLX donates its buffer.
            target[slot] = value if value.dtype == target.dtype else value.astype(target.dtype)

    def close(self):
        self._threads.shutdown()
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


def _gaps(layout: LayerLayout):
    """(tensor, end of what precedes it) for a packed record's tensors in offset order."""
    end = 0
    for t in sorted(layout.tensors, key=lambda t: t.offset):
        yield t, end
        end = t.offset + t.nbytes


def _preadv(job) -> int:
    fd, offset, views = job
    return os.preadv(fd, views, offset)  # releases the GIL while the kernel copies
