"""Custom kernels: their dispatch per backend and their plain-MLX references (the CPU path and the oracle).

Sources live in `metal_kernels/`: one body per kernel, written once against a few portable names (LANE,
SIMD_SUM, DEVICE, ...) that a per-backend prelude defines: Metal (`mx.fast.metal_kernel`), CUDA
(`mx.fast.cuda_kernel`, the twin), and a C++ prelude with which the tests run the very same bodies on the CPU.
A `Launch` says what to run; a runner runs it. Where no runner exists (the CPU backend) the reference runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

import mlx.core as mx
import mlx.nn as nn

PROLOGUE_MARK = "// ---- prologue ----"
THREADGROUP = 128  # 4 SIMD-groups
UP_ROWS, DOWN_ROWS = 4, 8  # output rows per SIMD-group, as in the two kernel bodies
MAX_DECODE_TOKENS = 4


def read_source(name: str) -> str:
    return files("flashmoe_mlx.metal_kernels").joinpath(name).read_text()


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


@lru_cache(maxsize=None)
def _mlx_kernel(backend: str, kernel: str, input_names: tuple, output_names: tuple):
    header, prologue = prelude(backend)
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    return make(name=f"flashmoe_{kernel}", input_names=list(input_names), output_names=list(output_names),
                source=prologue + read_source(f"{kernel}.metal"), header=header)


def run_on_gpu(launch: Launch) -> list[mx.array]:
    backend = "metal" if mx.metal.is_available() else "cuda"
    kernel = _mlx_kernel(backend, launch.kernel, tuple(launch.inputs), tuple(launch.outputs))
    return kernel(
        inputs=list(launch.inputs.values()),
        template=list(launch.constants.items()),
        grid=(launch.grid, 1, 1),
        threadgroup=(launch.threadgroup, 1, 1),
        output_shapes=[s for s, _ in launch.outputs.values()],
        output_dtypes=[d for _, d in launch.outputs.values()],
    )


def default_runner():
    gpu = mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())
    return run_on_gpu if gpu and mx.default_device() == mx.gpu else None


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
    """Affine-quantized gate/up/down without linear biases and a plain SwiGLU (not gpt-oss's clamped one)."""
    from mlx_lm.models.switch_layers import SwiGLU

    return isinstance(pool.activation, SwiGLU) and all(
        _affine(getattr(pool, p)) for p in ("gate_proj", "up_proj", "down_proj")
    )


def expert_swiglu(x: mx.array, pool: nn.Module, slot_ids: mx.array, weights: mx.array | None = None,
                  runner=None) -> mx.array:
    """Decode-time experts: for token t, sum_j weights[t, j] * down(silu(gate(x_t)) * up(x_t)) over the pool
    slots slot_ids[t, j]. `pool` holds gate_proj/up_proj/down_proj (QuantizedSwitchLinear over the slots).
    x: [NT, H]; slot_ids: [NT, K]. Returns [NT, H], or [NT, K, H] (each expert apart) without weights."""
    runner = runner or active_runner()
    if runner is None:
        return expert_swiglu_reference(x, pool, slot_ids, weights)
    gate, up, down = pool.gate_proj, pool.up_proj, pool.down_proj
    nt, hidden = x.shape
    k = slot_ids.shape[1]
    inter = gate.scales.shape[1]
    slots = slot_ids.astype(mx.uint32)
    constants = {"T": x.dtype, "NT": nt, "K": k, "H": hidden, "I": inter}
    (h,) = runner(Launch(
        "expert_swiglu_gate_up",
        {"x": x, "gate_w": gate.weight, "gate_s": gate.scales, "gate_b": gate.biases,
         "up_w": up.weight, "up_s": up.scales, "up_b": up.biases, "slots": slots},
        {"h": ((nt, k, inter), mx.float32)},
        {**constants, "BITS_UP": gate.bits, "GS_UP": gate.group_size},
        nt * k * -(-inter // UP_ROWS),
    ))
    combine = weights is not None
    (y,) = runner(Launch(
        "expert_swiglu_down",
        {"h": h, "down_w": down.weight, "down_s": down.scales, "down_b": down.biases, "slots": slots,
         "weights": (weights if combine else mx.ones((nt, k))).astype(x.dtype)},
        {"y": ((nt, hidden) if combine else (nt, k, hidden), x.dtype)},
        {**constants, "BITS_DOWN": down.bits, "GS_DOWN": down.group_size, "COMBINE": int(combine)},
        nt * k * -(-hidden // DOWN_ROWS),
        threadgroup=32 * k,  # one SIMD-group per expert
    ))
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


def attention_splits(keys: int) -> int:
    """Splits of the key axis: about 256 keys each, a power of two (few compiled variants), at most 64."""
    splits = 1
    while splits < 64 and keys > 256 * splits:
        splits *= 2
    return splits


def attention_decode(q: mx.array, keys: tuple, values: tuple, scale: float, group_size: int, bits: int,
                     runner=None) -> mx.array:
    """softmax(q k^T * scale) v for one query token over an MLX-affine quantized cache (mlx-lm's
    QuantizedKVCache layout: (weights, scales, biases), each [B, HKV, N, ...]). q: [B, HQ, 1, D] -> [B, HQ, 1, D]."""
    runner = runner or active_runner()
    if runner is None:
        return attention_decode_reference(q, keys, values, scale, group_size, bits)
    b, hq, _, d = q.shape
    hkv, n = keys[0].shape[1], keys[0].shape[2]
    splits = attention_splits(n)
    constants = {"T": q.dtype, "HQ": hq, "D": d}
    (o, ml) = runner(Launch(
        "attention_decode_split",
        {"q": q.reshape(b, hq, d), "k_w": keys[0], "k_s": keys[1], "k_b": keys[2], "v_w": values[0],
         "v_s": values[1], "v_b": values[2], "scale": mx.array([scale], mx.float32)},
        {"o": ((b, hq, splits, d), mx.float32), "ml": ((b, hq, splits, 2), mx.float32)},
        {**constants, "HKV": hkv, "BITS": bits, "GS": group_size, "SPLITS": splits},
        b * hq * splits,
    ))
    (out,) = runner(Launch("attention_decode_combine", {"o": o, "ml": ml}, {"out": ((b, hq, d), q.dtype)},
                           {**constants, "SPLITS": splits}, b * hq))
    return out.reshape(b, hq, 1, d)


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
        d = queries.shape[-1]
        if queries.shape[2] == 1 and d % 32 == 0 and not isinstance(mask, mx.array) and active_runner() is not None:
            return attention_decode(queries, q_keys, q_values, scale, group_size, bits)
        return original(queries, q_keys, q_values, scale=scale, mask=mask, group_size=group_size, bits=bits)

    attention.flashmoe_original = original
    base.quantized_scaled_dot_product_attention = attention
