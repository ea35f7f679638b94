"""Property tests (issue 5, item 6) for what tests/test_codecs.py, test_isa.py, test_layout.py and
test_emulator.py do not already cover:

- NF4/FP4 over random shapes (any length, partial last block) and every blocksize, with all-zero blocks,
  subnormal blocks and blocks at ±float32 max planted: dequantize(quantize(x)) within the format's bound, and
  exact for values on the grid; double quantization never yields a non-finite absmax silently.
- affine int2/4/8 with planted zero, subnormal and ±max (the largest range an FP16 scale can express) groups;
- FP8 E4M3 and FP16: encode/decode exact on every representable value (subnormals, ±max, ±0 included);
- the ISA in the other direction: any 16 bytes that decode re-encode to the same bytes;
- the emulator equal to the golden reference on hypothesis-drawn model shapes, formats and adapters.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from romac.codecs import Bnb4bitCodec, get_codec
from romac.codecs import elements as C
from romac.spec.formats import FP4_VALUES, NF4_VALUES
from romac.errors import RomacError

f32 = np.float32
FLT_MAX = float(np.finfo(f32).max)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# one kind of content per block / group
KINDS = ["normal", "zero", "subnormal", "max", "lone", "tiny-normal"]


def fill(rng: np.random.Generator, n: int, kind: str, magnitude: float, limit: float) -> np.ndarray:
    """n float32 values of one kind; 'max' reaches ±limit exactly."""
    if kind == "zero":
        return np.zeros(n, f32)
    if kind == "subnormal":
        return (rng.uniform(-1, 1, n) * 1e-39).astype(f32)  # below float32's smallest normal, 1.18e-38
    if kind == "max":
        v = (rng.uniform(-1, 1, n) * limit).astype(f32)
        v[rng.integers(0, n)] = limit if rng.random() < 0.5 else -limit
        return v
    if kind == "lone":
        v = np.zeros(n, f32)
        v[rng.integers(0, n)] = f32(rng.standard_normal() * magnitude)
        return v
    if kind == "tiny-normal":
        return (rng.standard_normal(n) * 1e-30).astype(f32)
    return (rng.standard_normal(n) * magnitude).astype(f32)


def planted(draw, n: int, block: int, limit: float) -> np.ndarray:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 300.0]))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=6))
    out = np.empty(n, f32)
    for i, b0 in enumerate(range(0, n, block)):
        out[b0 : b0 + block] = fill(rng, min(block, n - b0), kinds[i % len(kinds)], magnitude, limit)
    return out


# --------------------------------------------------------------------------------------------------- NF4 / FP4
def _half_gap(values: np.ndarray) -> float:
    v = np.unique(values.astype(np.float64))
    return float(np.max(np.diff(v)) / 2)


@FAST
@given(fmt=st.sampled_from(["nf4", "fp4"]), blocksize=st.sampled_from([32, 64, 128, 256, 512, 1024, 2048, 4096]),
       double_quant=st.booleans(), data=st.data())
def test_bnb4_round_trip_within_bound(fmt, blocksize, double_quant, data):
    rows = data.draw(st.integers(1, 4))
    cols = data.draw(st.integers(1, 700))
    n = rows * cols
    # ±max blocks: FLT_MAX without double quantization; with it, the mean of the absmax values must stay finite
    # (it is a float32 sum: 35 blocks of 1e37 overflow it, which the codec refuses, as
    # test_bnb4_double_quant_overflow_is_an_error_not_nan checks)
    limit = FLT_MAX if not double_quant else min(1e37, FLT_MAX / (2 * -(-n // blocksize)))
    x = planted(data.draw, n, blocksize, limit).reshape(rows, cols)
    codec = get_codec(fmt, blocksize=blocksize, double_quant=double_quant)
    q = codec.quantize(x)
    assert q.codes.shape == x.shape and q.codes.dtype == np.uint8 and int(q.codes.max()) <= 15
    deq = codec.dequantize(q)
    assert deq.dtype == np.float32 and deq.shape == x.shape and np.isfinite(deq).all()
    flat, dflat = x.reshape(-1).astype(np.float64), deq.reshape(-1).astype(np.float64)
    nb = -(-n // blocksize)
    blocks = np.arange(n) // blocksize
    a_true = np.array([np.abs(flat[blocks == b]).max() for b in range(nb)])
    a_stored = Bnb4bitCodec.absmax_float32(q).astype(np.float64)
    assert a_stored.shape == (nb,) and np.isfinite(a_stored).all()
    if not double_quant:
        tail = n % blocksize != 0  # bnb stores the partial last block's absmax clamped to 1e-38
        expect = a_true.copy()
        if tail:
            expect[-1] = max(expect[-1], np.float64(f32(1e-38)))
        assert np.array_equal(a_stored, expect.astype(f32).astype(np.float64))
    err = np.abs(flat - dflat)
    # With double quantization a small block beside a huge one can get a stored absmax far off, even negative
    # (absmax - mean quantized with 8-bit relative precision): bitsandbytes does the same, so the bound carries
    # |A - A'| rather than assuming A' is close to A.
    A, Ad = a_true[blocks], a_stored[blocks]
    normal = A >= 1e-38  # scaled by 1/absmax; below that bnb scales by 1/1e-38 and the codes say little
    bound = np.where(normal, _half_gap(codec.format.values) * A * (1 + 2.0**-20), 2 * A) + np.abs(A - Ad) + np.abs(Ad) * 2.0**-22 + 1e-45
    assert (err <= bound).all(), f"worst excess {np.max(err - bound)}"
    zero_blocks = a_true == 0
    assert not dflat[zero_blocks[blocks]].any(), "an all-zero block dequantizes to zeros"


@FAST
@given(fmt=st.sampled_from(["nf4", "fp4"]), blocksize=st.sampled_from([32, 64, 256]), data=st.data())
def test_bnb4_exact_on_the_grid(fmt, blocksize, data):
    """Values table[code] * 2^k, each block holding a ±1 code: quantize gives those codes (values), exactly."""
    n = data.draw(st.integers(1, 600))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    values = NF4_VALUES if fmt == "nf4" else FP4_VALUES
    codes = rng.integers(0, 16, n).astype(np.uint8)
    ones = np.flatnonzero(np.abs(values) == 1)
    for b0 in range(0, n, blocksize):
        codes[b0 + rng.integers(0, min(blocksize, n - b0))] = rng.choice(ones)
    k = rng.integers(-60, 60, -(-n // blocksize))
    x = (values[codes] * np.ldexp(f32(1), k)[np.arange(n) // blocksize].astype(f32)).astype(f32)
    codec = get_codec(fmt, blocksize=blocksize, double_quant=False)
    q = codec.quantize(x)
    assert np.array_equal(codec.dequantize(q), x)  # values (FP4 has two codes for zero)
    if fmt == "nf4":
        assert np.array_equal(q.codes, codes)


def test_bnb4_double_quant_overflow_is_an_error_not_nan():
    x = np.zeros((4, 256), f32)
    x[:, 0] = f32(3e38)
    with pytest.raises(RomacError, match="double quantization overflows"):
        get_codec("nf4").quantize(x)
    ok = get_codec("nf4", double_quant=False)
    assert np.array_equal(ok.dequantize(ok.quantize(x)), x)


# --------------------------------------------------------------------------------------------------- affine
@FAST
@given(bits=st.sampled_from([2, 4, 8]), group=st.sampled_from([1, 7, 32, 128]), data=st.data())
def test_affine_round_trip_with_special_groups(bits, group, data):
    rows, cols = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 400))
    qmax = 2**bits - 1
    limit = 65504.0 * qmax / 2  # the widest group an FP16 scale can express, centred on 0
    x = np.stack([planted(data.draw, cols, group, limit) for _ in range(rows)])
    codec = get_codec(f"int{bits}", group_size=group)
    q = codec.quantize(x)
    deq = codec.dequantize(q).astype(np.float64)
    assert np.isfinite(deq).all()
    per_col = lambda a: np.repeat(a, group, axis=1)[:, :cols]  # noqa: E731
    s = per_col(q.params["scale"].astype(np.float64))
    starts = np.arange(0, cols, group)
    wide = x.astype(np.float64)
    span = per_col(np.maximum.reduceat(np.maximum(wide, 0), starts, axis=1)
                   - np.minimum.reduceat(np.minimum(wide, 0), starts, axis=1))
    err = np.abs(deq - wide)
    slack = np.abs(wide) * 2.0**-22
    assert (err <= s / 2 + np.maximum(span - s * qmax, 0) + s * 2.0**-10 + slack).all()
    zero = per_col(np.logical_and.reduceat(wide == 0, starts, axis=1))
    assert not deq[zero.astype(bool)].any(), "an all-zero group dequantizes to zeros"
    sub = np.abs(wide) < 1.2e-38
    tiny_groups = per_col(np.logical_and.reduceat(sub, starts, axis=1)).astype(bool)
    assert (err[tiny_groups] <= 2.0**-25 + 1e-38).all(), "subnormal groups: within half the smallest fp16 scale"


# --------------------------------------------------------------------------------------------------- FP8 / FP16
FP8_FINITE = np.array([c for c in range(256) if c not in (0x7F, 0xFF)], np.uint8)


@FAST
@given(data=st.data())
def test_fp8_exact_on_representable_values(data):
    n = data.draw(st.integers(1, 300))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    codes = rng.choice(FP8_FINITE, n)
    codes[rng.integers(0, n)] = rng.choice([0x7E, 0xFE])  # ±448 (e4m3fn max): amax / 448 is the scale
    k = int(data.draw(st.integers(-100, 100)))
    scale = np.ldexp(f32(1), k).astype(f32)
    x = codes.view(ml_dtypes.float8_e4m3fn).astype(f32) * scale
    got, got_scale = C.fp8_e4m3_encode(x)
    assert got_scale == scale
    assert np.array_equal(C.fp8_e4m3_decode(got, got_scale), x)
    nonzero = x != 0
    assert np.array_equal(got[nonzero], codes[nonzero])


@FAST
@given(data=st.data())
def test_fp16_exact_on_representable_values(data):
    n = data.draw(st.integers(1, 500))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    bits = rng.integers(0, 1 << 16, n).astype(np.uint16)
    bits = bits[(bits & 0x7C00) != 0x7C00]  # finite: no Inf/NaN exponent
    special = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF], np.uint16)  # ±0, subnormals, ±65504
    bits = np.concatenate([bits, special])
    x = bits.view(np.float16).astype(f32)
    assert np.array_equal(C.fp16_encode(x), bits)
    assert np.array_equal(C.fp16_decode(bits).view(np.uint32), x.view(np.uint32))
    codec = get_codec("fp16")
    assert np.array_equal(codec.dequantize(codec.quantize(x)).view(np.uint32), x.view(np.uint32))


# --------------------------------------------------------------------------------------------------- ISA
@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=16, max_size=16))
def test_isa_bytes_that_decode_encode_back_to_themselves(word):
    from romac.spec import asm, isa

    try:
        program = isa.decode(word)
    except RomacError:
        return  # refused (unknown opcode, bad buffer, non-zero unused field): nothing to round-trip
    assert isa.encode(program) == word
    assert isa.encode(asm.assemble(asm.disassemble(program))) == word


# --------------------------------------------------------------------------------------------------- emulator
@st.composite
def model_configs(draw):
    from tests.conftest import small_config

    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    hidden = draw(st.integers(2, 24)) * 8
    return small_config(
        vocab_size=draw(st.integers(40, 300)), hidden_size=hidden, intermediate_size=draw(st.integers(2, 40)) * 8,
        num_layers=draw(st.integers(1, 3)), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        tie_word_embeddings=draw(st.booleans()), rope_theta=draw(st.sampled_from([1e4, 5e5])),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=model_configs(), data=st.data())
def test_emulator_equals_golden_on_random_models(config, data):
    import dataclasses

    from romac.driver import compile_model
    from romac.emulator import Machine
    from romac.frontend.builtin import random_adapter, random_weights
    from romac.ir import PROJECTIONS, make_model
    from romac.passes import CompileOptions
    from romac.reference import GoldenModel, relative_error
    from romac.targets import load_target

    formats = ["int4", "int2", "int8", "fp16"]
    if all(d % 64 == 0 for d in (config.hidden_size, config.intermediate_size, config.q_dim)):
        formats += ["nf4", "fp4"]
    fmt = data.draw(st.sampled_from(formats), label="format")
    embed = data.draw(st.sampled_from(["int4", "int8", "fp16"]), label="embedding format")
    modules = data.draw(st.lists(st.sampled_from(PROJECTIONS), min_size=1, max_size=7, unique=True), label="modules")
    rank = data.draw(st.integers(1, 8), label="rank")
    adapter = random_adapter(config, "ad", seed=data.draw(st.integers(0, 999)), rank=rank, modules=tuple(modules))
    model = make_model(config, random_weights(config, seed=data.draw(st.integers(0, 999))), (adapter,),
                       source={"kind": "test", "path": "memory"})
    # KV cache fp32 only: with fp16/fp8 K/V the float32 emulator and the float64 golden model may round an
    # element that lies within float32 error of a rounding midpoint to different neighbours (see the xfail below)
    target = dataclasses.replace(load_target("tiny"), lora=data.draw(st.sampled_from(["fp8_e4m3", "fp16"])))
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        compile_model(model, out, target, CompileOptions(quant=fmt, quant_embedding=embed, max_context=32))
        m = Machine(out)
        prompt = [int(t) for t in np.random.default_rng(rank).integers(0, config.vocab_size, 5)]
        for name in (None, "ad"):
            m.reset(adapter=name)
            new, logits = m.generate(prompt, 4)
            golden = GoldenModel.of_artifacts(model, m.manifest, adapter=name)
            ref = golden.logits(prompt + new)
            assert relative_error(logits, ref) <= 1e-5
            p = len(prompt)
            top2 = np.sort(ref[p - 1 : p - 1 + len(new)], axis=-1)[:, -2:]
            decided = (top2[:, 1] - top2[:, 0]) > 1e-4 * np.abs(ref).max()  # not a near-tie in float32
            golden_next = ref[p - 1 : p - 1 + len(new)].argmax(-1)
            # greedy tokens agree wherever the choice is not a float32 coin toss (and then the sequence continues)
            for i, tok in enumerate(new):
                if not decided[i]:
                    break
                assert tok == int(golden_next[i])


def test_low_precision_kv_cache_rounding_tie(tmp_path):
    """Found by test_emulator_equals_golden_on_random_models: V = 0.5153809199 (float64) lies 6e-8 above the fp16
    midpoint 0.515380859375; the emulator's float32 V lies below it, so the two caches differ by one fp16 ulp
    and the logits by 2e-5 relative, over the 1e-5 the design asks for. The golden model, given the chip's cache,
    takes the chip's rounding at that tie (reference.KvRounding) and agrees within 1e-5; without it, it does not."""
    import dataclasses

    from romac.driver import compile_model
    from romac.emulator import Machine
    from romac.frontend.builtin import random_adapter, random_weights
    from romac.ir import make_model
    from romac.passes import CompileOptions
    from romac.reference import GoldenModel, KvRounding, relative_error
    from romac.targets import load_target
    from tests.conftest import small_config

    config = small_config(vocab_size=40, hidden_size=160, intermediate_size=16, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=32)
    model = make_model(config, random_weights(config, seed=0),
                       (random_adapter(config, "ad", seed=0, rank=1, modules=("q_proj",)),), source={"kind": "test"})
    target = dataclasses.replace(load_target("tiny"), kv_cache="fp16")
    compile_model(model, tmp_path / "out", target, CompileOptions(quant="int2", quant_embedding="fp16", max_context=32))
    # Found with the numpy kernel's summation order (decode, then BLAS); the native kernels' order puts this V on the
    # golden model's side of the midpoint (and others across it: tests/test_emulator.py::test_sram_precisions).
    m = Machine(tmp_path / "out", kernel="numpy")
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 40, 5)]
    new, logits = m.generate(prompt, 4)
    golden = GoldenModel.of_artifacts(model, m.manifest)
    assert relative_error(logits, golden.logits(prompt + new)) > 1e-5  # the tie, rounded each its own way
    kv = KvRounding(m.manifest.sram.kv.format, m.sram.kv_snapshot(len(prompt + new)), 1e-5)
    assert relative_error(logits, golden.logits(prompt + new, kv=kv)) <= 1e-5
    assert 1 <= kv.ties <= 3, kv.ties
