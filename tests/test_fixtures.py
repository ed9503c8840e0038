"""Proof that tests/fixtures.py builds faithful checkpoints: stock mlx-lm loads every family's HF fixture and
reproduces transformers' float32 logits, transformers reloads it, builds are deterministic, bf16 works, and the
stock mlx-lm quantized conversion loads."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm import load
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from fixtures import EOS, FAMILIES, SPECIAL_TOKENS, VOCAB_SIZE, build_hf_model, make_hf_checkpoint, make_mlx_checkpoint

TOKENS = np.random.default_rng(0).integers(len(SPECIAL_TOKENS), VOCAB_SIZE, size=12)
ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)[None]).logits[0].float().numpy()


def _mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array(TOKENS)[None])[0].astype(mx.float32))


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_lm_matches_transformers(family, tmp_path):
    path = make_hf_checkpoint(family, tmp_path / family)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert sorted(index["weight_map"]) == sorted(_tensors(path))

    expected = _torch_logits(build_hf_model(family))
    assert expected.std() > 0.1, "degenerate reference logits"
    model, _ = load(str(path))
    diff = float(np.abs(_mlx_logits(model) - expected).max())
    print(f"{family}: max |mlx-lm - transformers| = {diff:.3g}")
    assert diff <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_experts_matter(family):
    model = build_hf_model(family)
    expected = _torch_logits(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.zero_()
    assert np.abs(_torch_logits(model) - expected).max() > 1e-2


# gpt_oss is written in the original release's expert layout (see fixtures._gpt_oss_original_weights), which
# transformers only reads in its MXFP4-quantized form.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt_oss"])
def test_transformers_reloads(family, tmp_path):
    path = make_hf_checkpoint(family, tmp_path / family)
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    np.testing.assert_array_equal(_torch_logits(reloaded), _torch_logits(build_hf_model(family)))


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic(family, tmp_path):
    first = make_hf_checkpoint(family, tmp_path / "a")
    second = make_hf_checkpoint(family, tmp_path / "b")
    other_seed = make_hf_checkpoint(family, tmp_path / "c", seed=1)
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir()) == sorted(p.name for p in other_seed.iterdir())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    shards = [name for name in files if name.endswith(".safetensors")]
    assert all((first / name).read_bytes() != (other_seed / name).read_bytes() for name in shards)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16(family, tmp_path):
    path = make_hf_checkpoint(family, tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((path / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    reference = _tensors(make_hf_checkpoint(family, tmp_path / "f32"))
    tensors = _tensors(path)
    assert tensors.keys() == reference.keys()
    for key, tensor in tensors.items():
        assert tensor.dtype == torch.bfloat16, key
        assert torch.equal(tensor, reference[key].to(torch.bfloat16)), key
    model, _ = load(str(path))
    model.set_dtype(mx.float32)  # mlx's CPU gather_mm (SwitchGLU) is float32-only
    reference_model = build_hf_model(family)
    with torch.no_grad():  # round the saved tensors only (not e.g. RoPE's inv_freq buffer)
        for tensor in reference_model.state_dict().values():
            tensor.copy_(tensor.to(torch.bfloat16))
    expected = _torch_logits(reference_model)
    # mlx-lm's sanitize turns zero-centred norm weights w into 1 + w, which rounds when done in bfloat16.
    atol = 1e-2 if family in ("qwen3_next", "qwen3_5_moe") else ATOL
    assert np.abs(_mlx_logits(model) - expected).max() <= atol


def test_tokenizer(tmp_path):
    path = make_hf_checkpoint("qwen3_moe", tmp_path / "ckpt")
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == VOCAB_SIZE
    text = "Hello, how are you today? The experts stay on a fast disk."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    config = json.loads((path / "config.json").read_text())
    assert tokenizer.eos_token == EOS and tokenizer.eos_token_id == config["eos_token_id"]
    assert tokenizer.bos_token_id == config["bos_token_id"] and tokenizer.pad_token_id == config["pad_token_id"]

    _, wrapper = load(str(path))
    messages = [{"role": "user", "content": "Hello"}]
    prompt = wrapper.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<s><|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert wrapper.apply_chat_template(messages, add_generation_prompt=True) == tokenizer.encode(prompt)
    assert wrapper.eos_token_ids == {tokenizer.eos_token_id}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, 128), (4, 32)])
def test_mlx_checkpoint(family, bits, group_size, tmp_path):
    path = make_mlx_checkpoint(family, tmp_path / "mlx", bits=bits, group_size=group_size)
    assert [p.name for p in tmp_path.iterdir()] == ["mlx"], "scratch HF checkpoint left behind"
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == group_size
    model, _ = load(str(path))
    quantized = [name for name, module in model.named_modules() if "scales" in module]
    assert any("switch_mlp" in name or "experts" in name for name in quantized), "experts not quantized"
    assert any("self_attn" in name for name in quantized), "attention not quantized"
    logits = _mlx_logits(model)
    assert np.isfinite(logits).all()
    if bits == 8:  # 8-bit keeps the random model close to its float32 reference
        expected = _torch_logits(build_hf_model(family))
        assert np.corrcoef(logits.ravel(), expected.ravel())[0, 1] > 0.9


def test_mlx_checkpoint_bfloat16(tmp_path):
    path = make_mlx_checkpoint("qwen3_moe", tmp_path / "mlx", dtype="bfloat16")
    model, _ = load(str(path))
    assert model.model.norm.weight.dtype == mx.bfloat16
    assert model.model.layers[0].mlp.switch_mlp.gate_proj.scales.dtype == mx.bfloat16
