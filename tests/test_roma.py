"""The ROMA chip targets, capacity planning and the performance/area model, checked against the paper.

Paper figures: ../shared/FACTS.md §1 (ROMA, arXiv 2503.12988; secondary summaries). Nothing here compiles a
3B model: the model runs on *plans* (every pass, no emitter) of shape-only models with the real models' shapes,
which never read a weight. docs/roma.md sets the same numbers side by side.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from benchmarks.synthetic import config_for
from romac.errors import CapacityError, RomacError
from romac.passes import CompileOptions
from romac.planning import WeightsNotLoaded, plan_model, shape_adapter, shape_model
from romac.targets import load_target, target_from_dict
from romac.targets.perf import decode_point, estimate, ttft_point, workload_from_plan

TOLERANCE = 0.15  # the bound for every paper comparison
PAPER_DECODE = {256: 20_078, 512: 18_703, 1024: 12_840, 2048: 8_533}  # 3B-W4 tokens/s vs context
PAPER_TTFT_MS = {256: 5.6, 4096: 140.2}  # 3B-W4, rank-16 LoRA
PAPER_SRAM_TABLE = [(64, 16, 736), (128, 16, 1_600), (256, 16, 3_808), (64, 64, 0)]  # MB, rank -> context
MB = 10**6  # the paper's MB (docs/roma.md: why not MiB)


def _plan(model_name: str, target, rank: int | None = 16, options: CompileOptions = CompileOptions()):
    cfg = config_for(model_name)
    adapters = [shape_adapter(cfg, "chat", rank)] if rank else []
    return plan_model(shape_model(cfg, adapters), target, options)


@pytest.fixture(scope="module")
def w3b():
    return workload_from_plan(_plan("llama-3.2-3b", "roma-3b-w4")[0], load_target("roma-3b-w4"))


def _close(model: float, paper: float) -> None:
    assert abs(model / paper - 1) <= TOLERANCE, f"model {model:,.1f} vs paper {paper:,.1f} ({100 * (model / paper - 1):+.1f}%)"


# ---- the targets ---------------------------------------------------------------------------------------------


def test_the_two_roma_targets_are_one_chip():
    a, b = load_target("roma-3b-w4"), load_target("roma-8b-w2")
    for f in ("clock_mhz", "banks", "bank_words", "word_bits", "tile_rows", "tile_cols", "sram_bytes", "group_size",
              "lora", "kv_cache", "perf", "area"):
        assert getattr(a, f) == getattr(b, f), f
    assert (a.weights, b.weights) == ("int4", "int2")
    p = a.perf
    assert (p.mesh_rows, p.mesh_cols, p.vector_lanes) == (17, 16, 16)  # paper: 17x16 mesh, 1x16 vector unit
    assert a.clock_mhz == 500 and a.group_size == 128 and a.lora == "fp8_e4m3"
    assert a.sram_bytes == 304 * MB


def test_perf_section_is_validated(tmp_path):
    from romac.targets import tomllib

    from romac.targets import TARGET_DIR

    data = tomllib.loads((TARGET_DIR / "roma-3b-w4.toml").read_text())
    bad = json.loads(json.dumps(data))
    del bad["perf"]["h_units"]
    with pytest.raises(RomacError, match=r"\[perf\] h_units: field is missing"):
        target_from_dict(bad, "t.toml")
    bad = json.loads(json.dumps(data))
    bad["perf"]["h_unitz"] = 3
    with pytest.raises(RomacError, match=r"\[perf\] h_unitz: unknown field"):
        target_from_dict(bad, "t.toml")
    bad = json.loads(json.dumps(data))
    bad["perf"]["h_units"] = 47
    with pytest.raises(RomacError, match=r"\[perf\] mesh_rows: 208 L-Units"):
        target_from_dict(bad, "t.toml")
    bad = json.loads(json.dumps(data))
    bad["area"]["sram_um2_per_bit"] = "small"
    with pytest.raises(RomacError, match=r"\[area\] sram_um2_per_bit: must be a float"):
        target_from_dict(bad, "t.toml")
    no_perf = {k: v for k, v in data.items() if k not in ("perf", "area")}
    assert target_from_dict(no_perf).perf is None


# ---- planning without weights, and both reference workloads fit ----------------------------------------------


def test_planning_never_reads_a_weight():
    cfg = config_for("llama-3.2-3b")
    m = shape_model(cfg, [shape_adapter(cfg, "chat", 16)])
    with pytest.raises(WeightsNotLoaded):
        m.weights["layers.0.mlp.up_proj"].load()
    plan, rep = plan_model(m, "roma-3b-w4")  # would raise if any pass touched data
    assert rep["performance"]["decode"] and rep["rom"]["used_bytes"] > 1.6e9


@pytest.mark.parametrize("model,target,fmt,bits", [("llama-3.2-3b", "roma-3b-w4", "int4", 4 + 20 / 128),
                                                   ("llama-3-8b", "roma-8b-w2", "int2", 2 + 18 / 128)])
def test_reference_workloads_fit_their_chips(model, target, fmt, bits):
    rep = _plan(model, target)[1]
    e = rep["weights"]["effective_bits_per_weight"][fmt]
    assert e["bits_per_weight"] == pytest.approx(bits)  # FP16 scale + k-bit zero per 128, no padding
    assert e["code_bits_per_weight"] == fmt_bits(fmt) and e["padding_bits_per_weight"] == 0
    assert rep["rom"]["utilisation"] < 1 and rep["rom"]["used_bits"] == sum(b["used_bits"] for b in rep["rom"]["banks"])
    assert rep["sram"]["adapters"]["chat"]["rank"] == 16


def fmt_bits(fmt: str) -> int:
    return int(fmt[3:])


def test_8b_at_4_bits_does_not_fit_and_the_error_names_the_knob():
    with pytest.raises(CapacityError) as e:
        _plan("llama-3-8b", "roma-3b-w4")
    msg = str(e.value)
    assert "over by" in msg and "--quant int2" in msg and "(fits)" in msg and "bigger target" in msg


def test_kv_cache_too_long_names_the_amount_and_the_knobs():
    with pytest.raises(CapacityError) as e:
        _plan("llama-3-8b", "roma-8b-w2", options=CompileOptions(max_context=4096))
    msg = str(e.value)
    assert "--max-context 3998 or less" in msg and "short by" in msg and "LoRA rank" in msg


def test_adapter_too_big_names_the_rank_that_fits():
    t = dataclasses.replace(load_target("roma-3b-w4"), sram_bytes=64 * MB)
    with pytest.raises(CapacityError) as e:
        _plan("llama-3.2-3b", t, rank=64)
    msg = str(e.value)
    assert "rank 64" in msg and "over by" in msg and "rank 42 or less" in msg


# ---- checked against the paper: one parameter set, one test per published point ------------------------------


@pytest.mark.parametrize("context", sorted(PAPER_DECODE))
def test_decode_tokens_per_s_matches_paper(w3b, context):
    _close(decode_point(w3b, context)["tokens_per_s"], PAPER_DECODE[context])


@pytest.mark.parametrize("prompt", sorted(PAPER_TTFT_MS))
def test_time_to_first_token_matches_paper(w3b, prompt):
    _close(ttft_point(w3b, prompt)["ms"], PAPER_TTFT_MS[prompt])


@pytest.mark.parametrize("mb,rank,paper", PAPER_SRAM_TABLE)
def test_sram_table_matches_paper(mb, rank, paper):
    t = dataclasses.replace(load_target("roma-3b-w4"), sram_bytes=mb * MB)
    try:
        fits = _plan("llama-3.2-3b", t, rank=rank, options=CompileOptions(max_context=1))[1][
            "sram"]["longest_context"]
    except CapacityError as e:
        assert "alone needs" in str(e)
        fits = 0
    if paper == 0:
        assert fits == 0
    else:
        _close(fits, paper)


def test_power_and_area_match_paper(w3b):
    assert abs(decode_point(w3b, 256)["power_w"] / 33.1 - 1) < 0.05  # paper: 33.1 W (the energy calibration)
    a = estimate(w3b)["area"]
    assert a["total_mm2"] == pytest.approx(503.7, rel=0.01)
    paper = {"l_units": 0.732, "h_units": 0.166, "vector_unit": 0.014, "other": 0.048}
    for part, share in paper.items():
        assert a["parts"][part]["share"] == pytest.approx(share, abs=0.005), part


def test_model_shape_decode_slows_with_context_and_ttft_grows(w3b):
    est = estimate(w3b)
    tps = [d["tokens_per_s"] for d in est["decode"]]
    assert tps == sorted(tps, reverse=True)
    ttft = [t["ms"] for t in est["ttft"]]
    assert ttft == sorted(ttft)
    assert est["max_context_that_fits"] == 4877 and all(d["fits"] for d in est["decode"])
    assert est["adapter"] == {"name": "chat", "rank": 16}
    # more LoRA rank costs time, fewer bits per weight save it: the model reads the plan, not a name
    w64 = workload_from_plan(_plan("llama-3.2-3b", "roma-3b-w4", rank=64, options=CompileOptions(max_context=2048))[0],
                             load_target("roma-3b-w4"))
    assert decode_point(w64, 256)["cycles"] > decode_point(w3b, 256)["cycles"]
    w2 = workload_from_plan(_plan("llama-3.2-3b", "roma-3b-w4", options=CompileOptions(quant="int2"))[0],
                            load_target("roma-3b-w4"))
    assert decode_point(w2, 256)["cycles_by_unit"]["l_units"] < decode_point(w3b, 256)["cycles_by_unit"]["l_units"]


# ---- from artifacts: the same numbers, printed and plotted ----------------------------------------------------


def test_inspect_recomputes_the_compiled_estimate(tmp_path):
    from romac.summary import artifacts_report

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "romac.cli", "compile", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stdout and "longest context" in proc.stdout
    stored = json.loads((out / "report.json").read_text())["performance"]
    assert artifacts_report(out)["performance"] == stored
    js = subprocess.run([sys.executable, "-m", "romac.cli", "inspect", str(out), "--json", "--plots", str(tmp_path / "p")],
                        capture_output=True, text=True)
    assert js.returncode == 0, js.stderr
    rep = json.loads(js.stdout)
    assert set(rep["performance"]) >= {"decode", "ttft", "curve", "area", "per_token", "max_context_that_fits"}
    assert (tmp_path / "p" / "bank_utilisation.png").stat().st_size > 1000
    assert (tmp_path / "p" / "tokens_per_s.png").stat().st_size > 1000
    text = subprocess.run([sys.executable, "-m", "romac.cli", "inspect", str(out)], capture_output=True, text=True).stdout
    assert "time to first token" in text and "area" in text and "B-ROM" in text


def test_plots_without_matplotlib_is_one_clear_error(monkeypatch, tmp_path, w3b):
    from romac.summary import write_plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RomacError, match=r"matplotlib.*pip install 'romac\[plot\]'"):
        write_plots({"target": "x"}, tmp_path)


def test_plan_command_from_a_config_json(tmp_path):
    from benchmarks.synthetic import SHAPES

    s = SHAPES["llama-3.2-3b"]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": s["vocab_size"],
           "hidden_size": s["hidden_size"], "intermediate_size": s["intermediate_size"],
           "num_hidden_layers": s["num_layers"], "num_attention_heads": s["num_heads"],
           "num_key_value_heads": s["num_kv_heads"], "head_dim": s["head_dim"], "tie_word_embeddings": True,
           "rope_theta": 500000.0, "rms_norm_eps": 1e-5}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "romac.cli", "plan", str(path), "--target", "roma-3b-w4",
                           "--lora-rank", "16", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["sram"]["longest_context"] == 4877
    assert not list(tmp_path.iterdir())[1:], "plan writes nothing"
    bad = subprocess.run([sys.executable, "-m", "romac.cli", "plan", str(path), "--target", "roma-3b-w4",
                          "--lora-rank", "16", "--max-context", "9000"], capture_output=True, text=True)
    assert bad.returncode == 2 and "romac: error:" in bad.stderr and "--max-context 4877 or less" in bad.stderr
