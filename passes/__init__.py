"""The compiler's passes, in build order. Each is a function ``(model, target, options) -> model`` over the IR.

Every pass states in its docstring what it requires of its input and what it guarantees of its output; none
mutates its input, and none holds weight data: they plan from shapes and formats, and the emitter streams the
weights through the plan one matrix at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from romac.ir import Model
from romac.targets import Target


@dataclass(frozen=True)
class CompileOptions:
    """What the user chose beyond the target (each ``None`` means: as the target says)."""

    quant: str | None = None  # format of the projection matrices, overriding the target's
    quant_embedding: str | None = None  # format of the embedding / LM head, overriding the target's
    max_context: int | None = None  # KV-cache length, overriding the target's default
    rom_formats: tuple[str, ...] = ()  # bank images to write beside each raw .rom (romac.backend.romformats)
    # nf4/fp4 (bitsandbytes) parameters for the formats above; None: bitsandbytes' / QLoRA's defaults
    bnb_blocksize: int | None = None  # elements per absmax block (default 64)
    double_quant: bool | None = None  # quantize the absmax values too (default True, as QLoRA)
    bnb_threads: int | None = None  # torch threads whose float32 mean(absmax) to reproduce (default 1)
    bnb_cpu_repacked: bool | None = None  # reproduce bnb's CPU inference repacking of the absmax (default False)


Pass = Callable[[Model, Target, CompileOptions], Model]


def pipeline() -> list[tuple[str, Pass]]:
    """The passes in the order they run."""
    from romac.passes.partition import partition
    from romac.passes.quantize import quantize
    from romac.passes.schedule import schedule
    from romac.passes.sram_layout import sram_layout
    from romac.passes.tile import tile

    return [
        ("quantize", quantize),
        ("tile", tile),
        ("partition", partition),
        ("sram_layout", sram_layout),
        ("schedule", schedule),
    ]


def run_pipeline(model: Model, target: Target, options: CompileOptions = CompileOptions()) -> Model:
    """Run every pass; the result carries the complete plan the emitter writes."""
    model = model.with_annotations(target=target, options=options)
    for _, step in pipeline():
        model = step(model, target, options)
    return model
