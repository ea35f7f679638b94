"""B-ROM: the bank images, and decoding a placed region back into the values it holds.

Each region is decoded once, when first used, into a float32 array (the cache a real L-Unit does not need:
it decodes on the fly). Decoding reads the tiles from the banks exactly where the manifest's extents and
:mod:`romac.spec.layout` put them, and applies the codec's dequantization.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from romac.codecs import QuantTensor, codec_for
from romac.codecs.tiles import unpack_constants, unpack_tiles
from romac.spec.layout import CONSTANTS_SUFFIX, tile_locations, tile_sizes
from romac.spec.manifest import Manifest, bank_file
from romac.spec.plan import MATRIX, VECTOR, Region


class Rom:
    def __init__(self, root: Path, manifest: Manifest) -> None:
        banks = manifest.banks
        self.word_bytes = banks.word_bytes
        self.n_banks = banks.count
        self.banks = [
            np.memmap(root / bank_file(b, self.n_banks), dtype=np.uint8, mode="r") for b in range(self.n_banks)
        ]
        self.regions = manifest.regions
        self.index = manifest.region_ids()
        self._cache: dict[int, np.ndarray] = {}

    def tile_places(self, region: Region) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bank, byte offset and byte size of every tile of a region, in storage order."""
        sizes = tile_sizes(region.format, region.grid, self.word_bytes)
        bank, offset = tile_locations(sizes // self.word_bytes, region.start_bank, region.extents, self.n_banks,
                                      self.word_bytes)
        return bank, offset, sizes

    def tiles(self, region: Region) -> list[np.ndarray]:
        """The bytes of every tile of a region, in storage order, read from the bank images."""
        bank, offset, sizes = self.tile_places(region)
        return [self.banks[b][o : o + s] for b, o, s in zip(bank.tolist(), offset.tolist(), sizes.tolist())]

    def quantized(self, rid: int) -> QuantTensor:
        """The region's codes and parameters as stored."""
        region = self.regions[rid]
        constants = {}
        cname = region.name + CONSTANTS_SUFFIX
        if cname in self.index:
            constants = unpack_constants(self.value(self.index[cname]).reshape(-1))
        shape = tuple(region.shape)
        return unpack_tiles(region.format, self.tiles(region), region.grid,
                            shape if region.kind == MATRIX else (1, shape[0]), constants)

    def value(self, rid: int, cache: bool = True) -> np.ndarray:
        """The region's values as float32 (matrices [out, in], vectors [n]), decoded once and cached.

        ``cache=False`` decodes without keeping the result (for a caller that keeps its own, transposed, copy);
        a region that is already cached is returned from the cache either way.
        """
        w = self._cache.get(rid)
        if w is None:
            w = codec_for(self.regions[rid].format).dequantize(self.quantized(rid)).astype(np.float32, copy=False)
            if self.regions[rid].kind == VECTOR:
                w = w.reshape(-1)
            w = np.ascontiguousarray(w)
            if cache:
                self._cache[rid] = w
        return w
