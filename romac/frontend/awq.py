"""Front-end for AWQ checkpoints in the GEMM layout (AutoAWQ ``save_quantized``, gptqmodel ``format="gemm"``;
``quant_method: awq``, ``version``/``format: gemm``).

Per quantized projection ``P`` (``in`` -> ``out`` features, ``G = in / group_size``; AWQ needs ``in % group_size
== 0`` and ``out % 8 == 0``):

=================  ==================  ====================================================================
key                dtype, shape        meaning
=================  ==================  ====================================================================
``P.qweight``      I32 [in, out/8]     4-bit codes packed along the OUTPUT, eight a word, nibble ``i`` holding
                                       column ``[0, 2, 4, 6, 1, 3, 5, 7][i]`` of its group of eight
``P.qzeros``       I32 [G, out/8]      zero points, same packing; true zeros (not zero - 1)
``P.scales``       F16 [G, out]        per-group scales
``P.bias``         F16 [out], opt.     must be all zero (romac has no bias)
=================  ==================  ====================================================================

``W[k, n] = scales[k // gs, n] * (q[k, n] - z[k // gs, n])``; the torch weight is ``W`` transposed. Groups run
along the input, contiguous: a 4-bit AWQ weight with fp16 scales is exactly romac's ``int4`` of the same group size,
and its codes reach ROM untouched.

**Dequantization** (``load()``): AutoAWQ's ``dequantize_gemm`` and gptqmodel's ``AwqTorchLinear`` compute
``(q - z) * scales`` with int8 codes and float16 scales: the exact product rounded once to float16 (and both run the
layer's matmul in float16, casting float32 activations down). ``load_exact()`` is the chip's ``float32(s) * (q -
z)``: they differ by at most half a float16 ulp.

``zero_point: false`` (symmetric AWQ) has no GEMM layout in AutoAWQ (its packer needs zeros); a checkpoint that
says so but stores ``qzeros`` is read with them, one without is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from romac.errors import RomacError
from romac.frontend.hf_config import read_quantization_config
from romac.frontend.qpack import (
    AffineWeight,
    QCheckpoint,
    QuantParts,
    affine_spec,
    check_scales,
    scales_as_fp16,
    unpack_awq,
    walk_checkpoint,
)

__all__ = ["load_awq_checkpoint", "describe_awq", "is_awq_config", "awq_settings"]

f32 = np.float32
AWQ_FORMATS = ("gemm",)
_OTHER_LAYOUTS = ("gemv", "gemv_fast", "marlin", "exllama", "ipex", "llm-awq")


def is_awq_config(qc: Any) -> bool:
    return isinstance(qc, dict) and qc.get("quant_method") == "awq"


def awq_settings(qc: Any, where: str) -> dict[str, Any]:
    if not isinstance(qc, dict):
        raise RomacError("quantization_config is not an object", where=where)
    if qc.get("quant_method") != "awq":
        raise RomacError(f"quant_method is {qc.get('quant_method')!r}, not 'awq'", where=where)
    for name in ("bits", "group_size"):
        if name not in qc and not (name == "bits" and "w_bit" in qc) and not (name == "group_size" and "q_group_size" in qc):
            raise RomacError(f"field {name!r} is missing", where=where, hint="AWQ configs carry bits and group_size")
    bits = qc.get("bits", qc.get("w_bit"))
    gs = qc.get("group_size", qc.get("q_group_size"))
    if bits != 4 or isinstance(bits, bool):
        raise RomacError(f"field 'bits' is {bits!r}", where=where, hint="AWQ's GEMM layout stores 4-bit codes only")
    if isinstance(gs, bool) or not isinstance(gs, int) or (gs != -1 and gs < 1):
        raise RomacError(f"field 'group_size' is {gs!r}", where=where, hint="a positive size, or -1 (per channel)")
    fmts = {str(qc[k]).lower() for k in ("version", "format") if qc.get(k) is not None}
    if len(fmts) > 1:
        raise RomacError(f"fields 'version' and 'format' disagree ({sorted(fmts)})", where=where)
    fmt = fmts.pop() if fmts else "gemm"
    if fmt not in AWQ_FORMATS:
        hint = ("romac reads the GEMM layout; re-export with version='gemm'" if fmt in _OTHER_LAYOUTS
                else "AWQ layouts are gemm, gemv, gemv_fast, marlin")
        raise RomacError(f"AWQ version/format is {fmt!r}", where=where, hint=hint)
    zp = qc.get("zero_point", True)
    if not isinstance(zp, bool):
        raise RomacError(f"field 'zero_point' must be true or false, got {zp!r}", where=where)
    if qc.get("modules_to_not_convert") is not None and not isinstance(qc.get("modules_to_not_convert"), list):
        raise RomacError("field 'modules_to_not_convert' must be a list or null", where=where)
    return {"bits": 4, "group_size": gs, "version": fmt, "zero_point": zp}


@dataclass(frozen=True)
class _AwqParts:
    ck_files: Mapping[str, Any]
    prefix: str
    shape: tuple[int, int]

    def raw(self, part: str) -> np.ndarray:
        return self.ck_files[f"{self.prefix}.{part}"].raw(f"{self.prefix}.{part}")

    def __call__(self, r0: int, r1: int):
        w0, w1 = r0 // 8, -(-r1 // 8)
        codes = unpack_awq(self.raw("qweight")[:, w0:w1])[:, r0 - 8 * w0: r1 - 8 * w0].T   # [rows, in]
        zeros = unpack_awq(self.raw("qzeros")[:, w0:w1])[:, r0 - 8 * w0: r1 - 8 * w0].T
        f = self.ck_files[f"{self.prefix}.scales"]
        scales = np.asarray(f.load(f"{self.prefix}.scales"), f32)[:, r0:r1].T
        return np.ascontiguousarray(codes), np.ascontiguousarray(zeros), np.ascontiguousarray(scales), None


def _awq_weight(ck: QCheckpoint, st: Mapping[str, Any], name: str, prefix: str, want: tuple[int, int]) -> AffineWeight:
    out, inn = want
    gs = inn if st["group_size"] == -1 else st["group_size"]
    of = f"{prefix}.qweight"
    if inn % gs:
        raise ck.bad(of, f"has {inn} input features, not a multiple of group_size {gs}",
                     hint="AWQ's GEMM layout needs whole groups (in_features % group_size == 0)")
    if out % 8:
        raise ck.bad(of, f"has {out} output features, not a multiple of 8 (AWQ packs eight outputs a word)")
    groups = inn // gs
    why = f"for {list(want)} (out, in) with group_size {st['group_size']}"
    ck.need(of, ("I32",), (inn, out // 8), of, why)
    if not ck.has(f"{prefix}.qzeros"):
        raise RomacError(f"tensor {prefix + '.qzeros'!r} is missing"
                         + (" (zero_point is false: AutoAWQ's GEMM layout has no symmetric form)"
                            if not st["zero_point"] else ""), where=ck.where(of))
    ck.need(f"{prefix}.qzeros", ("I32",), (groups, out // 8), of, why)
    sf = ck.need(f"{prefix}.scales", ("F16", "BF16", "F32"), (groups, out), of, why)
    scale_dtype = sf.info(f"{prefix}.scales").dtype
    scales = np.asarray(sf.load(f"{prefix}.scales"), f32)
    check_scales(scales, lambda what: ck.bad(f"{prefix}.scales", what))
    reason = None if scales_as_fp16(scales) is not None else f"{scale_dtype} scales that float16 cannot hold exactly"
    grid = {"method": "awq", "bits": 4, "group_size": gs, "version": st["version"], "zero_point": st["zero_point"],
            "scale_dtype": scale_dtype}
    f = ck.key_files[of]
    return AffineWeight(name, want, affine_spec(4, gs) if reason is None else None,
                        QuantParts(_AwqParts(ck.files_of(prefix), prefix, want)), source=f"{f.path.name}:{of}", grid=grid,
                        requantize_reason=reason,
                        library_dequant=f"{scale_dtype.lower()}((q - z) * scales) (AutoAWQ dequantize_gemm / "
                                        "gptqmodel AwqTorchLinear)",
                        library_dtype="F16")


def load_awq_checkpoint(root: Path, raw_cfg: Mapping[str, Any], key_files: Mapping[str, Any] | None = None):
    """An AWQ (GEMM) HF checkpoint directory as a lazily loaded IR Model (see the module doc)."""
    root = Path(root)
    where = f"{root / 'config.json'} quantization_config"
    st = awq_settings(raw_cfg.get("quantization_config"), where)
    return walk_checkpoint(root, raw_cfg, key_files, "awq", "qweight",
                           lambda ck, name, prefix, want: _awq_weight(ck, st, name, prefix, want),
                           ("qzeros", "scales"), dict(st))


def describe_awq(directory: str | Path) -> str | None:
    qc = read_quantization_config(directory)
    if not is_awq_config(qc):
        return None
    try:
        st = awq_settings(qc, str(directory))
    except RomacError:
        return f"AWQ checkpoint {directory} (its quantization_config is not readable)"
    return f"AWQ checkpoint {directory} (GEMM, int4, group {st['group_size']}; stored codes go to ROM as they are)"
