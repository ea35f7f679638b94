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
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from romac import __version__
from romac.artifacts import (
    FORMAT_VERSION,
    MANIFEST,
    PROGRAM_ASM,
    PROGRAM_BIN,
    REPORT,
    TOKENIZER,
    bank_file,
    dump_json,
    list_files,
    seal_manifest,
    sha256_file,
    sram_file,
)
from romac.backend import atomic, isa
from romac.backend.report import build_report
from romac.backend.romformats import parse_formats, write_bank_formats
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

CHUNK_BYTES = 16 << 20  # float32 input per quantization job: bounds peak memory on big matrices
WORKERS = min(4, os.cpu_count() or 1)  # quantization jobs in flight (numpy releases the GIL)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="param", unit_scale=True, desc="compiling", disable=not enabled or not sys.stderr.isatty(), leave=False)


def _check_finite(w: np.ndarray, name: str, source: str, row0: int) -> None:
    """Refuse NaN/Inf in a chunk the emitter already holds (no extra pass over the weights), naming the row."""
    if not np.isfinite(w).all():
        at = tuple(int(i) for i in np.argwhere(~np.isfinite(w))[0])
        where_in = f"row {row0 + at[0]}, column {at[1]}" if len(at) == 2 else f"element {row0 + at[0]}" if at else ""
        raise RomacError(
            f"tensor {name!r} holds {w[at]} in {where_in}",
            where=source or name,
            hint="the checkpoint is corrupted or diverged; NaN/Inf weights cannot be quantized",
        )


class _BankWriter:
    """Open bank images, written in place with pwrite (sparse until filled).

    Writes that continue where the bank's previous one ended are gathered (up to ``BUFFER`` bytes a bank) into
    one pwrite: round-robin placement hands every bank a few KB per row chunk, and 208 banks × 2,000 chunks
    of small pwrites cost more than the packing on a large model. Call :meth:`flush` before reading back.
    """

    BUFFER = 1 << 18

    def __init__(self, root: Path, target) -> None:
        self.pending: dict[int, list] = {}  # bank -> [start offset, end offset, [bytes, ...]]
        self.fds = []
        for b in range(target.banks):
            path = root / bank_file(b, target.banks)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            os.ftruncate(fd, target.bank_bytes)
            self.fds.append(fd)

    def write(self, bank: int, offset: int, data: np.ndarray) -> None:
        run = self.pending.get(bank)
        if run is not None and run[1] != offset:
            self._flush(bank)
            run = None
        if run is None:
            run = self.pending[bank] = [offset, offset, []]
        run[2].append(data.tobytes())
        run[1] += data.size
        if run[1] - run[0] >= self.BUFFER:
            self._flush(bank)

    def _flush(self, bank: int) -> None:
        start, _, parts = self.pending.pop(bank)
        os.pwrite(self.fds[bank], b"".join(parts), start)

    def flush(self) -> None:
        for bank in sorted(self.pending):
            self._flush(bank)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _write_tiles(banks: _BankWriter, tiles: list[np.ndarray], bank: np.ndarray, offset: np.ndarray) -> None:
    """Write tiles at their places, merging the ones that follow each other in a bank into one write."""
    order = np.lexsort((offset, bank))
    run: list[np.ndarray] = []
    run_bank = run_start = run_end = -1
    for k in order.tolist():
        b, o, data = int(bank[k]), int(offset[k]), tiles[k]
        if b != run_bank or o != run_end:
            if run:
                banks.write(run_bank, run_start, np.concatenate(run))
            run, run_bank, run_start = [], b, o
        run.append(data)
        run_end = o + data.size
    if run:
        banks.write(run_bank, run_start, np.concatenate(run))


Writes = list  # [(tiles, bank per tile, byte offset per tile)], what one job hands to the writer


def _region_jobs(model: Model, region: dict, constants_region: dict | None):
    """Independent jobs for one region: each reads, checks, quantizes and packs a piece, returning its writes.

    Jobs only compute (numpy releases the GIL, so two run at once on two cores); the caller does the I/O.
    """
    target = model.annotations["target"]
    info = model.tensors[region["name"]]
    codec = get_codec(**region["codec"])
    grid: TileGrid = info["grid"]
    words = tile_words(info, target.word_bytes)
    bank, offset = tile_locations(words, region["start_bank"], region["extents"], target.banks, target.word_bytes)
    handle = model.weights[region["name"]]
    source = getattr(handle, "source", "")
    # a pre-quantized (bitsandbytes) weight compiled to its own format: its codes pass through untouched
    passthrough = hasattr(handle, "load_quantized") and getattr(handle, "codec_spec", None) == region["codec"]

    def quantize(w: np.ndarray):
        try:
            return codec.quantize(w)
        except RomacError as e:  # a format limit (e.g. the FP16 scale range): say which tensor hit it
            raise RomacError(f"tensor {region['name']!r}: {e}", where=source or None) from None

    def placed(q, grid_part: TileGrid, row0: int) -> tuple:
        tiles = pack_tiles(codec, q, grid_part, target.word_bytes)
        # global storage index of each tile of this row chunk (its full tiles are a contiguous run)
        first = (row0 // grid.tile_rows) * grid.full_cols
        index = list(range(first, first + grid_part.n_full))
        index += [tile_index(grid, row0 + r0, c0) for r0, c0, _, _ in grid_part.edge_tiles()]
        return tiles, bank[index], offset[index]

    def constants(q) -> tuple:
        values = pack_constants(q).reshape(1, -1)
        fp32 = get_codec(**constants_region["codec"])
        tiles = pack_tiles(fp32, fp32.quantize(values), TileGrid.for_vector(values.shape[1]), target.word_bytes)
        b, off, _ = constants_region["extents"][0]
        return tiles, np.array([b]), np.array([off * target.word_bytes])

    def whole() -> tuple[Writes, int]:
        if passthrough:
            q = handle.load_quantized()
        else:
            w = np.asarray(handle.load(), np.float32).reshape(grid.rows, grid.cols)
            _check_finite(w, region["name"], source, 0)
            q = quantize(w)
        writes = [placed(q, grid, 0)]
        if constants_region is not None:
            writes.append(constants(q))
        return writes, grid.rows * grid.cols

    def chunk(r0: int, r1: int):
        def job() -> tuple[Writes, int]:
            w = np.asarray(handle.load_rows(r0, r1), np.float32)
            _check_finite(w, region["name"], source, r0)
            part = TileGrid(r1 - r0, grid.cols, grid.tile_rows, grid.tile_cols)
            return [placed(quantize(w), part, r0)], w.size

        return job

    # rows are independent unless the format has per-tensor statistics (bitsandbytes' double quantization)
    if region["kind"] == "vector" or constants_region is not None or passthrough:
        yield whole
        return
    rows_per_chunk = max(1, CHUNK_BYTES // (4 * grid.cols) // grid.tile_rows) * grid.tile_rows
    for r0 in range(0, grid.rows, rows_per_chunk):
        yield chunk(r0, min(grid.rows, r0 + rows_per_chunk))


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
    for slot, a_off, b_off, rank, in_f, out_f in layout["entries"]:
        tensor = sram["slots"][slot]
        a_h, b_h = adapter.weights[tensor]
        a = np.asarray(a_h.load(), np.float32)
        b = np.asarray(b_h.load(), np.float32)
        for arr, h in ((a, a_h), (b, b_h)):
            _check_finite(arr, h.name, getattr(h, "source", "") or adapter.source, 0)
        a_bytes, a_scale = _lora_block(a, sram["lora_format"])
        b_bytes, b_scale = _lora_block(b, sram["lora_format"])
        image[a_off : a_off + len(a_bytes)] = a_bytes
        image[b_off : b_off + len(b_bytes)] = b_bytes
        struct.pack_into(SLOT_ENTRY_FORMAT, image, slot * entry, a_scale, b_scale, adapter.scaling, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(image))


def _rom_formats(model: Model) -> tuple[str, ...]:
    """The extra bank image formats the compile options ask for (validated; ``raw`` is always written)."""
    return parse_formats(getattr(model.annotations.get("options"), "rom_formats", ()) or ())


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
                  "used_words": a["bank_words_used"], "formats": ["raw", *_rom_formats(model)]},
        "sram": a["sram"],
        "adapters": [ad.name for ad in model.adapters],
        "program": {"instructions": len(a["program"]), "instruction_bytes": isa.INSTR_BYTES},
        "files": files,
    }


def emit(model: Model, out: str | Path, *, force: bool = False, progress: bool = True) -> Path:
    """Write the artifact directory for a fully compiled Model; returns its path.

    Written into a temporary sibling and moved into place whole (see :mod:`romac.backend.atomic`).
    """
    shown = str(out)
    path = Path(os.path.abspath(out))  # '.' or 'a/..' resolved, so that the temporary is a true sibling
    atomic.check_destination(path, shown, force)
    atomic.clean_stale_temporaries(path)
    created: list[Path] = []  # the temporary, recorded the moment it exists (even if Ctrl-C comes right then)
    try:
        tmp = atomic.make_temporary(path, shown, created)
        try:
            _write_all(model, tmp, progress)
        except OSError as e:  # the disk, not romac: a full or read-only file system, a vanished input
            name = str(e.filename or "")
            if name.startswith(str(tmp)):
                raise RomacError(f"cannot write {Path(name).relative_to(tmp).as_posix()} ({e.strerror})", where=shown) from None
            raise RomacError(f"cannot read ({e.strerror})", where=name or shown) from None
        atomic.install(tmp, path, shown, force)
    except BaseException:
        for t in created:
            atomic.remove_tree(t)
        raise
    return Path(out)


def _write_all(model: Model, root: Path, progress: bool) -> None:
    a = model.annotations
    target = a["target"]
    regions = a["regions"]
    rom_formats = _rom_formats(model)  # checked before any work
    constants = {r["constants_of"]: r for r in regions if "constants_of" in r}
    total = sum(math.prod(r["shape"]) for r in regions if "constants_of" not in r)
    jobs = (
        job
        for region in regions
        if "constants_of" not in region
        for job in _region_jobs(model, region, constants.get(region["name"]))
    )
    banks = _BankWriter(root, target)
    try:
        with _progress(total, progress) as bar, ThreadPoolExecutor(WORKERS) as pool:
            pending: deque = deque()

            def drain_one() -> None:
                writes, n = pending.popleft().result()
                for tiles, bank, offset in writes:
                    _write_tiles(banks, tiles, bank, offset)
                bar.update(n)

            for job in jobs:
                pending.append(pool.submit(job))
                if len(pending) > WORKERS:  # bounded: at most WORKERS + 1 chunks in memory
                    drain_one()
            while pending:
                drain_one()
        banks.flush()
    finally:
        banks.close()
    # RTL images beside each raw bank, inside the temporary directory: they are in the manifest like every file
    write_bank_formats(root, rom_formats, target.banks, target.word_bits, target.bank_words)
    for layout in a["sram"]["adapters"]:
        _write_sram_image(model, layout, root / sram_file(layout["name"]))
    program = a["program"]
    (root / PROGRAM_BIN).write_bytes(isa.encode(program))
    names = [r["name"] for r in regions]
    (root / PROGRAM_ASM).write_text(isa.disassemble(program, names, a["sram"]["slots"]), encoding="utf-8")
    (root / REPORT).write_text(dump_json(build_report(model)), encoding="utf-8")
    if model.tokenizer is not None:  # the checkpoint's tokenizer, for `romac run --prompt`
        (root / TOKENIZER).write_text(model.tokenizer, encoding="utf-8")
    files = {rel: {"bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)} for rel in list_files(root)}
    (root / MANIFEST).write_text(seal_manifest(_manifest(model, files)), encoding="utf-8")
