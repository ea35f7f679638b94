"""The artifact directory: file names, the manifest, and the checks that it is whole and untouched.

This is the contract between the compiler and the emulator (DESIGN.md). Both sides take every name from
here; the emulator, ``romac verify`` and ``romac inspect`` only ever open a directory through
:func:`open_artifacts`, which refuses one whose files do not match the manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from romac.errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRAM_BIN = "program.bin"
PROGRAM_ASM = "program.asm"
REPORT = "report.json"
TOKENIZER = "tokenizer.json"  # the checkpoint's tokenizer (tokenizers format), when it carries one
ROM_DIR = "rom"
SRAM_DIR = "sram"
# A compile's temporary sibling of its output OUT (romac.backend.atomic): never an output itself.
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[^/]+$")


def bank_stem(bank: int, banks: int) -> str:
    return f"{ROM_DIR}/bank_{bank:0{max(3, len(str(banks - 1)))}d}"


def bank_file(bank: int, banks: int) -> str:
    """Relative path of one bank's raw image."""
    return bank_stem(bank, banks) + ".rom"


def bank_image_file(bank: int, banks: int, suffix: str) -> str:
    """Relative path of one bank's image in another format, beside the raw one (suffixes and formats:
    ``romac.backend.romformats``). Listed in the manifest and checked like every file; the emulator reads only
    :func:`bank_file`."""
    return bank_stem(bank, banks) + suffix


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


MANIFEST_SHA256 = "manifest_sha256"


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's deterministic JSON without its own ``manifest_sha256`` field (and ``root``).

    Stored in the manifest, it makes a flipped bit in manifest.json itself as detectable as one in a bank.
    """
    body = {k: v for k, v in manifest.items() if k not in (MANIFEST_SHA256, "root")}
    return hashlib.sha256(dump_json(body).encode("ascii")).hexdigest()


def seal_manifest(manifest: dict) -> str:
    """The manifest.json text: the manifest with its own sha256 added (computed from what a reader will see)."""
    manifest = json.loads(dump_json(manifest))
    return dump_json({**manifest, MANIFEST_SHA256: manifest_digest(manifest)})


def _safe_relative(rel: object) -> bool:
    """A manifest file name: a relative POSIX path that stays inside the directory."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def list_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def open_artifacts(path: str | Path, check_hashes: bool = True) -> dict:
    """Read and check an artifact directory's manifest; returns it with ``root`` set.

    Refuses (ArtifactError naming the file) a missing directory or manifest, a temporary directory of a compile,
    a manifest that is not JSON, of another format version or not matching its own sha256, a missing, extra,
    resized or modified file.
    """
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError("not an artifact directory", where=str(root), hint="compile one with romac compile")
    if any(TEMP_NAME.match(p.name) for p in (root.absolute(), root.absolute().parent)):
        raise ArtifactError("is the temporary directory of an unfinished or interrupted compile, not an output",
                            where=str(root), hint="compile again; the next compile to that path deletes it")
    mpath = root / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError("not an artifact directory: manifest.json is missing", where=str(root),
                            hint="compile one with romac compile") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"manifest is not valid JSON ({e})", where=str(mpath)) from None
    except OSError as e:
        raise ArtifactError(f"cannot read the manifest ({e.strerror})", where=str(mpath)) from None
    if not isinstance(manifest, dict):
        raise ArtifactError("manifest is not a JSON object", where=str(mpath))
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format version {version!r}, this romac reads version {FORMAT_VERSION}",
            where=str(mpath),
            hint="recompile with this romac",
        )
    if manifest.get(MANIFEST_SHA256) != manifest_digest(manifest):  # cheap: always checked
        raise ArtifactError("manifest does not match its own sha256 (corrupted or edited)", where=str(mpath))
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        _safe_relative(rel) and isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str)
        for rel, m in files.items()
    ):
        raise ArtifactError("manifest's file list is malformed", where=str(mpath))
    present = set(list_files(root)) - {MANIFEST}
    for extra in sorted(present - set(files)):
        raise ArtifactError("file is not listed in the manifest", where=str(root / extra))
    for rel, meta in sorted(files.items()):
        f = root / rel
        try:
            if not f.is_file():
                raise ArtifactError("file listed in the manifest is missing", where=str(f))
            if f.stat().st_size != meta["bytes"]:
                raise ArtifactError(f"file has {f.stat().st_size} bytes, the manifest says {meta['bytes']}", where=str(f))
            if check_hashes and sha256_file(f) != meta["sha256"]:
                raise ArtifactError("file content does not match its sha256 in the manifest (corrupted or edited)", where=str(f))
        except OSError as e:
            raise ArtifactError(f"cannot read ({e.strerror})", where=str(f)) from None
    manifest["root"] = str(root)
    return manifest
