"""The ISA: encode/decode round trips, listing round trips, and the rejection of malformed programs."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from romac.spec import asm, isa
from romac.spec.asm import assemble, disassemble
from romac.spec.isa import (
    FLAG_ACCUMULATE,
    INSTR_BYTES,
    INSTR_FORMAT,
    OPCODES,
    Buf,
    Instr,
    Opcode,
    bits_f32,
    decode,
    encode,
    f32_bits,
    validate,
)
from romac.errors import ArtifactError, RomacError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "isa.md"
FIELDS = ("op", "dst", "src0", "src1", "layer", "flags", "a", "b")
U32 = (1 << 32) - 1

fast = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------------------------
# Strategies

u32 = st.one_of(st.integers(0, 64), st.integers(0, U32))
eps_bits = st.one_of(
    st.integers(0, U32),
    st.floats(width=32, allow_nan=True).map(f32_bits),
    st.sampled_from([f32_bits(1e-5), f32_bits(1e-6), 1, 0x007FFFFF, 0x80000001, 0x7F800000, 0x7FC00001, 0xFFFFFFFF]),
)
comments = st.one_of(st.just(""), st.text(max_size=24))


@st.composite
def instrs(draw, ops=None) -> Instr:
    op = draw(st.sampled_from(ops or list(Opcode)))
    s = OPCODES[op]
    kw = {name: draw(st.sampled_from(list(Buf))) for name in s.bufs}
    if s.layer:
        kw["layer"] = draw(st.integers(0, 0xFFFF))
    if s.flags:
        kw["flags"] = draw(st.integers(0, s.flags)) & s.flags
    if op is Opcode.ATTN:
        kv = draw(st.integers(1, 4096))
        kw["a"], kw["b"] = kv * draw(st.integers(1, 64)), kv
    else:
        for name in ("a", "b"):
            operand = getattr(s, name)
            if operand is None:
                continue
            if operand.kind == "f32":
                kw[name] = draw(eps_bits)
            elif operand.kind == "count":
                kw[name] = draw(st.integers(1, U32))
            else:
                kw[name] = draw(u32)
    return Instr(op, **kw, comment=draw(comments))


programs = st.lists(instrs(), max_size=16).map(lambda body: body + [Instr(Opcode.HALT)])
names = st.one_of(st.none(), st.lists(st.text(max_size=16), max_size=12))


def fields(ins: Instr) -> tuple:
    return tuple(int(getattr(ins, f)) for f in FIELDS)


def patch(data: bytes, index: int, **changes: int) -> bytes:
    """``data`` with the encoded fields of instruction ``index`` changed."""
    off = index * INSTR_BYTES
    values = dict(zip(FIELDS, struct.unpack_from(INSTR_FORMAT, data, off)))
    values.update(changes)
    return data[:off] + struct.pack(INSTR_FORMAT, *(values[f] for f in FIELDS)) + data[off + INSTR_BYTES :]


# --------------------------------------------------------------------------------------------------------------
# Encoding


def test_encoding_layout():
    assert INSTR_BYTES == struct.calcsize(INSTR_FORMAT) == 16
    ins = Instr(Opcode.ATTN, dst=Buf.ATT, src0=Buf.Q, layer=0x1234, a=32, b=8)
    data = encode([ins])
    assert data == bytes([7, 6, 3, 0, 0x34, 0x12, 0, 0]) + (32).to_bytes(4, "little") + (8).to_bytes(4, "little")
    assert set(OPCODES) == set(Opcode)


@fast
@given(programs)
def test_encode_decode_round_trip(program):
    data = encode(program)
    assert len(data) == len(program) * INSTR_BYTES
    back = decode(data)
    assert back == program  # equality ignores comments
    assert [fields(i) for i in back] == [fields(i) for i in program]
    assert all(i.comment == "" for i in back)
    assert encode(back) == data
    validate(program)
    validate(back)


def test_instr_equality_ignores_comment():
    a = Instr(Opcode.ADD, Buf.X, Buf.X, Buf.T, comment="residual")
    assert a == Instr(Opcode.ADD, 1, 1, 7) and hash(a) == hash(Instr(Opcode.ADD, 1, 1, 7))
    assert Instr(3).op is Opcode.MATVEC


# --------------------------------------------------------------------------------------------------------------
# Listing


@fast
@given(programs, names, names)
def test_listing_round_trip(program, region_names, slot_names):
    for text in (disassemble(program), disassemble(program, region_names, slot_names)):
        back = assemble(text)
        assert encode(back) == encode(program)
        assert back == program
        validate(back)
        # one line per instruction, plus the header comments
        code_lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith(";")]
        assert len(code_lines) == len(program)


@fast
@given(programs)
def test_listing_keeps_comments(program):
    back = assemble(disassemble(program))
    for a, b in zip(program, back):
        assert b.comment == " ".join(a.comment.splitlines()).strip()


def test_listing_format():
    program = [Instr(Opcode.NOP)] * 12 + [
        Instr(Opcode.MATVEC, Buf.Q, Buf.H, a=5, comment="layers.0.self_attn.q_proj"),
        Instr(Opcode.MATVEC, Buf.T, Buf.G, a=9, flags=FLAG_ACCUMULATE),
        Instr(Opcode.RMSNORM, Buf.H, Buf.X, a=1, b=f32_bits(1e-5)),
        Instr(Opcode.LORA, Buf.Q, Buf.H, a=2),
        Instr(Opcode.ATTN, Buf.ATT, Buf.Q, layer=3, a=32, b=8),
        Instr(Opcode.KVSTORE, src0=Buf.K, src1=Buf.V, layer=3),
        Instr(Opcode.HALT),
    ]
    lines = disassemble(program, region_names=["emb", "layers.0.input_layernorm"], slot_names=["s0", "s1", "q0"])
    lines = [line for line in lines.splitlines() if not line.startswith(";")]
    assert lines[12] == "   12  matvec   q, h, r=5                ; layers.0.self_attn.q_proj"
    assert lines[13] == "   13  matvec   t, g, r=9, acc"
    assert lines[14] == "   14  rmsnorm  h, x, r=1, eps=1e-05     ; layers.0.input_layernorm"
    assert lines[15] == "   15  lora     q, h, slot=2             ; q0"
    assert lines[16] == "   16  attn     att, q, layer=3, heads=32, kv_heads=8"
    assert lines[17] == "   17  kvstore  k, v, layer=3"
    assert lines[18] == "   18  halt"


@fast
@given(eps_bits)
def test_eps_round_trips_exactly(bits):
    program = [Instr(Opcode.RMSNORM, Buf.H, Buf.X, a=0, b=bits), Instr(Opcode.HALT)]
    (back, _) = assemble(disassemble(program))
    assert back.b == bits


@pytest.mark.parametrize(
    "bits",
    [0, 0x80000000, 1, 0x80000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000,
     0x7F800001, 0xFFFFFFFF, f32_bits(1e-5), f32_bits(1e-6), f32_bits(0.1)],
)
def test_eps_edge_cases(bits):
    text = disassemble([Instr(Opcode.RMSNORM, Buf.H, Buf.X, b=bits)])
    assert assemble(text)[0].b == bits


def test_eps_is_readable():
    assert "eps=1e-05" in disassemble([Instr(Opcode.RMSNORM, Buf.H, Buf.X, b=f32_bits(1e-5))])
    assert "eps=1e-06" in disassemble([Instr(Opcode.RMSNORM, Buf.H, Buf.X, b=f32_bits(1e-6))])


@fast
@given(st.integers(0, U32))
def test_f32_bits(bits):
    x = bits_f32(bits)
    if x == x:
        assert f32_bits(x) == bits
    assert np.array(bits, dtype=np.uint32).view(np.float32) == np.float32(x) or x != x


def test_f32_bits_rounds_and_overflows():
    assert f32_bits(1e-5) == int(np.array(1e-5, dtype=np.float32).view(np.uint32))
    assert f32_bits(1e300) == 0x7F800000 and f32_bits(-1e300) == 0xFF800000
    assert f32_bits(1e-50) == 0 and bits_f32(1) == float(np.float32(1.4e-45))


def test_assemble_is_lenient_about_layout():
    text = """
    ; a hand-written step
    ;
    EMBED X, TOK, R=0
      7 matvec q,h,r=0x10,acc   ; address column is ignored
    rmsnorm h, x, eps=1e-5, r=1
    halt
    """
    program = assemble(text)
    assert program == [
        Instr(Opcode.EMBED, Buf.X, Buf.TOK, a=0),
        Instr(Opcode.MATVEC, Buf.Q, Buf.H, a=16, flags=FLAG_ACCUMULATE),
        Instr(Opcode.RMSNORM, Buf.H, Buf.X, a=1, b=f32_bits(1e-5)),
        Instr(Opcode.HALT),
    ]
    assert program[1].comment == "address column is ignored"
    assert assemble("") == [] and assemble("; only\n\n  ;\n") == []


@pytest.mark.parametrize(
    "line, message",
    [
        ("frobnicate x, h", "unknown mnemonic"),
        ("matvec q, h", "missing operand"),
        ("matvec q, r=1", "takes 2 buffer"),
        ("matvec q, h, x, r=1", "takes 2 buffer"),
        ("matvec q, zz, r=1", "unknown operand"),
        ("matvec q, h, r=1, r=2", "given twice"),
        ("matvec q, h, r=1, acc, acc", "given twice"),
        ("matvec q, h, r=-1", "unsigned integer"),
        ("matvec q, h, r=4294967296", "does not fit"),
        ("matvec q, h, slot=1", "no operand slot="),
        ("lora q, h, slot=1, acc", "does not take the flag"),
        ("add x, x, t, layer=1", "no operand layer="),
        ("kvstore k, v, layer=65536", "does not fit"),
        ("rmsnorm h, x, r=1, eps=tiny", "must be a float"),
        ("rmsnorm h, x, r=1, eps=0x100000000", "must be a float"),
        ("matvec q, h, r=1,", "empty operand"),
        ("matvec q, r=1, h", "after a keyword"),
        ("halt now", "unknown operand"),
        ("12", "without an instruction"),
    ],
)
def test_assemble_errors_name_the_line(line, message):
    with pytest.raises(RomacError, match=re.escape(message)) as info:
        assemble(f"; header\n\nhalt\n{line}\nhalt\n")
    assert "line 4" in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# Rejection of malformed binaries and programs


@fast
@given(programs, st.integers(1, INSTR_BYTES - 1))
def test_decode_rejects_truncated(program, cut):
    data = encode(program)[:-cut]
    with pytest.raises(ArtifactError, match=f"instruction {len(program) - 1} is truncated"):
        decode(data)


@fast
@given(programs, st.data())
def test_decode_rejects_unknown_opcode(program, data):
    i = data.draw(st.integers(0, len(program) - 1))
    bad = data.draw(st.sampled_from(sorted(set(range(256)) - set(Opcode))))
    with pytest.raises(ArtifactError, match=rf"instruction {i} \(byte {i * INSTR_BYTES}\).*unknown opcode {bad}"):
        decode(patch(encode(program), i, op=bad))


@fast
@given(programs.filter(lambda p: any(OPCODES[i.op].bufs for i in p)), st.data())
def test_decode_rejects_buffer_out_of_range(program, data):
    i = data.draw(st.sampled_from([n for n, ins in enumerate(program) if OPCODES[ins.op].bufs]))
    name = data.draw(st.sampled_from(OPCODES[program[i].op].bufs))
    value = data.draw(st.integers(len(Buf), 255))
    with pytest.raises(ArtifactError, match=rf"instruction {i} .*{name} buffer {value} is out of range"):
        decode(patch(encode(program), i, **{name: value}))


def _unused(ins: Instr) -> list[tuple[str, int]]:
    """(field, largest value) of every field or flag bits ``ins`` does not use."""
    s = OPCODES[ins.op]
    out = [(f, (1 << isa.FIELD_BITS[f]) - 1) for f in FIELDS[1:] if f != "flags" and not s.uses(f)]
    if s.flags != 0xFFFF:
        out.append(("flags", 0xFFFF))
    return out


@fast
@given(programs, st.data())
def test_decode_rejects_nonzero_unused_fields(program, data):
    i = data.draw(st.integers(0, len(program) - 1))
    name, top = data.draw(st.sampled_from(_unused(program[i])))
    s = OPCODES[program[i].op]
    if name == "flags":
        value = program[i].flags | data.draw(st.integers(1, top).filter(lambda v: v & ~s.flags))
    else:
        value = data.draw(st.integers(1, top))
    with pytest.raises(ArtifactError, match=rf"instruction {i} .*(unused fields must be 0|unused bits must be 0)"):
        decode(patch(encode(program), i, **{name: value}))
    # the same checks on Instr objects
    bad = list(program)
    bad[i] = Instr(**{**{f: getattr(program[i], f) for f in FIELDS}, name: value})
    with pytest.raises(ArtifactError, match=rf"instruction {i} "):
        validate(bad)
    with pytest.raises(ArtifactError, match=rf"instruction {i} "):
        encode(bad)


def test_decode_error_names_source():
    with pytest.raises(ArtifactError, match=r"program\.bin, instruction 1 .*unknown opcode 12"):
        decode(encode([Instr(Opcode.NOP)]) + bytes([12]) + bytes(INSTR_BYTES - 1), source="program.bin")
    with pytest.raises(ArtifactError, match=r"program\.bin: length 17"):
        decode(bytes(17), source="program.bin")


def test_validate_program_rules():
    halt = Instr(Opcode.HALT)
    validate([halt])
    validate([Instr(Opcode.NOP), halt, halt])
    with pytest.raises(ArtifactError, match="empty"):
        validate([])
    with pytest.raises(ArtifactError, match=r"instruction 1 .*not halt"):
        validate([halt, Instr(Opcode.NOP)])
    with pytest.raises(ArtifactError, match=r"instruction 0 .*kv_heads must be positive"):
        validate([Instr(Opcode.ATTN, Buf.ATT, Buf.Q, a=4, b=0), halt])
    with pytest.raises(ArtifactError, match=r"instruction 0 .*heads must be positive"):
        validate([Instr(Opcode.ROPE, Buf.Q, Buf.Q, a=0, b=0), halt])
    with pytest.raises(ArtifactError, match=r"instruction 0 .*not a multiple"):
        validate([Instr(Opcode.ATTN, Buf.ATT, Buf.Q, a=6, b=4), halt])
    with pytest.raises(ArtifactError, match=r"instruction 0 .*unknown opcode 12"):
        validate([Instr(12), halt])
    with pytest.raises(ArtifactError, match=r"instruction 1 .*does not fit in 32"):
        validate([halt, Instr(Opcode.MATVEC, Buf.Q, Buf.H, a=1 << 32), halt])
    with pytest.raises(ArtifactError, match=r"instruction 0 .*must be an int"):
        validate([Instr(Opcode.MATVEC, Buf.Q, Buf.H, a=1.0), halt])


# --------------------------------------------------------------------------------------------------------------
# Documentation


def test_docs_opcode_table_is_generated_from_the_isa():
    assert asm.markdown_opcode_table() in DOCS.read_text(encoding="utf-8")


def test_docs_example_assembles():
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```asm\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/isa.md has an ```asm example"
    for block in blocks:
        program = assemble(block)
        validate(program)
        assert assemble(disassemble(program)) == program
    example = assemble(blocks[-1])
    assert [i.op.mnemonic for i in example][:2] == ["embed", "rmsnorm"] and example[-1].op is Opcode.HALT
