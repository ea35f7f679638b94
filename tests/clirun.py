"""Running the ``romac`` command in-process (fast) or as a subprocess (proves what the user sees), and checking
that a failure is exactly one ``romac: error:`` line with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_main(capsys, *args) -> Result:
    """``romac ARGS`` through romac.cli.main in this process (SystemExit caught, output captured)."""
    from romac.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return Result(code, out, err)


def run_subprocess(*args, cwd=None, env=None) -> Result:
    proc = subprocess.run([sys.executable, "-m", "romac.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def error_line(res: Result) -> str:
    """The one error line of a failed run (exit 2, one ``romac: error:`` line, no traceback), returned."""
    assert res.returncode == 2, f"exit {res.returncode}:\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("romac: error:")]
    assert len(errors) == 1, res.stderr
    others = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(("romac: error:", "romac: compiling"))]
    assert not others, res.stderr
    return errors[0]


def assert_one_line_error(res: Result, *words: str) -> str:
    """With -q the whole of stderr is the one error line; it contains every word given."""
    line = error_line(res)
    assert res.stderr.strip().splitlines() == [line], res.stderr
    for w in words:
        assert w in line, f"{w!r} not in: {line}"
    return line
