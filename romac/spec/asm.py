"""The ROMA program as text: the listing of a whole program (``program.asm``), the assembler that reads it back into
the same instructions, and the opcode table of docs/isa.md, all derived from :data:`romac.spec.isa.OPCODES`."""

from __future__ import annotations

import re
from typing import Sequence

from romac.errors import ArtifactError, RomacError
from romac.spec.isa import (
    BUF_BY_NAME,
    BY_MNEMONIC,
    FIELD_BITS,
    FLAG_BY_NAME,
    FLAG_NAMES,
    INSTR_BYTES,
    OPCODES,
    Buf,
    Instr,
    Operand,
    f32_bits,
    field_problem,
    format_instr,
    instr_fields,
    instr_where,
    MNEMONIC_WIDTH,
    OPERANDS_WIDTH,
)


def disassemble(
    program: Sequence[Instr],
    region_names: Sequence[str] | None = None,
    slot_names: Sequence[str] | None = None,
) -> str:
    """The listing of ``program``, one instruction a line, which :func:`assemble` turns back into it.

    Each line: the address (instruction index), the mnemonic, the operands (buffers by lower-case name, then
    ``layer=``, ``r=``/``slot=``/``eps=``/``heads=``/``kv_heads=``, then flags such as ``acc``), and after
    ``;`` the instruction's comment or, when it has none, the name of its region or LoRA slot.
    """
    for i, ins in enumerate(program):
        problem = field_problem(instr_fields(ins))
        if problem:
            raise ArtifactError(problem, where=instr_where(i))
    width = max(5, len(str(max(len(program) - 1, 0))))
    lines = [
        f"; ROMA program: {len(program)} instructions of {INSTR_BYTES} bytes",
        f"{';':<{width - 4}}addr  {'op':<{MNEMONIC_WIDTH}}{'operands':<{OPERANDS_WIDTH}} ; comment",
    ]
    for i, ins in enumerate(program):
        lines.append(f"{i:>{width}}  {format_instr(ins, region_names, slot_names)}")
    return "\n".join(lines) + "\n"


def _parse_f32(text: str) -> int:
    t = text.strip().lower()
    if re.fullmatch(r"0x[0-9a-f]+", t):  # raw bits
        bits = int(t, 16)
        if bits >= 1 << 32:
            raise ValueError(f"raw float32 bits {text} do not fit in 32 bits")
        return bits
    if "0x" in t:
        return f32_bits(float.fromhex(t))
    return f32_bits(float(t))


def _parse_uint(text: str, bits: int, what: str) -> int:
    t = text.strip()
    if re.fullmatch(r"[0-9]+", t):
        v = int(t, 10)
    elif re.fullmatch(r"0[xX][0-9a-fA-F]+", t):
        v = int(t, 16)
    else:
        raise ValueError(f"{what} must be an unsigned integer, got {text!r}")
    if v >= 1 << bits:
        raise ValueError(f"{what} = {v} does not fit in {bits} unsigned bits")
    return v


def _assemble_line(code: str, comment: str) -> Instr:
    words = code.split(None, 1)
    head = words[0]
    rest = words[1] if len(words) > 1 else ""
    if re.fullmatch(r"[0-9]+", head):  # the address column: informational, not checked
        words = rest.split(None, 1)
        if not words:
            raise ValueError("an address without an instruction")
        head = words[0]
        rest = words[1] if len(words) > 1 else ""
    s = BY_MNEMONIC.get(head.lower())
    if s is None:
        raise ValueError(f"unknown mnemonic {head!r} (known: {', '.join(sorted(BY_MNEMONIC))})")
    tokens = [t.strip() for t in rest.split(",")] if rest.strip() else []
    values: dict[str, int] = {}
    bufs: list[Buf] = []
    flags = 0
    keys: dict[str, str] = {}  # listing keyword -> field
    if s.layer:
        keys["layer"] = "layer"
    for name in ("a", "b"):
        operand: Operand | None = getattr(s, name)
        if operand is not None:
            keys[operand.key] = name
    for tok in tokens:
        if not tok:
            raise ValueError("empty operand (a stray comma?)")
        if "=" in tok:
            key, _, val = (p.strip() for p in tok.partition("="))
            key = key.lower()
            if key not in keys:
                allowed = ", ".join(f"{k}=" for k in keys) or "none"
                raise ValueError(f"{s.mnemonic} has no operand {key}= (its keyword operands: {allowed})")
            name = keys[key]
            if name in values:
                raise ValueError(f"operand {key}= given twice")
            operand = getattr(s, name) if name in ("a", "b") else None
            if operand is not None and operand.kind == "f32":
                try:
                    values[name] = _parse_f32(val)
                except (ValueError, OverflowError) as exc:
                    raise ValueError(f"{key}= must be a float, got {val!r} ({exc})") from None
            else:
                values[name] = _parse_uint(val, FIELD_BITS[name], key)
        elif tok.lower() in FLAG_BY_NAME:
            bit = FLAG_BY_NAME[tok.lower()]
            if not s.flags & bit:
                raise ValueError(f"{s.mnemonic} does not take the flag {tok.lower()}")
            if flags & bit:
                raise ValueError(f"flag {tok.lower()} given twice")
            flags |= bit
        elif tok.lower() in BUF_BY_NAME:
            if values:
                raise ValueError(f"buffer {tok} after a keyword operand (buffers come first)")
            bufs.append(BUF_BY_NAME[tok.lower()])
        else:
            raise ValueError(
                f"unknown operand {tok!r} (buffers: {', '.join(BUF_BY_NAME)}; flags: {', '.join(FLAG_BY_NAME)})"
            )
    if len(bufs) != len(s.bufs):
        raise ValueError(
            f"{s.mnemonic} takes {len(s.bufs)} buffer operand(s) ({', '.join(s.bufs) or 'none'}), got {len(bufs)}"
        )
    missing = [k for k, name in keys.items() if name not in values]
    if missing:
        raise ValueError(f"{s.mnemonic} is missing operand(s) {', '.join(k + '=' for k in missing)}")
    return Instr(s.op, **dict(zip(s.bufs, bufs)), **values, flags=flags, comment=comment)


def assemble(text: str, *, source: str | None = None) -> list[Instr]:
    """The instructions of a listing (the inverse of :func:`disassemble`).

    Lines are ``[address] mnemonic operands [; comment]``; the address column is informational and ignored.
    Blank lines and lines holding only a ``;`` comment are skipped. The text after ``;`` becomes the
    instruction's comment. Raises :class:`RomacError` with the line number on anything it cannot read.
    A final HALT is not required here; call :func:`validate` for whole-program checks.
    """
    program = []
    for n, line in enumerate(text.split("\n"), start=1):
        code, sep, comment = line.partition(";")
        code = code.strip()
        if not code:
            continue
        try:
            program.append(_assemble_line(code, comment.strip() if sep else ""))
        except ValueError as exc:
            where = f"{source}, line {n}" if source else f"line {n}"
            raise RomacError(str(exc), where=where, hint=f"in {line.strip()!r}") from None
    return program


# --------------------------------------------------------------------------------------------------------------
# Documentation


def markdown_opcode_table() -> str:
    """The opcode table of ``docs/isa.md``, generated from :data:`OPCODES` (a test keeps the doc in sync)."""
    rows = [
        "| opcode | mnemonic | buffers | layer | flags | a | b | semantics |",
        "| ---: | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in OPCODES.values():

        def operand(o: Operand | None) -> str:
            return f"`{o.key}=` {o.kind}: {o.doc}" if o else "—"

        flags = ", ".join(f"`{FLAG_NAMES[b]}` (bit {b.bit_length() - 1})" for b in sorted(FLAG_NAMES) if s.flags & b)
        rows.append(
            f"| {int(s.op)} | `{s.mnemonic}` | {', '.join(s.bufs) or '—'} | {'yes' if s.layer else '—'} "
            f"| {flags or '—'} | {operand(s.a)} | {operand(s.b)} | {s.summary} |"
        )
    return "\n".join(rows) + "\n"
