"""Pass ``sram_layout``: place each adapter's LoRA weights and the KV cache in SRAM.

Requires: a Model with its adapters; the target's SRAM size, LoRA and KV precisions.
Guarantees: ``annotations["sram"]`` holds the SRAM map: the slot list (every projection of every layer, so one
program serves any adapter), each adapter's image layout (slot table, then A and B per slot, aligned), the
adapter region (sized for the largest adapter: one adapter is resident at a time, swapping one means loading
another ``sram/<name>.bin``), and the KV-cache region after it, sized by the context length.
Raises :class:`romac.errors.CapacityError` when an adapter or the KV cache does not fit, with the longest
context that would.
"""

from __future__ import annotations

from romac.errors import CapacityError
from romac.ir import PROJECTIONS, Model, projection_tensor
from romac.layout import KV_BYTES, LORA_BYTES, SRAM_ALIGN, ceil_to, slot_table_bytes
from romac.targets import Target


def lora_slots(num_layers: int) -> list[str]:
    """Slot id -> projection tensor; the LORA instruction's operand indexes this list."""
    return [projection_tensor(layer, m) for layer in range(num_layers) for m in PROJECTIONS]


def kv_bytes_per_token(model: Model, target: Target) -> int:
    cfg = model.config
    return cfg.num_layers * 2 * cfg.kv_dim * KV_BYTES[target.kv_cache]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def sram_layout(model: Model, target: Target, options) -> Model:
    cfg = model.config
    slots = lora_slots(cfg.num_layers)
    elem = LORA_BYTES[target.lora]
    adapters, largest = [], 0
    for ad in model.adapters:
        pos = slot_table_bytes(len(slots))
        entries = []
        for slot, tensor in enumerate(slots):
            if tensor not in ad.weights:
                continue
            out_f, in_f = cfg.projection_shape(tensor.rsplit(".", 1)[1])
            a_off = pos
            b_off = ceil_to(a_off + ad.rank * in_f * elem, SRAM_ALIGN)
            pos = ceil_to(b_off + out_f * ad.rank * elem, SRAM_ALIGN)
            entries.append([slot, a_off, b_off, ad.rank, in_f, out_f])
        if pos > target.sram_bytes:
            per_rank = sum((e[4] + e[5]) * elem for e in entries)
            fit = (target.sram_bytes - slot_table_bytes(len(slots)) - 2 * SRAM_ALIGN * len(entries)) // max(per_rank, 1)
            raise CapacityError(
                f"adapter {ad.name!r} (rank {ad.rank}) alone needs {_mib(pos)} of SRAM but target {target.name!r} "
                f"has {_mib(target.sram_bytes)}, over by {_mib(pos - target.sram_bytes)}, leaving no room for a KV cache",
                where=ad.source or ad.name,
                hint=(f"use LoRA rank {fit} or less (then the KV cache still needs "
                      f"{kv_bytes_per_token(model, target):,} B per token), " if fit >= 1 else "")
                + f"adapt fewer projections, or use a target with more than {_mib(pos)} of SRAM",
            )
        largest = max(largest, pos)
        adapters.append(
            {"name": ad.name, "rank": ad.rank, "alpha": ad.alpha, "use_rslora": ad.use_rslora,
             "scaling": ad.scaling, "bytes": pos, "entries": entries}
        )
    context = options.max_context or target.max_context
    per_token = kv_bytes_per_token(model, target)
    kv_offset = ceil_to(largest, SRAM_ALIGN)
    fits = max(0, (target.sram_bytes - kv_offset) // per_token)
    if context > fits:
        short = kv_offset + context * per_token - target.sram_bytes
        knobs = [f"use --max-context {fits} or less"] if fits else []
        big = max(adapters, key=lambda a: a["bytes"], default=None)
        if big is not None:
            per_rank = sum((e[4] + e[5]) * elem for e in big["entries"])
            room = target.sram_bytes - context * per_token - slot_table_bytes(len(slots)) - 2 * SRAM_ALIGN * len(big["entries"])
            rank = room // max(per_rank, 1)
            if 1 <= rank < big["rank"]:
                knobs.append(f"LoRA rank {rank} or less for adapter {big['name']!r} (now {big['rank']})")
        if target.kv_cache != "fp8_e4m3":
            knobs.append(f"a target with an fp8_e4m3 KV cache (now {target.kv_cache})")
        knobs.append(f"a target with at least {_mib(kv_offset + context * per_token)} of SRAM")
        raise CapacityError(
            f"a KV cache of {context} tokens needs {_mib(context * per_token)} of SRAM ({per_token:,} B per token); "
            f"beside {_mib(kv_offset)} of adapter weights target {target.name!r} ({_mib(target.sram_bytes)}) holds "
            f"{fits} tokens, short by {_mib(short)}",
            where="--max-context",
            hint=", or ".join(knobs),
        )
    sram = {
        "bytes": target.sram_bytes,
        "align": SRAM_ALIGN,
        "slots": slots,
        "lora_format": target.lora,
        "adapters": adapters,
        "adapter_region": {"offset": 0, "bytes": largest},
        "kv": {
            "offset": kv_offset,
            "bytes": context * per_token,
            "format": target.kv_cache,
            "max_context": context,
            "bytes_per_token": per_token,
            "max_context_that_fits": int(fits),
        },
    }
    return model.with_annotations(sram=sram)
