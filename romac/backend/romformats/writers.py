"""Writers: a bank's raw ``.rom`` streamed into the text formats RTL tools load (mem, coe, mif, a Verilog ROM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from romac.backend.romformats.common import _BYTE, _NIBBLE, CHUNK_BYTES, BankGeometry
from romac.errors import RomacError

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
