"""The analytical performance, energy and area model of a ROMA-style chip.

Everything here comes from two inputs: the *target* (its ``[rom]``, ``[sram]``, ``[datapath]``, ``[perf]`` and
``[area]`` sections) and the *compiled plan* (the instruction stream, every region's placement in the banks,
the SRAM map and the model's dimensions as the manifest records them). Nothing looks at a model's name. The
same numbers come out of a plan that was never emitted (:func:`workload_from_plan`, what ``romac plan`` and
the tests use) and of an artifact directory (:func:`workload_from_artifacts`, what ``romac inspect`` uses).

The model walks the program one instruction at a time for one forward step of ``T`` new positions after
``pos0`` cached ones (decode: ``T = 1``; prefill: ``T`` = prompt length, ``pos0 = 0``). Each instruction pays
``instruction_latency_cycles`` once (pipeline fill and drain across the mesh) plus its work on the unit that
runs it; instructions run one after another, except that a ``lora`` on the H-Units overlaps the ``matvec``
it follows (same input), so it costs only what it takes beyond that matvec:

* ``matvec`` — L-Units, weight-stationary: every bank streams its own tiles of the matrix out of B-ROM at
  ``rom_read_bits_per_cycle`` (codes *and* scales/zero points, as placed), and the banks work in parallel, so
  the time is the *fullest bank's* share of that matrix, once per token (ROM reads are not reused across
  tokens). Placement imbalance therefore costs time, exactly as the partition left it.
* ``embed`` — L-Units: one row per token, read from the banks holding that row's tiles.
* ``lora`` — H-Units: read A and B of the slot from SRAM (once per ``query_block`` tokens) and do
  ``rank × (in + out)`` MACs per token; the time is the larger of the SRAM time and the MAC time.
* ``kvstore`` — H-Units: write the new K and V rows into SRAM.
* ``attn`` — H-Units (QKᵀ and PV) with the softmax on the vector unit: the larger of the K/V SRAM read time
  (each ``query_block`` of queries reads the keys it can see once), the MAC time and the softmax time.
  Decode is bound by the K/V reads, prefill by the MACs.
* ``rmsnorm``, ``rope``, ``swiglu``, ``add`` — the vector unit, ``vector_lanes × vector_elems_per_lane_per_cycle``
  element operations per cycle (RMSNorm takes two passes: the sum of squares, then the scaling).

Time to first token is the prefill step of the prompt, with the LM head computed for the last position only
(the only logits the first token needs; the emulator's program computes them all, for verification).
Energy is ``rom_pj_per_bit`` per B-ROM bit read, ``sram_pj_per_byte`` per SRAM byte moved, ``h_mac_pj`` per
H-Unit MAC, ``vector_pj_per_elem`` per vector element operation, plus ``static_power_w`` over the step's
time. Area adds up B-ROM bits, SRAM bits and per-unit logic with the ``[area]`` densities.

docs/roma.md derives the ROMA targets' parameters and sets the model beside the paper's figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from romac.spec.formats import element_format
from romac.spec.isa import FLAG_CORRECTION, Buf, Instr, Opcode
from romac.spec.layout import kv_bytes_per_token
from romac.spec.manifest import Manifest
from romac.spec.plan import AdapterLayout, Region, SramMap
from romac.targets import Target

#: Contexts and prompt lengths every estimate reports (plus the compiled max_context).
DECODE_CONTEXTS = (128, 256, 512, 1024, 2048, 4096)
PROMPT_LENGTHS = (1, 256, 1024, 4096)


@dataclass(frozen=True)
class Workload:
    """What the model needs of a compiled program, whichever way it was obtained."""

    target: Target
    dims: dict[str, int]  # hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim
    program: tuple[Instr, ...]
    regions: tuple[Region, ...]
    sram: SramMap
    bank_words_used: tuple[int, ...] = ()
    _region_bits: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        wb = self.target.word_bits
        for r in self.regions:
            words = [e.words for e in r.extents]
            self._region_bits.append((max(words, default=0) * wb, sum(words) * wb))


_DIMS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size")


def workload_from_plan(model, target: Target) -> Workload:
    """From a compiled Model (``romac.passes.run_pipeline`` or ``romac.planning.plan_model``)."""
    p = model.plan
    return Workload(target, {k: int(getattr(model.config, k)) for k in _DIMS}, tuple(p.program), tuple(p.regions),
                    p.sram, tuple(p.bank_words_used))


def workload_from_artifacts(manifest: Manifest, program: Sequence[Instr]) -> Workload:
    """From an artifact directory's manifest and its decoded ``program.bin``."""
    return Workload(Target.from_dict(manifest.target), {k: int(manifest.model[k]) for k in _DIMS},
                    tuple(program), manifest.regions, manifest.sram, manifest.banks.used_words)


class NoPerfModel(Exception):
    """The target has no ``[perf]`` section."""


@dataclass
class StepCost:
    """One forward step: cycles per unit, and what was moved and computed (for the energy)."""

    cycles: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("latency", "l_units", "h_units", "attention", "vector"), 0.0))
    rom_bits: float = 0.0
    sram_bytes: float = 0.0
    h_macs: float = 0.0
    vector_elems: float = 0.0

    @property
    def total_cycles(self) -> float:
        return sum(self.cycles.values())


def _adapter(w: Workload, name: str | None) -> AdapterLayout | None:
    ads = w.sram.adapters
    if name is not None:
        ad = w.sram.adapter(name)
        if ad is None:
            raise KeyError(name)
        return ad
    return max(ads, key=lambda ad: (ad.bytes, ad.name), default=None)


def step_cost(w: Workload, T: int, pos0: int, adapter: str | None = None, logits_rows: int | None = None) -> StepCost:
    """Cycles and activity of one forward step over ``T`` new positions after ``pos0`` cached ones.

    ``logits_rows``: how many positions the LM head is computed for (default all ``T``).
    """
    t, p = w.target, w.target.perf
    if p is None:
        raise NoPerfModel(t.name)
    d = w.dims
    lat = p.instruction_latency_cycles
    rom_bw = p.rom_read_bits_per_cycle
    h_bw = p.h_units * p.h_sram_bytes_per_cycle
    h_mac = p.h_units * p.h_macs_per_cycle
    vec = p.vector_lanes * p.vector_elems_per_lane_per_cycle
    qb = p.query_block
    blocks = math.ceil(T / qb)
    ad = _adapter(w, adapter)
    lora = {e.slot: e for e in ad.entries} if ad else {}
    corr = {e.slot: e for e in w.sram.correction.entries} if w.sram.correction else {}
    lora_elem = element_format(w.sram.lora_format).bytes
    kv_token_layer = kv_bytes_per_token(1, d["num_kv_heads"] * d["head_dim"], w.sram.kv.format)
    c = StepCost()
    prev_matvec: tuple[int, float] | None = None  # (src0, work) of the instruction just before
    for ins in w.program:
        op = ins.op
        this_matvec = None
        if op == Opcode.MATVEC:
            head = ins.dst == Buf.LOGITS  # the LM head
            rows = T if (logits_rows is None or not head) else min(T, logits_rows)
            max_bits, total_bits = w._region_bits[ins.a]
            work = rows * max_bits / rom_bw
            c.cycles["latency"] += lat
            c.cycles["l_units"] += work
            c.rom_bits += rows * total_bits
            this_matvec = (ins.src0, work)
        elif op == Opcode.LORA:
            e = (corr if ins.flags & FLAG_CORRECTION else lora).get(ins.a)
            if e is not None:
                per = e.rank * (e.in_features + e.out_features)
                sram = blocks * per * lora_elem
                macs = T * per
                work = max(sram / h_bw, macs / h_mac)
                if prev_matvec is not None and prev_matvec[0] == ins.src0:
                    # the correction and the adapter both run on the H-Units while the matvec streams its tiles
                    c.cycles["h_units"] += max(0.0, work - prev_matvec[1])
                    this_matvec = (ins.src0, max(0.0, prev_matvec[1] - work))
                else:
                    c.cycles["latency"] += lat
                    c.cycles["h_units"] += work
                c.sram_bytes += sram
                c.h_macs += macs
            elif prev_matvec is not None and prev_matvec[0] == ins.src0:
                this_matvec = prev_matvec  # an empty slot: the next LORA still overlaps the matvec
        elif op == Opcode.EMBED:
            r = w.regions[ins.a]
            cols = r.shape[1]
            _, total_bits = w._region_bits[ins.a]
            row_bits = total_bits / r.shape[0]
            banks_per_row = min(t.banks, math.ceil(cols / r.tile[1]))
            c.cycles["latency"] += lat
            c.cycles["l_units"] += T * row_bits / (rom_bw * banks_per_row)
            c.rom_bits += T * row_bits
        elif op == Opcode.KVSTORE:
            sram = T * kv_token_layer
            c.cycles["latency"] += lat
            c.cycles["h_units"] += sram / h_bw
            c.sram_bytes += sram
        elif op == Opcode.ATTN:
            heads, hd = ins.a, d["head_dim"]
            pairs = T * pos0 + T * (T + 1) / 2
            keys_read = blocks * pos0 + qb * (blocks - 1) * blocks / 2 + T
            sram = keys_read * kv_token_layer
            macs = pairs * heads * hd * 2
            soft = pairs * heads
            c.cycles["latency"] += lat
            c.cycles["attention"] += max(sram / h_bw, macs / h_mac, soft / vec)
            c.sram_bytes += sram
            c.h_macs += macs
            c.vector_elems += soft
        elif op in (Opcode.RMSNORM, Opcode.ROPE, Opcode.SWIGLU, Opcode.ADD):
            if op == Opcode.RMSNORM:
                elems = 2 * T * w.regions[ins.a].shape[0]
            elif op == Opcode.ROPE:
                elems = T * ins.b * d["head_dim"]
            elif op == Opcode.SWIGLU:
                elems = T * d["intermediate_size"]
            else:
                elems = T * d["hidden_size"]
            c.cycles["latency"] += lat
            c.cycles["vector"] += elems / vec
            c.vector_elems += elems
        prev_matvec = this_matvec
    return c


def step_energy_j(w: Workload, c: StepCost) -> dict[str, float]:
    p = w.target.perf
    seconds = c.total_cycles / (w.target.clock_mhz * 1e6)
    e = {
        "rom": c.rom_bits * p.rom_pj_per_bit * 1e-12,
        "sram": c.sram_bytes * p.sram_pj_per_byte * 1e-12,
        "h_macs": c.h_macs * p.h_mac_pj * 1e-12,
        "vector": c.vector_elems * p.vector_pj_per_elem * 1e-12,
        "static": p.static_power_w * seconds,
    }
    e["total"] = sum(e.values())
    return e


def decode_point(w: Workload, context: int, adapter: str | None = None) -> dict[str, Any]:
    """Generating one token with ``context`` tokens already in the KV cache."""
    c = step_cost(w, 1, context, adapter)
    hz = w.target.clock_mhz * 1e6
    cyc = c.total_cycles
    e = step_energy_j(w, c)
    return {
        "context": context,
        "cycles": round(cyc, 1),
        "tokens_per_s": round(hz / cyc, 1),
        "energy_per_token_mj": round(e["total"] * 1e3, 4),
        "power_w": round(e["total"] * hz / cyc, 2),
        "cycles_by_unit": {k: round(v, 1) for k, v in c.cycles.items()},
    }


def ttft_point(w: Workload, prompt: int, adapter: str | None = None) -> dict[str, Any]:
    """Time to first token for a ``prompt``-token prompt (one prefill step, LM head on the last position)."""
    c = step_cost(w, prompt, 0, adapter, logits_rows=1)
    hz = w.target.clock_mhz * 1e6
    e = step_energy_j(w, c)
    return {
        "prompt_tokens": prompt,
        "cycles": round(c.total_cycles, 1),
        "ms": round(c.total_cycles / hz * 1e3, 4),
        "energy_mj": round(e["total"] * 1e3, 4),
        "cycles_by_unit": {k: round(v, 1) for k, v in c.cycles.items()},
    }


def area(target: Target) -> dict[str, Any] | None:
    """Die area by part (mm² and share), from the target's geometry and its ``[area]`` densities."""
    a, p = target.area, target.perf
    if a is None or p is None:
        return None
    parts = {
        "l_units": target.banks * (target.bank_bytes * 8 * a.rom_um2_per_bit * 1e-6 + a.l_unit_logic_mm2),
        "h_units": (target.sram_bytes + p.activation_sram_bytes) * 8 * a.sram_um2_per_bit * 1e-6
        + p.h_units * a.h_unit_logic_mm2,
        "vector_unit": p.vector_lanes * a.vector_lane_mm2,
        "other": a.other_mm2,
        "unattributed": a.unattributed_mm2,
    }
    total = sum(parts.values())
    return {
        "total_mm2": round(total, 2),
        "parts": {k: {"mm2": round(v, 2), "share": round(v / total, 4)} for k, v in parts.items()},
        "rom_mm2": round(target.rom_bytes * 8 * a.rom_um2_per_bit * 1e-6, 2),
        "sram_mm2": round((target.sram_bytes + p.activation_sram_bytes) * 8 * a.sram_um2_per_bit * 1e-6, 2),
    }


def _curve_points(limit: int) -> list[int]:
    pts = {1, 2, 4, 8}
    x = 16
    while x < limit:
        pts.add(x)
        pts.add(int(x * 1.5))
        x *= 2
    pts.add(limit)
    return sorted(q for q in pts if q <= limit)


def estimate(w: Workload, contexts: Sequence[int] | None = None, prompts: Sequence[int] | None = None,
             adapter: str | None = None) -> dict[str, Any]:
    """The full estimate (what ``report.json``'s ``performance`` holds and ``romac inspect`` prints)."""
    t = w.target
    if t.perf is None:
        raise NoPerfModel(t.name)
    kv = w.sram.kv
    fits = kv.max_context_that_fits
    contexts = sorted(set(contexts or DECODE_CONTEXTS) | {kv.max_context})
    prompts = sorted(set(prompts or PROMPT_LENGTHS))
    ad = _adapter(w, adapter)
    decode = [{**decode_point(w, L, adapter), "fits": L + 1 <= fits} for L in contexts]
    ttft = [{**ttft_point(w, P, adapter), "fits": P <= fits} for P in prompts]
    curve_limit = max(fits, 1)
    curve = [decode_point(w, L, adapter) for L in _curve_points(curve_limit)]
    one = step_cost(w, 1, 0, adapter)
    out = {
        "model": "romac analytical model (docs/roma.md)",
        "clock_mhz": t.clock_mhz,
        "adapter": {"name": ad.name, "rank": ad.rank} if ad else None,
        "max_context_that_fits": fits,
        "compiled_context": kv.max_context,
        "decode": decode,
        "ttft": ttft,
        "curve": {"context": [q["context"] for q in curve], "tokens_per_s": [q["tokens_per_s"] for q in curve],
                  "energy_per_token_mj": [q["energy_per_token_mj"] for q in curve]},
        "per_token": {
            "rom_bits_read": int(one.rom_bits),
            "lora_sram_bytes": int(sum(e.rank * (e.in_features + e.out_features) for e in ad.entries) *
                                   element_format(w.sram.lora_format).bytes) if ad else 0,
            "kv_sram_bytes_per_context_token": kv.bytes_per_token,
        },
        "area": area(t),
    }
    if w.sram.correction is not None:
        out["per_token"]["correction_sram_bytes"] = int(
            sum(e.rank * (e.in_features + e.out_features) for e in w.sram.correction.entries)
            * element_format(w.sram.lora_format).bytes)
    return out
