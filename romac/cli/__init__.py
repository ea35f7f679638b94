"""The ``romac`` command: compile, plan, targets (``build``); run, verify, inspect (``use``); adapter and
export-base, what changes after tape-out (``after``).

Bad input ends in one line on stderr (``romac: error: ...``) and exit code 2; ``--debug`` shows the traceback.
A failed verification exits with 1.
"""

from __future__ import annotations

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
    except MemoryError:
        if debug:
            raise
        click.echo("romac: error: out of memory", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
