"""The plan's invariants, checked after every pass (as FINN's ``verify_step`` or tinygrad's ``SPEC``).

A plan has five parts (:data:`PLAN_PARTS`); each pass declares which it requires and provides. :func:`check_plan`
validates every part present, so a pass that leaves a field inconsistent fails right after it runs, naming the pass
and the field. A failure here is a bug in a pass, never a problem of the user's input (that is a RomacError).
"""

from __future__ import annotations

import numpy as np

from romac.ir import Model, expected_shape, stored_tensors
from romac.spec.isa import validate, validate_operands
from romac.spec.layout import CONSTANTS_SUFFIX, SRAM_ALIGN, TileGrid, kv_bytes_per_token, lora_block_bytes, tile_words
from romac.spec.plan import MATRIX, VECTOR, Plan
from romac.targets import Target

#: formats: every stored tensor has a TensorPlan with its format (quantize); grids: and its tile grid (tile);
#: regions: placed in the banks (partition); sram: the SRAM map (sram_layout); program: the instructions (schedule)
PLAN_PARTS = ("formats", "grids", "regions", "sram", "program")


class PlanError(AssertionError):
    """A pass left the plan inconsistent."""


def _present(plan: Plan, part: str) -> bool:
    if part == "formats":
        return bool(plan.tensors)
    if part == "grids":
        return bool(plan.tensors) and all(t.grid is not None for t in plan.tensors.values())
    return getattr(plan, part) is not None


def missing_parts(plan: Plan, parts: tuple[str, ...]) -> list[str]:
    return [p for p in parts if not _present(plan, p)]


def check_plan(model: Model, target: Target, after: str = "") -> None:
    """Raise :class:`PlanError` at the first inconsistency in the parts of ``model.plan`` that are present."""
    plan = model.plan

    def fail(what: str) -> None:
        raise PlanError(f"after pass {after!r}: {what}" if after else what)

    if _present(plan, "formats"):
        _check_formats(model, fail)
    if _present(plan, "grids"):
        _check_grids(plan, target, fail)
    if plan.regions is not None:
        _check_regions(plan, target, fail)
    if plan.sram is not None:
        _check_sram(model, target, fail)
    if plan.program is not None:
        validate(plan.program)
        validate_operands(plan.program, len(plan.regions or ()), len(plan.sram.slots) if plan.sram else 0)


def _check_formats(model: Model, fail) -> None:
    plan, cfg = model.plan, model.config
    for name in stored_tensors(cfg):
        t = plan.tensors.get(name)
        if t is None:
            fail(f"tensor {name!r} has no format")
        if tuple(t.shape) != tuple(expected_shape(cfg, name)):
            fail(f"tensor {name!r} is planned as {t.shape}, the model has {expected_shape(cfg, name)}")
    for t in plan.tensors.values():
        if (t.kind, len(t.shape)) not in ((MATRIX, 2), (VECTOR, 1)):
            fail(f"tensor {t.name!r} is a {t.kind} of shape {t.shape}")


def _check_grids(plan: Plan, target: Target, fail) -> None:
    for t in plan.tensors.values():
        g, fmt = t.grid, t.format
        if t.kind == VECTOR:
            if g != TileGrid.for_vector(t.shape[0]):
                fail(f"vector {t.name!r} is not one tile")
            continue
        if (g.rows, g.cols, g.tile_rows, g.tile_cols) != (*t.shape, target.tile_rows, target.tile_cols):
            fail(f"matrix {t.name!r} has grid {g}, not {t.shape} in the target's tiles")
        if fmt.group and (target.tile_cols % fmt.group or (fmt.flat_blocks and g.cols % fmt.group)):
            fail(f"matrix {t.name!r}: tiles do not start on {fmt.name} group boundaries")
        n_const = fmt.constants_length(t.shape)
        const = plan.tensors.get(t.name + CONSTANTS_SUFFIX)
        if n_const and (const is None or const.constants_of != t.name or const.shape != (n_const,)):
            fail(f"matrix {t.name!r} needs a {n_const}-value constants vector {t.name + CONSTANTS_SUFFIX!r}")
        if not n_const and const is not None:
            fail(f"matrix {t.name!r} has a constants vector its format does not use")


def _check_regions(plan: Plan, target: Target, fail) -> None:
    placed = [t for t in plan.tensors.values() if t.grid is not None]
    if [r.name for r in plan.regions] != [t.name for t in placed]:
        fail("the regions are not the tiled tensors in plan order")
    ends: dict[int, list[tuple[int, int, str]]] = {}
    for r, t in zip(plan.regions, placed):
        if (r.kind, r.format, tuple(r.shape), r.constants_of, r.quantizer) != \
                (t.kind, t.format, tuple(t.shape), t.constants_of, t.quantizer):
            fail(f"region {r.name!r} disagrees with its tensor plan")
        words = tile_words(r.format, t.grid, target.word_bytes)
        if r.n_tiles != words.size or r.grid != t.grid:
            fail(f"region {r.name!r} has {r.n_tiles} tiles, its grid {words.size}")
        share = np.bincount((r.start_bank + np.arange(words.size)) % target.banks, weights=words,
                            minlength=target.banks).astype(np.int64)
        if {e.bank: e.words for e in r.extents} != {b: int(w) for b, w in enumerate(share) if w}:
            fail(f"region {r.name!r}: its extents are not the round-robin share of its tiles")
        for e in r.extents:
            ends.setdefault(e.bank, []).append((e.word_offset, e.word_offset + e.words, r.name))
    used = [0] * target.banks
    for bank, spans in ends.items():
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                fail(f"regions {a!r} and {b!r} overlap in bank {bank}")
        used[bank] = spans[-1][1]
        if used[bank] > target.bank_words:
            fail(f"bank {bank} is filled to word {used[bank]} of {target.bank_words}")
    if plan.bank_words_used is None or list(plan.bank_words_used) != used:
        fail("bank_words_used is not each bank's fill")


def _check_sram(model: Model, target: Target, fail) -> None:
    s = model.plan.sram
    cfg = model.config
    if s.bytes != target.sram_bytes or s.align != SRAM_ALIGN or len(s.slots) != len(set(s.slots)):
        fail("the SRAM map does not describe the target's SRAM")
    if [a.name for a in s.adapters] != [a.name for a in model.adapters]:
        fail("the SRAM map's adapters are not the model's")
    images = [(a, s.adapter_region_bytes) for a in s.adapters]
    if s.correction is not None:
        images.append((s.correction, s.adapter_region_offset))
        ranks = {t.name: t.correction_rank for t in model.plan.tensors.values() if t.correction_rank}
        if {s.slots[e.slot]: e.rank for e in s.correction.entries} != ranks:
            fail("the correction image's slots are not the planned correction ranks")
    elif s.adapter_region_offset:
        fail("the adapter region is not at address 0 though there is no correction")
    for a, room in images:
        if a.bytes > room:
            fail(f"image {a.name!r} is larger than its region")
        for e in a.entries:
            if not (0 <= e.slot < len(s.slots) and e.a_offset % SRAM_ALIGN == 0 and e.b_offset % SRAM_ALIGN == 0
                    and e.a_offset + lora_block_bytes(e.rank, e.in_features, s.lora_format) <= e.b_offset
                    and e.b_offset + lora_block_bytes(e.out_features, e.rank, s.lora_format) <= a.bytes):
                fail(f"adapter {a.name!r}: slot entry {e} is out of place")
    kv = s.kv
    if kv.offset < s.adapter_region_offset + s.adapter_region_bytes or kv.offset % SRAM_ALIGN \
            or kv.offset + kv.bytes > s.bytes:
        fail(f"the KV cache [{kv.offset}, {kv.offset + kv.bytes}) is not inside the free SRAM")
    if kv.bytes != kv.max_context * kv.bytes_per_token or kv.max_context > kv.max_context_that_fits:
        fail("the KV cache's size disagrees with its context")
    if kv.bytes_per_token != kv_bytes_per_token(cfg.num_layers, cfg.kv_dim, kv.format):
        fail("the KV cache's bytes per token disagree with the model")
