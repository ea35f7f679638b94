/* A prefill's product as a register tile, included by _lunit.c after the row kernels it shares its pieces with.
 *
 * The definition is that of kernels.py: lane λ of output (t, o) adds one product w·x a group, in column order,
 * every product and sum rounded to float32; then the lanes' pairwise sum. The row kernels computed a prefill's rows
 * a few positions at a time and made each vector of 16 (or 8) weights from its codes as they went: for every 16
 * multiply-adds, a load of the inputs and a weight lookup beside the multiply and the add. Here a block of R rows'
 * weights is made once (lane order, as the inputs are) for all the prefill's positions, and the multiply-adds of R
 * rows by TR positions share each loaded vector: R weight vectors and TR input vectors a group feed R x TR
 * accumulators held in registers, so the multiplies and adds the definition asks for are nearly all the vector
 * unit does (SmolLM2's 32-token prefill 1.4-1.7x as fast as with the row kernels, docs/performance.md). Each
 * accumulator is one lane vector of one (row, position), summed over the row's groups in column order, then added
 * to its output's other lane vectors in the pairwise sum's pairs (as they are made, for groups of 128 lanes in
 * 16-lane vectors; else stored and summed after): the same operations on the same operands, so the same bits,
 * whatever the tile.
 *
 * Lanes that hold no column (past the row's end, in its last group) have weight 0 and input 0: a lane vector
 * with none skips that group, one with some adds 0 · 0 to them. Neither changes a lane, whose sums start at +0 and
 * so never hold -0 (x + y is -0 only if both are), and x + 0 = x for every other x. */

/* The sums of n outputs' G lanes (lanes[n][G]) into out[n], output by output (kernels._tree's order). */
#define DEFINE_GEMM_SUMS(V, W, TARGET)                                                                           \
    static inline TARGET void V##_gemm_sums(const geometry *g, float *lanes, int64_t n, float *out) {           \
        const int64_t G = g->lanes;                                                                              \
        for (int64_t i = 0; i < n; i++) out[i] = G == 8 * W ? V##_row_sum(lanes + i * G) : tree(lanes + i * G, G); \
    }

/* One group's weights in lane order, 0 in the lanes past the row's end: out[G]. */
#define DEFINE_GEMM_GROUP(V, VEC, W, TARGET)                                                                     \
    static TARGET void V##_gemm_group(const geometry *g, const group *q, float *out) {                          \
        const int64_t G = g->lanes, nvec = G / W;                                                                \
        const lane_vectors *L = &g->V;                                                                           \
        V##_group p = V##_prepare(g, q);                                                                         \
        for (int64_t v = 0; v < nvec; v++) {                                                                     \
            VEC w;                                                                                               \
            int held = q->len < G ? lanes_held(L, v, q->len) : 1;                                                \
            if (held == 1) {                                                                                     \
                w = V##_weights(&p, q->codes, L, v);                                                             \
            } else if (held == 0) {                                                                              \
                w = (VEC){0};                                                                                    \
            } else {                                                                                             \
                float part[W];                                                                                   \
                partial_weights(g, q, v, W, part);                                                               \
                memcpy(&w, part, sizeof w);                                                                      \
            }                                                                                                    \
            memcpy(out + v * W, &w, sizeof w);                                                                   \
        }                                                                                                        \
    }

/* Row o's whole groups of BITS-bit codes in 8 lane vectors, each vector's byte offset and shift a constant (as in
 * the one-position kernel), its last group, if partial, by V##_gemm_group. */
#define DEFINE_GEMM_WEIGHTS_BITS(V, VEC, W, TARGET, BITS)                                                        \
    static TARGET void V##_gemm_weights_##BITS(const geometry *g, const group *gr, int64_t ng, float *out) {    \
        enum { G = 8 * W, ST = G / (8 / BITS) };                                                                 \
        int64_t whole = ng > 0 && gr[ng - 1].len < G ? ng - 1 : ng;                                              \
        for (int64_t k = 0; k < whole; k++, out += G) {                                                          \
            V##_group p = V##_prepare(g, gr + k);                                                                \
            _Pragma("GCC unroll 8") for (int v = 0; v < 8; v++)                                                  \
                ((VEC##_u *)out)[v] = V##_weights_at(&p, gr[k].codes + (v * W) % ST, 8 - BITS * ((v * W) / ST + 1)); \
        }                                                                                                        \
        if (whole < ng) V##_gemm_group(g, gr + whole, out);                                                      \
    }

/* Row o's weights in lane order, 0 past the row's end: out[n_groups * G] (gr: scratch for its groups). */
#define DEFINE_GEMM_WEIGHTS(V, VEC, W, TARGET)                                                                   \
    DEFINE_GEMM_GROUP(V, VEC, W, TARGET)                                                                         \
    DEFINE_GEMM_WEIGHTS_BITS(V, VEC, W, TARGET, 2)                                                               \
    DEFINE_GEMM_WEIGHTS_BITS(V, VEC, W, TARGET, 4)                                                               \
    static TARGET void V##_gemm_weights(const geometry *g, const uint8_t *const *tiles, int64_t o, group *gr,  \
                                        float *out) {                                                            \
        int64_t ng = row_groups(g, tiles, o, gr);                                                                \
        if (g->lanes == 8 * W && (g->bits == 2 || g->bits == 4)) {                                               \
            (g->bits == 2 ? V##_gemm_weights_2 : V##_gemm_weights_4)(g, gr, ng, out);                            \
            return;                                                                                              \
        }                                                                                                        \
        for (int64_t k = 0; k < ng; k++) V##_gemm_group(g, gr + k, out + k * g->lanes);                          \
    }

/* a[R][TR] = lane vector v of R rows (weights wl[R][xs]) by TR positions (inputs xp[TR][xs]), over the groups
 * it holds columns of (groups[v]), in column order. */
#define GEMM_LANE_VECTOR(VEC, W, R, TR, a, v)                                                                    \
    do {                                                                                                         \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                                      \
            _Pragma("GCC unroll 8") for (int t = 0; t < TR; t++) a[r][t] = (VEC){0};                            \
        const float *wk = wl + (v) * W, *xk = xp + (v) * W;                                                      \
        for (int64_t k = 0; k < groups[v]; k++, wk += G, xk += G) {                                              \
            VEC w[R];                                                                                            \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) w[r] = *(const VEC##_u *)(wk + r * xs);         \
            _Pragma("GCC unroll 8") for (int t = 0; t < TR; t++) {                                               \
                VEC xv = *(const VEC##_u *)(xk + t * xs);                                                        \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) a[r][t] += w[r] * xv;                       \
            }                                                                                                    \
        }                                                                                                        \
    } while (0)

/* sums[r * TR + t] = output (r, t) of R rows by TR positions: every lane vector's accumulators stored in
 * lanes[R * TR][G], then each (row, position)'s lanes summed (V##_gemm_sums). */
#define DEFINE_GEMM_TILE(V, VEC, W, TARGET, R, TR)                                                               \
    static TARGET void V##_gemm_tile_stored(const geometry *g, const int64_t *groups, const float *wl,         \
                                            const float *xp, float *lanes, float *sums) {                       \
        const int64_t G = g->lanes, nvec = G / W, xs = g->n_groups * G;                                          \
        for (int64_t v = 0; v < nvec; v++) {                                                                     \
            VEC a[R][TR];                                                                                        \
            GEMM_LANE_VECTOR(VEC, W, R, TR, a, v);                                                               \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                                  \
                _Pragma("GCC unroll 8") for (int t = 0; t < TR; t++)                                             \
                    *(VEC##_u *)(lanes + (r * TR + t) * G + v * W) = a[r][t];                                    \
        }                                                                                                        \
        V##_gemm_sums(g, lanes, R * TR, sums);                                                                   \
    }

#if LUNIT_X86
/* The 16 sums of u[i]'s lanes at once, in kernels._tree's pairs (lane k adds lane k + 8, then k + 4, k + 2,
 * k + 1): each add on the lanes of several vectors side by side, shuffled together first, 45 operations where one
 * vector at a time takes 8 each. Lane 4m + j of the last vector holds the sum of u[m + 4j]. */
static inline TARGET_V16 void v16_lanes_sums16(const v16f *u, float *out) {
    __m512 c[8], e[4], f[2];
    for (int i = 0; i < 8; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4((__m512)u[2 * i], (__m512)u[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4((__m512)u[2 * i], (__m512)u[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)
        e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)
        f[i] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * i], e[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(e[2 * i], e[2 * i + 1], 0xEE));
    float lanes[16];
    _mm512_storeu_ps(lanes, _mm512_add_ps(_mm512_shuffle_ps(f[0], f[1], 0x88), _mm512_shuffle_ps(f[0], f[1], 0xDD)));
    for (int m = 0; m < 4; m++)
        for (int j = 0; j < 4; j++) out[m + 4 * j] = lanes[4 * m + j];
}

/* The 16-lane tile of 16 (row, position) outputs over groups of 8 lane vectors, summed as it goes: the lane
 * vectors in the order 0, 4, 2, 6, 1, 5, 3, 7, each added to the pending partial sums it pairs with in the tree
 * (vector v with v + 4, those with v + 2, those with v + 1: kernels._tree's pairs, depth first) so that only
 * three vectors of partial sums an output wait in memory (stack[3][16]), and the last vector's lanes summed in
 * registers (v16_lanes_sums16), where storing every lane vector and summing row by row loaded each back. */
#define DEFINE_GEMM_TILE_SUMMED(R, TR)                                                                           \
    _Static_assert((R) * (TR) == 16, "the summed tile holds 16 outputs");                                        \
    static TARGET_V16 void v16_gemm_tile_summed(const geometry *g, const int64_t *groups, const float *wl,      \
                                                const float *xp, float *stack, float *sums) {                   \
        enum { W = 16 };                                                                                         \
        const int64_t G = 128, xs = g->n_groups * G;                                                             \
        static const int order[8] = {0, 4, 2, 6, 1, 5, 3, 7};                                                    \
        v16f a[R][TR];                                                                                           \
        _Pragma("GCC unroll 1") for (int i = 0; i < 8; i++) {                                                    \
            GEMM_LANE_VECTOR(v16f, W, R, TR, a, order[i]);                                                       \
            int level = 0;                                                                                       \
            for (int b = i; b & 1; b >>= 1, level++)                                                             \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                              \
                    _Pragma("GCC unroll 8") for (int t = 0; t < TR; t++)                                         \
                        a[r][t] += *(const v16f *)(stack + (level * 16 + r * TR + t) * W);                       \
            if (i < 7)                                                                                           \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                              \
                    _Pragma("GCC unroll 8") for (int t = 0; t < TR; t++)                                         \
                        *(v16f *)(stack + (level * 16 + r * TR + t) * W) = a[r][t];                              \
        }                                                                                                        \
        v16_lanes_sums16(&a[0][0], sums);                                                                        \
    }
#endif

/* y[t][o] for rows o0 .. o1 - 1 and positions 0 .. n_t - 1 (xp holds n_tp, a multiple of TR, 0 past n_t): R rows'
 * weights made at a time, then tiled with every TR positions (V##_gemm_tile: sums[R * TR] of a tile). Scratch: gr
 * (n_groups), wl (R * xs), lanes (R * TR * G). */
#define DEFINE_GEMM(V, VEC, W, TARGET, R, TR)                                                                    \
    DEFINE_GEMM_WEIGHTS(V, VEC, W, TARGET)                                                                       \
    static TARGET void V##_gemm(const geometry *g, const uint8_t *const *tiles, int64_t o0, int64_t o1,         \
                                const float *xp, int64_t n_t, int64_t n_tp, float *y, group *gr, float *wl,      \
                                float *lanes) {                                                                  \
        const int64_t G = g->lanes, nvec = G / W, xs = g->n_groups * G;                                          \
        const int64_t last = g->tile_cols[g->ct - 1] - (g->tile_groups[g->ct - 1] - 1) * G;                      \
        int64_t groups[MAX_LANES / 8];                                                                           \
        for (int64_t v = 0; v < nvec; v++)                                                                       \
            groups[v] = g->n_groups - (last < G && lanes_held(&g->V, v, last) == 0);                             \
        for (int64_t ob = o0; ob < o1; ob += R) {                                                                \
            for (int64_t r = 0; r < R; r++) {                                                                    \
                if (ob + r < o1)                                                                                 \
                    V##_gemm_weights(g, tiles, ob + r, gr, wl + r * xs);                                         \
                else                                                                                             \
                    memset(wl + r * xs, 0, sizeof(float) * (size_t)xs);                                          \
            }                                                                                                    \
            for (int64_t t0 = 0; t0 < n_tp; t0 += TR) {                                                          \
                float sums[R * TR];                                                                              \
                V##_gemm_tile(g, groups, wl, xp + t0 * xs, lanes, sums);                                         \
                for (int64_t r = 0; r < R && ob + r < o1; r++)                                                   \
                    for (int64_t t = 0; t < TR && t0 + t < n_t; t++) y[(t0 + t) * g->rows + ob + r] = sums[r * TR + t]; \
            }                                                                                                    \
        }                                                                                                        \
    }

/* A prefill's register tile: rows by positions (16 accumulators of 16 lanes, 8 of 8 lanes in AVX2's 16 registers).
 * SmolLM2's 32-token prefill, side by side: 4 x 4 faster than 6 x 4, 2 x 8, 3 x 8 and 8 x 2 (docs/performance.md). */
#define GEMM_ROWS16 4
#define GEMM_ROWS8 2
#define GEMM_POSITIONS 4
/* the rows of weights a thread's scratch holds: the larger tile's */
#define GEMM_MAX_ROWS (GEMM_ROWS16 > GEMM_ROWS8 ? GEMM_ROWS16 : GEMM_ROWS8)

DEFINE_GEMM_SUMS(v8, 8, TARGET_V8)
DEFINE_GEMM_TILE(v8, v8f, 8, TARGET_V8, GEMM_ROWS8, GEMM_POSITIONS)
static inline TARGET_V8 void v8_gemm_tile(const geometry *g, const int64_t *groups, const float *wl, const float *xp,
                                          float *lanes, float *sums) {
    v8_gemm_tile_stored(g, groups, wl, xp, lanes, sums);
}
DEFINE_GEMM(v8, v8f, 8, TARGET_V8, GEMM_ROWS8, GEMM_POSITIONS)

#if LUNIT_X86
DEFINE_GEMM_SUMS(v16, 16, TARGET_V16)
DEFINE_GEMM_TILE(v16, v16f, 16, TARGET_V16, GEMM_ROWS16, GEMM_POSITIONS)
DEFINE_GEMM_TILE_SUMMED(GEMM_ROWS16, GEMM_POSITIONS)
static inline TARGET_V16 void v16_gemm_tile(const geometry *g, const int64_t *groups, const float *wl,
                                            const float *xp, float *lanes, float *sums) {
    if (g->lanes == 128)
        v16_gemm_tile_summed(g, groups, wl, xp, lanes, sums);
    else
        v16_gemm_tile_stored(g, groups, wl, xp, lanes, sums);
}
DEFINE_GEMM(v16, v16f, 16, TARGET_V16, GEMM_ROWS16, GEMM_POSITIONS)
#endif
