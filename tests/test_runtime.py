"""The streamed runtime against stock mlx-lm holding the same checkpoint resident (float32, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from fixtures import FAMILIES
from mlx_lm import generate as mlx_generate
from mlx_lm import load as mlx_load
from mlx_lm.models.cache import make_prompt_cache

from flashmoe_mlx import load
from flashmoe_mlx.convert import convert
from flashmoe_mlx.format import FormatError, read_manifest
from flashmoe_mlx.loader import LoadError, parse_size

PREFILL, DECODE = 32, 16


@pytest.fixture(scope="module")
def repacked(mlx_checkpoint, tmp_path_factory):
    built = {}

    def get(family: str) -> Path:
        if family not in built:
            out = tmp_path_factory.mktemp(f"repack-{family}") / "fm"
            built[family] = convert(out, mlx_path=str(mlx_checkpoint(family)), progress=False)
        return built[family]

    return get


def full_pool_bytes(path) -> tuple[int, int]:
    """(bytes of a pool holding every expert, bytes of the smallest legal pool)."""
    model, _, config = load(str(path), memory_budget="1TB", return_config=True)
    stats = model.expert_store.stats()
    text = config.get("text_config", config)
    per_slot = stats["pool_bytes"] // stats["slots_per_layer"]
    return stats["pool_bytes"], per_slot * text["num_experts_per_tok"]


def compare_logits(ref, streamed, vocab: int, seed: int) -> int:
    """Prefill then greedy decode; both models see the same tokens. Returns the worst max-abs diff."""
    tokens = mx.array(np.random.default_rng(seed).integers(0, vocab, (1, PREFILL)))
    ref_cache, cache = make_prompt_cache(ref), make_prompt_cache(streamed)
    worst = 0.0
    for step in range(DECODE + 1):
        a, b = ref(tokens, cache=ref_cache), streamed(tokens, cache=cache)
        assert a.shape == b.shape and b.dtype == mx.float32
        worst = max(worst, mx.abs(a - b).max().item())
        assert worst <= 1e-5, f"step {step}: logits differ by {worst}"
        tokens = mx.argmax(a[:, -1:], axis=-1)
        assert mx.array_equal(tokens, mx.argmax(b[:, -1:], axis=-1)).item()
    return worst


@pytest.mark.parametrize("kind", ["stock", "repack"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_equals_resident(family, kind, mlx_checkpoint, repacked):
    stock = mlx_checkpoint(family)
    path = stock if kind == "stock" else repacked(family)
    ref, ref_tok = mlx_load(str(stock))
    full, minimum = full_pool_bytes(path)
    vocab = ref_tok.vocab_size
    # Every expert resident; ~40% of them; and the smallest legal pool (top-k slots), which must evict.
    for seed, budget in enumerate((full, max(int(full * 0.4), minimum), minimum)):
        model, tokenizer = load(str(path), memory_budget=budget)
        compare_logits(ref, model, vocab, seed=seed)
        stats = model.expert_store.stats()
        assert stats["pool_bytes"] <= budget
        if budget < full:
            assert stats["slots_per_layer"] < read_manifest_experts(path)
            assert stats["misses"] > 0 and stats["bytes_read"] > 0
        if budget == minimum:
            assert stats["evictions"] > 0
            prompt = "The quick brown fox"
            assert mlx_generate(model, tokenizer, prompt, max_tokens=16) == mlx_generate(ref, ref_tok, prompt, max_tokens=16)


def read_manifest_experts(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config", config)
    return text.get("num_experts") or text.get("num_local_experts") or text.get("n_routed_experts")


def test_stats_reset_and_hits(mlx_checkpoint):
    model, _ = load(str(mlx_checkpoint("qwen3_moe")), memory_budget="1GB")
    tokens = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    mx.eval(model(tokens))
    first = model.expert_store.stats()
    assert first["misses"] > 0 and first["hits"] == 0 and first["read_seconds"] > 0
    model.expert_store.reset_stats()
    mx.eval(model(tokens))
    again = model.expert_store.stats()
    assert again["misses"] == 0 and again["hits"] == first["misses"] and again["bytes_read"] == 0
    for key in ("hits", "misses", "evictions", "bytes_read", "read_seconds", "pool_bytes", "slots_per_layer"):
        assert key in again


def test_budget_strings_and_too_small_budget(mlx_checkpoint):
    assert parse_size("8GB") == 8 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size(1234) == 1234
    with pytest.raises(LoadError, match="not a size"):
        parse_size("lots")
    path = mlx_checkpoint("qwen3_moe")
    full, minimum = full_pool_bytes(path)
    with pytest.raises(LoadError, match=f"minimum is {minimum} bytes"):
        load(str(path), memory_budget=minimum - 1)
    model, _ = load(str(path), memory_budget=minimum)
    assert model.expert_store.stats()["pool_bytes"] <= minimum


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_expert_files_are_named(repacked, tmp_path):
    src = repacked("mixtral")
    layer = read_manifest(src).layers[-1]

    missing = _broken_copy(src, tmp_path / "missing")
    (missing / "experts" / layer.file).unlink()
    with pytest.raises(FormatError, match=f"{layer.file}: expert file for layer {layer.layer} is missing"):
        load(str(missing))

    truncated = _broken_copy(src, tmp_path / "truncated")
    with open(truncated / "experts" / layer.file, "r+b") as f:
        f.truncate(layer.file_size - 100)
    with pytest.raises(FormatError, match=f"{layer.file}: truncated"):
        load(str(truncated))

    mismatch = _broken_copy(src, tmp_path / "mismatch")
    manifest = json.loads((mismatch / "experts" / "manifest.json").read_text())
    manifest["layers"] = manifest["layers"][:-1]
    (mismatch / "experts" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="does not match config.json"):
        load(str(mismatch))

    corrupt = _broken_copy(src, tmp_path / "corrupt")
    with open(corrupt / "experts" / layer.file, "r+b") as f:
        f.seek(layer.record_offset(3) + 10)
        f.write(b"\xff\xff\xff\xff")
    model, _ = load(str(corrupt), verify_reads=True)
    model.expert_store.fetch(layer.layer, np.array([2]))
    for _ in range(2):  # a failed read must not leave the expert counted as resident
        with pytest.raises(FormatError, match=f"{layer.file}: layer {layer.layer} expert 3: checksum mismatch"):
            model.expert_store.fetch(layer.layer, np.array([3]))
    assert model.expert_store.stats()["hits"] == 0


def test_truncated_stock_shard_is_named(mlx_checkpoint, tmp_path):
    src = _broken_copy(mlx_checkpoint("olmoe"), tmp_path / "stock")
    shard = max(src.glob("model*.safetensors"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 4096)
    with pytest.raises((FormatError, LoadError), match=shard.name):
        load(str(src))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(LoadError, match="no such directory"):
        load(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="config.json: missing"):
        load(str(tmp_path / "empty"))


def test_unevaluated_forward_passes_stay_exact(mlx_checkpoint):
    """Reads land in pool memory: a pass left unevaluated must not see the next pass's experts."""
    path = mlx_checkpoint("qwen3_moe")
    ref, _ = mlx_load(str(path))
    _, minimum = full_pool_bytes(path)
    model, _ = load(str(path), memory_budget=minimum)
    assert model.expert_store.direct  # the CPU backend's arrays are host memory: reads land in the slots
    rng = np.random.default_rng(5)
    batches = [mx.array(rng.integers(0, 500, (1, 24))) for _ in range(3)]
    streamed = [model(b) for b in batches]  # no evaluation in between
    mx.eval(streamed)
    for b, out in zip(batches, streamed):
        assert mx.abs(ref(b) - out).max().item() <= 1e-5
    assert model.expert_store.stats()["evictions"] > 0


@pytest.mark.parametrize("verify_reads", [False, True])
def test_bf16_checkpoint_streams_in_float32_on_cpu(verify_reads, tmp_path):
    """bf16 scales are converted into a float32 pool through staging; --verify-reads stages everything."""
    from fixtures import make_mlx_checkpoint
    from mlx.utils import tree_flatten

    path = make_mlx_checkpoint("mixtral", tmp_path / "bf16", bits=4, group_size=64, dtype="bfloat16")
    ref, tokenizer = mlx_load(str(path))
    assert any(v.dtype == mx.bfloat16 for _, v in tree_flatten(ref.parameters()))
    ref.set_dtype(mx.float32)
    repacked = convert(tmp_path / "fm", mlx_path=str(path), progress=False)
    for source in (path, repacked):
        _, minimum = full_pool_bytes(source)
        model, _ = load(str(source), memory_budget=minimum, verify_reads=verify_reads)
        assert model.expert_store.direct is False
        compare_logits(ref, model, tokenizer.vocab_size, seed=2)


def test_spec_legal_gaps_between_record_tensors(mlx_checkpoint, repacked, tmp_path):
    """FORMAT.md allows any 64-aligned, non-overlapping offsets: a writer that leaves wide gaps still loads."""
    from flashmoe_mlx.format import LayerEntry, Manifest, TensorEntry, checksum, pack_record, unpack_record

    src = repacked("qwen3_moe")
    gapped = _broken_copy(src, tmp_path / "gapped")
    entries = []
    for entry in read_manifest(src).layers:
        offset, tensors = 256, []  # the first tensor starts late, and 192 bytes separate the others
        for t in entry.tensors:
            tensors.append(TensorEntry(t.name, t.dtype, t.shape, offset, t.nbytes, t.bits, t.group_size, t.mode))
            offset += -(-(t.nbytes + 192) // 64) * 64
        new = LayerEntry(entry.layer, entry.module, entry.file, entry.num_experts,
                         -(-offset // 16384) * 16384, 16384, tensors)
        data = (src / "experts" / entry.file).read_bytes()
        records = []
        for e in range(entry.num_experts):
            start = entry.record_offset(e)
            records.append(pack_record(new, unpack_record(entry, data[start : start + entry.record_size])).tobytes())
            new.checksums.append(checksum(records[-1]))
        (gapped / "experts" / entry.file).write_bytes(new.header_bytes() + b"".join(records))
        entries.append(new)
    (gapped / "experts" / "manifest.json").write_text(Manifest(entries).to_json())
    ref, tokenizer = mlx_load(str(mlx_checkpoint("qwen3_moe")))
    _, minimum = full_pool_bytes(gapped)
    model, _ = load(str(gapped), memory_budget=minimum)
    compare_logits(ref, model, tokenizer.vocab_size, seed=9)


def test_projection_precision_follows_mlx_lm_rules():
    """Our reading of a stored projection's precision agrees with mlx-lm's own infer_quant_config."""
    import mlx.nn as nn
    from mlx_lm.utils import infer_quant_config

    from flashmoe_mlx.layout import projection_quant

    for bits, group_size, mode in [(4, 32, "affine"), (3, 64, "affine"), (8, 128, "affine"), (4, 32, "mxfp4"),
                                   (8, 32, "mxfp8"), (4, 16, "nvfp4")]:
        w = mx.random.normal((16, 256))
        q, scales, *_ = mx.quantize(w, group_size, bits, mode=mode)
        oracle = infer_quant_config("p", nn.Linear(256, 16), {"p.weight": q, "p.scales": scales})
        # A top-level default that differs from the stored group size must not mislead either reader.
        ours = projection_quant({"group_size": 64, "bits": 4}, "p", 256, q.shape, scales.shape,
                                str(scales.dtype).split(".")[-1])
        assert ours == oracle, (bits, group_size, mode)
        assert projection_quant({"p": {"group_size": 7, "bits": 5}}, "p", 256, q.shape, scales.shape, "x") == {
            "group_size": 7, "bits": 5, "mode": "affine"}
