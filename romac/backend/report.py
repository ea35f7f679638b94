"""The compile report (report.json): what the chip holds and how full it is.

Computed from the compiled plan alone (regions, bank fill, SRAM map), so it is the same whether or not
the weights have been written yet.
"""

from __future__ import annotations

import math

from romac.ir import Model
from romac.spec.layout import SRAM_ALIGN, ceil_to, tile_bit_split
from romac.spec.plan import MATRIX, Region
from romac.targets import Target
from romac.targets.perf import estimate, workload_from_plan


def _bit_split(region: Region, word_bytes: int) -> tuple[int, int, int]:
    """(code bits, quantization-parameter bits, padding bits) of a region as tiled in ROM."""
    grid = region.grid
    counts: dict[tuple[int, int], int] = {(grid.tile_rows, grid.tile_cols): grid.n_full} if grid.n_full else {}
    for _, _, r, c in grid.edge_tiles():
        counts[(r, c)] = counts.get((r, c), 0) + 1
    code = param = pad = 0
    for (r, c), n in counts.items():
        cb, pb, padb = tile_bit_split(region.format, r, c, word_bytes)
        code, param, pad = code + n * cb, param + n * pb, pad + n * padb
    return code, param, pad


def build_report(model: Model, target: Target) -> dict:
    plan = model.plan
    used = plan.bank_words_used
    bits_by_format: dict[str, list[int]] = {}  # format -> [weights, rom bits, code bits, parameter bits]
    formats = {r.name: r.format.name for r in plan.regions}
    weights = rom_bits = 0
    for r in plan.regions:
        bits = r.words * target.word_bits
        rom_bits += bits
        if r.kind == MATRIX:
            n = math.prod(r.shape)
            weights += n
            code, param, _ = _bit_split(r, target.word_bytes)
            acc = bits_by_format.setdefault(r.format.name, [0, 0, 0, 0])
            acc[0] += n
            acc[1] += bits
            acc[2] += code
            acc[3] += param
        elif r.constants_of is not None:
            acc = bits_by_format.setdefault(formats[r.constants_of], [0, 0, 0, 0])
            acc[1] += bits
            acc[3] += bits
    capacity_words = target.bank_words
    sram = plan.sram
    kv = sram.kv
    report = {
        "target": target.name,
        "rom": {
            "capacity_bytes": target.rom_bytes,
            "capacity_bits": target.rom_bytes * 8,
            "used_bytes": rom_bits // 8,
            "used_bits": rom_bits,
            "utilisation": rom_bits / (target.rom_bytes * 8),
            "bank_capacity_bits": capacity_words * target.word_bits,
            "banks": [
                {"bank": b, "used_words": int(u), "used_bits": int(u) * target.word_bits, "utilisation": u / capacity_words}
                for b, u in enumerate(used)
            ],
            "bank_imbalance_words": int(max(used) - min(used)),
        },
        "weights": {
            "matrix_parameters": weights,
            "effective_bits_per_weight": {
                fmt: {"parameters": n, "rom_bits": bits, "bits_per_weight": bits / n if n else None,
                      "code_bits_per_weight": code / n if n else None,
                      "scale_zero_bits_per_weight": param / n if n else None,
                      "padding_bits_per_weight": (bits - code - param) / n if n else None}
                for fmt, (n, bits, code, param) in sorted(bits_by_format.items())
            },
        },
        "sram": {
            "capacity_bytes": sram.bytes,
            "adapter_region_bytes": sram.adapter_region_bytes,
            "adapters": {ad.name: {"bytes": ad.bytes, "rank": ad.rank, "slots": len(ad.entries),
                                   "longest_context_alone": max(0, (sram.bytes - ceil_to(
                                       sram.adapter_region_offset + ad.bytes, SRAM_ALIGN)) // kv.bytes_per_token)}
                         for ad in sram.adapters},
            "kv_cache": kv.to_json(),
            "longest_context": kv.max_context_that_fits,
            "free_bytes": sram.bytes - kv.offset - kv.bytes,
        },
        "program": {"instructions": len(plan.program)},
        "performance": estimate(workload_from_plan(model, target)) if target.perf is not None else None,
    }
    report["weights"]["matrices"] = {
        r.name: {"format": r.format.name, "group": r.format.group, "quantizer": r.quantizer,
                 "correction_rank": plan.tensors[r.name].correction_rank if r.name in plan.tensors else 0,
                 "bits_per_weight": r.words * target.word_bits / math.prod(r.shape)}
        for r in plan.regions if r.kind == MATRIX}
    for key in ("quantizer", "allocation"):  # how the codes and the per-matrix choice were made
        if key in model.source:
            report["weights"][key] = model.source[key]
    if sram.correction is not None:  # the base's low-rank correction, resident in SRAM on every run
        c = sram.correction
        report["sram"]["correction"] = {"bytes": c.bytes, "max_rank": c.rank, "slots": len(c.entries),
                                        "ranks": {sram.slots[e.slot]: e.rank for e in c.entries}}
    return report
