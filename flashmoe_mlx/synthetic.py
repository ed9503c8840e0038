"""Synthetic random-weight MoE checkpoints in Hugging Face layout, written one layer at a time.

Owns the shape presets (the expert, router and attention dims of real models), the writer (a qwen3_moe config
plus one safetensors shard per decoder layer, per-expert tensors named as transformers saves them, and the
bundled tokenizer), and the router skew. Memory stays at one layer; the same seed gives the same bytes.

Routers: a random model's routing is uneven by itself: random attention averages over the whole prefix, so
every token sees nearly the same context vector, and random router rows turn it into long runs of the same
experts. With `router_skew` set, the writer balances the model instead: attention's share of the residual stream
is scaled down, and each router, calibrated on a few tokens passed through each layer as it is written, stops
reading the tokens' common mean and gives every expert the same logit spread. Measured on the bundled text,
routing is then near uniform (tests/test_bench.py checks it).
Router skew (Zipf, parameter s) then adds popularity on purpose: one hidden channel holds the same value for
every token (set through the embeddings; no sublayer reads or writes it, so it reaches every router unchanged,
like the "massive activations" of real LLMs). Router row e reads that channel with weight -s*ln(rank_e), for a
random popularity rank per layer, scaled per layer so that s counts in units of the token-dependent router
logits' spread at that depth.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from .default import BUNDLED

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
CALIBRATION_TOKENS = 64
# Random attention averages over the whole prefix, so its output is nearly the same for every later token, and
# routing follows that running average: long runs of the same experts whichever the tokens. Trained attention is
# sharper. Balanced models keep it small in the residual stream, so routing follows each token's own state.
ATTENTION_SCALE = 0.1
EMBEDDING_SCALE = 0.02


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


# Expert dims (hidden, moe_intermediate, experts, top-k), layer count and attention heads as each model's own
# config.json publishes them. Everything is written as qwen3_moe: attention is GQA with q/k norms (DeepSeek-V3's
# MLA becomes 128 heads of 128 dims, Qwen3.5's linear-attention layers become full attention), no shared
# experts, and the vocabulary is the bundled tokenizer's.
PRESETS = {  # hidden, moe_intermediate, experts, top-k, layers, attention heads, KV heads, head_dim
    "qwen3.5-397b": (4096, 1024, 512, 10, 60, 32, 2, 256),
    "qwen3-235b": (4096, 1536, 128, 8, 94, 64, 4, 128),
    "qwen3-30b": (2048, 768, 128, 8, 48, 32, 4, 128),
    "deepseek-v3": (7168, 2048, 256, 8, 61, 128, 128, 128),
    "mixtral-8x7b": (4096, 14336, 8, 2, 32, 32, 8, 128),
    "tiny": (128, 64, 16, 4, 3, 4, 2, 32),
}


def bundled_vocab_size() -> int:
    doc = json.loads((BUNDLED / "tokenizer.json").read_text())
    ids = [*doc["model"]["vocab"].values(), *(t["id"] for t in doc.get("added_tokens", []))]
    return max(ids) + 1


def preset(name: str, layers: int | None = None) -> MoEShape:
    """The named shape with the bundled tokenizer's vocabulary, optionally cut to `layers` decoder layers."""
    if name not in PRESETS:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(PRESETS)}")
    if layers is not None and layers < 1:
        raise ValueError(f"--layers must be at least 1, not {layers}")
    shape = MoEShape(*PRESETS[name], vocab_size=bundled_vocab_size())
    return replace(shape, num_hidden_layers=layers) if layers else shape


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


class RouterSkew:
    """Balanced routers plus Zipf popularity, made real in the weights (see the module docstring): `embed` gets
    the shared channel, `apply` edits each layer in turn; `hidden` is the calibration batch after it."""

    def __init__(self, shape: MoEShape, s: float, seed: int, embed: mx.array):
        rng = np.random.default_rng([seed, 7])
        self.shape, self.s = shape, s
        self.channel = int(rng.integers(shape.hidden_size))
        self.ranks = [rng.permutation(shape.num_experts) + 1 for _ in range(shape.num_hidden_layers)]
        # The shared channel: as large as the rest of an embedding row together.
        value = EMBEDDING_SCALE * shape.hidden_size**0.5
        self.embed = embed.at[:, self.channel].add(value - embed[:, self.channel])
        tokens = rng.integers(shape.vocab_size, size=CALIBRATION_TOKENS)
        self.hidden = self.embed[mx.array(tokens)][None].astype(mx.float32)
        from mlx_lm.models.qwen3_moe import Attention, ModelArgs

        self.attention = Attention(ModelArgs.from_dict(shape.config()), 0)

    def apply(self, tensors: dict[str, mx.array], layer: int) -> dict[str, mx.array]:
        """Keep the channel out of every sublayer, calibrate this layer's router on it, advance `hidden`."""
        p, j = f"model.layers.{layer}", self.channel
        out = {}
        for name, w in tensors.items():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
                w = w.at[:, j].multiply(0)  # reads nothing from the channel
            elif name.endswith("o_proj.weight"):
                w = w.at[j].multiply(0) * ATTENTION_SCALE  # writes nothing to it; see ATTENTION_SCALE
            elif name.endswith("down_proj.weight"):
                w = w.at[j].multiply(0)
            out[name] = w
        f32 = {k: v.astype(mx.float32) for k, v in out.items() if "experts" not in k}
        self.attention.load_weights([(k[len(p) + 11 :], v) for k, v in f32.items() if ".self_attn." in k])
        x = self.hidden
        x = x + self.attention(mx.fast.rms_norm(x, None, 1e-6), mask="causal")
        normed = mx.fast.rms_norm(x, None, 1e-6)[0]
        # Random layers pull every token towards a common vector (attention averages), and a random router
        # reads that as a fixed per-expert preference: few experts take most tokens. Routers here do not read
        # the calibration batch's mean, so popularity is the Zipf term's alone.
        mean = normed.mean(0).at[j].multiply(0)
        mean = mean / mx.linalg.norm(mean)
        router = f32[f"{p}.mlp.gate.weight"].at[:, j].multiply(0)
        router = router - (router @ mean)[:, None] * mean[None]
        # Top-k also favours experts whose logits vary more over tokens: give every expert the same spread.
        router = router / (normed @ router.T).std(axis=0)[:, None]
        bias = -self.s * np.log(self.ranks[layer])  # s = 0: balanced routers, no skew
        column = mx.array((bias - bias.mean()) / normed[:, j].mean().item(), mx.float32)
        router = router.at[:, j].add(column)
        out[f"{p}.mlp.gate.weight"] = router.astype(tensors[f"{p}.mlp.gate.weight"].dtype)
        self.hidden = x + self._experts(out, p, normed, out[f"{p}.mlp.gate.weight"].astype(mx.float32))[None]
        mx.eval(self.hidden)
        return out

    def _experts(self, tensors: dict, p: str, x: mx.array, router: mx.array) -> mx.array:
        gates = mx.softmax(x @ router.T, axis=-1)
        k = self.shape.num_experts_per_tok
        ids = np.array(mx.argpartition(gates, kth=-k, axis=-1)[:, -k:])
        weights = mx.take_along_axis(gates, mx.array(ids), axis=-1)
        weights = np.array(weights / weights.sum(-1, keepdims=True))
        y = mx.zeros_like(x)
        for e in np.unique(ids):
            rows, slot = np.nonzero(ids == e)
            w = {n: tensors[f"{p}.mlp.experts.{e}.{n}.weight"].astype(mx.float32) for n in ("gate_proj", "up_proj", "down_proj")}
            xe = x[mx.array(rows)]
            g, u = xe @ w["gate_proj"].T, xe @ w["up_proj"].T
            ye = ((g * mx.sigmoid(g) * u) @ w["down_proj"].T) * mx.array(weights[rows, slot])[:, None]
            y = y.at[mx.array(rows)].add(ye)
        return y


def _embedding_tensors(shape: MoEShape, key, dtype) -> dict[str, mx.array]:
    k1, k2 = mx.random.split(key)
    v, h = shape.vocab_size, shape.hidden_size
    return {
        "model.embed_tokens.weight": (mx.random.normal((v, h), key=k1) * EMBEDDING_SCALE).astype(dtype),
        "lm_head.weight": (mx.random.normal((v, h), key=k2) * h**-0.5).astype(dtype),
        "model.norm.weight": mx.ones((h,), dtype),
    }


def write_hf_checkpoint(path: str | Path, shape: MoEShape, *, seed: int = 0, dtype: str = "bfloat16", progress=None,
                        router_skew: float | None = None, tokenizer: bool = False) -> Path:
    """Write config.json, model-NNNNN-of-MMMMM.safetensors (one per layer + one for embeddings) and the index;
    with `tokenizer`, also the bundled tokenizer (whose vocabulary `shape.vocab_size` must match).
    `router_skew` None leaves routers as random as every other weight (a random model's routing is already
    uneven); a number balances them, then applies that Zipf skew."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mx_dtype = getattr(mx, dtype)
    layers = shape.num_hidden_layers
    keys = mx.random.split(mx.random.key(seed), layers + 1)
    count = layers + 1
    embedding = _embedding_tensors(shape, keys[layers], mx_dtype)
    skew = None
    if router_skew is not None:
        skew = RouterSkew(shape, router_skew, seed, embedding["model.embed_tokens.weight"])
        embedding["model.embed_tokens.weight"] = skew.embed
    weight_map = {}
    for i in range(count):
        if i < layers:
            tensors = _layer_tensors(shape, i, keys[i], mx_dtype)
            if skew is not None:
                tensors = skew.apply(tensors, i)
        else:
            tensors = embedding
        name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        mx.eval(tensors)
        mx.save_safetensors(str(path / name), tensors, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
        if progress is not None:
            progress(1)
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    config = {**shape.config(), "torch_dtype": dtype}
    if tokenizer:
        if shape.vocab_size != bundled_vocab_size():
            raise ValueError(f"vocab_size {shape.vocab_size} is not the bundled tokenizer's {bundled_vocab_size()}")
        for name in TOKENIZER_FILES:
            shutil.copyfile(BUNDLED / name, path / name)
        bundled = json.loads((BUNDLED / "config.json").read_text())
        config.update({k: bundled[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    (path / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return path
