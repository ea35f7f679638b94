"""bitsandbytes NF4 / FP4, bit-exact with bitsandbytes' CPU ``quantize_4bit`` / ``dequantize_4bit`` (checked against
bitsandbytes 0.50.2, incl. double quantization), because a QLoRA adapter is only valid against exactly the NF4
weights it was trained on. The format's facts (tables, blocksizes, storage) are in :mod:`romac.spec.formats`.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from romac.codecs.base import CHUNK, Codec, QuantTensor
from romac.codecs.bits import pack_codes
from romac.errors import RomacError
from romac.spec.formats import BNB_DYNAMIC_SIGNED, BNB_NESTED_BLOCKSIZE, Bnb4bitFormat

f32 = np.float32
# bnb 0.50's CPU 8-bit quantizer (cpu_ops.cpp build_quantize_lut): the normalised value v is binned into
# 65536 steps, idx = trunc(((v + 1) * 0.5) * 65535 + 0.5), and each bin maps to the code whose midpoints
# bracket the bin's centre -- so codes are not the exact nearest ones (e.g. 0.0 -> code 131).
_DYN_LUT = np.searchsorted(f32(0.5) * (BNB_DYNAMIC_SIGNED[:-1] + BNB_DYNAMIC_SIGNED[1:]),
                           f32(-1) + (f32(2) * np.arange(65536, dtype=f32)) / f32(65535)).astype(np.uint8)


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


def _quantize_blockwise_dynamic(x: np.ndarray, bs: int = BNB_NESTED_BLOCKSIZE) -> tuple[np.ndarray, np.ndarray]:
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


def denest_absmax(codes: np.ndarray, nested: np.ndarray, offset: float, first_block: int = 0) -> np.ndarray:
    """float32 absmax of blocks ``first_block ..`` from their 8-bit codes, as bnb de-nests them:
    ``code[c] * nested[i // 256]``, then ``+ offset``."""
    blocks = first_block + np.arange(np.size(codes))
    return BNB_DYNAMIC_SIGNED[codes] * nested[blocks // BNB_NESTED_BLOCKSIZE] + f32(offset)


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

    def __init__(self, fmt: Bnb4bitFormat) -> None:
        super().__init__(fmt)
        name = fmt.name
        if name not in _LOOKUP_TABLES:   # 65536-entry table: built once per format, not per codec object
            _LOOKUP_TABLES[name] = _lookup_table(fmt.values, fmt.order)
            for a in _LOOKUP_TABLES[name]:
                a.flags.writeable = False
        self._table, self._bounds = _LOOKUP_TABLES[name]

    def _codes(self, scaled: np.ndarray) -> np.ndarray:
        c = self._table.take((scaled.view(np.uint32) >> np.uint32(16)).astype(np.intp))
        amb = np.flatnonzero(c == 255)
        if amb.size:
            c.reshape(-1)[amb] = self.format.order[np.searchsorted(self._bounds, scaled.reshape(-1)[amb])]
        return c

    def quantize(self, w: np.ndarray) -> QuantTensor:
        x = np.asarray(w)
        shape, x = x.shape, x.reshape(-1)       # bnb: A.reshape(-1).float(); converted chunk by chunk
        bs, n = self.format.blocksize, x.size
        if n == 0:
            raise ValueError("cannot quantize an empty tensor")
        nfull, nb, per = n // bs, -(-n // bs), max(1, CHUNK // bs)
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
        if not self.format.double_quant:
            return QuantTensor(self.name, shape, codes.reshape(shape), {"absmax": absmax})
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below, not warned about
            q = self._nest(shape, codes, absmax)
            if self.format.cpu_repacked:   # bnb _convert_weight_packed_for_cpu, then its inverse on save_pretrained
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
        offset = _torch_mean(absmax, self.format.bnb_threads)
        qabs, nested = _quantize_blockwise_dynamic(absmax - offset)
        return QuantTensor(self.name, shape, codes.reshape(shape), {"absmax": qabs},
                           {"nested_absmax": nested, "offset": np.array([offset], f32)})

    @staticmethod
    def absmax_float32(q: QuantTensor) -> np.ndarray:
        """Per-block float32 absmax (de-nested under double quantization, see :func:`denest_absmax`)."""
        a = q.params["absmax"]
        if "nested_absmax" not in q.constants:
            return np.asarray(a, f32)
        return denest_absmax(a, q.constants["nested_absmax"], q.constants["offset"][0])

    def dequantize(self, q: QuantTensor) -> np.ndarray:
        am, codes, bs = self.absmax_float32(q), q.codes.reshape(-1), self.format.blocksize
        vals = self.format.values
        out = np.empty(codes.size, f32)
        nfull, per = codes.size // bs, max(1, CHUNK // bs)
        for b0 in range(0, nfull, per):
            b1 = min(nfull, b0 + per)
            out[b0 * bs:b1 * bs] = (vals[codes[b0 * bs:b1 * bs].reshape(-1, bs)] * am[b0:b1, None]).reshape(-1)
        out[nfull * bs:] = vals[codes[nfull * bs:]] * am[-1]
        return out.reshape(q.shape)

    def pack(self, q: QuantTensor) -> np.ndarray:
        """The packed bytes bnb stores (``weight`` in a checkpoint, flattened): odd counts pad with 0.0's code."""
        return pack_codes(q.codes.reshape(-1), self.format.code_bits, pad=self.format.pad_code)
