"""The command line end to end: compile, run, verify, inspect; and how it fails."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest


def romac(*args, cwd=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "romac.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"romac {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_user_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("romac: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[-1], lines[-1]


def test_default_compile_run_verify(tmp_path):
    proc = romac("compile", cwd=tmp_path)
    assert "romac-out" in proc.stdout
    out = tmp_path / "romac-out"
    assert (out / "manifest.json").is_file() and (out / "sram" / "builtin.bin").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no partial directory left behind"
    ids = romac("run", out, "--adapter", "builtin", "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                "--dump-logits", tmp_path / "l.npy").stdout.strip()
    assert len(ids.split(",")) == 5
    assert np.load(tmp_path / "l.npy").shape == (3 + 5, 512)
    two = romac("run", out, "--adapter", "builtin", "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--threads", "2",
                "--dump-logits", tmp_path / "l2.npy").stdout.strip()
    assert two == ids
    np.testing.assert_array_equal(np.load(tmp_path / "l2.npy"), np.load(tmp_path / "l.npy"))
    verify = romac("verify", out, cwd=tmp_path).stdout
    assert "builtin" in verify and "FAIL" not in verify
    assert "B-ROM" in romac("inspect", out).stdout
    from romac.spec.asm import assemble
    from romac.spec.isa import encode

    assert encode(assemble((out / "program.asm").read_text())) == (out / "program.bin").read_bytes()


def test_transformers_checkpoint_with_peft_adapter(tmp_path, hf_checkpoint):
    base, adapter = hf_checkpoint
    out = tmp_path / "out"
    romac("compile", base, "--adapter", f"chat={adapter}", "--out", out, "-q")
    ids = romac("run", out, "--adapter", "chat", "--prompt-ids", "1,5,9", "--max-new-tokens", "4").stdout
    assert len(ids.strip().split(",")) >= 1
    v = romac("verify", out, "--model", base, "--adapter", f"chat={adapter}", "--json").stdout
    import json

    checks = json.loads(v)
    assert [c["adapter"] for c in checks] == [None, "chat"]
    assert all(c["passed"] for c in checks)
    assert all(c["onnx"]["top1_agreement"] > 0.5 for c in checks)


def test_errors_are_one_line_with_exit_2_and_leave_nothing(tmp_path, hf_checkpoint):
    base, adapter = hf_checkpoint
    assert_user_error(romac("compile", tmp_path / "nope", "--out", tmp_path / "o1", check=False), "nope")
    assert not (tmp_path / "o1").exists()
    # the output exists: refused without --force
    romac("compile", "--out", tmp_path / "o2", "-q")
    assert_user_error(romac("compile", "--out", tmp_path / "o2", "-q", check=False), "--force")
    romac("compile", "--out", tmp_path / "o2", "-q", "--force")
    # over capacity
    toml = (tmp_path / "small.toml")
    from romac.targets import TARGET_DIR

    toml.write_text((TARGET_DIR / "tiny.toml").read_text().replace("bank_words = 32768", "bank_words = 64"))
    assert_user_error(romac("compile", "--target", toml, "--out", tmp_path / "o3", check=False), "B-ROM", "over by")
    assert not (tmp_path / "o3").exists()
    # an adapter made for another base
    assert_user_error(romac("compile", "--adapter", f"x={adapter}", "--out", tmp_path / "o4", check=False), "shape")
    # a KV cache that does not fit
    assert_user_error(romac("compile", "--max-context", "100000", "--out", tmp_path / "o5", check=False), "--max-context")
    # an unknown format and target
    assert_user_error(romac("compile", "--quant", "int3", "--out", tmp_path / "o6", check=False), "int3")
    assert_user_error(romac("compile", "--target", "nosuch", "--out", tmp_path / "o7", check=False), "nosuch")
    assert not any((tmp_path / f"o{k}").exists() for k in (1, 3, 4, 5, 6, 7))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_run_refuses_corrupted_artifacts(tmp_path):
    out = tmp_path / "o"
    romac("compile", "--out", out, "-q")
    bank = out / "rom" / "bank_003.rom"
    data = bytearray(bank.read_bytes())
    data[100] ^= 1
    bank.write_bytes(bytes(data))
    assert_user_error(romac("run", out, "--prompt-ids", "1", check=False), "bank_003.rom", "sha256")


def test_debug_shows_traceback(tmp_path):
    proc = romac("--debug", "compile", tmp_path / "nope", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_targets_lists_tiny():
    assert "tiny" in romac("targets").stdout


def test_plan_json_shows_the_whole_plan(capsys, tmp_path):
    """romac plan --json: the report plus every region's placement, the bank fill, the SRAM map and the program,
    the same as what compile writes into the manifest."""
    import json

    from tests.clirun import run_main

    res = run_main(capsys, "plan", "--json")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)["plan"]
    run_main(capsys, "compile", "-q", "-o", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert plan["regions"] == manifest["regions"] and plan["sram"] == manifest["sram"]
    assert plan["bank_words_used"] == manifest["banks"]["used_words"]
    assert plan["program"][-1].split()[1] == "halt"
    assert (tmp_path / "out" / "program.asm").read_text().splitlines() == plan["program"]


def test_out_of_memory_says_how_much_and_what_to_change(tmp_path, capsys, monkeypatch):
    """A failed allocation ends in one line naming the command, what numpy could not allocate, what the process
    has, and what to change; exit 2, no traceback."""
    from romac.emulator import Machine
    from tests.clirun import assert_one_line_error, run_main

    out = tmp_path / "out"
    assert run_main(capsys, "compile", "--out", out, "-q").returncode == 0

    def greedy(self, prompt, steps, stop=None):
        return np.empty((1 << 30, 1 << 22), np.float32)  # 16 PiB: numpy's own MemoryError, whatever the machine

    monkeypatch.setattr(Machine, "generate", greedy)
    res = run_main(capsys, "run", out, "--prompt-ids", "1,2", "--max-new-tokens", "2")
    line = assert_one_line_error(res, "out of memory in 'romac run'", "an allocation of 16.0 PiB failed",
                                 "GiB available", "--max-new-tokens")
    assert "Traceback" not in res.stderr, line
