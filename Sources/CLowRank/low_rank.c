// The product of a LoRA merge: W += L·R with a small inner dimension (the rank, usually
// 8-64). Each output element costs 2k flops over k loads of R, so the kernel keeps a
// 4x16 block of C in registers and streams R rows through it: R (k x 16 floats per
// block) stays in L1 while the block's rows of L are broadcast. AVX2+FMA when the CPU
// has it (checked once at run time), a portable loop otherwise.
#include "low_rank.h"
#include <stdint.h>
#include <string.h>

static int has_avx2(void);

// The conversions are plain loops the compiler vectorises; each is compiled twice (AVX2
// and baseline) and picked at run time like the product.
#define CONVERSIONS(SUFFIX, ATTR)                                                              \
    ATTR static void bf16_to_f32_##SUFFIX(const unsigned short *src, float *dst, size_t n) { \
        uint32_t *d = (uint32_t *)dst;                                                     \
        for (size_t i = 0; i < n; i++) d[i] = (uint32_t)src[i] << 16;                      \
    }                                                                                      \
    ATTR static void f32_to_bf16_##SUFFIX(const float *src, unsigned short *dst, size_t n, \
                                          ckpt_round_stats *st) {                          \
        float mx = 0; double sum = 0; size_t bad = 0;                                      \
        for (size_t i0 = 0; i0 < n; i0 += 1024) {                                          \
            const size_t e = n - i0 < 1024 ? n - i0 : 1024;                                \
            float part = 0;                                                                \
            for (size_t i = i0; i < i0 + e; i++) {                                         \
                uint32_t b; memcpy(&b, src + i, 4);                                        \
                const int nan = (b & 0x7fffffffu) > 0x7f800000u;                           \
                bad += (b & 0x7f800000u) == 0x7f800000u;                                   \
                const uint32_t r = nan ? ((b >> 16) | 0x40u) : ((b + 0x7fffu + ((b >> 16) & 1u)) >> 16); \
                dst[i] = (unsigned short)r;                                                \
                uint32_t back = r << 16; float bf; memcpy(&bf, &back, 4);                  \
                float d = bf - src[i]; d = d < 0 ? -d : d;                                 \
                d = nan ? 0 : d;                                                           \
                mx = d > mx ? d : mx;                                                      \
                part += d;                                                                 \
            }                                                                              \
            sum += part;                                                                   \
        }                                                                                  \
        if (mx > st->max_abs) st->max_abs = mx;                                            \
        st->sum_abs += sum; st->non_finite += bad;                                         \
    }                                                                                      \
    ATTR static size_t non_finite_##SUFFIX(const float *src, size_t n) {                   \
        size_t bad = 0;                                                                    \
        for (size_t i = 0; i < n; i++) {                                                   \
            uint32_t b; memcpy(&b, src + i, 4);                                            \
            bad += (b & 0x7f800000u) == 0x7f800000u;                                       \
        }                                                                                  \
        return bad;                                                                        \
    }

CONVERSIONS(portable, )
#if defined(__x86_64__)
#include <immintrin.h>
CONVERSIONS(avx2, __attribute__((target("avx2,fma"))))

// The rounding with its statistics, 16 values a step: the compiler does not vectorise the
// float max and sum reductions of the plain loop (that would need -ffast-math).
__attribute__((target("avx2,fma")))
static void f32_to_bf16_avx2_explicit(const float *src, unsigned short *dst, size_t n, ckpt_round_stats *st) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), exp_mask = _mm256_set1_epi32(0x7f800000);
    const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x40);
    __m256 vmax = _mm256_setzero_ps();
    __m256i vbad = _mm256_setzero_si256();
    double sum = 0;
    size_t i = 0;
    while (i + 16 <= n) {
        __m256 vsum = _mm256_setzero_ps();
        const size_t end = i + 1024 < n ? i + 1024 : n;
        for (; i + 16 <= end; i += 16) {
            __m256i r[2];
            for (int h = 0; h < 2; h++) {
                const __m256 x = _mm256_loadu_ps(src + i + 8 * h);
                const __m256i b = _mm256_castps_si256(x);
                const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, abs_mask), exp_mask);
                vbad = _mm256_sub_epi32(vbad, _mm256_cmpeq_epi32(_mm256_and_si256(b, exp_mask), exp_mask));
                const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), one);
                const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, bias), lsb), 16);
                const __m256i quieted = _mm256_or_si256(_mm256_srli_epi32(b, 16), quiet);
                r[h] = _mm256_blendv_epi8(rounded, quieted, nan);
                const __m256 back = _mm256_castsi256_ps(_mm256_slli_epi32(r[h], 16));
                __m256 d = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000)), _mm256_sub_ps(back, x));
                d = _mm256_andnot_ps(_mm256_castsi256_ps(nan), d);
                vmax = _mm256_max_ps(vmax, d);
                vsum = _mm256_add_ps(vsum, d);
            }
            // packus works within 128-bit lanes: restore the order with a 64-bit permute.
            const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xD8);
            _mm256_storeu_si256((__m256i *)(dst + i), packed);
        }
        float part[8];
        _mm256_storeu_ps(part, vsum);
        for (int k = 0; k < 8; k++) sum += part[k];
    }
    float m[8];
    int32_t bad[8];
    _mm256_storeu_ps(m, vmax);
    _mm256_storeu_si256((__m256i *)bad, vbad);
    ckpt_round_stats tail = {0, 0, 0};
    if (i < n) f32_to_bf16_portable(src + i, dst + i, n - i, &tail);
    double mx = tail.max_abs;
    size_t nb = tail.non_finite;
    for (int k = 0; k < 8; k++) {
        if (m[k] > mx) mx = m[k];
        nb += (size_t)bad[k];
    }
    if (mx > st->max_abs) st->max_abs = mx;
    st->sum_abs += sum + tail.sum_abs;
    st->non_finite += nb;
}
#define PICK(f) (has_avx2() ? f##_avx2 : f##_portable)
#else
#define PICK(f) f##_portable
#endif

void ckpt_bf16_to_f32(const unsigned short *src, float *dst, size_t n) { PICK(bf16_to_f32)(src, dst, n); }

void ckpt_f32_to_bf16(const float *src, unsigned short *dst, size_t n, ckpt_round_stats *stats) {
#if defined(__x86_64__)
    if (has_avx2()) { f32_to_bf16_avx2_explicit(src, dst, n, stats); return; }
#endif
    f32_to_bf16_portable(src, dst, n, stats);
}

void ckpt_count_non_finite(const float *src, size_t n, ckpt_round_stats *stats) {
    stats->non_finite += PICK(non_finite)(src, n);
}

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
static int has_avx2(void) { return 0; }
int ckpt_low_rank_uses_avx2(void) { return 0; }

void ckpt_low_rank_update(float *c, size_t ldc, const float *l, const float *r,
                          size_t rows, size_t n, size_t k) {
    update_portable(c, ldc, l, r, n, rows, n, k);
}
#endif

// Transposes in 32x32 tiles so both the reads and the writes of a tile stay in cache lines
// already loaded; the element copies are typed so the compiler emits plain moves.
#define TRANSPOSE(T)                                                                         \
    static void transpose_##T(const T *in, size_t is, T *out, size_t os, size_t rows, size_t cols) { \
        for (size_t a0 = 0; a0 < rows; a0 += 32) {                                          \
            const size_t a1 = a0 + 32 < rows ? a0 + 32 : rows;                               \
            for (size_t j0 = 0; j0 < cols; j0 += 32) {                                      \
                const size_t j1 = j0 + 32 < cols ? j0 + 32 : cols;                           \
                for (size_t a = a0; a < a1; a++)                                             \
                    for (size_t j = j0; j < j1; j++) out[a * os + j] = in[a + j * is];       \
            }                                                                                \
        }                                                                                    \
    }
TRANSPOSE(uint8_t)
TRANSPOSE(uint16_t)
TRANSPOSE(uint32_t)
TRANSPOSE(uint64_t)

#if defined(__x86_64__)
#include <immintrin.h>

// 8x8 blocks in registers inside each 32x32 tile: 4-byte elements with AVX2 (unpack, shuffle,
// 128-bit lane swap), 2-byte elements with SSE2 (16-, 32-, 64-bit unpacks). Register moves
// only: the bits are copied, never computed on. The tile's ragged edges go element by
// element. The scalar tiles ran at ~2 GB/s and were 40% of ckpt-slice's time on the openpi
// recipe (its einsum weights are transposed per layer).
// One 8x8 block: out rows a..a+7, columns j..j+7 (the caller has offset both pointers).
__attribute__((target("avx2"))) static inline void block_u32_avx2(const uint32_t *in, size_t is, uint32_t *out, size_t os) {
    __m256 r[8], t[8], u[8];
    for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps((const float *)(in + k * is));
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
        u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
        u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
    }
    for (int k = 0; k < 4; k++) {
        _mm256_storeu_ps((float *)(out + k * os), _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
        _mm256_storeu_ps((float *)(out + (k + 4) * os), _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
    }
}

static inline void block_u16_sse2(const uint16_t *in, size_t is, uint16_t *out, size_t os) {
    __m128i r[8], b[8], c[8];
    for (int k = 0; k < 8; k++) r[k] = _mm_loadu_si128((const __m128i *)(in + k * is));
    for (int k = 0; k < 8; k += 2) {
        b[k] = _mm_unpacklo_epi16(r[k], r[k + 1]);
        b[k + 1] = _mm_unpackhi_epi16(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        c[k] = _mm_unpacklo_epi32(b[k], b[k + 2]);
        c[k + 1] = _mm_unpackhi_epi32(b[k], b[k + 2]);
        c[k + 2] = _mm_unpacklo_epi32(b[k + 1], b[k + 3]);
        c[k + 3] = _mm_unpackhi_epi32(b[k + 1], b[k + 3]);
    }
    for (int k = 0; k < 4; k++) {
        _mm_storeu_si128((__m128i *)(out + 2 * k * os), _mm_unpacklo_epi64(c[k], c[k + 4]));
        _mm_storeu_si128((__m128i *)(out + (2 * k + 1) * os), _mm_unpackhi_epi64(c[k], c[k + 4]));
    }
}

// The tiles of one transpose, each as full 8x8 blocks by BLOCK and its ragged edges element by
// element: out[a * os + j] = in[a + j * is].
#define BLOCKED_TRANSPOSE(NAME, T, ATTR, BLOCK)                                                  \
    ATTR static void NAME(const T *in, size_t is, T *out, size_t os, size_t rows, size_t cols) { \
        for (size_t a0 = 0; a0 < rows; a0 += 32) {                                             \
            const size_t a1 = a0 + 32 < rows ? a0 + 32 : rows, af = a0 + (a1 - a0) / 8 * 8;     \
            for (size_t j0 = 0; j0 < cols; j0 += 32) {                                         \
                const size_t j1 = j0 + 32 < cols ? j0 + 32 : cols, jf = j0 + (j1 - j0) / 8 * 8; \
                for (size_t a = a0; a < af; a += 8)                                            \
                    for (size_t j = j0; j < jf; j += 8) BLOCK(in + a + j * is, is, out + a * os + j, os); \
                for (size_t a = a0; a < a1; a++)                                               \
                    for (size_t j = (a < af ? jf : j0); j < j1; j++) out[a * os + j] = in[a + j * is]; \
            }                                                                                  \
        }                                                                                      \
    }
BLOCKED_TRANSPOSE(transpose_u32_avx2, uint32_t, __attribute__((target("avx2"))), block_u32_avx2)
BLOCKED_TRANSPOSE(transpose_u16_sse2, uint16_t, , block_u16_sse2)
#endif

void ckpt_transpose(const void *in, size_t in_stride, void *out, size_t out_stride,
                    size_t rows, size_t cols, size_t elem) {
#if defined(__x86_64__)
    if (elem == 4 && has_avx2()) { transpose_u32_avx2(in, in_stride, out, out_stride, rows, cols); return; }
    if (elem == 2) { transpose_u16_sse2(in, in_stride, out, out_stride, rows, cols); return; }
#endif
    switch (elem) {
    case 1: transpose_uint8_t(in, in_stride, out, out_stride, rows, cols); break;
    case 2: transpose_uint16_t(in, in_stride, out, out_stride, rows, cols); break;
    case 4: transpose_uint32_t(in, in_stride, out, out_stride, rows, cols); break;
    default: transpose_uint64_t(in, in_stride, out, out_stride, rows, cols); break;
    }
}

// ---- byte shuffle (the stream's codecs 2 and 4) ------------------------------------------
// Widths 2 and 4 (bf16/f16, f32) split bytes by position in SSE2 registers: keep the low byte
// of each 16-bit lane (mask) or the high one (shift), and pack two registers' worth into one;
// width 4 is that split done twice. Other widths, and the tails, are plain loops.

#define SHUFFLE_LOOP(W, FROM)                                                        \
    for (size_t i = (FROM); i < m; i++)                                              \
        for (size_t b = 0; b < (W); b++) dst[b * m + i] = src[i * (W) + b];
#define UNSHUFFLE_LOOP(W, FROM)                                                      \
    for (size_t i = (FROM); i < m; i++)                                              \
        for (size_t b = 0; b < (W); b++) dst[i * (W) + b] = src[b * m + i];

#if defined(__x86_64__)
#include <emmintrin.h>
#define LOAD(p) _mm_loadu_si128((const __m128i *)(p))
#define STORE(p, v) _mm_storeu_si128((__m128i *)(p), v)
// The even bytes of a then b, and the odd bytes of a then b.
#define EVENS(a, b) _mm_packus_epi16(_mm_and_si128(a, low), _mm_and_si128(b, low))
#define ODDS(a, b) _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8))
#endif

void ckpt_byte_shuffle(const unsigned char *restrict src, unsigned char *restrict dst, size_t m, size_t width) {
    size_t done = 0;
#if defined(__x86_64__)
    const __m128i low = _mm_set1_epi16(0x00FF);
    if (width == 2) {
        for (; done + 16 <= m; done += 16) {
            __m128i a = LOAD(src + 2 * done), b = LOAD(src + 2 * done + 16);
            STORE(dst + done, EVENS(a, b));
            STORE(dst + m + done, ODDS(a, b));
        }
    } else if (width == 4) {
        for (; done + 16 <= m; done += 16) {
            const unsigned char *s = src + 4 * done;
            __m128i a = LOAD(s), b = LOAD(s + 16), c = LOAD(s + 32), d = LOAD(s + 48);
            __m128i e1 = EVENS(a, b), e2 = EVENS(c, d);  // bytes 0 and 2, alternating
            __m128i o1 = ODDS(a, b), o2 = ODDS(c, d);    // bytes 1 and 3
            STORE(dst + done, EVENS(e1, e2));
            STORE(dst + m + done, EVENS(o1, o2));
            STORE(dst + 2 * m + done, ODDS(e1, e2));
            STORE(dst + 3 * m + done, ODDS(o1, o2));
        }
    }
#endif
    switch (width) {
    case 2: SHUFFLE_LOOP(2, done) break;
    case 4: SHUFFLE_LOOP(4, done) break;
    case 8: SHUFFLE_LOOP(8, done) break;
    default: SHUFFLE_LOOP(width, done) break;
    }
}

void ckpt_byte_unshuffle(const unsigned char *restrict src, unsigned char *restrict dst, size_t m, size_t width) {
    size_t done = 0;
#if defined(__x86_64__)
    if (width == 2) {
        for (; done + 16 <= m; done += 16) {
            __m128i a = LOAD(src + done), b = LOAD(src + m + done);
            STORE(dst + 2 * done, _mm_unpacklo_epi8(a, b));
            STORE(dst + 2 * done + 16, _mm_unpackhi_epi8(a, b));
        }
    } else if (width == 4) {
        for (; done + 16 <= m; done += 16) {
            __m128i b0 = LOAD(src + done), b1 = LOAD(src + m + done), b2 = LOAD(src + 2 * m + done), b3 = LOAD(src + 3 * m + done);
            __m128i l01 = _mm_unpacklo_epi8(b0, b1), h01 = _mm_unpackhi_epi8(b0, b1);  // byte pairs 0,1
            __m128i l23 = _mm_unpacklo_epi8(b2, b3), h23 = _mm_unpackhi_epi8(b2, b3);  // byte pairs 2,3
            unsigned char *d = dst + 4 * done;
            STORE(d, _mm_unpacklo_epi16(l01, l23));
            STORE(d + 16, _mm_unpackhi_epi16(l01, l23));
            STORE(d + 32, _mm_unpacklo_epi16(h01, h23));
            STORE(d + 48, _mm_unpackhi_epi16(h01, h23));
        }
    }
#endif
    switch (width) {
    case 2: UNSHUFFLE_LOOP(2, done) break;
    case 4: UNSHUFFLE_LOOP(4, done) break;
    case 8: UNSHUFFLE_LOOP(8, done) break;
    default: UNSHUFFLE_LOOP(width, done) break;
    }
}
