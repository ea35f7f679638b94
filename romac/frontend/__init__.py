"""Front-ends: each reads one checkpoint format and returns the IR (romac.ir.Model).

``load_model`` recognises what it is given and says what it found; ``attach_adapters`` adds PEFT adapters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from romac.errors import RomacError
from romac.frontend.bnb import describe_bnb
from romac.frontend.builtin import builtin_model
from romac.frontend.gguf import GGUF_MAGIC, describe_gguf, is_gguf, load_gguf
from romac.frontend.hf import load_hf_checkpoint
from romac.frontend.onnx_model import describe_onnx, load_onnx_model
from romac.frontend.peft import load_peft_adapter, parse_adapter_arg
from romac.frontend.quantized import describe_quantized
from romac.frontend.tokenizer import from_hf_dir
from romac.ir import LoraAdapter, Model


def detect(spec: str | None) -> str:
    """What kind of checkpoint ``spec`` names: builtin, hf, gguf (by its magic bytes, not only its name), onnx."""
    if spec in (None, "", "builtin"):
        return "builtin"
    path = Path(spec)
    if not path.exists():
        raise RomacError("no such file or directory", where=str(path), hint="give a checkpoint directory, or omit it for the built-in model")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        raise RomacError(
            "directory has no config.json, so it is not a Hugging Face checkpoint",
            where=str(path),
            hint="point at the folder save_pretrained wrote",
        )

    if is_gguf(path):
        return "gguf"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.suffix.lower() == ".gguf":
        raise RomacError(f"named .gguf but does not start with the GGUF magic bytes {GGUF_MAGIC!r}", where=str(path))
    raise RomacError(
        f"unsupported model file type {path.suffix or '(none)'}",
        where=str(path),
        hint="supported: a Hugging Face checkpoint directory (config.json + *.safetensors), a .gguf file, an .onnx graph",
    )


def describe(spec: str | None, kind: str | None = None) -> str:
    """A short description of what ``spec`` is, for ``romac compile`` to say what it found (header only)."""
    kind = kind or detect(spec)
    if kind == "gguf":

        return describe_gguf(spec)
    if kind == "onnx":

        return describe_onnx(spec)
    if kind == "builtin":
        return "the built-in model (2-layer LLaMA, GQA) with its built-in LoRA adapter"
    if kind == "hf":

        return describe_bnb(spec) or describe_quantized(spec) or f"{kind} checkpoint {spec}"
    return f"{kind} checkpoint {spec}"


def load_model(spec: str | None, with_builtin_adapter: bool = True) -> Model:
    """The IR of a checkpoint (or of the built-in model when ``spec`` is None or 'builtin')."""
    kind = detect(spec)
    if kind == "builtin":

        return builtin_model(with_adapter=with_builtin_adapter)
    if kind == "gguf":

        return load_gguf(spec)
    if kind == "onnx":  # a tokenizer.json beside the graph (as HF/optimum exports leave it) comes along

        return with_dir_tokenizer(load_onnx_model(spec), Path(spec).parent)

    return with_dir_tokenizer(load_hf_checkpoint(spec), spec)


def with_dir_tokenizer(model: Model, directory: str | Path) -> Model:
    """The model carrying the ``tokenizer.json`` of its checkpoint directory, when there is one."""

    found = from_hf_dir(directory)
    if found is None:
        return model
    text, desc = found
    return dataclasses.replace(model, tokenizer=text, source={**model.source, "tokenizer": desc})


def attach_adapters(model: Model, specs: Sequence[str]) -> Model:
    """Add PEFT adapters given as ``NAME=PATH`` (or ``PATH``) to the model."""

    adapters: list[LoraAdapter] = list(model.adapters)
    for spec in specs:
        name, path = parse_adapter_arg(spec)
        same = [a.name for a in adapters if a.name.lower() == name.lower()]  # sram/<name>.bin, on any file system
        if same:
            what = f"named {name!r}" if same[0] == name else f"named {same[0]!r} and {name!r} (the same file name on case-insensitive file systems)"
            raise RomacError(f"two adapters are {what}", where="--adapter", hint="give each a distinct NAME=PATH")
        adapters.append(load_peft_adapter(path, name, model.config))
    return dataclasses.replace(model, adapters=tuple(adapters))
