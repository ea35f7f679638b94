"""Tiles and placement: pack/unpack round trips, storage order, and every tile in its own place in a bank."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from romac.codecs import get_codec
from romac.codecs.tiles import pack_tiles, unpack_tiles
from romac.spec.layout import TileGrid, tile_index, tile_locations, tile_sizes
from romac.spec.plan import Extent


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 150), cols=st.integers(1, 5).map(lambda k: 64 * k),
    tr=st.sampled_from([1, 16, 64]), fmt=st.sampled_from(["int4", "int2", "int8", "nf4", "fp16", "fp32"]),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip(rows, cols, tr, fmt, seed):
    codec = get_codec(fmt, group_size=64, double_quant=False)
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    q = codec.quantize(w)
    grid = TileGrid(rows, cols, tr, 128)
    tiles = pack_tiles(codec.format, q, grid, 8)
    assert [t.size for t in tiles] == tile_sizes(codec.format, grid, 8).tolist()
    assert all(t.size % 8 == 0 for t in tiles)
    back = unpack_tiles(codec.format, tiles, grid, (rows, cols), {})
    np.testing.assert_array_equal(back.codes, q.codes)
    for key in q.params:
        np.testing.assert_array_equal(back.params[key].reshape(q.params[key].shape), q.params[key])
    np.testing.assert_array_equal(codec.dequantize(back), codec.dequantize(q))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 700), tr=st.integers(1, 64), tc=st.sampled_from([8, 64, 128]))
def test_storage_order_is_full_tiles_then_edges_and_tile_index_agrees(rows, cols, tr, tc):
    grid = TileGrid(rows, cols, tr, tc)
    tiles = grid.tiles()
    assert len(tiles) == grid.n_tiles
    assert all((r, c) == (tr, tc) for _, _, r, c in tiles[: grid.n_full])
    assert all((r, c) != (tr, tc) for _, _, r, c in tiles[grid.n_full :])
    assert [tile_index(grid, r0, c0) for r0, c0, _, _ in tiles] == list(range(len(tiles)))
    covered = np.zeros((rows, cols), int)
    for r0, c0, r, c in tiles:
        covered[r0 : r0 + r, c0 : c0 + c] += 1
    assert (covered == 1).all()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), banks=st.integers(1, 40), start=st.integers(0, 39), seed=st.integers(0, 99))
def test_tile_locations_pack_each_bank_without_overlap(n, banks, start, seed):
    start %= banks
    words = np.random.default_rng(seed).integers(1, 9, n)
    bank_of = (start + np.arange(n)) % banks
    per_bank = np.bincount(bank_of, weights=words, minlength=banks).astype(int)
    base = np.random.default_rng(seed + 1).integers(0, 100, banks)
    extents = [Extent(b, int(base[b]), int(per_bank[b])) for b in range(banks) if per_bank[b]]
    bank, offset = tile_locations(words, start, extents, banks, 8)
    assert (bank == bank_of).all()
    for b in range(banks):
        sel = np.flatnonzero(bank == b)
        spans = sorted(zip(offset[sel] // 8, words[sel]))
        pos = int(base[b])
        for o, w in spans:  # contiguous, in storage order, from the extent's start
            assert o == pos
            pos += w
        assert list(sel) == sorted(sel, key=lambda t: offset[t])
