"""The examples run: the notebook's code cells in order, the converter demo script, and bench_kernels' attention
timing and expert profiling chain on the emulated GPU, and its reading of that chain's profile."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_notebook_cells_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_MLX_CACHE", str(tmp_path))
    notebook = json.loads((EXAMPLES / "stream_in_jupyter.ipynb").read_text())
    namespace, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                exec(compile("".join(cell["source"]), "notebook", "exec"), namespace)
    stats = namespace["stats"]
    assert stats["misses"] > 0 and stats["pool_bytes"] <= namespace["budget"]
    assert "tok/s" in printed.getvalue() and "experts:" in printed.getvalue()


def test_convert_demo_script(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "convert_demo.py"), "--workdir", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "OK," in result.stdout and "streamed experts" in result.stdout


def test_bench_kernels_attention_runs_on_the_emulated_gpu(monkeypatch):
    """bench_kernels' attention timing (interleaved rounds, medians, ratio ranges) on a tiny cache, with the tests'
    emulation of a CUDA device as the runner: what a GPU run executes, so that it does not rot between runs on the
    lent GPU (the expert timing shares its helpers; it runs under mx.compile, which the emulation cannot). The
    figures themselves mean nothing here."""
    from kernel_emulator import run_emulated_cuda

    from flashmoe_mlx.kernels import use_runner

    monkeypatch.syspath_prepend(str(EXAMPLES))
    import bench_kernels

    with use_runner(run_emulated_cuda):
        attn = bench_kernels.attention(keys=100, q_heads=8, kv_heads=2, dim=128, iters=2, layers=2, rounds=2, spare=20)
    assert set(attn["ms"]) == set(attn["ms_per_call"]) == set(attn["build_us_per_layer"]) == {
        "dequantize+sdpa", "mlx_lm quantized, whole arrays", "attention_decode", "attention_decode, whole arrays",
        "attention_decode, scalar split body"}
    for key in ("speedup_vs_dequant_sdpa", "speedup_vs_dequant_sdpa_per_call"):
        low, high = attn[f"{key}_range"]
        assert 0 < low <= attn[key] <= high


def test_bench_kernels_profile_chain_launches_in_the_documented_order(monkeypatch):
    """The expert chain for ncu (`--profile-chain`) on the emulated CUDA device at a small shape: its launches come
    in the order a reading of the profile assumes (bits, pass-1 body, chain, layer, pass), the tensor-core pass 1
    where that body is chosen (3- and 4-bit gate/up)."""
    from kernel_emulator import run_emulated_cuda

    from flashmoe_mlx.kernels import use_runner

    monkeypatch.syspath_prepend(str(EXAMPLES))
    import bench_kernels

    ran = []

    def recording(launch):
        ran.append(launch.kernel)
        return run_emulated_cuda(launch)

    recording.tensor_cores = True
    with use_runner(recording):
        bench_kernels.profile_chain(layers=2, slots=10, hidden=256, inter=64)
    pass1 = {"scalar": "gate_up", "MMA pass 1": "gate_up_mma"}
    want = [f"expert_swiglu_{kernel}" for _bits in (4, 3) for body in bench_kernels.BODIES
            for _chain_and_layer in range(2 * 2) for kernel in (pass1[body], "down")]
    assert ran == want


def test_bench_kernels_chain_table_reads_ncu_csv_in_launch_order(monkeypatch):
    """`--chain-table` over a CSV laid out as ncu writes it (a preamble, quoted rows, one per launch and metric,
    mixed units, a metric the table does not read): per (bits, pass-1 body) the medians and ranges of the second
    chain's layers, computed here from the values put in; a profile with other launches is refused."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import bench_kernels

    layers, want, launch = 3, [], 0
    rows = ['==PROF== Disconnected', '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"']
    for n, (bits, body) in enumerate((b, body) for b in bench_kernels.CHAIN_BITS for body in bench_kernels.BODIES):
        times = {}
        for chain in range(2):
            for layer in range(layers):
                for kernel, us in (("gate_up", 20.0 + n + 3 * layer + 50 * (chain == 0)), ("down", 10.0 + layer)):
                    name = f"custom_kernel_flashmoe_expert_swiglu_{kernel}_bfloat16_t(const float *)"
                    rows.append(f'"{launch}","{name}","gpu__time_duration.sum","nsecond","{us * 1000:,.0f}"')
                    rows.append(f'"{launch}","{name}","dram__bytes_read.sum","Kbyte","{us * 1000:,.1f}"')
                    rows.append(f'"{launch}","{name}","launch__registers_per_thread","register/thread","80"')
                    launch += 1
                    if chain == 1:
                        times.setdefault(kernel, []).append(us)
        want.append((list(bits), body, times))
    got = bench_kernels.chain_table("\n".join(rows), layers=layers)
    assert [(r["bits"], r["body"]) for r in got] == [(bits, body) for bits, body, _ in want]
    for r, (bits, _, times) in zip(got, want):
        first, second = times["gate_up"], times["down"]
        assert r["pass1_us"] == pytest.approx(np.median(first))
        assert r["pass1_us_range"] == pytest.approx([min(first), max(first)])
        assert r["pass2_us"] == pytest.approx(np.median(second))
        assert r["pass2_dram_mb"] == pytest.approx(np.median(second))
        assert r["layer_us"] == pytest.approx(np.median(np.add(first, second)))
        assert r["layer_tbps"] == pytest.approx(bench_kernels.expert_bytes(4096, 1024, *bits, 64) / r["layer_us"] / 1e6)
    with pytest.raises(ValueError, match="launches in the profile"):
        bench_kernels.chain_table("\n".join(rows[:-3]), layers=layers)  # the last launch dropped
    registers = bench_kernels.ncu_launches("\n".join(rows), ("launch__registers_per_thread",))
    assert {launch["launch__registers_per_thread"] for launch in registers} == {80}  # a count, kept as it is


def test_bench_kernels_read_bound_profile_and_table(monkeypatch):
    """`--profile-read` launches stream_read over each byte count at each launch shape, each over buffers of its
    own; `--read-table` takes per byte count the median of each shape and the best, and per layer one launch
    against the two-launch sum, from a CSV as ncu writes it (times put in here, a shape missing from one size)."""
    from flashmoe_mlx.kernels import use_runner

    monkeypatch.syspath_prepend(str(EXAMPLES))
    import bench_kernels

    sizes = {label: 4096 * (i + 1) for i, label in enumerate(bench_kernels.read_bound_sizes())}
    monkeypatch.setattr(bench_kernels, "read_bound_sizes", lambda: sizes)
    ran = []

    def recording(launch):
        ran.append((launch.constants["N"], launch.constants["GROUPS"], launch.constants["LOADS"],
                    id(launch.inputs["words"])))
        return [mx.zeros(shape, dtype) for shape, dtype in launch.outputs.values()]

    with use_runner(recording):
        bench_kernels.profile_read(launches=2, ring_bytes=0)
    shapes = bench_kernels.READ_BOUND_LAUNCHES
    assert [r[:3] for r in ran] == [(n // 4, g, loads) for n in sizes.values() for g, loads in shapes for _ in "ab"]
    # a ring of two buffers per size at ring_bytes 0: consecutive launches over one size read different ones
    assert all(a[3] != b[3] for a, b in zip(ran, ran[1:]) if a[0] == b[0])
    rows = ['==PROF== Disconnected', '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"']
    want = {}
    for i, (label, nbytes) in enumerate(sizes.items()):
        for j, (groups, loads) in enumerate(shapes[:-1] if i == 0 else shapes):
            name = f"custom_kernel_flashmoe_stream_read_{nbytes // 4}_{groups}_256_{loads}(const unsigned int *)"
            us = [5.0 + i + j, 7.0 + i + j, 6.0 + i + j]
            for t in us:
                rows.append(f'"{len(rows)}","{name}","gpu__time_duration.sum","nsecond","{t * 1000:,.0f}"')
                rows.append(f'"{len(rows) - 1}","{name}","dram__bytes_read.sum","Mbyte","1.0"')
            want.setdefault(label, {})[f"{groups}x{loads}"] = 6.0 + i + j
    got = bench_kernels.read_table("\n".join(rows))
    for label, by_shape in want.items():
        assert got["sizes"][label]["us_by_launch"] == pytest.approx(by_shape)
        assert got["sizes"][label]["best_us"] == pytest.approx(min(by_shape.values()))
    best = {label: min(by_shape.values()) for label, by_shape in want.items()}
    assert got["layers"]["experts 3/4"]["one_launch_us"] == pytest.approx(best["experts 3/4, layer"])
    assert got["layers"]["experts 3/4"]["two_launches_us"] == pytest.approx(
        best["experts 3/4, pass 1"] + best["experts, pass 2"])
    assert got["layers"]["attention"]["two_launches_us"] == pytest.approx(
        best["attention, KV"] + best["attention, partials"])
    with pytest.raises(ValueError, match="attention, KV"):
        bench_kernels.read_table("\n".join(r for r in rows if f"_{sizes['attention, KV'] // 4}_" not in r))


def test_bench_kernels_host_cost_times_each_source_length_template_count_and_both_wrappers(monkeypatch):
    """`--host-cost` on a stand-in for MLX's custom kernels (none here): a tiny kernel per source length, its
    header that many bytes (to the line), and one per count of template arguments, its calls carrying that many,
    each timed in a chain; then both wrappers' calls built and timed."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import bench_kernels

    made = []

    def fake_cuda_kernel(name, input_names, output_names, source, header=""):
        record = {"header": len(header), "template_arguments": set()}
        made.append(record)

        def call(inputs, template, **launch):
            record["template_arguments"].add(len(template))
            return [inputs[0] + 1]
        return call

    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_cuda_kernel)
    monkeypatch.setattr(bench_kernels.kernels, "gpu_backend", lambda: "cuda")
    got = bench_kernels.host_cost(rounds=1, calls=2, hidden=256, inter=64, keys=512)
    sizes, counts = bench_kernels.HOST_COST_SOURCE_BYTES, bench_kernels.HOST_COST_TEMPLATE_ARGUMENTS
    assert len(made) == len(sizes) + len(counts)
    assert all(size - 80 < k["header"] <= size and k["template_arguments"] == {0} for k, size in zip(made, sizes))
    assert [(k["header"], k["template_arguments"]) for k in made[len(sizes):]] == [(0, {n}) for n in counts]
    for row, keys in (("header_bytes", sizes), ("template_arguments", counts)):
        assert sorted(got[f"custom_kernel_us_by_{row}"]) == sorted(keys)
        assert all(us > 0 for us in got[f"custom_kernel_us_by_{row}"].values())
    assert got["expert_swiglu_build_us"] > 0 and got["attention_decode_build_us"] > 0
