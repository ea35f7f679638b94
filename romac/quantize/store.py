"""Where the codes a quantizer chose wait for the emitter: one file per matrix in a temporary directory.

A data-aware quantizer (GPTQ) fixes a matrix's codes only after the layers before it are quantized, so the codes
cannot be recomputed lazily, one matrix at a time, when the emitter asks for them; and the model does not fit in
memory. The quantize pass therefore writes each matrix's :class:`~romac.codecs.QuantTensor` (codes packed to
their width) and its low-rank correction here as it goes, and hands the rest of the compiler weight handles that
read them back (:class:`StoredWeight`: ``codec_spec`` and ``load_quantized()``, so the codes pass to ROM untouched,
and ``load()`` / ``load_rows()`` for their values). The directory is removed when the last handle is gone.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from romac.codecs import QuantTensor, codec_for
from romac.codecs.bits import pack_codes, unpack_codes
from romac.ir import LoraAdapter
from romac.spec.formats import from_spec


class CodeStore:
    """A temporary directory of quantized matrices (``dir``: where to make it; default the system's)."""

    def __init__(self, dir: str | Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=".romac-codes-", dir=dir))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.root, True)

    def put(self, name: str, qt: QuantTensor, spec: Mapping[str, Any], source: str = "") -> "StoredWeight":
        """Keep a matrix's codes and parameters; returns the handle that reads them back."""
        fmt = from_spec(spec)
        path = self.root / f"{len(list(self.root.iterdir())):05d}.npz"
        np.savez(path, codes=pack_codes(np.asarray(qt.codes), fmt.code_bits),
                 **{f"param_{k}": v for k, v in qt.params.items()},
                 **{f"const_{k}": v for k, v in qt.constants.items()})
        return StoredWeight(name, tuple(qt.shape), dict(spec), path, self, source or f"quantized {name}")

    def put_array(self, name: str, a: np.ndarray) -> "StoredArray":
        path = self.root / f"{len(list(self.root.iterdir())):05d}.npy"
        np.save(path, np.ascontiguousarray(a, np.float32))
        return StoredArray(name, tuple(a.shape), path, self)

    def close(self) -> None:
        self._cleanup()


@dataclass(frozen=True)
class StoredWeight:
    """A matrix whose codes a quantizer chose: read back from the store (a :class:`romac.ir.WeightHandle`)."""

    name: str
    shape: tuple[int, ...]
    codec_spec: Mapping[str, Any]
    path: Path = field(repr=False)
    store: CodeStore = field(repr=False, compare=False)
    source: str = ""

    def load_quantized(self) -> QuantTensor:
        fmt = from_spec(self.codec_spec)
        with np.load(self.path) as f:
            codes = unpack_codes(f["codes"], fmt.code_bits, self.shape[-1]).reshape(self.shape)
            params = {k[6:]: f[k] for k in f.files if k.startswith("param_")}
            constants = {k[6:]: f[k] for k in f.files if k.startswith("const_")}
        return QuantTensor(fmt.name, self.shape, codes, params, constants)

    def load(self) -> np.ndarray:
        return codec_for(from_spec(self.codec_spec)).dequantize(self.load_quantized())

    def load_rows(self, start: int, stop: int) -> np.ndarray:
        return self.load()[start:stop]


@dataclass(frozen=True)
class StoredArray:
    """A float32 array in the store (a correction factor), read when asked."""

    name: str
    shape: tuple[int, ...]
    path: Path = field(repr=False)
    store: CodeStore = field(repr=False, compare=False)
    source: str = ""
    codec_spec: Mapping[str, Any] | None = None

    def load(self) -> np.ndarray:
        return np.load(self.path)

    def load_rows(self, start: int, stop: int) -> np.ndarray:
        return self.load()[start:stop]

    def load_quantized(self) -> Any:
        raise TypeError(f"{self.name}: a float array stores no codes")


def correction_adapter(factors: Mapping[str, tuple[Any, Any]]) -> LoraAdapter | None:
    """The base's low-rank correction as the IR carries it: per tensor (L2 as A, L1 as B), scaling 1."""
    if not factors:
        return None
    top = max(int(a.shape[0]) for a, _ in factors.values())
    return LoraAdapter("correction", top, float(top), False, dict(factors), source="the quantizer's correction")


__all__ = ["CodeStore", "StoredWeight", "StoredArray", "correction_adapter"]
