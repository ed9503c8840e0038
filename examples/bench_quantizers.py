"""Converter cost per expert at Qwen3.5-397B's expert shapes (hidden 4096, intermediate 1024), 4-bit group 64:
round-to-nearest (`mx.quantize`), `--search` (quantize_searched) and `--calibrate` (quantize_gptq, with gate and
up as one stack of rows sharing H, as the converter does), on random weights and a random H.

    python examples/bench_quantizers.py [--experts 2] [--json out.json]

Seconds per expert are the mean over `--experts` experts quantized in one call; the H build (from calibration
inputs) and the calibration forward are not included.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import mlx.core as mx

from flashmoe_mlx.convert.affine_search import quantize_searched
from flashmoe_mlx.convert.gptq import quantize_gptq

HIDDEN, INTER, GROUP, BITS = 4096, 1024, 64, 4


def seconds_per_expert(fn, experts: int) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return (time.perf_counter() - start) / experts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    e = args.experts
    up = mx.random.normal((e, 2 * INTER, HIDDEN)).astype(mx.bfloat16)  # gate and up, one stack of rows
    down = mx.random.normal((e, HIDDEN, INTER)).astype(mx.bfloat16)
    x, h = mx.random.normal((e, 2048, HIDDEN)), mx.random.normal((e, 2048, INTER))
    h_up, h_down = x.swapaxes(-1, -2) @ x / 2048, h.swapaxes(-1, -2) @ h / 2048
    mx.eval(up, down, h_up, h_down)
    rows = {
        "round-to-nearest": (lambda: mx.quantize(up, GROUP, BITS), lambda: mx.quantize(down, GROUP, BITS)),
        "--search": (lambda: quantize_searched(up, GROUP, BITS), lambda: quantize_searched(down, GROUP, BITS)),
        "--calibrate": (lambda: quantize_gptq(up, h_up, GROUP, BITS), lambda: quantize_gptq(down, h_down, GROUP, BITS)),
    }
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "device": str(mx.default_device()),
              "experts": e, "seconds_per_expert": {}}
    for name, (gate_up, down_proj) in rows.items():
        result["seconds_per_expert"][name] = {"gate+up": seconds_per_expert(gate_up, e),
                                              "down": seconds_per_expert(down_proj, e)}
    print(json.dumps(result, indent=1))
    print("\n| method | gate+up s/expert | down s/expert | total |\n|---|---|---|---|")
    for name, t in result["seconds_per_expert"].items():
        print(f"| {name} | {t['gate+up']:.2f} | {t['down']:.2f} | {t['gate+up'] + t['down']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
