"""B-ROM: the bank images, and decoding a placed region back into the values it holds.

Each region is decoded once, when first used, into a float32 array (the cache a real L-Unit does not need:
it decodes on the fly). Decoding reads the tiles from the banks exactly where the manifest's extents and
:mod:`romac.layout` put them, and applies the codec's dequantization.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from romac.artifacts import bank_file
from romac.codecs import get_codec
from romac.layout import TileGrid, tile_locations, tile_sizes, unpack_constants, unpack_tiles


class Rom:
    def __init__(self, root: Path, manifest: dict) -> None:
        banks = manifest["banks"]
        self.word_bytes = banks["word_bits"] // 8
        self.n_banks = banks["count"]
        self.banks = [
            np.memmap(root / bank_file(b, self.n_banks), dtype=np.uint8, mode="r") for b in range(self.n_banks)
        ]
        self.regions = manifest["regions"]
        self.index = {r["name"]: i for i, r in enumerate(self.regions)}
        self._cache: dict[int, np.ndarray] = {}
        self.reads = np.zeros(self.n_banks, np.int64)  # bytes read per bank (for --trace)

    def _grid(self, region: dict) -> TileGrid:
        shape = region["shape"]
        if region["kind"] == "vector":
            return TileGrid.for_vector(shape[0])
        return TileGrid(shape[0], shape[1], *region["tile"])

    def tiles(self, region: dict) -> tuple[list[np.ndarray], TileGrid]:
        """The bytes of every tile of a region, in storage order, read from the bank images."""
        codec = get_codec(**region["codec"])
        grid = self._grid(region)
        sizes = tile_sizes(codec, grid, self.word_bytes)
        bank, offset = tile_locations(
            sizes // self.word_bytes, region["start_bank"], region["extents"], self.n_banks, self.word_bytes
        )
        out = [self.banks[b][o : o + s] for b, o, s in zip(bank.tolist(), offset.tolist(), sizes.tolist())]
        np.add.at(self.reads, bank, sizes)
        return out, grid

    def quantized(self, rid: int):
        """The region's codes and parameters as stored (a romac.codecs.QuantTensor)."""
        region = self.regions[rid]
        codec = get_codec(**region["codec"])
        tiles, grid = self.tiles(region)
        constants = {}
        cname = f"{region['name']}.qconst"
        if cname in self.index:
            constants = unpack_constants(self.value(self.index[cname]).reshape(-1))
        shape = tuple(region["shape"])
        q = unpack_tiles(codec, tiles, grid, shape if region["kind"] == "matrix" else (1, shape[0]), constants)
        return codec, q

    def value(self, rid: int, cache: bool = True) -> np.ndarray:
        """The region's values as float32 (matrices [out, in], vectors [n]), decoded once and cached.

        ``cache=False`` decodes without keeping the result (for a caller that keeps its own, transposed, copy);
        a region that is already cached is returned from the cache either way.
        """
        w = self._cache.get(rid)
        if w is None:
            codec, q = self.quantized(rid)
            w = codec.dequantize(q).astype(np.float32, copy=False)
            if self.regions[rid]["kind"] == "vector":
                w = w.reshape(-1)
            w = np.ascontiguousarray(w)
            if cache:
                self._cache[rid] = w
        return w
