"""The quantizers as a user runs them: ``romac compile --quantizer / --calibration / --correction-rank /
--rom-budget`` on a transformers checkpoint, what lands in ROM and SRAM, what verify says, and the one-line
errors for combinations that cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from romac.artifacts import open_artifacts
from romac.codecs import codec_for
from romac.emulator.rom import Rom
from romac.spec.manifest import SRAM_CORRECTION
from romac.spec.plan import MATRIX
from tests.clirun import error_line, run_main
from tests.fixtures.quantized_checkpoints import write_gptq


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "cal.json"
    path.write_text(json.dumps(np.random.default_rng(7).integers(3, 250, (2, 48)).tolist()))
    return path


def _compile(capsys, base, out, *args):
    res = run_main(capsys, "compile", base, "-o", out, "--force", *args)
    assert res.returncode == 0, res.stderr
    return res


def _codes(out) -> dict[str, np.ndarray]:
    m = open_artifacts(out)
    rom = Rom(Path(m.root), m)
    return {r.name: rom.quantized(i).codes for i, r in enumerate(m.regions) if r.kind == MATRIX}


def test_gptq_with_correction_compiles_and_verifies(hf_checkpoint, calibration, tmp_path, capsys):
    base, adapter = hf_checkpoint
    out, plain = tmp_path / "gptq", tmp_path / "rtn"
    res = _compile(capsys, base, out, "--adapter", f"a={adapter}", "--quant", "int4", "--quantizer", "gptq",
                   "--calibration", calibration, "--correction-rank", "4")
    assert "gptq: 14 projections, mean calibration output error" in res.stderr
    _compile(capsys, base, plain, "--adapter", f"a={adapter}", "--quant", "int4")
    m = open_artifacts(out)
    proj = [r for r in m.regions if r.kind == MATRIX and r.name.startswith("layers.")]
    assert proj and all(r.quantizer == "gptq" for r in proj)
    assert {r.quantizer for r in m.regions if r.name == "embed_tokens"} == {"rtn"}
    gptq, rtn = _codes(out), _codes(plain)
    assert gptq["embed_tokens"].tobytes() == rtn["embed_tokens"].tobytes()  # only the projections are refitted
    changed = [r.name for r in proj if not np.array_equal(gptq[r.name], rtn[r.name])]
    assert len(changed) == len(proj)
    report = json.loads((out / "report.json").read_text())
    q = report["weights"]["quantizer"]
    assert q["method"] == "gptq" and q["calibrated"] and q["mean_out_err"] < q["mean_out_err_rtn"]
    assert report["sram"]["correction"]["max_rank"] == 4 and SRAM_CORRECTION in m.files
    assert all(e["correction_rank"] == 4 for n, e in report["weights"]["matrices"].items() if n in changed)
    # the emulator computes what the golden model computes from the ROM codes and the correction
    ver = run_main(capsys, "verify", out, "--model", base, "--adapter", f"a={adapter}", "--steps", "4", "--json")
    assert ver.returncode == 0, ver.stderr
    rows = json.loads(ver.stdout)
    assert {r["adapter"] for r in rows} == {None, "a"} and all(r["passed"] for r in rows)


def test_data_free_quantizer_lowers_the_weight_error(hf_checkpoint, tmp_path, capsys):
    base, _ = hf_checkpoint
    out, plain = tmp_path / "mse", tmp_path / "rtn"
    _compile(capsys, base, out, "--quant", "int2", "--quantizer", "mse")
    _compile(capsys, base, plain, "--quant", "int2")
    src = load_file(str(base / "model.safetensors"))

    def weight_error(art) -> dict[str, float]:
        m = open_artifacts(art)
        rom = Rom(Path(m.root), m)
        return {r.name: float(np.sum((codec_for(r.format).dequantize(rom.quantized(i))
                                      - src[f"model.{r.name}.weight"].astype(np.float64)) ** 2))
                for i, r in enumerate(m.regions) if r.kind == MATRIX and r.name.startswith("layers.")}

    mse, rtn = weight_error(out), weight_error(plain)
    assert all(mse[n] <= rtn[n] for n in rtn)          # never worse than RTN on any matrix (it is per group)
    assert sum(mse.values()) < 0.9 * sum(rtn.values())


def test_rom_budget_picks_formats_per_matrix_within_the_budget(hf_checkpoint, tmp_path, capsys):
    base, _ = hf_checkpoint
    results = {}
    for budget in ("120KiB", "200KiB"):
        out = tmp_path / budget
        res = _compile(capsys, base, out, "--rom-budget", budget, "--correction-rank", "8")
        assert "--rom-budget:" in res.stderr
        report = json.loads((out / "report.json").read_text())
        a = report["weights"]["allocation"]
        m = open_artifacts(out)
        placed = {r.name: r.words * m.banks.word_bytes * 8 for r in m.regions}
        proj = {n for n, e in report["weights"]["matrices"].items() if n.startswith("layers.")}
        # the candidates' ROM bits are what the partition placed, and the whole model is within the budget
        assert sum(placed[n] for n in proj) == a["rom_bits"] <= a["rom_budget_bits"]
        assert sum(placed.values()) <= 8 * int(budget[:-3]) * 1024
        assert report["sram"]["correction"]["bytes"] >= a["sram_bytes"]
        results[budget] = (a, {report["weights"]["matrices"][n]["format"] for n in proj})
        ver = run_main(capsys, "verify", out, "--model", base, "--steps", "3", "--no-onnx")
        assert ver.returncode == 0, ver.stderr
    small, large = results["120KiB"], results["200KiB"]
    assert len(small[1]) > 1 or small[1] == {"int2"}      # mixed widths (or all narrowest) under the tight budget
    assert large[0]["error"] < small[0]["error"]
    assert large[0]["bits_per_weight"] > small[0]["bits_per_weight"]


@pytest.mark.parametrize("args, says", [
    (("--quantizer", "gptq", "--quant", "int4"), "--calibration"),
    (("--quantizer", "nope"), "unknown quantizer"),
    (("--calibration", "CAL"), "has no effect"),
    (("--correction-rank", "100000", "--quant", "int4"), "exceeds min(out, in)"),
    (("--quantizer", "mse", "--quant", "nf4"), "affine grid"),
    (("--rom-budget", "1MiB", "--quant", "int4"), "chooses the projections' formats itself"),
    (("--rom-budget", "2KiB"), "smaller than"),
    (("--rom-budget", "lots"), "is not a size"),
])
def test_bad_combinations_are_one_line_errors(hf_checkpoint, calibration, tmp_path, capsys, args, says):
    base, _ = hf_checkpoint
    args = tuple(str(calibration) if a == "CAL" else a for a in args)
    res = run_main(capsys, "compile", base, "-o", tmp_path / "out", *args)
    line = error_line(res) if res.returncode == 2 and "romac: error" in res.stderr else res.stderr
    assert says in line, line
    assert not (tmp_path / "out").exists()


def test_a_pre_quantized_base_keeps_its_codes_unless_told(hf_checkpoint, tmp_path, capsys):
    base, _ = hf_checkpoint
    gptq = write_gptq(base, tmp_path / "gptq-base", bits=4, group_size=64)
    for args in (("--quantizer", "mse"), ("--correction-rank", "4"), ("--rom-budget", "fill")):
        line = error_line(run_main(capsys, "compile", gptq, "-o", tmp_path / "out", *args))
        assert "arrives quantized" in line and "--quant" in line
    # told: re-quantized, and compile says that an adapter trained on the stored base may no longer fit
    res = _compile(capsys, gptq, tmp_path / "re", "--quant", "int4", "--quantizer", "mse")
    assert "may no longer fit" in res.stderr


def test_plan_counts_the_correction_as_compile_keeps_it(hf_checkpoint, tmp_path, capsys):
    base, _ = hf_checkpoint
    out = tmp_path / "out"
    _compile(capsys, base, out, "--quant", "int4", "--correction-rank", "6", "-q")
    compiled = json.loads((out / "report.json").read_text())
    res = run_main(capsys, "plan", base, "--quant", "int4", "--correction-rank", "6", "--json")
    assert res.returncode == 0, res.stderr
    planned = json.loads(res.stdout)
    plan_report = planned.get("report", planned)
    assert plan_report["sram"]["correction"] == compiled["sram"]["correction"]
    assert plan_report["sram"]["longest_context"] == compiled["sram"]["longest_context"]
    line = error_line(run_main(capsys, "plan", base, "--correction-rank", "100000"))
    assert "--correction-rank" in line and "at most" in line
