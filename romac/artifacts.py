"""The artifact directory: file names, the manifest, and the checks that it is whole and untouched.

This is the contract between the compiler and the emulator (DESIGN.md). Both sides take every name from
here; the emulator, ``romac verify`` and ``romac inspect`` only ever open a directory through
:func:`open_artifacts`, which refuses one whose files do not match the manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from romac.errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRAM_BIN = "program.bin"
PROGRAM_ASM = "program.asm"
REPORT = "report.json"
ROM_DIR = "rom"
SRAM_DIR = "sram"


def bank_stem(bank: int, banks: int) -> str:
    return f"{ROM_DIR}/bank_{bank:0{max(3, len(str(banks - 1)))}d}"


def bank_file(bank: int, banks: int) -> str:
    """Relative path of one bank's raw image."""
    return bank_stem(bank, banks) + ".rom"


def sram_file(adapter: str) -> str:
    return f"{SRAM_DIR}/{adapter}.bin"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def dump_json(data: Any) -> str:
    """Deterministic JSON: sorted keys, fixed separators, newline at the end."""
    return json.dumps(data, sort_keys=True, indent=1, ensure_ascii=True) + "\n"


def list_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def open_artifacts(path: str | Path, check_hashes: bool = True) -> dict:
    """Read and check an artifact directory's manifest; returns it with ``root`` set.

    Refuses (ArtifactError naming the file) a missing directory or manifest, another format version, a missing,
    extra, resized or modified file.
    """
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError("not an artifact directory", where=str(root), hint="compile one with romac compile")
    mpath = root / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError("manifest.json is missing", where=str(root)) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"manifest is not valid JSON ({e})", where=str(mpath)) from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format version {version!r}, this romac reads version {FORMAT_VERSION}",
            where=str(mpath),
            hint="recompile with this romac",
        )
    files = manifest.get("files", {})
    present = set(list_files(root)) - {MANIFEST}
    for extra in sorted(present - set(files)):
        raise ArtifactError("file is not listed in the manifest", where=str(root / extra))
    for rel, meta in sorted(files.items()):
        f = root / rel
        if not f.is_file():
            raise ArtifactError("file listed in the manifest is missing", where=str(f))
        if f.stat().st_size != meta["bytes"]:
            raise ArtifactError(f"file has {f.stat().st_size} bytes, the manifest says {meta['bytes']}", where=str(f))
        if check_hashes and sha256_file(f) != meta["sha256"]:
            raise ArtifactError("file content does not match its sha256 in the manifest (corrupted or edited)", where=str(f))
    manifest["root"] = str(root)
    return manifest
