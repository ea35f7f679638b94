"""Reproducible builds: the same inputs give byte-identical artifact directories (issue 5, item 1).

Each build runs ``romac compile`` in its own process, in its own output directory, from its own working
directory, with its own ``PYTHONHASHSEED``, time zone (UTC-12 vs UTC+14: more than a day apart, so even a
date-only local stamp would differ), ``SOURCE_DATE_EPOCH`` and thread count. The directories must hold the same
files with the same bytes and modes, and no file may mention any of the paths involved.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from romac.artifacts import list_files

# Two environments that differ in everything that could leak into the output.
ENVS = [
    {"PYTHONHASHSEED": "1", "TZ": "Etc/GMT+12", "SOURCE_DATE_EPOCH": "0", "OMP_NUM_THREADS": "1",
     "OPENBLAS_NUM_THREADS": "1", "LC_ALL": "C"},
    {"PYTHONHASHSEED": "4242", "TZ": "Etc/GMT-14", "SOURCE_DATE_EPOCH": "1999999999", "OMP_NUM_THREADS": "2",
     "OPENBLAS_NUM_THREADS": "2", "LC_ALL": "C.UTF-8"},
]


def _compile(args: list, out: Path, cwd: Path, env: dict) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **env}
    full_env.pop("ROMAC_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-c", "from romac.cli import main; main()", "compile", *map(str, args), "--out", str(out), "-q"],
        cwd=cwd, env=full_env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file and directory under root: relative path -> (permission bits, bytes or b'' for a directory)."""
    out = {".": (stat.S_IMODE(root.stat().st_mode), b"")}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = (stat.S_IMODE(p.stat().st_mode), p.read_bytes() if p.is_file() else b"")
    return out


def assert_identical(a: Path, b: Path) -> None:
    sa, sb = _snapshot(a), _snapshot(b)
    assert sorted(sa) == sorted(sb), "the two builds hold different files"
    for rel in sa:
        assert sa[rel][0] == sb[rel][0], f"{rel}: mode {oct(sa[rel][0])} vs {oct(sb[rel][0])}"
        assert sa[rel][1] == sb[rel][1], f"{rel} differs between the two builds"


def assert_no_paths(root: Path, *paths: Path) -> None:
    """No file of the build mentions any of these paths (or the home directory, or the user name)."""
    needles = {str(p) for p in paths} | {str(Path(p).resolve()) for p in paths} | {os.path.expanduser("~")}
    needles = {n.encode() for n in needles if len(n) > 1}
    for rel in list_files(root):
        data = (root / rel).read_bytes()
        for n in needles:
            assert n not in data, f"{rel} contains the path {n.decode()!r}"


def build_twice(tmp_path: Path, args: list, *, leak_paths=()) -> tuple[Path, Path]:
    out1 = tmp_path / "first" / "out"
    out2 = tmp_path / "elsewhere" / "deeper" / "artifacts"
    _compile(args, out1, tmp_path / "cwd1", ENVS[0])
    _compile(args, out2, tmp_path / "cwd2" / "sub", ENVS[1])
    assert_identical(out1, out2)
    for out in (out1, out2):
        assert_no_paths(out, tmp_path, out1, out2, tmp_path / "cwd1", tmp_path / "cwd2" / "sub", *leak_paths)
    umask = os.umask(0)
    os.umask(umask)
    # the directory gets the usual permissions (not mkdtemp's private 0700): others can read a ROM image
    assert stat.S_IMODE(out1.stat().st_mode) == 0o777 & ~umask
    return out1, out2


@pytest.mark.parametrize("quant", [None, "int2"])
def test_builtin_model_is_reproducible(tmp_path, quant):
    build_twice(tmp_path, [] if quant is None else ["--quant", quant])


@pytest.mark.parametrize("quant", ["int4", "nf4"])
def test_hf_checkpoint_with_adapter_is_reproducible(tmp_path, hf_checkpoint, quant):
    base, adapter = hf_checkpoint
    out1, _ = build_twice(tmp_path, [base, "--adapter", f"chat={adapter}", "--quant", quant],
                          leak_paths=(base, adapter, base.parent))
    assert (out1 / "sram" / "chat.bin").is_file()


def test_relative_and_absolute_model_paths_give_the_same_bytes(tmp_path, hf_checkpoint):
    """The checkpoint named by an absolute path, or relative to the working directory: the same build."""
    base, adapter = hf_checkpoint
    out1, out2 = tmp_path / "abs", tmp_path / "rel"
    _compile([base, "--adapter", f"chat={adapter}"], out1, tmp_path, ENVS[0])
    _compile([os.path.relpath(base, base.parent.parent), "--adapter", f"chat={os.path.relpath(adapter, base.parent.parent)}"],
             out2, base.parent.parent, ENVS[1])
    assert_identical(out1, out2)


def test_chunking_and_worker_count_do_not_change_the_bytes(tmp_path, monkeypatch):
    """In-process with one worker and tiny row chunks (many out-of-order writes) == the default build."""
    from romac.backend import emit
    from romac.driver import compile_checkpoint

    _compile([], tmp_path / "default", tmp_path, ENVS[0])
    monkeypatch.setattr(emit, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(emit, "WORKERS", 1)
    compile_checkpoint(None, tmp_path / "chunked")
    assert_identical(tmp_path / "default", tmp_path / "chunked")
