"""Hardware targets: chips described as TOML data files, validated on load.

A target states the B-ROM geometry (banks, words per bank, word width, tile shape), the SRAM size, the
datapath precisions (weight formats, LoRA and KV-cache precision) and the clock. ``load_target`` takes a
built-in name (a ``*.toml`` beside this module) or a path, and refuses a file with a missing or invalid
field in one line that names the file and the field.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from romac.errors import RomacError
from romac.spec.formats import ACTIVATION_FORMATS, KV_FORMATS, LORA_FORMATS, NORM_FORMATS, WEIGHT_FORMATS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TARGET_DIR = Path(__file__).resolve().parent
DEFAULT_TARGET = "tiny"



@dataclass(frozen=True)
class PerfParams:
    """The ``[perf]`` section: what the analytical performance and energy model (``romac.targets.perf``) needs
    beyond the B-ROM geometry. Throughputs are per unit and per clock cycle; the L-Unit count is ``rom.banks``
    (one B-ROM bank per L-Unit), so ``banks + h_units + vector_lanes`` must fill the ``mesh_rows × mesh_cols``
    mesh. docs/roma.md explains every field and how the ROMA values were derived."""

    mesh_rows: int
    mesh_cols: int
    h_units: int  # SRAM + high-precision units (LoRA, KV cache, attention)
    vector_lanes: int  # the vector unit (RMSNorm, RoPE, SwiGLU, residual adds, softmax)
    rom_read_bits_per_cycle: int  # per L-Unit: B-ROM bits (codes + quantization parameters) streamed per cycle
    h_sram_bytes_per_cycle: int  # per H-Unit: SRAM read/write bandwidth
    h_macs_per_cycle: int  # per H-Unit: high-precision multiply-accumulates
    vector_elems_per_lane_per_cycle: int
    instruction_latency_cycles: int  # pipeline fill/drain each instruction pays once, whatever T is
    query_block: int  # tokens an H-Unit applies one SRAM read of LoRA or K/V weights to (prefill reuse)
    activation_sram_bytes: int  # activation/intermediate buffers, outside [sram] bytes
    static_power_w: float  # leakage and clock tree, paid every cycle
    rom_pj_per_bit: float  # energy per B-ROM bit read and multiplied in an L-Unit
    sram_pj_per_byte: float  # energy per SRAM byte read or written in an H-Unit
    h_mac_pj: float  # energy per high-precision MAC
    vector_pj_per_elem: float  # energy per vector-unit element operation


@dataclass(frozen=True)
class AreaParams:
    """The ``[area]`` section: densities and per-unit logic areas of the area model (``romac.targets.perf``)."""

    rom_um2_per_bit: float  # B-ROM (incl. quantization-parameter store), per bit of rom capacity
    sram_um2_per_bit: float  # SRAM macros, per bit ([sram] bytes plus [perf] activation_sram_bytes)
    l_unit_logic_mm2: float  # per L-Unit, beside its B-ROM
    h_unit_logic_mm2: float  # per H-Unit, beside its SRAM
    vector_lane_mm2: float
    other_mm2: float  # control, I/O, clocking
    unattributed_mm2: float  # die area the source does not assign to any part


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    clock_mhz: float
    banks: int
    bank_words: int
    word_bits: int
    tile_rows: int
    tile_cols: int
    sram_bytes: int
    max_context: int
    weights: str
    embedding: str
    norms: str
    group_size: int
    activations: str
    accumulator: str
    lora: str
    kv_cache: str
    source: str = ""
    #: the formats the datapath computes (``[datapath] weight_formats``; absent: every format): what a compile may
    #: put in ROM, and what a bit allocation chooses from
    weight_formats: tuple[str, ...] = WEIGHT_FORMATS
    perf: PerfParams | None = None  # [perf], optional: without it there is no performance estimate
    area: AreaParams | None = None  # [area], optional: without it there is no area estimate
    extra: Any = None  # sections the core does not interpret

    @property
    def word_bytes(self) -> int:
        return self.word_bits // 8

    @property
    def bank_bytes(self) -> int:
        return self.bank_words * self.word_bytes

    @property
    def rom_bytes(self) -> int:
        return self.banks * self.bank_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> "Target":
        """Inverse of :meth:`to_dict` (a manifest's ``target``)."""
        d = dict(d)
        perf, area = d.pop("perf", None), d.pop("area", None)
        if "weight_formats" in d:
            d["weight_formats"] = tuple(d["weight_formats"])
        return cls(**d, source=source, perf=PerfParams(**perf) if perf else None,
                   area=AreaParams(**area) if area else None)


@dataclass(frozen=True)
class _Range:
    lo: float
    hi: float


_SCHEMA: dict[str, dict[str, tuple[type, Any]]] = {
    # section -> field -> (type, a tuple of allowed values or a _Range, or None for free text)
    "target": {"name": (str, None), "description": (str, None), "clock_mhz": (float, _Range(1e-3, 1e6))},
    "rom": {
        "banks": (int, _Range(1, 1 << 20)),
        "bank_words": (int, _Range(1, 1 << 40)),
        "word_bits": (int, (8, 16, 32, 64, 128, 256, 512, 1024)),
        "tile_rows": (int, _Range(1, 1 << 16)),
        "tile_cols": (int, _Range(1, 1 << 16)),
    },
    "sram": {"bytes": (int, _Range(1, 1 << 48)), "max_context": (int, _Range(1, 1 << 24))},
    "datapath": {
        "weights": (str, WEIGHT_FORMATS),
        "embedding": (str, WEIGHT_FORMATS),
        "norms": (str, NORM_FORMATS),
        "group_size": (int, _Range(1, 1 << 16)),
        "activations": (str, ACTIVATION_FORMATS),
        "accumulator": (str, ACTIVATION_FORMATS),
        "lora": (str, LORA_FORMATS),
        "kv_cache": (str, KV_FORMATS),
    },
}
_FIELD_NAMES = {("sram", "bytes"): "sram_bytes"}

_POS = _Range(1, 1 << 48)
_NONNEG = _Range(0, 1 << 48)
_ENERGY = _Range(0.0, 1e6)
# Optional sections: absent means "no model"; present means every field is given, and no unknown ones.
_OPTIONAL: dict[str, tuple[type, dict[str, tuple[type, Any]]]] = {
    "perf": (PerfParams, {
        "mesh_rows": (int, _Range(1, 1 << 16)),
        "mesh_cols": (int, _Range(1, 1 << 16)),
        "h_units": (int, _Range(1, 1 << 20)),
        "vector_lanes": (int, _Range(1, 1 << 20)),
        "rom_read_bits_per_cycle": (int, _POS),
        "h_sram_bytes_per_cycle": (int, _POS),
        "h_macs_per_cycle": (int, _POS),
        "vector_elems_per_lane_per_cycle": (int, _POS),
        "instruction_latency_cycles": (int, _NONNEG),
        "query_block": (int, _Range(1, 1 << 20)),
        "activation_sram_bytes": (int, _NONNEG),
        "static_power_w": (float, _ENERGY),
        "rom_pj_per_bit": (float, _ENERGY),
        "sram_pj_per_byte": (float, _ENERGY),
        "h_mac_pj": (float, _ENERGY),
        "vector_pj_per_elem": (float, _ENERGY),
    }),
    "area": (AreaParams, {
        "rom_um2_per_bit": (float, _ENERGY),
        "sram_um2_per_bit": (float, _ENERGY),
        "l_unit_logic_mm2": (float, _ENERGY),
        "h_unit_logic_mm2": (float, _ENERGY),
        "vector_lane_mm2": (float, _ENERGY),
        "other_mm2": (float, _ENERGY),
        "unattributed_mm2": (float, _ENERGY),
    }),
}


def _optional_section(data: dict[str, Any], section: str, path: str) -> Any:
    if section not in data:
        return None
    kind, spec = _OPTIONAL[section]
    table = data[section]
    if not isinstance(table, dict):
        raise RomacError("must be a table", where=f"{path} [{section}]")
    for key in table:
        if key not in spec:
            raise RomacError(f"unknown field (known: {', '.join(spec)})", where=f"{path} [{section}] {key}")
    values = {}
    for key, (typ, allowed) in spec.items():
        if key not in table:
            raise RomacError("field is missing", where=f"{path} [{section}] {key}")
        values[key] = _check(path, section, key, table[key], typ, allowed)
    return kind(**values)


def _check(path: str, section: str, key: str, value: Any, kind: type, allowed: Any) -> Any:
    where = f"{path} [{section}] {key}"
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        kind_name = {int: "an integer", str: "a string"}.get(kind, f"a {kind.__name__}")
        raise RomacError(f"must be {kind_name}, got {value!r}", where=where)
    if isinstance(allowed, tuple) and value not in allowed:
        raise RomacError(f"{value!r} is not one of {', '.join(map(str, allowed))}", where=where)
    if isinstance(allowed, _Range) and not allowed.lo <= value <= allowed.hi:
        raise RomacError(f"{value} is outside [{allowed.lo}, {allowed.hi}]", where=where)
    return value


def target_from_dict(data: dict[str, Any], path: str = "<target>") -> Target:
    """Validate a parsed target file and build the :class:`Target`."""
    fields: dict[str, Any] = {}
    for section, spec in _SCHEMA.items():
        table = data.get(section)
        if not isinstance(table, dict):
            raise RomacError(f"section [{section}] is missing", where=path, hint="see targets/tiny.toml")
        for key, (kind, allowed) in spec.items():
            if key not in table:
                raise RomacError("field is missing", where=f"{path} [{section}] {key}")
            fields[_FIELD_NAMES.get((section, key), key)] = _check(path, section, key, table[key], kind, allowed)
    perf, area = _optional_section(data, "perf", path), _optional_section(data, "area", path)
    allowed = data["datapath"].get("weight_formats", list(WEIGHT_FORMATS))
    where = f"{path} [datapath] weight_formats"
    if not isinstance(allowed, list) or not allowed or not all(isinstance(f, str) for f in allowed):
        raise RomacError("must be a non-empty list of format names", where=where)
    for f in allowed:
        if f not in WEIGHT_FORMATS:
            raise RomacError(f"{f!r} is not one of {', '.join(WEIGHT_FORMATS)}", where=where)
    for key in ("weights", "embedding"):
        if fields[key] not in allowed:
            raise RomacError(f"the {key} format {fields[key]!r} is not among the datapath's weight_formats "
                             f"({', '.join(allowed)})", where=f"{path} [datapath] {key}")
    t = Target(**fields, source=path, perf=perf, area=area, weight_formats=tuple(allowed),
               extra={k: v for k, v in data.items() if k not in _SCHEMA and k not in _OPTIONAL} or None)
    if perf is not None and t.banks + perf.h_units + perf.vector_lanes != perf.mesh_rows * perf.mesh_cols:
        raise RomacError(
            f"{t.banks} L-Units (rom banks) + {perf.h_units} H-Units + {perf.vector_lanes} vector lanes "
            f"!= {perf.mesh_rows} × {perf.mesh_cols} mesh positions",
            where=f"{path} [perf] mesh_rows",
        )
    if t.tile_cols % t.group_size:
        raise RomacError(
            f"tile_cols {t.tile_cols} is not a multiple of group_size {t.group_size}",
            where=f"{path} [rom] tile_cols",
        )
    if t.tile_cols % 8:
        raise RomacError(f"tile_cols {t.tile_cols} is not a multiple of 8", where=f"{path} [rom] tile_cols")
    return t


def builtin_targets() -> list[str]:
    return sorted(p.stem for p in TARGET_DIR.glob("*.toml"))


def load_target(name_or_path: str | Path | None = None) -> Target:
    """A built-in target by name, or a target TOML file by path."""
    spec = str(name_or_path or DEFAULT_TARGET)
    path = Path(spec)
    if not (spec.endswith(".toml") or path.exists()):
        path = TARGET_DIR / f"{spec}.toml"
        if not path.exists():
            raise RomacError(
                f"no built-in target named {spec!r}",
                where="--target",
                hint=f"built-in targets: {', '.join(builtin_targets())}; or give a path to a .toml file",
            )
    if not path.is_file():
        raise RomacError("target file not found", where=str(path))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RomacError(f"not a valid TOML file ({e})", where=str(path)) from None
    shown = path.stem if path.parent == TARGET_DIR else str(path)
    return target_from_dict(data, shown)
