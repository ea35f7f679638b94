"""Readers: the words of a bank image in any of the formats (ours and, within what the formats allow, other tools'),
as a numpy ``uint64`` array when ``word_bits <= 64``, else a list of Python ints."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from romac.backend.romformats.common import Words
from romac.errors import RomacError

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
