"""ONNX front-end on small LLaMAs exported by torch: both exporters, named and anonymous (constant-folded,
pre-transposed) weights, external data, tied and untied heads — and the graphs it must refuse.

Every recognised model is compared with the transformers model it was exported from: config field by field,
weights bit for bit; then compiled and checked emulator-against-golden like any other input.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from romac.errors import RomacError  # noqa: E402
from romac.frontend import detect, load_model  # noqa: E402
from romac.frontend.onnx_model import load_onnx_model  # noqa: E402
from romac.ir import PROJECTIONS, projection_tensor  # noqa: E402
from romac.verify import verify  # noqa: E402

SMALL = dict(vocab_size=160, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=50000.0,
             bos_token_id=1, eos_token_id=2)


def _small_llama(tied: bool, seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**SMALL, **over}, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5 if "embed" not in name else 1.0)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def export(model, path: Path, exporter: str, names: bool) -> Path:
    """torch.onnx.export the way users call it (no KV cache)."""
    ids = torch.tensor([[1, 5, 7, 9, 11, 3]])
    if exporter == "dynamo":
        torch.onnx.export(model, (ids,), str(path), dynamo=True, optimize=not names, input_names=["input_ids"],
                          output_names=["logits"], dynamic_shapes=({1: torch.export.Dim("seq", min=1, max=256)},))
    else:  # the legacy exporter needs an attention mask (FACTS.md §3)
        torch.onnx.export(model, (ids, torch.ones_like(ids)), str(path), dynamo=False, do_constant_folding=not names,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}})
    return path


VARIANTS = [("dynamo", False, False), ("dynamo", True, False), ("legacy", False, False), ("legacy", True, False),
            ("legacy", False, True), ("dynamo", False, True)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for tied in (False, True):
        model = _small_llama(tied, seed=1 + tied)
        for exporter, names, t in VARIANTS:
            if t != tied:
                continue
            d = root / f"{exporter}-{'names' if names else 'folded'}-{'tied' if tied else 'untied'}"
            d.mkdir()
            out[(exporter, names, tied)] = (export(model, d / "model.onnx", exporter, names), model)
    return out


def _hf_weight(model, name: str) -> np.ndarray:
    sd = model.state_dict()
    key = "lm_head.weight" if name == "lm_head" else f"model.{name}.weight"
    return sd[key].detach().numpy()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-{'names' if v[1] else 'folded'}-{'tied' if v[2] else 'untied'}")
def test_recognised_model_is_the_exported_one(exports, variant):
    path, hf = exports[variant]
    assert detect(str(path)) == "onnx"
    m = load_onnx_model(path)
    c, h = m.config, hf.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        h.vocab_size, h.hidden_size, h.intermediate_size, h.num_hidden_layers, h.num_attention_heads,
        h.num_key_value_heads, h.hidden_size // h.num_attention_heads)
    assert c.rms_norm_eps == pytest.approx(h.rms_norm_eps, rel=1e-6)
    assert c.rope_theta == pytest.approx(50000.0, rel=1e-5) and c.rope_scaling is None
    assert c.tie_word_embeddings == variant[2]
    names = ["embed_tokens", "norm"] + [projection_tensor(k, p) for k in range(c.num_layers) for p in PROJECTIONS]
    names += [f"layers.{k}.{n}" for k in range(c.num_layers) for n in ("input_layernorm", "post_attention_layernorm")]
    names += [] if c.tie_word_embeddings else ["lm_head"]
    for name in names:
        np.testing.assert_array_equal(m.weights[name].load(), _hf_weight(hf, name), err_msg=name)
    # streamed row reads give the same rows (the emitter reads matrices in row chunks)
    w = m.weights[projection_tensor(1, "down_proj")]
    np.testing.assert_array_equal(w.load_rows(3, 17), w.load()[3:17])


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[2], VARIANTS[4]], ids=["dynamo", "legacy", "legacy-tied"])
def test_compiled_onnx_model_verifies(exports, variant, tmp_path):
    from romac.driver import compile_checkpoint

    path, _ = exports[variant]
    compile_checkpoint(str(path), tmp_path / "out")
    (check,) = verify(str(tmp_path / "out"), str(path), steps=8, with_onnx=True)
    assert check.passed, check
    assert check.relative_error <= 1e-5
    assert check.onnx["top1_agreement"] > 0.2  # INT4 of a random model: reported, not judged here


def test_external_data_is_read_in_place(exports, tmp_path):
    path, hf = exports[("dynamo", False, False)]
    d = tmp_path / "ext"
    d.mkdir()
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(d / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=1024)
    assert (d / "weights.bin").stat().st_size > 100_000
    m = load_model(str(d / "m.onnx"))
    np.testing.assert_array_equal(m.weights["embed_tokens"].load(), _hf_weight(hf, "embed_tokens"))


# ----------------------------------------------------------------------------------- refused graphs


def _edit(path: Path, tmp_path: Path, change) -> Path:
    proto = onnx.load(str(path))
    change(proto.graph)
    out = tmp_path / "edited.onnx"
    onnx.save_model(proto, str(out))
    return out


def _first(graph, op):
    return next(n for n in graph.node if n.op_type == op)


def test_unsupported_op_is_named(exports, tmp_path):
    path, _ = exports[("legacy", False, False)]

    def swap(graph):
        _first(graph, "Sigmoid").op_type = "HardSigmoid"

    with pytest.raises(RomacError, match=r"unsupported op HardSigmoid.*node '.*' \(HardSigmoid\)|node .*HardSigmoid") as e:
        load_onnx_model(_edit(path, tmp_path, swap))
    assert "romac recognises" in str(e.value)


def test_other_activation_is_refused(exports, tmp_path):
    """Sigmoid → Tanh keeps every op supported but leaves SwiGLU: the pattern match must say where."""
    path, _ = exports[("dynamo", False, False)]

    def swap(graph):
        _first(graph, "Sigmoid").op_type = "Softmax"

    with pytest.raises(RomacError, match="pattern"):
        load_onnx_model(_edit(path, tmp_path, swap))


def test_non_causal_mask_is_caught_by_the_self_check(exports, tmp_path):
    """Drop the additive mask: every op still matches, only running the graph can tell."""
    path, _ = exports[("dynamo", False, False)]

    def unmask(graph):
        for n in graph.node:
            if n.op_type == "Softmax":
                src = n.input[0]
                add = next(m for m in graph.node if src in m.output)
                assert add.op_type == "Add"
                add.op_type, add.input[:] = "Identity", [add.input[0]]

    with pytest.raises(RomacError, match="does not compute what the graph computes"):
        load_onnx_model(_edit(path, tmp_path, unmask))


def test_external_data_escaping_the_directory_is_refused(exports, tmp_path):
    path, _ = exports[("legacy", True, False)]
    inner = tmp_path / "inner"
    inner.mkdir()
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(inner / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    shutil.move(inner / "w.bin", tmp_path / "w.bin")
    proto = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../w.bin"
    onnx.save_model(proto, str(inner / "m.onnx"))
    with pytest.raises(RomacError, match="outside the model's directory"):
        load_onnx_model(inner / "m.onnx")


def test_missing_external_data_is_refused(exports, tmp_path):
    path, _ = exports[("legacy", True, False)]
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    (tmp_path / "w.bin").unlink()
    with pytest.raises(RomacError, match="external data file 'w.bin' is missing"):
        load_onnx_model(tmp_path / "m.onnx")


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(RomacError, match="not a readable ONNX model"):
        load_onnx_model(bad)


def test_kv_cache_export_is_recognised(tmp_path):
    """past_key_values.* in, present.* out: the past Concat is part of the attention pattern."""
    from tests.fixtures.onnx_exports import _export

    hf = _small_llama(False, seed=3, vocab_size=5000)  # the fixture traces with SmolLM2 token ids
    path = tmp_path / "model.onnx"
    _export(hf, path, "dynamo", kv_cache=True, names=False, external_data=False)
    m = load_onnx_model(path)
    assert m.source["kv_cache_inputs"] is True
    assert m.config.num_kv_heads == 2 and m.config.num_layers == 2
    for name in ("embed_tokens", "lm_head", projection_tensor(0, "k_proj"), projection_tensor(1, "v_proj")):
        np.testing.assert_array_equal(m.weights[name].load(), _hf_weight(hf, name), err_msg=name)
