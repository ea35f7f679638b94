"""Front-end for Hugging Face LLaMA-family checkpoint directories (``config.json`` + safetensors).

:func:`load_hf_checkpoint` reads ``config.json`` into a :class:`~romac.ir.ModelConfig`, opens
``model.safetensors`` (or the shards listed by ``model.safetensors.index.json``) header-only, and returns a
:class:`~romac.ir.Model` whose weights are :class:`~romac.ir.LazyWeight` handles: nothing is read until a
handle's ``load()`` is called, and then only that tensor (memory-mapped, converted to float32).

The parts other HF-based readers share (``config.json``, the safetensors files, tensor names) are in
:mod:`romac.frontend.hf_config`.
"""

from __future__ import annotations

from pathlib import Path

from romac.errors import RomacError
from romac.frontend.bnb import load_bnb_checkpoint
from romac.frontend.quantized import load_quantized_checkpoint
from romac.frontend.hf_config import canonical_name, open_checkpoint_files, parse_hf_config, read_config_json
from romac.frontend.safetensors_io import FLOAT_DTYPES, SafetensorsFile
from romac.ir import LazyWeight, Model, expected_shape, make_model, tensor_names

__all__ = ["load_hf_checkpoint"]


def load_hf_checkpoint(path: str | Path) -> Model:
    """Load a Hugging Face LLaMA-family checkpoint directory as a lazily loaded IR Model."""
    root = Path(path)
    if not root.is_dir():
        raise RomacError("not a directory (expected a Hugging Face checkpoint folder)", where=str(root))
    cfg_path = root / "config.json"
    raw_cfg = read_config_json(cfg_path)
    qc = raw_cfg.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        if method == "bitsandbytes":  # a QLoRA base saved by transformers + bitsandbytes
            return load_bnb_checkpoint(root, raw_cfg)
        return load_quantized_checkpoint(root, raw_cfg)  # GPTQ, AWQ, compressed-tensors (or a one-line error)
    config = parse_hf_config(raw_cfg, where=str(cfg_path))
    key_files = open_checkpoint_files(root)

    found: dict[str, tuple[str, SafetensorsFile]] = {}
    ignored: list[str] = []
    for key, f in key_files.items():
        name = canonical_name(key)
        if name is None:
            ignored.append(key)
            continue
        if name.endswith(".bias"):
            raise RomacError(f"tensor {key!r} is a bias; bias terms are not supported", where=str(f.path))
        if name in found:
            raise RomacError(
                f"tensors {found[name][0]!r} and {key!r} both map to {name!r}", where=str(f.path)
            )
        found[name] = (key, f)

    weights: dict[str, LazyWeight] = {}
    for name in tensor_names(config):
        if name not in found:
            hf_key = "lm_head.weight" if name == "lm_head" else f"model.{name}.weight"
            hint = (
                "set tie_word_embeddings to true in config.json if the LM head shares the embedding"
                if name == "lm_head"
                else None
            )
            raise RomacError(f"tensor {hf_key!r} is missing from the checkpoint", where=str(root), hint=hint)
        key, f = found[name]
        info = f.info(key)
        if info.dtype not in FLOAT_DTYPES - {"F64"}:
            raise RomacError(
                f"tensor {key!r} has dtype {info.dtype}; expected F32, F16 or BF16", where=str(f.path)
            )
        want = expected_shape(config, name)
        if info.shape != want:
            raise RomacError(
                f"tensor {key!r} has shape {info.shape}, config.json implies {want}", where=str(f.path)
            )
        weights[name] = LazyWeight(
            name, info.shape, f.loader(key), source=f"{f.path}:{key}", row_loader=f.row_loader(key),
            stored_row_loader=f.stored_row_loader(key),
        )
    if config.tie_word_embeddings and "lm_head" in found:
        ignored.append(found["lm_head"][0])

    files = sorted({f.path.name for f in key_files.values()})
    return make_model(
        config,
        weights,
        source={"kind": "hf", "path": str(root), "files": files, "ignored_tensors": sorted(ignored)},
    )
