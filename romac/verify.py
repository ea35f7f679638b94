"""``romac verify``: the emulator against the golden model, and the quantized model against FP32 onnxruntime.

(a) The emulator (artifacts only) generates greedily; the golden float64 model (source checkpoint + codec
definitions) computes the logits of the same sequence. They must agree to float32 rounding — relative logit
error ≤ tolerance at every position — and pick the same greedy token at every generated step.
(b) onnxruntime runs an FP32 ONNX graph of the source model with the adapter merged; its distance from the
emulator (teacher-forced top-1 agreement, KL divergence) is the cost of quantization, reported, not judged.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any
from typing import Sequence

import numpy as np

from romac.emulator import Machine
from romac.errors import RomacError
from romac.spec.manifest import Manifest
from romac.frontend import attach_adapters, load_model
from romac.ir import ArrayWeight, LoraAdapter, Model
from romac.onnx_reference import compare_with_onnx
from romac.reference import GoldenModel, KvRounding, relative_error

#: float64 bytes of dequantized weights the golden model keeps across adapters; above, it streams them per pass
KEEP_WEIGHTS_BYTES = 2 << 30

_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


@dataclass
class AdapterCheck:
    adapter: str | None
    relative_error: float
    tokens: list[int]
    golden_tokens: list[int]
    tolerance: float
    onnx: dict = field(default_factory=dict)
    kv_ties: int = 0       # K/V elements where the golden model took the chip's rounding at a tie (reference.KvRounding)
    kv_elements: int = 0

    @property
    def tokens_match(self) -> bool:
        return self.tokens == self.golden_tokens

    @property
    def passed(self) -> bool:
        return self.relative_error <= self.tolerance and self.tokens_match


def default_prompt(vocab_size: int, bos: int | None) -> list[int]:
    """A fixed, spread-out prompt that exists in every vocabulary."""
    start = [bos] if bos is not None and 0 <= bos < vocab_size else []
    return start + [(7 + 131 * k) % vocab_size for k in range(7)]


def source_model(manifest: Manifest, model_spec: str | None, adapter_specs: Sequence[str]) -> Model:
    """Load the checkpoint the artifacts were compiled from, and check it is that model."""
    source = manifest.source
    if model_spec is None and source.get("kind") != "builtin":
        raise RomacError(
            f"these artifacts were compiled from {source.get('path', 'a checkpoint')!r}; romac needs it to verify",
            where="--model",
            hint="pass --model PATH (and --adapter NAME=PATH for each adapter)",
        )
    builtin_adapters = not adapter_specs
    model = load_model(model_spec, with_builtin_adapter=builtin_adapters)
    if adapter_specs:
        model = attach_adapters(model, adapter_specs)
    cfg = manifest.model
    for key in _CONFIG_KEYS:
        if getattr(model.config, key) != cfg[key]:
            raise RomacError(
                f"{key} is {getattr(model.config, key)} in the model but {cfg[key]} in the artifacts",
                where=model_spec or "builtin",
                hint="verify against the checkpoint the artifacts were compiled from",
            )
    return model


@dataclass(frozen=True)
class _RomCodes:
    """A region's codes as the ROM holds them, for the golden model (a WeightHandle)."""

    name: str
    shape: tuple[int, ...]
    codec_spec: dict
    rom: Any = field(repr=False, compare=False)
    rid: int = 0
    source: str = "the ROM (chosen by a quantizer)"

    def load_quantized(self):
        return self.rom.quantized(self.rid)

    def load(self) -> np.ndarray:
        return self.rom.value(self.rid, cache=False)

    def load_rows(self, start: int, stop: int) -> np.ndarray:
        return self.load()[start:stop]


def what_the_quantizer_chose(model: Model, machine: Machine) -> Model:
    """The source model with what the compiler chose beyond round-to-nearest, which the source alone cannot give:
    the codes of the regions a quantizer (GPTQ, ...) chose, from the ROM, and the low-rank correction, from SRAM.
    Everything else the golden model still computes from the source checkpoint."""
    manifest = machine.manifest
    weights = dict(model.weights)
    for rid, r in enumerate(manifest.regions):
        if r.quantizer != "rtn":
            weights[r.name] = _RomCodes(r.name, tuple(r.shape), r.format.spec(), machine.rom, rid)
    correction = None
    if machine.sram.correction:
        slots = manifest.sram.slots
        factors = {slots[s]: (ArrayWeight(f"{slots[s]}.l2", np.ascontiguousarray(a_t.T)),
                              ArrayWeight(f"{slots[s]}.l1", np.ascontiguousarray(b_t.T)))
                   for s, (a_t, b_t, _) in machine.sram.correction.items()}
        top = max(a.shape[0] for a, _ in factors.values())
        correction = LoraAdapter("correction", top, float(top), False, factors, source="the SRAM correction image")
    return dataclasses.replace(model, weights=weights, correction=correction)


def verify(
    artifacts: str,
    model_spec: str | None = None,
    adapter_specs: Sequence[str] = (),
    steps: int = 16,
    prompt: Sequence[int] | None = None,
    tolerance: float = 1e-5,
    with_onnx: bool = True,
    progress: bool = False,
    threads: int = 1,
) -> list[AdapterCheck]:
    """Check the emulator against the golden model for the base and every adapter given (see the module doc).
    ``progress``: say on stderr what it is doing (each step of a large model takes a while); ``threads``: the
    emulator's (its logits do not depend on them)."""
    say = (lambda text: print(f"romac: {text}", file=sys.stderr, flush=True)) if progress else (lambda text: None)
    machine = Machine(artifacts, threads=threads)
    manifest = machine.manifest
    model = source_model(manifest, model_spec, adapter_specs)
    chip = what_the_quantizer_chose(model, machine)  # the golden model's view; the FP32 reference keeps the source
    given = {a.name for a in model.adapters}
    names: list[str | None] = [None] + [n for n in manifest.adapters if n in given]
    prompt = list(prompt) if prompt else default_prompt(model.config.vocab_size, model.config.bos_token_id)
    checks = []
    base = None
    # a small model's dequantized weights are kept across adapters; a large one is streamed, a chunk at a time
    keep = sum(math.prod(h.shape) for h in model.weights.values()) * 8 <= KEEP_WEIGHTS_BYTES
    for name in names:
        label = f"adapter {name!r}" if name else "the base model"
        say(f"emulator: {label}, {len(prompt)}-token prompt, {steps} greedy steps")
        machine.reset(adapter=name)
        new, logits = machine.generate(prompt, steps)
        seq = prompt + new
        kv = KvRounding(manifest.sram.kv.format, machine.sram.kv_snapshot(len(seq)), tolerance)
        base = base or GoldenModel.of_artifacts(chip, manifest, keep_weights=keep)
        golden = base.with_adapter(name)  # kept base weights are dequantized once for every adapter
        say(f"golden model: {label}, {len(seq)} positions in one pass over the weights")
        ref = golden.logits(seq, progress="golden model" if progress else None, kv=kv)
        p = len(prompt)
        check = AdapterCheck(
            adapter=name,
            relative_error=relative_error(logits, ref),
            tokens=new,
            golden_tokens=[int(t) for t in np.argmax(ref[p - 1 : p - 1 + len(new)], axis=-1)],
            tolerance=tolerance,
            kv_ties=kv.ties,
            kv_elements=kv.elements,
        )
        if with_onnx:
            say(f"FP32 reference: {label}")
            check.onnx = compare_with_onnx(model, name, seq, logits)
        checks.append(check)
    return checks
