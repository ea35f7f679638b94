"""Sequential per-layer calibration: each projection quantized on the inputs the already-quantized layers produce.

GPTQ's scheme (AutoGPTQ ``quantize()``): layers in order; inside a layer, the four groups of projections that
share an input -- q/k/v, o, gate/up, down -- in the order the forward pass reaches them, each quantized as soon as
its input statistics are complete, so the next group already sees the quantized (and corrected) outputs.

Two streams are carried through the decoder: ``x_fp`` (the original model) and ``x_q`` (the model as the chip
will run it: ROM codes plus SRAM corrections). Per group of projections the driver accumulates

* ``H = X_q^T X_q / N`` -- what GPTQ and the activation-weighted correction minimise the error under;
* ``D = (X_fp - X_q)^T X_q / N`` -- the drift the earlier quantized layers caused (``fp_target=True``).

With D the objective becomes the error against the *original* model's output, ``||X_fp W^T - X_q Q^T||²``,
whose minimiser over any Q is the same as GPTQ's on the target ``W* = W + W D (H + λI)⁻¹``: each layer then also
undoes the error of the layers before it (error feedback across layers; "asymmetric calibration", GPTAQ).

Memory per layer: the two residual streams ``[S, T, hidden]``, the FP stream's four group inputs (the largest
``[N, intermediate]``), one layer's weights, the Gram matrices (``in x in`` float64). Weights stream one layer
at a time from the model's lazy handles; results go to ``on_result`` as soon as a matrix is done.

:func:`layer_forward` is the LLaMA decoder layer as a plain function (HF semantics, float32), with an
``observe(stage, inputs)`` callback called before the weights of that stage are read, so a caller can quantize
them from the statistics it has just seen.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import scipy.linalg

from romac.codecs import QuantTensor
from romac.errors import RomacError
from romac.ir import ATTN_PROJECTIONS, MLP_PROJECTIONS, Model, ModelConfig, projection_tensor

try:   # progress bar on stderr; optional (a romac dependency, but the quantizers work without it)
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

f32 = np.float32
STAGES = ("attn", "o", "mlp", "down")
STAGE_MODULES = {"attn": ATTN_PROJECTIONS[:3], "o": ("o_proj",), "mlp": MLP_PROJECTIONS[:2], "down": ("down_proj",)}
MODULE_STAGE = {m: s for s, ms in STAGE_MODULES.items() for m in ms}
_TOKEN_CHUNK = 2048    # tokens per float32 Gram update (accumulated in float64)


# ------------------------------------------------------------------------------------------------ forward
def rope_tables(cfg: ModelConfig, t: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin ``[t, head_dim]`` (HF's rotate-half convention, positions 0..t-1)."""
    ang = np.arange(t, dtype=np.float64)[:, None] * cfg.rope_inv_freq().astype(np.float64)[None, :]
    ang = np.concatenate([ang, ang], -1)
    return np.cos(ang).astype(f32), np.sin(ang).astype(f32)


def _rmsnorm(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + f32(eps))) * gain.astype(f32)


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x ``[S, heads, T, hd]``."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def layer_forward(x: np.ndarray, w: Mapping[str, np.ndarray], cfg: ModelConfig,
                  observe: Callable[[str, np.ndarray], None] | None = None,
                  rope: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """One LLaMA decoder layer on ``x [S, T, hidden]`` (S independent causal sequences), float32.

    ``w`` maps ``input_layernorm``, ``post_attention_layernorm`` and the seven projection names to arrays
    (``[out, in]``: the effective matrix the layer computes with). ``observe(stage, inputs)`` is called with the
    ``[S, T, in]`` input of each stage (:data:`STAGES`) *before* that stage's matrices are read from ``w``.
    """
    s_, t, _ = x.shape
    hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    cos, sin = rope if rope is not None else rope_tables(cfg, t)

    def stage(name: str, inp: np.ndarray) -> list[np.ndarray]:
        if observe is not None:
            observe(name, inp)
        return [inp @ np.asarray(w[m], f32).T for m in STAGE_MODULES[name]]

    h = _rmsnorm(x, w["input_layernorm"], cfg.rms_norm_eps)
    q, k, v = stage("attn", h)
    q = _rope(q.reshape(s_, t, nh, hd).transpose(0, 2, 1, 3), cos, sin)
    k = _rope(k.reshape(s_, t, nkv, hd).transpose(0, 2, 1, 3), cos, sin)
    v = v.reshape(s_, t, nkv, hd).transpose(0, 2, 1, 3)
    rep = nh // nkv
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    causal = np.triu(np.full((t, t), -np.inf, f32), 1)
    att = np.empty((s_, nh, t, hd), f32)
    for b in range(s_):      # one sequence at a time: [heads, T, T] scores stay small
        sc = q[b] @ k[b].transpose(0, 2, 1) / f32(np.sqrt(hd)) + causal
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        att[b] = sc @ v[b]
    (o,) = stage("o", att.transpose(0, 2, 1, 3).reshape(s_, t, nh * hd))
    x = x + o
    h = _rmsnorm(x, w["post_attention_layernorm"], cfg.rms_norm_eps)
    g, u = stage("mlp", h)
    (d,) = stage("down", (g / (1 + np.exp(-g))) * u)
    return x + d


# ------------------------------------------------------------------------------------------------ data
def load_calibration(path: str | Path, encode: Callable[[str], Sequence[int]] | None = None, seq_len: int = 512,
                     max_tokens: int | None = None, bos_token_id: int | None = None,
                     vocab_size: int | None = None) -> np.ndarray:
    """Calibration token ids ``[S, seq_len]`` from ``--calibration FILE``.

    FILE is a JSON list of token ids (or a list of such lists), or a text file tokenized with ``encode`` (the
    checkpoint's tokenizer: ``romac.frontend.tokenizer.encode`` bound to ``artifact``/``Model.tokenizer``).
    The ids are cut into sequences of ``seq_len``, each starting with BOS when ``bos_token_id`` is given (as
    every real prompt does, so the first position's attention-sink activations are calibrated too); the last
    partial sequence is dropped unless it is the only one.
    """
    p = Path(path)
    if not p.is_file():
        raise RomacError("no such calibration file", where=str(p), hint="give a text file or a JSON list of token ids")
    raw = p.read_text(encoding="utf-8", errors="replace")
    ids: list[int]
    if p.suffix.lower() == ".json" or raw.lstrip().startswith("["):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RomacError(f"not valid JSON ({e.msg} at line {e.lineno})", where=str(p)) from None
        seqs = data if data and isinstance(data[0], list) else [data]
        if not all(isinstance(i, int) and not isinstance(i, bool) for s in seqs for i in s):
            raise RomacError("a JSON calibration file must hold token ids (integers)", where=str(p))
        ids = [i for s in seqs for i in s]
    else:
        if encode is None:
            raise RomacError("a text calibration file needs the checkpoint's tokenizer, and the model has none",
                             where=str(p), hint="give a JSON list of token ids instead")
        ids = list(encode(raw))
    if bos_token_id is not None:
        ids = [i for i in ids if i != bos_token_id]
    if not ids:
        raise RomacError("calibration file holds no tokens", where=str(p))
    if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
        raise RomacError(f"token id {max(ids) if max(ids) >= vocab_size else min(ids)} outside the vocabulary "
                         f"(0..{vocab_size - 1})", where=str(p))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    body = seq_len - (bos_token_id is not None)
    if body < 1:
        raise RomacError(f"seq_len {seq_len} too short", where="calibration")
    n = max(1, len(ids) // body)
    width = min(body, len(ids))
    rows = [ids[k * body:k * body + width] for k in range(n)]
    if bos_token_id is not None:
        rows = [[bos_token_id] + r for r in rows]
    return np.asarray(rows, np.int64)


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class MatrixSpec:
    """How one matrix is quantized: algorithm, grid, correction rank, alternation rounds, extra options."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    rank: int = 0
    iters: int = 1
    opts: dict = field(default_factory=dict)


@dataclass
class MatrixResult:
    name: str
    qt: QuantTensor
    correction: Any | None          # romac.quantize.correction.Correction or None
    report: dict                    # relative output errors (this method, RTN), seconds


class _Gram:
    """Statistics of one stage's inputs: H = X_q^T X_q / N, the drift term D = (X_fp - X_q)^T X_q / N, and a
    subsample of both streams' inputs for the error report. float32 products, summed in float64."""

    def __init__(self, xq: np.ndarray, xfp: np.ndarray | None, report_tokens: int = 512) -> None:
        xq = xq.reshape(-1, xq.shape[-1])
        xfp = None if xfp is None else xfp.reshape(-1, xfp.shape[-1])
        dim, self.n = xq.shape[1], len(xq)
        self.h = np.zeros((dim, dim))
        self.d = None if xfp is None else np.zeros((dim, dim))
        for a in range(0, self.n, _TOKEN_CHUNK):
            c = xq[a:a + _TOKEN_CHUNK]
            self.h += c.T @ c
            if xfp is not None:
                self.d += (xfp[a:a + _TOKEN_CHUNK] - c).T @ c
        self.h /= self.n
        if self.d is not None:
            self.d /= self.n
        pick = np.linspace(0, self.n - 1, min(self.n, report_tokens)).astype(np.int64)
        self.sample_q = np.ascontiguousarray(xq[pick])
        self.sample_fp = self.sample_q if xfp is None else np.ascontiguousarray(xfp[pick])


def output_error(w: np.ndarray, q_eff: np.ndarray, g: _Gram) -> float:
    """``||X_fp W^T - X_q Q^T||² / ||X_fp W^T||²`` on the report subsample of the calibration tokens."""
    ref = g.sample_fp @ np.asarray(w, f32).T
    err = ref - g.sample_q @ np.asarray(q_eff, f32).T
    return float(np.sum(err.astype(np.float64) ** 2) / max(float(np.sum(ref.astype(np.float64) ** 2)), 1e-30))


def drift_target(w: np.ndarray, g: _Gram, damp: float) -> np.ndarray:
    """``W + W D (H + λI)⁻¹``: the matrix whose X_q-output best matches the original X_fp-output."""
    if g.d is None:
        return w
    h = g.h.copy()
    h[np.diag_indices(len(h))] += damp * float(np.mean(np.diag(h))) + 1e-12
    wd = np.asarray(w, np.float64) @ g.d
    return (w + scipy.linalg.solve(h, wd.T, assume_a="pos").T).astype(f32)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _embed(model: Model, tokens: np.ndarray, rows_per_read: int = 4096) -> np.ndarray:
    """Embedding rows of ``tokens`` read in row chunks from the lazy handle (never the whole table at once)."""
    handle = model.weights["embed_tokens"]
    out = np.empty((*tokens.shape, model.config.hidden_size), f32)
    flat = tokens.reshape(-1)
    need = np.unique(flat)
    for a in range(0, model.config.vocab_size, rows_per_read):
        sel = need[(need >= a) & (need < a + rows_per_read)]
        if sel.size:
            block = np.asarray(handle.load_rows(a, min(a + rows_per_read, model.config.vocab_size)), f32)
            for i in sel:
                out.reshape(-1, out.shape[-1])[flat == i] = block[i - a]
    return out


def quantize_model(model: Model, tokens: np.ndarray | None,
                   spec: MatrixSpec | Callable[[str], MatrixSpec],
                   quantize_one: Callable[..., tuple[QuantTensor, Any, dict]],
                   fp_target: bool = True, damp: float = 0.01,
                   on_result: Callable[[MatrixResult], None] | None = None,
                   progress: bool = True, layers: Sequence[int] | None = None,
                   sequential: bool = True) -> Iterator[MatrixResult]:
    """Quantize every projection of ``model`` in forward order; yields one :class:`MatrixResult` per matrix.

    ``tokens [S, T]`` (None: data-free, no forward pass); ``spec`` per tensor name; ``quantize_one(w, spec,
    hessian)`` does the per-matrix work (the registry's :func:`romac.quantize.quantize_and_correct`).
    ``fp_target``: fit against the original model's outputs (drift term) rather than the layer's own
    unquantized output. ``layers``: only these layers (the rest stay FP in the stream; for tests/benchmarks).
    ``sequential=False``: "one-shot" -- every matrix fitted on the original model's activations (one FP stream,
    no drift), which is cheaper and lets matrices be fitted independently (what :func:`collect_hessians` serves).
    """
    cfg = model.config
    spec_of = spec if callable(spec) else (lambda _name: spec)
    todo = list(range(cfg.num_layers)) if layers is None else list(layers)
    bar = tqdm(total=len(todo), desc="quantize", unit="layer", file=sys.stderr, disable=not progress) if tqdm else None
    x_fp = x_q = rope = None
    if tokens is not None:
        tokens = np.asarray(tokens, np.int64)
        if tokens.ndim != 2 or tokens.size == 0:
            raise RomacError("calibration tokens must be a non-empty [sequences, length] array", where="calibration")
        x_fp = _embed(model, tokens)
        x_q = x_fp.copy()
        rope = rope_tables(cfg, tokens.shape[1])
    for layer in range(cfg.num_layers):
        if layer > max(todo):
            break
        t0 = time.perf_counter()
        names = {m: projection_tensor(layer, m) for m in STAGE_MODULES["attn"] + ("o_proj",) + MLP_PROJECTIONS}
        base = {k: np.asarray(model.weights[f"layers.{layer}.{k}"].load(), f32)
                for k in ("input_layernorm", "post_attention_layernorm")}
        base.update({m: np.asarray(model.weights[n].load(), f32) for m, n in names.items()})
        if tokens is None:
            for m, n in names.items():
                res = _one(n, base[m], spec_of(n), None, quantize_one)
                on_result and on_result(res)
                yield res
            bar and bar.update(1)
            continue
        active = layer in todo
        done: list[MatrixResult] = []
        if not sequential:
            def observe_fp(stage: str, a: np.ndarray) -> None:
                g = _Gram(a, None)
                for m in STAGE_MODULES[stage]:
                    res = _one(names[m], base[m], spec_of(names[m]), g, quantize_one)
                    res.report.pop("_effective")
                    done.append(res)

            x_fp = layer_forward(x_fp, base, cfg, observe_fp if active else None, rope)
            for res in done:
                on_result and on_result(res)
                yield res
            bar and active and bar.update(1)
            continue
        fp_inputs: dict[str, np.ndarray] = {}
        x_fp_next = layer_forward(x_fp, base, cfg, (lambda st, a: fp_inputs.__setitem__(st, a)) if fp_target and active else None, rope)
        if not active:
            x_fp, x_q = x_fp_next, layer_forward(x_q, base, cfg, None, rope)
            continue
        grams: dict[str, _Gram] = {}
        eff: dict[str, np.ndarray] = {}

        def observe(stage: str, a: np.ndarray) -> None:
            g = grams[stage] = _Gram(a, fp_inputs.get(stage))
            fp_inputs.pop(stage, None)          # free the FP input as soon as its statistics exist
            for m in STAGE_MODULES[stage]:
                n = names[m]
                target = drift_target(base[m], g, damp) if fp_target else base[m]
                res = _one(n, target, spec_of(n), g, quantize_one, reference=base[m])
                eff[m] = res.report.pop("_effective")
                done.append(res)

        weights = _StageWeights(base, eff)
        x_q = layer_forward(x_q, weights, cfg, observe, rope)
        x_fp = x_fp_next
        dt = time.perf_counter() - t0
        for res in done:
            res.report["layer_seconds"] = dt
            on_result and on_result(res)
            yield res
        if bar:
            worst = max(done, key=lambda r: r.report["out_err"])
            bar.set_postfix_str(f"worst {worst.name.rsplit('.', 1)[1]} err {worst.report['out_err']:.2e} "
                                f"(rtn {worst.report['out_err_rtn']:.2e}) rss {peak_rss_mib():.0f}MiB")
            bar.update(1)
    bar and bar.close()


def collect_hessians(model: Model, tokens: np.ndarray, progress: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """``(tensor name, H = X^T X / N)`` of every projection on the original model's activations, in forward
    order (q/k/v share one array, gate/up another). One FP pass; what one-shot sweeps and the ILP's candidate
    measurements need (keeping them costs ``in x in`` float64 per stage: 0.8 GB for all of SmolLM2)."""
    cfg = model.config
    x = _embed(model, np.asarray(tokens, np.int64))
    rope = rope_tables(cfg, x.shape[1])
    layers = range(cfg.num_layers)
    for layer in (tqdm(layers, desc="hessians", unit="layer", file=sys.stderr, disable=not progress) if tqdm else layers):
        w = {k: np.asarray(model.weights[f"layers.{layer}.{k}"].load(), f32)
             for k in ("input_layernorm", "post_attention_layernorm")}
        w.update({m: np.asarray(model.weights[projection_tensor(layer, m)].load(), f32) for m in MODULE_STAGE})
        found: list[tuple[str, np.ndarray]] = []

        def observe(stage: str, a: np.ndarray) -> None:
            h = _Gram(a, None, report_tokens=0).h
            found.extend((projection_tensor(layer, m), h) for m in STAGE_MODULES[stage])

        x = layer_forward(x, w, cfg, observe, rope)
        yield from found


class _StageWeights(dict):
    """The quantized stream's layer weights: norms from the model, projections once their stage has fitted them."""

    def __init__(self, base: dict, eff: dict) -> None:
        super().__init__()
        self.base, self.eff = base, eff

    def __getitem__(self, key: str) -> np.ndarray:
        if key in MODULE_STAGE:
            if key not in self.eff:
                raise AssertionError(f"{key} read before its stage was observed")
            return self.eff[key]
        return self.base[key]


def _one(name: str, target: np.ndarray, spec: MatrixSpec, g: _Gram | None, quantize_one: Callable,
         reference: np.ndarray | None = None) -> MatrixResult:
    t0 = time.perf_counter()
    qt, corr, eff = quantize_one(target, spec, None if g is None else g.h)
    report: dict = {"seconds": time.perf_counter() - t0, "_effective": eff}
    if g is not None:
        from_rtn = quantize_one(reference if reference is not None else target,
                                MatrixSpec("rtn", spec.bits, spec.group_size), None)[2]
        report["out_err"] = output_error(reference if reference is not None else target, eff, g)
        report["out_err_rtn"] = output_error(reference if reference is not None else target, from_rtn, g)
    else:
        report.pop("_effective")
    return MatrixResult(name, qt, corr, report)


def summarize(results: Sequence[MatrixResult]) -> dict:
    """What a compile log should say: mean relative output errors (this method vs RTN on the same inputs) and
    every matrix where the method did worse than RTN (it can happen: GPTQ's estimate is on calibration data)."""
    calibrated = [r for r in results if "out_err" in r.report]
    if not calibrated:
        return {"matrices": len(results), "calibrated": False}
    return {
        "matrices": len(results),
        "calibrated": True,
        "mean_out_err": float(np.mean([r.report["out_err"] for r in calibrated])),
        "mean_out_err_rtn": float(np.mean([r.report["out_err_rtn"] for r in calibrated])),
        "worse_than_rtn": [r.name for r in calibrated if r.report["out_err"] > r.report["out_err_rtn"]],
        "seconds": float(sum(r.report["seconds"] for r in results)),
        "peak_rss_mib": peak_rss_mib(),
    }
