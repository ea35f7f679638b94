"""The ROMA instruction set: opcodes, buffers, binary encoding, validation, and the listing of an instruction.

The ISA is coarse-grained: one instruction is one whole operation over a placed region (a matrix-vector
product over every tile of a matrix, one RMSNorm, one attention over the cached context). A program is ONE
forward step over ``T`` new token positions; the emulator runs the same program for every step, with the
number of positions already in the KV cache (``pos0``) as machine state. See ``docs/isa.md``.

Every instruction is :data:`INSTR_BYTES` bytes, little-endian, laid out by :data:`INSTR_FORMAT`::

    opcode u8 | dst u8 | src0 u8 | src1 u8 | layer u16 | flags u16 | a u32 | b u32

Which fields an opcode uses, and what its ``a``/``b`` operands mean, is declared once in :data:`OPCODES`;
encoding checks, decoding checks, :func:`validate`, the listing of one instruction (:func:`format_instr`) and
the listing, assembler and documentation table of :mod:`romac.spec.asm` are all derived from it. Unused fields
must be 0.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from romac.errors import ArtifactError

__all__ = [
    "INSTR_FORMAT",
    "INSTR_BYTES",
    "FLAG_ACCUMULATE",
    "FLAG_CORRECTION",
    "FLAG_NAMES",
    "Buf",
    "Opcode",
    "Operand",
    "OpSpec",
    "OPCODES",
    "spec",
    "Instr",
    "encode",
    "decode",
    "validate",
    "f32_bits",
    "bits_f32",
    "format_instr",
]

# --------------------------------------------------------------------------------------------------------------
# Encoding

INSTR_FORMAT = "<BBBBHHII"
"""``struct`` format of one instruction: opcode, dst, src0, src1 (u8), layer, flags (u16), a, b (u32)."""

INSTR_BYTES = struct.calcsize(INSTR_FORMAT)
"""Size of one encoded instruction in bytes."""

_STRUCT = struct.Struct(INSTR_FORMAT)

# The encoded fields, in struct order, with their bit widths (derived from the format string).
_FIELDS = ("op", "dst", "src0", "src1", "layer", "flags", "a", "b")
FIELD_BITS = {name: 8 * struct.calcsize("<" + code) for name, code in zip(_FIELDS, INSTR_FORMAT[1:])}
_BUF_FIELDS = ("dst", "src0", "src1")


class Buf(enum.IntEnum):
    """Activation buffers; each holds T rows (one per new token position)."""

    TOK = 0  # token ids (input)
    X = 1  # residual stream
    H = 2  # normed activations
    Q = 3
    K = 4
    V = 5
    ATT = 6  # attention output
    T = 7  # temporary / projection output
    G = 8  # gate
    U = 9  # up
    LOGITS = 10


class Opcode(enum.IntEnum):
    """Instruction opcodes; the listing mnemonic is the lower-case name."""

    NOP = 0
    EMBED = 1
    RMSNORM = 2
    MATVEC = 3
    LORA = 4
    ROPE = 5
    KVSTORE = 6
    ATTN = 7
    SWIGLU = 8
    ADD = 9
    HALT = 15

    @property
    def mnemonic(self) -> str:
        return self.name.lower()


FLAG_ACCUMULATE = 1 << 0
"""MATVEC flag: ``dst += W @ src0`` instead of ``dst = W @ src0``."""

FLAG_CORRECTION = 1 << 1
"""LORA flag: the slot's term comes from the correction region (the base's low-rank correction, always resident)
instead of the active adapter."""

FLAG_NAMES = {FLAG_ACCUMULATE: "acc", FLAG_CORRECTION: "corr"}
"""Listing keyword of every flag bit."""


# --------------------------------------------------------------------------------------------------------------
# The one opcode table

_KINDS = {
    "region": "id of a ROM region (an index into the manifest's region table)",
    "slot": "id of a LoRA slot (an index into the manifest's slot table)",
    "f32": "a float32, stored as its raw IEEE-754 bits",
    "count": "a positive count",
}


@dataclass(frozen=True)
class Operand:
    """What an ``a`` or ``b`` field means for one opcode."""

    key: str  # listing keyword, e.g. "r", "slot", "eps", "heads"
    kind: str  # one of "region", "slot", "f32", "count"
    doc: str  # what it is, for the documentation

    def __post_init__(self) -> None:
        assert self.kind in _KINDS, self.kind


@dataclass(frozen=True)
class OpSpec:
    """Which fields one opcode uses and what they mean."""

    op: Opcode
    bufs: tuple[str, ...]  # the buffer fields used, in listing order (a subset of dst, src0, src1)
    layer: bool  # uses the layer field
    flags: int  # mask of the flag bits it accepts
    a: Operand | None
    b: Operand | None
    summary: str  # one-line semantics, for the documentation

    @property
    def mnemonic(self) -> str:
        return self.op.mnemonic

    def uses(self, name: str) -> bool:
        """Whether the encoded field ``name`` (one of dst, src0, src1, layer, flags, a, b) is used."""
        if name in _BUF_FIELDS:
            return name in self.bufs
        if name == "layer":
            return self.layer
        if name == "flags":
            return self.flags != 0
        if name in ("a", "b"):
            return getattr(self, name) is not None
        raise KeyError(name)


def _R(doc: str) -> Operand:
    return Operand("r", "region", doc)


OPCODES: dict[Opcode, OpSpec] = {
    s.op: s
    for s in (
        OpSpec(Opcode.NOP, (), False, 0, None, None, "does nothing"),
        OpSpec(
            Opcode.EMBED, ("dst", "src0"), False, 0, _R("embedding table [vocab, d]"), None,
            "dst[t] = E[src0[t]] (src0 = tok)",
        ),
        OpSpec(
            Opcode.RMSNORM, ("dst", "src0"), False, 0, _R("gain vector g [d]"),
            Operand("eps", "f32", "epsilon"),
            "dst[t] = src0[t] / sqrt(mean(src0[t]^2) + eps) * g",
        ),
        OpSpec(
            Opcode.MATVEC, ("dst", "src0"), False, FLAG_ACCUMULATE, _R("matrix W [out, in]"), None,
            "dst[t] = W @ src0[t] (acc: dst[t] += W @ src0[t])",
        ),
        OpSpec(
            Opcode.LORA, ("dst", "src0"), False, FLAG_CORRECTION, Operand("slot", "slot", "LoRA slot (one projection)"),
            None, "dst[t] += scaling * B @ (A @ src0[t]) with the active adapter; no-op without one (corr: with the "
            "correction region's L1, L2 of the slot, scaling 1)",
        ),
        OpSpec(
            Opcode.ROPE, ("dst", "src0"), False, 0, _R("inverse frequencies [head_dim/2]"),
            Operand("heads", "count", "number of heads in a row"),
            "dst[t] = rotary(src0[t], position pos0+t), HF rotate_half convention",
        ),
        OpSpec(
            Opcode.KVSTORE, ("src0", "src1"), True, 0, None, None,
            "KV cache of layer, positions pos0..pos0+T-1 <- src0 (K), src1 (V)",
        ),
        OpSpec(
            Opcode.ATTN, ("dst", "src0"), True, 0, Operand("heads", "count", "query heads"),
            Operand("kv_heads", "count", "key/value heads"),
            "dst = causal GQA of src0 (Q) over cache positions [0, pos0+T) of layer",
        ),
        OpSpec(Opcode.SWIGLU, ("dst", "src0", "src1"), False, 0, None, None, "dst = silu(src0) * src1"),
        OpSpec(Opcode.ADD, ("dst", "src0", "src1"), False, 0, None, None, "dst = src0 + src1"),
        OpSpec(Opcode.HALT, (), False, 0, None, None, "end of the step"),
    )
}
assert set(OPCODES) == set(Opcode)

BY_MNEMONIC = {s.mnemonic: s for s in OPCODES.values()}
BUF_BY_NAME = {b.name.lower(): b for b in Buf}
FLAG_BY_NAME = {name: bit for bit, name in FLAG_NAMES.items()}


def spec(op: int) -> OpSpec:
    """The :class:`OpSpec` of an opcode (``KeyError`` when it is unknown)."""
    return OPCODES[Opcode(op)]


# --------------------------------------------------------------------------------------------------------------
# Instructions


@dataclass(frozen=True)
class Instr:
    """One instruction. ``comment`` is not encoded and does not take part in equality."""

    op: Opcode
    dst: int = 0
    src0: int = 0
    src1: int = 0
    layer: int = 0
    flags: int = 0
    a: int = 0
    b: int = 0
    comment: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        op = self.op
        if not isinstance(op, Opcode) and isinstance(op, int) and not isinstance(op, bool) and op in _OPCODE_VALUES:
            object.__setattr__(self, "op", Opcode(op))

    @property
    def spec(self) -> OpSpec:
        return spec(self.op)

    @property
    def eps(self) -> float:
        """The ``b`` field read as a float32 (RMSNORM's epsilon)."""
        return bits_f32(self.b)

    def __str__(self) -> str:
        return format_instr(self)


_OPCODE_VALUES = frozenset(int(o) for o in Opcode)


def f32_bits(x: float) -> int:
    """The IEEE-754 bits of ``x`` rounded to float32 (round to nearest even; overflow gives ±inf)."""
    with np.errstate(over="ignore"):
        return int(np.array(x, dtype=np.float64).astype(np.float32).view(np.uint32))


def bits_f32(b: int) -> float:
    """The float32 whose IEEE-754 bits are ``b``, as a Python float (exact)."""
    return float(np.array(b, dtype=np.uint32).view(np.float32))


def field_problem(values: dict[str, object]) -> str | None:
    """What is wrong with one instruction's encoded fields, or None. ``values`` maps _FIELDS to ints."""
    op = values["op"]
    if not isinstance(op, int) or isinstance(op, bool) or op not in _OPCODE_VALUES:
        return f"unknown opcode {op!r}"
    s = OPCODES[Opcode(op)]
    for name in _FIELDS[1:]:
        v = values[name]
        if not isinstance(v, int) or isinstance(v, bool):
            return f"{s.mnemonic}: field {name} must be an int, got {v!r}"
        if not 0 <= v < (1 << FIELD_BITS[name]):
            return f"{s.mnemonic}: field {name} = {v} does not fit in {FIELD_BITS[name]} unsigned bits"
    for name in _BUF_FIELDS:
        v = values[name]
        if s.uses(name):
            if v >= len(Buf):
                return f"{s.mnemonic}: {name} buffer {v} is out of range (0..{len(Buf) - 1})"
        elif v:
            return f"{s.mnemonic} does not use field {name}, but it is {v} (unused fields must be 0)"
    for name in ("layer", "a", "b"):
        if not s.uses(name) and values[name]:
            return f"{s.mnemonic} does not use field {name}, but it is {values[name]} (unused fields must be 0)"
    extra = values["flags"] & ~s.flags
    if extra:
        return f"{s.mnemonic}: flag bits 0x{extra:04x} are not defined for this opcode (unused bits must be 0)"
    return None


def instr_fields(ins: Instr) -> dict[str, object]:
    return {name: getattr(ins, name) for name in _FIELDS}


def instr_where(i: int, source: str | None = None) -> str:
    where = f"instruction {i} (byte {i * INSTR_BYTES})"
    return f"{source}, {where}" if source else where


PROGRAM_HINT = "the program does not match this version of the ROMA ISA or is corrupted; recompile the model"


def encode(program: Sequence[Instr]) -> bytes:
    """The binary form of ``program``: ``len(program) * INSTR_BYTES`` bytes.

    Raises :class:`ArtifactError` naming the instruction when one is malformed (unknown opcode, a field out
    of range, a non-zero unused field). Does not require a final HALT (see :func:`validate`).
    """
    out = bytearray()
    for i, ins in enumerate(program):
        problem = field_problem(instr_fields(ins))
        if problem:
            raise ArtifactError(problem, where=instr_where(i))
        out += _STRUCT.pack(*(int(getattr(ins, name)) for name in _FIELDS))
    return bytes(out)


def decode(data: bytes, *, source: str = "program") -> list[Instr]:
    """The instructions encoded in ``data`` (inverse of :func:`encode`; comments are empty).

    Raises :class:`ArtifactError` on a length that is not a multiple of :data:`INSTR_BYTES`, an unknown
    opcode, a buffer id out of range, or a non-zero unused field (or flag bit), naming the instruction index.
    ``source`` names the data in messages (e.g. ``"program.bin"``).
    """
    data = bytes(data)
    whole, rest = divmod(len(data), INSTR_BYTES)
    if rest:
        raise ArtifactError(
            f"length {len(data)} bytes is not a multiple of the instruction size {INSTR_BYTES} "
            f"({whole} whole instructions and {rest} stray bytes; instruction {whole} is truncated)",
            where=source,
            hint="the file is truncated or corrupted; recompile the model",
        )
    program = []
    for i, fields in enumerate(_STRUCT.iter_unpack(data)):
        values = dict(zip(_FIELDS, fields))
        problem = field_problem(values)
        if problem:
            raise ArtifactError(problem, where=instr_where(i, source), hint=PROGRAM_HINT)
        s = OPCODES[Opcode(values["op"])]
        for name in s.bufs:
            values[name] = Buf(values[name])
        program.append(Instr(**values))
    return program


def validate(program: Sequence[Instr]) -> None:
    """Check a whole program; raise :class:`ArtifactError` naming the first bad instruction.

    The checks of :func:`decode` on every instruction, and: the program is not empty, its last instruction is
    HALT, every count operand (heads, kv_heads) is positive, and ATTN's heads is a multiple of its kv_heads.
    """
    if len(program) == 0:
        raise ArtifactError("the program is empty", hint="a program ends with HALT")
    for i, ins in enumerate(program):
        problem = field_problem(instr_fields(ins))
        if problem is None:
            s = spec(ins.op)
            for name in ("a", "b"):
                operand = getattr(s, name)
                if operand is not None and operand.kind == "count" and getattr(ins, name) == 0:
                    problem = f"{s.mnemonic}: {operand.key} must be positive"
            if problem is None and s.op is Opcode.ATTN and ins.a % ins.b:
                problem = f"attn: heads={ins.a} is not a multiple of kv_heads={ins.b}"
        if problem:
            raise ArtifactError(problem, where=instr_where(i), hint=PROGRAM_HINT)
    if program[-1].op != Opcode.HALT:
        raise ArtifactError(
            f"the last instruction is {Opcode(program[-1].op).mnemonic}, not halt",
            where=instr_where(len(program) - 1),
            hint="a program ends with HALT",
        )


# --------------------------------------------------------------------------------------------------------------
# Listing


def _f32_text(bits: int) -> str:
    """A text for the float32 with these bits that :func:`_parse_f32` turns back into exactly these bits.

    Shortest decimal when it round-trips (it does for every non-NaN value in practice), else the exact hex
    float; NaNs (whose payload a float cannot carry) as their raw bits ``0x7fc00000``.
    """
    x = bits_f32(bits)
    if x != x:  # NaN
        return f"0x{bits:08x}"
    text = str(np.float32(x))
    if f32_bits(float(text)) == bits:
        return text
    return x.hex()


def _clean(comment: str) -> str:
    """A comment on one line (every line break replaced by a space)."""
    return " ".join(comment.splitlines()).strip()


def _name(names: Sequence[str] | None, i: int) -> str:
    if names is not None and 0 <= i < len(names):
        return _clean(str(names[i]))
    return ""


def _operands(ins: Instr) -> str:
    s = spec(ins.op)
    parts = [Buf(getattr(ins, name)).name.lower() for name in s.bufs]
    if s.layer:
        parts.append(f"layer={ins.layer}")
    for name in ("a", "b"):
        operand: Operand | None = getattr(s, name)
        if operand is not None:
            v = getattr(ins, name)
            parts.append(f"{operand.key}={_f32_text(v) if operand.kind == 'f32' else v}")
    parts += [FLAG_NAMES[bit] for bit in sorted(FLAG_NAMES) if ins.flags & bit]
    return ", ".join(parts)


def _comment(ins: Instr, region_names: Sequence[str] | None, slot_names: Sequence[str] | None) -> str:
    text = _clean(ins.comment)
    if text:
        return text
    s = spec(ins.op)
    for name in ("a", "b"):
        operand: Operand | None = getattr(s, name)
        if operand is not None and operand.kind in ("region", "slot"):
            text = _name(region_names if operand.kind == "region" else slot_names, getattr(ins, name))
            if text:
                return text
    return ""


MNEMONIC_WIDTH = 9
OPERANDS_WIDTH = 24


def format_instr(
    ins: Instr, region_names: Sequence[str] | None = None, slot_names: Sequence[str] | None = None
) -> str:
    """One instruction as listing text without the address, e.g. ``matvec   q, h, r=5 ; layers.0...``."""
    text = f"{spec(ins.op).mnemonic:<{MNEMONIC_WIDTH}}{_operands(ins)}"
    comment = _comment(ins, region_names, slot_names)
    if comment:
        text = f"{text:<{MNEMONIC_WIDTH + OPERANDS_WIDTH}} ; {comment}"
    return text.rstrip()


def validate_operands(program: Sequence[Instr], n_regions: int, n_slots: int) -> None:
    """Every region and slot operand of ``program`` names one of ``n_regions`` regions / ``n_slots`` slots."""
    for i, ins in enumerate(program):
        s = spec(ins.op)
        for name in ("a", "b"):
            operand = getattr(s, name)
            if operand is not None and operand.kind in ("region", "slot"):
                limit = n_regions if operand.kind == "region" else n_slots
                if not 0 <= getattr(ins, name) < limit:
                    raise ArtifactError(f"{s.mnemonic}: {operand.key}={getattr(ins, name)} is not one of the "
                                        f"{limit} {operand.kind}s", where=instr_where(i), hint=PROGRAM_HINT)
