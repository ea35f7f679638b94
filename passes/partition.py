"""Pass ``partition``: assign every tile to a B-ROM bank and a word offset.

Requires: ``grids``.
Provides: ``regions`` — every tiled tensor as a :class:`romac.spec.plan.Region` (its index is the region id the
instructions use) with its ``extents`` (bank, word offset, words per bank it occupies), and each bank's fill
(``bank_words_used``). Placement rules:

* A matrix's tiles go round-robin over *all* banks in storage order (full tiles first, see
  :mod:`romac.spec.layout`), so every bank holds the same number of full tiles of every matrix (± 1) and the
  banks finish each matrix-vector product together. Each matrix starts on the bank after the one where
  the previous matrix ended, which balances the fill across the whole model.
* A vector (norm gains, RoPE table, quantization constants) goes whole into the least-filled bank.
* Within a bank, a region's tiles are contiguous and word-aligned.
Raises :class:`romac.errors.CapacityError` if the model does not fit, saying by how much and what helps.
"""

from __future__ import annotations

import numpy as np

from romac.errors import CapacityError
from romac.ir import EMBEDDING_TENSORS, Model
from romac.passes.options import CompileOptions
from romac.spec.formats import WEIGHT_FORMATS, AffineFormat, WeightFormat, format_class, weight_format
from romac.spec.layout import tile_words
from romac.spec.plan import MATRIX, Extent, Region
from romac.targets import Target

REQUIRES = ("grids",)
PROVIDES = ("regions",)

#: what the capacity error suggests, widest first: the datapath's own (affine) formats below 8 bits
_NARROWER = sorted((n for n in WEIGHT_FORMATS if issubclass(format_class(n), AffineFormat)
                    and format_class(n).code_bits < 8), key=lambda n: -format_class(n).code_bits)


def _mib(words: int, target: Target) -> str:
    return f"{words * target.word_bytes / 2**20:,.2f} MiB"


def _rom_knobs(model: Model, target: Target, sizes: dict, need: int) -> str:
    """What would make the model fit, with the B-ROM each option needs (for the capacity error's hint)."""
    tensors = model.plan.tensors

    def need_with(proj: WeightFormat | None, embed: WeightFormat | None) -> int:
        total = 0
        for name, words in sizes.items():
            t = tensors[name]
            fmt = embed if name in EMBEDDING_TENSORS else proj
            if t.kind != MATRIX or fmt is None or fmt.name == t.format.name:
                total += int(words.sum())
            else:
                total += int(tile_words(fmt, t.grid, target.word_bytes).sum())
        return total

    def narrower(a: WeightFormat | None, b: WeightFormat) -> bool:
        return a is not None and b.bits_per_weight() < a.bits_per_weight()

    have = target.banks * target.bank_words
    proj = next((t.format for n, t in tensors.items() if t.kind == MATRIX and n not in EMBEDDING_TENSORS), None)
    embed = tensors["embed_tokens"].format if "embed_tokens" in tensors else None
    knobs = []
    for name in _NARROWER:
        fmt = weight_format(name, group_size=target.group_size)
        if narrower(proj, fmt):
            embed_too = narrower(embed, fmt)
            n = need_with(fmt, fmt if embed_too else None)
            flag = f"--quant {name}" + (f" --quant-embedding {name}" if embed_too else "")
            knobs.append(f"fewer bits per weight: {flag} needs {_mib(n, target)}{' (fits)' if n <= have else ''}")
            if n <= have:
                break
    if not knobs and proj is not None and narrower(embed, proj):
        n = need_with(None, proj)
        knobs.append(f"a narrower embedding: --quant-embedding {proj.name} needs {_mib(n, target)}")
    banks = -(-need * 1001 // 1000 // target.bank_words)  # 0.1% slack for the fullest bank
    knobs.append(f"a bigger target: at least {banks} banks of {target.bank_words} words "
                 f"(or {-(-need * 1001 // 1000 // target.banks)} words per bank)")
    return "use " + "; or ".join(knobs)


def partition(model: Model, target: Target, options: CompileOptions) -> Model:
    B = target.banks
    tensors = model.plan.tensors
    sizes = {name: tile_words(t.format, t.grid, target.word_bytes) for name, t in tensors.items()}
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
    for name, t in tensors.items():
        words = sizes[name]
        if t.kind == MATRIX:
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
            extents.append(Extent(int(b), int(used[b]), int(per_bank[b])))
            used[b] += per_bank[b]
        regions.append(Region(name, t.kind, t.format, tuple(t.shape), (t.grid.tile_rows, t.grid.tile_cols),
                              int(words.size), int(start), tuple(extents), t.constants_of, t.quantizer))
    full = int(np.argmax(used))
    if used[full] > target.bank_words:  # total fits but one bank overflows (a huge vector, uneven tails)
        raise CapacityError(
            f"bank {full} needs {int(used[full])} words but holds {target.bank_words}",
            where=f"target {target.name!r}",
            hint="use a target with more words per bank or smaller tiles",
        )
    return model.with_plan(regions=tuple(regions), bank_words_used=tuple(int(u) for u in used))
