"""Quantization algorithms on ROMA's affine grid, selected by name.

A compiler pass calls :func:`quantize_matrix` (codes only) or :func:`quantize_and_correct` (codes + an SRAM
low-rank correction), per matrix, with the layer's input Hessian when the user gave calibration data; or
:func:`romac.quantize.calibration.quantize_model` to run the whole sequential calibration over a model.
Every result is a :class:`romac.codecs.QuantTensor` that ``AffineCodec(bits, group_size).dequantize`` decodes.

Quantizers (``QUANTIZERS``):

* ``rtn``  -- AffineCodec's round-to-nearest (byte-identical to it);
* ``mse``  -- per-group MSE-optimal (fp16 scale, integer zero) search, never worse than RTN on any group;
  with a Hessian it weights the error by diag(H);
* ``hqq``  -- HQQ's half-quadratic zero solver adapted to the integer zero, never worse than RTN per group;
* ``gptq`` -- Hessian error feedback (needs calibration data).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from romac.codecs import QuantTensor
from romac.errors import RomacError
from romac.quantize.calibration import MatrixSpec
from romac.quantize.correction import Correction, alternate, check_rank, fit_lowrank
from romac.quantize.grid import dequantize
from romac.quantize.gptq import quantize_gptq
from romac.quantize.hqq import quantize_hqq
from romac.quantize.mse import quantize_mse
from romac.quantize.rtn import quantize_rtn

__all__ = ["QUANTIZERS", "DATA_AWARE", "default_options", "quantize_matrix", "fit_correction", "quantize_and_correct",
           "Correction", "MatrixSpec", "dequantize"]


def _mse(w: np.ndarray, bits: int, group_size: int, hessian: np.ndarray | None = None, **opts: Any) -> QuantTensor:
    weight = None if hessian is None or not opts.pop("weighted", True) else np.diag(np.asarray(hessian)).copy()
    return quantize_mse(w, bits, group_size, weight=weight, **opts)


QUANTIZERS: dict[str, Callable[..., QuantTensor]] = {
    "rtn": lambda w, bits, group_size, hessian=None, **o: quantize_rtn(w, bits, group_size, **o),
    "mse": _mse,
    "hqq": lambda w, bits, group_size, hessian=None, **o: quantize_hqq(w, bits, group_size, **o),
    "gptq": lambda w, bits, group_size, hessian=None, **o: quantize_gptq(w, bits, group_size, hessian, **o),
}
DATA_AWARE = frozenset({"gptq"})      # need the layer's calibration Hessian


def default_options(name: str, bits: int) -> dict[str, Any]:
    """The options a compile runs a quantizer with. GPTQ visits columns in act order (static groups, so ROM groups
    stay contiguous) at 2 bits, where it measured better on held-out text, and in order otherwise, where act order
    was neutral to worse (docs/accuracy.md; benchmarks/quant_accuracy.py uses the same rule)."""
    return {"act_order": True} if name == "gptq" and bits == 2 else {}


def _check(name: str, bits: int, group_size: int, hessian: np.ndarray | None) -> None:
    if name not in QUANTIZERS:
        raise RomacError(f"unknown quantizer {name!r}", where="--quantizer", hint=f"one of {', '.join(QUANTIZERS)}")
    if name in DATA_AWARE and hessian is None:
        raise RomacError(f"{name} needs calibration data", where="--quantizer",
                         hint="give --calibration FILE, or use a data-free quantizer (rtn, mse, hqq)")
    if bits not in (2, 4, 8):
        raise RomacError(f"the affine grid has 2, 4 or 8 bits, not {bits}", where="--quant", hint="int2, int4 or int8")
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise RomacError(f"invalid group size {group_size!r}", where="--group-size", hint="a positive size, e.g. 128")


def quantize_matrix(name: str, w: np.ndarray, bits: int, group_size: int = 128, hessian: np.ndarray | None = None,
                    **opts: Any) -> QuantTensor:
    """Quantize ``w [out, in]`` with the named algorithm onto int``bits`` groups of ``group_size``."""
    _check(name, bits, group_size, hessian)
    return QUANTIZERS[name](w, bits, group_size, hessian=hessian, **opts)


def fit_correction(err: np.ndarray, rank: int, hessian: np.ndarray | None = None, lora_format: str = "fp8_e4m3",
                   **opts: Any) -> Correction:
    """Rank-``rank`` correction of ``err = W - deq(Q)``, activation-weighted when ``hessian`` is given."""
    return fit_lowrank(err, rank, hessian, lora_format, **opts)


def quantize_and_correct(w: np.ndarray, spec: MatrixSpec, hessian: np.ndarray | None = None,
                         lora_format: str = "fp8_e4m3") -> tuple[QuantTensor, Correction | None, np.ndarray]:
    """(codes, correction or None, effective float32 matrix ``deq(Q) + L1 L2``) for one matrix.

    With ``spec.rank > 0`` the codes and the correction are fitted together (``spec.iters`` alternations of
    "quantize W - L1 L2, refit L1 L2 on W - Q"; 1 = quantize then correct), under ``hessian`` when given.
    """
    _check(spec.method, spec.bits, spec.group_size, hessian)
    check_rank(spec.rank, tuple(np.shape(w)), spec.method)

    def quant(target: np.ndarray) -> QuantTensor:
        return QUANTIZERS[spec.method](target, spec.bits, spec.group_size, hessian=hessian, **dict(spec.opts))

    def deq(qt: QuantTensor) -> np.ndarray:
        return dequantize(qt, spec.group_size)

    if spec.rank == 0:
        qt = quant(w)
        return qt, None, deq(qt)
    qt, corr, _ = alternate(w, quant, deq, spec.rank, spec.iters, hessian, lora_format)
    return qt, corr, deq(qt) + corr.matrix()
