"""GPTQ: Hessian-based error feedback on the chip's grid (Frantar et al. 2022; AutoGPTQ ``quantization/gptq.py``).

Minimises ``||(W - Q) X||²`` over the layer's calibration inputs ``X`` one column at a time: the rounding error of
column i, divided by the i-th pivot of the Cholesky factor of H⁻¹, is pushed onto the not-yet-quantized
columns, so the later columns absorb what the earlier ones got wrong. Details as AutoGPTQ:

* H = X^T X / N (the 2/N of the paper only rescales it); dead columns (H_ii = 0) get H_ii = 1 and W[:, i] = 0;
  dampening H += damp * mean(diag H) * I; U = upper Cholesky factor of H⁻¹;
* columns in blocks of 128 (lazy batch updates: W[:, block_end:] -= E U[block, block_end:] after each block);
* at each group start the group's (fp16 scale, integer zero) are fitted on the *already updated* columns of
  that group, as AutoGPTQ does; here either by RTN's rule (``group_fit="rtn"``, AutoGPTQ's default quantizer)
  or by the MSE search of :mod:`romac.quantize.mse` weighted by diag(H) (``"mse"``, AutoGPTQ's ``mse=True``
  in spirit);
* ``act_order``: columns visited by decreasing diag(H), but only with static groups (every group's parameters
  fitted on the original W first), so groups stay contiguous in the ROM;
* the same routine quantizes an arbitrary target ``W`` under ``H``: the calibration driver passes the
  asymmetric target ``W + W D (H + λI)⁻¹`` that also undoes the drift of the earlier quantized layers
  (:mod:`romac.quantize.calibration`).

Codes, scales and zeros are exactly the grid's (:mod:`romac.quantize.grid`), so the result decodes with
``AffineCodec``. Memory: W, Q, H and U of one matrix (float32 / float64), nothing more.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from romac.codecs import QuantTensor
from romac.errors import RomacError
from romac.quantize.grid import (check_matrix, codes_for, dequant_grouped, group_mask, num_groups, qmax_of,
                                 rtn_params, to_quant_tensor)
from romac.quantize.mse import search_group_params

f32 = np.float32


def prepare_hessian(hessian: np.ndarray, cols: int, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(dampened float64 H, dead-column mask), as AutoGPTQ: H_ii = 0 -> 1, then += damp * mean(diag)."""
    h = np.array(hessian, dtype=np.float64, copy=True)
    if h.shape != (cols, cols):
        raise RomacError(f"Hessian has shape {h.shape}, the matrix has {cols} input columns", where="gptq",
                         hint="pass H = X^T X / N of this layer's inputs")
    if not np.isfinite(h).all():
        raise RomacError("Hessian holds inf or NaN", where="gptq", hint="check the calibration activations")
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(cols)] += damp * float(np.mean(np.diag(h)))
    return h, dead


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """U upper triangular with U^T U = H⁻¹ (AutoGPTQ: cholesky, cholesky_inverse, cholesky upper)."""
    try:
        hinv = scipy.linalg.cho_solve(scipy.linalg.cho_factor(h, lower=True), np.eye(len(h)))
        return scipy.linalg.cholesky((hinv + hinv.T) * 0.5, lower=False)
    except np.linalg.LinAlgError:
        raise RomacError("the dampened Hessian is not positive definite", where="gptq",
                         hint="raise the dampening (damp=0.1) or give more calibration tokens") from None


def _fit_group(wcols: np.ndarray, bits: int, how: str, weight: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(s16 [rows], z [rows]) of one group of columns ``[rows, n]``."""
    wg = wcols[:, None, :]
    mask = np.ones((1, wcols.shape[1]), f32)
    if how == "rtn":
        s16, z = rtn_params(wg, mask, bits)
    else:
        s16, z = search_group_params(wg, mask, bits, None if weight is None else weight[None, :], steps=16, lloyd=2, spread=1)
    return s16[:, 0], z[:, 0]


def refit_scales(w: np.ndarray, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, h: np.ndarray,
                 group_size: int) -> np.ndarray:
    """Codes and zeros fixed, the fp16 scales that minimise ``(w_r - deq_r) H (w_r - deq_r)^T`` for every row.

    Per row r the dequantized row is ``Σ_g s_g d_g`` with ``d = q - z`` on group g's columns, so the optimal
    scales solve the G x G system ``(A^T H A) s = A^T H w`` (A: the d's laid out per group). GPTQ fixes each
    group's scale before the error feedback has changed its later columns; this re-solves them all at once.
    A scale is kept where the re-solved one is not positive or the row's error does not fall.
    """
    rows, cols = codes.shape
    ng = scale.shape[1]
    gidx = np.arange(cols) // group_size
    d = (codes.astype(np.float64) - zero.astype(np.float64)[:, gidx])         # [rows, cols]
    hd = h.astype(np.float64)
    m = np.zeros((rows, ng, ng))
    for g in range(ng):
        c = slice(g * group_size, min(cols, (g + 1) * group_size))
        p = d[:, c] @ hd[c, :]                                                  # [rows, cols]
        m[:, g, :] = np.add.reduceat(p * d, np.arange(0, cols, group_size), axis=1)
    b = np.add.reduceat((w.astype(np.float64) @ hd) * d, np.arange(0, cols, group_size), axis=1)
    m[:, np.arange(ng), np.arange(ng)] += 1e-9 * np.maximum(np.trace(m, axis1=1, axis2=2) / ng, 1e-30)[:, None]
    s_new = np.linalg.solve(m, b[..., None])[..., 0]
    s16 = np.where(np.isfinite(s_new) & (s_new > 0), s_new, scale.astype(np.float64))
    with np.errstate(over="ignore"):
        s16 = s16.astype(np.float16)
    s16 = np.where(np.isfinite(s16) & (s16 > 0), s16, scale)

    def row_err(sc: np.ndarray) -> np.ndarray:
        e = w.astype(np.float64) - sc.astype(np.float64)[:, gidx] * d
        return np.sum((e @ hd) * e, axis=1)

    better = row_err(s16) < row_err(scale)
    return np.where(better[:, None], s16, scale).astype(np.float16)


def quantize_gptq(w: np.ndarray, bits: int, group_size: int = 128, hessian: np.ndarray | None = None,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False, group_fit: str = "mse",
                  group_weight: str = "diag", refit: bool = True,
                  return_loss: bool = False) -> QuantTensor | tuple[QuantTensor, float]:
    """GPTQ-quantize ``w [out, in]`` under ``hessian [in, in]`` (= X^T X / N of the calibration inputs).

    ``group_weight``: column weights of the MSE group fit: ``"diag"`` (H_jj, the input's energy), ``"obs"``
    (1 / [H⁻¹]_jj, the OBS saliency GPTQ's own loss uses) or ``"none"``. ``refit``: re-solve every group's fp16
    scale by least squares under H once the codes are final (:func:`refit_scales`).
    ``return_loss``: also return GPTQ's own estimate of ``tr((W - Q) H (W - Q)^T)`` (summed over rows).
    """
    if hessian is None:
        raise RomacError("gptq needs calibration data (the layer's input Hessian)", where="gptq",
                         hint="give --calibration FILE, or choose a data-free quantizer (rtn, mse, hqq)")
    if group_fit not in ("rtn", "mse"):
        raise RomacError(f"unknown group_fit {group_fit!r}", where="gptq", hint="rtn or mse")
    w = check_matrix(w, f"gptq int{bits}")
    qmax = qmax_of(bits)
    rows, cols = w.shape
    if group_weight not in ("diag", "obs", "none"):
        raise RomacError(f"unknown group_weight {group_weight!r}", where="gptq", hint="diag, obs or none")
    h, dead = prepare_hessian(hessian, cols, damp)
    h_orig = h.copy()
    W = w.copy()
    W[:, dead] = 0
    ng = num_groups(cols, group_size)
    scale = np.empty((rows, ng), np.float16)
    zero = np.empty((rows, ng), f32)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    if act_order:
        h = h[np.ix_(perm, perm)]
    U64 = inverse_cholesky_upper(h)
    U = U64.astype(f32)
    if group_weight == "diag":
        diag = np.diag(h_orig).astype(f32)
    elif group_weight == "obs":   # [H⁻¹]_jj = column norms² of U; back to the original column order
        inv_diag = np.empty(cols)
        inv_diag[perm] = np.sum(U64 * U64, axis=0)
        diag = (1.0 / inv_diag).astype(f32)
    else:
        diag = None
    if act_order:   # static groups: parameters from the original W, so storage stays contiguous
        for gi in range(ng):
            c0, c1 = gi * group_size, min(cols, (gi + 1) * group_size)
            scale[:, gi], zero[:, gi] = _fit_group(W[:, c0:c1], bits, group_fit, None if diag is None else diag[c0:c1])
        W = W[:, perm]
    Q = np.empty((rows, cols), f32)
    loss = 0.0
    # Block boundaries on multiples of the group size, so a group never straddles a lazy batch update.
    block = max(group_size, block_size // group_size * group_size) if not act_order else block_size
    for i1 in range(0, cols, block):
        i2 = min(cols, i1 + block)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        E1 = np.empty((rows, i2 - i1), f32)
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col])
            gi = orig // group_size
            if not act_order and orig % group_size == 0:   # fit on the updated columns of this group
                c1 = min(cols, orig + group_size)
                scale[:, gi], zero[:, gi] = _fit_group(W[:, orig:c1], bits, group_fit,
                                                       None if diag is None else diag[orig:c1])
            s16, z = scale[:, gi], zero[:, gi]
            wc = W1[:, i]
            q = codes_for(wc[:, None], s16, z, bits)[:, 0]
            Q[:, orig] = q
            dq = dequant_grouped(q[:, None], s16, z)[:, 0]
            d = U1[i, i]
            err = (wc - dq) / d
            loss += float(np.dot(err, err))
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        if i2 < cols:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if not (0 <= Q.min() and Q.max() <= qmax):
        raise AssertionError("gptq produced a code off the grid")
    if refit:
        scale = refit_scales(w * (~dead)[None, :], Q, scale, zero, h_orig, group_size)
    mask = group_mask(cols, group_size)
    qg = np.zeros((rows, ng * group_size), f32)
    qg[:, :cols] = Q
    qg = qg.reshape(rows, ng, group_size) * mask + (1 - mask) * zero[..., None]
    qt = to_quant_tensor(qg, scale, zero, bits, cols)
    return (qt, loss) if return_loss else qt
