#ifndef CKPT_LOW_RANK_H
#define CKPT_LOW_RANK_H
#include <stddef.h>

/// C[i][j] += sum_k L[i][k] * R[k][j] for i < rows, j < n, k < k.
/// C has row stride ldc (floats); L is rows x k and R is k x n, both dense row-major.
/// Accumulates in float32 in k order, with fused multiply-adds where the CPU has them.
void ckpt_low_rank_update(float *c, size_t ldc, const float *l, const float *r,
                          size_t rows, size_t n, size_t k);

/// 1 when the AVX2+FMA kernel is in use (for benchmark reports).
int ckpt_low_rank_uses_avx2(void);

/// The byte shuffle of `m` elements of `width` bytes: dst[b * m + i] = src[i * width + b]
/// (all first bytes, then all second bytes, ...). `src` and `dst` must not overlap.
void ckpt_byte_shuffle(const unsigned char *src, unsigned char *dst, size_t m, size_t width);

/// Its inverse: dst[i * width + b] = src[b * m + i].
void ckpt_byte_unshuffle(const unsigned char *src, unsigned char *dst, size_t m, size_t width);

/// bfloat16 bits → float32 (exact).
void ckpt_bf16_to_f32(const unsigned short *src, float *dst, size_t n);

/// What rounding a merged block to its output type did: the largest and the summed absolute
/// change, and how many values were not finite (NaN or ±Inf) before rounding.
typedef struct {
    double max_abs;
    double sum_abs;
    size_t non_finite;
} ckpt_round_stats;

/// float32 → bfloat16 bits, round to nearest even (NaN quieted, sign kept, as ml_dtypes);
/// adds to `stats`.
void ckpt_f32_to_bf16(const float *src, unsigned short *dst, size_t n, ckpt_round_stats *stats);

/// Counts the non-finite values of `src` into `stats` (float32 output: no rounding).
void ckpt_count_non_finite(const float *src, size_t n, ckpt_round_stats *stats);

/// out[a * out_stride + j] = in[a + j * in_stride] for a < rows, j < cols, elements of
/// `elem` bytes (1, 2, 4 or 8): one 2-D transpose, in cache-sized tiles.
void ckpt_transpose(const void *in, size_t in_stride, void *out, size_t out_stride,
                    size_t rows, size_t cols, size_t elem);

#endif
