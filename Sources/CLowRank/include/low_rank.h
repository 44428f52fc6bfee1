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

#endif
