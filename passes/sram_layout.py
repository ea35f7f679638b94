"""Pass ``sram_layout``: place each adapter's LoRA weights and the KV cache in SRAM.

Requires: nothing of the plan (the model's adapters; the target's SRAM size, LoRA and KV precisions).
Provides: ``sram`` — the :class:`romac.spec.plan.SramMap`: the slot list (every projection of every layer, so one
program serves any adapter), each adapter's image layout (slot table, then A and B per slot, aligned), the
adapter region (sized for the largest adapter: one adapter is resident at a time, swapping one means loading
another ``sram/<name>.bin``), and the KV-cache region after it, sized by the context length.
Raises :class:`romac.errors.CapacityError` when an adapter or the KV cache does not fit, with the longest
context that would.
"""

from __future__ import annotations

from typing import Sequence

from romac.errors import CapacityError
from romac.ir import PROJECTIONS, LoraAdapter, Model, ModelConfig, projection_tensor
from romac.passes.options import CompileOptions
from romac.spec.formats import KV_FORMATS, element_format
from romac.spec.layout import SRAM_ALIGN, ceil_to, lora_block_bytes, slot_table_bytes
from romac.spec.layout import kv_bytes_per_token as _kv_per_token
from romac.spec.plan import AdapterLayout, KvRegion, SlotEntry, SramMap
from romac.targets import Target

REQUIRES: tuple[str, ...] = ()
PROVIDES = ("sram",)


def lora_slots(num_layers: int) -> list[str]:
    """Slot id -> projection tensor; the LORA instruction's operand indexes this list."""
    return [projection_tensor(layer, m) for layer in range(num_layers) for m in PROJECTIONS]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def sram_layout(model: Model, target: Target, options: CompileOptions) -> Model:
    context = options.max_context or target.max_context
    return model.with_plan(sram=plan_sram(model.config, model.adapters, target, context))


def plan_sram(cfg: ModelConfig, adapters_in: Sequence[LoraAdapter], target: Target, context: int) -> SramMap:
    """The SRAM map of these adapters and a KV cache of ``context`` tokens on the target (CapacityError if they
    do not fit, naming the rank or context that would). What the pass computes, and ``romac adapter add`` again
    for a compiled directory."""
    slots = lora_slots(cfg.num_layers)
    elem = element_format(target.lora).bytes
    adapters, largest = [], 0
    for ad in adapters_in:
        pos = slot_table_bytes(len(slots))
        entries = []
        for slot, tensor in enumerate(slots):
            if tensor not in ad.weights:
                continue
            out_f, in_f = cfg.projection_shape(tensor.rsplit(".", 1)[1])
            a_off = pos
            b_off = ceil_to(a_off + lora_block_bytes(ad.rank, in_f, target.lora), SRAM_ALIGN)
            pos = ceil_to(b_off + lora_block_bytes(out_f, ad.rank, target.lora), SRAM_ALIGN)
            entries.append(SlotEntry(slot, a_off, b_off, ad.rank, in_f, out_f))
        if pos > target.sram_bytes:
            per_rank = sum((e.in_features + e.out_features) * elem for e in entries)
            fit = (target.sram_bytes - slot_table_bytes(len(slots)) - 2 * SRAM_ALIGN * len(entries)) // max(per_rank, 1)
            raise CapacityError(
                f"adapter {ad.name!r} (rank {ad.rank}) alone needs {_mib(pos)} of SRAM but target {target.name!r} "
                f"has {_mib(target.sram_bytes)}, over by {_mib(pos - target.sram_bytes)}, leaving no room for a KV cache",
                where=ad.source or ad.name,
                hint=(f"use LoRA rank {fit} or less (then the KV cache still needs "
                      f"{_kv_per_token(cfg.num_layers, cfg.kv_dim, target.kv_cache):,} B per token), " if fit >= 1 else "")
                + f"adapt fewer projections, or use a target with more than {_mib(pos)} of SRAM",
            )
        largest = max(largest, pos)
        adapters.append(AdapterLayout(ad.name, ad.rank, ad.alpha, ad.use_rslora, ad.scaling, pos, tuple(entries)))
    per_token = _kv_per_token(cfg.num_layers, cfg.kv_dim, target.kv_cache)
    kv_offset = ceil_to(largest, SRAM_ALIGN)
    fits = max(0, (target.sram_bytes - kv_offset) // per_token)
    if context > fits:
        short = kv_offset + context * per_token - target.sram_bytes
        knobs = [f"use --max-context {fits} or less"] if fits else []
        big = max(adapters, key=lambda a: a.bytes, default=None)
        if big is not None:
            per_rank = sum((e.in_features + e.out_features) * elem for e in big.entries)
            room = target.sram_bytes - context * per_token - slot_table_bytes(len(slots)) - 2 * SRAM_ALIGN * len(big.entries)
            rank = room // max(per_rank, 1)
            if 1 <= rank < big.rank:
                knobs.append(f"LoRA rank {rank} or less for adapter {big.name!r} (now {big.rank})")
        narrowest = min(KV_FORMATS, key=lambda f: element_format(f).bytes)
        if element_format(target.kv_cache).bytes > element_format(narrowest).bytes:
            knobs.append(f"a target with an {narrowest} KV cache (now {target.kv_cache})")
        knobs.append(f"a target with at least {_mib(kv_offset + context * per_token)} of SRAM")
        raise CapacityError(
            f"a KV cache of {context} tokens needs {_mib(context * per_token)} of SRAM ({per_token:,} B per token); "
            f"beside {_mib(kv_offset)} of adapter weights target {target.name!r} ({_mib(target.sram_bytes)}) holds "
            f"{fits} tokens, short by {_mib(short)}",
            where="--max-context",
            hint=", or ".join(knobs),
        )
    kv = KvRegion(kv_offset, context * per_token, target.kv_cache, context, per_token, int(fits))
    return SramMap(target.sram_bytes, SRAM_ALIGN, tuple(slots), target.lora, tuple(adapters), largest, kv)
