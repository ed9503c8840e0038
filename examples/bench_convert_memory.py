"""Peak memory of the converter on a multi-GB synthetic checkpoint: is it bounded by a layer, not the model?

    python examples/bench_convert_memory.py --workdir /tmp/fm-bench [--layers 10] [--json out.json]

Writes a bf16 HF-layout qwen3_moe checkpoint (real-ish expert shapes), converts it with the default 4-bit
recipe in a child process, and reports the child's peak RSS next to the model size and the largest layer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from flashmoe_mlx.synthetic import MoEShape, write_hf_checkpoint


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    shape = MoEShape(hidden_size=2048, moe_intermediate_size=768, num_experts=64, num_experts_per_tok=8,
                     num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                     vocab_size=32000)
    src, out = args.workdir / "src", args.workdir / "out"
    shutil.rmtree(args.workdir, ignore_errors=True)
    with tqdm(total=args.layers + 1, desc="writing synthetic checkpoint", unit="shard") as bar:
        write_hf_checkpoint(src, shape, dtype="bfloat16", progress=bar.update)
    shards = sorted(src.glob("model-*.safetensors"))
    subprocess.run(["sync"])
    if os.geteuid() == 0:  # cold page cache, so the conversion really reads the source from disk
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flashmoe_mlx.convert", "--hf-path", str(src), "--out", str(out)], check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB",
        "shape": shape.__dict__,
        "source_bytes": dir_bytes(src),
        "largest_source_layer_bytes": max(p.stat().st_size for p in shards),
        "output_bytes": dir_bytes(out),
        "peak_rss_bytes": peak,
        "seconds": seconds,
    }
    gb = 1e9
    print(json.dumps(result, indent=1))
    print(f"\n| source | largest layer | output | peak RSS | peak / source | time |\n|---|---|---|---|---|---|\n"
          f"| {result['source_bytes'] / gb:.2f} GB | {result['largest_source_layer_bytes'] / gb:.2f} GB "
          f"| {result['output_bytes'] / gb:.2f} GB | {peak / gb:.2f} GB | {peak / result['source_bytes']:.2f} "
          f"| {seconds:.0f} s |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
