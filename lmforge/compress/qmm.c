/* Weight-only quantized matrix products for a few rows of activations (decoding), on x86 CPUs.

   y (M, N) = x (M, K) @ W^T, where W (N, K) is stored quantized and never materialised:
   - int8: W[n, k] = q[n, k] * scale[n]                   (q int8, one scale per output row)
   - int4: W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]   (q 0..15, g = k / group)
     packed two per byte in blocks of 32 weights: byte i of a block holds weight i in its low
     nibble and weight i + 16 in its high nibble (the order of GGML's Q4 blocks).

   A decode step reads every weight once, so its floor is memory bandwidth: one byte (int8) or
   half a byte (int4) per weight instead of four. Rows of W are split over OpenMP threads; the
   library links libgomp by its soname, so inside a PyTorch process it joins torch's own pool.
   Built and loaded by lmforge/compress/kernels.py; tests/compress/test_quant.py holds it to the
   dequantised product. Requirements (checked by the caller): K % 32 == 0, group % 32 == 0,
   M <= MAX_ROWS, contiguous float32 x. */

#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_ROWS 8

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* 8 quantized values (low 8 bytes of b, signed or unsigned) -> 8 floats */
static inline __m256 i8_to_ps(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }
static inline __m256 u8_to_ps(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
#endif

void q8_matmul(const float *x, int M, int K, const int8_t *w, const float *scale, int N,
               float *y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++) {
        const int8_t *row = w + (int64_t)n * K;
        float out[MAX_ROWS];
#ifdef __AVX2__
        __m256 acc[MAX_ROWS];
        for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 32) {
            __m128i lo = _mm_loadu_si128((const __m128i *)(row + k));
            __m128i hi = _mm_loadu_si128((const __m128i *)(row + k + 16));
            __m256 w0 = i8_to_ps(lo), w1 = i8_to_ps(_mm_srli_si128(lo, 8));
            __m256 w2 = i8_to_ps(hi), w3 = i8_to_ps(_mm_srli_si128(hi, 8));
            for (int m = 0; m < M; m++) {
                const float *xm = x + (int64_t)m * K + k;
                __m256 a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m]);
                a = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a);
                a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), a);
                acc[m] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), a);
            }
        }
        for (int m = 0; m < M; m++) out[m] = hsum(acc[m]);
#else
        for (int m = 0; m < M; m++) {
            const float *xm = x + (int64_t)m * K;
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += xm[k] * (float)row[k];
            out[m] = s;
        }
#endif
        for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = out[m] * scale[n];
    }
}

/* xsum[m, g] = sum of x[m] over group g: the zero point's share, computed once per call */
void q4_matmul(const float *x, int M, int K, const uint8_t *w, const float *scale,
               const uint8_t *zero, int group, int N, float *y, float *xsum, int threads) {
    const int G = K / group;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            float s = 0.0f;
            for (int k = g * group; k < (g + 1) * group; k++) s += x[(int64_t)m * K + k];
            xsum[m * G + g] = s;
        }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = w + (int64_t)n * (K / 2);
        const float *sc = scale + (int64_t)n * G;
        const uint8_t *zp = zero + (int64_t)n * G;
        float corr[MAX_ROWS];
        for (int m = 0; m < M; m++) corr[m] = 0.0f;
#ifdef __AVX2__
        __m256 tot[MAX_ROWS];
        for (int m = 0; m < M; m++) tot[m] = _mm256_setzero_ps();
        const __m128i mask = _mm_set1_epi8(0x0F);
        for (int g = 0; g < G; g++) {
            __m256 acc[MAX_ROWS];
            for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
            for (int k = g * group; k < (g + 1) * group; k += 32) {
                __m128i b = _mm_loadu_si128((const __m128i *)(row + k / 2));
                __m128i lo = _mm_and_si128(b, mask);                     /* weights k .. k+15 */
                __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask); /* weights k+16 .. k+31 */
                __m256 w0 = u8_to_ps(lo), w1 = u8_to_ps(_mm_srli_si128(lo, 8));
                __m256 w2 = u8_to_ps(hi), w3 = u8_to_ps(_mm_srli_si128(hi, 8));
                for (int m = 0; m < M; m++) {
                    const float *xm = x + (int64_t)m * K + k;
                    __m256 a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m]);
                    a = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a);
                    a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), a);
                    acc[m] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), a);
                }
            }
            __m256 s = _mm256_set1_ps(sc[g]);
            for (int m = 0; m < M; m++) {
                tot[m] = _mm256_fmadd_ps(acc[m], s, tot[m]);
                corr[m] += sc[g] * (float)zp[g] * xsum[m * G + g];
            }
        }
        for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = hsum(tot[m]) - corr[m];
#else
        float tot[MAX_ROWS];
        for (int m = 0; m < M; m++) tot[m] = 0.0f;
        for (int g = 0; g < G; g++) {
            for (int m = 0; m < M; m++) {
                const float *xm = x + (int64_t)m * K;
                float a = 0.0f;
                for (int k = g * group; k < (g + 1) * group; k += 32) {
                    const uint8_t *b = row + k / 2;
                    for (int i = 0; i < 16; i++)
                        a += xm[k + i] * (float)(b[i] & 0x0F) + xm[k + 16 + i] * (float)(b[i] >> 4);
                }
                tot[m] += a * sc[g];
                corr[m] += sc[g] * (float)zp[g] * xsum[m * G + g];
            }
        }
        for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = tot[m] - corr[m];
#endif
    }
}
