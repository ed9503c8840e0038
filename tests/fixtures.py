"""Tiny random-weight MoE checkpoints for tests, built offline.

This module owns the test fixtures that stand in for real Hugging Face MoE checkpoints:

* ``make_tokenizer(path)``: a tiny byte-level BPE tokenizer (trained on inline text) with a chat template.
* ``make_hf_checkpoint(family, path)``: a sharded HF checkpoint (config.json, generation_config.json,
  model-0000k-of-0000n.safetensors + index, tokenizer files) whose weights come from transformers' own
  random init under a fixed seed. The on-disk layout is the one real checkpoints of the family use, and
  config.json carries the pre-transformers-5 keys (``rope_theta``, ``rope_scaling``, ...) that stock mlx-lm reads.
* ``make_mlx_checkpoint(family, path)``: the same model converted and quantized by stock ``mlx_lm.convert``.
* ``build_hf_model(family)``: the float32 transformers model the HF checkpoint is written from (the reference).

Every Linear / Embedding input dimension is a multiple of 128 so any quantization group size (32/64/128)
applies. Builds are deterministic: same family, seed and dtype give byte-identical files.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

FAMILIES: tuple[str, ...] = (
    "qwen3_moe",
    "qwen3_5_moe",
    "qwen3_next",
    "deepseek_v3",
    "mixtral",
    "gpt_oss",
    "glm4_moe",
    "olmoe",
)

VOCAB_SIZE = 512
PAD, BOS, IM_START, EOS = "<pad>", "<s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, IM_START, EOS)  # token ids 0..3
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts is a neural network in which a small
router sends every token to a few expert networks out of many. Only the chosen experts run, so a model
with hundreds of billions of parameters can answer a question while reading only a small part of its
weights for each word. When the weights do not fit in memory, the experts can stay on a fast disk and be
read when the router asks for them, while the attention layers, the embeddings and the router itself stay
in memory all the time. Reading from disk is slower than reading from memory, so a good cache keeps the
experts that were used recently, and a good scheduler starts reading the next layer's experts before the
current layer has finished. People often ask how fast such a system can be. The answer depends on the
disk, on the size of each expert, on how many experts each token needs, and on how often the same experts
are chosen again for the next token. Short prompts and long conversations behave differently: during the
prompt many tokens are processed together and most experts are touched, while during generation a single
token moves through the model at a time. Hello, how are you today? I am fine, thank you. What is the
weather like? It is sunny and warm, with a light wind from the west. Please write a short poem about the
sea. The sea is wide and blue, the waves are white and new, the ships go sailing through. Numbers help as
well: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, one hundred, one thousand.
Tests need text that is small but covers common words, punctuation, digits such as 0 1 2 3 4 5 6 7 8 9,
and questions and answers, so that a byte pair tokenizer learns a few hundred useful merges from it.
"""


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def make_tokenizer(path: Path) -> Path:
    """Write tokenizer.json + tokenizer_config.json (byte-level BPE, <= VOCAB_SIZE tokens) into ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(path / "tokenizer_config.json", tokenizer_config)
    return path


# ---------------------------------------------------------------------------------------------------------
# Model table


@dataclass(frozen=True)
class _Family:
    config_class: str  # transformers config class
    model_class: str  # transformers causal-LM class the reference model is built with
    config: dict  # config kwargs on top of _COMMON
    fix_config: Callable[[dict], dict] | None = None  # config.json post-processing beyond _legacy_config_keys
    fix_weights: Callable[[dict], dict] | None = None  # transformers' saved layout -> real checkpoint layout
    # True: save the layout transformers reverts to on save (per-expert tensors for most families);
    # False: save transformers' in-memory layout (fused 3D expert tensors).
    original_format: bool = True


_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    pad_token_id=SPECIAL_TOKENS.index(PAD),
    bos_token_id=SPECIAL_TOKENS.index(BOS),
    eos_token_id=SPECIAL_TOKENS.index(EOS),
)


def _full_attention_interval(config: dict) -> dict:
    """Hybrid linear/full attention: transformers writes layer_types, mlx-lm reads full_attention_interval."""
    layer_types = config["layer_types"]
    interval = layer_types.index("full_attention") + 1
    expected = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(len(layer_types))]
    assert layer_types == expected, f"layer_types not periodic: {layer_types}"
    config["full_attention_interval"] = interval
    return config


def _qwen3_5_multimodal_config(config: dict) -> dict:
    """Nest the text config the way the real (multimodal) Qwen3.5-MoE checkpoints do; no vision tower."""
    text_config = _full_attention_interval(config)
    top = {
        key: text_config.pop(key)
        for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "tie_word_embeddings")
    }
    top["architectures"] = ["Qwen3_5MoeForConditionalGeneration"]
    text_config["dtype"] = top["dtype"]
    return {**top, "model_type": "qwen3_5_moe", "text_config": text_config}


def _qwen3_5_multimodal_weights(weights: dict) -> dict:
    """Text weights live under model.language_model.* in the multimodal checkpoint (lm_head stays on top)."""
    return {
        (key.replace("model.", "model.language_model.", 1) if key.startswith("model.") else key): value
        for key, value in weights.items()
    }


def _gpt_oss_original_weights(weights: dict) -> dict:
    """transformers keeps experts as x @ W ([E, in, out]); the original release stores [E, out, in] tensors
    (gate/up rows interleaved) named ``*.gate_up_proj`` / ``*.down_proj`` with ``*_bias`` siblings. This is that
    layout with the MXFP4 ``_blocks``/``_scales`` pair replaced by an unquantized ``.weight`` (what mlx-lm's
    gpt_oss sanitize de-interleaves)."""
    out = {}
    for key, value in weights.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[key + ".weight"] = value.transpose(1, 2).contiguous()
        else:
            out[key] = value
    return out


_FAMILIES: dict[str, _Family] = {
    "qwen3_moe": _Family(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=256,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        ),
    ),
    "qwen3_5_moe": _Family(
        "Qwen3_5MoeTextConfig",
        "Qwen3_5MoeForCausalLM",
        dict(
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=32,
            linear_value_head_dim=32,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=128,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10_000_000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
        ),
        fix_config=_qwen3_5_multimodal_config,
        fix_weights=_qwen3_5_multimodal_weights,
        original_format=False,  # real Qwen3.5 checkpoints store fused experts: gate_up_proj [E, 2I, H]
    ),
    "qwen3_next": _Family(
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            intermediate_size=256,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=32,
            linear_value_head_dim=32,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=128,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
        ),
        fix_config=_full_attention_interval,
    ),
    "deepseek_v3": _Family(
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=2,
            num_key_value_heads=2,  # MLA: mlx-lm wants kv heads == heads
            q_lora_rank=128,
            kv_lora_rank=128,
            qk_nope_head_dim=128,
            qk_rope_head_dim=32,
            v_head_dim=64,
            intermediate_size=256,
            moe_intermediate_size=128,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        ),
    ),
    "mixtral": _Family(
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            intermediate_size=128,
            num_local_experts=8,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        ),
    ),
    "gpt_oss": _Family(
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            intermediate_size=128,
            num_local_experts=8,
            num_experts_per_tok=4,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150_000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 4096,
            },
        ),
        fix_weights=_gpt_oss_original_weights,
    ),
    "glm4_moe": _Family(
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            num_hidden_layers=3,
            first_k_dense_replace=1,
            intermediate_size=256,
            moe_intermediate_size=128,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            routed_scaling_factor=2.5,
            use_qk_norm=True,
            attention_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.5},
        ),
    ),
    "olmoe": _Family(
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(
            num_key_value_heads=4,
            intermediate_size=128,
            num_experts=8,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        ),
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Builders


def build_hf_model(family: str, *, seed: int = 0) -> torch.nn.Module:
    """The float32 transformers model (eval mode) that ``make_hf_checkpoint(family, seed=seed)`` writes."""
    import transformers

    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    spec = _FAMILIES[family]
    config = getattr(transformers, spec.config_class)(**{**_COMMON, **spec.config})
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config).to(torch.float32).eval()
    _perturb_constant_tensors(model, seed)
    return model


def _perturb_constant_tensors(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises norms to 1 (or 0), biases and router score-correction biases to 0: give every
    such constant tensor some noise so a loader that drops or mis-maps it changes the logits."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _name, tensor in sorted(model.state_dict().items()):
            flat = tensor.reshape(-1)
            if tensor.is_floating_point() and flat.numel() > 1 and bool((flat == flat[0]).all()):
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))


def make_hf_checkpoint(family: str, path: Path, *, seed: int = 0, dtype: str = "float32") -> Path:
    """Write a tiny sharded HF checkpoint of ``family`` into ``path`` (created) and return ``path``."""
    from safetensors.torch import load_file

    model = build_hf_model(family, seed=seed).to(getattr(torch, dtype))
    spec = _FAMILIES[family]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch, save_original_format=spec.original_format)
        weights = load_file(Path(scratch) / "model.safetensors")
        config = json.loads((Path(scratch) / "config.json").read_text())
        generation_config = json.loads((Path(scratch) / "generation_config.json").read_text())

    config = _legacy_config_keys(config)
    config["torch_dtype"] = config["dtype"] = dtype
    if spec.fix_config:
        config = spec.fix_config(config)
    if spec.fix_weights:
        weights = spec.fix_weights(weights)

    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", generation_config)
    _write_shards(weights, path)
    make_tokenizer(path)
    return path


def make_mlx_checkpoint(
    family: str, path: Path, *, bits: int = 4, group_size: int = 64, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Quantize the HF fixture with stock ``mlx_lm.convert`` (an mlx-community style checkpoint) into ``path``
    (which must not exist yet). ``dtype`` is the HF fixture's dtype, which convert keeps for the unquantized
    tensors; note mlx's CPU backend runs the MoE experts (gather_mm) in float32 only."""
    from mlx_lm.convert import convert

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}-hf-") as scratch:
        hf_path = make_hf_checkpoint(family, Path(scratch), seed=seed, dtype=dtype)
        convert(str(hf_path), str(path), quantize=True, q_bits=bits, q_group_size=group_size)
    return path


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _legacy_config_keys(config: dict) -> dict:
    """transformers 5 folds rope settings into ``rope_parameters`` and renames ``num_experts`` to
    ``num_local_experts``; real checkpoints (and mlx-lm) have ``rope_theta``, ``partial_rotary_factor`` and
    ``rope_scaling`` (null for plain RoPE) at top level, and ``num_experts``. Add them next to the new keys."""
    if "num_local_experts" in config:
        config.setdefault("num_experts", config["num_local_experts"])
    rope = dict(config.get("rope_parameters") or {})
    config["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        config["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    return config


def _write_shards(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``weights`` as >= 2 safetensors shards plus ``model.safetensors.index.json``."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    weights = {key: weights[key].contiguous() for key in sorted(weights)}
    total_size = sum(t.numel() * t.element_size() for t in weights.values())
    split = split_torch_state_dict_into_shards(weights, max_shard_size=total_size // 3 + 1)
    assert split.is_sharded, "fixture must exercise multi-shard loading"
    for filename, keys in split.filename_to_tensors.items():
        save_file({key: weights[key] for key in keys}, str(path / filename), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
    _write_json(path / "model.safetensors.index.json", index)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
