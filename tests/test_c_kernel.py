"""The C product kernel (romac.emulator._lunit) against the numba kernel it mirrors: bit for bit the same outputs,
for every format it computes (INT2/INT4/INT8 affine codes with their fp16 scales), at the tile edges (rows and
columns that are not multiples of the tile, a partial last group, lane vectors that hold only some of its
columns), for one position and for prefills of every remainder of the register tile's 4 positions (2, 4, 7, 37:
the tile summing its lanes as it goes for groups of 128 lanes, storing them for the rest), on one to three threads,
at each lane width this CPU runs; and its thread pool: products from several Python threads at once, and in a
child process forked after the pool's threads started. The numba kernel is tested against the numpy definition
(test_kernels.py)."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import romac.emulator.kernels as K
from romac.emulator import Machine
from romac.spec.plan import MATRIX
from tests.conftest import kernel_case_machine, on_threads

pytestmark = pytest.mark.skipif(not K.c_widths(), reason="the C kernel is not built or this CPU lacks AVX2")

# hidden 200: groups of 128 end with 72 columns (lane vectors of 16 hold 8 of them: only some); 136: 8 columns
_SHAPE = dict(vocab_size=203, hidden_size=200, intermediate_size=136)
CASES = [
    ("int4-g128", _SHAPE, dict(tile_rows=16, tile_cols=128), dict(quant="int4")),
    ("int2-g128", _SHAPE, dict(tile_rows=16, tile_cols=128), dict(quant="int2")),
    ("int8-g128", _SHAPE, dict(tile_rows=16, tile_cols=128), dict(quant="int8")),
    ("int4-g64-t256", _SHAPE, dict(tile_rows=8, tile_cols=256, group_size=64), dict(quant="int4")),
    ("int2-g32", _SHAPE, dict(tile_rows=8, tile_cols=64, group_size=32), dict(quant="int2")),
    ("int4-g16", _SHAPE, dict(tile_rows=8, tile_cols=48, group_size=16), dict(quant="int4")),
    # the down projection's rows of 1,100 columns: nine groups, the last partial
    ("int2-g128-long-rows", dict(_SHAPE, intermediate_size=1100), dict(tile_rows=16, tile_cols=128), dict(quant="int2")),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def machine(request, tmp_path_factory):
    return kernel_case_machine(request.param, tmp_path_factory)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def test_c_kernel_equals_numba(machine):
    rng = np.random.default_rng(11)
    rom = machine.rom
    regions = [rid for rid, r in enumerate(rom.regions) if r.kind == MATRIX]
    assert all(K.c_computes(rom.kernel(rid).geo) for rid in regions), "a case the C kernel should compute"
    for rid in regions:
        cols = rom.regions[rid].shape[1]
        for t in (1, 2, 4, 7, 37):
            x = rng.standard_normal((t, cols)).astype(np.float32)
            ref = rom.matmul(rid, x, engine="numba")
            widths = K.c_widths(rom.kernel(rid).geo)
            assert widths and widths[0] == 8
            for width in widths:
                for threads in (1, 2, 3):
                    y = rom.matmul(rid, x, engine="c", width=width, threads=threads)
                    np.testing.assert_array_equal(_bits(y), _bits(ref), err_msg=f"{rom.regions[rid].name} "
                                                  f"t={t} width={width} threads={threads}")


def test_numba_thread_count_is_the_default(machine):
    rom = machine.rom
    rid = next(rid for rid, r in enumerate(rom.regions) if r.kind == MATRIX)
    x = np.random.default_rng(3).standard_normal((1, rom.regions[rid].shape[1])).astype(np.float32)
    np.testing.assert_array_equal(_bits(on_threads(2, lambda: rom.matmul(rid, x, engine="c"))),
                                  _bits(rom.matmul(rid, x, engine="c", threads=1)))


def _products(rom, rid: int, xs: list[np.ndarray], threads: int) -> list[np.ndarray]:
    return [rom.matmul(rid, x, engine="c", threads=threads) for x in xs]


def test_products_from_several_threads_at_once(machine):
    """Python threads that compute products at the same moment (the GIL is released in the kernel): each gets its
    own product's bits, whether it ran on the pool or, the pool being busy, on its own thread."""
    rom = machine.rom
    rid = max((rid for rid, r in enumerate(rom.regions) if r.kind == MATRIX), key=lambda r: rom.regions[r].shape[0])
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((t, rom.regions[rid].shape[1])).astype(np.float32) for t in (1, 3, 1, 9) * 5]
    want = _products(rom, rid, xs, 1)
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda n: _products(rom, rid, xs, 2 + n % 2), range(8)))
    for run in got:
        for y, ref in zip(run, want):
            np.testing.assert_array_equal(_bits(y), _bits(ref))


def _forked_product(rom, rid: int, x: np.ndarray, queue) -> None:
    queue.put(rom.matmul(rid, x, engine="c", threads=2))


def test_a_forked_child_computes_products(machine):
    """The pool's threads do not survive fork(): a child forked while they run (one of them may hold the pool's
    lock) computes its products, on a pool of its own, without waiting for threads it does not have."""
    rom = machine.rom
    rid = max((rid for rid, r in enumerate(rom.regions) if r.kind == MATRIX), key=lambda r: rom.regions[r].shape[0])
    x = np.random.default_rng(9).standard_normal((1, rom.regions[rid].shape[1])).astype(np.float32)
    want = rom.matmul(rid, x, engine="c", threads=2)  # the parent's pool is running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_forked_product, args=(rom, rid, x, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_auto_uses_the_c_kernel_and_machines_agree(machine):
    """A whole model run: the default engine (C where it computes) and numba alone give the same logits."""
    prompt = [1, 5, 9, 2]
    c_ids, c_logits = machine.generate(prompt, 3)
    numba_machine = Machine(machine.manifest.root, kernel="numba")
    n_ids, n_logits = numba_machine.generate(prompt, 3)
    assert c_ids == n_ids
    np.testing.assert_array_equal(_bits(c_logits), _bits(n_logits))


def test_formats_it_does_not_compute_fall_back_to_numba():
    geo = np.zeros(K.GEO_SIZE, np.int64)
    geo[[K.G_FAM, K.G_BITS, K.G_PER, K.G_LANES, K.G_TC, K.G_F0BITS, K.G_F0FLOAT, K.G_F1BITS]] = (
        K.BNB, 4, 2, 64, 128, 8, 0, 0)
    assert not K.c_computes(geo)
    geo[[K.G_FAM, K.G_F0BITS, K.G_F0FLOAT, K.G_F1BITS]] = (K.AFFINE, 16, 1, 4)
    assert K.c_computes(geo)
    geo[[K.G_COLS, K.G_NGROUPS]] = (4096, 64)
    assert K.c_computes(geo)
    max_groups, _, _ = K._lunit.limits()
    geo[[K.G_COLS, K.G_NGROUPS, K.G_TC]] = (64 * (max_groups + 1), max_groups + 1, 1 << 20)
    assert not K.c_computes(geo)  # a row longer than the C kernel's tables hold
    geo[[K.G_COLS, K.G_NGROUPS, K.G_TC]] = (4096, 64, 128)
    geo[K.G_LANES] = 24  # groups of 24 four-bit codes: 12 bytes, not whole vectors
    assert not K.c_computes(geo)
