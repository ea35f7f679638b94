"""Pass ``partition``: assign every tile to a B-ROM bank and a word offset.

Requires: ``tile`` (every stored tensor has ``codec`` and ``grid``).
Guarantees: ``annotations["regions"]`` lists every stored tensor as a ROM region (its index is the region id
the instructions use), each with ``extents`` — ``[bank, word_offset, words]`` per bank it occupies — and
``annotations["bank_words_used"]`` gives each bank's fill. Placement rules:

* A matrix's tiles go round-robin over *all* banks in storage order (full tiles first, see
  :mod:`romac.layout`), so every bank holds the same number of full tiles of every matrix (± 1) and the
  banks finish each matrix-vector product together. Each matrix starts on the bank after the one where
  the previous matrix ended, which balances the fill across the whole model.
* A vector (norm gains, RoPE table, quantization constants) goes whole into the least-filled bank.
* Within a bank, a region's tiles are contiguous and word-aligned.
Raises :class:`romac.errors.CapacityError` if the model does not fit, saying by how much and what helps.
"""

from __future__ import annotations

import numpy as np

from romac.codecs import get_codec
from romac.errors import CapacityError
from romac.ir import Model
from romac.layout import tile_sizes
from romac.targets import Target


def tile_words(info: dict, word_bytes: int) -> np.ndarray:
    """Words of every tile of a tensor, in storage order."""
    return tile_sizes(get_codec(**info["codec"]), info["grid"], word_bytes) // word_bytes


def _mib(words: int, target: Target) -> str:
    return f"{words * target.word_bytes / 2**20:,.2f} MiB"


_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "nf4": 4, "fp4": 4, "int2": 2}


def _rom_knobs(model: Model, target: Target, sizes: dict, need: int) -> str:
    """What would make the model fit, with the B-ROM each option needs (for the capacity error's hint)."""
    from romac.layout import tile_sizes

    def need_with(proj: str | None, embed: str | None) -> int:
        total = 0
        for name, words in sizes.items():
            info = model.tensors[name]
            fmt = embed if name in ("embed_tokens", "lm_head") else proj
            if info["kind"] != "matrix" or fmt is None or fmt == info["codec"]["format"]:
                total += int(words.sum())
            else:
                codec = get_codec(fmt, group_size=target.group_size)
                total += int((tile_sizes(codec, info["grid"], target.word_bytes) // target.word_bytes).sum())
        return total

    have = target.banks * target.bank_words
    proj_fmt = next((i["codec"]["format"] for n, i in model.tensors.items() if i["kind"] == "matrix"
                     and n not in ("embed_tokens", "lm_head")), None)
    embed_fmt = model.tensors.get("embed_tokens", {}).get("codec", {}).get("format")
    knobs = []
    for fmt in ("int4", "int2"):
        if proj_fmt in _BITS and _BITS[fmt] < _BITS[proj_fmt]:
            n = need_with(fmt, fmt if embed_fmt in _BITS and _BITS[fmt] < _BITS[embed_fmt] else None)
            flag = f"--quant {fmt}" + (f" --quant-embedding {fmt}" if embed_fmt in _BITS and _BITS[fmt] < _BITS[embed_fmt] else "")
            knobs.append(f"fewer bits per weight: {flag} needs {_mib(n, target)}{' (fits)' if n <= have else ''}")
            if n <= have:
                break
    if not knobs and embed_fmt in _BITS and proj_fmt in _BITS and _BITS[embed_fmt] > _BITS[proj_fmt]:
        n = need_with(None, proj_fmt)
        knobs.append(f"a narrower embedding: --quant-embedding {proj_fmt} needs {_mib(n, target)}")
    banks = -(-need * 1001 // 1000 // target.bank_words)  # 0.1% slack for the fullest bank
    knobs.append(f"a bigger target: at least {banks} banks of {target.bank_words} words "
                 f"(or {-(-need * 1001 // 1000 // target.banks)} words per bank)")
    return "use " + "; or ".join(knobs)


def partition(model: Model, target: Target, options) -> Model:
    B = target.banks
    sizes = {name: tile_words(info, target.word_bytes) for name, info in model.tensors.items() if "grid" in info}
    need = int(sum(int(s.sum()) for s in sizes.values()))
    have = B * target.bank_words
    if need > have:
        raise CapacityError(
            f"the model needs {_mib(need, target)} of B-ROM but target {target.name!r} has {_mib(have, target)} "
            f"({B} banks × {target.bank_words} words × {target.word_bits} bits), over by "
            f"{_mib(need - have, target)} ({100 * (need / have - 1):.1f}%)",
            hint=_rom_knobs(model, target, sizes, need),
        )
    used = np.zeros(B, np.int64)
    regions, next_bank = [], 0
    for name, info in model.tensors.items():
        if name not in sizes:
            continue
        words = sizes[name]
        if info["kind"] == "matrix":
            banks = (next_bank + np.arange(words.size)) % B
            per_bank = np.bincount(banks, weights=words, minlength=B).astype(np.int64)
            order = [(next_bank + k) % B for k in range(min(B, words.size))]
            start = next_bank
            next_bank = (next_bank + words.size) % B
        else:
            start = int(np.argmin(used))
            per_bank = np.zeros(B, np.int64)
            per_bank[start] = words.sum()
            order = [start]
        extents = []
        for b in sorted(order):
            extents.append([int(b), int(used[b]), int(per_bank[b])])
            used[b] += per_bank[b]
        regions.append(
            {
                "name": name,
                "kind": info["kind"],
                "codec": info["codec"],
                "shape": list(info["shape"]),
                "tile": [info["grid"].tile_rows, info["grid"].tile_cols],
                "n_tiles": int(words.size),
                "start_bank": int(start),
                "extents": extents,
                **({"constants_of": info["constants_of"]} if "constants_of" in info else {}),
            }
        )
    full = int(np.argmax(used))
    if used[full] > target.bank_words:  # total fits but one bank overflows (a huge vector, uneven tails)
        raise CapacityError(
            f"bank {full} needs {int(used[full])} words but holds {target.bank_words}",
            where=f"target {target.name!r}",
            hint="use a target with more words per bank or smaller tiles",
        )
    return model.with_annotations(regions=regions, bank_words_used=[int(u) for u in used])
