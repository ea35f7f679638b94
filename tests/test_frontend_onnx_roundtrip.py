"""The ONNX front-end on graphs romac's own FP32 reference writes (``romac.onnx_reference``): a third spelling of
LLaMA in ONNX besides the two torch exporters, needing no torch. Reading such a graph back must give the model
it was written from: the same config (RoPE and eps read off the graph) and the same weights, bit for bit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from romac.frontend.onnx_model import load_onnx_model
from romac.onnx_reference import build_onnx_graph
from tests.conftest import small_config, small_model

CONFIGS = {
    "gqa": {},
    "mha-tied": dict(num_kv_heads=4, tie_word_embeddings=True),
    "mqa-theta": dict(num_kv_heads=1, rope_theta=500000.0, rms_norm_eps=1e-6),
    "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "three-layers-hd64": dict(num_layers=3, num_heads=2, num_kv_heads=1, head_dim=64),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_graph_reads_back_as_its_model(name, tmp_path):
    cfg = small_config(**CONFIGS[name])
    model = small_model(cfg, seed=7, adapters=0)
    path = build_onnx_graph(model, None, tmp_path / "model.onnx")
    back = load_onnx_model(path)
    got, want = back.config, model.config
    if want.rope_scaling:  # no named schedule fits: the frequencies come back as an explicit table
        assert got.rope_scaling["rope_type"] == "explicit"
        np.testing.assert_allclose(got.rope_inv_freq(), want.rope_inv_freq(), rtol=1e-6)
        got = dataclasses.replace(got, rope_scaling=want.rope_scaling, rope_theta=want.rope_theta)
    assert dataclasses.replace(got, bos_token_id=want.bos_token_id, max_position_embeddings=want.max_position_embeddings) == want
    for name_, handle in model.weights.items():
        if name_ in back.weights:
            np.testing.assert_array_equal(back.weights[name_].load(), handle.load(), err_msg=name_)
