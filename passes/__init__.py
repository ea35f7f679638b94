"""The compiler's passes, in build order. Each is a function ``(model, target, options) -> model`` over the IR that
fills part of the model's plan (:class:`romac.spec.plan.Plan`), and says which parts it needs (``requires``) and
which it fills (``provides``). :func:`run_pipeline` checks both around every pass and validates the whole plan
after each one (:mod:`romac.passes.check`), so a pass that forgets or breaks a field fails at the pass, not in
the emitter.

No pass mutates its input or holds weight data: they plan from shapes and formats, and the emitter streams
the weights through the plan one matrix at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from romac.ir import Model
from romac.passes import partition, quantize, schedule, sram_layout, tile
from romac.passes.check import PLAN_PARTS, check_plan, missing_parts
from romac.passes.options import CompileOptions
from romac.targets import Target

__all__ = ["CompileOptions", "Pass", "pipeline", "run_pipeline"]


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Model, Target, CompileOptions], Model]
    requires: tuple[str, ...]
    provides: tuple[str, ...]

    def __post_init__(self) -> None:
        assert set(self.requires) | set(self.provides) <= set(PLAN_PARTS), (self.name, self.requires, self.provides)


def pipeline() -> list[Pass]:
    """The passes in the order they run."""
    return [Pass(m.__name__.rsplit(".", 1)[1], getattr(m, m.__name__.rsplit(".", 1)[1]), m.REQUIRES, m.PROVIDES)
            for m in (quantize, tile, partition, sram_layout, schedule)]


class PassContractError(AssertionError):
    """A pass ran without what it requires, or did not provide what it promised (a bug in romac, not the input)."""


def run_pipeline(model: Model, target: Target, options: CompileOptions = CompileOptions()) -> Model:
    """Run every pass; the result carries the complete plan the emitter writes."""
    for p in pipeline():
        absent = missing_parts(model.plan, p.requires)
        if absent:
            raise PassContractError(f"pass {p.name!r} requires {', '.join(absent)}, which no earlier pass provided")
        model = p.run(model, target, options)
        absent = missing_parts(model.plan, p.provides)
        if absent:
            raise PassContractError(f"pass {p.name!r} did not provide {', '.join(absent)}")
        check_plan(model, target, after=p.name)
    return model
