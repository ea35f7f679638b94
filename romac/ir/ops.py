"""What each op of the IR graph computes: its reference semantics, over a whole sequence at once, and the
interpreter that runs a model's graph with them.

This is the one definition of an op's arithmetic outside the chip. The golden model (``romac.reference``) runs it
in float64 on the weights the chip holds, the ONNX front-end's self-check runs it in float32 on the graph's own
weights, and calibration (``romac.quantize``) runs it to see each projection's inputs. The chip's side of an op is
its lowering (``romac.passes.schedule``), the instruction's semantics (``romac.emulator.ops``) and its cost
(``romac.targets.perf``); docs/architecture.md says where a new op goes.

Weights are asked for when the op that uses them runs (``Semantics.weight``), so a caller that does not keep them
holds one matrix at a time; an activation is dropped as soon as its last consumer has run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from romac.ir.model import ROPE_TABLE, Model, ModelConfig, OpKind


def _as_stored(x: np.ndarray, layer: int, which: int) -> np.ndarray:
    return x


@dataclass
class Semantics:
    """What a run of the graph takes from its caller.

    ``weight(name)``: a stored tensor's values (matrices [out, in], vectors [n]) in the run's dtype.
    ``linear(name, x)``: ``x @ W^T`` plus whatever the caller adds (LoRA, a correction) for a projection or the
    LM head; default: the plain product with ``weight(name)``.
    ``embed(name, ids)``: the embedding rows of the token ids; default: ``weight(name)[ids]``.
    ``kv(x, layer, which)``: K (``which`` 0) or V (1) of a layer as the KV cache gives them back (its precision).
    ``observe(node, inputs)``: called before each op with its input activations (calibration).
    """

    weight: Callable[[str], np.ndarray]
    linear: Callable[[str, np.ndarray], np.ndarray] | None = None
    embed: Callable[[str, np.ndarray], np.ndarray] | None = None
    kv: Callable[[np.ndarray, int, int], np.ndarray] = _as_stored
    observe: Callable[[str, Sequence[np.ndarray]], None] | None = None
    dtype: Any = np.float64

    def matmul(self, name: str, x: np.ndarray) -> np.ndarray:
        if self.linear is not None:
            return self.linear(name, x)
        return x @ self.weight(name).T


def rmsnorm(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x²) + eps) * gain`` over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def rope(x: np.ndarray, heads: int, inv_freq: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Rotary embedding, HF ``rotate_half`` convention: ``x * cos + rotate_half(x) * sin`` per head."""
    t = x.shape[0]
    ang = positions[:, None].astype(np.float64) * np.asarray(inv_freq, np.float64)[None, :]
    ang = np.concatenate([ang, ang], -1)
    cos, sin = np.cos(ang).astype(x.dtype), np.sin(ang).astype(x.dtype)
    xh = x.reshape(t, heads, -1)
    half = xh.shape[-1] // 2
    rot = np.concatenate([-xh[..., half:], xh[..., :half]], axis=-1)
    return (xh * cos[:, None] + rot * sin[:, None]).reshape(t, -1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Causal grouped-query attention of every position over the positions up to it."""
    t, hd = q.shape[0], cfg.head_dim
    group = cfg.num_heads // cfg.num_kv_heads
    qh = q.reshape(t, cfg.num_heads, hd).transpose(1, 0, 2)
    kh = np.repeat(k.reshape(t, cfg.num_kv_heads, hd).transpose(1, 0, 2), group, axis=0)
    vh = np.repeat(v.reshape(t, cfg.num_kv_heads, hd).transpose(1, 0, 2), group, axis=0)
    s = qh @ kh.transpose(0, 2, 1) / np.sqrt(hd).astype(q.dtype)
    s = np.where(np.triu(np.ones((t, t), bool), 1), -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ vh).transpose(1, 0, 2).reshape(t, -1)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``silu(gate) * up``."""
    return gate / (1 + np.exp(-gate)) * up


def _embedding(ctx: Semantics, d: Mapping, xs: list, cfg: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    if ctx.embed is not None:
        return ctx.embed(d["weight"], tokens)
    return np.asarray(ctx.weight(d["weight"]), ctx.dtype)[tokens]


def _rmsnorm(ctx: Semantics, d: Mapping, xs: list, cfg: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    return rmsnorm(xs[0], ctx.weight(d["weight"]), cfg.rms_norm_eps)


def _linear(ctx: Semantics, d: Mapping, xs: list, cfg: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    return ctx.matmul(d["weight"], xs[0])


def _rope(ctx: Semantics, d: Mapping, xs: list, cfg: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    heads = cfg.num_heads if d["heads"] == "query" else cfg.num_kv_heads
    return rope(xs[0], heads, ctx.weight(ROPE_TABLE), np.arange(xs[0].shape[0]))


def _attention(ctx: Semantics, d: Mapping, xs: list, cfg: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    q, k, v = xs
    return attention(q, ctx.kv(k, d["layer"], 0), ctx.kv(v, d["layer"], 1), cfg)


def _swiglu(ctx: Semantics, d: Mapping, xs: list, cfg: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    return swiglu(xs[0], xs[1])


def _add(ctx: Semantics, d: Mapping, xs: list, cfg: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    return xs[0] + xs[1]


#: the reference semantics of every op kind (an op kind without one cannot be run, and says so)
REFERENCE: dict[OpKind, Callable[..., np.ndarray]] = {
    OpKind.EMBEDDING: _embedding,
    OpKind.RMSNORM: _rmsnorm,
    OpKind.LINEAR: _linear,
    OpKind.ROPE: _rope,
    OpKind.ATTENTION: _attention,
    OpKind.SWIGLU: _swiglu,
    OpKind.ADD: _add,
    OpKind.LM_HEAD: _linear,
}


def run_graph(model: Model, tokens: Sequence[int], ctx: Semantics) -> np.ndarray:
    """The logits [T, vocab] of a token sequence, every position causally, by the model's op graph."""
    ids = np.asarray(tokens, np.int64)
    g = model.graph
    waiting = {n: g.out_degree(n) for n in g.nodes}
    values: dict[str, np.ndarray] = {}
    out = None
    for node, d in model.ops():
        fn = REFERENCE.get(d["op"])
        if fn is None:
            raise ValueError(f"op kind {d['op']!r} (node {node}) has no reference semantics")
        xs = [values[i] for i in d["inputs"]]
        if ctx.observe is not None:
            ctx.observe(node, xs)
        out = values[node] = fn(ctx, d, xs, model.config, ids)
        for i in d["inputs"]:  # free what no later op needs
            waiting[i] -= 1
            if waiting[i] == 0:
                del values[i]
    return out
