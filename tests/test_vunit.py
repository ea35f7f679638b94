"""The native handlers of the per-position instructions (romac.emulator.vector_unit, the C extension _vunit) against
their definitions in romac.emulator.ops: bit for bit the same outputs for RMSNORM (rows shorter than numpy's
pairwise block, one block, and split into halves), ROPE, LORA (the adapter's and the correction's slots) and ATTN
(grouped-query heads, a prefill's causal mask, contexts past the pairwise block), for one position and for several;
ops.py's own handlers computing a long prefill a block of positions at a time give the bits of one block; and a
LORA computed by the product kernel beside its MATVEC gives the bits of the two instructions."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

import romac.emulator.ops as ops
import romac.emulator.vector_unit as vu
from romac.codecs.elements import decode_lora, encode_lora, lora_code_values
from romac.driver import compile_model
from romac.emulator import Machine
from romac.ir import PROJECTIONS, projection_tensor
from romac.passes import CompileOptions
from romac.spec.formats import LORA_FORMATS, element_format
from romac.spec.isa import FLAG_CORRECTION, Instr, Opcode, f32_bits
from tests.conftest import small_config, small_model
from tests.test_correction import correction_for

pytestmark = pytest.mark.skipif(not vu.built(), reason="the C extension _vunit is not built")

X, Y, Z = 1, 2, 3  # buffer ids the instructions below use


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def _normal(rng, *shape, scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


class _Machine(SimpleNamespace):
    """What a handler reads of a Machine: buffers, ROM vectors, rope tables, SRAM slots and the KV cache."""

    def __init__(self, pos0: int = 0):
        super().__init__(buf={}, pos0=pos0, vectors={}, tables=None, kv=None)
        self.rom = SimpleNamespace(value=lambda rid: self.vectors[rid])
        self.sram = SimpleNamespace(lora={}, correction={}, lora_codes={}, correction_codes={}, read_kv=self._read_kv)

    def put_slot(self, slot: int, a: np.ndarray, b: np.ndarray, scaling: float, fmt: str, correction: bool = False):
        """A LoRA slot as Sram holds it: A [rank, in] and B [out, rank] stored in ``fmt``, decoded and as codes."""
        e = element_format(fmt)
        self.sram.code_values, self.sram.code_bytes = lora_code_values(fmt), e.bytes
        (a_bytes, a_scale), (b_bytes, b_scale) = encode_lora(a, fmt), encode_lora(b, fmt)
        a_codes, b_codes = np.frombuffer(a_bytes, np.uint8), np.frombuffer(b_bytes, np.uint8)
        a_dec, b_dec = decode_lora(a_codes, a.shape, fmt, a_scale), decode_lora(b_codes, b.shape, fmt, b_scale)
        decoded, codes = ((self.sram.correction, self.sram.correction_codes) if correction
                          else (self.sram.lora, self.sram.lora_codes))
        decoded[slot] = (np.ascontiguousarray(a_dec.T), np.ascontiguousarray(b_dec.T), np.float32(scaling))
        bt_codes = b_codes.reshape(*b.shape, e.bytes).transpose(1, 0, 2).reshape(b.shape[1], -1)
        codes[slot] = (a_codes.reshape(a.shape[0], -1), a_scale if e.scaled else 1.0,
                       np.ascontiguousarray(bt_codes), b_scale if e.scaled else 1.0, float(np.float32(scaling)))

    def rope_tables(self, rid, t):
        return self.tables[0][:t], self.tables[1][:t]

    def _read_kv(self, layer, end):
        return self.kv[layer, 0, :end], self.kv[layer, 1, :end]


def _both(m: _Machine, instr: Instr) -> tuple[np.ndarray, np.ndarray]:
    """The instruction's output from ops.py's handler and from the native one, on the same inputs."""
    inputs = dict(m.buf)
    ops.SEMANTICS[instr.op](m, instr)
    want = m.buf[instr.dst]
    m.buf = dict(inputs)
    vu.NATIVE_SEMANTICS[instr.op](m, instr)
    got = m.buf[instr.dst]
    m.buf = inputs
    assert got.shape == want.shape and got.dtype == want.dtype == np.float32
    return want, got


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("n", [1, 7, 8, 64, 127, 128, 129, 200, 576, 1536, 4096, 5000])
def test_rmsnorm(n, t):
    rng = np.random.default_rng(n * 10 + t)
    m = _Machine()
    m.vectors[4] = _normal(rng, n)
    m.buf[X] = _normal(rng, t, n, scale=3.0)
    for eps in (1e-5, 1e-6, 0.0):
        want, got = _both(m, Instr(Opcode.RMSNORM, dst=Y, src0=X, a=4, b=f32_bits(eps)))
        np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("t", [1, 4])
@pytest.mark.parametrize("heads,hd", [(9, 64), (3, 64), (32, 128), (5, 6), (1, 2)])
def test_rope(heads, hd, t):
    rng = np.random.default_rng(heads * hd + t)
    m = _Machine()
    angles = rng.uniform(0, 100, (t, hd // 2))
    angles = np.concatenate([angles, angles], axis=-1)
    m.tables = (np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32))
    m.buf[X] = _normal(rng, t, heads * hd)
    want, got = _both(m, Instr(Opcode.ROPE, dst=Y, src0=X, a=5, b=heads))
    np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("t", [1, 5, 40])  # 40: past a block of the C kernel's prefill (LORA_BLOCK, 32)
@pytest.mark.parametrize("fmt", LORA_FORMATS)
@pytest.mark.parametrize("flags", [0, FLAG_CORRECTION])
@pytest.mark.parametrize("n_in,rank,n_out", [(576, 8, 576), (576, 8, 192), (1536, 16, 576), (200, 3, 136),
                                             (4096, 16, 14336)])
def test_lora(n_in, rank, n_out, flags, fmt, t):
    rng = np.random.default_rng(n_in + rank + n_out + t + flags)
    m = _Machine()
    m.put_slot(7, _normal(rng, rank, n_in, scale=0.05), _normal(rng, n_out, rank, scale=0.05), 2.0, fmt,
               correction=bool(flags & FLAG_CORRECTION))
    m.buf[X] = _normal(rng, t, n_in)
    m.buf[Z] = _normal(rng, t, n_out)
    want, got = _both(m, Instr(Opcode.LORA, dst=Z, src0=X, a=7, flags=flags))
    np.testing.assert_array_equal(_bits(got), _bits(want))
    assert not np.array_equal(want, m.buf[Z])  # the delta was added


def test_lora_of_an_empty_slot_leaves_the_destination():
    rng = np.random.default_rng(0)
    m = _Machine()
    m.buf[X], m.buf[Z] = _normal(rng, 1, 8), _normal(rng, 1, 8)
    before = m.buf[Z]
    vu.NATIVE_SEMANTICS[Opcode.LORA](m, Instr(Opcode.LORA, dst=Z, src0=X, a=3))
    assert m.buf[Z] is before


@pytest.mark.parametrize("pos0,t", [(0, 1), (0, 6), (5, 1), (5, 4), (130, 1), (120, 17), (0, 150)])
@pytest.mark.parametrize("heads,kv_heads,hd", [(9, 3, 64), (4, 4, 8), (8, 2, 128), (2, 1, 6)])
def test_attn(heads, kv_heads, hd, pos0, t):
    rng = np.random.default_rng(heads * 1000 + pos0 * 10 + t)
    m = _Machine(pos0=pos0)
    end = pos0 + t
    m.kv = _normal(rng, 2, 2, end + 3, kv_heads * hd)  # a longer cache than the context: only [0, end) is read
    m.buf[X] = _normal(rng, t, heads * hd, scale=2.0)
    want, got = _both(m, Instr(Opcode.ATTN, dst=Y, src0=X, layer=1, a=heads, b=kv_heads))
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_ops_blocks_of_positions_give_the_bits_of_one_block(monkeypatch):
    """A long prefill is computed by ops.py a block of positions at a time: the same bits as all at once."""
    rng = np.random.default_rng(3)
    m = _Machine(pos0=2)
    t, heads, kv_heads, hd = 12, 4, 2, 16
    m.kv = _normal(rng, 1, 2, 2 + t, kv_heads * hd)
    m.buf[X] = _normal(rng, t, heads * hd)
    m.buf[Z] = _normal(rng, t, 40)
    m.put_slot(0, _normal(rng, 4, heads * hd), _normal(rng, 40, 4), 0.5, "fp8_e4m3")
    cases = [Instr(Opcode.ATTN, dst=Y, src0=X, a=heads, b=kv_heads), Instr(Opcode.LORA, dst=Z, src0=X, a=0)]
    inputs = dict(m.buf)
    whole = []
    for instr in cases:
        m.buf = dict(inputs)
        ops.SEMANTICS[instr.op](m, instr)
        whole.append(m.buf[instr.dst])
    monkeypatch.setattr(ops, "TEMPORARY_FLOATS", 1)  # one position per block
    for instr, want in zip(cases, whole):
        m.buf = dict(inputs)
        ops.SEMANTICS[instr.op](m, instr)
        np.testing.assert_array_equal(_bits(m.buf[instr.dst]), _bits(want))


def test_fp8_codes_convert_to_the_codec_values():
    want = lora_code_values("fp8_e4m3")
    got = np.array(vu._vunit.fp8_values(), np.float32)
    nan = np.isnan(want)
    assert nan.sum() == 2 and np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(_bits(got[~nan]), _bits(want[~nan]))


def test_the_c_code_reads_the_lora_formats_it_knows_and_no_other():
    assert all(vu.reads_codes(lora_code_values(f), element_format(f).bytes) for f in LORA_FORMATS)
    other = np.arange(256, dtype=np.float32)  # a 1-byte format that is not FP8 E4M3 (say, int8 codes)
    assert not vu.reads_codes(other, 1)
    assert vu.native_handlers([Instr(Opcode.LORA, a=0)], other, 1)[0][0] is ops.SEMANTICS[Opcode.LORA]


def test_bad_buffers_are_refused():
    x = np.zeros((2, 8), np.float64)
    with pytest.raises(TypeError, match="float32"):
        vu._vunit.rmsnorm(x, np.ones(8, np.float32), 1e-5, np.empty((2, 8), np.float32), 2, 8)
    with pytest.raises(ValueError, match="needed"):
        vu._vunit.rmsnorm(np.zeros((2, 8), np.float32), np.ones(4, np.float32), 1e-5,
                          np.empty((2, 8), np.float32), 2, 8)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("adapter", [None, "ad0"])
def test_a_lora_beside_its_product_gives_the_bits_of_the_two_instructions(tmp_path, adapter, threads):
    """A whole model with a correction and an adapter (MATVEC, LORA corr, LORA): the native kernel computes each
    MATVEC's first LORA beside the product; the logits equal those of every instruction on its own, on one thread
    and on two, in a prefill and in decode steps."""
    config = small_config()
    ranks = {projection_tensor(layer, p): 2 + layer for layer in range(config.num_layers) for p in PROJECTIONS}
    model = dataclasses.replace(small_model(config, adapters=1), correction=correction_for(config, ranks))
    compile_model(model, tmp_path / "out", None, CompileOptions(quant="int4"))
    fused = Machine(tmp_path / "out", adapter=adapter, threads=threads)
    alone = Machine(tmp_path / "out", adapter=adapter, threads=threads)
    alone._handlers = [(vu.NATIVE_SEMANTICS[i.op], i) for i in alone.program if i.op != Opcode.HALT]
    n_matvec = sum(i.op == Opcode.MATVEC for i in fused.program)
    assert len(alone._handlers) - len(fused._handlers) == n_matvec - 1  # all but the head's
    for m in (fused, alone):
        m.parallel_weights = 0  # every product on the threads
    prompt = [3, 14, 15, 92, 65]
    got_new, got = fused.generate(prompt, 4)
    want_new, want = alone.generate(prompt, 4)
    assert got_new == want_new
    np.testing.assert_array_equal(_bits(got), _bits(want))
