"""The emitter: stream the weights through the compiled plan and write the artifact directory.

Requires a Model that went through the whole pipeline (``romac.passes.run_pipeline``). Weights are read,
quantized, packed into tiles and written into the bank images one row-chunk of one matrix at a time, so peak
memory stays near one chunk, not the model. The directory is written under a temporary sibling name and
renamed into place only when complete: it appears whole or not at all.
"""

from __future__ import annotations

import math
import sys
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from romac import __version__
from romac.artifacts import (
    FORMAT_VERSION,
    MANIFEST,
    PROGRAM_ASM,
    PROGRAM_BIN,
    REPORT,
    bank_file,
    dump_json,
    list_files,
    sha256_file,
    sram_file,
)
from romac.backend import isa
from romac.backend.report import build_report
from romac.codecs import fp8_e4m3_encode, fp16_encode, get_codec
from romac.errors import RomacError
from romac.ir import Model
from romac.layout import (
    SLOT_ENTRY_FORMAT,
    TileGrid,
    pack_constants,
    pack_tiles,
    tile_index,
    tile_locations,
)
from romac.passes.partition import tile_words

CHUNK_BYTES = 64 << 20  # float32 input per quantization step: bounds peak memory on big matrices


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="param", unit_scale=True, desc="compiling", disable=not enabled or not sys.stderr.isatty(), leave=False)


def _check_finite(w: np.ndarray, name: str, source: str, row0: int) -> None:
    if not np.isfinite(w).all():
        r, c = np.argwhere(~np.isfinite(w))[0]
        raise RomacError(
            f"tensor {name!r} holds {w[r, c] if w.ndim == 2 else w[r]} at [{row0 + r}, {c}]",
            where=source or name,
            hint="the checkpoint is corrupted or diverged; NaN/Inf weights cannot be quantized",
        )


class _BankWriter:
    """Open bank images, written in place with pwrite (sparse until filled)."""

    def __init__(self, root: Path, target) -> None:
        self.fds = []
        for b in range(target.banks):
            path = root / bank_file(b, target.banks)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fd, target.bank_bytes)
            self.fds.append(fd)

    def write(self, bank: int, offset: int, data: np.ndarray) -> None:
        os.pwrite(self.fds[bank], data.tobytes(), offset)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _write_region(model: Model, region: dict, banks: _BankWriter, constants_region: dict | None, bar) -> None:
    target = model.annotations["target"]
    info = model.tensors[region["name"]]
    codec = get_codec(**region["codec"])
    grid: TileGrid = info["grid"]
    words = tile_words(info, target.word_bytes)
    bank, offset = tile_locations(words, region["start_bank"], region["extents"], target.banks, target.word_bytes)
    handle = model.weights[region["name"]]
    source = getattr(handle, "source", "")

    def put(q, grid_part: TileGrid, row0: int) -> None:
        for data, (r0, c0, _, _) in zip(pack_tiles(codec, q, grid_part, target.word_bytes), grid_part.tiles()):
            t = tile_index(grid, row0 + r0, c0)
            banks.write(int(bank[t]), int(offset[t]), data)

    if hasattr(handle, "load_quantized"):  # a pre-quantized (bitsandbytes) weight: codes pass through untouched
        q = handle.load_quantized()
        put(q, grid, 0)
        bar.update(grid.rows * grid.cols)
    elif region["kind"] == "vector":
        w = np.asarray(handle.load(), np.float32).reshape(1, -1)
        _check_finite(w, region["name"], source, 0)
        put(codec.quantize(w), grid, 0)
        bar.update(w.size)
        return
    elif constants_region is not None:  # per-tensor statistics: the whole matrix is quantized at once
        w = np.asarray(handle.load(), np.float32)
        _check_finite(w, region["name"], source, 0)
        q = codec.quantize(w)
        put(q, grid, 0)
        bar.update(w.size)
    else:
        rows_per_chunk = max(1, CHUNK_BYTES // (4 * grid.cols) // grid.tile_rows) * grid.tile_rows
        for r0 in range(0, grid.rows, rows_per_chunk):
            r1 = min(grid.rows, r0 + rows_per_chunk)
            w = np.asarray(handle.load_rows(r0, r1), np.float32)
            _check_finite(w, region["name"], source, r0)
            put(codec.quantize(w), TileGrid(r1 - r0, grid.cols, grid.tile_rows, grid.tile_cols), r0)
            bar.update(w.size)
        return
    if constants_region is not None:
        values = pack_constants(q).reshape(1, -1)
        cgrid = TileGrid.for_vector(values.shape[1])
        fp32 = get_codec(**constants_region["codec"])
        (data,) = pack_tiles(fp32, fp32.quantize(values), cgrid, target.word_bytes)
        b, off, _ = constants_region["extents"][0]
        banks.write(b, off * target.word_bytes, data)


def _lora_block(x: np.ndarray, fmt: str) -> tuple[bytes, float]:
    if fmt == "fp8_e4m3":
        codes, scale = fp8_e4m3_encode(x)
        return codes.astype(np.uint8).tobytes(), float(scale)
    return fp16_encode(x).astype("<u2").tobytes(), 1.0


def _write_sram_image(model: Model, layout: dict, path: Path) -> None:
    sram = model.annotations["sram"]
    adapter = model.adapter(layout["name"])
    image = bytearray(layout["bytes"])
    entry = struct.calcsize(SLOT_ENTRY_FORMAT)
    cfg = model.config
    for slot, a_off, b_off, rank, in_f, out_f in layout["entries"]:
        tensor = sram["slots"][slot]
        a_h, b_h = adapter.weights[tensor]
        a = np.asarray(a_h.load(), np.float32)
        b = np.asarray(b_h.load(), np.float32)
        for arr, h in ((a, a_h), (b, b_h)):
            if not np.isfinite(arr).all():
                raise RomacError(f"LoRA tensor {h.name!r} holds NaN or Inf", where=getattr(h, "source", "") or adapter.source)
        a_bytes, a_scale = _lora_block(a, sram["lora_format"])
        b_bytes, b_scale = _lora_block(b, sram["lora_format"])
        image[a_off : a_off + len(a_bytes)] = a_bytes
        image[b_off : b_off + len(b_bytes)] = b_bytes
        struct.pack_into(SLOT_ENTRY_FORMAT, image, slot * entry, a_scale, b_scale, adapter.scaling, rank)
    del cfg
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(image))


def _manifest(model: Model, files: dict) -> dict:
    a = model.annotations
    target = a["target"]
    cfg = model.config
    source = dict(model.source)
    if "path" in source:  # no absolute paths: the same inputs elsewhere give the same bytes
        source["path"] = Path(str(source["path"])).name
    return {
        "format_version": FORMAT_VERSION,
        "romac_version": __version__,
        "target": target.to_dict(),
        "model": {**{k: v for k, v in cfg.__dict__.items() if k != "rope_scaling"},
                  "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None},
        "source": source,
        "quantization": {
            name: info["codec"] for name, info in model.tensors.items() if name in ("embed_tokens", "lm_head")
        } | {"projections": model.tensors["layers.0.self_attn.q_proj"]["codec"]},
        "regions": a["regions"],
        "banks": {"count": target.banks, "words": target.bank_words, "word_bits": target.word_bits,
                  "used_words": a["bank_words_used"]},
        "sram": a["sram"],
        "adapters": [ad.name for ad in model.adapters],
        "program": {"instructions": len(a["program"]), "instruction_bytes": isa.INSTR_BYTES},
        "files": files,
    }


def emit(model: Model, out: str | Path, *, force: bool = False, progress: bool = True) -> Path:
    """Write the artifact directory for a fully compiled Model; returns its path."""
    out = Path(out)
    if out.exists() and not force:
        raise RomacError("output already exists", where=str(out), hint="pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise RomacError("output exists and is not a directory", where=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write_all(model, tmp, progress)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "old")
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_all(model: Model, root: Path, progress: bool) -> None:
    a = model.annotations
    target = a["target"]
    regions = a["regions"]
    constants = {r["constants_of"]: r for r in regions if "constants_of" in r}
    total = sum(math.prod(r["shape"]) for r in regions if "constants_of" not in r)
    banks = _BankWriter(root, target)
    try:
        with _progress(total, progress) as bar:
            for region in regions:
                if "constants_of" not in region:
                    _write_region(model, region, banks, constants.get(region["name"]), bar)
    finally:
        banks.close()
    for layout in a["sram"]["adapters"]:
        _write_sram_image(model, layout, root / sram_file(layout["name"]))
    program = a["program"]
    (root / PROGRAM_BIN).write_bytes(isa.encode(program))
    names = [r["name"] for r in regions]
    (root / PROGRAM_ASM).write_text(isa.disassemble(program, names, a["sram"]["slots"]), encoding="utf-8")
    (root / REPORT).write_text(dump_json(build_report(model)), encoding="utf-8")
    files = {rel: {"bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)} for rel in list_files(root)}
    (root / MANIFEST).write_text(dump_json(_manifest(model, files)), encoding="utf-8")
