"""The emitter: stream the weights through the compiled plan and write the artifact directory.

Requires a Model that went through the whole pipeline (``romac.passes.run_pipeline``). Weights are read,
quantized, packed into tiles and written into the bank images one row-chunk of one matrix at a time, so peak
memory stays near one chunk, not the model. The directory is written under a temporary sibling name and
renamed into place only when complete: it appears whole or not at all.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from romac import __version__
from romac.artifacts import dump_json, list_files, seal_manifest, sha256_file
from romac.backend import atomic
from romac.backend.banks import BankWriter, Runs, make_runs, run_order, tile_runs
from romac.backend.report import build_report
from romac.backend.romformats import parse_formats, write_bank_formats
from romac.backend.sram_image import check_finite, sram_image
from romac.codecs import affine_tiles, codec_for
from romac.codecs.tiles import pack_constants, pack_tiles
from romac.errors import RomacError
from romac.ir import EMBEDDING_TENSORS, Model, stores_codes_of
from romac.spec.asm import disassemble
from romac.spec.isa import encode
from romac.spec.layout import TileGrid, tile_index, tile_locations, tile_sizes, tile_words
from romac.spec.manifest import (MANIFEST, PROGRAM_ASM, PROGRAM_BIN, RAW_FORMAT, REPORT, SRAM_CORRECTION, TOKENIZER,
                                 Banks, FileEntry, Manifest, sram_file)
from romac.spec.plan import VECTOR, Region
from romac.targets import Target

CHUNK_BYTES = 16 << 20  # float32 input per quantization job (16-bit on the native path): bounds peak memory
WORKERS = min(4, os.cpu_count() or 1)  # quantization jobs in flight (numpy releases the GIL)


def _progress(total: int, enabled: bool):
    return tqdm(total=total, unit="param", unit_scale=True, desc="compiling", disable=not enabled or not sys.stderr.isatty(), leave=False)


Writes = list  # [Runs], what one job hands to the writer
_scratch = threading.local()  # each worker's read buffer: its rows are quantized before it reads again


def _region_jobs(model: Model, target: Target, region: Region, constants_region: Region | None):
    """Independent jobs for one region: each reads, checks, quantizes and packs a piece, returning its writes.

    Jobs only compute (numpy releases the GIL, so two run at once on two cores); the caller does the I/O.
    """
    fmt = region.format
    codec = codec_for(fmt)
    grid = region.grid
    words = tile_words(fmt, grid, target.word_bytes)
    bank, offset = tile_locations(words, region.start_bank, region.extents, target.banks, target.word_bytes)
    handle = model.weights[region.name]
    source = getattr(handle, "source", "")
    passthrough = stores_codes_of(handle, fmt.spec())  # a pre-quantized weight in its own format: codes untouched
    # the affine formats quantize and pack natively from the rows as stored (fp16 is half the bytes of float32)
    native = not passthrough and affine_tiles.applies(fmt, grid)
    stored = getattr(handle, "load_rows_stored", None)

    def load_stored(r0: int, r1: int) -> np.ndarray:
        if stored is None:
            return handle.load_rows(r0, r1)
        need = 2 * (r1 - r0) * grid.cols + (16 << 10)  # 16-bit rows and page alignment; wider ones read elsewhere
        buf = getattr(_scratch, "buf", None)
        if buf is None or buf.size < need:
            buf = _scratch.buf = np.empty(need, np.uint8)
        return stored(r0, r1, buf)

    def quantize(w: np.ndarray):
        try:
            return codec.quantize(w)
        except RomacError as e:  # a format limit (e.g. the FP16 scale range): say which tensor hit it
            raise RomacError(f"tensor {region.name!r}: {e}", where=source or None) from None

    def located(grid_part: TileGrid, row0: int) -> tuple[np.ndarray, np.ndarray]:
        """Bank and byte offset of each tile of a row chunk (in the chunk's storage order)."""
        first = (row0 // grid.tile_rows) * grid.full_cols  # its full tiles are a contiguous run of the region's
        index = np.arange(first, first + grid_part.n_full)
        edges = [tile_index(grid, row0 + r0, c0) for r0, c0, _, _ in grid_part.edge_tiles()]
        index = np.concatenate([index, np.array(edges, np.int64)]) if edges else index
        return bank[index], offset[index]

    def placed(q, grid_part: TileGrid, row0: int) -> Runs:
        return tile_runs(pack_tiles(fmt, q, grid_part, target.word_bytes), *located(grid_part, row0))

    def native_runs(stored: np.ndarray, grid_part: TileGrid, row0: int) -> Runs | None:
        """The chunk's tiles packed natively straight into (bank, offset) order: one slice per bank run."""
        b, o = located(grid_part, row0)
        sizes = tile_sizes(fmt, grid_part, target.word_bytes)
        order, at = run_order(b, o, sizes)
        data = affine_tiles.quantize_pack_into(fmt, stored, grid_part, target.word_bytes, at)
        return None if data is None else make_runs(data, b, o, sizes, order)

    def constants(q) -> tuple:
        values = pack_constants(q).reshape(1, -1)
        cfmt = constants_region.format
        tiles = pack_tiles(cfmt, codec_for(cfmt).quantize(values), TileGrid.for_vector(values.shape[1]), target.word_bytes)
        e = constants_region.extents[0]
        return tile_runs(tiles, np.array([e.bank]), np.array([e.word_offset * target.word_bytes]))

    def whole() -> tuple[Writes, int]:
        if passthrough:
            q = handle.load_quantized()
        else:
            w = np.asarray(handle.load(), np.float32).reshape(grid.rows, grid.cols)
            check_finite(w, region.name, source, 0)
            q = quantize(w)
        writes = [placed(q, grid, 0)]
        if constants_region is not None:
            writes.append(constants(q))
        return writes, grid.rows * grid.cols

    def chunk(r0: int, r1: int):
        def job() -> tuple[Writes, int]:
            part = TileGrid(r1 - r0, grid.cols, grid.tile_rows, grid.tile_cols)
            if native:
                runs = native_runs(load_stored(r0, r1), part, r0)
                if runs is not None:
                    return [runs], part.rows * part.cols
                # a weight that is not finite or a scale beyond FP16: the definition below says which and where
            w = np.asarray(handle.load_rows(r0, r1), np.float32)
            check_finite(w, region.name, source, r0)
            return [placed(quantize(w), part, r0)], w.size

        return job

    # rows are independent unless the format has per-tensor statistics (bitsandbytes' double quantization)
    if region.kind == VECTOR or constants_region is not None or passthrough:
        yield whole
        return
    # CHUNK_BYTES of float32; the native path never widens its rows, so it takes as many rows as 16-bit values
    rows_per_chunk = max(1, CHUNK_BYTES // ((2 if native else 4) * grid.cols) // grid.tile_rows) * grid.tile_rows
    for r0 in range(0, grid.rows, rows_per_chunk):
        yield chunk(r0, min(grid.rows, r0 + rows_per_chunk))


def _manifest(model: Model, target: Target, rom_formats: tuple[str, ...], files: dict) -> Manifest:
    plan, cfg = model.plan, model.config
    source = dict(model.source)
    if "path" in source:  # no absolute paths: the same inputs elsewhere give the same bytes
        source["path"] = Path(str(source["path"])).name
    tensors = plan.tensors
    quantization = {name: tensors[name].format.spec() for name in EMBEDDING_TENSORS if name in tensors}
    quantization["projections"] = tensors["layers.0.self_attn.q_proj"].format.spec()
    return Manifest(
        romac_version=__version__,
        target=target.to_dict(),
        model={**{k: v for k, v in cfg.__dict__.items() if k != "rope_scaling"},
               "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None},
        source=source,
        quantization=quantization,
        regions=plan.regions,
        banks=Banks(target.banks, target.bank_words, target.word_bits, plan.bank_words_used,
                    (RAW_FORMAT, *rom_formats)),
        sram=plan.sram,
        adapters=tuple(ad.name for ad in model.adapters),
        instructions=len(plan.program),
        files=files,
    )


def emit(model: Model, target: Target, out: str | Path, *, rom_formats: tuple[str, ...] = (), force: bool = False,
         progress: bool = True) -> Path:
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
            _write_all(model, target, parse_formats(rom_formats), tmp, progress)
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


def _write_all(model: Model, target: Target, rom_formats: tuple[str, ...], root: Path, progress: bool) -> None:
    plan = model.plan
    regions = plan.regions
    constants = {r.constants_of: r for r in regions if r.constants_of is not None}
    total = sum(math.prod(r.shape) for r in regions if r.constants_of is None)
    jobs = (
        job
        for region in regions
        if region.constants_of is None
        for job in _region_jobs(model, target, region, constants.get(region.name))
    )
    banks = BankWriter(root, target)
    try:
        with _progress(total, progress) as bar, ThreadPoolExecutor(WORKERS) as pool:
            pending: deque = deque()

            def drain_one() -> None:
                writes, n = pending.popleft().result()
                for runs in writes:
                    banks.write_runs(runs)
                bar.update(n)

            for job in jobs:
                pending.append(pool.submit(job))
                if len(pending) > WORKERS:  # bounded: at most WORKERS + 1 chunks in memory
                    drain_one()
            while pending:
                drain_one()
        banks.flush()
        digests = banks.digests()
    finally:
        banks.close()
    # RTL images beside each raw bank, inside the temporary directory: they are in the manifest like every file
    write_bank_formats(root, rom_formats, target.banks, target.word_bits, target.bank_words)
    images = [(sram_file(layout.name), model.adapter(layout.name), layout) for layout in plan.sram.adapters]
    if plan.sram.correction is not None:
        images.append((SRAM_CORRECTION, model.correction, plan.sram.correction))
    for rel, adapter, layout in images:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sram_image(adapter, layout, plan.sram))
    (root / PROGRAM_BIN).write_bytes(encode(plan.program))
    names = [r.name for r in regions]
    (root / PROGRAM_ASM).write_text(disassemble(plan.program, names, plan.sram.slots), encoding="utf-8")
    (root / REPORT).write_text(dump_json(build_report(model, target)), encoding="utf-8")
    if model.tokenizer is not None:  # the checkpoint's tokenizer, for `romac run --prompt`
        (root / TOKENIZER).write_text(model.tokenizer, encoding="utf-8")
    rest = [rel for rel in list_files(root) if rel not in digests]  # hashed from the files, on all cores
    with ThreadPoolExecutor(WORKERS) as pool:
        digests.update(zip(rest, pool.map(lambda rel: sha256_file(root / rel), rest)))
    files = {rel: FileEntry((root / rel).stat().st_size, digests[rel]) for rel in list_files(root)}
    (root / MANIFEST).write_text(seal_manifest(_manifest(model, target, rom_formats, files).to_json()), encoding="utf-8")
