"""The compile plan: what the passes decide, as typed, frozen records. The passes produce it (each pass fills the
fields it provides), the emitter writes it (the manifest's ``regions`` and ``sram`` are its JSON), and the
emulator, ``romac inspect`` and the performance model read it back through the same classes.

Every record has ``to_json()`` (plain JSON data, the manifest's exact layout, docs/artifacts.md) and
``from_json(data, where)``, which checks what it reads and raises :class:`romac.errors.ArtifactError` naming
the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from romac.errors import ArtifactError, RomacError
from romac.spec.formats import WeightFormat, from_spec
from romac.spec.isa import Instr
from romac.spec.layout import TileGrid

MATRIX, VECTOR = "matrix", "vector"


def need_field(data: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, Mapping) or key not in data:
        raise ArtifactError(f"field {key!r} is missing", where=where)
    v = data[key]
    if not isinstance(v, kind) or (isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        raise ArtifactError(f"field {key!r} has the wrong type ({type(v).__name__})", where=where)
    return v


def int_list(values: Any, n: int | None, what: str, where: str) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)) or (n is not None and len(values) != n) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ArtifactError(f"{what} must be a list of {n or 'some'} non-negative integers, got {values!r}", where=where)
    return tuple(values)


def _format(spec: Any, where: str) -> WeightFormat:
    try:
        return from_spec(spec)
    except (KeyError, TypeError, ValueError, RomacError) as e:
        raise ArtifactError(f"codec {spec!r} is not a format spec ({e})", where=where) from None


@dataclass(frozen=True)
class TensorPlan:
    """One stored tensor as the passes plan it: its format (quantize), its tile grid (tile)."""

    name: str
    kind: str  # MATRIX or VECTOR
    shape: tuple[int, ...]
    format: WeightFormat
    grid: TileGrid | None = None
    constants_of: str | None = None  # a ``.qconst`` vector: the per-tensor constants of that matrix
    quantizer: str = "rtn"  # the algorithm that chose the codes (romac.quantize)
    correction_rank: int = 0  # rank of the low-rank correction of the matrix kept in SRAM (0: none)

    def with_grid(self, grid: TileGrid) -> "TensorPlan":
        return dataclasses.replace(self, grid=grid)


@dataclass(frozen=True)
class Extent:
    """A region's words in one bank: ``[bank, word_offset, words]`` in JSON."""

    bank: int
    word_offset: int
    words: int

    def to_json(self) -> list[int]:
        return [self.bank, self.word_offset, self.words]

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Extent":
        return cls(*int_list(data, 3, "an extent", where))


@dataclass(frozen=True)
class Region:
    """A placed tensor; its index in the plan's (and manifest's) region list is the region id instructions use.

    Tile ``t`` (storage order, romac.spec.layout) lives in bank ``(start_bank + t) % banks``, contiguous with the
    region's other tiles in that bank from the extent's ``word_offset``.
    """

    name: str
    kind: str
    format: WeightFormat
    shape: tuple[int, ...]
    tile: tuple[int, int]
    n_tiles: int
    start_bank: int
    extents: tuple[Extent, ...]
    constants_of: str | None = None
    quantizer: str = "rtn"

    @property
    def grid(self) -> TileGrid:
        if self.kind == VECTOR:
            return TileGrid.for_vector(self.shape[0])
        return TileGrid(self.shape[0], self.shape[1], *self.tile)

    @property
    def words(self) -> int:
        return sum(e.words for e in self.extents)

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "kind": self.kind, "codec": self.format.spec(), "shape": list(self.shape),
             "tile": list(self.tile), "n_tiles": self.n_tiles, "start_bank": self.start_bank,
             "extents": [e.to_json() for e in self.extents]}
        if self.constants_of is not None:
            d["constants_of"] = self.constants_of
        if self.quantizer != "rtn":
            d["quantizer"] = self.quantizer
        return d

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Region":
        name = need_field(data, "name", str, where)
        where = f"{where} {name}"
        kind = need_field(data, "kind", str, where)
        if kind not in (MATRIX, VECTOR):
            raise ArtifactError(f"kind {kind!r} is neither {MATRIX!r} nor {VECTOR!r}", where=where)
        shape = int_list(need_field(data, "shape", list, where), 2 if kind == MATRIX else 1, "shape", where)
        extents = tuple(Extent.from_json(e, where) for e in need_field(data, "extents", list, where))
        const = data.get("constants_of")
        if const is not None and not isinstance(const, str):
            raise ArtifactError("field 'constants_of' must be a tensor name", where=where)
        quantizer = data.get("quantizer", "rtn")
        if not isinstance(quantizer, str):
            raise ArtifactError("field 'quantizer' must be a name", where=where)
        return cls(name, kind, _format(need_field(data, "codec", dict, where), where), shape,
                   int_list(need_field(data, "tile", list, where), 2, "tile", where), need_field(data, "n_tiles", int, where),
                   need_field(data, "start_bank", int, where), extents, const, quantizer)


@dataclass(frozen=True)
class SlotEntry:
    """Where one projection's A [rank, in] and B [out, rank] lie in an adapter's SRAM image (JSON: a list)."""

    slot: int
    a_offset: int
    b_offset: int
    rank: int
    in_features: int
    out_features: int

    def to_json(self) -> list[int]:
        return [self.slot, self.a_offset, self.b_offset, self.rank, self.in_features, self.out_features]

    @classmethod
    def from_json(cls, data: Any, where: str) -> "SlotEntry":
        return cls(*int_list(data, 6, "a slot entry", where))


@dataclass(frozen=True)
class AdapterLayout:
    """One adapter's SRAM image: slot table, then A and B of each slot it has."""

    name: str
    rank: int
    alpha: float
    use_rslora: bool
    scaling: float
    bytes: int
    entries: tuple[SlotEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rank": self.rank, "alpha": self.alpha, "use_rslora": self.use_rslora,
                "scaling": self.scaling, "bytes": self.bytes, "entries": [e.to_json() for e in self.entries]}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "AdapterLayout":
        name = need_field(data, "name", str, where)
        where = f"{where} {name}"
        return cls(name, need_field(data, "rank", int, where), float(need_field(data, "alpha", (int, float), where)),
                   need_field(data, "use_rslora", bool, where), float(need_field(data, "scaling", (int, float), where)),
                   need_field(data, "bytes", int, where),
                   tuple(SlotEntry.from_json(e, where) for e in need_field(data, "entries", list, where)))


@dataclass(frozen=True)
class KvRegion:
    """The KV cache in SRAM: ``[layer][K, V][position][kv_heads × head_dim]`` in ``format``."""

    offset: int
    bytes: int
    format: str
    max_context: int
    bytes_per_token: int
    max_context_that_fits: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> "KvRegion":
        return cls(**{f.name: need_field(data, f.name, str if f.name == "format" else int, where)
                      for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class SramMap:
    """The SRAM: slots (one per projection of every layer: the LORA operand); the base's low-rank correction
    (always resident, from address 0, when the compile has one); the adapter images (one resident at a time, in
    the adapter region after it); and the KV cache after them."""

    bytes: int
    align: int
    slots: tuple[str, ...]
    lora_format: str
    adapters: tuple[AdapterLayout, ...]
    adapter_region_bytes: int
    kv: KvRegion
    correction: AdapterLayout | None = None
    adapter_region_offset: int = 0

    def adapter(self, name: str) -> AdapterLayout | None:
        return next((a for a in self.adapters if a.name == name), None)

    @property
    def correction_bytes(self) -> int:
        return self.correction.bytes if self.correction is not None else 0

    def to_json(self) -> dict[str, Any]:
        d = {"bytes": self.bytes, "align": self.align, "slots": list(self.slots), "lora_format": self.lora_format,
             "adapters": [a.to_json() for a in self.adapters],
             "adapter_region": {"offset": self.adapter_region_offset, "bytes": self.adapter_region_bytes},
             "kv": self.kv.to_json()}
        if self.correction is not None:
            d["correction"] = self.correction.to_json()
        return d

    @classmethod
    def from_json(cls, data: Any, where: str) -> "SramMap":
        slots = need_field(data, "slots", list, where)
        if not all(isinstance(s, str) for s in slots):
            raise ArtifactError("field 'slots' must list tensor names", where=where)
        region = need_field(data, "adapter_region", dict, where)
        correction = data.get("correction")
        correction = None if correction is None else AdapterLayout.from_json(correction, f"{where} correction")
        offset = need_field(region, "offset", int, f"{where} adapter_region")
        if offset != (0 if correction is None else -(-correction.bytes // need_field(data, "align", int, where))
                      * data["align"]):
            raise ArtifactError("the adapter region must start right after the correction region (at 0 without one)",
                                where=f"{where} adapter_region")
        return cls(need_field(data, "bytes", int, where), need_field(data, "align", int, where), tuple(slots),
                   need_field(data, "lora_format", str, where),
                   tuple(AdapterLayout.from_json(a, f"{where} adapters") for a in need_field(data, "adapters", list, where)),
                   need_field(region, "bytes", int, f"{where} adapter_region"),
                   KvRegion.from_json(need_field(data, "kv", dict, where), f"{where} kv"), correction, offset)


@dataclass(frozen=True)
class Plan:
    """Everything the passes decide. A field is ``None`` (or empty) until the pass that provides it has run."""

    tensors: Mapping[str, TensorPlan] = field(default_factory=dict)  # quantize (formats), tile (grids)
    regions: tuple[Region, ...] | None = None  # partition
    bank_words_used: tuple[int, ...] | None = None  # partition
    sram: SramMap | None = None  # sram_layout
    program: tuple[Instr, ...] | None = None  # schedule

    def replace(self, **changes: Any) -> "Plan":
        return dataclasses.replace(self, **changes)

    def region_ids(self) -> dict[str, int]:
        return {r.name: i for i, r in enumerate(self.regions or ())}

    def matrix_tensors(self) -> list[TensorPlan]:
        return [t for t in self.tensors.values() if t.kind == MATRIX]


def regions_json(regions: Sequence[Region]) -> list[dict[str, Any]]:
    return [r.to_json() for r in regions]
