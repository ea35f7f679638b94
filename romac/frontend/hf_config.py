"""What every reader of a Hugging Face checkpoint directory shares: ``config.json`` into a
:class:`~romac.ir.ModelConfig`, the safetensors files (single or sharded) opened header-only, and the mapping of
HF tensor keys to IR names. The float reader (:mod:`romac.frontend.hf`) and the quantized-checkpoint readers
(bitsandbytes, GPTQ, AWQ, compressed-tensors) build on it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

from romac.errors import RomacError
from romac.frontend.safetensors_io import SafetensorsFile
from romac.ir import ModelConfig

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_ROPE_TYPES",
    "parse_hf_config",
    "read_config_json",
    "open_checkpoint_files",
    "canonical_name",
    "read_quantization_config",
]

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# LlamaConfig's defaults for the optional fields (MistralConfig differs only where noted).
_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048}
_MISTRAL_DEFAULTS = {"max_position_embeddings": 4096 * 32}

_LAYER_KEY = re.compile(
    r"^layers\.(\d+)\.(input_layernorm|post_attention_layernorm|"
    r"self_attn\.(?:q_proj|k_proj|v_proj|o_proj)|mlp\.(?:gate_proj|up_proj|down_proj))\.(weight|bias)$"
)


def read_config_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from ``path`` (a config file), as a one-line RomacError if it is missing or bad."""
    if not path.is_file():
        raise RomacError("file not found", where=str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RomacError(f"not valid JSON ({e})", where=str(path)) from None
    if not isinstance(data, dict):
        raise RomacError("not a JSON object", where=str(path))
    return data


def _get_int(cfg: Mapping[str, Any], name: str, where: str, default: Any = ..., positive: bool = True) -> Any:
    if name not in cfg or cfg[name] is None:
        if default is ...:
            raise RomacError(f"required field {name!r} is missing", where=where)
        return default
    v = cfg[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise RomacError(f"field {name!r} must be an integer, got {v!r}", where=where)
    if positive and v <= 0:
        raise RomacError(f"field {name!r} must be positive, got {v}", where=where)
    return v


def _get_float(cfg: Mapping[str, Any], name: str, where: str, default: float) -> float:
    v = cfg.get(name)
    if v is None:
        return float(default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise RomacError(f"field {name!r} must be a positive number, got {v!r}", where=where)
    return float(v)


def _token_id(cfg: Mapping[str, Any], name: str, where: str) -> int | None:
    v = cfg.get(name)
    if isinstance(v, list):
        v = v[0] if v else None
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise RomacError(f"field {name!r} must be a non-negative integer or a list of them, got {v!r}", where=where)
    return v


def _rope(cfg: Mapping[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the transformers-4 or the transformers-5 form.

    transformers 4 writes ``rope_theta`` and ``rope_scaling`` (null, or ``{"rope_type"|"type": ..., factor...}``);
    transformers 5 writes ``rope_parameters: {"rope_theta": ..., "rope_type": "default"|..., factor...}``
    and neither of the old keys.
    """
    params = cfg.get("rope_parameters")
    scaling: dict[str, Any] | None = None
    theta_src: Mapping[str, Any] = cfg
    if params is not None:
        if not isinstance(params, dict):
            raise RomacError(f"field 'rope_parameters' must be an object, got {params!r}", where=where)
        if params and all(isinstance(v, dict) for v in params.values()):
            raise RomacError(
                "per-layer-type 'rope_parameters' are not supported (not a LLaMA-style model)", where=where
            )
        if "rope_theta" in params:
            theta_src = params
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    old = cfg.get("rope_scaling")
    if old is not None:
        if not isinstance(old, dict):
            raise RomacError(f"field 'rope_scaling' must be an object or null, got {old!r}", where=where)
        scaling = {**(scaling or {}), **old}
    theta = _get_float(theta_src, "rope_theta", where, _DEFAULTS["rope_theta"])
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in SUPPORTED_ROPE_TYPES:
            raise RomacError(
                f"RoPE scaling type {kind!r} is not supported",
                where=f"{where} rope scaling",
                hint=f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}",
            )
        if kind == "default":
            return theta, None
        scaling.pop("type", None)
        scaling["rope_type"] = kind
        if "factor" not in scaling:
            raise RomacError(f"{kind} RoPE scaling needs a 'factor'", where=f"{where} rope scaling")
        _get_float(scaling, "factor", f"{where} rope scaling", 1.0)
        return theta, dict(sorted(scaling.items()))
    return theta, None


def parse_hf_config(cfg: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """Turn a LLaMA-family ``config.json`` object into a ModelConfig, rejecting what romac cannot compile."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    if model_type not in SUPPORTED_MODEL_TYPES and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise RomacError(
            f"model_type {model_type!r} (architectures {archs}) is not supported",
            where=where,
            hint=f"romac compiles LLaMA-family decoders: model_type {' or '.join(SUPPORTED_MODEL_TYPES)}, "
            f"or architectures {' / '.join(SUPPORTED_ARCHITECTURES)}",
        )

    vocab = _get_int(cfg, "vocab_size", where)
    hidden = _get_int(cfg, "hidden_size", where)
    inter = _get_int(cfg, "intermediate_size", where)
    layers = _get_int(cfg, "num_hidden_layers", where)
    heads = _get_int(cfg, "num_attention_heads", where)
    kv_heads = _get_int(cfg, "num_key_value_heads", where, default=heads)
    if heads % kv_heads:
        raise RomacError(
            f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})", where=where
        )
    head_dim = _get_int(cfg, "head_dim", where, default=None)
    if head_dim is None:
        if hidden % heads:
            raise RomacError(
                f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) and no head_dim is given",
                where=where,
            )
        head_dim = hidden // heads
    if head_dim % 2:
        raise RomacError(f"head_dim {head_dim} is odd; RoPE needs an even head_dim", where=where)

    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise RomacError(f"field {flag!r} is true: bias terms are not supported", where=where)
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise RomacError(f"field 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported", where=where)
    if model_type == "mistral" or "MistralForCausalLM" in archs:
        window = cfg.get("sliding_window")
        max_pos = cfg.get("max_position_embeddings") or _MISTRAL_DEFAULTS["max_position_embeddings"]
        if window is not None and window < max_pos:
            raise RomacError(
                f"field 'sliding_window' is {window}: sliding-window attention is not supported",
                where=where,
                hint="only Mistral configs with sliding_window null (full attention) can be compiled",
            )
        defaults = {**_DEFAULTS, **_MISTRAL_DEFAULTS}
    else:
        defaults = _DEFAULTS

    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise RomacError(f"field 'tie_word_embeddings' must be true or false, got {tie!r}", where=where)
    theta, scaling = _rope(cfg, where)
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_get_float(cfg, "rms_norm_eps", where, defaults["rms_norm_eps"]),
        rope_theta=theta,
        tie_word_embeddings=tie,
        max_position_embeddings=_get_int(
            cfg, "max_position_embeddings", where, default=defaults["max_position_embeddings"]
        ),
        rope_scaling=scaling,
        bos_token_id=_token_id(cfg, "bos_token_id", where),
        eos_token_id=_token_id(cfg, "eos_token_id", where),
    )


def canonical_name(key: str) -> str | None:
    """The IR name of an HF tensor key (``model.layers.0.mlp.up_proj.weight`` -> ``layers.0.mlp.up_proj``).

    Returns ``None`` for keys romac does not use. A ``.bias`` of a known module maps to ``<name>.bias`` so
    the caller can reject it.
    """
    k = key[len("model."):] if key.startswith("model.") else key
    if k == "embed_tokens.weight":
        return "embed_tokens"
    if k == "norm.weight":
        return "norm"
    if key == "lm_head.weight":
        return "lm_head"
    m = _LAYER_KEY.match(k)
    if m:
        base = f"layers.{m.group(1)}.{m.group(2)}"
        return base if m.group(3) == "weight" else base + ".bias"
    if key == "lm_head.bias" or k in ("embed_tokens.bias", "norm.bias"):
        return key.rsplit(".", 1)[0].removeprefix("model.") + ".bias"
    return None


def open_checkpoint_files(root: Path) -> dict[str, SafetensorsFile]:
    """Map every tensor key of the checkpoint in ``root`` to the (header-only) opened file that holds it."""
    index = root / "model.safetensors.index.json"
    single = root / "model.safetensors"
    if index.is_file():
        idx = read_config_json(index)
        wmap = idx.get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise RomacError("has no 'weight_map' object", where=str(index))
        files: dict[str, SafetensorsFile] = {}
        out: dict[str, SafetensorsFile] = {}
        for key, fname in wmap.items():
            if not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", ".."):
                raise RomacError(f"weight_map entry {key!r} names {fname!r}, not a file in the directory", where=str(index))
            if fname not in files:
                shard = root / fname
                if not shard.is_file():
                    raise RomacError(f"shard {fname!r} (holding {key!r}) is missing", where=str(index))
                files[fname] = SafetensorsFile(shard)
            if key not in files[fname]:
                raise RomacError(f"tensor {key!r} not found (the index says it is here)", where=str(root / fname))
            out[key] = files[fname]
        return out
    if single.is_file():
        f = SafetensorsFile(single)
        return {k: f for k in f.keys()}
    if (root / "pytorch_model.bin").is_file() or (root / "pytorch_model.bin.index.json").is_file():
        raise RomacError(
            "only pytorch_model.bin weights found; romac reads safetensors only (pickle files can run code)",
            where=str(root),
            hint="convert with transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT) "
            "(safe_serialization is the default)",
        )
    raise RomacError(
        "no model.safetensors or model.safetensors.index.json found", where=str(root)
    )


def read_quantization_config(directory: str | Path) -> Any:
    """The ``quantization_config`` of a checkpoint directory's config.json, or None if it has none or cannot be
    read (what the readers' ``describe_*`` functions look at before anything is opened)."""
    try:
        return json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
