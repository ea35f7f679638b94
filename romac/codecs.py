"""Every number format romac knows, defined once: the single source of format facts.

* ``nf4`` / ``fp4``: bitsandbytes' blockwise 4-bit formats, reproduced bit for bit against bitsandbytes 0.50
  on the CPU (``quantize_4bit`` / ``dequantize_4bit``, incl. double quantization), because a QLoRA adapter is
  only valid against exactly the NF4 weights it was trained on.
* ``int8`` / ``int4`` / ``int2``: ROMA's affine unsigned k-bit format, ``w = s * (q - z)`` per row group.
* ``fp16`` / ``fp32``: raw bit patterns.  Plus FP8 E4M3 (LoRA/KV in SRAM) and nibble/crumb packing.

Pure numpy (+ ml_dtypes for FP8); torch and bitsandbytes are test-only references.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from romac.errors import RomacError

f32 = np.float32
_CHUNK = 1 << 17          # elements per vectorised step: temporaries stay near L2 size, far below 64 MB

# bitsandbytes.functional.get_4bit_type("nf4"): index = code.
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=f32)
# get_4bit_type("fp4"): 1 sign, 2 exponent, 1 mantissa bit in bit-pattern order, divided (float32) by 12.
# Code 8 is +0.0: bnb writes it as the Python int -0, which has no sign.
FP4_VALUES = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], f32) / f32(12)
# torch.argsort(FP4_VALUES) as bnb's CPU quantizer gets it: of the two zeros, code 0 sorts first.
_FP4_ORDER = np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)


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
BNB_NESTED_BLOCKSIZE = 256  # blocks of absmax values per nested (double-quantization) block
# bnb 0.50's CPU 8-bit quantizer (cpu_ops.cpp build_quantize_lut): the normalised value v is binned into
# 65536 steps, idx = trunc(((v + 1) * 0.5) * 65535 + 0.5), and each bin maps to the code whose midpoints
# bracket the bin's centre -- so codes are not the exact nearest ones (e.g. 0.0 -> code 131).
_DYN_LUT = np.searchsorted(f32(0.5) * (BNB_DYNAMIC_SIGNED[:-1] + BNB_DYNAMIC_SIGNED[1:]),
                           f32(-1) + (f32(2) * np.arange(65536, dtype=f32)) / f32(65535)).astype(np.uint8)


# ---------------------------------------------------------------- packing
def pack_codes(codes: np.ndarray, bits: int, pad: int = 0) -> np.ndarray:
    """Pack codes ``[..., n]`` along the last axis into uint8 ``[..., ceil(n*bits/8)]``.

    2/4 bits: the first element goes in the most significant bits (bnb's order); each row is padded
    to whole bytes with ``pad`` (bnb pads an odd 4-bit tensor with the code of 0.0). 8: as is.
    16/32: the little-endian bytes of each code.
    """
    c = np.asarray(codes)
    if bits in (16, 32):
        le = c.astype("<u2" if bits == 16 else "<u4")
        return np.ascontiguousarray(le).view(np.uint8).reshape(*c.shape[:-1], c.shape[-1] * bits // 8)
    if bits not in (2, 4, 8):
        raise ValueError(f"pack_codes: unsupported width {bits} bits (2, 4, 8, 16, 32)")
    if c.size and int(c.max()) >> bits:
        raise ValueError(f"pack_codes: a code does not fit in {bits} bits")
    if bits == 8:
        return c.astype(np.uint8)
    per, n = 8 // bits, c.shape[-1]
    nbytes = -(-n // per)
    padded = np.full((*c.shape[:-1], nbytes * per), pad, np.uint8)
    padded[..., :n] = c
    g = padded.reshape(*c.shape[:-1], nbytes, per)
    out = g[..., 0] << (8 - bits)
    for k in range(1, per):
        out |= g[..., k] << (8 - bits * (k + 1))
    return out


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 ``[..., nbytes]`` -> ``[..., n]`` (uint8/uint16/uint32)."""
    p = np.asarray(packed, np.uint8)
    if bits not in (2, 4, 8, 16, 32):
        raise ValueError(f"unpack_codes: unsupported width {bits} bits (2, 4, 8, 16, 32)")
    need = -(-n * bits // 8)
    if p.shape[-1] < need:
        raise ValueError(f"unpack_codes: {p.shape[-1]} bytes cannot hold {n} codes of {bits} bits")
    if bits >= 8:
        raw = np.ascontiguousarray(p[..., :need])
        return raw if bits == 8 else raw.view(f"<u{bits // 8}").astype(f"u{bits // 8}")
    shifts = np.arange(8 - bits, -1, -bits, dtype=np.uint8)
    parts = (p[..., :need, None] >> shifts) & np.uint8((1 << bits) - 1)
    return parts.reshape(*p.shape[:-1], need * (8 // bits))[..., :n]


# ------------------------------------------------ torch's float32 sum, emulated
_TORCH_GRAIN = 32768   # at::internal::GRAIN_SIZE: below it a reduction runs on one thread
_TORCH_VEC = 8         # floats per at::vec::Vectorized<float> (AVX2 / NEON / default builds; 16 on AVX-512)


def _seq_sum(a: np.ndarray) -> np.ndarray:
    acc = np.zeros(a.shape[1:], f32)
    for row in a:
        acc += row
    return acc


def _multi_row_sum(items: np.ndarray) -> np.ndarray:
    """ATen SumKernel ``multi_row_sum``: sequential chunks of ``step`` items, cascaded over 4 levels."""
    lanes = items.shape[1]
    step = 1 << max(4, (int(len(items) - 1).bit_length() if len(items) > 2 else 1) // 4)
    levels, rest = [], items
    for _ in range(3):
        full = len(rest) // step
        levels.append(rest[full * step:])
        rest = _seq_sum(rest[:full * step].reshape(full, step, lanes).swapaxes(0, 1))
    acc = _seq_sum(levels[0])
    for part in (*levels[1:], rest):
        acc = acc + _seq_sum(part)
    return acc


def _row_sum(x: np.ndarray, width: int) -> np.ndarray:
    v = x[: x.size // width * width].reshape(-1, width)
    n4 = len(v) // 4
    p = _multi_row_sum(v[: n4 * 4].reshape(n4, 4 * width)).reshape(4, width)
    acc = p[0]
    for row in v[n4 * 4:]:
        acc = acc + row
    return acc + p[1] + p[2] + p[3]


def _inner_sum(x: np.ndarray) -> np.float32:
    if x.size < _TORCH_VEC:
        return f32(_row_sum(x, 1)[0])
    lanes = _row_sum(x, _TORCH_VEC)
    acc = f32(0)
    for v in (*x[x.size // _TORCH_VEC * _TORCH_VEC:], *lanes):
        acc = f32(acc + v)
    return acc


def _torch_mean(x: np.ndarray, threads: int = 1) -> np.float32:
    """``torch.Tensor.mean()`` of a 1-D float32 CPU tensor, bit for bit: ATen's cascade sum, then / n.

    Above GRAIN_SIZE elements ATen splits the sum over its intra-op threads, so the result depends on
    ``torch.get_num_threads()`` at quantization time: ``threads`` says which count to reproduce.
    """
    n = x.size
    if n < _TORCH_GRAIN or threads <= 1:
        total = _inner_sum(x)
    else:   # two-pass reduction: at::parallel_for chunks, one partial per thread slot, then their sum
        used = min(threads, -(-n // _TORCH_GRAIN))
        chunk, parts = -(-n // used), np.zeros(threads, f32)
        for t in range(used):
            parts[t] = _inner_sum(x[t * chunk:(t + 1) * chunk]) if t * chunk < n else 0
        total = _inner_sum(parts)
    return f32(f32(total) / f32(n))


def _quantize_blockwise_dynamic(x: np.ndarray, bs: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """bnb ``quantize_blockwise(x, blocksize=bs)`` on the CPU (signed dynamic map): (uint8 codes, absmax)."""
    n = x.size
    blocks = np.zeros(-(-n // bs) * bs, f32)
    blocks[:n] = x
    blocks = blocks.reshape(-1, bs)
    am = np.abs(blocks).max(1)
    with np.errstate(over="ignore", invalid="ignore"):
        v = blocks * (f32(1) / np.where(am == 0, f32(1), am))[:, None]
    v = np.where(np.isnan(v), f32(-1), np.clip(v, f32(-1), f32(1)))   # 0 * inf: x86 maxps(NaN, -1) = -1
    idx = (((v + f32(1)) * f32(0.5)) * f32(65535) + f32(0.5)).astype(np.int32)   # C truncation
    q = np.where((am == 0)[:, None], np.uint8(0), _DYN_LUT[idx])
    return q.reshape(-1)[:n], am


# ---------------------------------------------------------------- codecs
@dataclass(frozen=True, eq=False)
class QuantTensor:
    """A quantized tensor: one unsigned code per element plus per-group and per-tensor parameters."""

    format: str
    shape: tuple[int, ...]
    codes: np.ndarray
    params: dict[str, np.ndarray]
    constants: dict[str, np.ndarray] = field(default_factory=dict)


class Codec(abc.ABC):
    """One number format: quantize to codes + parameters, dequantize back to float32."""

    name: str = ""
    bits: int = 0
    group: int = 0
    param_fields: tuple[tuple[str, str], ...] = ()

    @abc.abstractmethod
    def quantize(self, w: np.ndarray) -> QuantTensor:
        """Codes and parameters of a float tensor."""

    @abc.abstractmethod
    def dequantize(self, q: QuantTensor) -> np.ndarray:
        """The float32 values the codes stand for."""

    def spec(self) -> dict:
        return {"format": self.name}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.spec().items())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


def _lookup_table(values: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Code for every float32 whose top 16 bits are the index (255 = bin holds a decision bound)."""
    bounds = (values[order][:-1] + values[order][1:]) / f32(2)
    top = np.arange(65536, dtype=np.uint32) << np.uint32(16)
    lo = order[np.searchsorted(bounds, top.view(f32))]
    hi = order[np.searchsorted(bounds, (top | np.uint32(0xFFFF)).view(f32))]
    return np.where(lo == hi, lo, np.uint8(255)).astype(np.uint8), bounds


_LOOKUP_TABLES: dict[str, tuple[np.ndarray, np.ndarray]] = {}


class Bnb4bitCodec(Codec):
    """bitsandbytes NF4 / FP4, bit-exact with ``quantize_4bit`` / ``dequantize_4bit`` (bnb 0.50, CPU).

    Blocks of ``blocksize`` run over the flattened row-major tensor.  Per full block: absmax = max|x|,
    ``scaled = x * (1 / max(absmax, 1e-38))`` (float32 reciprocal, then multiply); the partial last block
    divides by its clamped absmax instead and stores the clamped value.  A code is the bucket of ``scaled``
    among the 15 midpoints of the sorted table (torch.bucketize, right=False), through the FP4 reorder.
    Double quantization: ``offset = mean(absmax)`` (torch's float32 sum, see :func:`_torch_mean`), and
    ``absmax - offset`` is quantized in blocks of 256 with :data:`BNB_DYNAMIC_SIGNED`.
    Machine fact assumed: torch float32 vectors of 8 lanes (AVX2 / NEON / default builds) in the mean.
    Dequantization uses flat blocks, as bnb's quantizer, its CUDA kernel, its pure-torch reference and its scalar
    and NEON CPU kernels do (bnb 0.50's AVX-512 CPU kernel indexes absmax per row, wrong when a row is not a
    whole number of blocks: docs/bitsandbytes.md). FP4's code 8 is +0.0 as in bnb's table (native AVX2/scalar
    kernels give -0.0: numerically the same value).

    ``cpu_repacked``: reproduce what bitsandbytes stores after its CPU inference repacking (``Linear4bit.forward``
    on a CPU with AVX512-BF16 rounds the de-nested absmax to bfloat16; ``save_pretrained`` re-nests it with a
    new offset). The 4-bit codes are unchanged; only the double-quantization statistics differ.
    """

    def __init__(self, name: str, blocksize: int = 64, double_quant: bool = True, bnb_threads: int = 1,
                 cpu_repacked: bool = False):
        self.name, self.bits, self.group = name, 4, int(blocksize)
        self.double_quant, self.bnb_threads = bool(double_quant), int(bnb_threads)
        self.cpu_repacked = bool(cpu_repacked)
        if self.cpu_repacked and not self.double_quant:
            raise RomacError("the bitsandbytes CPU repacking is reproducible only with double quantization",
                             where=name, hint="without double quantization bitsandbytes saves a bfloat16, "
                             "transposed absmax that no loader reads back correctly; compile the FP base instead")
        self.nested_blocksize = BNB_NESTED_BLOCKSIZE
        self.param_fields = (("absmax", "u8" if self.double_quant else "f32"),)
        self.values = NF4_VALUES if name == "nf4" else FP4_VALUES
        self.order = np.arange(16, dtype=np.uint8) if name == "nf4" else _FP4_ORDER
        self.pad_code = int(self.order[7])       # code bnb gives 0.0 (its pad for an odd element count)
        if name not in _LOOKUP_TABLES:   # 65536-entry table: built once per format, not per codec object
            _LOOKUP_TABLES[name] = _lookup_table(self.values, self.order)
            for a in _LOOKUP_TABLES[name]:
                a.flags.writeable = False
        self._table, self._bounds = _LOOKUP_TABLES[name]

    def spec(self) -> dict:
        s = {"format": self.name, "blocksize": self.group, "double_quant": self.double_quant}
        if self.bnb_threads != 1:
            s["bnb_threads"] = self.bnb_threads
        if self.cpu_repacked:
            s["cpu_repacked"] = True
        return s

    def _codes(self, scaled: np.ndarray) -> np.ndarray:
        c = self._table.take((scaled.view(np.uint32) >> np.uint32(16)).astype(np.intp))
        amb = np.flatnonzero(c == 255)
        if amb.size:
            c.reshape(-1)[amb] = self.order[np.searchsorted(self._bounds, scaled.reshape(-1)[amb])]
        return c

    def quantize(self, w: np.ndarray) -> QuantTensor:
        x = np.asarray(w)
        shape, x = x.shape, x.reshape(-1)       # bnb: A.reshape(-1).float(); converted chunk by chunk
        bs, n = self.group, x.size
        if n == 0:
            raise ValueError("cannot quantize an empty tensor")
        nfull, nb, per = n // bs, -(-n // bs), max(1, _CHUNK // bs)
        absmax, codes = np.empty(nb, f32), np.empty(n, np.uint8)
        with np.errstate(invalid="ignore"):   # non-finite input is reported below
            for b0 in range(0, nfull, per):
                blk = x[b0 * bs:min(nfull, b0 + per) * bs].astype(f32, copy=False).reshape(-1, bs)
                am = np.abs(blk).max(1)
                absmax[b0:b0 + len(am)] = am
                scaled = blk * (f32(1) / np.maximum(am, f32(1e-38)))[:, None]
                codes[b0 * bs:b0 * bs + blk.size] = self._codes(scaled).reshape(-1)
            if nfull < nb:
                tail = x[nfull * bs:].astype(f32, copy=False)
                absmax[-1] = am = max(np.abs(tail).max(), f32(1e-38))
                codes[nfull * bs:] = self._codes(tail / am)
        if not np.isfinite(absmax).all():
            raise RomacError("tensor holds inf or NaN", hint="NF4/FP4 need finite weights")
        if not self.double_quant:
            return QuantTensor(self.name, shape, codes.reshape(shape), {"absmax": absmax})
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below, not warned about
            q = self._nest(shape, codes, absmax)
            if self.cpu_repacked:   # bnb _convert_weight_packed_for_cpu, then its inverse on save_pretrained
                q = self._nest(shape, codes, self.absmax_float32(q).astype(ml_dtypes.bfloat16).astype(f32))
            finite = np.isfinite(q.constants["offset"][0]) and np.isfinite(self.absmax_float32(q)).all()
        if not finite:  # bitsandbytes would store NaN/Inf absmax here: refuse rather than burn NaN into ROM
            raise RomacError(
                f"double quantization overflows float32 (block absmax values up to {absmax.max():.3g}, "
                f"mean {q.constants['offset'][0]:.3g})",
                hint=f"{self.name.upper()} with double quantization cannot hold weights this large; rescale the model "
                "or use a format without double quantization",
            )
        return q

    def _nest(self, shape: tuple[int, ...], codes: np.ndarray, absmax: np.ndarray) -> QuantTensor:
        """Double quantization of float32 block absmax values: ``offset = mean``, the rest in 8-bit blocks."""
        offset = _torch_mean(absmax, self.bnb_threads)
        qabs, nested = _quantize_blockwise_dynamic(absmax - offset)
        return QuantTensor(self.name, shape, codes.reshape(shape), {"absmax": qabs},
                           {"nested_absmax": nested, "offset": np.array([offset], f32)})

    @staticmethod
    def absmax_float32(q: QuantTensor) -> np.ndarray:
        """Per-block float32 absmax; de-nested as bnb does: ``code[c] * nested[i // 256]``, then ``+ offset``."""
        a = q.params["absmax"]
        if "nested_absmax" not in q.constants:
            return np.asarray(a, f32)
        nested = q.constants["nested_absmax"][np.arange(a.size) // 256]
        return BNB_DYNAMIC_SIGNED[a] * nested + f32(q.constants["offset"][0])

    def dequantize(self, q: QuantTensor) -> np.ndarray:
        am, codes, bs = self.absmax_float32(q), q.codes.reshape(-1), self.group
        vals = self.values
        out = np.empty(codes.size, f32)
        nfull, per = codes.size // bs, max(1, _CHUNK // bs)
        for b0 in range(0, nfull, per):
            b1 = min(nfull, b0 + per)
            out[b0 * bs:b1 * bs] = (vals[codes[b0 * bs:b1 * bs].reshape(-1, bs)] * am[b0:b1, None]).reshape(-1)
        out[nfull * bs:] = vals[codes[nfull * bs:]] * am[-1]
        return out.reshape(q.shape)

    def pack(self, q: QuantTensor) -> np.ndarray:
        """The packed bytes bnb stores (``weight`` in a checkpoint, flattened): odd counts pad with 0.0's code."""
        return pack_codes(q.codes.reshape(-1), 4, pad=self.pad_code)


class AffineCodec(Codec):
    """ROMA's affine unsigned k-bit format on a 2-D ``[rows, cols]`` matrix.

    Groups are ``group_size`` consecutive elements of a row (the last group of a row may be shorter).
    Per group, in float32: ``lo = min(0, min g)``, ``hi = max(0, max g)``, ``qmax = 2**k - 1``;
    ``s = float16((hi - lo) / qmax)`` (round to nearest even; 1.0 when hi == lo; the smallest float16
    subnormal if it rounds to 0; overflow is an error); ``z = clip(rint(-lo / s), 0, qmax)``;
    ``q = clip(rint(w / s) + z, 0, qmax)``.  Dequantization ``float32(s) * (q - z)`` is exact in float32.
    """

    def __init__(self, bits: int, group_size: int = 128):
        self.name, self.bits, self.group = f"int{bits}", int(bits), int(group_size)
        self.qmax = f32(2 ** bits - 1)
        self.param_fields = (("scale", "f16"), ("zero", f"u{bits}"))

    def spec(self) -> dict:
        return {"format": self.name, "group_size": self.group}

    def _groups(self, a: np.ndarray):
        """(full groups [r, G, g], partial last group [r, 1, cols % g] or None)."""
        full = a.shape[1] // self.group * self.group
        part = a[:, full:, None].swapaxes(1, 2) if full < a.shape[1] else None
        return a[:, :full].reshape(a.shape[0], -1, self.group), part

    def quantize(self, w: np.ndarray) -> QuantTensor:
        w = np.asarray(w)
        if w.ndim != 2:
            raise ValueError(f"{self.name} quantizes 2-D [rows, cols] matrices, got shape {w.shape}")
        (rows, cols), ng = w.shape, -(-w.shape[1] // self.group)
        scale, zero = np.empty((rows, ng), np.float16), np.empty((rows, ng), np.uint8)
        codes, per = np.empty((rows, cols), np.uint8), max(1, _CHUNK // max(cols, 1))
        for r0 in range(0, rows, per):
            x = np.ascontiguousarray(w[r0:r0 + per], dtype=f32)
            qs = []
            for gi, g in zip((slice(0, cols // self.group), slice(cols // self.group, ng)), self._groups(x)):
                if g is None or g.shape[1] == 0:
                    continue
                lo, hi = np.minimum(g.min(2), f32(0)), np.maximum(g.max(2), f32(0))
                with np.errstate(over="ignore", invalid="ignore"):
                    s16 = ((hi - lo) / self.qmax).astype(np.float16)
                s16[hi == lo] = 1.0
                s16[(s16 == 0) & (hi > lo)] = np.float16(2.0 ** -24)
                if not np.isfinite(s16).all():
                    raise RomacError("weights exceed the FP16 scale range (or are not finite)",
                                     where=f"{self.name} group", hint="clip or rescale the matrix")
                s = s16.astype(f32)[..., None]
                z = np.clip(np.rint(-lo[..., None] / s), f32(0), self.qmax)
                t = np.rint(g / s)
                t += z
                qs.append(np.clip(t, f32(0), self.qmax, out=t).astype(np.uint8).reshape(len(x), -1))
                scale[r0:r0 + len(x), gi], zero[r0:r0 + len(x), gi] = s16, z[..., 0].astype(np.uint8)
            codes[r0:r0 + len(x)] = np.concatenate(qs, axis=1) if len(qs) > 1 else qs[0]
        return QuantTensor(self.name, (rows, cols), codes, {"scale": scale, "zero": zero})

    def dequantize(self, q: QuantTensor) -> np.ndarray:
        rows, cols = q.shape
        out, nfull, per = np.empty((rows, cols), f32), cols // self.group, max(1, _CHUNK // max(cols, 1))
        s, z = q.params["scale"].astype(f32), q.params["zero"].astype(f32)
        for r0 in range(0, rows, per):
            r = slice(r0, r0 + per)
            full, part = self._groups(q.codes[r])
            o_full, o_part = self._groups(out[r])
            o_full[...] = s[r, :nfull, None] * (full.astype(f32) - z[r, :nfull, None])
            if part is not None:
                o_part[...] = s[r, nfull:, None] * (part.astype(f32) - z[r, nfull:, None])
        return out


class RawCodec(Codec):
    """IEEE fp16 / fp32 stored as their bit patterns (uint16 / uint32); any shape."""

    def __init__(self, name: str):
        self.name, self.bits = name, 16 if name == "fp16" else 32
        self._float, self._uint = (np.float16, np.uint16) if name == "fp16" else (f32, np.uint32)

    def quantize(self, w: np.ndarray) -> QuantTensor:
        with np.errstate(over="ignore"):       # too large for fp16 -> inf, as IEEE says
            codes = np.asarray(w).astype(self._float).view(self._uint)
        return QuantTensor(self.name, tuple(codes.shape), codes, {})

    def dequantize(self, q: QuantTensor) -> np.ndarray:
        return np.asarray(q.codes, dtype=self._uint).view(self._float).astype(f32)


SUPPORTED_FORMATS = ("nf4", "fp4", "int8", "int4", "int2", "fp16", "fp32")


def get_codec(format: str, group_size: int = 128, blocksize: int = 64, double_quant: bool = True,
              bnb_threads: int = 1, cpu_repacked: bool = False) -> Codec:
    """The codec for ``format``.  nf4/fp4 use ``blocksize``/``double_quant`` (and ``bnb_threads``, the
    torch thread count whose float32 mean to reproduce, and ``cpu_repacked``, see :class:`Bnb4bitCodec`);
    int8/4/2 use ``group_size``; fp16/fp32 neither."""
    if format in ("nf4", "fp4"):
        if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise RomacError(f"invalid blocksize {blocksize}", where=format,
                             hint="bitsandbytes allows 32, 64, 128, 256, 512, 1024, 2048, 4096")
        return Bnb4bitCodec(format, blocksize, double_quant, bnb_threads, cpu_repacked)
    if format in ("int8", "int4", "int2"):
        if int(group_size) < 1:
            raise RomacError(f"invalid group_size {group_size}", where=format, hint="use a positive size, e.g. 128")
        return AffineCodec(int(format[3:]), group_size)
    if format in ("fp16", "fp32"):
        return RawCodec(format)
    raise RomacError(f"unknown number format {format!r}", hint=f"supported: {', '.join(SUPPORTED_FORMATS)}")


# ---------------------------------------------------------------- FP8 / FP16 helpers
_FP8_MAX = f32(448.0)


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
