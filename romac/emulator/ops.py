"""What each instruction does: the living definition of the ISA's semantics (docs/isa.md describes it).

Every handler works on whole buffers of T positions with a few vectorised numpy calls, in float32 (the
target's activation and accumulator precision). ``m`` is the :class:`romac.emulator.machine.Machine`.
"""

from __future__ import annotations

import numpy as np

from romac.backend.isa import FLAG_ACCUMULATE, Instr, Opcode, bits_f32


def embed(m, i: Instr) -> None:
    table = m.rom.value(i.a)
    m.buf[i.dst] = table[m.buf[i.src0]]


def rmsnorm(m, i: Instr) -> None:
    x = m.buf[i.src0]
    var = np.mean(x * x, axis=-1, keepdims=True)
    m.buf[i.dst] = x / np.sqrt(var + np.float32(bits_f32(i.b))) * m.rom.value(i.a)


def matvec(m, i: Instr) -> None:
    w_t = m.weight_t(i.a)
    y = m.buf[i.src0] @ w_t
    m.buf[i.dst] = m.buf[i.dst] + y if i.flags & FLAG_ACCUMULATE else y


def lora(m, i: Instr) -> None:
    ab = m.sram.lora.get(i.a)
    if ab is None:
        return
    a_t, b_t, scaling = ab
    m.buf[i.dst] = m.buf[i.dst] + ((m.buf[i.src0] @ a_t) @ b_t) * scaling


def rope(m, i: Instr) -> None:
    x = m.buf[i.src0]
    t, width = x.shape
    heads = i.b
    cos, sin = m.rope_tables(i.a, t)
    xh = x.reshape(t, heads, width // heads)
    half = xh.shape[-1] // 2
    rotated = np.concatenate([-xh[..., half:], xh[..., :half]], axis=-1)
    m.buf[i.dst] = (xh * cos[:, None, :] + rotated * sin[:, None, :]).reshape(t, width)


def kvstore(m, i: Instr) -> None:
    m.sram.store_kv(i.layer, m.pos0, m.buf[i.src0], m.buf[i.src1])


def attn(m, i: Instr) -> None:
    q = m.buf[i.src0]
    t = q.shape[0]
    end = m.pos0 + t
    k, v = m.sram.read_kv(i.layer, end)
    heads, kv_heads = i.a, i.b
    hd = q.shape[1] // heads
    group = heads // kv_heads
    qh = q.reshape(t, kv_heads, group, hd).transpose(1, 2, 0, 3)  # [kvh, g, t, hd]
    kh = k.reshape(end, kv_heads, hd).transpose(1, 2, 0)  # [kvh, hd, end]
    vh = v.reshape(end, kv_heads, hd).transpose(1, 0, 2)  # [kvh, end, hd]
    scores = (qh @ kh[:, None]) * np.float32(1.0 / np.sqrt(hd))  # [kvh, g, t, end]
    if t > 1:
        causal = np.arange(end)[None, :] > (m.pos0 + np.arange(t))[:, None]
        scores = np.where(causal, np.float32(-np.inf), scores)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    out = probs @ vh[:, None]  # [kvh, g, t, hd]
    m.buf[i.dst] = out.transpose(2, 0, 1, 3).reshape(t, heads * hd)


def swiglu(m, i: Instr) -> None:
    g = m.buf[i.src0]
    m.buf[i.dst] = g / (np.float32(1.0) + np.exp(-g)) * m.buf[i.src1]


def add(m, i: Instr) -> None:
    m.buf[i.dst] = m.buf[i.src0] + m.buf[i.src1]


def nop(m, i: Instr) -> None:
    return None


SEMANTICS = {
    Opcode.NOP: nop,
    Opcode.EMBED: embed,
    Opcode.RMSNORM: rmsnorm,
    Opcode.MATVEC: matvec,
    Opcode.LORA: lora,
    Opcode.ROPE: rope,
    Opcode.KVSTORE: kvstore,
    Opcode.ATTN: attn,
    Opcode.SWIGLU: swiglu,
    Opcode.ADD: add,
}
