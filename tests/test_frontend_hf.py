"""Front-end tests: safetensors reader/writer, HF LLaMA checkpoints, PEFT LoRA adapters.

Fixtures are built with the real tools (transformers ``save_pretrained``, peft ``get_peft_model``) in
temporary directories, and every tensor romac reads is compared with the torch parameter it came from.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from romac.errors import RomacError  # noqa: E402
from romac.frontend.hf import load_hf_checkpoint, parse_hf_config  # noqa: E402
from romac.frontend.peft import load_peft_adapter, parse_adapter_arg  # noqa: E402
from romac.frontend.safetensors_io import (  # noqa: E402
    SafetensorsFile,
    bf16_to_float32,
    float32_to_bf16_bits,
    write_safetensors,
)
from romac.ir import PROJECTIONS, ROPE_TABLE, LazyWeight, projection_tensor, tensor_names  # noqa: E402

ALL_MODULES = list(PROJECTIONS)
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=[2, 3],
)


def _llama(seed: int, **over):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY, **over})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms are initialised to ones; make them informative
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _hf_state(model) -> dict[str, np.ndarray]:
    """HF key -> float32 numpy array of what the saved checkpoint holds."""
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _ir_key(name: str) -> str:
    return "lm_head.weight" if name == "lm_head" else f"model.{name}.weight"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Saved checkpoints: name -> (dir, reference state dict as float32)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    base = _llama(0)
    for label, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        m = copy.deepcopy(base).to(dtype)
        d = root / label
        m.save_pretrained(d)
        out[label] = (d, _hf_state(m))
    d = root / "sharded"
    base.save_pretrained(d, max_shard_size="40KB")
    out["sharded"] = (d, _hf_state(base))
    tied = _llama(1, tie_word_embeddings=True)
    d = root / "tied"
    tied.save_pretrained(d)
    out["tied"] = (d, _hf_state(tied))
    out["_model"] = base
    return out


@pytest.fixture(scope="module")
def adapters(ckpts, tmp_path_factory):
    """PEFT adapters on the fp32 base: name -> (dir, {lora key: array}, LoraConfig)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    specs = {
        "plain": peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_MODULES),
        "rslora": peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    }
    for seed, (label, lc) in enumerate(specs.items()):
        pm = peft.get_peft_model(copy.deepcopy(ckpts["_model"]), lc)
        torch.manual_seed(100 + seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn_like(p))
        d = root / label
        pm.save_pretrained(d)
        ref = {k: v.detach().float().numpy() for k, v in pm.state_dict().items() if "lora_" in k}
        out[label] = (d, ref, lc)
    return out


def _copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is _DELETE:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


_DELETE = object()


# -- safetensors reader / writer ------------------------------------------------------------------------


def test_writer_roundtrip_and_safetensors_library(tmp_path):
    from safetensors.numpy import load_file as np_load
    from safetensors.torch import load_file as torch_load

    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "u8": rng.integers(0, 256, (7, 2), dtype=np.uint8),
        "i32": rng.integers(-(2**31), 2**31 - 1, (3,), dtype=np.int32),
        "i8": rng.integers(-128, 127, (5,), dtype=np.int8),
        "f64": rng.standard_normal((2, 2)),
        "empty": np.zeros((0, 4), np.float32),
    }
    bf = rng.standard_normal((6, 3)).astype(np.float32)
    bits = float32_to_bf16_bits(bf)
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {**arrays, "bf16": bits}, metadata={"format": "pt"}, dtypes={"bf16": "BF16"})

    lib = torch_load(str(path))  # the numpy API cannot read bf16
    for k, a in arrays.items():
        np.testing.assert_array_equal(lib[k].numpy(), a)
    assert lib["bf16"].dtype == torch.bfloat16
    ref = torch.from_numpy(bf).to(torch.bfloat16)
    assert torch.equal(lib["bf16"], ref)  # our rounding matches torch's

    no_bf = tmp_path / "nobf.safetensors"
    write_safetensors(no_bf, arrays)
    for k, a in np_load(str(no_bf)).items():
        np.testing.assert_array_equal(a, arrays[k])

    f = SafetensorsFile(path)
    assert f.metadata == {"format": "pt"}
    assert not f.is_mapped
    for k, a in arrays.items():
        np.testing.assert_array_equal(f.raw(k), a)
        assert f.raw(k).dtype == a.dtype
    np.testing.assert_array_equal(f.load("f16"), arrays["f16"].astype(np.float32))
    np.testing.assert_array_equal(f.load("bf16"), ref.float().numpy())
    np.testing.assert_array_equal(f.raw("bf16"), bits)
    assert f.is_mapped
    v = f.load("f32")
    assert v.dtype == np.float32 and not v.flags.writeable  # zero-copy read-only view
    with pytest.raises(RomacError, match="integer dtype U8"):
        f.load("u8")
    with pytest.raises(RomacError, match="'nope' not found"):
        f.raw("nope")


def test_bf16_conversion_exact():
    bits = np.arange(0, 2**16, dtype=np.uint16)
    got = bf16_to_float32(bits)
    ref = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(got[finite], ref[finite])
    assert np.array_equal(np.isnan(got), np.isnan(ref))


def _raw_file(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    blob = json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


@pytest.mark.parametrize(
    "case, match",
    [
        ("short", "shorter than the 8-byte header"),
        ("header_past_eof", "header length .* past the end"),
        ("not_json", "not valid JSON"),
        ("unknown_dtype", "tensor 'w': unknown or unsupported dtype 'Q4'"),
        ("size_mismatch", "tensor 'w': data_offsets \\[0, 12\\] hold 12 bytes, but shape \\(2, 2\\)"),
        ("past_data", "tensor 'w': data_offsets \\[8, 24\\] run past the end of the data area"),
        ("overlap", "tensor 'b': data_offsets overlap those of 'a'"),
        ("bad_shape", "tensor 'w': shape"),
    ],
)
def test_reader_rejects_corrupt_files(tmp_path, case, match):
    p = tmp_path / f"{case}.safetensors"
    w = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    if case == "short":
        p.write_bytes(b"\x01\x02")
    elif case == "header_past_eof":
        _raw_file(p, {"w": w}, b"\0" * 16, header_len=10_000)
    elif case == "not_json":
        p.write_bytes(struct.pack("<Q", 4) + b"{{{{" + b"\0" * 16)
    elif case == "unknown_dtype":
        _raw_file(p, {"w": {**w, "dtype": "Q4"}}, b"\0" * 16)
    elif case == "size_mismatch":
        _raw_file(p, {"w": {**w, "data_offsets": [0, 12]}}, b"\0" * 16)
    elif case == "past_data":
        _raw_file(p, {"w": {**w, "data_offsets": [8, 24]}}, b"\0" * 16)
    elif case == "overlap":
        _raw_file(p, {"a": w, "b": {**w, "data_offsets": [8, 24]}}, b"\0" * 24)
    elif case == "bad_shape":
        _raw_file(p, {"w": {**w, "shape": [2, -2]}}, b"\0" * 16)
    with pytest.raises(RomacError, match=match) as ei:
        SafetensorsFile(p)
    assert str(p) in str(ei.value)
    assert "\n" not in str(ei.value)


# -- HF checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["fp32", "fp16", "bf16", "sharded", "tied"])
def test_checkpoint_weights_exact(ckpts, label):
    d, ref = ckpts[label]
    model = load_hf_checkpoint(d)
    cfg = model.config
    assert cfg.tie_word_embeddings == (label == "tied")
    assert set(model.weights) == set(tensor_names(cfg)) | {ROPE_TABLE}  # make_model adds the RoPE table
    for name in tensor_names(cfg):
        w = model.weights[name]
        assert isinstance(w, LazyWeight)
        assert w.name == name and w.source.endswith(":" + _ir_key(name))
        a = w.load()
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, ref[_ir_key(name)], err_msg=f"{label} {name}")
    if label == "sharded":
        assert len(model.source["files"]) > 3
    assert model.source["kind"] == "hf" and model.source["path"] == str(d)


def test_config_fields(ckpts):
    model = load_hf_checkpoint(ckpts["fp32"][0])
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (128, 64, 96, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 2, 16)
    assert c.rms_norm_eps == 1e-5 and c.rope_theta == 10000.0 and c.rope_scaling is None
    assert c.max_position_embeddings == 256
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    # the graph is the LLaMA graph over these weights
    linears = [n for n, d in model.ops() if d.get("module")]
    assert len(linears) == 7 * 2


def test_lazy_nothing_read_before_load(ckpts):
    d, ref = ckpts["sharded"]
    model = load_hf_checkpoint(d)
    files = {id(w.loader.file): w.loader.file for w in model.weights.values() if isinstance(w, LazyWeight)}
    assert len(files) == len(model.source["files"])
    assert not any(f.is_mapped for f in files.values())
    w = model.weights["layers.1.mlp.down_proj"]
    a = w.load()
    mapped = [f for f in files.values() if f.is_mapped]
    assert mapped == [w.loader.file]  # only the shard holding this tensor was touched
    assert np.shares_memory(a, w.loader.file._mm)  # F32 is a view into the map, not a copy
    assert not model.weights["embed_tokens"].loader.file.is_mapped


def test_rope_parameters_transformers5_and_rope_scaling_v4(tmp_path, ckpts):
    d = _copy_ckpt(ckpts["fp32"][0], tmp_path / "llama3")
    cfg = json.loads((d / "config.json").read_text())
    assert "rope_parameters" in cfg and "rope_theta" not in cfg  # what transformers 5 writes
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}
    transformers.LlamaConfig(**{**TINY, "rope_parameters": {"rope_theta": 500000.0, **scaling}}).save_pretrained(d)
    c = load_hf_checkpoint(d).config
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == dict(sorted(scaling.items()))
    # inv_freq agrees with transformers' own rope init
    tc = transformers.LlamaConfig.from_pretrained(d)
    rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(tc)
    np.testing.assert_allclose(c.rope_inv_freq(), rope.inv_freq.numpy(), rtol=1e-6)

    # the transformers-4 form
    old = {**{k: v for k, v in cfg.items() if k != "rope_parameters"}, "rope_theta": 1e6,
           "rope_scaling": {"type": "linear", "factor": 2.0}}
    c4 = parse_hf_config(old)
    assert c4.rope_theta == 1e6 and c4.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(RomacError, match="RoPE scaling type 'yarn'"):
        parse_hf_config({**old, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"hidden_size": _DELETE}, "config.json: required field 'hidden_size' is missing"),
        ({"num_attention_heads": 5, "num_key_value_heads": 5, "head_dim": _DELETE},
         "hidden_size \\(64\\) is not divisible by num_attention_heads \\(5\\)"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"intermediate_size": 0}, "'intermediate_size' must be positive"),
        ({"attention_bias": True}, "'attention_bias' is true"),
        ({"mlp_bias": True}, "'mlp_bias' is true"),
        ({"hidden_act": "gelu"}, "'hidden_act' is 'gelu'"),
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type 'gpt2'"),
        ({"model_type": "mistral", "sliding_window": 16}, "sliding_window"),
    ],
)
def test_config_errors(tmp_path, ckpts, changes, match):
    d = _copy_ckpt(ckpts["fp32"][0], tmp_path / "c")
    _edit_json(d / "config.json", **changes)
    with pytest.raises(RomacError, match=match) as ei:
        load_hf_checkpoint(d)
    assert "config.json" in str(ei.value)


def test_mistral_without_window_accepted(tmp_path, ckpts):
    d = _copy_ckpt(ckpts["fp32"][0], tmp_path / "m")
    _edit_json(d / "config.json", model_type="mistral", sliding_window=None, architectures=["MistralForCausalLM"])
    assert load_hf_checkpoint(d).config.hidden_size == 64


def _rewrite_weights(d: Path, drop=(), add=None):
    f = SafetensorsFile(d / "model.safetensors")
    tensors = {k: np.array(f.raw(k)) for k in f.keys() if k not in drop}
    tensors.update(add or {})
    del f
    write_safetensors(d / "model.safetensors", tensors)


def test_missing_tensor(tmp_path, ckpts):
    d = _copy_ckpt(ckpts["fp32"][0], tmp_path / "c")
    _rewrite_weights(d, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(RomacError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        load_hf_checkpoint(d)


def test_untied_without_lm_head_and_tied_with_lm_head(tmp_path, ckpts):
    d = _copy_ckpt(ckpts["fp32"][0], tmp_path / "c")
    _rewrite_weights(d, drop=["lm_head.weight"])
    with pytest.raises(RomacError, match="'lm_head.weight' is missing.*tie_word_embeddings"):
        load_hf_checkpoint(d)
    _edit_json(d / "config.json", tie_word_embeddings=True)
    assert "lm_head" not in load_hf_checkpoint(d).weights
    d2 = _copy_ckpt(ckpts["fp32"][0], tmp_path / "c2")  # tied, but an lm_head.weight is stored: ignored
    _edit_json(d2 / "config.json", tie_word_embeddings=True)
    m = load_hf_checkpoint(d2)
    assert "lm_head" not in m.weights and "lm_head.weight" in m.source["ignored_tensors"]


def test_bias_rejected_extra_ignored_shape_checked(tmp_path, ckpts):
    d = _copy_ckpt(ckpts["fp32"][0], tmp_path / "c")
    _rewrite_weights(d, add={"model.layers.0.rotary_emb.inv_freq": np.ones(8, np.float32)})
    assert "model.layers.0.rotary_emb.inv_freq" in load_hf_checkpoint(d).source["ignored_tensors"]
    _rewrite_weights(d, add={"model.layers.0.self_attn.q_proj.bias": np.ones(64, np.float32)})
    with pytest.raises(RomacError, match="q_proj.bias' is a bias"):
        load_hf_checkpoint(d)
    d2 = _copy_ckpt(ckpts["fp32"][0], tmp_path / "c2")
    _rewrite_weights(d2, add={"model.norm.weight": np.ones(63, np.float32)})
    with pytest.raises(RomacError, match=r"model.safetensors: tensor 'model.norm.weight' has shape \(63,\)"):
        load_hf_checkpoint(d2)


def test_truncated_and_lying_checkpoint(tmp_path, ckpts):
    d = _copy_ckpt(ckpts["fp32"][0], tmp_path / "trunc")
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(RomacError, match=r"model.safetensors: tensor '.*': data_offsets .* past the end") as ei:
        load_hf_checkpoint(d)
    assert "truncated" in str(ei.value)

    d = _copy_ckpt(ckpts["fp32"][0], tmp_path / "lie")
    p = d / "model.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["data_offsets"][1] += 4  # claims one more float than its shape
    blob = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    with pytest.raises(RomacError, match="tensor 'model.norm.weight': data_offsets"):
        load_hf_checkpoint(d)


def test_unknown_dtype_and_pytorch_bin(tmp_path, ckpts):
    d = _copy_ckpt(ckpts["fp32"][0], tmp_path / "dt")
    p = d / "model.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["dtype"] = "F4"
    blob = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    with pytest.raises(RomacError, match="model.safetensors: tensor 'model.norm.weight': unknown or unsupported dtype 'F4'"):
        load_hf_checkpoint(d)

    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(ckpts["fp32"][0] / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(RomacError, match="safetensors only"):
        load_hf_checkpoint(d)


def test_sharded_index_errors(tmp_path, ckpts):
    d = _copy_ckpt(ckpts["sharded"][0], tmp_path / "s")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(idx["weight_map"].values()))[-1]
    (d / victim).unlink()
    with pytest.raises(RomacError, match=f"shard '{victim}'.*is missing"):
        load_hf_checkpoint(d)


# -- PEFT adapters --------------------------------------------------------------------------------------


def _adapter_key(tname: str, which: str) -> str:
    return f"base_model.model.model.{tname}.lora_{which}.weight"


@pytest.mark.parametrize("label", ["plain", "rslora"])
def test_adapter_exact(ckpts, adapters, label):
    d, ref, lc = adapters[label]
    cfg = load_hf_checkpoint(ckpts["fp32"][0]).config
    a = load_peft_adapter(d, label, cfg)
    assert a.name == label and a.rank == lc.r and a.alpha == lc.lora_alpha and a.use_rslora == lc.use_rslora
    want_scaling = lc.lora_alpha / (math.sqrt(lc.r) if lc.use_rslora else lc.r)
    assert a.scaling == pytest.approx(want_scaling)
    # peft's own scaling agrees
    pm = peft.get_peft_model(copy.deepcopy(ckpts["_model"]), lc)
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(a.scaling)
    modules = sorted(lc.target_modules)
    assert set(a.weights) == {projection_tensor(i, m) for i in range(2) for m in modules}
    for tname, (A, B) in a.weights.items():
        assert isinstance(A, LazyWeight) and isinstance(B, LazyWeight)
        module = tname.rsplit(".", 1)[1]
        out_f, in_f = cfg.projection_shape(module)
        assert A.shape == (lc.r, in_f) and B.shape == (out_f, lc.r)
        for h, which in ((A, "A"), (B, "B")):
            key = f"base_model.model.model.{tname}.lora_{which}.default.weight"
            np.testing.assert_array_equal(h.load(), ref[key])
    assert np.abs(a.weights[projection_tensor(0, "q_proj")][1].load()).sum() > 0


def test_adapter_with_name_segment(tmp_path, ckpts, adapters):
    d, ref, _ = adapters["plain"]
    d2 = _copy_ckpt(d, tmp_path / "named")
    f = SafetensorsFile(d2 / "adapter_model.safetensors")
    t = {k.replace(".weight", ".default.weight"): np.array(f.raw(k)) for k in f.keys()}
    write_safetensors(d2 / "adapter_model.safetensors", t)
    a = load_peft_adapter(d2, "named", load_hf_checkpoint(ckpts["fp32"][0]).config)
    A, _ = a.weights["layers.1.mlp.down_proj"]
    np.testing.assert_array_equal(A.load(), ref["base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight"])


def test_adapter_for_another_base(ckpts, adapters):
    cfg = load_hf_checkpoint(ckpts["fp32"][0]).config
    other = dataclasses.replace(cfg, intermediate_size=80)
    with pytest.raises(RomacError, match=r"adapter_model.safetensors: tensor '.*mlp.(gate|up)_proj.lora_B.weight' "
                       r"has shape \(96, 4\), the base model needs \(80, 4\).*another base") as ei:
        load_peft_adapter(adapters["plain"][0], "x", other)
    assert "\n" not in str(ei.value)
    with pytest.raises(RomacError, match="layer 1, but the base model has 1 layers"):
        load_peft_adapter(adapters["plain"][0], "x", dataclasses.replace(cfg, num_layers=1))


def test_adapter_targeting_embed_tokens(tmp_path, ckpts):
    lc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    pm = peft.get_peft_model(copy.deepcopy(ckpts["_model"]), lc)
    d = tmp_path / "emb"
    pm.save_pretrained(d)
    cfg = load_hf_checkpoint(ckpts["fp32"][0]).config
    with pytest.raises(RomacError, match="adapter_config.json: adapter targets unsupported module 'embed_tokens'"):
        load_peft_adapter(d, "emb", cfg)
    # with a regex target_modules only the tensors tell: still refused, naming the module and tensor
    _edit_json(d / "adapter_config.json", target_modules=".*(embed_tokens|q_proj)")
    with pytest.raises(RomacError, match="adapter_model.safetensors: adapter targets unsupported module 'embed_tokens'"):
        load_peft_adapter(d, "emb", cfg)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"r": 0}, "field 'r' must be a positive integer, got 0"),
        ({"peft_type": "IA3"}, "only LORA"),
        ({"use_dora": True}, "DoRA"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"bias": "all"}, "'bias' is 'all'"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"lora_alpha": _DELETE}, "'lora_alpha' is missing"),
        ({"target_modules": ["q_proj", "lm_head"]}, "unsupported module 'lm_head'"),
    ],
)
def test_adapter_config_errors(tmp_path, ckpts, adapters, changes, match):
    d = _copy_ckpt(adapters["plain"][0], tmp_path / "a")
    _edit_json(d / "adapter_config.json", **changes)
    with pytest.raises(RomacError, match=match) as ei:
        load_peft_adapter(d, "a", load_hf_checkpoint(ckpts["fp32"][0]).config)
    assert "adapter_config.json" in str(ei.value)


def test_adapter_missing_half(tmp_path, ckpts, adapters):
    d = _copy_ckpt(adapters["plain"][0], tmp_path / "a")
    f = SafetensorsFile(d / "adapter_model.safetensors")
    drop = _adapter_key("layers.0.self_attn.v_proj", "B")
    write_safetensors(d / "adapter_model.safetensors", {k: np.array(f.raw(k)) for k in f.keys() if k != drop})
    with pytest.raises(RomacError, match="layers.0.self_attn.v_proj: lora_B is missing"):
        load_peft_adapter(d, "a", load_hf_checkpoint(ckpts["fp32"][0]).config)


@pytest.mark.parametrize("bad", ["", "../evil", "a b", ".hidden", "x" * 65, "a/b", "é"])
def test_bad_adapter_name(ckpts, adapters, bad):
    with pytest.raises(RomacError, match="adapter name"):
        load_peft_adapter(adapters["plain"][0], bad, load_hf_checkpoint(ckpts["fp32"][0]).config)


def test_parse_adapter_arg(tmp_path):
    assert parse_adapter_arg("chat=/x/y") == ("chat", Path("/x/y"))
    assert parse_adapter_arg("/data/my adapter!/") == ("my_adapter_", Path("/data/my adapter!/"))
    assert parse_adapter_arg("./runs/a=b") == ("a_b", Path("./runs/a=b"))
    assert parse_adapter_arg("v1.2=rel/dir")[0] == "v1.2"
    with pytest.raises(RomacError, match="adapter name"):
        parse_adapter_arg("bad name=/x")
    with pytest.raises(RomacError, match="no path"):
        parse_adapter_arg("name=")
