"""After tape-out only SRAM changes: adapters added to, and removed from, a compiled artifact directory.

``add_adapter`` lays out the new adapter's SRAM image exactly as a compile with it would (its image depends on
the adapter, the slot list and the LoRA precision only), checks that it fits beside the compiled KV cache, and
writes a new directory that shares every unchanged file with the old one (hard links: the ROM images are never
copied or rewritten), then exchanges the two in one step (``romac.backend.atomic``): at every instant the path
holds the complete old directory or the complete new one. ``rom/*`` and ``program.bin`` stay byte-identical, and so
does the base fingerprint.

An adapter trained on a base exported by ``romac export-base`` names that export in its ``adapter_config.json``
(``base_model_name_or_path``); its ``romac_base.json`` holds the fingerprint of the ROM it was exported from, which
must be this directory's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from romac.artifacts import dump_json, open_artifacts, seal_manifest, sha256_file
from romac.backend import atomic
from romac.backend.report import build_report
from romac.backend.sram_image import sram_image
from romac.errors import RomacError
from romac.frontend.peft import check_adapter_name, load_peft_adapter
from romac.ir import LoraAdapter, ModelConfig
from romac.passes.sram_layout import plan_sram
from romac.planning import shape_model
from romac.spec.isa import decode
from romac.spec.layout import SRAM_ALIGN, ceil_to
from romac.spec.manifest import MANIFEST, PROGRAM_BIN, REPORT, FileEntry, Manifest, sram_file
from romac.spec.plan import AdapterLayout, KvRegion, SramMap
from romac.targets import Target

#: the file ``romac export-base`` writes beside the checkpoint: which ROM the exported base is
BASE_FILE = "romac_base.json"


@dataclass(frozen=True)
class BaseCheck:
    """What could be told about the base an adapter was trained on."""

    known: bool  # the adapter names an export with a fingerprint
    matches: bool
    detail: str


def model_config(manifest: Manifest) -> ModelConfig:
    return ModelConfig(**manifest.model)


def check_base(adapter_dir: Path, manifest: Manifest) -> BaseCheck:
    """Compare the base an adapter names (``adapter_config.json``'s ``base_model_name_or_path``) with this ROM."""
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return BaseCheck(False, False, "its adapter_config.json cannot be read")
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        return BaseCheck(False, False, "its adapter_config.json names no base model")
    found = next((p / BASE_FILE for p in (Path(base), adapter_dir / base) if (p / BASE_FILE).is_file()), None)
    if found is None:
        return BaseCheck(False, False, f"its base {base!r} is not a romac export-base directory (no {BASE_FILE})")
    try:
        fingerprint = json.loads(found.read_text(encoding="utf-8"))["base_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return BaseCheck(False, False, f"{found} is not readable")
    if fingerprint == manifest.base_fingerprint:
        return BaseCheck(True, True, f"trained on {base}, exported from this ROM")
    return BaseCheck(True, False, f"trained on {base}, exported from another ROM (fingerprint {fingerprint[:12]}…, "
                                  f"this one {manifest.base_fingerprint[:12]}…)")


def _sram_map(manifest: Manifest, layouts: list[AdapterLayout]) -> SramMap:
    """The SRAM map with these adapter images and the compiled KV cache (its context unchanged)."""
    old = manifest.sram
    largest = max((a.bytes for a in layouts), default=0)
    kv_offset = ceil_to(old.adapter_region_offset + largest, SRAM_ALIGN)
    fits = max(0, (old.bytes - kv_offset) // old.kv.bytes_per_token)
    kv = KvRegion(kv_offset, old.kv.bytes, old.kv.format, old.kv.max_context, old.kv.bytes_per_token, int(fits))
    return dataclasses.replace(old, adapters=tuple(layouts), adapter_region_bytes=largest, kv=kv)


def _rewrite(out: Path, manifest: Manifest, sram: SramMap, new_files: dict[str, bytes], dropped: set[str]) -> None:
    """The directory with ``new_files`` written, ``dropped`` gone and a new manifest and report, installed whole."""
    shown = str(out)
    path = Path(os.path.abspath(out))
    target = Target.from_dict(manifest.target)
    program = decode((path / PROGRAM_BIN).read_bytes(), source=str(path / PROGRAM_BIN))
    model = shape_model(model_config(manifest)).with_plan(regions=manifest.regions,
                                                          bank_words_used=manifest.banks.used_words, sram=sram,
                                                          program=tuple(program))
    atomic.clean_stale_temporaries(path)
    created: list[Path] = []
    try:
        tmp = atomic.make_temporary(path, shown, created)
        files = {}
        for rel, entry in manifest.files.items():
            if rel in dropped or rel in new_files or rel == REPORT:
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(path / rel, tmp / rel)  # the same bytes, not a copy
            files[rel] = entry
        report = dump_json(build_report(model, target)).encode("utf-8")
        for rel, data in {**new_files, REPORT: report}.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
            files[rel] = FileEntry(len(data), sha256_file(tmp / rel))
        names = tuple(a.name for a in sram.adapters)
        new = dataclasses.replace(manifest, sram=sram, adapters=names, files=dict(sorted(files.items())), root=None)
        (tmp / MANIFEST).write_text(seal_manifest(new.to_json()), encoding="utf-8")
        atomic.install(tmp, path, shown, force=True)
    except BaseException:
        for t in created:
            atomic.remove_tree(t)
        raise


def add_adapter(out: str | Path, name: str, adapter_path: str | Path, *, force: bool = False,
                strict: bool = False) -> BaseCheck:
    """Add (or with ``force`` replace) adapter ``name`` to a compiled directory; returns what was told of its base."""
    manifest = open_artifacts(out)
    check_adapter_name(name)
    if name in manifest.adapters and not force:
        raise RomacError(f"{out} already holds an adapter named {name!r}", where="romac adapter add",
                         hint="pass --force to replace it, or remove it first (romac adapter remove)")
    same = [a for a in manifest.adapters if a.lower() == name.lower() and a != name]
    if same:
        raise RomacError(f"adapter {name!r} would share its file with {same[0]!r} on case-insensitive file systems",
                         where="romac adapter add", hint="choose another name")
    config = model_config(manifest)
    adapter: LoraAdapter = load_peft_adapter(adapter_path, name, config)  # shapes and modules against the model
    base = check_base(Path(adapter_path), manifest)
    if base.known and not base.matches:
        raise RomacError(f"adapter {name!r} was {base.detail}", where=str(adapter_path),
                         hint="train it on `romac export-base` of this directory")
    if not base.known:
        if strict:
            raise RomacError(f"cannot tell which base adapter {name!r} was trained on: {base.detail}",
                             where=str(adapter_path), hint="train it on `romac export-base` of this directory, or "
                             "drop --strict")
    target = Target.from_dict(manifest.target)
    # its layout alone, and the capacity check with the compiled context (the message names what would fit)
    corr = manifest.sram.correction
    ranks = {manifest.sram.slots[e.slot]: e.rank for e in corr.entries} if corr else None
    layout = plan_sram(config, [adapter], target, manifest.sram.kv.max_context, ranks).adapters[0]
    layouts = [a for a in manifest.sram.adapters if a.name != name]
    layouts.append(layout)
    sram = _sram_map(manifest, layouts)
    if sram.kv.max_context > sram.kv.max_context_that_fits:  # beside a larger adapter already there: it fits alone
        raise RomacError(f"adapter {name!r} does not fit beside the KV cache", where=str(adapter_path))
    image = sram_image(adapter, layout, sram)
    _rewrite(Path(out), manifest, sram, {sram_file(name): image}, set())
    return base


def remove_adapter(out: str | Path, name: str) -> None:
    """Remove adapter ``name`` (its SRAM image) from a compiled directory."""
    manifest = open_artifacts(out)
    if name not in manifest.adapters:
        raise RomacError(f"{out} holds no adapter named {name!r}", where="romac adapter remove",
                         hint=f"its adapters: {', '.join(manifest.adapters) or 'none'}")
    sram = _sram_map(manifest, [a for a in manifest.sram.adapters if a.name != name])
    _rewrite(Path(out), manifest, sram, {}, {sram_file(name)})


def list_adapters(out: str | Path) -> list[dict]:
    """The adapters of a compiled directory: name, rank, slots used, SRAM bytes, the longest context beside it."""
    manifest = open_artifacts(out)
    kv = manifest.sram.kv
    start = manifest.sram.adapter_region_offset
    return [{"name": a.name, "rank": a.rank, "alpha": a.alpha, "slots": len(a.entries), "bytes": a.bytes,
             "longest_context_alone": max(0, (manifest.sram.bytes - ceil_to(start + a.bytes, SRAM_ALIGN))
                                          // kv.bytes_per_token)}
            for a in manifest.sram.adapters]
