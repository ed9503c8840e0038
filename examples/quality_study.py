"""The fidelity study behind docs/QUALITY.md: expert bits x router bits on the project's trained MoE.

    python examples/quality_study.py --out docs/quality [--max-tokens 16384]      # needs matplotlib for the plot

Converts the bundled model (flashmoe_mlx/default_model, bf16) at each expert precision (8, 4, the 3bit recipe
= 3 with 4-bit down_proj, 3, the 2bit recipe = 2 with 4-bit down_proj, 2) with attention and dense layers at
8 bits so that experts and routers are what varies; then holds routers unquantized (16), or quantizes them
in memory to 8 or 4 bits (mlx's affine quantization, group 64 -- what the converter would write, minus the
model's own 8-bit floor, which the 4-bit row deliberately bypasses). Each variant is compared with the bf16
model on the bundled held-out text by `flashmoe_mlx.eval.compare`. Two rows use the shipped defaults instead
(attention 4-bit, router 8-bit): the 4bit and 3bit recipes as a user gets them. Writes results.json,
results.md and quality.png to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import mlx.nn as nn

from flashmoe_mlx import load
from flashmoe_mlx.architecture import expert_blocks, router_paths
from flashmoe_mlx.convert import Precision, convert
from flashmoe_mlx.default import BUNDLED
from flashmoe_mlx.eval import compare_outputs, default_text, load_reference, run, token_windows

EXPERTS = {"8": {"expert_bits": 8}, "4": {"recipe": "4bit"}, "3bit recipe": {"recipe": "3bit"},
           "3": {"expert_bits": 3}, "2bit recipe": {"recipe": "2bit"}, "2": {"expert_bits": 2}}
ROUTERS = (16, 8, 4)


def quantize_routers(model, bits: int):
    if bits == 16:
        return
    routers = router_paths(model, expert_blocks(model))
    nn.quantize(model, class_predicate=lambda p, m: p in routers and {"group_size": 64, "bits": bits})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=16384)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    reference, tokenizer = load_reference(str(BUNDLED))
    windows = token_windows(tokenizer, default_text().read_text(), 512, args.max_tokens)
    ref_outputs = run(reference, windows, desc="bf16 reference")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [(name, flags, 8, router, False) for name, flags in EXPERTS.items() for router in ROUTERS]
        variants += [("4bit recipe, shipped defaults", {"recipe": "4bit"}, 4, 8, True),
                     ("3bit recipe, shipped defaults", {"recipe": "3bit"}, 4, 8, True)]
        for name, flags, dense_bits, router, shipped in variants:
            precision = Precision.from_flags(bits=dense_bits, router_bits=router if shipped else 16, **flags)
            path = Path(tmp) / f"{name}-{dense_bits}".replace(" ", "_").replace(",", "")
            if not path.exists():
                convert(path, hf_path=str(BUNDLED), precision=precision, progress=False)
            model, _ = load(str(path), memory_budget="1GB")
            if not shipped:
                quantize_routers(model, router)
            summary = compare_outputs(ref_outputs, run(model, windows, progress=False), windows)
            rows.append({"experts": name, "router_bits": router, "dense_bits": dense_bits, **summary})
            print(f"{name:32s} router {router:2d}: KL {summary['kl_mean']:.4f}  top-1 {summary['same_top1']:.2%}  "
                  f"ppl {summary['ppl_model']:.3f} ({summary['ppl_delta']:+.3f})  routing overlap "
                  f"{summary['routing_overlap_mean']:.2%} exact {summary['routing_exact_mean']:.2%}", flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| experts | router | attention/dense | KL mean | KL p99 | same top-1 | ppl (ref {:.3f}) | routing overlap | exact set |"
             .format(rows[0]["ppl_reference"]), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['experts']} | {r['router_bits']} | {r['dense_bits']} | {r['kl_mean']:.4f} | {r['kl_p99']:.3f} "
                     f"| {100 * r['same_top1']:.2f}% | {r['ppl_model']:.3f} ({r['ppl_delta']:+.3f}) "
                     f"| {100 * r['routing_overlap_mean']:.2f}% | {100 * r['routing_exact_mean']:.2f}% |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, args.out / "quality.png")


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = [r for r in rows if r["dense_bits"] == 8]
    names = list(dict.fromkeys(r["experts"] for r in study))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, label in [(axes[0], "kl_mean", "mean KL divergence (nats)"), (axes[1], "same_top1", "same top-1 token"),
                           (axes[2], "routing_exact_mean", "identical top-k expert set")]:
        for router in ROUTERS:
            ys = [next(r[key] for r in study if r["experts"] == n and r["router_bits"] == router) for n in names]
            ax.plot(names, ys, marker="o", label=f"router {router if router < 16 else 'unquantized'}")
        ax.set_title(label)
        ax.set_xlabel("expert precision (bits)")
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.suptitle("Quantized vs bf16, project's 16-expert top-4 MoE, held-out Python-docs text (attention 8-bit)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
