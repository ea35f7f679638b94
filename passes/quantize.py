"""Pass ``quantize``: choose the number format of every stored tensor.

Requires: a Model whose ``weights`` cover ``romac.ir.stored_tensors(config)``.
Guarantees: ``tensors[name]`` has ``codec`` (a spec for ``romac.codecs.get_codec``), ``kind`` ("matrix" or
"vector") and ``shape`` for every stored tensor. Projections take the target's ``weights`` format (or
``--quant``), embedding and untied LM head the target's ``embedding`` format (or ``--quant-embedding``), norm
gains the target's ``norms`` format, and the RoPE table fp32. nf4/fp4 take the bitsandbytes parameters of
the options (``--bnb-blocksize``, ``--[no-]double-quant``, ``--bnb-threads``, ``--bnb-cpu-repacked``; default
64, on, 1, off).
A weight that arrives already quantized (a handle with ``codec_spec`` and ``load_quantized()``: a bitsandbytes
checkpoint) keeps its own format, so its codes reach ROM untouched — unless the user names a format for it
(``--quant`` / ``--quant-embedding``): then that spec is used, and the emitter passes the stored codes through
only if it is the stored one; any other format re-quantizes the dequantized values.
Passing the nf4/fp4 parameters when no tensor is quantized to nf4/fp4 from floats is an error (they would do
nothing).
No weight data is read: the codes are computed by the emitter, one matrix at a time.
"""

from __future__ import annotations

from romac.codecs import get_codec
from romac.errors import RomacError
from romac.ir import ROPE_TABLE, Model, stored_tensors
from romac.targets import WEIGHT_FORMATS, Target

_BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def format_spec(fmt: str, target: Target, options=None) -> dict:
    """The codec spec of a format name as this target (group size) and the options (nf4/fp4 parameters) use it."""
    if fmt not in WEIGHT_FORMATS:
        raise RomacError(f"unknown weight format {fmt!r}", where="--quant", hint=f"choose one of {', '.join(WEIGHT_FORMATS)}")
    blocksize = getattr(options, "bnb_blocksize", None) or 64
    double_quant = getattr(options, "double_quant", None)
    threads = getattr(options, "bnb_threads", None) or 1
    repacked = bool(getattr(options, "bnb_cpu_repacked", None))
    if fmt in ("nf4", "fp4") and blocksize not in _BNB_BLOCKSIZES:
        raise RomacError(f"invalid blocksize {blocksize}", where="--bnb-blocksize",
                         hint=f"bitsandbytes allows {', '.join(map(str, _BNB_BLOCKSIZES))}")
    if fmt in ("nf4", "fp4") and repacked and double_quant is False:
        raise RomacError("bitsandbytes' CPU repacking can be reproduced only with double quantization",
                         where="--bnb-cpu-repacked / --no-double-quant",
                         hint="without double quantization bitsandbytes saves a transposed bfloat16 absmax that "
                              "does not load back correctly; re-save the checkpoint before running inference")
    return get_codec(fmt, group_size=target.group_size, blocksize=blocksize,
                     double_quant=True if double_quant is None else double_quant, bnb_threads=threads,
                     cpu_repacked=repacked if fmt in ("nf4", "fp4") else False).spec()


def _check_bnb_options_used(options, specs: list[dict]) -> None:
    """The nf4/fp4 parameters must shape some tensor's format; otherwise the user expected an effect in vain."""
    given = [flag for flag, v in (("--bnb-blocksize", getattr(options, "bnb_blocksize", None)),
                                  ("--double-quant" if getattr(options, "double_quant", None) else "--no-double-quant",
                                   getattr(options, "double_quant", None)),
                                  ("--bnb-threads", getattr(options, "bnb_threads", None)),
                                  ("--bnb-cpu-repacked", getattr(options, "bnb_cpu_repacked", None) or None))
             if v is not None]
    if given and not any(s["format"] in ("nf4", "fp4") for s in specs):
        raise RomacError(
            "has no effect: no tensor is quantized to nf4 or fp4 from floating-point weights",
            where=" / ".join(given),
            hint="add --quant nf4 (or fp4); a bitsandbytes checkpoint keeps its stored codes unless --quant names "
                 "another format",
        )


def quantize(model: Model, target: Target, options) -> Model:
    cfg = model.config
    proj = format_spec(options.quant or target.weights, target, options)
    embed = format_spec(options.quant_embedding or target.embedding, target, options)
    norm = format_spec(target.norms, target)
    updates, requested = {}, []
    for name in stored_tensors(cfg):
        handle = model.weights[name]
        shape = tuple(handle.shape)
        preset = getattr(handle, "codec_spec", None)
        chosen = options.quant_embedding if name in ("embed_tokens", "lm_head") else options.quant
        if preset is not None and chosen is None:  # pre-quantized: kept (the emitter passes its codes through)
            spec = dict(preset)
        elif name == ROPE_TABLE:
            spec = get_codec("fp32").spec()
        elif len(shape) == 1:
            spec = norm
        elif name in ("embed_tokens", "lm_head"):
            spec = embed
        else:
            spec = proj
        if preset is None or chosen is not None:
            requested.append(spec)
        updates[name] = {"codec": spec, "kind": "vector" if len(shape) == 1 else "matrix", "shape": shape}
    _check_bnb_options_used(options, requested)
    return model.with_tensors(updates)
