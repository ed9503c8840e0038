"""Offline end-to-end demo of the converter: make a small random MoE checkpoint, convert, verify, inspect.

    python examples/convert_demo.py [--workdir ~/.cache/flashmoe-mlx/demo]

Generates a Hugging Face-layout qwen3_moe checkpoint (random weights, nothing downloaded), converts it to a
4-bit flashmoe checkpoint with `python -m flashmoe_mlx.convert`, checks every record with `--verify`, and
prints what landed on disk: dense bytes that stay resident versus expert bytes that will stream.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from flashmoe_mlx.format import read_manifest
from flashmoe_mlx.synthetic import MoEShape, write_hf_checkpoint

DEMO_SHAPE = MoEShape(hidden_size=256, moe_intermediate_size=256, num_experts=32, num_experts_per_tok=4,
                      num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=4096)


def run(*args):
    print("$", " ".join(map(str, args)), flush=True)
    subprocess.run(list(map(str, args)), check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "flashmoe-mlx" / "demo")
    args = ap.parse_args()
    src, out = args.workdir / "hf", args.workdir / "flashmoe-4bit"
    shutil.rmtree(args.workdir, ignore_errors=True)
    with tqdm(total=DEMO_SHAPE.num_hidden_layers + 1, desc="writing a random HF checkpoint", unit="shard") as bar:
        write_hf_checkpoint(src, DEMO_SHAPE, dtype="float32", progress=bar.update)
    run(sys.executable, "-m", "flashmoe_mlx.convert", "--hf-path", src, "--out", out)
    run(sys.executable, "-m", "flashmoe_mlx.convert", "--verify", out)
    hints = json.loads((out / "config.json").read_text())["flashmoe"]["memory_hints"]
    layers = read_manifest(out).layers
    print(f"\n{out}")
    print(f"  resident (dense) : {hints['dense_bytes'] / 2**20:8.2f} MiB in {len(list(out.glob('model-*.safetensors')))} shards")
    print(f"  streamed experts : {hints['expert_bytes'] / 2**20:8.2f} MiB in {len(layers)} layer files, "
          f"{layers[0].num_experts} records of {layers[0].record_size // 1024} KiB each per layer")
    bits = {t.name.split('.')[0]: t.bits for t in layers[0].tensors}
    print(f"  expert bits      : {bits}")


if __name__ == "__main__":
    main()
