"""``romac export-base``: the base a compiled ROM holds, as a Hugging Face checkpoint to train adapters on.

The weights are exactly the values the ROM decodes to: float32 for the affine and float formats (exact: an FP16
scale times a small integer, or the float itself); a bitsandbytes 4-bit checkpoint with the same codes, absmax and
double-quantization statistics for NF4/FP4 (what a QLoRA run loads). A projection with a low-rank correction in
SRAM is exported as the chip computes it, ROM value plus ``L1 L2`` (float32, rounded once from the float64 sum),
so an adapter trained on the export sees the corrected base; ``romac_base.json`` names those. Or the correction is
written as a PEFT LoRA adapter beside the ROM-only weights (``--correction-as-lora``: LoftQ's form, the base's
factors as a LoRA initialisation). Beside them ``config.json``, the tokenizer
when the artifacts carry one, and ``romac_base.json`` with the ROM's base fingerprint, which ``romac adapter add``
checks an adapter against. Read one region at a time; written whole or not at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from romac import __version__
from romac.adapters import BASE_FILE
from romac.artifacts import dump_json, open_artifacts
from romac.backend import atomic
from romac.codecs import codec_for
from romac.codecs.bnb import Bnb4bitCodec
from romac.emulator.rom import Rom
from romac.emulator.sram import Sram
from romac.errors import RomacError
from romac.frontend.safetensors_io import write_safetensors, write_safetensors_streaming
from romac.ir import PROJECTIONS, ModelConfig, projection_tensor, tensor_names
from romac.spec.formats import BNB_DYNAMIC_SIGNED, BNB_NESTED_BLOCKSIZE, Bnb4bitFormat
from romac.spec.manifest import TOKENIZER, Manifest

WEIGHTS = "model.safetensors"
QUANT_STATE = "quant_state.bitsandbytes__"


def hf_key(name: str) -> str:
    """The Hugging Face key of an IR tensor name."""
    return "lm_head.weight" if name == "lm_head" else f"model.{name}.weight"


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """``config.json`` of a LlamaForCausalLM with this config."""
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "explicit":
        raise RomacError("this model's RoPE frequencies were read off an ONNX graph and follow no schedule a "
                         "transformers config can name", where="romac export-base",
                         hint="export from a compile of the Hugging Face checkpoint instead")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": scaling, "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32",
    }


def _bnb_format(manifest: Manifest, cfg: ModelConfig) -> Bnb4bitFormat | None:
    """The one bitsandbytes format of the projections (transformers' config is global), or None if they are not."""
    regions = {r.name: r for r in manifest.regions}
    fmts = {regions[projection_tensor(i, m)].format for i in range(cfg.num_layers) for m in PROJECTIONS}
    bnb = {f for f in fmts if isinstance(f, Bnb4bitFormat)}
    if not bnb:
        return None
    if len(fmts) > 1:
        raise RomacError("the projections mix bitsandbytes and other formats, which one transformers config cannot "
                         "describe", where="romac export-base")
    return bnb.pop()


def _bnb_config(fmt: Bnb4bitFormat) -> dict[str, Any]:
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "_load_in_4bit": True,
            "_load_in_8bit": False, "bnb_4bit_quant_type": fmt.name, "bnb_4bit_use_double_quant": fmt.double_quant,
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8", "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": None, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False}


def _bnb_tensors(key: str, fmt: Bnb4bitFormat, q, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """What bitsandbytes' ``save_pretrained`` stores for one 4-bit weight, from the ROM's codes."""
    packed = Bnb4bitCodec(fmt).pack(q).reshape(-1, 1)
    state = {"quant_type": fmt.name, "blocksize": fmt.blocksize, "dtype": "float32", "shape": list(shape)}
    out = {key: packed, f"{key}.absmax": np.asarray(q.params["absmax"]).reshape(-1),
           f"{key}.quant_map": np.asarray(fmt.values, np.float32)}
    if fmt.double_quant:
        state.update(nested_blocksize=BNB_NESTED_BLOCKSIZE, nested_dtype="float32",
                     nested_offset=float(q.constants["offset"][0]))
        out[f"{key}.nested_absmax"] = np.asarray(q.constants["nested_absmax"], np.float32)
        out[f"{key}.nested_quant_map"] = np.asarray(BNB_DYNAMIC_SIGNED, np.float32)
    out[f"{key}.{QUANT_STATE}{fmt.name}"] = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8).copy()
    return out


def _correction_factors(manifest: Manifest) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per corrected projection its factors as the SRAM image holds them (decoded from their FP8/FP16 bytes):
    ``(A [r, in], B [out, r])`` with the correction ``B A`` (its scaling is 1)."""
    if manifest.sram.correction is None:
        return {}
    slots = Sram(Path(manifest.root), manifest).correction
    names = manifest.sram.slots
    out = {}
    for slot, (a_t, b_t, scaling) in slots.items():
        out[names[slot]] = (np.ascontiguousarray(a_t.T), np.ascontiguousarray(b_t.T * np.float32(scaling)))
    return out


def _write_correction_adapter(factors: dict[str, tuple[np.ndarray, np.ndarray]], base: Path, out: Path,
                              force: bool) -> None:
    """The correction as a PEFT LoRA adapter on the exported base (per-matrix ranks as ``rank_pattern``, scaling
    1): loaded on the export it computes ``W x + B (A x)``, the chip's base, as the chip does (unmerged)."""
    shown, path = str(out), Path(os.path.abspath(out))
    atomic.check_destination(path, shown, force, "adapter_config.json")
    modules = {f"model.{name}": int(a.shape[0]) for name, (a, _) in sorted(factors.items())}
    top = max(modules.values())
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
              "r": top, "lora_alpha": top, "rank_pattern": modules, "alpha_pattern": modules,
              "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "fan_in_fan_out": False, "init_lora_weights": True}
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.model.{name}.lora_B.weight"] = b
    created: list[Path] = []
    try:
        tmp = atomic.make_temporary(path, shown, created)
        write_safetensors(tmp / "adapter_model.safetensors", tensors)
        (tmp / "adapter_config.json").write_text(dump_json(config), encoding="utf-8")
        atomic.install(tmp, path, shown, force, "adapter_config.json")
    except BaseException:
        for t in created:
            atomic.remove_tree(t)
        raise


def export_base(artifacts: str | Path, out: str | Path, *, force: bool = False,
                correction_as_lora: str | Path | None = None) -> Path:
    """Write the base of a compiled directory as a Hugging Face checkpoint in ``out``; returns ``out``.

    A low-rank correction in SRAM is merged into the exported weights, or, with ``correction_as_lora``, written
    there as a PEFT LoRA adapter (the weights are then the ROM's alone)."""
    manifest = open_artifacts(artifacts)
    cfg = ModelConfig(**manifest.model)
    config = hf_config(cfg)
    bnb = _bnb_format(manifest, cfg)
    if bnb is not None:
        config["quantization_config"] = _bnb_config(bnb)
    rom = Rom(Path(manifest.root), manifest)
    rid = manifest.region_ids()
    factors = _correction_factors(manifest)
    if correction_as_lora is not None and not factors:
        raise RomacError("the compile has no low-rank correction to export", where="--correction-as-lora",
                         hint="drop the option; the ROM's weights are the whole base")
    correction = {} if correction_as_lora is not None else factors
    shown, path = str(out), Path(os.path.abspath(out))
    atomic.check_destination(path, shown, force, BASE_FILE)
    # the layout first (shapes and dtypes are known from the plan), then each tensor decoded when written
    layout: list[tuple[str, np.dtype, tuple[int, ...]]] = []
    quantized: dict[str, str] = {}  # hf key -> IR name, for the 4-bit ones
    for name in tensor_names(cfg):
        region = manifest.regions[rid[name]]
        key = hf_key(name)
        if bnb is not None and region.format == bnb:
            if name in correction:  # compile refuses this combination; a hand-edited manifest could still say it
                raise RomacError("a 4-bit bitsandbytes matrix with a low-rank correction cannot be exported as a "
                                 "bitsandbytes checkpoint", where=f"{artifacts}: {name}")
            n = int(np.prod(region.shape))
            groups = -(-n // bnb.blocksize)
            layout += [(key, np.dtype(np.uint8), (-(-n // 2), 1)),
                       (f"{key}.absmax", np.dtype(np.uint8 if bnb.double_quant else np.float32), (groups,)),
                       (f"{key}.quant_map", np.dtype(np.float32), (16,))]
            if bnb.double_quant:
                layout += [(f"{key}.nested_absmax", np.dtype(np.float32), (-(-groups // BNB_NESTED_BLOCKSIZE),)),
                           (f"{key}.nested_quant_map", np.dtype(np.float32), (256,))]
            q = rom.quantized(rid[name])
            state = _bnb_tensors(key, bnb, q, tuple(region.shape))[f"{key}.{QUANT_STATE}{bnb.name}"]
            layout.append((f"{key}.{QUANT_STATE}{bnb.name}", np.dtype(np.uint8), tuple(state.shape)))
            quantized[key] = name
        else:
            layout.append((key, np.dtype(np.float32), tuple(region.shape)))

    current: dict[str, np.ndarray] = {}

    def produce(key: str) -> np.ndarray:
        if key in current:
            return current.pop(key)
        base = key.split(".weight")[0] + ".weight"
        if base in quantized:  # all parts of one 4-bit weight at once, from its stored codes
            name = quantized[base]
            current.update(_bnb_tensors(base, bnb, rom.quantized(rid[name]), tuple(manifest.regions[rid[name]].shape)))
            return current.pop(key)
        name = next(n for n in tensor_names(cfg) if hf_key(n) == key)
        region = manifest.regions[rid[name]]
        w = codec_for(region.format).dequantize(rom.quantized(rid[name])).astype(np.float32).reshape(region.shape)
        if name in correction:  # the base the chip computes: ROM weights plus the resident correction
            a, b = correction[name]
            w = (w.astype(np.float64) + b.astype(np.float64) @ a.astype(np.float64)).astype(np.float32)
        return w

    created: list[Path] = []
    try:
        tmp = atomic.make_temporary(path, shown, created)
        write_safetensors_streaming(tmp / WEIGHTS, layout, produce, metadata={"format": "pt"})
        (tmp / "config.json").write_text(dump_json(config), encoding="utf-8")
        if TOKENIZER in manifest.files:
            (tmp / TOKENIZER).write_bytes((Path(manifest.root) / TOKENIZER).read_bytes())
            (tmp / "tokenizer_config.json").write_text(dump_json({"tokenizer_class": "PreTrainedTokenizerFast"}),
                                                        encoding="utf-8")
        (tmp / BASE_FILE).write_text(dump_json({"base_fingerprint": manifest.base_fingerprint,
                                                "exported_from": Path(manifest.root).name,
                                                "correction_merged": sorted(correction),
                                                "romac_version": __version__}), encoding="utf-8")
        atomic.install(tmp, path, shown, force, BASE_FILE)
    except BaseException:
        for t in created:
            atomic.remove_tree(t)
        raise
    if correction_as_lora is not None:
        _write_correction_adapter(factors, path, Path(correction_as_lora), force)
    return Path(out)
