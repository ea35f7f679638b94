"""HQQ's half-quadratic zero-point solver (mobiusml/hqq ``hqq/core/optimize.py``), adapted to the chip's grid.

HQQ minimises ``||W - deq(quant(W))||_p^p`` (p = 0.7: a sparsity-promoting norm, so a few large errors are
tolerated for many small ones) over the zero point by alternating a shrinkage step on the error and a closed-form
zero update (HQQ's ``optimize_weights_proximal_legacy``, 20 iterations, β = 10, κ = 1.01, early stop):

    Wq = clip(round(W / s + z));  We = shrink_p(W - (Wq - z) s, β);  z = mean(Wq - (W - We) / s);  β *= κ

HQQ keeps the zero in floating point (its grid is shifted by a fraction of a step). ROMA's zero is an integer
in [0, 2^k - 1] and its codes are ``rint(w / s) + z``, so the adapted solver

1. runs HQQ's iterations on a float zero with RTN's fp16 scale,
2. rounds the zero to the better of floor/ceil (by squared error, the objective the rest of romac measures),
3. optionally (``scale_refit``) re-solves the scale by least squares for the codes found, rounded to fp16,
4. keeps RTN's parameters in every group where this does not strictly lower the squared error.

Measured (benchmarks/quant_accuracy.py, docs in the module ``romac.quantize``): on this grid the integer zero
removes most of what HQQ's float zero buys, and the MSE search (:mod:`romac.quantize.mse`) gets lower errors.
"""

from __future__ import annotations

import numpy as np

from romac.codecs import QuantTensor
from romac.quantize.grid import (as_fp16_scale, check_matrix, codes_for, group_mask, group_sq_error, grouped,
                                 qmax_of, refit_scale, rtn_params, to_quant_tensor)

f32 = np.float32
ROW_CHUNK = 1 << 15


def _shrink_lp(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """HQQ's generalised soft-threshold: sign(x) · relu(|x| - |x|^(p-1) / β)."""
    a = np.abs(x)
    with np.errstate(divide="ignore"):
        return np.sign(x) * np.maximum(a - np.power(a + 1e-12, p - 1) / beta, 0)


def hqq_group_params(wg: np.ndarray, mask: np.ndarray, bits: int, iters: int = 20, lp_norm: float = 0.7,
                     beta: float = 10.0, kappa: float = 1.01, scale_refit: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(s16, integer z) per group of ``wg [rows, G, g]`` (``mask [G, g]`` marks real columns)."""
    qmax = qmax_of(bits)
    s16, z_rtn = rtn_params(wg, mask, bits)
    e_rtn = group_sq_error(wg, s16, z_rtn, bits, mask)
    inv = f32(1) / s16.astype(f32)[..., None]        # HQQ's "scale" is the inverse step
    zf = z_rtn[..., None].copy()
    n = mask.sum(-1)
    best_err = np.inf
    for _ in range(iters):
        wq = np.clip(np.rint(wg * inv + zf), 0, qmax)
        wr = (wq - zf) / inv
        err = float(np.abs((wg - wr) * mask).sum())
        if err >= best_err:       # HQQ's early stop: the l1 error stopped falling
            break
        best_err, z_keep = err, zf.copy()
        we = _shrink_lp(wg - wr, beta, lp_norm)
        zf = (((wq - (wg - we) * inv) * mask).sum(-1) / n)[..., None]
        beta *= kappa
    else:
        z_keep = zf
    z_keep = z_keep[..., 0]
    best_s, best_z, best_e = s16, z_rtn, e_rtn
    for z in (np.floor(z_keep), np.ceil(z_keep)):
        z = np.clip(z, 0, qmax)
        e = group_sq_error(wg, s16, z, bits, mask)
        better = e < best_e
        best_z, best_e = np.where(better, z, best_z), np.where(better, e, best_e)
    if scale_refit:
        q = codes_for(wg, best_s, best_z, bits)
        s_ls = refit_scale(wg, q, best_z, mask)
        s_new = as_fp16_scale(np.where(s_ls > 0, s_ls, best_s.astype(f32)))
        e = group_sq_error(wg, s_new, best_z, bits, mask)
        better = e < best_e
        best_s, best_e = np.where(better, s_new, best_s), np.where(better, e, best_e)
    keep = ~(best_e < e_rtn)
    return np.where(keep, s16, best_s).astype(np.float16), np.where(keep, z_rtn, best_z).astype(f32)


def quantize_hqq(w: np.ndarray, bits: int, group_size: int = 128, iters: int = 20, lp_norm: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01, scale_refit: bool = True) -> QuantTensor:
    """Quantize ``w [out, in]`` with HQQ's zero solver on the integer-zero, fp16-scale grid."""
    w = check_matrix(w, f"hqq int{bits}")
    rows, cols = w.shape
    mask = group_mask(cols, group_size)
    per = max(1, ROW_CHUNK // cols)
    qs, ss, zs = [], [], []
    for r0 in range(0, rows, per):
        wg = grouped(w[r0:r0 + per], group_size)
        s16, z = hqq_group_params(wg, mask, bits, iters, lp_norm, beta, kappa, scale_refit)
        qs.append(codes_for(wg, s16, z, bits))
        ss.append(s16)
        zs.append(z)
    return to_quant_tensor(np.concatenate(qs), np.concatenate(ss), np.concatenate(zs), bits, cols)
