"""The MLX engines of `bench run`, each measured in its own process: `python -m flashmoe_mlx.bench.worker SPEC`.

`flashmoe`: `flashmoe_mlx.load` with the expert pool sized to the spec's residency (that share of every
layer's experts, at least top-k). `mlx-lm`: stock `mlx_lm.load` of the same weights, fully resident. Both
compute in float32 on the CPU backend (MLX's CPU quantized matmul in bf16 is slow and inexact).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from ..layout import flashmoe_layouts
from ..store import ExpertStore
from .protocol import main


class MLXEngine:
    def __init__(self, model):
        self.model = model
        self.store = getattr(model, "expert_store", None)

    def reset(self):
        self.cache = make_prompt_cache(self.model)

    def prefill(self, ids):
        mx.eval(mx.argmax(self.model(mx.array([ids]), cache=self.cache)[:, -1], axis=-1))

    def step(self, token):
        mx.eval(mx.argmax(self.model(mx.array([[token]]), cache=self.cache)[:, -1], axis=-1))

    def counters(self) -> dict:
        return self.store.counters() if self.store else {}


def flashmoe_budget(path: str, residency: float) -> int:
    """Bytes of pool that hold `residency` of every layer's experts (at least top-k), as `load` sizes slots."""
    layouts = flashmoe_layouts(Path(path))
    float_dtype = mx.float32 if mx.default_device() == mx.cpu else None
    per_slot = sum(ExpertStore.slot_bytes(l, float_dtype) for l in layouts)
    experts = max(l.num_experts for l in layouts)
    top_k = json.loads((Path(path) / "config.json").read_text())["num_experts_per_tok"]
    return max(top_k, round(residency * experts)) * per_slot


def make_engine(spec: dict):
    if spec["engine"] == "flashmoe":
        from ..loader import load

        model, _ = load(spec["model"], memory_budget=flashmoe_budget(spec["model"], spec["residency"]),
                        threads=spec.get("threads", 4))
        stats = model.expert_store.stats()
        return MLXEngine(model), {"pool_bytes": stats["pool_bytes"], "slots_per_layer": stats["slots_per_layer"]}
    if spec["engine"] == "mlx-lm":
        from ..eval import load_reference

        model, _ = load_reference(spec["model"])
        return MLXEngine(model), {}
    raise ValueError(f"unknown MLX engine {spec['engine']!r}")


if __name__ == "__main__":
    sys.exit(main(make_engine))
