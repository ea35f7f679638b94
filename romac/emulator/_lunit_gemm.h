/* A prefill's product as a register tile, included by _lunit.c after the row kernels it shares its pieces with.
 *
 * The definition is that of kernels.py: lane λ of output (t, o) adds one product w·x a group, in column order,
 * every product and sum rounded to float32; then the lanes' pairwise sum. The row kernels compute a row's lanes for
 * a few positions at a time and make each vector of 16 (or 8) weights from its codes as they go: for every 16
 * multiply-adds, a load of the inputs and a weight lookup beside the multiply and the add. Here a block of R rows'
 * weights is made once (lane order, as the inputs are) for all the prefill's positions, and the multiply-adds of R
 * rows by TR positions share each loaded vector: R weight vectors and TR input vectors a group feed R x TR
 * accumulators held in registers, so the multiplies and adds the definition asks for are nearly all the vector
 * unit does. Each accumulator is one lane vector of one (row, position), summed over the row's groups in column
 * order, then stored with its row's other lane vectors and summed pairwise: the same operations on the same
 * operands, so the same bits, whatever the tile.
 *
 * Lanes that hold no column (past the row's end, in its last group) have weight 0 and input 0: a lane vector
 * with none skips that group, one with some adds 0 · 0 to them. Neither changes a lane, whose sums start at +0 and
 * so never hold -0 (x + y is -0 only if both are), and x + 0 = x for every other x. */

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

/* The lanes of R rows (weights wl[R][xs]) by TR positions (inputs xp[TR][xs]) into lanes[R * TR][G], lane vector
 * by lane vector; groups[v]: how many of the row's groups lane vector v holds columns of. */
#define DEFINE_GEMM_TILE(V, VEC, W, TARGET, R, TR)                                                               \
    static TARGET void V##_gemm_tile(const geometry *g, const int64_t *groups, const float *wl, const float *xp, \
                                     float *lanes) {                                                            \
        const int64_t G = g->lanes, nvec = G / W, xs = g->n_groups * G;                                          \
        for (int64_t v = 0; v < nvec; v++) {                                                                     \
            VEC a[R][TR];                                                                                        \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                                  \
                _Pragma("GCC unroll 8") for (int t = 0; t < TR; t++) a[r][t] = (VEC){0};                        \
            const float *wk = wl + v * W, *xk = xp + v * W;                                                      \
            for (int64_t k = 0; k < groups[v]; k++, wk += G, xk += G) {                                          \
                VEC w[R];                                                                                        \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) memcpy(&w[r], wk + r * xs, sizeof w[r]);    \
                _Pragma("GCC unroll 8") for (int t = 0; t < TR; t++) {                                           \
                    VEC xv;                                                                                      \
                    memcpy(&xv, xk + t * xs, sizeof xv);                                                         \
                    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) a[r][t] += w[r] * xv;                   \
                }                                                                                                \
            }                                                                                                    \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                                  \
                _Pragma("GCC unroll 8") for (int t = 0; t < TR; t++)                                             \
                    memcpy(lanes + (r * TR + t) * G + v * W, &a[r][t], sizeof a[r][t]);                          \
        }                                                                                                        \
    }

/* y[t][o] for rows o0 .. o1 - 1 and positions 0 .. n_t - 1 (xp holds n_tp, a multiple of TR, 0 past n_t): R rows'
 * weights made at a time, then tiled with every TR positions. Scratch: gr (n_groups), wl (R * xs), lanes
 * (R * TR * G). */
#define DEFINE_GEMM(V, VEC, W, TARGET, R, TR)                                                                    \
    DEFINE_GEMM_WEIGHTS(V, VEC, W, TARGET)                                                                       \
    DEFINE_GEMM_TILE(V, VEC, W, TARGET, R, TR)                                                                   \
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
                V##_gemm_tile(g, groups, wl, xp + t0 * xs, lanes);                                               \
                for (int64_t r = 0; r < R && ob + r < o1; r++)                                                   \
                    for (int64_t t = 0; t < TR && t0 + t < n_t; t++) {                                           \
                        float *l = lanes + (r * TR + t) * G;                                                     \
                        y[(t0 + t) * g->rows + ob + r] = nvec == 8 ? V##_row_sum(l) : tree(l, G);                \
                    }                                                                                            \
            }                                                                                                    \
        }                                                                                                        \
    }
