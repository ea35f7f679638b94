"""The golden model: the quantized model (plus LoRA) computed in float64 numpy, by the IR graph's reference semantics.

It shares nothing with the emulator but the codecs: weights come from the source checkpoint through the
front-end and are quantized and dequantized by the same codec definitions the compiler used (the formats are
read from the artifacts' manifest), LoRA A/B are rounded to the SRAM precision, and K/V to the KV-cache
precision; everything else is exact float64 arithmetic over the whole sequence at once (no KV cache, no
tiles, no instructions), as :mod:`romac.ir.ops` defines each op. The emulator must agree with it to float32
rounding.

A K/V cache coarser than the datapath (FP8 on the ROMA chips) rounds computed values, and the emulator (float32)
and the golden model (float64) can land on either side of a rounding boundary when the value lies within float32's
error of it: one such element then differs by a whole FP8 step, which no logit tolerance absorbs. Given the
chip's stored cache (:class:`KvRounding`), the golden model accepts the chip's rounding wherever the chip's value is
the correct rounding of a value within the tolerance of the golden one, and counts those ties; anywhere else it
keeps its own, so a wrong K/V still shows.

It streams: a weight is read, quantized and dequantized when the op that uses it runs, in row chunks of at most
``chunk_bytes`` of float64, and dropped again (unless ``keep_weights``: then each is kept, for repeated runs on a
small model). So its memory is one chunk plus the activations of the sequence, whatever the model's size.
"""

from __future__ import annotations

import copy
import sys
from typing import Iterator, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from romac.codecs import codec_for
from romac.codecs.elements import kv_roundtrip, lora_roundtrip
from romac.ir import Model, stores_codes_of
from romac.ir.ops import Semantics, run_graph
from romac.spec.formats import WeightFormat, element_format, from_spec
from romac.spec.manifest import Manifest

#: float64 bytes of one chunk of a weight's rows
CHUNK_BYTES = 64 << 20


class KvRounding:
    """K and V as the cache gives them back, with the chip's rounding accepted at ties.

    ``chip`` [layers, 2, positions, kv_dim] holds what the emulator stored (decoded to float32); a call rounds a
    layer's K (``which`` 0) or V (1), as :class:`romac.ir.ops.Semantics` asks. An element takes the
    chip's value when that value is the rounding of some ``y`` with ``|y − x| ≤ band · max|x|`` over its position's
    vector (so both are roundings of the same value up to the tolerance); ``ties`` counts them, ``elements`` all.
    """

    def __init__(self, kv_format: str, chip: np.ndarray | None = None, band: float = 1e-5) -> None:
        self.kv_format, self.chip, self.band = kv_format, chip, band
        self.ties = self.elements = 0

    def __call__(self, x: np.ndarray, layer: int, which: int) -> np.ndarray:
        own = kv_roundtrip(x, self.kv_format)
        self.elements += own.size
        if self.chip is None or element_format(self.kv_format).dtype is np.float32:
            return own
        stored = self.chip[layer, which, :x.shape[0]].astype(np.float64)
        if stored.shape != own.shape:
            raise ValueError(f"the chip's K/V cache holds {stored.shape}, the golden model {own.shape}")
        margin = self.band * np.max(np.abs(x), axis=-1, keepdims=True)
        lo, hi = kv_roundtrip(x - margin, self.kv_format), kv_roundtrip(x + margin, self.kv_format)
        tie = (stored != own) & (stored >= lo) & (stored <= hi)
        self.ties += int(np.count_nonzero(tie))
        return np.where(tie, stored, own)


class GoldenModel:
    """float64 forward pass of the quantized model.

    ``formats`` maps each stored tensor to its codec spec (the manifest's regions); ``lora_format`` and
    ``kv_format`` are the target's SRAM precisions. ``adapter`` selects one of the model's adapters or none.
    """

    def __init__(
        self,
        model: Model,
        formats: Mapping[str, dict],
        lora_format: str = "fp32",
        kv_format: str = "fp32",
        adapter: str | None = None,
        keep_weights: bool = True,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.model = model
        self.keep_weights = keep_weights  # False: read each weight when used (one pass over a big model)
        self.chunk_bytes = chunk_bytes
        self.cfg = model.config
        self.formats = formats
        self.kv_format = kv_format
        self.lora_format = lora_format
        self._w: dict[str, np.ndarray] = {}
        self.lora: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        self.correction = {}  # the base's low-rank correction (SRAM), applied whatever the adapter
        if model.correction is not None:
            self.correction = {t: (lora_roundtrip(a.load(), lora_format).astype(np.float64),
                                   lora_roundtrip(b.load(), lora_format).astype(np.float64))
                               for t, (a, b) in model.correction.weights.items()}
        self._load_adapter(adapter)

    @classmethod
    def of_artifacts(cls, model: Model, manifest: Manifest, adapter: str | None = None,
                     keep_weights: bool = True) -> "GoldenModel":
        """The golden model of what an artifact directory holds: its formats, LoRA and KV precisions."""
        formats = {r.name: r.format.spec() for r in manifest.regions if r.constants_of is None}
        return cls(model, formats, manifest.sram.lora_format, manifest.sram.kv.format, adapter, keep_weights)

    def _load_adapter(self, adapter: str | None) -> None:
        self.lora = {}
        if adapter is None:
            return
        ad = self.model.adapter(adapter)
        scaling = float(np.float32(ad.scaling))
        for tensor, (a, b) in ad.weights.items():
            self.lora[tensor] = (
                lora_roundtrip(a.load(), self.lora_format).astype(np.float64),
                lora_roundtrip(b.load(), self.lora_format).astype(np.float64),
                scaling,
            )

    def with_adapter(self, adapter: str | None) -> "GoldenModel":
        """The same base model with another adapter resident, sharing the dequantized base weights it keeps."""
        other = copy.copy(self)
        other._load_adapter(adapter)
        return other

    # ------------------------------------------------------------------ weights as the chip holds them
    def _format(self, name: str) -> WeightFormat:
        return from_spec(self.formats[name])

    def _dequantized(self, name: str, rows: slice | None = None) -> np.ndarray:
        """A stored tensor (or rows of a matrix) as the chip holds it (quantized then dequantized), in float64."""
        handle = self.model.weights[name]
        fmt = self._format(name)
        codec = codec_for(fmt)
        if stores_codes_of(handle, fmt.spec()):
            q = handle.load_quantized()  # pre-quantized, compiled to its own format: the stored codes
            w = codec.dequantize(q).astype(np.float64).reshape(handle.shape)
            return w if rows is None else w[rows]
        x = np.asarray(handle.load() if rows is None else handle.load_rows(rows.start, rows.stop), np.float32)
        w = codec.dequantize(codec.quantize(x if x.ndim == 2 else x.reshape(1, -1))).astype(np.float64)
        return w.reshape(handle.shape) if rows is None else w

    def weight(self, name: str) -> np.ndarray:
        """A whole stored tensor as the chip holds it, in float64 (kept when ``keep_weights``)."""
        w = self._w.get(name)
        if w is None:
            w = self._dequantized(name)
            if self.keep_weights:
                self._w[name] = w
        return w

    def _row_chunks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) of a matrix as the chip holds it, a chunk at a time. Formats with per-tensor
        constants (double quantization) are quantized whole, as the compiler does."""
        if name in self._w or self.keep_weights:
            yield 0, self.weight(name)
            return
        handle = self.model.weights[name]
        rows, cols = handle.shape
        if self._format(name).constants_length(handle.shape) or stores_codes_of(handle, self._format(name).spec()):
            yield 0, self._dequantized(name)
            return
        step = max(1, self.chunk_bytes // (8 * cols))
        for r0 in range(0, rows, step):
            yield r0, self._dequantized(name, slice(r0, min(rows, r0 + step)))

    def matmul(self, name: str, x: np.ndarray) -> np.ndarray:
        """``x @ W^T`` with ``W`` as the chip holds it, streamed in row chunks."""
        rows = self.model.weights[name].shape[0]
        y = np.empty((*x.shape[:-1], rows), np.float64)
        for r0, w in self._row_chunks(name):
            y[..., r0:r0 + w.shape[0]] = x @ w.T
        return y

    def _embedding_rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        out = np.empty((ids.size, self.model.weights[name].shape[1]), np.float64)
        for r0, w in self._row_chunks(name):
            hit = (ids >= r0) & (ids < r0 + w.shape[0])
            out[hit] = w[ids[hit] - r0]
        return out

    # ------------------------------------------------------------------ the forward pass
    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        """A projection (or the LM head) with the correction and the resident adapter's LoRA term:
        ``x W^T + (x L2^T) L1^T + s (x A^T) B^T``."""
        y = self.matmul(name, x)
        if name in self.correction:
            l2, l1 = self.correction[name]
            y = y + (x @ l2.T) @ l1.T
        if name in self.lora:
            a, b, s = self.lora[name]
            y = y + ((x @ a.T) @ b.T) * s
        return y

    def logits(self, tokens: Sequence[int], progress: str | None = None, kv: KvRounding | None = None) -> np.ndarray:
        """Logits [T, vocab] (float64) of every position of a token sequence, causally. ``progress``: a label to
        show a progress bar over the ops under (on a terminal). ``kv``: how K/V are rounded (default: to the
        cache's format, with no chip to agree with)."""
        kv = kv or KvRounding(self.kv_format)
        with tqdm(total=self.model.graph.number_of_nodes(), desc=progress, unit="op", leave=False,
                  disable=progress is None or not sys.stderr.isatty()) as bar:
            ctx = Semantics(weight=self.weight, linear=self.linear, embed=self._embedding_rows,
                            kv=kv, observe=lambda node, xs: bar.update(1))
            return run_graph(self.model, tokens, ctx)


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |actual − reference| / max |reference| over all positions and classes."""
    return float(np.max(np.abs(actual - reference)) / max(np.max(np.abs(reference)), 1e-30))
