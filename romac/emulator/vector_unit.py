"""The native kernel's handlers of the per-position instructions (RMSNORM, ROPE, LORA, ATTN): the C extension
``romac.emulator._vunit``, which computes what romac.emulator.ops computes, in the same order, to the bit.

romac.emulator.ops stays the definition (and what the numba and numpy kernels run); these handlers replace four of
its handlers where the extension is built (setup.py: it is optional, like the product kernel). The rest of the
instructions (EMBED, MATVEC, KVSTORE, SWIGLU, ADD) already cost one or two calls each and keep ops.py's handlers.

A LORA right after the MATVEC it corrects (same input, same destination) is computed by the product kernel beside
the product (``fuse_products``): the two threads share the LORA's work and the product's rows, and the result is
the same bits as the two instructions one after the other.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable

import numpy as np

from romac.emulator.ops import SEMANTICS
from romac.spec.isa import FLAG_ACCUMULATE, FLAG_CORRECTION, Instr, Opcode, bits_f32

# A compiled module, not one of the package's Python modules, so it is looked up rather than imported by name.
_VUNIT = "romac.emulator._vunit"
_vunit = importlib.import_module(_VUNIT) if importlib.util.find_spec(_VUNIT) is not None else None
# an instruction's float32 operand from its bits: a handful of distinct values (the norms' eps), each converted once
_f32_operand = functools.lru_cache(maxsize=256)(bits_f32)


def rmsnorm(m, i: Instr) -> None:
    x = m.buf[i.src0]
    y = np.empty_like(x)
    _vunit.rmsnorm(x, m.rom.value(i.a), _f32_operand(i.b), y, x.shape[0], x.shape[1])
    m.buf[i.dst] = y


def rope(m, i: Instr) -> None:
    x = m.buf[i.src0]
    t, width = x.shape
    cos, sin = m.rope_tables(i.a, t)
    y = np.empty_like(x)
    _vunit.rope(x, cos, sin, y, t, i.b, width // i.b)
    m.buf[i.dst] = y


def _slot(m, i: Instr) -> tuple | None:
    """The LORA's slot as the kernels take it: (A's codes, A's scale, B^T's codes, B's scale, code values, code
    bytes, scaling, rank), or None if the slot holds nothing."""
    sram = m.sram
    codes = (sram.correction_codes if i.flags & FLAG_CORRECTION else sram.lora_codes).get(i.a)
    if codes is None:
        return None
    a, a_scale, bt, b_scale, scaling = codes
    return a, a_scale, bt, b_scale, sram.code_values, sram.code_bytes, scaling, bt.shape[0]


def lora(m, i: Instr) -> None:
    slot = _slot(m, i)
    if slot is None:
        return
    a, a_scale, bt, b_scale, values, code_bytes, scaling, rank = slot
    x, dst = m.buf[i.src0], m.buf[i.dst]
    y = np.empty_like(dst)
    _vunit.lora(x, a, a_scale, bt, b_scale, values, code_bytes, scaling, dst, y, x.shape[0], x.shape[1], rank,
                bt.shape[1] // code_bytes)
    m.buf[i.dst] = y


def matvec_lora(m, mv: Instr, lo: Instr) -> None:
    """MATVEC ``mv`` then LORA ``lo`` (same input and destination) in one call of the product kernel."""
    slot = _slot(m, lo)
    both = m.matmul_wt_lora(m.buf[mv.src0], mv.a, slot) if slot is not None else None
    if both is None:  # an empty slot, or a matrix the C kernel does not compute
        SEMANTICS[Opcode.MATVEC](m, mv)
        lora(m, lo)
        return
    y, ds = both
    if mv.flags & FLAG_ACCUMULATE:
        y += m.buf[mv.dst]
    y += ds  # ops.lora's dst + delta * scaling
    m.buf[mv.dst] = y


def reads_codes(code_values: np.ndarray, code_bytes: int) -> bool:
    """Whether the C code computes with LoRA codes of this format: 2-byte codes through their table of values,
    1-byte codes by its own FP8 E4M3 arithmetic, so only where that table is E4M3's."""
    if _vunit is None:
        return False
    if code_bytes == 2:
        return True
    return code_bytes == 1 and np.array_equal(code_values, np.array(_vunit.fp8_values(), np.float32), equal_nan=True)


def native_handlers(program: list[Instr], code_values: np.ndarray, code_bytes: int) -> list[tuple[Callable, Instr]]:
    """A program's handlers for the native kernel: NATIVE_SEMANTICS's, ops.py's LORA where the C code does not
    read the SRAM's LoRA format, and each MATVEC that a LORA of the same input and destination follows fused with
    it (``matvec_lora``)."""
    semantics = dict(NATIVE_SEMANTICS)
    if not reads_codes(code_values, code_bytes):
        semantics[Opcode.LORA] = SEMANTICS[Opcode.LORA]
    handlers = [(semantics[i.op], i) for i in program if i.op != Opcode.HALT]
    return fuse_products(handlers) if semantics[Opcode.LORA] is lora else handlers


def fuse_products(handlers: list[tuple[Callable, Instr]]) -> list[tuple[Callable, Instr]]:
    """The handlers with each MATVEC that a LORA of the same input and destination follows replaced by one
    ``matvec_lora`` of the two."""
    out: list[tuple[Callable, Instr]] = []
    k = 0
    while k < len(handlers):
        mv = handlers[k][1]
        lo = handlers[k + 1][1] if k + 1 < len(handlers) else None
        if (mv.op == Opcode.MATVEC and lo is not None and lo.op == Opcode.LORA and lo.src0 == mv.src0
                and lo.dst == mv.dst and mv.src0 != mv.dst):
            out.append((functools.partial(matvec_lora, lo=lo), mv))
            k += 2
        else:
            out.append(handlers[k])
            k += 1
    return out


def attn(m, i: Instr) -> None:
    q = m.buf[i.src0]
    t = q.shape[0]
    k, v = m.sram.read_kv(i.layer, m.pos0 + t)
    y = np.empty_like(q)
    _vunit.attn(q, k, v, y, t, m.pos0, i.a, i.b, q.shape[1] // i.a)
    m.buf[i.dst] = y


#: the native kernel's semantics: ops.py's, with these four in C where the extension is built
NATIVE_SEMANTICS = dict(SEMANTICS)
if _vunit is not None:
    NATIVE_SEMANTICS.update({Opcode.RMSNORM: rmsnorm, Opcode.ROPE: rope, Opcode.LORA: lora, Opcode.ATTN: attn})


def built() -> bool:
    """Whether the C extension is built (otherwise the native kernel runs ops.py's handlers for these)."""
    return _vunit is not None
