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


def tree_sum(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """The sum along ``axis`` as a balanced binary tree, in float32: with n terms and h the largest power of two
    below n, term i + h is added to term i (i < n - h; the others are carried as they are), and so on over the h
    partial sums until one is left. It is the order every sum of the vector unit's instructions takes, here and in
    romac/emulator/_vunit.c. (numpy's own sum order depends on the array's shape and layout; this one does not.)
    """
    a = np.moveaxis(a, axis, 0)
    n = a.shape[0]
    while n > 1:
        h = 1 << ((n - 1).bit_length() - 1)
        s = a[:h].copy()
        s[: n - h] += a[h:n]
        a, n = s, h
    return a[0]


#: the most floats a handler's temporary holds: longer prefills are computed a block of positions at a time
TEMPORARY_FLOATS = 1 << 22


def _position_blocks(t: int, floats_per_position: int) -> list[slice]:
    """Slices of the T positions small enough that a temporary of ``floats_per_position`` each fits."""
    block = max(1, TEMPORARY_FLOATS // max(1, floats_per_position))
    return [slice(p, min(t, p + block)) for p in range(0, t, block)]


def embed(m, i: Instr) -> None:
    m.buf[i.dst] = m.embed_rows(i.a, m.buf[i.src0])


def rmsnorm(m, i: Instr) -> None:
    # y = x / sqrt(mean(x * x) + eps) * w
    x = m.buf[i.src0]
    var = tree_sum(x * x, axis=-1)[:, None]
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
    # dst + ((x @ A^T) @ B^T) * scaling, each sum a tree_sum (not BLAS's order, which changes with the library
    # and the CPU)
    x = m.buf[i.src0]
    d = np.empty((x.shape[0], b_t.shape[1]), np.float32)
    for p in _position_blocks(x.shape[0], a_t.size + b_t.size):
        h = tree_sum(x[p, :, None] * a_t, axis=1)  # [T, rank]
        d[p] = tree_sum(h[:, :, None] * b_t, axis=1)
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
    # softmax(q k^T / sqrt(hd), causal) v per head, a kv head shared by `group` query heads; each sum a tree_sum
    # (over hd, over the context), exp taken in float64 and rounded (numpy's float32 exp is CPU-specific code)
    q = m.buf[i.src0]
    t = q.shape[0]
    end = m.pos0 + t
    k, v = m.sram.read_kv(i.layer, end)
    heads, kv_heads = i.a, i.b
    hd = q.shape[1] // heads
    group = heads // kv_heads
    kh = k.reshape(end, kv_heads, hd).transpose(1, 0, 2)[:, None, None]  # [kvh, 1, 1, end, hd]
    vh = v.reshape(end, kv_heads, hd).transpose(1, 0, 2)[:, None, None]
    out = np.empty((t, kv_heads, group, hd), np.float32)
    for p in _position_blocks(t, heads * end * hd):
        qh = q[p].reshape(-1, kv_heads, group, hd).transpose(1, 2, 0, 3)  # [kvh, g, t, hd]
        scores = tree_sum(qh[:, :, :, None, :] * kh, axis=-1)  # [kvh, g, t, end]
        scores *= np.float32(1.0 / np.sqrt(hd))
        rows = m.pos0 + np.arange(t)[p]
        causal = np.arange(end)[None, :] > rows[:, None]
        if causal.any():
            scores[:, :, causal] = np.float32(-np.inf)
        # softmax over the context: exp(s - max) / sum(exp(s - max))
        scores -= scores.max(axis=-1, keepdims=True)
        scores = np.exp(scores, dtype=np.float64).astype(np.float32)
        scores /= tree_sum(scores, axis=-1)[..., None]
        out[p] = tree_sum(scores[..., None] * vh, axis=-2).transpose(2, 0, 1, 3)  # [t, kvh, g, hd]
    m.buf[i.dst] = out.reshape(t, heads * hd)


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
