"""Every number format romac knows, as facts: one class per format, registered by name (as gguf-py registers its
quant types). A format says how many bits a code has, which parameters a group of codes carries and how each is
stored, which group or block sizes are allowed, and what per-tensor constants it needs. The arithmetic that turns
floats into codes and back lives in :mod:`romac.codecs`; the byte layout of a tile in :mod:`romac.spec.layout`.

* ``int8`` / ``int4`` / ``int2``: ROMA's affine unsigned k-bit format, ``w = s * (q - z)`` per group of
  ``group_size`` elements along a row, FP16 scale, k-bit zero point.
* ``nf4`` / ``fp4``: bitsandbytes' blockwise 4-bit formats (blocks over the flattened tensor, an absmax per
  block; double quantization stores the absmax as 8-bit codes plus per-tensor constants).
* ``fp16`` / ``fp32``: IEEE floats stored as their bit patterns.

Element formats (:class:`ElementFormat`) are the precisions of values outside B-ROM: LoRA weights and the KV cache
in SRAM, activations and accumulators in the datapath.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Mapping

import ml_dtypes
import numpy as np

from romac.errors import RomacError

f32 = np.float32


# ------------------------------------------------------------------------ parameter storage in ROM
@dataclass(frozen=True)
class Storage:
    """How one parameter value is stored in a tile: ``bits`` wide; floats little-endian, small ints packed."""

    name: str
    bits: int
    dtype: type
    little_endian: str | None = None  # numpy byte-order dtype of a float storage

    @property
    def packed(self) -> bool:
        """Sub-byte integers, packed first-element-high like the codes."""
        return self.bits < 8


STORAGES: dict[str, Storage] = {
    "f32": Storage("f32", 32, np.float32, "<f4"),
    "f16": Storage("f16", 16, np.float16, "<f2"),
    "u8": Storage("u8", 8, np.uint8),
    "u4": Storage("u4", 4, np.uint8),
    "u2": Storage("u2", 2, np.uint8),
}


@dataclass(frozen=True)
class ParamField:
    """One parameter of a group of codes (a scale, a zero point, an absmax), as stored."""

    key: str
    storage: str

    @property
    def bits(self) -> int:
        return STORAGES[self.storage].bits


# ------------------------------------------------------------------------ weight formats
_REGISTRY: dict[str, type["WeightFormat"]] = {}


def register(cls: type["WeightFormat"]) -> type["WeightFormat"]:
    """Class decorator: make a format known by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class WeightFormat:
    """A number format of tensors in B-ROM, with the parameters of one use of it (group size, blocksize ...).

    ``spec()`` is its JSON form (the manifest's ``codec``); :func:`from_spec` reads it back.
    """

    name: ClassVar[str] = ""
    code_bits: ClassVar[int] = 0
    #: the codec family that computes it (romac.codecs), e.g. "affine", "bnb4", "raw"
    family: ClassVar[str] = ""
    #: codes of a group are consecutive elements of one row (affine), or of the flattened tensor (bitsandbytes)
    flat_blocks: ClassVar[bool] = False

    @property
    def group(self) -> int:
        """Elements that share one set of parameters (0: no parameters)."""
        return 0

    @property
    def param_fields(self) -> tuple[ParamField, ...]:
        return ()

    def constants_length(self, shape: tuple[int, ...]) -> int:
        """fp32 values of per-tensor constants (stored in a separate vector region; 0: none)."""
        return 0

    def spec(self) -> dict[str, Any]:
        return {"format": self.name}

    def storage_bits(self, n_elements: int, n_groups: int) -> int:
        """Bits of ``n_elements`` codes and ``n_groups`` groups' parameters (before byte and word padding)."""
        return n_elements * self.code_bits + n_groups * sum(p.bits for p in self.param_fields)

    def bits_per_weight(self) -> float:
        """Storage bits per weight of a long row (codes plus parameters, no padding)."""
        return self.code_bits + (sum(p.bits for p in self.param_fields) / self.group if self.group else 0.0)


@dataclass(frozen=True)
class AffineFormat(WeightFormat):
    """ROMA's affine unsigned k-bit format: ``w = float32(s) * (q - z)``; FP16 ``s``, k-bit ``z`` per group."""

    group_size: int = 128
    family: ClassVar[str] = "affine"

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise RomacError(f"invalid group_size {self.group_size}", where=self.name,
                             hint="use a positive size, e.g. 128")

    @property
    def qmax(self) -> int:
        return (1 << self.code_bits) - 1

    @property
    def group(self) -> int:
        return self.group_size

    @property
    def param_fields(self) -> tuple[ParamField, ...]:
        return (ParamField("scale", "f16"), ParamField("zero", f"u{self.code_bits}"))

    def spec(self) -> dict[str, Any]:
        return {"format": self.name, "group_size": self.group_size}


@register
@dataclass(frozen=True)
class Int8(AffineFormat):
    name: ClassVar[str] = "int8"
    code_bits: ClassVar[int] = 8


@register
@dataclass(frozen=True)
class Int4(AffineFormat):
    name: ClassVar[str] = "int4"
    code_bits: ClassVar[int] = 4


@register
@dataclass(frozen=True)
class Int2(AffineFormat):
    name: ClassVar[str] = "int2"
    code_bits: ClassVar[int] = 2


# bitsandbytes' tables (bitsandbytes.functional.get_4bit_type, create_dynamic_map): index = code.
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=f32)
# 1 sign, 2 exponent, 1 mantissa bit in bit-pattern order, divided (float32) by 12. Code 8 is +0.0: bnb writes
# it as the Python int -0, which has no sign.
FP4_VALUES = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], f32) / f32(12)
# torch.argsort(FP4_VALUES) as bnb's CPU quantizer gets it: of the two zeros, code 0 sorts first.
FP4_ORDER = np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BNB_NESTED_BLOCKSIZE = 256  # absmax values per nested (double-quantization) block
BNB_QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' names of its 4-bit types, which are romac's format names


def _dynamic_map() -> np.ndarray:
    """bnb ``create_dynamic_map(signed=True)``, computed as torch does it in float32.

    torch's float32 ``linspace`` evaluates ``start + step*i`` (first half) and ``end - step*(k-1-i)``
    (second half) with one rounding each; float64 arithmetic is exact for these sizes, so it reproduces that.
    """
    vals = [np.array([0.0, 1.0], f32)]
    for i in range(7):
        k = 2 ** i + 1
        step = (f32(1) - f32(0.1)) / f32(k - 1)
        j = np.arange(k)
        b = np.where(j < k // 2, np.float64(f32(0.1)) + np.float64(step) * j,
                     1.0 - np.float64(step) * (k - 1 - j)).astype(f32)
        means = f32(10.0 ** (i - 6)) * ((b[:-1] + b[1:]) / f32(2))
        vals += [means, -means]
    return np.sort(np.concatenate(vals))


BNB_DYNAMIC_SIGNED = _dynamic_map()
for _table in (NF4_VALUES, FP4_VALUES, FP4_ORDER, BNB_DYNAMIC_SIGNED):
    _table.flags.writeable = False


@dataclass(frozen=True)
class Bnb4bitFormat(WeightFormat):
    """bitsandbytes NF4 / FP4: blocks of ``blocksize`` over the flattened tensor, one absmax per block (float32,
    or under double quantization a uint8 code of ``absmax - offset`` per block plus, per tensor, the offset and
    one float32 absmax per :data:`BNB_NESTED_BLOCKSIZE` blocks).

    ``bnb_threads`` and ``cpu_repacked`` change only how codes are *chosen* (see romac.codecs.bnb), not how they
    are stored or read.
    """

    blocksize: int = 64
    double_quant: bool = True
    bnb_threads: int = 1
    cpu_repacked: bool = False
    code_bits: ClassVar[int] = 4
    family: ClassVar[str] = "bnb4"
    flat_blocks: ClassVar[bool] = True
    values: ClassVar[np.ndarray]
    order: ClassVar[np.ndarray]

    def __post_init__(self) -> None:
        if self.blocksize not in BNB_BLOCKSIZES:
            raise RomacError(f"invalid blocksize {self.blocksize}", where=self.name,
                             hint=f"bitsandbytes allows {', '.join(map(str, BNB_BLOCKSIZES))}")
        if self.cpu_repacked and not self.double_quant:
            raise RomacError("the bitsandbytes CPU repacking is reproducible only with double quantization",
                             where=self.name, hint="without double quantization bitsandbytes saves a bfloat16, "
                             "transposed absmax that no loader reads back correctly; compile the FP base instead")

    @property
    def group(self) -> int:
        return self.blocksize

    @property
    def param_fields(self) -> tuple[ParamField, ...]:
        return (ParamField("absmax", "u8" if self.double_quant else "f32"),)

    @property
    def pad_code(self) -> int:
        """The code bnb gives 0.0 (its pad for an odd element count)."""
        return int(self.order[7])

    def constants_length(self, shape: tuple[int, ...]) -> int:
        if not self.double_quant:
            return 0
        return 1 + math.ceil(math.ceil(math.prod(shape) / self.blocksize) / BNB_NESTED_BLOCKSIZE)

    def spec(self) -> dict[str, Any]:
        s: dict[str, Any] = {"format": self.name, "blocksize": self.blocksize, "double_quant": self.double_quant}
        if self.bnb_threads != 1:
            s["bnb_threads"] = self.bnb_threads
        if self.cpu_repacked:
            s["cpu_repacked"] = True
        return s


@register
@dataclass(frozen=True)
class NF4(Bnb4bitFormat):
    name: ClassVar[str] = "nf4"
    values: ClassVar[np.ndarray] = NF4_VALUES
    order: ClassVar[np.ndarray] = np.arange(16, dtype=np.uint8)


@register
@dataclass(frozen=True)
class FP4(Bnb4bitFormat):
    name: ClassVar[str] = "fp4"
    values: ClassVar[np.ndarray] = FP4_VALUES
    order: ClassVar[np.ndarray] = FP4_ORDER


@dataclass(frozen=True)
class RawFormat(WeightFormat):
    """IEEE floats stored as their bit patterns (little-endian)."""

    family: ClassVar[str] = "raw"
    float_dtype: ClassVar[type]
    uint_dtype: ClassVar[type]


@register
@dataclass(frozen=True)
class FP16(RawFormat):
    name: ClassVar[str] = "fp16"
    code_bits: ClassVar[int] = 16
    float_dtype: ClassVar[type] = np.float16
    uint_dtype: ClassVar[type] = np.uint16


@register
@dataclass(frozen=True)
class FP32(RawFormat):
    name: ClassVar[str] = "fp32"
    code_bits: ClassVar[int] = 32
    float_dtype: ClassVar[type] = np.float32
    uint_dtype: ClassVar[type] = np.uint32


#: Registration order: what error messages and help texts list.
WEIGHT_FORMATS: tuple[str, ...] = ("nf4", "fp4", "int8", "int4", "int2", "fp16", "fp32")
assert set(WEIGHT_FORMATS) == set(_REGISTRY)
#: Formats of norm gains (vectors): the raw floats.
NORM_FORMATS: tuple[str, ...] = tuple(n for n in ("fp32", "fp16") if _REGISTRY[n].family == "raw")


def format_class(name: str) -> type[WeightFormat]:
    cls = _REGISTRY.get(name)
    if cls is None:
        raise RomacError(f"unknown number format {name!r}", hint=f"supported: {', '.join(WEIGHT_FORMATS)}")
    return cls


def weight_format(name: str, group_size: int = 128, blocksize: int = 64, double_quant: bool = True,
                  bnb_threads: int = 1, cpu_repacked: bool = False) -> WeightFormat:
    """The format ``name`` with the parameters it takes from these (the others are ignored): int8/4/2 take
    ``group_size``; nf4/fp4 ``blocksize``, ``double_quant``, ``bnb_threads``, ``cpu_repacked``; fp16/fp32 none."""
    cls = format_class(name)
    given = {"group_size": int(group_size), "blocksize": int(blocksize), "double_quant": bool(double_quant),
             "bnb_threads": int(bnb_threads), "cpu_repacked": bool(cpu_repacked)}
    return cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})


def affine_format(bits: int, group_size: int = 128) -> AffineFormat:
    """ROMA's affine format with ``bits``-bit codes (int2, int4, int8)."""
    for cls in _REGISTRY.values():
        if issubclass(cls, AffineFormat) and cls.code_bits == bits:
            return cls(group_size=int(group_size))
    raise RomacError(f"the affine grid has no {bits}-bit format",
                     hint="bits: " + ", ".join(str(c.code_bits) for c in _REGISTRY.values() if issubclass(c, AffineFormat)))


def from_spec(spec: Mapping[str, Any]) -> WeightFormat:
    """The format of a codec spec (``{"format": ..., ...}``, as the manifest stores it)."""
    params = dict(spec)
    cls = format_class(params.pop("format"))
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise RomacError(f"{cls.name} takes no parameter {unknown[0]!r}", hint=f"its parameters: {', '.join(sorted(known))}")
    return cls(**params)


def is_format(name: str, family: str) -> bool:
    return name in _REGISTRY and _REGISTRY[name].family == family


# ------------------------------------------------------------------------ element formats (SRAM, datapath)
@dataclass(frozen=True)
class ElementFormat:
    """A precision of values outside B-ROM: LoRA A/B and KV cache in SRAM, activations and accumulators."""

    name: str
    bytes: int
    dtype: Any
    #: LoRA matrices in this format carry one float32 scale per matrix (values stored as x / scale)
    scaled: bool = False
    #: the format has an infinity; without one, stores saturate at :attr:`max`
    has_inf: bool = True

    @property
    def scale_bytes(self) -> int:
        """Bytes of the per-matrix scale a matrix in this format carries (a float32; 0 if unscaled)."""
        return np.dtype(np.float32).itemsize if self.scaled else 0

    @property
    def max(self) -> float:
        """The largest finite value (stores saturate there)."""
        return float(ml_dtypes.finfo(self.dtype).max) if self.dtype not in (np.float32, np.float16) \
            else float(np.finfo(self.dtype).max)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = np.dtype(self.dtype).name
        return d


ELEMENT_FORMATS: dict[str, ElementFormat] = {
    "fp32": ElementFormat("fp32", 4, np.float32),
    "fp16": ElementFormat("fp16", 2, np.float16),
    "fp8_e4m3": ElementFormat("fp8_e4m3", 1, ml_dtypes.float8_e4m3fn, scaled=True, has_inf=False),
}
FP8_E4M3_MAX = ELEMENT_FORMATS["fp8_e4m3"].max  # 448
LORA_FORMATS: tuple[str, ...] = ("fp8_e4m3", "fp16")
KV_FORMATS: tuple[str, ...] = ("fp32", "fp16", "fp8_e4m3")
ACTIVATION_FORMATS: tuple[str, ...] = ("fp32",)


def element_format(name: str) -> ElementFormat:
    fmt = ELEMENT_FORMATS.get(name)
    if fmt is None:
        raise RomacError(f"unknown element format {name!r}", hint=f"supported: {', '.join(ELEMENT_FORMATS)}")
    return fmt
