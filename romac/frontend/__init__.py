"""Front-ends: each reads one checkpoint format and returns the IR (romac.ir.Model).

``load_model`` recognises what it is given and says what it found; ``attach_adapters`` adds PEFT adapters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from romac.errors import RomacError
from romac.ir import LoraAdapter, Model


def detect(spec: str | None) -> str:
    """What kind of checkpoint ``spec`` names: builtin, hf."""
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
    raise RomacError(
        f"unsupported model file type {path.suffix or '(none)'}",
        where=str(path),
        hint="supported: a Hugging Face checkpoint directory (config.json + *.safetensors)",
    )


def load_model(spec: str | None, with_builtin_adapter: bool = True) -> Model:
    """The IR of a checkpoint (or of the built-in model when ``spec`` is None or 'builtin')."""
    kind = detect(spec)
    if kind == "builtin":
        from romac.frontend.builtin import builtin_model

        return builtin_model(with_adapter=with_builtin_adapter)
    from romac.frontend.hf import load_hf_checkpoint

    return load_hf_checkpoint(spec)


def attach_adapters(model: Model, specs: Sequence[str]) -> Model:
    """Add PEFT adapters given as ``NAME=PATH`` (or ``PATH``) to the model."""
    from romac.frontend.peft import load_peft_adapter, parse_adapter_arg

    adapters: list[LoraAdapter] = list(model.adapters)
    for spec in specs:
        name, path = parse_adapter_arg(spec)
        if any(a.name == name for a in adapters):
            raise RomacError(f"two adapters are named {name!r}", where="--adapter", hint="give each a distinct NAME=PATH")
        adapters.append(load_peft_adapter(path, name, model.config))
    return dataclasses.replace(model, adapters=tuple(adapters))
