"""Front-end for PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``).

:func:`load_peft_adapter` checks the adapter against romac's LoRA model (``W x + scaling * B (A x)`` on the
seven LLaMA projections, nothing else) and against the base model's config, and returns a
:class:`~romac.ir.LoraAdapter` of lazily loaded A/B handles. Every PEFT feature that would change what the
adapter computes and that romac does not implement (DoRA, per-module rank/alpha patterns, saved modules,
LoRA biases, embedding or LM-head LoRA, ...) is refused with a one-line error rather than silently dropped.

:func:`parse_adapter_arg` parses the CLI's ``--adapter NAME=PATH`` (or a bare ``PATH``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from romac.errors import RomacError
from romac.frontend.hf_config import read_config_json
from romac.frontend.safetensors_io import FLOAT_DTYPES, SafetensorsFile
from romac.ir import PROJECTIONS, LazyWeight, LoraAdapter, ModelConfig, projection_tensor

__all__ = ["ADAPTER_NAME_RE", "check_adapter_name", "sanitize_adapter_name", "parse_adapter_arg", "load_peft_adapter"]

ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.([A-Za-z0-9_]+)"
    r"\.lora_(A|B)(?:\.([A-Za-z0-9_-]+))?\.weight$"
)
# Any LoRA-looking tensor: used to name the module of a target romac does not support.
_ANY_LORA = re.compile(r"^(?:base_model\.model\.)?(.*?)\.(lora_[A-Za-z_]+|lora_embedding_[AB]|lora_magnitude_vector)\b")

# Config fields that, when set, change what the adapter computes (or add parameters romac would drop).
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow adapter routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
}


# Names Windows reserves for devices, whatever the extension: sram/con.bin could not be copied to a Windows host.
_RESERVED_NAMES = frozenset({"con", "prn", "aux", "nul"} | {f"{d}{i}" for d in ("com", "lpt") for i in range(1, 10)})


def check_adapter_name(name: str) -> str:
    """Return ``name`` if it is a safe adapter (and file) name, else raise RomacError."""
    if not isinstance(name, str) or not ADAPTER_NAME_RE.match(name):
        raise RomacError(
            f"adapter name {name!r} is not allowed (it names the file sram/<name>.bin)",
            where="--adapter",
            hint="use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit",
        )
    if name.split(".")[0].lower() in _RESERVED_NAMES:
        raise RomacError(
            f"adapter name {name!r} is not allowed: {name.split('.')[0]!r} is a reserved device name on Windows",
            where="--adapter",
            hint="choose another name",
        )
    return name


def sanitize_adapter_name(raw: str) -> str:
    """Turn an arbitrary string (a directory name) into a valid adapter name."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", raw)
    s = re.sub(r"^[^A-Za-z0-9]+", "", s)[:64]
    stem = s.split(".")[0]
    if stem.lower() in _RESERVED_NAMES:
        s = (stem + "_" + s[len(stem):])[:64]
    return s or "adapter"


def parse_adapter_arg(arg: str) -> tuple[str, Path]:
    """Parse ``NAME=PATH`` or a bare ``PATH`` (named after its directory, sanitised).

    A NAME must be a safe file name. ``NAME=PATH`` whose NAME holds a '/' (``../x=DIR``, ``a/b=DIR``) or is empty
    is refused when DIR exists and ARG as a whole does not; otherwise ARG is taken as a bare path that happens
    to contain '=' (``./runs/lr=3e-4``).
    """
    if not arg:
        raise RomacError("empty --adapter argument", where="--adapter", hint="use --adapter NAME=PATH or --adapter PATH")
    name, sep, rest = arg.partition("=")
    if sep and name and "/" not in name and "\\" not in name:
        if not rest:
            raise RomacError(f"--adapter {arg!r} has no path after '='", where="--adapter", hint="use --adapter NAME=PATH")
        return check_adapter_name(name), Path(rest)
    path = Path(arg)
    if sep and rest and not path.exists() and Path(rest).exists():
        check_adapter_name(name)  # an unsafe NAME in NAME=PATH: refused, never a path to write through
    base = path.resolve().name if path.name in ("", ".", "..") else path.name
    return sanitize_adapter_name(base), path


def _config_field(cfg: dict[str, Any], field: str, where: str) -> Any:
    if field not in cfg:
        raise RomacError(f"required field {field!r} is missing", where=where)
    return cfg[field]


def _check_config(cfg: dict[str, Any], where: str) -> tuple[int, float, bool]:
    ptype = _config_field(cfg, "peft_type", where)
    if str(ptype).upper() != "LORA":
        raise RomacError(f"peft_type is {ptype!r}; only LORA adapters are supported", where=where)
    r = _config_field(cfg, "r", where)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise RomacError(f"field 'r' must be a positive integer, got {r!r}", where=where)
    alpha = _config_field(cfg, "lora_alpha", where)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise RomacError(f"field 'lora_alpha' must be a number, got {alpha!r}", where=where)
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise RomacError(f"field 'use_rslora' must be true or false, got {rslora!r}", where=where)
    if cfg.get("fan_in_fan_out"):
        raise RomacError(
            "field 'fan_in_fan_out' is true (Conv1D/GPT-2 layout); LLaMA adapters must have it false", where=where
        )
    bias = cfg.get("bias", "none")
    if bias not in ("none", None):
        raise RomacError(f"field 'bias' is {bias!r}; only 'none' is supported", where=where)
    for field, what in _UNSUPPORTED_FLAGS.items():
        if cfg.get(field):
            raise RomacError(f"{what} is not supported", where=where)
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        for t in targets:
            if t not in PROJECTIONS:
                raise RomacError(
                    f"adapter targets unsupported module {t!r}",
                    where=where,
                    hint=f"romac applies LoRA to {', '.join(PROJECTIONS)} only",
                )
    elif targets is not None and not isinstance(targets, str):
        raise RomacError(f"field 'target_modules' must be a list or a string, got {targets!r}", where=where)
    return r, float(alpha), rslora


def load_peft_adapter(path: str | Path, name: str, config: ModelConfig) -> LoraAdapter:
    """Load a PEFT LoRA adapter directory for the base model described by ``config``."""
    check_adapter_name(name)
    root = Path(path)
    if not root.is_dir():
        raise RomacError("not a directory (expected a PEFT adapter folder)", where=str(root))
    cfg_path = root / "adapter_config.json"
    rank, alpha, rslora = _check_config(read_config_json(cfg_path), str(cfg_path))

    st_path = root / "adapter_model.safetensors"
    if not st_path.is_file():
        if (root / "adapter_model.bin").is_file():
            raise RomacError(
                "only adapter_model.bin found; romac reads safetensors only",
                where=str(root),
                hint="re-save with PeftModel.save_pretrained(OUT) (safe_serialization is the default)",
            )
        raise RomacError("adapter_model.safetensors not found", where=str(root))
    f = SafetensorsFile(st_path)
    where = str(st_path)

    pairs: dict[tuple[int, str], dict[str, str]] = {}
    adapter_names: set[str | None] = set()
    # LoRA-looking keys first, so that an unsupported target is named even if its base layer was saved too.
    for key in sorted(f.keys(), key=lambda k: _ANY_LORA.match(k) is None):
        m = _LORA_KEY.match(key)
        if m is None or m.group(3) not in PROJECTIONS or (m.group(2) == "self_attn") != (
            m.group(3) in PROJECTIONS[:4]
        ):
            any_lora = _ANY_LORA.match(key)
            if any_lora:
                module = any_lora.group(1).removeprefix("model.")
                kind = any_lora.group(2)
                if kind.startswith("lora_magnitude"):
                    raise RomacError(f"tensor {key!r}: DoRA magnitude vectors are not supported", where=where)
                if m is None and kind in ("lora_A", "lora_B") and key.endswith(".bias"):
                    raise RomacError(f"tensor {key!r}: LoRA bias is not supported", where=where)
                raise RomacError(
                    f"adapter targets unsupported module {module!r} (tensor {key!r})",
                    where=where,
                    hint=f"romac applies LoRA to {', '.join(PROJECTIONS)} only",
                )
            raise RomacError(
                f"tensor {key!r} is not a LoRA A/B weight (modules_to_save or another PEFT method?)",
                where=where,
            )
        layer, module, which, aname = int(m.group(1)), m.group(3), m.group(4), m.group(5)
        adapter_names.add(aname)
        if layer >= config.num_layers:
            raise RomacError(
                f"tensor {key!r} is for layer {layer}, but the base model has {config.num_layers} layers",
                where=where,
                hint="adapter made for another base?",
            )
        slot = pairs.setdefault((layer, module), {})
        if which in slot:
            raise RomacError(f"tensors {slot[which]!r} and {key!r} are both lora_{which} of one module", where=where)
        slot[which] = key
    if len(adapter_names) > 1:
        raise RomacError(
            f"file holds several adapters ({sorted(str(a) for a in adapter_names)}); save one adapter per folder",
            where=where,
        )
    if not pairs:
        raise RomacError("no LoRA weights found", where=where)

    weights: dict[str, tuple[LazyWeight, LazyWeight]] = {}
    for (layer, module) in sorted(pairs, key=lambda lm: (lm[0], PROJECTIONS.index(lm[1]))):
        slot = pairs[(layer, module)]
        tname = projection_tensor(layer, module)
        for which in ("A", "B"):
            if which not in slot:
                other = slot["B" if which == "A" else "A"]
                raise RomacError(f"{tname}: lora_{which} is missing (only {other!r} is present)", where=where)
        out_f, in_f = config.projection_shape(module)
        handles = []
        for which, want in (("A", (rank, in_f)), ("B", (out_f, rank))):
            key = slot[which]
            info = f.info(key)
            if info.dtype not in FLOAT_DTYPES:
                raise RomacError(f"tensor {key!r} has dtype {info.dtype}; expected a float dtype", where=where)
            if info.shape != want:
                rank_side = info.shape[0] if which == "A" else info.shape[-1]
                if len(info.shape) == 2 and rank_side != rank and (
                    (which == "A" and info.shape[1] == in_f) or (which == "B" and info.shape[0] == out_f)
                ):
                    raise RomacError(
                        f"tensor {key!r} has shape {info.shape}, expected {want}: its rank differs from r={rank} "
                        "in adapter_config.json",
                        where=where,
                    )
                raise RomacError(
                    f"tensor {key!r} has shape {info.shape}, the base model needs {want}",
                    where=where,
                    hint="adapter made for another base?",
                )
            handles.append(
                LazyWeight(f"{tname}.lora_{which}", info.shape, f.loader(key), source=f"{st_path}:{key}")
            )
        weights[tname] = (handles[0], handles[1])
    return LoraAdapter(name, rank, alpha, rslora, weights, source=str(root))
