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

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Union

import numpy as np

from romac.spec.manifest import bank_file, bank_image_file, bank_stem
from romac.errors import RomacError

CHUNK_BYTES = 1 << 20  # raw bytes turned into text per step

Words = Union[np.ndarray, list]  # uint64 array (word_bits <= 64) or Python ints

# hex digits, lower and upper case: per nibble [16], and per byte [256] as uint16s whose two bytes in memory are the
# byte's two ASCII digits (one gather turns bytes into text)
_NIBBLE = {upper: np.frombuffer(d, np.uint8) for upper, d in ((False, b"0123456789abcdef"), (True, b"0123456789ABCDEF"))}
_BYTE = {upper: np.stack([np.repeat(t, 16), np.tile(t, 16)], axis=1).copy().view(np.uint16).reshape(256)
         for upper, t in _NIBBLE.items()}


@dataclass(frozen=True)
class BankGeometry:
    """One bank as the writers see it: which bank of how many, and its shape (from the target)."""

    bank: int
    banks: int
    word_bits: int
    bank_words: int

    @property
    def word_bytes(self) -> int:
        return self.word_bits // 8

    @property
    def digits(self) -> int:
        """Hex digits of one word."""
        return self.word_bits // 4

    @property
    def addr_bits(self) -> int:
        """Width of the address port: the fewest bits that address every word (at least 1)."""
        return max(1, (self.bank_words - 1).bit_length())

    @property
    def addr_digits(self) -> int:
        return -(-self.addr_bits // 4)

    @property
    def name(self) -> str:
        """``bank_NNN``, as the raw image is named."""
        return Path(bank_stem(self.bank, self.banks)).name

    @property
    def module(self) -> str:
        return f"romac_{self.name}"

    def describe(self) -> str:
        return f"romac bank {self.bank} of {self.banks}: {self.bank_words} words x {self.word_bits} bits"


# --------------------------------------------------------------------------------------------------- writers


def _hex_words(raw: bytes, word_bytes: int, upper: bool) -> np.ndarray:
    """[n, 2 * word_bytes] ASCII hex digits of little-endian words, most significant digit first."""
    b = np.frombuffer(raw, np.uint8).reshape(-1, word_bytes)[:, ::-1]
    return _BYTE[upper][b].view(np.uint8).reshape(b.shape[0], 2 * word_bytes)


def _hex_addresses(start: int, n: int, digits: int, upper: bool) -> np.ndarray:
    """[n, digits] ASCII zero-padded hex of the addresses start .. start + n - 1."""
    a = np.arange(start, start + n, dtype=np.uint64)
    shifts = np.arange(digits - 1, -1, -1, dtype=np.uint64) * np.uint64(4)
    return _NIBBLE[upper][((a[:, None] >> shifts) & np.uint64(0xF)).astype(np.intp)]


def _rows(n: int, *columns: np.ndarray | bytes) -> np.ndarray:
    """Lay out n text lines side by side from [n, k] digit blocks and constant byte strings."""
    width = sum(c.shape[1] if isinstance(c, np.ndarray) else len(c) for c in columns)
    out = np.empty((n, width), np.uint8)
    at = 0
    for c in columns:
        k = c.shape[1] if isinstance(c, np.ndarray) else len(c)
        out[:, at : at + k] = c if isinstance(c, np.ndarray) else np.frombuffer(c, np.uint8)
        at += k
    return out


class ImageWriter:
    """Base of the writers that turn a raw bank image into text: header, one line per word, footer."""

    suffix = ""
    upper = False  # hex digit case

    def header(self, g: BankGeometry) -> str:
        return ""

    def lines(self, digits: np.ndarray, start: int, last: bool, g: BankGeometry) -> np.ndarray:
        """The text lines (with their newlines) of the words start .. start + len(digits) - 1, as [n, k] ASCII."""
        raise NotImplementedError

    def footer(self, g: BankGeometry) -> str:
        return ""

    def write(self, raw: Path, out: Path, g: BankGeometry) -> None:
        size = raw.stat().st_size
        if size != g.bank_words * g.word_bytes:
            raise RomacError(f"bank image has {size} bytes, expected {g.bank_words} words of {g.word_bytes} bytes", where=str(raw))
        step = max(1, CHUNK_BYTES // g.word_bytes) * g.word_bytes
        with open(raw, "rb") as src, open(out, "wb") as dst:
            dst.write(self.header(g).encode("ascii"))
            start = 0
            while start < g.bank_words:
                chunk = src.read(min(step, (g.bank_words - start) * g.word_bytes))
                if not chunk or len(chunk) % g.word_bytes:
                    raise RomacError("bank image changed while it was being converted", where=str(raw))
                n = len(chunk) // g.word_bytes
                dst.write(self.lines(_hex_words(chunk, g.word_bytes, self.upper), start, start + n == g.bank_words, g).tobytes())
                start += n
            dst.write(self.footer(g).encode("ascii"))


class MemWriter(ImageWriter):
    """Verilog ``$readmemh``: one word a line, address 0 first."""

    suffix = ".mem"

    def header(self, g: BankGeometry) -> str:
        return f"// {g.describe()}, for $readmemh: one word a line, address 0 first\n"

    def lines(self, digits, start, last, g):
        return _rows(len(digits), digits, b"\n")


class CoeWriter(ImageWriter):
    """Xilinx ``.coe``: radix 16, the vector one word a line, ``,``-separated, ending ``;``."""

    suffix = ".coe"
    upper = True

    def header(self, g: BankGeometry) -> str:
        return f"; {g.describe()}\nmemory_initialization_radix=16;\nmemory_initialization_vector=\n"

    def lines(self, digits, start, last, g):
        rows = _rows(len(digits), digits, b",\n")
        if last:
            rows[-1, -2] = ord(";")
        return rows


class MifWriter(ImageWriter):
    """Intel ``.mif``: WIDTH, DEPTH, hex radices, ``addr : data;`` lines between CONTENT BEGIN and END."""

    suffix = ".mif"
    upper = True

    def header(self, g: BankGeometry) -> str:
        return (f"-- {g.describe()}\nWIDTH={g.word_bits};\nDEPTH={g.bank_words};\n"
                "ADDRESS_RADIX=HEX;\nDATA_RADIX=HEX;\nCONTENT BEGIN\n")

    def lines(self, digits, start, last, g):
        n = len(digits)
        return _rows(n, b"  ", _hex_addresses(start, n, g.addr_digits, self.upper), b" : ", digits, b";\n")

    def footer(self, g: BankGeometry) -> str:
        return "END;\n"


class VerilogWriter(ImageWriter):
    """A synthesizable ROM module per bank, reading the bank's ``.mem`` with ``$readmemh``."""

    suffix = ".v"

    def write(self, raw: Path, out: Path, g: BankGeometry) -> None:
        a, w = g.addr_bits, g.word_bits
        out.write_text(
            f"// {g.describe()}: a synchronous-read ROM initialised from {g.name}{MemWriter.suffix}.\n"
            "// $readmemh resolves MEM_FILE against the tool's working directory: override it with the path.\n"
            f"module {g.module} #(\n"
            f"    parameter MEM_FILE = \"{g.name}{MemWriter.suffix}\"\n"
            ") (\n"
            "    input  wire clk,\n"
            f"    input  wire [{a - 1}:0] addr,\n"
            f"    output reg  [{w - 1}:0] data\n"
            ");\n"
            f"    localparam WIDTH = {w};\n"
            f"    localparam DEPTH = {g.bank_words};\n"
            "    (* rom_style = \"block\" *) reg [WIDTH-1:0] mem [0:DEPTH-1];\n"
            "    initial $readmemh(MEM_FILE, mem);\n"
            "    always @(posedge clk) data <= mem[addr];\n"
            "endmodule\n",
            encoding="ascii",
        )


# --------------------------------------------------------------------------------------------------- readers


_DIGITS = {2: frozenset("01"), 8: frozenset("01234567"), 10: frozenset("0123456789"),
           16: frozenset("0123456789abcdefABCDEF")}


def _bad_token(tokens: list[str], base: int, word_bits: int) -> str | None:
    """What is wrong with the first bad token (digits only, no sign or prefix, fits the width), or None."""
    digits = _DIGITS[base]
    for t in tokens:
        if not t or not digits.issuperset(t):
            return f"{t!r} is not a base-{base} number"
        if int(t, base) >> word_bits:
            return f"{t!r} does not fit in {word_bits} bits"
    return None


_HEX_VALUE = np.full(256, 16, np.uint8)  # ASCII -> hex digit value, 16 where not a hex digit
for _k, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _HEX_VALUE[ord(chr(_c).upper())] = _k


def _to_words(tokens: list[str], base: int, word_bits: int, where: str) -> Words:
    """Numbers written in ``base`` as words of ``word_bits`` (uint64 array, or Python ints when wider)."""
    lengths = set(map(len, tokens))
    if base == 16 and word_bits <= 64 and max(lengths, default=0) <= 16:  # fast path: the digits as one array
        digits = max(lengths, default=1)
        joined = "".join(tokens) if len(lengths) <= 1 else "".join(t.zfill(digits) for t in tokens)
        n = len(tokens)
        nibbles = _HEX_VALUE[np.frombuffer(joined.encode("ascii", "replace"), np.uint8)].reshape(n, digits)
        if (nibbles > 15).any():
            raise RomacError(_bad_token(tokens, base, word_bits) or "malformed values", where=where)
        if digits % 2:
            nibbles = np.concatenate([np.zeros((n, 1), np.uint8), nibbles], axis=1)
        be = np.zeros((n, 8), np.uint8)  # big-endian bytes of each value
        be[:, 8 - nibbles.shape[1] // 2 :] = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
        values = be.view(">u8").reshape(n).astype(np.uint64)
        if word_bits < 64 and (values >> np.uint64(word_bits)).any():
            raise RomacError(_bad_token(tokens, base, word_bits) or "malformed values", where=where)
        return values
    problem = _bad_token(tokens, base, word_bits)
    if problem:
        raise RomacError(problem, where=where)
    values = [int(t, base) for t in tokens]
    return np.array(values, np.uint64) if word_bits <= 64 else values


def _empty(depth: int, word_bits: int) -> Words:
    return np.zeros(depth, np.uint64) if word_bits <= 64 else [0] * depth


def _place(runs: list[tuple[int, Words]], word_bits: int, depth: int | None, where: str) -> Words:
    """Words placed at their addresses; words no run sets are 0."""
    end = max((a + len(w) for a, w in runs), default=0)
    if depth is None:
        depth = end
    elif end > depth:
        raise RomacError(f"the file sets address {end - 1:#x}, beyond the memory's {depth} words", where=where)
    if len(runs) == 1 and runs[0][0] == 0 and len(runs[0][1]) == depth:
        return runs[0][1]
    out = _empty(depth, word_bits)
    for a, w in runs:
        out[a : a + len(w)] = w
    return out


def read_rom(path: str | Path, word_bits: int, depth: int | None = None) -> Words:
    """The words of a raw bank image (little-endian words of ``word_bits``; ``depth``, when given, is checked)."""
    raw = Path(path).read_bytes()
    wb = word_bits // 8
    if len(raw) % wb or (depth is not None and len(raw) != depth * wb):
        raise RomacError(f"{len(raw)} bytes is not {depth or 'a whole number of'} {wb}-byte words", where=str(path))
    if wb in (1, 2, 4, 8):
        return np.frombuffer(raw, f"<u{wb}").astype(np.uint64)
    return [int.from_bytes(raw[k : k + wb], "little") for k in range(0, len(raw), wb)]


_MEM_COMMENTS = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_MEM_LINE_COMMENTS = re.compile(r"//[^\n]*")  # the same when there is no block comment, much faster


def parse_mem(text: str, word_bits: int, depth: int | None = None, where: str = "<mem>") -> Words:
    """``$readmemh`` text: hex words separated by white space, ``//`` and ``/* */`` comments, ``@addr``."""
    text = (_MEM_COMMENTS if "/*" in text else _MEM_LINE_COMMENTS).sub(" ", text).replace("_", "")
    tokens = text.split()
    runs: list[tuple[int, list[str]]] = [(0, [])]
    if "@" in text:
        for t in tokens:
            if t.startswith("@"):
                try:
                    runs.append((int(t[1:], 16), []))
                except ValueError:
                    raise RomacError(f"{t!r} is not an @address in hex", where=where) from None
            else:
                runs[-1][1].append(t)
    else:
        runs = [(0, tokens)]
    return _place([(a, _to_words(ts, 16, word_bits, where)) for a, ts in runs if ts], word_bits, depth, where)


def read_mem(path: str | Path, word_bits: int, depth: int | None = None) -> Words:
    """A ``$readmemh`` file's words (``depth``: the memory's size; default: up to the last word set)."""
    return parse_mem(Path(path).read_text(encoding="ascii"), word_bits, depth, str(path))


def _coe_statements(text: str) -> dict[str, str]:
    """``key=value;`` statements (keys lower-cased); between them, a line starting with ``;`` is a comment."""
    out, pos, end = {}, 0, len(text)
    while pos < end:
        while pos < end and text[pos].isspace():
            pos += 1
        if pos == end:
            break
        if text[pos] == ";":  # a comment, to the end of its line
            nl = text.find("\n", pos)
            pos = end if nl < 0 else nl + 1
            continue
        stop = text.find(";", pos)
        key, eq, value = text[pos : end if stop < 0 else stop].partition("=")
        out[key.strip().lower()] = value if eq and stop >= 0 else None
        pos = end if stop < 0 else stop + 1
    return out


def parse_coe(text: str, word_bits: int, depth: int | None = None, where: str = "<coe>") -> Words:
    """Xilinx ``.coe`` text: ``;`` comment lines, the radix (2, 10 or 16) and the comma-separated vector."""
    statements = _coe_statements(text)
    for key in ("memory_initialization_radix", "memory_initialization_vector"):
        if statements.get(key) is None:
            raise RomacError(f"no {key}=...; statement", where=where)
    try:
        base = int(statements["memory_initialization_radix"])
    except ValueError:
        base = -1
    if base not in (2, 10, 16):
        raise RomacError(f"memory_initialization_radix={statements['memory_initialization_radix'].strip()} "
                         "(the format allows 2, 10 and 16)", where=where)
    tokens = statements["memory_initialization_vector"].replace(",", " ").split()
    return _place([(0, _to_words(tokens, base, word_bits, where))], word_bits, depth, where)


def read_coe(path: str | Path, word_bits: int, depth: int | None = None) -> Words:
    """A ``.coe`` file's words (the format does not state the width: pass the target's ``word_bits``)."""
    return parse_coe(Path(path).read_text(encoding="ascii"), word_bits, depth, str(path))


_MIF_COMMENTS = re.compile(r"--[^\n]*|%[^%]*%")
_MIF_LINE_COMMENTS = re.compile(r"--[^\n]*")  # the same when there is no % comment, much faster
_MIF_RADIX = {"HEX": 16, "UNS": 10, "DEC": 10, "OCT": 8, "BIN": 2}
_MIF_HEADER = re.compile(r"(\w+)\s*=\s*(\w+)\s*;")
_MIF_SEPARATORS = str.maketrans(":;", "  ")
_MIF_EMPTY = (re.compile(r";\s*:"), re.compile(r":\s*;"))  # an entry without an address, without a value


def parse_mif(text: str, word_bits: int | None = None, depth: int | None = None, where: str = "<mif>") -> Words:
    """Intel ``.mif`` text. ``word_bits`` / ``depth``, when given, must match the file's WIDTH / DEPTH."""
    text = (_MIF_COMMENTS if "%" in text else _MIF_LINE_COMMENTS).sub(" ", text)
    m = re.search(r"\bCONTENT\s+BEGIN\b(.*)\bEND\s*;", text, re.S | re.I)
    if not m:
        raise RomacError("no CONTENT BEGIN ... END; section", where=where)
    head = {k.upper(): v.upper() for k, v in _MIF_HEADER.findall(text[: m.start()])}
    try:
        width, size = int(head["WIDTH"]), int(head["DEPTH"])
        abase, dbase = _MIF_RADIX[head.get("ADDRESS_RADIX", "HEX")], _MIF_RADIX[head.get("DATA_RADIX", "HEX")]
    except KeyError as e:
        raise RomacError(f"header field {e.args[0]} is missing or not understood", where=where) from None
    except ValueError:
        raise RomacError("WIDTH and DEPTH must be decimal numbers", where=where) from None
    for name, given, stated in (("WIDTH", word_bits, width), ("DEPTH", depth, size)):
        if given is not None and given != stated:
            raise RomacError(f"{name}={stated}, expected {given}", where=where)
    content = m.group(1)
    # fast path, one word per entry in address order: with n entries, none with an empty side, 2n tokens means
    # exactly one address and one value each
    n = content.count(";")
    tokens = content.translate(_MIF_SEPARATORS).split()
    simple = n and len(tokens) == 2 * n == 2 * content.count(":") and "[" not in content
    if simple and not content.lstrip().startswith(":") and not any(r.search(content) for r in _MIF_EMPTY):
        try:
            addrs = _to_words(tokens[0::2], abase, 64, where)
        except RomacError:
            addrs = None  # the general path below names the bad address
        if addrs is not None and np.array_equal(addrs, np.arange(n, dtype=np.uint64)):
            return _place([(0, _to_words(tokens[1::2], dbase, width, where))], width, size, where)
    runs: list[tuple[int, list[str]]] = []
    fills: list[tuple[int, int, str]] = []
    expect = 0
    for entry in content.split(";"):
        if not entry.strip():
            continue
        lhs, colon, rhs = entry.partition(":")
        values = rhs.split()
        if not colon or not values:
            raise RomacError(f"{entry.strip()!r} is not an 'address : data;' entry", where=where)
        lhs = lhs.strip()
        try:
            if lhs.startswith("["):  # [first..last] : value(s), repeated over the range
                first, _, last = lhs.strip("[]").partition("..")
                fills.append((int(first, abase), int(last, abase), " ".join(values)))
                continue
            addr = int(lhs, abase)
        except ValueError:
            raise RomacError(f"{lhs!r} is not an address in base {abase}", where=where) from None
        if runs and addr == expect:
            runs[-1][1].extend(values)
        else:
            runs.append((addr, values))
        expect = addr + len(values)
    placed = [(a, _to_words(ts, dbase, width, where)) for a, ts in runs]
    for first, last, vals in fills:
        pattern = vals.split()
        n = last - first + 1
        placed.insert(0, (first, _to_words((pattern * (n // len(pattern) + 1))[:n], dbase, width, where)))
    return _place(placed, width, size, where)


def read_mif(path: str | Path, word_bits: int | None = None, depth: int | None = None) -> Words:
    """A ``.mif`` file's words (its WIDTH and DEPTH are checked against ``word_bits`` / ``depth`` when given)."""
    return parse_mif(Path(path).read_text(encoding="ascii"), word_bits, depth, str(path))


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
