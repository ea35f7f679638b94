"""Choosing a model's codes with an algorithm: what the quantize pass runs when the user asks for more than
round-to-nearest (``--quantizer``, ``--correction-rank``, ``--calibration``).

The projections are quantized in forward order (:func:`romac.quantize.calibration.quantize_model`: with calibration
tokens each layer sees the inputs the already-quantized layers produce), each onto its planned affine format,
with its low-rank correction when a rank is asked for. Every result goes to a :class:`~romac.quantize.store.CodeStore`
as soon as it exists, so memory stays at one layer; the model that comes back reads its projections from the
store (their codes pass to ROM untouched) and carries the corrections as ``Model.correction``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from romac.errors import RomacError
from romac.ir import Model
from romac.quantize import DATA_AWARE, QUANTIZERS, MatrixSpec, default_options, quantize_and_correct
from romac.quantize.calibration import quantize_model, summarize
from romac.quantize.correction import check_rank
from romac.quantize.store import CodeStore, correction_adapter
from romac.spec.formats import AffineFormat


@dataclass(frozen=True)
class FitRequest:
    """What the user asked the quantizer for."""

    method: str = "rtn"
    correction_rank: int = 0
    iters: int = 1  # alternations of codes and correction (1: quantize, then correct)
    tokens: np.ndarray | None = None  # calibration token ids [sequences, length]
    lora_format: str = "fp8_e4m3"  # the SRAM precision the corrections are fitted in
    ranks: Mapping[str, int] | None = None  # per-matrix ranks (a bit allocation's choice) over correction_rank
    workdir: str | Path | None = None
    progress: bool = False


def check_request(req: FitRequest) -> None:
    if req.method not in QUANTIZERS:
        raise RomacError(f"unknown quantizer {req.method!r}", where="--quantizer",
                         hint=f"one of {', '.join(QUANTIZERS)}")
    if req.method in DATA_AWARE and req.tokens is None:
        raise RomacError(f"{req.method} needs calibration data", where="--quantizer",
                         hint="give --calibration FILE (a text file or a JSON list of token ids), or use a "
                              f"data-free quantizer ({', '.join(sorted(set(QUANTIZERS) - DATA_AWARE))})")
    if req.correction_rank < 0 or req.iters < 1:
        raise RomacError("the correction rank must be >= 0 and the alternations >= 1", where="--correction-rank")


def fit_model(model: Model, formats: Mapping[str, AffineFormat], req: FitRequest) -> tuple[Model, dict]:
    """The model with the projections in ``formats`` quantized as ``req`` says; and the quantizer's report (mean
    calibration output errors against RTN's on the same inputs, the matrices where it did worse, seconds, peak RSS)."""
    check_request(req)
    rank_of = dict(req.ranks) if req.ranks is not None else {n: req.correction_rank for n in formats}
    for name, fmt in formats.items():
        if rank_of.get(name, 0):
            check_rank(rank_of[name], tuple(model.weights[name].shape), "--correction-rank")

    def spec_of(name: str) -> MatrixSpec:
        fmt = formats[name]
        return MatrixSpec(req.method, fmt.code_bits, fmt.group_size, rank_of.get(name, 0), req.iters,
                          default_options(req.method, fmt.code_bits))

    def quantize_one(w: np.ndarray, spec: MatrixSpec, hessian: np.ndarray | None):
        return quantize_and_correct(w, spec, hessian, req.lora_format)

    store = CodeStore(req.workdir)
    weights: dict[str, Any] = dict(model.weights)
    factors: dict[str, tuple[Any, Any]] = {}
    results = []
    layers = sorted({int(n.split(".")[1]) for n in formats})
    for res in quantize_model(model, req.tokens, spec_of, quantize_one, progress=req.progress, layers=layers):
        if res.name not in formats:
            continue
        weights[res.name] = store.put(res.name, res.qt, formats[res.name].spec(), f"{req.method} {res.name}")
        if res.correction is not None:
            factors[res.name] = (store.put_array(f"{res.name}.l2", res.correction.l2),
                                 store.put_array(f"{res.name}.l1", res.correction.l1))
        res.report.pop("_effective", None)
        results.append(dataclasses.replace(res, qt=None))
    missing = sorted(set(formats) - {r.name for r in results})
    if missing:
        raise RomacError(f"the quantizer produced no codes for {missing[0]!r}", where="--quantizer")
    return dataclasses.replace(model, weights=weights, correction=correction_adapter(factors)), summarize(results)
