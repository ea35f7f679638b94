"""Capacity planning without weights: the full compile plan (placement, SRAM map, program, report and the
performance estimate) of a model whose weight data is never read.

The passes plan from shapes and formats only (``romac.passes``), so running them on a Model whose weight
handles refuse to load gives exactly the plan ``romac compile`` would write, in well under a second for an 8B
model. :func:`plan_model` does that for any Model (a checkpoint opened lazily by a front-end is never read
either); :func:`shape_model` and :func:`shape_adapter` build a Model from a config alone, for "what if" planning
of a model you do not have (``romac plan --config``, the paper-comparison tests).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Sequence

from romac.backend.report import build_report
from romac.errors import RomacError
from romac.frontend import attach_adapters, load_model
from romac.frontend.hf_config import parse_hf_config, read_config_json
from romac.ir import PROJECTIONS, LazyWeight, LoraAdapter, Model, ModelConfig, expected_shape, make_model, projection_tensor, tensor_names
from romac.passes import CompileOptions, run_pipeline
from romac.targets import Target, load_target


class WeightsNotLoaded(RuntimeError):
    """Raised by a shape-only weight when something tries to read it (a bug: planning must not read data)."""


def _refuse(name: str):
    def load(*_args):
        raise WeightsNotLoaded(f"{name}: a planning model has shapes only; its weights cannot be read")

    return load


def shape_weight(name: str, shape: tuple[int, ...]) -> LazyWeight:
    """A weight handle with a shape and no data."""
    return LazyWeight(name, tuple(shape), _refuse(name), source="<shape only>", row_loader=_refuse(name))


def shape_adapter(config: ModelConfig, name: str, rank: int, alpha: float | None = None,
                  modules: Iterable[str] = PROJECTIONS, use_rslora: bool = False) -> LoraAdapter:
    """A LoRA adapter of ``rank`` on ``modules`` of every layer, shapes only (alpha defaults to 2 × rank)."""
    modules = tuple(modules)
    bad = [m for m in modules if m not in PROJECTIONS]
    if bad:
        raise RomacError(f"unknown projection {bad[0]!r}", where=f"adapter {name}", hint=f"choose from {', '.join(PROJECTIONS)}")
    if rank < 1:
        raise RomacError(f"LoRA rank must be positive, got {rank}", where=f"adapter {name}")
    weights = {}
    for layer in range(config.num_layers):
        for m in modules:
            t = projection_tensor(layer, m)
            out_f, in_f = config.projection_shape(m)
            weights[t] = (shape_weight(f"{t}.lora_A", (rank, in_f)), shape_weight(f"{t}.lora_B", (out_f, rank)))
    return LoraAdapter(name, rank, float(2 * rank if alpha is None else alpha), use_rslora, weights)


def shape_model(config: ModelConfig, adapters: Sequence[LoraAdapter] = ()) -> Model:
    """A Model with ``config``'s exact tensor shapes and no weight data."""
    weights = {n: shape_weight(n, expected_shape(config, n)) for n in tensor_names(config)}
    return make_model(config, weights, tuple(adapters), {"format": "shape-only"})


def plan_model(model: Model, target: Target | str | None = None,
               options: CompileOptions = CompileOptions()) -> tuple[Model, dict]:
    """Run every pass (no emitter): the compiled model (its plan complete) and its report.

    Raises :class:`romac.errors.CapacityError` exactly where ``romac compile`` would.
    """
    if not isinstance(target, Target):
        target = load_target(target)
    planned = run_pipeline(model, target, options)
    return planned, build_report(planned, target)


def plan_checkpoint(model_spec: str | None, adapters: Sequence[str] = (), target: Target | str | None = None,
                    options: CompileOptions = CompileOptions(), lora_ranks: Sequence[int] = (),
                    correction_rank: int = 0) -> tuple[Model, dict]:
    """Plan a checkpoint (opened lazily, never read) or a bare ``config.json`` (shapes only), with PEFT adapters
    (``NAME=PATH``) and/or shape-only adapters of the given ranks on all seven projections, and the SRAM of a
    rank-``correction_rank`` correction of every projection (what ``compile --correction-rank`` would keep)."""
    if model_spec and str(model_spec).endswith(".json") and Path(model_spec).is_file():
        model = shape_model(parse_hf_config(read_config_json(Path(model_spec)), where=str(model_spec)))
    else:
        model = load_model(model_spec, with_builtin_adapter=not adapters and not lora_ranks)
    if adapters:
        model = attach_adapters(model, adapters)
    if lora_ranks:
        extra = tuple(shape_adapter(model.config, f"rank{r}", int(r)) for r in lora_ranks)
        model = dataclasses.replace(model, adapters=tuple(model.adapters) + extra)
    if correction_rank:
        top = min(min(model.config.projection_shape(m)) for m in PROJECTIONS)
        if correction_rank > top:
            raise RomacError(f"correction rank {correction_rank} exceeds the smallest projection's min(out, in) = "
                             f"{top}", where="--correction-rank", hint=f"use a rank of at most {top}")
        model = dataclasses.replace(model, correction=shape_adapter(model.config, "correction", correction_rank,
                                                                    alpha=correction_rank))
    return plan_model(model, target, options)
