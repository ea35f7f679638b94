"""romac.codecs: bit-exact against bitsandbytes (CPU) where it is the peer, property tests elsewhere."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from romac.codecs import Bnb4bitCodec, QuantTensor, get_codec
from romac.codecs import bnb as C
from romac.codecs import elements as E
from romac.codecs.bits import pack_codes, unpack_codes
from romac.spec.formats import BNB_DYNAMIC_SIGNED, FP4_ORDER, FP4_VALUES, NF4_VALUES, WEIGHT_FORMATS
from romac.errors import RomacError
from tests.bnb_reference import native_is_defined, reference_dequantize, same_values

f32 = np.float32
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same_bits(a, b) -> bool:
    """Equal dtype-size, equal element count and identical bytes (so -0.0 != +0.0, NaN payloads count)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype.itemsize == b.dtype.itemsize and a.size == b.size and \
        np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


@pytest.fixture(scope="module")
def bnb():
    """(torch, bitsandbytes.functional), with torch.compile off: bnb compiles its odd-shape dequant per shape."""
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield torch, F
    torch._dynamo.config.disable = old


def special_tensor(shape, bs, seed):
    """Gaussian weights with the awkward cases planted: zero blocks, a lone non-zero, huge and tiny magnitudes,
    and values lying exactly on NF4 decision bounds."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 50.0])).astype(f32)
    x = w.reshape(-1)
    blocks = [slice(i * bs, (i + 1) * bs) for i in range(x.size // bs)]
    if len(blocks) >= 6:
        x[blocks[0]] = 0                                  # all-zero block
        x[blocks[1]] = 0
        x[blocks[1].start + 3] = -7.5                     # one non-zero
        x[blocks[2]][:4] = [3e38, -3e38, 1e38, -1e30]     # +-large
        x[blocks[3]] = rng.standard_normal(bs).astype(f32) * f32(1e-40)   # subnormal block (absmax < 1e-38)
        b = blocks[4]
        mids = (NF4_VALUES[:-1] + NF4_VALUES[1:]) / f32(2)
        x[b] = 0
        x[b][: mids.size] = mids                          # scaled == bound exactly (absmax 1.0 below)
        x[b][-1] = 1.0
    elif x.size > 2:
        x[: x.size // 2] = 0
    return w


# ----------------------------------------------------------------- tables
def test_tables_match_bitsandbytes(bnb):
    torch, F = bnb
    assert same_bits(NF4_VALUES, F.get_4bit_type("nf4", device="cpu").numpy())
    assert same_bits(FP4_VALUES, F.get_4bit_type("fp4", device="cpu").numpy())
    assert same_bits(BNB_DYNAMIC_SIGNED, F.create_dynamic_map(signed=True).numpy())
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds
    _, order = _get_4bit_quantize_bounds("fp4", torch.device("cpu"))
    assert np.array_equal(FP4_ORDER, order.numpy())


# ----------------------------------------------------------------- bnb NF4 / FP4
SHAPES = [(64, 64), (3, 37), (1, 1), (129, 65), (576, 1536), (5000,), (2, 3, 7)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES)
def test_bnb_4bit_bit_exact(bnb, shape, blocksize, double_quant, quant_type):
    torch, F = bnb
    w = special_tensor(shape, blocksize, seed=hash((shape, blocksize)) % 2**32)
    packed, state = F.quantize_4bit(torch.from_numpy(w.copy()), blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=double_quant)

    codec = get_codec(quant_type, blocksize=blocksize, double_quant=double_quant)
    q = codec.quantize(w)
    assert q.codes.shape == w.shape and q.codes.dtype == np.uint8 and q.shape == w.shape
    assert same_bits(codec.pack(q), packed.numpy())
    if w.size % 2 == 0:
        assert same_bits(pack_codes(q.codes.reshape(-1), 4), packed.numpy())
    assert same_bits(q.params["absmax"], state.absmax.numpy())
    if double_quant:
        assert q.params["absmax"].dtype == np.uint8
        assert same_bits(q.constants["nested_absmax"], state.state2.absmax.numpy())
        assert same_bits(q.constants["offset"], state.offset.numpy().reshape(1))
        assert same_bits(BNB_DYNAMIC_SIGNED, state.state2.code.numpy())
        ref_absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert same_bits(Bnb4bitCodec.absmax_float32(q), ref_absmax.numpy())
    else:
        assert q.params["absmax"].dtype == np.float32 and q.constants == {}
    assert same_bits(state.code.numpy(), codec.format.values)
    out = codec.dequantize(q)
    assert out.dtype == np.float32 and out.shape == w.shape
    assert same_values(out, reference_dequantize(packed, state))     # every shape, on every CPU
    if native_is_defined(w.shape, blocksize):                        # bnb returns (1, n) for 1-D input
        assert same_values(out.reshape(-1), F.dequantize_4bit(packed, state).numpy().reshape(-1))


def test_fp4_zero_sign_is_not_a_difference(bnb):
    """bnb's kernels disagree on the sign of FP4's zero; the comparison treats it as equal, nothing else."""
    assert same_values(np.array([0.0, 1.5], f32), np.array([-0.0, 1.5], f32))
    assert not same_values(np.array([0.0, 1.5], f32), np.array([0.0, np.nextafter(f32(1.5), f32(2))], f32))
    assert not same_values(np.array([np.nan], f32), np.array([np.nan], f32))
    out = get_codec("fp4", double_quant=False).dequantize(get_codec("fp4", double_quant=False).quantize(np.zeros((2, 64), f32)))
    assert same_bits(out, np.zeros((2, 64), f32))                    # code 8 is bnb's table value, +0.0


@pytest.mark.parametrize("shape", [(64, 64), (96, 576), (5000,)])
def test_bnb_cpu_repacking_is_reproduced(bnb, shape):
    """cpu_repacked: what bnb's CPU inference repacking (bf16 absmax) and save_pretrained's inverse leave."""
    torch, F = bnb
    w = special_tensor(shape, 64, seed=11)
    w[~np.isfinite(w) | (np.abs(w) > 1e30)] = 1.0       # bnb cannot round-trip huge absmax through bf16
    packed, state = F.quantize_4bit(torch.from_numpy(w.reshape(-1, shape[-1]).copy()), blocksize=64,
                                    quant_type="nf4", compress_statistics=True)
    if len(shape) == 2 and shape[0] % 32 == 0:           # what Linear4bit.forward does on an AVX512-BF16 CPU
        packed2, state2 = F._convert_weight_packed_for_cpu(packed.clone(), state)
        _, state = F._convert_weight_packed_for_cpu_inverse(packed2, state2)
    else:                                                # the same arithmetic, for shapes its packer refuses
        absmax = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).to(torch.bfloat16).float()
        state.offset = absmax.mean()
        state.absmax, state.state2 = F.quantize_blockwise(absmax - state.offset, blocksize=256)
    q = get_codec("nf4", cpu_repacked=True).quantize(w)
    assert same_bits(q.params["absmax"], state.absmax.numpy())
    assert same_bits(q.constants["offset"], state.offset.numpy().reshape(1))
    assert same_bits(q.constants["nested_absmax"], state.state2.absmax.numpy())
    plain = get_codec("nf4").quantize(w)
    assert np.array_equal(plain.codes, q.codes)          # the 4-bit codes are not touched
    assert get_codec("nf4", cpu_repacked=True).spec()["cpu_repacked"] is True
    with pytest.raises(RomacError, match="double quantization"):
        get_codec("nf4", double_quant=False, cpu_repacked=True)


@pytest.mark.parametrize("threads", [None, 3])
def test_bnb_offset_follows_torch_threads(bnb, threads):
    """Above 32768 blocks torch splits absmax.mean() over its threads; bnb_threads reproduces each count."""
    torch, F = bnb
    w = special_tensor((2048, 1056), 64, seed=7)
    old = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        packed, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True)
        codec = get_codec("nf4", bnb_threads=torch.get_num_threads())
    finally:
        torch.set_num_threads(old)
    q = codec.quantize(w)
    assert same_bits(q.constants["offset"], state.offset.numpy().reshape(1))
    assert same_bits(q.params["absmax"], state.absmax.numpy())
    assert same_bits(codec.pack(q), packed.numpy())


def test_torch_mean_emulation(bnb):
    torch, _ = bnb
    rng = np.random.default_rng(3)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 5, 9):
            torch.set_num_threads(threads)
            for n in (1, 3, 7, 8, 9, 33, 127, 1000, 4097, 32767, 32768, 40001, 300_003):
                x = (rng.random(n, dtype=f32) * rng.choice([1e-3, 1, 1e3], n)).astype(f32)
                assert same_bits(C._torch_mean(x, threads), torch.from_numpy(x).mean().numpy()), (threads, n)
    finally:
        torch.set_num_threads(old)


def test_nested_blockwise_quantizer(bnb):
    """bnb's CPU 8-bit quantizer (LUT-binned, not exact-nearest) on ragged sizes and exact zeros."""
    torch, F = bnb
    rng = np.random.default_rng(11)
    for n in (1, 5, 255, 256, 259, 1000, 2053, 600):
        x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 3)).astype(f32)
        x[rng.random(n) < 0.2] = 0
        if n > 300:
            x[:256] = 0
        if n == 600:
            x[256:512] = x[256:512] * f32(1e-42)      # 1 / absmax overflows: 0 * inf = NaN lands on code 0
        q, state = F.quantize_blockwise(torch.from_numpy(x.copy()), blocksize=256)
        mine, absmax = C._quantize_blockwise_dynamic(x)
        assert same_bits(mine, q.numpy()) and same_bits(absmax, state.absmax.numpy())


# ----------------------------------------------------------------- packing
@FAST
@given(bits=st.sampled_from([2, 4, 8, 16, 32]), data=st.data())
def test_pack_round_trip(bits, data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=13))
    dtype = {16: np.uint16, 32: np.uint32}.get(bits, np.uint8)
    codes = data.draw(hnp.arrays(dtype, shape, elements=st.integers(0, 2 ** bits - 1)))
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (*shape[:-1], -(-shape[-1] * bits // 8))
    back = unpack_codes(packed, bits, shape[-1])
    assert back.dtype == dtype and np.array_equal(back, codes)


def test_pack_bit_order():
    assert pack_codes(np.array([1, 2, 3]), 4).tolist() == [0x12, 0x30]
    assert pack_codes(np.array([1, 2, 3]), 4, pad=7).tolist() == [0x12, 0x37]
    assert pack_codes(np.array([[1, 2, 3, 0, 3]]), 2).tolist() == [[0b01101100, 0b11000000]]
    assert pack_codes(np.array([0x1234], np.uint16), 16).tolist() == [0x34, 0x12]
    assert pack_codes(np.array([0x01020304], np.uint32), 32).tolist() == [4, 3, 2, 1]
    with pytest.raises(ValueError):
        pack_codes(np.array([16]), 4)
    with pytest.raises(ValueError):
        pack_codes(np.array([1]), 3)


# ----------------------------------------------------------------- affine int-k
@FAST
@given(bits=st.sampled_from([2, 4, 8]), group=st.sampled_from([1, 3, 32, 128]), data=st.data())
def test_affine_error_bound(bits, group, data):
    shape = data.draw(st.tuples(st.integers(1, 4), st.integers(1, 300)))
    w = data.draw(hnp.arrays(f32, shape, elements=st.floats(-1e4, 1e4, width=32)))
    codec = get_codec(f"int{bits}", group_size=group)
    q = codec.quantize(w)
    qmax = 2 ** bits - 1
    starts = np.arange(0, shape[1], group)
    assert q.codes.shape == shape and q.codes.dtype == np.uint8 and int(q.codes.max()) <= qmax
    assert q.params["scale"].shape == q.params["zero"].shape == (shape[0], starts.size)
    assert q.params["scale"].dtype == np.float16 and q.params["zero"].dtype == np.uint8
    assert int(q.params["zero"].max()) <= qmax and (q.params["scale"] > 0).all()
    per_col = lambda a: np.repeat(a, group, axis=1)[:, : shape[1]]          # noqa: E731
    s = per_col(q.params["scale"].astype(np.float64))
    wide = w.astype(np.float64)
    rng_ = per_col(np.maximum.reduceat(np.maximum(wide, 0), starts, axis=1)
                   - np.minimum.reduceat(np.minimum(wide, 0), starts, axis=1))
    err = np.abs(codec.dequantize(q).astype(np.float64) - wide)
    slack = np.abs(wide) * 2.0 ** -23
    inner = (q.codes > 0) & (q.codes < qmax)          # certainly not clipped
    assert (err[inner] <= s[inner] / 2 + slack[inner]).all()
    # clipping (fp16 rounded s below range/qmax) costs at most the part of the range s*qmax misses
    assert (err <= s / 2 + np.maximum(rng_ - s * qmax, 0) + 2 * slack).all()


@FAST
@given(bits=st.sampled_from([2, 4, 8]), group=st.sampled_from([1, 5, 64]), data=st.data())
def test_affine_requantize_is_identity(bits, group, data):
    """A dequantized tensor whose groups span codes 0..qmax re-quantizes to the same codes, scales, zeros.

    (For an arbitrary w this is not guaranteed: when fp16 rounding shrinks s, an extreme element may land one
    code inside the range, and the re-derived scale then differs.)"""
    rows, cols, qmax = data.draw(st.integers(1, 3)), data.draw(st.integers(2, 150)), 2 ** bits - 1
    n_groups = -(-cols // group)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 31)))
    codes = rng.integers(0, qmax + 1, (rows, cols)).astype(np.uint8)
    for g0 in range(0, cols, group):
        width = min(group, cols - g0)
        codes[:, g0] = 0
        codes[:, g0 + width - 1] = qmax if width > 1 else 0
    scale = rng.uniform(1e-3, 10, (rows, n_groups)).astype(np.float16)
    zero = rng.integers(0, qmax + 1, (rows, n_groups)).astype(np.uint8)
    ones = np.array([min(group, cols - g0) == 1 for g0 in range(0, cols, group)])
    scale[:, ones], zero[:, ones] = 1.0, 0          # a single-element group holding 0.0 re-quantizes so
    codec = get_codec(f"int{bits}", group_size=group)
    w = codec.dequantize(QuantTensor(codec.name, (rows, cols), codes, {"scale": scale, "zero": zero}))
    q = codec.quantize(w)
    assert np.array_equal(q.codes, codes) and same_bits(q.params["scale"], scale)
    assert np.array_equal(q.params["zero"], zero)
    assert same_bits(codec.dequantize(q), w)


def test_affine_special_groups():
    codec = get_codec("int4", group_size=4)
    w = np.array([[0, 0, 0, 0, 1e-9, -2e-9, 0, 3e-9, 65504 * 15, 0, 1, 2, -5, 0]], f32)
    q = codec.quantize(w)
    assert q.params["scale"][0, 0] == 1.0 and q.params["zero"][0, 0] == 0 and not q.codes[0, :4].any()
    assert q.params["scale"][0, 1] == np.float16(2.0 ** -24)              # rounds to 0 -> smallest subnormal
    assert q.params["scale"][0, 2] == np.float16(65504)                   # largest finite fp16 scale
    assert q.params["scale"].shape == (1, 4) and q.params["scale"][0, 3] == np.float16(5 / 15)
    d = codec.dequantize(q)
    assert not d[0, :4].any() and np.abs(d[0, 4:8]).max() <= 2.0 ** -25 + 3e-9 and d[0, 8] == 65504 * 15
    with pytest.raises(RomacError, match="FP16 scale range"):
        codec.quantize(np.array([[0, 65520 * 15]], f32))
    with pytest.raises(ValueError):
        codec.quantize(np.zeros((2, 3, 4), f32))
    assert [(p.key, p.storage) for p in get_codec("int8").format.param_fields] == [("scale", "f16"), ("zero", "u8")]
    assert [(p.key, p.storage) for p in get_codec("int2").format.param_fields] == [("scale", "f16"), ("zero", "u2")]


# ----------------------------------------------------------------- raw, fp8, fp16
@FAST
@given(w=hnp.arrays(f32, hnp.array_shapes(max_dims=3), elements=st.floats(width=32, allow_nan=False)))
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_raw_round_trips(w):
    for name, dt, ut in (("fp32", f32, np.uint32), ("fp16", np.float16, np.uint16)):
        codec = get_codec(name)
        q = codec.quantize(w)
        assert q.codes.dtype == ut and q.codes.shape == w.shape and q.params == {} and codec.format.group == 0
        assert same_bits(codec.dequantize(q), w.astype(dt).astype(f32))
    h = w.astype(np.float16)
    assert same_bits(E.fp16_decode(E.fp16_encode(h)), h.astype(f32))
    assert same_bits(E.fp16_encode(w), w.astype(np.float16))


@FAST
@given(x=hnp.arrays(f32, hnp.array_shapes(max_dims=2), elements=st.floats(-2.0 ** 100, 2.0 ** 100, width=32)))
def test_fp8_e4m3(x):
    codes, scale = E.fp8_e4m3_encode(x)
    amax = np.abs(x).max()
    assert codes.dtype == np.uint8 and codes.shape == x.shape and isinstance(scale, np.float32)
    assert scale == (f32(1) if amax == 0 else max(f32(amax) / f32(448), np.nextafter(f32(0), f32(1))))
    # saturating: a subnormal scale can round below amax/448
    expect = np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(f32) * scale
    decoded = E.fp8_e4m3_decode(codes, scale)
    assert decoded.dtype == np.float32 and np.array_equal(decoded, expect)
    assert not decoded[x == 0].any() and not np.isnan(decoded).any()


# ----------------------------------------------------------------- registry
@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_spec_round_trip(fmt):
    codec = get_codec(fmt, group_size=64, blocksize=128, double_quant=False)
    spec = json.loads(json.dumps(codec.spec()))
    assert get_codec(**spec) == codec and hash(get_codec(**spec)) == hash(codec)
    assert codec.name == fmt and codec.format.code_bits == {"int8": 8, "int2": 2, "fp16": 16, "fp32": 32}.get(fmt, 4)


def test_registry_errors():
    with pytest.raises(RomacError, match="nf4, fp4, int8"):
        get_codec("int3")
    with pytest.raises(RomacError, match="blocksize"):
        get_codec("nf4", blocksize=100)
    assert [(p.key, p.storage) for p in get_codec("nf4").format.param_fields] == [("absmax", "u8")]
    assert [(p.key, p.storage) for p in get_codec("fp4", double_quant=False).format.param_fields] == [("absmax", "f32")]
    assert get_codec("nf4", bnb_threads=4).spec()["bnb_threads"] == 4
    with pytest.raises(RomacError, match="inf or NaN"):
        get_codec("nf4").quantize(np.array([1.0, np.inf], f32))
