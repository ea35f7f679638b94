"""Self-checking artifacts (issue 5, item 3): a directory whose files do not match its manifest is refused.

Each corruption is applied to a fresh copy of one compiled directory; the emulator (``Machine``), ``romac run``,
``romac verify`` and ``romac inspect`` must all refuse it with exit code 2 and one line naming the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from romac.artifacts import open_artifacts
from romac.spec.manifest import MANIFEST
from romac.emulator import Machine
from romac.errors import ArtifactError

from tests.clirun import assert_one_line_error, run_main


def _flip_bit(f: Path, byte: int = 100, bit: int = 3) -> None:
    data = bytearray(f.read_bytes())
    data[byte] ^= 1 << bit
    f.write_bytes(bytes(data))


def _edit_manifest(root: Path, change) -> None:
    m = json.loads((root / MANIFEST).read_text())
    change(m)
    (root / MANIFEST).write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")


def _set_version(m):
    m["format_version"] = 2


def _move_region(m):  # valid JSON, still version 1: only the manifest's own sha256 can tell
    m["regions"][3]["extents"][0][1] += 1


def _unlist_file(m):  # the manifest no longer lists a bank that is there
    del m["files"]["rom/bank_005.rom"]


# name -> (what to do to the directory, the file the message must name)
CORRUPTIONS = {
    "flipped-bit-in-bank": (lambda r: _flip_bit(r / "rom/bank_003.rom"), "rom/bank_003.rom"),
    "flipped-bit-in-sram-image": (lambda r: _flip_bit(r / "sram/builtin.bin", 40, 0), "sram/builtin.bin"),
    "truncated-bank": (lambda r: (r / "rom/bank_007.rom").write_bytes((r / "rom/bank_007.rom").read_bytes()[:-8]),
                       "rom/bank_007.rom"),
    "empty-bank": (lambda r: (r / "rom/bank_000.rom").write_bytes(b""), "rom/bank_000.rom"),
    "missing-bank": (lambda r: (r / "rom/bank_015.rom").unlink(), "rom/bank_015.rom"),
    "missing-program": (lambda r: (r / "program.bin").unlink(), "program.bin"),
    "missing-manifest": (lambda r: (r / MANIFEST).unlink(), "manifest.json"),
    "extra-file": (lambda r: (r / "rom" / "bank_016.rom").write_bytes(b"\0" * 64), "rom/bank_016.rom"),
    "extra-file-at-top": (lambda r: (r / "notes.txt").write_text("hi"), "notes.txt"),
    "modified-program": (lambda r: _flip_bit(r / "program.bin", 17, 7), "program.bin"),
    "program-grown": (lambda r: (r / "program.bin").write_bytes((r / "program.bin").read_bytes() + b"\0" * 8),
                      "program.bin"),
    "other-format-version": (lambda r: _edit_manifest(r, _set_version), "manifest.json"),
    "manifest-not-json": (lambda r: (r / MANIFEST).write_text("{ this is not json"), "manifest.json"),
    "manifest-binary-garbage": (lambda r: (r / MANIFEST).write_bytes(b"\xff\xfe\x00garbage"), "manifest.json"),
    "manifest-not-an-object": (lambda r: (r / MANIFEST).write_text("[1, 2, 3]\n"), "manifest.json"),
    "manifest-edited": (lambda r: _edit_manifest(r, _move_region), "manifest.json"),
    "manifest-bit-flipped": (lambda r: _flip_bit(r / MANIFEST, 500, 0), "manifest.json"),
    "manifest-unlists-a-file": (lambda r: _edit_manifest(r, _unlist_file), "manifest.json"),
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from romac.driver import compile_checkpoint

    out = tmp_path_factory.mktemp("selfcheck") / "good"
    compile_checkpoint(None, out)
    return out


@pytest.fixture
def copy_of(compiled, tmp_path):
    def make(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(compiled, d)
        return d

    return make


def test_the_pristine_copy_is_accepted(copy_of):
    d = copy_of("pristine")
    Machine(d, adapter="builtin")
    assert open_artifacts(d).root == str(d)


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corruption_is_refused_everywhere(copy_of, capsys, case):
    corrupt, names = CORRUPTIONS[case]
    d = copy_of(case)
    corrupt(d)
    with pytest.raises(ArtifactError) as e:
        Machine(d, adapter="builtin")
    assert names.split("/")[-1] in str(e.value)
    commands = {
        "run": ["run", d, "--adapter", "builtin", "--prompt-ids", "1,2"],
        "verify": ["verify", d, "--no-onnx", "--steps", "1"],
        "inspect": ["inspect", d],
        "inspect-json": ["inspect", d, "--json"],
    }
    for argv in commands.values():
        line = assert_one_line_error(run_main(capsys, *argv))
        assert names.split("/")[-1] in line and str(d) in line, line


@pytest.mark.parametrize("what", ["empty-dir", "checkpoint-dir", "a-file", "missing"])
def test_not_an_artifact_directory(tmp_path, capsys, what, compiled):
    p = tmp_path / what
    if what == "empty-dir":
        p.mkdir()
    elif what == "checkpoint-dir":
        p.mkdir()
        (p / "config.json").write_text("{}")
        (p / "model.safetensors").write_bytes(b"\0" * 16)
    elif what == "a-file":
        p.write_bytes((compiled / "program.bin").read_bytes())
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        Machine(p)
    for argv in (["run", p, "--prompt-ids", "1"], ["verify", p, "--no-onnx"], ["inspect", p]):
        line = assert_one_line_error(run_main(capsys, *argv), str(p))
        assert "not an artifact directory" in line


def test_a_manifest_listing_a_path_outside_the_directory_is_refused(copy_of, tmp_path):
    d = copy_of("escape")
    (tmp_path / "outside.bin").write_bytes(b"x")

    def escape(m):
        m["files"]["../outside.bin"] = {"bytes": 1, "sha256": "0" * 64}

    _edit_manifest(d, escape)
    with pytest.raises(ArtifactError, match="manifest"):
        open_artifacts(d, check_hashes=False)


def test_subprocess_refusal_has_no_traceback(copy_of):
    """The same through the installed entry point: one line, exit 2."""
    from tests.clirun import run_subprocess

    d = copy_of("sub")
    _flip_bit(d / "rom/bank_001.rom")
    assert_one_line_error(run_subprocess("run", d, "--prompt-ids", "1"), "rom/bank_001.rom", "sha256")
