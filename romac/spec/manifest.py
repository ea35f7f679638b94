"""The artifact directory's contract: its file names and the manifest schema (docs/artifacts.md).

:class:`Manifest` is the typed form of ``manifest.json``; :mod:`romac.artifacts` reads and checks a directory
against it, the emitter (:mod:`romac.backend.emit`) writes it. Its ``regions`` and ``sram`` are the compile plan's
records (:mod:`romac.spec.plan`); ``target`` and ``model`` are the target's and the model config's own JSON forms
(``romac.targets.Target.to_dict``, the fields of ``romac.ir.ModelConfig``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from romac.errors import ArtifactError
from romac.spec.isa import INSTR_BYTES
from romac.spec.plan import Region, SramMap, int_list, need_field

#: the manifest schema this romac writes and reads; bump on any change to the layout of the directory
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SHA256 = "manifest_sha256"
PROGRAM_BIN = "program.bin"
PROGRAM_ASM = "program.asm"
REPORT = "report.json"
TOKENIZER = "tokenizer.json"  # the checkpoint's tokenizer (tokenizers format), when it carries one
ROM_DIR = "rom"
SRAM_DIR = "sram"
RAW_FORMAT = "raw"  # the .rom images, always written; other bank image formats: romac.backend.romformats
# A compile's temporary sibling of its output OUT (romac.backend.atomic): never an output itself.
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[^/]+$")


def bank_stem(bank: int, banks: int) -> str:
    return f"{ROM_DIR}/bank_{bank:0{max(3, len(str(banks - 1)))}d}"


def bank_file(bank: int, banks: int) -> str:
    """Relative path of one bank's raw image."""
    return bank_stem(bank, banks) + ".rom"


def bank_image_file(bank: int, banks: int, suffix: str) -> str:
    """Relative path of one bank's image in another format, beside the raw one (the emulator reads only
    :func:`bank_file`)."""
    return bank_stem(bank, banks) + suffix


def sram_file(adapter: str) -> str:
    return f"{SRAM_DIR}/{adapter}.bin"


#: the correction image (always resident); its name cannot be an adapter's (those start with a letter or digit)
SRAM_CORRECTION = f"{SRAM_DIR}/_correction.bin"


@dataclass(frozen=True)
class Banks:
    """The B-ROM images: how many banks, their size, and how full each is."""

    count: int
    words: int
    word_bits: int
    used_words: tuple[int, ...]
    formats: tuple[str, ...] = (RAW_FORMAT,)

    @property
    def word_bytes(self) -> int:
        return self.word_bits // 8

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "words": self.words, "word_bits": self.word_bits,
                "used_words": list(self.used_words), "formats": list(self.formats)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Banks":
        formats = need_field(data, "formats", list, where)
        return cls(need_field(data, "count", int, where), need_field(data, "words", int, where),
                   need_field(data, "word_bits", int, where),
                   int_list(need_field(data, "used_words", list, where), None, "used_words", where), tuple(formats))


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha256}


def base_fingerprint(regions: "tuple[Region, ...]", files: Mapping[str, "FileEntry"]) -> str:
    """What the chip computes, as one sha256: the regions (formats and placement), the raw bank images and the
    program — everything that cannot change after tape-out. Adapters (SRAM) are not part of it."""
    h = hashlib.sha256(b"romac base fingerprint v1\n")
    h.update(json.dumps([r.to_json() for r in regions], sort_keys=True, separators=(",", ":")).encode("ascii"))
    for rel in sorted(files):
        if (rel.startswith(ROM_DIR + "/") and rel.endswith(".rom")) or rel == PROGRAM_BIN:
            h.update(f"\n{rel} {files[rel].sha256}".encode("ascii"))
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``, typed. ``root`` is where it was read from (not part of the file)."""

    romac_version: str
    target: Mapping[str, Any]
    model: Mapping[str, Any]
    source: Mapping[str, Any]
    quantization: Mapping[str, Any]
    regions: tuple[Region, ...]
    banks: Banks
    sram: SramMap
    adapters: tuple[str, ...]
    instructions: int
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    root: str | None = None

    def region_ids(self) -> dict[str, int]:
        return {r.name: i for i, r in enumerate(self.regions)}

    @property
    def base_fingerprint(self) -> str:
        return base_fingerprint(self.regions, self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "base_fingerprint": self.base_fingerprint,
            "format_version": self.format_version,
            "romac_version": self.romac_version,
            "target": dict(self.target),
            "model": dict(self.model),
            "source": dict(self.source),
            "quantization": dict(self.quantization),
            "regions": [r.to_json() for r in self.regions],
            "banks": self.banks.to_json(),
            "sram": self.sram.to_json(),
            "adapters": list(self.adapters),
            "program": {"instructions": self.instructions, "instruction_bytes": INSTR_BYTES},
            "files": {k: v.to_json() for k, v in self.files.items()},
        }

    @classmethod
    def from_json(cls, data: Any, where: str, root: str | None = None) -> "Manifest":
        """Read (and check the schema of) a manifest's JSON; raises ArtifactError naming the field."""
        program = need_field(data, "program", dict, where)
        if need_field(program, "instruction_bytes", int, f"{where} program") != INSTR_BYTES:
            raise ArtifactError(f"instructions of {program['instruction_bytes']} bytes; this romac's are {INSTR_BYTES}",
                                where=f"{where} program", hint="recompile with this romac")
        files = need_field(data, "files", dict, where)
        entries = {}
        for rel, meta in files.items():
            entries[rel] = FileEntry(need_field(meta, "bytes", int, f"{where} files {rel}"),
                                     need_field(meta, "sha256", str, f"{where} files {rel}"))
        adapters = need_field(data, "adapters", list, where)
        if not all(isinstance(a, str) for a in adapters):
            raise ArtifactError("field 'adapters' must list adapter names", where=where)
        manifest = cls(
            romac_version=need_field(data, "romac_version", str, where),
            target=need_field(data, "target", dict, where),
            model=need_field(data, "model", dict, where),
            source=need_field(data, "source", dict, where),
            quantization=need_field(data, "quantization", dict, where),
            regions=tuple(Region.from_json(r, f"{where} regions") for r in need_field(data, "regions", list, where)),
            banks=Banks.from_json(need_field(data, "banks", dict, where), f"{where} banks"),
            sram=SramMap.from_json(need_field(data, "sram", dict, where), f"{where} sram"),
            adapters=tuple(adapters),
            instructions=need_field(program, "instructions", int, f"{where} program"),
            files=entries,
            format_version=need_field(data, "format_version", int, where),
            root=root,
        )
        stored = data.get("base_fingerprint")  # written by every romac since the field exists
        if stored is not None and stored != manifest.base_fingerprint:
            raise ArtifactError("base_fingerprint does not match the ROM images and program it describes", where=where)
        return manifest
