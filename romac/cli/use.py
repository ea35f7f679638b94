"""``romac run``, ``romac verify``, ``romac inspect``: what a compiled directory computes and holds."""

from __future__ import annotations

import json
import os
import sys

import click
import numpy as np

from romac.artifacts import open_artifacts
from romac.cli.common import _ids, cli
from romac.emulator import Machine
from romac.emulator.trace import cross_check, format_reads, instruction_reads
from romac.errors import RomacError
from romac.frontend.tokenizer import artifact_tokenizer, decode, encode
from romac.spec.isa import format_instr
from romac.summary import artifacts_report, capacity_lines, performance_lines, write_plots
from romac.verify import verify as run_verify


_THREADS = click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="Threads for the products (default: the cores this process may use; the logits do not "
                             "depend on how many, bit for bit).")


def _cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
@_THREADS
def run(artifacts, adapter, prompt_text, prompt_ids, max_new_tokens, dump_logits, trace, trace_tiles,
        threads) -> None:
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
    machine = Machine(artifacts, adapter=adapter, threads=threads or _cores())
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
@_THREADS
def verify(artifacts, model_spec, adapters, steps, prompt_ids, tolerance, no_onnx, as_json, threads) -> None:
    """Check the emulator against the golden model (and report the distance from FP32 onnxruntime)."""
    checks = run_verify(artifacts, model_spec, adapters, steps, _ids(prompt_ids), tolerance, not no_onnx,
                        progress=not as_json, threads=threads or _cores())
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
        if checks and checks[0].onnx:
            click.echo(f"(top-1 and KL against the FP32 model: {checks[0].onnx['reference']})")
        ties = [c for c in checks if c.kv_ties]
        if ties:
            click.echo("(K/V rounding ties where the golden model took the chip's K/V rounding, each within the tolerance "
                       "of a rounding boundary: " + ", ".join(f"{c.adapter or '(none)'} {c.kv_ties} of {c.kv_elements:,}"
                                                             for c in ties) + ")")
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
    show_report(artifacts_report(artifacts), plots, as_json, "")


def show_report(report: dict, plots: str | None, as_json: bool, title_note: str) -> None:
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
