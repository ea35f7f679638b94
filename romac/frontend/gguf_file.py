"""GGUF files (llama.cpp's single-file format): the header reader.

:class:`GGUFFile` reads the header — metadata and tensor table — of a GGUF file and maps the file read-only;
:meth:`GGUFFile.dequantize` turns one tensor (or some of its rows) into float32 with ``gguf.quants`` (llama.cpp's
own numpy reference dequantizers). Which model a file holds is :mod:`romac.frontend.gguf`'s business.

Why our own header parser rather than ``gguf.GGUFReader``: the reader builds one numpy view per element of
every metadata array, which takes about 4 s for a 49k-token vocabulary before any tensor is touched; this one
reads the same header in well under a second and checks it as it goes (truncation, unknown types, tensors
running past the end of the file), naming the file and the field or tensor in every error. Everything
numeric — the type table (``GGML_QUANT_SIZES``), the value types and the dequantization — comes from the
``gguf`` package.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from romac.errors import RomacError

__all__ = ["GGUF_MAGIC", "SUPPORTED_TYPES", "GGUFTensor", "GGUFFile", "is_gguf"]

GGUF_MAGIC = b"GGUF"
#: tensor types romac dequantizes (all through gguf.quants); anything else is refused with this list.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_DEFAULT_ALIGNMENT = 32

# GGUF tensor names of the LLaMA architecture -> romac's canonical names (romac.ir)
def _gguf():
    try:
        import gguf  # noqa: F401
    except ImportError as e:  # a declared dependency; only a broken install gets here
        raise RomacError(f"the 'gguf' package is needed to read GGUF files ({e})", hint="pip install gguf") from None
    return gguf


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor-table entry: ``shape`` in numpy order (rows, cols); ``start``/``end`` absolute byte offsets."""

    name: str
    type_name: str
    type_id: int
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def row_bytes(self) -> int:
        return (self.end - self.start) // max(1, math.prod(self.shape[:-1]))


class _Cursor:
    """Bounds-checked little-endian reads over the header bytes."""

    def __init__(self, buf, size: int, where: str) -> None:
        self.buf, self.size, self.pos, self.where = buf, size, 0, where
        self.context = "the header"

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise RomacError(
                f"file ends inside {self.context} (needs byte {self.pos + n}, has {self.size}): truncated or not GGUF",
                where=self.where,
            )

    def unpack(self, fmt: str) -> tuple:
        n = struct.calcsize(fmt)
        self.need(n)
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self) -> int:
        return self.unpack("I")[0]

    def u64(self) -> int:
        return self.unpack("Q")[0]

    def string(self) -> str:
        n = self.u64()
        self.need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")


# value type -> struct format of a scalar (GGUFValueType numbering: see gguf.constants)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP_SCALARS = {0: "<u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


def _read_strings(cur: _Cursor, count: int) -> list[str]:
    """``count`` length-prefixed strings (the vocabulary and merges: ~10^5 of them, so a tight loop)."""
    buf, pos, size, unpack = cur.buf, cur.pos, cur.size, struct.Struct("<Q").unpack_from
    out = []
    for _ in range(count):
        if pos + 8 > size:
            cur.pos = pos
            cur.need(8)
        n = unpack(buf, pos)[0]
        pos += 8
        if pos + n > size:
            cur.pos = pos
            cur.need(n)
        out.append(buf[pos : pos + n].decode("utf-8", errors="replace"))
        pos += n
    cur.pos = pos
    return out


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
    if vtype in _SCALARS:
        v = cur.unpack(_SCALARS[vtype])[0]
        return bool(v) if vtype == 7 else v
    if vtype == _STRING:
        return cur.string()
    if vtype == _ARRAY and depth == 0:
        etype, count = cur.u32(), cur.u64()
        if etype in _NP_SCALARS:  # numeric arrays: one numpy read, not one Python object per element
            dt = np.dtype(_NP_SCALARS[etype])
            cur.need(count * dt.itemsize)
            arr = np.frombuffer(cur.buf, dtype=dt, count=count, offset=cur.pos).copy()
            cur.pos += count * dt.itemsize
            return arr
        if etype == _STRING:
            cur.need(count * 8)  # every string has at least its 8-byte length
            return _read_strings(cur, count)
        if etype == _ARRAY:
            return [_read_value(cur, _ARRAY, key, depth + 1) for _ in range(count)]
        raise RomacError(f"metadata key {key!r} is an array of unknown value type {etype}", where=cur.where)
    if vtype == _ARRAY:
        raise RomacError(f"metadata key {key!r} nests arrays too deeply", where=cur.where)
    raise RomacError(f"metadata key {key!r} has unknown value type {vtype}", where=cur.where)


class GGUFFile:
    """An opened, validated GGUF file: ``metadata`` (key -> value), ``tensors`` (name -> GGUFTensor).

    Opening reads the header only; tensor data is read on demand from a read-only memory map.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        where = self.where = str(self.path)
        gguf = _gguf()
        try:
            fh = open(self.path, "rb")
        except OSError as e:
            raise RomacError(f"cannot open ({e.strerror})", where=where) from None
        with fh:
            self.size = size = fh.seek(0, 2)
            if size < 24:
                raise RomacError(f"only {size} bytes, shorter than a GGUF header: truncated or not GGUF", where=where)
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(self._mm, size, where)
        magic = bytes(self._mm[:4])
        if magic != GGUF_MAGIC:
            raise RomacError(f"not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})", where=where)
        cur.pos = 4
        self.version = cur.u32()
        if self.version not in (2, 3):
            swapped = struct.unpack(">I", struct.pack("<I", self.version))[0]
            what = "a big-endian GGUF file" if swapped in (2, 3) else f"GGUF version {self.version}"
            raise RomacError(f"{what} is not supported", where=where, hint="romac reads little-endian GGUF v2 and v3")
        n_tensors, n_kv = cur.u64(), cur.u64()
        if n_tensors > size or n_kv > size:
            raise RomacError(f"header claims {n_tensors} tensors and {n_kv} metadata keys: corrupted", where=where)

        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, int] = {}
        for i in range(n_kv):
            cur.context = f"metadata entry {i}"
            key = cur.string()
            cur.context = f"metadata key {key!r}"
            vtype = cur.u32()
            self.metadata[key] = _read_value(cur, vtype, key)
            self.value_types[key] = vtype

        sizes = gguf.GGML_QUANT_SIZES
        infos = []
        for i in range(n_tensors):
            cur.context = f"tensor table entry {i}"
            name = cur.string()
            cur.context = f"the table entry of tensor {name!r}"
            ndim = cur.u32()
            if not 1 <= ndim <= 4:
                raise RomacError(f"tensor {name!r} has {ndim} dimensions (GGUF allows 1 to 4)", where=where)
            dims = cur.unpack(f"{ndim}Q")
            type_id, offset = cur.u32(), cur.u64()
            infos.append((name, dims, type_id, offset))

        alignment = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise RomacError(f"metadata 'general.alignment' is {alignment!r}, not a power of two", where=where)
        self.data_start = data_start = -(-cur.pos // alignment) * alignment

        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, type_id, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                raise RomacError(f"tensor {name!r} has unknown tensor type {type_id}", where=where,
                                 hint=f"supported: {', '.join(SUPPORTED_TYPES)}") from None
            block, type_size = sizes[qtype]
            if dims[0] % block:
                raise RomacError(
                    f"tensor {name!r} ({qtype.name}) has a row of {dims[0]} values, not a multiple of its block of {block}",
                    where=where,
                )
            nbytes = math.prod(dims) // block * type_size
            start = data_start + offset
            if offset % alignment:
                raise RomacError(f"tensor {name!r} starts at data offset {offset}, not aligned to {alignment}", where=where)
            if start + nbytes > size:
                raise RomacError(
                    f"tensor {name!r} needs bytes {start}..{start + nbytes} but the file has {size}: truncated",
                    where=where,
                )
            if name in self.tensors:
                raise RomacError(f"tensor {name!r} is listed twice", where=where)
            self.tensors[name] = GGUFTensor(name, qtype.name, int(type_id), tuple(int(d) for d in reversed(dims)), start, start + nbytes)

    # -- metadata -----------------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def get_int(self, key: str, default: Any = ..., positive: bool = True) -> Any:
        v = self.metadata.get(key)
        if v is None:
            if default is ...:
                raise RomacError(f"metadata key {key!r} is missing", where=self.where)
            return default
        if isinstance(v, np.ndarray):  # per-layer values (head counts); a LLaMA has one value for all layers
            vals = sorted({int(x) for x in v.tolist()})
            if len(vals) != 1:
                raise RomacError(f"metadata key {key!r} varies per layer ({vals}); romac needs one value",
                                 where=self.where)
            v = vals[0]
        if isinstance(v, bool) or not isinstance(v, int) or (positive and v <= 0):
            raise RomacError(f"metadata key {key!r} must be a positive integer, got {v!r}", where=self.where)
        return v

    def get_float(self, key: str, default: float | None = None) -> float | None:
        v = self.metadata.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise RomacError(f"metadata key {key!r} must be a positive number, got {v!r}", where=self.where)
        return float(v)

    # -- tensor data ----------------------------------------------------------------------------------------

    def info(self, name: str) -> GGUFTensor:
        t = self.tensors.get(name)
        if t is None:
            raise RomacError(f"tensor {name!r} not found", where=self.where)
        return t

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes, uint8 [rows..., row_bytes] (a read-only view of the map)."""
        t = self.info(name)
        arr = np.frombuffer(self._mm, dtype=np.uint8, count=t.end - t.start, offset=t.start)
        return arr.reshape(t.shape[:-1] + (t.row_bytes,))

    def _dequantize(self, t: GGUFTensor, data: np.ndarray) -> np.ndarray:
        if t.type_name not in SUPPORTED_TYPES:
            raise RomacError(
                f"tensor {t.name!r} has type {t.type_name}, which romac does not read",
                where=self.where,
                hint=f"supported: {', '.join(SUPPORTED_TYPES)}",
            )
        gguf = _gguf()
        out = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(t.type_id))
        return np.asarray(out, dtype=np.float32)

    def load(self, name: str) -> np.ndarray:
        """The whole tensor as float32 in numpy order."""
        t = self.info(name)
        return self._dequantize(t, self.raw(name)).reshape(t.shape)

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D tensor as float32 (only their blocks are dequantized)."""
        t = self.info(name)
        return self._dequantize(t, self.raw(name)[start:stop]).reshape(-1, t.shape[-1])
