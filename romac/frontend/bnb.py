"""Front-end for bitsandbytes-serialized checkpoints (what ``save_pretrained`` writes for a model loaded with
``BitsAndBytesConfig(load_in_4bit=True, ...)`` or ``load_in_8bit=True``).

Such a directory is a Hugging Face checkpoint whose ``config.json`` carries a ``quantization_config`` with
``quant_method: bitsandbytes``; :func:`romac.frontend.hf.load_hf_checkpoint` hands it to
:func:`load_bnb_checkpoint`. bitsandbytes quantizes only ``nn.Linear`` layers and leaves the LM head alone, so
the embedding, the norms and the LM head are float tensors (loaded as usual) and each quantized projection
``P.weight`` is stored as (FACTS.md §2):

=========================================  =============  ==================================================
key                                        dtype, shape   meaning
=========================================  =============  ==================================================
``P.weight``                               U8 [n/2, 1]    two 4-bit codes a byte, first element high nibble
                                                          (another dtype with ``bnb_4bit_quant_storage``:
                                                          the same bytes)
``P.weight.absmax``                        F32 [blocks]   per-block absmax (U8 codes when double-quantized)
``P.weight.quant_map``                     F32 [16]       the NF4 / FP4 table
``P.weight.nested_absmax``                 F32 [b/256]    double quantization: absmax of the absmax blocks
``P.weight.nested_quant_map``              F32 [256]      double quantization: the signed dynamic 8-bit map
``P.weight.quant_state.bitsandbytes__nf4``  U8 [bytes]     UTF-8 JSON: quant_type, blocksize, dtype, shape,
(or ``__fp4``)                                            nested_blocksize, nested_dtype, nested_offset
=========================================  =============  ==================================================

A 4-bit projection becomes a :class:`Bnb4bitWeight`: its ``codec_spec`` is the exact
:class:`romac.codecs.Bnb4bitCodec` (nf4/fp4, blocksize, double quantization) and ``load_quantized()`` returns a
:class:`~romac.codecs.QuantTensor` whose codes, absmax and nested statistics are the stored ones, bit for bit,
so the codes reach ROM untouched. ``load()`` / ``load_rows()`` dequantize exactly as the codec does (for
compiling to another format, and for the FP32 reference). Everything the JSON and the tensors say is checked
against each other and against the codec's tables when the checkpoint is opened (header and the small
tensors only); each problem is one RomacError naming the file and the tensor.

8-bit checkpoints (LLM.int8: ``P.weight`` I8 [out, in], ``P.SCB`` F32 [out], ``P.weight_format``) have no
romac number format of their own: their weights load as bitsandbytes dequantizes them
(``int8 * SCB * (1/127)`` in float32) and are quantized to the format chosen for the compile.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from romac.codecs import QuantTensor
from romac.codecs.bnb import denest_absmax
from romac.codecs.bits import unpack_codes
from romac.errors import RomacError
from romac.frontend.hf_config import read_quantization_config, canonical_name, open_checkpoint_files, parse_hf_config
from romac.frontend.safetensors_io import FLOAT_DTYPES, SafetensorsFile
from romac.ir import LazyWeight, Model, expected_shape, make_model, tensor_names
from romac.spec.formats import (BNB_BLOCKSIZES, BNB_DYNAMIC_SIGNED, BNB_NESTED_BLOCKSIZE, BNB_QUANT_TYPES,
                                format_class, weight_format)

__all__ = ["BNB_BLOCKSIZES", "Bnb4bitWeight", "load_bnb_checkpoint", "is_bnb_config"]

f32 = np.float32
QUANT_STATE = "quant_state.bitsandbytes__"
_4BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_QS_FIELDS = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"}
_NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")
_DTYPES = ("float32", "float16", "bfloat16")
_TABLES = {name: format_class(name).values for name in BNB_QUANT_TYPES}
_INT8_RECIPROCAL = f32(7.874015718698502e-3)  # bitsandbytes' int8_vectorwise_dequant: A * SCB * (1/127)


def is_bnb_config(qc: Any) -> bool:
    return isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes"


def describe_bnb(directory: str | Path) -> str | None:
    """What ``romac compile`` says about a bitsandbytes checkpoint (config.json only); None if it is not one."""
    qc = read_quantization_config(directory)
    if not is_bnb_config(qc):
        return None
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return f"bitsandbytes 8-bit checkpoint {directory} (LLM.int8 weights, dequantized and re-quantized)"
    kind = qc.get("bnb_4bit_quant_type", "fp4")
    dq = "double quant" if qc.get("bnb_4bit_use_double_quant") else "no double quant"
    return f"bitsandbytes 4-bit checkpoint {directory} ({kind}, {dq}; stored codes go to ROM as they are)"


@dataclass(frozen=True)
class Bnb4bitWeight:
    """A bitsandbytes 4-bit matrix, read lazily: the stored codes and statistics, or their dequantized values."""

    name: str
    shape: tuple[int, ...]
    codec_spec: Mapping[str, Any] = field(compare=False)
    file: SafetensorsFile = field(repr=False, compare=False)
    key: str = ""            # the HF key of the packed codes (``model.layers.0.self_attn.q_proj.weight``)
    offset: float = 0.0      # nested_offset (double quantization), as float32
    dtype: str = "float32"   # the dtype the weights had when bitsandbytes quantized them
    parts: Mapping[str, SafetensorsFile] = field(default_factory=dict, repr=False, compare=False)

    @property
    def source(self) -> str:
        return f"{self.file.path.name}:{self.key}"

    @property
    def blocksize(self) -> int:
        return int(self.codec_spec["blocksize"])

    @property
    def double_quant(self) -> bool:
        return bool(self.codec_spec["double_quant"])

    def _part(self, suffix: str) -> np.ndarray:
        return self.parts[suffix].raw(f"{self.key}.{suffix}")

    def _packed(self) -> np.ndarray:
        return self.file.raw(self.key).reshape(-1).view(np.uint8)

    def _bad(self, what: str) -> RomacError:
        return RomacError(f"tensor {self.key!r}: {what}", where=str(self.file.path))

    def _absmax(self, b0: int, b1: int) -> np.ndarray:
        """float32 absmax of blocks [b0, b1), de-nested exactly as bitsandbytes does (and the codec)."""
        a = self._part("absmax")[b0:b1]
        if not self.double_quant:
            am = np.asarray(a, f32)
            if not (np.isfinite(am).all() and (am >= 0).all()):
                raise self._bad("absmax holds a negative, infinite or NaN value")
            return am
        nested = self._part("nested_absmax")
        if not np.isfinite(nested).all():
            raise self._bad("nested_absmax holds inf or NaN")
        return denest_absmax(a, nested, self.offset, first_block=b0)

    def load_quantized(self) -> QuantTensor:
        """The stored codes and statistics, untouched, as the codec's QuantTensor."""
        n = math.prod(self.shape)
        codes = unpack_codes(self._packed()[: -(-n // 2)], 4, n).reshape(self.shape)
        absmax = np.array(self._part("absmax"))
        if not self.double_quant:
            self._absmax(0, absmax.size)  # checks finite, non-negative
            return QuantTensor(self.codec_spec["format"], self.shape, codes, {"absmax": absmax})
        nested = np.array(self._part("nested_absmax"))
        if not np.isfinite(nested).all():
            raise self._bad("nested_absmax holds inf or NaN")
        return QuantTensor(self.codec_spec["format"], self.shape, codes, {"absmax": absmax},
                           {"nested_absmax": nested, "offset": np.array([self.offset], f32)})

    def _dequantize(self, e0: int, e1: int) -> np.ndarray:
        """Elements [e0, e1) of the flattened matrix, dequantized as the codec (and bitsandbytes) does."""
        bs = self.blocksize
        b0, b1 = e0 // bs, -(-e1 // bs)
        p0, p1 = e0 // 2, -(-e1 // 2)
        codes = unpack_codes(self._packed()[p0:p1], 4, 2 * (p1 - p0))[e0 - 2 * p0 : e1 - 2 * p0]
        values = _TABLES[self.codec_spec["format"]]
        scale = np.repeat(self._absmax(b0, b1), bs)[e0 - b0 * bs : e1 - b0 * bs]
        return values[codes] * scale

    def load(self) -> np.ndarray:
        return self._dequantize(0, math.prod(self.shape)).reshape(self.shape)

    def load_rows(self, start: int, stop: int) -> np.ndarray:
        cols = self.shape[1]
        stop = min(stop, self.shape[0])
        return self._dequantize(start * cols, stop * cols).reshape(stop - start, cols)


@dataclass(frozen=True)
class _Int8Rows:
    """Rows [start, stop) of an LLM.int8 weight, dequantized as bitsandbytes does (a picklable callable)."""

    file: SafetensorsFile
    key: str
    scb: SafetensorsFile
    scb_key: str

    def __call__(self, start: int, stop: int) -> np.ndarray:
        a = self.file.raw(self.key)[start:stop].astype(f32)
        return (a * self.scb.raw(self.scb_key)[start:stop, None]) * _INT8_RECIPROCAL


class _Checkpoint:
    """The opened files plus the per-key checks shared by the 4-bit and 8-bit paths."""

    def __init__(self, root: Path, key_files: Mapping[str, SafetensorsFile]) -> None:
        self.root, self.key_files = root, key_files

    def where(self, key: str) -> str:
        f = self.key_files.get(key)
        return str(f.path) if f is not None else str(self.root)

    def bad(self, key: str, what: str, hint: str | None = None) -> RomacError:
        return RomacError(f"tensor {key!r}: {what}", where=self.where(key), hint=hint)

    def need(self, key: str, dtype: str | tuple[str, ...], shape: tuple[int, ...] | None, of: str) -> SafetensorsFile:
        f = self.key_files.get(key)
        if f is None:
            raise RomacError(f"tensor {key!r} is missing (bitsandbytes stores it with {of!r})", where=self.where(of))
        info = f.info(key)
        dtypes = (dtype,) if isinstance(dtype, str) else dtype
        if info.dtype not in dtypes:
            raise self.bad(key, f"dtype is {info.dtype}, expected {' or '.join(dtypes)}")
        if shape is not None and info.shape != shape:
            raise self.bad(key, f"shape is {list(info.shape)}, expected {list(shape)}")
        return f


def _quant_state(ck: _Checkpoint, key: str) -> dict[str, Any]:
    f = ck.need(key, "U8", None, key)
    try:
        state = json.loads(bytes(f.raw(key).reshape(-1)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ck.bad(key, f"is not UTF-8 JSON ({e})") from None
    if not isinstance(state, dict):
        raise ck.bad(key, "is not a JSON object")
    unknown = sorted(set(state) - _QS_FIELDS)
    if unknown:
        raise ck.bad(key, f"unknown field(s) {', '.join(unknown)}", hint=f"bitsandbytes writes {', '.join(sorted(_QS_FIELDS))}")
    for name in ("quant_type", "blocksize", "dtype", "shape"):
        if name not in state:
            raise ck.bad(key, f"field {name!r} is missing")
    return state


def _bnb4_weight(ck: _Checkpoint, name: str, weight_key: str, qs_key: str, want: tuple[int, ...]) -> Bnb4bitWeight:
    """Check one 4-bit projection (JSON against tensors against the codec) and make its handle."""
    suffix_type = qs_key.rsplit("__", 1)[1]
    state = _quant_state(ck, qs_key)

    def field_error(fname: str, what: str, hint: str | None = None) -> RomacError:
        return ck.bad(qs_key, f"field {fname!r} {what}", hint)

    qt = state["quant_type"]
    if qt not in _TABLES or suffix_type not in _TABLES:
        bad = qt if qt not in _TABLES else suffix_type
        raise field_error("quant_type", f"is {bad!r}, an unknown 4-bit type", "bitsandbytes 4-bit types are nf4 and fp4")
    if qt != suffix_type:
        raise field_error("quant_type", f"is {qt!r} but the tensor name says {suffix_type!r}")
    bs = state["blocksize"]
    if not isinstance(bs, int) or isinstance(bs, bool) or bs not in BNB_BLOCKSIZES:
        raise field_error("blocksize", f"is {bs!r}", f"bitsandbytes allows {', '.join(map(str, BNB_BLOCKSIZES))}")
    if state["dtype"] not in _DTYPES:
        raise field_error("dtype", f"is {state['dtype']!r}", f"expected one of {', '.join(_DTYPES)}")
    shape = state["shape"]
    if not isinstance(shape, list) or tuple(shape) != want:
        raise field_error("shape", f"is {shape!r}, config.json implies {list(want)}")
    nested = any(k in state for k in _NESTED_FIELDS)
    if nested:
        for k in _NESTED_FIELDS:
            if k not in state:
                raise field_error(k, "is missing (the other nested_* fields are there)")
        if state["nested_blocksize"] != BNB_NESTED_BLOCKSIZE or isinstance(state["nested_blocksize"], bool):
            raise field_error("nested_blocksize", f"is {state['nested_blocksize']!r}",
                              f"bitsandbytes double quantization uses {BNB_NESTED_BLOCKSIZE}")
        if state["nested_dtype"] != "float32":
            raise field_error("nested_dtype", f"is {state['nested_dtype']!r}, expected 'float32'")
        off = state["nested_offset"]
        if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off):
            raise field_error("nested_offset", f"is {off!r}, not a finite number")
    n = math.prod(want)
    nblocks = -(-n // bs)

    # the packed codes: any storage dtype (bnb_4bit_quant_storage), the bytes are what count
    wf = ck.key_files[weight_key]
    winfo = wf.info(weight_key)
    if winfo.dtype == "BOOL" or winfo.nbytes != -(-n // 2):
        raise ck.bad(weight_key, f"holds {winfo.nbytes} bytes ({winfo.dtype} {list(winfo.shape)}); "
                     f"{list(want)} 4-bit codes take {-(-n // 2)}")
    parts: dict[str, SafetensorsFile] = {}
    absmax_file = ck.key_files.get(f"{weight_key}.absmax")
    if not nested and absmax_file is not None and absmax_file.info(f"{weight_key}.absmax").dtype == "BF16":
        raise ck.bad(f"{weight_key}.absmax", "is a bfloat16 absmax of shape "
                     f"{list(absmax_file.info(weight_key + '.absmax').shape)}: bitsandbytes' CPU inference layout, "
                     "which it does not undo on save without double quantization (its own loader misreads it too)",
                     hint="save the model before running inference on an AVX512-BF16 CPU, or compile the FP base")
    parts["absmax"] = ck.need(f"{weight_key}.absmax", "U8" if nested else "F32", (nblocks,), weight_key)
    parts["quant_map"] = ck.need(f"{weight_key}.quant_map", "F32", (16,), weight_key)
    table = parts["quant_map"].raw(f"{weight_key}.quant_map")
    if not np.array_equal(table, _TABLES[qt]):
        raise ck.bad(f"{weight_key}.quant_map", f"is not bitsandbytes' {qt} table",
                     hint="romac reproduces the standard NF4/FP4 tables only; a custom quant_map cannot be compiled")
    if nested:
        parts["nested_absmax"] = ck.need(f"{weight_key}.nested_absmax", "F32",
                                         (-(-nblocks // BNB_NESTED_BLOCKSIZE),), weight_key)
        parts["nested_quant_map"] = ck.need(f"{weight_key}.nested_quant_map", "F32", (256,), weight_key)
        if not np.array_equal(parts["nested_quant_map"].raw(f"{weight_key}.nested_quant_map"), BNB_DYNAMIC_SIGNED):
            raise ck.bad(f"{weight_key}.nested_quant_map", "is not bitsandbytes' signed dynamic 8-bit map",
                         hint="romac reproduces bitsandbytes' create_dynamic_map(signed=True) only")
    else:
        for k in ("nested_absmax", "nested_quant_map"):
            if f"{weight_key}.{k}" in ck.key_files:
                raise ck.bad(f"{weight_key}.{k}", f"is present but {qs_key!r} has no nested_* fields")
    spec = weight_format(qt, blocksize=bs, double_quant=nested).spec()
    return Bnb4bitWeight(name, want, spec, wf, weight_key, float(f32(state.get("nested_offset", 0.0))),
                         state["dtype"], parts)


def _float_weight(ck: _Checkpoint, name: str, key: str, want: tuple[int, ...]) -> LazyWeight:
    f = ck.key_files[key]
    info = f.info(key)
    if info.dtype not in FLOAT_DTYPES - {"F64"}:
        hint = None
        if info.dtype == "U8" and name not in ("embed_tokens", "lm_head") and info.shape[-1:] == (1,):
            hint = "a 4-bit weight needs its .quant_state.bitsandbytes__nf4 (or __fp4) tensor beside it"
        raise RomacError(f"tensor {key!r} has dtype {info.dtype}; expected F32, F16 or BF16", where=str(f.path), hint=hint)
    if info.shape != want:
        raise RomacError(f"tensor {key!r} has shape {info.shape}, config.json implies {want}", where=str(f.path))
    return LazyWeight(name, info.shape, f.loader(key), source=f"{f.path.name}:{key}", row_loader=f.row_loader(key))


def _int8_weight(ck: _Checkpoint, name: str, key: str, want: tuple[int, ...]) -> LazyWeight:
    module = key[: -len(".weight")]
    f = ck.key_files[key]
    info = f.info(key)
    if info.shape != want:
        raise ck.bad(key, f"shape is {list(info.shape)}, config.json implies {list(want)}")
    scb = ck.need(f"{module}.SCB", "F32", (want[0],), key)
    if not np.isfinite(scb.raw(f"{module}.SCB")).all():
        raise ck.bad(f"{module}.SCB", "holds inf or NaN")
    fmt_key = f"{module}.weight_format"
    if fmt_key in ck.key_files:
        ff = ck.need(fmt_key, ("U8", "I64", "I32"), None, key)
        v = ff.raw(fmt_key).reshape(-1)
        if v.size != 1 or int(v[0]) != 0:
            raise ck.bad(fmt_key, f"is {v.tolist()}; only the 'row' layout (0) is a portable 8-bit weight",
                         hint="save the model from the CPU, or with bitsandbytes >= 0.45")
    rows = _Int8Rows(f, key, scb, f"{module}.SCB")
    return LazyWeight(name, want, functools.partial(rows, 0, want[0]), source=f"{f.path.name}:{key}", row_loader=rows)


def load_bnb_checkpoint(root: Path, raw_cfg: Mapping[str, Any], key_files: Mapping[str, SafetensorsFile] | None = None) -> Model:
    """A bitsandbytes-serialized HF checkpoint directory as a lazily loaded IR Model (see the module doc)."""
    cfg_path = root / "config.json"
    qc = raw_cfg.get("quantization_config")
    load_4bit = bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit"))
    load_8bit = bool(qc.get("load_in_8bit") or qc.get("_load_in_8bit"))
    if load_4bit == load_8bit:
        raise RomacError(
            "quantization_config (bitsandbytes) sets neither load_in_4bit nor load_in_8bit" if not load_4bit
            else "quantization_config (bitsandbytes) sets both load_in_4bit and load_in_8bit",
            where=f"{cfg_path} quantization_config",
        )
    config = parse_hf_config(raw_cfg, where=str(cfg_path))
    ck = _Checkpoint(root, key_files if key_files is not None else open_checkpoint_files(root))

    # group the keys: the base tensor of each module, and the bitsandbytes parts stored beside it
    found: dict[str, str] = {}
    ignored: list[str] = []
    states: dict[str, list[str]] = {}
    orphans: dict[str, str] = {}
    for key in ck.key_files:
        if QUANT_STATE in key:
            base, _, _ = key.partition("." + QUANT_STATE)
            states.setdefault(base, []).append(key)
            continue
        base, _, last = key.rpartition(".")
        if last in _4BIT_PARTS and base.endswith(".weight"):
            orphans.setdefault(base, key)
            continue
        if last in ("SCB", "weight_format"):  # LLM.int8 parts; checked with their I8 weight
            continue
        name = canonical_name(key)
        if name is None:
            ignored.append(key)
            continue
        if name.endswith(".bias"):
            raise RomacError(f"tensor {key!r} is a bias; bias terms are not supported", where=ck.where(key))
        if name in found:
            raise RomacError(f"tensors {found[name]!r} and {key!r} both map to {name!r}", where=ck.where(key))
        found[name] = key

    weights: dict[str, Any] = {}
    formats: dict[str, int] = {}
    dtypes: set[str] = set()
    used: set[str] = set()
    for name in tensor_names(config):
        if name not in found:
            key = "lm_head.weight" if name == "lm_head" else f"model.{name}.weight"
            raise RomacError(f"tensor {key!r} is missing from the checkpoint", where=str(root))
        key = found[name]
        used.add(key)
        want = expected_shape(config, name)
        qs = states.get(key, [])
        if len(qs) > 1:
            raise RomacError(f"tensor {key!r} has {len(qs)} quant_state tensors ({', '.join(sorted(qs))})", where=ck.where(key))
        if qs:
            if load_8bit:
                raise ck.bad(qs[0], "is a 4-bit quant_state, but config.json says load_in_8bit")
            h = _bnb4_weight(ck, name, key, qs[0], want)
            label = f"{h.codec_spec['format']} b{h.blocksize}{' dq' if h.double_quant else ''}"
            dtypes.add(h.dtype)
        elif ck.key_files[key].info(key).dtype == "I8":
            if load_4bit:
                raise ck.bad(key, "is an 8-bit weight, but config.json says load_in_4bit")
            h, label = _int8_weight(ck, name, key, want), "int8 (LLM.int8, dequantized)"
        else:
            if key in orphans:
                raise ck.bad(orphans[key], f"is a bitsandbytes part of {key!r}, but there is no "
                             f"{key}.{QUANT_STATE}nf4 (or __fp4) describing it")
            h, label = _float_weight(ck, name, key, want), "float"
        weights[name] = h
        formats[label] = formats.get(label, 0) + 1
    if config.tie_word_embeddings and "lm_head" in found:
        ignored.append(found["lm_head"])
    files = sorted({f.path.name for f in ck.key_files.values()})
    source = {
        "kind": "bnb",
        "path": str(root),
        "files": files,
        "bitsandbytes": {
            "load_in": "4bit" if load_4bit else "8bit",
            "tensor_formats": dict(sorted(formats.items())),
            "quantized_from": sorted(dtypes),
        },
        "ignored_tensors": sorted(ignored),
    }
    return make_model(config, weights, source=source)
