"""Cold-cache read throughput of the expert store against the I/O bound: raw parallel preads of the same records.

    python examples/bench_store.py --workdir /tmp/fm-store [--layers 20] [--threads 4] [--json out.json]

Makes a multi-GB flashmoe checkpoint (random bf16 qwen3_moe in HF layout, converted to 4-bit) unless one is
already in WORKDIR/out, then, with the page cache dropped before each run, reads every expert record once in
top-k-sized batches per layer, the way decode misses arrive, alternating batch by batch between (a)
`ExpertStore.fetch` into MLX slot pools, pool update evaluated, and (b) raw `os.preadv` of the records into
page-aligned buffers on a thread pool of the same size. Repeats swap which reader takes which batches;
ratio = median over repeats of (a) GB/s / (b) GB/s.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

from flashmoe_mlx.layout import flashmoe_layouts
from flashmoe_mlx.store import ExpertStore
from flashmoe_mlx.synthetic import MoEShape, write_hf_checkpoint


def drop_caches():
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def workload(layouts, batch: int, seed: int = 0):
    """[(layer, expert ids)]: every record once, in random batches of `batch` per layer, layers interleaved."""
    rng = np.random.default_rng(seed)
    per_layer = {l.layer: rng.permutation(l.num_experts).reshape(-1, batch) for l in layouts}
    rounds = max(len(v) for v in per_layer.values())
    return [(layer, ids[r]) for r in range(rounds) for layer, ids in per_layer.items() if r < len(ids)]


class Store:
    """(a): `ExpertStore.fetch`, with the slot-pool update evaluated."""

    def __init__(self, layouts, threads, batch):
        self.store = ExpertStore(layouts, batch, threads=threads, float_dtype=None)

    def __call__(self, layer, ids) -> int:
        before = self.store.counters()["bytes_read"]
        self.store.fetch(layer, ids)
        mx.eval(list(self.store.pools[layer].tensors.values()))
        return self.store.counters()["bytes_read"] - before

    def close(self):
        self.store.close()


class RawPread:
    """(b): the I/O bound: the same records, `os.preadv` into page-aligned buffers, same thread count."""

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


def interleaved_pass(layouts, work, threads, batch, store_first: bool) -> dict:
    """One cold pass over every record; batches alternate between the two readers, so both see the same
    disk at the same moments (the disk here is shared and its speed drifts by 2x within minutes)."""
    readers = {"store": Store(layouts, threads, batch), "raw": RawPread(layouts, threads, batch)}
    names = ["store", "raw"] if store_first else ["raw", "store"]
    seconds, nbytes = {n: 0.0 for n in names}, {n: 0 for n in names}
    drop_caches()
    for i, (layer, ids) in enumerate(work):
        name = names[i % 2]
        t0 = time.perf_counter()
        nbytes[name] += readers[name](layer, ids)
        seconds[name] += time.perf_counter() - t0
    for r in readers.values():
        r.close()
    return {n: nbytes[n] / seconds[n] / 1e9 for n in names}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="experts per fetch (top-k)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = args.workdir / "out"
    if not (out / "config.json").exists():
        shape = MoEShape(hidden_size=2048, moe_intermediate_size=768, num_experts=64, num_experts_per_tok=8,
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                         vocab_size=32000)
        write_hf_checkpoint(args.workdir / "src", shape, dtype="bfloat16")
        subprocess.run([sys.executable, "-m", "flashmoe_mlx.convert", "--hf-path", str(args.workdir / "src"),
                        "--out", str(out), "--quiet"], check=True)
    layouts = flashmoe_layouts(out)
    work = workload(layouts, args.batch)
    runs = {"store": [], "raw": []}
    for r in range(args.repeats):  # alternate which reader takes the even batches
        result = interleaved_pass(layouts, work, args.threads, args.batch, store_first=r % 2 == 0)
        for name, gbps in result.items():
            runs[name].append(gbps)
    record = layouts[0].segments[0].length
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "checkpoint_bytes": sum(l.num_experts * l.segments[0].length for l in layouts),
        "record_bytes": record,
        "threads": args.threads,
        "batch": args.batch,
        "store_gbps": runs["store"],
        "raw_pread_gbps": runs["raw"],
        "pair_ratios": [a / b for a, b in zip(runs["store"], runs["raw"])],
        "ratio": float(np.median([a / b for a, b in zip(runs["store"], runs["raw"])])),
    }
    print(json.dumps(result, indent=1))
    print(f"\n| checkpoint | record | threads | raw pread (I/O bound), median | store, median | store / raw, median pair |"
          f"\n|---|---|---|---|---|---|\n"
          f"| {result['checkpoint_bytes'] / 1e9:.2f} GB | {record / 2**20:.2f} MiB | {args.threads} "
          f"| {np.median(runs['raw']):.2f} GB/s | {np.median(runs['store']):.2f} GB/s | {result['ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
