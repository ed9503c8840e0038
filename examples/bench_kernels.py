"""The custom kernels on a GPU: correctness against the plain-MLX references, then speed against MLX's own paths.

    python examples/bench_kernels.py [--only experts|attention] [--json out.json]   # needs MLX with Metal or CUDA
    python examples/bench_kernels.py --profile      # each path briefly, under a profiler (ncu) for kernel times
    python examples/bench_kernels.py --profile-chain  # expert layers in a chain, for ncu --cache-control none
    python examples/bench_kernels.py --chain-table ncu.csv   # that profile's table (ncu --csv output; no GPU)
    python examples/bench_kernels.py --profile-read  # the read bound: a read-only kernel over our byte counts
    python examples/bench_kernels.py --read-table ncu.csv    # that profile's table
    python examples/bench_kernels.py --check        # the correctness checks alone
    python examples/bench_kernels.py --host-cost    # host time per custom-kernel call: source length, our wrappers

expert_swiglu. Correctness: random pools over several shapes, bits (mixed gate/up vs down), group sizes, k and
token counts, kernel vs reference (float32 and bfloat16). Speed: MoE layers of Qwen3.5-397B shape (4096 -> 1024
-> 4096, k = 10) for one decode token: (a) MLX's built-in path, mlx-lm's SwitchGLU (gather_qmm x3 + SwiGLU) plus
the weighted sum; (b) the fused kernel; each also under mx.compile. Both over the same pools, timed in one run in
interleaved rounds (times are medians, speedups the median of the rounds' ratios with their range), plus the
fused path with each choice of pass-1 body (on CUDA: the scalar body or the tensor-core one). GB/s
counts the active expert bytes (weights, scales, biases of the k experts); the bound is the card's copy
bandwidth measured here.

attention_decode: one token over 32k keys of a 4-bit KV cache at two GQA shapes, against dequantize + SDPA and
mlx-lm's quantized attention (on CUDA also with the scalar split body in place of the tensor-core one), over
views of caches with spare capacity as decoding hands them over, per call and per layer of a 15-layer step;
plus a sweep of the split pass's launch: on CUDA the tensor-core body's SIMD-groups, stages and keys per
SIMD-group; elsewhere the scalar body's keys per SIMD-group (the split count) and keys per lane. Also the host's
cost per launch: a tiny custom kernel against an add.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import re
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from flashmoe_mlx import kernels
from flashmoe_mlx.bench.disk import device_copy_gbps
from flashmoe_mlx.kernels import active_runner, expert_swiglu, expert_swiglu_reference


def quantized_pool(hidden, inter, slots, up_bits, down_bits, group_size, dtype):
    pool = SwitchGLU(hidden, inter, slots)
    nn.quantize(pool, class_predicate=lambda path, m: hasattr(m, "to_quantized") and {
        "group_size": group_size, "bits": down_bits if path == "down_proj" else up_bits})
    pool.set_dtype(dtype)
    mx.eval(pool.parameters())
    return pool


def correctness() -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for dtype in (mx.float32, mx.bfloat16):
        for hidden, inter, slots, tokens, k, ub, db, gs in [
            (128, 64, 6, 1, 2, 4, 4, 64), (128, 64, 6, 2, 3, 3, 4, 32), (256, 96, 5, 4, 4, 2, 4, 32),
            (128, 128, 3, 3, 1, 8, 8, 128), (4096, 1024, 16, 1, 10, 4, 4, 64), (4096, 1024, 16, 4, 10, 3, 4, 64),
        ]:
            pool = quantized_pool(hidden, inter, slots, ub, db, gs, dtype)
            x = mx.array(rng.standard_normal((tokens, hidden)).astype(np.float32)).astype(dtype)
            ids = mx.array(rng.integers(0, slots, (tokens, k)).astype(np.uint32))
            w = mx.array(rng.random((tokens, k)).astype(np.float32)).astype(dtype)
            got = expert_swiglu(x, pool, ids, w).astype(mx.float32)
            want = expert_swiglu_reference(x.astype(mx.float32), pool, ids, w.astype(mx.float32))
            err = mx.abs(got - want).max().item() / max(1e-6, mx.abs(want).max().item())
            rows.append({"dtype": str(dtype), "shape": [hidden, inter, slots, tokens, k], "bits": [ub, db],
                         "group_size": gs, "max_rel_err": err, "ok": err <= (1e-4 if dtype == mx.float32 else 2e-2)})
    return rows


def interleaved(paths: dict, repeats: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per evaluation of each of `paths` (name -> function building what to evaluate), in `rounds` rounds
    that take the paths in turn, each `repeats` evaluations after 2 to warm up. A drift of the machine (clocks,
    the host's other load) then touches every path alike, and the spread over the rounds shows the noise."""
    times = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            for _ in range(2):
                mx.eval(fn())
            t0 = time.perf_counter()
            for _ in range(repeats):
                mx.eval(fn())
            times[name].append((time.perf_counter() - t0) / repeats)
    return times


def ratios(times: dict[str, list[float]], slow: str, fast: str) -> tuple[float, float, float]:
    """(median, min, max) over the rounds of times[slow] / times[fast], each ratio within one round."""
    r = np.array(times[slow]) / np.array(times[fast])
    return float(np.median(r)), float(r.min()), float(r.max())


def expert_bytes(hidden, inter, up_bits, down_bits, group_size, k=10) -> int:
    """Bytes a token's k experts read: gate, up and down weights, and a bfloat16 scale and bias per group."""
    return k * (hidden * inter * (2 * up_bits + down_bits) // 8 + 3 * 2 * 2 * hidden * inter // group_size)


def speed(up_bits, down_bits, layers=30, slots=64, k=10, iters=50, rounds=5) -> dict:
    """Ms per token through `layers` MoE layers of Qwen3.5-397B's shape, built-in path against the fused kernels,
    plain and compiled, timed in interleaved rounds (medians; speedups with their range)."""
    hidden, inter, gs = 4096, 1024, 64
    pools = [quantized_pool(hidden, inter, slots, up_bits, down_bits, gs, mx.bfloat16) for _ in range(layers)]
    rng = np.random.default_rng(1)
    ids = [mx.array(rng.choice(slots, k, replace=False)[None].astype(np.uint32)) for _ in range(layers)]
    weights = mx.softmax(mx.random.normal((1, k)), axis=-1).astype(mx.bfloat16)
    x0 = mx.random.normal((1, hidden)).astype(mx.bfloat16)

    def builtin(x):
        for pool, i in zip(pools, ids):
            x = (pool(x, i) * weights[..., None]).sum(axis=-2)
        return x

    def fused(x):
        for pool, i in zip(pools, ids):
            x = expert_swiglu(x, pool, i, weights)
        return x

    active = expert_bytes(hidden, inter, up_bits, down_bits, gs, k) * layers
    repeats = max(1, iters // rounds)
    # mx.compile replays the traced graph: the per-call host work of building each op (which for a custom
    # kernel includes rebuilding and hashing its source) is paid once, at trace time.
    compiled_builtin, compiled_fused = mx.compile(builtin), mx.compile(fused)
    times = interleaved({"builtin": lambda: builtin(x0), "fused": lambda: fused(x0),
                         "compiled builtin": lambda: compiled_builtin(x0),
                         "compiled fused": lambda: compiled_fused(x0)}, repeats, rounds)
    a, b, ac, bc = (float(np.median(times[n])) for n in ("builtin", "fused", "compiled builtin", "compiled fused"))
    speedup, compiled_speedup = ratios(times, "builtin", "fused"), ratios(times, "compiled builtin", "compiled fused")
    return {"bits": [up_bits, down_bits], "layers": layers, "k": k, "active_bytes": active, "rounds": rounds,
            "builtin_ms": a * 1e3, "fused_ms": b * 1e3, "builtin_gbps": active / a / 1e9,
            "fused_gbps": active / b / 1e9, "speedup": speedup[0], "speedup_range": speedup[1:],
            "compiled": {"builtin_ms": ac * 1e3, "fused_ms": bc * 1e3, "fused_gbps": active / bc / 1e9,
                         "speedup": compiled_speedup[0], "speedup_range": compiled_speedup[1:]}}


def op_overhead(op=None, ops=60, iters=50) -> float:
    """Seconds per trivially small op (default: an add) in an evaluated chain: the framework's floor per
    kernel launch, host work included."""
    op = op or (lambda y: y + 1)
    x = mx.zeros((1, 16))
    mx.eval(x)

    def chain():
        y = x
        for _ in range(ops):
            y = op(y)
        return y

    mx.eval(chain())
    t0 = time.perf_counter()
    for _ in range(iters):
        mx.eval(chain())
    return (time.perf_counter() - t0) / iters / ops


def tiny_custom_kernel(header_bytes=0, template_arguments=0):
    """y = x + 1 as a custom kernel of this backend ([1, 16] floats): what any custom kernel costs per launch;
    with a header of about `header_bytes` of comment lines, what a longer source adds (MLX builds each call's
    source anew and hashes it when the call is evaluated); with `template_arguments` int template arguments per
    call, what those add (why our kernels take their constants in the source: kernels.mlx_sources)."""
    backend = kernels.gpu_backend()
    index = "thread_position_in_grid.x" if backend == "metal" else "blockIdx.x * blockDim.x + threadIdx.x"
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    header = f"// {'x' * 76}\n" * (header_bytes // 80)  # 80-byte lines
    kernel = make(name=f"bench_tiny_{header_bytes}", input_names=["x"], output_names=["y"], header=header,
                  source=f"uint32_t i = {index}; y[i] = x[i] + 1.0f;")
    template = [(f"C{n}", n) for n in range(template_arguments)]
    return lambda x: kernel(inputs=[x], template=template, grid=(16, 1, 1), threadgroup=(16, 1, 1),
                            output_shapes=[x.shape], output_dtypes=[x.dtype])[0]


HOST_COST_SOURCE_BYTES = (0, 8000, 20000, 60000)  # our kernels' sources run 8-20 KB (prelude header included)
HOST_COST_TEMPLATE_ARGUMENTS = (0, 10)  # our launches have 5-10 constants


def host_cost(rounds=3, calls=100, hidden=4096, inter=1024, keys=32768) -> dict:
    """Host time per call (us): a tiny custom kernel in an evaluated chain as its source grows
    (HOST_COST_SOURCE_BYTES of header) and as its calls carry HOST_COST_TEMPLATE_ARGUMENTS, the median of
    `rounds`; and building `calls` of each of our two wrappers' calls without evaluating them (expert_swiglu at
    Qwen3.5's shape, hidden -> inter, k = 10; attention_decode at `keys` keys, dim 128), per call."""
    rows = {f"custom_kernel_us_by_{arg}": {
        n: float(np.median([op_overhead(tiny_custom_kernel(**{arg: n})) * 1e6 for _ in range(rounds)]))
        for n in sizes} for arg, sizes in (("header_bytes", HOST_COST_SOURCE_BYTES),
                                           ("template_arguments", HOST_COST_TEMPLATE_ARGUMENTS))}
    pool = quantized_pool(hidden, inter, 10, 4, 4, 64, mx.bfloat16)
    ids = mx.array(np.arange(10)[None].astype(np.uint32))
    w = mx.softmax(mx.random.normal((1, 10)), axis=-1).astype(mx.bfloat16)
    x = mx.random.normal((1, hidden)).astype(mx.bfloat16)
    view, _ = cache_view(keys, 4, 128, 64, 4, 256)
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.bfloat16)
    mx.eval(pool, ids, w, x, view, q)
    from flashmoe_mlx.kernels import attention_decode
    for name, call in (("expert_swiglu", lambda: expert_swiglu(x, pool, ids, w)),
                       ("attention_decode", lambda: attention_decode(q, view, view, 128 ** -0.5, 64, 4))):
        mx.eval(call())
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            outs = [call() for _ in range(calls)]
            times.append((time.perf_counter() - t0) / calls * 1e6)
            mx.eval(outs)
        rows[f"{name}_build_us"] = float(np.median(times))
    return rows


@contextlib.contextmanager
def tuned(**values):
    """Kernel launch constants (flashmoe_mlx.kernels' UP_ROWS, ...) set to `values` inside the block."""
    chosen = {name: getattr(kernels, name) for name in values}
    for name, value in values.items():
        setattr(kernels, name, value)
    try:
        yield
    finally:
        for name, value in chosen.items():
            setattr(kernels, name, value)


BODIES = {  # pass 1 on CUDA: the scalar (Metal) body, then the tensor-core one
    "scalar": {"MMA_GATE_UP": False},
    "MMA pass 1": {"MMA_GATE_UP": True},
}


def bodies_sweep() -> list[dict]:
    """The fused path's ms per layer with each choice of bodies, compiled (so the GPU, not the host, sets the
    pace), 4/4 and 3/4 bits, side by side in one run; the built-in path's in the same rows."""
    out = []
    for name, values in BODIES.items():
        with tuned(**values):
            for bits in ((4, 4), (3, 4)):
                r = speed(*bits, layers=10, iters=30)
                out.append({"bodies": name, "bits": list(bits), "fused_ms_per_layer": r["compiled"]["fused_ms"] / 10,
                            "builtin_ms_per_layer": r["compiled"]["builtin_ms"] / 10})
    return out


def keys_sweep(choices=(32, 64, 128, 256)) -> list[dict]:
    """attention_decode's ms at other minimum keys per SIMD-group (fewer: more splits), each with one and with
    two keys per lane in every shape (the layout's own pick, TWO_KEYS_PER_LANE_MAX, is one of the two)."""
    out = []
    for keys in choices:
        for keys_per_lane in (1, 2):
            with tuned(KEYS_PER_SIMD_GROUP=keys, TWO_KEYS_PER_LANE_MAX=0 if keys_per_lane == 1 else 1 << 30):
                ms = [attention(iters=10)["ms"]["attention_decode"],
                      attention(kv_heads=2, dim=256, iters=10)["ms"]["attention_decode"]]
            out.append({"keys_per_simd_group": keys, "keys_per_lane": keys_per_lane, "ms": ms})
    return out


def mma_attention_sweep(choices=((4, 3, 64), (4, 2, 64), (2, 3, 64), (8, 2, 64), (4, 3, 32), (4, 3, 128))):
    """attention_decode's ms with the tensor-core split pass at other (SIMD-groups, stages, min keys per
    SIMD-group); the layout still cuts the first two where threadgroup memory would not fit."""
    out = []
    for warps, stages, keys in choices:
        with tuned(MMA_ATTENTION_WARPS=warps, MMA_ATTENTION_STAGES=stages, MMA_KEYS_PER_SIMD_GROUP=keys):
            ms = [attention(iters=10)["ms"]["attention_decode"],
                  attention(kv_heads=2, dim=256, iters=10)["ms"]["attention_decode"]]
        out.append({"warps": warps, "stages": stages, "keys_per_simd_group": keys, "ms": ms})
    return out


def profile_once():
    """One layer and one attention step, each path twice (the fused path with each choice of bodies, attention with
    the scalar split pass and then, on CUDA, the tensor-core one at MMA_KEYS_PER_SIMD_GROUP = 32, 64 and 128 and
    with each kv head's query heads in one threadgroup): a short run for a kernel profiler (ncu) to time the
    kernels alone."""
    tensor_cores = kernels.has_tensor_cores(active_runner())
    for tuning in ({"MMA_ATTENTION": False}, *({"MMA_KEYS_PER_SIMD_GROUP": k} for k in (32, 64, 128) if tensor_cores),
                   *({"MMA_HEAD_VALUES": 4096},) * tensor_cores):
        with tuned(**tuning):
            attention(iters=2, layers=1)
            attention(q_heads=32, kv_heads=2, dim=256, iters=2, layers=1)
    for bits in ((4, 4), (3, 4)):
        pool = quantized_pool(4096, 1024, 64, *bits, 64, mx.bfloat16)
        ids = mx.array(np.arange(0, 60, 6)[None].astype(np.uint32))
        w = mx.softmax(mx.random.normal((1, 10)), axis=-1).astype(mx.bfloat16)
        x = mx.random.normal((1, 4096)).astype(mx.bfloat16)
        for _ in range(2):
            mx.eval((pool(x, ids) * w[..., None]).sum(axis=-2))
        for values in BODIES.values():
            with tuned(**values):
                for _ in range(3):
                    mx.eval(expert_swiglu(x, pool, ids, w))


CHAIN_BITS = ((4, 4), (3, 4))  # (gate/up, down) bits of profile_chain's layers, in its order
CHAIN_GROUP_SIZE = 64
NCU_UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,  # times -> us
             "byte": 1e-6, "B": 1e-6, "Kbyte": 1e-3, "KB": 1e-3, "Mbyte": 1.0, "MB": 1.0,  # bytes -> MB
             "Gbyte": 1e3, "GB": 1e3}


CHAIN_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum")


def ncu_launches(csv_text: str, metrics: tuple) -> list[dict]:
    """ncu's --csv output (one quoted row per launch and metric) as one dict per launch in launch order: its
    kernel name and those of `metrics` it has, times in us, bytes in MB, counts (registers) as they are; other
    metrics may ride along."""
    rows = list(csv.reader(line for line in csv_text.splitlines() if line.startswith('"')))
    if not rows:
        raise ValueError("no quoted CSV rows: not the output of ncu --csv")
    head = rows[0]
    at = {name: head.index(name) for name in ("ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value")}
    launches = {}
    for r in rows[1:]:
        launch = launches.setdefault(int(r[at["ID"]]), {"name": r[at["Kernel Name"]]})
        if r[at["Metric Name"]] in metrics:
            value = float(r[at["Metric Value"]].replace(",", "")) * NCU_UNITS.get(r[at["Metric Unit"]], 1.0)
            launch[r[at["Metric Name"]]] = value
    return [launches[i] for i in sorted(launches)]


def chain_table(csv_text: str, layers=8, hidden=4096, inter=1024) -> list[dict]:
    """From ncu's --csv output over `--profile-chain` (CHAIN_METRICS among its metrics, kernels flashmoe_expert*
    only): per (bits, pass-1 body), medians and ranges over the second chain's layers of each pass's time (us) and
    DRAM reads (MB), their sum per layer, and that layer's active bytes over it."""
    launches = ncu_launches(csv_text, CHAIN_METRICS)
    per_body = 2 * 2 * layers  # two chains of layers, two passes each
    if len(launches) != len(CHAIN_BITS) * len(BODIES) * per_body:
        raise ValueError(f"{len(launches)} launches in the profile; --profile-chain at {layers} layers makes "
                         f"{len(CHAIN_BITS) * len(BODIES) * per_body}")
    out = []
    for n, (bits, body) in enumerate((bits, body) for bits in CHAIN_BITS for body in BODIES):
        second = launches[n * per_body + per_body // 2:(n + 1) * per_body]
        passes = second[0::2], second[1::2]
        if not all("gate_up" in a["name"] and "down" in b["name"] for a, b in zip(*passes)):
            raise ValueError(f"the launches of {bits} bits, {body}, are not pass 1 then pass 2 in turn")
        row = {"bits": list(bits), "body": body}
        for name, launched in zip(("pass1", "pass2"), passes):
            us = [a["gpu__time_duration.sum"] for a in launched]
            row[f"{name}_us"], row[f"{name}_us_range"] = float(np.median(us)), [min(us), max(us)]
            row[f"{name}_dram_mb"] = float(np.median([a["dram__bytes_read.sum"] for a in launched]))
        row["layer_us"] = float(np.median([a["gpu__time_duration.sum"] + b["gpu__time_duration.sum"]
                                           for a, b in zip(*passes)]))
        row["layer_tbps"] = expert_bytes(hidden, inter, *bits, CHAIN_GROUP_SIZE) / row["layer_us"] / 1e6
        out.append(row)
    return out


def print_chain_table(rows: list[dict]):
    print("| bits | pass-1 body | pass 1 us | pass 1 MB | pass 2 us | pass 2 MB | per layer us | TB/s (of 4.8) |\n"
          + "|---" * 8 + "|")
    for r in rows:
        passes = " | ".join(f"{r[f'{p}_us']:.1f} ({r[f'{p}_us_range'][0]:.1f}-{r[f'{p}_us_range'][1]:.1f}) "
                            f"| {r[f'{p}_dram_mb']:.1f}" for p in ("pass1", "pass2"))
        print(f"| {'/'.join(map(str, r['bits']))} | {r['body']} | {passes} | {r['layer_us']:.1f} "
              f"| {r['layer_tbps']:.2f} ({r['layer_tbps'] / 4.8:.0%}) |")


def read_bound_sizes(hidden=4096, inter=1024, k=10, gs=CHAIN_GROUP_SIZE, keys=32768, heads=32, kv_heads=4,
                     dim=128) -> dict:
    """Bytes that each of our launches reads at the goals' shapes (Qwen3.5's experts, k = 10; attention over a
    4-bit cache of `keys` keys: the split pass's KV, the combine pass's partials, float32 o, m and l of each
    split as the tensor-core layout splits the keys), and each layer's whole, as the read bound's labels take them."""
    def gate_up(bits):
        return k * 2 * (hidden * inter * bits // 8 + 2 * 2 * hidden * inter // gs)
    down = k * (hidden * inter * 4 // 8 + 2 * 2 * hidden * inter // gs)
    kv = 2 * kv_heads * keys * (dim * 4 // 8 + 2 * 2 * dim // gs)
    splits = kernels.attention_mma_layout(kv_heads, keys, heads // kv_heads, dim, gs)[0]
    return {"experts 4/4, pass 1": gate_up(4), "experts 3/4, pass 1": gate_up(3), "experts, pass 2": down,
            "experts 4/4, layer": gate_up(4) + down, "experts 3/4, layer": gate_up(3) + down, "attention, KV": kv,
            "attention, partials": heads * splits * (dim + 2) * 4}


READ_BOUND_LAUNCHES = ((264, 8), (528, 8), (1056, 4), (1056, 8), (2112, 4))  # (threadgroups, loads): 2-16 per SM


def profile_read(launches=3, threads=256, ring_bytes=160 << 20):
    """stream_read over each of read_bound_sizes' byte counts at each of READ_BOUND_LAUNCHES, `launches` times,
    each launch over the next buffer of a ring of at least `ring_bytes` (more than the L2 holds: what a launch
    reads was last read that many bytes ago), for ncu: the fastest our launches could read those bytes. Kernel
    names carry N, threadgroups, threads and loads; --read-table makes the table."""
    for nbytes in read_bound_sizes().values():
        n = nbytes // 16 * 4
        ring = [mx.full((n,), i, mx.uint32) for i in range(max(2, -(-ring_bytes // nbytes)))]
        mx.eval(ring)
        for i, (groups, loads) in enumerate(s for s in READ_BOUND_LAUNCHES for _ in range(launches)):
            mx.eval(kernels.stream_read(ring[i % len(ring)], groups, threads, loads))
        del ring


def read_table(csv_text: str) -> dict:
    """From ncu's --csv output over --profile-read (gpu__time_duration.sum among its metrics): per byte count of
    read_bound_sizes, the median us of each launch shape and the best; and per layer the best of one launch for
    all of its bytes against two launches (the passes, or the KV read plus the combine's few)."""
    times = {}
    for launch in ncu_launches(csv_text, ("gpu__time_duration.sum",)):
        named = re.search(r"stream_read_(\d+)_(\d+)_(\d+)_(\d+)", launch["name"])
        if named and "gpu__time_duration.sum" in launch:
            words, groups, _, loads = map(int, named.groups())
            times.setdefault(4 * words, {}).setdefault(f"{groups}x{loads}", []).append(launch["gpu__time_duration.sum"])
    sizes = {}
    for label, nbytes in read_bound_sizes().items():
        shapes = {shape: float(np.median(us)) for shape, us in times.get(nbytes // 16 * 16, {}).items()}
        if not shapes:
            raise ValueError(f"no stream_read launch over {nbytes} bytes ({label}) in the profile")
        sizes[label] = {"bytes": nbytes, "us_by_launch": shapes, "best_us": min(shapes.values())}
    best = {label: row["best_us"] for label, row in sizes.items()}
    layers = {}
    for bits in ("4/4", "3/4"):
        layers[f"experts {bits}"] = {"bytes": sizes[f"experts {bits}, layer"]["bytes"],
                                     "one_launch_us": best[f"experts {bits}, layer"],
                                     "two_launches_us": best[f"experts {bits}, pass 1"] + best["experts, pass 2"]}
    layers["attention"] = {"bytes": sizes["attention, KV"]["bytes"], "one_launch_us": best["attention, KV"],
                           "two_launches_us": best["attention, KV"] + best["attention, partials"]}
    return {"sizes": sizes, "layers": layers}


def read_shapes(result: dict) -> list[str]:
    """The launch shapes (threadgroups x loads) in read_table's result, in order."""
    return sorted({s for row in result["sizes"].values() for s in row["us_by_launch"]},
                  key=lambda s: tuple(map(int, s.split("x"))))


def print_read_table(result: dict, peak_tbps=4.8):
    shapes = read_shapes(result)
    print("| bytes read | MB | " + " | ".join(f"{s} us" for s in shapes) + " | best TB/s |\n"
          + "|---" * (3 + len(shapes)) + "|")
    for label, row in result["sizes"].items():
        tbps = row["bytes"] / row["best_us"] / 1e6
        print(f"| {label} | {row['bytes'] / 1e6:.1f} | "
              + " | ".join(f"{row['us_by_launch'].get(s, float('nan')):.1f}" for s in shapes)
              + f" | {tbps:.2f} ({tbps / peak_tbps:.0%}) |")
    print(f"\n| layer | MB | one launch, us (of {peak_tbps} TB/s) | two launches, us (of {peak_tbps} TB/s) |\n"
          "|---|---|---|---|")
    for label, row in result["layers"].items():
        share = {n: row["bytes"] / row[f"{n}_us"] / 1e6 / peak_tbps for n in ("one_launch", "two_launches")}
        print(f"| {label} | {row['bytes'] / 1e6:.1f} | {row['one_launch_us']:.1f} ({share['one_launch']:.0%}) "
              f"| {row['two_launches_us']:.1f} ({share['two_launches']:.0%}) |")


def profile_chain(layers=8, slots=16, hidden=4096, inter=1024):
    """Expert layers (Qwen3.5-397B's shape, k = 10) in one evaluated chain, each over its own pool (together more
    than the L2 holds), 4/4 and 3/4 bits, with each choice of pass-1 body: each chain twice, for a profiler that
    leaves the caches as the kernels leave them (ncu --cache-control none), as a decode step does: a layer's kernels
    find nothing of their bytes in L2 but what they share with each other. Launch order, which a reading of the
    profile goes by: bits, body, chain, layer, pass."""
    rng = np.random.default_rng(2)
    w = mx.softmax(mx.random.normal((1, 10)), axis=-1).astype(mx.bfloat16)
    x0 = mx.random.normal((1, hidden)).astype(mx.bfloat16)
    for bits in CHAIN_BITS:
        pools = [quantized_pool(hidden, inter, slots, *bits, CHAIN_GROUP_SIZE, mx.bfloat16) for _ in range(layers)]
        ids = [mx.array(rng.choice(slots, 10, replace=False)[None].astype(np.uint32)) for _ in range(layers)]
        mx.eval(ids)
        for values in BODIES.values():
            with tuned(**values):
                for _ in range(2):
                    x = x0
                    for pool, i in zip(pools, ids):
                        x = expert_swiglu(x, pool, i, w)
                    mx.eval(x)
        del pools


def cache_view(n, hkv, d, gs, bits, spare):
    """A quantized cache as decoding hands it over, a view of n keys of a buffer of n + spare; and the same as
    whole arrays."""
    view = tuple(a[..., :n, :] for a in mx.quantize(mx.random.normal((1, hkv, n + spare, d)).astype(mx.bfloat16),
                                                     gs, bits))
    return view, tuple(mx.contiguous(a) for a in view)


def mlx_lm_cache(n, hkv, d, gs, bits):
    """Views from mlx-lm's own QuantizedKVCache: a prompt of n - 1 keys, then one decode step."""
    from mlx_lm.models.cache import QuantizedKVCache

    cache = QuantizedKVCache(group_size=gs, bits=bits)
    kv = lambda m: mx.random.normal((1, hkv, m, d)).astype(mx.bfloat16)  # noqa: E731
    cache.update_and_fetch(kv(n - 1), kv(n - 1))
    return cache.update_and_fetch(kv(1), kv(1))


ATTENTION_TUNINGS = {"shipped": {}, "tensor cores, 32 keys per SIMD-group": {"MMA_KEYS_PER_SIMD_GROUP": 32},
                     "tensor cores, query heads over 2-4 threadgroups": {"MMA_HEAD_VALUES": 512},
                     "scalar split body": {"MMA_ATTENTION": False}}


def attention_correctness() -> list[dict]:
    """attention_decode against the float32 reference on the CPU, bfloat16 in, over views of caches with spare
    capacity and over caches made by mlx-lm's QuantizedKVCache, with each of ATTENTION_TUNINGS (on CUDA: the
    shipped launch, whose SIMD-groups each walk a ring of stages more than once; 32 keys per SIMD-group, whose
    rings do not wrap; a kv head's query heads over 2-4 threadgroups; and the scalar body).
    Tolerance as the tests': 2^-8 of the largest output plus 2^-9 of the largest V."""
    from flashmoe_mlx.kernels import attention_decode, attention_decode_reference

    f32 = lambda c: tuple(a if a.dtype == mx.uint32 else a.astype(mx.float32) for a in c)  # noqa: E731
    rng = np.random.default_rng(2)
    rows = []
    for n, hq, hkv, d, bits, gs, made_by in [
        (40, 4, 1, 64, 4, 64, "view"), (1100, 8, 2, 128, 8, 32, "view"), (5000, 16, 2, 256, 4, 64, "view"),
        (9000, 32, 4, 128, 4, 64, "view"), (4999, 24, 2, 128, 4, 64, "view"), (17, 8, 8, 128, 4, 64, "view"),
        (1000, 32, 4, 128, 4, 64, "mlx-lm"), (33000, 32, 2, 256, 4, 64, "mlx-lm"),
    ]:
        q = mx.array(rng.standard_normal((1, hq, 1, d)).astype(np.float32)).astype(mx.bfloat16)
        if made_by == "mlx-lm":
            k, v = mlx_lm_cache(n, hkv, d, gs, bits)
        else:
            (k, _), (v, _) = (cache_view(n, hkv, d, gs, bits, 256 - n % 256 + 7) for _ in range(2))
        with mx.stream(mx.cpu):
            want = attention_decode_reference(q.astype(mx.float32), f32(k), f32(v), d ** -0.5, gs, bits)
            v_max = mx.abs(mx.dequantize(*f32(v), group_size=gs, bits=bits)).max().item()
            tol = 2 ** -8 * mx.abs(want).max().item() + 2 ** -9 * v_max
        for name, tuning in ATTENTION_TUNINGS.items():
            with tuned(**tuning):
                got = attention_decode(q, k, v, d ** -0.5, gs, bits).astype(mx.float32)
            err = mx.abs(got - want).max().item()
            rows.append({"keys": n, "heads": [hq, hkv], "dim": d, "bits": bits, "group_size": gs, "cache": made_by,
                         "tuning": name, "max_abs_err": err, "tolerance": tol, "ok": err <= tol})
    return rows


def attention(keys=32768, q_heads=32, kv_heads=4, dim=128, bits=4, group_size=64, iters=20, spare=256,
              layers=15, rounds=5) -> dict:
    """attention_decode vs dequantize + SDPA and vs mlx-lm's quantized attention, one token, bf16, each over the
    caches as decoding hands them over: views of the first `keys` keys of buffers with `spare` more (mlx-lm's
    quantized caches grow by 256 keys and return a view between growths). attention_decode also runs over
    whole arrays, for what the views cost it; mlx-lm's path only does (on CUDA its quantized_matmul refuses the
    views). Two timings per path: one call evaluated alone (host work and the wait for the GPU in series), and
    per layer of a decode step: `layers` layers, each over its own cache (together more than the L2 holds), the
    next layer's query made from this one's output, one eval per step, so later layers' launches overlap the
    GPU's work on earlier ones as in a model's step. Both timed over `rounds` rounds that take the paths in turn
    (`interleaved`): times are medians, speedups the median of the rounds' ratios, with their range. FMAs: the
    multiply-adds the step needs (2 * heads * keys * dim), for the compute bound."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    from flashmoe_mlx.kernels import attention_decode

    q0 = mx.random.normal((1, q_heads, 1, dim)).astype(mx.bfloat16)
    caches = [(cache_view(keys, kv_heads, dim, group_size, bits, spare),
               cache_view(keys, kv_heads, dim, group_size, bits, spare)) for _ in range(layers)]
    mx.eval(q0, caches)
    scale = dim ** -0.5

    def dequant_sdpa(q, k, v):
        kd = mx.dequantize(*k, group_size=group_size, bits=bits)
        vd = mx.dequantize(*v, group_size=group_size, bits=bits)
        return mx.fast.scaled_dot_product_attention(q, kd, vd, scale=scale)

    def scalar_body(q, k, v):
        with tuned(MMA_ATTENTION=False):
            return attention_decode(q, k, v, scale, group_size, bits)

    views, whole = (lambda c: (c[0][0], c[1][0])), (lambda c: (c[0][1], c[1][1]))  # noqa: E731
    paths = {"dequantize+sdpa": (dequant_sdpa, views),
             "mlx_lm quantized, whole arrays": (lambda q, k, v: quantized_scaled_dot_product_attention(
                 q, k, v, scale=scale, mask=None, group_size=group_size, bits=bits), whole),
             "attention_decode": (lambda q, k, v: attention_decode(q, k, v, scale, group_size, bits), views),
             "attention_decode, whole arrays": (lambda q, k, v: attention_decode(q, k, v, scale, group_size, bits),
                                                whole)}
    if kernels.has_tensor_cores(active_runner()):
        paths["attention_decode, scalar split body"] = (scalar_body, views)

    def step(fn, pick):  # the layers in a chain: each query is the previous layer's output
        q = q0
        for c in caches:
            q = fn(q, *pick(c))
        return q

    one_call = {name: (lambda fn=fn, pick=pick: fn(q0, *pick(caches[0]))) for name, (fn, pick) in paths.items()}
    one_step = {name: (lambda fn=fn, pick=pick: step(fn, pick)) for name, (fn, pick) in paths.items()}
    calls = interleaved(one_call, max(1, iters * layers // rounds), rounds)
    steps = interleaved(one_step, max(1, iters // rounds), rounds)
    steps = {name: [t / layers for t in times] for name, times in steps.items()}
    per_call = {name: float(np.median(times)) for name, times in calls.items()}
    per_layer = {name: float(np.median(times)) for name, times in steps.items()}
    build = {}
    for name, (fn, pick) in paths.items():
        t0 = time.perf_counter()
        graph = step(fn, pick)  # built, not yet run: the host's share before any kernel starts
        build[name] = (time.perf_counter() - t0) / layers
        mx.eval(graph)
    speedup, speedup_per_call = (ratios(t, "dequantize+sdpa", "attention_decode") for t in (steps, calls))
    kv_bytes = sum(a.nbytes for a in (*whole(caches[0])[0], *whole(caches[0])[1]))
    ms = lambda times: {n: t * 1e3 for n, t in times.items()}  # noqa: E731
    return {"keys": keys, "heads": [q_heads, kv_heads], "dim": dim, "bits": bits,
            "layers": layers, "kv_bytes": kv_bytes, "fmas": 2 * q_heads * keys * dim,
            "ms": ms(per_layer), "ms_per_call": ms(per_call),
            "build_us_per_layer": {n: t * 1e6 for n, t in build.items()},
            "gbps": {n: kv_bytes / t / 1e9 for n, t in per_layer.items()},
            "speedup_vs_dequant_sdpa": speedup[0], "speedup_vs_dequant_sdpa_range": speedup[1:],
            "speedup_vs_dequant_sdpa_per_call": speedup_per_call[0],
            "speedup_vs_dequant_sdpa_per_call_range": speedup_per_call[1:], "rounds": rounds}


def print_attention_check() -> list[dict]:
    rows = attention_correctness()
    print("| keys | heads | dim | bits | cache | tuning | max abs err | tolerance | ok |\n" + "|---" * 9 + "|")
    for r in rows:
        print(f"| {r['keys']} | {r['heads'][0]}/{r['heads'][1]} | {r['dim']} | {r['bits']} | {r['cache']} "
              f"| {r['tuning']} | {r['max_abs_err']:.1e} | {r['tolerance']:.1e} | {'yes' if r['ok'] else 'NO'} |")
    print(f"attention_decode: {sum(r['ok'] for r in rows)}/{len(rows)} cases within tolerance")
    return rows


def write_json(path: str | None, result):
    """`result` as indented JSON at `path`, where one was given (--json)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--profile", action="store_true", help="just run each path briefly, for ncu")
    ap.add_argument("--profile-chain", action="store_true",
                    help="expert layers in a chain over their own pools, for ncu --cache-control none")
    ap.add_argument("--chain-table", metavar="NCU_CSV",
                    help="read ncu's --csv output of --profile-chain and print its table (no GPU needed)")
    ap.add_argument("--profile-read", action="store_true",
                    help="the read bound: stream_read over our launches' byte counts, for ncu")
    ap.add_argument("--read-table", metavar="NCU_CSV",
                    help="read ncu's --csv output of --profile-read and print its table (no GPU needed)")
    ap.add_argument("--only", choices=("experts", "attention"), default=None)
    ap.add_argument("--check", action="store_true", help="just the correctness checks of both kernels")
    ap.add_argument("--host-cost", action="store_true",
                    help="host time per custom-kernel call against its source's length, and per wrapper call")
    args = ap.parse_args()
    for csv_path, parse, show in ((args.chain_table, chain_table, print_chain_table),
                                  (args.read_table, read_table, print_read_table)):  # ncu's output, no GPU
        if csv_path:
            with open(csv_path) as f:
                result = parse(f.read())
            show(result)
            write_json(args.json, result)
            return
    if active_runner() is None:
        raise SystemExit("no GPU kernel backend here (needs MLX with Metal or CUDA)")
    if args.profile:
        return profile_once()
    if args.profile_chain:
        return profile_chain()
    if args.profile_read:
        return profile_read()
    if args.host_cost:
        result = host_cost()
        print(json.dumps(result, indent=1))
        write_json(args.json, result)
        return
    if args.check:
        result = {"correctness": correctness(), "attention_correctness": print_attention_check()}
        print(f"expert_swiglu: {sum(r['ok'] for r in result['correctness'])}/{len(result['correctness'])} cases "
              f"within tolerance")
        write_json(args.json, result)
        return
    bound = device_copy_gbps(nbytes=4 << 30, repeats=5)
    result = {"device": mx.device_info().get("device_name", "?"), "copy_bandwidth_gbps": bound,
              "op_overhead_us": op_overhead() * 1e6,
              "custom_kernel_overhead_us": op_overhead(tiny_custom_kernel()) * 1e6}
    print(f"per launch in a chain of 60, host work included: built-in add {result['op_overhead_us']:.1f} us, "
          f"custom kernel {result['custom_kernel_overhead_us']:.1f} us")
    if args.only != "experts":
        result["attention_correctness"] = print_attention_check()
        result["attention"] = [attention(), attention(kv_heads=2, dim=256)]
        for attn in result["attention"]:
            print(f"\n| {attn['keys']} keys, heads {attn['heads'][0]}/{attn['heads'][1]}, dim {attn['dim']}, "
                  f"4-bit KV ({attn['kv_bytes'] / 1e6:.0f} MB, {attn['fmas'] / 1e6:.0f}M FMA) | ms per layer of a "
                  f"{attn['layers']}-layer step | GB/s | of copy bound | TFMA/s | ms per call alone "
                  f"| graph build us per layer |\n|---|---|---|---|---|---|---|")
            for name, ms in attn["ms"].items():
                print(f"| {name} | {ms:.3f} | {attn['gbps'][name]:.0f} | {attn['gbps'][name] / bound:.0%} "
                      f"| {attn['fmas'] / ms / 1e9:.1f} | {attn['ms_per_call'][name]:.3f} "
                      f"| {attn['build_us_per_layer'][name]:.1f} |")
            low, high = attn["speedup_vs_dequant_sdpa_range"]
            low_call, high_call = attn["speedup_vs_dequant_sdpa_per_call_range"]
            print(f"attention_decode over dequantize + SDPA: {attn['speedup_vs_dequant_sdpa']:.2f}x per layer "
                  f"({low:.2f}-{high:.2f}x over {attn['rounds']} rounds), "
                  f"{attn['speedup_vs_dequant_sdpa_per_call']:.2f}x per call ({low_call:.2f}-{high_call:.2f}x)")
        if kernels.has_tensor_cores(active_runner()):
            result["mma_attention_sweep"] = mma_attention_sweep()
            print("\n| SIMD-groups | stages | min keys per SIMD-group | ms (32/4 heads, dim 128) "
                  "| ms (32/2 heads, dim 256) |\n|---|---|---|---|---|")
            for r in result["mma_attention_sweep"]:
                print(f"| {r['warps']} | {r['stages']} | {r['keys_per_simd_group']} | {r['ms'][0]:.3f} "
                      f"| {r['ms'][1]:.3f} |")
        else:
            result["keys_sweep"] = keys_sweep()
            print("\n| min keys per SIMD-group | keys per lane | ms (32/4 heads, dim 128) | ms (32/2 heads, dim 256) |"
                  "\n|---|---|---|---|")
            for r in result["keys_sweep"]:
                print(f"| {r['keys_per_simd_group']} | {r['keys_per_lane']} | {r['ms'][0]:.3f} | {r['ms'][1]:.3f} |")
    if args.only == "attention":
        write_json(args.json, result)
        return
    rows = correctness()
    runs = [speed(4, 4), speed(3, 4)]
    result.update(correctness=rows, speed=runs, bodies_sweep=bodies_sweep())
    print(f"\ncorrectness: {sum(r['ok'] for r in rows)}/{len(rows)} cases within tolerance; "
          f"framework floor {result['op_overhead_us']:.1f} us per op")
    print(f"\n| experts (gate/up, down bits) | built-in ms/token | fused ms/token | built-in GB/s | fused GB/s "
          f"| fused / copy bound ({bound:.0f} GB/s) | speedup (range over rounds) |\n|---|---|---|---|---|---|---|")
    for r in runs:
        c = r["compiled"]
        for label, a, b, x, (low, high) in (
                (r["bits"], r["builtin_ms"], r["fused_ms"], r["speedup"], r["speedup_range"]),
                (r["bits"] + ["mx.compile"], c["builtin_ms"], c["fused_ms"], c["speedup"], c["speedup_range"])):
            gbps_a, gbps_b = r["active_bytes"] / a / 1e6, r["active_bytes"] / b / 1e6
            print(f"| {'/'.join(map(str, label))} | {a:.2f} | {b:.2f} | {gbps_a:.0f} | {gbps_b:.0f} "
                  f"| {gbps_b / bound:.0%} | {x:.1f}x ({low:.1f}-{high:.1f}) |")
    print("\n| bodies | bits | fused ms/layer (compiled) | built-in ms/layer (compiled) |\n|---|---|---|---|")
    for r in result["bodies_sweep"]:
        print(f"| {r['bodies']} | {'/'.join(map(str, r['bits']))} | {r['fused_ms_per_layer']:.4f} "
              f"| {r['builtin_ms_per_layer']:.4f} |")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
