"""``romac compile``, ``romac plan``, ``romac targets``: from a checkpoint to a plan or an artifact directory."""

from __future__ import annotations

import click

from romac.backend.report import build_report
from romac.backend.romformats import parse_formats
from romac.cli.common import _bnb_options, _quantizer_options, cli
from romac.cli.use import show_report
from romac.driver import compile_checkpoint, requantize_notes
from romac.frontend import describe, detect
from romac.passes import CompileOptions
from romac.planning import plan_checkpoint
from romac.spec.asm import disassemble
from romac.spec.formats import WEIGHT_FORMATS
from romac.summary import capacity_lines, performance_brief
from romac.targets import builtin_targets, load_target

DEFAULT_OUT = "romac-out"


@cli.command()
@click.argument("model", required=False)
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH", help="A PEFT LoRA adapter (repeatable).")
@click.option("--target", default=None, help="Built-in target name or path to a target TOML (default: tiny).")
@click.option("--quant", default=None, help=f"Format of the projection matrices: {', '.join(WEIGHT_FORMATS)}.")
@click.option("--quant-embedding", default=None, help="Format of the embedding and LM head.")
@_bnb_options
@_quantizer_options
@click.option("--max-context", type=click.IntRange(min=1), default=None, help="KV-cache length in tokens.")
@click.option("--rom-format", "rom_formats", multiple=True, metavar="FMT[,FMT]",
              help="Also write each bank as mem ($readmemh), coe (Xilinx), mif (Intel) or verilog (a ROM module "
                   "+ its .mem); comma-separated or repeated. The raw .rom is always written.")
@click.option("--out", "-o", default=DEFAULT_OUT, show_default=True, help="Artifact directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def compile(model, adapters, target, quant, quant_embedding, bnb_blocksize, double_quant, bnb_threads,
            bnb_cpu_repacked, rom_budget, quantizer, calibration, calibration_tokens, correction_rank,
            correction_iters, max_context, rom_formats, out, force, quiet) -> None:
    """Compile MODEL (a checkpoint directory or a .gguf file; default: the built-in model and adapter) into OUT.

    \b
    QLoRA: a bitsandbytes 4-bit checkpoint (save_pretrained of a model loaded
    with BitsAndBytesConfig(load_in_4bit=True, ...)) keeps its stored NF4/FP4
    codes (--quant re-quantizes it only if it names another format). The FP
    checkpoint it came from compiles to the same ROM images with the options
    matching its BitsAndBytesConfig:
      bnb_4bit_quant_type="nf4" / "fp4"    --quant nf4 / --quant fp4
      bnb_4bit_use_double_quant=False      --no-double-quant (romac: on unless
                                           told; transformers: off unless told)
      a Linear4bit blocksize other than 64 --bnb-blocksize N
      saved after inference on an          --bnb-cpu-repacked
      AVX512-BF16 CPU (bitsandbytes then
      re-quantizes its absmax on save)
    provided bitsandbytes quantized the checkpoint's own values: loaded with
    dtype= the stored dtype or a wider one (not fp32 weights loaded as bf16).
    """
    rom_formats = parse_formats(rom_formats)  # a bad name fails before any work
    kind = detect(model)
    if not quiet:
        what = describe(model, kind)
        click.echo(f"romac: compiling {what}", err=True)
    options = CompileOptions(quant=quant, quant_embedding=quant_embedding, max_context=max_context,
                             rom_formats=rom_formats, bnb_blocksize=bnb_blocksize, double_quant=double_quant,
                             bnb_threads=bnb_threads, bnb_cpu_repacked=bnb_cpu_repacked, quantizer=quantizer,
                             correction_rank=correction_rank, correction_iters=correction_iters, rom_budget=rom_budget,
                             progress=not quiet)
    t = load_target(target)
    compiled = compile_checkpoint(model, out, adapters, t, options, force=force, progress=not quiet,
                                  calibration=calibration, calibration_shape=(512, calibration_tokens))
    q = compiled.source.get("quantizer")
    if q is not None and not quiet:
        said = f"romac: {q['method']}: {q['matrices']} projections"
        if q.get("calibrated"):
            said += (f", mean calibration output error {q['mean_out_err']:.3g} (RTN on the same inputs "
                     f"{q['mean_out_err_rtn']:.3g})")
            if q["worse_than_rtn"]:
                said += f"; worse than RTN on {len(q['worse_than_rtn'])}: {', '.join(q['worse_than_rtn'][:3])}"
        click.echo(said + (f", {q['seconds']:.0f} s" if "seconds" in q else ""), err=True)
    a = compiled.source.get("allocation")
    if a is not None and not quiet:
        chosen = ", ".join(f"{o} ×{n}" for o, n in a["options"].items())
        click.echo(f"romac: --rom-budget: {chosen}; projections at {a['bits_per_weight']:.3f} bits/weight "
                   f"({a['rom_bits'] / 8 / 2**20:,.1f} of {a['rom_budget_bits'] / 8 / 2**20:,.1f} MiB), corrections "
                   f"{a['sram_bytes']:,} B of SRAM; error {a['error']:.4g} ({a['error_measure']}; uniform, uncorrected: "
                   + ", ".join(f"{f} {e:.4g}" for f, e in a["error_if_uniform"].items()) + ")", err=True)
    notes = requantize_notes(compiled)
    if notes:  # the stored codes of a pre-quantized base that did not reach ROM as they were
        click.echo(f"romac: {len(notes)} pre-quantized tensor(s) re-quantized; an adapter trained on the stored "
                   "base may no longer fit:", err=True)
        for note in notes[:3] + ([f"... and {len(notes) - 3} more"] if len(notes) > 3 else []):
            click.echo(f"  {note}", err=True)
    if quiet:
        return
    rep = build_report(compiled, t)
    click.echo(f"romac: wrote {out}/ for target {t.name!r}")
    for line in capacity_lines(rep) + performance_brief(rep["performance"], t.name):
        click.echo(f"  {line}")
    prompt = "--prompt 'Once upon a time'" if compiled.tokenizer is not None else "--prompt-ids 1,2,3"
    click.echo(f"next: romac run {out} {prompt} --max-new-tokens 8   |   romac verify {out}")


@cli.command()
@click.argument("model", required=False)
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH", help="A PEFT LoRA adapter (repeatable).")
@click.option("--lora-rank", "lora_ranks", multiple=True, type=click.IntRange(min=1), metavar="R",
              help="Also plan a shape-only LoRA adapter of rank R on all seven projections (repeatable).")
@click.option("--target", default=None, help="Built-in target name or path to a target TOML (default: tiny).")
@click.option("--quant", default=None, help="Format of the projection matrices.")
@click.option("--quant-embedding", default=None, help="Format of the embedding and LM head.")
@_bnb_options
@click.option("--correction-rank", type=click.IntRange(min=0), default=0, metavar="R",
              help="Count a rank-R correction of every projection in SRAM (as compile --correction-rank keeps).")
@click.option("--max-context", type=click.IntRange(min=1), default=None, help="KV-cache length in tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (as report.json would hold it) as JSON.")
@click.option("--plots", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Also draw bank_utilisation.png and tokens_per_s.png into DIR (needs romac[plot]).")
def plan(model, adapters, lora_ranks, target, quant, quant_embedding, bnb_blocksize, double_quant, bnb_threads,
         bnb_cpu_repacked, correction_rank, max_context, as_json, plots) -> None:
    """Capacity-plan MODEL on a target without reading or writing a weight (seconds, even for 8B).

    With --json, the report and the whole plan (regions and their placement, bank fill, SRAM map, program).

    MODEL is a checkpoint (opened header-only) or a bare config.json (shapes only). Prints what compile would:
    B-ROM and SRAM use, the longest context, the performance and area estimate; a model that does not fit
    fails with the same error compile gives.
    """

    options = CompileOptions(quant=quant, quant_embedding=quant_embedding, max_context=max_context,
                             bnb_blocksize=bnb_blocksize, double_quant=double_quant, bnb_threads=bnb_threads,
                             bnb_cpu_repacked=bnb_cpu_repacked)
    planned, report = plan_checkpoint(model, adapters, target, options, lora_ranks, correction_rank)
    if as_json:  # the whole plan beside the report: regions, bank fill, SRAM map, the program's listing
        p = planned.plan
        report = {**report, "plan": {
            "regions": [r.to_json() for r in p.regions], "bank_words_used": list(p.bank_words_used),
            "sram": p.sram.to_json(),
            "program": disassemble(p.program, [r.name for r in p.regions], p.sram.slots).splitlines()}}
    show_report(report, plots, as_json, " (plan only: nothing written)")


@cli.command()
def targets() -> None:
    """List the built-in targets."""
    for name in builtin_targets():
        t = load_target(name)
        click.echo(f"{name:14s} {t.banks:5d} banks × {t.bank_bytes / 2**10:8.0f} KiB, SRAM {t.sram_bytes / 2**20:7.1f} MiB, "
                   f"weights {t.weights}, LoRA {t.lora} — {t.description}")
