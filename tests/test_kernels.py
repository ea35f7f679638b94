"""The native kernels (romac.emulator.kernels) against the numpy definition (``Rom.value``, then ``x @ W^T``), for
every weight format, at the tile edges, for one and many positions, on one and two threads.

The bound: a kernel output sums the same float32 products ``w·x`` as the definition (every ``w`` is bit for bit the
codec's), in a fixed order of depth ``m = ⌈in/G⌉ + ⌈log₂ G⌉`` (the module doc), so ``|y − x·Wᵀ| ≤ γ_m Σ|w||x|``
against the exact product; BLAS, in its own order over ``n = in`` terms, is within ``γ_n Σ|w||x|`` of it. Beyond
that, results must be bit-identical whatever the thread count, from run to run, and between a position computed
alone and the same position inside a prefill.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import romac.emulator.kernels as K
from romac.emulator import Machine
from romac.spec.plan import MATRIX
from tests.conftest import kernel_case_machine, on_threads

U = 2.0 ** -24  # float32 unit roundoff

# (id, model shape, target changes, compile options). Shapes are chosen so that rows and columns are not
# multiples of the tile, affine groups end partial at the row's end, and bitsandbytes' nested blocks of 256
# absmax values end partial.
_AFFINE_SHAPE = dict(vocab_size=203, hidden_size=200, intermediate_size=136)
_BNB_SHAPE = dict(vocab_size=200, hidden_size=192, intermediate_size=320)
CASES = [
    ("int4-g128", _AFFINE_SHAPE, dict(tile_rows=16, tile_cols=128), dict(quant="int4")),
    ("int2-g128", _AFFINE_SHAPE, dict(tile_rows=16, tile_cols=128), dict(quant="int2")),
    ("int8-g128", _AFFINE_SHAPE, dict(tile_rows=16, tile_cols=128), dict(quant="int8")),
    ("int4-g24", _AFFINE_SHAPE, dict(tile_rows=8, tile_cols=48, group_size=24), dict(quant="int4")),
    ("int4-g3", _AFFINE_SHAPE, dict(tile_rows=8, tile_cols=24, group_size=3), dict(quant="int4")),  # bytes split
    ("int2-g6", _AFFINE_SHAPE, dict(tile_rows=8, tile_cols=48, group_size=6), dict(quant="int2")),  # bytes split
    ("nf4-dq", _BNB_SHAPE, dict(tile_rows=16, tile_cols=128), dict(quant="nf4")),
    ("fp4-b32", _BNB_SHAPE, dict(tile_rows=16, tile_cols=128), dict(quant="fp4", bnb_blocksize=32,
                                                                     double_quant=False)),
    ("fp16", _AFFINE_SHAPE, dict(tile_rows=16, tile_cols=64), dict(quant="fp16")),
    ("fp32", _AFFINE_SHAPE, dict(tile_rows=16, tile_cols=64), dict(quant="fp32")),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def machine(request, tmp_path_factory):
    return kernel_case_machine(request.param, tmp_path_factory)


def _matrices(m: Machine) -> list[int]:
    return [rid for rid, r in enumerate(m.manifest.regions) if r.kind == MATRIX]


def test_matmul_against_the_definition(machine):
    rng = np.random.default_rng(7)
    rom = machine.rom
    for rid in _matrices(machine):
        w = rom.value(rid, cache=False)
        k = rom.kernel(rid)
        lanes = int(k.geo[K.G_LANES])
        m_depth = math.ceil(w.shape[1] / lanes) + math.ceil(math.log2(lanes))
        for t in (1, 3, 37):  # 37 positions: more than one block of prefill accumulators
            x = rng.standard_normal((t, w.shape[1])).astype(np.float32)
            y = rom.matmul(rid, x)
            exact = x.astype(np.float64) @ w.T.astype(np.float64)
            scale = np.abs(x).astype(np.float64) @ np.abs(w.T).astype(np.float64)
            gamma_m = m_depth * U / (1 - m_depth * U)
            gamma_n = w.shape[1] * U / (1 - w.shape[1] * U)
            assert np.all(np.abs(y - exact) <= gamma_m * scale), rom.regions[rid].name
            blas = x @ w.T  # the numpy definition
            assert np.all(np.abs(y - blas) <= (gamma_m + gamma_n) * scale), rom.regions[rid].name


def test_bit_identical_across_threads_runs_and_prefill(machine):
    rng = np.random.default_rng(8)
    rom = machine.rom
    for rid in _matrices(machine):
        cols = rom.regions[rid].shape[1]
        x = rng.standard_normal((5, cols)).astype(np.float32)
        one = on_threads(1, lambda: rom.matmul(rid, x))
        two = on_threads(2, lambda: rom.matmul(rid, x))
        again = on_threads(2, lambda: rom.matmul(rid, x))
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(two, again)
        for t in (0, 4):  # a position alone (the decode path) equals the same position in a prefill
            alone = on_threads(2, lambda: rom.matmul(rid, x[t:t + 1]))
            np.testing.assert_array_equal(alone[0], one[t])


def test_rows_are_the_dequantized_rows(machine):
    rom = machine.rom
    for rid in _matrices(machine):
        rows = rom.regions[rid].shape[0]
        ids = np.array([0, rows - 1, 17 % rows, 17 % rows, rows // 2])
        np.testing.assert_array_equal(rom.rows(rid, ids), rom.value(rid, cache=False)[ids])
    with pytest.raises(IndexError):
        rom.rows(_matrices(machine)[0], np.array([rom.regions[_matrices(machine)[0]].shape[0]]))


def test_no_float_copy_of_a_matrix(machine):
    """Running the model leaves no decoded matrix behind: only vector regions (norms, RoPE) are cached."""
    m = Machine(machine.manifest.root)
    m.generate([1, 2, 3], 2)
    assert m._weights_t == {}
    assert all(m.rom.regions[rid].kind != MATRIX for rid in m.rom._cache)
