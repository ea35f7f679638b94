"""Bank images for hardware flows: each bank's raw ``.rom`` rewritten as the files RTL tools load.

Every fact about these formats lives in this module (FACTS.md §4); sizes come from the target (``word_bits``,
``bank_words``). The formats, in the order :data:`FORMATS` lists them:

``mem``
    Verilog ``$readmemh``: a ``//`` header comment, then one word a line, address 0 first, as
    ``word_bits / 4`` lower-case hex digits, most significant digit first (as Verilog prints a number). The word
    is the little-endian integer of the raw image's ``word_bits / 8`` bytes.
``coe``
    Xilinx coefficient file: ``;`` comment, ``memory_initialization_radix=16;``,
    ``memory_initialization_vector=`` then one upper-case hex word a line, separated by ``,``, the last
    ending ``;``.
``mif``
    Intel memory initialization file: ``--`` comment, ``WIDTH=``, ``DEPTH=``, ``ADDRESS_RADIX=HEX;``,
    ``DATA_RADIX=HEX;``, ``CONTENT BEGIN``, one ``addr : data;`` line a word (upper-case hex, both zero-padded),
    ``END;``.
``verilog``
    ``bank_NNN.v``: a synthesizable synchronous-read ROM, ``module romac_bank_NNN #(parameter MEM_FILE =
    "bank_NNN.mem") (input clk, input [A-1:0] addr, output reg [W-1:0] data)`` that ``$readmemh``'s the bank's
    ``.mem`` (so asking for ``verilog`` also writes ``mem``). ``A`` is the fewest bits that address
    ``bank_words`` words.

Writers stream: they read the raw image :data:`CHUNK_BYTES` at a time and turn each chunk into text with a
few numpy calls (a byte-to-two-hex-digits lookup), never holding a bank as Python ints. The output is a pure
function of the raw bytes and the geometry (no timestamps, no paths), so builds stay reproducible byte for
byte. The readers (``read_mem``, ``read_coe``, ``read_mif``) parse these formats — ours and, within what the
formats allow, other tools' — back into words: a numpy ``uint64`` array when ``word_bits <= 64``, a list of
Python ints for wider words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from romac.backend.romformats.common import BankGeometry, Words
from romac.backend.romformats.readers import parse_coe, parse_mem, parse_mif, read_coe, read_mem, read_mif, read_rom
from romac.backend.romformats.writers import CoeWriter, ImageWriter, MemWriter, MifWriter, VerilogWriter
from romac.errors import RomacError
from romac.spec.manifest import bank_file, bank_image_file

__all__ = ["FORMATS", "RomFormat", "BankGeometry", "Words", "parse_formats", "bank_format_file", "write_bank_formats",
           "read_rom", "read_mem", "read_coe", "read_mif", "parse_mem", "parse_coe", "parse_mif"]

# --------------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class RomFormat:
    name: str  # as --rom-format takes it
    writer: type[ImageWriter] | None  # None: the raw image itself
    reader: Callable[..., Words] | None  # (path, word_bits, depth) -> words
    requires: tuple[str, ...] = ()  # other formats it needs beside it
    description: str = ""

    @property
    def suffix(self) -> str:
        return self.writer.suffix if self.writer else Path(bank_file(0, 1)).suffix


FORMATS: dict[str, RomFormat] = {
    f.name: f
    for f in (
        RomFormat("raw", None, read_rom, description="little-endian words (always written)"),
        RomFormat("mem", MemWriter, read_mem, description="Verilog $readmemh, one hex word a line"),
        RomFormat("coe", CoeWriter, read_coe, description="Xilinx coefficient file"),
        RomFormat("mif", MifWriter, read_mif, description="Intel memory initialization file"),
        RomFormat("verilog", VerilogWriter, None, ("mem",), "a synthesizable ROM module that $readmemh's the .mem"),
    )
}


def parse_formats(specs: Iterable[str] | str) -> tuple[str, ...]:
    """Validate format names (each item may be a comma-separated list); returns the extra formats to write.

    The result is in table order, without ``raw`` (always written), with each format's requirements added.
    """
    if isinstance(specs, str):
        specs = [specs]
    asked = {name.strip().lower() for spec in specs for name in spec.split(",") if name.strip()}
    unknown = sorted(asked - set(FORMATS))
    if unknown:
        raise RomacError(f"unknown ROM image format {unknown[0]!r}", where="--rom-format",
                         hint=f"supported: {', '.join(FORMATS)}")
    for name in list(asked):
        asked.update(FORMATS[name].requires)
    return tuple(name for name in FORMATS if name in asked and FORMATS[name].writer is not None)


def bank_format_file(bank: int, banks: int, fmt: str) -> str:
    """Relative path (in an artifact directory) of one bank's image in format ``fmt``."""
    return bank_image_file(bank, banks, FORMATS[fmt].suffix)


def write_bank_formats(root: str | Path, formats: Iterable[str], banks: int, word_bits: int, bank_words: int) -> list[str]:
    """Write every bank's image in each of ``formats`` beside its raw ``.rom`` under ``root``; returns the paths."""
    root = Path(root)
    written = []
    for fmt in parse_formats(list(formats)):
        writer = FORMATS[fmt].writer()
        for b in range(banks):
            rel = bank_format_file(b, banks, fmt)
            writer.write(root / bank_file(b, banks), root / rel, BankGeometry(b, banks, word_bits, bank_words))
            written.append(rel)
    return written
