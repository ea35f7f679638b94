"""Verification level 4: the unquantized source model as an FP32 ONNX graph, run by onnxruntime.

The golden reference (:mod:`romac.reference`) computes the *quantized* model; this module builds the
original floating-point model — the same source weights, the selected LoRA adapter merged
(``W + scaling * B @ A`` in float64, then cast to float32) — as a plain ONNX graph (opset 17) with
:mod:`onnx.helper`, and runs it with onnxruntime so that the quantized model's distance from it can be
reported: teacher-forced top-1 agreement, KL divergence, maximum logit difference and perplexity.

The graph mirrors the golden model's op semantics (RMSNorm, HF ``rotate_half`` RoPE with angles computed
inside the graph from a ``Range`` over the sequence length, causal grouped-query attention scaled by
``1/sqrt(head_dim)``, SwiGLU, residuals); its single input is ``input_ids`` int64 ``[1, T]`` with a dynamic
``T`` and its single output ``logits`` float32 ``[1, T, vocab]``.

Weights are streamed: one tensor is loaded at a time. In memory (no ``path``) each becomes an initializer
holding its bytes; with a ``path`` every tensor is appended to a sidecar ``<name>.data`` file as soon as it is
computed and the initializer only references it (ONNX external data), so peak memory stays near the largest
single matrix and the 2 GB protobuf limit never applies.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from romac.errors import RomacError
from romac.ir import ROPE_TABLE, Model, projection_tensor
from romac.reference import GoldenModel
from romac.spec.formats import FP32

OPSET = 17
#: Above this many bytes of weights the graph must be written with external data (protobuf caps at 2 GB).
EXTERNAL_DATA_THRESHOLD = int(1.5 * 2**30)
#: above this many bytes of float32 weights the FP32 reference is streamed from the checkpoint instead of run as an
#: onnxruntime graph (a 3B model's graph is 12 GB, an 8B's 32 GB)
ONNX_MAX_WEIGHT_BYTES = 2 << 30
_ALIGN = 4096  # external-data offsets are page aligned so onnxruntime can memory-map them


# --------------------------------------------------------------------------------------------- weights


def _weight_bytes(model: Model) -> int:
    """float32 bytes of the model's tensors (what the graph stores; a tied lm_head is not duplicated)."""
    return sum(4 * int(np.prod(handle.shape)) for handle in model.weights.values())


def _merged_projection(model: Model, tensor: str, adapter) -> np.ndarray:
    """A projection [out, in] as float32, with the adapter's LoRA delta merged in float64."""
    w = np.asarray(model.weights[tensor].load(), np.float32)
    if adapter is not None and tensor in adapter.weights:
        a_h, b_h = adapter.weights[tensor]
        a = np.asarray(a_h.load(), np.float64)
        b = np.asarray(b_h.load(), np.float64)
        w = (w.astype(np.float64) + float(adapter.scaling) * (b @ a)).astype(np.float32)
    return w


class _InitializerSink:
    """Turns numpy arrays into graph initializers, in memory or appended to an external-data file."""

    def __init__(self, data_path: Path | None) -> None:
        self.initializers: list[TensorProto] = []
        self.data_path = data_path
        self._fh = open(data_path, "wb") if data_path is not None else None
        self._offset = 0

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        if self._fh is None or array.nbytes < 1024:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        pad = (-self._offset) % _ALIGN
        if pad:
            self._fh.write(b"\0" * pad)
            self._offset += pad
        tp = TensorProto()
        tp.name = name
        tp.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tp.dims.extend(array.shape)
        self._fh.write(array.tobytes())  # little-endian on every platform onnxruntime runs on
        tp.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", self._offset), ("length", array.nbytes)):
            entry = tp.external_data.add()
            entry.key, entry.value = key, str(value)
        self._offset += array.nbytes
        self.initializers.append(tp)
        return name

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ----------------------------------------------------------------------------------------------- graph


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def op(self, op_type: str, inputs: Sequence[str], name: str | None = None, **attrs: Any) -> str:
        self._n += 1
        out = name or f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"n{self._n}_{op_type}", **attrs))
        return out

    def const(self, value: Any, dtype=np.int64, name: str | None = None) -> str:
        self._n += 1
        out = name or f"const_{self._n}"
        arr = np.asarray(value, dtype=dtype)
        self.nodes.append(
            helper.make_node("Constant", [], [out], name=f"n{self._n}_Constant", value=numpy_helper.from_array(arr, out))
        )
        return out


def build_onnx_graph(
    model: Model, adapter: str | None = None, path: str | Path | None = None
) -> onnx.ModelProto | Path:
    """The FP32 ONNX graph of the unquantized model with ``adapter`` merged (or none).

    Input ``input_ids`` int64 ``[1, T]``, output ``logits`` float32 ``[1, T, vocab]``. Without ``path`` the
    ModelProto is returned (only for models whose weights stay under ~1.5 GB); with ``path`` the graph is
    saved there with its weights in ``<path>.data`` (external data) and the path is returned.
    """
    ad = model.adapter(adapter) if adapter is not None else None  # KeyError for an unknown name
    if path is None and _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        raise RomacError(
            f"the model's weights ({_weight_bytes(model) / 2**30:.1f} GiB) are too large for an in-memory ONNX graph",
            where="onnx reference",
            hint="pass a path so the graph is written with external data",
        )
    out_path = Path(path) if path is not None else None
    data_path = None
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        data_path = out_path.with_name(out_path.name + ".data")
    sink = _InitializerSink(data_path)
    try:
        graph = _build(model, ad, sink)
    finally:
        sink.close()
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="romac",
        doc_string=f"romac FP32 reference, adapter={adapter!r} merged",
    )
    proto.ir_version = min(proto.ir_version, 10)  # what onnxruntime >= 1.20 reads
    if out_path is None:
        return proto
    onnx.save_model(proto, str(out_path))  # initializers already reference the sidecar file
    return out_path


def _build(model: Model, ad, sink: _InitializerSink) -> onnx.GraphProto:
    cfg = model.config
    g = _GraphBuilder()
    nh, nkv, hd, hidden = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    if nh % nkv:
        raise RomacError(f"num_heads {nh} is not a multiple of num_kv_heads {nkv}", where="config")
    group = nh // nkv
    eps = g.const(np.float32(cfg.rms_norm_eps), np.float32, "rms_eps")

    def weight_1d(name: str) -> str:
        return sink.add(name, np.asarray(model.weights[name].load(), np.float32).reshape(-1))

    def rmsnorm(x: str, name: str) -> str:
        w = weight_1d(name)
        sq = g.op("Mul", [x, x])
        ms = g.op("ReduceMean", [sq], axes=[-1], keepdims=1)
        rms = g.op("Sqrt", [g.op("Add", [ms, eps])])
        return g.op("Mul", [g.op("Div", [x, rms]), w])

    def linear(x: str, layer: int, module: str) -> str:
        tensor = projection_tensor(layer, module)
        wt = sink.add(tensor + ".T", _merged_projection(model, tensor, ad).T)  # [in, out]
        return g.op("MatMul", [x, wt])

    # embeddings
    embed = sink.add("embed_tokens", np.asarray(model.weights["embed_tokens"].load(), np.float32))
    x = g.op("Gather", [embed, "input_ids"], axis=0)  # [1, T, H]

    # positions, causal mask and RoPE tables, computed from the input's length
    shape = g.op("Shape", ["input_ids"])
    t = g.op("Gather", [shape, g.const(1)], axis=0)  # scalar T
    pos = g.op("Range", [g.const(0), t, g.const(1)])  # [T] int64
    rows = g.op("Unsqueeze", [pos, g.const([1])])  # [T, 1]
    cols = g.op("Unsqueeze", [pos, g.const([0])])  # [1, T]
    future = g.op("Greater", [cols, rows], name="causal_future")  # [T, T] bool: key after query
    neg_inf = g.const(np.float32(-np.inf), np.float32, "neg_inf")
    inv_src = model.weights.get(ROPE_TABLE)
    inv = np.asarray(inv_src.load() if inv_src is not None else cfg.rope_inv_freq(), np.float32).reshape(1, -1)
    inv_freq = sink.add(ROPE_TABLE, inv)  # [1, hd/2]
    posf = g.op("Cast", [rows], to=TensorProto.FLOAT)  # [T, 1]
    ang = g.op("Mul", [posf, inv_freq])  # [T, hd/2]
    emb = g.op("Concat", [ang, ang], axis=-1)  # [T, hd]
    cos = g.op("Cos", [emb], name="rope_cos")
    sin = g.op("Sin", [emb], name="rope_sin")
    half_start, half_end, last = g.const([0]), g.const([hd // 2]), g.const([-1])
    full_end = g.const([hd])

    def rope(xh: str) -> str:  # xh [1, heads, T, hd]
        x1 = g.op("Slice", [xh, half_start, half_end, last])
        x2 = g.op("Slice", [xh, half_end, full_end, last])
        rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [xh, cos]), g.op("Mul", [rot, sin])])

    def heads(x: str, count: int) -> str:  # [1, T, count*hd] -> [1, count, T, hd]
        r = g.op("Reshape", [x, g.const([1, -1, count, hd])])
        return g.op("Transpose", [r], perm=[0, 2, 1, 3])

    def repeat_kv(x: str) -> str:  # [1, nkv, T, hd] -> [1, nh, T, hd], each kv head serving `group` q heads
        if group == 1:
            return x
        u = g.op("Unsqueeze", [x, g.const([2])])  # [1, nkv, 1, T, hd]
        e = g.op("Expand", [u, g.const([1, 1, group, 1, 1])])  # [1, nkv, group, T, hd]
        return g.op("Reshape", [e, g.const([1, nh, -1, hd])])

    scale = g.const(np.float32(1.0 / math.sqrt(hd)), np.float32, "attn_scale")
    merge_shape = g.const([1, -1, nh * hd])
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        h = rmsnorm(x, f"{p}.input_layernorm")
        q = rope(heads(linear(h, i, "q_proj"), nh))
        k = repeat_kv(rope(heads(linear(h, i, "k_proj"), nkv)))
        v = repeat_kv(heads(linear(h, i, "v_proj"), nkv))
        s = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), scale])
        s = g.op("Where", [future, neg_inf, s])
        pr = g.op("Softmax", [s], axis=-1)
        att = g.op("Transpose", [g.op("MatMul", [pr, v])], perm=[0, 2, 1, 3])  # [1, T, nh, hd]
        att = g.op("Reshape", [att, merge_shape])
        x = g.op("Add", [x, linear(att, i, "o_proj")], name=f"{p}.attn_residual")
        h = rmsnorm(x, f"{p}.post_attention_layernorm")
        gate = linear(h, i, "gate_proj")
        up = linear(h, i, "up_proj")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        x = g.op("Add", [x, linear(act, i, "down_proj")], name=f"{p}.mlp_residual")
    h = rmsnorm(x, "norm")
    if cfg.tie_word_embeddings:
        head = embed
    else:
        head = sink.add("lm_head", np.asarray(model.weights["lm_head"].load(), np.float32))
    # Gemm with transB reads the [vocab, hidden] matrix as stored, so a tied head shares the embedding.
    h2 = g.op("Reshape", [h, g.const([-1, hidden])])
    logits2 = g.op("Gemm", [h2, head], transB=1)
    g.op("Reshape", [logits2, g.const([1, -1, cfg.vocab_size])], name="logits")

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "T"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "T", cfg.vocab_size])]
    return helper.make_graph(g.nodes, "romac_fp32_reference", inputs, outputs, sink.initializers)


# ------------------------------------------------------------------------------------------- session


class OnnxReference:
    """onnxruntime over :func:`build_onnx_graph` (built once per instance; CPU, two intra-op threads).

    Models whose weights exceed ~1.5 GB are written to a private temporary directory (external data),
    removed when the instance is garbage collected; smaller graphs never touch the disk.
    """

    def __init__(self, model: Model, adapter: str | None = None, intra_op_threads: int = 2) -> None:
        import onnxruntime as ort

        self.model = model
        self.adapter = adapter
        self.vocab_size = model.config.vocab_size
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._tmpdir: str | None = None
        if _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
            self._tmpdir = tempfile.mkdtemp(prefix="romac-onnx-")
            weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
            src: Any = str(build_onnx_graph(model, adapter, Path(self._tmpdir) / "model.onnx"))
        else:
            src = build_onnx_graph(model, adapter).SerializeToString()
        self.session = ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [T, vocab] float32 of every position of ``tokens``."""
        ids = np.asarray(list(tokens), np.int64).reshape(1, -1)
        if ids.size == 0:
            raise ValueError("tokens must not be empty")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise RomacError(
                f"token id out of range [0, {self.vocab_size})", where="onnx reference", hint="check the tokenizer"
            )
        (out,) = self.session.run(["logits"], {"input_ids": ids})
        return np.asarray(out[0], np.float32)


# one cached session: compare_with_onnx is typically called repeatedly for the same model and adapter
_CACHE: dict[str, Any] = {}


def _reference(model: Model, adapter: str | None) -> OnnxReference:
    ref = _CACHE.get("ref")
    if ref is not None and ref.model is model and ref.adapter == adapter:
        return ref
    _CACHE.clear()
    ref = _CACHE["ref"] = OnnxReference(model, adapter)
    return ref


# ---------------------------------------------------------------------------------------------- metrics


def _as_2d(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"logits must be [T, vocab], got shape {x.shape}")
    return x


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis in float64 (max-subtracted, log-sum-exp)."""
    x = np.asarray(logits, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of positions (rows of [T, vocab]) whose argmax agree."""
    a, b = _as_2d(a), _as_2d(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) per position (array [T], float64, nats), computed from log-softmax."""
    lp, lq = log_softmax(_as_2d(p_logits)), log_softmax(_as_2d(q_logits))
    if lp.shape != lq.shape:
        raise ValueError(f"shape mismatch {lp.shape} vs {lq.shape}")
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (lp - lq), 0.0)
    return np.maximum(np.sum(terms, axis=-1), 0.0)


def _perplexity(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Teacher-forced perplexity of tokens[1:] given the logits at positions [0, T-1)."""
    lp = log_softmax(logits[:-1])
    nll = -lp[np.arange(tokens.size - 1), tokens[1:]]
    return float(np.exp(np.mean(nll)))


def fp32_logits(model: Model, adapter: str | None, tokens: Sequence[int]) -> tuple[np.ndarray, str]:
    """The FP32 model's logits (adapter merged) and what computed them: onnxruntime on the FP32 graph, or — above
    :data:`ONNX_MAX_WEIGHT_BYTES` of float32 weights, where the graph alone would not fit in memory — the float64
    forward of the FP32 checkpoint, streamed one weight chunk at a time (the golden model with FP32 formats)."""
    if _weight_bytes(model) <= ONNX_MAX_WEIGHT_BYTES:
        return _reference(model, adapter).logits(np.asarray(list(tokens), np.int64)), "onnxruntime FP32 graph"
    fp32 = {name: FP32().spec() for name in model.weights}
    golden = GoldenModel(model, fp32, "fp32", "fp32", adapter, keep_weights=False)
    return golden.logits(list(tokens)), "float64 forward of the FP32 checkpoint (streamed)"


def compare_with_onnx(model: Model, adapter: str | None, tokens: Sequence[int], logits: np.ndarray) -> dict:
    """Distance of ``logits`` ([T, vocab], e.g. the emulator's) from the FP32 model (:func:`fp32_logits`).

    Returns a JSON-able dict: ``reference`` (what computed the FP32 logits), ``positions``, ``top1_agreement``
    (fraction of positions whose argmax agree), ``kl_divergence_mean`` / ``kl_divergence_max`` (KL(p_fp32 ||
    p_given) in nats, over positions), ``max_abs_logit_diff``, and teacher-forced ``perplexity_onnx`` (the FP32
    reference's) / ``perplexity_given`` over tokens[1:] (None for a single token).
    """
    toks = np.asarray(list(tokens), np.int64)
    given = _as_2d(logits)
    if given.shape != (toks.size, model.config.vocab_size):
        raise ValueError(f"logits shape {given.shape} != (len(tokens), vocab) = {(toks.size, model.config.vocab_size)}")
    ref, what = fp32_logits(model, adapter, toks)
    kl = kl_divergence(ref, given)
    return {
        "reference": what,
        "positions": int(toks.size),
        "top1_agreement": top1_agreement(ref, given),
        "kl_divergence_mean": float(np.mean(kl)),
        "kl_divergence_max": float(np.max(kl)),
        "max_abs_logit_diff": float(np.max(np.abs(ref.astype(np.float64) - given.astype(np.float64)))),
        "perplexity_onnx": _perplexity(ref, toks) if toks.size > 1 else None,
        "perplexity_given": _perplexity(given, toks) if toks.size > 1 else None,
    }


__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "OnnxReference",
    "build_onnx_graph",
    "compare_with_onnx",
    "kl_divergence",
    "log_softmax",
    "top1_agreement",
]
