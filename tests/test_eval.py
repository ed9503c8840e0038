"""`flashmoe_mlx.eval`: metrics against torch's own, identity when nothing changed, and the CLI."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import torch
from conftest import run_cli

from flashmoe_mlx import load
from flashmoe_mlx.convert import Precision, convert
from flashmoe_mlx.eval import Comparison, compare


def test_token_metrics_match_torch():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((1, 50, 64)).astype(np.float32) * 3, rng.standard_normal((1, 50, 64)).astype(np.float32)
    targets = rng.integers(0, 64, 50)
    c = Comparison()
    c.add_window(mx.array(a), mx.array(b), targets)
    ta, tb = torch.log_softmax(torch.tensor(a[0]), -1), torch.log_softmax(torch.tensor(b[0]), -1)
    kl = torch.nn.functional.kl_div(tb, ta, log_target=True, reduction="none").sum(-1)  # KL(a || b)
    assert np.allclose(c.kl, kl.numpy(), atol=1e-5)
    assert c.same_top1 == (ta.argmax(-1) == tb.argmax(-1)).tolist()
    nll = torch.nn.functional.cross_entropy(torch.tensor(b[0]), torch.tensor(targets), reduction="none")
    assert np.allclose(c.nll_model, nll.numpy(), atol=1e-5)


def test_routing_agreement_counts():
    c = Comparison()
    ref = {3: np.array([[1, 2, 3, 4], [5, 6, 7, 8]])}
    got = {3: np.array([[4, 3, 2, 1], [5, 6, 9, 10]])}  # same set in another order; half the set
    c.add_routing(ref, got)
    assert c.overlap[3] == [1.0, 0.5] and c.exact[3] == [True, False]


def test_streamed_against_resident_is_identical(mlx_checkpoint, tmp_path):
    path = mlx_checkpoint("qwen3_moe")
    resident, tokenizer = load(str(path), memory_budget="1GB")
    streamed, _ = load(str(path), memory_budget="130kB")  # two of eight experts per layer
    text = "The quick brown fox jumps over the lazy dog. " * 40
    s = compare(resident, streamed, tokenizer, text, context=64, progress=False)
    assert s["tokens"] > 200 and s["kl_mean"] < 1e-6 and s["same_top1"] == 1.0
    assert s["routing_overlap_mean"] == 1.0 and s["routing_exact_mean"] == 1.0
    assert abs(s["ppl_delta"]) < 1e-4
    assert streamed.expert_store.stats()["evictions"] > 0


def test_quantization_shows_up(hf_checkpoint, tmp_path):
    """2-bit experts against the float32 source: the metrics must see the damage, 8-bit must be close."""
    src = hf_checkpoint("olmoe")
    text = "def read(path):\n    with open(path) as f:\n        return f.read()\n" * 30
    from flashmoe_mlx.eval import load_reference

    results = {}
    for bits in (8, 2):
        out = convert(tmp_path / f"q{bits}", hf_path=str(src), progress=False,
                      precision=Precision.from_flags(bits=8, expert_bits=bits))
        reference, tokenizer = load_reference(str(src))
        model, _ = load(str(out))
        results[bits] = compare(reference, model, tokenizer, text, context=64, progress=False)
    assert results[8]["kl_mean"] < results[2]["kl_mean"]
    assert results[8]["routing_overlap_mean"] >= results[2]["routing_overlap_mean"]
    assert results[8]["same_top1"] > 0.9


def test_cli_on_the_bundled_model(tmp_path):
    import os

    from flashmoe_mlx.default import BUNDLED

    env = {**os.environ, "FLASHMOE_MLX_CACHE": str(tmp_path / "cache")}
    convert(tmp_path / "q", hf_path=str(BUNDLED), progress=False)
    result = run_cli("flashmoe_mlx.eval", "--model", tmp_path / "q", "--reference", BUNDLED, "--max-tokens", 512,
                     "--json", tmp_path / "out.json", "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["tokens"] == 512 and 0 < summary["kl_mean"] < 1 and "| KL mean |" in result.stdout
    bad = run_cli("flashmoe_mlx.eval", "--model", tmp_path / "q", "--reference", BUNDLED, "--text", tmp_path / "none")
    assert bad.returncode != 0 and "cannot read the text" in bad.stderr and "Traceback" not in bad.stderr


def test_long_documents_tokenize_without_the_context_warning(caplog):
    """A document longer than the model's context is cut into windows by us: encode_document gives the ids
    transformers gives, without its warning about indexing errors (which the plain call logs)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from flashmoe_mlx.default import BUNDLED as folder
    from flashmoe_mlx.eval import encode_document

    tokenizer = load_tokenizer(folder)
    text = (folder / "heldout.txt").read_text()[:100_000]
    ids = encode_document(tokenizer, text)
    assert "longer than" not in caplog.text
    assert ids == tokenizer.encode(text) and len(ids) > 2048  # the demo model's context
    assert "longer than" in caplog.text
