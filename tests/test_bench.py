"""`bench make-synthetic` and `bench run` on the tiny preset: loadable outputs, the converter's logits against
mlx-lm's on the same weights, router skew that skews, and run rows whose figures follow from what was asked."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_cli
from mlx_lm import load as mlx_load
from test_convert import load_resident, logits

from flashmoe_mlx import load
from flashmoe_mlx.bench import cgroup
from flashmoe_mlx.bench.__main__ import main
from flashmoe_mlx.bench.make_synthetic import make_synthetic
from flashmoe_mlx.bench.popularity import popularity
from flashmoe_mlx.eval import default_text, record_routing
from flashmoe_mlx.synthetic import preset, write_hf_checkpoint


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The tiny preset at 8 bits (where both converters quantize every module alike), with the mlx-lm copy."""
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    make_synthetic(out, "tiny", bits=8, mlx_lm=True, progress=False)
    return out


def test_make_synthetic_writes_loadable_checkpoints(synthetic):
    record = json.loads((synthetic / "synthetic.json").read_text())
    assert record["config"] == {**record["config"], "hidden_size": 128, "num_experts": 16, "vocab_size": 4096}
    model, tokenizer = load(str(synthetic / "flashmoe"), memory_budget="1GB")
    assert tokenizer.encode("hello world") and len(model.expert_store.pools) == 3
    hf_model, _ = mlx_load(str(synthetic / "hf"))  # the bf16 HF directory as other engines read it
    assert hf_model.args.vocab_size == 4096


def test_flashmoe_checkpoint_computes_mlx_lm_logits(synthetic):
    """Same weights, same bits: the converter's checkpoint computes what mlx_lm.convert's does."""
    ref, _ = mlx_load(str(synthetic / "mlx-lm"))
    a, b = logits(ref).astype(mx.float32), logits(load_resident(synthetic / "flashmoe")).astype(mx.float32)
    assert mx.abs(a - b).max().item() <= 1e-3 * mx.abs(a).max().item()


def _popularity(path: Path, shape) -> dict:
    model, tokenizer = mlx_load(str(path))
    model.set_dtype(mx.float32)
    routes = record_routing(model)
    mx.eval(model(mx.array([tokenizer.encode(default_text().read_text()[:4000])[:384]])))
    return popularity({layer: np.concatenate(ids) for layer, ids in routes.items()}, shape.num_experts)


def test_router_skew_skews_routing(tmp_path):
    shape = preset("tiny")
    balanced = _popularity(write_hf_checkpoint(tmp_path / "s0", shape, router_skew=0.0, tokenizer=True), shape)
    skewed = _popularity(write_hf_checkpoint(tmp_path / "s2", shape, router_skew=2.0, tokenizer=True), shape)
    assert balanced["effective_experts"] > 0.85  # near uniform: the writer balances the routers
    assert skewed["effective_experts"] < balanced["effective_experts"] - 0.2
    assert skewed["top_share"] > balanced["top_share"] + 0.15


def test_run_rows_follow_residency(synthetic, tmp_path):
    out = tmp_path / "run.json"
    code = main(["run", "--model", str(synthetic), "--engines", "flashmoe,mlx-lm", "--residency", "1,0.25",
                 "--cache", "warm", "--prompt-tokens", "32", "--decode-tokens", "8", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    rows = {(r["engine"], r["residency"]): r for r in doc["rows"]}
    full, quarter, resident = rows["flashmoe", 1.0], rows["flashmoe", 0.25], rows["mlx-lm", None]
    for r in (full, quarter, resident):
        assert r["decode_tps"] > 0 and r["prefill_tps"] > 0 and 0 < r["peak_rss"] < 8e9
        assert r["compute_bound_tps"] > 0 and 0 < r["achieved_vs_bound"]
    # The warm pass repeats the measured one: an all-resident pool misses nothing and reads nothing.
    assert full["hit_rate"] == 1.0 and full["decode_store"]["bytes_read"] == 0 and full["io_bound_tps"] is None
    assert quarter["slots_per_layer"] == 4 and quarter["decode_store"]["misses"] > 0
    assert quarter["hit_rate"] < 1.0 and quarter["gb_per_token_requested"] > 0 and quarter["io_bound_tps"] > 0
    assert quarter["pool_bytes"] * 4 == full["pool_bytes"]
    assert resident["hit_rate"] is None and resident["ms_per_token"] is None
    t = quarter["ms_per_token"]
    assert t["sync"] > 0 and t["fetch"] >= t["read"] > 0 and t["total"] > t["sync"] + t["fetch"]
    assert doc["machine"]["memory_gbps"] > 0 and doc["model"]["active_bytes_per_token"] > 0


def test_bounds_of_a_warm_row_that_still_read_from_disk():
    """Warm rows only, so the disk was not timed (disk_gbps None), and yet 1 GB per token came from it: those
    bytes count at the page cache's rate (an upper bound on tokens per second), not a crash."""
    from flashmoe_mlx.bench.run import Row, figures

    store = {"hits": 3, "misses": 1, "bytes_read": 4e9, "read_seconds": 2.0}
    result = {"prefill": {"seconds": 1.0, "store": {}}, "decode": {"seconds": 4.0, "disk_bytes": 2e9, "store": store},
              "peak_rss": 1e9, "load_seconds": 0.1}
    machine = {"disk_gbps": None, "cache_gbps": 4.0, "memory_gbps": 100.0}
    model = type("Model", (), {"active_bytes": 1e9})()
    got = figures(Row("flashmoe", None, 0.5, "warm"), result, model, machine, prompt=8, decode=2)
    assert got["gb_per_token_disk"] == 1.0 and got["io_bound_tps"] == pytest.approx(2.0)  # 2 GB per token at 4 GB/s
    assert got["achieved_vs_bound"] == pytest.approx(0.5 / 2.0)


@pytest.mark.parametrize("args, message", [
    (["make-synthetic", "--shape", "tiny", "--layers", "0", "--out", "OUT"], "--layers must be at least 1"),
    (["make-synthetic", "--shape", "tiny", "--bits", "5", "--out", "OUT"], "--expert-bits 5"),
    (["run", "--model", "OUT"], "missing; --model takes a directory written by `bench make-synthetic`"),
])
def test_bad_input_is_a_one_line_error(args, message, tmp_path):
    proc = run_cli("flashmoe_mlx.bench", *[str(tmp_path / "x") if a == "OUT" else a for a in args])
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_run_flags_are_checked(synthetic, capsys):
    for flags, message in ((["--residency", "1.5"], "--residency takes fractions"), (["--cache", "hot"], "--cache"),
                           (["--engines", "vllm"], "unknown engine 'vllm'"),
                           (["--engines", "llama.cpp"], "needs --llama-python")):
        assert main(["run", "--model", str(synthetic), *flags]) == 2
        assert message in capsys.readouterr().err


def test_memory_limit_without_cgroup_v1_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(cgroup, "ROOT", tmp_path)
    with pytest.raises(cgroup.CgroupError, match="no cgroup v1 memory controller"), cgroup.MemoryLimit(1 << 30):
        pass
