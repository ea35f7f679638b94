"""The independent B-ROM decoder (romac.emulator.trace) against the packer and the fast path, on every format and
tile edge, on hand-computed known-answer tiles, and against a packer bug that the fast path cannot see."""

from __future__ import annotations

import re
import numpy as np
import pytest

from romac.cli import main
from romac.codecs import QuantTensor, codec_for
from romac.codecs import bits as bits_module
from romac.codecs import tiles as tiles_module
from romac.codecs.tiles import pack_tiles
from romac.driver import compile_model
from romac.emulator import Machine
from romac.emulator.trace import cross_check, read_region, tile_reads
from romac.passes import CompileOptions
from romac.spec.formats import Int2, Int4, NF4, FP16
from romac.spec.layout import TileGrid
from romac.spec.plan import Extent, Region
from romac.targets import load_target
from tests.conftest import small_config, small_model

f32 = np.float32


def _one_tile_region(fmt, rows: int, cols: int, word_bytes: int) -> Region:
    nbytes = pack_tiles(fmt, codec_for(fmt).quantize(np.zeros((rows, cols), f32)), TileGrid(rows, cols, rows, cols),
                        word_bytes)[0].size
    return Region("w", "matrix", fmt, (rows, cols), (rows, cols), 1, 0, (Extent(0, 0, nbytes // word_bytes),))


def _bank_of(tile: np.ndarray, words: int = 4, word_bytes: int = 8) -> np.ndarray:
    bank = np.zeros(words * word_bytes, np.uint8)
    bank[: tile.size] = tile
    return bank


# --------------------------------------------------------------------------- known-answer tiles, bytes by hand
def test_int4_known_answer_tile():
    """codes 1..8 in one group of 8, scale 0.5, zero 3: bytes 12 34 56 78 | 00 38 | 30 | pad (docs/artifacts.md)."""
    fmt = Int4(group_size=8)
    q = QuantTensor("int4", (1, 8), np.arange(1, 9, dtype=np.uint8).reshape(1, 8),
                    {"scale": np.array([[0.5]], np.float16), "zero": np.array([[3]], np.uint8)})
    tile = pack_tiles(fmt, q, TileGrid(1, 8, 1, 8), 8)[0]
    assert bytes(tile) == bytes([0x12, 0x34, 0x56, 0x78, 0x00, 0x38, 0x30, 0x00])
    bank = _bank_of(tile)
    assert int.from_bytes(bytes(bank[:8]), "little") == 0x0030_3800_7856_3412  # the word as RTL reads it
    values, done = read_region([bank], _one_tile_region(fmt, 1, 8, 8), 64)
    assert done.all() and values.tolist() == [[-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5]]


def test_int2_and_fp16_known_answer_tiles():
    fmt = Int2(group_size=4)
    q = QuantTensor("int2", (2, 4), np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8),
                    {"scale": np.array([[1.0], [2.0]], np.float16), "zero": np.array([[1], [2]], np.uint8)})
    tile = pack_tiles(fmt, q, TileGrid(2, 4, 2, 4), 8)[0]
    # codes row by row (0b00_01_10_11, 0b11_10_01_00), scales 1.0 and 2.0 (fp16 3c00, 4000), zeros 1 and 2 in the
    # top two bits of one byte each, padded to the word
    assert bytes(tile) == bytes([0x1B, 0xE4, 0x00, 0x3C, 0x00, 0x40, 0x40, 0x80])
    values, _ = read_region([_bank_of(tile)], _one_tile_region(fmt, 2, 4, 8), 64)
    assert values.tolist() == [[-1.0, 0.0, 1.0, 2.0], [2.0, 0.0, -2.0, -4.0]]
    raw = QuantTensor("fp16", (1, 2), np.array([[0x3C00, 0xC000]], np.uint16), {})
    tile = pack_tiles(FP16(), raw, TileGrid(1, 2, 1, 2), 8)[0]
    assert bytes(tile) == bytes([0x00, 0x3C, 0x00, 0xC0, 0, 0, 0, 0])
    values, _ = read_region([_bank_of(tile)], _one_tile_region(FP16(), 1, 2, 8), 64)
    assert values.tolist() == [[1.0, -2.0]]


def test_nf4_known_answer_tile():
    """One block of 64: code c at element c % 16, absmax 2.0 as float32 little-endian after the 32 code bytes."""
    fmt = NF4(blocksize=64, double_quant=False)
    codes = (np.arange(64) % 16).astype(np.uint8).reshape(1, 64)
    q = QuantTensor("nf4", (1, 64), codes, {"absmax": np.array([2.0], f32)})
    tile = pack_tiles(fmt, q, TileGrid(1, 64, 1, 64), 8)[0]
    assert bytes(tile[:2]) == bytes([0x01, 0x23]) and bytes(tile[32:36]) == bytes([0, 0, 0, 0x40])
    values, _ = read_region([_bank_of(tile, 8)], _one_tile_region(fmt, 1, 64, 8), 64)
    assert values[0, :16].tolist() == (fmt.values * f32(2)).tolist()


# --------------------------------------------------------------------------- every format, every tile edge
FORMATS = [("int4", "int8", True), ("int2", "int4", True), ("int8", "fp16", True), ("nf4", "fp32", True),
           ("nf4", "int8", False), ("fp4", "int8", True), ("fp4", "fp16", False)]


@pytest.mark.parametrize("quant,embedding,double_quant", FORMATS)
def test_independent_decoder_equals_fast_path(tmp_path, quant, embedding, double_quant):
    # rows and columns that are not multiples of the tile shape (tiny: 64 x 128), vectors of odd lengths
    cfg = small_config(hidden_size=192, intermediate_size=320, vocab_size=150, head_dim=48)
    out = tmp_path / "out"
    compile_model(small_model(cfg), out, None, CompileOptions(quant=quant, quant_embedding=embedding,
                                                               double_quant=None if double_quant else False))
    m = Machine(out)
    read, problems = cross_check(m.rom.banks, m.manifest, m.rom.value, range(len(m.manifest.regions)))
    assert not problems
    assert read == sum(r.n_tiles for r in m.manifest.regions)


def test_tile_reads_match_the_placement(tmp_path):
    compile_model(small_model(small_config()), tmp_path / "out", None, CompileOptions(quant="int4"))
    m = Machine(tmp_path / "out")
    for rid, region in enumerate(m.manifest.regions):
        bank, offset, sizes = m.rom.tile_places(region)
        reads = tile_reads(region, m.manifest.banks.count, m.manifest.banks.word_bits)
        assert [(t.bank, t.word * 8, t.words * 8) for t in reads] == list(zip(bank.tolist(), offset.tolist(), sizes.tolist()))


def test_a_symmetric_packing_bug_is_caught(tmp_path, monkeypatch):
    """Nibbles swapped in both the packer and the fast unpacker: emulator and golden model would still agree, the
    independent decoder does not."""
    real_pack, real_unpack = bits_module.pack_codes, bits_module.unpack_codes

    def swap(b: np.ndarray) -> np.ndarray:
        return ((b & 0x0F) << 4) | (b >> 4)

    def pack(codes, bits, pad=0):
        out = real_pack(codes, bits, pad)
        return swap(out) if bits == 4 else out

    def unpack(packed, bits, n):
        return real_unpack(swap(np.asarray(packed, np.uint8)) if bits == 4 else packed, bits, n)

    monkeypatch.setattr(tiles_module, "pack_codes", pack)
    monkeypatch.setattr(tiles_module, "unpack_codes", unpack)
    compile_model(small_model(small_config()), tmp_path / "out", None, CompileOptions(quant="int4"))
    m = Machine(tmp_path / "out")
    _, problems = cross_check(m.rom.banks, m.manifest, m.rom.value, range(len(m.manifest.regions)))
    assert problems and "independent decoder" in problems[0]


def test_run_trace_lists_reads_and_checks(tmp_path, capsys):
    compile_model(small_model(small_config()), tmp_path / "out", load_target("tiny"), CompileOptions())
    main(["run", str(tmp_path / "out"), "--prompt-ids", "1,2", "--max-new-tokens", "1", "--trace"])
    err = capsys.readouterr().err
    assert "matvec   q, h" in err
    assert re.search(r"reads layers\.0\.self_attn\.q_proj: banks \d+\.\.\d+ \(2\), [\d,]+ words", err)
    assert "tiles read by the independent decoder: equal to the emulator's values" in err
