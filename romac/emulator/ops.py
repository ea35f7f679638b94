"""What each instruction does: the living definition of the ISA's semantics (docs/isa.md describes it).

Every handler works on whole buffers of T positions with a few vectorised numpy calls, in float32 (the
target's activation and accumulator precision). ``m`` is the :class:`romac.emulator.machine.Machine`.

The handlers are on the decode hot path (one step of SmolLM2-135M runs ~700 of them), so they update the
temporaries they have just allocated in place rather than allocating a new array per operator; each such
line keeps the order and the operands of the formula it implements, so the float32 results are the same.
A handler never writes into an array it did not allocate in this call (buffers may be read by later steps,
and the logits are handed to the caller).
"""

from __future__ import annotations

import numpy as np

from romac.spec.isa import FLAG_ACCUMULATE, FLAG_CORRECTION, Instr, Opcode, bits_f32


def embed(m, i: Instr) -> None:
    m.buf[i.dst] = m.embed_rows(i.a, m.buf[i.src0])


def rmsnorm(m, i: Instr) -> None:
    # y = x / sqrt(mean(x * x) + eps) * w
    x = m.buf[i.src0]
    var = np.add.reduce(x * x, axis=-1, keepdims=True)  # np.mean's own sum (pairwise), without its overhead
    var /= np.float32(x.shape[-1])
    var += np.float32(bits_f32(i.b))
    y = x / np.sqrt(var, out=var)
    y *= m.rom.value(i.a)
    m.buf[i.dst] = y


def matvec(m, i: Instr) -> None:
    # y = x @ W^T (+ dst with the accumulate flag)
    y = m.matmul_wt(m.buf[i.src0], i.a)
    if i.flags & FLAG_ACCUMULATE:
        y += m.buf[i.dst]
    m.buf[i.dst] = y


def lora(m, i: Instr) -> None:
    ab = (m.sram.correction if i.flags & FLAG_CORRECTION else m.sram.lora).get(i.a)
    if ab is None:
        return
    a_t, b_t, scaling = ab
    # dst + ((x @ A^T) @ B^T) * scaling
    d = (m.buf[i.src0] @ a_t) @ b_t
    d *= scaling
    d += m.buf[i.dst]
    m.buf[i.dst] = d


def rope(m, i: Instr) -> None:
    x = m.buf[i.src0]
    t, width = x.shape
    heads = i.b
    cos, sin = m.rope_tables(i.a, t)
    xh = x.reshape(t, heads, width // heads)
    half = xh.shape[-1] // 2
    # y = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; (-x2) * s added is x2 * s subtracted
    cos, sin = cos[:, None, :], sin[:, None, :]
    y = xh * cos
    y[..., :half] -= xh[..., half:] * sin[..., :half]
    y[..., half:] += xh[..., :half] * sin[..., half:]
    m.buf[i.dst] = y.reshape(t, width)


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
    scores = qh @ kh[:, None]  # [kvh, g, t, end]
    scores *= np.float32(1.0 / np.sqrt(hd))
    if t > 1:
        causal = np.arange(end)[None, :] > (m.pos0 + np.arange(t))[:, None]
        scores[:, :, causal] = np.float32(-np.inf)
    # softmax over the context: exp(s - max) / sum(exp(s - max))
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = scores @ vh[:, None]  # [kvh, g, t, hd]
    m.buf[i.dst] = out.transpose(2, 0, 1, 3).reshape(t, heads * hd)


def swiglu(m, i: Instr) -> None:
    # silu(g) * u = g / (1 + exp(-g)) * u
    g = m.buf[i.src0]
    e = np.negative(g)
    np.exp(e, out=e)
    e += np.float32(1.0)
    y = np.divide(g, e, out=e)
    y *= m.buf[i.src1]
    m.buf[i.dst] = y


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
