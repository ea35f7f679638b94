"""Pass ``sram_layout``: place the base's low-rank correction, each adapter's LoRA weights and the KV cache in SRAM.

Requires: ``formats`` (each tensor plan's ``correction_rank``); the model's adapters; the target's SRAM size, LoRA
and KV precisions.
Provides: ``sram`` — the :class:`romac.spec.plan.SramMap`: the slot list (every projection of every layer, so one
program serves any adapter); the correction image (when some projection has a correction: slot table, then L2 as
A and L1 as B per corrected slot, always resident from address 0); each adapter's image layout (slot table, then
A and B per slot, aligned); the adapter region after the correction (sized for the largest adapter: one adapter is
resident at a time, swapping one means loading another ``sram/<name>.bin``); and the KV-cache region after it,
sized by the context length.
Raises :class:`romac.errors.CapacityError` when they do not fit, naming the context, the LoRA rank or the
correction rank that would.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from romac.errors import CapacityError
from romac.ir import PROJECTIONS, LoraAdapter, Model, ModelConfig, projection_tensor
from romac.passes.options import CompileOptions
from romac.spec.formats import KV_FORMATS, element_format
from romac.spec.layout import SRAM_ALIGN, ceil_to, lora_block_bytes, slot_table_bytes
from romac.spec.layout import kv_bytes_per_token as _kv_per_token
from romac.spec.plan import AdapterLayout, KvRegion, SlotEntry, SramMap
from romac.targets import Target

REQUIRES = ("formats",)
PROVIDES = ("sram",)
CORRECTION = "correction"  # the correction image's layout name (never an adapter's: see SramMap.correction)


def lora_slots(num_layers: int) -> list[str]:
    """Slot id -> projection tensor; the LORA instruction's operand indexes this list."""
    return [projection_tensor(layer, m) for layer in range(num_layers) for m in PROJECTIONS]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def image_layout(cfg: ModelConfig, slots: Sequence[str], ranks: Mapping[str, int], lora_format: str) -> tuple[int, tuple[SlotEntry, ...]]:
    """(bytes, entries) of one SRAM image: the slot table, then A [rank, in] and B [out, rank] of every slot with a
    rank, each block aligned."""
    pos = slot_table_bytes(len(slots))
    entries = []
    for slot, tensor in enumerate(slots):
        rank = ranks.get(tensor, 0)
        if not rank:
            continue
        out_f, in_f = cfg.projection_shape(tensor.rsplit(".", 1)[1])
        a_off = pos
        b_off = ceil_to(a_off + lora_block_bytes(rank, in_f, lora_format), SRAM_ALIGN)
        pos = ceil_to(b_off + lora_block_bytes(out_f, rank, lora_format), SRAM_ALIGN)
        entries.append(SlotEntry(slot, a_off, b_off, rank, in_f, out_f))
    return pos, tuple(entries)


def _rank_that_fits(room: int, entries: Sequence[SlotEntry], lora_format: str, n_slots: int) -> int:
    """The largest uniform rank whose image would fit in ``room`` bytes (its slots as these entries)."""
    per_rank = sum((e.in_features + e.out_features) * element_format(lora_format).bytes for e in entries)
    return (room - slot_table_bytes(n_slots) - 2 * SRAM_ALIGN * len(entries)) // max(per_rank, 1)


def sram_layout(model: Model, target: Target, options: CompileOptions) -> Model:
    context = options.max_context or target.max_context
    ranks = {n: t.correction_rank for n, t in model.plan.tensors.items() if t.correction_rank}
    return model.with_plan(sram=plan_sram(model.config, model.adapters, target, context, ranks))


def plan_sram(cfg: ModelConfig, adapters_in: Sequence[LoraAdapter], target: Target, context: int,
              correction_ranks: Mapping[str, int] | None = None) -> SramMap:
    """The SRAM map of a correction (ranks per projection), these adapters and a KV cache of ``context`` tokens on
    the target (CapacityError if they do not fit, naming what would). What the pass computes, and ``romac adapter
    add`` again for a compiled directory."""
    slots = lora_slots(cfg.num_layers)
    per_token = _kv_per_token(cfg.num_layers, cfg.kv_dim, target.kv_cache)
    correction = None
    if correction_ranks:
        size, entries = image_layout(cfg, slots, correction_ranks, target.lora)
        top = max(e.rank for e in entries)
        correction = AdapterLayout(CORRECTION, top, float(top), False, 1.0, size, entries)
        if size > target.sram_bytes:
            fit = _rank_that_fits(target.sram_bytes, entries, target.lora, len(slots))
            raise CapacityError(
                f"the low-rank correction (rank up to {top}) alone needs {_mib(size)} of SRAM but target "
                f"{target.name!r} has {_mib(target.sram_bytes)}", where="--correction-rank",
                hint=(f"use --correction-rank {fit} or less, " if fit >= 1 else "") + "or correct fewer matrices")
    base = ceil_to(correction.bytes, SRAM_ALIGN) if correction else 0
    adapters, largest = [], 0
    for ad in adapters_in:
        pos, entries = image_layout(cfg, slots, {t: ad.rank for t in ad.weights}, target.lora)
        if base + pos > target.sram_bytes:
            fit = _rank_that_fits(target.sram_bytes - base, entries, target.lora, len(slots))
            beside = f" beside {_mib(base)} of correction" if base else " alone"
            raise CapacityError(
                f"adapter {ad.name!r} (rank {ad.rank}){beside} needs {_mib(pos)} of SRAM but target {target.name!r} "
                f"has {_mib(target.sram_bytes)}, over by {_mib(base + pos - target.sram_bytes)}, leaving no room for a "
                f"KV cache",
                where=ad.source or ad.name,
                hint=(f"use LoRA rank {fit} or less (then the KV cache still needs {per_token:,} B per token), "
                      if fit >= 1 else "") + f"adapt fewer projections, or use a target with more than "
                                             f"{_mib(base + pos)} of SRAM",
            )
        largest = max(largest, pos)
        adapters.append(AdapterLayout(ad.name, ad.rank, ad.alpha, ad.use_rslora, ad.scaling, pos, entries))
    kv_offset = ceil_to(base + largest, SRAM_ALIGN)
    fits = max(0, (target.sram_bytes - kv_offset) // per_token)
    if context > fits:
        short = kv_offset + context * per_token - target.sram_bytes
        knobs = [f"use --max-context {fits} or less"] if fits else []
        big = max(adapters, key=lambda a: a.bytes, default=None)
        room = target.sram_bytes - context * per_token
        if big is not None:
            rank = _rank_that_fits(room - base, big.entries, target.lora, len(slots))
            if 1 <= rank < big.rank:
                knobs.append(f"LoRA rank {rank} or less for adapter {big.name!r} (now {big.rank})")
        if correction is not None:
            rank = _rank_that_fits(room - ceil_to(largest, SRAM_ALIGN), correction.entries, target.lora, len(slots))
            knobs.append(f"--correction-rank {max(rank, 0)} or less (now up to {correction.rank})")
        narrowest = min(KV_FORMATS, key=lambda f: element_format(f).bytes)
        if element_format(target.kv_cache).bytes > element_format(narrowest).bytes:
            knobs.append(f"a target with an {narrowest} KV cache (now {target.kv_cache})")
        knobs.append(f"a target with at least {_mib(kv_offset + context * per_token)} of SRAM")
        what = "correction and adapter weights" if correction is not None else "adapter weights"
        raise CapacityError(
            f"a KV cache of {context} tokens needs {_mib(context * per_token)} of SRAM ({per_token:,} B per token); "
            f"beside {_mib(kv_offset)} of {what} target {target.name!r} ({_mib(target.sram_bytes)}) holds "
            f"{fits} tokens, short by {_mib(short)}",
            where="--max-context",
            hint=", or ".join(knobs),
        )
    kv = KvRegion(kv_offset, context * per_token, target.kv_cache, context, per_token, int(fits))
    return SramMap(target.sram_bytes, SRAM_ALIGN, tuple(slots), target.lora, tuple(adapters), largest, kv,
                   correction, base)
