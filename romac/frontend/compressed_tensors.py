"""Front-end for compressed-tensors ``pack-quantized`` checkpoints (llm-compressor ``save_pretrained``;
``quant_method: compressed-tensors``, ``format: pack-quantized``), integer weight-only schemes (W4A16, W8A16...).

Per quantized projection ``P`` (``in`` -> ``out``; ``G = in / group_size`` for the group strategy, 1 for channel):

=========================  =======================  ========================================================
key                        dtype, shape             meaning
=========================  =======================  ========================================================
``P.weight_packed``        I32 [out, ceil(in*b/32)] codes along the INPUT, LSB-first bit stream per row
                                                    (compressed-tensors >= 0.12; before: 32 // b fields a word,
                                                    the same for b = 2, 4, 8), each stored as ``q + 2^(b-1)``
``P.weight_scale``         F16/BF16/F32 [out, G]    per-group (or [out, 1] per-channel) scales
``P.weight_zero_point``    I32 [ceil(out*b/32), G]  asymmetric only: zero points packed along the OUTPUT, same
                                                    offset (older versions: I8 [out, G], not packed)
``P.weight_shape``         I32/I64 [2]              ``[out, in]``
``P.weight_g_idx``         I32 [in], optional       act-order groups (compressed-tensors < 0.20)
=========================  =======================  ========================================================

With ``code = q + 2^(b-1)`` and ``zero = zp + 2^(b-1)`` (``2^(b-1)`` when symmetric), ``W = s * (code - zero)``:
romac's affine grid, so int2/int4/int8 with contiguous groups and float16-exact scales reach ROM untouched.

**Dequantization** (``load()``): ``compressed_tensors...forward._dequantize`` computes ``(q.to(s.dtype) -
zp.to(s.dtype)) * s`` in the dtype of the scale *parameter*. transformers (``CompressedTensorsHfQuantizer``) loading
the checkpoint at float32 creates float32 scale parameters, so its decompressed weights are the exact products:
``load()`` returns those (== ``load_exact()``, the chip's ``float32(s) * (code - zero)``). Run on the stored tensors
(its compressor's ``decompress``, or a model loaded at float16 / bfloat16), the product is rounded once to the scale
dtype: ``load_rounded(grid["scale_dtype"])``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from romac.errors import RomacError
from romac.frontend.hf_config import read_quantization_config
from romac.frontend.qpack import (
    ROM_BITS,
    AffineWeight,
    QCheckpoint,
    QuantParts,
    affine_spec,
    check_scales,
    scales_as_fp16,
    unpack_dense,
    unpack_fields,
    walk_checkpoint,
)

__all__ = ["load_compressed_tensors_checkpoint", "describe_compressed_tensors", "is_compressed_tensors_config",
           "ct_schemes"]

f32 = np.float32
_STRATEGIES = ("group", "channel", "tensor")


def is_compressed_tensors_config(qc: Any) -> bool:
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


@dataclass(frozen=True)
class CtScheme:
    group: str          # the config_groups key
    targets: tuple[str, ...]
    bits: int
    symmetric: bool
    strategy: str
    group_size: int | None
    actorder: Any
    format: str


def _targets(v: Any, where: str, field: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise RomacError(f"field {field!r} must be a list of strings, got {v!r}", where=where)
    return tuple(v)


def ct_schemes(qc: Any, where: str) -> tuple[list[CtScheme], tuple[str, ...]]:
    """The weight schemes of a compressed-tensors ``quantization_config`` and its ``ignore`` list, checked."""
    if not isinstance(qc, dict):
        raise RomacError("quantization_config is not an object", where=where)
    if qc.get("quant_method") != "compressed-tensors":
        raise RomacError(f"quant_method is {qc.get('quant_method')!r}, not 'compressed-tensors'", where=where)
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise RomacError("field 'config_groups' is missing or empty", where=where,
                         hint="compressed-tensors configs list their schemes under config_groups")
    top_format = qc.get("format")
    status = qc.get("quantization_status", "compressed")
    if status not in ("compressed", None):
        raise RomacError(f"quantization_status is {status!r}: the weights are not stored compressed", where=where,
                         hint="save with llm-compressor's save_compressed=True (the default)")
    if qc.get("transform_config"):
        raise RomacError("has a transform_config (online rotations such as SpinQuant / QuIP): the stored weights are "
                         "only valid with those transforms applied at run time, which romac does not do", where=where)
    sparsity = qc.get("sparsity_config")
    if sparsity and (sparsity.get("format") not in (None, "dense") if isinstance(sparsity, dict) else True):
        raise RomacError(f"sparsity_config {sparsity!r}: sparse compression is not supported", where=where)
    out = []
    for gname, g in groups.items():
        w = f"{where} config_groups.{gname}"
        if not isinstance(g, dict):
            raise RomacError("is not an object", where=w)
        weights = g.get("weights")
        if weights is None:
            continue   # an activation-only group: nothing for the weights
        if not isinstance(weights, dict):
            raise RomacError("field 'weights' is not an object", where=w)
        if g.get("input_activations") or g.get("output_activations"):
            raise RomacError("quantizes activations too; romac takes weight-only schemes (W4A16, W8A16...)", where=w)
        fmt = g.get("format") or top_format
        if fmt is None:
            raise RomacError("has no 'format' (nor has the quantization_config)", where=w)
        for name in ("num_bits",):
            if name not in weights:
                raise RomacError(f"field 'weights.{name}' is missing", where=w)
        bits = weights["num_bits"]
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise RomacError(f"field 'weights.num_bits' is {bits!r}", where=w,
                             hint="pack-quantized packs 1..8-bit integers into int32")
        if weights.get("type", "int") != "int":
            raise RomacError(f"field 'weights.type' is {weights.get('type')!r}; only integer weights are read", where=w)
        strategy = weights.get("strategy") or ("group" if weights.get("group_size") else "tensor")
        if strategy not in _STRATEGIES:
            raise RomacError(f"field 'weights.strategy' is {strategy!r}", where=w,
                             hint=f"romac reads the {', '.join(_STRATEGIES)} strategies")
        gs = weights.get("group_size")
        if strategy == "group" and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1):
            raise RomacError(f"field 'weights.group_size' is {gs!r}; the group strategy needs a positive size", where=w)
        if weights.get("dynamic"):
            raise RomacError("field 'weights.dynamic' is true: dynamic weight quantization stores no scales", where=w)
        sym = weights.get("symmetric", True)
        if not isinstance(sym, bool):
            raise RomacError(f"field 'weights.symmetric' must be true or false, got {sym!r}", where=w)
        targets = _targets(g.get("targets"), w, "targets")
        if not targets:
            raise RomacError("field 'targets' is missing or empty", where=w)
        out.append(CtScheme(gname, targets, bits, sym, strategy, gs if strategy == "group" else None,
                            weights.get("actorder"), fmt))
    return out, _targets(qc.get("ignore"), where, "ignore")


def _matches(target: str, module: str) -> int:
    """How specifically ``target`` names ``module``: 3 exact name, 2 regex, 1 the Linear class, 0 not at all."""
    if target == module:
        return 3
    if target.startswith("re:"):
        return 2 if re.match(target[3:], module) else 0
    return 1 if target == "Linear" else 0


def _scheme_for(schemes: list[CtScheme], ignore: tuple[str, ...], module: str) -> CtScheme | None:
    if any(_matches(t, module) for t in ignore):
        return None
    best = max(((max(_matches(t, module) for t in s.targets), i) for i, s in enumerate(schemes)), default=(0, -1))
    return schemes[best[1]] if best[0] else None


@dataclass(frozen=True)
class _CtParts:
    ck_files: Mapping[str, Any]
    prefix: str
    bits: int
    shape: tuple[int, int]
    groups: int
    dense: bool
    zero: str            # "sym", "packed" or "int8"
    col_group: np.ndarray | None

    def raw(self, part: str) -> np.ndarray:
        return self.ck_files[f"{self.prefix}.{part}"].raw(f"{self.prefix}.{part}")

    def __call__(self, r0: int, r1: int):
        out, inn = self.shape
        b, off = self.bits, 1 << (self.bits - 1)
        unpack = unpack_dense if self.dense else unpack_fields
        codes = unpack(self.raw("weight_packed")[r0:r1], b, inn, axis=1)
        f = self.ck_files[f"{self.prefix}.weight_scale"]
        scales = np.asarray(f.load(f"{self.prefix}.weight_scale"), f32).reshape(-1, self.groups)
        scales = np.broadcast_to(scales, (out, self.groups))[r0:r1]
        if self.zero == "sym":
            zeros = np.full((r1 - r0, self.groups), off, np.uint8)
        elif self.zero == "packed":
            zeros = unpack(self.raw("weight_zero_point"), b, out, axis=0)[r0:r1]
        else:
            zp = np.asarray(self.raw("weight_zero_point")).astype(np.int64).reshape(-1, self.groups)
            zeros = (np.broadcast_to(zp, (out, self.groups))[r0:r1] + off).astype(np.uint8)
        return (np.ascontiguousarray(codes), np.ascontiguousarray(zeros), np.ascontiguousarray(scales),
                self.col_group)


def _ct_weight(ck: QCheckpoint, schemes, ignore, name: str, prefix: str, want: tuple[int, int]) -> AffineWeight:
    out, inn = want
    of = f"{prefix}.weight_packed"
    s = _scheme_for(schemes, ignore, prefix)
    if s is None:
        raise ck.bad(of, "is packed, but no config_groups entry targets this module (or 'ignore' names it)")
    if s.format != "pack-quantized":
        raise ck.bad(of, f"belongs to config group {s.group!r} of format {s.format!r}",
                     hint="romac reads the pack-quantized format")
    b = s.bits
    gs = s.group_size if s.strategy == "group" else inn
    if inn % gs:
        raise ck.bad(of, f"has {inn} input features, not a multiple of group_size {gs}",
                     hint="compressed-tensors' group strategy needs whole groups")
    groups = inn // gs
    dense_w, legacy_w = -(-inn * b // 32), -(-inn // (32 // b))
    pf = ck.need(of, ("I32",), None, of)
    width = pf.info(of).shape
    if len(width) != 2 or width[0] != out or width[1] not in (dense_w, legacy_w):
        raise ck.bad(of, f"shape is {list(width)}, expected [{out}, {dense_w}]"
                     + (f" (or [{out}, {legacy_w}], the pre-0.12 packing)" if legacy_w != dense_w else "")
                     + f" for {list(want)} (out, in) at {b} bits")
    dense = width[1] == dense_w
    shp = ck.need(f"{prefix}.weight_shape", ("I32", "I64"), (2,), of)
    if [int(v) for v in shp.raw(f"{prefix}.weight_shape")] != [out, inn]:
        raise ck.bad(f"{prefix}.weight_shape", f"is {shp.raw(prefix + '.weight_shape').tolist()}, config.json implies "
                     f"{[out, inn]}")
    scale_shape = {"group": (out, groups), "channel": (out, 1), "tensor": None}[s.strategy]
    sf = ck.need(f"{prefix}.weight_scale", ("F16", "BF16", "F32"), scale_shape, of,
                 f"for {list(want)} (out, in) with the {s.strategy} strategy" + (f", group_size {gs}" if s.group_size else ""))
    if s.strategy == "tensor" and sf.info(f"{prefix}.weight_scale").shape not in ((), (1,)):
        raise ck.bad(f"{prefix}.weight_scale", f"shape is {list(sf.info(prefix + '.weight_scale').shape)}, expected [1] "
                     "for the tensor strategy")
    scale_dtype = sf.info(f"{prefix}.weight_scale").dtype
    scales = np.asarray(sf.load(f"{prefix}.weight_scale"), f32)
    check_scales(scales, lambda what: ck.bad(f"{prefix}.weight_scale", what))
    zkey = f"{prefix}.weight_zero_point"
    zg = scale_shape[1] if scale_shape else 1
    if s.symmetric:
        zero = "sym"
        if ck.has(zkey):   # older versions wrote zeros for symmetric schemes too: they must be 0
            zf = ck.need(zkey, ("I8", "I32", "I64", "F16", "BF16", "F32"), None, of)
            if np.any(np.asarray(zf.raw(zkey)) != 0):
                raise ck.bad(zkey, "holds non-zero zero points, but the scheme is symmetric")
    else:
        if not ck.has(zkey):
            raise RomacError(f"tensor {zkey!r} is missing (the scheme of group {s.group!r} is asymmetric)",
                             where=ck.where(of))
        zinfo = ck.key_files[zkey].info(zkey)
        zpacked = (-(-out * b // 32) if dense else -(-out // (32 // b)), zg)
        if zinfo.dtype == "I32" and tuple(zinfo.shape) == zpacked and s.strategy != "tensor":
            zero = "packed"
        elif zinfo.dtype in ("I8", "I32", "I64") and tuple(zinfo.shape) in ((out, zg), (1,), ()):
            zero = "int8"
            zp = np.asarray(ck.raw(zkey))
            lo, hi = -(1 << (b - 1)), (1 << (b - 1)) - 1
            if zp.size and (zp.min() < lo or zp.max() > hi):
                raise ck.bad(zkey, f"holds zero points {int(zp.min())}..{int(zp.max())}, outside {lo}..{hi} "
                             f"({b}-bit signed)")
        else:
            raise ck.bad(zkey, f"is {zinfo.dtype} {list(zinfo.shape)}, expected I32 {list(zpacked)} (packed along the "
                         f"output) or I8 {[out, zg]}")
        ck.used.add(zkey)
    col_group = None
    gkey = f"{prefix}.weight_g_idx"
    if ck.has(gkey):
        gf = ck.need(gkey, ("I32", "I64"), (inn,), of, "(one group per input column)")
        g = np.asarray(gf.raw(gkey)).astype(np.int64)
        if g.size and (g.min() < 0 or g.max() >= groups):
            raise ck.bad(gkey, f"holds group {int(g.min() if g.min() < 0 else g.max())}, outside 0..{groups - 1}")
        if not np.array_equal(g, np.arange(inn) // gs):
            if not (np.bincount(g, minlength=groups) == gs).all():
                raise ck.bad(gkey, f"does not give every group {gs} columns")
            col_group = g
    reason = None
    if b not in ROM_BITS:
        reason = f"{b}-bit codes: romac's affine formats are int2, int4 and int8"
    elif col_group is not None:
        reason = f"act-order weight_g_idx: groups are scattered input columns, ROM groups are contiguous runs of {gs}"
    elif scales_as_fp16(scales) is None:
        reason = f"{scale_dtype} scales that float16 cannot hold exactly"
    grid = {"method": "compressed-tensors", "bits": b, "group_size": gs, "sym": s.symmetric, "strategy": s.strategy,
            "config_group": s.group, "scale_dtype": scale_dtype, "packing": "dense" if dense else "fields",
            "act_order_g_idx": col_group is not None}
    f = ck.key_files[of]
    return AffineWeight(name, want, affine_spec(b, gs) if reason is None else None,
                        QuantParts(_CtParts(ck.files_of(prefix), prefix, b, want, groups, dense, zero, col_group)),
                        source=f"{f.path.name}:{of}", grid=grid, requantize_reason=reason,
                        library_dequant="float32((q - zp) * scale) (compressed-tensors _dequantize at float32, as transformers "
                                        f"loads it; on the stored {scale_dtype} tensors: load_rounded({scale_dtype!r}))",
                        library_dtype="F32")


def load_compressed_tensors_checkpoint(root: Path, raw_cfg: Mapping[str, Any],
                                       key_files: Mapping[str, Any] | None = None):
    """A compressed-tensors pack-quantized HF checkpoint as a lazily loaded IR Model (see the module doc)."""
    root = Path(root)
    where = f"{root / 'config.json'} quantization_config"
    qc = raw_cfg.get("quantization_config")
    schemes, ignore = ct_schemes(qc, where)
    summary = {"format": qc.get("format"), "version": qc.get("version"),
               "schemes": {s.group: {"num_bits": s.bits, "strategy": s.strategy, "group_size": s.group_size,
                                     "symmetric": s.symmetric} for s in schemes}}
    return walk_checkpoint(root, raw_cfg, key_files, "compressed-tensors", "weight_packed",
                           lambda ck, name, prefix, want: _ct_weight(ck, schemes, ignore, name, prefix, want),
                           ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"), summary)


def describe_compressed_tensors(directory: str | Path) -> str | None:
    qc = read_quantization_config(directory)
    if not is_compressed_tensors_config(qc):
        return None
    try:
        schemes, _ = ct_schemes(qc, str(directory))
    except RomacError:
        return f"compressed-tensors checkpoint {directory} (its quantization_config is not readable)"
    parts = ", ".join(f"int{s.bits} {s.strategy}{' ' + str(s.group_size) if s.group_size else ''}"
                      f"{'' if s.symmetric else ' asym'}" for s in schemes)
    return f"compressed-tensors checkpoint {directory} ({qc.get('format')}: {parts})"
