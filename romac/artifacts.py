"""Reading an artifact directory: the checks that it is whole and untouched, and its typed manifest.

The emulator, ``romac verify``, ``romac inspect`` and ``romac adapter`` only ever open a directory through
:func:`open_artifacts`, which refuses one whose files do not match the manifest. File names and the manifest
schema are the contract's facts (:mod:`romac.spec.manifest`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from romac.errors import ArtifactError
from romac.spec.manifest import FORMAT_VERSION, MANIFEST, MANIFEST_SHA256, TEMP_NAME, Manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def dump_json(data: Any) -> str:
    """Deterministic JSON: sorted keys, fixed separators, newline at the end."""
    return json.dumps(data, sort_keys=True, indent=1, ensure_ascii=True) + "\n"


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


def read_manifest_json(root: Path) -> dict:
    """manifest.json of a directory as checked JSON (format version, its own sha256), not yet typed."""
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
    return manifest


def open_artifacts(path: str | Path, check_hashes: bool = True) -> Manifest:
    """Read and check an artifact directory; returns its typed manifest (``root`` set).

    Refuses (ArtifactError naming the file) a missing directory or manifest, a temporary directory of a compile,
    a manifest that is not JSON, of another format version, not matching its own sha256 or its schema, a
    missing, extra, resized or modified file.
    """
    root = Path(path)
    data = read_manifest_json(root)
    mpath = root / MANIFEST
    files = data.get("files")
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
    return Manifest.from_json(data, str(mpath), root=str(root))
