"""The compile report (report.json): what the chip holds and how full it is.

Computed from the compiled plan alone (regions, bank fill, SRAM map), so it is the same whether or not
the weights have been written yet.
"""

from __future__ import annotations

import math

from romac.ir import Model
from romac.passes.partition import tile_words


def build_report(model: Model) -> dict:
    a = model.annotations
    target = a["target"]
    used = a["bank_words_used"]
    bits_by_format: dict[str, list[int]] = {}
    weights = rom_bits = 0
    for r in a["regions"]:
        info = model.tensors[r["name"]]
        bits = int(tile_words(info, target.word_bytes).sum()) * target.word_bits
        rom_bits += bits
        if r["kind"] == "matrix":
            n = math.prod(r["shape"])
            weights += n
            acc = bits_by_format.setdefault(r["codec"]["format"], [0, 0])
            acc[0] += n
            acc[1] += bits
        elif "constants_of" in r:
            fmt = model.tensors[r["constants_of"]]["codec"]["format"]
            bits_by_format.setdefault(fmt, [0, 0])[1] += bits
    capacity_words = target.bank_words
    sram = a["sram"]
    return {
        "target": target.name,
        "rom": {
            "capacity_bytes": target.rom_bytes,
            "used_bytes": rom_bits // 8,
            "utilisation": rom_bits / (target.rom_bytes * 8),
            "banks": [
                {"bank": b, "used_words": int(u), "utilisation": u / capacity_words} for b, u in enumerate(used)
            ],
            "bank_imbalance_words": int(max(used) - min(used)),
        },
        "weights": {
            "matrix_parameters": weights,
            "effective_bits_per_weight": {
                fmt: {"parameters": n, "rom_bits": bits, "bits_per_weight": bits / n if n else None}
                for fmt, (n, bits) in sorted(bits_by_format.items())
            },
        },
        "sram": {
            "capacity_bytes": sram["bytes"],
            "adapter_region_bytes": sram["adapter_region"]["bytes"],
            "adapters": {ad["name"]: {"bytes": ad["bytes"], "rank": ad["rank"], "slots": len(ad["entries"])}
                         for ad in sram["adapters"]},
            "kv_cache": sram["kv"],
            "free_bytes": sram["bytes"] - sram["kv"]["offset"] - sram["kv"]["bytes"],
        },
        "program": {"instructions": len(a["program"])},
    }
