"""The quantize / dequantize arithmetic of every number format (their facts: :mod:`romac.spec.formats`), bit-exact
with the format's peer library where there is one: nf4/fp4 with bitsandbytes (``bnb``), int8/4/2 the ROMA affine
grid (``affine``), fp16/fp32 (``raw``); SRAM element precisions (``elements``); codes to bytes (``bits``) and to
tiles (``tiles``). Pure numpy (+ ml_dtypes for FP8); torch and bitsandbytes are test-only references.
"""

from __future__ import annotations

from romac.codecs.affine import AffineCodec
from romac.codecs.base import Codec, QuantTensor
from romac.codecs.bnb import Bnb4bitCodec
from romac.codecs.elements import fp8_e4m3_decode, fp8_e4m3_encode, fp16_decode, fp16_encode
from romac.codecs.raw import RawCodec
from romac.spec.formats import WeightFormat, weight_format

__all__ = ["AffineCodec", "Bnb4bitCodec", "Codec", "QuantTensor", "RawCodec", "codec_for", "get_codec",
           "fp8_e4m3_decode", "fp8_e4m3_encode", "fp16_decode", "fp16_encode"]

_BY_FAMILY: dict[str, type[Codec]] = {"affine": AffineCodec, "bnb4": Bnb4bitCodec, "raw": RawCodec}


def codec_for(fmt: WeightFormat) -> Codec:
    """The codec that computes a format."""
    return _BY_FAMILY[fmt.family](fmt)


def get_codec(format: str, group_size: int = 128, blocksize: int = 64, double_quant: bool = True,
              bnb_threads: int = 1, cpu_repacked: bool = False) -> Codec:
    """The codec for ``format`` (a spec's keys as keyword arguments: ``get_codec(**region.codec)``); see
    :func:`romac.spec.formats.weight_format` for which parameter each format takes."""
    return codec_for(weight_format(format, group_size, blocksize, double_quant, bnb_threads, cpu_repacked))
