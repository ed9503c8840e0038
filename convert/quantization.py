"""Per-module precision for a conversion: the recipe, the flags, and the model's own floor.

Owns one decision: for every quantizable module path, `{"group_size", "bits", "mode"}` or False (kept
in the source dtype). The result is exactly what mlx-lm reads from config.json's `quantization` block.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from flashmoe_mlx.architecture import ExpertBlock, router_paths

RECIPES = ("4bit", "3bit", "2bit")
EXPERT_BITS = (2, 3, 4, 8)
DENSE_BITS = (4, 6, 8)
ROUTER_BITS = (8, 16)
GROUP_SIZES = (32, 64, 128)
EMBEDDING_MIN_BITS = 6  # embeddings and lm_head: max(--bits, 6)


class QuantizationError(ValueError):
    pass


@dataclass(frozen=True)
class Precision:
    """What the user asked for; `expert_bits` maps gate_proj/up_proj/down_proj to bits."""

    bits: int = 4
    router_bits: int = 8
    group_size: int = 64
    expert_bits: tuple[tuple[str, int], ...] = (("down_proj", 4), ("gate_proj", 4), ("up_proj", 4))
    expert_search: bool = False  # experts: searched scales and biases (affine_search.py), else round-to-nearest

    @classmethod
    def from_flags(cls, *, bits=4, router_bits=8, group_size=64, expert_bits=None, recipe=None,
                   search=False) -> "Precision":
        if expert_bits is not None and recipe is not None:
            raise QuantizationError("give either --expert-bits or --recipe, not both")
        for value, allowed, flag in (
            (bits, DENSE_BITS, "--bits"),
            (router_bits, ROUTER_BITS, "--router-bits"),
            (group_size, GROUP_SIZES, "--group-size"),
        ):
            if value not in allowed:
                raise QuantizationError(f"{flag} {value} is not one of {', '.join(map(str, allowed))}")
        if expert_bits is not None:
            if expert_bits not in EXPERT_BITS:
                raise QuantizationError(f"--expert-bits {expert_bits} is not one of {', '.join(map(str, EXPERT_BITS))}")
            per_proj = {"gate_proj": expert_bits, "up_proj": expert_bits, "down_proj": expert_bits}
        else:
            recipe = recipe or "4bit"
            if recipe not in RECIPES:
                raise QuantizationError(f"--recipe {recipe} is not one of {', '.join(RECIPES)}")
            # Nbit: gate/up at N bits, down_proj (the most sensitive expert matrix) at least 4.
            low = int(recipe[0])
            per_proj = {"gate_proj": low, "up_proj": low, "down_proj": max(low, 4)}
        return cls(bits, router_bits, group_size, tuple(sorted(per_proj.items())), bool(search))

    def default(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}


def _is_quantizable(module: nn.Module) -> bool:
    return hasattr(module, "to_quantized") and "weight" in module


def quantization_plan(model: nn.Module, blocks: list[ExpertBlock], precision: Precision) -> dict[str, dict | bool]:
    """Decide every quantizable module's precision; raise if a module cannot be grouped."""
    experts = {b.path for b in blocks}
    routers = router_paths(model, blocks)
    model_floor = getattr(model, "quant_predicate", None)
    expert_bits = dict(precision.expert_bits)
    plan: dict[str, dict | bool] = {}
    for path, module in model.named_modules():
        if not _is_quantizable(module):
            continue
        parent, _, leaf = path.rpartition(".")
        if parent in experts:
            if leaf not in expert_bits:
                raise QuantizationError(f"expert projection '{path}' is not gate_proj, up_proj or down_proj")
            ours = {"group_size": precision.group_size, "bits": expert_bits[leaf], "mode": "affine"}
        elif path in routers:
            ours = False if precision.router_bits == 16 else dict(precision.default(), bits=precision.router_bits)
        elif isinstance(module, nn.Embedding) or leaf == "lm_head":
            ours = dict(precision.default(), bits=max(precision.bits, EMBEDDING_MIN_BITS))
        else:
            ours = precision.default()
        # The model class's own predicate is a floor: it may raise precision, never lower it.
        floor = model_floor(path, module) if model_floor is not None else True
        if floor is False:
            ours = False
        elif isinstance(floor, dict) and ours is not False and floor.get("bits", 4) >= ours["bits"]:
            ours = {"group_size": floor.get("group_size", 64), "bits": floor.get("bits", 4),
                    "mode": floor.get("mode", "affine")}
        if ours is not False:
            in_dims = module.weight.shape[-1]
            if in_dims % ours["group_size"]:
                fits = [g for g in GROUP_SIZES if in_dims % g == 0]
                hint = f"; --group-size {fits[-1]} fits" if fits else ""
                raise QuantizationError(
                    f"module '{path}' has input dimension {in_dims}, not divisible by group size "
                    f"{ours['group_size']}{hint}"
                )
        plan[path] = ours
    return plan


def config_block(plan: dict[str, dict | bool], precision: Precision) -> dict:
    """config.json's `quantization` block: the default plus every module's own entry."""
    return {**precision.default(), **dict(sorted(plan.items()))}
