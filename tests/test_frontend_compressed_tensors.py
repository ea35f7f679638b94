"""compressed-tensors pack-quantized checkpoints, made by the library itself (compressed-tensors 0.20 is a test
dependency): stored codes reach romac untouched; load() is what transformers' compressed-tensors loading gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402

from romac.codecs import get_codec  # noqa: E402
from romac.frontend.compressed_tensors import load_compressed_tensors_checkpoint  # noqa: E402
from romac.frontend.hf_config import open_checkpoint_files, read_config_json  # noqa: E402
from romac.frontend.qpack import AffineWeight  # noqa: E402
from romac.frontend.safetensors_io import SafetensorsFile  # noqa: E402
from tests.fixtures import quantized_checkpoints as qc  # noqa: E402
from tests.test_frontend_gptq import same_bits  # noqa: E402


def load(root: Path):
    return load_compressed_tensors_checkpoint(root, read_config_json(root / "config.json"), open_checkpoint_files(root))


def quantized(model):
    return {n: h for n, h in model.weights.items() if isinstance(h, AffineWeight)}


@pytest.fixture(scope="module")
def small_fp32(tmp_path_factory):
    from tests.conftest import trained_like_llama

    root = tmp_path_factory.mktemp("fp") / "fp32"
    trained_like_llama(perturb_norms=True).save_pretrained(root)
    return root


# label -> write_ct keyword arguments
VARIANTS = {
    "int4-g64-sym": dict(bits=4, group_size=64, sym=True),
    "int4-g64-asym": dict(bits=4, group_size=64, sym=False),
    "int8-g32-sym": dict(bits=8, group_size=32, sym=True),
    "int2-g32-asym": dict(bits=2, group_size=32, sym=False),
    "int4-channel-asym": dict(bits=4, group_size=None, sym=False, strategy="channel"),
    "int3-g64-sym (dense packing)": dict(bits=3, group_size=64, sym=True),
    "int4-g64-sym-bf16": dict(bits=4, group_size=64, sym=True, dtype="bfloat16"),
}


@pytest.fixture(scope="module")
def variant(small_fp32, tmp_path_factory):
    cache = {}

    def get(label):
        if label not in cache:
            cache[label] = qc.write_ct(small_fp32, tmp_path_factory.mktemp("ct") / "q", **VARIANTS[label])
        return cache[label]

    return get


def _decompress(f: SafetensorsFile, key: str, kw: dict, scale_dtype=None) -> np.ndarray:
    """compressed-tensors' own decompression of one module's stored tensors (scales cast to ``scale_dtype``)."""
    sd = {p: torch.from_numpy(np.array(f.raw(f"{key}.{p}")))
          for p in ("weight_packed", "weight_shape", "weight_zero_point") if f"{key}.{p}" in f}
    s = f.raw(f"{key}.weight_scale")
    sd["weight_scale"] = (torch.from_numpy(np.array(s)) if f.info(f"{key}.weight_scale").dtype != "BF16"
                          else torch.from_numpy(np.array(s).astype(np.int16)).view(torch.bfloat16))
    if scale_dtype is not None:
        sd["weight_scale"] = sd["weight_scale"].to(scale_dtype)
    args = QuantizationArgs(num_bits=kw["bits"], type="int", symmetric=kw["sym"], strategy=kw.get("strategy", "group"),
                            group_size=kw["group_size"])
    out = PackedQuantizationCompressor.decompress(sd, QuantizationScheme(targets=["Linear"], weights=args))
    return out["weight"].to(torch.float32).numpy()


@pytest.mark.parametrize("label", list(VARIANTS))
def test_library_made_checkpoint(label, variant):
    kw = VARIANTS[label]
    root = variant(label)
    m = load(root)
    f = SafetensorsFile(root / "model.safetensors")
    hs = quantized(m)
    assert len(hs) == 14 and "lm_head" not in hs   # the config ignores lm_head
    b = kw["bits"]
    for name, h in hs.items():
        key = f"model.{name}"
        out, inn = h.shape
        g = kw["group_size"] or inn
        # load() == the library at float32 (transformers' dtype here); load_rounded(stored dtype) == it on the
        # stored tensors
        assert same_bits(h.load(), _decompress(f, key, kw, torch.float32)), name
        assert same_bits(h.load_rounded(h.grid["scale_dtype"]), _decompress(f, key, kw)), name
        assert same_bits(h.load(), h.load_exact())
        if b == 3:
            assert h.codec_spec is None and "3-bit" in h.requantize_reason
            continue
        fp16_exact = np.array_equal(f.load(f"{key}.weight_scale").astype(np.float16).astype(np.float32),
                                    f.load(f"{key}.weight_scale"))
        assert (h.codec_spec is not None) == fp16_exact
        if h.codec_spec is None:
            assert "bfloat16" not in h.requantize_reason and "BF16" in h.requantize_reason
            continue
        assert h.codec_spec == get_codec(f"int{b}", group_size=g).spec()
        q = h.load_quantized()
        off = 1 << (b - 1)
        signed = torch.from_numpy(q.codes.astype(np.int16) - off).to(torch.int8)
        assert np.array_equal(pack_to_int32(signed, b).numpy(), f.raw(f"{key}.weight_packed"))
        if not kw["sym"]:
            zp = torch.from_numpy(q.params["zero"].astype(np.int16) - off).to(torch.int8)
            assert np.array_equal(pack_to_int32(zp, b, packed_dim=0).numpy(), f.raw(f"{key}.weight_zero_point"))
        else:
            assert (q.params["zero"] == off).all()
        assert same_bits(get_codec(**h.codec_spec).dequantize(q), h.load_exact())


def test_transformers_loading_gives_load(variant):
    """The real library path: transformers + compressed-tensors decompress the checkpoint at float32; those weights
    are load() bit for bit (symmetric: transformers 5.24 + compressed-tensors 0.20.1 cannot load their own packed
    asymmetric zero points, a size mismatch in the library pair)."""
    root = variant("int4-g64-sym")
    tm = transformers.LlamaForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    with torch.no_grad():
        tm(torch.tensor([[1, 2, 3]]))   # the first forward decompresses
    m = load(root)
    for name, h in quantized(m).items():
        assert same_bits(h.load(), tm.get_submodule(f"model.{name}").weight.numpy()), name


def test_legacy_field_packing(variant, tmp_path):
    """compressed-tensors before its dense packing put 32 // b values in a word (3-bit: 10, two bits unused): the
    reader tells the layouts apart by the packed width and reads both to the same values."""
    import json
    import shutil

    from romac.frontend.qpack import pack_fields, unpack_dense
    from romac.frontend.safetensors_io import write_safetensors

    root = variant("int3-g64-sym (dense packing)")
    f = SafetensorsFile(root / "model.safetensors")
    ts = {k: np.array(f.raw(k)) for k in f.keys()}
    for k in list(ts):
        if k.endswith(".weight_packed"):
            n = int(ts[k.replace("weight_packed", "weight_shape")][1])
            ts[k] = pack_fields(unpack_dense(ts[k], 3, n, axis=1), 3, axis=1)
    legacy = tmp_path / "legacy"
    shutil.copytree(root, legacy)
    write_safetensors(legacy / "model.safetensors", ts)
    dense, old = load(root), load(legacy)
    for name, h in quantized(dense).items():
        g = quantized(old)[name]
        assert g.grid["packing"] == "fields" and h.grid["packing"] == "dense"
        assert same_bits(g.load(), h.load())
    assert json.loads((legacy / "config.json").read_text())["quantization_config"]["config_groups"]


@pytest.mark.parametrize("spec", [dict(num_bits=4, group_size=128, symmetric=True, actorder="static"),
                                  dict(num_bits=4, group_size=64, symmetric=False, actorder="weight"),
                                  dict(num_bits=8, group_size=32, symmetric=True)],
                         ids=["w4a16-g128-static", "w4a16-asym-g64-weight-order", "w8a16-g32"])
def test_llmcompressor_gptq_checkpoint(spec):
    """llm-compressor's GPTQ (real calibration) on the CPU: the stored codes pass through, and load() is what
    transformers 5.17 + compressed-tensors 0.19 decompress the checkpoint to at float32, bit for bit."""
    root = qc.llmcompressor_checkpoint(**spec)
    if root is None:
        pytest.skip("llm-compressor's interpreter ($ROMAC_LLMC_PYTHON, /work/venv-llmc) is not on this machine")
    ref = np.load(root / "transformers_dequant.npz")
    m = load(root)
    hs = quantized(m)
    assert len(hs) == 14
    for name, h in hs.items():
        assert h.codec_spec == get_codec(f"int{spec['num_bits']}", group_size=spec["group_size"]).spec()
        assert same_bits(h.load(), ref[f"model.{name}"]), name
