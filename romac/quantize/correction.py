"""Low-rank correction of what the ROM gets wrong: ``L1 [out, R] @ L2 [R, in]``, stored in SRAM like a LoRA adapter.

The chip already has a low-rank path (the LoRA adapters in the H-Units), so a rank-R term ``L1 (L2 x)`` applied on
every run can absorb the dominant directions of the quantization error ``E = W - Q``. It is stored in the
target's LoRA precision (FP8 E4M3 with one float32 scale per tensor on the ROMA targets), so it is fitted WITH
that rounding: L2 is rounded first, then L1 is re-solved against the rounded L2 (least squares), then rounded.

* data-free (LoftQ's inner step, peft ``loftq_utils.py``): the rank-R truncated SVD of E (Frobenius-optimal);
* activation-weighted (LQER-style): minimise ``||(E - L1 L2) X^T||² = tr((E - L) H (E - L)^T)`` with
  H = X^T X / N. With ``H + λI = S S^T`` (Cholesky), ``||(E - L) S||_F`` is minimised by the truncated SVD of
  ``E S``, then ``L2 = Σ^½ V^T S⁻¹`` -- the optimal rank-R correction of the layer's *output* error;
* :func:`alternate` (LoftQ's outer loop, generalised): quantize ``W - L1 L2``, refit the correction on
  ``W - Q``, T times, with any quantizer of the registry (GPTQ included, so the ROM codes and the SRAM
  correction are fitted together under the same H). The best iterate (by the weighted error) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.linalg

from romac.codecs import QuantTensor
from romac.codecs.elements import decode_lora, encode_lora
from romac.errors import RomacError
from romac.spec.formats import ELEMENT_FORMATS, element_format

f32 = np.float32
#: precisions a correction can be rounded to: the chip's LoRA formats, and fp32 for experiments
CORRECTION_FORMATS = tuple(ELEMENT_FORMATS)


@dataclass(frozen=True)
class Correction:
    """A rank-R correction as SRAM holds it: ``l1``/``l2`` are the decoded (rounded) values the chip uses."""

    l1: np.ndarray          # [out, R] float32
    l2: np.ndarray          # [R, in] float32
    fmt: str                # LoRA precision it was rounded to
    encoded: tuple = ()     # ((codes, scale) of l1, (codes, scale) of l2) for fp8; () otherwise

    @property
    def rank(self) -> int:
        return int(self.l2.shape[0])

    def sram_bytes(self) -> int:
        """Bytes of the two factors in SRAM (elements x element size; + 2 float32 scales for fp8)."""
        elem = element_format(self.fmt)
        return (self.l1.size + self.l2.size) * elem.bytes + 2 * elem.scale_bytes

    def matrix(self) -> np.ndarray:
        return self.l1 @ self.l2


def sram_roundtrip(x: np.ndarray, fmt: str) -> tuple[np.ndarray, tuple]:
    """A factor as it reads back from SRAM in ``fmt`` (and its encoding for fp8)."""
    x = np.ascontiguousarray(x, f32)
    data, scale = encode_lora(x, fmt)
    codes = np.frombuffer(data, np.uint8)
    decoded = decode_lora(codes, x.shape, fmt, scale)
    if element_format(fmt).scaled:
        return decoded, (codes.reshape(x.shape), f32(scale))
    return decoded, ()


def check_rank(rank: int, shape: tuple[int, int], where: str) -> None:
    if not isinstance(rank, (int, np.integer)) or rank < 0:
        raise RomacError(f"correction rank must be a non-negative integer, got {rank!r}", where=where)
    if rank > min(shape):
        raise RomacError(f"correction rank {rank} exceeds min(out, in) = {min(shape)} of a {shape[0]}x{shape[1]} matrix",
                         where=where, hint=f"use a rank of at most {min(shape)}")


def _whitener(hessian: np.ndarray, damp: float) -> np.ndarray:
    """Lower S with S S^T = H + damp * mean(diag H) * I (dead columns get 1 on the diagonal)."""
    h = np.array(hessian, np.float64, copy=True)
    d = np.diag(h).copy()
    d[d <= 0] = 1.0
    h[np.diag_indices(len(h))] = d + damp * float(np.mean(d))
    return scipy.linalg.cholesky(h, lower=True)


def top_singular(m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` leading singular triplets ``(U [rows, k], σ [k], V^T [k, cols])`` of ``m``, largest first.

    From the eigenvectors of the smaller Gram matrix (float64; LAPACK's syevr asked for the top ``k`` only): a full
    SVD of every projection was half of a GPTQ + correction compile, and the correction needs only its leading
    ``k`` directions. Squaring the matrix costs precision only in the small singular values, which are dropped.
    """
    m = np.asarray(m, np.float64)
    rows, cols = m.shape
    wide = rows < cols
    g = m @ m.T if wide else m.T @ m
    n = len(g)
    k = min(k, n)
    vals, vecs = scipy.linalg.eigh(g, subset_by_index=[n - k, n - 1], driver="evr")
    vals, vecs = vals[::-1], vecs[:, ::-1]
    sv = np.sqrt(np.clip(vals, 0.0, None))
    inv = np.divide(1.0, sv, out=np.zeros_like(sv), where=sv > sv[0] * 1e-12 if k else None)
    if wide:   # vecs are left singular vectors
        return vecs, sv, (vecs.T @ m) * inv[:, None]
    return (m @ vecs) * inv[None, :], sv, vecs.T


def fit_lowrank(err: np.ndarray, rank: int, hessian: np.ndarray | None = None, fmt: str = "fp8_e4m3",
                damp: float = 0.01, refine: int = 2) -> Correction:
    """Best rank-``rank`` L1 @ L2 for ``err [out, in]`` (weighted by ``hessian`` if given), rounded to ``fmt``.

    ``refine``: rounds of "round one factor, re-solve the other by least squares" after the SVD, so the
    correction is optimal for the factors the SRAM actually holds, not for the unrounded ones.
    """
    return fit_lowrank_nested(err, (rank,), hessian, fmt, damp, refine)[rank]


def fit_lowrank_nested(err: np.ndarray, ranks, hessian: np.ndarray | None = None, fmt: str = "fp8_e4m3",
                       damp: float = 0.01, refine: int = 2) -> dict[int, Correction]:
    """:func:`fit_lowrank` for several ranks from one (weighted) SVD: the truncations are nested."""
    if fmt not in CORRECTION_FORMATS:
        raise RomacError(f"unknown LoRA precision {fmt!r}", where="correction",
                         hint=f"one of {', '.join(CORRECTION_FORMATS)}")
    e = np.asarray(err, np.float64)
    for r in ranks:
        check_rank(r, e.shape, "correction")
    out_f, in_f = e.shape
    top = max(ranks)
    out: dict[int, Correction] = {}
    if top == 0:
        return {0: Correction(np.zeros((out_f, 0), f32), np.zeros((0, in_f), f32), fmt)}
    if hessian is None:
        u, sv, vt = top_singular(e, top)
        l2_all = np.sqrt(sv[:top])[:, None] * vt[:top]
        h = None
    else:
        s = _whitener(hessian, damp)
        u, sv, vt = top_singular(e @ s, top)
        # L2 = Σ^½ V^T S⁻¹  (solve S^T Y = (Σ^½ V^T)^T)
        l2_all = scipy.linalg.solve_triangular(s, (np.sqrt(sv[:top])[:, None] * vt[:top]).T, lower=True, trans="T").T
        h = s @ s.T
    l1_all = u[:, :top] * np.sqrt(sv[:top])[None, :]
    eh = e @ h if h is not None else e
    for rank in ranks:
        if rank == 0:
            out[0] = Correction(np.zeros((out_f, 0), f32), np.zeros((0, in_f), f32), fmt)
            continue
        out[rank] = _rounded(e, eh, h, l1_all[:, :rank], l2_all[:rank], fmt, refine)
    return out


def _rounded(e: np.ndarray, eh: np.ndarray, h: np.ndarray | None, l1: np.ndarray, l2: np.ndarray, fmt: str,
             refine: int) -> Correction:
    """Round the SVD factors to ``fmt``, re-solving each against the other's rounded values."""
    rank = l2.shape[0]
    l2q, enc2 = sram_roundtrip(l2, fmt)
    l1q, enc1 = sram_roundtrip(l1, fmt)
    lossless = np.dtype(element_format(fmt).dtype) == np.dtype(f32)   # nothing to compensate
    for k in range(0 if lossless else refine):
        # L1 = argmin ||(E - L1 L2q) S||: L1 = E H L2q^T (L2q H L2q^T)⁻¹   (H = I without calibration)
        l2d = l2q.astype(np.float64)
        g = l2d @ h @ l2d.T if h is not None else l2d @ l2d.T
        l1 = scipy.linalg.solve(g + 1e-12 * np.trace(g) / rank * np.eye(rank), (eh @ l2d.T).T, assume_a="pos").T
        l1q, enc1 = sram_roundtrip(l1, fmt)
        if k == refine - 1:
            break   # end on an L1 solve: the last rounding left uncompensated is L1's own
        # L2 = argmin ||(E - L1q L2) S|| = (L1q^T L1q)⁻¹ L1q^T E  (S is invertible, so it drops out)
        a = l1q.astype(np.float64)
        ata = a.T @ a
        l2 = scipy.linalg.solve(ata + 1e-12 * np.trace(ata) / rank * np.eye(rank), a.T @ e, assume_a="pos")
        l2q, enc2 = sram_roundtrip(l2, fmt)
    return Correction(l1q, l2q, fmt, (enc1, enc2) if element_format(fmt).scaled else ())


def weighted_error(err: np.ndarray, hessian: np.ndarray | None) -> float:
    """``tr(E H E^T)`` (or ``||E||²`` without H): the layer-output squared error per token."""
    e = np.asarray(err, np.float64)
    if hessian is None:
        return float(np.sum(e * e))
    return float(np.sum((e @ hessian) * e))


def alternate(w: np.ndarray, quantize: Callable[[np.ndarray], QuantTensor], dequantize: Callable[[QuantTensor], np.ndarray],
              rank: int, iters: int = 3, hessian: np.ndarray | None = None, fmt: str = "fp8_e4m3",
              damp: float = 0.01) -> tuple[QuantTensor, Correction, list[float]]:
    """LoftQ-style alternation: ``Q = quant(W - L)``, ``L = fit(W - deq(Q))``, ``iters`` times.

    Returns the best (Q, correction) seen and the weighted error of each iterate (the first is plain
    quantization plus its correction, so ``iters=1`` is "quantize, then correct").
    """
    w = np.asarray(w, f32)
    corr = None
    best, history = None, []
    for _ in range(max(1, iters)):
        target = w if corr is None else w - corr.matrix()
        qt = quantize(target)
        corr = fit_lowrank(w - dequantize(qt), rank, hessian, fmt, damp)
        err = weighted_error(w - dequantize(qt) - corr.matrix(), hessian)
        history.append(err)
        if best is None or err < best[2]:
            best = (qt, corr, err)
    return best[0], best[1], history
