"""Bit widths and correction ranks per projection under the chip's ROM and SRAM: what ``--rom-budget`` runs.

For every projection and every candidate (an affine format the target's datapath computes x a correction rank)
the quantizer is run once and the error it leaves is measured: ``tr(E H E^T)`` with the layer's calibration
Hessian H (the squared output error per token) when calibration tokens are given, ``||E||²`` otherwise, where
``E = W - deq(Q) - L1 L2``. The ranks of one format come from one (weighted) SVD of its quantization error
(nested truncations). :func:`romac.quantize.allocate.allocate` then picks one candidate per matrix minimising
the summed error within both budgets. The candidates are measured one matrix at a time on the original model's
activations (one FP pass, one layer's Hessians in memory); the compile then quantizes the chosen formats for
real (sequentially, when calibrated).

ROM bits of a candidate are what the matrix takes as placed: whole tiles padded to whole words
(:func:`romac.spec.layout.tile_sizes`), so a budget that the allocation meets is one the partition can meet.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from romac.errors import RomacError
from romac.ir import Model
from romac.quantize import default_options, quantize_matrix
from romac.quantize.allocate import Allocation, Candidate, allocate, correction_bytes
from romac.quantize.calibration import collect_hessians
from romac.quantize.correction import fit_lowrank_nested, weighted_error
from romac.quantize.grid import dequantize
from romac.spec.formats import FP32, AffineFormat, WeightFormat
from romac.spec.layout import TileGrid, tile_sizes

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency; progress is optional
    tqdm = None

f32 = np.float32

#: ranks offered to the allocation below the largest one asked for (the largest is always offered too)
RANK_STEPS = (8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class TileGeometry:
    """How the target cuts a matrix into ROM tiles (what a candidate's placed size depends on)."""

    tile_rows: int
    tile_cols: int
    word_bytes: int

    def rom_bits(self, shape: tuple[int, int], fmt: AffineFormat) -> int:
        grid = TileGrid(shape[0], shape[1], self.tile_rows, self.tile_cols)
        return int(tile_sizes(fmt, grid, self.word_bytes).sum()) * 8


@dataclass(frozen=True)
class BudgetRequest:
    """What ``--rom-budget`` asks for: budgets for the projections, and what may be chosen."""

    rom_bits: float  # ROM bits the projections may take (the budget minus what every other tensor takes)
    sram_bytes: float  # SRAM bytes the corrections may take (beside the adapters and the KV cache)
    formats: tuple[AffineFormat, ...]  # affine formats the datapath computes
    max_rank: int = 0  # largest correction rank offered (0: bit widths only)
    method: str = "rtn"
    lora_format: str = "fp8_e4m3"
    progress: bool = False


def offered_ranks(max_rank: int, shape: tuple[int, int]) -> tuple[int, ...]:
    """0, the steps below ``max_rank`` and ``max_rank`` itself, none above min(out, in)."""
    top = min(max_rank, min(shape))
    return tuple(sorted({0, top, *(r for r in RANK_STEPS if r < top)}))


def _hessians(model: Model, tokens: np.ndarray | None, names: Sequence[str], progress: bool) -> Iterator[tuple[str, np.ndarray | None]]:
    if tokens is None:
        for name in names:
            yield name, None
        return
    wanted = set(names)
    for name, h in collect_hessians(model, tokens, progress=progress):
        if name in wanted:
            yield name, h


def measure_candidates(model: Model, names: Sequence[str], req: BudgetRequest, geometry: TileGeometry,
                       tokens: np.ndarray | None = None) -> list[Candidate]:
    """Every (format, rank) candidate of every projection in ``names`` with its measured error and sizes."""
    cands: list[Candidate] = []
    stream = _hessians(model, tokens, names, req.progress and tokens is not None)
    show = req.progress and tokens is None and tqdm is not None
    bar = tqdm(total=len(names), desc="allocation candidates", unit="matrix", file=sys.stderr) if show else None
    for name, h in stream:
        w = np.asarray(model.weights[name].load(), f32)
        shape = (int(w.shape[0]), int(w.shape[1]))
        ranks = offered_ranks(req.max_rank, shape)
        for fmt in req.formats:
            qt = quantize_matrix(req.method, w, fmt.code_bits, fmt.group_size, h, **default_options(req.method, fmt.code_bits))
            err = w.astype(np.float64) - dequantize(qt, fmt.group_size)
            corrections = fit_lowrank_nested(err, ranks, h, req.lora_format) if len(ranks) > 1 else {}
            for r in ranks:
                left = err if r == 0 else err - corrections[r].matrix()
                cands.append(Candidate(name, option_name(fmt, r), weighted_error(left, h), geometry.rom_bits(shape, fmt),
                                       correction_bytes(shape, r, req.lora_format), w.size))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return cands


def option_name(fmt: AffineFormat, rank: int) -> str:
    return f"{fmt.name}/r{rank}"


def choose(model: Model, names: Sequence[str], req: BudgetRequest, geometry: TileGeometry,
           tokens: np.ndarray | None = None) -> tuple[dict[str, AffineFormat], dict[str, int], Allocation, dict]:
    """Per projection the format and correction rank of the minimum-error allocation within the budgets; and a
    report of the choice (budgets, what it comes to, how many matrices took each option)."""
    if not req.formats:
        raise RomacError("the target's datapath computes no affine format to allocate", where="--rom-budget")
    t0 = time.process_time()
    cands = measure_candidates(model, names, req, geometry, tokens)
    by_option = {option_name(f, r): (f, r) for f in req.formats for r in range(0, req.max_rank + 1)}
    least = sum(min(c.rom_bits for c in cands if c.matrix == n) for n in names)
    if least > req.rom_bits:
        narrowest = min(req.formats, key=lambda f: f.code_bits).name
        raise RomacError(f"the projections need at least {_mib(least)} of B-ROM (all {narrowest}), the budget leaves "
                         f"{_mib(req.rom_bits)} for them", where="--rom-budget",
                         hint=f"raise the budget by {_mib(least - req.rom_bits)} or more")
    try:
        alloc = allocate(cands, req.rom_bits, req.sram_bytes)
    except RomacError as e:
        raise RomacError(e.message, where="--rom-budget", hint=e.hint) from None
    formats = {n: by_option[o][0] for n, o in alloc.choice.items()}
    ranks = {n: by_option[o][1] for n, o in alloc.choice.items()}
    counts: dict[str, int] = {}
    for o in alloc.choice.values():
        counts[o] = counts.get(o, 0) + 1
    uniform = {f.name: sum(c.error for c in cands if c.option == option_name(f, 0)) for f in req.formats}
    report = {"rom_budget_bits": float(req.rom_bits), "sram_budget_bytes": float(req.sram_bytes),
              "rom_bits": alloc.rom_bits, "sram_bytes": alloc.sram_bytes, "bits_per_weight": alloc.bits_per_weight,
              "error": alloc.error, "error_measure": "tr(E H E^T)" if tokens is not None else "||E||^2",
              "error_if_uniform": uniform, "options": dict(sorted(counts.items())),
              "candidates": len(cands), "seconds": round(time.process_time() - t0, 2)}
    return formats, ranks, alloc, report


def _mib(bits: float) -> str:
    return f"{bits / 8 / 2**20:,.2f} MiB"


def projection_budget(total_bits: float, fixed_bits: float, where: str = "--rom-budget") -> float:
    """ROM bits left for the projections once every other tensor is placed; an error if nothing is left."""
    room = total_bits - fixed_bits
    if room <= 0:
        raise RomacError(f"the budget of {_mib(total_bits)} is smaller than the {_mib(fixed_bits)} the embedding, "
                         "head and norms take", where=where,
                         hint="raise the budget, or a narrower --quant-embedding")
    return room


def fixed_rom_bits(shapes: Mapping[str, tuple[int, ...]], formats: Mapping[str, WeightFormat],
                   geometry: TileGeometry) -> int:
    """Placed ROM bits of the tensors the allocation does not choose (matrices tiled, vectors one tile, and the
    per-tensor constants region of a format that has one)."""
    total = 0
    for name, shape in shapes.items():
        fmt = formats[name]
        grid = TileGrid(*shape, geometry.tile_rows, geometry.tile_cols) if len(shape) == 2 else TileGrid.for_vector(shape[0])
        total += int(tile_sizes(fmt, grid, geometry.word_bytes).sum()) * 8
        n_const = fmt.constants_length(tuple(shape))
        if n_const:
            total += int(tile_sizes(FP32(), TileGrid.for_vector(n_const), geometry.word_bytes).sum()) * 8
    return total
