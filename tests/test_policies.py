"""Eviction policies and the simulator against independent oracles (a textbook LRU, brute-force optimum)."""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_cli

from flashmoe_mlx.bench.policy_sim import miss_rate, simulate


def textbook_lru_misses(requests, slots):
    """An ordered dict, oldest first. A step's experts are all needed at once: misses evict the oldest of the
    others; then the step's experts become the newest, in id order (the store's tie rule)."""
    cache, misses = OrderedDict(), 0
    for step in requests:
        step = sorted(set(step))
        for e in step:
            if e not in cache:
                misses += 1
                if len(cache) >= slots:
                    del cache[next(x for x in cache if x not in step)]
                cache[e] = True
        for e in step:
            cache.move_to_end(e)
    return misses


def optimal_misses(requests, experts, slots):
    """Fewest misses any eviction schedule achieves, by search over cache contents (k = 1 requests)."""

    @lru_cache(maxsize=None)
    def best(t, resident):
        if t == len(requests):
            return 0
        e = requests[t]
        if e in resident:
            return best(t + 1, resident)
        if len(resident) < slots:
            return 1 + best(t + 1, frozenset(resident | {e}))
        return 1 + min(best(t + 1, frozenset((resident - {v}) | {e})) for v in resident)

    return best(0, frozenset())


def zipf_trace(rng, tokens, experts, k, skew=1.1):
    weights = 1.0 / np.arange(1, experts + 1) ** skew
    return np.stack([rng.choice(experts, k, replace=False, p=weights / weights.sum()) for _ in range(tokens)])


def test_lru_counts_like_a_textbook_lru():
    rng = np.random.default_rng(0)
    for slots, k in [(3, 1), (4, 2), (6, 3)]:
        trace = zipf_trace(rng, 300, 10, k)
        assert round(miss_rate(trace, 10, slots, "lru") * trace.size) == textbook_lru_misses(trace.tolist(), slots)


def test_belady_is_optimal_and_bounds_the_online_policies():
    rng = np.random.default_rng(1)
    for _ in range(20):
        requests = rng.integers(0, 5, 14)
        trace = requests[:, None]
        belady = round(miss_rate(trace, 5, 2, "belady") * len(requests))
        assert belady == optimal_misses(tuple(requests.tolist()), 5, 2)
    for slots, k in [(4, 2), (8, 4)]:
        trace = zipf_trace(rng, 600, 16, k)
        (row,) = simulate({0: trace}, 16, [slots])
        assert row["belady"] <= min(row["lru"], row["lfu"])


def test_lfu_beats_lru_on_skewed_routing():
    """Hot experts stay hot in MoE routing: decayed frequency keeps them where recency drops them."""
    rng = np.random.default_rng(2)
    trace = zipf_trace(rng, 2000, 32, 4, skew=1.2)
    (row,) = simulate({0: trace}, 32, [12])
    assert row["lfu"] < row["lru"]


@pytest.mark.parametrize("policy", ["lfu"])
def test_streamed_model_is_exact_under_every_policy(policy, mlx_checkpoint):
    from mlx_lm import load as mlx_load

    from flashmoe_mlx import load

    path = mlx_checkpoint("mixtral")
    ref, _ = mlx_load(str(path))
    model, _ = load(str(path), memory_budget="130kB", policy=policy)
    tokens = mx.array(np.random.default_rng(3).integers(0, 500, (1, 40)))
    assert mx.abs(ref(tokens) - model(tokens)).max().item() <= 1e-5
    assert model.expert_store.stats()["evictions"] > 0


def test_bench_trace_and_policy_sim_cli(mlx_checkpoint, tmp_path):
    trace = tmp_path / "trace.npz"
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    made = run_cli("flashmoe_mlx.bench", "trace", "--model", mlx_checkpoint("qwen3_moe"), "--text", text,
                   "--out", trace, "--max-tokens", 256)
    assert made.returncode == 0, made.stderr
    sim = run_cli("flashmoe_mlx.bench", "policy-sim", "--trace", trace, "--slots", "2,4,6",
                  "--plot", tmp_path / "miss.png")
    assert sim.returncode == 0, sim.stderr
    assert "belady miss rate" in sim.stdout and "| 4 of 8 |" in sim.stdout
    assert (tmp_path / "miss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_cli("flashmoe_mlx.bench", "policy-sim", "--trace", tmp_path / "missing.npz")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
