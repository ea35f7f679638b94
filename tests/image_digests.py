"""What the chip holds, pinned: sha256 of every ``rom/*``, ``sram/*`` and ``program.bin`` of a few compiles.

The digests in ``tests/data/image_digests.json`` were recorded at commit bc15314, before the core was
reshaped (issue 10), with the environment of ``constraints-test.txt``; ``tests/test_image_digests.py`` checks
that every later commit still writes the same bytes. Record again (``python -m tests.image_digests``) only
for a change that is meant to alter what the chip holds, and say so in its commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable

DIGESTS = Path(__file__).resolve().parent / "data" / "image_digests.json"
BENCH_TARGET = str(Path(__file__).resolve().parents[1] / "benchmarks" / "targets" / "bench-1g.toml")


def _cli(*args: str) -> Callable[[Path], None]:
    def run(out: Path) -> None:
        from click.testing import CliRunner

        from romac.cli import cli

        res = CliRunner().invoke(cli, ["compile", *args, "-q", "-o", str(out)])
        if res.exit_code != 0:
            raise RuntimeError(res.output)

    return run


def _untied_nf4(out: Path) -> None:
    from romac.driver import compile_model
    from romac.passes import CompileOptions
    from tests.conftest import small_config, small_model

    compile_model(small_model(small_config(tie_word_embeddings=False), adapters=2), out, None,
                  CompileOptions(quant="nf4"))


def _smollm2(fmt: str) -> Callable[[Path], None]:
    def run(out: Path) -> None:
        from romac.driver import compile_checkpoint
        from romac.passes import CompileOptions
        from tests.fixtures import smollm2

        compile_checkpoint(str(smollm2.hf_fp32()), out, [f"lora={smollm2.adapter()}"], BENCH_TARGET,
                           CompileOptions(quant=fmt, quant_embedding="int8"))

    return run


CASES: dict[str, Callable[[Path], None]] = {
    "default": _cli(),
    "default-rtl": _cli("--rom-format", "mem,coe,mif,verilog"),
    "untied-nf4": _untied_nf4,
    "smollm2-nf4": _smollm2("nf4"),
    "smollm2-int4": _smollm2("int4"),
    "smollm2-int2": _smollm2("int2"),
}
REAL_MODEL = {"smollm2-nf4", "smollm2-int4", "smollm2-int2"}  # need torch fixtures


def image_digests(out: Path) -> dict[str, str]:
    """sha256 of each ROM image, SRAM image and the program of an artifact directory."""
    files = [*sorted((out / "rom").iterdir()), *sorted((out / "sram").iterdir()), out / "program.bin"]
    return {f.relative_to(out).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def record(root: Path) -> dict[str, dict[str, str]]:
    result = {}
    for name, build in CASES.items():
        build(root / name)
        result[name] = image_digests(root / name)
        print(f"{name}: {len(result[name])} files", file=sys.stderr)
    return result


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        digests = record(Path(tmp))
    DIGESTS.parent.mkdir(parents=True, exist_ok=True)
    DIGESTS.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    print(f"wrote {DIGESTS}", file=sys.stderr)
