"""Which mlx-lm architectures flashmoe streams, and where their routed experts live.

Owns: building an mlx-lm model lazily from a config (no weights touched), finding every `SwitchGLU`
expert block in it, splitting parameter names into units (one per decoder layer, plus the rest), and
swapping a module at a path (to stream an expert block, or to watch what it is called with).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.utils import _get_classes

# Families exercised end to end by the test-suite; any mlx-lm MoE built on SwitchGLU is accepted.
TESTED_FAMILIES = (
    "qwen3_moe", "qwen3_5_moe", "qwen3_next", "deepseek_v3", "mixtral", "gpt_oss", "glm4_moe", "olmoe",
)

_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class UnsupportedModel(ValueError):
    """The config names an architecture flashmoe cannot stream."""


@dataclass(frozen=True)
class ExpertBlock:
    layer: int
    path: str  # e.g. "model.layers.3.mlp.switch_mlp"
    parent: str  # the MoE block that owns it (its Linear children are routers)
    num_experts: int
    shapes: dict  # projection -> unquantized stacked weight shape (num_experts, out, in)


def build_model(config: dict) -> nn.Module:
    """The mlx-lm model for `config`, with lazily initialised (never evaluated) parameters."""
    model_type = config.get("model_type")
    model_class, args_class = model_classes(config)
    try:
        return model_class(args_class.from_dict(config))
    except (TypeError, KeyError, ValueError) as e:
        raise UnsupportedModel(f"config.json does not describe a valid {model_type} model ({e})") from None


def model_classes(config: dict):
    """mlx-lm's (Model, ModelArgs) for a config, or a clear error listing what is supported."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UnsupportedModel("config.json has no 'model_type'")
    try:
        return _get_classes(config)
    except ValueError:
        raise UnsupportedModel(
            f"mlx-lm has no architecture '{model_type}'; flashmoe streams mlx-lm MoE models with "
            f"SwitchGLU experts (tested: {', '.join(TESTED_FAMILIES)})"
        ) from None


def layer_of(key: str) -> int | None:
    """Decoder layer index named in a parameter path, or None for embeddings, final norm, head."""
    m = _LAYER_KEY.search(key)
    return int(m.group(1)) if m else None


def expert_blocks(model: nn.Module, model_type: str = "?") -> list[ExpertBlock]:
    blocks = []
    for path, module in model.named_modules():
        if isinstance(module, SwitchGLU):
            layer = layer_of(path + ".")
            if layer is None:
                raise UnsupportedModel(f"{model_type}: expert block '{path}' is outside the decoder layers")
            shapes = {p: tuple(getattr(module, p).weight.shape) for p in ("gate_proj", "up_proj", "down_proj")}
            blocks.append(ExpertBlock(layer, path, path.rsplit(".", 1)[0], module.gate_proj.num_experts, shapes))
    if not blocks:
        raise UnsupportedModel(
            f"architecture '{model_type}' has no SwitchGLU expert blocks, so there is nothing to stream; "
            f"supported: mlx-lm MoE models with SwitchGLU experts (tested: {', '.join(TESTED_FAMILIES)})"
        )
    if len({b.layer for b in blocks}) != len(blocks):
        raise UnsupportedModel(f"{model_type}: more than one expert block in a layer is not supported")
    return sorted(blocks, key=lambda b: b.layer)


def module_at(model: nn.Module, path: str) -> nn.Module:
    module = model
    for part in path.split("."):
        module = module[int(part)] if isinstance(module, list) else getattr(module, part)
    return module


def swap_module(model: nn.Module, path: str, module) -> nn.Module:
    """Put `module` at `path` in `model` (an attribute or a list item, e.g. a decoder layer); returns the
    module it replaces."""
    parent_path, _, name = path.rpartition(".")
    parent = module_at(model, parent_path)
    if isinstance(parent, list):
        old, parent[int(name)] = parent[int(name)], module
    else:
        old = getattr(parent, name)
        setattr(parent, name, module)
    return old


class ExpertCallHook(nn.Module):
    """Wraps an expert block: `on_call(x, indices)` sees each call's inputs, then the block runs."""

    def __init__(self, inner: nn.Module, on_call):
        super().__init__()
        self.inner = inner
        self._on_call = on_call

    def __call__(self, x, indices):
        self._on_call(x, indices)
        return self.inner(x, indices)


def router_paths(model: nn.Module, blocks: list[ExpertBlock]) -> set[str]:
    """Linear children of each MoE block (gate, router, shared_expert_gate): routing decisions."""
    parents = {b.parent for b in blocks}
    return {
        path
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[0] in parents
    }
