"""What the user chose beyond the target, as one typed object every pass receives."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: ``--rom-budget fill``: as much of the target's B-ROM as the placement can use
ROM_BUDGET_FILL = "fill"


@dataclass(frozen=True)
class CompileOptions:
    """Compile options; each ``None`` means: as the target (or the format's default) says."""

    quant: str | None = None  # format of the projection matrices, overriding the target's
    quant_embedding: str | None = None  # format of the embedding / LM head, overriding the target's
    max_context: int | None = None  # KV-cache length, overriding the target's default
    rom_formats: tuple[str, ...] = ()  # bank images to write beside each raw .rom (romac.backend.romformats)
    # nf4/fp4 (bitsandbytes) parameters for the formats above; None: bitsandbytes' / QLoRA's defaults
    bnb_blocksize: int | None = None  # elements per absmax block (default 64)
    double_quant: bool | None = None  # quantize the absmax values too (default True, as QLoRA)
    bnb_threads: int | None = None  # torch threads whose float32 mean(absmax) to reproduce (default 1)
    bnb_cpu_repacked: bool | None = None  # reproduce bnb's CPU inference repacking of the absmax (default False)
    # how the projections' codes are chosen (romac.quantize): the algorithm, a low-rank correction in SRAM and its
    # alternations with the codes, and calibration token ids [sequences, length] (the driver reads --calibration)
    quantizer: str | None = None  # default rtn
    correction_rank: int | None = None
    correction_iters: int | None = None
    calibration_tokens: np.ndarray | None = field(default=None, compare=False, repr=False)
    # per-matrix formats and correction ranks chosen by an integer program within this many bytes of B-ROM (or
    # ROM_BUDGET_FILL) and the SRAM beside the adapters and the KV cache; correction_rank is then the largest offered
    rom_budget: int | str | None = None
    workdir: str | None = None  # where the quantizer keeps codes until the emitter writes them (default: temp)
    progress: bool = False  # show per-layer progress of calibration and quantization
