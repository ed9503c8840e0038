"""The bundled default model (flashmoe_mlx/default_model, trained by examples/train_tiny_moe.py): its files
fit the size limits, its config is what mlx-lm's qwen3_moe and our converter need, it loads with stock
mlx-lm, and its logits agree with transformers' float32 forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

DM = Path(__file__).resolve().parent.parent / "flashmoe_mlx" / "default_model"
MB = 1000 * 1000
TEXT = "The Python documentation describes the standard library: a list is a mutable sequence."

pytestmark = pytest.mark.skipif(not (DM / "config.json").is_file(), reason="default model not bundled")


def test_sizes_and_files():
    shards = sorted(DM.glob("model*.safetensors"))
    assert shards, "no safetensors shards"
    for s in shards:
        assert s.stat().st_size <= 16 * MB, f"{s.name} is {s.stat().st_size} bytes (> 16 MB)"
    total = sum(f.stat().st_size for f in DM.rglob("*") if f.is_file())
    assert total <= 25 * MB, f"default_model is {total} bytes (> 25 MB)"
    if len(shards) > 1:
        index = json.loads((DM / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "SOURCE.md"):
        assert (DM / name).is_file(), name


def test_config_fields():
    cfg = json.loads((DM / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe"
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    from mlx_lm.models.qwen3_moe import ModelArgs

    args = ModelArgs.from_dict(cfg)  # raises on a missing required field
    assert args.num_experts == cfg["num_experts"] > args.num_experts_per_tok >= 1
    assert args.rope_theta == cfg["rope_parameters"]["rope_theta"]
    # every Linear input dimension quantizes with group size 64
    for dim in (args.hidden_size, args.num_attention_heads * args.head_dim, args.moe_intermediate_size):
        assert dim % 64 == 0, dim


@pytest.fixture(scope="module")
def mlx_model():
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(DM))
    model.set_dtype(mx.float32)  # MLX's CPU gather_mm only runs float32
    return model, tok


def test_tokenizer_and_chat_template(mlx_model):
    _, tok = mlx_model
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.eos_token == "<|endoftext|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_logits_match_transformers(mlx_model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import mlx.core as mx

    model, tok = mlx_model
    ids = tok.encode(TEXT)
    ours = np.array(model(mx.array([ids])).astype(mx.float32))

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(DM), dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.float().numpy()
    assert ours.shape == ref.shape == (1, len(ids), hf.config.vocab_size)
    assert np.abs(ours - ref).max() <= 1e-3
    # and it is a trained model: the text is far more likely than uniform (ln 4096 = 8.3 nats/token)
    logp = ref[0, :-1] - np.log(np.exp(ref[0, :-1] - ref[0, :-1].max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - ref[0, :-1].max(-1, keepdims=True)
    nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    assert nll < 5.0, nll
