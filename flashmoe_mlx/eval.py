"""`python -m flashmoe_mlx.eval`: how closely a quantized checkpoint follows its unquantized source.

Owns the comparison, on the same token windows: per-token KL divergence of the next-token distributions
(reference || quantized: mean, median, p99), how often the top-1 token agrees, both perplexities, and, for
MoE, per-layer routing agreement (overlap of the top-k expert sets, and how often the sets are identical).
Like llama.cpp's `perplexity --kl-divergence`, for MoE routing too. Any checkpoint `load` reads works
(flashmoe or mlx-lm, streamed); the reference may also be an unquantized Hugging Face directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from .architecture import ExpertCallHook, UnsupportedModel, expert_blocks, module_at, swap_module
from .format import FormatError
from .loader import LoadError, load


def record_routing(model: nn.Module) -> dict[int, list]:
    """Wrap every expert block of `model`; returns {layer: list that fills with [tokens, k] id arrays}
    (one host copy per call)."""
    sinks = {}
    for block in expert_blocks(model):
        sink = sinks[block.layer] = []
        swap_module(model, block.path, ExpertCallHook(
            module_at(model, block.path), lambda x, indices, sink=sink: sink.append(np.array(indices).reshape(-1, indices.shape[-1]))))
    return sinks


def save_routing(path, routes: dict[int, list], num_experts: int) -> dict[str, np.ndarray]:
    """Write what record_routing collected as a trace (.npz: num_experts, and per layer the [tokens, k]
    expert ids in order, for `bench policy-sim`); returns the per-layer arrays."""
    layers = {str(layer): np.concatenate(ids) for layer, ids in routes.items() if ids}
    if not layers:
        raise ValueError("no routing was recorded (nothing ran through the model)")
    np.savez_compressed(path, num_experts=num_experts, **layers)
    return layers


def load_reference(path: str):
    """A resident model: a flashmoe checkpoint through `load` (every expert resident), else stock mlx-lm
    (which also reads an unquantized Hugging Face directory). Float32 on the CPU backend."""
    if (Path(path) / "experts" / "manifest.json").exists():
        return load(path, memory_budget="1TB")
    from mlx_lm import load as mlx_load

    model, tokenizer = mlx_load(path)
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
    return model, tokenizer


@dataclass
class Comparison:
    kl: list = field(default_factory=list)
    same_top1: list = field(default_factory=list)
    nll_ref: list = field(default_factory=list)
    nll_model: list = field(default_factory=list)
    overlap: dict = field(default_factory=dict)  # layer -> per-token |A & B| / k
    exact: dict = field(default_factory=dict)  # layer -> per-token A == B

    def add_window(self, ref_logits: mx.array, logits: mx.array, targets: np.ndarray):
        ref_lp = np.array(nn.log_softmax(ref_logits.astype(mx.float32), axis=-1))[0]
        lp = np.array(nn.log_softmax(logits.astype(mx.float32), axis=-1))[0]
        self.kl.extend((np.exp(ref_lp) * (ref_lp - lp)).sum(-1).tolist())
        self.same_top1.extend((ref_lp.argmax(-1) == lp.argmax(-1)).tolist())
        rows = np.arange(len(targets))
        self.nll_ref.extend((-ref_lp[rows, targets]).tolist())
        self.nll_model.extend((-lp[rows, targets]).tolist())

    def add_routing(self, ref: dict[int, np.ndarray], model: dict[int, np.ndarray]):
        """Per layer, [tokens, k] expert ids of each model for the same tokens."""
        for layer, a in ref.items():
            b = model[layer]
            k = a.shape[-1]
            shared = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1)  # ids within a set are distinct
            self.overlap.setdefault(layer, []).extend((shared / k).tolist())
            self.exact.setdefault(layer, []).extend((shared == k).tolist())

    def summary(self) -> dict:
        kl = np.array(self.kl)
        ppl_ref, ppl = float(np.exp(np.mean(self.nll_ref))), float(np.exp(np.mean(self.nll_model)))
        routing = {
            str(layer): {"overlap": float(np.mean(self.overlap[layer])), "exact_set": float(np.mean(self.exact[layer]))}
            for layer in sorted(self.overlap)
        }
        return {
            "tokens": len(kl),
            "kl_mean": float(kl.mean()), "kl_median": float(np.median(kl)), "kl_p99": float(np.percentile(kl, 99)),
            "same_top1": float(np.mean(self.same_top1)),
            "ppl_reference": ppl_ref, "ppl_model": ppl, "ppl_delta": ppl - ppl_ref,
            "routing": routing,
            "routing_overlap_mean": float(np.mean([r["overlap"] for r in routing.values()])) if routing else None,
            "routing_exact_mean": float(np.mean([r["exact_set"] for r in routing.values()])) if routing else None,
        }


def encode_document(tokenizer, text: str) -> list[int]:
    """A whole document's token ids. transformers warns when ids outrun the model's context; callers cut them
    into windows themselves, so the warning is turned off (verbose=False; the ids are the same)."""
    return tokenizer.encode(text, verbose=False)


def token_windows(tokenizer, text: str, context: int, max_tokens: int | None) -> list[np.ndarray]:
    ids = np.array(encode_document(tokenizer, text), dtype=np.int64)
    if max_tokens:
        ids = ids[: max_tokens + 1]
    step = context  # disjoint windows: every scored token once
    return [ids[s : s + context + 1] for s in range(0, len(ids) - 1, step) if len(ids[s : s + context + 1]) > 1]


def run(model, windows: list[np.ndarray], progress: bool = True, desc: str = "scoring") -> list[tuple]:
    """(logits, {layer: [tokens, k] expert ids}) of `model` on each window."""
    routes = record_routing(model)
    outputs = []
    for window in tqdm(windows, desc=desc, unit="window", disable=not progress):
        logits = model(mx.array(window[None, :-1]))
        mx.eval(logits)
        outputs.append((logits, {layer: np.concatenate(ids) for layer, ids in routes.items()}))
        for ids in routes.values():
            ids.clear()
    return outputs


def compare_outputs(reference: list[tuple], outputs: list[tuple], windows: list[np.ndarray]) -> dict:
    result = Comparison()
    for (ref_logits, ref_routes), (logits, routes), window in zip(reference, outputs, windows):
        result.add_window(ref_logits, logits, window[1:])
        result.add_routing(ref_routes, routes)
    return result.summary()


def compare(reference, model, tokenizer, text: str, *, context: int = 512, max_tokens: int | None = None,
            progress: bool = True) -> dict:
    """Run both models over the same windows of `text`; return the summary dict (see `Comparison`)."""
    windows = token_windows(tokenizer, text, context, max_tokens)
    return compare_outputs(run(reference, windows, progress, "reference"), run(model, windows, progress, "model"),
                           windows)


def table(summary: dict) -> str:
    s = summary
    lines = [
        "| tokens | KL mean | KL median | KL p99 | same top-1 | ppl ref | ppl model | delta | routing overlap | exact set |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['tokens']} | {s['kl_mean']:.4f} | {s['kl_median']:.4f} | {s['kl_p99']:.4f} | {100 * s['same_top1']:.2f}% "
        f"| {s['ppl_reference']:.3f} | {s['ppl_model']:.3f} | {s['ppl_delta']:+.3f} "
        f"| {100 * (s['routing_overlap_mean'] or 0):.2f}% | {100 * (s['routing_exact_mean'] or 0):.2f}% |",
    ]
    return "\n".join(lines)


def default_text() -> Path:
    from .default import BUNDLED

    return BUNDLED / "heldout.txt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashmoe_mlx.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the quantized checkpoint (flashmoe or mlx-lm)")
    ap.add_argument("--reference", required=True, help="its unquantized source (HF directory, or any checkpoint)")
    ap.add_argument("--text", type=Path, default=None, help="text file to score (default: the bundled held-out set)")
    ap.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    ap.add_argument("--memory-budget", default=None, help="expert pool budget for --model (default: automatic)")
    ap.add_argument("--json", type=Path, default=None, help="write the summary here as JSON")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        text_path = args.text or default_text()
        try:
            text = text_path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise LoadError(f"{text_path}: cannot read the text ({e})") from None
        if args.context < 2:
            raise LoadError("--context must be at least 2")
        reference, tokenizer = load_reference(args.reference)
        model, _ = load(args.model, memory_budget=args.memory_budget)
        summary = compare(reference, model, tokenizer, text, context=args.context, max_tokens=args.max_tokens,
                          progress=not args.quiet)
    except (LoadError, FormatError, UnsupportedModel, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
