"""The ``romac`` command: compile, run, verify, inspect, targets.

Bad input ends in one line on stderr (``romac: error: ...``) and exit code 2; ``--debug`` shows the traceback.
A failed verification exits with 1.
"""

from __future__ import annotations

import json
import sys

import click
import numpy as np

from romac import __version__
from romac.artifacts import open_artifacts
from romac.backend.report import build_report
from romac.backend.romformats import parse_formats
from romac.driver import compile_checkpoint
from romac.emulator import Machine
from romac.emulator.trace import cross_check, format_reads, instruction_reads
from romac.errors import RomacError
from romac.frontend import describe, detect
from romac.frontend.tokenizer import artifact_tokenizer, decode, encode
from romac.passes import CompileOptions
from romac.planning import plan_checkpoint
from romac.spec.formats import WEIGHT_FORMATS
from romac.spec.asm import disassemble
from romac.spec.isa import format_instr
from romac.summary import artifacts_report, capacity_lines, performance_brief, performance_lines, write_plots
from romac.targets import builtin_targets, load_target
from romac.verify import verify as run_verify

DEFAULT_OUT = "romac-out"


def _ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise RomacError(f"{text!r} is not a comma-separated list of token ids", where="--prompt-ids") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="romac")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compile QLoRA LLaMA checkpoints onto ROM-based LLM accelerators, and run the result."""
    ctx.obj = {"debug": debug}


def _bnb_options(f):
    """The nf4/fp4 (bitsandbytes) parameters, shared by compile and plan."""
    f = click.option("--bnb-cpu-repacked", is_flag=True, default=None,
                     help="nf4/fp4 double quant: reproduce a bitsandbytes checkpoint saved after inference on a CPU "
                          "with AVX512-BF16 (bitsandbytes then rounds the absmax to bfloat16 and re-quantizes it on "
                          "save; the 4-bit codes stay, the double-quant statistics change).")(f)
    f = click.option("--bnb-threads", type=click.IntRange(min=1), default=None,
                     help="nf4/fp4 double quant: the torch thread count bitsandbytes quantized with on the CPU "
                          "(its float32 mean of the absmax depends on it above 32768 blocks; default 1).")(f)
    f = click.option("--double-quant/--no-double-quant", default=None,
                     help="nf4/fp4: also quantize the absmax values (bnb_4bit_use_double_quant; default: on, "
                          "as QLoRA).")(f)
    return click.option("--bnb-blocksize", type=int, default=None,
                        help="nf4/fp4: weights per absmax block, as bitsandbytes' blocksize (32, 64, ... 4096; "
                             "default 64).")(f)


@cli.command()
@click.argument("model", required=False)
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH", help="A PEFT LoRA adapter (repeatable).")
@click.option("--target", default=None, help="Built-in target name or path to a target TOML (default: tiny).")
@click.option("--quant", default=None, help=f"Format of the projection matrices: {', '.join(WEIGHT_FORMATS)}.")
@click.option("--quant-embedding", default=None, help="Format of the embedding and LM head.")
@_bnb_options
@click.option("--max-context", type=click.IntRange(min=1), default=None, help="KV-cache length in tokens.")
@click.option("--rom-format", "rom_formats", multiple=True, metavar="FMT[,FMT]",
              help="Also write each bank as mem ($readmemh), coe (Xilinx), mif (Intel) or verilog (a ROM module "
                   "+ its .mem); comma-separated or repeated. The raw .rom is always written.")
@click.option("--out", "-o", default=DEFAULT_OUT, show_default=True, help="Artifact directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def compile(model, adapters, target, quant, quant_embedding, bnb_blocksize, double_quant, bnb_threads,
            bnb_cpu_repacked, max_context, rom_formats, out, force, quiet) -> None:
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
                             bnb_threads=bnb_threads, bnb_cpu_repacked=bnb_cpu_repacked)
    t = load_target(target)
    compiled = compile_checkpoint(model, out, adapters, t, options, force=force, progress=not quiet)
    if quiet:
        return
    rep = build_report(compiled, t)
    click.echo(f"romac: wrote {out}/ for target {t.name!r}")
    for line in capacity_lines(rep) + performance_brief(rep["performance"], t.name):
        click.echo(f"  {line}")
    prompt = "--prompt 'Once upon a time'" if compiled.tokenizer is not None else "--prompt-ids 1,2,3"
    click.echo(f"next: romac run {out} {prompt} --max-new-tokens 8   |   romac verify {out}")


@cli.command()
@click.argument("artifacts")  # checked by open_artifacts: one line naming the path
@click.option("--adapter", default=None, help="Adapter to make resident (default: none, the base model).")
@click.option("--prompt", "prompt_text", default=None,
              help="Prompt text, encoded with the tokenizer compiled into the artifacts; prints text.")
@click.option("--prompt-ids", default=None, help="Comma-separated token ids; prints the generated ids.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=16, show_default=True)
@click.option("--dump-logits", type=click.Path(dir_okay=False), default=None, help="Write logits of every position to a .npy file.")
@click.option("--trace", is_flag=True,
              help="List (on stderr) which B-ROM banks and words each instruction reads, and check the regions it "
                   "reads against an independent decoder of the bank images (exit 1 on a difference).")
@click.option("--trace-tiles", type=click.IntRange(min=0), default=8, show_default=True,
              help="With --trace: tiles checked per region (the first, the last, random ones; 0: every tile).")
def run(artifacts, adapter, prompt_text, prompt_ids, max_new_tokens, dump_logits, trace, trace_tiles) -> None:
    """Run the emulator on an artifact directory: print the prompt and its continuation (--prompt) or the ids."""
    if prompt_text is not None and prompt_ids is not None:
        raise RomacError("--prompt and --prompt-ids exclude each other", where="romac run", hint="give one of them")
    tok = None
    if prompt_text is not None:

        tok = artifact_tokenizer(open_artifacts(artifacts, check_hashes=False))  # Machine checks the hashes below
        ids = encode(tok, prompt_text)
        if not ids:
            raise RomacError("the prompt encodes to no tokens", where="--prompt", hint="give some text")
    else:
        ids = _ids(prompt_ids)
        if not ids:
            raise RomacError("a prompt is required", where="--prompt-ids",
                             hint="e.g. --prompt-ids 1,2,3, or --prompt TEXT when the artifacts carry a tokenizer")
    machine = Machine(artifacts, adapter=adapter)
    if trace:
        _trace(machine, trace_tiles or None)
    eos = machine.config.get("eos_token_id")
    new, logits = machine.generate(ids, max_new_tokens, stop=eos)
    if tok is not None:

        click.echo(decode(tok, ids + new))
    else:
        click.echo(",".join(str(t) for t in new))
    if dump_logits:
        np.save(dump_logits, logits.astype(np.float32))


def _trace(machine: Machine, tiles: int | None) -> None:
    """What ``run --trace`` prints before running: every instruction with its B-ROM reads, then the check."""
    manifest = machine.manifest
    names = [r.name for r in manifest.regions]
    used: list[int] = []
    for i, ins in enumerate(machine.program):
        reads = instruction_reads(ins, manifest)
        used += [manifest.region_ids()[name] for name, _ in reads if manifest.region_ids()[name] not in used]
        line = f"trace {i:5d}  {format_instr(ins, names, manifest.sram.slots)}"
        click.echo(line + (f"\n             reads {format_reads(reads)}" if reads else ""), err=True)
    n, problems = cross_check(machine.rom.banks, manifest, lambda rid: machine.rom.value(rid, cache=False), used, tiles)
    for p in problems:
        click.echo(f"trace: {p}", err=True)
    if problems:
        click.echo(f"romac: the bank images do not decode to what the emulator computes with ({len(problems)} "
                   "regions differ)", err=True)
        sys.exit(1)
    click.echo(f"trace: {len(used)} regions, {n:,} tiles read by the independent decoder: equal to the emulator's values",
               err=True)


@cli.command()
@click.argument("artifacts")  # checked by open_artifacts: one line naming the path
@click.option("--model", "model_spec", default=None, help="The source checkpoint (not needed for the built-in model).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH", help="Source of each compiled adapter.")
@click.option("--steps", type=click.IntRange(min=1), default=16, show_default=True, help="Greedy steps to compare.")
@click.option("--prompt-ids", default=None, help="Comma-separated token ids (default: a fixed prompt).")
@click.option("--tolerance", type=float, default=1e-5, show_default=True, help="Largest relative logit error allowed.")
@click.option("--no-onnx", is_flag=True, help="Skip the comparison with onnxruntime on the FP32 model.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def verify(artifacts, model_spec, adapters, steps, prompt_ids, tolerance, no_onnx, as_json) -> None:
    """Check the emulator against the golden model (and report the distance from FP32 onnxruntime)."""
    checks = run_verify(artifacts, model_spec, adapters, steps, _ids(prompt_ids), tolerance, not no_onnx)
    if as_json:
        click.echo(json.dumps([{**c.__dict__, "passed": c.passed} for c in checks], indent=1))
    else:
        click.echo(f"{'adapter':12s} {'rel. logit err':>14s} {'greedy tokens':>14s} {'top-1 vs FP32':>14s} {'KL vs FP32':>11s}  result")
        for c in checks:
            agree = f"{100 * c.onnx['top1_agreement']:.1f}%" if c.onnx else "-"
            kl = f"{c.onnx['kl_divergence_mean']:.2e}" if c.onnx else "-"
            same = f"{sum(a == b for a, b in zip(c.tokens, c.golden_tokens))}/{len(c.golden_tokens)} same"
            click.echo(f"{c.adapter or '(none)':12s} {c.relative_error:14.2e} {same:>14s} {agree:>14s} {kl:>11s}  "
                       f"{'ok' if c.passed else 'FAIL'}")
    if not all(c.passed for c in checks):
        click.echo(f"romac: verification failed (tolerance {tolerance:g})", err=True)
        sys.exit(1)


@cli.command()
@click.argument("artifacts")  # checked by open_artifacts: one line naming the path
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (fields: docs/roma.md).")
@click.option("--plots", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Also draw bank_utilisation.png and tokens_per_s.png into DIR (needs romac[plot]).")
def inspect(artifacts, as_json, plots) -> None:
    """Print what an artifact directory holds: capacity, utilisation, SRAM map, performance and area estimate."""
    _show_report(artifacts_report(artifacts), plots, as_json, "")


def _show_report(report: dict, plots: str | None, as_json: bool, title_note: str) -> None:
    """What inspect and plan print: the plots asked for, then the report as JSON or as text."""
    if plots:
        for path in write_plots(report, plots):
            click.echo(f"romac: wrote {path}", err=True)
    if as_json:
        click.echo(json.dumps(report, indent=1, sort_keys=True))
        return
    click.echo(f"target {report['target']}{title_note}")
    for line in capacity_lines(report) + performance_lines(report["performance"], report["target"]):
        click.echo(line)


@cli.command()
@click.argument("model", required=False)
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH", help="A PEFT LoRA adapter (repeatable).")
@click.option("--lora-rank", "lora_ranks", multiple=True, type=click.IntRange(min=1), metavar="R",
              help="Also plan a shape-only LoRA adapter of rank R on all seven projections (repeatable).")
@click.option("--target", default=None, help="Built-in target name or path to a target TOML (default: tiny).")
@click.option("--quant", default=None, help="Format of the projection matrices.")
@click.option("--quant-embedding", default=None, help="Format of the embedding and LM head.")
@_bnb_options
@click.option("--max-context", type=click.IntRange(min=1), default=None, help="KV-cache length in tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (as report.json would hold it) as JSON.")
@click.option("--plots", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Also draw bank_utilisation.png and tokens_per_s.png into DIR (needs romac[plot]).")
def plan(model, adapters, lora_ranks, target, quant, quant_embedding, bnb_blocksize, double_quant, bnb_threads,
         bnb_cpu_repacked, max_context, as_json, plots) -> None:
    """Capacity-plan MODEL on a target without reading or writing a weight (seconds, even for 8B).

    With --json, the report and the whole plan (regions and their placement, bank fill, SRAM map, program).

    MODEL is a checkpoint (opened header-only) or a bare config.json (shapes only). Prints what compile would:
    B-ROM and SRAM use, the longest context, the performance and area estimate; a model that does not fit
    fails with the same error compile gives.
    """

    options = CompileOptions(quant=quant, quant_embedding=quant_embedding, max_context=max_context,
                             bnb_blocksize=bnb_blocksize, double_quant=double_quant, bnb_threads=bnb_threads,
                             bnb_cpu_repacked=bnb_cpu_repacked)
    planned, report = plan_checkpoint(model, adapters, target, options, lora_ranks)
    if as_json:  # the whole plan beside the report: regions, bank fill, SRAM map, the program's listing
        p = planned.plan
        report = {**report, "plan": {
            "regions": [r.to_json() for r in p.regions], "bank_words_used": list(p.bank_words_used),
            "sram": p.sram.to_json(),
            "program": disassemble(p.program, [r.name for r in p.regions], p.sram.slots).splitlines()}}
    _show_report(report, plots, as_json, " (plan only: nothing written)")


@cli.command()
def targets() -> None:
    """List the built-in targets."""
    for name in builtin_targets():
        t = load_target(name)
        click.echo(f"{name:14s} {t.banks:5d} banks × {t.bank_bytes / 2**10:8.0f} KiB, SRAM {t.sram_bytes / 2**20:7.1f} MiB, "
                   f"weights {t.weights}, LoRA {t.lora} — {t.description}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: turn user errors into one line and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="romac", standalone_mode=False)
    except RomacError as e:
        if debug:
            raise
        click.echo(f"romac: error: {' '.join(str(e).splitlines())}", err=True)  # always one line
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("romac: interrupted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # a bad option value: one line too, naming the option
        command = e.ctx.command_path if e.ctx else "romac"
        click.echo(f"romac: error: {' '.join(e.format_message().splitlines()).rstrip('.')}; see '{command} --help'", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("romac: interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        if debug:
            raise
        click.echo("romac: error: out of memory", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
