"""Pass ``tile``: cut every stored tensor into tiles of the target's bank geometry.

Requires: ``quantize`` (every stored tensor has ``codec``, ``kind`` and ``shape``).
Guarantees: ``tensors[name]["grid"]`` is a :class:`romac.layout.TileGrid` — matrices cut into
``tile_rows × tile_cols`` tiles (edge tiles smaller), vectors a single tile — and every tile starts on a
parameter-group boundary, so each tile carries exactly the scales of its own weights. A tensor whose
per-tensor constants need their own storage (bitsandbytes' double-quantization statistics) gets a
companion vector tensor ``<name>.qconst`` (fp32: offset, then the nested absmax values).
"""

from __future__ import annotations

from romac.codecs import get_codec
from romac.errors import RomacError
from romac.ir import Model
from romac.layout import TileGrid, constants_length
from romac.targets import Target


def tile(model: Model, target: Target, options) -> Model:
    updates = {}
    fp32 = get_codec("fp32").spec()
    for name, info in model.tensors.items():
        if "codec" not in info:
            continue
        codec = get_codec(**info["codec"])
        shape = info["shape"]
        if info["kind"] == "vector":
            updates[name] = {"grid": TileGrid.for_vector(shape[0])}
            continue
        rows, cols = shape
        if codec.group and target.tile_cols % codec.group:
            raise RomacError(
                f"{codec.name} groups of {codec.group} do not divide the tile width {target.tile_cols}",
                where=f"tensor {name}",
                hint="use a target whose tile_cols is a multiple of the group size",
            )
        if codec.name in ("nf4", "fp4") and cols % codec.group:
            raise RomacError(
                f"in_features {cols} is not a multiple of the {codec.name} blocksize {codec.group}, "
                "so blocks would straddle rows and tiles",
                where=f"tensor {name}",
                hint="quantize this model with a blocksize that divides its hidden sizes",
            )
        updates[name] = {"grid": TileGrid(rows, cols, target.tile_rows, target.tile_cols)}
        n_const = constants_length(codec, shape)
        if n_const:
            updates[f"{name}.qconst"] = {
                "codec": fp32,
                "kind": "vector",
                "shape": (n_const,),
                "grid": TileGrid.for_vector(n_const),
                "constants_of": name,
            }
    return model.with_tensors(updates)
