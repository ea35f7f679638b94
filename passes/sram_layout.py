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
            raise CapacityError(
                f"adapter {ad.name!r} alone needs {_mib(pos)} of SRAM but target {target.name!r} has "
                f"{_mib(target.sram_bytes)}",
                where=ad.source or ad.name,
                hint="use a smaller LoRA rank, fewer target modules, or a target with more SRAM",
            )
        largest = max(largest, pos)
        adapters.append(
            {"name": ad.name, "rank": ad.rank, "alpha": ad.alpha, "use_rslora": ad.use_rslora,
             "scaling": ad.scaling, "bytes": pos, "entries": entries}
        )
    context = options.max_context or target.max_context
    per_token = kv_bytes_per_token(model, target)
    kv_offset = ceil_to(largest, SRAM_ALIGN)
    fits = (target.sram_bytes - kv_offset) // per_token
    if context > fits:
        raise CapacityError(
            f"a KV cache of {context} tokens needs {_mib(context * per_token)} of SRAM; with "
            f"{_mib(kv_offset)} of adapter weights target {target.name!r} ({_mib(target.sram_bytes)}) holds {fits} tokens",
            where="--max-context",
            hint=f"use --max-context {fits} or less, a smaller LoRA rank, or a target with more SRAM",
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
