"""One entry point for the quantized-checkpoint readers: GPTQ, AWQ (GEMM) and compressed-tensors (pack-quantized).

:func:`load_quantized_checkpoint` picks the reader from ``quantization_config.quant_method``; every reader returns
a Model whose quantized projections are :class:`romac.frontend.qpack.AffineWeight` handles (``codec_spec``,
``load_quantized()``, ``load()``, ``load_exact()``, ``requantize_reason``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from romac.errors import RomacError
from romac.frontend.awq import describe_awq, load_awq_checkpoint
from romac.frontend.compressed_tensors import describe_compressed_tensors, load_compressed_tensors_checkpoint
from romac.frontend.gptq import describe_gptq, load_gptq_checkpoint

__all__ = ["QUANT_METHODS", "load_quantized_checkpoint", "describe_quantized"]

#: quant_method -> (loader, describe)
QUANT_METHODS: dict[str, tuple[Callable, Callable]] = {
    "gptq": (load_gptq_checkpoint, describe_gptq),
    "awq": (load_awq_checkpoint, describe_awq),
    "compressed-tensors": (load_compressed_tensors_checkpoint, describe_compressed_tensors),
}


def load_quantized_checkpoint(root: Path, raw_cfg: Mapping[str, Any], key_files: Mapping[str, Any] | None = None,
                              **options: Any):
    """The Model of a GPTQ / AWQ / compressed-tensors checkpoint; a one-line error for any other quant_method."""
    where = f"{Path(root) / 'config.json'} quantization_config"
    qc = raw_cfg.get("quantization_config")
    if not isinstance(qc, dict):
        raise RomacError("quantization_config is not an object", where=where)
    if "quant_method" not in qc:
        raise RomacError("field 'quant_method' is missing", where=where,
                         hint=f"romac reads {', '.join(QUANT_METHODS)} and bitsandbytes checkpoints")
    method = qc["quant_method"]
    if method not in QUANT_METHODS:
        raise RomacError(f"quant_method {method!r} is not supported", where=where,
                         hint=f"romac reads {', '.join(QUANT_METHODS)} and bitsandbytes checkpoints")
    return QUANT_METHODS[method][0](Path(root), raw_cfg, key_files, **options)


def describe_quantized(directory: str | Path) -> str | None:
    for _, describe in QUANT_METHODS.values():
        text = describe(directory)
        if text is not None:
            return text
    return None
