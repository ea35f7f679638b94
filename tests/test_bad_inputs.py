"""Bad input, clearly (issue 5, item 4): a corpus of malformed inputs, each refused in one line.

Every case starts from a small valid Hugging Face checkpoint and PEFT adapter (written with romac's own
safetensors writer, no torch needed), breaks one thing, and runs ``romac compile``. Each must end with:
exit code 2; exactly one ``romac: error:`` line on stderr, naming the file (or option) and the tensor or field;
no traceback; nothing at the output path and no temporary beside it.

``python -m tests.test_bad_inputs`` prints the corpus as a Markdown table (case | error line), as quoted in
issue 5's resolution note.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from romac.frontend.safetensors_io import SafetensorsFile, write_safetensors
from romac.ir import PROJECTIONS, ModelConfig, expected_shape, tensor_names

from tests.clirun import assert_one_line_error, error_line, run_main, run_subprocess

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "torch_dtype": "float32",
}
IR_CONFIG = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=False)
RANK = 4
LORA_PREFIX = "base_model.model.model."


def hf_key(name: str) -> str:
    return "lm_head.weight" if name == "lm_head" else f"model.{name}.weight"


def lora_key(layer: int, module: str, which: str) -> str:
    block = "self_attn" if module in PROJECTIONS[:4] else "mlp"
    return f"{LORA_PREFIX}layers.{layer}.{block}.{module}.lora_{which}.weight"


def write_base(d: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(CONFIG, indent=1))
    tensors = {}
    for name in tensor_names(IR_CONFIG):
        shape = expected_shape(IR_CONFIG, name)
        w = 1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else rng.standard_normal(shape) / np.sqrt(shape[-1])
        tensors[hf_key(name)] = w.astype(np.float16)
    write_safetensors(d / "model.safetensors", tensors, metadata={"format": "pt"})


def write_adapter(d: Path, config: ModelConfig = IR_CONFIG, rank: int = RANK, modules=("q_proj", "v_proj", "down_proj"),
                  seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(modules), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "base_model_name_or_path": "tiny-llama",
    }, indent=1))
    tensors = {}
    for layer in range(config.num_layers):
        for m in modules:
            out_f, in_f = config.projection_shape(m)
            tensors[lora_key(layer, m, "A")] = (rng.standard_normal((rank, in_f)) / np.sqrt(in_f)).astype(np.float32)
            tensors[lora_key(layer, m, "B")] = (0.05 * rng.standard_normal((out_f, rank))).astype(np.float32)
    write_safetensors(d / "adapter_model.safetensors", tensors)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(path)
    return {k: np.array(f.raw(k)) for k in f.keys()}


def rewrite(path: Path, change: Callable[[dict], None]) -> None:
    t = read_tensors(path)
    change(t)
    write_safetensors(path, t)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is _DROP:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


_DROP = object()


def rewrite_header(path: Path, change: Callable[[dict], None]) -> None:
    """Edit a safetensors header in place of its bytes (the data area is kept as is)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


@dataclass
class Ctx:
    """One case's inputs: a private copy of the valid checkpoint and adapter, and a scratch directory."""

    base: Path
    adapter: Path
    scratch: Path

    @property
    def st(self) -> Path:
        return self.base / "model.safetensors"

    @property
    def adapter_st(self) -> Path:
        return self.adapter / "adapter_model.safetensors"

    def target(self, text_or_change) -> Path:
        from romac.targets import TARGET_DIR

        src = (TARGET_DIR / "tiny.toml").read_text()
        p = self.scratch / "target.toml"
        p.write_text(text_or_change(src) if callable(text_or_change) else text_or_change)
        return p


# Each case: ctx -> (compile arguments, words the error line must contain). Build-time changes happen here.
def _truncated_safetensors(c: Ctx):
    data = c.st.read_bytes()
    c.st.write_bytes(data[: len(data) // 2])
    return [c.base], ["model.safetensors", "tensor 'model.", "data_offsets", "truncated"]


def _truncated_header(c: Ctx):
    c.st.write_bytes(c.st.read_bytes()[:40])
    return [c.base], ["model.safetensors", "header length", "truncated"]


def _header_not_json(c: Ctx):
    raw = c.st.read_bytes()
    c.st.write_bytes(raw[:8] + b"!" + raw[9:])
    return [c.base], ["model.safetensors", "header is not valid JSON"]


def _header_offsets_overlap(c: Ctx):
    def lie(h):
        first, second = [k for k in h if k != "__metadata__"][:2]
        size = h[second]["data_offsets"][1] - h[second]["data_offsets"][0]
        start = h[first]["data_offsets"][0]
        h[second]["data_offsets"] = [start, start + size]

    rewrite_header(c.st, lie)
    return [c.base], ["model.safetensors", "data_offsets overlap", "tensor 'model."]


def _header_offsets_wrong_size(c: Ctx):
    rewrite_header(c.st, lambda h: h["model.layers.1.mlp.up_proj.weight"]["data_offsets"].__setitem__(
        1, h["model.layers.1.mlp.up_proj.weight"]["data_offsets"][1] - 2))
    return [c.base], ["model.safetensors", "'model.layers.1.mlp.up_proj.weight'", "data_offsets"]


def _wrong_dtype(c: Ctx):
    rewrite(c.st, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight",
                                          np.ones(expected_shape(IR_CONFIG, "layers.0.self_attn.k_proj"), np.int32)))
    return [c.base], ["model.safetensors", "'model.layers.0.self_attn.k_proj.weight'", "dtype I32"]


def _wrong_shape(c: Ctx):
    rewrite(c.st, lambda t: t.__setitem__("model.layers.1.mlp.gate_proj.weight", np.zeros((255, 128), np.float16)))
    return [c.base], ["model.safetensors", "'model.layers.1.mlp.gate_proj.weight'", "shape"]


def _missing_tensor(c: Ctx):
    rewrite(c.st, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    return [c.base], [c.base.name, "'model.layers.1.mlp.down_proj.weight'", "missing"]


def _missing_lm_head(c: Ctx):
    rewrite(c.st, lambda t: t.pop("lm_head.weight"))
    return [c.base], [c.base.name, "'lm_head.weight'", "tie_word_embeddings"]


def _no_weights_file(c: Ctx):
    c.st.unlink()
    return [c.base], [c.base.name, "model.safetensors"]


def _config_missing_key(c: Ctx):
    edit_json(c.base / "config.json", hidden_size=_DROP)
    return [c.base], ["config.json", "'hidden_size'", "missing"]


def _config_heads_do_not_divide(c: Ctx):
    edit_json(c.base / "config.json", num_attention_heads=3, num_key_value_heads=3)
    return [c.base], ["config.json", "hidden_size (128)", "num_attention_heads (3)"]


def _config_kv_heads_do_not_divide(c: Ctx):
    edit_json(c.base / "config.json", num_key_value_heads=3)
    return [c.base], ["config.json", "num_key_value_heads (3)"]


def _config_not_json(c: Ctx):
    (c.base / "config.json").write_text('{"model_type": "llama", hidden_size: 128}')
    return [c.base], ["config.json", "not valid JSON"]


def _config_wrong_type(c: Ctx):
    edit_json(c.base / "config.json", num_hidden_layers="2")
    return [c.base], ["config.json", "'num_hidden_layers'", "integer"]


def _config_zero_layers(c: Ctx):
    edit_json(c.base / "config.json", num_hidden_layers=0)
    return [c.base], ["config.json", "'num_hidden_layers'", "positive"]


def _config_other_architecture(c: Ctx):
    edit_json(c.base / "config.json", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    return [c.base], ["config.json", "model_type 'gpt2'"]


def _model_path_missing(c: Ctx):
    return [c.scratch / "no-such-model"], ["no-such-model", "no such file or directory"]


def _adapter_for_another_base(c: Ctx):
    shutil.rmtree(c.adapter)
    other = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=False)
    write_adapter(c.adapter, other)
    return [c.base, "--adapter", f"chat={c.adapter}"], ["adapter_model.safetensors", "lora_A.weight'", "shape",
                                                         "another base"]


def _adapter_targets_lm_head(c: Ctx):
    edit_json(c.adapter / "adapter_config.json", target_modules=["q_proj", "lm_head"])
    return [c.base, "--adapter", f"chat={c.adapter}"], ["adapter_config.json", "unsupported module 'lm_head'"]


def _adapter_has_embedding_lora(c: Ctx):
    rewrite(c.adapter_st, lambda t: t.update({
        "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((RANK, 256), np.float32)}))
    return [c.base, "--adapter", f"chat={c.adapter}"], ["adapter_model.safetensors", "'embed_tokens'",
                                                         "lora_embedding_A"]


def _adapter_rank_zero(c: Ctx):
    edit_json(c.adapter / "adapter_config.json", r=0)
    return [c.base, "--adapter", f"chat={c.adapter}"], ["adapter_config.json", "'r'", "positive"]


def _adapter_rank_disagrees(c: Ctx):
    edit_json(c.adapter / "adapter_config.json", r=8)
    return [c.base, "--adapter", f"chat={c.adapter}"], ["adapter_model.safetensors", "r=8", "rank"]


def _adapter_half_pair(c: Ctx):
    rewrite(c.adapter_st, lambda t: t.pop(lora_key(1, "v_proj", "B")))
    return [c.base, "--adapter", f"chat={c.adapter}"], ["adapter_model.safetensors", "layers.1.self_attn.v_proj",
                                                         "lora_B is missing"]


def _adapter_no_config(c: Ctx):
    (c.adapter / "adapter_config.json").unlink()
    return [c.base, "--adapter", f"chat={c.adapter}"], ["adapter_config.json", "not found"]


def _adapter_not_lora(c: Ctx):
    edit_json(c.adapter / "adapter_config.json", peft_type="IA3")
    return [c.base, "--adapter", f"chat={c.adapter}"], ["adapter_config.json", "peft_type", "IA3"]


def _adapter_path_missing(c: Ctx):
    return [c.base, "--adapter", f"chat={c.scratch / 'nowhere'}"], ["nowhere", "not a directory"]


def _nan_weight(c: Ctx):
    def poison(t):
        w = t["model.layers.1.mlp.up_proj.weight"].copy()
        w[77, 5] = np.nan
        t["model.layers.1.mlp.up_proj.weight"] = w

    rewrite(c.st, poison)
    return [c.base], ["model.safetensors", "model.layers.1.mlp.up_proj.weight", "nan", "row 77"]


def _inf_weight(c: Ctx):
    def poison(t):
        w = t["model.embed_tokens.weight"].copy()
        w[200, 100] = -np.inf
        t["model.embed_tokens.weight"] = w

    rewrite(c.st, poison)
    return [c.base], ["model.safetensors", "model.embed_tokens.weight", "-inf", "row 200"]


def _inf_in_norm(c: Ctx):
    def poison(t):
        w = t["model.layers.0.input_layernorm.weight"].copy()
        w[3] = np.inf
        t["model.layers.0.input_layernorm.weight"] = w

    rewrite(c.st, poison)
    return [c.base], ["model.safetensors", "model.layers.0.input_layernorm.weight", "inf"]


def _nan_in_adapter(c: Ctx):
    def poison(t):
        k = lora_key(0, "down_proj", "B")
        w = t[k].copy()
        w[9, 2] = np.nan
        t[k] = w

    rewrite(c.adapter_st, poison)
    return [c.base, "--adapter", f"chat={c.adapter}"], ["adapter_model.safetensors", "down_proj.lora_B", "nan", "row 9"]


def _target_missing_field(c: Ctx):
    return ["--target", c.target(lambda s: s.replace("word_bits = 64", ""))], ["target.toml", "[rom] word_bits", "missing"]


def _target_invalid_value(c: Ctx):
    return ["--target", c.target(lambda s: s.replace("word_bits = 64", "word_bits = 12"))], ["target.toml", "[rom] word_bits", "12"]


def _target_wrong_type(c: Ctx):
    return ["--target", c.target(lambda s: s.replace("banks = 16", 'banks = "sixteen"'))], ["target.toml", "[rom] banks", "must be an integer"]


def _target_not_toml(c: Ctx):
    return ["--target", c.target("[rom\nbanks = = 16\n")], ["target.toml", "not a valid TOML"]


def _target_unknown(c: Ctx):
    return ["--target", "no-such-chip"], ["--target", "no-such-chip"]


def _over_capacity(c: Ctx):
    return [c.base, "--target", c.target(lambda s: s.replace("bank_words = 32768", "bank_words = 1024"))], \
        ["B-ROM", "'tiny'", "over by"]


def _adapter_name(name: str):
    def case(c: Ctx):
        return [c.base, "--adapter", f"{name}={c.adapter}"], ["--adapter", f"adapter name {name!r}", "not allowed"]

    return case


def _two_adapters_same_name(c: Ctx):
    return [c.base, "--adapter", f"chat={c.adapter}", "--adapter", f"chat={c.adapter}"], ["--adapter", "'chat'"]


def _two_adapters_differ_in_case(c: Ctx):
    return [c.base, "--adapter", f"Chat={c.adapter}", "--adapter", f"chat={c.adapter}"], ["--adapter", "'Chat'", "'chat'"]


def _max_context_zero(c: Ctx):
    return [c.base, "--max-context", "0"], ["--max-context", "0"]


def _max_context_too_long(c: Ctx):
    return [c.base, "--adapter", f"chat={c.adapter}", "--max-context", "1000000"], ["--max-context", "SRAM"]


def _unknown_quant(c: Ctx):
    return [c.base, "--quant", "int3"], ["--quant", "int3"]


def _nf4_blocks_straddle(c: Ctx):
    edit_json(c.base / "config.json", intermediate_size=264)
    rewrite(c.st, lambda t: t.update({
        k: np.zeros((264, 128) if "down" not in k else (128, 264), np.float16)
        for k in list(t) if "mlp" in k}))
    return [c.base, "--quant", "nf4"], ["down_proj", "blocksize"]


def _beyond_int4_range(c: Ctx):
    def poison(t):
        w = t["model.layers.0.self_attn.o_proj.weight"].astype(np.float32)
        w[3, 7] = 1e9  # an fp16 group scale cannot reach (65504 * 15 is the largest range)
        t["model.layers.0.self_attn.o_proj.weight"] = w

    rewrite(c.st, poison)
    return [c.base], ["model.safetensors", "'layers.0.self_attn.o_proj'", "FP16 scale range"]


def _nf4_double_quant_overflow(c: Ctx):
    def poison(t):
        w = t["model.layers.1.mlp.down_proj.weight"].astype(np.float32)
        w[:, 0] = 3e38  # every block's absmax near float32's max: their mean overflows
        t["model.layers.1.mlp.down_proj.weight"] = w

    rewrite(c.st, poison)
    return [c.base, "--quant", "nf4"], ["model.safetensors", "'layers.1.mlp.down_proj'", "double quantization overflows"]


def _pytorch_bin_only(c: Ctx):
    c.st.unlink()
    (c.base / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    return [c.base], [c.base.name, "pytorch_model.bin", "safetensors"]


CASES: dict[str, Callable[[Ctx], tuple[list, list[str]]]] = {
    "truncated safetensors file": _truncated_safetensors,
    "safetensors cut inside the header": _truncated_header,
    "safetensors header not JSON": _header_not_json,
    "header lies: overlapping data_offsets": _header_offsets_overlap,
    "header lies: offsets disagree with shape": _header_offsets_wrong_size,
    "wrong dtype (int32 weights)": _wrong_dtype,
    "wrong shape": _wrong_shape,
    "missing tensor": _missing_tensor,
    "missing lm_head (untied)": _missing_lm_head,
    "no model.safetensors": _no_weights_file,
    "pytorch_model.bin only": _pytorch_bin_only,
    "config.json missing a key": _config_missing_key,
    "config: hidden not divisible by heads": _config_heads_do_not_divide,
    "config: heads not a multiple of kv heads": _config_kv_heads_do_not_divide,
    "config.json not JSON": _config_not_json,
    "config: a string where an int belongs": _config_wrong_type,
    "config: zero layers": _config_zero_layers,
    "config: another architecture": _config_other_architecture,
    "model path does not exist": _model_path_missing,
    "adapter for another base": _adapter_for_another_base,
    "adapter targets lm_head": _adapter_targets_lm_head,
    "adapter has an embedding LoRA tensor": _adapter_has_embedding_lora,
    "adapter rank 0": _adapter_rank_zero,
    "adapter r disagrees with its tensors": _adapter_rank_disagrees,
    "adapter lora_A without lora_B": _adapter_half_pair,
    "adapter without adapter_config.json": _adapter_no_config,
    "adapter of another PEFT type": _adapter_not_lora,
    "adapter path does not exist": _adapter_path_missing,
    "NaN weight": _nan_weight,
    "Inf weight": _inf_weight,
    "Inf in a norm vector": _inf_in_norm,
    "NaN in an adapter": _nan_in_adapter,
    "target TOML missing a field": _target_missing_field,
    "target TOML invalid value": _target_invalid_value,
    "target TOML wrong type": _target_wrong_type,
    "target TOML not TOML": _target_not_toml,
    "unknown built-in target": _target_unknown,
    "model over the target's capacity": _over_capacity,
    "adapter name ../x": _adapter_name("../x"),
    "adapter name a/b": _adapter_name("a/b"),
    "adapter name empty": _adapter_name(""),
    "adapter name con (Windows device)": _adapter_name("con"),
    "adapter name with a space": _adapter_name("my chat"),
    "adapter name .hidden": _adapter_name(".hidden"),
    "two adapters with the same name": _two_adapters_same_name,
    "two adapters differing only in case": _two_adapters_differ_in_case,
    "--max-context 0": _max_context_zero,
    "--max-context too long for SRAM": _max_context_too_long,
    "unknown --quant": _unknown_quant,
    "nf4 blocks straddle rows": _nf4_blocks_straddle,
    "weight beyond the int4 range (fp16 scale)": _beyond_int4_range,
    "nf4 double quantization overflows": _nf4_double_quant_overflow,
}

# ----- ONNX and GGUF inputs: built from the same valid checkpoint (romac's own FP32 graph writer; gguf's writer)


def _onnx_from_base(c: Ctx, external: bool = False) -> Path:
    import onnx

    from romac.frontend.hf import load_hf_checkpoint
    from romac.onnx_reference import build_onnx_graph

    d = c.scratch / "onnx"
    d.mkdir()
    path = build_onnx_graph(load_hf_checkpoint(c.base), None, d / "model.onnx")
    if external:
        proto = onnx.load(str(path))
        onnx.save_model(proto, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return path


def _onnx_unsupported_op(c: Ctx):
    import onnx

    path = _onnx_from_base(c)
    proto = onnx.load(str(path))
    node = next(n for n in proto.graph.node if n.op_type == "Sigmoid")
    node.op_type, node.name = "Einsum", "the_activation"
    onnx.save_model(proto, str(path))
    return [path], ["model.onnx", "unsupported op Einsum", "the_activation"]


def _onnx_external_data_escapes(c: Ctx):
    import onnx

    path = _onnx_from_base(c, external=True)
    shutil.move(path.parent / "weights.bin", c.scratch / "secret.bin")
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.bin"
    onnx.save_model(proto, str(path))
    return [path], ["model.onnx", "external data", "../secret.bin", "outside the model's directory"]


def _onnx_external_data_truncated(c: Ctx):
    path = _onnx_from_base(c, external=True)
    data = path.parent / "weights.bin"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return [path], ["model.onnx", "external data", "truncated"]


def _write_gguf(path: Path, arch: str, embedding_shape: tuple[int, int]) -> Path:
    """A minimal GGUF file (llama.cpp's own writer): the architecture and one embedding tensor."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros(embedding_shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_other_architecture(c: Ctx):
    path = _write_gguf(c.scratch / "model.gguf", "gpt2", (16, 8))
    return [path], ["model.gguf", "general.architecture", "gpt2"]


def _gguf_truncated(c: Ctx):
    path = _write_gguf(c.scratch / "model.gguf", "llama", (256, 128))
    path.write_bytes(path.read_bytes()[:-4096])
    return [path], ["model.gguf"]


CASES.update({
    "ONNX graph with an unsupported op": _onnx_unsupported_op,
    "ONNX external data escaping the model's directory": _onnx_external_data_escapes,
    "ONNX external data file truncated": _onnx_external_data_truncated,
    "GGUF of another architecture": _gguf_other_architecture,
    "GGUF truncated": _gguf_truncated,
})



SUBPROCESS_CASES = ["truncated safetensors file", "NaN weight", "adapter name ../x", "target TOML not TOML",
                    "--max-context 0", "config.json missing a key"]


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    write_base(root / "base")
    write_adapter(root / "adapter")
    return root


def _ctx(valid: Path, tmp_path: Path) -> Ctx:
    c = Ctx(tmp_path / "ckpt" / "tiny-llama", tmp_path / "ckpt" / "chat-adapter", tmp_path / "scratch")
    shutil.copytree(valid / "base", c.base)
    shutil.copytree(valid / "adapter", c.adapter)
    c.scratch.mkdir()
    return c


def _assert_nothing_written(outs: Path) -> None:
    left = sorted(p.name for p in outs.iterdir()) if outs.exists() else []
    assert not left, f"left behind: {left}"


def test_the_valid_inputs_compile(valid, tmp_path, capsys):
    c = _ctx(valid, tmp_path)
    res = run_main(capsys, "compile", c.base, "--adapter", f"chat={c.adapter}", "--out", tmp_path / "out", "-q")
    assert res.returncode == 0, res.stderr
    for case in ("nf4", "--max-context"):  # the cases that change a flag start from a valid compile too
        args = ["--quant", "nf4"] if case == "nf4" else ["--max-context", "64"]
        assert run_main(capsys, "compile", c.base, *args, "--out", tmp_path / case, "-q").returncode == 0


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(valid, tmp_path, capsys, case):
    c = _ctx(valid, tmp_path)
    args, words = CASES[case](c)
    outs = tmp_path / "outs"
    res = run_main(capsys, "compile", *args, "--out", outs / "out", "-q")
    line = assert_one_line_error(res, *words)
    assert line.startswith("romac: error: ")
    _assert_nothing_written(outs)


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_through_the_entry_point(valid, tmp_path, case):
    """Without -q, through a real process: the progress line, then the one error line; no traceback."""
    c = _ctx(valid, tmp_path)
    args, words = CASES[case](c)
    outs = tmp_path / "outs"
    res = run_subprocess("compile", *args, "--out", outs / "out")
    line = error_line(res)
    assert res.stderr.strip().splitlines()[-1] == line
    for w in words:
        assert w in line, line
    _assert_nothing_written(outs)


def test_nan_is_caught_while_streaming_not_in_a_second_pass(valid, tmp_path, capsys, monkeypatch):
    """The NaN check runs on the chunk the emitter quantizes: a late row is found in its own chunk."""
    from romac.backend import emit

    c = _ctx(valid, tmp_path)
    monkeypatch.setattr(emit, "CHUNK_BYTES", 64 * 128 * 4)  # one tile row of 64 rows per chunk

    def poison(t):
        w = t["model.layers.1.mlp.gate_proj.weight"].copy()
        w[250, 0] = np.nan
        t["model.layers.1.mlp.gate_proj.weight"] = w

    rewrite(c.st, poison)
    line = assert_one_line_error(run_main(capsys, "compile", c.base, "--out", tmp_path / "o" / "out", "-q"),
                                 "gate_proj", "row 250, column 0")
    assert line
    _assert_nothing_written(tmp_path / "o")


def _table() -> str:  # pragma: no cover - a report, not a test
    import tempfile

    class _Cap:
        def readouterr(self):
            return "", ""

    rows = ["| case | error line |", "| --- | --- |"]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_base(root / "valid" / "base")
        write_adapter(root / "valid" / "adapter")
        for k, (name, build) in enumerate(CASES.items()):
            tmp = root / f"case{k}"
            tmp.mkdir()
            c = _ctx(root / "valid", tmp)
            args, _ = build(c)
            res = run_subprocess("compile", *args, "--out", tmp / "outs" / "out", "-q")
            line = res.stderr.strip().replace(str(tmp), "…").replace("|", "\\|")
            rows.append(f"| {name} | `{line}` (exit {res.returncode}) |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(_table())
