"""AWQ (GEMM) checkpoints: stored 4-bit codes reach romac untouched; load() is AutoAWQ's ``dequantize_gemm``.

Fixtures: the small generated LLaMA in AutoAWQ's exact packing from RTN codes (tests/fixtures/quantized_checkpoints.py),
checked against a torch re-implementation of ``dequantize_gemm``; a checkpoint quantized by AutoAWQ 0.2.9 itself on
the CPU, checked against its own ``dequantize_gemm`` (skipped without AutoAWQ's venv); SmolLM2-135M (group 64).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from romac.codecs import get_codec  # noqa: E402
from romac.frontend.awq import load_awq_checkpoint  # noqa: E402
from romac.frontend.hf_config import open_checkpoint_files, read_config_json  # noqa: E402
from romac.frontend.qpack import AffineWeight, pack_awq, unpack_awq  # noqa: E402
from romac.frontend.safetensors_io import SafetensorsFile  # noqa: E402
from tests.fixtures import quantized_checkpoints as qc  # noqa: E402
from tests.quant_reference import autoawq_dequant  # noqa: E402
from tests.test_frontend_gptq import same_bits  # noqa: E402


def load(root: Path):
    return load_awq_checkpoint(root, read_config_json(root / "config.json"), open_checkpoint_files(root))


def quantized(model):
    return {n: h for n, h in model.weights.items() if isinstance(h, AffineWeight)}


@pytest.fixture(scope="module")
def small_fp32(tmp_path_factory):
    from tests.conftest import trained_like_llama

    root = tmp_path_factory.mktemp("fp") / "fp32"
    trained_like_llama(perturb_norms=True).save_pretrained(root)
    return root


def test_awq_order_round_trip():
    v = np.random.default_rng(0).integers(0, 16, (5, 64)).astype(np.uint8)
    words = pack_awq(v)
    assert words.shape == (5, 8) and np.array_equal(unpack_awq(words), v)
    # nibble i of a word holds column [0, 2, 4, 6, 1, 3, 5, 7][i]
    one = np.zeros((1, 8), np.uint8)
    one[0, 2] = 15
    assert int(pack_awq(one)[0, 0]) == 15 << 4


@pytest.mark.parametrize("gs,scale_dtype,bias", [(64, "F16", None), (128, "F16", None), (32, "F16", "zero"),
                                                 (-1, "F16", None), (64, "F32", None)])
def test_written_checkpoint(small_fp32, tmp_path, gs, scale_dtype, bias):
    root = qc.write_awq(small_fp32, tmp_path / "q", gs, scale_dtype, bias)
    m = load(root)
    f = SafetensorsFile(root / "model.safetensors")
    src = SafetensorsFile(small_fp32 / "model.safetensors")
    hs = quantized(m)
    assert len(hs) == 14
    for name, h in hs.items():
        key = f"model.{name}"
        g = h.shape[1] if gs == -1 else gs
        assert h.codec_spec == get_codec("int4", group_size=g).spec()
        assert same_bits(h.load(), autoawq_dequant(f.raw(f"{key}.qweight"), f.raw(f"{key}.qzeros"),
                                                   f.load(f"{key}.scales").astype(np.float16), g))
        assert same_bits(h.load_rows(3, 21), h.load()[3:21])
        q = h.load_quantized()
        codes, zeros, scales = qc.rtn(src.load(f"{key}.weight"), 4, g, False)
        assert np.array_equal(q.codes, codes) and np.array_equal(q.params["zero"], zeros)
        assert np.array_equal(q.params["scale"], scales)
        assert np.array_equal(pack_awq(q.codes.T), f.raw(f"{key}.qweight"))
        assert np.array_equal(pack_awq(q.params["zero"].T), f.raw(f"{key}.qzeros"))
        assert same_bits(get_codec("int4", group_size=g).dequantize(q), h.load_exact())
    assert m.source["awq"]["tensor_formats"]["float"] == 7


def test_autoawq_checkpoint_bit_exact():
    root = qc.autoawq_checkpoint(64)
    if root is None:
        pytest.skip("AutoAWQ's interpreter ($ROMAC_AUTOAWQ_PYTHON, /work/venv-awq) is not on this machine")
    ref = np.load(root / "autoawq_dequant.npz")
    m = load(root)
    hs = quantized(m)
    assert len(hs) == 14
    for name, h in hs.items():
        assert h.codec_spec == {"format": "int4", "group_size": 64}
        assert same_bits(h.load(), ref[f"model.{name}"]), name
