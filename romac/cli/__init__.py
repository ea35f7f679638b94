"""The ``romac`` command: compile, plan, targets (``build``); run, verify, inspect (``use``); adapter and
export-base, what changes after tape-out (``after``).

Bad input ends in one line on stderr (``romac: error: ...``) and exit code 2; ``--debug`` shows the traceback.
A failed verification exits with 1.
"""

from __future__ import annotations

import re
import resource
import sys

import click

from romac.cli import after, build, use  # noqa: F401 - the commands register themselves on ``cli``
from romac.cli.common import cli
from romac.errors import RomacError


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
    except MemoryError as e:
        if debug:
            raise
        click.echo(f"romac: error: {out_of_memory(e, args)}", err=True)
        sys.exit(2)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _available_bytes() -> int | None:
    """What the kernel says a new allocation can still get (MemAvailable), if it says."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def out_of_memory(error: MemoryError, args: list[str]) -> str:
    """The one line for a failed allocation: which command, how much it asked for (numpy says), what this process
    may have (the address-space limit, the memory available), and what to change."""
    command = next((a for a in args if not a.startswith("-")), "romac")
    asked = re.search(r"allocate ([\d.]+ [KMGTPE]?i?B)", str(error))
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    have = [f"{_gib(limit)} address-space limit (ulimit -v)"] if limit != resource.RLIM_INFINITY else []
    available = _available_bytes()
    if available is not None:
        have.append(f"{_gib(available)} available")
    needed = f"an allocation of {asked.group(1)} failed" if asked else "an allocation failed"
    what = {"compile": "compile streams one matrix at a time: the largest matrix and its tiles must fit",
            "run": "the emulator maps the ROM and holds SRAM, the KV cache and the activations: a shorter prompt or "
                   "--max-new-tokens needs less",
            "verify": "verify streams the weights a chunk at a time and holds the whole sequence's activations: fewer "
                      "--steps or a shorter --prompt-ids needs less"}.get(command, "")
    return (f"out of memory in 'romac {command}': {needed}" + (f" ({', '.join(have)})" if have else "")
            + "; free memory or raise the limit" + (f" ({what})" if what else "") + "; --debug shows where")


if __name__ == "__main__":
    main()
