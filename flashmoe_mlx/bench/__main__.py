"""`python -m flashmoe_mlx.bench`: `trace` records a model's routing over a text, `policy-sim` replays
routing traces through the eviction policies and prints miss rates."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def trace(args) -> int:
    from ..eval import default_text, record_routing, token_windows
    from ..loader import load

    model, tokenizer = load(args.model, memory_budget=args.memory_budget)
    routes = record_routing(model)
    import mlx.core as mx

    text = (args.text or default_text()).read_text()
    for window in token_windows(tokenizer, text, 512, args.max_tokens):
        mx.eval(model(mx.array(window[None, :-1])))
    layers = {str(layer): np.concatenate(ids) for layer, ids in routes.items()}
    num_experts = max(p.layout.num_experts for p in model.expert_store.pools.values())
    np.savez_compressed(args.out, num_experts=num_experts, **layers)
    print(f"{args.out}: {len(layers)} layers x {next(iter(layers.values())).shape[0]} tokens")
    return 0


def policy_sim(args) -> int:
    from .policy_sim import simulate

    data = np.load(args.trace)
    traces = {int(k): data[k] for k in data.files if k != "num_experts"}
    num_experts = int(data["num_experts"])
    k = next(iter(traces.values())).shape[1]
    slots = [int(s) for s in args.slots.split(",")] if args.slots else sorted(
        {max(k, int(num_experts * f)) for f in (0.125, 0.25, 0.5, 0.75)})
    rows = simulate(traces, num_experts, slots)
    print("| slots per layer | " + " | ".join(f"{p} miss rate" for p in rows[0] if p != "slots") + " |")
    print("|---" * len(rows[0]) + "|")
    for r in rows:
        print(f"| {r['slots']} of {num_experts} | " + " | ".join(f"{100 * v:.1f}%" for p, v in r.items() if p != "slots") + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashmoe_mlx.bench")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trace", help="record a model's routing (layer, token, expert ids) over a text")
    t.add_argument("--model", required=True)
    t.add_argument("--text", type=Path, default=None, help="default: the bundled held-out text")
    t.add_argument("--max-tokens", type=int, default=4096)
    t.add_argument("--memory-budget", default=None)
    t.add_argument("--out", type=Path, required=True, help="trace file (.npz)")
    p = sub.add_parser("policy-sim", help="miss rates of LRU, LFU with decay and Belady's optimum on a trace")
    p.add_argument("--trace", type=Path, required=True)
    p.add_argument("--slots", default=None, help="comma-separated pool sizes (default: 1/8 .. 3/4 of the experts)")
    p.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        return trace(args) if args.command == "trace" else policy_sim(args)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
