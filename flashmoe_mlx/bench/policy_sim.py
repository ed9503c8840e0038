"""Replay routing traces through eviction policies: LRU, LFU with decay, and Belady's offline optimum.

A trace is, per MoE layer, the expert ids each token routed to ([tokens, k]); every token's k experts must be
resident together, as in the store. The same SlotMap the store runs counts the misses, so a policy's
simulated miss rate is the one it would have live.
"""

from __future__ import annotations

import numpy as np

from ..residency import NEVER, POLICIES, SlotMap, _lowest


class Belady:
    """Evict the resident expert whose next use is farthest away (never again first). Needs the future, so
    it exists only in simulation: the bound no online policy can beat (up to the k-at-once constraint)."""

    def __init__(self, trace: np.ndarray, num_slots: int):
        steps, num_experts = len(trace), int(trace.max()) + 1
        self.next_use = np.full((steps + 1, num_experts), NEVER, np.int64)  # [t, e]: first use after t
        for t in range(steps - 1, -1, -1):
            self.next_use[t] = self.next_use[t + 1]
            self.next_use[t, trace[t]] = t
        self.step = 0

    def touch(self, experts, slots):
        self.step += 1

    def victims(self, count: int, protected: np.ndarray, expert_of: np.ndarray) -> np.ndarray:
        upcoming = self.next_use[self.step + 1]
        key = np.where(expert_of >= 0, -upcoming[np.maximum(expert_of, 0)].astype(np.float64), -np.inf)
        return _lowest(key, count, protected)


def miss_rate(trace: np.ndarray, num_experts: int, num_slots: int, policy: str) -> float:
    """Fraction of expert requests that miss, replaying one layer's [tokens, k] trace."""
    if policy == "belady":
        slot_map = SlotMap(num_experts, num_slots, Belady(trace, num_slots))
    else:
        slot_map = SlotMap(num_experts, num_slots, policy)
    misses = 0
    for experts in trace:
        misses += len(slot_map.assign(np.unique(experts))[1])
    return misses / trace.size


def simulate(traces: dict[int, np.ndarray], num_experts: int, slot_counts: list[int],
             policies=(*POLICIES, "belady")) -> list[dict]:
    """Miss rates per policy and pool size, averaged over layers (weighted by requests)."""
    rows = []
    for slots in slot_counts:
        row = {"slots": slots}
        for policy in policies:
            total = sum(miss_rate(t, num_experts, slots, policy) * t.size for t in traces.values())
            row[policy] = total / sum(t.size for t in traces.values())
        rows.append(row)
    return rows
