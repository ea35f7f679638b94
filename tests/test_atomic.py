"""Atomic output (issue 5, item 2): the artifact directory appears whole or not at all.

What is promised (romac/backend/atomic.py):
- an existing output is never touched without --force (exit 2, one line, old content byte-identical);
- with --force it is replaced whole: at every instant the path holds the complete old output or the complete
  new one (an atomic exchange), and --force never replaces something that is not an artifact directory;
- a compile interrupted by SIGINT exits 130 with "romac: interrupted", removes its temporary and leaves the
  path as it was (absent, or the intact old output);
- a compile killed by SIGKILL leaves only a hidden temporary sibling, which no tool accepts as an output and
  which the next compile to the same path deletes.

"Midway" is made exact rather than lucky: the test polls for the compile's temporary sibling, freezes the
process with SIGSTOP, checks that it is indeed mid-write (temporary present, no manifest in it, the output
path untouched), then delivers the signal and SIGCONT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from romac.artifacts import open_artifacts
from romac.spec.manifest import MANIFEST, TEMP_NAME
from romac.backend import atomic
from romac.errors import ArtifactError, RomacError

from tests.clirun import assert_one_line_error, run_main
from tests.test_reproducible import _snapshot

BIG = dict(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=16)


def romac(*args, cwd=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "romac.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"romac {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def temporaries(parent: Path, name: str) -> list[Path]:
    return sorted(p for p in parent.iterdir() if (m := TEMP_NAME.match(p.name)) and m.group("name") == name)


def small_compile(out: Path, **kw) -> None:
    """The built-in model compiled in-process (fast)."""
    from romac.driver import compile_checkpoint
    from romac.passes import CompileOptions

    compile_checkpoint(None, out, options=CompileOptions(**kw))


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """A 56M-parameter LLaMA (fp16, 110 MB) and a target big enough for it: slow enough to stop mid-emit."""
    from romac.frontend.safetensors_io import write_safetensors
    from romac.ir import ModelConfig, expected_shape, tensor_names
    from romac.targets import TARGET_DIR

    root = tmp_path_factory.mktemp("big")
    ckpt = root / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": BIG["vocab_size"], "hidden_size": BIG["hidden_size"],
        "intermediate_size": BIG["intermediate_size"], "num_hidden_layers": BIG["num_layers"],
        "num_attention_heads": BIG["num_heads"], "tie_word_embeddings": False, "max_position_embeddings": 512,
    }))
    cfg = ModelConfig(num_kv_heads=BIG["num_heads"], head_dim=BIG["hidden_size"] // BIG["num_heads"], rms_norm_eps=1e-6,
                      rope_theta=1e4, tie_word_embeddings=False, **BIG)
    rng = np.random.default_rng(0)
    tensors = {}
    for name in tensor_names(cfg):
        key = "lm_head.weight" if name == "lm_head" else f"model.{name}.weight"
        tensors[key] = (rng.standard_normal(expected_shape(cfg, name), dtype=np.float32) * 0.03).astype(np.float16)
    write_safetensors(ckpt / "model.safetensors", tensors)
    target = root / "big.toml"
    target.write_text((TARGET_DIR / "tiny.toml").read_text()
                      .replace("bank_words = 32768", "bank_words = 524288").replace('name = "tiny"', 'name = "big"'))
    return ckpt, target


def _compile_and_signal(args: list, out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start a compile, freeze it as soon as its temporary appears, check it is mid-write, send ``sig``."""
    before = _snapshot(out) if out.exists() else None
    # a test run started in the background inherits SIGINT ignored (as shells do for background jobs); the
    # child must see Ctrl-C the way an interactive user's compile does
    proc = subprocess.Popen([sys.executable, "-m", "romac.cli", "compile", *map(str, args), "--out", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    try:
        # wait until it is writing bank images (worker threads busy), not merely created its temporary
        while not any((t / "rom").is_dir() and any((t / "rom").iterdir()) for t in temporaries(out.parent, out.name)):
            assert proc.poll() is None, f"the compile ended before it was interrupted:\n{proc.communicate()[1]}"
            assert time.monotonic() < deadline, "the compile never started writing"
            time.sleep(0.002)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.05)  # let the stop land
        (tmp,) = temporaries(out.parent, out.name)
        assert f"partial-{proc.pid}-" in tmp.name
        assert not (tmp / MANIFEST).exists(), "stopped too late: the temporary is already complete"
        assert (before is None and not out.exists()) or _snapshot(out) == before
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "force-over-existing"])
def test_sigint_midway_leaves_the_path_as_it_was(tmp_path, big_checkpoint, existing):
    ckpt, target = big_checkpoint
    out = tmp_path / "out"
    args = [ckpt, "--target", target, "--max-context", "64"]
    if existing:
        small_compile(out)  # a small valid output to be replaced
        before = _snapshot(out)
        args.append("--force")
    proc = _compile_and_signal(args, out, signal.SIGINT)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["romac: interrupted"], proc.stderr
    assert not temporaries(tmp_path, "out"), "the interrupted compile cleans up its temporary"
    if existing:
        assert _snapshot(out) == before, "the old output is intact"
        open_artifacts(out)
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])


def test_sigkill_midway_leaves_nothing_that_passes_for_an_output(tmp_path, big_checkpoint, capsys):
    ckpt, target = big_checkpoint
    out = tmp_path / "out"
    args = [ckpt, "--target", target, "--max-context", "64"]
    proc = _compile_and_signal(args, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    (stale,) = temporaries(tmp_path, "out")  # SIGKILL cannot be caught: the temporary stays ...
    assert stale.name.startswith(".")
    for tool in ("run", "inspect", "verify"):  # ... and no tool takes it for an output
        res = run_main(capsys, tool, stale, *(["--prompt-ids", "1"] if tool == "run" else []))
        assert_one_line_error(res, stale.name, "interrupted compile")
    with pytest.raises(ArtifactError):
        open_artifacts(stale)
    # the next compile to the same path deletes it (its process is gone) and writes a whole output
    small_compile(out)
    assert not temporaries(tmp_path, "out")
    open_artifacts(out)


def test_sigkill_midway_with_force_keeps_the_old_output(tmp_path, big_checkpoint):
    ckpt, target = big_checkpoint
    out = tmp_path / "out"
    small_compile(out)
    before = _snapshot(out)
    proc = _compile_and_signal([ckpt, "--target", target, "--max-context", "64", "--force"], out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert _snapshot(out) == before
    open_artifacts(out)


def test_existing_output_is_refused_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    small_compile(out)
    before = _snapshot(out)
    res = run_main(capsys, "compile", "--out", out, "-q", "--quant", "int2")
    assert_one_line_error(res, str(out), "already exists", "--force")
    assert _snapshot(out) == before
    assert not temporaries(tmp_path, "out")
    # refused before any work: the bad format is never looked at
    assert_one_line_error(run_main(capsys, "compile", "--quant", "int3", "--out", out, "-q"), "already exists")


def test_force_replaces_the_output_whole(tmp_path, capsys):
    out = tmp_path / "out"
    small_compile(out)
    (out / "rom" / "stray.txt").write_text("left by someone")  # not in the new output: must not survive
    old = _snapshot(out)
    assert run_main(capsys, "compile", "--out", out, "-q", "--quant", "int2", "--force").returncode == 0
    new = _snapshot(out)
    assert new != old and "rom/stray.txt" not in new
    assert open_artifacts(out).quantization["projections"]["format"] == "int2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary or old copy left beside it"


@pytest.mark.parametrize("what", ["file", "other-directory", "symlink"])
def test_force_only_replaces_an_artifact_directory(tmp_path, capsys, what):
    out = tmp_path / "out"
    if what == "file":
        out.write_text("precious")
    elif what == "other-directory":
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    else:
        small_compile(tmp_path / "real")
        out.symlink_to(tmp_path / "real")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert_one_line_error(run_main(capsys, "compile", "--out", out, "--force", "-q"), str(out), "--force replaces only")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    if what != "symlink":
        assert "precious" in (out.read_text() if what == "file" else (out / "notes.txt").read_text())


def test_force_over_an_empty_directory(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert run_main(capsys, "compile", "--out", tmp_path / "out", "--force", "-q").returncode == 0
    open_artifacts(tmp_path / "out")


def test_out_dot_relative_paths(tmp_path, capsys, monkeypatch):
    """--out given relative to the working directory, with '..' in it: the temporary is still a sibling."""
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert run_main(capsys, "compile", "--out", "../a/./b", "-q").returncode == 0
    open_artifacts(tmp_path / "a" / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]


# -- the install step itself, in-process ----------------------------------------------------------------------

def _fake_output(path: Path, tag: str) -> Path:
    path.mkdir()
    (path / MANIFEST).write_text(tag)
    (path / "x").write_text(tag)
    return path


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_install_replaces_whole_with_and_without_renameat2(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2", lambda *a: False)
    out = _fake_output(tmp_path / "out", "old")
    tmp = _fake_output(tmp_path / f".out.partial-{os.getpid()}-abc", "new")
    atomic.install(tmp, out, "out", force=True)
    assert (out / "x").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # without --force, an output that appeared while compiling is not replaced
    tmp = _fake_output(tmp_path / f".out.partial-{os.getpid()}-def", "newer")
    with pytest.raises(RomacError, match="already exists"):
        atomic.install(tmp, out, "out", force=False)
    assert (out / "x").read_text() == "new"


def test_two_renames_put_the_old_output_back_if_the_second_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2", lambda *a: False)
    out = _fake_output(tmp_path / "out", "old")
    missing = tmp_path / f".out.partial-{os.getpid()}-gone"  # the second rename fails: no such source
    with pytest.raises(RomacError, match="cannot move"):
        atomic.install(missing, out, "out", force=True)
    assert (out / "x").read_text() == "old"


def test_ctrl_c_is_held_over_the_steps_that_must_not_be_cut(tmp_path, monkeypatch):
    """An interrupt right after the temporary is created still finds it recorded, so it is cleaned up."""
    import signal as sig

    created: list[Path] = []
    real_mkdtemp = atomic.tempfile.mkdtemp

    def mkdtemp_then_ctrl_c(*a, **k):
        d = real_mkdtemp(*a, **k)
        os.kill(os.getpid(), sig.SIGINT)  # arrives between mkdtemp and the bookkeeping
        return d

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", mkdtemp_then_ctrl_c)
    previous = sig.signal(sig.SIGINT, sig.default_int_handler)  # as in an interactive run, even when CI ignores it
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic.make_temporary(tmp_path / "out", "out", created)
    finally:
        restored = sig.getsignal(sig.SIGINT)
        sig.signal(sig.SIGINT, previous)
    assert len(created) == 1 and created[0].is_dir()
    assert restored is sig.default_int_handler


def test_stale_temporaries_are_cleaned_only_when_their_process_is_gone(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    out = tmp_path / "out"
    stale = _fake_output(tmp_path / f".out.partial-{dead_pid}-x1", "stale")
    stale_old = tmp_path / f".out.old-{dead_pid}-x2"
    stale_old.mkdir()
    live = _fake_output(tmp_path / ".out.partial-1-x3", "pid 1 is alive: another compile is writing")
    other = _fake_output(tmp_path / f".other.partial-{dead_pid}-x4", "another output's")
    removed = atomic.clean_stale_temporaries(out)
    assert sorted(removed) == sorted([stale, stale_old])
    assert live.exists() and other.exists() and not stale.exists() and not stale_old.exists()
