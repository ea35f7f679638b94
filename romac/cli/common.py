"""What every ``romac`` command shares: the command group and the option helpers."""

from __future__ import annotations

import click

from romac import __version__
from romac.errors import RomacError
from romac.passes.options import ROM_BUDGET_FILL


def _ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise RomacError(f"{text!r} is not a comma-separated list of token ids", where="--prompt-ids") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="romac")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compile QLoRA LLaMA checkpoints onto ROM-based LLM accelerators, and run the result."""
    ctx.obj = {"debug": debug}


def _bnb_options(f):
    """The nf4/fp4 (bitsandbytes) parameters, shared by compile and plan."""
    f = click.option("--bnb-cpu-repacked", is_flag=True, default=None,
                     help="nf4/fp4 double quant: reproduce a bitsandbytes checkpoint saved after inference on a CPU "
                          "with AVX512-BF16 (bitsandbytes then rounds the absmax to bfloat16 and re-quantizes it on "
                          "save; the 4-bit codes stay, the double-quant statistics change).")(f)
    f = click.option("--bnb-threads", type=click.IntRange(min=1), default=None,
                     help="nf4/fp4 double quant: the torch thread count bitsandbytes quantized with on the CPU "
                          "(its float32 mean of the absmax depends on it above 32768 blocks; default 1).")(f)
    f = click.option("--double-quant/--no-double-quant", default=None,
                     help="nf4/fp4: also quantize the absmax values (bnb_4bit_use_double_quant; default: on, "
                          "as QLoRA).")(f)
    return click.option("--bnb-blocksize", type=int, default=None,
                        help="nf4/fp4: weights per absmax block, as bitsandbytes' blocksize (32, 64, ... 4096; "
                             "default 64).")(f)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class RomBudget(click.ParamType):
    """``fill`` or a size in bytes with an optional unit (``1.5GiB``, ``900MB``, ``123456``)."""

    name = "SIZE|fill"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == ROM_BUDGET_FILL:
            return value
        text = str(value).strip().lower().replace(" ", "")
        if text == ROM_BUDGET_FILL:
            return ROM_BUDGET_FILL
        number = text.rstrip("kmgib")
        unit = text[len(number):]
        try:
            size = float(number) * _SIZE_UNITS[unit]
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size: use e.g. 1.5GiB, 900MB, a number of bytes, or 'fill'", param, ctx)
        if size <= 0:
            self.fail(f"{value!r}: the budget must be positive", param, ctx)
        return int(size)


def _quantizer_options(f):
    """How the projections' codes are chosen (romac.quantize), shared by compile and plan."""
    f = click.option("--rom-budget", type=RomBudget(), default=None,
                     help="Choose each projection's format (among the target's weight_formats) and correction rank "
                          "(up to --correction-rank) by an integer program minimising the measured error within "
                          "this much B-ROM ('fill': the whole target) and the SRAM left beside the adapters and "
                          "the KV cache.")(f)
    f = click.option("--correction-iters", type=click.IntRange(min=1), default=None,
                     help="Alternations of codes and correction (LoftQ-style; default 1: quantize, then correct).")(f)
    f = click.option("--correction-rank", type=click.IntRange(min=0), default=None, metavar="R",
                     help="Fit a rank-R correction of each projection's quantization error, kept in SRAM and "
                          "applied on every run (activation-weighted with --calibration).")(f)
    f = click.option("--calibration-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
                     help="Use at most this many calibration tokens (sequences of 512).")(f)
    f = click.option("--calibration", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="Calibration data for the quantizer: a text file (encoded with the checkpoint's "
                          "tokenizer) or a JSON list of token ids.")(f)
    return click.option("--quantizer", default=None, metavar="NAME",
                        help="How the projections' codes are chosen on the target's grid: rtn (default), mse, hqq "
                             "(data-free), gptq (needs --calibration).")(f)
