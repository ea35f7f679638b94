"""``romac adapter add|remove|list`` and ``romac export-base``: what changes after tape-out (only SRAM)."""

from __future__ import annotations

import json

import click

from romac.adapters import add_adapter, list_adapters, remove_adapter
from romac.cli.common import cli
from romac.export import export_base
from romac.frontend.peft import parse_adapter_arg


@cli.group()
def adapter() -> None:
    """Add, remove or list the adapters of a compiled directory (its ROM and program stay as they are)."""


@adapter.command("add")
@click.argument("artifacts")
@click.argument("spec", metavar="NAME=PATH")
@click.option("--force", is_flag=True, help="Replace an adapter of the same name.")
@click.option("--strict", is_flag=True,
              help="Refuse an adapter unless it names the `romac export-base` of this ROM as its base.")
def adapter_add(artifacts, spec, force, strict) -> None:
    """Add the PEFT adapter at PATH as NAME: a new sram/NAME.bin and manifest, written atomically.

    The image is the one a compile with the adapter would write. Refused in one line: shapes or modules that do
    not fit the model, a name already there (without --force), an adapter that does not fit in SRAM beside the
    compiled KV cache, an adapter trained on another ROM's exported base, a directory that fails its check.
    """
    name, path = parse_adapter_arg(spec)
    base = add_adapter(artifacts, name, path, force=force, strict=strict)
    if not base.known:
        click.echo(f"romac: warning: cannot tell which base adapter {name!r} was trained on ({base.detail}); "
                   "--strict refuses such adapters", err=True)
    click.echo(f"romac: added adapter {name!r} to {artifacts}" + (f" ({base.detail})" if base.known else ""))


@adapter.command("remove")
@click.argument("artifacts")
@click.argument("name")
def adapter_remove(artifacts, name) -> None:
    """Remove adapter NAME (its SRAM image) from a compiled directory."""
    remove_adapter(artifacts, name)
    click.echo(f"romac: removed adapter {name!r} from {artifacts}")


@adapter.command("list")
@click.argument("artifacts")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def adapter_list(artifacts, as_json) -> None:
    """List the adapters of a compiled directory."""
    rows = list_adapters(artifacts)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no adapters")
    for r in rows:
        click.echo(f"{r['name']:16s} rank {r['rank']:3d}  {r['slots']:4d} slots  {r['bytes'] / 2**20:9.2f} MiB  "
                   f"longest context beside it {r['longest_context_alone']:,}")


@cli.command("export-base")
@click.argument("artifacts")
@click.argument("out")
@click.option("--force", is_flag=True, help="Replace an earlier export in OUT.")
@click.option("--correction-as-lora", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Write the SRAM correction of the base as a PEFT LoRA adapter in DIR (LoftQ's form) instead of "
                   "merging it into the exported weights.")
def export_base_cmd(artifacts, out, force, correction_as_lora) -> None:
    """Write the base a compiled ROM holds as a Hugging Face checkpoint in OUT, to train adapters on.

    Weights are exactly what the ROM decodes to (float32; NF4/FP4 as a bitsandbytes 4-bit checkpoint with the
    same codes), with config.json, the tokenizer and romac_base.json (the ROM's fingerprint, which `romac adapter
    add` checks an adapter trained on this export against). A low-rank correction of the base in SRAM is
    merged into the weights (the base the chip computes), or with --correction-as-lora written as a PEFT adapter.
    """
    export_base(artifacts, out, force=force, correction_as_lora=correction_as_lora)
    click.echo(f"romac: wrote {out}/ (the base of {artifacts}); point a PEFT LoRA's base_model_name_or_path at it")
