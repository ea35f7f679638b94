"""The compile report (report.json): what the chip holds and how full it is.

Computed from the compiled plan alone (regions, bank fill, SRAM map), so it is the same whether or not
the weights have been written yet.
"""

from __future__ import annotations

import math

from romac.codecs import get_codec
from romac.ir import Model
from romac.layout import SRAM_ALIGN, ceil_to, param_groups, row_bytes, tile_bytes
from romac.passes.partition import tile_words

_STORAGE_BITS = {"f32": 32, "f16": 16, "u8": 8, "u4": 4, "u2": 2}


def _bit_split(info: dict, word_bytes: int) -> tuple[int, int, int]:
    """(code bits, quantization-parameter bits, padding bits) of a tensor as tiled in ROM."""
    codec = get_codec(**info["codec"])
    grid = info["grid"]
    code = param = total = 0
    counts: dict[tuple[int, int], int] = {(grid.tile_rows, grid.tile_cols): grid.n_full} if grid.n_full else {}
    for _, _, r, c in grid.edge_tiles():
        counts[(r, c)] = counts.get((r, c), 0) + 1
    for (r, c), n in counts.items():
        cb = r * row_bytes(c, codec.bits)
        pb = sum(r * row_bytes(param_groups(codec, c), _STORAGE_BITS[st]) for _, st in codec.param_fields)
        code += n * cb
        param += n * pb
        total += n * tile_bytes(codec, r, c, word_bytes)
    return 8 * code, 8 * param, 8 * (total - code - param)


def _performance(model: Model) -> dict | None:
    from romac.targets.perf import estimate, workload_from_plan

    if model.annotations["target"].perf is None:
        return None
    return estimate(workload_from_plan(model))


def build_report(model: Model) -> dict:
    a = model.annotations
    target = a["target"]
    used = a["bank_words_used"]
    bits_by_format: dict[str, list[int]] = {}  # format -> [weights, rom bits, code bits, parameter bits]
    weights = rom_bits = 0
    for r in a["regions"]:
        info = model.tensors[r["name"]]
        bits = int(tile_words(info, target.word_bytes).sum()) * target.word_bits
        rom_bits += bits
        if r["kind"] == "matrix":
            n = math.prod(r["shape"])
            weights += n
            code, param, _ = _bit_split(info, target.word_bytes)
            acc = bits_by_format.setdefault(r["codec"]["format"], [0, 0, 0, 0])
            acc[0] += n
            acc[1] += bits
            acc[2] += code
            acc[3] += param
        elif "constants_of" in r:
            fmt = model.tensors[r["constants_of"]]["codec"]["format"]
            acc = bits_by_format.setdefault(fmt, [0, 0, 0, 0])
            acc[1] += bits
            acc[3] += bits
    capacity_words = target.bank_words
    sram = a["sram"]
    kv = sram["kv"]
    return {
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
            "capacity_bytes": sram["bytes"],
            "adapter_region_bytes": sram["adapter_region"]["bytes"],
            "adapters": {ad["name"]: {"bytes": ad["bytes"], "rank": ad["rank"], "slots": len(ad["entries"]),
                                      "longest_context_alone": max(0, (sram["bytes"] - ceil_to(ad["bytes"], SRAM_ALIGN))
                                                                   // kv["bytes_per_token"])}
                         for ad in sram["adapters"]},
            "kv_cache": kv,
            "longest_context": kv["max_context_that_fits"],
            "free_bytes": sram["bytes"] - kv["offset"] - kv["bytes"],
        },
        "program": {"instructions": len(a["program"])},
        "performance": _performance(model),
    }
