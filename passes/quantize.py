"""Pass ``quantize``: choose the number format of every stored tensor.

Requires: nothing (a Model whose ``weights`` cover ``romac.ir.stored_tensors(config)``).
Provides: ``formats`` — a :class:`romac.spec.plan.TensorPlan` (kind, shape, format) for every stored tensor.
Projections take the target's ``weights`` format (or ``--quant``), embedding and untied LM head the target's
``embedding`` format (or ``--quant-embedding``), norm gains the target's ``norms`` format, and the RoPE table
fp32. nf4/fp4 take the bitsandbytes parameters of the options (``--bnb-blocksize``, ``--[no-]double-quant``,
``--bnb-threads``, ``--bnb-cpu-repacked``; default 64, on, 1, off).
A weight that arrives already quantized (a handle with a ``codec_spec``: a bitsandbytes, GPTQ, AWQ or
compressed-tensors checkpoint) keeps its own format, so its codes reach ROM untouched — unless the user names a
format for it (``--quant`` / ``--quant-embedding``), or the target cannot place or compute the stored grid: then
the target's (or the named) format is used, and the emitter passes the stored codes through only if it is the
stored one; any other format re-quantizes the dequantized values (``romac compile`` says so).
Passing the nf4/fp4 parameters when no tensor is quantized to nf4/fp4 from floats is an error (they would do
nothing). With plain round-to-nearest no weight data is read here: the codes are computed by the emitter, one
matrix at a time. With ``--quantizer`` other than rtn or ``--correction-rank``, the projections' codes are chosen
here by :mod:`romac.quantize` (in forward order, with ``--calibration`` tokens for the data-aware ones), kept in a
temporary store one layer at a time, and passed to the emitter as stored codes; the correction becomes
``Model.correction`` (an SRAM image), and each tensor plan says which quantizer chose it and its correction rank.
"""

from __future__ import annotations

import dataclasses

from romac.errors import RomacError
from romac.ir import EMBEDDING_TENSORS, ROPE_TABLE, Model, stored_tensors
from romac.passes.options import ROM_BUDGET_FILL, CompileOptions
from romac.passes.sram_layout import lora_slots, plan_sram
from romac.quantize import budget
from romac.quantize.fit import FitRequest, fit_model
from romac.spec.formats import (FP32, WEIGHT_FORMATS, AffineFormat, Bnb4bitFormat, WeightFormat, from_spec, is_format,
                                weight_format)
from romac.spec.layout import SRAM_ALIGN, slot_table_bytes
from romac.spec.plan import MATRIX, VECTOR, TensorPlan
from romac.targets import Target

REQUIRES: tuple[str, ...] = ()
PROVIDES = ("formats",)


def choose_format(fmt: str, target: Target, options: CompileOptions, where: str = "--quant") -> WeightFormat:
    """A format name as this target (group size) and the options (bitsandbytes parameters) use it."""
    if fmt not in WEIGHT_FORMATS:
        raise RomacError(f"unknown weight format {fmt!r}", where=where, hint=f"choose one of {', '.join(WEIGHT_FORMATS)}")
    if fmt not in target.weight_formats:
        raise RomacError(f"target {target.name!r} does not compute {fmt}", where=where,
                         hint=f"its datapath computes {', '.join(target.weight_formats)}")
    repacked = bool(options.bnb_cpu_repacked)
    try:
        return weight_format(fmt, group_size=target.group_size, blocksize=options.bnb_blocksize or 64,
                             double_quant=options.double_quant is not False, bnb_threads=options.bnb_threads or 1,
                             cpu_repacked=repacked)
    except RomacError as e:  # say which option made the format invalid
        flag = "--bnb-cpu-repacked / --no-double-quant" if repacked and options.double_quant is False \
            else "--bnb-blocksize"
        raise RomacError(e.message, where=flag, hint=e.hint) from None


def placeable(fmt: WeightFormat, shape: tuple[int, ...], target: Target) -> bool:
    """Whether the target can hold and compute a tensor in this format: one its datapath computes, whose groups
    start tiles (for bitsandbytes' flat blocks: rows of whole blocks)."""
    if len(shape) != 2:
        return True
    return fmt.name in target.weight_formats and not (fmt.group and target.tile_cols % fmt.group) and \
        not (fmt.flat_blocks and shape[1] % fmt.group)


def _bnb_flags(options: CompileOptions) -> list[str]:
    flags = []
    if options.bnb_blocksize is not None:
        flags.append("--bnb-blocksize")
    if options.double_quant is not None:
        flags.append("--double-quant" if options.double_quant else "--no-double-quant")
    if options.bnb_threads is not None:
        flags.append("--bnb-threads")
    if options.bnb_cpu_repacked:
        flags.append("--bnb-cpu-repacked")
    return flags


def quantize(model: Model, target: Target, options: CompileOptions) -> Model:
    cfg = model.config
    proj = choose_format(options.quant or target.weights, target, options)
    embed = choose_format(options.quant_embedding or target.embedding, target, options, "--quant-embedding")
    norm = weight_format(target.norms)
    formats, requested = {}, []
    for name in stored_tensors(cfg):
        handle = model.weights[name]
        shape = tuple(handle.shape)
        chosen = options.quant_embedding if name in EMBEDDING_TENSORS else options.quant
        stored = from_spec(handle.codec_spec) if handle.codec_spec is not None else None
        if stored is not None and chosen is None and placeable(stored, shape, target):
            fmt = stored  # pre-quantized: kept (its codes pass through)
        elif name == ROPE_TABLE:
            fmt = FP32()
        elif len(shape) == 1:
            fmt = norm
        else:  # the target's (a stored grid it cannot place is re-quantized from the dequantized weights)
            fmt = embed if name in EMBEDDING_TENSORS else proj
        if stored is None or chosen is not None:
            requested.append(fmt)
        formats[name] = fmt
    flags = _bnb_flags(options)
    if flags and not any(isinstance(f, Bnb4bitFormat) for f in requested):
        raise RomacError(
            "has no effect: no tensor is quantized to nf4 or fp4 from floating-point weights",
            where=" / ".join(flags),
            hint="add --quant nf4 (or fp4); a bitsandbytes checkpoint keeps its stored codes unless --quant names "
                 "another format",
        )
    method = options.quantizer or "rtn"
    ranks_of = None
    if options.rom_budget is not None:
        model, ranks_of = _allocate(model, formats, target, options, method)
    if method != "rtn" or options.correction_rank and ranks_of is None or any((ranks_of or {}).values()):
        model = _fit(model, formats, target, options, method, ranks_of)
    elif options.calibration_tokens is not None and options.rom_budget is None:
        raise RomacError("has no effect with round-to-nearest codes and no correction", where="--calibration",
                         hint="add --quantizer gptq (or another) or --correction-rank R")
    ranks = {}
    if model.correction is not None:
        ranks = {t: int(a.shape[0]) for t, (a, _) in model.correction.weights.items()}
    fitted = set(_projections(model, formats)) if method != "rtn" else set()
    tensors = {}
    for name, fmt in formats.items():
        shape = tuple(model.weights[name].shape)
        tensors[name] = TensorPlan(name, VECTOR if len(shape) == 1 else MATRIX, shape, fmt,
                                   quantizer=method if name in fitted else "rtn", correction_rank=ranks.get(name, 0))
    return model.with_plan(tensors=tensors)


def _projections(model: Model, formats: dict) -> list[str]:
    return [n for n, f in formats.items() if len(model.weights[n].shape) == 2 and n not in EMBEDDING_TENSORS]


def _refuse_stored_codes(model: Model, names: list[str], options: CompileOptions, flags: str) -> None:
    stored = [n for n in names if model.weights[n].codec_spec is not None]
    if stored and options.quant is None:
        raise RomacError(
            f"the base arrives quantized ({len(stored)} projections hold stored codes, which its adapters were "
            f"trained on); {flags} would replace them", where=flags,
            hint="pass --quant FORMAT as well to re-quantize it anyway (an adapter trained on the stored base may "
                 "then no longer fit), or compile it as it is")


def _fit(model: Model, formats: dict, target: Target, options: CompileOptions, method: str,
         ranks: dict[str, int] | None = None) -> Model:
    """The projections' codes (and corrections) chosen by the quantizer, kept in a store the emitter reads."""
    names = _projections(model, formats)
    _refuse_stored_codes(model, names, options, "--quantizer / --correction-rank")
    other = [formats[n].name for n in names if not isinstance(formats[n], AffineFormat)]
    if other:
        raise RomacError(f"--quantizer and --correction-rank choose codes on the affine grid, not {other[0]}",
                         where="--quant", hint="use int2, int4 or int8")
    req = FitRequest(method, options.correction_rank or 0, options.correction_iters or 1, options.calibration_tokens,
                     target.lora, ranks=ranks, workdir=options.workdir, progress=options.progress)
    replaced = {n: model.weights[n].codec_spec.get("format") for n in names if model.weights[n].codec_spec is not None}
    fitted, report = fit_model(model, {n: formats[n] for n in names}, req)
    report = {"method": method, **report, **({"replaced_stored_codes": replaced} if replaced else {})}
    return dataclasses.replace(fitted, source={**fitted.source, "quantizer": report})


def _allocate(model: Model, formats: dict, target: Target, options: CompileOptions,
              method: str) -> tuple[Model, dict[str, int]]:
    """``--rom-budget``: each projection's format (in ``formats``, updated) and correction rank (returned), chosen
    by the integer program within the ROM budget and the SRAM beside the adapters and the KV cache."""
    names = _projections(model, formats)
    if options.quant is not None:
        raise RomacError("--rom-budget chooses the projections' formats itself", where="--quant",
                         hint="drop --quant (the choice is among the target's weight_formats), or drop --rom-budget")
    _refuse_stored_codes(model, names, options, "--rom-budget")
    allowed = tuple(choose_format(f, target, options, "--rom-budget") for f in target.weight_formats
                    if is_format(f, "affine"))
    geometry = budget.TileGeometry(target.tile_rows, target.tile_cols, target.word_bytes)
    rom_total = target.banks * target.bank_words * target.word_bits
    if options.rom_budget == ROM_BUDGET_FILL:  # round-robin placement leaves banks up to one tile apart
        widest = max(allowed, key=lambda f: f.code_bits)
        tile_bits = geometry.rom_bits((target.tile_rows, target.tile_cols), widest)
        budget_bits = rom_total - target.banks * tile_bits
    else:
        budget_bits = 8 * int(options.rom_budget)
        if budget_bits > rom_total:
            raise RomacError(f"the budget of {budget_bits / 8 / 2**20:,.1f} MiB exceeds target {target.name!r}'s "
                             f"B-ROM of {rom_total / 8 / 2**20:,.1f} MiB", where="--rom-budget",
                             hint="use a smaller size, or 'fill' for all of it")
    shapes = {n: tuple(model.weights[n].shape) for n in formats if n not in names}
    room_bits = budget.projection_budget(budget_bits, budget.fixed_rom_bits(shapes, formats, geometry))
    context = options.max_context or target.max_context
    without = plan_sram(model.config, model.adapters, target, context)
    slots = len(lora_slots(model.config.num_layers))
    sram_room = target.sram_bytes - without.kv.offset - without.kv.bytes - SRAM_ALIGN \
        - slot_table_bytes(slots) - 2 * SRAM_ALIGN * len(names)
    req = budget.BudgetRequest(room_bits, max(sram_room, 0) if options.correction_rank else 0.0, allowed,
                               options.correction_rank or 0, method, target.lora, options.progress)
    chosen, ranks, _, report = budget.choose(model, names, req, geometry, options.calibration_tokens)
    formats.update(chosen)
    report["rom_budget"] = "fill" if options.rom_budget == ROM_BUDGET_FILL else int(options.rom_budget)
    return dataclasses.replace(model, source={**model.source, "allocation": report}), ranks
