"""Values outside B-ROM in their SRAM precision: LoRA matrices (FP8 E4M3 with a per-tensor scale, or FP16) and
KV-cache entries (FP32, FP16, FP8 E4M3, saturating). Formats and their facts: :mod:`romac.spec.formats`."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from romac.errors import RomacError
from romac.spec.formats import FP8_E4M3_MAX, element_format

f32 = np.float32
_FP8_MAX = f32(FP8_E4M3_MAX)


def fp8_e4m3_encode(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Per-tensor scaled FP8 E4M3 (fn): ``scale = float32(amax / 448)`` (1.0 for an all-zero tensor),
    codes = bit patterns of ``float8_e4m3fn(x / scale)``, round to nearest even."""
    v = np.asarray(x, dtype=f32)
    amax = f32(np.abs(v).max()) if v.size else f32(0)
    if not np.isfinite(amax):
        raise RomacError("tensor holds inf or NaN", hint="FP8 needs finite values")
    scale = f32(1) if amax == 0 else max(amax / _FP8_MAX, np.nextafter(f32(0), f32(1)))
    y = np.clip(v / scale, -_FP8_MAX, _FP8_MAX)     # saturate: rounding (a subnormal scale) can pass 448
    return y.astype(ml_dtypes.float8_e4m3fn).view(np.uint8), f32(scale)


def fp8_e4m3_decode(codes: np.ndarray, scale) -> np.ndarray:
    """E4M3 value times ``scale``, in float32."""
    return np.asarray(codes, np.uint8).view(ml_dtypes.float8_e4m3fn).astype(f32) * f32(scale)


def fp16_encode(x: np.ndarray) -> np.ndarray:
    """IEEE half bit patterns (uint16), rounded once to nearest even from the input's own precision."""
    with np.errstate(over="ignore"):
        return np.asarray(x).astype(np.float16).view(np.uint16)


def fp16_decode(codes: np.ndarray) -> np.ndarray:
    return np.asarray(codes, dtype=np.uint16).view(np.float16).astype(f32)


def encode_lora(x: np.ndarray, fmt: str) -> tuple[bytes, float]:
    """A LoRA matrix's SRAM bytes (row-major) and its scale (1.0 for an unscaled format)."""
    e = element_format(fmt)
    if e.scaled:
        codes, scale = fp8_e4m3_encode(x)
        return codes.astype(np.uint8).tobytes(), float(scale)
    with np.errstate(over="ignore"):   # too large for fp16 -> inf, as IEEE says
        return np.asarray(x).astype(e.dtype).astype(np.dtype(e.dtype).newbyteorder("<")).tobytes(), 1.0


def decode_lora(data: np.ndarray, shape: tuple[int, int], fmt: str, scale: float) -> np.ndarray:
    """Inverse of :func:`encode_lora` from the SRAM bytes (uint8) of one matrix, as float32."""
    e = element_format(fmt)
    n = shape[0] * shape[1]
    if e.scaled:
        return fp8_e4m3_decode(data[:n], f32(scale)).reshape(shape)
    return data[: e.bytes * n].view(np.dtype(e.dtype).newbyteorder("<")).astype(f32).reshape(shape)


def lora_code_values(fmt: str) -> np.ndarray:
    """The float32 value of every code of a LoRA format, before its scale (index: the code's little-endian
    integer): what :func:`decode_lora` gives a code, so that ``values[code] * scale`` decodes it (× 1.0, exact,
    for an unscaled format)."""
    e = element_format(fmt)
    codes = np.arange(1 << (8 * e.bytes), dtype=np.dtype(f"<u{e.bytes}"))
    return np.ascontiguousarray(codes.view(np.dtype(e.dtype).newbyteorder("<")).astype(f32))


def lora_roundtrip(x: np.ndarray, fmt: str) -> np.ndarray:
    """A LoRA matrix as it reads back from SRAM in the given precision."""
    x = np.asarray(x, np.float32)
    data, scale = encode_lora(x, fmt)
    return decode_lora(np.frombuffer(data, np.uint8), x.shape, fmt, scale)


def kv_saturate(x: np.ndarray, fmt: str) -> np.ndarray:
    """What a KV-cache store keeps of float values: clipped to the format's range where it has no infinity."""
    e = element_format(fmt)
    if not e.has_inf:   # e4m3fn: saturate like the hardware instead of producing NaN
        return np.clip(x, -e.max, e.max)
    return x


def kv_roundtrip(x: np.ndarray, fmt: str) -> np.ndarray:
    """A K or V value as the KV cache gives it back, in float64."""
    return kv_saturate(x, fmt).astype(element_format(fmt).dtype).astype(np.float64)
