"""The converter against independent oracles: stock `mlx_lm.convert` logits, source tensors, the format spec."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_cli
from fixtures import FAMILIES
from mlx_lm import load as mlx_load
from mlx_lm.convert import convert as mlx_convert
from mlx_lm.utils import load_model

from flashmoe_mlx.architecture import module_at
from flashmoe_mlx.convert import Precision, convert
from flashmoe_mlx.convert.affine_search import pack_codes, quantize_searched
from flashmoe_mlx.convert.calibration import CalibrationText
from flashmoe_mlx.convert.gptq import quantize_gptq
from flashmoe_mlx.format import read_manifest, read_stacked_experts, verify_checkpoint


def load_resident(path: Path):
    """An mlx-lm model holding a flashmoe checkpoint fully in memory: dense shards + every expert record."""
    model, _ = load_model(Path(path), strict=False)
    for entry in read_manifest(path).layers:
        model.load_weights(list(read_stacked_experts(path, entry).items()), strict=False)
    return model


def logits(model, seed=0, length=32):
    vocab = model.args.vocab_size if hasattr(model.args, "vocab_size") else model.args.text_config["vocab_size"]
    tokens = mx.array(np.random.default_rng(seed).integers(0, vocab, (1, length)))
    out = model(tokens)
    mx.eval(out)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_convert_matches_mlx_lm_convert(family, hf_checkpoint, tmp_path):
    """Same bits and group everywhere: our checkpoint computes mlx_lm.convert's logits."""
    src = hf_checkpoint(family)
    ours = convert(tmp_path / "fm", hf_path=str(src), precision=Precision.from_flags(bits=8, expert_bits=8), progress=False)
    mlx_convert(str(src), str(tmp_path / "ref"), quantize=True, q_bits=8, q_group_size=64)
    ref, _ = mlx_load(str(tmp_path / "ref"))
    a, b = logits(ref), logits(load_resident(ours))
    assert a.dtype == b.dtype == mx.float32
    assert mx.abs(a - b).max().item() <= 1e-4
    verify_checkpoint(ours)


def test_group_size_32_keeps_model_router_floor(hf_checkpoint, tmp_path):
    src = hf_checkpoint("qwen3_moe")
    ours = convert(tmp_path / "fm", hf_path=str(src),
                   precision=Precision.from_flags(bits=8, expert_bits=8, group_size=32), progress=False)
    mlx_convert(str(src), str(tmp_path / "ref"), quantize=True, q_bits=8, q_group_size=32)
    ref, _ = mlx_load(str(tmp_path / "ref"))
    assert mx.abs(logits(ref) - logits(load_resident(ours))).max().item() <= 1e-4
    quant = json.loads((ours / "config.json").read_text())["quantization"]
    # mlx-lm's own qwen3_moe predicate puts routers at 8 bits, group 64: a floor we keep.
    assert quant["model.layers.0.mlp.gate"] == {"bits": 8, "group_size": 64, "mode": "affine"}
    assert quant["model.layers.0.self_attn.q_proj"]["group_size"] == 32


def test_mixed_precision_recipe_recorded_and_loaded(hf_checkpoint, tmp_path):
    src = hf_checkpoint("qwen3_next")
    ours = convert(tmp_path / "fm", hf_path=str(src), precision=Precision.from_flags(recipe="3bit", router_bits=16),
                   progress=False)
    config = json.loads((ours / "config.json").read_text())
    quant = config["quantization"]
    layer = next(e for e in read_manifest(ours).layers)
    bits = {t.name.split(".")[0]: t.bits for t in layer.tensors}
    assert bits == {"gate_proj": 3, "up_proj": 3, "down_proj": 4}
    assert quant[f"{layer.module}.gate_proj"]["bits"] == 3 and quant[f"{layer.module}.down_proj"]["bits"] == 4
    # --router-bits 16 keeps routers unquantized, but the model's own 8-bit floor is never dropped: 16 > 8.
    routers = [k for k in quant if k.endswith(("mlp.gate", "shared_expert_gate"))]
    assert routers and all(quant[k] is False for k in routers)
    assert quant["model.embed_tokens"]["bits"] == 6 and quant["lm_head"]["bits"] == 6
    assert quant["model.layers.0.mlp.shared_expert.up_proj"]["bits"] == 4
    model = load_resident(ours)
    assert model.model.layers[0].mlp.gate.__class__.__name__ == "Linear"
    assert model.model.layers[0].mlp.switch_mlp.gate_proj.bits == 3
    assert model.model.layers[0].mlp.switch_mlp.down_proj.bits == 4
    assert np.isfinite(np.array(logits(model))).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packed_codes_are_mlx_layout(bits):
    """MLX's own dequantize (scale 1, bias 0) reads back the codes we pack."""
    codes = np.random.default_rng(bits).integers(0, 2**bits, (6, 128))
    ones, zeros = mx.ones((6, 2)), mx.zeros((6, 2))
    assert np.array_equal(np.array(mx.dequantize(mx.array(pack_codes(codes, bits)), ones, zeros, 64, bits)), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_searched_quantization_beats_round_to_nearest(bits, dtype):
    """Same format as mx.quantize, read by mx.dequantize, and a smaller squared error than its rounding."""
    w = mx.array(np.random.default_rng(bits).standard_normal((64, 256)).astype(np.float32)).astype(dtype)
    searched, rtn = quantize_searched(w, 64, bits), mx.quantize(w, 64, bits)
    assert [(a.shape, a.dtype) for a in searched] == [(a.shape, a.dtype) for a in rtn]

    def error(q):
        return ((mx.dequantize(*q, 64, bits).astype(mx.float32) - w.astype(mx.float32)) ** 2).mean().item()

    assert error(searched) < 0.9 * error(rtn)
    flat = quantize_searched(mx.ones((2, 64), dtype), 64, bits)  # a constant group is exact
    assert mx.array_equal(mx.dequantize(*flat, 64, bits), mx.ones((2, 64))).item()


def test_convert_search_brings_the_model_closer_to_its_source(hf_checkpoint, tmp_path):
    """--search: expert weights and logits nearer the float32 source than round-to-nearest at the same bits."""
    src = hf_checkpoint("qwen3_moe")
    source, _ = mlx_load(str(src))
    outs = {search: convert(tmp_path / f"fm-{search}", hf_path=str(src), progress=False,
                            precision=Precision.from_flags(bits=8, expert_bits=3, search=search))
            for search in (False, True)}
    config = json.loads((outs[True] / "config.json").read_text())
    assert config["flashmoe"]["recipe"]["expert_search"] is True

    def expert_error(path):
        entry = read_manifest(path).layers[0]
        stacked = read_stacked_experts(path, entry)
        w = mx.dequantize(*(stacked[f"{entry.module}.gate_proj.{n}"] for n in ("weight", "scales", "biases")), 64, 3)
        ref = source.model.layers[0].mlp.switch_mlp.gate_proj.weight
        return ((w.astype(mx.float32) - ref) ** 2).mean().item()

    def logit_error(path):
        model = load_resident(path)
        return sum(((logits(model, seed) - logits(source, seed)) ** 2).mean().item() for seed in range(3))

    assert expert_error(outs[True]) < 0.9 * expert_error(outs[False])
    assert logit_error(outs[True]) < logit_error(outs[False])
    verify_checkpoint(outs[True])


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "qwen3_5_moe"])
def test_mlx_repack_is_bit_exact(family, mlx_checkpoint, tmp_path):
    src = mlx_checkpoint(family, 4, 64)
    ours = convert(tmp_path / "fm", mlx_path=str(src), progress=False)
    source = {}
    for shard in src.glob("model*.safetensors"):
        source.update(mx.load(str(shard)))
    for entry in read_manifest(ours).layers:
        for key, value in read_stacked_experts(ours, entry).items():
            assert value.dtype == source[key].dtype and mx.array_equal(value, source[key]).item(), key
    dense = {}
    for shard in ours.glob("model*.safetensors"):
        dense.update(mx.load(str(shard)))
    for key, value in dense.items():
        assert mx.array_equal(value, source[key]).item(), key
    ref, _ = mlx_load(str(src))
    assert mx.abs(logits(ref) - logits(load_resident(ours))).max().item() == 0.0


def _flip_byte(path: Path, offset: int):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_verify_catches_flipped_byte_and_truncation(hf_checkpoint, tmp_path):
    out = convert(tmp_path / "fm", hf_path=str(hf_checkpoint("olmoe")), progress=False)
    ok = run_cli("flashmoe_mlx.convert", "--verify", out, "--quiet")
    assert ok.returncode == 0, ok.stderr
    entry = read_manifest(out).layers[-1]
    layer_file = out / "experts" / entry.file
    _flip_byte(layer_file, entry.record_offset(5) + 100)
    bad = run_cli("flashmoe_mlx.convert", "--verify", out, "--quiet")
    assert bad.returncode != 0
    assert f"{entry.file}: layer {entry.layer} expert 5: checksum mismatch" in bad.stderr
    assert "Traceback" not in bad.stderr
    _flip_byte(layer_file, entry.record_offset(5) + 100)
    with open(layer_file, "r+b") as f:
        f.truncate(layer_file.stat().st_size - 4096)
    bad = run_cli("flashmoe_mlx.convert", "--verify", out, "--quiet")
    assert bad.returncode != 0 and "truncated" in bad.stderr and entry.file in bad.stderr



@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_lowers_the_error_on_its_calibration_inputs(bits):
    """Output error |X (W_hat - W)^T|^2 on correlated inputs with uneven channels, W_hat decoded by MLX's own
    dequantize: GPTQ well below the searched and round-to-nearest grids. An expert no token reached (H = 0)
    is still fitted, like the plain search."""
    rng = np.random.default_rng(bits)
    experts, rows, cols, n = 3, 64, 256, 400
    w = mx.array(rng.standard_normal((experts, rows, cols)).astype(np.float32)).astype(mx.bfloat16)
    mixing = rng.standard_normal((cols, cols)) * rng.random(cols) ** 4
    xs = [mx.array((rng.standard_normal((n, cols)) @ mixing).astype(np.float32)) for _ in range(experts - 1)]
    xs.append(mx.zeros((n, cols)))
    hessian = mx.stack([x.T @ x / n for x in xs])
    gptq = quantize_gptq(w, hessian, 64, bits)
    assert [(a.shape, a.dtype) for a in gptq] == [(a.shape, a.dtype) for a in mx.quantize(w, 64, bits)]

    def output_error(q, e):
        w_hat = mx.dequantize(*q, group_size=64, bits=bits)[e]
        return mx.mean((xs[e] @ (w_hat - w[e].astype(mx.float32)).T) ** 2).item()

    for e in range(experts - 1):
        assert output_error(gptq, e) < 0.6 * output_error(quantize_searched(w, 64, bits), e)
        assert output_error(gptq, e) < 0.5 * output_error(mx.quantize(w, 64, bits), e)
    unreached = mx.dequantize(*(a[-1:] for a in gptq), group_size=64, bits=bits)
    searched = mx.dequantize(*(a[-1:] for a in quantize_searched(w, 64, bits)), group_size=64, bits=bits)
    reference = w[-1:].astype(mx.float32)
    assert ((unreached - reference) ** 2).mean().item() <= 1.05 * ((searched - reference) ** 2).mean().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_sees_what_the_model_computes(family, hf_checkpoint, tmp_path):
    """Carried layer by layer, the calibration's expert inputs and router choices equal those of stock mlx-lm's
    whole forward over the same windows (every family: its masks, linear-attention and sliding layers)."""
    from flashmoe_mlx.architecture import ExpertCallHook, expert_blocks, swap_module
    from flashmoe_mlx.convert.pipeline import Converter
    from flashmoe_mlx.convert.sources import open_source

    src = hf_checkpoint(family)
    reference, tokenizer = mlx_load(str(src))
    text = tmp_path / "calibration.txt"
    text.write_text(_random_text(tokenizer, reference, 0, 3000))
    converter = Converter(open_source(str(src), expect_quantized=False), Precision(), None,
                          CalibrationText(str(text), tokens=1024))
    seen = {}
    for block in expert_blocks(reference):
        swap_module(reference, block.path, ExpertCallHook(module_at(reference, block.path), lambda x, ids, layer=block.layer:
                    seen.setdefault(layer, (x.reshape(-1, x.shape[-1]), np.array(ids).reshape(-1, ids.shape[-1])))))
    mx.eval(reference(mx.array(converter.calibrator.windows)))
    checked = []
    for unit, (layer, _) in enumerate(converter.units):
        inputs = converter.calibrate(unit)
        if inputs is not None:
            x, ids = seen[layer]
            assert mx.abs(inputs.x - x).max().item() <= 1e-4 * max(1.0, mx.abs(x).max().item())
            assert (inputs.indices == ids).mean() >= 0.999
            checked.append(layer)
        converter.release(unit)
    assert checked == sorted(seen)


def test_expert_input_statistics_match_numpy():
    """Each expert's H for --calibrate: X^T X / n over the tokens routed to it plus PRIOR x the layer-wide H
    (gate/up: over x; down_proj: over the SwiGLU outputs of every routed pair), in numpy from the same
    tensors; an expert no token reached gets the prior alone."""
    from mlx_lm.models.switch_layers import SwitchGLU

    from flashmoe_mlx.convert.calibration import PRIOR, ExpertInputs

    rng = np.random.default_rng(0)
    hidden, inter, experts, k, n = 16, 8, 5, 2, 40
    block = SwitchGLU(hidden, inter, experts, bias=True)
    block.update({p: {"bias": mx.array(rng.standard_normal((experts, inter)).astype(np.float32))}
                  for p in ("gate_proj", "up_proj")})
    x = rng.standard_normal((n, hidden)).astype(np.float32)
    ids = np.stack([rng.choice([0, 1, 2, 4], k, replace=False) for _ in range(n)])  # expert 3: never chosen
    inputs = ExpertInputs(mx.array(x), ids, block)
    (wg, bg), (wu, bu) = ((np.array(getattr(block, p).weight), np.array(getattr(block, p).bias))
                          for p in ("gate_proj", "up_proj"))

    def swiglu(e, rows):
        g, u = rows @ wg[e].T + bg[e], rows @ wu[e].T + bu[e]
        return g / (1 + np.exp(-g)) * u

    routed = [(t, e) for t in range(n) for e in ids[t]]
    down_prior = sum(np.outer(swiglu(e, x[t]), swiglu(e, x[t])) for t, e in routed) / len(routed)
    for e in range(experts):
        rows = x[[t for t, chosen in routed if chosen == e]]
        gate = (rows.T @ rows / max(len(rows), 1)) + PRIOR * x.T @ x / n
        h = swiglu(e, rows) if len(rows) else np.zeros((0, inter))
        down = (h.T @ h / max(len(rows), 1)) + PRIOR * down_prior
        np.testing.assert_allclose(np.array(inputs.hessians("gate_proj", range(e, e + 1))[0]), gate, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.array(inputs.hessians("down_proj", range(e, e + 1))[0]), down, rtol=1e-4, atol=1e-5)


def test_long_calibration_text_is_sampled_in_pieces(monkeypatch):
    """A text over LONG_TEXT_CHARS is tokenized only at evenly spaced pieces: whole windows, one per piece,
    from the start to the end of the text (each marked section of it is reached)."""
    from flashmoe_mlx.convert import calibration

    class Words:  # one token per word: ids say which section of the text a window came from
        def encode(self, text, verbose=True):
            return [int(w[1:]) for w in text.split()[1:-1]]  # the first and last words may be cut: dropped

    monkeypatch.setattr(calibration, "LONG_TEXT_CHARS", 10_000)
    monkeypatch.setattr(calibration, "SAMPLE_CHARS", 5_000)
    text = " ".join(f"s{i // 2000}" for i in range(20_000))  # 10 sections of 2000 words
    windows = calibration.token_windows(Words(), text, 10 * calibration.WINDOW, "text")
    assert windows.shape == (10, calibration.WINDOW)
    assert sorted({int(w[0]) for w in windows}) == list(range(10))
    short = calibration.token_windows(Words(), text[:5_000], 10 * calibration.WINDOW, "text")  # all at once
    assert short.shape[1] == calibration.WINDOW and len(short) >= 1


def _random_text(tokenizer, model, seed: int, tokens: int) -> str:
    """Text decoded from random token ids: calibration and held-out text from one distribution."""
    vocab = min(len(tokenizer.get_vocab()), module_at(model, "model.embed_tokens").weight.shape[0])
    return tokenizer.decode(np.random.default_rng(seed).integers(3, vocab, tokens).tolist())


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_calibrate_brings_the_model_closer_to_its_source(family, hf_checkpoint, tmp_path):
    """--calibrate: on held-out text like the calibration text, logits much nearer the float32 source's than
    round-to-nearest gives at the same bits, in every family; the calibration is recorded in the config."""
    src = hf_checkpoint(family)
    source, tokenizer = mlx_load(str(src))
    text = tmp_path / "calibration.txt"
    text.write_text(_random_text(tokenizer, source, 0, 3000))
    precision = Precision.from_flags(bits=8, expert_bits=3)
    outs = {
        "rtn": convert(tmp_path / "rtn", hf_path=str(src), progress=False, precision=precision),
        "gptq": convert(tmp_path / "gptq", hf_path=str(src), progress=False, precision=precision,
                        calibration=CalibrationText(str(text), tokens=2048)),
    }
    recipe = json.loads((outs["gptq"] / "config.json").read_text())["flashmoe"]["recipe"]
    assert recipe["expert_calibration"]["method"] == "gptq" and recipe["expert_calibration"]["tokens"] == 2048
    assert len(recipe["expert_calibration"]["text_sha256"]) == 64
    held_out = [mx.array(tokenizer.encode(_random_text(tokenizer, source, seed, 600))[:512])[None] for seed in (1, 2)]

    def logit_error(path):
        model = load_resident(path)
        return sum(((model(ids) - source(ids)) ** 2).mean().item() for ids in held_out)

    errors = {name: logit_error(path) for name, path in outs.items()}
    assert errors["gptq"] < 0.6 * errors["rtn"], errors
    verify_checkpoint(outs["gptq"])


def test_calibrated_resume_gives_identical_bytes(hf_checkpoint, tmp_path, monkeypatch):
    """An interrupted --calibrate conversion, resumed, carries the calibration through the finished layers
    and writes exactly what an uninterrupted one does."""
    from flashmoe_mlx.convert import pipeline

    src = str(hf_checkpoint("mixtral"))
    text = tmp_path / "calibration.txt"
    text.write_text(_random_text(*reversed(mlx_load(src)), 0, 2000))
    calibration = CalibrationText(str(text), tokens=1024)
    whole = convert(tmp_path / "whole", hf_path=src, progress=False, calibration=calibration)
    real = pipeline.Converter.convert_unit

    class Crash(Exception):
        pass

    def crash_at_unit_2(self, staging, unit):
        if unit == 2:
            raise Crash
        return real(self, staging, unit)

    monkeypatch.setattr(pipeline.Converter, "convert_unit", crash_at_unit_2)
    with pytest.raises(Crash):
        convert(tmp_path / "fm", hf_path=src, progress=False, calibration=calibration)
    monkeypatch.undo()
    with pytest.raises(Exception, match="different options"):
        convert(tmp_path / "fm", hf_path=src, progress=False, resume=True)
    convert(tmp_path / "fm", hf_path=src, progress=False, resume=True, calibration=calibration)
    assert _tree_bytes(tmp_path / "fm") == _tree_bytes(whole)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_after_kill_gives_identical_bytes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from flashmoe_mlx.synthetic import MoEShape, write_hf_checkpoint

    shape = MoEShape(hidden_size=256, moe_intermediate_size=256, num_experts=32, num_experts_per_tok=4,
                     num_hidden_layers=24, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512)
    src = write_hf_checkpoint(tmp_path / "src", shape, dtype="float32")
    args = ["--hf-path", src, "--quiet", "--recipe", "3bit"]
    whole = run_cli("flashmoe_mlx.convert", *args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    state = out.with_name("killed.partial") / ".flashmoe-convert"
    proc = subprocess.Popen([sys.executable, "-m", "flashmoe_mlx.convert", *map(str, args), "--out", str(out)])
    deadline = time.time() + 120
    while len(list(state.glob("unit-*.json"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the conversion finished before it could be killed"
    done = len(list(state.glob("unit-*.json")))
    assert 3 <= done < 25
    # Without --resume the interrupted work is neither lost nor silently overwritten.
    refused = run_cli("flashmoe_mlx.convert", *args, "--out", out)
    assert refused.returncode != 0 and "--resume" in refused.stderr
    resumed = run_cli("flashmoe_mlx.convert", *args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _tree_bytes(out) == _tree_bytes(tmp_path / "whole")


def test_resume_refuses_changed_options(hf_checkpoint, tmp_path, monkeypatch):
    from flashmoe_mlx.convert import pipeline

    src = str(hf_checkpoint("olmoe"))

    def crash(self, staging, unit):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Converter, "convert_unit", crash)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "fm", hf_path=src, dtype="bfloat16", progress=False)
    monkeypatch.undo()
    for changed in ({"dtype": "float32"}, {"precision": Precision.from_flags(recipe="3bit")}):
        with pytest.raises(Exception, match="different options"):
            convert(tmp_path / "fm", hf_path=src, resume=True, progress=False, **changed)
    convert(tmp_path / "fm", hf_path=src, dtype="bfloat16", resume=True, progress=False)


def test_malformed_manifests_are_one_line_errors(hf_checkpoint, tmp_path):
    out = convert(tmp_path / "fm", hf_path=str(hf_checkpoint("mixtral")), progress=False)
    manifest_path = out / "experts" / "manifest.json"
    good = json.loads(manifest_path.read_text())
    for broken, message in [
        (dict(good, layers=[1]), "should be an object"),
        (dict(good, layers=[dict(good["layers"][0], checksums=["-1"] * 8)]), "8-digit"),
        (dict(good, version=2), "reads version 1"),
        (dict(good, layers=[dict(good["layers"][0], record_size=100)]), "record_size"),
    ]:
        manifest_path.write_text(json.dumps(broken))
        result = run_cli("flashmoe_mlx.convert", "--verify", out, "--quiet")
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_resume_checks_finished_units_and_redoes_damaged_ones(hf_checkpoint, tmp_path, monkeypatch):
    from flashmoe_mlx.convert import pipeline

    src = str(hf_checkpoint("mixtral"))
    whole = convert(tmp_path / "whole", hf_path=src, progress=False)
    real = pipeline.Converter.convert_unit
    done = []

    class Crash(Exception):
        pass

    def crash_after_two(self, staging, unit):
        if len(done) == 2:
            raise Crash
        done.append(unit)
        return real(self, staging, unit)

    monkeypatch.setattr(pipeline.Converter, "convert_unit", crash_after_two)
    out = tmp_path / "fm"
    with pytest.raises(Crash):
        convert(out, hf_path=src, progress=False)
    layer_files = sorted((tmp_path / "fm.partial" / "experts").glob("layer_*.bin"))
    assert len(layer_files) == 1  # units 0 (embeddings) and 1 (layer 0) finished
    _flip_byte(layer_files[0], 20000)
    done.clear()
    monkeypatch.setattr(pipeline.Converter, "convert_unit", lambda self, st, u: done.append(u) or real(self, st, u))
    convert(out, hf_path=src, progress=False, resume=True)
    assert done == list(range(1, len(done) + 1))  # damaged layer 0 redone, unit 0 only checked
    assert _tree_bytes(out) == _tree_bytes(whole)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hf-path", "{missing}", "--out", "{out}"], "no such directory"),
        (["--hf-path", "{src}", "--out", "{out}", "--expert-bits", "5"], "invalid choice"),
        (["--hf-path", "{src}", "--out", "{out}", "--recipe", "3bit", "--expert-bits", "4"], "not both"),
        (["--hf-path", "{src}", "--out", "{out}", "--group-size", "48"], "invalid choice"),
        (["--mlx-path", "{src}", "--out", "{out}"], "expects a quantized"),
        (["--hf-path", "{src}"], "--out is required"),
        (["--verify", "{missing}"], "manifest is missing"),
        (["--verify", "{src}/config.json"], "unreadable"),
        (["--mlx-path", "{src}", "--out", "{out}", "--recipe", "3bit"], "does not apply to --mlx-path"),
        (["--mlx-path", "{src}", "--out", "{out}", "--calibrate", "{src}/config.json"], "does not apply to --mlx-path"),
        (["--hf-path", "{src}", "--out", "{out}", "--calibrate", "{missing}"], "calibration text not found"),
        (["--hf-path", "{src}", "--out", "{out}", "--calibrate", "{short}"], "calibration needs at least 512"),
        (["--hf-path", "{src}", "--out", "{out}", "--calibrate", "{src}"], "not a readable UTF-8 text file"),
        (["--hf-path", "{src}", "--out", "{out}", "--calibrate-tokens", "1024"], "needs --calibrate"),
        (["--hf-path", "{src}", "--out", "{out}", "--calibrate", "{short}", "--calibrate-tokens", "100"],
         "--calibrate-tokens 100"),
    ],
)
def test_bad_flags_and_paths_give_one_line_errors(args, message, hf_checkpoint, tmp_path):
    subs = {"missing": tmp_path / "nope", "out": tmp_path / "out", "src": hf_checkpoint("qwen3_moe"),
            "short": tmp_path / "short.txt"}
    subs["short"].write_text("Too short to calibrate with.")
    result = run_cli("flashmoe_mlx.convert", *[a.format(**subs) for a in args])
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints_give_one_line_errors(hf_checkpoint, tmp_path):
    src = hf_checkpoint("qwen3_moe")

    def fails(path, message, *extra):
        result = run_cli("flashmoe_mlx.convert", "--hf-path", path, "--out", tmp_path / "out", "--quiet", *extra)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()

    no_config = _copy_checkpoint(src, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    fails(no_config, "config.json: missing")

    no_shard = _copy_checkpoint(src, tmp_path / "no_shard")
    sorted(no_shard.glob("model-*.safetensors"))[0].unlink()
    fails(no_shard, "is missing")

    truncated = _copy_checkpoint(src, tmp_path / "truncated")
    shard = sorted(truncated.glob("model-*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    fails(truncated, "truncated")

    dense = _copy_checkpoint(src, tmp_path / "dense")
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps(dict(config, model_type="llama", architectures=["LlamaForCausalLM"])))
    fails(dense, "qwen3_moe")  # the message lists what is supported

    unknown = _copy_checkpoint(src, tmp_path / "unknown")
    (unknown / "config.json").write_text(json.dumps(dict(config, model_type="no_such_moe")))
    fails(unknown, "no architecture 'no_such_moe'")

    from flashmoe_mlx.synthetic import MoEShape, write_hf_checkpoint

    odd = write_hf_checkpoint(tmp_path / "odd", MoEShape(192, 64, 4, 2, 1, 3, 1, 64, 256), dtype="float32")
    fails(odd, "has input dimension 192, not divisible by group size 128; --group-size 64 fits", "--group-size", "128")

    not_utf8 = _copy_checkpoint(src, tmp_path / "not_utf8")
    (not_utf8 / "config.json").write_bytes(b"\xff\xfe{")
    fails(not_utf8, "not valid JSON")

    incomplete = _copy_checkpoint(src, tmp_path / "incomplete")
    (incomplete / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    fails(incomplete, "not describe a valid qwen3_moe model")

    (tmp_path / "out").mkdir()
    result = run_cli("flashmoe_mlx.convert", "--hf-path", src, "--out", tmp_path / "out", "--quiet")
    assert result.returncode != 0 and "--overwrite" in result.stderr
    result = run_cli("flashmoe_mlx.convert", "--hf-path", src, "--out", tmp_path / "out", "--quiet", "--overwrite")
    assert result.returncode == 0, result.stderr
    verify_checkpoint(tmp_path / "out")


def test_hub_id_offline_is_a_clear_error(tmp_path):
    result = run_cli("flashmoe_mlx.convert", "--hf-path", "someone/some-moe", "--out", tmp_path / "out",
                     env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "offline" in result.stderr and "Traceback" not in result.stderr


def test_disk_full_is_a_clear_error_and_resumable(hf_checkpoint, tmp_path):
    import os
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode:
        pytest.fail("this test mounts a 256 KiB tmpfs and needs root (CI runs as root)")
    try:
        src = hf_checkpoint("qwen3_moe")
        result = run_cli("flashmoe_mlx.convert", "--hf-path", src, "--out", mount / "out", "--quiet")
        assert result.returncode != 0 and "disk full" in result.stderr and "Traceback" not in result.stderr
        assert not (mount / "out").exists()
        partial = mount / "out.partial"
        assert not [p for p in partial.rglob(".tmp-*")], "half-written temporaries were left behind"
        os.system(f"mount -o remount,size=4m {mount}")
        result = run_cli("flashmoe_mlx.convert", "--hf-path", src, "--out", mount / "out", "--quiet", "--resume")
        assert result.returncode == 0, result.stderr
        verify_checkpoint(mount / "out")
    finally:
        subprocess.run(["umount", str(mount)])


def test_fp8_block_scaled_source_matches_mlx_lm(hf_checkpoint, tmp_path):
    """DeepSeek-V3-style FP8 (e4m3 + 128x128 weight_scale_inv) goes through mlx-lm's sanitize like mlx_lm.convert."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "fp8"
    shutil.copytree(hf_checkpoint("deepseek_v3"), src)
    for shard in src.glob("model-*.safetensors"):
        tensors = load_file(shard)
        for key in [k for k, v in tensors.items() if k.endswith("proj.weight") and v.ndim == 2]:
            w = tensors[key].float()
            rows, cols = -(-w.shape[0] // 128), -(-w.shape[1] // 128)
            padded = torch.nn.functional.pad(w, (0, cols * 128 - w.shape[1], 0, rows * 128 - w.shape[0]))
            blocks = padded.reshape(rows, 128, cols, 128)
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-8) / 448.0
            q = (blocks / scale[:, None, :, None]).reshape(padded.shape)[: w.shape[0], : w.shape[1]]
            tensors[key] = q.to(torch.float8_e4m3fn)
            tensors[key.replace(".weight", ".weight_scale_inv")] = scale.float()
        save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for shard in src.glob("model-*.safetensors"):
        for key in load_file(shard):
            index["weight_map"][key] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(config))

    ours = convert(tmp_path / "fm", hf_path=str(src), precision=Precision.from_flags(bits=8, expert_bits=8), progress=False)
    mlx_convert(str(src), str(tmp_path / "ref"), quantize=True, q_bits=8, q_group_size=64)
    ref, _ = mlx_load(str(tmp_path / "ref"))
    assert mx.abs(logits(ref) - logits(load_resident(ours))).max().item() <= 1e-4
    assert json.loads((ours / "config.json").read_text())["quantization_config"]["bits"] == 8
