"""The ``romac`` command: compile, run, verify, inspect, targets.

Bad input ends in one line on stderr (``romac: error: ...``) and exit code 2; ``--debug`` shows the traceback.
A failed verification exits with 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from romac import __version__
from romac.errors import RomacError

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


@cli.command()
@click.argument("model", required=False)
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH", help="A PEFT LoRA adapter (repeatable).")
@click.option("--target", default=None, help="Built-in target name or path to a target TOML (default: tiny).")
@click.option("--quant", default=None, help="Format of the projection matrices: nf4, fp4, int8, int4, int2, fp16, fp32.")
@click.option("--quant-embedding", default=None, help="Format of the embedding and LM head.")
@click.option("--max-context", type=click.IntRange(min=1), default=None, help="KV-cache length in tokens.")
@click.option("--out", "-o", default=DEFAULT_OUT, show_default=True, help="Artifact directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def compile(model, adapters, target, quant, quant_embedding, max_context, out, force, quiet) -> None:
    """Compile MODEL (a checkpoint directory; default: the built-in model and adapter) into OUT."""
    from romac.driver import compile_checkpoint
    from romac.frontend import detect
    from romac.passes import CompileOptions

    kind = detect(model)
    if not quiet:
        what = "the built-in model (2-layer LLaMA, GQA) with its built-in LoRA adapter" if kind == "builtin" else f"{kind} checkpoint {model}"
        click.echo(f"romac: compiling {what}", err=True)
    options = CompileOptions(quant=quant, quant_embedding=quant_embedding, max_context=max_context)
    compiled = compile_checkpoint(model, out, adapters, target, options, force=force, progress=not quiet)
    if quiet:
        return
    from romac.backend.report import build_report

    rep = build_report(compiled)
    t = compiled.annotations["target"]
    click.echo(f"romac: wrote {out}/ for target {t.name!r}")
    click.echo(f"  B-ROM  {rep['rom']['used_bytes'] / 2**20:9.2f} MiB of {t.rom_bytes / 2**20:.2f} MiB "
               f"({100 * rep['rom']['utilisation']:.1f}%) in {t.banks} banks")
    for fmt, e in rep["weights"]["effective_bits_per_weight"].items():
        click.echo(f"  {fmt:5s}  {e['parameters']:>12,} weights at {e['bits_per_weight']:.3f} bits each (scales included)")
    kv = rep["sram"]["kv_cache"]
    click.echo(f"  SRAM   {rep['sram']['adapter_region_bytes'] / 2**20:9.2f} MiB adapters + {kv['bytes'] / 2**20:.2f} MiB "
               f"KV cache ({kv['max_context']} tokens) of {t.sram_bytes / 2**20:.2f} MiB")
    click.echo(f"  adapters: {', '.join(compiled.annotations['sram'] and [a['name'] for a in compiled.annotations['sram']['adapters']]) or 'none'}")
    click.echo(f"next: romac run {out} --prompt-ids 1,2,3 --max-new-tokens 8   |   romac verify {out}")


@cli.command()
@click.argument("artifacts", type=click.Path(file_okay=False))
@click.option("--adapter", default=None, help="Adapter to make resident (default: none, the base model).")
@click.option("--prompt-ids", default=None, help="Comma-separated token ids.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=16, show_default=True)
@click.option("--dump-logits", type=click.Path(dir_okay=False), default=None, help="Write logits of every position to a .npy file.")
def run(artifacts, adapter, prompt_ids, max_new_tokens, dump_logits) -> None:
    """Run the emulator on an artifact directory and print the generated token ids."""
    import numpy as np

    from romac.emulator import Machine

    ids = _ids(prompt_ids)
    if not ids:
        raise RomacError("a prompt is required", where="--prompt-ids", hint="e.g. --prompt-ids 1,2,3")
    machine = Machine(artifacts, adapter=adapter)
    eos = machine.config.get("eos_token_id")
    new, logits = machine.generate(ids, max_new_tokens, stop=eos)
    click.echo(",".join(str(t) for t in new))
    if dump_logits:
        np.save(dump_logits, logits.astype(np.float32))


@cli.command()
@click.argument("artifacts", type=click.Path(file_okay=False))
@click.option("--model", "model_spec", default=None, help="The source checkpoint (not needed for the built-in model).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH", help="Source of each compiled adapter.")
@click.option("--steps", type=click.IntRange(min=1), default=16, show_default=True, help="Greedy steps to compare.")
@click.option("--prompt-ids", default=None, help="Comma-separated token ids (default: a fixed prompt).")
@click.option("--tolerance", type=float, default=1e-5, show_default=True, help="Largest relative logit error allowed.")
@click.option("--no-onnx", is_flag=True, help="Skip the comparison with onnxruntime on the FP32 model.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def verify(artifacts, model_spec, adapters, steps, prompt_ids, tolerance, no_onnx, as_json) -> None:
    """Check the emulator against the golden model (and report the distance from FP32 onnxruntime)."""
    from romac.verify import verify as run_verify

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
@click.argument("artifacts", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(artifacts, as_json) -> None:
    """Print what an artifact directory holds: capacity, utilisation, SRAM map."""
    from romac.artifacts import REPORT, open_artifacts

    manifest = open_artifacts(artifacts)
    report = json.loads((Path(manifest["root"]) / REPORT).read_text())
    if as_json:
        click.echo(json.dumps(report, indent=1, sort_keys=True))
        return
    rom = report["rom"]
    click.echo(f"target {report['target']}: B-ROM {rom['used_bytes'] / 2**20:.2f} of {rom['capacity_bytes'] / 2**20:.2f} MiB "
               f"({100 * rom['utilisation']:.1f}%), bank imbalance {rom['bank_imbalance_words']} words")
    for fmt, e in report["weights"]["effective_bits_per_weight"].items():
        click.echo(f"  {fmt}: {e['parameters']:,} weights, {e['bits_per_weight']:.3f} bits/weight")
    s = report["sram"]
    click.echo(f"SRAM {s['capacity_bytes'] / 2**20:.2f} MiB: adapters {s['adapter_region_bytes']:,} B, "
               f"KV cache {s['kv_cache']['bytes']:,} B ({s['kv_cache']['max_context']} tokens, fits "
               f"{s['kv_cache']['max_context_that_fits']}), free {s['free_bytes']:,} B")


@cli.command()
def targets() -> None:
    """List the built-in targets."""
    from romac.targets import builtin_targets, load_target

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
        click.echo(f"romac: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("romac: interrupted", err=True)
        sys.exit(130)
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
