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
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from flashmoe_mlx.bench.disk import RawPread, drop_caches, workload
from flashmoe_mlx.layout import flashmoe_layouts
from flashmoe_mlx.store import ExpertStore
from flashmoe_mlx.synthetic import MoEShape, write_hf_checkpoint


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
