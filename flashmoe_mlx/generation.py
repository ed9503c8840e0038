"""Text generation on a streamed model: `generate` / `stream_generate` with the same shapes as mlx-lm's.

Owns the responses (mlx-lm's GenerationResponse plus the expert store's live figures) and the stats line.
Sampling, logits processors and detokenizing are mlx-lm's own.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, fields

import mlx.core as mx
from mlx_lm.generate import GenerationResponse
from mlx_lm.generate import stream_generate as mlx_stream_generate


_RSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux


@dataclass
class StreamResponse(GenerationResponse):
    """mlx-lm's GenerationResponse plus the expert store's figures since generation started."""

    expert_hit_rate: float = 0.0
    expert_gb_read: float = 0.0
    expert_read_gbps: float = 0.0


class ExpertCounter:
    """Expert-store counters relative to a starting point (cheap: reads counters, no pool walk)."""

    def __init__(self, model):
        self.store = getattr(model, "expert_store", None)
        self.start = dict(self.store.counters()) if self.store else None

    def figures(self) -> dict:
        if self.store is None:
            return {}
        now = self.store.counters()
        d = {k: now[k] - self.start[k] for k in now}
        lookups = d["hits"] + d["misses"]
        return {
            "expert_hit_rate": d["hits"] / lookups if lookups else 0.0,
            "expert_gb_read": d["bytes_read"] / 1e9,
            "expert_read_gbps": d["bytes_read"] / 1e9 / d["read_seconds"] if d["read_seconds"] else 0.0,
        }


def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, **kwargs):
    """mlx-lm's `stream_generate`; each response also carries expert hit rate, GB read and read GB/s."""
    counter = ExpertCounter(model)
    for response in mlx_stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        base = {f.name: getattr(response, f.name) for f in fields(GenerationResponse)}
        if mx.default_device() == mx.cpu:
            # On the CPU backend MLX's allocator sees only part of the process; its peak RSS is the honest figure.
            base["peak_memory"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RSS_UNIT / 1e9
        yield StreamResponse(**base, **counter.figures())


def stats_line(r: StreamResponse) -> str:
    line = (f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
            f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
            f"peak memory: {r.peak_memory:.2f} GB")
    if isinstance(r, StreamResponse):
        line += (f" | experts: {100 * r.expert_hit_rate:.1f}% hits, {r.expert_gb_read:.3f} GB read"
                 f" at {r.expert_read_gbps:.2f} GB/s")
    return line


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """mlx-lm's `generate`: the whole completion as a string; with `verbose`, streamed plus a stats line."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print("\n" + "=" * 10 + "\n" + stats_line(last), flush=True)
    return text
