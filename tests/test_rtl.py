"""Bank images for RTL flows (.mem, .coe, .mif, Verilog ROM modules): they hold exactly the raw .rom words.

Level 5 of DESIGN.md's verification: Icarus Verilog loads each bank's .mem with $readmemh and reads it back,
both straight from a memory and through the generated ROM module's port.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from romac.artifacts import open_artifacts
from romac.spec.manifest import MANIFEST, bank_file
from romac.backend.romformats import (
    FORMATS,
    BankGeometry,
    bank_format_file,
    parse_coe,
    parse_formats,
    parse_mem,
    parse_mif,
    read_coe,
    read_mem,
    read_mif,
    read_rom,
)
from romac.cli import main
from romac.errors import ArtifactError, RomacError
from romac.targets import TARGET_DIR, load_target

from tests.conftest import small_config, small_model

ALL = ("mem", "coe", "mif", "verilog")


@pytest.fixture(scope="session")
def icarus():
    """(iverilog, vvp); installs the Debian package ``iverilog`` when missing, and fails (never skips) without it."""
    if not (shutil.which("iverilog") and shutil.which("vvp")) and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "iverilog"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
    tools = shutil.which("iverilog"), shutil.which("vvp")
    if not all(tools):
        pytest.fail("Icarus Verilog (iverilog, vvp) is not on PATH and `apt-get install -y iverilog` did not install "
                    "it: install the iverilog package to run the RTL tests", pytrace=False)
    return tools


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    """The built-in model compiled for the tiny target by the CLI, with every RTL format."""
    out = tmp_path_factory.mktemp("rtl") / "out"
    main(["compile", "--rom-format", "mem,coe", "--rom-format", "mif,verilog", "-o", str(out), "-q"])
    return out


def words_equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype == np.uint64 \
            and np.array_equal(a, b)
    return list(a) == list(b)


def check_text_formats(out: Path) -> None:
    m = open_artifacts(out)
    banks, bits, depth = m.banks.count, m.banks.word_bits, m.banks.words
    for b in range(banks):
        rom = read_rom(out / bank_file(b, banks), bits)
        assert len(rom) == depth
        assert words_equal(read_mem(out / bank_format_file(b, banks, "mem"), bits, depth), rom), f"bank {b} .mem"
        assert words_equal(read_coe(out / bank_format_file(b, banks, "coe"), bits, depth), rom), f"bank {b} .coe"
        assert words_equal(read_mif(out / bank_format_file(b, banks, "mif"), bits, depth), rom), f"bank {b} .mif"
    assert any(read_rom(out / bank_file(0, banks), bits)), "bank 0 holds weights"


def small_target(tmp_path: Path, word_bits: int, bank_words: int):
    """The tiny target with another ROM word width and depth (nothing else changed)."""
    text = (TARGET_DIR / "tiny.toml").read_text()
    for key, value in (("word_bits", word_bits), ("bank_words", bank_words)):
        text = re.sub(rf"^{key} = \d+", f"{key} = {value}", text, count=1, flags=re.M)
    path = tmp_path / f"w{word_bits}.toml"
    path.write_text(text)
    t = load_target(path)
    assert (t.word_bits, t.bank_words) == (word_bits, bank_words)
    return t


def simulate(out: Path, work: Path, tools, n_reads: int = 8) -> None:
    """Icarus: $readmemh every bank's .mem and $writememh it back; read a few addresses through each ROM module."""
    iverilog, vvp = tools
    m = open_artifacts(out)
    banks, bits, depth = m.banks.count, m.banks.word_bits, m.banks.words
    g = BankGeometry(0, banks, bits, depth)
    used = max(1, max(m.banks.used_words))
    rng = np.random.default_rng(0)
    addrs = sorted({0, 1 % depth, used // 2, used - 1, depth // 2, depth - 1,
                    *rng.integers(0, depth, n_reads).tolist()})
    rtl = [out / bank_format_file(b, banks, "verilog") for b in range(banks)]
    mems = [(out / bank_format_file(b, banks, "mem")).resolve() for b in range(banks)]
    dumps = [work / f"dump_{b}.hex" for b in range(banks)]
    tb = [f"module tb;\n  reg [{bits - 1}:0] mem [0:{depth - 1}];\n  reg clk = 0;\n  reg [{g.addr_bits - 1}:0] addr = 0;"]
    for b in range(banks):
        name = BankGeometry(b, banks, bits, depth).module
        tb.append(f"  wire [{bits - 1}:0] q{b};\n  {name} #(.MEM_FILE(\"{mems[b]}\")) u{b} (.clk(clk), .addr(addr), .data(q{b}));")
    tb.append("  initial begin")
    for b in range(banks):
        tb.append(f"    $readmemh(\"{mems[b]}\", mem);\n    $writememh(\"{dumps[b].resolve()}\", mem);")
    for a in addrs:
        shown = " ".join(f"%h" for _ in range(banks))
        tb.append(f"    addr = {a}; #1 clk = 1; #1 clk = 0;\n"
                  f"    $display(\"R %0d {shown}\", addr, {', '.join(f'q{b}' for b in range(banks))});")
    tb.append("    $finish;\n  end\nendmodule\n")
    (work / "tb.v").write_text("\n".join(tb))
    build = subprocess.run([iverilog, "-g2005", "-o", str(work / "tb.vvp"), str(work / "tb.v"), *map(str, rtl)],
                           capture_output=True, text=True, cwd=work)
    assert build.returncode == 0 and not build.stderr.strip(), build.stderr
    run = subprocess.run([vvp, "-n", str(work / "tb.vvp")], capture_output=True, text=True, cwd=work)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "warning" not in (run.stdout + run.stderr).lower(), run.stdout + run.stderr  # e.g. short or over-wide files
    roms = [read_rom(out / bank_file(b, banks), bits) for b in range(banks)]
    for b in range(banks):  # what the simulator loaded, as it writes it back
        assert words_equal(read_mem(dumps[b], bits, depth), roms[b]), f"bank {b}: $readmemh/$writememh differs"
    reads = [ln.split()[1:] for ln in run.stdout.splitlines() if ln.startswith("R ")]
    assert [int(r[0]) for r in reads] == addrs
    for r in reads:
        a = int(r[0])
        for b in range(banks):
            assert int(r[1 + b], 16) == int(roms[b][a]), f"bank {b} address {a}: ROM module read {r[1 + b]}"
    assert set(f.name for f in work.iterdir()) >= {"tb.v", "tb.vvp"}
    open_artifacts(out)  # the simulation wrote nothing into the artifact directory


# ----------------------------------------------------------------------------------------------------- tests


def test_tiny_formats_read_back_the_rom_words(tiny_out):
    m = open_artifacts(tiny_out)
    assert list(m.banks.formats) == ["raw", *ALL]
    assert m.banks.word_bits == 64
    names = set(m.files)
    for b in range(m.banks.count):
        for fmt in ("raw", *ALL):
            assert bank_format_file(b, 16, fmt) in names
    check_text_formats(tiny_out)
    heads = [(tiny_out / bank_format_file(3, 16, fmt)).read_text().splitlines()[0] for fmt in ("mem", "coe", "mif")]
    assert all("bank 3 of 16: 32768 words x 64 bits" in h and str(tiny_out) not in h for h in heads)
    v = (tiny_out / bank_format_file(3, 16, "verilog")).read_text()
    for part in ('module romac_bank_003 #(', 'parameter MEM_FILE = "bank_003.mem"', "input  wire clk",
                 "input  wire [14:0] addr", "output reg  [63:0] data", '(* rom_style = "block" *)',
                 "initial $readmemh(MEM_FILE, mem);", "always @(posedge clk) data <= mem[addr];"):
        assert part in v


def test_icarus_loads_every_tiny_bank(tiny_out, tmp_path, icarus):
    simulate(tiny_out, tmp_path, icarus)


@pytest.mark.parametrize("word_bits, bank_words", [(8, 32768), (32, 8192), (128, 3000), (1024, 300)])
def test_other_word_widths(word_bits, bank_words, tmp_path, compile_small, icarus):
    from romac.passes import CompileOptions

    target = small_target(tmp_path, word_bits, bank_words)
    out = compile_small(small_model(small_config()), target, CompileOptions(rom_formats=("verilog", "coe", "mif")))
    rom = read_rom(out / bank_file(0, target.banks), word_bits)
    assert isinstance(rom, np.ndarray) == (word_bits <= 64)
    text = (out / bank_format_file(0, target.banks, "mem")).read_text().splitlines()
    assert text[0].startswith("//") and len(text) == 1 + bank_words
    assert all(len(line) == word_bits // 4 for line in text[1:]), "zero-padded to word_bits / 4 digits"
    assert f"input  wire [{(bank_words - 1).bit_length() - 1}:0] addr" in (out / bank_format_file(0, target.banks, "verilog")).read_text()
    check_text_formats(out)
    work = tmp_path / "sim"
    work.mkdir()
    simulate(out, work, icarus, n_reads=4)


def test_cli_compile_verify_and_integrity(tiny_out, tmp_path, capsys):
    main(["verify", str(tiny_out), "--no-onnx"])  # the emulator runs on the directory with the extra files
    shown = capsys.readouterr().out
    assert "FAIL" not in shown and "ok" in shown
    bad = tmp_path / "bad"
    shutil.copytree(tiny_out, bad)
    mem = bad / bank_format_file(5, 16, "mem")
    data = bytearray(mem.read_bytes())
    k = data.index(b"\n") + 3  # a digit of the first word
    data[k] = ord("0") if data[k] != ord("0") else ord("1")
    mem.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"bank_005\.mem.*sha256"):
        open_artifacts(bad)
    with pytest.raises(SystemExit) as e:
        main(["verify", str(bad), "--no-onnx"])
    assert e.value.code == 2 and "bank_005.mem" in capsys.readouterr().err
    (bad / bank_format_file(5, 16, "mem")).unlink()
    with pytest.raises(ArtifactError, match=r"bank_005\.mem.*missing"):
        open_artifacts(bad)
    shutil.copy(tiny_out / bank_format_file(5, 16, "mem"), bad / "rom" / "bank_005.mem")
    (bad / "rom" / "bank_016.mem").write_text("00\n")
    with pytest.raises(ArtifactError, match=r"bank_016\.mem.*not listed"):
        open_artifacts(bad)


def test_unknown_format_is_one_line_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", "--rom-format", "mem,vhdl", "-o", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "'vhdl'" in err[0] and all(name in err[0] for name in FORMATS)
    assert not (tmp_path / "o").exists()


def test_reproducible_and_only_what_was_asked(tiny_out, tmp_path):
    again = tmp_path / "again"
    main(["compile", "--rom-format", "verilog,mif,coe", "-o", str(again), "-q"])
    assert (again / MANIFEST).read_bytes() == (tiny_out / MANIFEST).read_bytes()  # sha256 of every file included
    plain = tmp_path / "plain"
    main(["compile", "--rom-format", "raw", "-o", str(plain), "-q"])
    m = open_artifacts(plain)
    assert list(m.banks.formats) == ["raw"]
    assert sorted(p.suffix for p in (plain / "rom").iterdir()) == [".rom"] * 16


def test_parse_formats():
    assert parse_formats([]) == ()
    assert parse_formats(["verilog"]) == ("mem", "verilog")  # the module needs its .mem
    assert parse_formats(["MIF, raw", "coe,mem"]) == ("mem", "coe", "mif")
    with pytest.raises(RomacError, match="unknown ROM image format 'hex'.*supported: raw, mem, coe, mif, verilog"):
        parse_formats("mem,hex")


def test_readers_take_what_other_tools_write():
    mem = "/* block */ @2 dead_beef // c\n  1\n@0 ff\n"
    assert parse_mem(mem, 32).tolist() == [0xFF, 0, 0xDEADBEEF, 1]
    assert parse_mem(mem, 32, depth=6).tolist() == [0xFF, 0, 0xDEADBEEF, 1, 0, 0]
    wide = parse_mem("1" + "0" * 31 + "\n5\n", 128)
    assert wide == [1 << 124, 5]
    coe = "; c\nmemory_initialization_radix=10;\nmemory_initialization_vector=1, 2 ,\n 300;\n"
    assert parse_coe(coe, 16).tolist() == [1, 2, 300]
    mif = ("% c % WIDTH=16; DEPTH=8; ADDRESS_RADIX=UNS; DATA_RADIX=HEX;\nCONTENT BEGIN\n"
           "  [0..7] : 1 2;\n  3 : AB CD;  -- two words\n  6 : FFFF;\nEND;\n")
    assert parse_mif(mif, 16, 8).tolist() == [1, 2, 1, 0xAB, 0xCD, 2, 0xFFFF, 2]
    for bad, match in ((lambda: parse_mem("12g\n", 32), "'12g'"),
                       (lambda: parse_mem("123456789\n", 32), "does not fit"),
                       (lambda: parse_mem("1\n2\n3\n", 32, depth=2), "beyond"),
                       (lambda: parse_coe("memory_initialization_vector=1;", 8), "radix"),
                       (lambda: parse_mif(mif, 32), "WIDTH=16, expected 32"),
                       (lambda: parse_mif("WIDTH=8;DEPTH=2;CONTENT BEGIN 0 : 1FF; END;", 8), "does not fit")):
        with pytest.raises(RomacError, match=match):
            bad()
