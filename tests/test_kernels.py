"""Kernels: the Metal bodies, executed on the CPU by the C++ emulation, against plain-MLX references."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_emulator import run_emulated, run_emulated_cuda, shared_bytes
from mlx_lm.models.switch_layers import SwitchGLU

from flashmoe_mlx import kernels
from flashmoe_mlx.kernels import expert_swiglu, expert_swiglu_reference


def refuse(launch):
    """A runner for shapes that must not reach a kernel."""
    raise AssertionError(f"{launch.kernel} ran on a shape it does not take")


def quantized_pool(hidden, inter, slots, up_bits, down_bits, group_size, seed):
    mx.random.seed(seed)
    pool = SwitchGLU(hidden, inter, slots)
    nn.quantize(pool, class_predicate=lambda path, m: hasattr(m, "to_quantized") and {
        "group_size": group_size, "bits": down_bits if path == "down_proj" else up_bits})
    return pool


CASES = [  # hidden, inter, slots, tokens, k, up bits, down bits, group size
    (128, 64, 6, 1, 2, 4, 4, 64),
    (128, 64, 6, 2, 3, 3, 4, 32),  # the 3bit recipe: mixed precision
    (256, 96, 5, 4, 4, 2, 4, 32),  # 96 rows: blocks that do not fill a threadgroup
    (128, 128, 3, 3, 1, 8, 8, 128),
    (192, 64, 9, 1, 8, 4, 2, 64),
    (64, 32, 2, 4, 2, 3, 3, 32),
    (1056, 96, 4, 2, 3, 4, 3, 32),  # 33 packs per row: lane 0 takes two
    (64, 1088, 2, 1, 2, 3, 8, 64),  # the same in the down projection
]


@pytest.mark.parametrize("hidden, inter, slots, tokens, k, up_bits, down_bits, group_size", CASES)
def test_expert_swiglu_metal_body_matches_reference(hidden, inter, slots, tokens, k, up_bits, down_bits, group_size):
    pool = quantized_pool(hidden, inter, slots, up_bits, down_bits, group_size, seed=hidden + k)
    rng = np.random.default_rng(inter + tokens)
    x = mx.array(rng.standard_normal((tokens, hidden)).astype(np.float32))
    slot_ids = mx.array(rng.integers(0, slots, (tokens, k)).astype(np.uint32))
    weights = mx.array(rng.random((tokens, k)).astype(np.float32))
    for w in (weights, None):
        got = expert_swiglu(x, pool, slot_ids, w, runner=run_emulated)
        want = expert_swiglu_reference(x, pool, slot_ids, w)
        assert got.shape == want.shape and np.isfinite(np.array(got)).all()  # outputs start as NaN
        assert mx.abs(got - want).max().item() <= 1e-4 * max(1.0, mx.abs(want).max().item())
    # The reference itself is mlx-lm's SwitchGLU arithmetic.
    assert mx.abs(expert_swiglu_reference(x, pool, slot_ids) - pool(x, slot_ids)).max().item() <= 1e-5


@pytest.mark.parametrize("up_rows, up_warps, down_rows", [(4, 4, 8), (8, 4, 16), (1, 8, 4), (5, 4, 8)])
def test_expert_swiglu_bodies_at_other_launch_tunings(up_rows, up_warps, down_rows, monkeypatch):
    """The bodies stay exact at the row and SIMD-group counts the benchmark sweeps (not only the shipped ones),
    on blocks that do not fill a threadgroup and a row of 33 packs; and at 5 rows per pass-1 SIMD-group, whose
    last block of the 96 rows holds one real row (the others must not be written)."""
    from flashmoe_mlx import kernels

    for name, value in (("UP_ROWS", up_rows), ("UP_WARPS", up_warps), ("DOWN_ROWS", down_rows)):
        monkeypatch.setattr(kernels, name, value)
    hidden, inter, slots, tokens, k, up_bits, down_bits, group_size = 1056, 96, 4, 2, 3, 4, 3, 32
    pool = quantized_pool(hidden, inter, slots, up_bits, down_bits, group_size, seed=up_rows)
    rng = np.random.default_rng(up_warps)
    x = mx.array(rng.standard_normal((tokens, hidden)).astype(np.float32))
    slot_ids = mx.array(rng.integers(0, slots, (tokens, k)).astype(np.uint32))
    weights = mx.array(rng.random((tokens, k)).astype(np.float32))
    got = expert_swiglu(x, pool, slot_ids, weights, runner=run_emulated)
    want = expert_swiglu_reference(x, pool, slot_ids, weights)
    assert mx.abs(got - want).max().item() <= 1e-4 * max(1.0, mx.abs(want).max().item())


def check_tensor_core_passes(hidden, inter, slots, tokens, k, up_bits, down_bits, group_size, seed):
    """expert_swiglu as on a CUDA device (the tensor-core pass 1 where it takes the shape, its MMA emulated),
    bfloat16: pass 1's h against silu(gate x) * up x from plain MLX ops in float32, and y, combined and per expert,
    against the reference. Returns the bodies that ran."""
    pool = quantized_pool(hidden, inter, slots, up_bits, down_bits, group_size, seed=seed)
    pool.set_dtype(mx.bfloat16)
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((tokens, hidden)).astype(np.float32)).astype(mx.bfloat16)
    slot_ids = mx.array(rng.integers(0, slots, (tokens, k)).astype(np.uint32))
    weights = mx.array(rng.random((tokens, k)).astype(np.float32)).astype(mx.bfloat16)
    outputs = {}

    def spying(launch):
        outputs[launch.kernel] = run_emulated_cuda(launch)[0]
        return [outputs[launch.kernel]]

    spying.tensor_cores = True

    def project(proj, v):
        w = mx.dequantize(proj.weight[slot_ids], proj.scales[slot_ids].astype(mx.float32),
                          proj.biases[slot_ids].astype(mx.float32), group_size, proj.bits)
        return (w @ v[..., None])[..., 0]

    for w in (weights, None):
        got = expert_swiglu(x, pool, slot_ids, w, runner=spying).astype(mx.float32)
        want = expert_swiglu_reference(x.astype(mx.float32), pool, slot_ids,
                                       None if w is None else w.astype(mx.float32))
        assert got.shape == want.shape and np.isfinite(np.array(got)).all()  # outputs start as NaN
        assert mx.abs(got - want).max().item() <= 2 ** -8 * mx.abs(want).max().item()  # y is bfloat16
    xs = mx.broadcast_to(x.astype(mx.float32)[:, None], (tokens, k, hidden))
    want_h = nn.silu(project(pool.gate_proj, xs)) * project(pool.up_proj, xs)
    # h is pack-transposed: row 32 p + i at i * inter / 32 + p
    h = next(o for name, o in outputs.items() if "gate_up" in name)
    h = h.reshape(tokens, k, 32, inter // 32).swapaxes(-1, -2).reshape(want_h.shape)
    assert mx.abs(h - want_h).max().item() <= 1e-5 * mx.abs(want_h).max().item()
    return set(outputs)


@pytest.mark.parametrize("hidden, inter, slots, tokens, k, up_bits, down_bits, group_size", [
    (256, 64, 4, 1, 2, 4, 4, 64),
    (512, 96, 5, 2, 3, 4, 4, 32),     # group 32: each of a lane's two packs has its own scale and bias
    (768, 128, 3, 3, 2, 4, 3, 128),   # 3 blocks per row; mixed precision down
    (256, 32, 6, 4, 4, 4, 8, 32),     # one 32-row block, 4 tokens
    (256, 64, 4, 1, 2, 3, 4, 64),     # 3 bits: the 3bit recipe's gate/up (fields across words)
    (512, 96, 5, 2, 3, 3, 4, 32),
    (768, 128, 3, 3, 2, 3, 3, 128),
])
def test_expert_swiglu_tensor_core_body_matches_reference(hidden, inter, slots, tokens, k, up_bits, down_bits,
                                                          group_size):
    ran = check_tensor_core_passes(hidden, inter, slots, tokens, k, up_bits, down_bits, group_size, hidden + inter)
    assert ran == {"expert_swiglu_gate_up_mma", "expert_swiglu_down"}


@pytest.mark.parametrize("ksplit, tiles, rounds, up_bits", [(1, 1, 1, 4), (2, 4, 2, 4), (4, 2, 1, 4), (4, 2, 4, 4),
                                                             (2, 4, 2, 3), (4, 2, 4, 3)])
def test_expert_swiglu_tensor_core_body_at_other_launch_tunings(ksplit, tiles, rounds, up_bits, monkeypatch):
    """Tiles that do not fill a threadgroup (6 of 16 rows at 4 per threadgroup), blocks that do not fill the
    SIMD-groups' rounds (3 blocks per row), SIMD-groups with no block at all."""
    for name, value in (("MMA_KSPLIT", ksplit), ("MMA_TILES", tiles), ("MMA_ROUND", rounds)):
        monkeypatch.setattr(kernels, name, value)
    ran = check_tensor_core_passes(768, 96, 4, 2, 3, up_bits, 4, 32, seed=ksplit + tiles)
    assert ran == {"expert_swiglu_gate_up_mma", "expert_swiglu_down"}


def test_expert_swiglu_scalar_bodies_in_bfloat16_on_a_cuda_device():
    """2-bit gate/up on a CUDA device: the scalar bodies, in bfloat16 (T = bfloat16 in the emulation too)."""
    ran = check_tensor_core_passes(256, 64, 4, 2, 3, 2, 4, 64, seed=5)
    assert ran == {"expert_swiglu_gate_up", "expert_swiglu_down"}


def test_tensor_cores_only_where_the_runner_has_them(monkeypatch):
    """Metal (the plain emulation) and CUDA cards without bf16 mma.sync keep the scalar pass 1; float32
    activations and other bits do too."""
    assert not kernels.has_tensor_cores(run_emulated) and kernels.has_tensor_cores(run_emulated_cuda)
    assert not kernels.has_tensor_cores(kernels.run_on_gpu)  # no GPU here
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "cuda")
    for major, expected in ((7, False), (8, True), (9, True)):  # bf16 mma.sync needs sm_80
        kernels.cuda_capability.cache_clear()
        monkeypatch.setattr(mx, "device_info", lambda major=major: {"compute_capability_major": major})
        assert kernels.has_tensor_cores(kernels.run_on_gpu) == expected
    kernels.cuda_capability.cache_clear()
    assert kernels.takes_tensor_cores(mx.bfloat16, 4, 4096, 1024)
    assert not kernels.takes_tensor_cores(mx.float32, 4, 4096, 1024)
    assert kernels.takes_tensor_cores(mx.bfloat16, 3, 4096, 1024)
    assert not kernels.takes_tensor_cores(mx.bfloat16, 2, 4096, 1024)
    assert not kernels.takes_tensor_cores(mx.bfloat16, 4, 4096 + 32, 1024)


def test_gpu_runner_puts_the_constants_in_the_source(monkeypatch):
    """run_on_gpu hands MLX one kernel object per kernel and set of constants, its source opening with them (the
    source the CUDA compile check builds), and calls it without template arguments (MLX spends host time on each)."""
    made, calls, launches = {}, [], []

    def cuda_kernel(**spec):
        made[spec["name"]] = spec

        def call(**args):
            calls.append(args)
            return [mx.zeros(shape, dtype) for shape, dtype in zip(args["output_shapes"], args["output_dtypes"])]
        return call

    def runner(launch):
        launches.append(launch)
        return kernels.run_on_gpu(launch)

    monkeypatch.setattr(mx.fast, "cuda_kernel", cuda_kernel, raising=False)
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "cuda")
    kernels._mlx_kernel.cache_clear()
    q = mx.zeros((1, 8, 1, 64))
    cache = mx.quantize(mx.zeros((1, 2, 256, 64)), 64, 4)
    try:
        for scale in (0.125, 0.125, 0.5):  # the score scale is one of the split pass's constants
            kernels.attention_decode_launches(q, cache, cache, scale, 64, 4, runner)
    finally:
        kernels._mlx_kernel.cache_clear()
    assert len(calls) == len(launches) == 6 and not any("template" in args for args in calls)
    assert len(made) == 3  # the split pass at two scales, the combine pass at one set of constants
    for launch in launches:
        header, source = kernels.mlx_sources("cuda", launch.kernel, launch.constants)
        named = [name for name, spec in made.items() if (spec["header"], spec["source"]) == (header, source)]
        assert len(named) == 1 and named[0].startswith(f"flashmoe_{launch.kernel}_")
        assert source.startswith("using T = float;\nconstexpr int HQ = 8;\n")


def test_pools_the_kernel_does_not_take_run_the_reference():
    from flashmoe_mlx.kernels import MAX_HIDDEN, supports_expert_swiglu

    pool = quantized_pool(MAX_HIDDEN + 64, 64, 2, 4, 4, 64, seed=3)  # activations beyond threadgroup memory
    assert not supports_expert_swiglu(pool) and supports_expert_swiglu(quantized_pool(MAX_HIDDEN, 64, 2, 4, 4, 64, 3))
    x, ids = mx.ones((1, MAX_HIDDEN + 64)), mx.zeros((1, 2), mx.uint32)
    assert mx.array_equal(expert_swiglu(x, pool, ids, runner=refuse), expert_swiglu_reference(x, pool, ids)).item()


def test_reference_is_the_cpu_path():
    pool = quantized_pool(64, 32, 2, 4, 4, 32, seed=1)
    x, ids = mx.ones((1, 64)), mx.zeros((1, 2), mx.uint32)
    assert kernels.active_runner() is None  # Linux CPU backend: no GPU runner
    assert mx.array_equal(expert_swiglu(x, pool, ids), expert_swiglu_reference(x, pool, ids)).item()


def test_decode_path_runs_the_kernel_end_to_end(mlx_checkpoint):
    """The streamed model's decode steps through the emulated Metal body: logits within reference tolerance."""
    from mlx_lm import load as mlx_load
    from mlx_lm.models.cache import make_prompt_cache

    from flashmoe_mlx import load

    path = mlx_checkpoint("qwen3_moe")
    ref, _ = mlx_load(str(path))
    model, _ = load(str(path), memory_budget="200kB")
    calls = []

    def counting_runner(launch):
        calls.append(launch.kernel)
        return run_emulated(launch)

    tokens = mx.array([[5, 17, 99, 3, 250, 8]])
    ref_cache, cache = make_prompt_cache(ref), make_prompt_cache(model)
    with kernels.use_runner(counting_runner):
        for _ in range(4):
            a, b = ref(tokens, cache=ref_cache), model(tokens, cache=cache)
            assert mx.abs(a - b).max().item() <= 1e-4
            tokens = mx.argmax(a[:, -1:], axis=-1)
    # Prefill (6 tokens) used mlx-lm's path; the 3 decode steps ran both passes in each MoE layer.
    assert calls.count("expert_swiglu_gate_up") == calls.count("expert_swiglu_down") == 3 * 2


def checking_shared_memory(launch):
    """run_emulated, after holding kernels.py's count of the launch's threadgroup memory to what the body
    declares (exact, and within SHARED_BYTES)."""
    c = launch.constants
    limit = kernels.SHARED_BYTES
    if launch.kernel == "attention_decode_split":
        counted = kernels.split_shared_bytes(c["HQ"] // c["HKV"], c["D"], c["WARPS"], c["KEYS_PER_LANE"])
    elif launch.kernel == "attention_decode_split_mma":  # CUDA-only: CUDA's static limit
        counted = kernels.split_mma_shared_bytes(c["HQ"] // c["HKV"] // c["HEAD_GROUPS"], c["D"], c["GS"], c["WARPS"],
                                                 c["STAGES"])
        limit = kernels.CUDA_SHARED_BYTES
    else:
        counted = kernels.combine_shared_bytes(c["SPLITS"], c["WARPS"])
    assert shared_bytes(launch) == counted <= limit
    return run_emulated(launch)


def checking_shared_memory_cuda(launch):
    """checking_shared_memory as a CUDA device (the tensor-core bodies too), counting the kernels it ran."""
    checking_shared_memory_cuda.ran.append(launch.kernel)
    return checking_shared_memory(launch)


checking_shared_memory_cuda.tensor_cores = True
checking_shared_memory_cuda.ran = []


def cache_view(values: mx.array, keys: int, group_size: int, bits: int) -> tuple:
    """values [B, HKV, capacity, D] quantized, then its first `keys` keys: views of a longer buffer, as mlx-lm's
    quantized caches hand them to attention (row-contiguous only where capacity == keys, or B = HKV = 1)."""
    return tuple(a[..., :keys, :] for a in mx.quantize(values, group_size, bits))


def query(rng, batch: int, heads: int, dim: int, dtype=mx.float32) -> mx.array:
    """q [B, HQ, 1, D], transposed from [B, 1, HQ, D] as mlx-lm's attention makes it, and a view with gaps between
    its heads (every other head of a wider array), so the bodies must read it through its strides too."""
    wide = mx.array(rng.standard_normal((batch, 1, 2 * heads, dim)).astype(np.float32)).astype(dtype)
    return wide[:, :, ::2].swapaxes(1, 2)


@pytest.mark.parametrize("batch, q_heads, kv_heads, keys, spare, dim, bits, group_size", [
    (1, 4, 1, 40, 216, 64, 4, 64),     # GQA 4:1; 40 keys: one chunk of 64, lanes' second keys partly masked
    (2, 2, 2, 300, 212, 128, 8, 32),   # GQA 1:1, batch 2; a SIMD-group's last chunk of 64 holds 44 keys
    (1, 8, 2, 1100, 0, 64, 4, 32),     # two splits, each ending in a partial chunk
    (1, 2, 1, 7, 0, 256, 8, 64),       # fewer keys than lanes, head dim 256
    (1, 16, 2, 600, 168, 128, 4, 64),  # GQA 8:1 at dim 128: the 32/4-head benchmark's split layout
    (1, 10, 2, 530, 0, 64, 8, 32),     # GQA 5:1: heads padded to 8
    (1, 4, 2, 70, 186, 256, 4, 128),   # a lane's value dims fill one word
    (1, 2, 2, 2200, 104, 64, 8, 32),   # GQA 1:1, four splits
    (1, 16, 1, 4500, 0, 128, 8, 64),   # one key per lane (16 heads x dim 128), 16 splits: two combine SIMD-groups
    (1, 32, 2, 2100, 204, 256, 4, 64),  # the 32/2-head, dim-256 benchmark's split layout, 16 splits
])
def test_attention_decode_metal_body_matches_reference(batch, q_heads, kv_heads, keys, spare, dim, bits, group_size):
    """Over views of a cache with `spare` keys of capacity past `keys` (mlx-lm's grow by 256), or whole arrays."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    from flashmoe_mlx.kernels import attention_decode, attention_decode_reference

    rng = np.random.default_rng(keys)
    q = query(rng, batch, q_heads, dim)
    k, v = (cache_view(mx.array(rng.standard_normal((batch, kv_heads, keys + spare, dim)).astype(np.float32)),
                       keys, group_size, bits) for _ in range(2))
    scale = dim ** -0.5
    got = attention_decode(q, k, v, scale, group_size, bits, runner=checking_shared_memory)
    want = attention_decode_reference(q, k, v, scale, group_size, bits)
    assert got.shape == want.shape and np.isfinite(np.array(got)).all()
    assert mx.abs(got - want).max().item() <= 1e-4
    # The reference agrees with mlx-lm's own quantized attention (the CPU path the kernel replaces).
    mlx_lm_out = quantized_scaled_dot_product_attention(q, k, v, scale=scale, mask=None, group_size=group_size, bits=bits)
    assert mx.abs(mlx_lm_out - want).max().item() <= 1e-4


def check_tensor_core_attention(batch, q_heads, kv_heads, keys, dim, group_size, seed, spare=0):
    """attention_decode with the tensor-core split pass (emulated) against the float32 reference over the same
    bfloat16 inputs, the cache a view with `spare` keys of capacity. Tolerance: the output's bfloat16 rounding
    (2^-9 relative) plus P rounded to bfloat16 before it weights V (2^-9 of each weight: at most 2^-9 max|V|),
    each doubled."""
    from flashmoe_mlx.kernels import attention_decode, attention_decode_reference

    rng = np.random.default_rng(seed)
    q = query(rng, batch, q_heads, dim, mx.bfloat16)
    k, v = (cache_view(mx.array(rng.standard_normal((batch, kv_heads, keys + spare, dim)).astype(np.float32))
                       .astype(mx.bfloat16), keys, group_size, 4) for _ in range(2))
    checking_shared_memory_cuda.ran.clear()
    got = attention_decode(q, k, v, dim ** -0.5, group_size, 4, runner=checking_shared_memory_cuda)
    assert checking_shared_memory_cuda.ran == ["attention_decode_split_mma", "attention_decode_combine"]
    f32 = lambda cache: tuple(a if a.dtype == mx.uint32 else a.astype(mx.float32) for a in cache)  # noqa: E731
    want = attention_decode_reference(q.astype(mx.float32), f32(k), f32(v), dim ** -0.5, group_size, 4)
    v_max = mx.abs(mx.dequantize(*f32(v), group_size=group_size, bits=4)).max().item()
    error = mx.abs(got.astype(mx.float32) - want).max().item()
    assert got.dtype == mx.bfloat16 and np.isfinite(np.array(got.astype(mx.float32))).all()
    assert error <= 2 * (2 ** -9 * mx.abs(want).max().item() + 2 ** -9 * v_max), error


@pytest.mark.parametrize("batch, q_heads, kv_heads, keys, spare, dim, group_size", [
    (1, 8, 1, 40, 0, 128, 64),      # GQA 8:1 (the 32/4-head benchmark's), a partial second tile
    (1, 16, 1, 300, 212, 128, 64),  # 16 heads: two head blocks of the values' MMA
    (2, 4, 2, 100, 156, 128, 64),   # batch 2, heads padded to 16 rows (4 real)
    (1, 12, 1, 700, 0, 256, 64),    # dim 256, 12 heads: the second head block padded; two splits
    (1, 8, 2, 9, 247, 256, 128),    # fewer keys than a tile; groups of 128 (a lane's four words)
    (1, 16, 2, 1100, 180, 128, 64),  # two splits, each ending in a partial tile; rings of stages that wrap
])
def test_attention_decode_tensor_core_body_matches_reference(batch, q_heads, kv_heads, keys, spare, dim, group_size):
    check_tensor_core_attention(batch, q_heads, kv_heads, keys, dim, group_size, seed=keys, spare=spare)


@pytest.mark.parametrize("warps, stages, keys_per_simd_group, head_values", [(1, 2, 64, 2048), (2, 4, 32, 2048),
                                                                            (4, 3, 16, 2048), (2, 2, 64, 512)])
def test_attention_decode_tensor_core_body_at_other_launch_tunings(warps, stages, keys_per_simd_group, head_values,
                                                                   monkeypatch):
    """Launches the shipped one does not make: one SIMD-group walking 11 tiles through a ring of 2 stages; more
    stages than tiles (3 per SIMD-group); 4 SIMD-groups merged in threadgroup memory, the last with no keys; a kv
    head's 8 query heads taken by two threadgroups of 4."""
    monkeypatch.setattr(kernels, "MMA_ATTENTION_WARPS", warps)
    monkeypatch.setattr(kernels, "MMA_ATTENTION_STAGES", stages)
    monkeypatch.setattr(kernels, "MMA_KEYS_PER_SIMD_GROUP", keys_per_simd_group)
    monkeypatch.setattr(kernels, "MMA_HEAD_VALUES", head_values)
    assert kernels.attention_mma_layout(2, 333, 8, 128, 64)[1:] == (warps, stages, 2 if head_values < 1024 else 1)
    check_tensor_core_attention(1, 16, 2, 333, 128, 64, seed=warps)


@pytest.mark.parametrize("head_values, head_groups", [(2048, 2), (1024, 4)])
def test_attention_decode_tensor_core_body_with_head_groups(head_values, head_groups, monkeypatch):
    """Qwen3.5's full-attention shape in small (16 query heads per kv head, dim 256), batch 2: a kv head's query
    heads split over 2 (as shipped) or 4 threadgroups, each writing its own heads' partials."""
    monkeypatch.setattr(kernels, "MMA_HEAD_VALUES", head_values)
    assert kernels.attention_mma_layout(4, 150, 16, 256, 64)[3] == head_groups
    check_tensor_core_attention(2, 32, 2, 150, 256, 64, seed=head_groups, spare=106)


def test_attention_tensor_cores_only_where_the_body_takes_the_cache():
    """bfloat16 queries, scales and biases, 4 bits, <= 16 heads per kv head, groups >= 64, an even number of
    groups; the shapes it does not take run the scalar body on a CUDA device."""
    from flashmoe_mlx.kernels import attention_decode, takes_attention_mma

    bf16 = (mx.bfloat16,) * 5
    assert takes_attention_mma(bf16, 4, 8, 128, 64) and takes_attention_mma(bf16, 4, 16, 256, 128)
    assert not takes_attention_mma((mx.float32,) * 5, 4, 8, 128, 64)
    assert not takes_attention_mma(bf16[:4] + (mx.float16,), 4, 8, 128, 64)  # V's biases
    assert not takes_attention_mma(bf16, 8, 8, 128, 64)
    assert not takes_attention_mma(bf16, 4, 32, 128, 64)
    assert not takes_attention_mma(bf16, 4, 8, 128, 32)
    assert not takes_attention_mma(bf16, 4, 8, 64, 64)  # one group per row: a key's scales in half a word
    q = mx.zeros((1, 8, 1, 128), mx.float32)
    cache = mx.quantize(mx.zeros((1, 1, 20, 128), mx.float32), 64, 4)
    checking_shared_memory_cuda.ran.clear()
    attention_decode(q, cache, cache, 0.1, 64, 4, runner=checking_shared_memory_cuda)
    assert checking_shared_memory_cuda.ran == ["attention_decode_split", "attention_decode_combine"]


def test_attention_decode_combine_body_takes_uneven_shares():
    """The combine body over any SPLITS and WARPS (the wrapper only makes powers of two): 13 splits on 3
    SIMD-groups (shares of 5, 4, 4), maxima far apart, and an empty split (max -3e38, sum 0, vector 0)."""
    batch, heads, dim, splits, warps = 2, 3, 64, 13, 3
    rng = np.random.default_rng(13)
    o = rng.standard_normal((batch, heads, splits, dim)).astype(np.float32)
    ml = np.stack([rng.uniform(-30, 30, (batch, heads, splits)), rng.uniform(1, 50, (batch, heads, splits))], -1)
    ml = ml.astype(np.float32)
    o[:, :, 4], ml[:, :, 4] = 0.0, (-3.0e38, 0.0)
    launch = kernels.Launch("attention_decode_combine", {"o": mx.array(o), "ml": mx.array(ml)},
                            {"out": ((batch, heads, dim), mx.float32)},
                            {"T": mx.float32, "HQ": heads, "D": dim, "SPLITS": splits, "WARPS": warps},
                            batch * heads * dim // 32 * warps, threadgroup=32 * warps)
    (got,) = checking_shared_memory(launch)
    factor = np.exp(ml[..., 0] - ml[..., 0].max(-1, keepdims=True))
    want = (factor[..., None] * o).sum(-2) / (factor * ml[..., 1]).sum(-1)[..., None]
    assert np.isfinite(np.array(got)).all() and np.abs(np.array(got) - want).max() <= 1e-5 * np.abs(want).max()


def test_attention_layout_of_the_benchmark_shapes():
    """One token over 32768 keys: two keys per lane at 32/4 heads of dim 128, one at 32/2 of dim 256 (where
    the accumulator alone is 128 floats per lane); each SIMD-group a chunk or two; both fit threadgroup memory."""
    from flashmoe_mlx.kernels import attention_layout, combine_warps, split_shared_bytes

    assert attention_layout(4, 32768, 8, 128) == (64, 8, 2) and combine_warps(64) == 8
    assert attention_layout(2, 32768, 16, 256) == (256, 2, 1) and combine_warps(256) == 16
    assert split_shared_bytes(8, 128, 8, 2) == 25216 and split_shared_bytes(16, 256, 2, 1) == 23296


def test_attention_mma_layout_of_the_benchmark_shapes():
    """The tensor-core split pass: 4 SIMD-groups of 2 stages at dim 128 (26.5 KiB), cut to 2 SIMD-groups at 32/2
    heads of dim 256 (its 4 x 2 stages would take 48.8 KiB); 128 keys per SIMD-group: 64 splits at dim 128, 128 at
    dim 256; a kv head's 16 query heads of dim 256 over 2 threadgroups, 8 of dim 128 or 16 of dim 64 in one."""
    from flashmoe_mlx.kernels import CUDA_SHARED_BYTES, attention_mma_layout, split_mma_shared_bytes

    assert attention_mma_layout(4, 32768, 8, 128, 64) == (64, 4, 2, 1)
    assert attention_mma_layout(2, 32768, 16, 256, 64) == (128, 2, 2, 2)
    assert attention_mma_layout(1, 32768, 16, 64, 64)[3] == 1 and attention_mma_layout(1, 32768, 15, 256, 64)[3] == 1
    assert split_mma_shared_bytes(8, 128, 64, 4, 2) == 27136 <= CUDA_SHARED_BYTES
    assert split_mma_shared_bytes(16, 256, 64, 4, 2) > CUDA_SHARED_BYTES >= split_mma_shared_bytes(16, 256, 64, 2, 2)


def test_attention_decode_shapes_the_kernel_does_not_take_run_the_reference():
    from flashmoe_mlx.kernels import attention_decode, attention_decode_reference, supports_attention_decode

    assert supports_attention_decode(32, 4, 128, 4, 64) and supports_attention_decode(32, 2, 256, 8, 64)
    assert not supports_attention_decode(32, 4, 128, 3, 64)  # a lane's 12 bits straddle words
    assert not supports_attention_decode(8, 2, 96, 4, 32)    # 3 dims per lane straddle groups of 32
    rng = np.random.default_rng(0)
    q = mx.array(rng.standard_normal((1, 8, 1, 96)).astype(np.float32))
    k, v = (mx.quantize(mx.array(rng.standard_normal((1, 2, 50, 96)).astype(np.float32)), 32, 4) for _ in range(2))
    assert mx.array_equal(attention_decode(q, k, v, 0.1, 32, 4, runner=refuse),
                          attention_decode_reference(q, k, v, 0.1, 32, 4)).item()


def test_quantized_kv_decode_runs_the_kernel_end_to_end(mlx_checkpoint):
    """With a 4-bit KV cache, decode attention goes through the emulated Metal body; logits stay within the
    tolerance of mlx-lm's own quantized attention (the reference path, taken without a runner)."""
    from mlx_lm.models.cache import make_prompt_cache

    from flashmoe_mlx import load

    path = mlx_checkpoint("qwen3_moe")
    model, _ = load(str(path), memory_budget="1GB")
    prompt = mx.array([[5, 17, 99, 3, 250, 8, 40, 41]])
    caches = []
    for _ in range(2):
        cache = make_prompt_cache(model)
        mx.eval(model(prompt, cache=cache))
        caches.append([c.to_quantized(group_size=32, bits=4) for c in cache])  # head_dim 32
    calls = []

    def counting_runner(launch):
        calls.append(launch.kernel)
        return run_emulated(launch)

    token = mx.array([[7]])
    for _ in range(3):
        want = model(token, cache=caches[0])
        with kernels.use_runner(counting_runner):
            got = model(token, cache=caches[1])
        assert mx.abs(got - want).max().item() <= 1e-4
        token = mx.argmax(want[:, -1:], axis=-1)
    layers = len(model.layers)
    assert calls.count("attention_decode_split") == calls.count("attention_decode_combine") == 3 * layers


def test_header_for_keeps_what_the_source_uses_and_what_that_uses():
    """A kernel gets of the prelude's header only the definitions its source reaches: through macros and
    functions, a template line with its function, a declaration over several lines, braces inside an asm string;
    lines that define nothing stay; the header's order stays."""
    header = kernels.without_comments("""#include <stdint.h>
#define UNUSED(v) v
#define TWICE(v) helper(v)
template <int N>
__device__ inline float helper(float v,
                               int unused) {
  asm("{ .reg .b32 r;");  // an unbalanced brace in a string
  return inner(v) * N;
}
__device__ inline float inner(float v) { return v; }
__device__ inline float orphan(float v) { return v; }
template <int M>
__device__ inline float orphan_template(float v) { return v * M; }
struct Pair { float a, b; };
""")
    kept = kernels.header_for(header, "float y = TWICE(x);")
    assert kept.splitlines() == [line for line in header.splitlines()
                                 if not any(name in line for name in ("UNUSED", "orphan", "<int M>", "Pair"))]
    assert "Pair" in kernels.header_for(header, "Pair p;")


@pytest.mark.parametrize("words, groups, threads, loads", [(4096, 3, 64, 4), (4100, 2, 96, 8), (8, 5, 32, 2)])
def test_stream_read_body_reads_every_word_once(words, groups, threads, loads):
    """The benchmarks' read bound: threadgroup g XORs exactly the 16-byte chunks c with c % (groups * threads) in
    its span (uneven walks, and threadgroups that read nothing, included)."""
    data = np.random.default_rng(words).integers(0, 2 ** 32, words, dtype=np.uint32)
    got = np.array(kernels.stream_read(mx.array(data), groups, threads, loads, runner=run_emulated))
    chunks = np.bitwise_xor.reduce(data.reshape(-1, 4), axis=1)
    owner = np.arange(len(chunks)) % (groups * threads) // threads
    want = [np.bitwise_xor.reduce(chunks[owner == g]) if (owner == g).any() else 0 for g in range(groups)]
    assert got.tolist() == [int(w) for w in want]


def test_stream_read_refuses_what_it_cannot_read():
    eight = mx.zeros((8,), mx.uint32)
    for words, groups, threads, loads in (
            (mx.zeros((6,), mx.uint32), 2, 32, 8), (mx.zeros((2, 4), mx.uint32), 2, 32, 8),
            (mx.zeros((8,), mx.float32), 2, 32, 8), (eight, 2, 48, 8), (eight, 2, 0, 8), (eight, 0, 32, 8),
            (eight, 2, 32, 0)):
        with pytest.raises(ValueError, match="stream_read"):
            kernels.stream_read(words, groups, threads, loads, runner=refuse)


def test_cuda_twins_compile_and_fit_their_launches(monkeypatch):
    """Every body the CUDA runner would launch, at the shipped tunings and the ones the benchmark sweeps,
    compiles with nvcc for the H200 the way MLX wraps it, and its registers fit its threadgroup."""
    from cuda_compile import REGISTERS_PER_SM, compile_launches, nvcc

    from flashmoe_mlx.kernels import attention_decode

    assert nvcc(), "nvcc is part of this machine kind; CI compiles the CUDA twins with it"
    launches = []

    def capturing(launch):
        launches.append(launch)
        return [mx.zeros(shape, dtype) for shape, dtype in launch.outputs.values()]

    capturing.tensor_cores = True
    rng = np.random.default_rng(0)
    for up_bits, dtype in ((4, mx.bfloat16), (3, mx.bfloat16), (4, mx.float32)):
        pool = quantized_pool(512, 256, 4, up_bits, 4, 64, seed=up_bits)
        pool.set_dtype(dtype)
        x = mx.array(rng.standard_normal((1, 512)).astype(np.float32)).astype(dtype)
        for tunings in ({}, {"MMA_KSPLIT": 4, "MMA_TILES": 2}, {"MMA_GATE_UP": False}):
            with monkeypatch.context() as patched:
                for name, value in tunings.items():
                    patched.setattr(kernels, name, value)
                expert_swiglu(x, pool, mx.zeros((1, 4), mx.uint32), mx.ones((1, 4)).astype(dtype), runner=capturing)
    for hq, hkv, dim, bits in ((32, 4, 128, 4), (32, 2, 256, 4), (8, 8, 64, 8)):
        q = mx.zeros((1, hq, 1, dim), mx.bfloat16)
        cache = mx.quantize(mx.zeros((1, hkv, 4096, dim), mx.bfloat16), 64, bits)
        for tunings in ({}, {"MMA_ATTENTION_WARPS": 2, "MMA_ATTENTION_STAGES": 4}, {"MMA_HEAD_VALUES": 512},
                        {"MMA_ATTENTION": False}):
            with monkeypatch.context() as patched:
                for name, value in tunings.items():
                    patched.setattr(kernels, name, value)
                attention_decode(q, cache, cache, dim ** -0.5, 64, bits, runner=capturing)
    kernels.stream_read(mx.zeros((1 << 20,), mx.uint32), 1056, runner=capturing)
    assert {launch.kernel for launch in launches} == {
        "expert_swiglu_gate_up", "expert_swiglu_gate_up_mma", "expert_swiglu_down",
        "attention_decode_split", "attention_decode_split_mma", "attention_decode_combine", "stream_read"}
    registers = compile_launches(launches)
    for i, launch in enumerate(launches):
        assert registers[f"k{i}"] * launch.threadgroup <= REGISTERS_PER_SM, (launch.kernel, launch.constants)
