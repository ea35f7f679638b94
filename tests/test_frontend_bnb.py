"""bitsandbytes-serialized 4-bit (and 8-bit) checkpoints: the stored codes go to ROM untouched.

Fixtures are made with the real tools: a small LLaMA saved by transformers (fp32), loaded with
``BitsAndBytesConfig(load_in_4bit=True, ...)`` on the CPU and written back with ``save_pretrained``. For each
variant, compiling the FP checkpoint with the matching options and compiling the bnb checkpoint must give
byte-identical ROM bank images and SRAM images; the emulator on the bnb compile must match the golden model;
and the golden model's weights must be bitsandbytes' own ``dequantize_4bit`` of the loaded ``Params4bit``.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from click.testing import CliRunner  # noqa: E402

from romac.cli import cli, main  # noqa: E402
from romac.codecs import get_codec  # noqa: E402
from romac.driver import compile_checkpoint  # noqa: E402
from romac.errors import RomacError  # noqa: E402
from romac.frontend import load_model  # noqa: E402
from romac.frontend.bnb import Bnb4bitWeight  # noqa: E402
from romac.frontend.safetensors_io import SafetensorsFile, write_safetensors  # noqa: E402
from romac.ir import PROJECTIONS, projection_tensor  # noqa: E402
from romac.passes import CompileOptions  # noqa: E402
from romac.reference import GoldenModel  # noqa: E402
from romac.verify import verify  # noqa: E402
from tests.bnb_reference import native_is_defined, reference_dequantize, same_values  # noqa: E402

# label -> (bnb_4bit_quant_type, bnb_4bit_use_double_quant, blocksize)
VARIANTS = {
    "nf4-dq": ("nf4", True, 64),
    "nf4": ("nf4", False, 64),
    "fp4-dq": ("fp4", True, 64),
    "fp4": ("fp4", False, 64),
    "nf4-dq-b128": ("nf4", True, 128),     # transformers cannot set it: re-quantized with bnb's Params4bit
    "fp4-b32": ("fp4", False, 32),
}


def _cli_flags(quant_type: str, double_quant: bool, blocksize: int) -> list[str]:
    flags = ["--quant", quant_type]
    if not double_quant:
        flags.append("--no-double-quant")
    if blocksize != 64:
        flags += ["--bnb-blocksize", str(blocksize)]
    return flags


def _save_fp(root: Path) -> tuple[Path, Path]:
    from tests.conftest import trained_like_llama

    model = trained_like_llama(perturb_norms=True)
    model.save_pretrained(root / "fp32")
    copy.deepcopy(model).to(torch.float16).save_pretrained(root / "fp16")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(PROJECTIONS)))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pm.save_pretrained(root / "adapter")
    return root / "fp32", root / "adapter"


def _load_4bit(fp_dir: Path, quant_type: str, double_quant: bool, blocksize: int = 64, dtype=torch.float32,
               storage=None):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                          bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32,
                                          bnb_4bit_quant_storage=storage)
    model = transformers.LlamaForCausalLM.from_pretrained(fp_dir, quantization_config=cfg, device_map="cpu", dtype=dtype)
    if blocksize != 64:  # what bnb.nn.Linear4bit(blocksize=...) users have; transformers' config has no field
        float_model = transformers.LlamaForCausalLM.from_pretrained(fp_dir, dtype=dtype)
        fp = dict(float_model.named_modules())
        for name, mod in model.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                mod.weight = bnb.nn.Params4bit(fp[name].weight.data, requires_grad=False, blocksize=blocksize,
                                               compress_statistics=double_quant, quant_type=quant_type).to("cpu")
    return model.eval()


@pytest.fixture(scope="session")
def bnb_ckpts(tmp_path_factory):
    """{label: (bnb dir, loaded 4-bit torch model)} plus "fp32", "fp16" and "adapter" dirs."""
    root = tmp_path_factory.mktemp("bnb")
    fp_dir, adapter_dir = _save_fp(root)
    out: dict = {"fp32": fp_dir, "fp16": root / "fp16", "adapter": adapter_dir, "root": root}
    for label, (qt, dq, bs) in VARIANTS.items():
        model = _load_4bit(fp_dir, qt, dq, bs)
        model.save_pretrained(root / label)
        out[label] = (root / label, model)
    return out


@pytest.fixture(scope="session")
def compiled_pairs(bnb_ckpts, tmp_path_factory):
    """{label: (FP compile dir, bnb compile dir)}: the FP one through the CLI with the matching flags."""
    root = tmp_path_factory.mktemp("bnb-out")
    adapter = f"chat={bnb_ckpts['adapter']}"
    out = {}
    for label, (qt, dq, bs) in VARIANTS.items():
        fp_out, bnb_out = root / f"{label}-fp", root / f"{label}-bnb"
        res = CliRunner().invoke(cli, ["compile", str(bnb_ckpts["fp32"]), "--adapter", adapter, "-q",
                                       "-o", str(fp_out), *_cli_flags(qt, dq, bs)])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(cli, ["compile", str(bnb_ckpts[label][0]), "--adapter", adapter, "-q", "-o", str(bnb_out)])
        assert res.exit_code == 0, res.output
        out[label] = (fp_out, bnb_out)
    return out


def _images(d: Path) -> dict[str, bytes]:
    files = sorted(d.glob("rom/*.rom")) + sorted(d.glob("sram/*.bin"))
    return {str(f.relative_to(d)): f.read_bytes() for f in files}


def assert_same_images(a: Path, b: Path) -> None:
    ia, ib = _images(a), _images(b)
    assert ia.keys() == ib.keys() and any(k.startswith("rom/") for k in ia)
    different = [k for k in ia if ia[k] != ib[k]]
    assert not different, f"images differ: {different}"


# ------------------------------------------------------------------------------ the small model
@pytest.mark.parametrize("label", list(VARIANTS))
def test_same_rom_images_as_fp_checkpoint(bnb_ckpts, compiled_pairs, label):
    fp_out, bnb_out = compiled_pairs[label]
    assert_same_images(fp_out, bnb_out)
    qt, dq, bs = VARIANTS[label]
    regions = {r["name"]: r for r in json.loads((bnb_out / "manifest.json").read_text())["regions"]}
    assert regions["layers.1.mlp.down_proj"]["codec"] == {"format": qt, "blocksize": bs, "double_quant": dq}
    assert ("layers.0.self_attn.q_proj.qconst" in regions) == dq


@pytest.mark.parametrize("label", list(VARIANTS))
def test_emulator_matches_golden_on_bnb_compile(bnb_ckpts, compiled_pairs, label):
    _, bnb_out = compiled_pairs[label]
    checks = verify(str(bnb_out), str(bnb_ckpts[label][0]), [f"chat={bnb_ckpts['adapter']}"], steps=6, with_onnx=False)
    assert [c.adapter for c in checks] == [None, "chat"]
    for c in checks:
        assert c.relative_error <= 1e-5 and c.tokens == c.golden_tokens, c


@pytest.mark.parametrize("label", list(VARIANTS))
def test_golden_weights_are_bnb_dequantize(bnb_ckpts, label):
    """The golden model's weights (from the stored codes) equal bnb's dequantization of the loaded Params4bit."""
    bnb_dir, torch_model = bnb_ckpts[label]
    model = load_model(str(bnb_dir))
    qt, dq, bs = VARIANTS[label]
    spec = {"format": qt, "blocksize": bs, "double_quant": dq}
    formats = {name: (spec if isinstance(h, Bnb4bitWeight) else get_codec("fp32").spec())
               for name, h in model.weights.items()}
    golden = GoldenModel(model, formats)
    modules = dict(torch_model.named_modules())
    for layer in range(model.config.num_layers):
        for m in PROJECTIONS:
            name = projection_tensor(layer, m)
            handle = model.weights[name]
            assert isinstance(handle, Bnb4bitWeight) and dict(handle.codec_spec) == spec
            p = modules[f"model.{name}"].weight
            ref = reference_dequantize(p.data, p.quant_state)       # bnb's definition, the same on every CPU
            ours = golden.weight(name).astype(np.float32)
            assert same_values(ours, ref), name                      # bit for bit (+0.0 == -0.0)
            if native_is_defined(ref.shape, bs):
                assert same_values(ours, bnb.functional.dequantize_4bit(p.data, p.quant_state).numpy()), name
            assert same_values(handle.load(), ref)                   # the float view of the handle too
            assert same_values(handle.load_rows(5, 17), ref[5:17])
            q = handle.load_quantized()                              # and the stored parts, untouched
            assert np.array_equal(q.params["absmax"], p.quant_state.absmax.numpy())
            if dq:
                assert np.array_equal(q.constants["nested_absmax"], p.quant_state.state2.absmax.numpy())
                assert q.constants["offset"][0] == p.quant_state.offset.item()


def test_float_tensors_and_source(bnb_ckpts):
    model = load_model(str(bnb_ckpts["nf4-dq"][0]))
    fp = load_model(str(bnb_ckpts["fp32"]))
    for name in ("embed_tokens", "lm_head", "norm", "layers.1.input_layernorm"):
        assert model.weights[name].codec_spec is None  # float: no stored codes
        assert np.array_equal(model.weights[name].load(), fp.weights[name].load())
    assert model.source["kind"] == "bnb"
    assert model.source["bitsandbytes"] == {"load_in": "4bit", "tensor_formats": {"float": 7, "nf4 b64 dq": 14},
                                            "quantized_from": ["float32"]}


def test_quant_storage_and_fp16_load(bnb_ckpts, tmp_path):
    """bnb_4bit_quant_storage=bfloat16 stores the same bytes; an fp16 checkpoint loaded as fp16 matches its FP compile."""
    root = bnb_ckpts["root"]
    m = _load_4bit(bnb_ckpts["fp32"], "nf4", True, storage="bfloat16")
    m.save_pretrained(tmp_path / "bf16-storage")
    assert SafetensorsFile(tmp_path / "bf16-storage" / "model.safetensors").info(
        "model.layers.0.self_attn.q_proj.weight").dtype == "BF16"
    compile_checkpoint(str(tmp_path / "bf16-storage"), tmp_path / "o-storage")
    compile_checkpoint(str(bnb_ckpts["nf4-dq"][0]), tmp_path / "o-u8")
    assert_same_images(tmp_path / "o-storage", tmp_path / "o-u8")

    m16 = _load_4bit(root / "fp16", "nf4", True, dtype=torch.float16)
    m16.save_pretrained(tmp_path / "bnb16")
    assert load_model(str(tmp_path / "bnb16")).source["bitsandbytes"]["quantized_from"] == ["float16"]
    compile_checkpoint(str(tmp_path / "bnb16"), tmp_path / "o-bnb16")
    compile_checkpoint(str(root / "fp16"), tmp_path / "o-fp16", options=CompileOptions(quant="nf4"))
    assert_same_images(tmp_path / "o-bnb16", tmp_path / "o-fp16")


def test_sharded_bnb_checkpoint(bnb_ckpts, compiled_pairs, tmp_path):
    bnb_ckpts["nf4-dq"][1].save_pretrained(tmp_path / "shards", max_shard_size="40KB")
    assert len(list((tmp_path / "shards").glob("model-*.safetensors"))) > 2
    res = CliRunner().invoke(cli, ["compile", str(tmp_path / "shards"), "--adapter", f"chat={bnb_ckpts['adapter']}",
                                   "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "bitsandbytes 4-bit checkpoint" in res.output and "nf4, double quant" in res.output
    assert_same_images(tmp_path / "o", compiled_pairs["nf4-dq"][1])


def test_loaded_in_narrower_dtype_differs(bnb_ckpts, tmp_path):
    """The documented condition: fp32 weights loaded as bf16 are rounded before bitsandbytes quantizes them."""
    m = _load_4bit(bnb_ckpts["fp32"], "nf4", True, dtype=torch.bfloat16)
    m.save_pretrained(tmp_path / "bnb-bf16")
    bnb_model, fp_model = load_model(str(tmp_path / "bnb-bf16")), load_model(str(bnb_ckpts["fp32"]))
    name = projection_tensor(0, "up_proj")
    stored = bnb_model.weights[name].load_quantized()
    codec = get_codec("nf4")
    w = fp_model.weights[name].load()
    assert not np.array_equal(codec.quantize(w).codes, stored.codes)
    bf16 = torch.from_numpy(np.array(w)).to(torch.bfloat16).float().numpy()   # what bnb quantized
    again = codec.quantize(bf16)
    assert np.array_equal(again.codes, stored.codes) and np.array_equal(again.params["absmax"], stored.params["absmax"])
    assert again.constants["offset"][0] == stored.constants["offset"][0]


def test_requantize_and_option_errors(bnb_ckpts, tmp_path):
    bnb_dir = str(bnb_ckpts["nf4-dq"][0])
    # --quant naming the stored format keeps the codes; another format re-quantizes the dequantized weights
    compile_checkpoint(bnb_dir, tmp_path / "same", options=CompileOptions(quant="nf4"))
    compile_checkpoint(bnb_dir, tmp_path / "plain")
    assert_same_images(tmp_path / "same", tmp_path / "plain")
    compile_checkpoint(bnb_dir, tmp_path / "int4", options=CompileOptions(quant="int4"))
    regions = {r["name"]: r for r in json.loads((tmp_path / "int4" / "manifest.json").read_text())["regions"]}
    assert regions["layers.0.mlp.up_proj"]["codec"]["format"] == "int4"
    checks = verify(str(tmp_path / "int4"), bnb_dir, steps=4, with_onnx=False)
    assert all(c.passed for c in checks)
    # bitsandbytes parameters that would change nothing, or are invalid
    with pytest.raises(RomacError, match=r"--no-double-quant: has no effect.*--quant nf4"):
        compile_checkpoint(bnb_dir, tmp_path / "x", options=CompileOptions(double_quant=False))
    with pytest.raises(RomacError, match=r"--bnb-blocksize: has no effect"):
        compile_checkpoint(str(bnb_ckpts["fp32"]), tmp_path / "x", options=CompileOptions(quant="int4", bnb_blocksize=128))
    with pytest.raises(RomacError, match=r"--bnb-blocksize: invalid blocksize 48"):
        compile_checkpoint(str(bnb_ckpts["fp32"]), tmp_path / "x", options=CompileOptions(quant="nf4", bnb_blocksize=48))
    assert not (tmp_path / "x").exists()


def test_compile_help_documents_qlora_flags():
    res = CliRunner().invoke(cli, ["compile", "--help"])
    assert res.exit_code == 0
    for flag in ("--bnb-blocksize", "--no-double-quant", "--bnb-threads", "--bnb-cpu-repacked",
                 "bnb_4bit_use_double_quant", "QLoRA"):
        assert flag in res.output


def _save_after_cpu_repacking(fp_dir: Path, out: Path, double_quant: bool) -> Path:
    """A 4-bit checkpoint saved after bitsandbytes' CPU inference repacking (what Linear4bit.forward does on an
    AVX512-BF16 CPU; applied here with bitsandbytes' own function, so every machine gets the same checkpoint)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = _load_4bit(fp_dir, "nf4", double_quant)
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit) and not getattr(mod.weight.quant_state, "packing_format_for_cpu", False):
            mod.weight.data, mod.weight.quant_state = _convert_weight_packed_for_cpu(mod.weight.data, mod.weight.quant_state)
    model.save_pretrained(out)
    return out


def test_checkpoint_saved_after_cpu_repacking(bnb_ckpts, tmp_path):
    """--bnb-cpu-repacked makes the FP compile match it; without double quantization it cannot load: refused."""
    repacked = _save_after_cpu_repacking(bnb_ckpts["fp32"], tmp_path / "repacked", double_quant=True)
    args = ["compile", str(bnb_ckpts["fp32"]), "--quant", "nf4", "-q"]
    assert CliRunner().invoke(cli, [*args, "--bnb-cpu-repacked", "-o", str(tmp_path / "fp")]).exit_code == 0
    assert CliRunner().invoke(cli, ["compile", str(repacked), "-q", "-o", str(tmp_path / "bnb")]).exit_code == 0
    assert_same_images(tmp_path / "fp", tmp_path / "bnb")
    assert CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "plain")]).exit_code == 0
    assert _images(tmp_path / "plain") != _images(tmp_path / "bnb")
    with pytest.raises(SystemExit) as e:
        main([*args, "--no-double-quant", "--bnb-cpu-repacked", "-o", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()
    broken = _save_after_cpu_repacking(bnb_ckpts["fp32"], tmp_path / "broken", double_quant=False)
    with pytest.raises(RomacError, match=r"absmax'?: is a bfloat16 absmax of shape \[2, 128\]") as e:
        load_model(str(broken))
    assert "\n" not in str(e.value)


def test_int8_checkpoint(bnb_ckpts, tmp_path):
    """LLM.int8 checkpoints load as bitsandbytes dequantizes them, then compile to the chosen format."""
    cfg = transformers.BitsAndBytesConfig(load_in_8bit=True)
    m = transformers.LlamaForCausalLM.from_pretrained(bnb_ckpts["fp32"], quantization_config=cfg, device_map="cpu",
                                                      dtype=torch.float32)
    m.save_pretrained(tmp_path / "int8")
    model = load_model(str(tmp_path / "int8"))
    assert model.source["bitsandbytes"]["load_in"] == "8bit"
    for name, mod in m.named_modules():
        if isinstance(mod, bnb.nn.Linear8bitLt):
            ref = bnb.functional.int8_vectorwise_dequant(mod.weight.data, mod.weight.SCB).numpy()
            h = model.weights[name.removeprefix("model.")]
            assert h.load().tobytes() == ref.tobytes()
            assert h.load_rows(3, 9).tobytes() == ref[3:9].tobytes()
    compile_checkpoint(str(tmp_path / "int8"), tmp_path / "o", options=CompileOptions(quant="nf4"))
    assert all(c.passed for c in verify(str(tmp_path / "o"), str(tmp_path / "int8"), steps=4, with_onnx=False))


# ------------------------------------------------------------------------------ malformed checkpoints
Q = "model.layers.0.self_attn.q_proj.weight"
QS = f"{Q}.quant_state.bitsandbytes__nf4"


def _tamper(src: Path, dst: Path, edit) -> Path:
    """Copy a bnb checkpoint, letting ``edit(tensors)`` change its tensor dict (name -> numpy array)."""
    shutil.copytree(src, dst)
    f = SafetensorsFile(src / "model.safetensors")
    tensors = {k: np.array(f.raw(k)) for k in f.keys()}
    dtypes = {k: f.info(k).dtype for k in f.keys() if f.info(k).dtype == "BF16"}
    edit(tensors)
    write_safetensors(dst / "model.safetensors", tensors, metadata=f.metadata,
                      dtypes={k: v for k, v in dtypes.items() if k in tensors})
    return dst


def _set_state(**changes):
    def edit(t):
        state = json.loads(bytes(t[QS]).decode())
        state.update(changes)
        t[QS] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    return edit


def _rename_state(new_suffix: str, quant_type: str):
    def edit(t):
        state = json.loads(bytes(t.pop(QS)).decode())
        state["quant_type"] = quant_type
        t[f"{Q}.quant_state.bitsandbytes__{new_suffix}"] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    return edit


def _drop(key):
    return lambda t: t.pop(key)


def _scale(key, factor):
    def edit(t):
        t[key] = t[key] * np.float32(factor)
    return edit


ERRORS = {
    "bad blocksize": (_set_state(blocksize=100), rf"{QS}'?: field 'blocksize' is 100"),
    "other blocksize": (_set_state(blocksize=128), rf"{Q}.absmax'?: shape is \[256\], expected \[128\]"),
    "wrong shape": (_set_state(shape=[128, 64]), rf"{QS}'?: field 'shape' is \[128, 64\], config.json implies \[128, 128\]"),
    "missing absmax": (_drop(f"{Q}.absmax"), rf"tensor '{Q}.absmax' is missing"),
    "unknown quant_type": (_rename_state("nf5", "nf5"), r"field 'quant_type' is 'nf5', an unknown 4-bit type"),
    "type disagrees": (_set_state(quant_type="fp4"), r"field 'quant_type' is 'fp4' but the tensor name says 'nf4'"),
    "custom quant_map": (_scale(f"{Q}.quant_map", 0.5), rf"{Q}.quant_map'?: is not bitsandbytes' nf4 table"),
    "custom nested map": (_scale(f"{Q}.nested_quant_map", 0.5), r"nested_quant_map'?: is not bitsandbytes' signed"),
    "bad nested_offset": (_set_state(nested_offset="x"), r"field 'nested_offset' is 'x'"),
    "nested_blocksize": (_set_state(nested_blocksize=128), r"field 'nested_blocksize' is 128"),
    "dtype": (_set_state(dtype="float8"), r"field 'dtype' is 'float8'"),
    "unknown field": (_set_state(zero_point=1), r"unknown field\(s\) zero_point"),
    "missing state": (_drop(QS), rf"{Q}\.\w+'?: is a bitsandbytes part of '{Q}', but there is no"),
    "truncated codes": (lambda t: t.__setitem__(Q, t[Q][:-1]), rf"{Q}'?: holds 8191 bytes"),
    "not json": (lambda t: t.__setitem__(QS, np.frombuffer(b"{nope", np.uint8).copy()), r"is not UTF-8 JSON"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_malformed_bnb_checkpoint(bnb_ckpts, tmp_path, case):
    edit, match = ERRORS[case]
    bad = _tamper(bnb_ckpts["nf4-dq"][0], tmp_path / "bad", edit)
    with pytest.raises(RomacError, match=match) as e:
        load_model(str(bad))
    msg = str(e.value)
    assert "\n" not in msg and str(bad / "model.safetensors") in msg


def test_malformed_through_cli_and_config(bnb_ckpts, tmp_path, capsys):
    bad = _tamper(bnb_ckpts["nf4-dq"][0], tmp_path / "bad", _set_state(blocksize=100))
    with pytest.raises(SystemExit) as e:
        main(["compile", str(bad), "-o", str(tmp_path / "out"), "-q"])
    assert e.value.code == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("romac: error: ") and QS in err and "blocksize" in err
    # a quantization_config that is neither 4- nor 8-bit
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"].update(load_in_4bit=False, _load_in_4bit=False)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RomacError, match="sets neither load_in_4bit nor load_in_8bit"):
        load_model(str(bad))
    cfg["quantization_config"] = {"quant_method": "gptq"}  # now a reader of its own, which wants its fields
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RomacError, match="field 'bits' is missing"):
        load_model(str(bad))
    cfg["quantization_config"] = {"quant_method": "eetq"}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RomacError, match="quant_method 'eetq' is not supported.*gptq, awq, compressed-tensors"):
        load_model(str(bad))

# The real model (SmolLM2's bnb NF4 checkpoint: same ROM as FP → NF4, and verified against golden) is in
# tests/test_real_model.py with the other input kinds.
