"""GPTQ checkpoints: stored codes, zeros and scales reach romac untouched; load() is the library's dequantization.

Fixtures (tests/fixtures/quantized_checkpoints.py): the small generated LLaMA written in AutoGPTQ's / gptqmodel's
exact layouts from RTN codes (every variant, incl. v1 zero wraps and act order), checked against torch
re-implementations of the libraries (tests/quant_reference.py); checkpoints quantized by gptqmodel 7.6 itself,
checked against its TorchLinear kernel's own dequantization (skipped without gptqmodel's venv); SmolLM2-135M.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from romac.codecs import get_codec  # noqa: E402
from romac.errors import RomacError  # noqa: E402
from romac.frontend.gptq import load_gptq_checkpoint  # noqa: E402
from romac.frontend.hf_config import open_checkpoint_files, read_config_json  # noqa: E402
from romac.frontend.qpack import (  # noqa: E402
    AffineWeight,
    pack_dense,
    pack_fields,
    requantize_note,
    unpack_dense,
    unpack_fields,
)
from romac.frontend.safetensors_io import SafetensorsFile  # noqa: E402
from romac.ir import PROJECTIONS, projection_tensor  # noqa: E402
from tests.fixtures import quantized_checkpoints as qc  # noqa: E402
from tests.quant_reference import autogptq_dequant, gptqmodel_dequant  # noqa: E402


def load(root: Path, **kw):
    return load_gptq_checkpoint(root, read_config_json(root / "config.json"), open_checkpoint_files(root), **kw)


@pytest.fixture(scope="module")
def small_fp32(tmp_path_factory):
    from tests.conftest import trained_like_llama

    root = tmp_path_factory.mktemp("fp") / "fp32"
    trained_like_llama(perturb_norms=True).save_pretrained(root)
    return root


def quantized(model):
    return {n: h for n, h in model.weights.items() if isinstance(h, AffineWeight)}


def library_dequant(f: SafetensorsFile, key: str, bits: int, fmt: str, writer: str) -> np.ndarray:
    parts = [f.raw(f"{key}.{p}") for p in ("qweight", "qzeros", "scales", "g_idx")]
    parts[2] = f.load(f"{key}.scales").astype(np.float16)   # the library runs at float16 (bf16 scales cast to it)
    if fmt == "gptq" and writer == "autogptq":
        return autogptq_dequant(*parts, bits, v1=True)
    return gptqmodel_dequant(*parts, bits, v1=fmt == "gptq")


def same_bits(a, b) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---------------------------------------------------------------- bit packing
@pytest.mark.parametrize("bits", range(1, 9))
def test_dense_and_field_packing_round_trip(bits):
    rng = np.random.default_rng(bits)
    v = rng.integers(0, 1 << bits, (77, 5)).astype(np.uint8)
    d = pack_dense(v, bits, axis=0)
    assert d.shape == (-(-77 * bits // 32), 5) and d.dtype == np.int32
    assert np.array_equal(unpack_dense(d, bits, 77, axis=0), v)
    assert np.array_equal(unpack_dense(pack_dense(v.T, bits, axis=1), bits, 77, axis=1), v.T)
    fl = pack_fields(v, bits, axis=0)
    assert np.array_equal(unpack_fields(fl, bits, 77, axis=0), v)
    if 32 % bits == 0:
        assert np.array_equal(fl, d)


def test_three_bit_stream_is_autogptq_split():
    """AutoGPTQ's 3-bit pack (10 values, a value split 2+1, 10, a value split 1+2, 10) is the dense bit stream."""
    from tests.quant_reference import _unpack_rows

    rng = np.random.default_rng(3)
    v = rng.integers(0, 8, (64, 3)).astype(np.uint8)
    words = pack_dense(v, 3, axis=0)
    assert np.array_equal(_unpack_rows(torch.from_numpy(words), 3).numpy(), v)


# ---------------------------------------------------------------- variants in the exact layout
# label -> write_gptq keyword arguments
VARIANTS = {
    "b4-g64-asym-v1-autogptq": dict(bits=4, group_size=64),
    "b4-g48-asym-v1 (ceil groups)": dict(bits=4, group_size=48),
    "b4-g128-sym-v1": dict(bits=4, group_size=128, sym=True),
    "b4-g64-asym-v1-gptqmodel": dict(bits=4, group_size=64, writer="gptqmodel"),
    "b2-g32-asym-v1-gptqmodel": dict(bits=2, group_size=32, writer="gptqmodel"),
    "b2-g64-asym-v2": dict(bits=2, group_size=64, fmt="gptq_v2"),
    "b8-g64-sym-v2": dict(bits=8, group_size=64, sym=True, fmt="gptq_v2"),
    "b8-g32-asym-v1": dict(bits=8, group_size=32),
    "b3-g64-asym-v1": dict(bits=3, group_size=64),
    "b4-g32-act-order": dict(bits=4, group_size=32, act_order=True),
    "b4-g32-act-order-static-groups": dict(bits=4, group_size=32, act_order=True, static_groups=True),
    "b4-per-channel-sym": dict(bits=4, group_size=-1, sym=True),
    "b4-g64-zero-bias": dict(bits=4, group_size=64, bias="zero"),
    "b4-g64-bf16-scales": dict(bits=4, group_size=64, scale_dtype="BF16"),
}


@pytest.fixture(scope="module")
def variant(small_fp32, tmp_path_factory):
    cache = {}

    def get(label):
        if label not in cache:
            cache[label] = qc.write_gptq(small_fp32, tmp_path_factory.mktemp("gptq") / "q", **VARIANTS[label])
        return cache[label]

    return get


def expected_spec(kw: dict, in_features: int):
    if kw["bits"] == 3 or (kw.get("act_order") and not kw.get("static_groups")):
        return None
    gs = in_features if kw["group_size"] == -1 else kw["group_size"]
    return get_codec(f"int{kw['bits']}", group_size=gs).spec()


@pytest.mark.parametrize("label", list(VARIANTS))
def test_variant_codes_scales_zeros_and_values(label, variant, small_fp32):
    kw = VARIANTS[label]
    root = variant(label)
    model = load(root)
    f = SafetensorsFile(root / "model.safetensors")
    src = SafetensorsFile(small_fp32 / "model.safetensors")
    bits, fmt, writer = kw["bits"], kw.get("fmt", "gptq"), kw.get("writer", "autogptq")
    hs = quantized(model)
    assert len(hs) == 2 * len(PROJECTIONS)
    for name, h in hs.items():
        key = f"model.{name}"
        out, inn = h.shape
        assert h.codec_spec == expected_spec(kw, inn), name
        assert (h.requantize_reason is None) == (h.codec_spec is not None)
        # load() is the library's dequantization, bit for bit; load_rows agrees with it
        lib = library_dequant(f, key, bits, fmt, writer)
        assert same_bits(h.load(), lib), name
        assert same_bits(h.load_rows(5, 37), lib[5:37])
        # the stored codes are the RTN codes written (through the act-order permutation, if any)
        w = src.load(f"{key}.weight")
        g_idx = f.raw(f"{key}.g_idx").astype(np.int64)
        gs = inn if kw["group_size"] == -1 else kw["group_size"]
        col = g_idx if not np.array_equal(g_idx, np.arange(inn) // gs) else None
        codes, zeros, scales = qc.rtn(w, bits, gs, kw.get("sym", False), col)
        got_codes, got_zeros, got_scales, _ = h.parts.read(0, out)
        assert np.array_equal(got_codes, codes) and np.array_equal(got_zeros, zeros)
        if kw.get("scale_dtype", "F16") == "F16":
            assert np.array_equal(got_scales, scales.astype(np.float32))
        if h.codec_spec is None:
            with pytest.raises(RomacError, match="not one of romac's formats"):
                h.load_quantized()
            continue
        # codes/scales/zeros untouched: re-packing them gives the stored bytes
        q = h.load_quantized()
        assert q.codes.dtype == np.uint8 and q.params["zero"].dtype == np.uint8 and q.params["scale"].dtype == np.float16
        assert np.array_equal(pack_dense(q.codes.T, bits, axis=0), f.raw(f"{key}.qweight"))
        assert np.array_equal(qc.pack_gptq_zeros(q.params["zero"].T, bits, fmt, writer), f.raw(f"{key}.qzeros"))
        assert np.array_equal(q.params["scale"].T.astype(np.float32), f.load(f"{key}.scales"))
        # the chip's exact values: the codec's dequantization of those codes
        assert same_bits(get_codec(**h.codec_spec).dequantize(q), h.load_exact())
        assert np.abs(h.load_exact() - h.load()).max() <= np.abs(h.load_exact()).max() * 2.0 ** -11


def test_bf16_scales_on_the_fp16_grid_keep_the_codes(variant):
    """bf16 scales (a model quantized in bfloat16) are float16-exact here: the grid is romac's."""
    m = load(variant("b4-g64-bf16-scales"))
    assert all(h.codec_spec == {"format": "int4", "group_size": 64} for h in quantized(m).values())
    assert all(h.grid["scale_dtype"] == "BF16" for h in quantized(m).values())


def test_act_order_is_requantized_and_permutation_is_exact(variant):
    m = load(variant("b4-g32-act-order"))
    for name, h in quantized(m).items():
        assert h.codec_spec is None and "act-order" in h.requantize_reason and h.grid["act_order_g_idx"]
        perm, q = h.load_quantized_permuted()
        inv = np.argsort(perm)
        assert same_bits(get_codec("int4", group_size=32).dequantize(q)[:, inv], h.load_exact())
        note = requantize_note(h, {"format": "int4", "group_size": 32})
        assert note and name in note and "act-order" in note and "re-quantized" in note
    assert set(m.source["gptq"]["requantized"]) == set(quantized(m))
    static = load(variant("b4-g32-act-order-static-groups"))
    assert all(h.codec_spec is not None for h in quantized(static).values())
    h = next(iter(quantized(static).values()))
    assert requantize_note(h, h.codec_spec) is None
    assert "int4 group 32" in requantize_note(h, {"format": "int4", "group_size": 128})


def test_short_last_group(variant):
    """in % group_size != 0: ceil(in / gs) groups, the last one shorter (romac's AffineCodec does the same)."""
    m = load(variant("b4-g48-asym-v1 (ceil groups)"))
    h = m.weights[projection_tensor(0, "down_proj")]      # in = 256 = 5 x 48 + 16
    q = h.load_quantized()
    assert q.params["scale"].shape == (128, 6)
    assert h.codec_spec == {"format": "int4", "group_size": 48}


def test_model_source_summary(variant):
    m = load(variant("b4-g64-asym-v1-gptqmodel"))
    s = m.source["gptq"]
    assert s["v1_zeros"] == "word" and s["quantizer"] == ["gptqmodel:7.6.0"]
    assert s["tensor_formats"] == {"float": 7, "int4 g64": 14}
    assert m.source["kind"] == "gptq" and not m.source["ignored_tensors"]


# ---------------------------------------------------------------- v1 zero wrap
@pytest.fixture(scope="module")
def wrap_fp32(small_fp32, tmp_path_factory):
    """The small LLaMA with some all-positive groups (asymmetric zero 0: GPTQ v1 stores -1 and wraps)."""
    src = SafetensorsFile(small_fp32 / "model.safetensors")
    tensors = {k: np.array(src.load(k)) for k in src.keys()}
    for k, w in tensors.items():
        if k.endswith("proj.weight"):
            w[::3, :64] = np.abs(w[::3, :64])   # rows 0, 3, 6...: their first group of 64 is >= 0
    root = tmp_path_factory.mktemp("wrap") / "fp32"
    root.mkdir()
    from romac.frontend.safetensors_io import write_safetensors

    write_safetensors(root / "model.safetensors", tensors)
    (root / "config.json").write_text((small_fp32 / "config.json").read_text())
    return root


@pytest.mark.parametrize("writer", ["autogptq", "gptqmodel"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_v1_zero_wrap_read_as_the_writer_reads_it(wrap_fp32, tmp_path, writer, bits):
    root = qc.write_gptq(wrap_fp32, tmp_path / "q", bits=bits, group_size=64, writer=writer)
    m = load(root)
    f = SafetensorsFile(root / "model.safetensors")
    hs = quantized(m)
    assert sum(h.grid["v1_wrapped_zeros"] for h in hs.values()) > 0
    other = load(root, v1_zeros="field" if writer == "gptqmodel" else "word")
    differs = 0
    for name, h in hs.items():
        lib = library_dequant(f, f"model.{name}", bits, "gptq", writer)
        assert same_bits(h.load(), lib), name
        differs += not same_bits(other.weights[name].load(), lib)
        if writer == "gptqmodel":   # gptqmodel's whole-word v1 arithmetic restores the true zeros exactly
            w = SafetensorsFile(wrap_fp32 / "model.safetensors").load(f"model.{name}.weight")
            assert np.array_equal(h.load_quantized().params["zero"], qc.rtn(w, bits, 64, False)[1])
    assert differs > 0   # the other library's reading is different: the choice matters


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["autogptq", "gptqmodel"])
def test_v1_zero_wrap_against_the_real_library(wrap_fp32, tmp_path, writer):
    """The writer's own library reads the wrapped zeros as romac does by default: AutoGPTQ 0.7.1's QuantLinear per
    field, gptqmodel 7.6's TorchLinear by whole-word arithmetic. (gptqmodel refuses asymmetric v1 checkpoints that
    it did not write.)"""
    root = qc.write_gptq(wrap_fp32, tmp_path / "q", bits=4, group_size=64, writer=writer)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        from tests.fixtures.smollm2 import hf_fp32

        (root / f).write_bytes((hf_fp32() / f).read_bytes())
    npz = qc.library_dequant(writer, root)
    if npz is None:
        pytest.skip(f"{writer}'s venv is not on this machine")
    ref = np.load(npz)
    m = load(root)
    assert m.source["gptq"]["v1_zeros"] == ("field" if writer == "autogptq" else "word")
    hs = quantized(m)
    assert sum(h.grid["v1_wrapped_zeros"] for h in hs.values()) > 0
    for name, h in hs.items():
        assert same_bits(h.load(), ref[f"model.{name}"]), name


# ---------------------------------------------------------------- checkpoints made by gptqmodel itself
GPTQMODEL_SPECS = {
    "b4-g64-asym": dict(bits=4, group_size=64, sym=False),
    "b4-g32-desc-act": dict(bits=4, group_size=32, sym=False, desc_act=True),
    "b4-g32-desc-act-static": dict(bits=4, group_size=32, sym=False, desc_act=True, static_groups=True),
    "b8-g64-sym": dict(bits=8, group_size=64, sym=True),
    "b2-g64-asym": dict(bits=2, group_size=64, sym=False),
    "b3-g64-asym": dict(bits=3, group_size=64, sym=False),
    "b4-g64-v2": dict(bits=4, group_size=64, sym=False, format="gptq_v2"),
}


@pytest.mark.parametrize("label", list(GPTQMODEL_SPECS))
def test_gptqmodel_checkpoint_bit_exact(label):
    root = qc.gptqmodel_checkpoint("gptq", **GPTQMODEL_SPECS[label])
    if root is None:
        pytest.skip("gptqmodel's interpreter ($ROMAC_QLIBS_PYTHON, /work/venv-qlibs) is not on this machine")
    ref = np.load(root / "gptqmodel_dequant.npz")
    m = load(root)
    spec = GPTQMODEL_SPECS[label]
    hs = quantized(m)
    assert len(hs) == 14
    for name, h in hs.items():
        assert same_bits(h.load(), ref[f"model.{name}"]), name
        exact = spec["bits"] != 3 and not (spec.get("desc_act") and not spec.get("static_groups"))
        assert (h.codec_spec is not None) == exact
    assert m.source["gptq"]["v1_zeros" if spec.get("format", "gptq") == "gptq" else "checkpoint_format"]


# ---------------------------------------------------------------- through the compiler
@pytest.mark.parametrize("label", ["b4-g64-asym-v1-autogptq"])
def test_compile_passes_codes_through_and_emulator_matches_golden(variant, label, tmp_path):
    """int4 g64 is kept (the stored codes go to ROM: the golden model's weights are the codec's values of the stored
    codes); act-order weights are re-quantized to the target's int4 g128 from load()."""
    from romac.driver import compile_model
    from romac.emulator import Machine
    from romac.reference import GoldenModel, relative_error

    model = load(variant(label))
    out = tmp_path / "art"
    compile_model(model, out, "tiny")
    m = Machine(out)
    prompt = [1, 17, 33, 60, 91]
    new, logits = m.generate(prompt, 6)
    formats = {r.name: r.format.spec() for r in m.manifest.regions if r.constants_of is None}
    golden = GoldenModel.of_artifacts(model, m.manifest)
    assert relative_error(logits, golden.logits(prompt + new)) <= 1e-5
    for name, h in quantized(model).items():
        if h.codec_spec is not None:
            assert formats[name] == h.codec_spec
            assert np.array_equal(golden.weight(name), h.load_exact().astype(np.float64))
        else:
            assert formats[name] == {"format": "int4", "group_size": 128}


@pytest.mark.parametrize("label", ["b4-g64-asym", "b4-g32-desc-act"])
def test_transformers_loading_gives_load(label):
    """transformers 5.24 loading a gptqmodel checkpoint at float32 (through optimum and gptqmodel's TorchAtenLinear)
    dequantizes to load() bit for bit: the scales stay float16 and the product is rounded to float16."""
    root = qc.gptqmodel_checkpoint("gptq", **GPTQMODEL_SPECS[label])
    npz = qc.transformers_gptq_dequant(root) if root is not None else None
    if npz is None:
        pytest.skip("gptqmodel's interpreter with optimum is not on this machine")
    ref = np.load(npz)
    hs = quantized(load(root))
    for name, h in hs.items():
        assert same_bits(h.load(), ref[f"model.{name}"]), name
        assert not same_bits(h.load_exact(), ref[f"model.{name}"])


def test_rom_is_byte_identical_to_compiling_the_float_model(small_fp32, tmp_path):
    """A GPTQ int4 g128 checkpoint whose codes are romac's own RTN codes of the float model compiles to the same ROM
    bank images as the float model quantized by romac: the stored codes, zeros and scales reach ROM unchanged."""
    from romac.driver import compile_model
    from romac.frontend.hf import load_hf_checkpoint

    root = qc.write_gptq(small_fp32, tmp_path / "q", bits=4, group_size=128)
    compile_model(load(root), tmp_path / "a", "tiny")
    compile_model(load_hf_checkpoint(small_fp32), tmp_path / "b", "tiny")
    banks = sorted(p.name for p in (tmp_path / "a" / "rom").iterdir())
    assert banks and banks == sorted(p.name for p in (tmp_path / "b" / "rom").iterdir())
    for name in banks:
        assert (tmp_path / "a" / "rom" / name).read_bytes() == (tmp_path / "b" / "rom" / name).read_bytes(), name
