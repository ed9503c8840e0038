"""`load()`: mlx-lm's `load` with the routed experts streamed from disk under a memory budget.

Owns building the model (mlx-lm's own class and loader, with each SwitchGLU swapped for a
StreamedSwitchGLU before any weight is read, so experts are never materialized), sizing the pool from the
budget, the compute dtype per backend, and the clear errors a user sees for bad checkpoints or budgets.
"""

from __future__ import annotations

import os
import re

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import load_model, load_tokenizer

from . import kernels
from .architecture import ExpertBlock, UnsupportedModel, model_classes
from .hub import NotFound, resolve_path
from .layout import check_layouts, check_safetensors_file, flashmoe_layouts, is_flashmoe, stock_layouts
from .store import ExpertStore
from .streamed import StreamedSwitchGLU, swap_expert_blocks

KV_RESERVE = 1 << 30  # default budget leaves room for the KV cache ...
MARGIN_FRACTION = 0.10  # ... and this share of memory for the OS and the rest of the process
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class LoadError(ValueError):
    pass


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as "8GB", "512MiB", "1.5g"."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise LoadError(f"memory budget {value!r} is not a size such as 8GB, 512MiB or 4000000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def available_memory() -> int:
    """What the process may use: Metal's recommended working set, else physical memory."""
    if mx.metal.is_available():
        return int(mx.device_info()["max_recommended_working_set_size"])
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_budget(dense_bytes: int) -> int:
    total = available_memory()
    return int(total * (1 - MARGIN_FRACTION)) - dense_bytes - KV_RESERVE


def _streaming_classes(config: dict, blocks: dict[int, ExpertBlock]):
    """mlx-lm's model class for `config`, subclassed so that construction swaps in streamed experts and
    sanitize drops stacked expert tensors (they are read by the store, never loaded)."""
    model_class, args_class = model_classes(config)
    parent_sanitize = getattr(model_class, "sanitize", None)

    def __init__(self, args):
        model_class.__init__(self, args)
        blocks.update({b.layer: b for b in swap_expert_blocks(self)})

    def sanitize(self, weights):
        if parent_sanitize is not None:
            weights = parent_sanitize(self, weights)
        prefixes = tuple(b.path + "." for b in blocks.values())
        return {k: v for k, v in weights.items() if not k.startswith(prefixes)}

    streamed = type(model_class.__name__, (model_class,), {"__init__": __init__, "sanitize": sanitize})
    return streamed, args_class


def load(
    path_or_hf_repo: str,
    memory_budget: int | str | None = None,
    *,
    tokenizer_config: dict | None = None,
    model_config: dict | None = None,
    return_config: bool = False,
    threads: int = 4,
    policy: str = "lru",
    verify_reads: bool = False,
    compute_dtype: str | None = "auto",
):
    """Load a flashmoe or stock mlx-lm checkpoint with its routed experts streamed.

    Returns `(model, tokenizer)` like `mlx_lm.load` (plus the config with `return_config`). The model's
    `expert_store` has `stats()` / `reset_stats()`. `memory_budget` bounds the expert pool (bytes or "8GB";
    default: available memory less the dense weights, a KV reserve and a margin). `compute_dtype="auto"`
    computes in float32 on the CPU backend and in the checkpoint's dtype on GPUs.
    """
    try:
        path = resolve_path(str(path_or_hf_repo), ["*.json", "*.safetensors", "experts/*", "*.model", "*.tiktoken",
                                                   "*.txt", "*.jinja"])
    except NotFound as e:
        raise LoadError(str(e)) from None
    if not (path / "config.json").is_file():
        raise LoadError(f"{path / 'config.json'}: missing; not a model checkpoint")
    for shard in sorted(path.glob("model*.safetensors")):
        check_safetensors_file(shard)
    blocks: dict[int, ExpertBlock] = {}
    try:
        model, config = load_model(path, lazy=True, strict=True, model_config=model_config,
                                   get_model_classes=lambda config: _streaming_classes(config, blocks))
    except UnsupportedModel:
        raise
    except (ValueError, FileNotFoundError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: cannot load this checkpoint ({type(e).__name__}: {e})") from None
    layouts = flashmoe_layouts(path) if is_flashmoe(path, config) else stock_layouts(path, config, blocks)
    check_layouts(path, layouts, blocks)

    float_dtype = None
    if compute_dtype == "auto":
        float_dtype = mx.float32 if mx.default_device() == mx.cpu else None
    elif compute_dtype is not None:
        float_dtype = getattr(mx, compute_dtype)
    if float_dtype is not None:
        model.update(tree_map(lambda a: a.astype(float_dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                              model.parameters()))

    dense_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    per_slot = sum(ExpertStore.slot_bytes(l, float_dtype) for l in layouts)
    text = config.get("text_config", config)
    top_k = int(text.get("num_experts_per_tok") or text.get("moe_topk") or 1)
    budget = parse_size(memory_budget) if memory_budget is not None else default_budget(dense_bytes)
    slots = min(budget // per_slot, max(l.num_experts for l in layouts))
    if slots < top_k:
        raise LoadError(
            f"memory budget {human_bytes(budget)} is too small: every MoE layer needs {top_k} slots for its top-k "
            f"experts, so the minimum is {top_k * per_slot} bytes ({human_bytes(top_k * per_slot)})"
        )
    store = ExpertStore(layouts, int(slots), threads=threads, policy=policy, verify_reads=verify_reads,
                        float_dtype=float_dtype)
    for _, module in model.named_modules():
        if isinstance(module, StreamedSwitchGLU):
            module.bind(store)
    model.expert_store = store
    kernels.install_attention_decode()  # quantized KV caches (--kv-bits) decode through attention_decode
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(path, tokenizer_config, eos_token_ids=config.get("eos_token_id", None))
    return (model, tokenizer, config) if return_config else (model, tokenizer)
