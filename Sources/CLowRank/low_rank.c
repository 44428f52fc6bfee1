// The product of a LoRA merge: W += L·R with a small inner dimension (the rank, usually
// 8-64). Each output element costs 2k flops over k loads of R, so the kernel keeps a
// 4x16 block of C in registers and streams R rows through it: R (k x 16 floats per
// block) stays in L1 while the block's rows of L are broadcast. AVX2+FMA when the CPU
// has it (checked once at run time), a portable loop otherwise.
#include "low_rank.h"

static void update_portable(float *c, size_t ldc, const float *l, const float *r, size_t ldr,
                            size_t rows, size_t n, size_t k) {
    for (size_t i = 0; i < rows; i++) {
        float *ci = c + i * ldc;
        for (size_t q = 0; q < k; q++) {
            const float a = l[i * k + q];
            const float *rq = r + q * ldr;
            for (size_t j = 0; j < n; j++) ci[j] += a * rq[j];
        }
    }
}

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx2,fma")))
static void update_avx2(float *c, size_t ldc, const float *l, const float *r, size_t ldr,
                        size_t rows, size_t n, size_t k) {
    size_t i = 0;
    for (; i + 4 <= rows; i += 4) {
        float *c0 = c + i * ldc, *c1 = c0 + ldc, *c2 = c1 + ldc, *c3 = c2 + ldc;
        const float *l0 = l + i * k, *l1 = l0 + k, *l2 = l1 + k, *l3 = l2 + k;
        size_t j = 0;
        for (; j + 16 <= n; j += 16) {
            __m256 a00 = _mm256_loadu_ps(c0 + j), a01 = _mm256_loadu_ps(c0 + j + 8);
            __m256 a10 = _mm256_loadu_ps(c1 + j), a11 = _mm256_loadu_ps(c1 + j + 8);
            __m256 a20 = _mm256_loadu_ps(c2 + j), a21 = _mm256_loadu_ps(c2 + j + 8);
            __m256 a30 = _mm256_loadu_ps(c3 + j), a31 = _mm256_loadu_ps(c3 + j + 8);
            const float *rq = r + j;
            for (size_t q = 0; q < k; q++, rq += ldr) {
                __m256 r0 = _mm256_loadu_ps(rq), r1 = _mm256_loadu_ps(rq + 8);
                __m256 b;
                b = _mm256_broadcast_ss(l0 + q); a00 = _mm256_fmadd_ps(b, r0, a00); a01 = _mm256_fmadd_ps(b, r1, a01);
                b = _mm256_broadcast_ss(l1 + q); a10 = _mm256_fmadd_ps(b, r0, a10); a11 = _mm256_fmadd_ps(b, r1, a11);
                b = _mm256_broadcast_ss(l2 + q); a20 = _mm256_fmadd_ps(b, r0, a20); a21 = _mm256_fmadd_ps(b, r1, a21);
                b = _mm256_broadcast_ss(l3 + q); a30 = _mm256_fmadd_ps(b, r0, a30); a31 = _mm256_fmadd_ps(b, r1, a31);
            }
            _mm256_storeu_ps(c0 + j, a00); _mm256_storeu_ps(c0 + j + 8, a01);
            _mm256_storeu_ps(c1 + j, a10); _mm256_storeu_ps(c1 + j + 8, a11);
            _mm256_storeu_ps(c2 + j, a20); _mm256_storeu_ps(c2 + j + 8, a21);
            _mm256_storeu_ps(c3 + j, a30); _mm256_storeu_ps(c3 + j + 8, a31);
        }
        for (; j < n; j++) {
            float s0 = c0[j], s1 = c1[j], s2 = c2[j], s3 = c3[j];
            for (size_t q = 0; q < k; q++) {
                const float rv = r[q * ldr + j];
                s0 = __builtin_fmaf(l0[q], rv, s0); s1 = __builtin_fmaf(l1[q], rv, s1);
                s2 = __builtin_fmaf(l2[q], rv, s2); s3 = __builtin_fmaf(l3[q], rv, s3);
            }
            c0[j] = s0; c1[j] = s1; c2[j] = s2; c3[j] = s3;
        }
    }
    for (; i < rows; i++) {
        float *ci = c + i * ldc;
        const float *li = l + i * k;
        size_t j = 0;
        for (; j + 8 <= n; j += 8) {
            __m256 a = _mm256_loadu_ps(ci + j);
            for (size_t q = 0; q < k; q++) a = _mm256_fmadd_ps(_mm256_broadcast_ss(li + q), _mm256_loadu_ps(r + q * ldr + j), a);
            _mm256_storeu_ps(ci + j, a);
        }
        for (; j < n; j++) {
            float s = ci[j];
            for (size_t q = 0; q < k; q++) s = __builtin_fmaf(li[q], r[q * ldr + j], s);
            ci[j] = s;
        }
    }
}

static int has_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return cached;
}

int ckpt_low_rank_uses_avx2(void) { return has_avx2(); }

// Columns are taken in panels so the panel of R (k x 256 floats) stays in L1/L2 while
// every row block of C passes over it.
enum { PANEL = 256 };

void ckpt_low_rank_update(float *c, size_t ldc, const float *l, const float *r,
                          size_t rows, size_t n, size_t k) {
    const int avx2 = has_avx2();
    for (size_t j = 0; j < n; j += PANEL) {
        const size_t w = n - j < PANEL ? n - j : PANEL;
        if (avx2) update_avx2(c + j, ldc, l, r + j, n, rows, w, k);
        else update_portable(c + j, ldc, l, r + j, n, rows, w, k);
    }
}
#else
int ckpt_low_rank_uses_avx2(void) { return 0; }

void ckpt_low_rank_update(float *c, size_t ldc, const float *l, const float *r,
                          size_t rows, size_t n, size_t k) {
    update_portable(c, ldc, l, r, n, rows, n, k);
}
#endif
