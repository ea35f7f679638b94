"""What ``romac compile``, ``romac plan`` and ``romac inspect`` print: capacity, SRAM map, performance, plots.

All of it is formatted from the report (``romac.backend.report.build_report``), whose ``performance`` section
is the estimate of ``romac.targets.perf``; :func:`artifacts_report` rebuilds that estimate from an artifact
directory's manifest and program, so ``inspect`` always shows the current model's numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from romac.artifacts import open_artifacts
from romac.errors import RomacError
from romac.spec.isa import decode
from romac.spec.manifest import PROGRAM_BIN, REPORT
from romac.targets import Target
from romac.targets.perf import estimate, workload_from_artifacts


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def capacity_lines(report: dict[str, Any]) -> list[str]:
    """B-ROM and SRAM use, effective bits per weight and the longest context, one fact a line."""
    rom, sram = report["rom"], report["sram"]
    banks = rom["banks"]
    cap = rom["bank_capacity_bits"]
    fullest = max(banks, key=lambda b: b["used_words"])
    emptiest = min(banks, key=lambda b: b["used_words"])
    lines = [
        f"B-ROM   {_mib(rom['used_bytes'])} of {_mib(rom['capacity_bytes'])} ({100 * rom['utilisation']:.1f}%), "
        f"{rom['used_bits']:,} of {rom['capacity_bits']:,} bits in {len(banks)} banks",
        f"        per bank {fullest['used_bits']:,} bits in the fullest (bank {fullest['bank']}, "
        f"{100 * fullest['used_bits'] / cap:.1f}%), {emptiest['used_bits']:,} in the emptiest (bank {emptiest['bank']}) "
        f"of {cap:,}",
    ]
    for fmt, e in report["weights"]["effective_bits_per_weight"].items():
        if not e["parameters"]:
            continue
        extra = ""
        if e.get("code_bits_per_weight") is not None:
            extra = (f" = {e['code_bits_per_weight']:.3f} code + {e['scale_zero_bits_per_weight']:.3f} scale/zero"
                     + (f" + {e['padding_bits_per_weight']:.3f} padding" if e["padding_bits_per_weight"] else ""))
        lines.append(f"        {fmt:5s} {e['parameters']:>14,} weights at {e['bits_per_weight']:.4f} bits/weight{extra}")
    kv = sram["kv_cache"]
    lines.append(f"SRAM    {_mib(sram['adapter_region_bytes'] + kv['bytes'])} used of {_mib(sram['capacity_bytes'])} "
                 f"({_mb(sram['capacity_bytes'])}); free {_mib(sram['free_bytes'])}")
    for name, ad in sram["adapters"].items():
        lines.append(f"        adapter {name!r}: rank {ad['rank']}, {ad['slots']} projections, {ad['bytes']:,} B "
                     f"({_mib(ad['bytes'])}); alone it leaves room for {ad['longest_context_alone']:,} tokens")
    if not sram["adapters"]:
        lines.append("        no adapters")
    corr = sram.get("correction")
    if corr is not None:
        lines.append(f"        correction of the base: rank up to {corr['max_rank']} on {corr['slots']} projections, "
                     f"{corr['bytes']:,} B ({_mib(corr['bytes'])}), resident on every run")
    lines.append(f"        KV cache ({kv['format']}): {kv['max_context']:,} tokens × {kv['bytes_per_token']:,} B = "
                 f"{kv['bytes']:,} B at offset {kv['offset']:,}")
    lines.append(f"        longest context that fits beside these adapters: {sram['longest_context']:,} tokens")
    return lines


def performance_lines(perf: dict[str, Any] | None, target_name: str = "") -> list[str]:
    if perf is None:
        return [f"performance: target {target_name!r} has no [perf] section (see targets/roma-3b-w4.toml)"]
    ad = perf["adapter"]
    lines = [f"performance ({perf['model']}; {perf['clock_mhz']:g} MHz; "
             f"{'adapter ' + repr(ad['name']) + ', rank ' + str(ad['rank']) if ad else 'no adapter'})"]
    lines.append(f"  {'context':>8s} {'cycles/token':>13s} {'tokens/s':>10s} {'mJ/token':>9s} {'W':>6s}  "
                 "cycles: latency / L-Units / H-Units / attention / vector")
    for d in perf["decode"]:
        c = d["cycles_by_unit"]
        mark = "" if d["fits"] else "  (does not fit the SRAM)"
        lines.append(f"  {d['context']:>8,} {d['cycles']:>13,.0f} {d['tokens_per_s']:>10,.0f} {d['energy_per_token_mj']:>9.3g} "
                     f"{d['power_w']:>6.1f}  {c['latency']:.0f} / {c['l_units']:.0f} / {c['h_units']:.0f} / "
                     f"{c['attention']:.0f} / {c['vector']:.0f}{mark}")
    lines.append("  time to first token: " + ", ".join(
        f"{t['prompt_tokens']:,} tokens {t['ms']:.3f} ms" + ("" if t["fits"] else " (does not fit)") for t in perf["ttft"]))
    a = perf.get("area")
    if a:
        parts = ", ".join(f"{k.replace('_', ' ')} {v['mm2']:.1f} mm² ({100 * v['share']:.1f}%)" for k, v in a["parts"].items())
        lines.append(f"  area {a['total_mm2']:.1f} mm²: {parts}")
    return lines


def performance_brief(perf: dict[str, Any] | None, target_name: str = "") -> list[str]:
    """Two lines for the compile summary: decode speed at the compiled context, and time to first token."""
    if perf is None:
        return [f"no performance estimate: target {target_name!r} has no [perf] section"]
    pick = [d for d in perf["decode"] if d["context"] in (256, perf["compiled_context"])]
    speed = ", ".join(f"{d['tokens_per_s']:,.0f} tokens/s ({d['energy_per_token_mj']:.3g} mJ/token) at context "
                      f"{d['context']:,}" for d in pick)
    first = ", ".join(f"{t['ms']:.3g} ms for {t['prompt_tokens']:,} tokens" for t in perf["ttft"]
                      if t["prompt_tokens"] > 1 and t["fits"])
    return [f"speed   decode {speed}",
            f"        time to first token {first}   (romac inspect OUT: the full estimate)"]


def artifacts_report(artifacts: str | Path, check_hashes: bool = True) -> dict[str, Any]:
    """The report of an artifact directory, with its ``performance`` recomputed from manifest and program."""
    manifest = open_artifacts(artifacts, check_hashes=check_hashes)
    root = Path(manifest.root)
    report = json.loads((root / REPORT).read_text())
    if Target.from_dict(manifest.target).perf is not None:
        program = decode((root / PROGRAM_BIN).read_bytes(), source=str(root / PROGRAM_BIN))
        report["performance"] = estimate(workload_from_artifacts(manifest, program))
    else:
        report["performance"] = None
    return report


def _tokens(x: float, _pos=None) -> str:
    return f"{x / 1024:g}K" if x >= 1024 else f"{x:g}"


def write_plots(report: dict[str, Any], out_dir: str | Path,
                reference: tuple[str, list[tuple[int, float]]] | None = None) -> list[Path]:
    """PNG plots: bank utilisation, and tokens/s against context length (needs matplotlib: ``romac[plot]``).

    ``reference``: (label, [(context, tokens/s), ...]) drawn as points beside the model's curve.
    """
    try:
        import matplotlib  # optional (romac[plot]): only --plots needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise RomacError("plotting needs matplotlib", where="--plots", hint="pip install 'romac[plot]'") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    name = report["target"]
    banks = report["rom"]["banks"]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=120)
    util = [100 * b["utilisation"] for b in banks]
    ax.bar([b["bank"] for b in banks], util, width=1.0, color="#3b75af", edgecolor="none")
    ax.axhline(100 * report["rom"]["utilisation"], color="#c44e52", lw=1, ls="--",
               label=f"overall {100 * report['rom']['utilisation']:.1f}% (banks {min(util):.2f}% to {max(util):.2f}%)")
    ax.set_xlim(-0.5, len(banks) - 0.5)
    ax.set_ylim(0, 105)
    ax.set_xlabel("B-ROM bank (L-Unit)")
    ax.set_ylabel("used (% of bank)")
    ax.set_title(f"{name}: B-ROM bank utilisation ({len(banks)} banks, "
                 f"{report['rom']['used_bytes'] / 2**20:,.0f} of {report['rom']['capacity_bytes'] / 2**20:,.0f} MiB)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    p = out / "bank_utilisation.png"
    fig.savefig(p)
    plt.close(fig)
    written.append(p)
    perf = report.get("performance")
    if perf:
        cur = perf["curve"]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        ax.plot(cur["context"], cur["tokens_per_s"], color="#3b75af", lw=2, label="romac model (decode)")
        if reference:
            label, pts = reference
            ax.plot([c for c, _ in pts], [v for _, v in pts], "o", color="#c44e52", ms=6, label=label)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:,.0f}"))
        ax.set_xlabel("context length (tokens in the KV cache)")
        ax.set_ylabel("decode tokens/s")
        ax.grid(True, which="both", alpha=0.3)
        fits = perf["max_context_that_fits"]
        ax.axvline(fits, color="#888888", lw=1, ls=":", label=f"longest context that fits: {fits:,}")
        ad = perf["adapter"]
        ax.set_title(f"{name}: decode speed vs context"
                     + (f" (rank-{ad['rank']} adapter)" if ad else ""))
        ax.set_ylim(0, max(cur["tokens_per_s"] + [v for _, v in (reference[1] if reference else [])]) * 1.1)
        ax.legend()
        fig.tight_layout()
        p = out / "tokens_per_s.png"
        fig.savefig(p)
        plt.close(fig)
        written.append(p)
    return written
