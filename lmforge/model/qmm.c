/* Weight-only quantized matrix products for a few rows of activations (decoding), on x86 CPUs.

   y (M, N) = x (M, K) @ W^T, where W (N, K) is stored quantized and never materialised:
   - int8: W[n, k] = q[n, k] * scale[n]                   (q int8, one scale per output row)
   - int4: W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]   (q 0..15, g = k / group, zero float)
     packed two per byte in blocks of 32 weights: byte i of a block holds weight i in its low
     nibble and weight i + 16 in its high nibble (the order of GGML's Q4 blocks).

   A decode step reads every weight once, so its floor is memory bandwidth: one byte (int8) or
   half a byte (int4) per weight instead of four. The activations are turned into int16 blocks
   first (see to_int16) so the inner loop is integer multiply-adds; the weights are exactly
   the stored ones. Rows of W are split over OpenMP threads; the
   library links libgomp by its soname, so inside a PyTorch process it joins torch's own pool.
   Built and loaded by lmforge/model/kernels.py; tests/compress/test_quant.py holds it to the
   dequantised product. Requirements (checked by the caller): K % 32 == 0, group % 32 == 0,
   M <= MAX_ROWS, contiguous float32 x. */

#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_ROWS 8
/* below this many weights a product runs on one thread: waking a second one costs more */
#define SERIAL_WEIGHTS (1 << 18)

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

#endif

/* x (M, K) -> int16 in blocks of 32 with one float scale each (x ~= x16 * xs): 15 bits per
   value, so the products below run as integer multiply-adds (madd: 16 pairs per instruction)
   instead of a float conversion and an FMA per weight. The error this adds is 2^-15 of a
   block's largest activation, far below the weights' own int8/int4 rounding. */
static void to_int16(const float *x, int M, int K, int16_t *x16, float *xs) {
    for (int m = 0; m < M; m++)
        for (int b = 0; b < K / 32; b++) {
            const float *v = x + (int64_t)m * K + b * 32;
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) amax = v[i] > amax ? v[i] : (-v[i] > amax ? -v[i] : amax);
            float s = amax / 32767.0f, inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
            xs[m * (K / 32) + b] = s;
            for (int i = 0; i < 32; i++) {
                float r = v[i] * inv;
                x16[(int64_t)m * K + b * 32 + i] = (int16_t)(r >= 0.0f ? r + 0.5f : r - 0.5f);
            }
        }
}

#ifdef __AVX2__
/* sum over one 32-value block of w16 * x16 (w as two halves of 16 int16) -> 8 int32 lanes */
static inline __m256i dot32(__m256i w_lo, __m256i w_hi, const int16_t *x) {
    __m256i a = _mm256_madd_epi16(w_lo, _mm256_loadu_si256((const __m256i *)x));
    return _mm256_add_epi32(a, _mm256_madd_epi16(w_hi, _mm256_loadu_si256((const __m256i *)(x + 16))));
}
#endif

/* scratch: M * K int16 + M * K / 32 floats, from the caller */
void q8_matmul(const float *x, int M, int K, const int8_t *w, const float *scale, int N,
               float *y, void *scratch, int threads) {
    const int B = K / 32;
    int16_t *x16 = (int16_t *)scratch;
    float *xs = (float *)(x16 + (int64_t)M * K);
    to_int16(x, M, K, x16, xs);
    if ((int64_t)N * K < SERIAL_WEIGHTS) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int n = 0; n < N; n++) {
        const int8_t *row = w + (int64_t)n * K;
        float out[MAX_ROWS];
#ifdef __AVX2__
        __m256 acc[MAX_ROWS];
        for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        for (int b = 0; b < B; b++) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(row + b * 32));
            __m256i w_lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
            __m256i w_hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1));
            for (int m = 0; m < M; m++) {
                __m256i p = dot32(w_lo, w_hi, x16 + (int64_t)m * K + b * 32);
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xs[m * B + b]), acc[m]);
            }
        }
        for (int m = 0; m < M; m++) out[m] = hsum(acc[m]);
#else
        for (int m = 0; m < M; m++) {
            float s = 0.0f;
            for (int b = 0; b < B; b++) {
                int32_t d = 0;
                for (int i = 0; i < 32; i++) d += (int32_t)row[b * 32 + i] * x16[(int64_t)m * K + b * 32 + i];
                s += (float)d * xs[m * B + b];
            }
            out[m] = s;
        }
#endif
        for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = out[m] * scale[n];
    }
}

/* scratch: M * K int16 + M * K / 32 floats + M * K / group floats, from the caller.
   xsum[m, g] = sum of x[m] over group g: the zero point's share, computed once per call. */
void q4_matmul(const float *x, int M, int K, const uint8_t *w, const float *scale,
               const float *zero, int group, int N, float *y, void *scratch, int threads) {
    const int G = K / group, B = K / 32, BG = group / 32;
    int16_t *x16 = (int16_t *)scratch;
    float *xs = (float *)(x16 + (int64_t)M * K);
    float *xsum = xs + M * B;
    to_int16(x, M, K, x16, xs);
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            float s = 0.0f;
            for (int k = g * group; k < (g + 1) * group; k++) s += x[(int64_t)m * K + k];
            xsum[m * G + g] = s;
        }
    if ((int64_t)N * K < SERIAL_WEIGHTS) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = w + (int64_t)n * (K / 2);
        const float *sc = scale + (int64_t)n * G;
        const float *zp = zero + (int64_t)n * G;
        float tot[MAX_ROWS], corr[MAX_ROWS];
        for (int m = 0; m < M; m++) tot[m] = corr[m] = 0.0f;
#ifdef __AVX2__
        const __m128i mask = _mm_set1_epi8(0x0F);
        __m256 acc[MAX_ROWS];
        for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        for (int g = 0; g < G; g++) {
            for (int b = g * BG; b < (g + 1) * BG; b++) {
                __m128i q = _mm_loadu_si128((const __m128i *)(row + b * 16));
                __m256i w_lo = _mm256_cvtepu8_epi16(_mm_and_si128(q, mask)); /* values 0..15 */
                __m256i w_hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), mask));
                for (int m = 0; m < M; m++) {
                    __m256i p = dot32(w_lo, w_hi, x16 + (int64_t)m * K + b * 32);
                    __m256 s = _mm256_set1_ps(xs[m * B + b] * sc[g]); /* activation x weight scale */
                    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[m]);
                }
            }
            for (int m = 0; m < M; m++) corr[m] += sc[g] * zp[g] * xsum[m * G + g];
        }
        for (int m = 0; m < M; m++) tot[m] = hsum(acc[m]);
#else
        for (int g = 0; g < G; g++)
            for (int m = 0; m < M; m++) {
                float a = 0.0f;
                for (int b = g * BG; b < (g + 1) * BG; b++) {
                    const uint8_t *q = row + b * 16;
                    const int16_t *xb = x16 + (int64_t)m * K + b * 32;
                    int32_t d = 0;
                    for (int i = 0; i < 16; i++) d += (q[i] & 0x0F) * xb[i] + (q[i] >> 4) * xb[16 + i];
                    a += (float)d * xs[m * B + b];
                }
                tot[m] += a * sc[g];
                corr[m] += sc[g] * zp[g] * xsum[m * G + g];
            }
#endif
        for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = tot[m] - corr[m];
    }
}
