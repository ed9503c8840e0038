"""generate / stream_generate and `python -m flashmoe_mlx.generate` against stock mlx-lm on the same checkpoint."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import run_cli
from mlx_lm import generate as mlx_generate
from mlx_lm import load as mlx_load

from flashmoe_mlx import generate, load, stream_generate

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def checkpoint(mlx_checkpoint):
    return mlx_checkpoint("qwen3_moe")


@pytest.fixture(scope="module")
def reference(checkpoint):
    model, tokenizer = mlx_load(str(checkpoint))
    templated = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    return model, tokenizer, templated


SMALL_BUDGET = "200kB"  # about 3 of 8 experts per layer: misses and evictions while generating


def test_api_generate_equals_mlx_lm(checkpoint, reference):
    ref, ref_tok, templated = reference
    model, tokenizer = load(str(checkpoint), memory_budget=SMALL_BUDGET)
    expected = mlx_generate(ref, ref_tok, templated, max_tokens=24)
    assert generate(model, tokenizer, templated, max_tokens=24) == expected
    responses = list(stream_generate(model, tokenizer, templated, max_tokens=24))
    assert "".join(r.text for r in responses) == expected
    last = responses[-1]
    assert last.generation_tokens == len(responses) and last.prompt_tokens == len(templated)
    assert 0 <= last.expert_hit_rate <= 1 and last.expert_gb_read > 0 and last.peak_memory > 0


def cli(checkpoint, *args, **kwargs):
    return run_cli("flashmoe_mlx.generate", "--model", checkpoint, "--memory-budget", SMALL_BUDGET, *args, **kwargs)


def test_cli_greedy_equals_mlx_lm(checkpoint, reference):
    ref, ref_tok, templated = reference
    result = cli(checkpoint, "--prompt", PROMPT, "--max-tokens", 24, "--verbose", "false")
    assert result.returncode == 0, result.stderr
    assert result.stdout == mlx_generate(ref, ref_tok, templated, max_tokens=24) + "\n"
    raw = cli(checkpoint, "--prompt", "-", "--max-tokens", 24, "--verbose", "false", "--ignore-chat-template",
              input=PROMPT)
    assert raw.stdout == mlx_generate(ref, ref_tok, ref_tok.encode(PROMPT), max_tokens=24) + "\n"


def test_cli_stats_line(checkpoint):
    result = cli(checkpoint, "--prompt", PROMPT, "--max-tokens", 8)
    assert result.returncode == 0, result.stderr
    assert re.search(r"prompt: \d+ tokens, [\d.]+ tok/s \| generation: 8 tokens, [\d.]+ tok/s \| peak memory: "
                     r"[\d.]+ GB \| experts: [\d.]+% hits, [\d.]+ GB read at [\d.]+ GB/s", result.stdout)


def test_cli_records_the_routing_trace_of_a_generation(checkpoint, reference, tmp_path):
    """--record-trace: every token the run fed through the model (the prompt, then the generated tokens:
    mlx-lm's generator computes one step ahead, so the last one too), each with its top-k ids, in order; the
    trace feeds policy-sim."""
    trace = tmp_path / "trace.npz"
    result = cli(checkpoint, "--prompt", "hello there", "--max-tokens", 6, "--temp", 0, "--ignore-chat-template",
                 "--verbose", "false", "--record-trace", trace)
    assert result.returncode == 0, result.stderr
    data = np.load(trace)
    layers = [k for k in data.files if k != "num_experts"]
    assert len(layers) == 2 and int(data["num_experts"]) == 8
    prompt = len(reference[1].encode("hello there"))
    for layer in layers:
        ids = data[layer]
        assert prompt < ids.shape[0] <= prompt + 6 and ids.shape[1] == 2 and ids.max() < 8
        assert ids.shape[0] == data[layers[0]].shape[0]
    sim = run_cli("flashmoe_mlx.bench", "policy-sim", "--trace", trace, "--slots", "2,4")
    assert sim.returncode == 0 and "| 2 of 8 |" in sim.stdout, sim.stderr


def test_seeded_sampling_is_reproducible(checkpoint):
    args = ("--prompt", PROMPT, "--max-tokens", 16, "--temp", "1.0", "--top-k", "50", "--verbose", "false")
    a, b = cli(checkpoint, *args, "--seed", "3"), cli(checkpoint, *args, "--seed", "3")
    c = cli(checkpoint, *args, "--seed", "4")
    assert a.returncode == 0 and a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_chat_session(checkpoint, reference):
    _, ref_tok, templated = reference
    script = f"{PROMPT}\nand then?\n/stats\n/reset\n{PROMPT}\n/quit\n"
    result = cli(checkpoint, "--chat", "--max-tokens", 12, input=script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert '"hits"' in out and '"pool_bytes"' in out and "[conversation cleared]" in out
    prompts = [int(n) for n in re.findall(r"prompt: (\d+) tokens", out)]
    follow_up = ref_tok.apply_chat_template([{"role": "user", "content": "and then?"}], add_generation_prompt=True)
    # Turn 2 feeds only its new tokens (the prompt cache holds turn 1); after /reset the first prompt is whole.
    assert prompts == [len(templated), len(follow_up), len(templated)]
    replies = [line for line in out.split(">> ") if line and not line.startswith(("{", "[", "chat:"))]
    assert replies[0].splitlines()[0] == replies[-1].splitlines()[0]  # same greedy reply from a fresh cache


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "no such directory"),
        (["--temp", "-1"], "--temp"),
        (["--top-p", "0"], "--top-p"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--memory-budget", "lots"], "not a size"),
        (["--memory-budget", "1kB"], "minimum is"),
        (["--chat-template-config", "{oops"], "not valid JSON"),
        (["--prompt", "word " * 5000], "context is"),
    ],
)
def test_cli_bad_input(args, message, checkpoint):
    base = [] if args[0] == "--model" else ["--model", str(checkpoint)]
    result = run_cli("flashmoe_mlx.generate", *base, *args)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unsupported_checkpoint(hf_checkpoint, tmp_path):
    import json
    import shutil

    dense = shutil.copytree(hf_checkpoint("qwen3_moe"), tmp_path / "dense")
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    incomplete = shutil.copytree(hf_checkpoint("qwen3_moe"), tmp_path / "incomplete")
    (incomplete / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "model_type"}))
    for path, message in [(dense, "no SwitchGLU expert blocks"), (hf_checkpoint("mixtral"), "stores experts unstacked"),
                          (incomplete, "model_type")]:
        result = run_cli("flashmoe_mlx.generate", "--model", path)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_default_model_runs_offline(tmp_path):
    """No --model: the bundled MoE is converted into the cache on first use, then streamed under a budget."""
    import os

    env = {**os.environ, "FLASHMOE_MLX_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    first = run_cli("flashmoe_mlx.generate", "--prompt", "How do I read a file?", "--max-tokens", 12, env=env)
    assert first.returncode == 0, first.stderr
    assert "first use: converting" in first.stderr and "generation: 12 tokens" in first.stdout
    (converted,) = tmp_path.glob("default-4bit-*")
    again = run_cli("flashmoe_mlx.generate", "--prompt", "How do I read a file?", "--max-tokens", 12, env=env)
    assert again.returncode == 0 and "first use" not in again.stderr
    assert again.stdout.split("==========")[0] == first.stdout.split("==========")[0]  # greedy: same text
    hits = float(re.search(r"experts: ([\d.]+)% hits", again.stdout).group(1))
    assert hits < 100  # the budget (half the experts) forces reads while generating
