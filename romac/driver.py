"""The build: front-end → passes → emitter, as one call (what ``romac compile`` runs)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from typing import Sequence

from romac.backend.atomic import check_destination
from romac.backend.emit import emit
from romac.frontend import attach_adapters, load_model
from romac.frontend.qpack import AffineWeight, requantize_note
from romac.frontend.tokenizer import encode, model_tokenizer
from romac.ir import Model, stores_codes_of
from romac.passes import CompileOptions, run_pipeline
from romac.quantize.calibration import load_calibration
from romac.targets import Target, load_target


def compile_model(
    model: Model,
    out: str | Path,
    target: Target | str | None = None,
    options: CompileOptions = CompileOptions(),
    *,
    force: bool = False,
    progress: bool = False,
) -> Model:
    """Compile an IR model onto a target and write the artifact directory; returns the compiled IR."""
    if not isinstance(target, Target):
        target = load_target(target)
    compiled = run_pipeline(model, target, options)
    emit(compiled, target, out, rom_formats=options.rom_formats, force=force, progress=progress)
    return compiled


def requantize_notes(model: Model) -> list[str]:
    """One sentence per pre-quantized tensor whose stored codes do not reach ROM (re-quantized to the planned
    format from its dequantized weights), for ``romac compile`` to say."""
    notes = []
    for name, t in model.plan.tensors.items():
        handle = model.weights.get(name)
        if handle is None or handle.codec_spec is None or stores_codes_of(handle, t.format.spec()):
            continue
        note = requantize_note(handle, t.format.spec()) if isinstance(handle, AffineWeight) else (
            f"{name}: stored {handle.codec_spec.get('format')} re-quantized to {t.format.name} from the dequantized "
            "weights; the stored codes are not kept")
        notes.append(note)
    q = model.source.get("quantizer", {})
    for name, stored in q.get("replaced_stored_codes", {}).items():  # the quantizer chose new codes from the values
        notes.append(f"{name}: stored {stored} codes replaced by {q['method']} codes on "
                     f"{model.plan.tensors[name].format.name}, fitted to the dequantized weights")
    return notes


def read_calibration(model: Model, path: str | Path, seq_len: int = 512, max_tokens: int = 8192) -> np.ndarray:
    """``--calibration FILE`` as token ids [sequences, seq_len]: a JSON list of ids, or text encoded with the
    checkpoint's own tokenizer (BOS first in every sequence, as the model sees real prompts)."""
    tok = model_tokenizer(model.tokenizer)
    cfg = model.config
    return load_calibration(path, (lambda text: [i for i in encode(tok, text) if i != cfg.bos_token_id]) if tok else None,
                            seq_len=seq_len, max_tokens=max_tokens, bos_token_id=cfg.bos_token_id,
                            vocab_size=cfg.vocab_size)


def compile_checkpoint(
    model_spec: str | None,
    out: str | Path,
    adapters: Sequence[str] = (),
    target: Target | str | None = None,
    options: CompileOptions = CompileOptions(),
    *,
    force: bool = False,
    progress: bool = False,
    calibration: str | Path | None = None,
    calibration_shape: tuple[int, int] = (512, 8192),
) -> Model:
    """Load a checkpoint (``None``: the built-in model and adapter) plus adapters, and compile it. ``calibration``:
    a file of calibration text or token ids for the quantizer (``calibration_shape``: sequence length, at most
    that many tokens)."""
    check_destination(Path(os.path.abspath(out)), str(out), force)  # fail before reading anything
    model = load_model(model_spec, with_builtin_adapter=not adapters)
    if adapters:
        model = attach_adapters(model, adapters)
    if calibration is not None:
        options = dataclasses.replace(options, calibration_tokens=read_calibration(model, calibration, *calibration_shape))
    if options.workdir is None:  # the quantizer's codes wait beside the output, not in a small /tmp
        options = dataclasses.replace(options, workdir=str(Path(os.path.abspath(out)).parent))
    return compile_model(model, out, target, options, force=force, progress=progress)

