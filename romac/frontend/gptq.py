"""Front-end for GPTQ checkpoints (AutoGPTQ / optimum / gptqmodel ``save``; ``quant_method: gptq``).

Per quantized projection ``P`` (torch ``nn.Linear`` of ``in`` -> ``out`` features, ``G = ceil(in / group_size)``):

=================  ===========================  ===============================================================
key                dtype, shape                 meaning
=================  ===========================  ===============================================================
``P.qweight``      I32 [ceil(in*b/32), out]     codes packed along the INPUT, an LSB-first bit stream per output
                                                column (32/b fields a word for b = 2, 4, 8; b = 3 splits values
                                                across words)
``P.qzeros``       I32 [G, ceil(out*b/32)]      zero points packed along the OUTPUT, same bit order; v1
                                                (``checkpoint_format: gptq``) stores zero - 1, gptq_v2 the zero
``P.scales``       F16 [G, out]                 per-group scales (BF16/F32 accepted)
``P.g_idx``        I32 [in]                     group of each input column: ``k // group_size`` unless act-order
``P.bias``         F16 [out], optional          must be all zero (romac has no bias)
=================  ===========================  ===============================================================

``W[n, k] = scales[g[k], n] * (q[k, n] - z[g[k], n])`` and the torch weight is ``W``; romac's matrix is
``[out, in]``, so everything is transposed on reading.

**Zero points of v1 checkpoints.** AutoGPTQ writes ``zero - 1`` per field (a zero of 0 becomes -1, which sets every
higher bit of its word: the fields above it read back as 0), and reads ``(field + 1) & (2^b - 1)`` per field;
gptqmodel writes v1 by subtracting ``0x11111111`` (4-bit) from whole words (with borrow) and reads them by adding it
back (with carry), which restores its own zeros exactly. The two readings differ only in words holding a wrapped
field (stored ``2^b - 1``). ``v1_zeros="auto"`` (the default) reads a checkpoint the way its writer does: whole-word
arithmetic when ``quantization_config.meta.quantizer`` names gptqmodel, per-field otherwise; the count of wrapped
fields is in ``grid["v1_wrapped_zeros"]``. 3-bit zeros are per-field in both libraries.

**Dequantization** (``load()``): the libraries compute ``scales[g] * (q - z)`` in the scale dtype: gptqmodel's
``TorchLinear`` (what transformers 5 loads GPTQ with on the CPU) at float16 (its only float dtypes are float16
and bfloat16; the CPU "auto" dtype is bfloat16, which first rounds the float16 scales to bfloat16), AutoGPTQ's
torch path in float16 too: the exact product rounded once to float16. The chip computes the exact
``float32(s) * (q - z)`` (``load_exact()``); the two differ by at most half a float16 ulp (relative 2^-11).

**act-order.** A ``g_idx`` equal to ``k // group_size`` (no act order, or ``static_groups``) keeps the grid: the
codes go to ROM untouched. A permuted ``g_idx`` (``desc_act`` without ``static_groups``) makes each group a
scattered set of input columns; ROM groups are contiguous runs, so such a weight has ``codec_spec None`` and is
re-quantized from its exact dequantized values. (``load_quantized_permuted()`` gives the exact codes on contiguous
groups of the column-permuted matrix, for a future compile that gathers projection inputs.)
"""

from __future__ import annotations

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
    walk_checkpoint,
)

__all__ = ["GPTQ_BITS", "GptqSettings", "gptq_settings", "load_gptq_checkpoint", "describe_gptq", "is_gptq_config"]

f32 = np.float32
GPTQ_BITS = (2, 3, 4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")
_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_V1_ZEROS = ("auto", "field", "word")


def is_gptq_config(qc: Any) -> bool:
    return isinstance(qc, dict) and qc.get("quant_method") == "gptq"


@dataclass(frozen=True)
class GptqSettings:
    bits: int
    group_size: int          # -1: one group per row (per-channel)
    desc_act: bool
    sym: bool
    static_groups: bool
    checkpoint_format: str   # gptq (v1) or gptq_v2
    quantizer: tuple[str, ...]
    v1_zeros: str            # field or word (resolved from auto)


def _bool(qc: Mapping[str, Any], name: str, default: bool, where: str) -> bool:
    v = qc.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RomacError(f"field {name!r} must be true or false, got {v!r}", where=where)
    return v


def gptq_settings(qc: Any, where: str, v1_zeros: str = "auto") -> GptqSettings:
    """Check a GPTQ ``quantization_config`` and return what the reader needs (one-line errors naming the field)."""
    if not isinstance(qc, dict):
        raise RomacError("quantization_config is not an object", where=where)
    if qc.get("quant_method") != "gptq":
        raise RomacError(f"quant_method is {qc.get('quant_method')!r}, not 'gptq'", where=where)
    for name in ("bits", "group_size"):
        if name not in qc:
            raise RomacError(f"field {name!r} is missing", where=where, hint="GPTQ configs carry bits and group_size")
    bits, gs = qc["bits"], qc["group_size"]
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in GPTQ_BITS:
        raise RomacError(f"field 'bits' is {bits!r}", where=where,
                         hint=f"GPTQ's int32 packing takes {', '.join(map(str, GPTQ_BITS))} bits")
    if isinstance(gs, bool) or not isinstance(gs, int) or (gs != -1 and gs < 1):
        raise RomacError(f"field 'group_size' is {gs!r}", where=where, hint="a positive size, or -1 (per channel)")
    fmts = {qc[k].lower() if isinstance(qc.get(k), str) else qc.get(k)
            for k in ("checkpoint_format", "format") if qc.get(k) is not None}
    if len(fmts) > 1:
        raise RomacError(f"fields 'checkpoint_format' and 'format' disagree ({sorted(map(str, fmts))})", where=where)
    fmt = fmts.pop() if fmts else "gptq"
    if fmt not in GPTQ_FORMATS:
        raise RomacError(f"checkpoint_format is {fmt!r}", where=where,
                         hint="romac reads the gptq (v1) and gptq_v2 layouts; re-save with gptqmodel format='gptq'")
    pack = qc.get("pack_dtype", "int32")
    if pack not in (None, "int32", "torch.int32"):
        raise RomacError(f"field 'pack_dtype' is {pack!r}; only int32 words are read", where=where)
    if qc.get("rotation") or (isinstance(qc.get("meta"), dict) and qc["meta"].get("rotation")):
        raise RomacError(f"field 'rotation' is {qc.get('rotation') or qc['meta'].get('rotation')!r}: rotated "
                         "(QuaRot/SpinQuant-style) GPTQ weights need the rotation at run time", where=where,
                         hint="quantize without rotation")
    if qc.get("dynamic"):
        raise RomacError("per-module 'dynamic' overrides are not supported", where=where,
                         hint="quantize every projection with one bits / group_size")
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    quantizer = meta.get("quantizer") or []
    quantizer = tuple(str(q) for q in (quantizer if isinstance(quantizer, list) else [quantizer]))
    if v1_zeros not in _V1_ZEROS:
        raise ValueError(f"v1_zeros must be one of {_V1_ZEROS}")
    if v1_zeros == "auto":
        v1_zeros = "word" if any(q.lower().startswith("gptqmodel") for q in quantizer) else "field"
    if bits == 3:
        v1_zeros = "field"   # both libraries shift 3-bit zeros per field (values straddle words)
    return GptqSettings(bits, gs, _bool(qc, "desc_act", False, where), _bool(qc, "sym", True, where),
                        _bool(qc, "static_groups", bool(meta.get("static_groups", False)), where), fmt, quantizer,
                        v1_zeros)


def _v1_word_add(bits: int) -> np.uint32:
    return np.uint32(sum(1 << (i * bits) for i in range(32 // bits)))


@dataclass(frozen=True)
class _GptqParts:
    """Reads one GPTQ module's stored tensors into romac's orientation (picklable)."""

    ck_files: Mapping[str, Any]
    prefix: str
    bits: int
    shape: tuple[int, int]
    groups: int
    v1: bool
    v1_zeros: str
    col_group: np.ndarray | None   # None: g_idx is k // group_size

    def _f(self, part: str):
        return self.ck_files[f"{self.prefix}.{part}"]

    def raw(self, part: str) -> np.ndarray:
        return self._f(part).raw(f"{self.prefix}.{part}")

    def zeros(self) -> np.ndarray:
        """True zero points [G, out] uint8."""
        words = self.raw("qzeros")
        out = self.shape[0]
        if self.v1 and self.v1_zeros == "word":
            words = (words.view(np.uint32) + _v1_word_add(self.bits)).view(np.int32)   # mod 2^32, as torch int32
        z = unpack_dense(words, self.bits, out, axis=1)
        if self.v1 and self.v1_zeros == "field":
            z = (z + np.uint8(1)) & np.uint8((1 << self.bits) - 1)
        return z

    def scales(self) -> np.ndarray:
        return np.asarray(self._f("scales").load(f"{self.prefix}.scales"), f32)

    def __call__(self, r0: int, r1: int):
        out, inn = self.shape
        codes = unpack_dense(self.raw("qweight")[:, r0:r1], self.bits, inn, axis=0).T
        zeros = self.zeros()[:, r0:r1].T
        scales = self.scales()[:, r0:r1].T
        return np.ascontiguousarray(codes), np.ascontiguousarray(zeros), np.ascontiguousarray(scales), self.col_group


def _gptq_weight(ck: QCheckpoint, st: GptqSettings, name: str, prefix: str, want: tuple[int, int]) -> AffineWeight:
    out, inn = want
    b = st.bits
    gs = inn if st.group_size == -1 else st.group_size
    groups = -(-inn // gs)
    of = f"{prefix}.qweight"
    why = f"for {list(want)} (out, in) with bits {b}, group_size {st.group_size}"
    ck.need(of, ("I32",), (-(-inn * b // 32), out), of, why)
    zf = ck.need(f"{prefix}.qzeros", ("I32",), (groups, -(-out * b // 32)), of, why)
    sf = ck.need(f"{prefix}.scales", ("F16", "BF16", "F32"), (groups, out), of, why)
    scale_dtype = sf.info(f"{prefix}.scales").dtype
    scales = np.asarray(sf.load(f"{prefix}.scales"), f32)
    check_scales(scales, lambda what: ck.bad(f"{prefix}.scales", what))

    col_group = None
    gkey = f"{prefix}.g_idx"
    contiguous = np.arange(inn) // gs
    if ck.has(gkey):
        gf = ck.need(gkey, ("I32", "I64", "I16"), None, of)
        g = np.asarray(gf.raw(gkey)).reshape(-1) if gf.info(gkey).shape else np.asarray([])
        if tuple(gf.info(gkey).shape) != (inn,):
            raise ck.bad(gkey, f"shape is {list(gf.info(gkey).shape)}, expected [{inn}] (one group per input column)")
        if g.size and (g.min() < 0 or g.max() >= groups):
            raise ck.bad(gkey, f"holds group {int(g.min() if g.min() < 0 else g.max())}, outside 0..{groups - 1}",
                         hint=f"{inn} input columns in groups of {gs} make {groups} groups")
        if not np.array_equal(g, contiguous):
            counts = np.bincount(g, minlength=groups)
            if not (counts[:-1] == gs).all() or counts[-1] != inn - gs * (groups - 1):
                raise ck.bad(gkey, f"gives its groups {counts.min()} to {counts.max()} columns; GPTQ groups hold "
                             f"{gs} columns each (the last {inn - gs * (groups - 1)})")
            col_group = g.astype(np.int64)
    elif st.desc_act and not st.static_groups:
        raise RomacError(f"tensor {gkey!r} is missing, and desc_act is true (act order needs it)", where=ck.where(of))

    parts = _GptqParts(ck.files_of(prefix), prefix, b, want, groups, st.checkpoint_format == "gptq", st.v1_zeros, col_group)
    wrapped = 0
    if st.checkpoint_format == "gptq":
        raw_z = unpack_dense(np.asarray(zf.raw(f"{prefix}.qzeros")), b, out, axis=1)
        wrapped = int(np.count_nonzero(raw_z == (1 << b) - 1))
    grid = {"method": "gptq", "bits": b, "group_size": gs, "sym": st.sym, "desc_act": st.desc_act,
            "static_groups": st.static_groups, "checkpoint_format": st.checkpoint_format, "scale_dtype": scale_dtype,
            "act_order_g_idx": col_group is not None}
    if st.checkpoint_format == "gptq":
        grid.update(v1_zeros=st.v1_zeros, v1_wrapped_zeros=wrapped)
    s16 = scales_as_fp16(scales)
    reason = None
    if b not in ROM_BITS:
        reason = f"{b}-bit codes: romac's affine formats are int2, int4 and int8"
    elif col_group is not None:
        reason = ("act-order g_idx: GPTQ groups are scattered input columns, ROM groups are contiguous runs "
                  f"of {gs}")
    elif s16 is None:
        reason = f"{scale_dtype} scales that float16 cannot hold exactly"
    spec = affine_spec(b, gs) if reason is None else None
    f = ck.key_files[of]
    return AffineWeight(name, want, spec, QuantParts(parts), source=f"{f.path.name}:{of}", grid=grid,
                        requantize_reason=reason,
                        library_dequant=f"{scale_dtype.lower()}(scales[g] * (q - z)) (gptqmodel TorchLinear / "
                                        "AutoGPTQ torch path)",
                        library_dtype="F16")


def load_gptq_checkpoint(root: Path, raw_cfg: Mapping[str, Any], key_files: Mapping[str, Any] | None = None,
                         *, v1_zeros: str = "auto"):
    """A GPTQ HF checkpoint directory as a lazily loaded IR Model (see the module doc)."""
    root = Path(root)
    where = f"{root / 'config.json'} quantization_config"
    st = gptq_settings(raw_cfg.get("quantization_config"), where, v1_zeros)
    summary = {"bits": st.bits, "group_size": st.group_size, "desc_act": st.desc_act, "sym": st.sym,
               "static_groups": st.static_groups, "checkpoint_format": st.checkpoint_format,
               "quantizer": list(st.quantizer)}
    if st.checkpoint_format == "gptq":
        summary["v1_zeros"] = st.v1_zeros
    return walk_checkpoint(root, raw_cfg, key_files, "gptq", "qweight",
                           lambda ck, name, prefix, want: _gptq_weight(ck, st, name, prefix, want),
                           ("qzeros", "scales", "g_idx"), summary)


def describe_gptq(directory: str | Path) -> str | None:
    """What ``romac compile`` says about a GPTQ checkpoint (config.json only); None if it is not one."""
    qc = read_quantization_config(directory)
    if not is_gptq_config(qc):
        return None
    try:
        st = gptq_settings(qc, str(directory))
    except RomacError:
        return f"GPTQ checkpoint {directory} (its quantization_config is not readable)"
    order = ", act order" if st.desc_act and not st.static_groups else ""
    keep = ("stored codes go to ROM as they are" if st.bits in ROM_BITS and not order
            else "dequantized and re-quantized")
    return (f"GPTQ checkpoint {directory} ({st.checkpoint_format}, int{st.bits}, group {st.group_size}, "
            f"{'sym' if st.sym else 'asym'}{order}; {keep})")
