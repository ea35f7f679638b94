"""Invariants of the quantization algorithms (romac.quantize): each one can fail.

* every quantizer's output is on ROMA's grid (codes/zeros in range, dtypes, shapes, fp16 scales finite > 0) and
  decodes with AffineCodec; ``rtn`` is byte-identical to AffineCodec.quantize;
* the data-free optimisers (mse, hqq) are never worse than RTN on any group (random and trained-like matrices);
* GPTQ lowers the calibration error ||(W - Q) X|| below RTN's; the sequential driver reports per matrix how it
  compares with RTN, and the test checks that report against a recomputation;
* a correction lowers the (weighted) error and a larger rank lowers it more, fitted with the FP8 rounding;
* the ILP respects its budgets and finds the optimum of small instances checked by brute force;
* the plain one-layer forward agrees with the golden model; the calibration loader and the error messages.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from romac.codecs import AffineCodec, QuantTensor, fp8_e4m3_decode, fp8_e4m3_encode
from romac.errors import RomacError
from romac.quantize import MatrixSpec, fit_correction, quantize_and_correct, quantize_matrix
from romac.quantize.allocate import Candidate, allocate, correction_bytes, rom_bits
from romac.quantize.calibration import layer_forward, load_calibration, quantize_model, rope_tables, summarize
from romac.quantize.correction import weighted_error
from tests.conftest import small_config, small_model

GRID_METHODS = ("rtn", "mse", "hqq", "gptq")


def _trained_like(rng, rows=48, cols=200):
    """Heavy-tailed rows with per-row scales and a few outlier columns, like trained projection weights."""
    w = rng.standard_t(4, size=(rows, cols)) * rng.uniform(0.3, 2.0, size=(rows, 1)) / np.sqrt(cols)
    w[:, rng.choice(cols, 3, replace=False)] *= 6
    return w.astype(np.float32)


def _q41_like(rng, rows=32, cols=256):
    """Weights that are Q4_1 values (blocks of 32, w = q*d + m), as SmolLM2's 'FP32' weights are."""
    q = rng.integers(0, 16, size=(rows, cols // 32, 32)).astype(np.float32)
    d = rng.uniform(0.002, 0.02, size=(rows, cols // 32, 1)).astype(np.float32)
    m = -d * rng.uniform(6, 9, size=d.shape).astype(np.float32)
    return (q * d + m).reshape(rows, cols)


def _activations(rng, n=600, cols=200):
    """Correlated inputs with a few large channels (what makes H far from diagonal in a real model)."""
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols) + np.eye(cols)
    x = rng.standard_normal((n, cols)) @ mix
    x[:, :4] *= 8
    return x.astype(np.float32)


def _hessian(x):
    return (x.astype(np.float64).T @ x) / len(x)


def _group_errors(w, deq, g):
    e = (w.astype(np.float64) - deq) ** 2
    cols = w.shape[1]
    return np.stack([e[:, a:a + g].sum(1) for a in range(0, cols, g)], 1)


@pytest.mark.parametrize("method", GRID_METHODS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_output_is_on_the_grid(method, bits, rng):
    w = _trained_like(rng, 24, 200)         # 200 = 3 x 64 + 8: a partial last group
    g = 64
    h = _hessian(_activations(rng, 400, 200)) if method == "gptq" else None
    qt = quantize_matrix(method, w, bits, g, hessian=h)
    qmax = 2 ** bits - 1
    assert isinstance(qt, QuantTensor) and qt.format == f"int{bits}" and qt.shape == (24, 200)
    assert qt.codes.dtype == np.uint8 and qt.codes.shape == (24, 200) and int(qt.codes.max()) <= qmax
    s, z = qt.params["scale"], qt.params["zero"]
    assert s.dtype == np.float16 and s.shape == (24, 4) and np.isfinite(s).all() and (s > 0).all()
    assert z.dtype == np.uint8 and z.shape == (24, 4) and int(z.max()) <= qmax
    deq = AffineCodec(bits, g).dequantize(qt)
    own = s.astype(np.float32).repeat(g, 1)[:, :200] * (qt.codes.astype(np.float32) - z.astype(np.float32).repeat(g, 1)[:, :200])
    assert np.array_equal(deq, own)
    assert np.abs(deq - w).max() < np.abs(w).max()      # it approximates the matrix at all


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rtn_is_byte_identical_to_the_codec(bits, rng):
    for w in (_trained_like(rng), _q41_like(rng), rng.standard_normal((7, 130)).astype(np.float32)):
        ours, codec = quantize_matrix("rtn", w, bits, 128), AffineCodec(bits, 128).quantize(w)
        assert ours.codes.tobytes() == codec.codes.tobytes()
        for k in ("scale", "zero"):
            assert ours.params[k].dtype == codec.params[k].dtype
            assert ours.params[k].tobytes() == codec.params[k].tobytes()


@pytest.mark.parametrize("method", ["mse", "hqq"])
@pytest.mark.parametrize("bits", [2, 4])
def test_data_free_optimiser_never_worse_than_rtn_on_any_group(method, bits, rng):
    total_gain = 0.0
    for w in (rng.standard_normal((40, 200)).astype(np.float32), _trained_like(rng), _q41_like(rng)):
        e_rtn = _group_errors(w, AffineCodec(bits, 64).dequantize(quantize_matrix("rtn", w, bits, 64)), 64)
        e_opt = _group_errors(w, AffineCodec(bits, 64).dequantize(quantize_matrix(method, w, bits, 64)), 64)
        assert (e_opt <= e_rtn * (1 + 1e-6) + 1e-12).all()
        total_gain += e_rtn.sum() - e_opt.sum()
    assert total_gain > 0


def test_mse_search_lowers_the_frobenius_error_clearly_at_int2(rng):
    w = _trained_like(rng, 64, 256)
    err = {m: float(np.sum((AffineCodec(2, 128).dequantize(quantize_matrix(m, w, 2, 128)) - w) ** 2))
           for m in ("rtn", "mse")}
    assert err["mse"] < 0.8 * err["rtn"]


@pytest.mark.parametrize("bits", [2, 4])
def test_gptq_beats_rtn_on_the_calibration_error(bits, rng):
    x = _activations(rng, 800, 200)
    h = _hessian(x)
    w = _trained_like(rng, 48, 200)
    err = {}
    for m in ("rtn", "gptq"):
        deq = AffineCodec(bits, 64).dequantize(quantize_matrix(m, w, bits, 64, hessian=h if m == "gptq" else None))
        err[m] = float(np.linalg.norm((w - deq) @ x.T))
    assert err["gptq"] < 0.9 * err["rtn"]
    # act-order with static groups: still on the grid and still better than RTN
    deq = AffineCodec(bits, 64).dequantize(quantize_matrix("gptq", w, bits, 64, hessian=h, act_order=True))
    assert float(np.linalg.norm((w - deq) @ x.T)) < err["rtn"]


def test_gptq_dead_columns_and_rtn_group_fit(rng):
    x = _activations(rng, 500, 200)
    x[:, 17] = 0                      # a dead input channel: H_jj = 0
    w = _trained_like(rng, 16, 200)
    qt = quantize_matrix("gptq", w, 4, 64, hessian=_hessian(x), group_fit="rtn")
    deq = AffineCodec(4, 64).dequantize(qt)
    assert deq[:, 17].tolist() == [0.0] * 16      # AutoGPTQ zeroes the weights of dead columns


def test_correction_lowers_the_error_and_more_rank_lowers_it_more(rng):
    w = _trained_like(rng, 64, 200)
    x = _activations(rng, 800, 200)
    h = _hessian(x)
    deq = AffineCodec(2, 64).dequantize(quantize_matrix("rtn", w, 2, 64))
    e = w - deq
    for hess in (None, h):
        errs = [weighted_error(e - fit_correction(e, r, hess).matrix(), hess) for r in (0, 4, 8, 16, 32)]
        assert all(b < a for a, b in zip(errs, errs[1:])), errs
        assert errs[-1] < 0.6 * errs[0]
    # activation-weighted fit wins under the activation-weighted error
    assert weighted_error(e - fit_correction(e, 8, h).matrix(), h) < weighted_error(e - fit_correction(e, 8).matrix(), h)


def test_correction_is_stored_in_fp8_and_fitted_with_it(rng):
    w = _trained_like(rng, 64, 200)
    e = w - AffineCodec(2, 64).dequantize(quantize_matrix("rtn", w, 2, 64))
    c = fit_correction(e, 8, lora_format="fp8_e4m3")
    (c1, s1), (c2, s2) = c.encoded
    assert np.array_equal(fp8_e4m3_decode(c1, s1), c.l1) and np.array_equal(fp8_e4m3_decode(c2, s2), c.l2)
    assert c.sram_bytes() == 8 * (64 + 200) + 8 == correction_bytes((64, 200), 8)
    naive = fit_correction(e, 8, lora_format="fp32")
    rounded = [fp8_e4m3_decode(*fp8_e4m3_encode(a)) for a in (naive.l1, naive.l2)]
    assert np.sum((e - c.matrix()) ** 2) <= np.sum((e - rounded[0] @ rounded[1]) ** 2)


def test_alternating_fit_not_worse_than_quantize_then_correct(rng):
    w = _trained_like(rng, 64, 200)
    h = _hessian(_activations(rng, 800, 200))
    errs = {}
    for iters in (1, 3):
        qt, corr, eff = quantize_and_correct(w, MatrixSpec("gptq", 2, 64, rank=8, iters=iters), h)
        assert np.array_equal(eff, AffineCodec(2, 64).dequantize(qt) + corr.matrix())
        errs[iters] = weighted_error(w - eff, h)
    assert errs[3] <= errs[1] * (1 + 1e-9)


def test_bad_combinations_raise_one_line_errors(rng):
    w = _trained_like(rng, 16, 64)
    cases = [
        (lambda: quantize_matrix("gptq", w, 4, 64), "needs calibration data"),
        (lambda: quantize_matrix("nope", w, 4, 64), "unknown quantizer"),
        (lambda: quantize_matrix("rtn", w, 3, 64), "2, 4 or 8 bits"),
        (lambda: quantize_and_correct(w, MatrixSpec("rtn", 4, 64, rank=17)), "exceeds min(out, in)"),
        (lambda: fit_correction(w, 4, lora_format="bf16"), "unknown LoRA precision"),
        (lambda: quantize_matrix("gptq", w, 4, 64, hessian=np.eye(32)), "Hessian has shape"),
    ]
    for call, text in cases:
        with pytest.raises(RomacError, match=None) as info:
            call()
        assert text in str(info.value) and "\n" not in str(info.value)


def _brute_force(cands, rom_budget, sram_budget):
    by = {}
    for c in cands:
        by.setdefault(c.matrix, []).append(c)
    best = None
    for combo in itertools.product(*by.values()):
        if sum(c.rom_bits for c in combo) <= rom_budget and sum(c.sram_bytes for c in combo) <= sram_budget:
            e = sum(c.error for c in combo)
            best = e if best is None or e < best else best
    return best


def test_ilp_picks_the_hand_checked_optimum():
    # Two matrices of 1000 weights. Budget 6000 ROM bits: int4 + int2 (or int2 + int4), never int4 + int4.
    # Matrix a suffers more at int2, so a gets int4; SRAM 100 bytes allows one rank-8 correction (80 bytes).
    mk = lambda m, o, e, bits, sram: Candidate(m, o, e, bits, sram, 1000)
    cands = [mk("a", "int4", 1.0, 4000, 0), mk("a", "int2", 9.0, 2000, 0), mk("a", "int2/r8", 5.0, 2000, 80),
             mk("b", "int4", 1.0, 4000, 0), mk("b", "int2", 3.0, 2000, 0), mk("b", "int2/r8", 2.5, 2000, 80)]
    res = allocate(cands, 6000, 100)
    assert res.choice == {"a": "int4", "b": "int2/r8"}
    assert res.error == pytest.approx(3.5) and res.rom_bits == 6000 and res.sram_bytes == 80
    assert res.bits_per_weight == pytest.approx(3.0)
    with pytest.raises(RomacError, match="no choice fits"):
        allocate(cands, 3000, 100)


def test_ilp_matches_brute_force_and_respects_budgets(rng):
    for trial in range(12):
        cands = []
        for m in range(4):
            for o in range(3):
                cands.append(Candidate(f"m{m}", f"o{o}", float(rng.uniform(0, 10)), int(rng.integers(1, 20)) * 100,
                                       int(rng.integers(0, 5)) * 10, 100))
        rom_b, sram_b = int(rng.integers(15, 50)) * 100, int(rng.integers(5, 15)) * 10
        best = _brute_force(cands, rom_b, sram_b)
        if best is None:
            with pytest.raises(RomacError):
                allocate(cands, rom_b, sram_b)
            continue
        res = allocate(cands, rom_b, sram_b)
        assert res.rom_bits <= rom_b and res.sram_bytes <= sram_b and len(res.choice) == 4
        assert res.error == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_rom_bits_counts_codes_scales_and_zeros():
    assert rom_bits((576, 576), 4, 128) == 576 * 576 * 4 + 576 * 5 * (16 + 4)   # 4.5 groups -> 5 per row
    assert rom_bits((1536, 576), 2, 128) == 1536 * 576 * 2 + 1536 * 5 * 18


# ------------------------------------------------------------------------------------ calibration driver
def _golden_logits(model, tokens):
    from romac.reference import GoldenModel

    fmts = {n: {"format": "fp32"} for n in model.weights}
    return GoldenModel(model, fmts).logits(tokens)


def test_layer_forward_matches_the_golden_model():
    cfg = small_config()
    model = small_model(cfg, adapters=0)
    toks = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 24))
    x = model.weights["embed_tokens"].load()[toks].astype(np.float32)
    rope = rope_tables(cfg, toks.shape[1])
    for i in range(cfg.num_layers):
        w = {k.split(".")[-1]: model.weights[k].load() for k in model.weights if k.startswith(f"layers.{i}.")}
        x = layer_forward(x, w, cfg, None, rope)
    g = model.weights["norm"].load()
    h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps) * g
    logits = h @ model.weights["lm_head"].load().T
    for b in range(2):
        ref = _golden_logits(model, toks[b])
        assert np.max(np.abs(logits[b] - ref)) / np.max(np.abs(ref)) < 1e-4


def test_observe_is_called_in_order_before_the_weights_are_read():
    cfg = small_config()
    model = small_model(cfg, adapters=0)
    seen, reads = [], []

    class Spy(dict):
        def __getitem__(self, k):
            reads.append((len(seen), k))
            return super().__getitem__(k)

    w = Spy({k.split(".")[-1]: model.weights[k].load() for k in model.weights if k.startswith("layers.0.")})
    x = np.random.default_rng(0).standard_normal((1, 8, cfg.hidden_size)).astype(np.float32)
    layer_forward(x, w, cfg, lambda st, a: seen.append((st, a.shape)))
    assert [s for s, _ in seen] == ["attn", "o", "mlp", "down"]
    assert [shape[-1] for _, shape in seen] == [cfg.hidden_size, cfg.q_dim, cfg.hidden_size, cfg.intermediate_size]
    stage_of = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 3, "up_proj": 3, "down_proj": 4}
    assert all(n >= stage_of[k] for n, k in reads if k in stage_of)


@pytest.mark.parametrize("fp_target", [False, True])
def test_sequential_gptq_reports_how_each_matrix_compares_with_rtn(fp_target):
    cfg = small_config(hidden_size=128, intermediate_size=256)
    model = small_model(cfg, adapters=0)
    toks = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(4, 128))
    results = list(quantize_model(model, toks, MatrixSpec("gptq", 4, 64), quantize_and_correct,
                                  fp_target=fp_target, progress=False))
    assert [r.name for r in results] == [f"layers.{i}.{b}.{m}" for i in range(2) for b, m in
                                         [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                                          ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
                                          ("mlp", "down_proj")]]
    rep = summarize(results)
    worse = [r.name for r in results if r.report["out_err"] > r.report["out_err_rtn"]]
    assert rep["worse_than_rtn"] == worse
    assert len(worse) <= 2 and rep["mean_out_err"] < 0.8 * rep["mean_out_err_rtn"]
    for r in results:
        assert AffineCodec(4, 64).dequantize(r.qt).shape == r.qt.shape


def test_data_free_pass_streams_every_matrix():
    cfg = small_config()
    model = small_model(cfg, adapters=0)
    got = {r.name: r for r in quantize_model(model, None, MatrixSpec("mse", 4, 128, rank=4), quantize_and_correct,
                                              progress=False)}
    assert len(got) == 14 and all(r.correction.rank == 4 for r in got.values())


def test_calibration_loader(tmp_path):
    p = tmp_path / "ids.json"
    p.write_text(json.dumps(list(range(2, 40))))
    t = load_calibration(p, seq_len=10, bos_token_id=1, vocab_size=100)
    assert t.shape == (4, 10) and (t[:, 0] == 1).all() and t[0, 1:].tolist() == list(range(2, 11))
    p.write_text(json.dumps([[5, 6, 7], [8, 9]]))
    assert load_calibration(p, seq_len=4).tolist() == [[5, 6, 7, 8]]
    txt = tmp_path / "cal.txt"
    txt.write_text("a b c d e f")
    assert load_calibration(txt, encode=lambda s: [ord(c) for c in s.split()], seq_len=3).tolist() == [[97, 98, 99], [100, 101, 102]]
    for content, kw, msg in [("[1, 2, 300]", {"vocab_size": 100}, "outside the vocabulary"),
                             ("[1, 2", {}, "not valid JSON"), ("[]", {}, "no tokens"),
                             ("[1.5]", {}, "integers")]:
        p.write_text(content)
        with pytest.raises(RomacError, match=msg):
            load_calibration(p, **kw)
    with pytest.raises(RomacError, match="needs the checkpoint's tokenizer"):
        load_calibration(txt)


def test_real_smollm2_layer_gptq_beats_rtn():
    """One layer of the real model (Q4_1-derived weights), calibrated on real text: GPTQ below RTN at INT4 and INT2."""
    pytest.importorskip("transformers")
    from romac.frontend import load_model
    from tests.fixtures import smollm2

    model = load_model(str(smollm2.hf_fp32()))
    toks = np.asarray(smollm2.english_token_ids(320)[:256])[None, :]
    for bits in (4, 2):
        res = list(quantize_model(model, toks, MatrixSpec("gptq", bits, 128), quantize_and_correct,
                                  progress=False, layers=[0]))
        rep = summarize(res)
        assert len(res) == 7 and rep["mean_out_err"] < 0.7 * rep["mean_out_err_rtn"], rep


def test_gptq_scale_refit_lowers_the_weighted_error(rng):
    x = _activations(rng, 800, 200)
    h = _hessian(x)
    w = _trained_like(rng, 48, 200)
    for bits in (2, 4):
        errs = {}
        for refit in (False, True):
            qt = quantize_matrix("gptq", w, bits, 64, hessian=h, refit=refit)
            errs[refit] = weighted_error(w - AffineCodec(bits, 64).dequantize(qt), h)
            if refit:
                plain = quantize_matrix("gptq", w, bits, 64, hessian=h, refit=False)
                assert np.array_equal(qt.codes, plain.codes) and np.array_equal(qt.params["zero"], plain.params["zero"])
        assert errs[True] <= errs[False]


def test_nested_ranks_equal_separate_fits(rng):
    from romac.quantize.correction import fit_lowrank_nested

    w = _trained_like(rng, 64, 200)
    h = _hessian(_activations(rng, 800, 200))
    e = w - AffineCodec(2, 64).dequantize(quantize_matrix("rtn", w, 2, 64))
    nested = fit_lowrank_nested(e, (0, 4, 16), h)
    assert nested[0].rank == 0
    for r in (4, 16):
        assert np.allclose(nested[r].matrix(), fit_correction(e, r, h).matrix(), rtol=1e-5, atol=1e-6)


def test_collect_hessians_and_one_shot_mode():
    from romac.quantize.calibration import collect_hessians

    cfg = small_config()
    model = small_model(cfg, adapters=0)
    toks = np.random.default_rng(7).integers(0, cfg.vocab_size, size=(2, 64))
    hs = dict(collect_hessians(model, toks, progress=False))
    assert len(hs) == 14
    assert hs["layers.0.self_attn.q_proj"] is hs["layers.0.self_attn.v_proj"]          # one input, one array
    assert hs["layers.1.mlp.down_proj"].shape == (cfg.intermediate_size,) * 2
    h0 = hs["layers.0.self_attn.q_proj"]
    assert np.allclose(h0, h0.T) and np.linalg.eigvalsh(h0).min() > -1e-6
    # one-shot quantization of a matrix uses exactly these statistics
    res = {r.name: r for r in quantize_model(model, toks, MatrixSpec("gptq", 4, 64), quantize_and_correct,
                                              progress=False, sequential=False)}
    n = "layers.1.mlp.down_proj"
    direct = quantize_matrix("gptq", model.weights[n].load(), 4, 64, hessian=hs[n])
    assert np.array_equal(res[n].qt.codes, direct.codes)
