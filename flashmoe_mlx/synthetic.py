"""Synthetic random-weight MoE checkpoints in Hugging Face layout, written one layer at a time.

Owns shape presets and the writer: a qwen3_moe config plus one safetensors shard per decoder layer, with
per-expert tensors named as transformers saves them, so the converter and mlx-lm see a real HF checkpoint.
Memory stays at one layer; the same seed gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx


@dataclass(frozen=True)
class MoEShape:
    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    def config(self) -> dict:
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            **asdict(self),
            "intermediate_size": self.moe_intermediate_size * 4,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
            "max_position_embeddings": 4096,
        }

    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size


def _layer_tensors(shape: MoEShape, layer: int, key, dtype) -> dict[str, mx.array]:
    h, q, kv, d = shape.hidden_size, shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    p = f"model.layers.{layer}"
    dims = {
        f"{p}.self_attn.q_proj.weight": (q * d, h),
        f"{p}.self_attn.k_proj.weight": (kv * d, h),
        f"{p}.self_attn.v_proj.weight": (kv * d, h),
        f"{p}.self_attn.o_proj.weight": (h, q * d),
        f"{p}.mlp.gate.weight": (shape.num_experts, h),
    }
    for e in range(shape.num_experts):
        for name, dim in (("gate_proj", (shape.moe_intermediate_size, h)), ("up_proj", (shape.moe_intermediate_size, h)),
                          ("down_proj", (h, shape.moe_intermediate_size))):
            dims[f"{p}.mlp.experts.{e}.{name}.weight"] = dim
    keys = mx.random.split(key, len(dims))
    out = {name: (mx.random.normal(dim, key=k) * dim[1] ** -0.5).astype(dtype) for (name, dim), k in zip(dims.items(), keys)}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"{p}.{norm}.weight"] = mx.ones((h,), dtype)
    for norm in ("q_norm", "k_norm"):
        out[f"{p}.self_attn.{norm}.weight"] = mx.ones((d,), dtype)
    return out


def write_hf_checkpoint(path: str | Path, shape: MoEShape, *, seed: int = 0, dtype: str = "bfloat16", progress=None) -> Path:
    """Write config.json, model-NNNNN-of-MMMMM.safetensors (one per layer + one for embeddings) and the index."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mx_dtype = getattr(mx, dtype)
    layers = shape.num_hidden_layers
    keys = mx.random.split(mx.random.key(seed), layers + 1)
    count = layers + 1
    weight_map = {}
    for i in range(count):
        if i < layers:
            tensors = _layer_tensors(shape, i, keys[i], mx_dtype)
        else:
            k1, k2 = mx.random.split(keys[i])
            v, h = shape.vocab_size, shape.hidden_size
            tensors = {
                "model.embed_tokens.weight": (mx.random.normal((v, h), key=k1) * 0.02).astype(mx_dtype),
                "lm_head.weight": (mx.random.normal((v, h), key=k2) * h**-0.5).astype(mx_dtype),
                "model.norm.weight": mx.ones((h,), mx_dtype),
            }
        name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        mx.eval(tensors)
        mx.save_safetensors(str(path / name), tensors, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
        if progress is not None:
            progress(1)
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    (path / "config.json").write_text(json.dumps({**shape.config(), "torch_dtype": dtype}, indent=1) + "\n")
    return path
