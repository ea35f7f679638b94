"""The native kernel's handlers of the per-position instructions (RMSNORM, ROPE, LORA, ATTN): the C extension
``romac.emulator._vunit``, which computes what romac.emulator.ops computes, in the same order, to the bit.

romac.emulator.ops stays the definition (and what the numba and numpy kernels run); these handlers replace four of
its handlers where the extension is built (setup.py: it is optional, like the product kernel). The rest of the
instructions (EMBED, MATVEC, KVSTORE, SWIGLU, ADD) already cost one or two calls each and keep ops.py's handlers.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import numpy as np

from romac.emulator.ops import SEMANTICS
from romac.spec.isa import FLAG_CORRECTION, Instr, Opcode, bits_f32

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


def lora(m, i: Instr) -> None:
    sram = m.sram
    codes = (sram.correction_codes if i.flags & FLAG_CORRECTION else sram.lora_codes).get(i.a)
    if codes is None:
        return
    a, a_scale, b, b_scale = codes
    scaling = (sram.correction if i.flags & FLAG_CORRECTION else sram.lora)[i.a][2]
    x, dst = m.buf[i.src0], m.buf[i.dst]
    y = np.empty_like(dst)
    rank, out = b.shape[0], b.shape[1] // sram.code_bytes
    _vunit.lora(x, a, a_scale, b, b_scale, sram.code_values, sram.code_bytes, float(scaling), dst, y, x.shape[0],
                x.shape[1], rank, out)
    m.buf[i.dst] = y


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
