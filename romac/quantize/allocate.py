"""Bit widths and correction ranks per matrix under ROM and SRAM budgets: a small integer program.

LQ-LoRA's allocation (HanGuo97/lq-lora, Gurobi there; ``scipy.optimize.milp`` / HiGHS here): for every matrix m a
list of candidate options o -- a format the datapath allows (int2/int4/int8 g128) and a correction rank -- each
with its measured error ``e[m, o]`` (activation-weighted output error when calibration data was given, weight
error otherwise), its ROM bits and its SRAM bytes. Choose exactly one option per matrix:

    minimise   Σ e[m, o] x[m, o]
    subject to Σ_o x[m, o] = 1            for every m
               Σ rom[m, o] x[m, o] ≤ ROM budget (bits)
               Σ sram[m, o] x[m, o] ≤ SRAM budget (bytes)
               x binary

Pure function over a table; the caller measures the errors (one quantization per candidate) and turns the choice
into per-matrix specs. The errors must be additive proxies of the model's loss (e.g. all measured as absolute
output errors on the same calibration stream), which is what makes the sum meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from romac.errors import RomacError
from romac.quantize.grid import num_groups
from romac.spec.formats import LORA_FORMATS, affine_format, element_format


def rom_bits(shape: tuple[int, int], bits: int, group_size: int = 128) -> int:
    """ROM bits of one affine matrix: k-bit codes + per group an fp16 scale and a k-bit zero."""
    out_f, in_f = shape
    return affine_format(bits, group_size).storage_bits(out_f * in_f, out_f * num_groups(in_f, group_size))


def correction_bytes(shape: tuple[int, int], rank: int, fmt: str = LORA_FORMATS[0]) -> int:
    """SRAM bytes of a rank-R correction: both factors in the LoRA precision (+ a scale each if it is scaled)."""
    out_f, in_f = shape
    elem = element_format(fmt)
    return rank * (out_f + in_f) * elem.bytes + (2 * elem.scale_bytes if rank else 0)


@dataclass(frozen=True)
class Candidate:
    matrix: str
    option: str          # e.g. "int4/r16"
    error: float
    rom_bits: int
    sram_bytes: int
    params: int          # weights of the matrix (for bits/weight)


@dataclass(frozen=True)
class Allocation:
    choice: dict          # matrix -> option
    error: float
    rom_bits: int
    sram_bytes: int
    bits_per_weight: float


def allocate(candidates: Sequence[Candidate], rom_budget_bits: float, sram_budget_bytes: float = np.inf,
             time_limit: float = 60.0) -> Allocation:
    """The minimum-error choice of one candidate per matrix within both budgets (exact MILP, HiGHS)."""
    if not candidates:
        raise RomacError("no candidates to allocate", where="allocate")
    matrices = list(dict.fromkeys(c.matrix for c in candidates))
    index = {m: i for i, m in enumerate(matrices)}
    n = len(candidates)
    err = np.array([c.error for c in candidates], float)
    if not np.isfinite(err).all():
        raise RomacError("a candidate has a non-finite error", where="allocate")
    rom = np.array([c.rom_bits for c in candidates], float)
    sram = np.array([c.sram_bytes for c in candidates], float)
    one = np.zeros((len(matrices), n))
    one[[index[c.matrix] for c in candidates], np.arange(n)] = 1.0
    # Minimum achievable budgets, to say by how much an infeasible budget falls short.
    min_rom = sum(min(c.rom_bits for c in candidates if c.matrix == m) for m in matrices)
    min_sram = sum(min(c.sram_bytes for c in candidates if c.matrix == m) for m in matrices)
    if min_rom > rom_budget_bits or min_sram > sram_budget_bytes:
        raise RomacError(f"no choice fits: the smallest options need {min_rom:,} ROM bits and {min_sram:,} SRAM "
                         f"bytes, the budgets are {rom_budget_bits:,.0f} and {sram_budget_bytes:,.0f}",
                         where="allocate", hint="raise the budget or offer narrower formats / lower ranks")
    # Scale the objective to O(1) so HiGHS' tolerances mean the same for any error unit.
    scale = max(float(np.abs(err).max()), 1e-300)
    cons = [LinearConstraint(one, 1, 1), LinearConstraint(rom[None, :], -np.inf, rom_budget_bits)]
    if np.isfinite(sram_budget_bytes):
        cons.append(LinearConstraint(sram[None, :], -np.inf, sram_budget_bytes))
    res = milp(err / scale, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
    if res.x is None:
        raise RomacError(f"the integer program found no solution ({res.message})", where="allocate",
                         hint="raise the budgets or the time limit")
    x = res.x > 0.5
    choice = {candidates[i].matrix: candidates[i].option for i in np.flatnonzero(x)}
    params = sum({c.matrix: c.params for c in candidates}.values())
    rb = int(rom[x].sum())
    return Allocation(choice, float(err[x].sum()), rb, int(sram[x].sum()), rb / max(params, 1))
