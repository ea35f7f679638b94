"""The native affine quantizer (romac/codecs/affine_native.py, affine_tiles.py) against its definition, bit for bit:
``AffineCodec.quantize`` for codes, FP16 scales and zeros, ``pack_tiles`` for the tile bytes, and the emitter's
artifact directories with the native path on and off (``ROMAC_NATIVE=0``) and with one or two workers."""

from __future__ import annotations

import shutil

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from romac.codecs import AffineCodec
from romac.codecs import affine_native as kernel
from romac.codecs import affine_tiles
from romac.codecs.tiles import pack_tiles
from romac.errors import RomacError
from romac.frontend.safetensors_io import SafetensorsFile, write_safetensors
from romac.spec.formats import AffineFormat, affine_format
from romac.spec.layout import TileGrid, tile_sizes
from tests.test_reproducible import assert_identical

BITS = (2, 4, 8)
DTYPES = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "fp32": np.float32}


def _f32_to_f16_all(bits: np.ndarray) -> np.ndarray:
    return np.array([kernel.f32_to_f16_bits(np.uint32(b).view(np.float32)) for b in bits.tolist()], np.uint16)


def test_f16_to_f32_is_exact_for_every_finite_half():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    finite = np.isfinite(h.view(np.float16))
    got = np.array([kernel.f16_bits_to_f32(int(x)) for x in h[finite].tolist()], np.float32)
    assert np.array_equal(got.view(np.uint32), h[finite].view(np.float16).astype(np.float32).view(np.uint32))
    row = np.empty(int(finite.sum()), np.float32)  # the vectorised row loop gives the same
    assert kernel.widen_row(h[finite], kernel.KIND_F16, row)
    assert np.array_equal(row.view(np.uint32), got.view(np.uint32))


def test_f32_to_f16_rounds_as_numpy():
    """Every exponent and sign, random significands, and the significand ends where rounding decides (ties)."""
    rng = np.random.default_rng(1)
    sign_exp = np.arange(512, dtype=np.uint32) << 23
    sig = rng.integers(0, 1 << 23, (512, 64), dtype=np.uint32)
    ends = np.array([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFFFF], np.uint32)
    tie = (rng.integers(0, 1 << 10, (512, 1), dtype=np.uint32) << 13) | ends
    bits = np.concatenate([(sign_exp[:, None] | sig).ravel(), (sign_exp[:, None] | tie).ravel()])
    # subnormal halves: ties sit at other bit positions; sweep the whole range of small exponents densely
    small = np.arange(0x33000000, 0x38800000, 0x1FF, dtype=np.uint32)
    bits = np.concatenate([bits, small, small | 0x80000000, np.array([0x477FE000, 0x477FEFFF, 0x477FF000], np.uint32)])
    f = bits.view(np.float32)
    finite = np.isfinite(f)
    got, want = _f32_to_f16_all(bits[finite]), f[finite].astype(np.float16).view(np.uint16)
    assert np.array_equal(got, want)


def _cases(rng: np.random.Generator, bits: int, g: int) -> dict[str, np.ndarray]:
    """Matrices that test the corners of the definition (float32; cast to each input dtype by the caller)."""
    qmax = (1 << bits) - 1
    base = rng.standard_normal((9, 5 * g + g // 2 + 1)).astype(np.float32) * 0.02  # a partial last group
    s = np.float32(np.float16(0.01))
    ties = (rng.integers(-qmax, qmax, base.shape) + np.float32(0.5)) * s  # w / s lands on .5 (half to even)
    ties[:, ::g] = np.float32(-(qmax // 2 + 0.5)) * s  # and -lo / s, the zero point, too
    const = np.repeat(rng.standard_normal((9, 1)).astype(np.float32), base.shape[1], 1)
    zeros = np.zeros_like(base)
    zeros[::2] = -0.0
    signed = np.abs(base)
    signed[::2] *= -1  # groups that are all positive or all negative: lo or hi is 0
    tiny = base * np.float32(1e-6)  # scales in fp16's subnormal range, and some that round to 0 (2**-24 floor)
    tiny[:3] *= np.float32(1e-3)
    huge = base / np.abs(base).max() * np.float32(60000 * qmax / 2 if bits < 8 else 60000)  # near the fp16 range
    mixed = base.copy()
    mixed[:, 3] = 0
    mixed[1] = np.float32(2.0 ** -130)  # float32 subnormals
    return dict(random=base, ties=ties, constant=const, zeros=zeros, signed=signed, tiny=tiny, huge=huge,
                mixed=mixed, one_col=base[:, :1], short_group=base[:, : g // 2 + 1])


def _check_quantize(fmt: AffineFormat, x: np.ndarray) -> None:
    want = AffineCodec(fmt).quantize(np.asarray(x, np.float32))
    got = affine_tiles.quantize(fmt, x)
    assert got is not None
    assert np.array_equal(got.codes, want.codes)
    assert np.array_equal(got.params["scale"].view(np.uint16), want.params["scale"].view(np.uint16))
    assert np.array_equal(got.params["zero"], want.params["zero"])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [128, 64, 32, 7])
def test_codes_scales_zeros_equal_the_definition(bits, group, dtype):
    rng = np.random.default_rng(bits * 100 + group)
    fmt = affine_format(bits, group)
    for name, x in _cases(rng, bits, group).items():
        with np.errstate(over="ignore"):
            x = x.astype(DTYPES[dtype])
        if not np.isfinite(x.astype(np.float32)).all():  # 'huge' beyond bf16/fp16: not a case for that dtype
            continue
        _check_quantize(fmt, x)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), group=st.integers(1, 200), rows=st.integers(1, 6), cols=st.integers(1, 700),
       scale=st.sampled_from([1e-7, 1e-3, 0.05, 3.0, 1000.0]), seed=st.integers(0, 2**31))
def test_random_shapes_and_scales(bits, group, rows, cols, scale, seed):
    x = (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float16)
    _check_quantize(affine_format(bits, group), x)


def test_float64_rows_are_narrowed_as_the_loaders_do():
    x = np.random.default_rng(3).standard_normal((4, 300)) * 0.1
    _check_quantize(affine_format(4, 128), x)


GRIDS = [  # (rows, cols, tile rows, tile cols, group): full tiles only, right edge, bottom edge, both, tiny
    (32, 1024, 16, 512, 128), (40, 1000, 16, 512, 128), (7, 512, 16, 512, 128), (37, 1300, 16, 256, 64),
    (5, 300, 4, 128, 32), (1, 70, 16, 64, 64), (50, 70, 16, 64, 64), (3, 9, 2, 6, 3), (20, 100, 16, 512, 128),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("word_bytes", [8, 2])
def test_tile_bytes_equal_pack_tiles(bits, grid, word_bytes):
    rows, cols, tr, tc, g = grid
    fmt, tg = affine_format(bits, g), TileGrid(rows, cols, tr, tc)
    rng = np.random.default_rng(rows * cols + bits)
    for x in (rng.standard_normal((rows, cols)).astype(np.float16), _cases(rng, bits, g)["ties"][:rows, :cols]):
        if x.shape != (rows, cols):
            continue
        want = pack_tiles(fmt, AffineCodec(fmt).quantize(x.astype(np.float32)), tg, word_bytes)
        got = affine_tiles.quantize_pack_tiles(fmt, x, tg, word_bytes)
        assert got is not None and len(got) == len(want)
        for k, (a, b) in enumerate(zip(got, want)):
            assert np.array_equal(a, b), f"tile {k} of {len(want)} differs"
        # any placement of the tiles in the buffer (the emitter's bank order) holds the same tile bytes
        sizes = tile_sizes(fmt, tg, word_bytes)
        order = rng.permutation(len(sizes))
        at = np.empty(len(sizes), np.int64)
        at[order] = np.cumsum(sizes[order]) - sizes[order]
        buf = affine_tiles.quantize_pack_into(fmt, x, tg, word_bytes, at)
        assert all(np.array_equal(buf[a:a + s], t) for a, s, t in zip(at.tolist(), sizes.tolist(), want))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_weight_is_left_to_the_definition(dtype, bad):
    x = np.random.default_rng(0).standard_normal((20, 256)).astype(np.float32)
    x[17, 200] = bad
    x = x.astype(DTYPES[dtype])
    fmt = affine_format(4, 128)
    assert affine_tiles.quantize(fmt, x) is None
    assert affine_tiles.quantize_pack_tiles(fmt, x, TileGrid(20, 256, 16, 128), 8) is None


def test_a_scale_beyond_fp16_is_left_to_the_definition():
    x = np.zeros((2, 256), np.float32)
    x[1, 130] = 1e6  # (hi - lo) / 3 beyond 65504
    fmt = affine_format(2, 128)
    assert affine_tiles.quantize(fmt, x) is None
    with pytest.raises(RomacError, match="FP16 scale range"):
        AffineCodec(fmt).quantize(x)


def test_the_switch(monkeypatch):
    fmt = affine_format(4, 128)
    assert affine_tiles.applies(fmt, TileGrid(16, 512, 16, 512))
    assert not affine_tiles.applies(fmt, TileGrid(16, 96, 16, 96))  # a group would straddle two tiles
    monkeypatch.setenv(affine_tiles.NATIVE_ENV, "0")
    assert not affine_tiles.applies(fmt)


def _as_dtype(base, out, dtype):
    """A copy of a checkpoint directory with its float tensors stored as ``dtype``."""
    shutil.copytree(base, out)
    for p in out.glob("*.safetensors"):
        f = SafetensorsFile(p)
        write_safetensors(p, {k: f.load(k).astype(dtype) for k in f.keys()})
    return out


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("quant", ["int4", "int2", "int8"])
def test_compiles_are_identical_native_or_not_and_for_any_worker_count(tmp_path, monkeypatch, hf_checkpoint, quant,
                                                                       dtype):
    """The emitter (rows read as stored, tiles written by bank runs) gives the numpy path's directory."""
    from romac.backend import emit
    from romac.driver import compile_checkpoint
    from romac.passes import CompileOptions

    base, adapter = hf_checkpoint
    base = _as_dtype(base, tmp_path / "base", DTYPES[dtype])
    calls = []
    monkeypatch.setattr(affine_tiles, "quantize_pack_into",
                        lambda *a, _f=affine_tiles.quantize_pack_into, **k: calls.append(1) or _f(*a, **k))
    monkeypatch.setattr(emit, "CHUNK_BYTES", 64 * 1024)  # several chunks per matrix, many runs per bank
    outs = {}
    for name, native, workers in (("native", "1", 2), ("native-1", "1", 1), ("numpy", "0", 2)):
        monkeypatch.setenv(affine_tiles.NATIVE_ENV, native)
        monkeypatch.setattr(emit, "WORKERS", workers)
        outs[name] = tmp_path / name
        compile_checkpoint(str(base), outs[name], [f"chat={adapter}"], options=CompileOptions(quant=quant))
        assert bool(calls) == (native == "1"), "the native path ran (or not) as switched"
        calls.clear()
    assert_identical(outs["native"], outs["numpy"])
    assert_identical(outs["native"], outs["native-1"])
