"""`StreamedSwitchGLU`: mlx-lm's SwitchGLU computed over a pool of slots filled by the expert store.

Owns the per-layer step: one host sync for the routed expert ids, the store makes them resident, the ids
are remapped to slots, and mlx-lm's own `SwitchGLU.__call__` runs over the pool (so the arithmetic is
mlx-lm's, kernel for kernel), except for decode steps on a GPU, where the fused `expert_swiglu` kernel
serves plain-SwiGLU affine experts. When a batch routes to more distinct experts than the layer has slots
(long prefills under small budgets), it runs in waves: each wave's experts are read once and applied to
all of their tokens, and the wave is evaluated before its slots are reused.
"""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear

from . import kernels
from .architecture import ExpertBlock, expert_blocks, module_at, swap_module
from .store import ExpertStore

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _pool_linear(tensors: dict[str, mx.array], quant: dict | None) -> nn.Module:
    """A (Quantized)SwitchLinear whose parameters are the pool's arrays (shared, not copied)."""
    cls = QuantizedSwitchLinear if quant else SwitchLinear
    module = cls.__new__(cls)  # parameters come from the pool, so no initialisation of random weights
    nn.Module.__init__(module)
    if quant:
        module.group_size, module.bits, module.mode = quant["group_size"], quant["bits"], quant["mode"]
        module.global_scale = None
    for name, array in tensors.items():
        module[name] = array
    module.freeze()
    return module


class StreamedSwitchGLU(SwitchGLU):
    def __init__(self, activation: nn.Module, layer: int):
        nn.Module.__init__(self)
        self.activation = activation
        self.layer = layer
        self.store: ExpertStore | None = None
        self.fused = False  # whether the fused expert_swiglu kernel can serve this layer
        self._last_output: mx.array | None = None  # the newest graph that reads this layer's pool

    def bind(self, store: ExpertStore):
        """Attach the store's pool for this layer as gate/up/down projection parameters."""
        pool = store.pools[self.layer]
        for proj in PROJECTIONS:
            specs = pool.layout.projection(proj)
            quant = next((t.quant for t in specs.values() if t.quant), None)
            setattr(self, proj, _pool_linear({p: pool.tensors[t.name] for p, t in specs.items()}, quant))
        self.store = store
        self.fused = kernels.supports_expert_swiglu(self)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        t0 = time.perf_counter()
        ids = np.array(indices)  # the layer's one host sync: waits for everything the router depends on
        self.store.note_sync(time.perf_counter() - t0)
        experts, position = np.unique(ids, return_inverse=True)
        capacity = self.store.capacity(self.layer)
        if len(experts) <= capacity:
            slots = self._fetch(experts).astype(np.uint32)
            self._last_output = self._experts(x, mx.array(slots[position.reshape(ids.shape)]))
        else:
            self._last_output = self._waves(x, ids, experts, position, capacity)
        return self._last_output

    def _experts(self, x: mx.array, slot_ids: mx.array) -> mx.array:
        """Per-expert outputs [..., K, H]: the fused decode kernel where a backend runs it, else mlx-lm's math.
        (The routing-weighted sum stays with mlx-lm's MoE block, which owns the scores.)"""
        tokens = slot_ids.size // slot_ids.shape[-1]
        runner = kernels.active_runner() if self.fused and tokens <= kernels.MAX_DECODE_TOKENS else None
        if runner is not None:  # bind() found the pool supported
            y = kernels.expert_swiglu_launches(x.reshape(tokens, -1), self, slot_ids.reshape(tokens, -1), None, runner)
            return y.reshape(*slot_ids.shape, -1)
        return super().__call__(x, slot_ids)

    def _fetch(self, experts: np.ndarray) -> np.ndarray:
        # Reads may land straight in pool memory: whatever still reads the pool must have run first. In a
        # forward pass it has (this layer's router depends on it); a caller holding an unevaluated forward
        # while starting the next one pays one evaluation here.
        if self._last_output is not None:
            mx.eval(self._last_output)
            self._last_output = None
        return self.store.fetch(self.layer, experts)

    def _waves(self, x: mx.array, ids: np.ndarray, experts: np.ndarray, position: np.ndarray, capacity: int):
        k = ids.shape[-1]
        flat_x = x.reshape(-1, x.shape[-1])
        position = position.reshape(-1)  # numpy versions disagree on the shape np.unique's inverse has
        out = None
        for start in range(0, len(experts), capacity):
            if out is not None:
                self._last_output = out  # the previous wave must run before its slots are refilled
            slots = self._fetch(experts[start : start + capacity]).astype(np.uint32)
            pairs = np.nonzero((position >= start) & (position < start + capacity))[0]
            slot_ids = mx.array(slots[position[pairs] - start][:, None])
            y = super().__call__(flat_x[mx.array(pairs // k)], slot_ids)[:, 0]
            if out is None:
                out = mx.zeros((ids.size, y.shape[-1]), y.dtype)
            out[mx.array(pairs)] = y
        return out.reshape(*ids.shape, -1)


def swap_expert_blocks(model: nn.Module) -> list[ExpertBlock]:
    """Replace every SwitchGLU in `model` by an (unbound) StreamedSwitchGLU; return the blocks replaced."""
    blocks = expert_blocks(model, getattr(model, "model_type", "?"))
    for block in blocks:
        swap_module(model, block.path, StreamedSwitchGLU(module_at(model, block.path).activation, block.layer))
    return blocks
