"""`python -m flashmoe_mlx.bench`: `trace` records a model's routing over a text (and how skewed it is),
`policy-sim` replays routing traces through the eviction policies, `make-synthetic` writes a random model
with a real model's shapes for every engine, `run` measures the engines on it beside the bounds."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from ..loader import parse_size
from ..synthetic import PRESETS
from .popularity import popularity


def trace(args) -> int:
    from ..eval import default_text, record_routing, save_routing, token_windows
    from ..loader import load

    model, tokenizer = load(args.model, memory_budget=args.memory_budget)
    routes = record_routing(model)
    import mlx.core as mx

    text = (args.text or default_text()).read_text()
    for window in token_windows(tokenizer, text, 512, args.max_tokens):
        mx.eval(model(mx.array(window[None, :-1])))
    num_experts = max(p.layout.num_experts for p in model.expert_store.pools.values())
    layers = save_routing(args.out, routes, num_experts)
    pop = popularity(layers, num_experts)
    print(f"{args.out}: {len(layers)} layers x {next(iter(layers.values())).shape[0]} tokens; the top "
          f"{100 * pop['top_fraction']:.0f}% of experts take {100 * pop['top_share']:.1f}% of routings, "
          f"effective experts {100 * pop['effective_experts']:.0f}% (uniform: {100 * pop['top_fraction']:.0f}%, 100%)")
    return 0


def make_synthetic_cmd(args) -> int:
    from .make_synthetic import make_synthetic

    make_synthetic(args.out, args.shape, layers=args.layers, bits=args.bits, router_skew=args.router_skew,
                   seed=args.seed, mlx_lm=args.mlx_lm, gguf=tuple(args.gguf.split(",")) if args.gguf else (),
                   llama_python=args.llama_python, convert_script=args.convert_script, overwrite=args.overwrite,
                   progress=not args.quiet)
    print(f"{args.out}: hf/, flashmoe/" + (", mlx-lm/" if args.mlx_lm else "") + (", gguf/" if args.gguf else ""))
    return 0


def run_cmd(args) -> int:
    from .run import run

    return run(args)


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
    if args.plot:
        plot_miss_rates(rows, num_experts, args.plot, title=args.trace.name)
    return 0


def plot_miss_rates(rows: list[dict], num_experts: int, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for policy in (p for p in rows[0] if p != "slots"):
        ax.plot([r["slots"] for r in rows], [100 * r[policy] for r in rows], marker="o", label=policy)
    ax.set_xlabel(f"slots per layer (of {num_experts} experts)")
    ax.set_ylabel("miss rate (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    p.add_argument("--plot", type=Path, default=None, help="PNG of miss rate vs slots per policy")
    m = sub.add_parser("make-synthetic", help="write a random-weight model with a real model's shapes for every engine",
                       description="Random weights with the expert, router and attention shapes of a real model, "
                       "fewer layers, all in qwen3_moe layout (GQA attention with q/k norms, no shared experts) "
                       "and the bundled tokenizer's vocabulary. Writes OUT/hf (bf16), OUT/flashmoe and, with "
                       "--mlx-lm, OUT/mlx-lm.")
    m.add_argument("--shape", required=True, choices=list(PRESETS))
    m.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's own count)")
    m.add_argument("--bits", type=int, default=4, help="expert bits (attention too where 6 or 8; default 4)")
    m.add_argument("--router-skew", type=float, default=0.0,
                   help="Zipf skew of expert popularity, in units of the token-dependent router logit spread "
                   "(0: balanced routers; with 128 experts, 0.5 gives the top 10%% of experts ~45%% of routings)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--mlx-lm", action="store_true", help="also write OUT/mlx-lm with mlx_lm.convert (resident baseline)")
    m.add_argument("--gguf", default=None, help="also write OUT/gguf/model-TYPE.gguf, e.g. Q4_0,Q8_0 (llama.cpp engines)")
    m.add_argument("--llama-python", default=None, help="python of the venv that has llama-cpp-python (for --gguf)")
    m.add_argument("--convert-script", type=Path, default=None,
                   help="llama.cpp's convert_hf_to_gguf.py, e.g. from the llama-cpp-python sdist (for --gguf)")
    m.add_argument("--overwrite", action="store_true", help="replace OUT")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="prefill/decode tok/s per engine, residency, cache state and memory limit vs the bounds")
    r.add_argument("--model", type=Path, required=True, help="a directory written by make-synthetic")
    r.add_argument("--engines", default="flashmoe",
                   help="comma-separated: flashmoe, mlx-lm, llama.cpp (its defaults), llama.cpp-mapped (no repacking)")
    r.add_argument("--residency", default="1,0.5,0.25,0.125", help="shares of the expert bytes the pool holds")
    r.add_argument("--cache", default="cold,warm", help="cold: page cache dropped, empty pool; warm: after one pass")
    r.add_argument("--memory-limit", default="none",
                   help="comma-separated cgroup v1 limits (page cache included) or none, e.g. none,4GB (needs root)")
    r.add_argument("--prompt-tokens", type=int, default=64)
    r.add_argument("--decode-tokens", type=int, default=16)
    r.add_argument("--threads", type=int, default=4, help="flashmoe read threads")
    r.add_argument("--disk-sample", type=parse_size, default="2GB", help="bytes of records read to measure disk GB/s")
    r.add_argument("--llama-python", default=None, help="python of the venv that has llama_cpp (llama.cpp engines)")
    r.add_argument("--gguf-type", default="Q4_0", help="which OUT/gguf/model-TYPE.gguf the llama.cpp engines run")
    r.add_argument("--llama-threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
    r.add_argument("--timeout", type=float, default=1800, help="seconds per measured row")
    r.add_argument("--json", type=Path, default=None)
    r.add_argument("--plot", type=Path, default=None, help="PNG of decode tok/s vs residency")
    args = ap.parse_args(argv)
    args.command_line = "python -m flashmoe_mlx.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    commands = {"trace": trace, "policy-sim": policy_sim, "make-synthetic": make_synthetic_cmd, "run": run_cmd}
    try:
        return commands[args.command](args)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
