"""A lazy, validating reader (and a small writer) for the safetensors format.

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data area that follows the
header) plus an optional ``"__metadata__"`` string map, then the data area.

Why our own reader: the ``safetensors`` numpy API cannot read BF16 and loads whole files, while romac must
open 8B checkpoints with memory near one matrix. :class:`SafetensorsFile` parses and checks the header when
opened, maps the file read-only with :func:`numpy.memmap` on the first tensor read (once per file), and
returns views into that map: :meth:`SafetensorsFile.raw` in the stored dtype (BF16 as ``uint16`` bit
patterns), :meth:`SafetensorsFile.load` as float32 (F32 zero-copy, F16/BF16/F64 converted exactly where
float32 can represent the value). Every problem with the file is a :class:`~romac.errors.RomacError` naming
the file and, where there is one, the tensor. NaN/Inf are not checked here.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from romac.errors import RomacError
from romac.frontend.rawio import read_range, scratch_bytes

__all__ = [
    "DTYPES",
    "FLOAT_DTYPES",
    "TensorInfo",
    "SafetensorsFile",
    "TensorLoader",
    "write_safetensors",
    "bf16_to_float32",
    "float32_to_bf16_bits",
]

#: safetensors dtype name -> numpy dtype of the stored bytes (BF16 is read as its uint16 bit pattern).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

#: dtypes that :meth:`SafetensorsFile.load` converts to float32.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

# The safetensors library refuses headers above 100 MB; a larger length is a corrupt file, not a header.
_MAX_HEADER = 100_000_000


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) to float32, exactly: the bf16 bits are the float32's upper half."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 to BF16 bit patterns (uint16), rounding to nearest even (as torch does); NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    return np.where(nan, (u >> 16).astype(np.uint16) | np.uint16(0x40), rounded).astype(np.uint16)


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: ``start``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """An opened, validated safetensors file whose tensors are read on demand.

    Opening reads only the header. The first tensor read maps the file (read-only, once); later reads are
    views into that map.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._where = str(self.path)
        self._mm: np.memmap | None = None
        try:
            self._size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise RomacError(
                        f"not a safetensors file: {len(head)} bytes, shorter than the 8-byte header length",
                        where=self._where,
                    )
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > self._size:
                    raise RomacError(
                        f"header length {n} runs past the end of the file ({self._size} bytes): "
                        "truncated or not a safetensors file",
                        where=self._where,
                    )
                raw_header = fh.read(n)
        except OSError as e:
            raise RomacError(f"cannot read: {e.strerror or e}", where=self._where) from None
        self._data_start = 8 + n
        self._data_size = self._size - self._data_start
        self.metadata, self.tensors = self._parse_header(raw_header)

    # -- header -------------------------------------------------------------------------------------------

    def _parse_header(self, raw: bytes) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RomacError(f"header is not valid JSON ({e})", where=self._where) from None
        if not isinstance(header, dict):
            raise RomacError("header is not a JSON object", where=self._where)

        metadata: dict[str, str] = {}
        meta = header.pop("__metadata__", None)
        if meta is not None:
            if not isinstance(meta, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
            ):
                raise RomacError("__metadata__ must map strings to strings", where=self._where)
            metadata = dict(meta)

        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            tensors[name] = self._parse_entry(name, entry)

        # Offsets must not overlap (the safetensors library also forbids holes; we tolerate them).
        ordered = sorted(tensors.values(), key=lambda t: (t.start, t.end))
        for prev, cur in zip(ordered, ordered[1:]):
            if cur.start < prev.end:
                raise RomacError(
                    f"tensor {cur.name!r}: data_offsets overlap those of {prev.name!r}",
                    where=self._where,
                )
        return metadata, tensors

    def _parse_entry(self, name: str, entry: Any) -> TensorInfo:
        def bad(msg: str) -> RomacError:
            return RomacError(f"tensor {name!r}: {msg}", where=self._where)

        if not isinstance(entry, dict):
            raise bad("header entry is not an object")
        dtype = entry.get("dtype")
        if dtype not in DTYPES:
            raise bad(f"unknown or unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise bad(f"shape {shape!r} is not a list of non-negative integers")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise bad(f"data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise bad(f"data_offsets [{begin}, {end}] are not an increasing pair")
        want = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != want:
            raise bad(
                f"data_offsets [{begin}, {end}] hold {end - begin} bytes, but shape {tuple(shape)} "
                f"of {dtype} needs {want}"
            )
        if end > self._data_size:
            raise bad(
                f"data_offsets [{begin}, {end}] run past the end of the data area ({self._data_size} bytes): "
                "file truncated or header wrong"
            )
        return TensorInfo(name, dtype, tuple(shape), self._data_start + begin, self._data_start + end)

    # -- access -------------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise RomacError(f"tensor {name!r} not found", where=self._where) from None

    @property
    def is_mapped(self) -> bool:
        """True once a tensor has been read (the file is memory-mapped)."""
        return self._mm is not None

    def _map(self) -> np.memmap:
        if self._mm is None:
            try:
                size = self.path.stat().st_size
            except OSError as e:
                raise RomacError(f"cannot read: {e.strerror or e}", where=self._where) from None
            if size != self._size:
                raise RomacError(
                    f"file changed size since it was opened ({self._size} -> {size} bytes)", where=self._where
                )
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm

    def raw(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (BF16 as uint16 bits): a read-only view into the mapped file."""
        t = self.info(name)
        dt = DTYPES[t.dtype]
        if t.nbytes == 0:
            return np.zeros(t.shape, dtype=dt)
        buf = self._map()[t.start : t.end]
        return np.asarray(buf).view(dt).reshape(t.shape)

    def _read_rows(self, t: "TensorInfo", rows: slice, into: np.ndarray | None = None) -> np.ndarray:
        """Rows of a tensor read with one pread (not mapped: streamed reads must not pile up in RSS); into the
        uint8 buffer ``into`` if it is big enough (:func:`romac.frontend.rawio.scratch_bytes`), then the result is
        a view of it and uncached bytes come straight from the disk (:mod:`romac.frontend.rawio`)."""
        dt = np.dtype(DTYPES[t.dtype])
        start, stop, _ = rows.indices(t.shape[0] if t.shape else 1)
        row_bytes = (t.nbytes // t.shape[0]) if t.shape and t.shape[0] else 0
        count = max(0, stop - start) * row_bytes
        if into is not None and into.size >= scratch_bytes(count):  # streamed: cache or disk, into a reused buffer
            data, got = read_range(self.path, t.start + start * row_bytes, count, into)
        else:
            with open(self.path, "rb") as f:
                data = os.pread(f.fileno(), count, t.start + start * row_bytes)
            got = len(data)
        if got != count:
            raise RomacError(f"tensor {t.name!r} is truncated", where=self._where)
        return np.frombuffer(data, dtype=dt).reshape((max(0, stop - start),) + tuple(t.shape[1:]))

    def load(self, name: str, rows: slice | None = None) -> np.ndarray:
        """A floating-point tensor (or a slice of its rows) as float32 (a zero-copy read-only view for F32).

        Reading a row slice converts only those rows, so a huge fp16 embedding streams in bounded memory.
        """
        t = self.info(name)
        if t.dtype not in FLOAT_DTYPES:
            raise RomacError(
                f"tensor {name!r} has integer dtype {t.dtype}; read it with raw()", where=self._where
            )
        if rows is not None:
            a = self._read_rows(t, rows)
        else:
            a = self.raw(name)
        if t.dtype == "F32":
            return a
        if t.dtype == "BF16":
            return bf16_to_float32(a)
        return a.astype(np.float32)

    def load_stored(self, name: str, rows: slice, into: np.ndarray | None = None) -> np.ndarray:
        """Rows of a floating-point tensor in the dtype the file stores (float16, float32, float64, BF16 as
        ``ml_dtypes.bfloat16``), read with one pread and not widened: :meth:`load` gives exactly these values as
        float32. The emitter's native quantizer reads fp16 itself, which saves a float32 copy of every row.
        ``into``: a uint8 buffer to read into (reused by the caller); the result is then a view of it."""
        t = self.info(name)
        if t.dtype not in FLOAT_DTYPES:
            raise RomacError(f"tensor {name!r} has integer dtype {t.dtype}; read it with raw()", where=self._where)
        a = self._read_rows(t, rows, into)
        return a.view(ml_dtypes.bfloat16) if t.dtype == "BF16" else a

    def stored_row_loader(self, name: str) -> "StoredRowLoader":
        """A picklable callable ``(start, stop)`` that loads rows of ``name`` as stored (:meth:`load_stored`)."""
        self.info(name)
        return StoredRowLoader(self, name)

    def row_loader(self, name: str) -> "RowLoader":
        """A picklable callable ``(start, stop)`` that loads rows of ``name`` as float32."""
        self.info(name)
        return RowLoader(self, name)

    def loader(self, name: str) -> "TensorLoader":
        """A picklable zero-argument callable that loads ``name`` as float32 (for ``LazyWeight``)."""
        self.info(name)
        return TensorLoader(self, name)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_mm"] = None
        return state

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self.tensors)} tensors)"


@dataclass(frozen=True)
class TensorLoader:
    """``file.load(name)`` as a picklable callable."""

    file: SafetensorsFile
    name: str

    def __call__(self) -> np.ndarray:
        return self.file.load(self.name)


# -- writer -------------------------------------------------------------------------------------------------

_NP_TO_ST = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64",
    np.dtype("uint32"): "U32",
    np.dtype("uint16"): "U16",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}


def _st_dtype(name: str, arr: np.ndarray, override: str | None) -> str:
    if override is not None:
        if override not in DTYPES:
            raise ValueError(f"{name}: unknown safetensors dtype {override!r}")
        if DTYPES[override].itemsize != arr.dtype.itemsize or arr.dtype.kind not in "uif?":
            raise ValueError(f"{name}: a {arr.dtype} array cannot be stored as {override}")
        return override
    if arr.dtype.name == "bfloat16":  # ml_dtypes.bfloat16
        return "BF16"
    try:
        return _NP_TO_ST[arr.dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"{name}: dtype {arr.dtype} has no safetensors equivalent") from None


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    dtypes: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name -> array) as a safetensors file, in the given order.

    The dtype follows the array's (float64/32/16, [u]int8..64, bool, ml_dtypes.bfloat16). ``dtypes`` may
    override it per tensor to reinterpret bits of the same width, e.g. ``{"w": "BF16"}`` for a uint16 array
    of bf16 bit patterns (see :func:`float32_to_bf16_bits`). The header is padded with spaces to a multiple
    of 8 bytes, as the safetensors library does, so the result loads there too.
    """
    dtypes = dict(dtypes or {})
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays: list[np.ndarray] = []
    offset = 0
    for name, arr in tensors.items():
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved")
        a = np.asarray(arr)
        st = _st_dtype(name, a, dtypes.pop(name, None))
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.byteswap().view(a.dtype.newbyteorder("<"))
        header[name] = {"dtype": st, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if dtypes:
        raise ValueError(f"dtypes given for tensors not written: {sorted(dtypes)}")
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for a in arrays:
            fh.write(a.reshape(-1).view(np.uint8).data if a.size else b"")


@dataclass(frozen=True)
class RowLoader:
    """``file.load(name, rows=slice(start, stop))`` as a picklable callable."""

    file: SafetensorsFile
    name: str

    def __call__(self, start: int, stop: int) -> np.ndarray:
        return self.file.load(self.name, rows=slice(start, stop))


@dataclass(frozen=True)
class StoredRowLoader:
    """``file.load_stored(name, slice(start, stop))`` as a picklable callable."""

    file: SafetensorsFile
    name: str

    def __call__(self, start: int, stop: int, into: np.ndarray | None = None) -> np.ndarray:
        return self.file.load_stored(self.name, slice(start, stop), into)


def write_safetensors_streaming(
    path: str | os.PathLike[str],
    layout: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors are made one at a time: the header from ``layout`` (name, numpy
    dtype, shape) first, then ``produce(name)`` for each in that order (checked against its layout), so that only
    one tensor is ever in memory."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in layout:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _st_dtype(name, np.empty(0, dtype), None), "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, dtype, shape in layout:
            a = np.ascontiguousarray(produce(name))
            if a.dtype != np.dtype(dtype) or tuple(a.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {a.dtype} {a.shape}, the header says {np.dtype(dtype)} {shape}")
            fh.write(a.astype(a.dtype.newbyteorder("<")).reshape(-1).view(np.uint8).data if a.size else b"")
