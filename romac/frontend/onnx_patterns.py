"""Recognise a LLaMA decoder in an op-level ONNX graph by its data flow, not by node or tensor names.

Matching walks backwards from the logits: LM head ← final RMSNorm ← per layer (residual add ← SwiGLU MLP ←
RMSNorm, residual add ← attention ← RMSNorm) ← embedding gather. Each matcher accepts the spellings the torch
exporters produce (``Pow(x,2)`` or ``x*x``; ``Reciprocal(Sqrt)``, ``Div`` or ``Pow(-0.5)``; the fused
``RMSNormalization`` op; RoPE as ``x*cos + rotate_half(x)*sin`` with cos/sin computed or gathered from tables;
grouped-query attention with ``Expand``/``Reshape`` head repetition, the softmax scale on the scores or split
between q and k, an additive or ``Where`` causal mask, and past-key/value ``Concat`` for KV-cache exports;
SiLU as ``x*Sigmoid(x)``). Layout ops (Reshape, Transpose, (Un)Squeeze, Expand, Cast) are looked through.

Every node that computes on the hidden state must belong to a recognised pattern; one that does not ends in
an error naming it. What the patterns cannot show (the RoPE frequencies, causality) the front-end checks by
running the graph (``romac.frontend.onnx_model``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from romac.errors import RomacError
from romac.frontend.onnx_graph import LAYOUT, TRANSPARENT, OnnxGraph, WeightRef, describe

FLOAT_CASTS = {1, 10, 11, 16}


class NoMatch(Exception):
    """A pattern did not match at ``node`` (internal: matchers try alternatives)."""

    def __init__(self, what: str, node=None) -> None:
        super().__init__(what)
        self.what, self.node = what, node


@dataclass
class Norm:
    x: str  # the normalised value
    gain: str  # initializer of the gain vector
    eps: float


@dataclass
class Attention:
    x: str  # input of q/k/v (the RMSNorm output)
    q: WeightRef
    k: WeightRef
    v: WeightRef
    o: WeightRef
    scale: float
    cos: str
    sin: str
    past: list[str] = field(default_factory=list)


@dataclass
class Layer:
    input_norm: Norm
    attention: Attention
    post_norm: Norm
    gate: WeightRef
    up: WeightRef
    down: WeightRef


@dataclass
class Decoder:
    embedding: str  # initializer [vocab, hidden]
    embedding_out: str
    input_ids: str
    layers: list[Layer]
    final_norm: Norm
    lm_head: WeightRef
    logits: str
    final_hidden: str  # the final norm's output, every position (before any logits_to_keep slicing)


class Matcher:
    def __init__(self, g: OnnxGraph) -> None:
        self.g = g
        self.used: set[int] = set()
        self.embedding, self.embedding_out, self.input_ids = self._embedding()
        self.hidden = g.descendants([self.embedding_out])

    # ----- small helpers ----------------------------------------------------------------------------------
    def dyn(self, v: str) -> bool:
        return v in self.hidden

    def prod(self, v: str):
        return self.g.producer.get(v)

    def take(self, node) -> None:
        self.used.add(id(node))

    def back(self, v: str, ops=TRANSPARENT) -> str:
        """Follow ``v`` up through ops in ``ops`` whose only hidden-state input is their first."""
        while True:
            p = self.prod(v)
            if p is None or p.op_type not in ops:
                return v
            if p.op_type == "Cast" and self.g.attr(p, "to") not in FLOAT_CASTS:
                return v
            if any(self.dyn(i) for i in p.input[1:] if i):
                return v
            self.take(p)
            v = p.input[0]

    def same(self, a: str, b: str) -> bool:
        return self.back(a) == self.back(b)

    def split(self, node) -> tuple[list[str], list[str]]:
        """A node's (hidden-state inputs, other inputs)."""
        ins = [i for i in node.input if i]
        return [i for i in ins if self.dyn(i)], [i for i in ins if not self.dyn(i)]

    def expect(self, v: str, *ops: str):
        p = self.prod(self.back(v))
        if p is None or p.op_type not in ops:
            raise NoMatch(f"expected {' or '.join(ops)}", p)
        return p

    # ----- embedding -----------------------------------------------------------------------------------------
    def _embedding(self) -> tuple[str, str, str]:
        ids = [i.name for i in self.g.inputs if i.type.tensor_type.elem_type in (6, 7)]
        for n in self.g.nodes:
            if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] in ids and self.g.attr(n, "axis", 0) == 0:
                ref = n.input[0]
                while ref not in self.g.initializers and self.prod(ref) is not None and self.prod(ref).op_type in TRANSPARENT:
                    self.take(self.prod(ref))
                    ref = self.prod(ref).input[0]
                if ref in self.g.initializers and len(self.g.initializers[ref].dims) == 2:
                    self.take(n)
                    return ref, n.output[0], n.input[1]
        raise RomacError("no token embedding found (a Gather of a 2-D weight by the input ids)",
                         where=str(self.g.path), hint="the graph's first input must be the token ids (int64)")

    # ----- patterns ------------------------------------------------------------------------------------------
    def linear(self, v: str) -> tuple[str, WeightRef]:
        p = self.prod(self.back(v))
        if p is not None and p.op_type == "MatMul" and self.dyn(p.input[0]):
            ref = self.g.weight_ref(p.input[1])
            if ref is not None:
                self.take(p)
                self._take_chain(p.input[1])
                return p.input[0], ref
        if p is not None and p.op_type == "Gemm" and self.dyn(p.input[0]):
            if len(p.input) > 2 and p.input[2]:
                raise RomacError("linear layer with a bias: LLaMA projections have none", where=self.g.where(p))
            if self.g.attr(p, "transA", 0) or self.g.attr(p, "alpha", 1.0) != 1.0:
                raise NoMatch("Gemm with transA or alpha", p)
            ref = self.g.weight_ref(p.input[1])
            if ref is not None:
                self.take(p)
                self._take_chain(p.input[1])
                return p.input[0], WeightRef(ref.initializer, not ref.transposed if self.g.attr(p, "transB", 0) else ref.transposed)
        raise NoMatch("expected a MatMul by a weight matrix", p)

    def _take_chain(self, v: str) -> None:
        while v not in self.g.initializers and self.prod(v) is not None:
            self.take(self.prod(v))
            v = self.prod(v).input[0]

    def gain(self, v: str) -> str | None:
        v = self.back(v)
        while v not in self.g.initializers and self.prod(v) is not None and self.prod(v).op_type in TRANSPARENT:
            self.take(self.prod(v))
            v = self.prod(v).input[0]
        t = self.g.initializers.get(v)
        return v if t is not None and len(t.dims) == 1 else None

    def rmsnorm(self, v: str) -> Norm:
        p = self.prod(self.back(v))
        if p is None:
            raise NoMatch("expected RMSNorm", p)
        if p.op_type in ("RMSNormalization", "SimplifiedLayerNormalization"):
            gain = self.gain(p.input[1])
            if gain is None or self.g.attr(p, "axis", -1) not in (-1, 2):
                raise NoMatch("RMSNormalization over another axis or without a constant gain", p)
            self.take(p)
            return Norm(p.input[0], gain, float(self.g.attr(p, "epsilon", 1e-5)))
        if p.op_type != "Mul":
            raise NoMatch("expected RMSNorm (x * rsqrt(mean(x^2) + eps) * gain)", p)
        dyn, const = self.split(p)
        if len(dyn) != 1 or len(const) != 1 or (gain := self.gain(const[0])) is None:
            raise NoMatch("expected RMSNorm's multiplication by a gain vector", p)
        y = self.prod(self.back(dyn[0]))
        if y is None or y.op_type not in ("Mul", "Div"):
            raise NoMatch("expected RMSNorm's scaling by rsqrt(mean(x^2) + eps)", y)
        a, b = y.input[0], y.input[1]
        if y.op_type == "Div":
            x, z = a, self._sqrt_arg(b, inverse=False)
        else:
            try:
                x, z = a, self._sqrt_arg(b, inverse=True)
            except NoMatch:
                x, z = b, self._sqrt_arg(a, inverse=True)
        add = self.expect(z, "Add")
        mean_in = [i for i in add.input if self.dyn(i)]
        eps_in = [i for i in add.input if not self.dyn(i)]
        eps = self.g.scalar(eps_in[0]) if len(eps_in) == 1 else None
        if len(mean_in) != 1 or eps is None:
            raise NoMatch("expected mean(x^2) + eps", add)
        rm = self.expect(mean_in[0], "ReduceMean")
        axes = self.g.attr(rm, "axes")
        if axes is None and len(rm.input) > 1:
            axes = self.g.const(rm.input[1])
        if axes is None or [int(a) for a in np.ravel(axes)] not in ([-1], [2]) or not self.g.attr(rm, "keepdims", 1):
            raise NoMatch("RMSNorm's mean must run over the last axis", rm)
        sq = self.expect(rm.input[0], "Pow", "Mul")
        if sq.op_type == "Pow" and self.g.scalar(sq.input[1]) != 2.0 or sq.op_type == "Mul" and not self.same(sq.input[0], sq.input[1]):
            raise NoMatch("expected x^2", sq)
        if not self.same(sq.input[0], x):
            raise NoMatch("RMSNorm squares another tensor than it scales", sq)
        for n in (p, y, add, rm, sq):
            self.take(n)
        return Norm(self.back(x), gain, eps)

    def _sqrt_arg(self, v: str, inverse: bool) -> str:
        p = self.prod(self.back(v))
        if p is None:
            raise NoMatch("expected sqrt", p)
        if inverse and p.op_type == "Reciprocal":
            s = self.expect(p.input[0], "Sqrt")
            self.take(p), self.take(s)
            return s.input[0]
        if inverse and p.op_type == "Div" and self.g.scalar(p.input[0]) == 1.0:
            s = self.expect(p.input[1], "Sqrt")
            self.take(p), self.take(s)
            return s.input[0]
        if inverse and p.op_type == "Pow" and self.g.scalar(p.input[1]) == -0.5:
            self.take(p)
            return p.input[0]
        if not inverse and p.op_type == "Sqrt":
            self.take(p)
            return p.input[0]
        raise NoMatch("expected 1/sqrt(...)" if inverse else "expected sqrt(...)", p)

    def residual(self, v: str) -> tuple[str, str]:
        p = self.prod(self.back(v))
        if p is None or p.op_type != "Add" or len(self.split(p)[0]) != 2:
            raise NoMatch("expected a residual Add of two hidden-state tensors", p)
        self.take(p)
        return p.input[0], p.input[1]

    def mlp(self, v: str) -> tuple[str, WeightRef, WeightRef, WeightRef]:
        x, down = self.linear(v)
        m = self.expect(x, "Mul")
        for act, other in ((m.input[0], m.input[1]), (m.input[1], m.input[0])):
            try:
                g = self.silu(act)
            except NoMatch:
                continue
            n_gate, gate = self.linear(g)
            n_up, up = self.linear(other)
            if not self.same(n_gate, n_up):
                raise NoMatch("gate and up projections read different inputs", m)
            self.take(m)
            return n_gate, gate, up, down
        raise NoMatch("expected SwiGLU: silu(gate(x)) * up(x)", m)

    def silu(self, v: str) -> str:
        m = self.expect(v, "Mul")
        for s, x in ((m.input[0], m.input[1]), (m.input[1], m.input[0])):
            sp = self.prod(self.back(s))
            if sp is not None and sp.op_type == "Sigmoid" and self.same(sp.input[0], x):
                self.take(m), self.take(sp)
                return x
        raise NoMatch("expected silu(x) = x * sigmoid(x)", m)

    def attention(self, v: str) -> Attention:
        x, o = self.linear(v)
        pv = self.expect(self.back(x, LAYOUT), "MatMul")
        if len(self.split(pv)[0]) != 2:
            raise NoMatch("expected probabilities @ values", pv)
        self.take(pv)
        probs, values = pv.input
        s = self.back(probs)
        p = self.prod(s)
        if p is not None and p.op_type == "Where":  # Where(IsNaN(p), 0, p): fully masked rows become zeros
            nan = self.prod(p.input[0])
            if nan is not None and nan.op_type == "IsNaN" and self.same(nan.input[0], p.input[2]):
                self.take(p), self.take(nan)
                s = self.back(p.input[2])
        sm = self.expect(s, "Softmax")
        if self.g.attr(sm, "axis", -1) not in (-1, 3):
            raise NoMatch("softmax over another axis than the keys", sm)
        self.take(sm)
        scale, scores = self._scores(sm.input[0])
        qs, kt = scores.input
        scale_q, cos, sin, q_pre = self._rotary_chain(qs, kv=False)[:4]
        scale_k, _, _, k_pre, past_k = self._rotary_chain(kt, kv=True)
        n_q, q = self.linear(q_pre)
        n_k, k = self.linear(k_pre)
        v_pre, past_v = self._kv_chain(values)
        n_v, vw = self.linear(v_pre)
        if not (self.same(n_q, n_k) and self.same(n_q, n_v)):
            raise NoMatch("q, k and v projections read different inputs", scores)
        return Attention(n_q, q, k, vw, o, scale * scale_q * scale_k, cos, sin, past_k + past_v)

    def _scores(self, v: str):
        scale = 1.0
        while True:
            p = self.prod(self.back(v))
            if p is None:
                raise NoMatch("expected attention scores", p)
            dyn, const = self.split(p)
            if p.op_type == "MatMul" and len(dyn) == 2:
                self.take(p)
                return scale, p
            if p.op_type == "Add" and len(dyn) == 1:  # additive mask
                v = dyn[0]
            elif p.op_type == "Where" and len(dyn) == 1 and not self.dyn(p.input[0]):  # masked fill
                v = dyn[0]
            elif p.op_type in ("Mul", "Div") and len(dyn) == 1 and (c := self.g.scalar(const[0])) is not None:
                if p.op_type == "Div" and p.input[1] != const[0]:
                    raise NoMatch("division by the scores", p)
                scale *= c if p.op_type == "Mul" else 1.0 / c
                v = dyn[0]
            else:
                raise NoMatch("expected the attention scores: q @ k^T, scaled and masked", p)
            self.take(p)

    def _rotary_chain(self, v: str, kv: bool):
        """Layout, scale (and, for k, the past-key Concat) down to RoPE; returns what lies under it."""
        scale, past, rope = 1.0, [], None
        while True:
            v = self.back(v, LAYOUT)
            p = self.prod(v)
            if p is None:
                break
            dyn, const = self.split(p)
            if p.op_type in ("Mul", "Div") and len(dyn) == 1 and (c := self.g.scalar(const[0])) is not None:
                scale *= c if p.op_type == "Mul" else 1.0 / c
                self.take(p)
                v = dyn[0]
            elif kv and p.op_type == "Concat" and len(dyn) == 1 and len(const) == 1:
                past.append(const[0])
                self.take(p)
                v = dyn[0]
            elif p.op_type == "Add" and rope is None:
                rope = self.rope(p)
                v = rope[0]
            else:
                break
        if rope is None:
            raise NoMatch("expected rotary position embedding on " + ("keys" if kv else "queries"), p)
        return scale, rope[1], rope[2], v, past

    def _kv_chain(self, v: str):
        past = []
        while True:
            v = self.back(v, LAYOUT)
            p = self.prod(v)
            if p is not None and p.op_type == "Concat" and len(self.split(p)[0]) == 1 and len(self.split(p)[1]) == 1:
                past.append(self.split(p)[1][0])
                self.take(p)
                v = self.split(p)[0][0]
            else:
                return v, past

    def rope(self, add) -> tuple[str, str, str]:
        """``x*cos + rotate_half(x)*sin`` with rotate_half(x) = concat(-x[..., d/2:], x[..., :d/2])."""
        if len(self.split(add)[0]) != 2:
            raise NoMatch("expected RoPE's sum", add)
        muls = [self.expect(i, "Mul") for i in add.input]
        for m_cos, m_sin in (muls, muls[::-1]):
            dc, cc = self.split(m_cos)
            ds, cs = self.split(m_sin)
            if len(dc) != 1 or len(ds) != 1 or len(cc) != 1 or len(cs) != 1:
                continue
            cat = self.prod(self.back(ds[0], LAYOUT - {"Expand"}))
            if cat is None or cat.op_type != "Concat" or len(cat.input) != 2:
                continue
            neg = self.prod(self.back(cat.input[0]))
            hi = self.prod(self.back(neg.input[0])) if neg is not None and neg.op_type == "Neg" else None
            lo = self.prod(self.back(cat.input[1]))
            if hi is None or lo is None or hi.op_type != "Slice" or lo.op_type != "Slice":
                continue
            x = self.back(dc[0])
            if not (self.same(hi.input[0], x) and self.same(lo.input[0], x)):
                continue
            lo_start = self.g.const(lo.input[1]) if len(lo.input) > 1 else None
            if lo_start is not None and int(np.ravel(lo_start)[0]) != 0:
                raise NoMatch("rotate_half's first half does not start at 0 (interleaved RoPE is not supported)", lo)
            for n in (add, m_cos, m_sin, cat, neg, hi, lo):
                self.take(n)
            return x, cc[0], cs[0]
        raise NoMatch("expected RoPE: x*cos + rotate_half(x)*sin (half-split, as in LLaMA)", add)

    # ----- the decoder ---------------------------------------------------------------------------------------
    def decoder(self) -> Decoder:
        logits = self._logits_output()
        keep = LAYOUT | {"Slice", "Gather"}  # logits_to_keep: the exporters slice positions before or after the head
        h, lm_head = self.linear(self.back(logits, keep))
        final_hidden = self.back(h, keep)
        final = self.rmsnorm(final_hidden)
        x, layers = final.x, []
        while self.back(x) != self.embedding_out:
            a, b = self.residual(x)
            mlp_side, mid = self._which(a, b, self.mlp)
            n2, gate, up, down = mlp_side
            post = self.rmsnorm(n2)
            if not self.same(post.x, mid):
                raise NoMatch("the MLP's norm reads another tensor than the residual stream", self.prod(n2))
            a, b = self.residual(mid)
            attn, prev = self._which(a, b, self.attention)
            pre = self.rmsnorm(attn.x)
            if not self.same(pre.x, prev):
                raise NoMatch("the attention's norm reads another tensor than the residual stream", self.prod(attn.x))
            layers.append(Layer(pre, attn, post, gate, up, down))
            x = prev
        layers.reverse()
        return Decoder(self.embedding, self.embedding_out, self.input_ids, layers, final, lm_head, logits, final_hidden)

    def _which(self, a: str, b: str, match):
        errors = []
        for side, other in ((a, b), (b, a)):
            saved = set(self.used)
            try:
                return match(side), other
            except NoMatch as e:
                e.depth = len(self.used) - len(saved)  # how far the attempt got before it failed
                self.used = saved
                errors.append(e)
        raise max(errors, key=lambda e: e.depth)

    def _logits_output(self) -> str:
        for o in self.g.outputs:
            if self.dyn(o.name) and not o.name.startswith(("present", "past")):
                return o.name
        raise RomacError("no logits output depends on the token embedding", where=str(self.g.path))

    def uncovered(self) -> list:
        """Nodes computing on the hidden state that no pattern accounted for, in graph order."""
        return [n for n in self.g.nodes if id(n) not in self.used and n.op_type not in ("Shape", "Size")
                and any(o in self.hidden for o in n.output)]


def recognise(g: OnnxGraph) -> Decoder:
    """The LLaMA decoder in ``g``, or a RomacError naming the node where the graph leaves the patterns."""
    m = Matcher(g)
    try:
        dec = m.decoder()
    except NoMatch as e:
        where = g.where(e.node) if e.node is not None else str(g.path)
        raise RomacError(f"graph does not follow the LLaMA decoder pattern: {e.what}", where=where,
                         hint="supported: LLaMA-family decoders (RMSNorm, RoPE, GQA attention, SwiGLU) "
                              "as torch.onnx.export writes them") from None
    if not dec.layers:
        raise RomacError("the graph has no decoder layer", where=str(g.path))
    left = m.uncovered()
    if left:
        n = left[0]
        raise RomacError(
            f"{describe(n)} computes on the hidden state but is not part of a recognised pattern "
            f"(and {len(left) - 1} more nodes)" if len(left) > 1 else
            f"{describe(n)} computes on the hidden state but is not part of a recognised pattern",
            where=str(g.path),
            hint="romac supports LLaMA decoders only: embedding, RMSNorm, RoPE, GQA attention, SwiGLU, residual adds, LM head",
        )
    return dec
