"""Front-end for GGUF files (llama.cpp's single-file format), LLaMA architecture.

:func:`load_gguf` reads the file's header — metadata and tensor table — into a
:class:`~romac.ir.ModelConfig` and a :class:`~romac.ir.Model` whose weights are lazy handles: nothing is
dequantized until a handle's ``load()``/``load_rows()`` is called, and then only that tensor (or those rows),
read from a read-only memory map of the file and dequantized with ``gguf.quants`` (llama.cpp's own numpy
reference dequantizers) to float32.
The file itself (header, tensor table, dequantization) is read by :mod:`romac.frontend.gguf_file`.

Two things differ from Hugging Face order and are undone here:

- llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` (its ``LlamaModel.permute``: within
  each head, the two RoPE halves are interleaved). Per matrix with ``nh`` heads (KV heads for k),
  HF = ``w.reshape(nh, rows // nh // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)``.
- GGUF lists dimensions innermost first; numpy shapes here are the reverse (``(rows, cols)``, as HF).

A LLaMA-3 style ``rope_freqs.weight`` tensor (per-frequency divisors that llama.cpp applies to the RoPE
angles) is folded into the model's inverse-frequency table. The tokenizer described by the metadata is
rebuilt by :mod:`romac.frontend.tokenizer` and carried in ``Model.tokenizer``; if it cannot be rebuilt, the
model still loads, and ``source["tokenizer"]`` says why text prompts are unavailable.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from romac.errors import RomacError
from romac.frontend.gguf_file import GGUF_MAGIC, SUPPORTED_TYPES, GGUFFile, GGUFTensor, is_gguf
from romac.frontend.tokenizer import TokenizerUnavailable, from_gguf_metadata
from romac.ir import ROPE_TABLE, ArrayWeight, LazyWeight, Model, ModelConfig, expected_shape, make_model, tensor_names

__all__ = ["GGUF_MAGIC", "SUPPORTED_TYPES", "GGUFTensor", "GGUFFile", "is_gguf", "gguf_config", "unpermute_rows",
           "load_gguf", "describe_gguf"]

SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens", "output_norm.weight": "norm", "output.weight": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_KEY = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
ROPE_FREQS = "rope_freqs.weight"


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order -> Hugging Face's (undoes convert_hf_to_gguf's ``LlamaModel.permute``)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _check_arch(f: GGUFFile) -> str:
    arch = f.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise RomacError(
            f"metadata 'general.architecture' is {arch!r}; romac reads only "
            f"{' / '.join(repr(a) for a in SUPPORTED_ARCHITECTURES)} (LLaMA-family decoders)",
            where=f.where,
        )
    return arch


def gguf_config(f: GGUFFile) -> ModelConfig:
    """The ModelConfig a LLaMA GGUF's metadata describes (checked against its embedding tensor)."""
    arch = _check_arch(f)
    p = f"{arch}."
    where = f.where
    hidden = f.get_int(p + "embedding_length")
    heads = f.get_int(p + "attention.head_count")
    kv_heads = f.get_int(p + "attention.head_count_kv", default=heads)
    if heads % kv_heads:
        raise RomacError(f"metadata '{p}attention.head_count' ({heads}) is not a multiple of "
                         f"'{p}attention.head_count_kv' ({kv_heads})", where=where)
    if f.get_int(p + "expert_count", default=0, positive=False):
        raise RomacError(f"metadata '{p}expert_count' is {f.get(p + 'expert_count')}: mixture-of-experts models are "
                         "not supported", where=where)
    head_dim = f.get_int(p + "attention.key_length", default=None)
    rope_dim = f.get_int(p + "rope.dimension_count", default=None)
    if head_dim is None:
        head_dim = rope_dim if rope_dim is not None else (hidden // heads if hidden % heads == 0 else None)
    if head_dim is None:
        raise RomacError(f"'{p}embedding_length' ({hidden}) is not divisible by '{p}attention.head_count' ({heads}) "
                         f"and no '{p}attention.key_length' is given", where=where)
    if rope_dim is not None and rope_dim != head_dim:
        raise RomacError(f"metadata '{p}rope.dimension_count' is {rope_dim} but heads have {head_dim} dimensions: "
                         "partial rotary embeddings are not supported", where=where)
    value_len = f.get_int(p + "attention.value_length", default=head_dim)
    if value_len != head_dim:
        raise RomacError(f"metadata '{p}attention.value_length' ({value_len}) differs from the key length ({head_dim})",
                         where=where)
    if head_dim % 2:
        raise RomacError(f"head dimension {head_dim} is odd; RoPE needs an even one", where=where)

    # the vocabulary: as declared, else the embedding's rows (the model's own count), else the token list
    tokens = f.get("tokenizer.ggml.tokens")
    vocab = f.get_int(p + "vocab_size", default=None)
    embd = f.tensors.get("token_embd.weight")
    if vocab is None and embd is not None and len(embd.shape) == 2:
        vocab = embd.shape[0]
    if vocab is None:
        vocab = len(tokens) if isinstance(tokens, list) and tokens else None
    if vocab is None:
        raise RomacError(f"no vocabulary size: neither '{p}vocab_size', 'tokenizer.ggml.tokens' nor "
                         "'token_embd.weight' is present", where=where)

    scaling = None
    kind = f.get(p + "rope.scaling.type")
    factor = f.get_float(p + "rope.scaling.factor")
    if kind is None and f.get(p + "rope.scale_linear") is not None:  # older files
        kind, factor = "linear", f.get_float(p + "rope.scale_linear")
    if kind == "linear" and factor is not None and factor != 1.0:
        scaling = {"rope_type": "linear", "factor": factor}
    elif kind not in (None, "none", "linear"):
        raise RomacError(f"metadata '{p}rope.scaling.type' is {kind!r}; supported: none, linear "
                         "(and LLaMA-3 scaling given as a rope_freqs tensor)", where=where)

    def token_id(key: str) -> int | None:
        v = f.get(key)
        return int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None

    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=f.get_int(p + "feed_forward_length"),
        num_layers=f.get_int(p + "block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=f.get_float(p + "attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=f.get_float(p + "rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in f.tensors,
        max_position_embeddings=f.get_int(p + "context_length", default=4096),
        rope_scaling=scaling,
        bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=token_id("tokenizer.ggml.eos_token_id"),
    )


def _canonical(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_KEY.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        base = f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        return base if m.group(3) == "weight" else base + ".bias"
    return None


def _gguf_name(canonical: str) -> str:
    for g, c in _GLOBAL_NAMES.items():
        if c == canonical:
            return g
    _, layer, rest = canonical.split(".", 2)
    short = next(g for g, c in _LAYER_NAMES.items() if c == rest)
    return f"blk.{layer}.{short}.weight"


def _handle(f: GGUFFile, gname: str, name: str, shape: tuple[int, ...], heads: int | None) -> LazyWeight:
    source = f"{f.path.name}:{gname}"
    if heads is None:
        loader: Callable[[], np.ndarray] = lambda: f.load(gname)  # noqa: E731
        rows: Callable[[int, int], np.ndarray] | None = (lambda a, b: f.load_rows(gname, a, b)) if len(shape) == 2 else None
        return LazyWeight(name, shape, loader, source=source, row_loader=rows)
    head_rows = shape[0] // heads

    def load() -> np.ndarray:
        return unpermute_rows(f.load(gname), heads)

    def load_rows(a: int, b: int) -> np.ndarray:  # whole heads are read, un-permuted, then cut
        h0, h1 = a // head_rows, -(-b // head_rows)
        w = f.load_rows(gname, h0 * head_rows, h1 * head_rows)
        w = unpermute_rows(w, h1 - h0)
        return w[a - h0 * head_rows : b - h0 * head_rows]

    return LazyWeight(name, shape, load, source=source, row_loader=load_rows)


def load_gguf(path: str | Path, *, with_tokenizer: bool = True) -> Model:
    """Load a LLaMA GGUF file as a lazily loaded IR Model (plus its tokenizer, when it can be rebuilt)."""
    f = GGUFFile(path)
    config = gguf_config(f)

    found: dict[str, str] = {}
    ignored: list[str] = []
    for gname, t in f.tensors.items():
        name = _canonical(gname)
        if name is None:
            if gname != ROPE_FREQS:
                ignored.append(gname)
            continue
        if name.endswith(".bias"):
            raise RomacError(f"tensor {gname!r} is a bias; bias terms are not supported", where=f.where)
        found[name] = gname

    weights: dict[str, LazyWeight | ArrayWeight] = {}
    for name in tensor_names(config):
        gname = found.get(name) or _gguf_name(name)
        if name not in found:
            raise RomacError(f"tensor {gname!r} is missing", where=f.where)
        t = f.info(gname)
        want = expected_shape(config, name)
        if t.shape != want:
            raise RomacError(f"tensor {gname!r} has shape {t.shape}, the metadata implies {want}", where=f.where)
        if t.type_name not in SUPPORTED_TYPES:
            raise RomacError(f"tensor {gname!r} has type {t.type_name}, which romac does not read", where=f.where,
                             hint=f"supported: {', '.join(SUPPORTED_TYPES)}")
        module = name.rsplit(".", 1)[-1]
        heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(module)
        weights[name] = _handle(f, gname, name, t.shape, heads)

    types = Counter(t.type_name for t in f.tensors.values())
    source: dict[str, Any] = {
        "kind": "gguf",
        "path": str(f.path),
        "files": [f.path.name],
        "architecture": f.get("general.architecture"),
        "tensor_types": dict(sorted(types.items())),
        "ignored_tensors": sorted(ignored),
    }
    name_meta = f.get("general.name")
    if isinstance(name_meta, str) and name_meta:
        source["name"] = name_meta

    rope_table = None
    if ROPE_FREQS in f.tensors:  # LLaMA-3 scaling as llama.cpp stores it: angles divided per frequency
        t = f.info(ROPE_FREQS)
        if t.shape != (config.head_dim // 2,):
            raise RomacError(f"tensor {ROPE_FREQS!r} has shape {t.shape}, expected {(config.head_dim // 2,)}",
                             where=f.where)
        factors = f.load(ROPE_FREQS).astype(np.float64)
        if not np.all(np.isfinite(factors)) or np.any(factors <= 0):
            raise RomacError(f"tensor {ROPE_FREQS!r} holds non-positive or non-finite factors", where=f.where)
        inv = (config.rope_inv_freq().astype(np.float64) / factors).astype(np.float32)
        rope_table = ArrayWeight(ROPE_TABLE, inv, f"{f.path.name}:{ROPE_FREQS}")
        source["rope_freqs"] = True

    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer, source["tokenizer"] = from_gguf_metadata(f.metadata, where=f.where)
        except TokenizerUnavailable as e:
            source["tokenizer"] = f"unavailable: {e}"

    model = make_model(config, weights, source=source)
    if rope_table is not None:
        model = dataclasses.replace(model, weights={**model.weights, ROPE_TABLE: rope_table})
    return dataclasses.replace(model, tokenizer=tokenizer) if tokenizer is not None else model


def describe_gguf(path: str | Path) -> str:
    """One line on what a GGUF file holds (header only): architecture, size, tensor types."""
    f = GGUFFile(path)
    arch = f.get("general.architecture")
    types = Counter(t.type_name for t in f.tensors.values())
    type_list = ", ".join(f"{n} {k}" for k, n in types.most_common())
    p = f"{arch}."
    parts = [f"GGUF v{f.version} file {f.path}: architecture {arch!r}"]
    if f.get(p + "block_count") is not None:
        parts.append(f"{f.get(p + 'block_count')} layers, hidden {f.get(p + 'embedding_length')}, "
                     f"{f.get(p + 'attention.head_count')}/{f.get(p + 'attention.head_count_kv')} heads")
    parts.append(f"{len(f.tensors)} tensors ({type_list})")
    tok = f.get("tokenizer.ggml.model")
    if tok:
        pre = f.get("tokenizer.ggml.pre")
        parts.append(f"tokenizer {tok}" + (f"/{pre}" if pre else ""))
    return ", ".join(parts)
