"""Native kernels: the L-Unit's group-dequantize-and-accumulate, computed straight from the packed tile bytes
where they lie in the memory-mapped bank images, for every weight format romac emits.

``matmul(k, banks, x)`` is ``y[T, out] = x[T, in] @ dequant(W)^T``; ``rows(k, banks, ids)`` reads whole rows
(EMBED). Nothing is decoded ahead: a :class:`romac.emulator.rom.MatrixKernel` holds where each tile lies and
the format's small tables; the codes stay packed in the banks. The numpy definition they are tested against is
``Rom.value`` (the codec's dequantization) followed by ``x @ W^T`` (tests/test_kernels.py).

Every weight is dequantized exactly as its codec does it (``romac.codecs``: ``float32(s) * (q - z)``,
``values[q] * absmax``, the raw float), so each ``w`` is the very float32 of the numpy definition; only the order
of the sums differs, and it is fixed, so results depend on neither the thread count nor the run:

* a row is cut into *lane groups* of ``G`` columns: the format's group (affine group, bitsandbytes block), or
  the tile width for raw floats; tiles start on group boundaries;
* within a group, column ``e`` goes to lane ``(e mod p)·(G/p) + ⌊e/p⌋``, ``p`` codes a byte (the j-th codes
  of the group's bytes fill consecutive lanes, so unpacking vectorises); ``p = 1`` for codes of 8 bits and
  more, and when ``G`` is not a multiple of ``p``;
* lane λ of output ``(t, o)`` is ``A[λ] = (((0 + w·x) + w·x) + …)``, one product per group of the row, in
  column order, every product and every sum rounded to float32 (no fused multiply-add, no reassociation);
* ``y[t, o]`` is the pairwise sum of the ``G`` lanes: while n > 1, ``h = ⌈n/2⌉``, ``A[λ] += A[λ + h]`` for
  λ < n − h, n = h; then ``A[0]``.

Hence ``|y − x·Wᵀ| ≤ γ_m Σ|w||x|`` with ``m = ⌈in/G⌉ + ⌈log₂ G⌉``, ``γ_m = m·u/(1 − m·u)``, u = 2⁻²⁴.

The kernels are compiled once per kind of code (family, code bits, codes a byte, parameter storage), with those
as constants: the unpacking shifts are then constants and the loops vectorise in 32-bit lanes.

Two engines compute these products. For the formats of both ROMA chips (INT2/INT4/INT8 affine codes, whole codes
a byte, an fp16 scale) the C extension :mod:`romac.emulator._lunit` (built by the package where there
is a C compiler) computes them in the same order, so bit for bit the same, and faster (SmolLM2's INT4 decode
1.9x, the 8B's INT2 3.5-7x: docs/performance.md):
it keeps a block of accumulator lanes in vector registers while a row's groups stream past, and with AVX-512 it
computes each group's 2^bits weights once and lets every code pick its own. numba computes everything else
(bitsandbytes codes, raw floats, groups that split bytes), and everything when the extension is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable

# numba's OpenMP threads spin while they wait (libgomp's default); when another process holds a core, a spinning
# thread keeps the one doing the work off it: a 576 x 576 product took 8.0 ms instead of 0.12 ms on two threads
# with one other process busy, 0.12 ms with a passive wait (docs/performance.md). libgomp reads this when numba
# loads it, at the first parallel product; a policy the user set is kept. (The C kernel has threads of its own,
# romac/emulator/_lunit_pool.h, which never wait for each other.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba
import numpy as np
from numba import njit, prange

from romac.spec.formats import BNB_DYNAMIC_SIGNED

# The C extension is optional (setup.py): installed without a C compiler, numba computes every product. It is a
# compiled module, not one of the package's Python modules, so it is looked up rather than imported by name.
_LUNIT = "romac.emulator._lunit"
_lunit = importlib.import_module(_LUNIT) if importlib.util.find_spec(_LUNIT) is not None else None

f32 = np.float32
#: who computes a product: "auto" (the C kernel where it computes the format, numba elsewhere), or one of them
ENGINES = ("auto", "c", "numba")
# Kernel-internal codes of the codec families (romac.emulator.rom maps WeightFormat.family onto them).
AFFINE, BNB, RAW = 0, 1, 2
# Positions in the ``geo`` vector handed to the kernels (one int64 array: one compiled signature).
(G_ROWS, G_COLS, G_TR, G_TC, G_BITS, G_PER, G_LANES, G_FAM, G_F0BITS, G_F0FLOAT, G_F1BITS, G_NESTED,
 G_NGROUPS) = range(13)
GEO_SIZE = 13
#: positions of one prefill computed together: their accumulators (T_BLOCK × G floats) stay in L1
T_BLOCK = 32
#: 2**(e - 25) for a float16 exponent field e (e = 0: subnormal, 2**-24): float16 -> float32 exactly
_HALF_POW = np.array([2.0 ** -24] + [2.0 ** (e - 25) for e in range(1, 32)], f32)
#: bitsandbytes' signed 8-bit dynamic map, which de-nests double-quantized absmax (a constant of the kernels)
_DYNAMIC = np.ascontiguousarray(BNB_DYNAMIC_SIGNED, f32)


@njit(cache=True, nogil=True, inline="always")
def _half(bank, p):
    """The little-endian float16 at byte p, as float32 (exact: an 11-bit integer times a power of two)."""
    h = np.int64(bank[p]) | (np.int64(bank[p + 1]) << 8)
    e, m = (h >> 10) & 31, h & 1023
    if e == 31:
        v = f32(np.inf) if m == 0 else f32(np.nan)
    else:
        v = f32(m + (1024 if e else 0)) * _HALF_POW[e]
    return -v if h & 0x8000 else v


@njit(cache=True, nogil=True, inline="always")
def _packed(bank, base, idx, bits):
    """The idx-th ``bits``-wide unsigned field of a packed run (first field in the high bits)."""
    pos = idx * bits
    return (np.int64(bank[base + (pos >> 3)]) >> (8 - bits - (pos & 7))) & ((1 << bits) - 1)


@njit(cache=True, nogil=True, inline="always")
def _fold(a, h):
    """a[k] += a[k + h] for k < h (called with a constant h: a fixed-length vector add)."""
    for k in range(h):
        a[k] += a[k + h]


@njit(cache=True, nogil=True, inline="always")
def _tree(a, lanes):
    """The pairwise sum of a[:lanes] (the module doc's order); the usual group sizes unrolled."""
    if lanes == 128:
        _fold(a, 64)
    if lanes >= 64 and lanes & (lanes - 1) == 0 and lanes <= 128:
        _fold(a, 32)
    if lanes >= 32 and lanes & (lanes - 1) == 0 and lanes <= 128:
        _fold(a, 16)
        _fold(a, 8)
        _fold(a, 4)
        _fold(a, 2)
        _fold(a, 1)
        return a[0]
    n = lanes
    while n > 1:
        h = (n + 1) // 2
        for k in range(n - h):
            a[k] += a[k + h]
        n = h
    return a[0]


@njit(cache=True, nogil=True)
def _accumulate(acc, w, xp, base, t0, t1):
    """acc[t - t0, lane] += w[lane] · xp[t, base + lane] for positions t0..t1 (one group's weights, reused)."""
    lanes = w.size
    for t in range(t0, t1):
        a, xg = acc[t - t0], xp[t, base:base + lanes]
        for k in range(lanes):
            a[k] += w[k] * xg[k]


@njit(cache=True, nogil=True)
def _accumulate4(acc, w, xp, bases, t0, t1):
    """_accumulate of four consecutive groups in one pass: each lane adds group 0's product, then 1's, 2's, 3's
    (the order of four separate passes), with one load and store of the accumulators instead of four."""
    lanes = w.shape[1]
    w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
    b0, b1, b2, b3 = bases[0], bases[1], bases[2], bases[3]
    for t in range(t0, t1):
        a = acc[t - t0]
        x0, x1 = xp[t, b0:b0 + lanes], xp[t, b1:b1 + lanes]
        x2, x3 = xp[t, b2:b2 + lanes], xp[t, b3:b3 + lanes]
        for k in range(lanes):
            v = a[k] + w0[k] * x0[k]
            v = v + w1[k] * x1[k]
            v = v + w2[k] * x2[k]
            a[k] = v + w3[k] * x3[k]


@njit(cache=True, nogil=True)
def _lanes_of(x, lane_cols):
    """x [T, in] in lane order [T, groups · G] (0 past the row's end)."""
    xp = np.zeros((x.shape[0], lane_cols.size), f32)
    for t in range(x.shape[0]):
        for k in range(lane_cols.size):
            c = lane_cols[k]
            if c >= 0:
                xp[t, k] = x[t, c]
    return xp


@njit(cache=True, nogil=True, inline="always")
def _kind(geo, kc):
    """(family, code bits, codes a byte, whole codes a byte?) of the region: the constants ``kc`` of a specialised
    kernel, or (-1, 0, 0) to read them from ``geo``."""
    f = kc[0] if kc[0] >= 0 else geo[G_FAM]
    b = kc[1] if kc[1] > 0 else geo[G_BITS]
    p = kc[2] if kc[1] > 0 else geo[G_PER]
    return f, b, p, f != RAW and (p > 1 or b == 8)


@njit(cache=True, nogil=True, inline="always")
def _weight(q, s, z, values, f):
    return s * (f32(q) - z) if f == AFFINE else values[q] * s


@njit(cache=True, nogil=True, inline="always")
def _params(bank, pb0, pb1, g, blk, geo, nested, offset, f):
    """(s, z) of group g of a tile row: affine (scale, zero), bitsandbytes (absmax, 0), raw (1, 0)."""
    if f == RAW:
        return f32(1), f32(0)
    f0bits = geo[G_F0BITS]
    if not geo[G_F0FLOAT]:  # bitsandbytes' 8-bit absmax codes, de-nested as codecs.bnb.denest_absmax does
        s = _DYNAMIC[_packed(bank, pb0, g, f0bits)] * nested[blk // geo[G_NESTED]] + f32(offset)
    elif f0bits == 16:
        s = _half(bank, pb0 + 2 * g)
    else:
        s = bank[pb0 + 4 * g:pb0 + 4 * g + 4].view(np.float32)[0]
    z = f32(_packed(bank, pb1, g, geo[G_F1BITS])) if f == AFFINE else f32(0)
    return s, z


@njit(cache=True, nogil=True, inline="always")
def _fill(bank, rowb, e0, gl, lanes, s, z, values, w, geo, kc):
    """w[lane] = the weights of the ``gl`` columns from column ``e0`` of a tile row whose codes start at byte
    ``rowb`` (one group)."""
    f, b, p, bytewise = _kind(geo, kc)
    cb = rowb + ((e0 * b) >> 3)
    if bytewise:
        st, mask = lanes // p, (1 << b) - 1
        for j in range(p):  # with constant codes a byte: unrolled, each shift a constant
            sh = 8 - b * (j + 1)
            n = (gl - j + p - 1) // p
            src, out = bank[cb:cb + n], w[j * st:j * st + n]
            for i in range(n):
                out[i] = _weight(np.int32((src[i] >> sh) & mask), s, z, values, f)  # int32: narrow lanes
    elif f == RAW and b == 16:
        for e in range(gl):
            w[e] = _half(bank, cb + 2 * e)
    elif f == RAW:
        w[:gl] = bank[cb:cb + 4 * gl].view(np.float32)
    else:  # groups that are not whole bytes: one code at a time
        for e in range(gl):
            w[e] = _weight(_packed(bank, rowb, e0 + e, b), s, z, values, f)


@njit(cache=True, nogil=True, inline="always")
def _walk(banks, tb, to, geo, values, nested, offset, o, xp, t0, t1, acc, w, out, kc):
    """Row ``o``, group by group in column order: the lanes of positions t0..t1 added into ``acc`` (or, with
    ``xp`` empty, the row's weights in lane order written to ``out``). ``w`` holds the weights of up to
    four groups, added in one pass over the accumulators (each lane's order kept)."""
    rows, cols, tr, tc, lanes = geo[G_ROWS], geo[G_COLS], geo[G_TR], geo[G_TC], geo[G_LANES]
    f, b = _kind(geo, kc)[:2]
    i = o // tr
    rr, r = o - i * tr, min(tr, rows - i * tr)
    bases = np.zeros(4, np.int64)
    held = 0
    for j in range(tb.shape[1]):
        bank, off = banks[tb[i, j]], to[i, j]
        c = min(tc, cols - j * tc)
        rbc = (c * b + 7) >> 3  # each part's rows are padded to whole bytes (romac.spec.layout)
        ngc = (c + lanes - 1) // lanes
        rb0 = (ngc * geo[G_F0BITS] + 7) >> 3
        pb0 = off + r * rbc + rr * rb0
        pb1 = off + r * rbc + r * rb0 + rr * ((ngc * geo[G_F1BITS] + 7) >> 3)
        blk0 = (o * cols + j * tc) // lanes if f == BNB else 0  # bitsandbytes' flat block index
        for g in range(ngc):
            s, z = _params(bank, pb0, pb1, g, blk0 + g, geo, nested, offset, f)
            gl = min(lanes, c - g * lanes)
            wg = w[held]
            if gl < lanes:
                wg[:] = 0
            _fill(bank, off + rr * rbc, g * lanes, gl, lanes, s, z, values, wg, geo, kc)
            bases[held] = j * tc + g * lanes
            if xp.shape[0] == 0:
                out[bases[0]:bases[0] + lanes] = wg
                continue
            held += 1
            if held == 4:
                _accumulate4(acc, w, xp, bases, t0, t1)
                held = 0
    for h in range(held):
        _accumulate(acc, w[h], xp, bases[h], t0, t1)


@njit(cache=True, nogil=True, inline="always")
def _one_position(banks, tb, to, geo, values, nested, offset, xp, i, acc, kc):
    """acc[rr] = the lanes of row i·tr + rr for one position, tile by tile (each tile's bank looked up once),
    each weight going straight into its product: the same values and order as ``_walk``."""
    rows, cols, tr, tc, lanes = geo[G_ROWS], geo[G_COLS], geo[G_TR], geo[G_TC], geo[G_LANES]
    f, b, p, _ = _kind(geo, kc)
    r, st, mask = min(tr, rows - i * tr), lanes // p, (1 << b) - 1
    for j in range(tb.shape[1]):
        bank, off = banks[tb[i, j]], to[i, j]
        c = min(tc, cols - j * tc)
        rbc = (c * b + 7) >> 3
        ngc = (c + lanes - 1) // lanes
        rb0, rb1 = (ngc * geo[G_F0BITS] + 7) >> 3, (ngc * geo[G_F1BITS] + 7) >> 3
        for rr in range(r):
            pb0 = off + r * rbc + rr * rb0
            pb1 = off + r * rbc + r * rb0 + rr * rb1
            blk0 = ((i * tr + rr) * cols + j * tc) // lanes if f == BNB else 0
            for g in range(ngc):
                s, z = _params(bank, pb0, pb1, g, blk0 + g, geo, nested, offset, f)
                gl = min(lanes, c - g * lanes)
                cb = off + rr * rbc + ((g * lanes * b) >> 3)
                base = j * tc + g * lanes
                # A partial group is run full length when its bytes exist: the extra lanes multiply finite
                # weights by x = 0 (lanes past the row's end) and add ±0 to lanes that hold +0, so nothing
                # changes, and the vector loop never drops to its scalar remainder.
                full = gl < lanes and cb + st <= bank.size and np.isfinite(s)
                for jj in range(p):
                    sh = 8 - b * (jj + 1)
                    n = st if full else (gl - jj + p - 1) // p
                    src, xs = bank[cb:cb + n], xp[0, base + jj * st:base + jj * st + n]
                    a = acc[rr, jj * st:jj * st + n]
                    for k in range(n):
                        a[k] += _weight(np.int32((src[k] >> sh) & mask), s, z, values, f) * xs[k]


@njit(cache=True, nogil=True, inline="always")
def _row_tile(banks, tb, to, geo, values, nested, offset, xp, y, i, kc):
    """y[:, o] for the rows o of row tile i."""
    rows, tr, lanes = geo[G_ROWS], geo[G_TR], geo[G_LANES]
    n_t, r = xp.shape[0], min(geo[G_TR], rows - i * tr)
    if n_t == 1 and _kind(geo, kc)[3]:
        acc1 = np.zeros((r, lanes), f32)
        _one_position(banks, tb, to, geo, values, nested, offset, xp, i, acc1, kc)
        for rr in range(r):
            y[0, i * tr + rr] = _tree(acc1[rr], lanes)
        return
    w = np.zeros((4, lanes), f32)
    acc = np.empty((min(n_t, T_BLOCK), lanes), f32)
    for t0 in range(0, n_t, T_BLOCK):
        t1 = min(n_t, t0 + T_BLOCK)
        for o in range(i * tr, i * tr + r):
            acc[:] = 0
            _walk(banks, tb, to, geo, values, nested, offset, o, xp, t0, t1, acc, w, w[0], kc)
            for t in range(t0, t1):
                y[t, o] = _tree(acc[t - t0], lanes)


def _build(fam: int, bits: int):
    """The product kernel of one kind of code: ``fam``/``bits`` constants (the unpacking shifts are then constants),
    or -1/0 for the generic kernel that reads both, and everything else, from ``geo``. The closure holds only
    these integers (numba caches it by value)."""
    KC = (fam, bits, 8 // bits if 0 < bits < 8 else 1)

    @njit(cache=True, nogil=True, parallel=True)
    def matmul(banks, tb, to, geo, lane_cols, values, nested, offset, x, y):
        xp = _lanes_of(x, lane_cols)
        for i in prange(tb.shape[0]):  # row tiles are independent: any thread computes a row the same way
            _row_tile(banks, tb, to, geo, values, nested, offset, xp, y, i, KC)

    return matmul


@njit(cache=True, nogil=True)
def _rows(banks, tb, to, geo, lane_cols, values, nested, offset, ids, out):
    """The rows ``ids``, dequantized: one generic kernel for every kind of code (EMBED reads a few rows a step,
    so a kernel per kind would cost its compile time and gain nothing)."""
    w = np.zeros((4, geo[G_LANES]), f32)
    lane_row, none = np.empty(lane_cols.size, f32), np.empty((0, 0), f32)
    for n in range(ids.size):
        _walk(banks, tb, to, geo, values, nested, offset, ids[n], none, 0, 0, none, w, lane_row, (-1, 0, 0))
        for k in range(lane_cols.size):
            if lane_cols[k] >= 0:
                out[n, lane_cols[k]] = lane_row[k]


_KERNELS: dict[tuple, Callable] = {}


def kernel_kind(geo: np.ndarray) -> tuple[int, int]:
    """Which compiled product kernel a region uses, (family, code bits): a specialised one for the hot kinds of
    code (whole affine or bitsandbytes codes in a byte), (-1, 0) the generic one for the rest (raw floats, groups
    that split bytes)."""
    fam, bits, per = int(geo[G_FAM]), int(geo[G_BITS]), int(geo[G_PER])
    return (fam, bits) if fam != RAW and (per > 1 or bits == 8) else (-1, 0)


def _kernel(geo: np.ndarray) -> Callable:
    """The compiled product kernel for a region (compiled on first use; numba caches it on disk)."""
    key = kernel_kind(geo)
    if key not in _KERNELS:
        _KERNELS[key] = _build(*key)
    return _KERNELS[key]


def c_widths(geo: np.ndarray | None = None) -> tuple[int, ...]:
    """Lane widths of the C kernels this CPU runs: () without the extension (or, on x86-64, without AVX2); with
    ``geo``, those that compute that region (16 lanes: codes of at most 4 bits, whole 16-lane vectors a shift)."""
    if _lunit is None:
        return ()
    if geo is None:
        return tuple(_lunit.widths())
    if not c_computes(geo):
        return ()
    return tuple(_lunit.widths(int(geo[G_BITS]), int(geo[G_PER]), int(geo[G_LANES])))


def c_computes(geo: np.ndarray) -> bool:
    """Whether the C kernel computes a region of this geometry: affine codes a whole number to the byte with
    lane groups of whole 8-lane vectors, an fp16 scale (the affine formats' storage), whole groups in a tile, and
    a row within the sizes its tables hold (``_lunit.limits()``)."""
    bits, per, lanes = int(geo[G_BITS]), int(geo[G_PER]), int(geo[G_LANES])
    if not c_widths():
        return False
    max_groups, max_lanes, max_tiles = _lunit.limits()
    return (geo[G_FAM] == AFFINE and bits * per == 8 and lanes % (8 * per) == 0 and lanes <= max_lanes
            and bool(geo[G_F0FLOAT]) and geo[G_F0BITS] == 16 and 1 <= geo[G_F1BITS] <= 8
            and geo[G_TC] % lanes == 0 and geo[G_NGROUPS] <= max_groups
            and -(-int(geo[G_COLS]) // int(geo[G_TC])) <= max_tiles)


def c_plan(geo: np.ndarray, tile_address: np.ndarray, n_col_tiles: int, lane_cols: np.ndarray) -> tuple:
    """The leading arguments of ``_lunit.matmul_affine`` for a region that ``c_computes`` (made once per region:
    a product then only adds its x, y, thread count and width). ``tile_address``: int64, the address of each
    tile's first byte in the mapped banks, which the caller keeps mapped."""
    return (np.ascontiguousarray(tile_address, np.int64).reshape(-1), int(n_col_tiles),
            *(int(geo[f]) for f in (G_ROWS, G_COLS, G_TR, G_TC, G_BITS, G_PER, G_LANES, G_F0BITS, G_F1BITS,
                                    G_NGROUPS)),
            np.ascontiguousarray(lane_cols, np.int64))


def matmul(banks: numba.typed.List, tb: np.ndarray, to: np.ndarray, geo: np.ndarray, lane_cols: np.ndarray,
           values: np.ndarray, nested: np.ndarray, offset: float, x: np.ndarray, c_args: tuple | None = None,
           engine: str = "auto", width: int = 0, threads: int | None = None) -> np.ndarray:
    """``x @ dequant(W)^T`` (float32 [T, out]), rows spread over ``threads`` threads (None: numba's thread count,
    numba.set_num_threads).

    ``c_args`` (``c_plan``), given for a region that ``c_computes`` (checked once per region by the caller, not
    per product), lets the C kernel compute it; ``engine`` picks who does (ENGINES), ``width`` the C kernel's
    lane width (0: the widest). Every choice gives the same bits."""
    y = np.empty((x.shape[0], int(geo[G_ROWS])), f32)
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: one of {', '.join(ENGINES)}")
    use_c = engine != "numba" and c_args is not None
    if engine == "c" and not use_c:
        raise ValueError("the C kernel does not compute this region (or is not built)")
    if use_c:
        return _c_matmul(c_args, x, numba.get_num_threads() if threads is None else threads, width)
    _kernel(geo)(banks, tb, to, geo, lane_cols, values, nested, offset, x, y)
    return y


def _c_matmul(c_args: tuple, x: np.ndarray, threads: int, width: int) -> np.ndarray:
    y = np.empty((x.shape[0], c_args[2]), f32)  # c_args[2]: the region's rows (c_plan)
    _lunit.matmul_affine(*c_args, x, y, threads, width)
    return y


def c_product(c_args: tuple, width: int = 0) -> Callable[[np.ndarray, int], np.ndarray]:
    """``matmul`` by the C kernel for one region, its arguments bound once: ``f(x, threads)`` with x float32
    [T, in], C-contiguous (the per-product path of the emulator's decode, a few microseconds shorter)."""
    return lambda x, threads: _c_matmul(c_args, x, threads, width)


def c_product_with_lora(c_args: tuple, width: int = 0) -> Callable[[np.ndarray, int, tuple], tuple]:
    """``c_product`` with the LORA that follows it computed beside it, on whichever of the threads is free:
    ``f(x, threads, lora) -> (x @ W^T, ds)``, ``lora`` = (A's codes [rank, in], A's scale, B^T's codes [rank, out],
    B's scale, code values, code bytes, scaling, rank) as romac.emulator.sram keeps them, ``ds`` = the LORA's
    ((x @ A^T) @ B^T) * scaling (its sums ops.tree_sum's), which the caller adds."""

    def product(x: np.ndarray, threads: int, lora: tuple) -> tuple[np.ndarray, np.ndarray]:
        y = np.empty((x.shape[0], c_args[2]), f32)
        ds = np.empty_like(y)
        _lunit.matmul_affine(*c_args, x, y, threads, width, *lora, ds)
        return y, ds

    return product


def rows(banks: numba.typed.List, tb: np.ndarray, to: np.ndarray, geo: np.ndarray, lane_cols: np.ndarray,
         values: np.ndarray, nested: np.ndarray, offset: float, ids: np.ndarray) -> np.ndarray:
    """The dequantized rows ``ids`` (float32 [n, in]), bit for bit the codec's dequantization."""
    out = np.empty((ids.size, int(geo[G_COLS])), f32)
    _rows(banks, tb, to, geo, lane_cols, values, nested, offset, ids, out)
    return out
