"""Which expert sits in which pool slot, and whom to evict: the slot map and the eviction policies.

Owns the bookkeeping the expert store runs live and the policy simulator replays over routing traces, so
both count hits, misses and evictions the same way. State is numpy arrays per layer, no per-expert objects.
A policy sees every request (`touch`) and picks `victims` among slots not needed by the current request.
"""

from __future__ import annotations

import numpy as np

NEVER = np.iinfo(np.int64).max


class LRU:
    """Evict the slot whose expert was used longest ago (free slots first)."""

    def __init__(self, num_experts: int, num_slots: int):
        self.last_use = np.full(num_slots, -1, np.int64)
        self.clock = 0

    def touch(self, experts: np.ndarray, slots: np.ndarray):
        # One tick per expert, in request order, so that no two slots tie and eviction is deterministic.
        self.last_use[slots] = self.clock + np.arange(len(slots))
        self.clock += len(slots)

    def victims(self, count: int, protected: np.ndarray, expert_of: np.ndarray) -> np.ndarray:
        return _lowest(self.last_use.copy(), count, protected)


class LFUDecay:
    """Evict the resident expert with the lowest exponentially decayed use count (free slots first). Counts
    belong to experts, not slots, so an expert that was hot before its eviction comes back hot."""

    def __init__(self, num_experts: int, num_slots: int, half_life: float = 64.0):
        self.score = np.zeros(num_experts)
        self.decay = 0.5 ** (1.0 / half_life)  # per request

    def touch(self, experts: np.ndarray, slots: np.ndarray):
        self.score *= self.decay
        self.score[experts] += 1.0

    def victims(self, count: int, protected: np.ndarray, expert_of: np.ndarray) -> np.ndarray:
        score = np.where(expert_of >= 0, self.score[np.maximum(expert_of, 0)], -1.0)
        return _lowest(score, count, protected)


POLICIES = {"lru": LRU, "lfu": LFUDecay}


def _lowest(key: np.ndarray, count: int, protected: np.ndarray) -> np.ndarray:
    key = key.astype(np.float64)
    key[protected] = np.inf
    if count >= len(key):
        return np.argsort(key, kind="stable")[:count]
    return np.argpartition(key, count - 1)[:count]


class SlotMap:
    """expert -> slot and slot -> expert for one layer's pool, with its eviction policy."""

    def __init__(self, num_experts: int, num_slots: int, policy="lru"):
        self.slot_of = np.full(num_experts, -1, np.int32)
        self.expert_of = np.full(num_slots, -1, np.int32)
        self.policy = POLICIES[policy](num_experts, num_slots) if isinstance(policy, str) else policy

    @property
    def num_slots(self) -> int:
        return len(self.expert_of)

    def assign(self, experts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Give the distinct `experts` (at most num_slots) slots. Returns (slots of all, the missing experts,
        the slots they go to, how many residents were evicted). The caller loads the missing ones."""
        slots = self.slot_of[experts]
        missing = slots < 0
        victims = np.empty(0, np.int64)
        evicted = 0
        if missing.any():
            victims = self.policy.victims(int(missing.sum()), slots[~missing], self.expert_of)
            gone = self.expert_of[victims]
            gone = gone[gone >= 0]
            evicted = len(gone)
            self.slot_of[gone] = -1
            self.expert_of[victims] = experts[missing]
            self.slot_of[experts[missing]] = victims
            slots = self.slot_of[experts]
        self.policy.touch(experts, slots)
        return slots, experts[missing], victims, evicted

    def forget(self, experts: np.ndarray, slots: np.ndarray):
        """Undo an assignment whose load failed: nothing half-read may count as resident."""
        self.slot_of[experts] = -1
        self.expert_of[slots] = -1
