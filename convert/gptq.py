"""Calibrated expert quantization (`--calibrate`): GPTQ with searched affine grids, in MLX's format.

GPTQ (Frantar et al., 2022) quantizes a matrix's input columns left to right and spreads each column's
rounding error over the columns not yet quantized, so that the error of the *output* X W^T on calibration
inputs X is small rather than the error of W itself. The inputs enter only as H = X^T X / n, and the
spreading uses the upper Cholesky factor U of H^-1: after column c is rounded, column c' > c receives
-(w_c - q_c) / U[c, c] * U[c, c']. Each group's scale and bias are chosen when the group is reached, on
the error-updated weights, by the same search as `--search` (affine_search.py), weighted by diag(H).
Measured on the demo MoE (docs/QUALITY.md): mean KL about 40-50% below round-to-nearest.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .affine_search import affine_codes, pack_codes, search_affine

DAMPING = 0.01  # of the mean diagonal, added to H: keeps it positive definite (GPTQ's default)


def _diagonal_floor(diag: mx.array, damping: float) -> mx.array:
    """What damping adds to H's diagonal: `damping` x its mean, and 1 for input channels never active (zero
    diagonal), so that H is invertible and their weights are still fitted (as if by plain least squares)."""
    return (diag <= 0).astype(mx.float32) + damping * mx.maximum(diag.mean(-1, keepdims=True), 1e-12)


def damped(hessian: mx.array, damping: float = DAMPING) -> mx.array:
    diag = mx.diagonal(hessian, axis1=-2, axis2=-1)
    return hessian + mx.eye(hessian.shape[-1]) * _diagonal_floor(diag, damping)[..., None, :]


def inverse_factor(hessian: mx.array) -> mx.array:
    """Upper Cholesky factor of damped(H)^-1 for each [in, in] matrix of `hessian` [E, in, in], damping more
    where H is still short of positive definite. In float64 through numpy's LAPACK: at in = 4096 MLX's CPU
    linalg took 31 s per expert here, numpy 3 s."""
    for damping in (DAMPING, 0.1, 1.0):
        h = np.array(damped(hessian, damping), dtype=np.float64)
        try:
            return mx.array(np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1).astype(np.float32))
        except np.linalg.LinAlgError:
            continue
    raise ValueError("calibration statistics are not positive definite even with heavy damping")


def quantize_gptq(w: mx.array, hessian: mx.array, group_size: int, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    """Like `mx.quantize(w, group_size, bits)` for stacked experts w [E, out, in], each expert's error
    weighted by its inputs' H [E, in, in]: (packed weights, scales, biases), scales and biases in w's dtype."""
    experts, rows, cols = w.shape
    groups = cols // group_size
    hessian = hessian.astype(mx.float32)
    u = inverse_factor(hessian)
    diag = mx.diagonal(hessian, axis1=-2, axis2=-1)
    importance = diag + _diagonal_floor(diag, DAMPING)  # [E, in]: damped H's diagonal, the grid search's weights
    work = w.astype(mx.float32)
    codes, scales, biases = [], [], []
    for g in range(groups):
        c0, c1 = g * group_size, (g + 1) * group_size
        block = work[:, :, c0:c1]
        weights = mx.broadcast_to(importance[:, None, c0:c1], block.shape).reshape(-1, group_size)
        scale, bias = (v.astype(w.dtype) for v in search_affine(block.reshape(-1, group_size), bits, weights))
        scales.append(scale.reshape(experts, rows))
        biases.append(bias.reshape(experts, rows))
        s, b = scale.astype(mx.float32).reshape(experts, rows), bias.astype(mx.float32).reshape(experts, rows)
        errors = []
        for j in range(group_size):
            c = c0 + j
            column = block[:, :, j]
            q = affine_codes(column, s, b, 2**bits - 1)
            error = (column - (s * q + b)) / u[:, c, c][:, None]
            if j + 1 < group_size:
                block[:, :, j + 1 :] = block[:, :, j + 1 :] - error[..., None] * u[:, None, c, c + 1 : c1]
            codes.append(q)
            errors.append(error)
        if c1 < cols:
            work[:, :, c1:] = work[:, :, c1:] - mx.stack(errors, -1) @ u[:, c0:c1, c1:]
        mx.eval(work, codes[-group_size:])
    packed = pack_codes(np.array(mx.stack(codes, -1).astype(mx.uint32)), bits)
    return mx.array(packed), mx.stack(scales, -1), mx.stack(biases, -1)
