/* The L-Unit's affine group-dequantize-and-accumulate, as a C extension: the hot path of
 * romac.emulator.kernels for whole integer codes in a byte (INT2, INT4, INT8 with an fp16 scale and a packed
 * zero point), the formats of both ROMA chips.
 *
 * It computes exactly what the numba kernel of romac/emulator/kernels.py computes, in the same order (that
 * module's doc is the definition): each weight float32(s) * (q - z), each product w * x, each lane's sum in
 * column order, the lanes of a row summed pairwise; no fused multiply-add (built with -ffp-contract=off).
 * What it adds is where the numbers live: a block of accumulator lanes stays in vector registers while the row's
 * groups stream past, instead of a load and a store of every accumulator per weight; a prefill makes a few rows'
 * weights once and multiplies them by a few positions at a time in a register tile (_lunit_gemm.h). Rows are
 * independent and each is computed the same way on any thread, so the result does not depend on the thread count.
 *
 * The byte layout of a tile (codes, then scales, then zero points, each part's rows padded to whole bytes) is
 * romac.spec.layout's; the kernels' arithmetic on it mirrors romac/emulator/kernels.py `_walk`.
 *
 * Vectors are GCC/Clang vector extensions of 8 float32 lanes, which the compiler maps onto AVX2 on x86-64 and
 * NEON elsewhere (on x86-64 compiled for AVX2 and only used when the CPU has it), and of 16 lanes with AVX-512
 * intrinsics where the CPU has AVX-512F (codes of at most 4 bits: each group's weights looked up by a permute).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "_lunit_pool.h"
#include "_vunit_sums.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LUNIT_X86 1
#define TARGET_V8 __attribute__((target("avx2")))
#define TARGET_V16 __attribute__((target("avx512f,f16c")))
#include <immintrin.h>
#else
#define LUNIT_X86 0
#define TARGET_V8
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint8_t v8b __attribute__((vector_size(8)));
typedef float v16f __attribute__((vector_size(64)));
/* the same vectors at any float's address (a load of one from memory the kernel did not lay out) */
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4)));

#define MAX_GROUPS 4096 /* groups of one row the per-row tables hold (a 512K-column row at groups of 128) */
#define MAX_LANES 1024  /* group sizes the kernel computes */
#define MAX_TILES 4096  /* column tiles of a matrix */
#define CHUNK_ROWS 64 /* rows a chunk of a product on several threads, at most (see chunks()) */
#define PREFETCH_ROWS 8 /* one position: the codes of the row this many ahead are prefetched (docs/performance.md) */

/* Where the W lanes of lane vector lv of a group come from: bytes offs[lv] .. offs[lv] + W - 1 of the group's
 * codes, shifted down sh[lv] bits; they hold the group's columns first_col[lv], + per, ..., last_col[lv]. */
typedef struct {
    int sh[MAX_LANES / 8];
    int64_t offs[MAX_LANES / 8], first_col[MAX_LANES / 8], last_col[MAX_LANES / 8];
} lane_vectors;

typedef struct {
    int64_t rows, cols, tr, tc, bits, per, lanes, f0bits, f1bits, ct, n_groups;
    /* made once per product, so the per-row path divides nothing: the lane vectors of 8 and of 16 lanes, and
     * for column tile j its columns, bytes a row of codes, groups, and bytes a row of scales and of zero points */
    lane_vectors v8, v16;
    int64_t tile_cols[MAX_TILES], code_row[MAX_TILES], tile_groups[MAX_TILES], s_row[MAX_TILES], z_row[MAX_TILES];
} geometry;

/* One of a row's groups: where its codes start, its scale and zero point, how many columns it has. */
typedef struct {
    const uint8_t *codes;
    float s, z;
    int64_t len;
} group;

static float half_pow[32];

/* The little-endian float16 at p as float32, exactly as kernels._half computes it. */
static inline float half_at(const uint8_t *p) {
    int64_t h = (int64_t)p[0] | ((int64_t)p[1] << 8);
    int64_t e = (h >> 10) & 31, m = h & 1023;
    float v;
    if (e == 31)
        v = m == 0 ? INFINITY : NAN;
    else
        v = (float)(m + (e ? 1024 : 0)) * half_pow[e];
    return (h & 0x8000) ? -v : v;
}

/* The idx-th bits-wide unsigned field of a packed run (first field in the high bits), as kernels._packed. */
static inline int64_t packed_at(const uint8_t *base, int64_t idx, int64_t bits) {
    int64_t pos = idx * bits;
    return ((int64_t)base[pos >> 3] >> (8 - bits - (pos & 7))) & ((1 << bits) - 1);
}

static void plan_lanes(const geometry *g, int64_t w, lane_vectors *out) {
    int64_t st = g->lanes / g->per;  /* lanes that take the codes at one shift */
    for (int64_t lv = 0; lv < g->lanes / w; lv++) {
        out->sh[lv] = (int)(8 - g->bits * (lv * w / st + 1));
        out->offs[lv] = lv * w % st;
        out->first_col[lv] = out->offs[lv] * g->per + lv * w / st;
        out->last_col[lv] = out->first_col[lv] + (w - 1) * g->per;
    }
}

/* The per-product tables of g (see geometry). */
static void plan(geometry *g) {
    plan_lanes(g, 8, &g->v8);
    if ((g->lanes / g->per) % 16 == 0) plan_lanes(g, 16, &g->v16);
    for (int64_t j = 0; j < g->ct; j++) {
        int64_t c = g->tc < g->cols - j * g->tc ? g->tc : g->cols - j * g->tc;
        int64_t ngc = (c + g->lanes - 1) / g->lanes;
        g->tile_cols[j] = c;
        g->code_row[j] = (c * g->bits + 7) >> 3;  /* each part's rows are padded to whole bytes */
        g->tile_groups[j] = ngc;
        g->s_row[j] = (ngc * g->f0bits + 7) >> 3;
        g->z_row[j] = (ngc * g->f1bits + 7) >> 3;
    }
}

/* The groups of row o (scale, zero point, codes), tile by tile; returns how many. */
static int64_t row_groups(const geometry *g, const uint8_t *const *tiles, int64_t o, group *out) {
    int64_t i = o / g->tr, rr = o - i * g->tr;
    int64_t r = g->tr < g->rows - i * g->tr ? g->tr : g->rows - i * g->tr;
    int64_t gbytes = (g->lanes * g->bits) >> 3, n = 0;
    for (int64_t j = 0; j < g->ct; j++) {
        const uint8_t *tile = tiles[i * g->ct + j];
        int64_t c = g->tile_cols[j], rbc = g->code_row[j], ngc = g->tile_groups[j];
        const uint8_t *p0 = tile + r * rbc + rr * g->s_row[j];
        const uint8_t *p1 = tile + r * rbc + r * g->s_row[j] + rr * g->z_row[j];
        const uint8_t *codes = tile + rr * rbc;
        for (int64_t k = 0; k < ngc; k++, n++) {
            out[n].s = half_at(p0 + 2 * k);
            out[n].z = (float)packed_at(p1, k, g->f1bits);
            out[n].codes = codes + k * gbytes;
            int64_t len = c - k * g->lanes;
            out[n].len = len < g->lanes ? len : g->lanes;
        }
    }
    return n;
}

/* Lane vector lv of a group that is not whole: 0 if none of its lanes hold columns of the group, 1 if all do,
 * -1 if some. */
static inline int lanes_held(const lane_vectors *L, int64_t lv, int64_t len) {
    if (L->first_col[lv] >= len) return 0;
    return L->last_col[lv] < len ? 1 : -1;
}

/* The w weights of lane vector lv of a group that is not whole, one at a time, 0 in the lanes past its columns
 * (whose inputs are 0 too: past the row's end, since tiles start on group boundaries). */
static inline void partial_weights(const geometry *g, const group *q, int64_t lv, int64_t w, float *out) {
    int64_t st = g->lanes / g->per;
    int32_t mask = (1 << g->bits) - 1;
    for (int64_t l = 0; l < w; l++) {
        int64_t lane = lv * w + l, j = lane / st, i = lane % st;
        if (i * g->per + j >= q->len) {
            out[l] = 0.0f;
            continue;
        }
        int32_t code = ((int32_t)q->codes[i] >> (8 - g->bits * (j + 1))) & mask;
        out[l] = q->s * ((float)code - q->z);
    }
}

/* ---- 8 lanes (AVX2 on x86-64, the compiler's vectors elsewhere): each weight s * (q - z), computed. */
typedef struct {
    v8f s, z;
    int32_t mask;
} v8_group;

static inline TARGET_V8 v8_group v8_prepare(const geometry *g, const group *q) {
    v8_group out = {{q->s, q->s, q->s, q->s, q->s, q->s, q->s, q->s},
                    {q->z, q->z, q->z, q->z, q->z, q->z, q->z, q->z}, (1 << g->bits) - 1};
    return out;
}

/* The fp16 scale of group k of a tile row whose scales start at p0. */
static inline TARGET_V8 float v8_scale(const uint8_t *p0, int64_t k) {
    return half_at(p0 + 2 * k);
}

/* The 8 weights whose codes are at bytes codes .. codes + 7, sh bits up. */
static inline TARGET_V8 v8f v8_weights_at(const v8_group *p, const uint8_t *codes, int sh) {
#if LUNIT_X86
    v8i bytes = (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)codes));
#else
    v8b raw;
    memcpy(&raw, codes, 8);
    v8i bytes = __builtin_convertvector(raw, v8i);
#endif
    v8i q = (bytes >> sh) & p->mask;
    return p->s * (__builtin_convertvector(q, v8f) - p->z);
}

/* The weights of lane vector lv of a group whose codes start at codes. */
static inline TARGET_V8 v8f v8_weights(const v8_group *p, const uint8_t *codes, const lane_vectors *L, int64_t lv) {
    return v8_weights_at(p, codes + L->offs[lv], L->sh[lv]);
}

#if LUNIT_X86
/* ---- 16 lanes (AVX-512), codes of at most 4 bits: the group's 2^bits weights s * (c - z) are computed once,
 * the same float32 operations on the same operands, and each code picks its own (a 16-entry permute). */
typedef struct {
    __m512 table;
} v16_group;

static inline TARGET_V16 v16_group v16_prepare(const geometry *g, const group *q) {
    /* entry c holds the weight of code c mod 2^bits: the permute reads the low 4 bits of each lane, and the
     * bits above a 2-bit code are the next code's */
    __m512i c = _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                 _mm512_set1_epi32((1 << g->bits) - 1));
    v16_group out = {_mm512_mul_ps(_mm512_set1_ps(q->s), _mm512_sub_ps(_mm512_cvtepi32_ps(c), _mm512_set1_ps(q->z)))};
    return out;
}

/* float16 scales by the F16C instruction: the same exact conversion as half_at (NaN payloads aside). */
static inline TARGET_V16 float v16_scale(const uint8_t *p0, int64_t k) {
    uint16_t h;
    memcpy(&h, p0 + 2 * k, 2);
    return _cvtsh_ss(h);
}

/* The 16 weights whose codes are at bytes codes .. codes + 15, sh bits up. */
static inline TARGET_V16 v16f v16_weights_at(const v16_group *p, const uint8_t *codes, int sh) {
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)codes));
    return (v16f)_mm512_permutexvar_ps(sh ? _mm512_srli_epi32(bytes, sh) : bytes, p->table);
}

static inline TARGET_V16 v16f v16_weights(const v16_group *p, const uint8_t *codes, const lane_vectors *L,
                                          int64_t lv) {
    return v16_weights_at(p, codes + L->offs[lv], L->sh[lv]);
}
#endif

/* a[t][v] += w * x[t][v] for the NT positions (one lane vector's weights, reused). */
#define ADD_PRODUCTS(NT, VEC, W, v, w)                                                                           \
    _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) {                                                       \
        VEC xv;                                                                                                  \
        memcpy(&xv, x + t * xs + (v) * W, sizeof xv);                                                            \
        a[t][v] += (w) * xv;                                                                                     \
    }

/* The products of group q, which is not whole, for the NV lane vectors from LV into a[NT][NV]: lane vectors
 * that hold all their columns by WEIGHTS (an expression in v, as for a whole group), those that hold some one
 * weight at a time, those that hold none not at all. */
#define PARTIAL_GROUP(V, VEC, W, NT, NV, q, LV, WEIGHTS)                                                         \
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) {                                                       \
        VEC w;                                                                                                   \
        int held = lanes_held(L, (LV) + v, (q)->len);                                                            \
        if (held == 0) continue;                                                                                 \
        if (held == 1) {                                                                                         \
            w = WEIGHTS;                                                                                         \
        } else {                                                                                                 \
            float part[W];                                                                                       \
            partial_weights(g, (q), (LV) + v, W, part);                                                          \
            memcpy(&w, part, sizeof w);                                                                          \
        }                                                                                                        \
        ADD_PRODUCTS(NT, VEC, W, v, w)                                                                           \
    }

/* acc[t][lane] for NT positions and the NV lane vectors (of W lanes) from lv0, over all the row's groups in
 * column order (only the last can be partial: tiles start on group boundaries). xp: the positions' inputs in
 * lane order ([T][n_groups * G]); acc: [NT][G]. The accumulators a[NT][NV] stay in registers. */
#define DEFINE_BLOCK(V, VEC, W, TARGET, NT, NV)                                                                  \
    static TARGET void V##_block_##NT##_##NV(const geometry *g, const group *gr, int64_t ng, const float *xp,   \
                                             int64_t xs, int64_t lv0, float *acc) {                             \
        const int64_t G = g->lanes;                                                                              \
        const lane_vectors *L = &g->V;                                                                           \
        VEC a[NT][NV];                                                                                           \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                                                     \
            _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) a[t][v] = (VEC){0};                            \
        int64_t whole = ng > 0 && gr[ng - 1].len < G ? ng - 1 : ng;                                              \
        for (int64_t k = 0; k < whole; k++) {                                                                    \
            const float *x = xp + k * G + lv0 * W;                                                               \
            V##_group p = V##_prepare(g, gr + k);                                                                \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) {                                               \
                VEC w = V##_weights(&p, gr[k].codes, L, lv0 + v);                                                \
                ADD_PRODUCTS(NT, VEC, W, v, w)                                                                   \
            }                                                                                                    \
        }                                                                                                        \
        if (whole < ng) {                                                                                        \
            const group *q = gr + whole;                                                                         \
            const float *x = xp + whole * G + lv0 * W;                                                           \
            V##_group p = V##_prepare(g, q);                                                                     \
            PARTIAL_GROUP(V, VEC, W, NT, NV, q, lv0, V##_weights(&p, q->codes, L, lv0 + v))                      \
        }                                                                                                        \
        _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++)                                                     \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                                                 \
                memcpy(acc + t * G + (lv0 + v) * W, &a[t][v], sizeof a[t][v]);                                  \
    }

/* The pairwise sum of a[0:n] in kernels._tree's order (while n > 1: h = ceil(n/2), a[k] += a[k + h] for
 * k < n - h); while n is a multiple of 16 each step is whole vector adds, the same per-lane operations. */
static inline TARGET_V8 float tree(float *a, int64_t n) {
    while (n % 16 == 0) {
        int64_t h = n / 2;
        for (int64_t k = 0; k < h; k += 8) {
            v8f u, v;
            memcpy(&u, a + k, sizeof u);
            memcpy(&v, a + k + h, sizeof v);
            u += v;
            memcpy(a + k, &u, sizeof u);
        }
        n = h;
    }
    while (n > 1) {
        int64_t h = (n + 1) / 2;
        for (int64_t k = 0; k < n - h; k++) a[k] += a[k + h];
        n = h;
    }
    return a[0];
}

/* tree() of one vector's lanes, the sum of a row's last W lanes: v8 through memory, v16 in registers (the same
 * pairs: lane k adds lane k + 8, then k + 4, k + 2, k + 1). */
static inline TARGET_V8 float v8_lanes_sum(v8f u) {
    float lanes[8];
    memcpy(lanes, &u, sizeof lanes);
    return tree(lanes, 8);
}

#if LUNIT_X86
static inline TARGET_V16 float v16_lanes_sum(v16f u) {
    __m512 z = (__m512)u;
    __m256 s = _mm256_add_ps(_mm512_castps512_ps256(z), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    return _mm_cvtss_f32(q);
}
#endif

/* The pairwise sum (kernels._tree's order) of a row's G = NV * W lanes held in the NV vectors acc[0..NV-1], NV a
 * power of two: while more than one vector is left, lane k adds lane k + n/2 (vector v adds vector v + nv/2), the
 * same per-lane operations as tree() on the stored lanes; the last vector's W lanes by V##_lanes_sum. */
#define REDUCE_ROW(V, NV, acc, out)                                                                              \
    do {                                                                                                         \
        _Pragma("GCC unroll 8") for (int h = NV / 2; h >= 1; h /= 2)                                            \
            _Pragma("GCC unroll 8") for (int v = 0; v < h; v++) (acc)[v] += (acc)[v + h];                       \
        (out) = V##_lanes_sum((acc)[0]);                                                                         \
    } while (0)

/* One position, NR consecutive rows (from rr) of a row tile of r rows whose column tiles are row_tiles, when one
 * block of NV lane vectors holds a whole group (G = NV * W) of BITS-bit codes: each row's accumulator lanes stay
 * in registers while its groups stream past, tile after tile, in column order (each tile's codes, scales and zero
 * points are three runs of bytes, and the tile row's rows follow one another in each), and are summed in
 * registers at its end into out[0..NR-1]. The NR rows share each input vector; each row's sums are its own, in the
 * one order. Each lane vector's byte offset and shift are constants. */
#define DEFINE_ROWS(V, VEC, W, TARGET, NV, BITS, NR)                                                             \
    static inline TARGET void V##_rows_##BITS##_##NR(const geometry *g, const uint8_t *const *row_tiles,       \
                                                     int64_t r, int64_t rr, const float *xp, float *out) {      \
        enum { G = NV * W, ST = G / (8 / BITS), GBYTES = G * BITS / 8 };                                         \
        const lane_vectors *L = &g->V;                                                                           \
        VEC a[NR][NV];                                                                                           \
        _Pragma("GCC unroll 8") for (int n = 0; n < NR; n++)                                                     \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) a[n][v] = (VEC){0};                            \
        for (int64_t j = 0; j < g->ct; j++) {                                                                    \
            const uint8_t *tile = row_tiles[j];                                                                  \
            const int64_t rbc = g->code_row[j], ngc = g->tile_groups[j], sr = g->s_row[j], zr = g->z_row[j];     \
            const uint8_t *p0 = tile + r * rbc + rr * sr, *p1 = tile + r * rbc + r * sr + rr * zr;               \
            const uint8_t *codes = tile + rr * rbc;                                                              \
            const float *x = xp + j * g->tc;                                                                     \
            if (rr + PREFETCH_ROWS < r)                                                                          \
                for (int64_t b = 0; b < NR * rbc; b += 64) __builtin_prefetch(codes + PREFETCH_ROWS * rbc + b);  \
            for (int64_t k = 0; k < ngc; k++, codes += GBYTES, x += G) {                                         \
                V##_group p[NR];                                                                                 \
                group q[NR];                                                                                     \
                _Pragma("GCC unroll 8") for (int n = 0; n < NR; n++) {                                           \
                    q[n].codes = codes + n * rbc;                                                                \
                    q[n].s = V##_scale(p0 + n * sr, k);                                                          \
                    q[n].z = (float)packed_at(p1 + n * zr, k, g->f1bits);                                        \
                    q[n].len = G;                                                                                \
                    p[n] = V##_prepare(g, q + n);                                                                \
                }                                                                                                \
                int64_t len = g->tile_cols[j] - k * G;                                                           \
                if (len >= G) {                                                                                  \
                    _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) {                                       \
                        VEC xv;                                                                                  \
                        memcpy(&xv, x + v * W, sizeof xv);                                                       \
                        _Pragma("GCC unroll 8") for (int n = 0; n < NR; n++)                                     \
                            a[n][v] += V##_weights_at(p + n, q[n].codes + (v * W) % ST,                          \
                                                      8 - BITS * ((v * W) / ST + 1)) * xv;                       \
                    }                                                                                            \
                    continue;                                                                                    \
                }                                                                                                \
                /* the tile's last group, not whole: lane vectors that hold all their columns as above, those    \
                 * that hold some one weight at a time (0 past the group's columns), those that hold none not */ \
                _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) {                                           \
                    int held = lanes_held(L, v, len);                                                            \
                    if (held == 0) continue;                                                                     \
                    VEC xv;                                                                                      \
                    memcpy(&xv, x + v * W, sizeof xv);                                                           \
                    _Pragma("GCC unroll 8") for (int n = 0; n < NR; n++) {                                       \
                        VEC w;                                                                                   \
                        if (held == 1) {                                                                         \
                            w = V##_weights_at(p + n, q[n].codes + (v * W) % ST, 8 - BITS * ((v * W) / ST + 1)); \
                        } else {                                                                                 \
                            float part[W];                                                                       \
                            q[n].len = len;                                                                      \
                            partial_weights(g, q + n, v, W, part);                                               \
                            memcpy(&w, part, sizeof w);                                                          \
                        }                                                                                        \
                        a[n][v] += w * xv;                                                                       \
                    }                                                                                            \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        _Pragma("GCC unroll 8") for (int n = 0; n < NR; n++) REDUCE_ROW(V, NV, a[n], out[n]);                   \
    }

/* One position: the first PREFETCH_ROWS rows' codes of each column tile of a chunk (which the rows' own prefetch,
 * PREFETCH_ROWS ahead, never asks for) and the tiles' scales and zero points, asked for at once before the rows
 * start. With the 8B's 16-row tiles half the rows went unasked, each tile a fresh run of bytes in another bank: a
 * decode step 624 -> 300 ms; SmolLM2's (64-row tiles) 8.7 -> 8.0 ms (docs/performance.md). */
#define PREFETCH_TILE_STARTS                                                                                     \
    for (int64_t j = 0; j < g->ct; j++) {                                                                        \
        const uint8_t *tile = row_tiles[j];                                                                      \
        const int64_t rbc = g->code_row[j], end = (rr0 + PREFETCH_ROWS < rr1 ? rr0 + PREFETCH_ROWS : rr1) * rbc;\
        for (int64_t b = rr0 * rbc; b < end; b += 64) __builtin_prefetch(tile + b);                             \
        const int64_t params = r * (g->s_row[j] + g->z_row[j]);                                                  \
        for (int64_t b = 0; b < params; b += 64) __builtin_prefetch(tile + r * rbc + b);                         \
    }

/* One position, rows rr0 .. rr1 - 1 of row tile i, NR at a time (V##_rows_##BITS##_##NR, defined before when
 * NR > 1), then one at a time. */
#define DEFINE_ONE_POSITION(V, VEC, W, TARGET, NV, BITS, NR)                                                     \
    DEFINE_ROWS(V, VEC, W, TARGET, NV, BITS, 1)                                                                  \
    static TARGET void V##_one_position_##BITS(const geometry *g, const uint8_t *const *tiles, int64_t i,      \
                                               int64_t rr0, int64_t rr1, const float *xp, float *y) {           \
        int64_t r = g->tr < g->rows - i * g->tr ? g->tr : g->rows - i * g->tr, rr = rr0;                         \
        const uint8_t *const *row_tiles = tiles + i * g->ct;                                                     \
        PREFETCH_TILE_STARTS                                                                                     \
        for (; rr + NR <= rr1; rr += NR) V##_rows_##BITS##_##NR(g, row_tiles, r, rr, xp, y + i * g->tr + rr);    \
        for (; rr < rr1; rr++) V##_rows_##BITS##_1(g, row_tiles, r, rr, xp, y + i * g->tr + rr);                 \
    }

/* tree() of the G = 8 * W lanes at p, in vector registers (kernels._tree's pairs: vector v adds vector v + 4,
 * then v + 2, then v + 1, then the last vector's lanes), loaded as the whole vectors the GEMM tile stored. */
#define DEFINE_ROW_SUM(V, VEC, TARGET)                                                                           \
    static inline TARGET float V##_row_sum(const float *p) {                                                     \
        VEC u[8];                                                                                                \
        float sum;                                                                                               \
        /* vector by vector, not one memcpy of the array: that kept a copy of all 8 on the stack */              \
        _Pragma("GCC unroll 8") for (int v = 0; v < 8; v++) u[v] = ((const VEC##_u *)p)[v];                     \
        REDUCE_ROW(V, 8, u, sum);                                                                                \
        return sum;                                                                                              \
    }

/* y[t][o] for every position t of row o, one at a time, over the group's lane vectors in blocks as wide as the
 * registers allow (a prefill's positions are V##_gemm's, _lunit_gemm.h); and the one-position kernel over a row
 * tile (V##_tile_rows). */
#define DEFINE_ROW(V, VEC, W, TARGET, NR)                                                                        \
    DEFINE_BLOCK(V, VEC, W, TARGET, 1, 8)                                                                        \
    DEFINE_BLOCK(V, VEC, W, TARGET, 1, 4)                                                                        \
    DEFINE_BLOCK(V, VEC, W, TARGET, 1, 2)                                                                        \
    DEFINE_BLOCK(V, VEC, W, TARGET, 1, 1)                                                                        \
    DEFINE_ONE_POSITION(V, VEC, W, TARGET, 8, 2, NR)                                                             \
    DEFINE_ROW_SUM(V, VEC, TARGET)                                                                               \
    DEFINE_ONE_POSITION(V, VEC, W, TARGET, 8, 4, NR)                                                             \
    static TARGET void V##_row(const geometry *g, const uint8_t *const *tiles, int64_t o, const float *xp,      \
                               int64_t n_t, float *y, group *gr, float *acc) {                                  \
        const int64_t G = g->lanes, nvec = G / W, xs = g->n_groups * G;                                          \
        int64_t ng = row_groups(g, tiles, o, gr);                                                                \
        for (int64_t t0 = 0; t0 < n_t; t0++) {                                                                   \
            int64_t lv = 0;                                                                                      \
            for (; lv + 8 <= nvec; lv += 8) V##_block_1_8(g, gr, ng, xp + t0 * xs, xs, lv, acc);                 \
            for (; lv + 4 <= nvec; lv += 4) V##_block_1_4(g, gr, ng, xp + t0 * xs, xs, lv, acc);                 \
            for (; lv + 2 <= nvec; lv += 2) V##_block_1_2(g, gr, ng, xp + t0 * xs, xs, lv, acc);                 \
            for (; lv < nvec; lv++) V##_block_1_1(g, gr, ng, xp + t0 * xs, xs, lv, acc);                         \
            y[t0 * g->rows + o] = tree(acc, G);                                                                  \
        }                                                                                                        \
    }                                                                                                            \
    static TARGET void V##_tile_rows(const geometry *g, const uint8_t *const *tiles, int64_t i, int64_t rr0,     \
                                     int64_t rr1, const float *xp, float *y) {                                   \
        (g->bits == 2 ? V##_one_position_2 : V##_one_position_4)(g, tiles, i, rr0, rr1, xp, y);                  \
    }

DEFINE_ROW(v8, v8f, 8, TARGET_V8, 1)
#if LUNIT_X86
/* 16-lane vectors leave room for two rows' accumulators in registers (8-lane ones, AVX2's 16 registers, not) */
DEFINE_ROWS(v16, v16f, 16, TARGET_V16, 8, 2, 2)
DEFINE_ROWS(v16, v16f, 16, TARGET_V16, 8, 4, 2)
DEFINE_ROW(v16, v16f, 16, TARGET_V16, 2)
#endif

#include "_lunit_gemm.h"

typedef void (*gemm_fn)(const geometry *, const uint8_t *const *, int64_t, int64_t, const float *, int64_t, int64_t,
                        float *, group *, float *, float *);

typedef void (*row_fn)(const geometry *, const uint8_t *const *, int64_t, const float *, int64_t, float *, group *,
                       float *);

static int has_avx2 = 1, has_avx512 = 0;

typedef void (*tile_fn)(const geometry *, const uint8_t *const *, int64_t, int64_t, int64_t, const float *, float *);

/* The kernel of one position over a row tile at a time, where there is one: groups of exactly 8 lane vectors of
 * 2- or 4-bit codes (else NULL: the row kernel computes it). */
static tile_fn tile_kernel(const geometry *g, row_fn row) {
    if (!(g->bits == 2 || g->bits == 4)) return NULL;
#if LUNIT_X86
    if (row == v16_row) return g->lanes == 8 * 16 ? v16_tile_rows : NULL;
#endif
    return g->lanes == 8 * 8 ? v8_tile_rows : NULL;
}

/* Whether the 16-lane kernel computes this geometry on this CPU. */
static int v16_computes(const geometry *g) {
    return LUNIT_X86 && has_avx512 && g->bits < 8 && (g->lanes / g->per) % 16 == 0;
}

/* The row kernel of `width` lanes (0: the widest this CPU and geometry allow; all give the same bits). */
static row_fn row_kernel(const geometry *g, int64_t width) {
#if LUNIT_X86
    if ((width == 0 || width == 16) && v16_computes(g)) return v16_row;
#endif
    return width == 16 ? NULL : v8_row;
}

static int get_i64(PyObject *o, int64_t *v) {
    *v = PyLong_AsLongLong(o);
    return !(*v == -1 && PyErr_Occurred());
}

static PyObject *fail(const char *what) {
    PyErr_SetString(PyExc_ValueError, what);
    return NULL;
}

/* The LORA that follows a product, computed beside it: ds[t][out] = its sums (_vunit_sums.h) times the scaling,
 * which the caller adds to the product (y + ds: the one addition of ops.lora). */
typedef struct {
    const float *x;
    const uint8_t *a, *bt;
    const float *values;
    float a_scale, b_scale, scaling;
    int width, failed;
    Py_ssize_t rank;
    float *ds;
} lora_job;

/* One product, cut into chunks of whole output rows for lunit_run (which thread computes a row never changes it);
 * with a LORA beside it, chunk 0 is the LORA (the caller claims it first, while a helper starts on the rows). */
typedef struct {
    const geometry *g;
    const uint8_t *const *tiles;
    const float *xp;
    float *y;
    int64_t n_t;
    row_fn row;
    tile_fn tile_rows;  /* one position, a row tile's rows at a time (else: row by row) */
    gemm_fn gemm;       /* a prefill, as a register tile (else: row by row) */
    int64_t n_tp;       /* positions xp holds: n_t, or with the tile, a multiple of its positions */
    int64_t chunk_rows, chunks_a_tile;
    lora_job *lora;
} product;

/* Rows a chunk: all of them on one thread; else CHUNK_ROWS, or one row tile where the kernel goes tile by tile and
 * the tiles are shorter (each thread then streams whole tiles: SmolLM2's products on two threads took 8.6-8.9 ms
 * against 10.3-12.9 in chunks of 16 rows, docs/performance.md). Returns the number of chunks. */
static int64_t chunks(product *p, int64_t threads) {
    const geometry *g = p->g;
    int64_t rows = threads > 1 ? CHUNK_ROWS : g->rows;  /* even: the kernel's row pairs stay whole */
    if (p->tile_rows) {
        if (rows > g->tr) rows = g->tr;
        p->chunk_rows = rows;
        p->chunks_a_tile = (g->tr + rows - 1) / rows;
        return (g->rows + g->tr - 1) / g->tr * p->chunks_a_tile;
    }
    p->chunk_rows = rows;
    return (g->rows + rows - 1) / rows;
}

static void compute_lora(const product *p) {
    lora_job *l = p->lora;
    const geometry *g = p->g;
    if (lora_sums(l->x, l->a, l->a_scale, l->bt, l->b_scale, l->values, l->width, p->n_t, g->cols, l->rank, g->rows,
                  l->ds)) {
        l->failed = 1;
        return;
    }
    for (int64_t k = 0; k < p->n_t * g->rows; k++) l->ds[k] *= l->scaling;
}

static void compute_chunk(const void *job, int64_t c, void *scratch) {
    const product *p = job;
    const geometry *g = p->g;
    if (p->lora) {
        if (c == 0) {
            compute_lora(p);
            return;
        }
        c--;
    }
    group *gr = scratch;
    float *acc = (float *)(((uintptr_t)(gr + g->n_groups) + 63) & ~(uintptr_t)63);  /* on a 64-byte line */
    if (p->tile_rows) {
        int64_t i = c / p->chunks_a_tile, rr0 = c % p->chunks_a_tile * p->chunk_rows;
        int64_t r = g->tr < g->rows - i * g->tr ? g->tr : g->rows - i * g->tr;
        int64_t rr1 = rr0 + p->chunk_rows < r ? rr0 + p->chunk_rows : r;
        if (rr0 < rr1) p->tile_rows(g, p->tiles, i, rr0, rr1, p->xp, p->y);
        return;
    }
    int64_t o0 = c * p->chunk_rows, o1 = o0 + p->chunk_rows < g->rows ? o0 + p->chunk_rows : g->rows;
    if (p->gemm) {
        float *wl = acc + GEMM_MAX_ROWS * GEMM_POSITIONS * g->lanes;
        p->gemm(g, p->tiles, o0, o1, p->xp, p->n_t, p->n_tp, p->y, gr, wl, acc);
        return;
    }
    for (int64_t o = o0; o < o1; o++) p->row(g, p->tiles, o, p->xp, p->n_t, p->y, gr, acc);
}

/* matmul_affine(tiles, ct, rows, cols, tr, tc, bits, per, lanes, f0bits, f1bits, n_groups, lane_cols, x, y,
 *               threads, width[, a_codes, a_scale, bt_codes, b_scale, values, code_bytes, scaling, rank, ds]):
 *               y[T, rows] = x[T, cols] @ dequant(W)^T on up to `threads` threads, with the kernel of `width` lanes
 *               (0: the widest); with the LORA arguments (those of _vunit.lora) also ds[T, rows] = that LORA's
 *               ((x @ A^T) @ B^T) * scaling, on whichever thread is free.
 * tiles: int64 [row tiles * ct], the address of each tile's first byte (the caller keeps the maps alive);
 * lane_cols: int64 [n_groups * lanes], the column of each lane (-1 past the row's end). */
static PyObject *matmul_affine(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 17 && nargs != 26) return fail("matmul_affine takes 17 arguments, or 26 with a LORA");
    geometry g;
    int64_t *fields[] = {&g.ct, &g.rows, &g.cols, &g.tr, &g.tc, &g.bits, &g.per, &g.lanes, &g.f0bits, &g.f1bits,
                         &g.n_groups};
    for (int k = 0; k < 11; k++)
        if (!get_i64(args[1 + k], fields[k])) return NULL;
    int64_t threads, width;
    if (!get_i64(args[15], &threads) || !get_i64(args[16], &width)) return NULL;
    if (g.per < 1 || g.lanes % (g.per * 8) || g.f0bits != 16 || g.f1bits < 1 ||
        g.f1bits > 8 || g.bits * g.per != 8 || g.n_groups > MAX_GROUPS || g.tc % g.lanes || g.lanes > MAX_LANES ||
        g.ct > MAX_TILES)
        return fail("matmul_affine: a geometry this kernel does not compute (the numba kernel does)");

    Py_buffer tb = {0}, lb = {0}, xb = {0}, yb = {0}, ab = {0}, bb = {0}, vb = {0}, db = {0};
    lora_job lora = {0};
    PyObject *result = NULL;
    if (PyObject_GetBuffer(args[0], &tb, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(args[12], &lb, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(args[13], &xb, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (PyObject_GetBuffer(args[14], &yb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    int64_t n_rt = (g.rows + g.tr - 1) / g.tr, xs = g.n_groups * g.lanes;
    int64_t n_t = (int64_t)(xb.len / (Py_ssize_t)sizeof(float)) / g.cols;
    if (tb.len != (Py_ssize_t)(n_rt * g.ct * 8) || lb.len != (Py_ssize_t)(xs * 8) ||
        xb.len != (Py_ssize_t)(n_t * g.cols * 4) || yb.len != (Py_ssize_t)(n_t * g.rows * 4)) {
        fail("matmul_affine: buffer sizes do not match the geometry");
        goto done;
    }
    if (nargs == 26) {
        int64_t code_bytes, rank;
        lora.a_scale = (float)PyFloat_AsDouble(args[18]);
        lora.b_scale = (float)PyFloat_AsDouble(args[20]);
        lora.scaling = (float)PyFloat_AsDouble(args[23]);
        if (PyErr_Occurred() || !get_i64(args[22], &code_bytes) || !get_i64(args[24], &rank)) goto done;
        if ((code_bytes != 1 && code_bytes != 2) || rank < 1) {
            fail("matmul_affine: LORA codes of 1 or 2 bytes, rank at least 1");
            goto done;
        }
        if (PyObject_GetBuffer(args[17], &ab, PyBUF_C_CONTIGUOUS) < 0) goto done;
        if (PyObject_GetBuffer(args[19], &bb, PyBUF_C_CONTIGUOUS) < 0) goto done;
        if (PyObject_GetBuffer(args[21], &vb, PyBUF_C_CONTIGUOUS) < 0) goto done;
        if (PyObject_GetBuffer(args[25], &db, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
        if (ab.len != (Py_ssize_t)(rank * g.cols * code_bytes) || bb.len != (Py_ssize_t)(rank * g.rows * code_bytes) ||
            vb.len != (Py_ssize_t)(((int64_t)1 << (8 * code_bytes)) * 4) || db.len != yb.len) {
            fail("matmul_affine: LORA buffer sizes do not match the geometry");
            goto done;
        }
        lora.x = (const float *)xb.buf;
        lora.a = ab.buf, lora.bt = bb.buf, lora.values = vb.buf, lora.ds = db.buf;
        lora.width = (int)code_bytes, lora.rank = rank;
    }
    plan(&g);
    row_fn row = row_kernel(&g, width);
    if (!row) {
        fail("matmul_affine: no 16-lane kernel for this CPU or geometry");
        goto done;
    }
    const uint8_t *const *tiles = (const uint8_t *const *)tb.buf;
    const int64_t *lane_cols = (const int64_t *)lb.buf;
    const float *x = (const float *)xb.buf;
    float *y = (float *)yb.buf;
    gemm_fn gemm = NULL;
    if (n_t > 1) {
#if LUNIT_X86
        if (row == v16_row) gemm = v16_gemm;
#endif
        if (row == v8_row) gemm = v8_gemm;
    }
    int64_t n_tp = gemm ? (n_t + GEMM_POSITIONS - 1) / GEMM_POSITIONS * GEMM_POSITIONS : n_t;
    /* on 64-byte lines: a 16-lane load of the inputs then never straddles two (prefill 1.0-1.2x side by side) */
    float *xp = aligned_alloc(64, (sizeof(float) * (size_t)(n_tp * xs + 1) + 63) / 64 * 64);
    if (!xp) {
        PyErr_NoMemory();
        goto done;
    }
    for (int64_t t = 0; t < n_t; t++)
        for (int64_t k = 0; k < xs; k++) xp[t * xs + k] = lane_cols[k] >= 0 ? x[t * g.cols + lane_cols[k]] : 0.0f;
    memset(xp + n_t * xs, 0, sizeof(float) * (size_t)((n_tp - n_t) * xs));
    product job = {&g, tiles, xp, y, n_t, row, n_t == 1 ? tile_kernel(&g, row) : NULL, gemm, n_tp, 0, 0,
                   nargs == 26 ? &lora : NULL};
    int64_t lane_floats = (g.tr > 8 ? g.tr : 8) * g.lanes;
    if (gemm && lane_floats < GEMM_MAX_ROWS * (GEMM_POSITIONS * g.lanes + xs))
        lane_floats = GEMM_MAX_ROWS * (GEMM_POSITIONS * g.lanes + xs);
    size_t scratch = sizeof(group) * (size_t)g.n_groups + 64 + sizeof(float) * (size_t)lane_floats;
    int64_t n_chunks = chunks(&job, threads) + (job.lora != NULL);
    int oom;
    Py_BEGIN_ALLOW_THREADS
    oom = lunit_run(compute_chunk, &job, n_chunks, scratch, (int)threads) != 0;
    Py_END_ALLOW_THREADS
    free(xp);
    if (oom || lora.failed) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    if (tb.obj) PyBuffer_Release(&tb);
    if (lb.obj) PyBuffer_Release(&lb);
    if (xb.obj) PyBuffer_Release(&xb);
    if (yb.obj) PyBuffer_Release(&yb);
    if (ab.obj) PyBuffer_Release(&ab);
    if (bb.obj) PyBuffer_Release(&bb);
    if (vb.obj) PyBuffer_Release(&vb);
    if (db.obj) PyBuffer_Release(&db);
    return result;
}

/* widths([bits, per, lanes]): the lane widths of the kernels this CPU runs: () without AVX2 on x86-64, (8,) or
 * (8, 16); with a geometry's code bits, codes a byte and group size, those that compute it. */
static PyObject *widths(PyObject *self, PyObject *args) {
    (void)self;
    geometry g = {0};
    g.bits = 4, g.per = 2, g.lanes = 128;
    if (!PyArg_ParseTuple(args, "|LLL", &g.bits, &g.per, &g.lanes)) return NULL;
    if (!has_avx2) return PyTuple_New(0);
    return v16_computes(&g) ? Py_BuildValue("(ii)", 8, 16) : Py_BuildValue("(i)", 8);
}

/* limits(): (groups a row, lanes a group, column tiles) the per-product tables hold. */
static PyObject *limits(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return Py_BuildValue("(iii)", MAX_GROUPS, MAX_LANES, MAX_TILES);
}

/* spin_us([us]): how long the kernel's helper threads spin for the next product before they sleep (microseconds;
 * the previous value is returned, a negative or no argument only reads it). */
static PyObject *spin_us(PyObject *self, PyObject *args) {
    (void)self;
    long long us = -1;
    if (!PyArg_ParseTuple(args, "|L", &us)) return NULL;
    return PyLong_FromLongLong(lunit_spin_us(us));
}

static PyMethodDef methods[] = {
    {"matmul_affine", (PyCFunction)(void (*)(void))matmul_affine, METH_FASTCALL,
     "y = x @ dequant(W)^T from packed affine codes (see romac/emulator/_lunit.c)"},
    {"widths", widths, METH_VARARGS, "the lane widths of the kernels this CPU runs ([bits, per, lanes]: for them)"},
    {"spin_us", spin_us, METH_VARARGS, "how long idle helper threads spin before they sleep, in microseconds"},
    {"limits", limits, METH_NOARGS, "(groups a row, lanes a group, column tiles) the kernel's tables hold"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lunit", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__lunit(void) {
#if LUNIT_X86
    __builtin_cpu_init();
    has_avx2 = __builtin_cpu_supports("avx2");
    has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f");
#endif
    half_pow[0] = ldexpf(1.0f, -24);
    for (int e = 1; e < 32; e++) half_pow[e] = ldexpf(1.0f, e - 25);
    return PyModule_Create(&module);
}
