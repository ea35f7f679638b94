/* The vector unit's arithmetic that two extensions share: the balanced-tree sums of every instruction of
 * romac/emulator/_vunit.c, and LORA's sums from the codes in SRAM, which _vunit.c computes as an instruction and
 * _lunit.c beside a product (the LORA that follows a MATVEC, on whichever thread is free). Included by both (each
 * gets its own copy of these static functions); romac/emulator/ops.py is the definition of what they compute. */
#ifndef VUNIT_SUMS_H
#define VUNIT_SUMS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The loops below are elementwise over independent lanes (no reassociation), so a wider vector unit computes the
 * same bits: on x86-64 with GCC (and ifunc) the hot ones are built for AVX-512 and AVX2 too, picked at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define VUNIT_FAST __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VUNIT_FAST
#endif

/* ops.tree_sum over the n rows of a [n][w] block, for each of the w columns, in place: the sums end in row 0.
 * With h the largest power of two below n, row i + h is added to row i (i < n - h), then the same over h rows. */
VUNIT_FAST static void tree_rows(float *a, Py_ssize_t n, Py_ssize_t w) {
    while (n > 1) {
        Py_ssize_t h = 1;
        while (h * 2 < n) h *= 2;
        /* rows i < n - h take rows i + h: (n - h) * w contiguous floats take the ones h * w further on */
        float *restrict dst = a;
        const float *restrict src = a + h * w;
        const Py_ssize_t count = (n - h) * w;
        for (Py_ssize_t l = 0; l < count; l++) dst[l] += src[l];
        n = h;
    }
}

/* The value of an FP8 E4M3 (fn) code, exactly: a normal code's exponent and mantissa bits placed where a float32's
 * are, its exponent rebased by 127 - 7 (integer arithmetic: no subnormal float is formed, which would cost a
 * microcode assist on some CPUs); a subnormal code is m 2^-9; 0x7f is NaN. Arithmetic rather than a table, so that
 * a vector unit converts a vector of codes at once; tests/test_vunit.py holds it to
 * romac.codecs.elements.lora_code_values for all 256 codes. */
static inline float fp8_e4m3_value(uint8_t c) {
    const uint32_t em = c & 0x7f, sign = (uint32_t)(c & 0x80) << 24;
    uint32_t bits = sign | ((em << 20) + ((uint32_t)(127 - 7) << 23));
    float normal;
    memcpy(&normal, &bits, sizeof normal);
    float subnormal = (float)em * 0x1p-9f;
    subnormal = sign ? -subnormal : subnormal;
    float value = em < 8 ? subnormal : normal;
    return em == 0x7f ? NAN : value;
}

/* t[i] = x[i] * (value of code i * scale) for n codes of `width` bytes: FP8 E4M3 (1 byte) or a 2-byte code's
 * value from the table (little-endian) */
VUNIT_FAST static void code_terms(float *restrict t, const float *restrict x, const uint8_t *restrict codes,
                                  int width, const float *restrict values, float scale, Py_ssize_t n) {
    if (width == 1)
        for (Py_ssize_t i = 0; i < n; i++) t[i] = x[i] * (fp8_e4m3_value(codes[i]) * scale);
    else
        for (Py_ssize_t i = 0; i < n; i++)
            t[i] = x[i] * (values[(uint32_t)codes[2 * i] | (uint32_t)codes[2 * i + 1] << 8] * scale);
}

/* t[i] = h * (value of code i * scale): one row of B^T's terms, h the same for all */
VUNIT_FAST static void code_terms_of(float *restrict t, float h, const uint8_t *restrict codes, int width,
                                     const float *restrict values, float scale, Py_ssize_t n) {
    if (width == 1)
        for (Py_ssize_t i = 0; i < n; i++) t[i] = h * (fp8_e4m3_value(codes[i]) * scale);
    else
        for (Py_ssize_t i = 0; i < n; i++)
            t[i] = h * (values[(uint32_t)codes[2 * i] | (uint32_t)codes[2 * i + 1] << 8] * scale);
}

#define LORA_BLOCK 32 /* positions of a prefill whose A sums are computed together */

/* w[i] = value of code i * scale: a matrix's weights, decoded once for all the positions of a prefill */
VUNIT_FAST static void decode_codes(float *restrict w, const uint8_t *restrict codes, int width,
                                    const float *restrict values, float scale, Py_ssize_t n) {
    if (width == 1)
        for (Py_ssize_t i = 0; i < n; i++) w[i] = fp8_e4m3_value(codes[i]) * scale;
    else
        for (Py_ssize_t i = 0; i < n; i++) w[i] = values[(uint32_t)codes[2 * i] | (uint32_t)codes[2 * i + 1] << 8] * scale;
}

/* t[i][p] = xt[i][p] * w[i]: the terms of t sums over i (one per position p), xt the positions' inputs transposed */
VUNIT_FAST static void column_terms(float *restrict t, const float *restrict xt, const float *restrict w,
                                    Py_ssize_t n, Py_ssize_t t_count) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const float wi = w[i], *xi = xt + i * t_count;
        float *ti = t + i * t_count;
        for (Py_ssize_t p = 0; p < t_count; p++) ti[p] = xi[p] * wi;
    }
}

/* t[i][l] = x[i] * a[i][l] for n rows of w (a's rows a_stride apart): the terms of w sums over n rows */
VUNIT_FAST static void scaled_rows(float *restrict t, const float *restrict x, const float *restrict a, Py_ssize_t n,
                                   Py_ssize_t w, Py_ssize_t a_stride) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const float xi = x[i], *ai = a + i * a_stride;
        float *ti = t + i * w;
        for (Py_ssize_t l = 0; l < w; l++) ti[l] = xi * ai[l];
    }
}

/* A prefill's LORA sums: A and B^T decoded before, then A's sums for all positions at once (a tree over in of
 * [in][positions] terms), then B's per position into d [positions][out]; the same trees, so the same bits, as one
 * position at a time. h: [positions][rank]; scratch: in * positions floats at least, and rank * out. */
static void lora_positions(const float *x, const float *wa, const float *wbt, float *d, float *h, float *xt,
                           float *terms, Py_ssize_t t, Py_ssize_t in, Py_ssize_t rank, Py_ssize_t out) {
    for (Py_ssize_t p = 0; p < t; p++)
        for (Py_ssize_t i = 0; i < in; i++) xt[i * t + p] = x[p * in + i];
    for (Py_ssize_t r = 0; r < rank; r++) {
        column_terms(terms, xt, wa + r * in, in, t);
        tree_rows(terms, in, t);
        for (Py_ssize_t p = 0; p < t; p++) h[p * rank + r] = terms[p];
    }
    for (Py_ssize_t p = 0; p < t; p++) {
        scaled_rows(terms, h + p * rank, wbt, rank, out, out);
        tree_rows(terms, rank, out);
        memcpy(d + p * out, terms, (size_t)out * sizeof(float));
    }
}

/* The sums of LORA for t positions x [t][in] into d [t][out]: (x @ A^T) @ B^T before the scaling, from A's codes
 * [rank][in] and B^T's [rank][out] (`width` bytes each: FP8 E4M3, or a 2-byte code's value from `values`), each
 * sum ops.tree_sum's tree. Returns 0, or -1 when out of memory. */
static int lora_sums(const float *x, const uint8_t *a, float a_scale, const uint8_t *bt, float b_scale,
                     const float *values, int width, Py_ssize_t t, Py_ssize_t in, Py_ssize_t rank, Py_ssize_t out,
                     float *d) {
    if (t > 1) {
        /* decoded A [rank][in] and B^T [rank][out], then for a block of positions: h, their inputs transposed,
         * the terms */
        Py_ssize_t block = t < LORA_BLOCK ? t : LORA_BLOCK;
        Py_ssize_t terms = in * block > rank * out ? in * block : rank * out;
        float *buf = malloc((size_t)(rank * in + rank * out + block * rank + in * block + terms) * sizeof(float));
        if (!buf) return -1;
        float *wa = buf, *wbt = wa + rank * in, *h = wbt + rank * out, *xt = h + block * rank, *tm = xt + in * block;
        decode_codes(wa, a, width, values, a_scale, rank * in);
        decode_codes(wbt, bt, width, values, b_scale, rank * out);
        for (Py_ssize_t p0 = 0; p0 < t; p0 += block) {
            Py_ssize_t n = t - p0 < block ? t - p0 : block;
            lora_positions(x + p0 * in, wa, wbt, d + p0 * out, h, xt, tm, n, in, rank, out);
        }
        free(buf);
        return 0;
    }
    /* one position: each weight decoded where it is used. The terms: [in] (one of A's rows), then [rank][out] */
    Py_ssize_t terms = in > rank * out ? in : rank * out;
    float *buf = malloc((size_t)(terms + rank + 1) * sizeof(float));
    if (!buf) return -1;
    float *h = buf + terms;
    for (Py_ssize_t r = 0; r < rank; r++) {
        code_terms(buf, x, a + r * in * width, width, values, a_scale, in);
        tree_rows(buf, in, 1);
        h[r] = buf[0];
    }
    for (Py_ssize_t r = 0; r < rank; r++)
        code_terms_of(buf + r * out, h[r], bt + r * out * width, width, values, b_scale, out);
    tree_rows(buf, rank, out);
    memcpy(d, buf, (size_t)out * sizeof(float));
    free(buf);
    return 0;
}

#endif
