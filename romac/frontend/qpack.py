"""What the GPTQ, AWQ and compressed-tensors readers share: int32 bit-unpacking, scale checks, the weight handle.

All three formats store affine integer codes ``w = s * (q - z)`` in int32 words, each its own way:

* **dense LSB-first bit stream** (:func:`unpack_dense`): value ``i`` along the packed axis occupies bits
  ``[i*b, (i+1)*b)`` of the words read in order, each word least significant bit first. GPTQ's ``qweight`` /
  ``qzeros`` for b = 2, 3, 4, 8 (AutoGPTQ ``pack``: 3-bit splits values across words exactly so) and
  compressed-tensors >= 0.12's ``pack_to_int32`` (any b in 1..8) are this layout.
* **fields of 32 // b per word** (:func:`unpack_fields`): compressed-tensors before its dense packing
  (``pack_factor = 32 // num_bits``, the high ``32 % b`` bits of each word unused). Identical to the dense stream
  when b divides 32.
* **AWQ GEMM** (:func:`unpack_awq`): eight 4-bit fields per word along the output, nibble ``i`` holding column
  ``AWQ_ORDER[i]`` of its group of eight.

:class:`AffineWeight` is the handle the readers give each quantized projection (see its doc).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from romac.codecs import QuantTensor, get_codec
from romac.errors import RomacError
from romac.frontend.hf_config import canonical_name, open_checkpoint_files, parse_hf_config
from romac.frontend.safetensors_io import FLOAT_DTYPES
from romac.ir import LazyWeight, expected_shape, make_model, tensor_names

__all__ = [
    "AWQ_ORDER",
    "AWQ_REVERSE_ORDER",
    "AffineWeight",
    "QuantParts",
    "unpack_dense",
    "pack_dense",
    "unpack_fields",
    "pack_fields",
    "unpack_awq",
    "pack_awq",
    "scales_as_fp16",
    "round_to_dtype",
    "requantize_note",
    "ROM_BITS",
]

f32 = np.float32
ROM_BITS = (2, 4, 8)                      # the affine formats romac (and the ROM) has: int2, int4, int8
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)      # AutoAWQ pack: nibble i of a word holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of a group of 8 is nibble AWQ_REVERSE_ORDER[j]


def _u32(words: np.ndarray) -> np.ndarray:
    w = np.asarray(words)
    if w.dtype.itemsize != 4 or w.dtype.kind not in "iu":
        raise ValueError(f"packed words must be 32-bit integers, got {w.dtype}")
    return np.ascontiguousarray(w).view(np.uint32)


# ---------------------------------------------------------------- dense LSB-first stream
def unpack_dense(words: np.ndarray, bits: int, n: int, axis: int = 0) -> np.ndarray:
    """The first ``n`` ``bits``-wide values of the LSB-first bit stream that ``words`` form along ``axis`` (uint8)."""
    w = _u32(words if axis == 0 else np.moveaxis(words, axis, 0))
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_dense: {bits} bits (1..8)")
    if w.shape[0] * 32 < n * bits:
        raise ValueError(f"unpack_dense: {w.shape[0]} words cannot hold {n} values of {bits} bits")
    mask = np.uint32((1 << bits) - 1)
    if 32 % bits == 0:
        per = 32 // bits
        out = np.empty((w.shape[0] * per,) + w.shape[1:], np.uint8)
        for i in range(per):
            out[i::per] = (w >> np.uint32(i * bits)) & mask
        out = out[:n]
    else:
        pos = np.arange(n, dtype=np.int64) * bits
        word, off = pos // 32, (pos % 32).astype(np.uint64)
        nxt = np.minimum(word + 1, w.shape[0] - 1)
        pair = w[word].astype(np.uint64) | (w[nxt].astype(np.uint64) << np.uint64(32))
        off = off.reshape((-1,) + (1,) * (w.ndim - 1))
        out = ((pair >> off) & np.uint64(mask)).astype(np.uint8)
    return out if axis == 0 else np.moveaxis(out, 0, axis)


def pack_dense(values: np.ndarray, bits: int, axis: int = 0, words: int | None = None) -> np.ndarray:
    """Inverse of :func:`unpack_dense`: int32 words (``ceil(n*bits/32)`` along ``axis`` unless ``words`` says more)."""
    v = np.asarray(values)
    v = (v if axis == 0 else np.moveaxis(v, axis, 0)).astype(np.uint64)
    n = v.shape[0]
    if v.size and int(v.max()) >> bits:
        raise ValueError(f"pack_dense: a value does not fit in {bits} bits")
    nw = words if words is not None else -(-n * bits // 32)
    acc = np.zeros((nw + 1,) + v.shape[1:], np.uint64)
    for i in range(n):
        p = i * bits
        acc[p // 32] |= (v[i] << np.uint64(p % 32)) & np.uint64(0xFFFFFFFF)
        if p % 32 + bits > 32:
            acc[p // 32 + 1] |= v[i] >> np.uint64(32 - p % 32)
    out = acc[:nw].astype(np.uint32).view(np.int32)
    return out if axis == 0 else np.ascontiguousarray(np.moveaxis(out, 0, axis))


# ---------------------------------------------------------------- 32 // b fields per word
def unpack_fields(words: np.ndarray, bits: int, n: int, axis: int = 0) -> np.ndarray:
    """Values ``w * (32 // bits) + i`` at bits ``[i*bits, (i+1)*bits)`` of word ``w`` along ``axis``; the first ``n``."""
    w = _u32(words if axis == 0 else np.moveaxis(words, axis, 0))
    per, mask = 32 // bits, np.uint32((1 << bits) - 1)
    if w.shape[0] * per < n:
        raise ValueError(f"unpack_fields: {w.shape[0]} words cannot hold {n} values of {bits} bits")
    out = np.empty((w.shape[0] * per,) + w.shape[1:], np.uint8)
    for i in range(per):
        out[i::per] = (w >> np.uint32(i * bits)) & mask
    out = out[:n]
    return out if axis == 0 else np.moveaxis(out, 0, axis)


def pack_fields(values: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """Inverse of :func:`unpack_fields` (zero padding to whole words)."""
    v = np.asarray(values)
    v = (v if axis == 0 else np.moveaxis(v, axis, 0)).astype(np.uint32)
    per = 32 // bits
    nw = -(-v.shape[0] // per)
    padded = np.zeros((nw * per,) + v.shape[1:], np.uint32)
    padded[: v.shape[0]] = v
    out = np.zeros((nw,) + v.shape[1:], np.uint32)
    for i in range(per):
        out |= padded[i::per] << np.uint32(i * bits)
    out = out.view(np.int32)
    return out if axis == 0 else np.ascontiguousarray(np.moveaxis(out, 0, axis))


# ---------------------------------------------------------------- AWQ GEMM
def unpack_awq(words: np.ndarray, n: int | None = None) -> np.ndarray:
    """AWQ GEMM ``[rows, cols/8]`` int32 -> ``[rows, cols]`` uint8 4-bit values in column order."""
    w = _u32(words)
    out = np.empty(w.shape[:-1] + (w.shape[-1], 8), np.uint8)
    for j, nib in enumerate(AWQ_REVERSE_ORDER):
        out[..., j] = (w >> np.uint32(4 * nib)) & np.uint32(15)
    out = out.reshape(w.shape[:-1] + (w.shape[-1] * 8,))
    return out if n is None else out[..., :n]


def pack_awq(values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`unpack_awq` (AutoAWQ's ``from_linear`` packing); the last axis must be a multiple of 8."""
    v = np.asarray(values).astype(np.uint32)
    g = v.reshape(v.shape[:-1] + (-1, 8))
    out = np.zeros(g.shape[:-1], np.uint32)
    for i, col in enumerate(AWQ_ORDER):
        out |= g[..., col] << np.uint32(4 * i)
    return out.view(np.int32)


# ---------------------------------------------------------------- scales
_SCALE_DTYPES = ("F16", "BF16", "F32")


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``x`` rounded (nearest even) to the safetensors float dtype ``dtype`` and back to float32."""
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(f32)
    if dtype == "BF16":
        return x.astype(ml_dtypes.bfloat16).astype(f32)
    return np.asarray(x, f32)


def scales_as_fp16(values: np.ndarray) -> np.ndarray | None:
    """The float32 scales as float16 if every one converts exactly (a bf16/fp32 scale on the fp16 grid), else None."""
    with np.errstate(over="ignore"):
        h = values.astype(np.float16)
    return h if np.array_equal(h.astype(f32), values) else None


# ---------------------------------------------------------------- the handle
@dataclass(frozen=True)
class QuantParts:
    """One matrix's stored quantization, already in romac's orientation, read on demand.

    ``read(r0, r1)`` returns ``(codes [r1-r0, in] uint8, zeros [r1-r0, G] uint8, scales [r1-r0, G] float32,
    col_group [in] int64 or None)`` for output rows ``[r0, r1)``: ``col_group[k]`` is the group of input column
    ``k`` when groups are not contiguous runs of ``group_size`` (act-order ``g_idx``), else None.
    """

    read: Callable[[int, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = field(repr=False)


@dataclass(frozen=True)
class AffineWeight:
    """A GPTQ / AWQ / compressed-tensors projection: stored affine codes, read lazily, in romac's [out, in] layout.

    * ``codec_spec``: ``get_codec("int<b>", group_size=g).spec()`` when the stored grid IS romac's affine grid
      (b in 2/4/8, groups of ``g`` contiguous along the input -- the last one possibly shorter --, integer zero in
      [0, 2^b-1], scales exactly representable in float16); else None, and ``requantize_reason`` says why.
    * ``load_quantized()``: the stored codes, zeros and scales untouched, as a :class:`~romac.codecs.QuantTensor`
      of that codec (codes/zeros uint8 ``[out, in]`` / ``[out, G]``, scale float16 ``[out, G]``).
    * ``load()`` / ``load_rows(a, b)``: float32 weights exactly as the library dequantizes them
      (``library_dequant`` names the rule: every library computes ``s * (q - z)`` in the dtype it runs at, i.e. the
      exact product rounded once to ``library_dtype`` -- F16 for gptqmodel's and AutoAWQ's kernels, F32 (exact) for
      compressed-tensors as transformers loads it at float32 -- then widened to float32).
    * ``load_exact()``: ``float32(s) * (q - z)`` without that rounding: what the chip computes from the codes (and
      what :class:`~romac.codecs.AffineCodec` dequantizes ``load_quantized()`` to). ``load_rounded(dtype)``: the
      product rounded to another dtype (a library run at float16 or bfloat16).
    * ``grid``: the stored grid as the checkpoint describes it (bits, group_size, sym, scale dtype, act order...).
    """

    name: str
    shape: tuple[int, int]
    codec_spec: Mapping[str, Any] | None = field(compare=False)
    parts: QuantParts = field(repr=False, compare=False)
    source: str = ""
    grid: Mapping[str, Any] = field(default_factory=dict, compare=False)
    requantize_reason: str | None = None
    library_dequant: str = ""
    library_dtype: str = "F16"   # the float dtype the library's product s * (q - z) is rounded to (F32: exact)

    @property
    def bits(self) -> int:
        return int(self.grid["bits"])

    @property
    def group_size(self) -> int:
        return int(self.grid["group_size"])

    def _values(self, r0: int, r1: int, dtype: str) -> np.ndarray:
        codes, zeros, scales, col_group = self.parts.read(r0, r1)
        rows, cols = codes.shape
        g = self.group_size
        if col_group is None:
            col_group = np.arange(cols) // g
        d = codes.astype(f32) - zeros.astype(f32)[:, col_group]
        w = scales[:, col_group] * d
        return round_to_dtype(w, dtype)

    def load(self) -> np.ndarray:
        return self._values(0, self.shape[0], self.library_dtype)

    def load_rows(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.shape[0])
        return self._values(start, stop, self.library_dtype)

    def load_exact(self) -> np.ndarray:
        return self._values(0, self.shape[0], "F32")

    def load_rounded(self, dtype: str) -> np.ndarray:
        """``s * (q - z)`` rounded to ``dtype`` (F16, BF16 or F32): a library run at another float dtype."""
        return self._values(0, self.shape[0], dtype)

    def load_quantized(self) -> QuantTensor:
        if self.codec_spec is None:
            raise RomacError(f"tensor {self.name!r}: the stored grid is not one of romac's formats "
                             f"({self.requantize_reason})", where=self.source or None,
                             hint="compile it from load() (the dequantized weights), re-quantized")
        codes, zeros, scales, _ = self.parts.read(0, self.shape[0])
        fmt = self.codec_spec["format"]
        return QuantTensor(fmt, tuple(self.shape), np.ascontiguousarray(codes, np.uint8),
                           {"scale": np.ascontiguousarray(scales.astype(np.float16)),
                            "zero": np.ascontiguousarray(zeros, np.uint8)})

    def load_quantized_permuted(self) -> tuple[np.ndarray, QuantTensor]:
        """For act-order (permuted ``g_idx``) weights: ``(perm, q)`` with ``W[:, perm]`` = ``q`` exactly, on
        contiguous groups of ``group_size``, codes untouched -- usable only by a compile that feeds projection inputs
        permuted by ``perm`` (``x[perm]``); romac's ROM path does not (yet): see ``requantize_reason``."""
        codes, zeros, scales, col_group = self.parts.read(0, self.shape[0])
        if col_group is None or self.bits not in ROM_BITS:
            raise RomacError(f"tensor {self.name!r} has no act-order permutation to undo", where=self.source or None)
        perm = np.argsort(col_group, kind="stable")
        counts = np.bincount(col_group, minlength=zeros.shape[1])
        g = self.group_size
        if not (counts[:-1] == g).all() or not 0 < counts[-1] <= g:
            raise RomacError(f"tensor {self.name!r}: g_idx groups are not {g} columns each", where=self.source or None)
        q = QuantTensor(f"int{self.bits}", tuple(self.shape), np.ascontiguousarray(codes[:, perm]),
                        {"scale": scales.astype(np.float16), "zero": np.ascontiguousarray(zeros, np.uint8)})
        return perm, q


def affine_spec(bits: int, group_size: int) -> dict:
    return get_codec(f"int{bits}", group_size=group_size).spec()


def requantize_note(handle: Any, target_spec: Mapping[str, Any]) -> str | None:
    """What ``romac compile`` should say when a pre-quantized weight does not reach ROM with its stored codes.

    None when ``handle.codec_spec == target_spec`` (the codes pass through); otherwise one sentence naming the
    tensor, the stored grid, the target format and the reason.
    """
    spec = getattr(handle, "codec_spec", None)
    if spec is not None and dict(spec) == dict(target_spec):
        return None
    grid = getattr(handle, "grid", {}) or {}
    stored = f"{grid.get('method', 'stored')} int{grid.get('bits', '?')} group {grid.get('group_size', '?')}"
    target = target_spec.get("format", "?") + (f" group {target_spec['group_size']}" if "group_size" in target_spec else "")
    why = getattr(handle, "requantize_reason", None) or f"the target format is {target}"
    return (f"{handle.name}: {stored} re-quantized to {target} from the dequantized weights ({why}); "
            "the stored codes are not kept")


def check_scales(values: np.ndarray, bad: Callable[[str], RomacError]) -> None:
    """Scales must be finite and non-zero (a zero scale makes every code of its group 0: no format stores that)."""
    if not np.isfinite(values).all():
        n = int((~np.isfinite(values)).sum())
        raise bad(f"holds {n} NaN or infinite scale(s)")
    if (values == 0).any():
        n = int((values == 0).sum())
        raise bad(f"holds {n} zero scale(s)")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def groups_of(n: int, group_size: int) -> int:
    return math.ceil(n / group_size)


# ---------------------------------------------------------------- checkpoint walk shared by the three readers
class QCheckpoint:
    """The opened files of a quantized HF checkpoint, with the per-key checks every reader makes (one-line errors)."""

    def __init__(self, root, key_files: Mapping[str, Any], kind: str) -> None:
        self.root, self.key_files, self.kind = root, key_files, kind
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        f = self.key_files.get(key)
        return str(f.path) if f is not None else str(self.root)

    def bad(self, key: str, what: str, hint: str | None = None) -> RomacError:
        return RomacError(f"tensor {key!r}: {what}", where=self.where(key), hint=hint)

    def has(self, key: str) -> bool:
        return key in self.key_files

    def need(self, key: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None, of: str,
             why: str = "") -> Any:
        """The file holding ``key``, after checking its dtype and shape (``why`` explains the expected shape)."""
        f = self.key_files.get(key)
        if f is None:
            raise RomacError(f"tensor {key!r} is missing ({self.kind} stores it beside {of!r})", where=self.where(of))
        info = f.info(key)
        if info.dtype not in dtypes:
            raise self.bad(key, f"dtype is {info.dtype}, expected {' or '.join(dtypes)}")
        if shape is not None and tuple(info.shape) != tuple(shape):
            raise self.bad(key, f"shape is {list(info.shape)}, expected {list(shape)}{' ' + why if why else ''}")
        self.used.add(key)
        return f

    def raw(self, key: str) -> np.ndarray:
        return self.key_files[key].raw(key)

    def float_values(self, key: str) -> np.ndarray:
        return np.asarray(self.key_files[key].load(key), f32)

    def files_of(self, prefix: str) -> dict[str, Any]:
        """The files holding ``prefix``'s tensors only (what a handle keeps: it pickles small)."""
        return {k: f for k, f in self.key_files.items() if k.startswith(prefix + ".")}

    def check_zero_bias(self, key: str) -> None:
        """romac has no bias terms: a stored bias is accepted only if every entry is zero."""
        if key not in self.key_files:
            return
        f = self.key_files[key]
        info = f.info(key)
        self.used.add(key)
        if info.dtype not in ("F32", "F16", "BF16"):
            raise self.bad(key, f"is a bias of dtype {info.dtype}; bias terms are not supported")
        b = f.load(key)
        if np.any(b != 0):
            raise self.bad(key, f"is a bias with {int(np.count_nonzero(b))} non-zero entries; bias terms are not "
                           "supported", hint="only all-zero biases (as some exporters write) can be dropped")


def walk_checkpoint(root, raw_cfg: Mapping[str, Any], key_files: Mapping[str, Any] | None, kind: str,
                    marker: str, make_quantized: Callable[[QCheckpoint, str, str, tuple[int, int]], Any],
                    part_suffixes: tuple[str, ...], summary: Mapping[str, Any]):
    """A quantized HF checkpoint as an IR Model: float tensors as usual, ``<module>.<marker>`` modules via
    ``make_quantized(ck, name, module_key, (out, in))``. Keys ending in ``part_suffixes`` belong to a quantized
    module; such a part without its ``marker`` tensor is an error."""
    cfg_path = root / "config.json"
    config = parse_hf_config(raw_cfg, where=str(cfg_path))
    ck = QCheckpoint(root, key_files if key_files is not None else open_checkpoint_files(root), kind)
    modules: dict[str, str] = {}   # module key prefix -> canonical name (for every tensor romac needs)
    for name in tensor_names(config):
        modules["lm_head" if name == "lm_head" else f"model.{name}"] = name
    weights: dict[str, Any] = {}
    formats: dict[str, int] = {}
    requantized: dict[str, str] = {}
    for prefix, name in modules.items():
        want = expected_shape(config, name)
        qkey, fkey = f"{prefix}.{marker}", f"{prefix}.weight"
        if ck.has(qkey) and ck.has(fkey):
            raise RomacError(f"module {prefix!r} has both {qkey!r} and a float {fkey!r}", where=ck.where(qkey))
        if ck.has(qkey):
            if len(want) != 2:
                raise ck.bad(qkey, f"is a quantized {name!r}, which romac keeps as a float vector")
            h = make_quantized(ck, name, prefix, want)
            ck.used.add(qkey)
            label = (f"{h.codec_spec['format']} g{h.codec_spec['group_size']}" if h.codec_spec is not None
                     else f"{h.grid.get('method', kind)} int{h.bits} (dequantized, re-quantized)")
            if h.requantize_reason:
                requantized[name] = h.requantize_reason
        elif ck.has(fkey):
            f = ck.key_files[fkey]
            info = f.info(fkey)
            if info.dtype not in FLOAT_DTYPES - {"F64"}:
                raise RomacError(f"tensor {fkey!r} has dtype {info.dtype}; expected F32, F16 or BF16", where=str(f.path))
            if tuple(info.shape) != want:
                raise RomacError(f"tensor {fkey!r} has shape {info.shape}, config.json implies {want}", where=str(f.path))
            orphan = next((f"{prefix}.{s}" for s in part_suffixes if ck.has(f"{prefix}.{s}")), None)
            if orphan is not None:
                raise ck.bad(orphan, f"is a {kind} part, but {fkey!r} is a float weight and there is no {qkey!r}")
            ck.used.add(fkey)
            h = LazyWeight(name, tuple(info.shape), f.loader(fkey), source=f"{f.path.name}:{fkey}",
                           row_loader=f.row_loader(fkey))
            label = "float"
        else:
            hint = ("set tie_word_embeddings to true in config.json if the LM head shares the embedding"
                    if name == "lm_head" else None)
            raise RomacError(f"tensor {fkey!r} (or {qkey!r}) is missing from the checkpoint", where=str(root), hint=hint)
        ck.check_zero_bias(f"{prefix}.bias")
        weights[name] = h
        formats[label] = formats.get(label, 0) + 1
    ignored = []
    for key in ck.key_files:
        if key in ck.used:
            continue
        base = key.rsplit(".", 1)[0]
        if base in modules and key.rsplit(".", 1)[1] in part_suffixes + (marker, "weight"):
            raise ck.bad(key, f"is a {kind} part of {base!r}, which is stored in another form")
        cname = canonical_name(key)
        if cname is not None and cname.endswith(".bias"):
            ck.check_zero_bias(key)   # a bias of a module romac does not take from this key (e.g. tied head)
        ignored.append(key)
    files = sorted({f.path.name for f in ck.key_files.values()})
    source = {"kind": kind, "path": str(root), "files": files,
              kind: {**summary, "tensor_formats": dict(sorted(formats.items())),
                     "requantized": dict(sorted(requantized.items()))},
              "ignored_tensors": sorted(ignored)}
    return make_model(config, weights, source=source)
