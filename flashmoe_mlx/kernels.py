"""Custom kernels: their dispatch per backend and their plain-MLX references (the CPU path and the oracle).

Sources live in `metal_kernels/`: one body per kernel, written once against a few portable names (LANE,
SIMD_SUM, DEVICE, ...) that a per-backend prelude defines: Metal (`mx.fast.metal_kernel`), CUDA
(`mx.fast.cuda_kernel`, the twin), and a C++ prelude with which the tests run the very same bodies on the CPU.
A `.cu` body is CUDA-only (tensor cores); the C++ prelude emulates its MMA, so the tests run it as well.
A `Launch` says what to run; a runner runs it. Where no runner exists (the CPU backend) the reference runs.
"""

from __future__ import annotations

import contextlib
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

import mlx.core as mx
import mlx.nn as nn

PROLOGUE_MARK = "// ---- prologue ----"
THREADGROUP = 128  # 4 SIMD-groups
# Output rows per SIMD-group (the bodies' ROWS): 4 and 8 weight chunks in flight per lane. Pass 1 is bound by
# load latency, so it takes few rows for many SIMD-groups (H200, gate+up at Qwen3.5's shape: 28.4 us at
# (UP_ROWS, UP_WARPS) = (2, 8), 34.7 at (4, 4); docs/BENCHMARKS.md).
UP_ROWS, DOWN_ROWS = 2, 8
UP_WARPS = 8  # SIMD-groups per pass-1 threadgroup, which stages the token's activations once for all of them
# Pass 1 on tensor cores (CUDA only: expert_swiglu_gate_up_mma.cu; bfloat16 MMA, float32 accumulation) where the
# runner has them and the shape fits. H200, Qwen3.5's shape, layers in a chain: 18.8 us at 4 bits and 20.6 at 3
# against the scalar body's 23.4 at either (docs/BENCHMARKS.md). Its launch: SIMD-groups sharing a 16-row tile's
# packs, tiles per threadgroup (which stages the activations once for all of them), blocks of 8 packs whose loads
# are in flight together.
MMA_GATE_UP = True
MMA_KSPLIT, MMA_TILES, MMA_ROUND = 8, 1, 1
MAX_HIDDEN = 7680  # pass 1 stages 34/32 floats per activation: 30.6 KiB of the 32 KiB Metal guarantees
MAX_DECODE_TOKENS = 4


def read_source(name: str) -> str:
    return files("flashmoe_mlx.metal_kernels").joinpath(name).read_text()


def body_source(kernel: str) -> str:
    """A kernel's body: `<kernel>.metal` (every backend), or `<kernel>.cu` for the CUDA-only tensor-core bodies."""
    folder = files("flashmoe_mlx.metal_kernels")
    name = f"{kernel}.metal" if folder.joinpath(f"{kernel}.metal").is_file() else f"{kernel}.cu"
    return folder.joinpath(name).read_text()


def prelude(backend: str) -> tuple[str, str]:
    """(header, body prologue) of a backend's prelude file."""
    header, _, prologue = read_source(f"prelude_{backend}.h").partition(PROLOGUE_MARK)
    return header + "\n" + read_source("quant.h"), prologue


@dataclass
class Launch:
    kernel: str  # body file stem in metal_kernels/
    inputs: dict[str, mx.array]
    outputs: dict[str, tuple[tuple[int, ...], mx.Dtype]]
    constants: dict[str, int | mx.Dtype]  # template parameters
    simd_groups: int
    threadgroup: int = THREADGROUP  # threads

    @property
    def grid(self) -> int:
        """Threads, rounded up to whole threadgroups (surplus SIMD-groups return at once)."""
        return -(-self.simd_groups * 32 // self.threadgroup) * self.threadgroup


def without_comments(source: str) -> str:
    """Source minus comments, indentation and blank lines (line by line: an error's line number still finds the
    line). MLX builds and hashes a kernel's whole source on every call, about 0.4 us per KB on the H200's host
    (docs/BENCHMARKS.md), so the text it handles is kept short."""
    lines = (re.sub(r"\s*//.*$", "", line).strip() for line in source.splitlines())
    return "\n".join(line for line in lines if line) + "\n"


IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def header_for(header: str, source: str) -> str:
    """The definitions in `header` (without comments) that `source` uses, directly or through one another, in
    the header's order; lines that define no name (includes, using-declarations) always. A definition is a line
    outside braces and parentheses, with the lines up to where those close again, and a `template <...>` line
    belongs to the definition after it. Its name: a #define's, a struct's, or the first one called."""
    chunks, depth = [], 0
    for line in header.splitlines():
        if depth == 0 and not (chunks and chunks[-1][-1].startswith("template")):
            chunks.append([])
        chunks[-1].append(line)
        code = re.sub(r'"(\\.|[^"\\])*"', "", line)  # string literals (asm) may hold unbalanced braces
        depth += sum(code.count(o) - code.count(c) for o, c in ("{}", "()"))
    wanted, kept = set(IDENTIFIER.findall(source)), [False] * len(chunks)
    names = []
    for chunk in chunks:
        first = next(line for line in chunk if not line.startswith("template"))
        named = (re.match(r"#define (\w+)", first) or re.search(r"struct (\w+)", first)
                 or re.search(r"(\w+)\s*\(", first))
        names.append(named.group(1) if named else None)
    grew = True
    while grew:
        grew = False
        for i, chunk in enumerate(chunks):
            if not kept[i] and (names[i] is None or names[i] in wanted):
                kept[i] = grew = True
                wanted |= set(IDENTIFIER.findall("\n".join(chunk)))
    return "".join("\n".join(chunk) + "\n" for chunk, keep in zip(chunks, kept) if keep)


# MLX dtypes as each backend's kernel sources name them (the type constants, such as T).
TYPE_NAMES = {
    "metal": {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.uint32: "uint32_t"},
    "cuda": {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.uint32: "uint32_t"},
}


def constant_definitions(constants: dict, type_names: dict) -> str:
    """A launch's constants as source lines, as MLX writes template arguments: `constexpr int N = 4;`, `using T =
    float;` (type names from `type_names`)."""
    return "".join(f"using {name} = {type_names[value]};\n" if isinstance(value, mx.Dtype)
                   else f"constexpr int {name} = {int(value)};\n" for name, value in constants.items())


def mlx_sources(backend: str, kernel: str, constants: dict) -> tuple[str, str]:
    """(header, source) that MLX's kernel builder gets for `kernel` on `backend` at `constants`: of the prelude's
    header what the source uses, and the constants' definitions, the prelude's prologue and the body, all without
    comments. The constants open the source rather than ride each call as template arguments: MLX's call spends
    about 0.4 us of host time per template argument (H200 host: a tiny kernel's call 4.6 us, with 10 of them 8.7;
    docs/BENCHMARKS.md), and ours carry 5-10."""
    header, prologue = prelude(backend)
    source = constant_definitions(constants, TYPE_NAMES[backend]) + without_comments(prologue + body_source(kernel))
    return header_for(without_comments(header), source), source


@lru_cache(maxsize=None)
def _mlx_kernel(backend: str, kernel: str, input_names: tuple, output_names: tuple, constants: tuple):
    """MLX's kernel object for `kernel` at these constants (pairs); named after them, as MLX names a template
    instance."""
    header, source = mlx_sources(backend, kernel, dict(constants))
    names = TYPE_NAMES[backend]
    tag = "_".join(names[v] if isinstance(v, mx.Dtype) else str(v).replace("-", "m") for _, v in constants)
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    # A body that reads its inputs' strides takes them as they are, views included; the rest get row-contiguous
    # copies where needed.
    return make(name=f"flashmoe_{kernel}_{tag}", input_names=list(input_names), output_names=list(output_names),
                source=source, header=header, ensure_row_contiguous="_strides" not in source)


@lru_cache(maxsize=None)
def gpu_backend() -> str | None:
    """"metal", "cuda", or None where MLX has neither; asked once (a decode step launches hundreds of kernels)."""
    if mx.metal.is_available():
        return "metal"
    return "cuda" if hasattr(mx, "cuda") and mx.cuda.is_available() else None


def run_on_gpu(launch: Launch) -> list[mx.array]:
    kernel = _mlx_kernel(gpu_backend(), launch.kernel, tuple(launch.inputs), tuple(launch.outputs),
                         tuple(launch.constants.items()))
    return kernel(
        inputs=list(launch.inputs.values()),
        grid=(launch.grid, 1, 1),
        threadgroup=(launch.threadgroup, 1, 1),
        output_shapes=[s for s, _ in launch.outputs.values()],
        output_dtypes=[d for _, d in launch.outputs.values()],
    )


@lru_cache(maxsize=None)
def cuda_capability() -> int:
    """The CUDA device's compute capability (major), as MLX's device_info reports it; taken as 8 where it does
    not say. Cached: on CUDA, device_info also queries free memory."""
    return int(mx.device_info().get("compute_capability_major", 8))


def has_tensor_cores(runner) -> bool:
    """Whether `runner` takes the CUDA-only tensor-core bodies: the CUDA runner on a card with bf16 mma.sync
    (sm_80 and newer), or a runner marked `tensor_cores` (the tests' emulation of a CUDA device)."""
    if runner is run_on_gpu:
        return gpu_backend() == "cuda" and cuda_capability() >= 8
    return getattr(runner, "tensor_cores", False)


def default_runner():
    return run_on_gpu if gpu_backend() is not None and mx.default_device() == mx.gpu else None


_runner_override = []


@contextlib.contextmanager
def use_runner(runner):
    """Run kernels with `runner` (e.g. the tests' CPU emulation of the Metal bodies) inside the block."""
    _runner_override.append(runner)
    try:
        yield
    finally:
        _runner_override.pop()


def active_runner():
    return _runner_override[-1] if _runner_override else default_runner()


# ---------------------------------------------------------------- expert_swiglu


def _affine(proj: nn.Module) -> bool:
    return getattr(proj, "mode", None) == "affine" and "biases" in proj and "bias" not in proj


def supports_expert_swiglu(pool: nn.Module) -> bool:
    """Affine-quantized gate/up/down without linear biases, a plain SwiGLU (not gpt-oss's clamped one), and
    activations that fit pass 1's threadgroup memory."""
    from mlx_lm.models.switch_layers import SwiGLU

    projections = ("gate_proj", "up_proj", "down_proj")
    if not (isinstance(pool.activation, SwiGLU) and all(_affine(getattr(pool, p)) for p in projections)):
        return False
    return pool.gate_proj.scales.shape[-1] * pool.gate_proj.group_size <= MAX_HIDDEN


def takes_tensor_cores(dtype: mx.Dtype, up_bits: int, hidden: int, inter: int) -> bool:
    """What expert_swiglu_gate_up_mma requires: bfloat16 activations (exact as MMA operands), 3- or 4-bit
    gate/up, whole blocks of 8 packs per row and whole 32-row blocks of h."""
    return dtype == mx.bfloat16 and up_bits in (3, 4) and hidden % 256 == 0 and inter % 32 == 0


def expert_swiglu(x: mx.array, pool: nn.Module, slot_ids: mx.array, weights: mx.array | None = None,
                  runner=None) -> mx.array:
    """Decode-time experts: for token t, sum_j weights[t, j] * down(silu(gate(x_t)) * up(x_t)) over the pool
    slots slot_ids[t, j]. `pool` holds gate_proj/up_proj/down_proj (QuantizedSwitchLinear over the slots).
    x: [NT, H]; slot_ids: [NT, K]. Returns [NT, H], or [NT, K, H] (each expert apart) without weights."""
    runner = runner or active_runner()
    if runner is None or not supports_expert_swiglu(pool):
        return expert_swiglu_reference(x, pool, slot_ids, weights)
    return expert_swiglu_launches(x, pool, slot_ids, weights, runner)


def expert_swiglu_launches(x: mx.array, pool: nn.Module, slot_ids: mx.array, weights: mx.array | None,
                           runner) -> mx.array:
    """expert_swiglu's two kernel launches on `runner`, for a pool that supports_expert_swiglu has passed (a
    caller that checked once, such as a streamed layer at bind time, skips the check: 3.5 us per call here)."""
    # Item access: a Module's arrays and submodules are dict entries, which attribute access reaches through a
    # Python-level __getattr__ (about 0.3 us each, 13 per call).
    gate, up, down = pool["gate_proj"], pool["up_proj"], pool["down_proj"]
    nt, hidden = x.shape
    k = slot_ids.shape[1]
    inter = gate["scales"].shape[1]
    slots = slot_ids.astype(mx.uint32)
    constants = {"T": x.dtype, "NT": nt, "K": k, "H": hidden, "I": inter}
    pass1_inputs = {"x": x, "gate_w": gate["weight"], "gate_s": gate["scales"], "gate_b": gate["biases"],
                    "up_w": up["weight"], "up_s": up["scales"], "up_b": up["biases"], "slots": slots}
    h_shape = {"h": ((nt, k, inter), mx.float32)}
    if MMA_GATE_UP and has_tensor_cores(runner) and takes_tensor_cores(x.dtype, gate.bits, hidden, inter):
        warps = MMA_KSPLIT * MMA_TILES
        (h,) = runner(Launch(
            "expert_swiglu_gate_up_mma", pass1_inputs, h_shape,
            {**constants, "BITS_UP": gate.bits, "GS_UP": gate.group_size, "KSPLIT": MMA_KSPLIT,
             "TILES_PER_TG": MMA_TILES, "ROUND": MMA_ROUND},
            nt * k * -(-inter // (16 * MMA_TILES)) * warps, threadgroup=32 * warps))
    else:
        (h,) = runner(Launch(
            "expert_swiglu_gate_up", pass1_inputs, h_shape,
            {**constants, "BITS_UP": gate.bits, "GS_UP": gate.group_size, "ROWS": UP_ROWS},
            nt * -(-k * -(-inter // UP_ROWS) // UP_WARPS) * UP_WARPS,  # whole threadgroups per token
            threadgroup=32 * UP_WARPS,
        ))
    combine = weights is not None
    pass2_inputs = {"h": h, "down_w": down["weight"], "down_s": down["scales"], "down_b": down["biases"],
                    "slots": slots, "weights": (weights if combine else mx.ones((nt, k))).astype(x.dtype)}
    y_shape = {"y": ((nt, hidden) if combine else (nt, k, hidden), x.dtype)}
    (y,) = runner(Launch("expert_swiglu_down", pass2_inputs, y_shape,
                         {**constants, "BITS_DOWN": down.bits, "GS_DOWN": down.group_size, "COMBINE": int(combine),
                          "ROWS": DOWN_ROWS},
                         nt * k * -(-hidden // DOWN_ROWS), threadgroup=32 * k))  # one SIMD-group per expert
    return y


def expert_swiglu_reference(x: mx.array, pool: nn.Module, slot_ids: mx.array, weights: mx.array | None = None):
    """The same computation from plain MLX ops (dequantize, matmul), accumulated in float32."""

    def project(proj, v, slots):  # v [NT, K, in] -> [NT, K, out]
        scales, biases = proj.scales[slots].astype(mx.float32), proj.biases[slots].astype(mx.float32)
        w = mx.dequantize(proj.weight[slots], scales, biases, proj.group_size, proj.bits)
        return (w @ v[..., None].astype(mx.float32))[..., 0]

    xs = mx.broadcast_to(x[:, None, :], (*slot_ids.shape, x.shape[-1]))
    h = nn.silu(project(pool.gate_proj, xs, slot_ids)) * project(pool.up_proj, xs, slot_ids)
    y = project(pool.down_proj, h, slot_ids)
    if weights is not None:
        y = (y * weights[..., None].astype(mx.float32)).sum(axis=-2)
    return y.astype(x.dtype)


# ---------------------------------------------------------------- attention_decode


SHARED_BYTES = 28 << 10  # threadgroup memory a kernel may take (Metal guarantees 32 KiB)
KEYS_PER_SIMD_GROUP = 64  # at least (and a whole chunk); fewer: more splits, whose partials cost a write and a read
TWO_KEYS_PER_LANE_MAX = 1024  # (padded heads per kv head) x (head dim) up to which a lane scores two keys per chunk:
# its value accumulator is then <= 32 floats, which leaves room for a second key's registers (32 / 4 heads of dim
# 128: 128 registers per thread on sm_90 either way at 4 bits); 32 / 2 heads of dim 256 spill even at one key.
COMBINE_SPLITS_PER_SIMD_GROUP = 8  # the combine pass's SIMD-groups each sum this many splits (16 SIMD-groups at most)
# The split pass on tensor cores (CUDA only: attention_decode_split_mma.cu) where the runner has them and the cache
# fits. H200, 32k keys, 32/4 heads of dim 128: 14.9 us (18.5-19.5 at 32 keys per SIMD-group) against the scalar
# body's 37.8-38.5 (docs/BENCHMARKS.md). Its launch: SIMD-groups per threadgroup, tiles in flight per SIMD-group
# (cp.async stages), keys per SIMD-group at least (tiles of 16); the first two shrink where its threadgroup memory
# would not fit CUDA_SHARED_BYTES. Split and combine passes at 32 / 64 / 128 keys per SIMD-group (ncu, one run):
# 24.2 / 20.6 / 19.7 us at 32/4 heads of dim 128; 27.2 / 27.2 / 27.8 at 32/2 of dim 256 (docs/BENCHMARKS.md). At 128
# each SIMD-group's ring of stages wraps. 2 stages, not 3: 14.9 against 15.4-15.6 us at dim 128 in two sessions' runs.
# A threadgroup holds O for at most MMA_HEAD_VALUES (query heads x dims); past that a kv head's query heads go to 2,
# 4, ... threadgroups. At 16 heads of dim 256 one threadgroup takes 255 registers and spills; two of 8 heads each
# took 22.1-22.3 against 22.8-22.9 us at 32/2 heads, 16.2-16.4 against 20.4-20.5 at 16/1 (H200, two runs). Elsewhere
# two groups lost: 8 heads of dim 256 21.2 against 15.9, 16 of dim 128 14.7 against 13.4, 8 of dim 128 23.2 against
# 14.9 (each group scores and unpacks the keys again).
MMA_ATTENTION = True
MMA_ATTENTION_WARPS = 4
MMA_ATTENTION_STAGES = 2
MMA_HEAD_VALUES = 2048
MMA_KEYS_PER_SIMD_GROUP = 128
CUDA_SHARED_BYTES = 48 << 10  # static shared memory of a CUDA kernel (the CUDA-only bodies)


def split_shared_bytes(heads_per_kv: int, dim: int, warps: int, keys_per_lane: int) -> int:
    """Threadgroup memory that attention_decode_split declares: q staged (dim + dim / 32 floats per padded
    head), and per SIMD-group its chunk's weights, one merge row and its (max, sum) per padded head."""
    padded = -(-heads_per_kv // 4) * 4
    return 4 * (padded * (dim + dim // 32) + warps * (32 * keys_per_lane * padded + dim + 2 * padded))


def combine_shared_bytes(splits: int, warps: int) -> int:
    """Threadgroup memory that attention_decode_combine declares: a factor per split, and per SIMD-group a
    partial vector of 32 dims, a max and a sum (at most 256 + 16 * 34 floats: always fits)."""
    return 4 * (splits + 34 * warps)


def attention_layout(batch_heads: int, keys: int, heads_per_kv: int, dim: int) -> tuple[int, int, int] | None:
    """(splits, SIMD-groups per threadgroup, keys per lane) of the split pass for `batch_heads` (batch x kv
    heads) over `keys`: two keys per lane where TWO_KEYS_PER_LANE_MAX allows, the most SIMD-groups whose
    threadgroup memory fits, then splits doubled while each SIMD-group keeps KEYS_PER_SIMD_GROUP keys (and at
    least a chunk of 32 per key per lane) and the grid stays <= 1024 threadgroups. None: nothing fits."""
    padded = -(-heads_per_kv // 4) * 4
    keys_per_lane = 2 if padded * dim <= TWO_KEYS_PER_LANE_MAX else 1
    warps = next((w for w in (8, 4, 2, 1) if split_shared_bytes(heads_per_kv, dim, w, keys_per_lane) <= SHARED_BYTES),
                 None)
    if warps is None:
        return None
    per_simd_group = max(KEYS_PER_SIMD_GROUP, 32 * keys_per_lane)
    splits = 1
    while splits < 256 and keys >= 2 * splits * warps * per_simd_group and 2 * splits * batch_heads <= 1024:
        splits *= 2
    return splits, warps, keys_per_lane


def split_mma_shared_bytes(heads_per_kv: int, dim: int, group_size: int, warps: int, stages: int) -> int:
    """Threadgroup memory that attention_decode_split_mma declares: each SIMD-group's ring of tiles (16 K and V
    rows, padded, and their scales), which at the end holds each SIMD-group's partial sums (rows of dim + 1); q
    as MMA fragments, and (max, sum) per head per SIMD-group."""
    ring = warps * stages * (32 * (dim // 8 + 4) + 32 * (dim // group_size))
    pool = max(ring, -(-warps * heads_per_kv * (dim + 1) // 4) * 4)
    return 4 * (pool + dim // 16 * 128 + 32 * warps)


def takes_attention_mma(dtypes: tuple, bits: int, heads_per_kv: int, dim: int, group_size: int) -> bool:
    """What attention_decode_split_mma requires: bfloat16 queries and K and V scales and biases (`dtypes`: exact as
    MMA operands, scales read in pairs), 4 bits, at most 16 query heads per kv head (one MMA's rows), groups of 64
    or more (a values tile of 16 dims in one group) and an even number of them per row (a key's scales in whole
    words)."""
    return (all(d == mx.bfloat16 for d in dtypes) and bits == 4 and heads_per_kv <= 16 and group_size >= 64
            and dim % group_size == 0 and dim // group_size % 2 == 0)


def attention_mma_layout(batch_heads: int, keys: int, heads_per_kv: int, dim: int,
                         group_size: int) -> tuple[int, int, int, int]:
    """(splits, SIMD-groups per threadgroup, stages, head groups) of the tensor-core split pass: a kv head's query
    heads halved over twice the threadgroups while they divide and hold more than MMA_HEAD_VALUES of O;
    MMA_ATTENTION_WARPS and MMA_ATTENTION_STAGES, stages then SIMD-groups cut down (not below 2 and 1) until the
    threadgroup memory fits CUDA_SHARED_BYTES; then splits doubled while each SIMD-group keeps
    MMA_KEYS_PER_SIMD_GROUP keys and the grid stays <= 1024 threadgroups per head group."""
    head_groups = 1
    while heads_per_kv // head_groups * dim > MMA_HEAD_VALUES and heads_per_kv % (2 * head_groups) == 0:
        head_groups *= 2
    warps, stages = MMA_ATTENTION_WARPS, MMA_ATTENTION_STAGES
    while split_mma_shared_bytes(heads_per_kv // head_groups, dim, group_size, warps, stages) > CUDA_SHARED_BYTES:
        if stages > 2:
            stages -= 1
        elif warps > 1:
            warps //= 2
        else:
            break
    splits = 1
    while splits < 256 and keys >= 2 * splits * warps * MMA_KEYS_PER_SIMD_GROUP and 2 * splits * batch_heads <= 1024:
        splits *= 2
    return splits, warps, stages, head_groups


def combine_warps(splits: int) -> int:
    """SIMD-groups per threadgroup of the combine pass."""
    return min(16, -(-splits // COMBINE_SPLITS_PER_SIMD_GROUP))


def supports_attention_decode(heads: int, kv_heads: int, dim: int, bits: int, group_size: int) -> bool:
    """What the kernel body requires: whole packs, each lane's value dims in one group and one aligned span."""
    lane_bits = dim // 32 * bits
    return (dim % 32 == 0 and heads % kv_heads == 0 and group_size % (dim // 32) == 0
            and (32 % lane_bits == 0 or lane_bits % 32 == 0)
            and attention_layout(1, 1, heads // kv_heads, dim) is not None)


def attention_decode(q: mx.array, keys: tuple, values: tuple, scale: float, group_size: int, bits: int,
                     runner=None) -> mx.array:
    """softmax(q k^T * scale) v for one query token over an MLX-affine quantized cache (mlx-lm's
    QuantizedKVCache layout: (weights, scales, biases), each [B, HKV, N, ...]). q: [B, HQ, 1, D] -> [B, HQ, 1, D].
    The kernels read q and the cache in place through their strides (views such as mlx-lm's `x[..., :n, :]` need
    no copy); each key's row must be contiguous, as it is in any slice along the keys. Shapes the kernel does not
    take (see supports_attention_decode) run the reference."""
    runner = runner or active_runner()
    if runner is None or not supports_attention_decode(q.shape[1], keys[0].shape[1], q.shape[-1], bits, group_size):
        return attention_decode_reference(q, keys, values, scale, group_size, bits)
    return attention_decode_launches(q, keys, values, scale, group_size, bits, runner)


def attention_decode_launches(q: mx.array, keys: tuple, values: tuple, scale: float, group_size: int, bits: int,
                              runner) -> mx.array:
    """attention_decode's two kernel launches on `runner`, for a shape that supports_attention_decode has passed."""
    b, hq, _, d = q.shape
    hkv, n = keys[0].shape[1], keys[0].shape[2]
    inputs = {"q": q, "k_w": keys[0], "k_s": keys[1], "k_b": keys[2], "v_w": values[0],
              "v_s": values[1], "v_b": values[2]}
    dtypes = (q.dtype, *(a.dtype for a in (*keys[1:], *values[1:])))
    if MMA_ATTENTION and has_tensor_cores(runner) and takes_attention_mma(dtypes, bits, hq // hkv, d, group_size):
        splits, warps, stages, head_groups = attention_mma_layout(b * hkv, n, hq // hkv, d, group_size)
        kernel, extra = "attention_decode_split_mma", {"STAGES": stages, "HEAD_GROUPS": head_groups}
    else:
        splits, warps, keys_per_lane = attention_layout(b * hkv, n, hq // hkv, d)
        kernel, extra, head_groups = "attention_decode_split", {"BITS": bits, "KEYS_PER_LANE": keys_per_lane}, 1
    constants = {"T": q.dtype, "HQ": hq, "D": d, "SPLITS": splits}
    (o, ml) = runner(Launch(
        kernel, inputs, {"o": ((b, hq, splits, d), mx.float32), "ml": ((b, hq, splits, 2), mx.float32)},
        {**constants, "HKV": hkv, "GS": group_size, "WARPS": warps, "SCALE_BITS": float32_bits(scale), **extra},
        b * hkv * head_groups * splits * warps,
        threadgroup=32 * warps,
    ))
    combine = combine_warps(splits)
    (out,) = runner(Launch("attention_decode_combine", {"o": o, "ml": ml}, {"out": ((b, hq, 1, d), q.dtype)},
                           {**constants, "WARPS": combine}, b * hq * d // 32 * combine, threadgroup=32 * combine))
    return out


def stream_read(words: mx.array, groups: int, threads: int = 256, loads: int = 8, runner=None) -> mx.array:
    """The benchmarks' read bound (metal_kernels/stream_read.metal): `words` [N] uint32 read in 16-byte loads by
    `groups` threadgroups of `threads`, `loads` per thread in flight; [groups] uint32, each threadgroup's XOR of
    the words it read."""
    n = words.size
    if words.ndim != 1 or words.dtype != mx.uint32 or n % 4 or n >= 1 << 31:
        raise ValueError(f"stream_read takes 1-D uint32 words, a multiple of 4 and fewer than 2^31 (the count is "
                         f"an int constant); got {words.shape} {words.dtype}")
    if threads < 32 or threads % 32 or groups < 1 or loads < 1:
        raise ValueError(f"stream_read takes whole SIMD-groups per threadgroup, at least one threadgroup and one "
                         f"load in flight; got {threads} threads, {groups} threadgroups, {loads} loads")
    runner = runner or active_runner()
    if runner is None:
        raise RuntimeError("stream_read needs a GPU kernel backend (MLX with Metal or CUDA) or a runner")
    (out,) = runner(Launch("stream_read", {"words": words}, {"out": ((groups,), mx.uint32)},
                           {"N": n, "GROUPS": groups, "THREADS": threads, "LOADS": loads}, groups * threads // 32,
                           threadgroup=threads))
    return out


def float32_bits(value: float) -> int:
    """A float's float32 bits as a (signed 32-bit) template constant."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def attention_decode_reference(q, keys, values, scale, group_size, bits):
    """The same from plain MLX ops: dequantize the cache, repeat kv heads for GQA, softmax in float32."""
    k = mx.dequantize(*keys, group_size=group_size, bits=bits).astype(mx.float32)
    v = mx.dequantize(*values, group_size=group_size, bits=bits).astype(mx.float32)
    repeats = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, repeats, axis=1), mx.repeat(v, repeats, axis=1)
    scores = (q.astype(mx.float32) * scale) @ k.swapaxes(-1, -2)
    return (mx.softmax(scores, axis=-1) @ v).astype(q.dtype)


def install_attention_decode():
    """Route mlx-lm's quantized-cache attention through attention_decode for single-token steps when a
    kernel runner is active (the rest, and every other case, stays mlx-lm's). Idempotent."""
    from mlx_lm.models import base

    original = getattr(base.quantized_scaled_dot_product_attention, "flashmoe_original",
                       base.quantized_scaled_dot_product_attention)

    def attention(queries, q_keys, q_values, scale, mask, group_size=64, bits=8):
        runner = active_runner() if queries.shape[2] == 1 and not isinstance(mask, mx.array) else None
        if runner is not None and supports_attention_decode(queries.shape[1], q_keys[0].shape[1], queries.shape[-1],
                                                            bits, group_size):
            return attention_decode_launches(queries, q_keys, q_values, scale, group_size, bits, runner)
        return original(queries, q_keys, q_values, scale=scale, mask=mask, group_size=group_size, bits=bits)

    attention.flashmoe_original = original
    base.quantized_scaled_dot_product_attention = attention
