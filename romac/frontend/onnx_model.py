"""The ONNX front-end: a torch-exported LLaMA graph (``.onnx``, with or without external data) to the IR.

Steps: check the file and its external data (``onnx_graph``); recognise the decoder by its op patterns
(``onnx_patterns``); run the graph once on a probe prompt with onnxruntime to read what the patterns cannot
show — the head size and RoPE frequencies, from the cos/sin tensors the graph feeds its rotary embedding;
build the config and lazy weight handles; and finally check the result: the golden model's FP32 forward pass
of the recognised IR (``romac.reference``) must give the same logits as the user's graph on the probe prompt. A graph that
computes something else (a non-causal mask, a different norm) is refused, never compiled wrongly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from romac.errors import RomacError
from romac.frontend.onnx_graph import OnnxGraph, WeightRef
from romac.frontend.onnx_patterns import Decoder, recognise
from romac.ir import ArrayWeight, Model, ModelConfig, make_model, projection_tensor
from romac.ir.ops import Semantics, run_graph

PROBE_TOKENS = 8
SELF_CHECK_MAX_PARAMS = 4_000_000_000  # above: the float64 forward would take minutes; skipped (romac verify remains)
# relative logit error allowed: op order (float32 graphs), and the rounding of float16 graphs
SELF_CHECK_TOLERANCE, SELF_CHECK_TOLERANCE_HALF = 1e-3, 3e-2


_LAST: dict = {}  # the last graph opened: `romac compile` describes the file, then loads it


def _graph(path: str | Path) -> OnnxGraph:
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    if _LAST.get("key") != key:
        _LAST.clear()
        _LAST.update(key=key, graph=OnnxGraph(path))
    return _LAST["graph"]


def load_onnx_model(path: str | Path) -> Model:
    g = _graph(path)
    dec = recognise(g)
    probe = _probe(g, dec)
    config = _config(g, dec, probe)
    weights = _weights(g, dec, config)
    source = {"kind": "onnx", "path": str(path), "layers": len(dec.layers),
              "kv_cache_inputs": sum(len(layer.attention.past) for layer in dec.layers) > 0}
    model = make_model(config, weights, (), source=source)
    _self_check(g, model, probe)
    return model


def describe_onnx(path: str | Path) -> str:
    """One line for ``romac compile``: what the file holds."""
    g = _graph(path)
    opset = next((o.version for o in g.proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    external = sum(1 for t in g.initializers.values() if t.data_location == 1)
    return (f"ONNX graph {path} (opset {opset}, {len(g.nodes)} nodes, {len(g.initializers)} initializers"
            f"{f', {external} in external data' if external else ''}, producer {g.proto.producer_name or '?'})")


# ------------------------------------------------------------------------------------------------ probe


def _feeds(g: OnnxGraph, dec: Decoder, tokens: np.ndarray) -> dict[str, np.ndarray]:
    from onnx import helper

    t = tokens.shape[1]
    feeds: dict[str, np.ndarray] = {}
    for inp in g.inputs:
        tt = inp.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        name = inp.name
        if name == dec.input_ids:
            feeds[name] = tokens.astype(dtype)
        elif "attention_mask" in name:
            feeds[name] = np.ones((1, t), dtype)
        elif "position" in name:
            feeds[name] = np.arange(t, dtype=dtype).reshape(1, t) if "position_ids" in name else np.arange(t, dtype=dtype)
        elif "logits_to_keep" in name:  # 0: all positions (HF); the self-check reads the final norm's output anyway
            feeds[name] = np.array(0, dtype)
        elif np.issubdtype(dtype, np.floating):  # past keys / values: an empty cache
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            if len(dims) != 4:
                raise RomacError(f"float input {name!r} of rank {len(dims)} is not a past key/value cache",
                                 where=str(g.path), hint="inputs supported: input_ids, attention_mask, position_ids, "
                                 "cache_position, logits_to_keep, past_key_values.*")
            shape = [1 if k == 0 and d is None else (0 if d is None else d) for k, d in enumerate(dims)]
            feeds[name] = np.zeros(shape, dtype)
        else:
            raise RomacError(f"graph input {name!r} is not one romac knows how to feed", where=str(g.path),
                             hint="inputs supported: input_ids, attention_mask, position_ids, cache_position, "
                                  "logits_to_keep, past_key_values.*")
    return feeds


def _probe(g: OnnxGraph, dec: Decoder) -> dict[str, np.ndarray]:
    """Run the user's graph once: the final norm's output and layer 0's RoPE cos/sin for a fixed probe prompt."""
    import onnx
    import onnxruntime as ort

    vocab = int(g.initializers[dec.embedding].dims[0])
    tokens = np.random.default_rng(0).integers(0, vocab, size=(1, PROBE_TOKENS), dtype=np.int64)
    cos, sin = dec.layers[0].attention.cos, dec.layers[0].attention.sin
    # A copy of the graph with extra outputs, its weights turned into inputs: the copy stays small, and the
    # weights are fed from where they lie (the protobuf or the memory-mapped external file).
    proto = onnx.ModelProto()
    proto.ir_version = g.proto.ir_version
    proto.opset_import.extend(g.proto.opset_import)
    graph = proto.graph
    graph.node.extend(g.proto.graph.node)
    graph.input.extend(g.proto.graph.input)
    weights = {}
    for t in g.initializers.values():
        if g.numel(t) > 1024 or t.data_location == onnx.TensorProto.EXTERNAL:
            weights[t.name] = _native(g, t)
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            graph.initializer.append(t)
    wanted = [dec.final_hidden, cos, sin]
    for name in wanted:
        graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = max(1, min(2, os.cpu_count() or 1))
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
        out = sess.run(wanted, {**_feeds(g, dec, tokens), **weights})
    except RomacError:
        raise
    except Exception as e:
        raise RomacError(f"onnxruntime cannot run the graph ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                         where=str(g.path), hint="check that the file runs in onnxruntime") from None
    return {"tokens": tokens[0], "hidden": np.asarray(out[0], np.float32).reshape(PROBE_TOKENS, -1),
            "cos": np.asarray(out[1], np.float64), "sin": np.asarray(out[2], np.float64)}


def _native(g: OnnxGraph, t) -> np.ndarray:
    """An initializer in its own element type (fp16 stays fp16, bf16 as ml_dtypes), as the graph expects it."""
    a = g.tensor(t.name)
    if t.data_type == 10:
        return a.astype(np.float16)
    if t.data_type == 16:
        import ml_dtypes

        return a.astype(ml_dtypes.bfloat16)
    return np.asarray(a)


def _rope(g: OnnxGraph, probe: dict) -> tuple[int, np.ndarray]:
    """(head_dim, inverse frequencies) from the cos/sin the graph computed for positions 0..T-1."""
    hd = probe["cos"].shape[-1]
    cos = probe["cos"].reshape(-1, PROBE_TOKENS, hd)[0]
    sin = probe["sin"].reshape(-1, PROBE_TOKENS, hd)[0]
    where = f"{g.path}: rotary embedding"
    if not (np.allclose(cos[0], 1.0, atol=1e-6) and np.allclose(sin[0], 0.0, atol=1e-6)):
        raise RomacError("RoPE at position 0 is not the identity (scaled cos/sin, e.g. YaRN attention factors)",
                         where=where, hint="supported: LLaMA RoPE with default, linear or llama3 frequencies")
    half = hd // 2
    if hd % 2 or not (np.allclose(cos[:, :half], cos[:, half:]) and np.allclose(sin[:, :half], sin[:, half:])):
        raise RomacError("RoPE tables are not duplicated halves (cat(freqs, freqs))", where=where,
                         hint="supported: LLaMA's half-split rotary embedding")
    inv = np.arctan2(sin[1, :half], cos[1, :half])
    angles = np.arange(PROBE_TOKENS)[:, None] * inv[None, :]
    if np.abs(np.cos(angles) - cos[:, :half]).max() > 1e-4:
        raise RomacError("RoPE angles are not position × frequency", where=where)
    return hd, inv


def _fit_theta(inv: np.ndarray, hd: int) -> tuple[float, dict | None]:
    """rope_theta and rope_scaling reproducing ``inv``: the default schedule if it fits, else the table itself."""
    i = np.arange(1, hd // 2)
    theta = float(np.exp(np.median(-np.log(inv[1:]) * hd / (2 * i)))) if hd > 2 else 10000.0
    for candidate in (float(f"{theta:.6g}"), theta):
        table = 1.0 / candidate ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        if np.abs(table - inv).max() <= 1e-5 * np.abs(inv).max() + 1e-9 and np.allclose(table, inv, rtol=2e-5):
            return candidate, None
    return theta, {"rope_type": "explicit", "inv_freq": [float(np.float32(v)) for v in inv]}


# ----------------------------------------------------------------------------------------------- config


def _side_config(g: OnnxGraph) -> dict:
    """config.json beside the graph (what HF exports leave there), for token ids and context length only."""
    p = g.base / "config.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return {}
    return {}


def _config(g: OnnxGraph, dec: Decoder, probe: dict) -> ModelConfig:
    hd, inv = _rope(g, probe)
    theta, scaling = _fit_theta(inv, hd)
    vocab, hidden = (int(d) for d in g.initializers[dec.embedding].dims)
    shape = lambda ref: tuple(g.weight(ref, "").shape)  # noqa: E731
    layer0 = dec.layers[0]
    q_out, k_out = shape(layer0.attention.q)[0], shape(layer0.attention.k)[0]
    where = str(g.path)
    if q_out % hd or k_out % hd:
        raise RomacError(f"q/k projections ({q_out}, {k_out} rows) are not whole heads of size {hd}", where=where)
    epsilons = {n.eps for layer in dec.layers for n in (layer.input_norm, layer.post_norm)} | {dec.final_norm.eps}
    if max(epsilons) > min(epsilons) * (1 + 1e-6):
        raise RomacError(f"RMSNorm epsilons differ between layers ({sorted(epsilons)})", where=where,
                         hint="LLaMA uses one rms_norm_eps")
    for k, layer in enumerate(dec.layers):
        if abs(layer.attention.scale * math.sqrt(hd) - 1.0) > 1e-4:
            raise RomacError(f"layer {k}: attention scale {layer.attention.scale:.6g} is not 1/sqrt(head_dim) "
                             f"= {1 / math.sqrt(hd):.6g}", where=where, hint="LLaMA scales scores by 1/sqrt(head_dim)")
    side = _side_config(g)
    tied = _tied(g, dec)
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=shape(layer0.gate)[0], num_layers=len(dec.layers),
        num_heads=q_out // hd, num_kv_heads=k_out // hd, head_dim=hd, rms_norm_eps=float(str(np.float32(min(epsilons)))),
        rope_theta=theta, rope_scaling=scaling, tie_word_embeddings=tied,
        max_position_embeddings=int(side.get("max_position_embeddings", 4096)),
        bos_token_id=side.get("bos_token_id"), eos_token_id=side.get("eos_token_id"),
    )


def _tied(g: OnnxGraph, dec: Decoder) -> bool:
    """Whether the LM head is the embedding: the same initializer, or (after constant folding) equal copies."""
    emb = WeightRef(dec.embedding, transposed=False)
    if dec.lm_head == emb:
        return True
    a, b = g.weight(emb, "embed_tokens"), g.weight(dec.lm_head, "lm_head")
    if a.shape != b.shape:
        return False
    step = max(1, (64 << 20) // (4 * a.shape[1]))
    return all(np.array_equal(a.load_rows(r, r + step), b.load_rows(r, r + step)) for r in range(0, a.shape[0], step))


def _weights(g: OnnxGraph, dec: Decoder, config: ModelConfig) -> dict:
    def gain(init: str, name: str) -> ArrayWeight:
        return ArrayWeight(name, np.ascontiguousarray(g.tensor(init), dtype=np.float32).reshape(-1), f"{g.path}:{init}")

    w = {"embed_tokens": g.weight(WeightRef(dec.embedding, False), "embed_tokens"), "norm": gain(dec.final_norm.gain, "norm")}
    if not config.tie_word_embeddings:
        w["lm_head"] = g.weight(dec.lm_head, "lm_head")
    for k, layer in enumerate(dec.layers):
        w[f"layers.{k}.input_layernorm"] = gain(layer.input_norm.gain, f"layers.{k}.input_layernorm")
        w[f"layers.{k}.post_attention_layernorm"] = gain(layer.post_norm.gain, f"layers.{k}.post_attention_layernorm")
        a = layer.attention
        for module, ref in (("q_proj", a.q), ("k_proj", a.k), ("v_proj", a.v), ("o_proj", a.o),
                            ("gate_proj", layer.gate), ("up_proj", layer.up), ("down_proj", layer.down)):
            name = projection_tensor(k, module)
            w[name] = g.weight(ref, name)
    return w


def _self_check(g: OnnxGraph, model: Model, probe: dict) -> None:
    """The recognised model must compute what the graph computes (its FP32 weights, the probe prompt), by the IR's
    reference semantics in float64."""
    cfg = model.config
    n_params = sum(int(np.prod(h.shape)) for h in model.weights.values())
    if n_params > SELF_CHECK_MAX_PARAMS:
        return
    ours = run_graph(model, probe["tokens"].tolist(),
                     Semantics(weight=lambda name: np.asarray(model.weights[name].load(), np.float64)))
    # the graph's logits may cover the last positions only; its final hidden states cover all of them
    head = model.weights["embed_tokens" if cfg.tie_word_embeddings else "lm_head"].load()
    theirs = probe["hidden"] @ head.T
    err = float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))
    half = any(t.data_type == 10 for t in g.initializers.values())
    if err > (SELF_CHECK_TOLERANCE_HALF if half else SELF_CHECK_TOLERANCE):
        pos = int(np.unravel_index(np.abs(ours - theirs).argmax(), ours.shape)[0])
        raise RomacError(
            f"the recognised LLaMA ({cfg.num_layers} layers, {cfg.num_heads}/{cfg.num_kv_heads} heads) does not "
            f"compute what the graph computes: relative logit error {err:.2e} (worst at position {pos})",
            where=str(g.path),
            hint="the graph differs from LLaMA somewhere the patterns do not show (mask, norm, activation); "
                 "this is not supported",
        )
