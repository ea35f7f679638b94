"""Pass ``quantize``: choose the number format of every stored tensor.

Requires: a Model whose ``weights`` cover ``romac.ir.stored_tensors(config)``.
Guarantees: ``tensors[name]`` has ``codec`` (a spec for ``romac.codecs.get_codec``), ``kind`` ("matrix" or
"vector") and ``shape`` for every stored tensor. Projections take the target's ``weights`` format (or
``--quant``), embedding and untied LM head the target's ``embedding`` format (or ``--quant-embedding``), norm
gains the target's ``norms`` format, and the RoPE table fp32. A weight that arrives already quantized (a
bitsandbytes checkpoint) keeps its own format, so its codes reach ROM untouched.
No weight data is read: the codes are computed by the emitter, one matrix at a time.
"""

from __future__ import annotations

from romac.codecs import get_codec
from romac.errors import RomacError
from romac.ir import ROPE_TABLE, Model, stored_tensors
from romac.targets import WEIGHT_FORMATS, Target


def format_spec(fmt: str, target: Target) -> dict:
    """The codec spec of a format name as this target uses it (group size from the target)."""
    if fmt not in WEIGHT_FORMATS:
        raise RomacError(f"unknown weight format {fmt!r}", where="--quant", hint=f"choose one of {', '.join(WEIGHT_FORMATS)}")
    return get_codec(fmt, group_size=target.group_size).spec()


def quantize(model: Model, target: Target, options) -> Model:
    cfg = model.config
    proj = format_spec(options.quant or target.weights, target)
    embed = format_spec(options.quant_embedding or target.embedding, target)
    norm = format_spec(target.norms, target)
    updates = {}
    for name in stored_tensors(cfg):
        handle = model.weights[name]
        shape = tuple(handle.shape)
        preset = getattr(handle, "codec_spec", None)
        if preset is not None:
            spec = dict(preset)
        elif name == ROPE_TABLE:
            spec = get_codec("fp32").spec()
        elif len(shape) == 1:
            spec = norm
        elif name in ("embed_tokens", "lm_head"):
            spec = embed
        else:
            spec = proj
        updates[name] = {"codec": spec, "kind": "vector" if len(shape) == 1 else "matrix", "shape": shape}
    return model.with_tensors(updates)
