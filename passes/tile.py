"""Pass ``tile``: cut every stored tensor into tiles of the target's bank geometry.

Requires: ``formats``.
Provides: ``grids`` — every tensor plan has a :class:`romac.spec.layout.TileGrid`: matrices cut into
``tile_rows × tile_cols`` tiles (edge tiles smaller), vectors a single tile — and every tile starts on a
parameter-group boundary, so each tile carries exactly the parameters of its own weights. A tensor whose
per-tensor constants need their own storage (bitsandbytes' double-quantization statistics) gets a companion
fp32 vector ``<name>.qconst`` (offset, then the nested absmax values), planned after all the tensors.
"""

from __future__ import annotations

from romac.errors import RomacError
from romac.ir import Model
from romac.passes.options import CompileOptions
from romac.spec.formats import FP32
from romac.spec.layout import CONSTANTS_SUFFIX, TileGrid
from romac.spec.plan import VECTOR, TensorPlan
from romac.targets import Target

REQUIRES = ("formats",)
PROVIDES = ("grids",)


def tile(model: Model, target: Target, options: CompileOptions) -> Model:
    tensors: dict[str, TensorPlan] = {}
    constants: dict[str, TensorPlan] = {}
    for name, t in model.plan.tensors.items():
        fmt = t.format
        if t.kind == VECTOR:
            tensors[name] = t.with_grid(TileGrid.for_vector(t.shape[0]))
            continue
        rows, cols = t.shape
        if fmt.group and target.tile_cols % fmt.group:
            raise RomacError(
                f"{fmt.name} groups of {fmt.group} do not divide the tile width {target.tile_cols}",
                where=f"tensor {name}",
                hint="use a target whose tile_cols is a multiple of the group size",
            )
        if fmt.flat_blocks and cols % fmt.group:
            raise RomacError(
                f"in_features {cols} is not a multiple of the {fmt.name} blocksize {fmt.group}, "
                "so blocks would straddle rows and tiles",
                where=f"tensor {name}",
                hint="quantize this model with a blocksize that divides its hidden sizes",
            )
        tensors[name] = t.with_grid(TileGrid(rows, cols, target.tile_rows, target.tile_cols))
        n_const = fmt.constants_length(t.shape)
        if n_const:
            cname = name + CONSTANTS_SUFFIX
            constants[cname] = TensorPlan(cname, VECTOR, (n_const,), FP32(), TileGrid.for_vector(n_const), name)
    return model.with_plan(tensors={**tensors, **constants})
