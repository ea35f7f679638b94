"""Bad GPTQ / AWQ / compressed-tensors inputs: each is one RomacError line naming the file and the tensor or field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from romac.errors import RomacError  # noqa: E402
from romac.frontend.hf_config import open_checkpoint_files, read_config_json  # noqa: E402
from romac.frontend.quantized import load_quantized_checkpoint  # noqa: E402
from romac.frontend.safetensors_io import SafetensorsFile, write_safetensors  # noqa: E402
from tests.fixtures import quantized_checkpoints as qc  # noqa: E402

Q = "model.layers.0.self_attn.q_proj"
D = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from tests.conftest import trained_like_llama

    root = tmp_path_factory.mktemp("bases")
    trained_like_llama().save_pretrained(root / "fp32")
    return {
        "gptq": qc.write_gptq(root / "fp32", root / "gptq", bits=4, group_size=64),
        "awq": qc.write_awq(root / "fp32", root / "awq", 64),
        "ct": qc.write_ct(root / "fp32", root / "ct", bits=4, group_size=64, sym=False),
    }


def _edit(base: Path, out: Path, tensors=None, config=None) -> Path:
    shutil.copytree(base, out)
    if tensors is not None:
        f = SafetensorsFile(base / "model.safetensors")
        ts = {k: np.array(f.raw(k)) for k in f.keys()}
        dt = {k: f.info(k).dtype for k in f.keys() if f.info(k).dtype == "BF16"}
        tensors(ts)
        write_safetensors(out / "model.safetensors", ts, dtypes={k: v for k, v in dt.items() if k in ts})
    if config is not None:
        cfg = json.loads((out / "config.json").read_text())
        config(cfg["quantization_config"])
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def _set(key, value):
    def f(ts):
        ts[key] = value(ts[key]) if callable(value) else value
    return f


def _scale(key, v):
    def f(ts):
        s = ts[key].copy()
        s.reshape(-1)[1] = v
        ts[key] = s
    return f


def _pop(key):
    return lambda ts: ts.pop(key)


def _cfg(**kv):
    def f(c):
        for k, v in kv.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v
    return f


def _ct_weights(**kv):
    def f(c):
        c["config_groups"]["group_0"]["weights"].update(kv)
    return f


def _bias(ts):
    b = np.zeros(128, np.float16)
    b[7] = 0.25
    ts[f"{Q}.bias"] = b


def _orphan(ts):
    ts[f"{Q}.weight"] = np.zeros((128, 128), np.float16)
    ts.pop(f"{Q}.qweight")


# id -> (base, tensors edit, config edit, regex the message must match, text it must name)
CASES = {
    "gptq qweight shape": ("gptq", _set(f"{Q}.qweight", np.zeros((8, 128), np.int32)), None,
                           r"shape is \[8, 128\], expected \[16, 128\] for \[128, 128\] \(out, in\) with bits 4, group_size 64",
                           f"{Q}.qweight"),
    "gptq qweight dtype": ("gptq", _set(f"{Q}.qweight", lambda a: a.astype(np.float32)), None,
                           r"dtype is F32, expected I32", f"{Q}.qweight"),
    "gptq qzeros shape (config group_size)": ("gptq", None, _cfg(group_size=32), r"shape is \[2, 16\], expected \[4, 16\]",
                                              "qzeros"),
    "gptq scales shape": ("gptq", _set(f"{Q}.scales", np.ones((3, 128), np.float16)), None,
                          r"shape is \[3, 128\], expected \[2, 128\]", f"{Q}.scales"),
    "gptq qzeros missing": ("gptq", _pop(f"{Q}.qzeros"), None, r"is missing \(gptq stores it beside", f"{Q}.qzeros"),
    "gptq g_idx out of range": ("gptq", _set(f"{Q}.g_idx", lambda g: np.where(np.arange(128) == 5, 7, g).astype(np.int32)),
                                None, r"holds group 7, outside 0\.\.1", f"{Q}.g_idx"),
    "gptq g_idx negative": ("gptq", _set(f"{Q}.g_idx", lambda g: np.where(np.arange(128) == 5, -1, g).astype(np.int32)),
                            None, r"holds group -1, outside 0\.\.1", f"{Q}.g_idx"),
    "gptq g_idx length": ("gptq", _set(f"{Q}.g_idx", np.zeros(100, np.int32)), None, r"shape is \[100\], expected \[128\]",
                          f"{Q}.g_idx"),
    "gptq g_idx uneven groups": ("gptq", _set(f"{Q}.g_idx", np.zeros(128, np.int32)), None,
                                 r"gives its groups 0 to 128 columns; GPTQ groups hold 64", f"{Q}.g_idx"),
    "gptq g_idx missing with desc_act": ("gptq", _pop(f"{Q}.g_idx"), _cfg(desc_act=True), r"desc_act is true", f"{Q}.g_idx"),
    "gptq scales NaN": ("gptq", _scale(f"{Q}.scales", np.nan), None, r"holds 1 NaN or infinite scale", f"{Q}.scales"),
    "gptq scales inf": ("gptq", _scale(f"{D}.scales", np.inf), None, r"holds 1 NaN or infinite scale", f"{D}.scales"),
    "gptq scales zero": ("gptq", _scale(f"{Q}.scales", 0), None, r"holds 1 zero scale", f"{Q}.scales"),
    "gptq non-zero bias": ("gptq", _bias, None, r"bias with 1 non-zero entries; bias terms are not supported",
                           f"{Q}.bias"),
    "gptq orphan part": ("gptq", _orphan, None, r"is a gptq part, but .* is a float weight", f"{Q}.qzeros"),
    "gptq bits 5": ("gptq", None, _cfg(bits=5), r"field 'bits' is 5; GPTQ's int32 packing takes 2, 3, 4, 8 bits", "bits"),
    "gptq bits missing": ("gptq", None, _cfg(bits=None), r"field 'bits' is missing", "quantization_config"),
    "gptq group_size 0": ("gptq", None, _cfg(group_size=0), r"field 'group_size' is 0", "group_size"),
    "gptq checkpoint_format marlin": ("gptq", None, _cfg(checkpoint_format="marlin"), r"checkpoint_format is 'marlin'",
                                      "quantization_config"),
    "gptq format disagrees": ("gptq", None, _cfg(format="gptq_v2"), r"'checkpoint_format' and 'format' disagree",
                              "quantization_config"),
    "gptq dynamic": ("gptq", None, _cfg(dynamic={"-:.*down.*": {}}), r"'dynamic' overrides are not supported",
                     "quantization_config"),
    "gptq desc_act not bool": ("gptq", None, _cfg(desc_act="yes"), r"field 'desc_act' must be true or false", "desc_act"),
    "unknown quant_method": ("gptq", None, _cfg(quant_method="hqq"), r"quant_method 'hqq' is not supported",
                             "quantization_config"),
    "quant_method missing": ("gptq", None, _cfg(quant_method=None), r"field 'quant_method' is missing",
                             "quantization_config"),
    "awq bits 8": ("awq", None, _cfg(bits=8), r"AWQ's GEMM layout stores 4-bit codes only", "bits"),
    "awq version gemv": ("awq", None, _cfg(version="gemv"), r"AWQ version/format is 'gemv'", "quantization_config"),
    "awq group_size not dividing in": ("awq", None, _cfg(group_size=48), r"not a multiple of group_size 48",
                                       "qweight"),
    "awq qweight shape": ("awq", _set(f"{Q}.qweight", np.zeros((128, 8), np.int32)), None,
                          r"shape is \[128, 8\], expected \[128, 16\]", f"{Q}.qweight"),
    "awq scales zero": ("awq", _scale(f"{D}.scales", 0), None, r"holds 1 zero scale", f"{D}.scales"),
    "awq group_size missing": ("awq", None, _cfg(group_size=None), r"field 'group_size' is missing", "quantization_config"),
    "awq qzeros missing (zero_point false)": ("awq", _pop(f"{Q}.qzeros"), _cfg(zero_point=False),
                                              r"zero_point is false", f"{Q}.qzeros"),
    "ct num_bits 9": ("ct", None, _ct_weights(num_bits=9), r"'weights.num_bits' is 9", "config_groups.group_0"),
    "ct strategy block": ("ct", None, _ct_weights(strategy="block"), r"'weights.strategy' is 'block'", "group_0"),
    "ct float type": ("ct", None, _ct_weights(type="float"), r"only integer weights", "group_0"),
    "ct config_groups missing": ("ct", None, _cfg(config_groups=None), r"'config_groups' is missing", "quantization_config"),
    "ct activations": ("ct", None, lambda c: c["config_groups"]["group_0"].update(input_activations={"num_bits": 8}),
                       r"quantizes activations too", "group_0"),
    "ct other format": ("ct", None, lambda c: c["config_groups"]["group_0"].update(format="float-quantized"),
                        r"format 'float-quantized'", "weight_packed"),
    "ct weight_packed shape": ("ct", _set(f"{Q}.weight_packed", np.zeros((128, 8), np.int32)), None,
                               r"shape is \[128, 8\], expected \[128, 16\]", f"{Q}.weight_packed"),
    "ct weight_shape": ("ct", _set(f"{Q}.weight_shape", np.array([128, 64], np.int64)), None,
                        r"is \[128, 64\], config.json implies \[128, 128\]", f"{Q}.weight_shape"),
    "ct scale NaN": ("ct", _scale(f"{Q}.weight_scale", np.nan), None, r"NaN or infinite", f"{Q}.weight_scale"),
    "ct scale shape": ("ct", _set(f"{Q}.weight_scale", np.ones((128, 4), np.float16)), None,
                       r"shape is \[128, 4\], expected \[128, 2\]", f"{Q}.weight_scale"),
    "ct zero point missing": ("ct", _pop(f"{Q}.weight_zero_point"), None, r"is missing \(the scheme of group 'group_0' is asym",
                              f"{Q}.weight_zero_point"),
    "ct g_idx out of range": ("ct", _set(f"{Q}.weight_g_idx", np.full(128, 9, np.int32)), None,
                              r"holds group 9, outside 0\.\.1", f"{Q}.weight_g_idx"),
    "ct transforms": ("ct", None, _cfg(transform_config={"config_groups": {"u": {"type": "hadamard"}}}),
                      r"has a transform_config \(online rotations", "quantization_config"),
    "gptq rotation": ("gptq", None, _cfg(rotation="hadamard"), r"field 'rotation' is 'hadamard'", "quantization_config"),
    "ct not compressed": ("ct", None, _cfg(quantization_status="frozen"), r"the weights are not stored compressed",
                          "quantization_config"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_quantized_input(case, bases, tmp_path):
    base, tensors, config, pattern, names = CASES[case]
    root = _edit(bases[base], tmp_path / "q", tensors, config)
    with pytest.raises(RomacError) as e:
        load_quantized_checkpoint(root, read_config_json(root / "config.json"), open_checkpoint_files(root))
    msg = str(e.value)
    assert "\n" not in msg
    assert __import__("re").search(pattern, msg), msg
    assert names in msg, msg
    assert str(root) in msg, msg   # the file (or the config.json) is named


@pytest.mark.parametrize("base", ["gptq", "awq", "ct"])
def test_unedited_bases_load(bases, base):
    root = bases[base]
    m = load_quantized_checkpoint(root, read_config_json(root / "config.json"), open_checkpoint_files(root))
    assert m.config.num_layers == 2


def test_zero_bias_is_dropped(bases, tmp_path):
    def zero_bias(ts):
        ts[f"{Q}.bias"] = np.zeros(128, np.float16)

    root = _edit(bases["gptq"], tmp_path / "q", zero_bias)
    m = load_quantized_checkpoint(root, read_config_json(root / "config.json"), open_checkpoint_files(root))
    assert f"{Q}.bias" not in m.source["ignored_tensors"]


@pytest.mark.parametrize("base,text", [("gptq", "GPTQ checkpoint"), ("awq", "AWQ checkpoint"),
                                       ("ct", "compressed-tensors checkpoint")])
def test_describe(bases, base, text):
    from romac.frontend.quantized import describe_quantized

    d = describe_quantized(bases[base])
    assert d is not None and d.startswith(text) and "\n" not in d
    assert describe_quantized(bases[base].parent / "fp32") is None


@pytest.mark.parametrize("base", ["gptq", "awq", "ct"])
def test_handles_pickle(bases, base):
    """Handles cross process boundaries (the emitter's workers): they pickle without their memory maps."""
    import pickle

    root = bases[base]
    m = load_quantized_checkpoint(root, read_config_json(root / "config.json"), open_checkpoint_files(root))
    h = m.weights["layers.1.mlp.down_proj"]
    h2 = pickle.loads(pickle.dumps(h))
    assert np.array_equal(h2.load(), h.load()) and h2.codec_spec == h.codec_spec
