"""How unevenly a routing trace uses its experts: the share of routings that go to the most popular experts,
and the effective number of experts (exp of the popularity entropy), per layer and averaged."""

from __future__ import annotations

import numpy as np


def popularity(traces: dict[int, np.ndarray], num_experts: int, top_fraction: float = 0.1) -> dict:
    """{"top_share": share of routings taken by the top `top_fraction` of experts (uniform: top_fraction),
    "effective_experts": exp(entropy) / num_experts (uniform: 1.0), "per_layer": ...}, averaged over layers."""
    per_layer = {}
    top = max(1, round(num_experts * top_fraction))
    for layer, ids in traces.items():
        counts = np.bincount(np.asarray(ids).reshape(-1), minlength=num_experts).astype(np.float64)
        p = counts / counts.sum()
        nz = p[p > 0]
        per_layer[int(layer)] = {
            "top_share": float(np.sort(p)[::-1][:top].sum()),
            "effective_experts": float(np.exp(-(nz * np.log(nz)).sum()) / num_experts),
        }
    return {
        "top_fraction": top / num_experts,
        "top_share": float(np.mean([v["top_share"] for v in per_layer.values()])),
        "effective_experts": float(np.mean([v["effective_experts"] for v in per_layer.values()])),
        "per_layer": per_layer,
    }
