/* Peak float32 multiply-accumulate rate of one core (x86-64 with AVX-512): a separate multiply and add, each
 * rounded (the emulator's FP32 datapath, built with -ffp-contract=off), against fused multiply-adds (onnxruntime's
 * MLAS GEMM), with 16-lane and 8-lane vectors. Twelve independent accumulators, nothing read from memory: what the
 * core can do at best, to set the kernels' figures against (docs/performance.md).
 *
 *     gcc -O3 -ffp-contract=off benchmarks/peak_fp32.c -o /tmp/peak_fp32 && /tmp/peak_fp32
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define N 200000000L

/* G multiply-accumulates a second of STEP (a[i] = a[i] + w * x, one way or the other) on LANES-lane vectors; the
 * empty asm makes x look new at every step, so the product is not hoisted out of the loop. */
#define DEFINE_PEAK(NAME, TARGET, VEC, SET1, CONSTRAINT, LANES, STEP)                                            \
    __attribute__((target(TARGET))) static double NAME(void) {                                                  \
        VEC a[12], x = SET1(1.0000001f), w = SET1(0.9999999f);                                                   \
        for (int i = 0; i < 12; i++) a[i] = SET1((float)i);                                                      \
        double t = now();                                                                                        \
        for (long k = 0; k < N / 12; k++)                                                                        \
            _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) {                                              \
                a[i] = STEP;                                                                                     \
                __asm__("" : "+" CONSTRAINT(x));                                                                 \
            }                                                                                                    \
        t = now() - t;                                                                                           \
        float s = 0;                                                                                             \
        for (int i = 0; i < 12; i++) s += a[i][0];                                                               \
        if (s == 1) puts("");                                                                                    \
        return (double)(N / 12) * 12 * LANES / t / 1e9;                                                          \
    }

DEFINE_PEAK(muladd512, "avx512f", __m512, _mm512_set1_ps, "v", 16, _mm512_add_ps(a[i], _mm512_mul_ps(w, x)))
DEFINE_PEAK(fma512, "avx512f,fma", __m512, _mm512_set1_ps, "v", 16, _mm512_fmadd_ps(w, x, a[i]))
DEFINE_PEAK(muladd256, "avx2", __m256, _mm256_set1_ps, "x", 8, _mm256_add_ps(a[i], _mm256_mul_ps(w, x)))
DEFINE_PEAK(fma256, "avx2,fma", __m256, _mm256_set1_ps, "x", 8, _mm256_fmadd_ps(w, x, a[i]))

int main(void) {
    puts("| round | multiply + add, 16 lanes | FMA, 16 lanes | multiply + add, 8 lanes | FMA, 8 lanes |");
    puts("| ---: | ---: | ---: | ---: | ---: |");
    for (int r = 1; r <= 3; r++)
        printf("| %d | %.1f | %.1f | %.1f | %.1f |\n", r, muladd512(), fma512(), muladd256(), fma256());
    puts("(G multiply-accumulates a second, one core)");
}
