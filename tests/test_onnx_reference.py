"""Verification level 4: the FP32 ONNX graph of the source model, against transformers/peft and the golden model.

The ONNX graph (built by romac from the IR's weights, adapter merged) must compute what transformers'
``LlamaForCausalLM`` computes with the same weights — with a LoRA adapter, what the peft model computes — and
what the float64 golden model computes when every format is fp32 (the golden model is then the unquantized
model). ``compare_with_onnx`` must report perfect agreement for the graph's own logits and less for others.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

from romac.errors import RomacError
from romac.frontend.builtin import random_adapter, random_weights
from romac.ir import ModelConfig, make_model, stored_tensors, tensor_names
from romac import onnx_reference as oref
from romac.onnx_reference import (
    OnnxReference,
    build_onnx_graph,
    compare_with_onnx,
    kl_divergence,
    top1_agreement,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LORA_MODULES = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")
TOKENS = [1, 17, 42, 99, 0, 63, 5, 5, 88, 31, 72, 14, 3]


def _config(tied: bool, **over) -> ModelConfig:
    base = dict(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )
    base.update(over)
    return ModelConfig(**base)


def _model(tied: bool, seed: int = 0, use_rslora: bool = False, **over):
    cfg = _config(tied, **over)
    ad = random_adapter(cfg, "ad", seed=seed + 50, rank=4, alpha=8.0, modules=LORA_MODULES)
    ad = dataclasses.replace(ad, use_rslora=use_rslora)
    return make_model(cfg, random_weights(cfg, seed), (ad,), source={"kind": "test", "path": "memory"})


def _hf_model(model):
    cfg = model.config
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**dict(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope, tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings, attention_bias=False, mlp_bias=False,
    )
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {
        ("lm_head.weight" if n == "lm_head" else f"model.{n}.weight"): torch.from_numpy(model.weights[n].load().copy())
        for n in tensor_names(cfg)
    }
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True)
    if cfg.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


def _torch_logits(hf, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([tokens], dtype=torch.long)).logits[0].float().numpy()


def _peft_model(model, adapter: str):
    ad = model.adapter(adapter)
    hf = _hf_model(model)
    lcfg = peft.LoraConfig(
        r=ad.rank, lora_alpha=ad.alpha, target_modules=list(LORA_MODULES), lora_dropout=0.0,
        use_rslora=ad.use_rslora,
    )
    pm = peft.get_peft_model(hf, lcfg).eval()
    prefix = "base_model.model.model."
    seen = set()
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if name.startswith(prefix) and hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                tensor = name[len(prefix):]
                a, b = ad.weights[tensor]
                mod.lora_A["default"].weight.copy_(torch.from_numpy(a.load()))
                mod.lora_B["default"].weight.copy_(torch.from_numpy(b.load()))
                assert mod.scaling["default"] == pytest.approx(ad.scaling)
                seen.add(tensor)
    assert seen == set(ad.weights)
    return pm


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --------------------------------------------------------------------------------------- vs transformers


@pytest.mark.parametrize("tied", [False, True])
def test_graph_matches_transformers(tied):
    model = _model(tied, seed=3 if tied else 4)
    proto = build_onnx_graph(model)
    onnx.checker.check_model(proto, full_check=True)
    ref = OnnxReference(model)
    ours = ref.logits(TOKENS)
    assert ours.shape == (len(TOKENS), 100) and ours.dtype == np.float32
    theirs = _torch_logits(_hf_model(model), TOKENS)
    assert _max_abs(ours, theirs) <= 1e-4
    # dynamic T, and causality: a prefix's logits are the first rows of the longer sequence's
    for t in (1, 6):
        np.testing.assert_allclose(ref.logits(TOKENS[:t]), ours[:t], atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecation, raised inside peft
@pytest.mark.parametrize("tied,use_rslora", [(False, False), (True, True)])
def test_graph_with_adapter_matches_peft(tied, use_rslora):
    model = _model(tied, seed=5, use_rslora=use_rslora)
    pm = _peft_model(model, "ad")
    theirs = _torch_logits(pm, TOKENS)
    ours = OnnxReference(model, "ad").logits(TOKENS)
    assert _max_abs(ours, theirs) <= 1e-4
    # the adapter matters: the base model is measurably different
    base = OnnxReference(model).logits(TOKENS)
    assert _max_abs(base, ours) > 1e-2
    with pm.disable_adapter():
        assert _max_abs(base, _torch_logits(pm, TOKENS)) <= 1e-4


def test_llama3_rope_scaling_matches_transformers():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
    model = _model(False, seed=6, rope_scaling=scaling)
    assert not np.allclose(model.config.rope_inv_freq(), _config(False).rope_inv_freq())
    toks = (TOKENS * 3)[:32]
    ours = OnnxReference(model).logits(toks)
    assert _max_abs(ours, _torch_logits(_hf_model(model), toks)) <= 1e-4


# --------------------------------------------------------------------------------------- vs golden model


@pytest.mark.parametrize("tied,adapter", [(False, None), (False, "ad"), (True, "ad")])
def test_graph_matches_fp32_golden(tied, adapter):
    from romac import reference

    model = _model(tied, seed=7)
    formats = {name: {"format": "fp32"} for name in stored_tensors(model.config)}
    golden = reference.GoldenModel(model, formats=formats, lora_format="fp32", kv_format="fp32", adapter=adapter)
    g = golden.logits(TOKENS)
    ours = OnnxReference(model, adapter).logits(TOKENS)
    assert reference.relative_error(ours, g) <= 1e-4
    rep = compare_with_onnx(model, adapter, TOKENS, g)
    assert rep["top1_agreement"] == 1.0 and rep["kl_divergence_max"] < 1e-8


# --------------------------------------------------------------------------------------------- metrics


def test_compare_with_onnx_identical_and_shuffled():
    model = _model(False, seed=8)
    logits = OnnxReference(model, "ad").logits(TOKENS)
    rep = compare_with_onnx(model, "ad", TOKENS, logits)
    json.dumps(rep)
    assert rep["positions"] == len(TOKENS)
    assert rep["top1_agreement"] == 1.0
    assert rep["kl_divergence_mean"] == pytest.approx(0.0, abs=1e-9)
    assert rep["kl_divergence_max"] == pytest.approx(0.0, abs=1e-9)
    assert rep["max_abs_logit_diff"] == 0.0
    assert rep["perplexity_onnx"] == pytest.approx(rep["perplexity_given"])
    # the rows shuffled (positions swapped): agreement drops, KL grows
    perm = np.roll(np.arange(len(TOKENS)), 1)
    shuffled = compare_with_onnx(model, "ad", TOKENS, logits[perm])
    assert shuffled["top1_agreement"] < 0.5
    assert shuffled["kl_divergence_mean"] > 0.1
    # classes shuffled within each row
    rng = np.random.default_rng(0)
    cls = compare_with_onnx(model, "ad", TOKENS, logits[:, rng.permutation(model.config.vocab_size)])
    assert cls["top1_agreement"] < 0.5 and cls["kl_divergence_mean"] > 0.1
    with pytest.raises(ValueError):
        compare_with_onnx(model, "ad", TOKENS, logits[:-1])


def test_metric_helpers_stable():
    rng = np.random.default_rng(1)
    p = rng.standard_normal((5, 50)) * 3
    assert top1_agreement(p, p) == 1.0
    assert top1_agreement(p, -p) == 0.0
    assert np.allclose(kl_divergence(p, p), 0.0, atol=1e-12)
    # shift invariance and huge magnitudes (no overflow)
    assert np.allclose(kl_divergence(p + 1e4, p - 3.0), 0.0, atol=1e-9)
    big = kl_divergence(p * 1e3, p * 1e3 + 1.0)
    assert np.all(np.isfinite(big)) and np.allclose(big, 0.0, atol=1e-9)
    # against a direct computation
    q = rng.standard_normal((5, 50))
    pp = np.exp(p) / np.exp(p).sum(-1, keepdims=True)
    qq = np.exp(q) / np.exp(q).sum(-1, keepdims=True)
    np.testing.assert_allclose(kl_divergence(p, q), (pp * np.log(pp / qq)).sum(-1), rtol=1e-10)
    # -inf logits (masked classes) where p is zero contribute nothing
    pm = p.copy()
    pm[:, 0] = -np.inf
    assert np.all(np.isfinite(kl_divergence(pm, q)))
    assert kl_divergence(p, q).shape == (5,)


# ------------------------------------------------------------------------------------------ large models


def test_external_data_path(tmp_path, monkeypatch):
    model = _model(True, seed=9)
    mem = OnnxReference(model, "ad").logits(TOKENS)
    out = build_onnx_graph(model, "ad", tmp_path / "ref.onnx")
    assert out == tmp_path / "ref.onnx"
    data = tmp_path / "ref.onnx.data"
    assert data.exists() and data.stat().st_size > out.stat().st_size
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    ops = {n.op_type for n in proto.graph.node}
    assert ops <= {
        "Constant", "Gather", "Shape", "Range", "Unsqueeze", "Greater", "Cast", "Mul", "Concat", "Cos", "Sin",
        "ReduceMean", "Add", "Sqrt", "Div", "MatMul", "Reshape", "Transpose", "Slice", "Neg", "Expand",
        "Where", "Softmax", "Sigmoid", "Gemm",
    }
    onnx.checker.check_model(str(out))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (disk,) = sess.run(["logits"], {"input_ids": np.asarray([TOKENS], np.int64)})
    np.testing.assert_array_equal(disk[0], mem)
    # above the threshold: no in-memory graph, and OnnxReference goes through a temporary directory
    monkeypatch.setattr(oref, "EXTERNAL_DATA_THRESHOLD", 1000)
    with pytest.raises(RomacError):
        build_onnx_graph(model, "ad")
    big = OnnxReference(model, "ad")
    assert big._tmpdir is not None
    np.testing.assert_array_equal(big.logits(TOKENS), mem)


def test_large_models_stream_the_fp32_reference(monkeypatch):
    """Above ONNX_MAX_WEIGHT_BYTES the FP32 reference is the streamed float64 forward of the checkpoint: the same
    logits as onnxruntime's graph to float32 rounding, and the report says which one was used."""
    import romac.onnx_reference as R

    model = _model(False, seed=8)
    ort = OnnxReference(model, "ad").logits(TOKENS)
    assert compare_with_onnx(model, "ad", TOKENS, ort)["reference"] == "onnxruntime FP32 graph"
    monkeypatch.setattr(R, "ONNX_MAX_WEIGHT_BYTES", 0)
    streamed, what = R.fp32_logits(model, "ad", TOKENS)
    assert what.startswith("float64 forward of the FP32 checkpoint")
    assert np.abs(streamed - ort).max() / np.abs(streamed).max() < 1e-5
    rep = compare_with_onnx(model, "ad", TOKENS, ort)
    assert rep["reference"] == what and rep["top1_agreement"] == 1.0 and rep["kl_divergence_max"] < 1e-8
