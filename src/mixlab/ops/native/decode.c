/* Native CPU kernels for decoding: a whole batch-1 decoding step in one call, and the matrix
 * products of batched decoding (a few rows) and of an MoE layer for a few tokens.
 *
 * Why C: decoding reads every weight it touches once, so a step should take (bytes read) / (memory
 * bandwidth). PyTorch's eager CPU kernels are GEMM kernels that treat one row as a tiny matrix (about
 * half the bandwidth), and a step made of ~80 small eager ops per layer adds milliseconds of fixed
 * cost (BENCHMARKS.md, "Inference speed"). Here:
 * - `mx_decode_step`: one token of one sequence through every layer (norm, fused qkv, rotary,
 *   KV-cache write, attention, output projection, norm, router, top-k, the chosen experts' SwiGLU,
 *   mixing, residuals) and the logits, inside one OpenMP parallel region whose threads meet at spin
 *   barriers (a sleeping thread takes tens of microseconds to wake, a step has 4 barriers a layer);
 * - `mx_decode_batch`: an engine step of several sequences at once (a decoding token or a prompt
 *   chunk each), each with its own cache slot and positions: every weight read once for all the
 *   step's tokens (experts grouped by expert), one parallel region;
 * - `mx_linear`: Y = X W^T for a few rows X, each weight row read once for all of them;
 * - `mx_moe`: the experts of an MoE layer for a few tokens, each chosen expert read once;
 * - `mx_gemv`: one matrix-vector product (tests, benchmarks).
 * Matrix products stream the weights row by row with AVX-512 (bf16: `vdpbf16ps`) when the CPU has
 * it, and portable loops otherwise.
 *
 * It computes what `mixlab.model.Transformer` computes for one token (tests compare the two); the
 * residual stream and every intermediate are float32. Weight types (`wt`): MX_F32, MX_BF16 (raw
 * bfloat16 bits), MX_I8 (int8, one float32 scale per output row: w = q * s) and MX_Q4_* (int4 in
 * Q4_0's layout with float16 scales per group; float32 activations, see `dotq_q4`). bf16 weights
 * multiply bf16-rounded activations, as PyTorch's bf16 matmuls do; f32 and int8 weights multiply
 * float32 activations. KV-cache types (`ct`): MX_F32 or MX_BF16.
 *
 * The interface (types, structures, entry points, ABI version) is mixlab.h. Built on request by
 * `mixlab/ops/native/__init__.py` (cc -O3 -march=native -fopenmp); OpenMP
 * then shares PyTorch's runtime (same libgomp soname), so the two never fight over threads.
 *
 * Shape legend: D model width, H query heads, G key/value heads, Hd head dim, C cache slots,
 * E experts, K experts per token, F expert FFN width, V vocabulary.
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mixlab.h"

#include <sched.h>
#include <stdatomic.h>

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#endif

/* Activation rows an int4 x int8 product (MX_Q4_*_A8) rounds at once (`a8_rows`). */
#define MX_A8_ROWS 16

/* ---------------------------------------------------------------------------------------------- */
/* bfloat16 <-> float32                                                                            */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void round_to_bf16(const float* x, uint16_t* xb, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512BW__)
    const __m512i lsb = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff), abs = _mm512_set1_epi32(0x7fffffff),
                  inf = _mm512_set1_epi32(0x7f800000), quiet = _mm512_set1_epi32(0x40);
    for (; i + 16 <= n; i += 16) { /* f32_to_bf16 on 16 lanes */
        const __m512i u = _mm512_loadu_si512(x + i);
        const __m512i r = _mm512_srli_epi32(
            _mm512_add_epi32(_mm512_add_epi32(u, bias), _mm512_and_si512(_mm512_srli_epi32(u, 16), lsb)), 16);
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs), inf);
        const __m512i v = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), quiet);
        _mm256_storeu_si256((__m256i*)(xb + i), _mm512_cvtepi32_epi16(v));
    }
#endif
    for (; i < n; i++) xb[i] = f32_to_bf16(x[i]);
}

static inline int64_t elem_size(int t) { return t == MX_F32 ? 4 : t == MX_BF16 ? 2 : 1; }

/* int4 weights (MX_Q4_*): the group size, and float16 scales to float32. */
static inline int is_q4(int t) { return t >= MX_Q4_32 && t <= MX_Q4_128_A8; }
static inline int is_q4a8(int t) { return t >= MX_Q4_32_A8 && t <= MX_Q4_128_A8; } /* int8 activations */
/* weights whose activations are rounded to int8 (`quant_act8`): int4's in their nibble layout, int8's in order */
static inline int is_a8(int t) { return is_q4a8(t) || t == MX_I8_A8; }
static inline int64_t q4_group(int t) { return (int64_t)32 << ((t - MX_Q4_32) % 3); }

static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, mant = h & 0x3ffu;
    uint32_t u;
    if (e == 0) { /* zero or subnormal: mant * 2^-24 */
        float f = (float)mant * 5.9604644775390625e-08f;
        memcpy(&u, &f, 4);
        u |= sign;
    } else if (e == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((e + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float load_elem(const void* p, int t, int64_t i) {
    return t == MX_F32 ? ((const float*)p)[i] : bf16_to_f32(((const uint16_t*)p)[i]);
}

static inline void store_elem(void* p, int t, int64_t i, float v) {
    if (t == MX_F32) ((float*)p)[i] = v;
    else ((uint16_t*)p)[i] = f32_to_bf16(v);
}

/* ---------------------------------------------------------------------------------------------- */
/* SwiGLU's elementwise part                                                                        */

#if defined(__AVX512F__)
/* e^x for 16 lanes: x = n ln2 + r (n rounded, r by Cody and Waite's two constants), e^r by Cephes'
   expf polynomial, times 2^n with `vscalefps` (which also gives inf, 0 and subnormals at the ends).
   At most 1 ulp from the exact value over float32's range (checked against double exp on 32M
   values); +-inf and NaN as expf. */
static inline __m512 exp16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}
#endif

/* a[i] = silu(gate[i]) * up[i] for n values, and its bf16 rounding into ab when given (the experts'
   down projection multiplies bf16 activations for bf16 weights). */
static void swiglu_row(const float* gate, const float* up, float* a, uint16_t* ab, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + 16 <= n; i += 16) {
        const __m512 g = _mm512_loadu_ps(gate + i);
        const __m512 v = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))),
                                       _mm512_loadu_ps(up + i));
        _mm512_storeu_ps(a + i, v);
    }
#endif
    for (; i < n; i++) a[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
    if (ab) round_to_bf16(a, ab, n);
}

/* ---------------------------------------------------------------------------------------------- */
/* Dot products of one weight row with one activation vector (or four): the inner loops of every   */
/* matrix-vector product. Rows are read one at a time with four accumulators, so the weights       */
/* stream as one sequential read, which the hardware prefetcher follows best (measured: 28 GB/s on */
/* 1024-wide rows against 21 GB/s when four rows are read interleaved, on a CPU whose memory reads */
/* 26-33 GB/s); the activations stay in L1.                                                        */

#if defined(__AVX512BF16__)
#define MX_BF(p) ((__m512bh)_mm512_loadu_si512(p))
#endif
#if defined(__AVX512F__)
#define MX_I8F(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p))))
/* The sum of v's 16 lanes in one fixed order: lanes l + (l + 8), then + 4, + 2, + 1 (each level's
   additions are the same whichever operand comes first). Every float32 horizontal sum here is this
   one (or `reduce16`: 16 at once, same order), never `_mm512_reduce_add_ps`, whose order is the
   compiler's to choose (GCC's header adds in this order; clang 14's LLVM happens to as well): the
   products whose bits must match another's (a token's int4 x int8 outputs in panels and one at a
   time, so a decoding token's beside a prompt chunk and alone) then match with any compiler. GCC
   compiles it to the additions of its `_mm512_reduce_add_ps` with cheaper shuffles. */
static inline float hsum(__m512 v) {
    const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))); /* + 8 */
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));              /* + 4 */
    const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));                                               /* + 2 */
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));                                           /* + 1 */
}
static inline float hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    return hsum(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}
#endif

/* One row at a time (a batch-1 step's products) prefetches its stream MX_DOT_PF bytes ahead into L1:
   rows are contiguous, so that reaches into the rows after it. On an Intel Xeon host the hardware
   prefetcher alone held one sequential stream per core at 0.66-0.7 of what the memory gives (bf16,
   2 threads, 1 GB of weights on 2 MiB pages: 22.6 GB/s, prefetched 2-4 KB ahead 28-31; C harness). */
#ifndef MX_DOT_PF
#define MX_DOT_PF 4096
#endif
static inline float dot_bf16(const uint16_t* w, const uint16_t* x, int64_t K) {
    int64_t k = 0;
    float s = 0.f;
#if defined(__AVX512BF16__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; k + 128 <= K; k += 128) {
        const char* pf = (const char*)(w + k) + MX_DOT_PF;
        for (int c = 0; c < 256; c += 64) _mm_prefetch(pf + c, _MM_HINT_T0);
        a0 = _mm512_dpbf16_ps(a0, MX_BF(w + k), MX_BF(x + k));
        a1 = _mm512_dpbf16_ps(a1, MX_BF(w + k + 32), MX_BF(x + k + 32));
        a2 = _mm512_dpbf16_ps(a2, MX_BF(w + k + 64), MX_BF(x + k + 64));
        a3 = _mm512_dpbf16_ps(a3, MX_BF(w + k + 96), MX_BF(x + k + 96));
    }
    for (; k + 32 <= K; k += 32) a0 = _mm512_dpbf16_ps(a0, MX_BF(w + k), MX_BF(x + k));
    s = hsum4(a0, a1, a2, a3);
#endif
    for (; k < K; k++) s += bf16_to_f32(w[k]) * bf16_to_f32(x[k]);
    return s;
}

/* float32 activations against float32 or int8 weights: the same loops, only the load of 16 weights
   differs (int8: widened and converted in registers; the row scale is applied by the caller). */
#if defined(__AVX512F__)
#define MX_LOADW_f32(p) _mm512_loadu_ps(p)
#define MX_LOADW_i8(p) MX_I8F(p)
#define MX_DOT_F(T, W)                                                                                          \
    static inline float dot_##T(const W* w, const float* x, int64_t K) {                                        \
        int64_t k = 0;                                                                                          \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps(); \
        for (; k + 64 <= K; k += 64) {                                                                          \
            const char* pf = (const char*)(w + k) + MX_DOT_PF; /* as `dot_bf16` */                              \
            for (int c = 0; c < 64 * (int)sizeof(W); c += 64) _mm_prefetch(pf + c, _MM_HINT_T0);               \
            a0 = _mm512_fmadd_ps(MX_LOADW_##T(w + k), _mm512_loadu_ps(x + k), a0);                              \
            a1 = _mm512_fmadd_ps(MX_LOADW_##T(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);                    \
            a2 = _mm512_fmadd_ps(MX_LOADW_##T(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);                    \
            a3 = _mm512_fmadd_ps(MX_LOADW_##T(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);                    \
        }                                                                                                       \
        for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(MX_LOADW_##T(w + k), _mm512_loadu_ps(x + k), a0);     \
        float s = hsum4(a0, a1, a2, a3);                                                                        \
        for (; k < K; k++) s += w[k] * x[k];                                                                    \
        return s;                                                                                               \
    }
#else
#define MX_DOT_F(T, W)                                                                                          \
    static inline float dot_##T(const W* w, const float* x, int64_t K) {                                        \
        float s = 0.f;                                                                                          \
        for (int64_t k = 0; k < K; k++) s += w[k] * x[k];                                                       \
        return s;                                                                                               \
    }
#endif
MX_DOT_F(f32, float)
MX_DOT_F(i8, int8_t)

/* An int4 row (K/2 bytes, scales `s` per group of G) against float32 activations: per group, the
   codes minus 8 times x, summed, times the group's scale. 16 bytes hold 32 inputs: the low nibbles
   are inputs 0-15 of the chunk, the high ones 16-31, so one mask and one shift give two 16-lane
   vectors of consecutive inputs. Q up to 4 vectors (rows of x, leading dimension ld) share each
   decoded weight vector. */
static inline void dotq_q4(const uint8_t* w, const uint16_t* s, const float* x, int64_t ld, int64_t K, int64_t G,
                           int Q, float* out) {
#if defined(__AVX512F__)
    const __m512i mask = _mm512_set1_epi32(0xf);
    const __m512 eight = _mm512_set1_ps(8.f);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g = 0; g < K / G; g++) {
        __m512 t[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + k / 2)));
            const __m512 lo = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, mask)), eight);
            const __m512 hi = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), eight);
            for (int q = 0; q < Q; q++) {
                t[q] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + q * ld + k), t[q]);
                t[q] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + q * ld + k + 16), t[q]);
            }
        }
        const __m512 d = _mm512_set1_ps(f16_to_f32(s[g]));
        for (int q = 0; q < Q; q++) acc[q] = _mm512_fmadd_ps(t[q], d, acc[q]);
    }
    for (int q = 0; q < Q; q++) out[q] = hsum(acc[q]);
#else
    for (int q = 0; q < Q; q++) {
        float sum = 0.f;
        for (int64_t g = 0; g < K / G; g++) {
            float t = 0.f;
            for (int64_t k = g * G; k < (g + 1) * G; k += 32)
                for (int64_t j = 0; j < 16; j++) {
                    const uint8_t b = w[k / 2 + j];
                    t += ((float)(b & 0xf) - 8.f) * x[q * ld + k + j] + ((float)(b >> 4) - 8.f) * x[q * ld + k + 16 + j];
                }
            sum += t * f16_to_f32(s[g]);
        }
        out[q] = sum;
    }
#endif
}

/* int4 weights x int8 activations (MX_Q4_*_A8). Each activation vector is first rounded to int8 per
   block of 32 inputs (`quant_a8`, llama.cpp's Q8_0 rounding) into the layout the weights' nibbles
   need: per 128 inputs (four 32-chunks, 64 weight bytes), 64 bytes holding inputs 0-15 of each chunk
   (what the low nibbles multiply) and 64 bytes holding inputs 16-31 (the high nibbles); then one
   `vpdpbusd` per 64 weight bytes and nibble half multiplies 128 unsigned codes (0..15) by signed
   activations and sums each four into 16 int32 lanes (lanes 4c..4c+3: chunk c). The codes' offset
   of 8 is folded into each lane's starting value (`corr`: -8 x the sum of the activations the lane
   multiplies) and the lane's float scale (weight group scale x activation block scale) applies once
   per 128 inputs: ~11 vector instructions per 128 weights where the float32 path needs ~40. The
   integer sums are exact; the only rounding beyond float32's is the activations' (at most half a
   step, max|x| / 254, per input). */
typedef struct { /* one activation vector in that layout; Kp = K rounded up to 128, zero-padded */
    int8_t* q;     /* [Kp]: per 128 inputs, 64 low-half bytes then 64 high-half bytes */
    int32_t* corr; /* [Kp / 8]: per 128 inputs, 16 lanes: -8 x (sum of the 8 codes the lane multiplies) */
    float* d;      /* [Kp / 8]: per 128 inputs, 16 lanes: the block scale of the lane's chunk */
} a8vec;
/* For int8 weights (MX_I8_A8, `quant_a8n`) the same struct holds the codes in input order, and per
   lane of four inputs (Kp / 4 lanes: 16 per 64 inputs) corr = -128 x the sum of its four codes and
   d = its block's scale. Either layout takes at most 3 Kp bytes (`a8_make`). */

static inline int64_t a8_kp(int64_t K) { return (K + 127) & ~(int64_t)127; }

/* The rounding of one block of 32: d = max|x| / 127, q = round-to-nearest-even(x * (127 / max|x|)),
   zeros for an all-zero block (mixlab.ops.quant.round_activations_q8 computes the same floats). The
   codes go to q[32] and, as bytes, the first 16 to `first` and the last 16 to `last`; returns d.
   Both layouts below (`quant_a8`, `quant_a8n`) round through it, so int4's and int8's roundings of a
   vector are the same numbers. */
static inline float round_block32(const float* x, int8_t* first, int8_t* last, int32_t q[32]) {
#if defined(__AVX512F__)
    const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const __m512 id = _mm512_set1_ps(amax != 0.f ? 127.f / amax : 0.f);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id)); /* MXCSR: to nearest, ties even */
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
    _mm_storeu_si128((__m128i*)(void*)first, _mm512_cvtepi32_epi8(q0)); /* |q| <= 127 */
    _mm_storeu_si128((__m128i*)(void*)last, _mm512_cvtepi32_epi8(q1));
    _mm512_storeu_si512(q, q0);
    _mm512_storeu_si512(q + 16, q1);
#else
    float amax = 0.f;
    for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float id = amax != 0.f ? 127.f / amax : 0.f;
    for (int i = 0; i < 32; i++) q[i] = (int32_t)nearbyintf(x[i] * id);
    for (int i = 0; i < 16; i++) first[i] = (int8_t)q[i], last[i] = (int8_t)q[16 + i];
#endif
    return amax / 127.f;
}

/* Activation vector x [K] rounded for int4 weights (MX_Q4_*_A8), in the nibble layout of `a8vec`. */
static void quant_a8(const float* x, int64_t K, a8vec a) {
    const int64_t Kp = a8_kp(K);
    for (int64_t c = 0; c < Kp / 128; c++) {
        int8_t* lo = a.q + c * 128;
        int8_t* hi = lo + 64;
        for (int j = 0; j < 4; j++) {
            const int64_t k0 = c * 128 + j * 32, l0 = c * 16 + j * 4; /* first input, first lane */
            if (k0 >= K) { /* padding past the end: zero codes, sums and scales */
                memset(lo + j * 16, 0, 16);
                memset(hi + j * 16, 0, 16);
                for (int u = 0; u < 4; u++) a.corr[l0 + u] = 0, a.d[l0 + u] = 0.f;
                continue;
            }
            int32_t q[32];
            const float d = round_block32(x + k0, lo + j * 16, hi + j * 16, q);
            for (int u = 0; u < 4; u++) { /* lane u multiplies codes 4u..4u+3 of both halves */
                int32_t sum = 0;
                for (int b = 0; b < 4; b++) sum += q[4 * u + b] + q[16 + 4 * u + b];
                a.corr[l0 + u] = -8 * sum, a.d[l0 + u] = d;
            }
        }
    }
}

/* `quant_a8`'s rounding in input order, for int8 weights (MX_I8_A8); K a multiple of 32. */
static void quant_a8n(const float* x, int64_t K, a8vec a) {
    const int64_t Kp = a8_kp(K);
    for (int64_t k0 = 0; k0 < Kp; k0 += 32) {
        const int64_t l0 = k0 / 4; /* the block's first lane */
        if (k0 >= K) { /* padding past the end: zero codes, sums and scales */
            memset(a.q + k0, 0, 32);
            for (int u = 0; u < 8; u++) a.corr[l0 + u] = 0, a.d[l0 + u] = 0.f;
            continue;
        }
        int32_t q[32];
        const float d = round_block32(x + k0, a.q + k0, a.q + k0 + 16, q);
        for (int u = 0; u < 8; u++)
            a.corr[l0 + u] = -128 * (q[4 * u] + q[4 * u + 1] + q[4 * u + 2] + q[4 * u + 3]), a.d[l0 + u] = d;
    }
}

/* The int8 rounding of activation vector x [K] that weights of type wt multiply (`is_a8`). */
static void quant_act8(int wt, const float* x, int64_t K, a8vec a) {
    if (wt == MX_I8_A8) quant_a8n(x, K, a);
    else quant_a8(x, K, a);
}

/* An activation vector's rounding at `at` (3 Kp bytes, `a8vec`'s two layouts). */
static a8vec a8_make(char* at, int64_t K) {
    const int64_t Kp = a8_kp(K);
    const a8vec a = {(int8_t*)at, (int32_t*)(void*)(at + Kp), (float*)(void*)(at + 2 * Kp)};
    return a;
}

/* M activation rows quantised into one of this thread's two buffers (`slot` 0: `a8_rows`'; 1: the
   pinned rows', `a8_pin`), grown as needed and kept for the thread's lifetime; null when memory runs out. */
static a8vec* a8_round(int slot, int wt, const float* X, int64_t M, int64_t K) {
    static _Thread_local char* buf[2];
    static _Thread_local size_t cap[2];
    static _Thread_local a8vec* rows[2];
    static _Thread_local int64_t nrows[2];
    const int64_t Kp = a8_kp(K);
    const size_t per = 3 * (size_t)Kp, need = per * (size_t)M + 64;
    if (need > cap[slot]) {
        free(buf[slot]);
        cap[slot] = need * 2;
        buf[slot] = (char*)malloc(cap[slot]);
        if (!buf[slot]) { cap[slot] = 0; return 0; }
    }
    if (M > nrows[slot]) {
        free(rows[slot]);
        rows[slot] = (a8vec*)malloc((size_t)M * sizeof(a8vec));
        nrows[slot] = rows[slot] ? M : 0;
        if (!rows[slot]) return 0;
    }
    char* at = (char*)(((uintptr_t)buf[slot] + 63) & ~(uintptr_t)63);
    for (int64_t j = 0; j < M; j++) {
        const a8vec a = a8_make(at, K);
        quant_act8(wt, X + j * K, K, a);
        rows[slot][j] = a;
        at += per;
    }
    return rows[slot];
}

/* Rows this thread has rounded once for several products of the same activations (`a8_pin`). */
static _Thread_local struct {
    const float* X;
    int64_t M, K;
    int nat; /* the rows' layout: int8 weights' (MX_I8_A8) or int4's */
    a8vec* rows;
} a8_pinned;

/* Round rows X [M, K] once for the products that follow, until `a8_unpin`: `a8_rows` then hands out
   these (or a run of them) instead of rounding again. An expert's gate/up product with adapters runs
   in chunks of LORA_CHUNK outputs, each a `gemm_rows` call: rounding a prompt's rows in every chunk
   cost more than the adapters' updates (the int4 512-token prefill under rank 16, 1.23x the base). */
static void a8_pin(int wt, const float* X, int64_t M, int64_t K) {
    a8_pinned.rows = a8_round(1, wt, X, M, K);
    a8_pinned.X = X, a8_pinned.M = M, a8_pinned.K = K, a8_pinned.nat = wt == MX_I8_A8;
}

static void a8_unpin(void) { a8_pinned.rows = 0; }

/* M activation rows X [M, K] rounded to int8 (`quant_a8`): rows pinned by `a8_pin` where X lies among
   them, else rounded now into this thread's buffer. `gemm_rows` calls this on every call, so each
   thread rounds the vectors it multiplies itself (K / 32 short vector loops: small next to reading
   the rows); null when memory runs out. */
static a8vec* a8_rows(int wt, const float* X, int64_t M, int64_t K) {
    const float* P = a8_pinned.X;
    if (a8_pinned.rows && K == a8_pinned.K && a8_pinned.nat == (wt == MX_I8_A8) && X >= P
        && X + M * K <= P + a8_pinned.M * K && (X - P) % K == 0)
        return a8_pinned.rows + (X - P) / K;
    return a8_round(0, wt, X, M, K);
}

#if defined(__AVX512BW__) && defined(__AVX512VL__)
/* The vectorised int4 x int8 kernels (every `#if defined(MX_A8_SIMD)`) need AVX512-BW and VL, and
   take `vpdpbusd` (AVX512-VNNI) where the CPU has it; without it (Skylake-SP/X) the same integer
   sums from AVX512-BW: codes 0..15 times int8 summed in pairs to int16 (at most 2 x 15 x 128 in
   magnitude: never saturated), pairs to int32. So a model's int4 x int8 products are the same bits
   with and without VNNI, and never fall back to float32 activations (a model's numerics are its
   `int4_activations`, not its CPU's). */
#define MX_A8_SIMD 1
static inline __m512i dpbusd(__m512i acc, __m512i u4, __m512i s8) { /* u4: unsigned codes 0..15 */
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, u4, s8);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u4, s8), _mm512_set1_epi16(1)));
#endif
}
#endif

/* out[q] = int4 row w (K/2 bytes, float16 scales s per group of G) . rows xa[0..Q) (Q <= 4). */
static inline void dotq_q4a8(const uint8_t* w, const uint16_t* s, const a8vec* xa, int64_t K, int64_t G, int Q,
                             float* out) {
    const int64_t Kp = a8_kp(K), ns = 128 / G; /* scales per 128 inputs */
    (void)ns;
#if defined(MX_A8_SIMD)
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    /* lane l (chunk l / 4) takes scale (l / 4) * 32 / G of its 128 inputs */
    const __m512i sidx = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           G == 32 ? 2 : G == 64 ? 3 : 4);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = 0; c < Kp / 128; c++) {
        const int64_t left = K - c * 128; /* inputs of this block that exist: 128 except in the last */
        __m512i b;
        __m128i sh;
        if (left >= 128) {
            b = _mm512_loadu_si512(w + c * 64);
            sh = ns == 4 ? _mm_loadl_epi64((const __m128i*)(s + c * 4)) : _mm_maskz_loadu_epi16((__mmask8)((1u << ns) - 1), s + c * ns);
        } else {
            b = _mm512_maskz_loadu_epi8(((__mmask64)1 << (left / 2)) - 1, w + c * 64);
            sh = _mm_maskz_loadu_epi16((__mmask8)((1u << (left / G)) - 1), s + c * ns);
        }
        _mm_prefetch((const char*)(w + c * 64 + 1024), _MM_HINT_T0);
        const __m512i blo = _mm512_and_si512(b, m4), bhi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
        const __m512 sw = _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(_mm_cvtph_ps(sh)));
        for (int q = 0; q < Q; q++) {
            const a8vec* a = xa + q;
            __m512i t = _mm512_loadu_si512(a->corr + c * 16);
            t = dpbusd(t, blo, _mm512_loadu_si512(a->q + c * 128));
            t = dpbusd(t, bhi, _mm512_loadu_si512(a->q + c * 128 + 64));
            acc[q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sw, _mm512_loadu_ps(a->d + c * 16)), acc[q]);
        }
    }
    for (int q = 0; q < Q; q++) out[q] = hsum(acc[q]);
#else
    for (int q = 0; q < Q; q++) {
        const a8vec* a = xa + q;
        float sum = 0.f;
        for (int64_t c = 0; c < Kp / 128; c++)
            for (int l = 0; l < 16; l++) {
                const int j = l / 4, u = l % 4; /* chunk j, bytes 4u..4u+3 of its 16 */
                const int64_t k0 = c * 128 + j * 32;
                if (k0 >= K) continue;
                int32_t t = a->corr[c * 16 + l];
                for (int bb = 0; bb < 4; bb++) {
                    const int i = j * 16 + 4 * u + bb;
                    const uint8_t byte = w[c * 64 + i];
                    t += (byte & 0xf) * a->q[c * 128 + i] + (byte >> 4) * a->q[c * 128 + 64 + i];
                }
                sum += (float)t * (f16_to_f32(s[k0 / G]) * a->d[c * 16 + l]);
            }
        out[q] = sum;
    }
#endif
}

#ifndef MX_Q4_PREFETCH
#define MX_Q4_PREFETCH 16384
#endif
#if defined(MX_A8_SIMD)
#define MX_HI4(b) _mm512_and_si512(_mm512_srli_epi16((b), 4), m4)
/* Four consecutive int4 rows (w: rows of K / 2 bytes, s: their scales, K / G each) against one
   activation vector (batch-1 decoding): `dotq_q4a8`'s arithmetic, with the activation's codes, sums
   and scales loaded once per 128 inputs for the four rows, four independent accumulator chains, and
   a later group of four rows prefetched as these are read: four 64-byte lines per block, in address
   order (the four rows of a group are contiguous), at least MX_Q4_PREFETCH bytes ahead, and that
   group's scales with them. Measured on the mini-moe int4 step (2 threads): 11% faster than one
   row at a time; without the prefetch 80% slower; the high nibbles by `gf2p8affine` (one
   instruction less) no better. The distance: one group ahead (2 KB for 1024 inputs) was short of
   the memory's latency once the memory reads faster than ~45 GB/s: 8 KB ahead plus the scales
   (in-process A/B of the whole step, BENCHMARKS.md issue 16) was +15-20% at ~75 GB/s, +2-5% at
   ~45 GB/s, and 16 KB another +1-2% (12 KB about the same, 6 KB and 24 KB slower); T1 / NTA hints,
   or prefetching a range's first rows before it starts (see `seg` instead) no better.
   The kernel itself is not compute-bound: ~64 GB/s per core from L2. out[i] = row i . xa. */
static inline void dotq_q4a8_rows4(const uint8_t* w, const uint16_t* s, const a8vec* xa, int64_t K, int64_t G,
                                   const char* next, const char* snext, int64_t sbytes, float* out) {
    const int64_t rb = K / 2, rs = K / G, ns = 128 / G, full = K / 128;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i sidx = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           G == 32 ? 2 : G == 64 ? 3 : 4);
    const __mmask8 smask = (__mmask8)((1u << ns) - 1);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = 0; c < full; c++) {
        const __m512i xl = _mm512_loadu_si512(xa->q + c * 128), xh = _mm512_loadu_si512(xa->q + c * 128 + 64);
        const __m512i corr = _mm512_loadu_si512(xa->corr + c * 16);
        const __m512 d = _mm512_loadu_ps(xa->d + c * 16);
        if (c * 64 < sbytes) _mm_prefetch(snext + c * 64, _MM_HINT_T0);
        for (int i = 0; i < 4; i++) {
            _mm_prefetch((const char*)(next + c * 256 + i * 64), _MM_HINT_T0);
            const __m512i b = _mm512_loadu_si512(w + i * rb + c * 64);
            const __m128i sh = ns == 4 ? _mm_loadl_epi64((const __m128i*)(s + i * rs + c * 4))
                                       : _mm_maskz_loadu_epi16(smask, s + i * rs + c * ns);
            __m512i t = dpbusd(corr, _mm512_and_si512(b, m4), xl);
            t = dpbusd(t, MX_HI4(b), xh);
            const __m512 sw = _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(_mm_cvtph_ps(sh)));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sw, d), acc[i]);
        }
    }
    if (full * 128 < K) { /* the last, partial block: dotq_q4a8's masked loads */
        const int64_t c = full, left = K - c * 128;
        const __m512i xl = _mm512_loadu_si512(xa->q + c * 128), xh = _mm512_loadu_si512(xa->q + c * 128 + 64);
        const __m512i corr = _mm512_loadu_si512(xa->corr + c * 16);
        const __m512 d = _mm512_loadu_ps(xa->d + c * 16);
        for (int i = 0; i < 4; i++) {
            const __m512i b = _mm512_maskz_loadu_epi8(((__mmask64)1 << (left / 2)) - 1, w + i * rb + c * 64);
            const __m128i sh = _mm_maskz_loadu_epi16((__mmask8)((1u << (left / G)) - 1), s + i * rs + c * ns);
            __m512i t = dpbusd(corr, _mm512_and_si512(b, m4), xl);
            t = dpbusd(t, MX_HI4(b), xh);
            const __m512 sw = _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(_mm_cvtph_ps(sh)));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sw, d), acc[i]);
        }
    }
    for (int i = 0; i < 4; i++) out[i] = hsum(acc[i]);
}
#undef MX_HI4
#endif

/* int8 weights x int8 activations (MX_I8_A8): R <= 4 rows (w, ld bytes apart) against Q <= 4 vectors
   xa rounded by `quant_a8n`; out[i * 4 + q] = row i . xa[q] before the row's scale. Per 64 inputs
   and (row, vector): with VNNI, `vpdpbusd` of the weights xor 0x80 (w + 128 as unsigned bytes)
   by the signed codes, started from corr = -128 x the lane's code sum, gives each lane's exact
   sum of four w x x; without it (AVX512-BW) |w| times x negated where w < 0 (llama.cpp's
   `sign_epi8` trick), `maddubs` then `madd`: pairs of at most 128 x 127 products, never saturated,
   so the same int32 lanes. Then one float fmadd by the lane's block scale into one accumulator per
   (row, vector), summed by `hsum`: each output's operations and their order are the same whatever R,
   Q or the rows and vectors around it, so batch-1 decoding, a few tokens and a prompt chunk give a
   token the same bits. `next`: R == 4 rows ahead to prefetch (4 x 64 bytes per 64 inputs), or null.
   ~4 vector instructions per 64 weights and vector where MX_I8 takes 12 (widen, convert, fmadd per 16). */
static inline __attribute__((always_inline)) void tile_i8a8(const int8_t* w, int64_t ld, int64_t K, const int R,
                                                            const a8vec* xa, const int Q, const char* next,
                                                            float* out) {
#if defined(MX_A8_SIMD)
    __m512 acc[4][4];
    for (int i = 0; i < R; i++)
        for (int q = 0; q < Q; q++) acc[i][q] = _mm512_setzero_ps();
#if defined(__AVX512VNNI__)
    const __m512i flip = _mm512_set1_epi8((char)0x80);
#else
    const __m512i ones = _mm512_set1_epi16(1), zero = _mm512_setzero_si512();
#endif
    for (int64_t k = 0; k < K; k += 64) {
        const __mmask64 mk = K - k >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (K - k)) - 1;
        __m512i wv[4];
#if !defined(__AVX512VNNI__)
        __mmask64 neg[4];
#endif
        for (int i = 0; i < R; i++) {
            if (next) _mm_prefetch(next + k * 4 + i * 64, _MM_HINT_T0);
            const __m512i b = _mm512_maskz_loadu_epi8(mk, w + i * ld + k); /* zeros past K: padded codes are 0 */
#if defined(__AVX512VNNI__)
            wv[i] = _mm512_xor_si512(b, flip);
#else
            wv[i] = _mm512_abs_epi8(b), neg[i] = _mm512_movepi8_mask(b);
#endif
        }
        for (int q = 0; q < Q; q++) {
            const __m512i x = _mm512_loadu_si512(xa[q].q + k);
            const __m512 d = _mm512_loadu_ps(xa[q].d + k / 4);
#if defined(__AVX512VNNI__)
            const __m512i corr = _mm512_loadu_si512(xa[q].corr + k / 4);
#endif
            for (int i = 0; i < R; i++) {
#if defined(__AVX512VNNI__)
                const __m512i t = _mm512_dpbusd_epi32(corr, wv[i], x);
#else
                const __m512i sx = _mm512_mask_sub_epi8(x, neg[i], zero, x);
                const __m512i t = _mm512_madd_epi16(_mm512_maddubs_epi16(wv[i], sx), ones);
#endif
                acc[i][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), d, acc[i][q]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int q = 0; q < Q; q++) out[i * 4 + q] = hsum(acc[i][q]);
#else
    (void)next;
    for (int i = 0; i < R; i++)
        for (int q = 0; q < Q; q++) {
            float sum = 0.f;
            for (int64_t l = 0; l < K / 4; l++) {
                int32_t t = 0;
                for (int b = 0; b < 4; b++) t += w[i * ld + 4 * l + b] * xa[q].q[4 * l + b];
                sum += (float)t * xa[q].d[l];
            }
            out[i * 4 + q] = sum;
        }
#endif
}

/* The same row against four vectors (rows j..j+3 of a matrix with leading dimension ld): one read
   of the weights serves four tokens. out[q] = w . x_q. */
static inline void dot4_bf16(const uint16_t* w, const uint16_t* x, int64_t ld, int64_t K, float* out) {
    int64_t k = 0;
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#if defined(__AVX512BF16__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        const __m512bh wv = MX_BF(w + k);
        a0 = _mm512_dpbf16_ps(a0, wv, MX_BF(x + k));
        a1 = _mm512_dpbf16_ps(a1, wv, MX_BF(x + ld + k));
        a2 = _mm512_dpbf16_ps(a2, wv, MX_BF(x + 2 * ld + k));
        a3 = _mm512_dpbf16_ps(a3, wv, MX_BF(x + 3 * ld + k));
    }
    s[0] = hsum(a0), s[1] = hsum(a1);
    s[2] = hsum(a2), s[3] = hsum(a3);
#endif
    for (; k < K; k++)
        for (int q = 0; q < 4; q++) s[q] += bf16_to_f32(w[k]) * bf16_to_f32(x[q * ld + k]);
    for (int q = 0; q < 4; q++) out[q] = s[q];
}

#if defined(__AVX512F__)
#define MX_DOT4_F(T, W)                                                                                         \
    static inline void dot4_##T(const W* w, const float* x, int64_t ld, int64_t K, float* out) {                \
        int64_t k = 0;                                                                                          \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps(); \
        for (; k + 16 <= K; k += 16) {                                                                          \
            const __m512 wv = MX_LOADW_##T(w + k);                                                              \
            a0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + k), a0);                                               \
            a1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + ld + k), a1);                                          \
            a2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + 2 * ld + k), a2);                                      \
            a3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + 3 * ld + k), a3);                                      \
        }                                                                                                       \
        float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};                                                   \
        for (; k < K; k++)                                                                                      \
            for (int q = 0; q < 4; q++) s[q] += w[k] * x[q * ld + k];                                           \
        for (int q = 0; q < 4; q++) out[q] = s[q];                                                              \
    }
#else
#define MX_DOT4_F(T, W)                                                                                         \
    static inline void dot4_##T(const W* w, const float* x, int64_t ld, int64_t K, float* out) {                \
        for (int q = 0; q < 4; q++) out[q] = dot_##T(w, x + q * ld, K);                                         \
    }
#endif
MX_DOT4_F(f32, float)
MX_DOT4_F(i8, int8_t)

/* Four rows against Q = 1..4 vectors (4Q accumulators): for several tokens per weight (batched
   decoding and prompts beyond what `rows4_bf16` takes, MoE experts chosen by several tokens) each loaded weight vector serves Q tokens and each
   activation vector four rows. out[i * ldo + q] = w_i . x_q. While it works, the next four rows are
   prefetched into L2 (`_MM_HINT_T1`), one cache line per row per step: the four interleaved row
   streams defeat the hardware prefetcher, and prefetching into L1 instead evicts the activations
   (measured on 64 MB of weights, 2 threads: T0 17-21 GB/s, T1 35-52 GB/s, one plain row-at-a-time
   stream 37-51 GB/s in the same runs). */
#if defined(__AVX512F__)
/* The sums of 16 vectors at once: lane j of the result = the sum of v[j]'s 16 lanes (15 adds and
   30 shuffles, where 16 separate reductions take ~6 dependent steps each; measured +5% on the
   experts' weight stream with 4-token tiles). */
static inline __m512 hsum16(const __m512* v) {
    __m512 u[8], w[4], x[2];
    for (int j = 0; j < 8; j++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], a = v[2j], b = v[2j+1] */
        u[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
    for (int k = 0; k < 4; k++) /* per 128-bit lane: the lane's partial sums of v[4k .. 4k+3] */
        w[k] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0x44), _mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0xEE));
    for (int m = 0; m < 2; m++) /* 128-bit lanes: halves of w[2m] and of w[2m+1] folded */
        x[m] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * m], w[2 * m + 1], 0x44),
                             _mm512_shuffle_f32x4(w[2 * m], w[2 * m + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
}
#endif

#if defined(__AVX512BF16__)
#define MX_TILE4(Q)                                                                                            \
    static void tile4x##Q##_bf16(const uint16_t* w, const uint16_t* x, int64_t ld, int64_t K, float* out,       \
                                 int64_t ldo) {                                                                 \
        __m512 acc[4][Q];                                                                                       \
        for (int i = 0; i < 4; i++)                                                                             \
            for (int q = 0; q < Q; q++) acc[i][q] = _mm512_setzero_ps();                                        \
        int64_t k = 0;                                                                                          \
        for (; k + 32 <= K; k += 32) {                                                                          \
            __m512bh xv[Q];                                                                                     \
            for (int q = 0; q < Q; q++) xv[q] = MX_BF(x + q * ld + k);                                          \
            for (int i = 0; i < 4; i++) {                                                                       \
                _mm_prefetch((const char*)(w + (4 + i) * K + k), _MM_HINT_T1);                                  \
                const __m512bh wv = MX_BF(w + i * K + k);                                                       \
                for (int q = 0; q < Q; q++) acc[i][q] = _mm512_dpbf16_ps(acc[i][q], wv, xv[q]);                 \
            }                                                                                                   \
        }                                                                                                       \
        __m512 v[16];                                                                                           \
        for (int i = 0; i < 4; i++)                                                                             \
            for (int q = 0; q < 4; q++) v[i * 4 + q] = q < Q ? acc[i][q] : _mm512_setzero_ps();                 \
        float sums[16];                                                                                         \
        _mm512_storeu_ps(sums, hsum16(v));                                                                      \
        for (int i = 0; i < 4; i++)                                                                             \
            for (int q = 0; q < Q; q++) {                                                                       \
                float s = sums[i * 4 + q];                                                                      \
                for (int64_t kk = k; kk < K; kk++) s += bf16_to_f32(w[i * K + kk]) * bf16_to_f32(x[q * ld + kk]); \
                out[i * ldo + q] = s;                                                                           \
            }                                                                                                   \
    }
MX_TILE4(1)
MX_TILE4(2)
MX_TILE4(3)
MX_TILE4(4)

/* `tile4x4_bf16` for K a multiple of 32, inlined into `gemm_rows`' loop over the tiles: the same
   loads, prefetches and sums, 4-16% faster as measured (C harness, 2 threads, kernels alternating
   round by round at ~78 GB/s: the output matrix at 16 tokens 0.465 -> 0.540 of the one-token
   stream's speed, 8 and 16 tokens on mini-moe's gate/up matrices 0.708 -> 0.747 and 0.468 -> 0.530;
   the per-call setup of the out-of-line kernel, whose tile is only ~300 cycles at K = 1024). */
static inline void tile4x4k32_bf16(const uint16_t* w, const uint16_t* x, int64_t K, float* out) {
    __m512 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int q = 0; q < 4; q++) acc[i][q] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh xv[4];
        for (int q = 0; q < 4; q++) xv[q] = MX_BF(x + q * K + k);
        for (int i = 0; i < 4; i++) {
            _mm_prefetch((const char*)(w + (4 + i) * K + k), _MM_HINT_T1);
            const __m512bh wv = MX_BF(w + i * K + k);
            for (int q = 0; q < 4; q++) acc[i][q] = _mm512_dpbf16_ps(acc[i][q], wv, xv[q]);
        }
    }
    __m512 v[16];
    for (int i = 0; i < 4; i++)
        for (int q = 0; q < 4; q++) v[i * 4 + q] = acc[i][q];
    _mm512_storeu_ps(out, hsum16(v));
}
#endif

#if defined(__AVX512BF16__)
/* Four consecutive rows against Q = 2..5 vectors, read one row after the other: rows r..r+3 are
   contiguous, so the kernel reads one sequential stream, prefetched MX_ROWS_PF bytes ahead into L1,
   where `tile4x*_bf16` reads the four rows interleaved (four streams). With the few tokens per
   expert of batched decoding (~4 at 16 sequences) this streams mini-moe's gate/up matrices at
   0.93-0.98 of what one token per row streams and the tiles at 0.76-0.77 (C harness, 64 matrices
   of 1024 x 7168 and 3584 x 1024, 2 threads, kernels alternating round by round, medians; the
   engine's 16-sequence step 1.10x faster, BENCHMARKS.md). Each vector's K elements stay in L1
   while the four rows pass: with long rows (the down projection, K = 3584) and more tokens the
   vectors crowd the stream out of L1 and the tiles, which read each vector once per four rows, win
   (`MX_ROWS_X`, measured on a CPU with 48 KB of L1d: 28 KB of activations at most). U k-steps of 32 per vector in flight (UQ accumulator chains); out[i * ldo + q] =
   w_i . x_q. */
#ifndef MX_ROWS_X /* rows4_bf16 for at most this many activation elements (M x K), tiles above */
#define MX_ROWS_X 14336
#endif
#ifndef MX_ROWS_PF
#define MX_ROWS_PF 4096
#endif
/* Rows longer than 4 KB (K > 2048: mini-moe's down projection, K = 3584) prefetch MX_ROWS_PF_LONG
   ahead: engine A/B at 16 sequences (in-process, 20-30 rounds each, three runs) 5120 vs 4096:
   0.970-0.988 of the step time where the probe read 43-46 GB/s, 0.979-0.988 at 65-73 GB/s (6144 and
   7168 ~0.99-1.0; gate/up at 8192: 1.02-1.03 at ~44 GB/s, though the C harness favours it at ~76). */
#ifndef MX_ROWS_PF_LONG
#define MX_ROWS_PF_LONG 5120
#endif
#define MX_ROWS4(Q, U)                                                                                         \
    static void rows4x##Q##_bf16(const uint16_t* w, const uint16_t* x, int64_t ld, int64_t K, float* out,       \
                                 int64_t ldo) {                                                                 \
        enum { NV = Q <= 4 ? 4 : 8 }; /* vectors per row in v: one hsum16 per 16 */                             \
        const int64_t pf = K > 2048 ? MX_ROWS_PF_LONG : MX_ROWS_PF;                                             \
        __m512 v[4 * NV];                                                                                       \
        for (int i = 0; i < 4; i++) {                                                                           \
            const uint16_t* wi = w + i * K;                                                                     \
            __m512 a[U][Q];                                                                                     \
            for (int u = 0; u < U; u++)                                                                         \
                for (int q = 0; q < Q; q++) a[u][q] = _mm512_setzero_ps();                                      \
            int64_t k = 0;                                                                                      \
            for (; k + 32 * U <= K; k += 32 * U)                                                                \
                for (int u = 0; u < U; u++) {                                                                   \
                    _mm_prefetch((const char*)(wi + k + 32 * u) + pf, _MM_HINT_T0);                             \
                    const __m512bh wv = MX_BF(wi + k + 32 * u);                                                 \
                    for (int q = 0; q < Q; q++) a[u][q] = _mm512_dpbf16_ps(a[u][q], wv, MX_BF(x + q * ld + k + 32 * u)); \
                }                                                                                               \
            for (; k + 32 <= K; k += 32) {                                                                      \
                const __m512bh wv = MX_BF(wi + k);                                                              \
                for (int q = 0; q < Q; q++) a[0][q] = _mm512_dpbf16_ps(a[0][q], wv, MX_BF(x + q * ld + k));     \
            }                                                                                                   \
            for (int q = 0; q < NV; q++) {                                                                      \
                __m512 s = _mm512_setzero_ps();                                                                 \
                if (q < Q)                                                                                      \
                    for (int u = 0; u < U; u++) s = _mm512_add_ps(s, a[u][q]);                                  \
                v[i * NV + q] = s;                                                                              \
            }                                                                                                   \
        }                                                                                                       \
        float sums[4 * NV];                                                                                     \
        for (int h = 0; h < NV / 4; h++) _mm512_storeu_ps(sums + 16 * h, hsum16(v + 16 * h));                   \
        for (int i = 0; i < 4; i++)                                                                             \
            for (int q = 0; q < Q; q++) {                                                                       \
                float s = sums[i * NV + q];                                                                     \
                for (int64_t kk = k_tail(K); kk < K; kk++) s += bf16_to_f32(w[i * K + kk]) * bf16_to_f32(x[q * ld + kk]); \
                out[i * ldo + q] = s;                                                                           \
            }                                                                                                   \
    }
static inline int64_t k_tail(int64_t K) { return K & ~(int64_t)31; } /* where the 32-wide steps end */
MX_ROWS4(2, 2)
MX_ROWS4(3, 2)
MX_ROWS4(4, 2)
MX_ROWS4(5, 1)

static void rows4_bf16(const uint16_t* w, const uint16_t* x, int64_t ld, int64_t K, int Q, float* out, int64_t ldo) {
    switch (Q) {
    case 2: rows4x2_bf16(w, x, ld, K, out, ldo); return;
    case 3: rows4x3_bf16(w, x, ld, K, out, ldo); return;
    case 4: rows4x4_bf16(w, x, ld, K, out, ldo); return;
    default: rows4x5_bf16(w, x, ld, K, out, ldo); return;
    }
}

#endif

static void tile4_bf16(const uint16_t* w, const uint16_t* x, int64_t ld, int64_t K, int Q, float* out, int64_t ldo) {
#if defined(__AVX512BF16__)
    switch (Q) {
    case 1: tile4x1_bf16(w, x, ld, K, out, ldo); return;
    case 2: tile4x2_bf16(w, x, ld, K, out, ldo); return;
    case 3: tile4x3_bf16(w, x, ld, K, out, ldo); return;
    default: tile4x4_bf16(w, x, ld, K, out, ldo); return;
    }
#else
    for (int i = 0; i < 4; i++)
        for (int q = 0; q < Q; q++) out[i * ldo + q] = dot_bf16(w + i * K, x + q * ld, K);
#endif
}

/* A weight matrix as the kernels see it: its type, data, per-row scales (int8 only), row length;
   `act16`: its activations may be rounded to bf16 (a bf16 model's engine step: int8 weights then
   run as bf16, `gemm_panels` for many tokens and `gemm_rows_i8_bf16` for a few). */
typedef struct {
    int wt;
    const void* w;
    const float* scale;
    int64_t K;
    int act16;
    const uint16_t* packed; /* bf16 only: the same rows in 32-row panels (`mx_pack_bf16`), or NULL */
    int inv; /* batch-invariant: `gemm_rows_inv` (mx_batch.invariant) */
} mat;

/* Rows from r0 on of a matrix: the product a batch-1 step runs next, whose first rows the one before
   prefetches as it ends (a range's own prefetch runs MX_Q4_PREFETCH bytes ahead; at its end that
   reaches into the next range instead of past its last row). A step has ~13 ranges per thread and
   layer (q, k, v per kv head, gate and up per expert, ...): +1-2.5% per int4 step at 46-72 GB/s
   (interleaved A/B, mini-moe). */
typedef struct {
    mat m;
    int64_t r0;
} seg;

/* `gemm_rows_a8` for int8 weights (MX_I8_A8): four rows at a time against up to four vectors, the
   rows past the last four one at a time (`tile_i8a8`, the same bits), times each row's scale. The
   first four vectors' pass over four rows prefetches rows as `dotq_q4a8_rows4` does (MX_Q4_PREFETCH
   bytes ahead, into `then` past r1): without it, 4 tokens against int8 rows ran at 0.75x the float32
   path's step (mini-moe's engine step, 4 sequences). */
static void gemm_rows_i8a8(mat m, const a8vec* xa, int64_t M, float* Y, int64_t ldy, int64_t r0, int64_t r1,
                           const seg* then) {
    const int64_t K = m.K;
    const int8_t* W = (const int8_t*)m.w;
    const int64_t ahead = (MX_Q4_PREFETCH + 4 * K - 1) / (4 * K) * (4 * K), end = r1 * K;
    float out[16] = {0.f}; /* (every element read is written first; GCC cannot see it) */
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const int64_t o = r * K + ahead; /* the prefetched group's first byte in m */
        const char* next = o < end || !then ? (const char*)m.w + o : (const char*)then->m.w + then->r0 * then->m.K + (o - end);
        for (int64_t j = 0; j < M; j += 4, next = 0) { /* the first vectors' pass prefetches */
            switch (M - j < 4 ? M - j : 4) {
            case 1: tile_i8a8(W + r * K, K, K, 4, xa + j, 1, next, out); break;
            case 2: tile_i8a8(W + r * K, K, K, 4, xa + j, 2, next, out); break;
            case 3: tile_i8a8(W + r * K, K, K, 4, xa + j, 3, next, out); break;
            default: tile_i8a8(W + r * K, K, K, 4, xa + j, 4, next, out);
            }
            for (int i = 0; i < 4; i++)
                for (int64_t q = 0; q < 4 && j + q < M; q++) Y[(j + q) * ldy + r + i] = out[i * 4 + q] * m.scale[r + i];
        }
    }
    for (; r < r1; r++)
        for (int64_t j = 0; j < M; j += 4) {
            switch (M - j < 4 ? M - j : 4) {
            case 1: tile_i8a8(W + r * K, K, K, 1, xa + j, 1, 0, out); break;
            case 2: tile_i8a8(W + r * K, K, K, 1, xa + j, 2, 0, out); break;
            case 3: tile_i8a8(W + r * K, K, K, 1, xa + j, 3, 0, out); break;
            default: tile_i8a8(W + r * K, K, K, 1, xa + j, 4, 0, out);
            }
            for (int64_t q = 0; q < 4 && j + q < M; q++) Y[(j + q) * ldy + r] = out[q] * m.scale[r];
        }
}

/* Y[j, r] = W[r, :] . xa[j] for int4 weights (MX_Q4_*_A8; int8: MX_I8_A8) and M <= MX_A8_ROWS activation vectors
   already rounded to int8 (`quant_a8`), rows r in [r0, r1) (Y's leading dimension ldy); `then`
   (batch 1, may be null): the range that follows, see `seg`. */
static void gemm_rows_a8(mat m, const a8vec* xa, int64_t M, float* Y, int64_t ldy, int64_t r0, int64_t r1,
                         const seg* then) {
    if (m.wt == MX_I8_A8) {
        gemm_rows_i8a8(m, xa, M, Y, ldy, r0, r1, then);
        return;
    }
    const int64_t K = m.K, G = q4_group(m.wt);
    int64_t r = r0;
#if defined(MX_A8_SIMD)
    if (M == 1) { /* batch-1 decoding: four rows at a time, prefetching ahead (into `then` past r1) */
        const int64_t rb = K / 2, rs = K / G, end = r1 * rb;
        const int64_t ahead = (MX_Q4_PREFETCH + 4 * rb - 1) / (4 * rb) * (4 * rb); /* whole groups of 4 rows */
        for (; r + 4 <= r1; r += 4) {
            const int64_t o = r * rb + ahead; /* the prefetched group's first byte in m */
            const char *pw, *ps;
            if (o < end || !then) {
                pw = (const char*)m.w + o;
                ps = (const char*)m.scale + o / rb * rs * 2;
            } else { /* that far into the next range */
                const int64_t nrb = then->m.K / 2, nrs = then->m.K / q4_group(then->m.wt), on = then->r0 * nrb + (o - end);
                pw = (const char*)then->m.w + on;
                ps = (const char*)then->m.scale + on / nrb * nrs * 2;
            }
            dotq_q4a8_rows4((const uint8_t*)m.w + r * rb, (const uint16_t*)(const void*)m.scale + r * rs, xa, K, G,
                            pw, ps, 4 * rs * 2, Y + r);
        }
    }
#endif
    for (; r < r1; r++) {
        const uint8_t* wr = (const uint8_t*)m.w + r * (K / 2);
        const uint16_t* sr = (const uint16_t*)(const void*)m.scale + r * (K / G);
        float out[4];
        for (int64_t j = 0; j < M; j += 4) {
            const int Q = M - j < 4 ? (int)(M - j) : 4;
            dotq_q4a8(wr, sr, xa + j, K, G, Q, out);
            for (int q = 0; q < Q; q++) Y[(j + q) * ldy + r] = out[q];
        }
    }
}

#if defined(__AVX512F__)
/* Keeps vector v in a register: GCC otherwise folds the load of a vector that several FMAs use into
   each of them (a memory operand per FMA), and the loads, not the FMAs, then bound a tile (C harness,
   one thread, rank 16, 4-row tiles: B u 40 -> 54 GFMA/s, A x 50 -> 56; `gemm_panels_a8`'s
   int4 tiles, 128 tokens: 123 -> 178 GFLOP/s). */
#define MX_IN_REG(v) __asm__("" : "+v"(v))
#endif

/* From how many tokens a product runs in panels (`gemm_panels`, `gemm_panels_a8`). */
static inline int64_t big_min_tokens(int64_t K) { return K > 2048 ? 24 : 64; }

#if defined(__AVX512BF16__) || defined(MX_A8_SIMD)
/* A grown-as-needed per-thread buffer of n uint16 (kept for the thread's lifetime), or null when
   memory runs out. Slots: 0 the packed panel, 1 int8 rows dequantised to bf16 (or int4 rows
   unpacked, `gemm_panels_a8`), 2 the activations rounded to bf16. */
static uint16_t* thread_buf(int slot, int64_t n) {
    static _Thread_local uint16_t* buf[3] = {0, 0, 0};
    static _Thread_local int64_t cap[3] = {0, 0, 0};
    if (n > cap[slot]) {
        free(buf[slot]);
        buf[slot] = (uint16_t*)aligned_alloc(64, (size_t)((n + 31) & ~(int64_t)31) * 2);
        cap[slot] = buf[slot] ? n : 0;
    }
    return buf[slot];
}
#endif

#if defined(MX_A8_SIMD)
/* Many tokens against int4 weights with int8 activations (MX_Q4_*_A8: prompt chunks, an expert's
   many rows): `dotq_q4a8`'s arithmetic in register tiles, so that a token's outputs never depend on
   how many tokens share its step (the bf16 panels these replace, weights and activations rounded to
   bf16, gave a decoding token other products beside a prompt chunk). 16 rows at a time are unpacked
   once into a per-thread panel (per 128 inputs and row: the low and the high nibbles as bytes, and
   the 16 lanes' weight scales as float32, `dotq_q4a8`'s masked loads included), which then serves
   every token in tiles of 4 rows x 3 tokens: per lane the same integer sums (`corr` + two
   `vpdpbusd`), the same float product of the two scales and the same `fmadd` chain over the blocks,
   and the 16 sums of a tile reduced together (`reduce16`) in `hsum`'s order. A tile
   keeps the rows' 12 vectors (`MX_IN_REG`) and its 12 sums in registers and loads each token's 4
   vectors once per block: 2 loads per 5 vector operations (GCC, left alone, reloaded the rows for
   every token: 6, and 0.63x the speed). The engine's 512-token prefill step of int4 mini-moe takes
   1.037x the bf16 panels' CPU time (1 thread, `benchmarks/kernels_ab.py --prefill --quant int4
   --cpu-time`, BENCHMARKS.md). */
#define MX_A8P 16 /* rows per unpacked panel */
#define MX_A8B 192 /* bytes per row and 128 inputs: low nibbles, high nibbles, scales */

/* out[i] = hsum(v[i]) for 16 vectors at once: lanes l + (l + 8), then + 4, + 2, + 1. */
static inline void reduce16(const __m512* v, float* out) {
    __m512 u[8], w[4], x[2];
    for (int p = 0; p < 8; p++) /* 128-bit lanes [a L0+L2, a L1+L3, b L0+L2, b L1+L3], a = v[2p], b = v[2p+1] */
        u[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0xEE));
    for (int p = 0; p < 4; p++) /* 128-bit lane k: vector 4p + k's 4 partial sums */
        w[p] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * p], u[2 * p + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * p], u[2 * p + 1], 0xDD));
    for (int p = 0; p < 2; p++) /* per 128-bit lane: [w0 (0+2), w0 (1+3), w1 (0+2), w1 (1+3)] */
        x[p] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * p], w[2 * p + 1], 0x44), _mm512_shuffle_ps(w[2 * p], w[2 * p + 1], 0xEE));
    float r[16]; /* lane 4k + e: vector 4e + k */
    _mm512_storeu_ps(r, _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], 0x88), _mm512_shuffle_ps(x[0], x[1], 0xDD)));
    for (int i = 0; i < 16; i++) out[i] = r[4 * (i % 4) + i / 4];
}

/* MX_A8P int4 rows (w, scales s) unpacked into P: block c of row i at P + (c * MX_A8P + i) * MX_A8B. */
static void unpack_q4a8(const uint8_t* w, const uint16_t* s, int64_t K, int64_t G, char* P) {
    const int64_t nb = a8_kp(K) / 128, ns = 128 / G;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i sidx = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           G == 32 ? 2 : G == 64 ? 3 : 4);
    for (int i = 0; i < MX_A8P; i++) {
        const uint8_t* wr = w + i * (K / 2);
        const uint16_t* sr = s + i * (K / G);
        for (int64_t c = 0; c < nb; c++) {
            const int64_t left = K - c * 128;
            __m512i b;
            __m128i sh;
            if (left >= 128) {
                b = _mm512_loadu_si512(wr + c * 64);
                sh = _mm_maskz_loadu_epi16((__mmask8)((1u << ns) - 1), sr + c * ns);
            } else {
                b = _mm512_maskz_loadu_epi8(((__mmask64)1 << (left / 2)) - 1, wr + c * 64);
                sh = _mm_maskz_loadu_epi16((__mmask8)((1u << (left / G)) - 1), sr + c * ns);
            }
            char* at = P + (c * MX_A8P + i) * MX_A8B;
            _mm512_store_si512(at, _mm512_and_si512(b, m4));
            _mm512_store_si512(at + 64, _mm512_and_si512(_mm512_srli_epi16(b, 4), m4));
            _mm512_store_ps(at + 128, _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(_mm_cvtph_ps(sh))));
        }
    }
}

/* Y[q, i] for MX_A8R unpacked rows (P, nb blocks) and Q <= MX_A8Q tokens xa (Y's leading dimension ldy):
   each block's token vectors loaded once into registers for the tile's rows. */
#define MX_A8R 4
#define MX_A8Q 3
static inline __attribute__((always_inline)) void tile_q4a8(const char* P, const a8vec* xa, int64_t nb, const int Q,
                                                            float* Y, int64_t ldy) {
    __m512 acc[16]; /* row i, token q: acc[MX_A8Q * i + q] (16 for `reduce16`) */
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nb; c++) {
        const char* pc = P + c * MX_A8P * MX_A8B;
        __m512i blo[MX_A8R], bhi[MX_A8R];
        __m512 sw[MX_A8R];
        for (int i = 0; i < MX_A8R; i++) {
            blo[i] = _mm512_load_si512(pc + i * MX_A8B), bhi[i] = _mm512_load_si512(pc + i * MX_A8B + 64);
            sw[i] = _mm512_load_ps(pc + i * MX_A8B + 128);
            MX_IN_REG(blo[i]);
            MX_IN_REG(bhi[i]);
            MX_IN_REG(sw[i]);
        }
        for (int q = 0; q < Q; q++) {
            const __m512i xl = _mm512_loadu_si512(xa[q].q + c * 128), xh = _mm512_loadu_si512(xa[q].q + c * 128 + 64);
            const __m512i cr = _mm512_loadu_si512(xa[q].corr + c * 16);
            const __m512 d = _mm512_loadu_ps(xa[q].d + c * 16);
            for (int i = 0; i < MX_A8R; i++) {
                const __m512i t = dpbusd(dpbusd(cr, blo[i], xl), bhi[i], xh);
                acc[MX_A8Q * i + q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sw[i], d), acc[MX_A8Q * i + q]);
            }
        }
    }
    float out[16];
    reduce16(acc, out);
    for (int i = 0; i < MX_A8R; i++)
        for (int q = 0; q < Q; q++) Y[q * ldy + i] = out[MX_A8Q * i + q];
}

/* Rows [r0, r1) of int4 matrix m (MX_Q4_*_A8) against M tokens X, MX_A8P rows at a time: returns the
   first row not done (the last < MX_A8P rows, or all of them when no buffer could be had), which
   `gemm_rows_a8` then computes with the same bits. */
__attribute__((noinline)) static int64_t gemm_panels_a8(mat m, const float* X, int64_t M, float* Y, int64_t ldy,
                                                        int64_t r0, int64_t r1) {
    const int64_t K = m.K, G = q4_group(m.wt), nb = a8_kp(K) / 128;
    char* P = (char*)thread_buf(1, MX_A8P * nb * MX_A8B / 2);
    const a8vec* xa = P ? a8_rows(m.wt, X, M, K) : 0;
    if (!xa) return r0;
    int64_t r = r0;
    for (; r + MX_A8P <= r1; r += MX_A8P) {
        unpack_q4a8((const uint8_t*)m.w + r * (K / 2), (const uint16_t*)(const void*)m.scale + r * (K / G), K, G, P);
        for (int64_t j = 0; j < M; j += MX_A8Q)
            for (int i = 0; i < MX_A8P; i += MX_A8R) {
                const char* Pi = P + i * MX_A8B;
                float* Yi = Y + j * ldy + r + i;
                switch (M - j < MX_A8Q ? M - j : MX_A8Q) {
                case 1: tile_q4a8(Pi, xa + j, nb, 1, Yi, ldy); break;
                case 2: tile_q4a8(Pi, xa + j, nb, 2, Yi, ldy); break;
                default: tile_q4a8(Pi, xa + j, nb, MX_A8Q, Yi, ldy);
                }
            }
    }
    return r;
}
#endif

#if defined(__AVX512BF16__)
/* Many tokens (prompt chunks, where the products are compute-bound): 32 rows at a time, packed so
   that one 64-byte vector holds 16 rows' pair of weights (k, k + 1), against each token's pair of
   activations broadcast to every lane (`vdpbf16ps` sums within each lane's pair): no horizontal
   sums, and a 32-row x 12-token register tile loads 2 weight vectors (from the packed panel, in L1/L2)
   and 12 broadcasts per 24 products, where the 4 x 4 tiles load 8 vectors per 16 (the activations
   of a long chunk from L2: bound by L2's bandwidth at ~55-60% of the matmul peak). Each 32-row panel
   (64 x K bytes) is packed once into a per-thread buffer and serves all M tokens, while the next
   panel's rows are prefetched into L2. Measured (`benchmarks/kernels_ab.py`: `mx_linear` over 16
   distinct matrices, 2 threads, interleaved with the tiles): 7168 x 1024 matrices at 64 tokens
   0.955x the time, 96 0.80x, 128 0.81x, 512 0.75x (~910 GFLOP/s; torch's oneDNN GEMM 874), but
   1.03-1.06x at 32-48 (1.27x in the fast memory state); 1024 x 3584 (the down projection) at 24
   tokens 0.83x, 32 0.76x, 64 0.61x, but 1.0-1.15x at 12-16 (the packing's extra traffic where the
   product is memory-bound). The experts of a 512-token prompt chunk (8 mini-moe layers) 0.71x. */
#define MX_BIG_Q 12 /* tokens per register tile */

static inline void transpose16_epi32(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) { t[2*i] = _mm512_unpacklo_epi32(r[2*i], r[2*i+1]); t[2*i+1] = _mm512_unpackhi_epi32(r[2*i], r[2*i+1]); }
    for (int i = 0; i < 4; i++) {
        u[4*i+0] = _mm512_unpacklo_epi64(t[4*i], t[4*i+2]); u[4*i+1] = _mm512_unpackhi_epi64(t[4*i], t[4*i+2]);
        u[4*i+2] = _mm512_unpacklo_epi64(t[4*i+1], t[4*i+3]); u[4*i+3] = _mm512_unpackhi_epi64(t[4*i+1], t[4*i+3]);
    }
    /* u[4i+j], lane L: rows 4i..4i+3 of column 4L+j */
    for (int j = 0; j < 4; j++) {
        /* rows 0-7: blocks i=0,1 ; rows 8-15: i=2,3 */
        __m512i a = _mm512_shuffle_i32x4(u[j], u[4+j], 0x88);  /* u[j].L0,u[j].L2,u[4+j].L0,u[4+j].L2 */
        __m512i b = _mm512_shuffle_i32x4(u[j], u[4+j], 0xDD);  /* L1, L3 */
        __m512i c = _mm512_shuffle_i32x4(u[8+j], u[12+j], 0x88);
        __m512i d = _mm512_shuffle_i32x4(u[8+j], u[12+j], 0xDD);
        /* column 4*0+j: rows 0-3 = u[j].L0 (a.L0), rows 4-7 = u[4+j].L0 (a.L2), rows 8-11 = c.L0, rows 12-15 = c.L2 */
        r[j]      = _mm512_shuffle_i32x4(a, c, 0x88);  /* a.L0, a.L2, c.L0, c.L2 */
        r[8 + j]  = _mm512_shuffle_i32x4(a, c, 0xDD);  /* a.L1, a.L3, c.L1, c.L3 -> column 4*2+j */
        r[4 + j]  = _mm512_shuffle_i32x4(b, d, 0x88);  /* column 4*1+j */
        r[12 + j] = _mm512_shuffle_i32x4(b, d, 0xDD);  /* column 4*3+j */
    }
}

/* P[(k / 2) * 64 + 2 * i + (k & 1)] = w[i * K + k] for rows i < 32 (row length K, K % 32 == 0). */
static void pack32_bf16(const uint16_t* w, int64_t K, uint16_t* P) {
    for (int64_t k = 0; k < K; k += 32)
        for (int h = 0; h < 2; h++) { /* rows 16h .. 16h + 15: 16 pairs each, transposed */
            __m512i v[16];
            for (int i = 0; i < 16; i++) v[i] = _mm512_loadu_si512(w + (16 * h + i) * K + k);
            transpose16_epi32(v);
            for (int p = 0; p < 16; p++) _mm512_store_si512(P + (k / 2 + p) * 64 + 32 * h, v[p]);
        }
}

/* Y[q, 0..32) = packed panel P . x_q for Q tokens (x: rows of K bf16; Y's leading dimension ldy).
   Two families from one body: `panel32x*` (a panel packed per thread, `gemm_panels`) prefetch `npf`
   lines from `pf` into L2 on the way (one every 4 pairs of k: the next panel's rows);
   `packed32x*` (the panels kept packed, `mat.packed`, `mx_pack_bf16`) read the panel straight from
   memory as one sequential stream, prefetched MX_PACKED_PF bytes ahead into L1, or, given `pf` (the
   last of several token chunks, whose panel the earlier chunks left in cache), bring the next panel
   into L2 while they compute (kernels_ab.py --panels, 12 rounds at 46-62 GB/s: gu16 0.93x,
   logits16 0.90x, the 16-sequence engine step 0.99x the time of the same kernels without). A panel of 32 rows
   serves every token from one weight load per 16 rows and one 4-byte broadcast per token, where
   `rows4_bf16` loads each token's vector once per row and the tiles read four rows as four streams:
   in a C harness (48 matrices each of 1024 x 3584 and 3584 x 1024, 2 threads, kernels alternating
   round by round, medians, ~45 GB/s memory) the kept panels streamed 40-46 GB/s at every token
   count from 2 to 12, where the rows kernel streams 35-44 GB/s at 2-4 tokens and the tiles 25-38
   at 6-12. 8 KB ahead instead of 4 took the same time in the 16-sequence engine step (kernels_ab.py
   --panels, 16 rounds at ~50 GB/s and 10 at ~82 GB/s: 0.99-1.01x); interleaving a panel's
   two 8-token chunks block by block was no faster. */
#ifndef MX_PACKED_PF
#define MX_PACKED_PF 4096
#endif
#define MX_PANEL32_BODY(Q, STREAM)                                                                             \
    {                                                                                                          \
        __m512 a0[Q], a1[Q];                                                                                   \
        for (int q = 0; q < Q; q++) a0[q] = a1[q] = _mm512_setzero_ps();                                       \
        for (int64_t kp = 0; kp < K / 2; kp++) {                                                               \
            if (STREAM && pf) { /* the panel is in cache already: bring the next one into L2 */              \
                _mm_prefetch(pf + kp * 128, _MM_HINT_T1);                                                      \
                _mm_prefetch(pf + kp * 128 + 64, _MM_HINT_T1);                                                 \
            } else if (STREAM) {                                                                               \
                _mm_prefetch((const char*)(P + kp * 64) + MX_PACKED_PF, _MM_HINT_T0);                          \
                _mm_prefetch((const char*)(P + kp * 64) + MX_PACKED_PF + 64, _MM_HINT_T0);                     \
            } else if ((kp & 3) == 0 && (kp >> 2) < npf) {                                                     \
                _mm_prefetch(pf + 64 * (kp >> 2), _MM_HINT_T1);                                                \
            }                                                                                                  \
            const __m512bh w0 = MX_BF(P + kp * 64), w1 = MX_BF(P + kp * 64 + 32);                              \
            for (int q = 0; q < Q; q++) {                                                                      \
                int32_t pair;                                                                                  \
                memcpy(&pair, x + q * K + 2 * kp, 4);                                                          \
                const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);                                          \
                a0[q] = _mm512_dpbf16_ps(a0[q], w0, b);                                                        \
                a1[q] = _mm512_dpbf16_ps(a1[q], w1, b);                                                        \
            }                                                                                                  \
        }                                                                                                      \
        for (int q = 0; q < Q; q++) {                                                                          \
            _mm512_storeu_ps(Y + q * ldy, a0[q]);                                                              \
            _mm512_storeu_ps(Y + q * ldy + 16, a1[q]);                                                         \
        }                                                                                                      \
    }
#define MX_PANEL32(Q)                                                                                          \
    static void panel32x##Q##_bf16(const uint16_t* P, const uint16_t* x, int64_t K, float* Y, int64_t ldy,    \
                                   const char* pf, int64_t npf) MX_PANEL32_BODY(Q, 0)                          \
    static void packed32x##Q##_bf16(const uint16_t* P, const uint16_t* x, int64_t K, float* Y, int64_t ldy,    \
                                    const char* pf) {                                                          \
        const int64_t npf = 0;                                                                                 \
        (void)npf;                                                                                             \
        MX_PANEL32_BODY(Q, 1)                                                                                  \
    }
MX_PANEL32(1)
MX_PANEL32(2)
MX_PANEL32(3)
MX_PANEL32(4)
MX_PANEL32(5)
MX_PANEL32(6)
MX_PANEL32(7)
MX_PANEL32(8)
MX_PANEL32(9)
MX_PANEL32(10)
MX_PANEL32(11)
MX_PANEL32(12)
typedef void (*panel_fn)(const uint16_t*, const uint16_t*, int64_t, float*, int64_t, const char*, int64_t);
static const panel_fn PANEL32[MX_BIG_Q + 1] = {
    0, panel32x1_bf16, panel32x2_bf16, panel32x3_bf16, panel32x4_bf16, panel32x5_bf16, panel32x6_bf16,
    panel32x7_bf16, panel32x8_bf16, panel32x9_bf16, panel32x10_bf16, panel32x11_bf16, panel32x12_bf16};
typedef void (*packed_fn)(const uint16_t*, const uint16_t*, int64_t, float*, int64_t, const char*);
static const packed_fn PACKED32[MX_BIG_Q + 1] = {
    0, packed32x1_bf16, packed32x2_bf16, packed32x3_bf16, packed32x4_bf16, packed32x5_bf16, packed32x6_bf16,
    packed32x7_bf16, packed32x8_bf16, packed32x9_bf16, packed32x10_bf16, packed32x11_bf16, packed32x12_bf16};

/* The panels on AMX's tile unit (Intel Xeon from Sapphire Rapids on). A panel's layout is what
   `tdpbf16ps` takes as its second operand: rows k / 2 of 16 weight rows' (k, k + 1) pairs, so half a
   panel (16 rows) over 32 inputs is one tile read with a stride of 128 bytes, and the tokens' bf16
   rows (XB, row-major) are the first operand as they lie. A tile product then serves up to 16 tokens
   at once, and the step's weights stream at the memory's speed at any count of them: C harness on
   an Intel Xeon (2 threads, 1 GB of panels on 2 MiB pages, K = 1024 and 3584) 32-38 GB/s from 1 to
   16 tokens, where `packed32x*` streamed 31 at 1 token, 29-30 at 2-4, 26 at 8, 20 at 12. Each
   output is the tile unit's own float32 sum over k of one token's row and one weight row (closer to
   the exact sum than the AVX-512 kernels' and not the same bits), so a token's numbers do not depend
   on the others in its tile. The process asks Linux for the tile state once (`mx_amx`); without it,
   or off Linux or an AMX build, nothing here runs. */
#if (defined(__AMX_TILE__) || defined(__AMXTILE__)) && (defined(__AMX_BF16__) || defined(__AMXBF16__)) && \
    defined(__linux__) && defined(__x86_64__) /* GCC's names, clang's */
#define MX_AMX 1
long syscall(long number, ...); /* <unistd.h>'s, which -std=c11 hides */
static int amx_on = 0; /* set by `mx_amx` before any step, read by every thread */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* Tiles 0-3 accumulate (16 weight rows each), 4-5 hold tokens, 6-7 the two half panels. With
   Q2 = 0: Q1 tokens (tile 4) into tiles 0-1; else two groups of tokens (Q1 and Q2 rows: tiles 4
   and 5) into tiles 0-1 and 2-3. */
static void amx_config(int Q1, int Q2) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.colsb[t] = 64;
    c.rows[0] = c.rows[1] = c.rows[4] = (uint8_t)Q1;
    c.rows[2] = c.rows[3] = c.rows[5] = (uint8_t)(Q2 ? Q2 : Q1);
    c.rows[6] = c.rows[7] = 16;
    _tile_loadconfig(&c);
}

/* Y[q, 0..32) = panel P . x_q for the Q1 <= 16 tokens of x (rows of K bf16, K % 32 == 0), and with x2
   (not NULL) Y2[q, 0..32) = P . x2_q for its Q2 <= 16 tokens too: up to 32 tokens per visit. */
static void amx_panel32(const uint16_t* P, const uint16_t* x, const uint16_t* x2, int64_t K, float* Y, float* Y2,
                        int64_t ldy) {
    _tile_zero(0); /* tile numbers are immediates */
    _tile_zero(1);
    if (x2) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t k = 0; k < K; k += 32) {
        const char* pf = (const char*)(P + k * 32) + MX_PACKED_PF; /* 32 k: 2 KB of the panel */
        for (int c = 0; c < 2048; c += 64) _mm_prefetch(pf + c, _MM_HINT_T0);
        _tile_loadd(4, x + k, K * 2);
        _tile_loadd(6, P + k * 32, 128);
        _tile_loadd(7, P + k * 32 + 32, 128);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (x2) {
            _tile_loadd(5, x2 + k, K * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, Y, ldy * 4);
    _tile_stored(1, Y + 16, ldy * 4);
    if (x2) {
        _tile_stored(2, Y2, ldy * 4);
        _tile_stored(3, Y2 + 16, ldy * 4);
    }
}

/* `gemm_packed` on the tile unit: the tokens in groups of 32 (two tiles of 16) that each panel meets
   in turn while it sits in L1/L2, then the rest (up to 31: one or two tiles, as even as can be) in a
   second pass over the panels. The tiles are configured for each pass and released on return:
   PyTorch's oneDNN kernels run on the same threads between steps with tile configurations of their
   own. */
static void gemm_packed_amx(mat m, const uint16_t* XB, int64_t M, float* Y, int64_t ldy, int64_t a, int64_t b) {
    const int64_t K = m.K, full = M / 32 * 32, rest = M - full;
    if (full) {
        amx_config(16, 16);
        for (int64_t r = a; r < b; r += 32)
            for (int64_t j = 0; j < full; j += 32)
                amx_panel32(m.packed + r * K, XB + j * K, XB + (j + 16) * K, K, Y + j * ldy + r,
                            Y + (j + 16) * ldy + r, ldy);
    }
    if (rest) {
        const int Q1 = rest > 16 ? (int)(rest + 1) / 2 : (int)rest, Q2 = (int)rest - Q1;
        const uint16_t* X = XB + full * K;
        float* Yr = Y + full * ldy;
        amx_config(Q1, Q2);
        for (int64_t r = a; r < b; r += 32)
            amx_panel32(m.packed + r * K, X, Q2 ? X + Q1 * K : NULL, K, Yr + r, Q2 ? Yr + Q1 * ldy + r : NULL, ldy);
    }
    _tile_release();
}
#endif

/* Rows [a, b) (multiples of 32) of a matrix kept in panels against M bf16 tokens XB: each panel
   against the tokens in ceil(M / MX_BIG_Q) chunks as even as can be (16 tokens as 8 + 8, not
   12 + 4), every chunk through the streaming kernels above (the later ones find the panel in L1/L2;
   the last brings in the next panel).
   C harness against 12-token chunks with `panel32x*`'s prefetch of the next panel into L2 (2 threads,
   medians of 7): the 32000 x 1024 output matrix at 13, 16, 20, 24 tokens 0.69x, 0.72x, 0.77x,
   0.75x the time (612-837 GFLOP/s); 7168 x 1024 and 1024 x 3584 at 36-128 tokens 0.93-1.02x. */
static void gemm_packed(mat m, const uint16_t* XB, int64_t M, float* Y, int64_t ldy, int64_t a, int64_t b) {
#if defined(MX_AMX)
    if (amx_on) {
        gemm_packed_amx(m, XB, M, Y, ldy, a, b);
        return;
    }
#endif
    const int64_t K = m.K, nc = (M + MX_BIG_Q - 1) / MX_BIG_Q;
    for (int64_t r = a; r < b; r += 32)
        for (int64_t c = 0, j = 0; c < nc; c++) {
            const int64_t Q = (M - j) / (nc - c);
            const char* next = nc > 1 && c == nc - 1 && r + 32 < b ? (const char*)(m.packed + (r + 32) * K) : 0;
            PACKED32[Q](m.packed + r * K, XB + j * K, K, Y + j * ldy + r, ldy, next);
            j += Q;
        }
}

/* 32 int8 rows (K each, float32 scales per row) as bf16: code x scale, rounded. */
static void dequant32_i8_bf16(const int8_t* w, const float* s, int64_t K, uint16_t* out) {
    for (int i = 0; i < 32; i++) {
        const __m512 d = _mm512_set1_ps(s[i]);
        for (int64_t k = 0; k < K; k += 16)
            _mm256_storeu_si256((__m256i*)(out + i * K + k), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(MX_I8F(w + i * K + k), d)));
    }
}

/* Rows [r0, r1) of matrix m (bf16; int8 where `act16`) against M tokens, 32 rows at a time: returns
   the first row not done (the last < 32 rows, or all of them when no buffer could be had). int8
   panels are dequantised to bf16 (rounded) and multiplied by the activations rounded to bf16 (X: the
   products a bf16 model's prompt gets). int4 rows with int8 activations have panels of their own,
   exact (`gemm_panels_a8`). */
__attribute__((noinline)) static int64_t gemm_panels(mat m, const float* X, const uint16_t* XB, int64_t M, float* Y,
                                                     int64_t ldy, int64_t r0, int64_t r1) {
    const int64_t K = m.K, q8 = m.wt == MX_I8, row_bytes = q8 ? K : 2 * K;
    uint16_t* P = thread_buf(0, 32 * K);
    uint16_t* W = q8 ? thread_buf(1, 32 * K) : 0;
    if (q8) {
        uint16_t* xb = thread_buf(2, M * K);
        if (xb) round_to_bf16(X, xb, M * K);
        XB = xb;
    }
    if (!P || (q8 && (!W || !XB))) return r0;
    int64_t r = r0;
    for (; r + 32 <= r1; r += 32) {
        if (q8) {
            dequant32_i8_bf16((const int8_t*)m.w + r * K, m.scale + r, K, W);
            pack32_bf16(W, K, P);
        } else {
            pack32_bf16((const uint16_t*)m.w + r * K, K, P);
        }
        /* the next panel's rows (32 x row_bytes) prefetched into L2 over this one's tiles */
        const int64_t lines = 32 * row_bytes / 64, nt = (M + MX_BIG_Q - 1) / MX_BIG_Q, per = (lines + nt - 1) / nt;
        const char* next = (const char*)m.w + (r + 32) * row_bytes;
        for (int64_t j = 0, t = 0; j < M; j += MX_BIG_Q, t++) {
            const int Q = M - j < MX_BIG_Q ? (int)(M - j) : MX_BIG_Q;
            const int64_t n = r + 64 <= r1 ? (per < lines - t * per ? per : lines - t * per) : 0;
            PANEL32[Q](P, XB + j * K, K, Y + j * ldy + r, ldy, next + 64 * t * per, n > 0 ? n : 0);
        }
    }
    return r;
}
#endif

#if defined(__AVX512BF16__)
/* int8 rows against Q = 1..8 bf16 activation vectors (a bf16 model's engine step, `mat.act16`): 32
   weights converted to bf16 in registers (exact: |code| <= 127) and multiplied by each vector with
   `vdpbf16ps`, where the float32 loop converts and multiplies 16 at a time against float32
   activations (4 loads per 16 weights at 4 tokens). out[q] = w . x_q (unscaled). */
#define MX_ROWI8(Q)                                                                                            \
    static void rowi8x##Q##_bf16(const int8_t* w, const uint16_t* x, int64_t K, float* out) {                 \
        __m512 a[Q];                                                                                           \
        for (int q = 0; q < Q; q++) a[q] = _mm512_setzero_ps();                                                \
        for (int64_t k = 0; k < K; k += 32) {                                                                  \
            _mm_prefetch((const char*)(w + k) + MX_ROWS_PF, _MM_HINT_T0);                                      \
            const __m256i b = _mm256_loadu_si256((const __m256i*)(const void*)(w + k));                        \
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));             \
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));        \
            const __m512bh wv = _mm512_cvtne2ps_pbh(hi, lo);                                                   \
            for (int q = 0; q < Q; q++) a[q] = _mm512_dpbf16_ps(a[q], wv, MX_BF(x + q * K + k));             \
        }                                                                                                      \
        for (int q = 0; q < Q; q++) out[q] = hsum(a[q]);                                                       \
    }
MX_ROWI8(1)
MX_ROWI8(2)
MX_ROWI8(3)
MX_ROWI8(4)
MX_ROWI8(5)
MX_ROWI8(6)
MX_ROWI8(7)
MX_ROWI8(8)
typedef void (*rowi8_fn)(const int8_t*, const uint16_t*, int64_t, float*);
static const rowi8_fn ROWI8[9] = {0, rowi8x1_bf16, rowi8x2_bf16, rowi8x3_bf16, rowi8x4_bf16,
                                  rowi8x5_bf16, rowi8x6_bf16, rowi8x7_bf16, rowi8x8_bf16};

/* Rows [r0, r1) of int8 matrix m (K % 32 == 0) against M tokens, the activations rounded to bf16:
   returns r1, or r0 when no buffer could be had. */
__attribute__((noinline)) static int64_t gemm_rows_i8_bf16(mat m, const float* X, int64_t M, float* Y, int64_t ldy,
                                                           int64_t r0, int64_t r1) {
    const int64_t K = m.K;
    uint16_t* xb = thread_buf(2, M * K);
    if (!xb) return r0;
    round_to_bf16(X, xb, M * K);
    for (int64_t r = r0; r < r1; r++) {
        float out[8];
        for (int64_t j = 0; j < M; j += 8) {
            const int Q = M - j < 8 ? (int)(M - j) : 8;
            ROWI8[Q]((const int8_t*)m.w + r * K, xb + j * K, K, out);
            for (int q = 0; q < Q; q++) Y[(j + q) * ldy + r] = out[q] * m.scale[r];
        }
    }
    return r1;
}
#endif

/* Rows of bf16 matrix m from r0 on, in whole tiles of 4 rows x up to 4 tokens, against M tokens:
   blocks of MB tokens whose activations (MB rows of K bf16) stay in L2 while every weight row passes
   over them. Returns the first row left (fewer than 4 before r1: the caller's). Inlined into its
   callers (the loop around the tiles is where the compiler's choices cost, see `gemm_rows`). */
static inline __attribute__((always_inline)) int64_t tiles_bf16(mat m, const uint16_t* XB, int64_t M, float* Y,
                                                                int64_t ldy, int64_t r0, int64_t r1) {
    const int64_t K = m.K;
    int64_t MB = (256 * 1024 / (K * 2)) & ~(int64_t)3;
    MB = MB < 4 ? 4 : MB > 128 ? 128 : MB;
    const int64_t rend = r0 + ((r1 - r0) & ~(int64_t)3);
    for (int64_t jb = 0; jb < M; jb += MB) {
        const int64_t je = jb + MB < M ? jb + MB : M;
        for (int64_t r = r0; r < rend; r += 4)
            for (int64_t j = jb; j < je; j += 4) {
                const int Q = je - j < 4 ? (int)(je - j) : 4;
                float out[16];
#if defined(__AVX512BF16__)
                if (Q == 4 && (K & 31) == 0) {
                    tile4x4k32_bf16((const uint16_t*)m.w + r * K, XB + j * K, K, out);
                    for (int i = 0; i < 4; i++)
                        for (int q = 0; q < 4; q++) Y[(j + q) * ldy + r + i] = out[i * 4 + q];
                    continue;
                }
#endif
                tile4_bf16((const uint16_t*)m.w + r * K, XB + j * K, K, K, Q, out, 4);
                for (int i = 0; i < 4; i++)
                    for (int q = 0; q < Q; q++) Y[(j + q) * ldy + r + i] = out[i * 4 + q];
            }
    }
    return rend;
}

/* `gemm_rows` for what the packed panels do not take (all of it, but for many bf16 tokens). */
static void gemm_rows_few(mat m, const float* X, const uint16_t* XB, int64_t M, float* Y, int64_t ldy, int64_t r0,
                          int64_t r1) {
    const int64_t K = m.K;
    int64_t r = r0;
#if defined(__AVX512BF16__)
    if (m.wt == MX_BF16 && M >= 2 && M <= 5 && M * K <= MX_ROWS_X) {
        /* a few tokens (the experts of batched decoding): four rows at a time as one stream while
           M x K <= MX_ROWS_X (mini-moe: up to 5 tokens for gate/up, K = 1024, and 4 for down) */
        for (; r + 4 <= r1; r += 4) {
            float out[32];
            rows4_bf16((const uint16_t*)m.w + r * K, XB, K, K, (int)M, out, 8);
            for (int i = 0; i < 4; i++)
                for (int64_t q = 0; q < M; q++) Y[q * ldy + r + i] = out[i * 8 + q];
        }
    }
#endif
    if (m.wt == MX_BF16 && M >= 2 && r == r0) r = tiles_bf16(m, XB, M, Y, ldy, r0, r1);
    if (is_a8(m.wt)) {
        for (int64_t j0 = 0; j0 < M; j0 += MX_A8_ROWS) { /* activations rounded MX_A8_ROWS rows at a time */
            const int64_t Mj = M - j0 < MX_A8_ROWS ? M - j0 : MX_A8_ROWS;
            const a8vec* xa = a8_rows(m.wt, X + j0 * K, Mj, K);
            if (!xa) return; /* out of memory: cannot happen for sane K (a few KB per row) */
            gemm_rows_a8(m, xa, Mj, Y + j0 * ldy, ldy, r, r1, 0);
        }
        return;
    }
    if (is_q4(m.wt)) {
        const int64_t G = q4_group(m.wt);
        for (; r < r1; r++) {
            const uint8_t* wr = (const uint8_t*)m.w + r * (K / 2);
            const uint16_t* sr = (const uint16_t*)(const void*)m.scale + r * (K / G);
            float out[4];
            for (int64_t j = 0; j < M; j += 4) {
                const int Q = M - j < 4 ? (int)(M - j) : 4;
                dotq_q4(wr, sr, X + j * K, K, K, G, Q, out);
                for (int q = 0; q < Q; q++) Y[(j + q) * ldy + r] = out[q];
            }
        }
        return;
    }
    for (; r < r1; r++) {
        const float sc = m.wt == MX_I8 ? m.scale[r] : 1.f;
        int64_t j = 0;
        float out[4];
        for (; j + 4 <= M; j += 4) {
            if (m.wt == MX_BF16) dot4_bf16((const uint16_t*)m.w + r * K, XB + j * K, K, K, out);
            else if (m.wt == MX_I8) dot4_i8((const int8_t*)m.w + r * K, X + j * K, K, K, out);
            else dot4_f32((const float*)m.w + r * K, X + j * K, K, K, out);
            for (int q = 0; q < 4; q++) Y[(j + q) * ldy + r] = out[q] * sc;
        }
        for (; j < M; j++) {
            const float d = m.wt == MX_BF16 ? dot_bf16((const uint16_t*)m.w + r * K, XB + j * K, K)
                            : m.wt == MX_I8 ? dot_i8((const int8_t*)m.w + r * K, X + j * K, K)
                                            : dot_f32((const float*)m.w + r * K, X + j * K, K);
            Y[j * ldy + r] = d * sc;
        }
    }
}

/* One row against Q <= 4 vectors with the arithmetic of `tile4x*_bf16` (one accumulator per vector
   over K in steps of 32, `hsum16`, whose sum of a vector does not depend on its place among the 16),
   so a row outside a 4-row tile gets the same bits as inside one. */
static void tile1_bf16(const uint16_t* w, const uint16_t* x, int64_t ld, int64_t K, int Q, float* out) {
#if defined(__AVX512BF16__)
    __m512 v[16];
    for (int q = 0; q < 16; q++) v[q] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512bh wv = MX_BF(w + k);
        for (int q = 0; q < Q; q++) v[q] = _mm512_dpbf16_ps(v[q], wv, MX_BF(x + q * ld + k));
    }
    float sums[16];
    _mm512_storeu_ps(sums, hsum16(v));
    for (int q = 0; q < Q; q++) {
        float s = sums[q];
        for (int64_t kk = k; kk < K; kk++) s += bf16_to_f32(w[kk]) * bf16_to_f32(x[q * ld + kk]);
        out[q] = s;
    }
#else
    for (int q = 0; q < Q; q++) out[q] = dot_bf16(w, x + q * ld, K); /* as `tile4_bf16` without AVX512-BF16 */
#endif
}

/* `gemm_rows` with batch-invariant arithmetic (mx_batch.invariant): Y[j, r] is computed in the same
   order whatever M, j or the rows around r, so a token's numbers never depend on the other tokens
   of a step (the batch invariance of vLLM's mode and of Thinking Machines' "Defeating
   Nondeterminism in LLM Inference", 2025). bf16: `tiles_bf16` and `tile1_bf16` for the rows left
   over; float32: `dot4_f32`'s order for every token. Never the panels, `rows4` or the one-token products, whose orders differ. */
static void gemm_rows_inv(mat m, const float* X, const uint16_t* XB, int64_t M, float* Y, int64_t ldy, int64_t r0,
                          int64_t r1) {
    const int64_t K = m.K;
    if (m.wt == MX_F32) {
        for (int64_t r = r0; r < r1; r++) {
            const float* w = (const float*)m.w + r * K;
            for (int64_t j = 0; j < M; j++) { /* dot4_f32's arithmetic for one vector */
                int64_t k = 0;
                float s = 0.f;
#if defined(__AVX512F__)
                __m512 a = _mm512_setzero_ps();
                for (; k + 16 <= K; k += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(X + j * K + k), a);
                s = hsum(a);
#endif
                for (; k < K; k++) s += w[k] * X[j * K + k];
                Y[j * ldy + r] = s;
            }
        }
        return;
    }
    for (int64_t r = tiles_bf16(m, XB, M, Y, ldy, r0, r1); r < r1; r++) /* then the rows past the last tile */
        for (int64_t j = 0; j < M; j += 4) {
            const int Q = M - j < 4 ? (int)(M - j) : 4;
            float out[4];
            tile1_bf16((const uint16_t*)m.w + r * K, XB + j * K, K, K, Q, out);
            for (int q = 0; q < Q; q++) Y[(j + q) * ldy + r] = out[q];
        }
}

/* Y[j, r] = W[r, :] . X[j, :] for M vectors (rows of X and XB, leading dimension K; Y's is ldy) and
   rows r in [r0, r1). X is float32, XB its bf16 rounding (read for bf16 weights only). The panels'
   dispatch stays out of `gemm_rows_few`: inside it, the 4-token tiles ran 1.11-1.17x slower at 16
   tokens (the compiler's choices for the loop around them; measured). */
static void gemm_rows(mat m, const float* X, const uint16_t* XB, int64_t M, float* Y, int64_t ldy, int64_t r0,
                      int64_t r1) {
    if (m.inv && (m.wt == MX_BF16 || m.wt == MX_F32)) {
        gemm_rows_inv(m, X, XB, M, Y, ldy, r0, r1);
        return;
    }
#if defined(MX_A8_SIMD)
    if (is_q4a8(m.wt) && M >= big_min_tokens(m.K)) r0 = gemm_panels_a8(m, X, M, Y, ldy, r0, r1); /* many tokens */
#endif
#if defined(__AVX512BF16__)
    if (m.packed && m.wt == MX_BF16 && (m.K & 31) == 0 && M >= 1) { /* kept in panels: whole panels from them */
        const int64_t a = (r0 + 31) & ~(int64_t)31, b = r1 & ~(int64_t)31;
        if (a < b) {
            mat rows = m;
            rows.packed = 0;
            gemm_rows(rows, X, XB, M, Y, ldy, r0, a);
            gemm_packed(m, XB, M, Y, ldy, a, b);
            gemm_rows(rows, X, XB, M, Y, ldy, b, r1);
            return;
        }
    }
    if ((m.wt == MX_BF16 || (m.wt == MX_I8 && m.act16)) && M >= big_min_tokens(m.K) && (m.K & 31) == 0) /* many tokens */
        r0 = gemm_panels(m, X, XB, M, Y, ldy, r0, r1);
    if (m.wt == MX_I8 && m.act16 && M >= 2 && (m.K & 31) == 0) /* a bf16 model's few tokens: int8 as bf16 */
        r0 = gemm_rows_i8_bf16(m, X, M, Y, ldy, r0, r1);
#endif
    gemm_rows_few(m, X, XB, M, Y, ldy, r0, r1);
}

/* y[r] for r in [r0, r1): one vector. */
static void gemv_rows(mat m, const float* x, const uint16_t* xb, float* y, int64_t r0, int64_t r1) {
    gemm_rows(m, x, xb, 1, y, 0, r0, r1);
}

/* Matrix `m` shifted by `rows` rows (an expert inside a stacked tensor). */
static mat mat_at(mat m, int64_t rows) {
    if (is_q4(m.wt)) {
        m.w = (const char*)m.w + rows * (m.K / 2);
        m.scale = (const float*)(const void*)((const uint16_t*)(const void*)m.scale + rows * (m.K / q4_group(m.wt)));
        return m;
    }
    m.w = (const char*)m.w + rows * m.K * elem_size(m.wt);
    if (m.scale) m.scale += rows;
    m.packed = m.packed && rows % 32 == 0 ? m.packed + rows * m.K : 0; /* panels start at multiples of 32 */
    return m;
}

/* The threads of one step: this thread's index t of nt, and a barrier they all share. */
typedef struct {
    _Atomic int count, phase;
} barrier_t;

typedef struct {
    int t, nt;
    barrier_t* bar;
} team;

/* Wait until every thread of the team arrives. Spinning, not sleeping: a step has ~4 barriers per
   layer, each a few microseconds apart, and waking a sleeping thread costs tens of microseconds
   (OMP_WAIT_POLICY=PASSIVE makes OpenMP's own barriers sleep). After 2^MX_SPIN_LOG2 pauses (longer
   than the gap between two barriers on an idle CPU) it yields at every turn: on an oversubscribed
   CPU the thread it waits for may be descheduled, and spinning would only burn the time slice that
   thread needs (benchmarks/barrier_spin.py, BENCHMARKS.md). */
#ifndef MX_SPIN_LOG2
#define MX_SPIN_LOG2 10
#endif
static void sync_team(team* tm) {
    if (tm->nt == 1) return;
    barrier_t* b = tm->bar;
    const int phase = atomic_load_explicit(&b->phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == tm->nt - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_store_explicit(&b->phase, phase + 1, memory_order_release);
        return;
    }
    for (long spins = 0; atomic_load_explicit(&b->phase, memory_order_acquire) == phase; spins++) {
#if defined(__x86_64__) || defined(__i386__)
        _mm_pause();
#endif
        if (spins > (1L << MX_SPIN_LOG2)) sched_yield();
    }
}

/* This thread's share [lo, hi) of n rows, in blocks of 16 rows (whole cache lines of y). */
static void my_rows(const team* tm, int64_t n, int64_t* lo, int64_t* hi) {
    int64_t per = ((n + tm->nt - 1) / tm->nt + 15) & ~(int64_t)15;
    *lo = tm->t * per < n ? tm->t * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

/* The greedy token, taken where the logits are written: each thread finds the largest of the
   logits it just wrote (still in its caches) and the caller combines the threads' answers, instead
   of Python reading all V of them again once the step's weights have streamed through the caches
   (NumPy's argmax ~45 us per token then, against a ~2.2-3 ms int4 step; BENCHMARKS.md issue 16). */
typedef struct { float v; int64_t i; } top_t; /* i: first index of the largest v; -1 NaN; -2 empty */

static top_t top_of(const float* x, int64_t n) {
    if (n <= 0) return (top_t){0.f, -2};
    float best;
#if defined(__AVX512F__)
    __m512 mx = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, v);
    }
    best = _mm512_reduce_max_ps(mx);
    for (; i < n; i++) {
        if (x[i] != x[i]) nan = 1;
        best = x[i] > best ? x[i] : best;
    }
    if (nan) return (top_t){NAN, -1};
    const __m512 b = _mm512_set1_ps(best);
    for (i = 0; i + 16 <= n; i += 16) {
        const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), b, _CMP_EQ_OQ);
        if (eq) return (top_t){best, i + __builtin_ctz(eq)};
    }
    for (; i < n; i++)
        if (x[i] == best) return (top_t){best, i};
#else
    best = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        if (x[i] != x[i]) return (top_t){NAN, -1};
        if (x[i] > best) best = x[i];
    }
    for (int64_t i = 0; i < n; i++)
        if (x[i] == best) return (top_t){best, i};
#endif
    return (top_t){best, 0}; /* not reached: best is one of x */
}

/* The threads' answers for consecutive ranges (each index already absolute), in range order. */
static int64_t top_combine(const top_t* t, int n) {
    int64_t at = -2;
    float best = 0.f;
    for (int j = 0; j < n; j++) {
        const top_t u = t[j];
        if (u.i == -1) return -1;
        if (u.i >= 0 && (at < 0 || u.v > best)) at = u.i, best = u.v;
    }
    return at < 0 ? -1 : at;
}

/* ---------------------------------------------------------------------------------------------- */
/* Norm and router (vectorised: in the batch-1 step every thread computes them itself, see `priv`) */

/* h = x / rms(x) * w; `w` float32. Also writes the bf16 rounding of h when `hb` is given. */
static void rmsnorm(const float* x, const float* w, float eps, int64_t D, float* h, uint16_t* hb) {
    /* the sum of squares in float64 (exact squares): float32 sums moved logits past the tests'
       1e-4 against PyTorch's mean on some rows */
    int64_t i = 0;
    double ss = 0.0;
#if defined(__AVX512F__)
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    for (; i + 16 <= D; i += 16) {
        const __m512d v0 = _mm512_cvtps_pd(_mm256_loadu_ps(x + i)), v1 = _mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8));
        a0 = _mm512_fmadd_pd(v0, v0, a0);
        a1 = _mm512_fmadd_pd(v1, v1, a1);
    }
    ss = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
#endif
    for (; i < D; i++) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / D) + eps);
    i = 0;
#if defined(__AVX512F__)
    const __m512 rv = _mm512_set1_ps(r);
    for (; i + 16 <= D; i += 16)
        _mm512_storeu_ps(h + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), rv), _mm512_loadu_ps(w + i)));
#endif
    for (; i < D; i++) h[i] = x[i] * r * w[i];
    if (hb) round_to_bf16(h, hb, D);
}

/* Router: top K of E logits (largest first, lowest index on ties), softmax over the K chosen.
   `add` [E] or NULL: added to the logits first (a LoRA adapter's update of the router). */
static void route(const mx_model* m, const float* router, const float* h, const float* add, int32_t* chosen,
                  float* mix) {
    float logits[256];
    for (int64_t e = 0; e < m->E; e++) logits[e] = dot_f32(router + e * m->D, h, m->D) + (add ? add[e] : 0.f);
    for (int64_t k = 0; k < m->K; k++) {
        int64_t best = -1;
        for (int64_t e = 0; e < m->E; e++) {
            int taken = 0;
            for (int64_t j = 0; j < k; j++) taken |= chosen[j] == e;
            if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
        }
        chosen[k] = (int32_t)best;
        mix[k] = logits[best];
    }
    const float top = mix[0];
    float sum = 0.f;
    for (int64_t k = 0; k < m->K; k++) sum += (mix[k] = expf(mix[k] - top));
    for (int64_t k = 0; k < m->K; k++) mix[k] /= sum;
}

/* ---------------------------------------------------------------------------------------------- */
/* Attention                                                                                       */

/* dot(q, row) and y += p * row over Hd elements of a cache row of type ct. */
#if defined(__AVX512F__)
/* Elements i..i+15 of a cache row of type ct, as float32. */
static inline __m512 load16_row(const void* row, int ct, int64_t i) {
    return ct == MX_F32 ? _mm512_loadu_ps((const float*)row + i)
                        : _mm512_castsi512_ps(_mm512_slli_epi32(
                              _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)row + i))), 16));
}

#endif

static inline float dot_row(const float* q, const void* row, int ct, int64_t Hd) {
    int64_t i = 0;
    float s = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= Hd; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16_row(row, ct, i), acc);
    s = hsum(acc);
#endif
    for (; i < Hd; i++) s += q[i] * load_elem(row, ct, i);
    return s;
}

static inline void axpy_row(float* y, float p, const void* row, int ct, int64_t Hd) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 pv = _mm512_set1_ps(p);
    for (; i + 16 <= Hd; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(pv, load16_row(row, ct, i), _mm512_loadu_ps(y + i)));
#endif
    for (; i < Hd; i++) y[i] += p * load_elem(row, ct, i);
}

/* Rotary embedding ("rotate half" layout: element i pairs with i + Hd/2) of one head, in place. */
static void rope(float* v, const float* cos_, const float* sin_, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos_[i] - b * sin_[i];
        v[i + half] = b * cos_[i] + a * sin_[i];
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* The model as the Python side describes it: mx_layer, mx_model, mx_bufs in mixlab.h.            */

#if defined(__AVX512F__)
/* y = sum_s p[s] * v_s over n rows (the first NC x 16 elements of each, from element i0), the NC
   accumulators in registers for the whole pass. */
#define MX_PV(NC)                                                                                               \
    static void pv##NC(float* y, const float* p, const char* vbase, int ct, int64_t Hd, int64_t es, int64_t n,   \
                       int64_t i0) {                                                                            \
        __m512 acc[NC];                                                                                         \
        for (int c = 0; c < NC; c++) acc[c] = _mm512_setzero_ps();                                              \
        for (int64_t s = 0; s < n; s++) {                                                                       \
            if (p[s] == 0.f) continue;                                                                          \
            const __m512 ps = _mm512_set1_ps(p[s]);                                                             \
            const char* row = vbase + s * Hd * es;                                                              \
            for (int c = 0; c < NC; c++) acc[c] = _mm512_fmadd_ps(ps, load16_row(row, ct, i0 + 16 * c), acc[c]); \
        }                                                                                                       \
        for (int c = 0; c < NC; c++) _mm512_storeu_ps(y + i0 + 16 * c, acc[c]);                                  \
    }
MX_PV(1)
MX_PV(2)
MX_PV(4)
MX_PV(8)
#endif

/* sc[s] (scaled scores of n cache rows) -> softmax over the rows whose position cpos[s] is visible
   from `pos` (causal, within the sliding window); hidden rows get exactly 0. */
static void attn_softmax(const mx_model* m, float* sc, const int64_t* cpos, int64_t n, int64_t pos) {
    float mx = -INFINITY, sum = 0.f;
    int64_t s = 0;
#if defined(__AVX512F__)
    { /* 16 rows at a time: the visibility mask from two 8-lane position compares, then the max (a
         NaN score is skipped, as by the scalar compare below: vmaxps returns its second operand) */
        const __m512i pv = _mm512_set1_epi64(pos), wv = _mm512_set1_epi64(m->window), zero = _mm512_setzero_si512();
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (; s + 16 <= n; s += 16) {
            __mmask8 vis[2];
            for (int h = 0; h < 2; h++) {
                const __m512i c = _mm512_loadu_si512(cpos + s + 8 * h);
                vis[h] = _mm512_cmpge_epi64_mask(c, zero) & _mm512_cmple_epi64_mask(c, pv);
                if (m->window > 0) vis[h] &= _mm512_cmplt_epi64_mask(_mm512_sub_epi64(pv, c), wv);
            }
            const __m512 x = _mm512_mask_blend_ps((__mmask16)(vis[0] | (vis[1] << 8)), _mm512_set1_ps(-INFINITY),
                                                  _mm512_loadu_ps(sc + s));
            _mm512_storeu_ps(sc + s, x);
            mv = _mm512_max_ps(x, mv);
        }
        mx = _mm512_reduce_max_ps(mv);
    }
#endif
    for (; s < n; s++) {
        const int64_t p = cpos[s];
        const int visible = p >= 0 && p <= pos && (m->window <= 0 || pos - p < m->window);
        if (!visible) sc[s] = -INFINITY;
        if (sc[s] > mx) mx = sc[s];
    }
    s = 0;
#if defined(__AVX512F__)
    {
        const __m512 mv = _mm512_set1_ps(mx);
        __m512 sv = _mm512_setzero_ps();
        for (; s + 16 <= n; s += 16) { /* exp(-inf) = 0: hidden rows drop out */
            const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + s), mv));
            _mm512_storeu_ps(sc + s, e);
            sv = _mm512_add_ps(sv, e);
        }
        sum = hsum(sv);
    }
#endif
    for (; s < n; s++) sum += (sc[s] = sc[s] == -INFINITY ? 0.f : expf(sc[s] - mx));
    s = 0;
#if defined(__AVX512F__)
    { /* correctly rounded division, as the scalar one: the same floats */
        const __m512 sv = _mm512_set1_ps(sum);
        for (; s + 16 <= n; s += 16) _mm512_storeu_ps(sc + s, _mm512_div_ps(_mm512_loadu_ps(sc + s), sv));
    }
#endif
    for (; s < n; s++) sc[s] /= sum;
}

/* One query head at position `pos` against the first n cache rows of its kv head (kbase, vbase:
   [C, Hd] of type ct; cpos [C]: the position each row holds, -1 empty): y = softmax(q k^T * scale) v
   over the rows whose position is visible (causal, within the sliding window). sc: [n] scratch.
   With AVX-512 and Hd a multiple of 16: scores 16 rows at a time (one transposed reduction for the
   16 dot products), the exponentials 16 at a time, and the weighted sum of values with the output
   in registers (8 vectors = 128 elements per pass over the rows). */
static void attend(const mx_model* m, const float* q, const char* kbase, const char* vbase, const int64_t* cpos,
                   int64_t n, int64_t pos, float scale, float* sc, float* y) {
    const int64_t Hd = m->Hd, es = elem_size(m->ct);
    const int ct = m->ct;
    int64_t s = 0;
#if defined(__AVX512F__)
    const int vec = Hd % 16 == 0;
    if (vec)
        for (; s + 16 <= n; s += 16) {
            __m512 acc[16];
            for (int j = 0; j < 16; j++) {
                const char* row = kbase + (s + j) * Hd * es;
                __m512 a = _mm512_setzero_ps();
                for (int64_t i = 0; i < Hd; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16_row(row, ct, i), a);
                acc[j] = a;
            }
            _mm512_storeu_ps(sc + s, _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(scale)));
        }
#endif
    for (; s < n; s++) sc[s] = dot_row(q, kbase + s * Hd * es, ct, Hd) * scale;
    attn_softmax(m, sc, cpos, n, pos);
#if defined(__AVX512F__)
    if (vec) {
        for (int64_t i0 = 0; i0 < Hd;) {
            const int64_t left = (Hd - i0) / 16;
            const int nc = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            switch (nc) {
            case 8: pv8(y, sc, vbase, ct, Hd, es, n, i0); break;
            case 4: pv4(y, sc, vbase, ct, Hd, es, n, i0); break;
            case 2: pv2(y, sc, vbase, ct, Hd, es, n, i0); break;
            default: pv1(y, sc, vbase, ct, Hd, es, n, i0); break;
            }
            i0 += 16 * nc;
        }
        return;
    }
#endif
    for (int64_t i = 0; i < Hd; i++) y[i] = 0.f;
    for (s = 0; s < n; s++)
        if (sc[s] != 0.f) axpy_row(y, sc[s], vbase + s * Hd * es, ct, Hd);
}

#if defined(__AVX512F__)
/* attend4 reads the keys and the values this many cache rows ahead (prefetch; 2-4 KB). With the
   engine's cache on 2 MiB pages, a thread then streams a kv head's rows at ~21 GB/s instead of ~17
   (Hd 64, bf16, 4,096 rows from memory, one thread: 12.0 against 14.9 ns per row); on 4 KiB pages
   it does not help (the page walks bound the stream at ~17 GB/s a thread either way). */
#define ATT_AHEAD 16

/* attend4's weighted sum of values for nc (1-4) vectors of 16 elements from element i0: y_r[i0 ..] =
   sum_s p_r[s] v_s for the four heads, the 4 x nc accumulators in registers. Every row's FMAs run,
   also for a weight of 0 (a hidden row adds +-0): branches per head and vector made this pass twice
   as slow (8.2 against 4.3 ns per row, Hd 64, in L2; the same floats otherwise). nc is a constant
   at each call, so the loops unroll. */
static inline __attribute__((always_inline)) void pv4_cols(float* y, const float* sc, int64_t ldsc, const char* vbase,
                                                           int ct, int64_t Hd, int64_t es, int64_t n, int64_t i0,
                                                           const int nc) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < nc; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s++) {
        const char* row = vbase + s * Hd * es;
        for (int64_t b = 0; b < 16 * nc * es; b += 64) _mm_prefetch(row + ATT_AHEAD * Hd * es + i0 * es + b, _MM_HINT_T0);
        __m512 p[4];
        for (int r = 0; r < 4; r++) p[r] = _mm512_set1_ps(sc[r * ldsc + s]);
        for (int c = 0; c < nc; c++) {
            const __m512 v = load16_row(row, ct, i0 + 16 * c);
            for (int r = 0; r < 4; r++) acc[r][c] = _mm512_fmadd_ps(p[r], v, acc[r][c]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(y + r * Hd + i0 + 16 * c, acc[r][c]);
}

/* `attend` for the four query heads (q: 4 x Hd, contiguous) of one kv head at once (Hd a multiple of
   16): each cache row is loaded, and converted from bf16, once for the four heads instead of once
   per head. Each head's arithmetic is `attend`'s, in the same order (the same floats: logits
   bit-identical on mini-moe bf16 / int4 and on Hd = 48, 80 with float32 caches). mini-moe int4
   step: +2-4% (interleaved A/B). sc: 4 rows of scratch, leading dimension ldsc; y: 4 x Hd. */
static void attend4(const mx_model* m, const float* q, const char* kbase, const char* vbase, const int64_t* cpos,
                    int64_t n, int64_t pos, float scale, float* sc, int64_t ldsc, float* y) {
    const int64_t Hd = m->Hd, es = elem_size(m->ct);
    const int ct = m->ct;
    int64_t s = 0;
    for (; s + 16 <= n; s += 16) {
        __m512 acc[4][16];
        for (int j = 0; j < 16; j++) {
            const char* row = kbase + (s + j) * Hd * es;
            for (int64_t b = 0; b < Hd * es; b += 64) _mm_prefetch(row + ATT_AHEAD * Hd * es + b, _MM_HINT_T0);
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
            for (int64_t i = 0; i < Hd; i += 16) {
                const __m512 k = load16_row(row, ct, i);
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), k, a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + Hd + i), k, a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q + 2 * Hd + i), k, a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q + 3 * Hd + i), k, a3);
            }
            acc[0][j] = a0, acc[1][j] = a1, acc[2][j] = a2, acc[3][j] = a3;
        }
        for (int r = 0; r < 4; r++) _mm512_storeu_ps(sc + r * ldsc + s, _mm512_mul_ps(hsum16(acc[r]), _mm512_set1_ps(scale)));
    }
    for (; s < n; s++)
        for (int r = 0; r < 4; r++) sc[r * ldsc + s] = dot_row(q + r * Hd, kbase + s * Hd * es, ct, Hd) * scale;
    for (int r = 0; r < 4; r++) attn_softmax(m, sc + r * ldsc, cpos, n, pos);
    /* y_r = sum_s p_r[s] v_s, 64 elements (4 vectors x 4 heads in registers) per pass over the rows */
    for (int64_t i0 = 0; i0 < Hd; i0 += 64) switch (Hd - i0 >= 64 ? 4 : (int)((Hd - i0) / 16)) {
        case 4: pv4_cols(y, sc, ldsc, vbase, ct, Hd, es, n, i0, 4); break;
        case 3: pv4_cols(y, sc, ldsc, vbase, ct, Hd, es, n, i0, 3); break;
        case 2: pv4_cols(y, sc, ldsc, vbase, ct, Hd, es, n, i0, 2); break;
        default: pv4_cols(y, sc, ldsc, vbase, ct, Hd, es, n, i0, 1); break;
        }
}
#endif

/* What one thread of the batch-1 step keeps to itself: its own copy of each activation vector that
   every thread multiplies (norm outputs; their int8 roundings for MX_Q4_*_A8 weights) and of the
   router's choice. Every thread computes the norm, the router and the roundings itself (about a
   microsecond each, vectorised) instead of one thread computing them while the others wait at two
   extra barriers: a layer then has 4 barriers instead of 7 and no serial section (BENCHMARKS.md,
   issue 16). */
typedef struct {
    float *h, *hr;   /* [D]: norm output; router input (h, bf16-rounded for bf16 weights) */
    uint16_t* hb;    /* [D]: bf16 rounding of h */
    int32_t* chosen; /* [K] */
    float* mix;      /* [K] */
    a8vec ha, atta;  /* int8 roundings of h [D] and of the attention output [H Hd] */
    a8vec* aa;       /* [K]: of each chosen expert's SwiGLU output [F] */
} priv;

static inline size_t al64(size_t n) { return (n + 63) & ~(size_t)63; }
static inline size_t a8_bytes(int64_t K) { return (size_t)a8_kp(K) * 3; } /* `a8_make` */

static size_t priv_bytes(const mx_model* m) {
    const int64_t D = m->D, K = m->K;
    return al64(2 * D * 4) + al64(D * 2) + al64(K * 4) * 2 + al64(K * sizeof(a8vec)) + al64(a8_bytes(D))
           + al64(a8_bytes(m->H * m->Hd)) + K * al64(a8_bytes(m->F));
}

static priv priv_at(char* at, const mx_model* m) { /* `at` 64-byte aligned, priv_bytes(m) long */
    const int64_t D = m->D, K = m->K;
    priv p;
    p.h = (float*)(void*)at, p.hr = p.h + D, at += al64(2 * D * 4);
    p.hb = (uint16_t*)(void*)at, at += al64(D * 2);
    p.chosen = (int32_t*)(void*)at, at += al64(K * 4);
    p.mix = (float*)(void*)at, at += al64(K * 4);
    p.aa = (a8vec*)(void*)at, at += al64(K * sizeof(a8vec));
    p.ha = a8_make(at, D), at += al64(a8_bytes(D));
    p.atta = a8_make(at, m->H * m->Hd), at += al64(a8_bytes(m->H * m->Hd));
    for (int64_t k = 0; k < K; k++) p.aa[k] = a8_make(at, m->F), at += al64(a8_bytes(m->F));
    return p;
}

/* An activation vector in the forms the weight types read: float32, its bf16 rounding (bf16
   weights), its int8 rounding (MX_Q4_*_A8 weights). */
typedef struct {
    const float* x;
    const uint16_t* xb;
    const a8vec* xa;
} act;

/* y[r] = W[r, :] . a for rows r in [r0, r1); `then`: the range this thread multiplies next (int4
   prefetches its first rows; may be null). */
static void act_rows(mat m, act a, float* y, int64_t r0, int64_t r1, const seg* then) {
    if (is_a8(m.wt)) gemm_rows_a8(m, a.xa, 1, y, 0, r0, r1, then);
    else gemv_rows(m, a.x, a.xb, y, r0, r1);
}

/* Rotate and store kv head g's key and value into slot `slot`, then attend with its R query heads
   (query head hh reads kv head hh / R), so no thread reads a cache row another one writes. */
static void attn_head(const mx_model* m, const mx_layer* ly, const mx_bufs* b, int64_t g, int64_t pos,
                      const int64_t* cache_pos, int64_t C, int64_t slot, int64_t n, const float* cos_,
                      const float* sin_) {
    const int64_t Hd = m->Hd, G = m->G, QD = m->H * Hd, R = m->H / G, half = Hd / 2, es = elem_size(m->ct);
    const float scale = 1.0f / sqrtf((float)Hd);
    float* k = b->qkv + QD + g * Hd;
    const float* v = b->qkv + QD + G * Hd + g * Hd;
    char* kbase = (char*)ly->k_cache + g * C * Hd * es;
    char* vbase = (char*)ly->v_cache + g * C * Hd * es;
    rope(k, cos_, sin_, half);
    for (int64_t i = 0; i < Hd; i++) {
        store_elem(kbase, m->ct, slot * Hd + i, k[i]);
        store_elem(vbase, m->ct, slot * Hd + i, v[i]);
    }
#if defined(__AVX512F__)
    if (R == 4 && Hd % 16 == 0) { /* the four query heads at once (Mixtral's and mini-moe's grouping) */
        for (int64_t hh = g * R; hh < (g + 1) * R; hh++) rope(b->qkv + hh * Hd, cos_, sin_, half);
        attend4(m, b->qkv + g * R * Hd, kbase, vbase, cache_pos, n, pos, scale, b->scores + g * R * C, C,
                b->att + g * R * Hd);
        if (m->wt == MX_BF16) round_to_bf16(b->att + g * R * Hd, b->attb + g * R * Hd, R * Hd);
        return;
    }
#endif
    for (int64_t hh = g * R; hh < (g + 1) * R; hh++) {
        float* q = b->qkv + hh * Hd;
        rope(q, cos_, sin_, half);
        attend(m, q, kbase, vbase, cache_pos, n, pos, scale, b->scores + hh * C, b->att + hh * Hd);
        if (m->wt == MX_BF16) round_to_bf16(b->att + hh * Hd, b->attb + hh * Hd, Hd);
    }
}

/* x += wo @ attention(rope(wqkv @ norm(x))), writing this token's k, v into slot `slot`. When the
   threads divide the kv heads evenly, each computes the q, k and v rows of its own kv heads and
   attends with them at once (no barrier between the product and attention). Ends with a barrier. */
static void attn_block(team* tm, const priv* p, const mx_model* m, const mx_layer* ly, const mx_bufs* b,
                       int64_t pos, const int64_t* cache_pos, int64_t C, int64_t slot, int64_t n,
                       const float* cos_, const float* sin_) {
    const int bf = m->wt == MX_BF16, a8 = is_a8(m->wt);
    const int64_t D = m->D, Hd = m->Hd, G = m->G, QD = m->H * Hd, R = m->H / G;
    const mat mqkv = {m->wt, ly->wqkv, ly->wqkv_scale, D}, mo = {m->wt, ly->wo, ly->wo_scale, QD};
    int64_t lo, hi;
    rmsnorm(b->x, ly->attn_norm, m->eps, D, p->h, bf ? p->hb : 0);
    if (a8) quant_act8(m->wt, p->h, D, p->ha);
    const act h = {p->h, p->hb, &p->ha};
    my_rows(tm, D, &lo, &hi); /* this thread's rows of wo */
    const seg so = {mo, lo};
    if (G % tm->nt == 0) {
        for (int64_t g = tm->t; g < G; g += tm->nt) {
            const seg sk = {mqkv, QD + g * Hd}, sv = {mqkv, QD + G * Hd + g * Hd}, sq = {mqkv, (g + tm->nt) * R * Hd};
            act_rows(mqkv, h, b->qkv, g * R * Hd, (g + 1) * R * Hd, &sk);
            act_rows(mqkv, h, b->qkv, QD + g * Hd, QD + (g + 1) * Hd, &sv);
            act_rows(mqkv, h, b->qkv, QD + G * Hd + g * Hd, QD + G * Hd + (g + 1) * Hd, g + tm->nt < G ? &sq : &so);
            attn_head(m, ly, b, g, pos, cache_pos, C, slot, n, cos_, sin_);
        }
    } else {
        int64_t qlo, qhi;
        my_rows(tm, QD + 2 * G * Hd, &qlo, &qhi);
        act_rows(mqkv, h, b->qkv, qlo, qhi, &so);
        sync_team(tm);
        for (int64_t g = tm->t; g < G; g += tm->nt) attn_head(m, ly, b, g, pos, cache_pos, C, slot, n, cos_, sin_);
    }
    sync_team(tm);
    if (a8) quant_act8(m->wt, b->att, QD, p->atta);
    const act att = {b->att, b->attb, &p->atta};
    act_rows(mo, att, b->o, lo, hi, 0); /* what follows depends on the router */
    for (int64_t i = lo; i < hi; i++) b->x[i] += b->o[i];
    sync_team(tm);
}

/* x += sum_k mix_k * w2[e_k] @ (silu(w1[e_k] @ h) * (w3[e_k] @ h)), h = norm(x). Dense: E = K = 1.
   `chosen`, `mix`: where the router's choice is reported (written by thread 0); `then`: the rows
   this thread multiplies after the block (`seg`). Ends with a barrier. */
static void ffn_block(team* tm, const priv* p, const mx_model* m, const mx_layer* ly, const mx_bufs* b,
                      int32_t* chosen, float* mix, const seg* then) {
    const int bf = m->wt == MX_BF16, a8 = is_a8(m->wt);
    const int64_t D = m->D, F = m->F, K = m->K;
    const mat m13 = {m->wt, ly->w13, ly->w13_scale, D}, m2 = {m->wt, ly->w2, ly->w2_scale, F};
    int64_t lo, hi;
    rmsnorm(b->x, ly->ffn_norm, m->eps, D, p->h, bf ? p->hb : 0);
    if (ly->router) {
        /* Route on the activations the experts see (bf16-rounded for bf16 weights, as in torch). */
        const float* hr = p->h;
        if (bf) {
            for (int64_t i = 0; i < D; i++) p->hr[i] = bf16_to_f32(p->hb[i]);
            hr = p->hr;
        }
        route(m, ly->router, hr, 0, p->chosen, p->mix);
    } else {
        p->chosen[0] = 0;
        p->mix[0] = 1.f;
    }
    if (tm->t == 0)
        for (int64_t k = 0; k < K; k++) chosen[k] = p->chosen[k], mix[k] = p->mix[k];
    if (a8) quant_act8(m->wt, p->h, D, p->ha);
    const act h = {p->h, p->hb, &p->ha};
    /* Each thread computes gate rows [lo, hi) and the matching up rows [F + lo, F + hi) of every
       chosen expert, so it applies SiLU to its own rows without waiting for the others. */
    int64_t dlo, dhi; /* this thread's rows of the down projections */
    my_rows(tm, D, &dlo, &dhi);
    my_rows(tm, F, &lo, &hi);
    for (int64_t k = 0; k < K; k++) {
        const mat e13 = mat_at(m13, p->chosen[k] * 2 * F);
        float* gk = b->g + k * 2 * F;
        const seg up = {e13, F + lo}, gate = {mat_at(m13, p->chosen[k + 1 < K ? k + 1 : 0] * 2 * F), lo},
                  down = {mat_at(m2, p->chosen[0] * D), dlo};
        act_rows(e13, h, gk, lo, hi, &up);
        act_rows(e13, h, gk, F + lo, F + hi, k + 1 < K ? &gate : &down);
        swiglu_row(gk + lo, gk + F + lo, b->a + k * F + lo, bf ? b->ab + k * F + lo : 0, hi - lo);
    }
    sync_team(tm);
    /* Down projection: each thread owns rows [dlo, dhi) of every expert, then mixes them into x. */
    lo = dlo, hi = dhi;
    for (int64_t k = 0; k < K; k++) {
        if (a8) quant_act8(m->wt, b->a + k * F, F, p->aa[k]);
        const act ak = {b->a + k * F, bf ? b->ab + k * F : 0, &p->aa[k]};
        const seg down = {mat_at(m2, p->chosen[k + 1 < K ? k + 1 : 0] * D), lo};
        act_rows(mat_at(m2, p->chosen[k] * D), ak, b->y + k * D, lo, hi, k + 1 < K ? &down : then);
    }
    for (int64_t i = lo; i < hi; i++) {
        float s = 0.f;
        for (int64_t k = 0; k < K; k++) s += p->mix[k] * b->y[k * D + i];
        b->x[i] += s;
    }
    sync_team(tm);
}

/* ---------------------------------------------------------------------------------------------- */
/* Entry points                                                                                    */

/* One decoding step of one sequence: embed `token` at position `pos`, run every layer (writing the
   token's keys and values into cache slot `slot`, attending over the first n slots), and write the
   next-token logits [V]. `cache_pos` [C] holds each slot's position (-1 empty); slot gets `pos`. */
void mx_decode_step(const mx_model* m, const mx_bufs* b, int64_t token, int64_t pos, int64_t* cache_pos,
                    int64_t C, int64_t slot, int64_t n, float* logits, int nt) {
    /* every thread's `priv`, in the calling thread's buffer (kept for its lifetime; concurrent
       callers on other threads have their own) */
    static _Thread_local char* scratch = 0;
    static _Thread_local size_t cap = 0;
    const size_t per = al64(priv_bytes(m)), need = per * (size_t)(nt < 1 ? 1 : nt) + 64;
    if (need > cap) {
        free(scratch);
        scratch = (char*)malloc(need);
        cap = scratch ? need : 0;
        if (!scratch) { /* out of memory (a few hundred KB): no logits rather than wrong ones */
            for (int64_t i = 0; i < m->V; i++) logits[i] = NAN;
            if (b->top) *b->top = -1;
            return;
        }
    }
    char* base = (char*)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float cos_[512], sin_[512]; /* Hd / 2 <= 512, checked by the caller */
    for (int64_t i = 0; i < m->Hd / 2; i++) {
        const float ang = (float)pos * m->inv_freq[i]; /* a float32 product, as rope_cos_sin computes it */
        cos_[i] = cosf(ang);
        sin_[i] = sinf(ang);
    }
    for (int64_t i = 0; i < m->D; i++) b->x[i] = load_elem(m->embed, m->et, token * m->D + i);
    cache_pos[slot] = pos; /* before attention, which reads the token's own position from it */
    barrier_t bar = {0, 0};
    top_t tops[nt < 1 ? 1 : nt];
    int ran = 1;
#pragma omp parallel num_threads(nt)
    {
        team tm = {omp_get_thread_num(), omp_get_num_threads(), &bar};
        const priv p = priv_at(base + per * (size_t)tm.t, m);
        const mat mout = {m->wt, m->out, m->out_scale, m->D};
        int64_t lo, hi, qlo, qhi;
        my_rows(&tm, m->V, &lo, &hi);
        /* the first rows of wqkv this thread multiplies (attn_block): a range to prefetch */
        if (m->G % tm.nt == 0) qlo = tm.t < m->G ? tm.t * (m->H / m->G) * m->Hd : 0;
        else my_rows(&tm, (m->H + 2 * m->G) * m->Hd, &qlo, &qhi);
        for (int64_t l = 0; l < m->L; l++) {
            attn_block(&tm, &p, m, &m->layers[l], b, pos, cache_pos, C, slot, n, cos_, sin_);
            const mx_layer* nl = l + 1 < m->L ? &m->layers[l + 1] : 0;
            const seg then = nl ? (seg){{m->wt, nl->wqkv, nl->wqkv_scale, m->D}, qlo} : (seg){mout, lo};
            ffn_block(&tm, &p, m, &m->layers[l], b, b->chosen + l * m->K, b->mix + l * m->K, &then);
        }
        rmsnorm(b->x, m->out_norm, m->eps, m->D, p.h, m->wt == MX_BF16 ? p.hb : 0);
        if (is_a8(m->wt)) quant_act8(m->wt, p.h, m->D, p.ha);
        const act h = {p.h, p.hb, &p.ha};
        act_rows(mout, h, logits, lo, hi, 0);
        if (b->top) {
            tops[tm.t] = top_of(logits + lo, hi - lo);
            if (tops[tm.t].i >= 0) tops[tm.t].i += lo;
        }
        if (tm.t == 0) ran = tm.nt;
    }
    if (b->top) *b->top = top_combine(tops, ran);
}

/* Y [M, N] = X [M, K] @ W.T for a few rows (batched decoding): each weight row is read once for all
   M rows of X. XB: room for X rounded to bf16 (bf16 weights, int8 ones with `act16`). M = 1 is a
   matrix-vector product. */
static void linear_rows(mat m, int64_t N, int64_t M, const float* X, uint16_t* XB, float* Y, int nt) {
    if (m.wt == MX_BF16 || m.act16) round_to_bf16(X, XB, M * m.K);
    barrier_t bar = {0, 0};
#pragma omp parallel num_threads(nt)
    {
        team tm = {omp_get_thread_num(), omp_get_num_threads(), &bar};
        int64_t lo, hi;
        my_rows(&tm, N, &lo, &hi);
        gemm_rows(m, X, XB, M, Y, N, lo, hi);
    }
}

void mx_linear(int wt, const void* w, const float* w_scale, int64_t N, int64_t K, int64_t M, const float* X,
               uint16_t* XB, float* Y, int act16, int nt) {
    linear_rows((mat){wt, w, w_scale, K, act16 && wt == MX_I8}, N, M, X, XB, Y, nt);
}

void mx_pack_bf16(const void* w, int64_t N, int64_t K, void* P, int nt) {
#if defined(__AVX512BF16__)
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < N; r += 32) pack32_bf16((const uint16_t*)w + r * K, K, (uint16_t*)P + r * K);
#else
    (void)nt;
    for (int64_t r = 0; r < N; r += 32)
        for (int64_t k = 0; k < K; k++)
            for (int64_t i = 0; i < 32; i++)
                ((uint16_t*)P)[r * K + (k / 2) * 64 + 2 * i + (k & 1)] = ((const uint16_t*)w)[(r + i) * K + k];
#endif
}

void mx_linear_packed(const void* w, const void* P, int64_t N, int64_t K, int64_t M, const float* X, uint16_t* XB,
                      float* Y, int nt) {
    linear_rows((mat){MX_BF16, w, 0, K, 0, (const uint16_t*)P}, N, M, X, XB, Y, nt);
}

/* LoRA adapters (`mx_lora`, `mx_batch.lora`): after a product, each row under an adapter that updates
   the weight gets y += B (A x), u = A x computed from the product's input once all of it is there,
   then each thread adds B u to the output rows it computed. u is computed by the thread that wrote
   the row's input (qkv, router, w13: into the shared rows of `lora_u`), or, where threads wrote parts
   of it (wo after attention, w2 after the SwiGLU), by every thread for itself into its own rows of
   `lora_u`: a little more arithmetic (R x I per row and thread) instead of one more barrier, which
   costs most on a loaded machine. Consecutive rows under one adapter (a prompt chunk's; an expert's
   pairs of its tokens) go through both projections together, as small register-tiled products
   (`lora_down`, `lora_up`): a 512-token prompt's updates ran ~2x faster than row by row, which re-read
   A and B for every row (BENCHMARKS.md). What the engine's PyTorch pass adds (engine/runner.py
   `StepAdapters`). */

/* The updates of layer l's weight at `site` ([E, J]), or NULL when the step has no adapters. */
static const mx_lora* lora_site(const mx_model* m, const mx_batch* p, int64_t l, int site) {
    return p->J ? p->lora + (l * MX_LORA_SITES + site) * m->E * p->J : 0;
}

/* Adapter j's update of expert e's weight at `site` (0 for a dense weight), or NULL (j < 0: the base). */
static const mx_lora* lora_of(const mx_lora* site, int64_t J, int64_t e, int32_t j) {
    if (!site || j < 0) return 0;
    const mx_lora* z = site + e * J + j;
    return z->A ? z : 0;
}

/* The end of the run of rows [t, end) under row t's adapter (a prompt chunk's rows are consecutive),
   which `lora_down` and `lora_up` take together; *z: their update of the dense weight at `site`. */
static int64_t row_run(const mx_lora* site, int64_t J, const int32_t* adapter, int64_t t, int64_t end,
                       const mx_lora** z) {
    int64_t e = t + 1;
    *z = lora_of(site, J, 0, adapter[t]);
    while (e < end && lora_of(site, J, 0, adapter[e]) == *z) e++;
    return e;
}

/* U[j] = A X[j] (u = A x of each row) for Q <= 4 rows X [Q, I], float32, or (XB given) their bf16
   rounding, which the bf16 product read; U [Q, ldu]. Tiles of 4 rows of A by the Q rows, as
   `tile4x*_bf16` in float32: each loaded vector of A serves Q rows (a prompt's rows under one
   adapter), each row's vector four rows of A, and `hsum16` gives the tile's 16 sums at once. A row's
   u is the same whatever rows share its tile. */
static inline __attribute__((always_inline)) void lora_down_tile(const mx_lora* z, int64_t I, const float* X,
                                                                 const uint16_t* XB, int Q, float* U, int64_t ldu) {
    int64_t r = 0;
#if defined(__AVX512F__)
    for (; (I & 15) == 0 && r < z->R; r += 4) { /* past R, the last row again (its sums not stored) */
        const float* a[4];
        for (int i = 0; i < 4; i++) a[i] = z->A + (r + i < z->R ? r + i : z->R - 1) * I;
        __m512 acc[4][4];
        for (int i = 0; i < 4; i++)
            for (int q = 0; q < Q; q++) acc[i][q] = _mm512_setzero_ps();
        for (int64_t k = 0; k < I; k += 16) {
            __m512 xv[4];
            for (int q = 0; q < Q; q++)
                xv[q] = XB ? load16_row(XB + q * I, MX_BF16, k) : _mm512_loadu_ps(X + q * I + k);
            for (int i = 0; i < 4; i++) {
                __m512 av = _mm512_loadu_ps(a[i] + k);
                MX_IN_REG(av);
                for (int q = 0; q < Q; q++) acc[i][q] = _mm512_fmadd_ps(av, xv[q], acc[i][q]);
            }
        }
        __m512 v[16];
        for (int i = 0; i < 4; i++)
            for (int q = 0; q < 4; q++) v[i * 4 + q] = q < Q ? acc[i][q] : _mm512_setzero_ps();
        float sums[16];
        _mm512_storeu_ps(sums, hsum16(v));
        for (int i = 0; i < 4 && r + i < z->R; i++)
            for (int q = 0; q < Q; q++) U[q * ldu + r + i] = sums[i * 4 + q];
    }
#endif
    for (; r < z->R; r++) /* I not a multiple of 16 */
        for (int q = 0; q < Q; q++) {
            const float* a = z->A + r * I;
            float s = 0.f;
            for (int64_t i = 0; i < I; i++) s += a[i] * (XB ? bf16_to_f32(XB[q * I + i]) : X[q * I + i]);
            U[q * ldu + r] = s;
        }
}

/* `lora_down_tile` for n rows: four at a time, then those left one by one. */
static void lora_down(const mx_lora* z, int64_t I, const float* X, const uint16_t* XB, int64_t n, float* U,
                      int64_t ldu) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) lora_down_tile(z, I, X + j * I, XB ? XB + j * I : 0, 4, U + j * ldu, ldu);
    for (; j < n; j++) lora_down_tile(z, I, X + j * I, XB ? XB + j * I : 0, 1, U + j * ldu, ldu);
}

/* Y[j, i] += B[i] . U[j] for the output columns i in [r0, r1) of X and Q <= 4 rows (U [Q, ldu], Y [Q, ldy]),
   B held transposed ([R, X]): 16 outputs' sums in one vector, no horizontal sum per output. Tiles of
   Q <= 4 rows by 64 outputs (16 independent sums): each loaded vector of B serves Q rows. A row's sums
   are the same whatever rows share its tile. */
static inline __attribute__((always_inline)) void lora_up_tile(const mx_lora* z, int64_t X, const float* U,
                                                               int64_t ldu, int Q, float* Y, int64_t ldy,
                                                               int64_t r0, int64_t r1) {
    int64_t i = r0;
#if defined(__AVX512F__)
    for (; i + 64 <= r1; i += 64) {
        __m512 acc[4][4];
        for (int q = 0; q < Q; q++)
            for (int c = 0; c < 4; c++) acc[q][c] = _mm512_setzero_ps();
        for (int64_t r = 0; r < z->R; r++) {
            const float* b = z->B + r * X + i;
            __m512 bv[4] = {_mm512_loadu_ps(b), _mm512_loadu_ps(b + 16), _mm512_loadu_ps(b + 32),
                            _mm512_loadu_ps(b + 48)};
            for (int c = 0; c < 4; c++) MX_IN_REG(bv[c]);
            for (int q = 0; q < Q; q++) {
                const __m512 ur = _mm512_set1_ps(U[q * ldu + r]);
                for (int c = 0; c < 4; c++) acc[q][c] = _mm512_fmadd_ps(ur, bv[c], acc[q][c]);
            }
        }
        for (int q = 0; q < Q; q++)
            for (int c = 0; c < 4; c++) {
                float* y = Y + q * ldy + i + 16 * c;
                _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), acc[q][c]));
            }
    }
    for (; i + 16 <= r1; i += 16)
        for (int q = 0; q < Q; q++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t r = 0; r < z->R; r++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(U[q * ldu + r]), _mm512_loadu_ps(z->B + r * X + i), acc);
            _mm512_storeu_ps(Y + q * ldy + i, _mm512_add_ps(_mm512_loadu_ps(Y + q * ldy + i), acc));
        }
#endif
    for (; i < r1; i++)
        for (int q = 0; q < Q; q++) {
            float acc = 0.f;
            for (int64_t r = 0; r < z->R; r++) acc += U[q * ldu + r] * z->B[r * X + i];
            Y[q * ldy + i] += acc;
        }
}

/* `lora_up_tile` for n rows: four at a time, then those left one by one. */
static void lora_up(const mx_lora* z, int64_t X, const float* U, int64_t ldu, int64_t n, float* Y, int64_t ldy,
                    int64_t r0, int64_t r1) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) lora_up_tile(z, X, U + j * ldu, ldu, 4, Y + j * ldy, ldy, r0, r1);
    for (; j < n; j++) lora_up_tile(z, X, U + j * ldu, ldu, 1, Y + j * ldy, ldy, r0, r1);
}

/* The output rows of a product a thread adds the updates to, [lo, hi), go in blocks of LORA_BLOCK, all
   the rows' updates for one block before the next: a block of B (R x 64 floats) is read from memory
   once for all the rows instead of once per row. */
#define LORA_BLOCK 64
#define LORA_CHUNK 128
static inline int64_t block_end(int64_t c, int64_t hi) { return c + LORA_BLOCK < hi ? c + LORA_BLOCK : hi; }

/* The (token, slot) pairs of idx [N] sorted by expert, stably (token order within each expert):
   the pairs of expert e are order[start[e] .. start[e + 1]), and pair p sits at inverse[p]. E <= 256. */
static void group_experts(const int64_t* idx, int64_t N, int64_t E, int64_t* start, int32_t* order,
                          int32_t* inverse) {
    int64_t fill[256];
    for (int64_t e = 0; e <= E; e++) start[e] = 0;
    for (int64_t p = 0; p < N; p++) start[idx[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    for (int64_t e = 0; e < E; e++) fill[e] = start[e];
    for (int64_t p = 0; p < N; p++) {
        const int64_t at = fill[idx[p]]++;
        order[at] = (int32_t)p;
        inverse[p] = (int32_t)at;
    }
}

/* The experts of an MoE layer for T tokens inside a team (after group_experts): out[t] (or
   out[t] += with `accumulate`) = sum_k mix[t, k] * expert_{idx[t, k]}(x[t]). Each chosen expert's
   weights are read once for all the tokens that chose it. Work buffers: `mx_moe_args`. Ends with a
   barrier. */
typedef struct {
    mat m13, m2;
    int64_t T, D, F, E, K;
    const float *x, *mix;
    const int64_t* start;
    const int32_t *order, *inverse;
    float *xs, *g, *a, *ys, *out;
    uint16_t *xsb, *ab;
    int accumulate;
    /* LoRA (mx_batch): the layer's w13 and w2 updates [E, J] (NULL: none), each token's adapter, the
       pairs' experts idx [T, K] and the work buffer u [N, ld] */
    const mx_lora *lora13, *lora2;
    int64_t J;
    const int32_t* adapter;
    const int64_t* idx;
    float* u; /* [(1 + threads) rows, ld]: the shared rows, then each thread's own */
    int64_t rows, ld;
} moe_job;

/* The update of sorted pair i's expert's weight (`site`: the job's lora13 or lora2) under its token's adapter. */
static const mx_lora* pair_lora(const moe_job* j, const mx_lora* site, int64_t i) {
    return site ? lora_of(site, j->J, j->idx[j->order[i]], j->adapter[j->order[i] / j->K]) : 0;
}

/* `row_run` for sorted pairs [i, end): those of one expert under one adapter (a prompt's tokens). */
static int64_t pair_run(const moe_job* j, const mx_lora* site, int64_t i, int64_t end, const mx_lora** z) {
    int64_t e = i + 1;
    *z = pair_lora(j, site, i);
    while (e < end && pair_lora(j, site, e) == *z) e++;
    return e;
}

static void moe_team(team* tm, const moe_job* j) {
    const int64_t D = j->D, F = j->F, K = j->K, N = j->T * K;
    const int bf = j->m13.wt == MX_BF16;
    const int64_t* start = j->start;
    float *xs = j->xs, *g = j->g, *a = j->a, *ys = j->ys;
    uint16_t *xsb = j->xsb, *ab = j->ab;
    int64_t lo, hi;
    my_rows(tm, N, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) {
        memcpy(xs + i * D, j->x + (j->order[i] / K) * D, D * sizeof(float));
        if (bf) round_to_bf16(xs + i * D, xsb + i * D, D);
    }
    for (int64_t i = lo, e; j->lora13 && i < hi; i = e) {
        const mx_lora* z;
        e = pair_run(j, j->lora13, i, hi, &z);
        if (z) lora_down(z, D, xs + i * D, bf ? xsb + i * D : 0, e - i, j->u + i * j->ld, j->ld);
    }
    sync_team(tm);
    /* gate rows [lo, hi) and up rows [F + lo, F + hi) of every expert: SiLU needs no barrier */
    my_rows(tm, F, &lo, &hi);
    for (int64_t e = 0; e < j->E; e++) {
        const int64_t s0 = start[e], n = start[e + 1] - s0;
        if (n == 0) continue;
        const mat e13 = mat_at(j->m13, e * 2 * F);
        if (is_a8(e13.wt)) a8_pin(e13.wt, xs + s0 * D, n, D); /* once for the gate, the up and every chunk */
        /* with adapters, in chunks of LORA_CHUNK outputs: the updates and the SwiGLU then read the
           chunk of g the product has just written from the caches (a prompt's pairs: megabytes) */
        const int64_t step = j->lora13 ? LORA_CHUNK : (hi > lo ? hi - lo : 1);
        for (int64_t c0 = lo; c0 < hi; c0 += step) {
            const int64_t c1 = c0 + step < hi ? c0 + step : hi;
            gemm_rows(e13, xs + s0 * D, xsb + s0 * D, n, g + s0 * 2 * F, 2 * F, c0, c1);
            gemm_rows(e13, xs + s0 * D, xsb + s0 * D, n, g + s0 * 2 * F, 2 * F, F + c0, F + c1);
            for (int64_t c = c0; j->lora13 && c < c1; c += LORA_BLOCK)
                for (int64_t r = s0, e; r < s0 + n; r = e) {
                    const mx_lora* z;
                    e = pair_run(j, j->lora13, r, s0 + n, &z);
                    if (z) {
                        lora_up(z, 2 * F, j->u + r * j->ld, j->ld, e - r, g + r * 2 * F, 2 * F, c, block_end(c, c1));
                        lora_up(z, 2 * F, j->u + r * j->ld, j->ld, e - r, g + r * 2 * F, 2 * F, F + c,
                                F + block_end(c, c1));
                    }
                }
            for (int64_t r = s0; r < s0 + n; r++)
                swiglu_row(g + r * 2 * F + c0, g + r * 2 * F + F + c0, a + r * F + c0, bf ? ab + r * F + c0 : 0,
                           c1 - c0);
        }
        a8_unpin();
    }
    sync_team(tm);
    /* down projections: this thread owns rows [lo, hi) of every expert and of the output */
    my_rows(tm, D, &lo, &hi);
    float* u2 = j->lora2 ? j->u + (1 + tm->t) * j->rows * j->ld : 0; /* this thread's own A a of each pair */
    for (int64_t e = 0; e < j->E; e++) {
        const int64_t s0 = start[e], n = start[e + 1] - s0;
        if (n > 0) gemm_rows(mat_at(j->m2, e * D), a + s0 * F, ab + s0 * F, n, ys + s0 * D, D, lo, hi);
        for (int64_t r = s0, e; j->lora2 && lo < hi && r < s0 + n; r = e) {
            const mx_lora* z;
            e = pair_run(j, j->lora2, r, s0 + n, &z);
            if (z) lora_down(z, F, a + r * F, bf ? ab + r * F : 0, e - r, u2 + r * j->ld, j->ld);
        }
        for (int64_t c = lo; j->lora2 && c < hi; c += LORA_BLOCK)
            for (int64_t r = s0, e; r < s0 + n; r = e) {
                const mx_lora* z;
                e = pair_run(j, j->lora2, r, s0 + n, &z);
                if (z) lora_up(z, D, u2 + r * j->ld, j->ld, e - r, ys + r * D, D, c, block_end(c, hi));
            }
    }
    for (int64_t t = 0; t < j->T; t++)
        for (int64_t i = lo; i < hi; i++) {
            float s = 0.f;
            for (int64_t k = 0; k < K; k++) s += j->mix[t * K + k] * ys[j->inverse[t * K + k] * D + i];
            j->out[t * D + i] = j->accumulate ? j->out[t * D + i] + s : s;
        }
    sync_team(tm);
}

/* The experts of an MoE layer for a few tokens (batched decoding, short prompts): out [T, D] =
   sum_k mix[t, k] * expert_{idx[t, k]}(x[t]). The T*K (token, slot) pairs are sorted by expert and
   gathered, so each chosen expert's weights are read once for all the tokens that chose it.
   Shapes, pointers and work buffers: `mx_moe_args` in mixlab.h. */
void mx_moe(const mx_moe_args* p, int nt) {
    int64_t start[257]; /* E <= 256, checked by the caller */
    group_experts(p->idx, p->T * p->K, p->E, start, p->order, p->inverse);
    const moe_job job = {{p->wt, p->w13, p->w13_scale, p->D}, {p->wt, p->w2, p->w2_scale, p->F},
                         p->T, p->D, p->F, p->E, p->K, p->x, p->mix, start, p->order, p->inverse,
                         p->xs, p->g, p->a, p->ys, p->out, p->xsb, p->ab, 0};
    barrier_t bar = {0, 0};
#pragma omp parallel num_threads(nt)
    {
        team tm = {omp_get_thread_num(), omp_get_num_threads(), &bar};
        moe_team(&tm, &job);
    }
}

/* Per-thread scratch of `attend_chunk` for slots of C positions and head dim Hd, in floats. */
static inline int64_t chunk_scratch(int64_t C, int64_t Hd) {
    const int64_t Cp = (C + 15) & ~(int64_t)15;
    return (2 * Hd + 6) * Cp;
}

/* The queries of one sequence's prompt chunk against its slot, for kv head g: rows t0 .. t0 + Tq - 1
   of the step (consecutive positions), each with the group's R query heads, rotated here. A chunk's
   Tq * R queries share every cache row, so the n rows it can see are first copied to float32 and
   transposed (keys and values [Hd, n]): then the scores of 4 queries against 16 rows, and the
   weighted sums, are plain vector multiply-adds without a horizontal sum per row (what `attend`
   does for one query). Each query sees the rows whose positions are visible from its own (causal,
   within the sliding window); softmax in float32 as `attend`. ws: `chunk_scratch` floats. */
static void attend_chunk(const mx_model* m, const mx_batch* p, int64_t l, int64_t t0, int64_t Tq, int64_t g,
                         float* ws) {
    const int64_t C = p->C, Hd = m->Hd, half = Hd / 2, G = m->G, R = m->H / G, QD = m->H * Hd;
    const int64_t QKV = QD + 2 * G * Hd, es = elem_size(m->ct), last = p->pos[t0 + Tq - 1];
    const int64_t n = last + 1 < C ? last + 1 : C, np = (n + 15) & ~(int64_t)15, Cp = (C + 15) & ~(int64_t)15;
    const int bf = m->wt == MX_BF16;
    const float scale = 1.0f / sqrtf((float)Hd);
    float *kt = ws, *vt = ws + Hd * Cp, *sc = ws + 2 * Hd * Cp; /* sc: 4 rows of Cp scores */
    int32_t* cp = (int32_t*)(void*)(ws + (2 * Hd + 4) * Cp);
    const int64_t off = ((p->seq[t0] * G + g) * C) * Hd * es;
    const char* kbase = (const char*)p->k_cache[l] + off;
    const char* vbase = (const char*)p->v_cache[l] + off;
    const int64_t* cpos = p->cache_pos + p->seq[t0] * C;
    for (int64_t s = 0; s < np; s++) {
        cp[s] = s < n ? (int32_t)cpos[s] : -1;
        for (int64_t i = 0; i < Hd; i++) {
            kt[i * np + s] = s < n ? load_elem(kbase, m->ct, s * Hd + i) : 0.f;
            vt[i * np + s] = s < n ? load_elem(vbase, m->ct, s * Hd + i) : 0.f;
        }
    }
    const int64_t NQ = Tq * R; /* query u: token t0 + u / R, head g R + u % R */
    for (int64_t u = 0; u < NQ; u++) {
        const int64_t t = t0 + u / R;
        rope(p->qkv + t * QKV + (g * R + u % R) * Hd, p->rope + t * Hd, p->rope + t * Hd + half, half);
    }
    for (int64_t u0 = 0; u0 < NQ; u0 += 4) {
        const int Q = NQ - u0 < 4 ? (int)(NQ - u0) : 4;
        const float* q[4];
        int64_t qpos[4];
        for (int j = 0; j < 4; j++) {
            const int64_t u = u0 + (j < Q ? j : 0), t = t0 + u / R;
            q[j] = p->qkv + t * QKV + (g * R + u % R) * Hd;
            qpos[j] = p->pos[t];
        }
#if defined(__AVX512F__)
        __m512 mx[4];
        for (int j = 0; j < 4; j++) mx[j] = _mm512_set1_ps(-INFINITY);
        for (int64_t b = 0; b < np; b += 16) {
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t i = 0; i < Hd; i++) {
                const __m512 kv = _mm512_loadu_ps(kt + i * np + b);
                for (int j = 0; j < 4; j++) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(q[j][i]), kv, acc[j]);
            }
            const __m512i cb = _mm512_loadu_si512(cp + b);
            for (int j = 0; j < 4; j++) {
                const __m512i pj = _mm512_set1_epi32((int32_t)qpos[j]);
                __mmask16 vis = _mm512_cmpge_epi32_mask(cb, _mm512_setzero_si512()) & _mm512_cmple_epi32_mask(cb, pj);
                if (m->window > 0)
                    vis &= _mm512_cmplt_epi32_mask(_mm512_sub_epi32(pj, cb), _mm512_set1_epi32((int32_t)m->window));
                const __m512 v = _mm512_mask_blend_ps(vis, _mm512_set1_ps(-INFINITY), _mm512_mul_ps(acc[j], _mm512_set1_ps(scale)));
                _mm512_storeu_ps(sc + j * Cp + b, v);
                mx[j] = _mm512_max_ps(mx[j], v);
            }
        }
        float inv[4];
        for (int j = 0; j < 4; j++) {
            const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx[j])); /* finite: a query sees itself */
            __m512 sum = _mm512_setzero_ps();
            for (int64_t b = 0; b < np; b += 16) {
                const __m512 x = _mm512_loadu_ps(sc + j * Cp + b);
                const __mmask16 vis = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
                const __m512 e = _mm512_maskz_mov_ps(vis, exp16(_mm512_max_ps(_mm512_sub_ps(x, top), _mm512_set1_ps(-104.f))));
                _mm512_storeu_ps(sc + j * Cp + b, e);
                sum = _mm512_add_ps(sum, e);
            }
            inv[j] = 1.f / hsum(sum);
        }
        for (int64_t i = 0; i < Hd; i++) {
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t b = 0; b < np; b += 16) {
                const __m512 vv = _mm512_loadu_ps(vt + i * np + b);
                for (int j = 0; j < 4; j++) acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(sc + j * Cp + b), vv, acc[j]);
            }
            for (int j = 0; j < Q; j++) {
                const int64_t u = u0 + j, t = t0 + u / R;
                p->att[t * QD + (g * R + u % R) * Hd + i] = hsum(acc[j]) * inv[j];
            }
        }
#else
        for (int j = 0; j < Q; j++) { /* portable: one query at a time over the transposed rows */
            float mxs = -INFINITY, sum = 0.f;
            float* scj = sc + j * Cp;
            for (int64_t s = 0; s < np; s++) {
                const int64_t cs = cp[s];
                const int visible = cs >= 0 && cs <= qpos[j] && (m->window <= 0 || qpos[j] - cs < m->window);
                float d = 0.f;
                for (int64_t i = 0; i < Hd; i++) d += q[j][i] * kt[i * np + s];
                scj[s] = visible ? d * scale : -INFINITY;
                if (scj[s] > mxs) mxs = scj[s];
            }
            for (int64_t s = 0; s < np; s++) sum += (scj[s] = scj[s] == -INFINITY ? 0.f : expf(scj[s] - mxs));
            const int64_t u = u0 + j, t = t0 + u / R;
            for (int64_t i = 0; i < Hd; i++) {
                float y = 0.f;
                for (int64_t s = 0; s < np; s++) y += scj[s] * vt[i * np + s];
                p->att[t * QD + (g * R + u % R) * Hd + i] = y / sum;
            }
        }
#endif
        if (bf)
            for (int j = 0; j < Q; j++) {
                const int64_t u = u0 + j, t = t0 + u / R, at = t * QD + (g * R + u % R) * Hd;
                round_to_bf16(p->att + at, p->attb + at, Hd);
            }
    }
}

/* One engine step in one parallel region (`mx_batch` in mixlab.h): T tokens, the items of several
   sequences, each a decoding token or a prompt chunk at consecutive positions of its sequence. Per
   layer the fused qkv, output and expert matrices multiply all T rows at once (each weight row read
   once per step; experts grouped by expert, each chosen expert read once), while norms, routing and
   attention run per token, each over its own sequence's slot of the cache pool (rolling slots:
   index pos % C). Every token's key and value are stored before any query attends, so a chunk's
   queries see its earlier tokens (causal, and within the sliding window, by position); the caller
   sizes C so that a chunk never overwrites a key its own queries still need (engine/runner.py).
   Logits only for the R rows asked for. It computes what the engine's PyTorch pass computes, and
   for decoding tokens what mx_decode_step would. */
void mx_decode_batch(const mx_model* m, const mx_batch* p, int nt) {
    const int64_t T = p->T, C = p->C, D = m->D, Hd = m->Hd, half = Hd / 2, G = m->G, R = m->H / G;
    const int64_t QD = m->H * Hd, QKV = QD + 2 * G * Hd, K = m->K, L = m->L;
    const int64_t es = elem_size(m->ct);
    const int bf = m->wt == MX_BF16;
    const float scale = 1.0f / sqrtf((float)Hd);
    if (nt > p->nt) nt = (int)p->nt; /* scores has room for p->nt threads */
    /* batch-invariant: every product through `gemm_rows_inv`, every query through `attend_chunk`
       (whose sums over a query's keys do not depend on the chunk around it: keys it cannot see add
       exact zeros), so a token's numbers do not depend on what else the step holds */
    const int inv = p->invariant != 0;
    int chunked = inv; /* whether some sequence has several tokens: then keys are stored first */
    for (int64_t t = 0; t < T; t++) {
        for (int64_t i = 0; i < half; i++) {
            const float ang = (float)p->pos[t] * m->inv_freq[i]; /* as mx_decode_step */
            p->rope[t * Hd + i] = cosf(ang);
            p->rope[t * Hd + half + i] = sinf(ang);
        }
        for (int64_t i = 0; i < D; i++) p->x[t * D + i] = load_elem(m->embed, m->et, p->token[t] * D + i);
        p->cache_pos[p->seq[t] * C + p->pos[t] % C] = p->pos[t];
        if (t > 0 && p->seq[t] == p->seq[t - 1]) chunked = 1;
    }
    int64_t start[257]; /* E <= 256, checked by the caller */
    const int a16 = m->et == MX_BF16; /* a bf16 model: see `mat` */
    /* The last layer's experts run only for the rows whose logits are wanted (as llama.cpp skips
       the unused outputs): a prompt chunk's other tokens only leave their keys and values, which
       that layer's attention has stored. They are still routed (`chosen` is whole, so the
       expert-load counts are), and their rows are moved to the front (`rows` ascending). */
    int compact = p->R < T;
    for (int64_t r = 0; r < p->R && compact; r++) compact = p->rows[r] >= r && (r == 0 || p->rows[r] > p->rows[r - 1]);
    barrier_t bar = {0, 0};
    /* each thread's argmax of its part of every logit row (`top_of`); none without memory */
    top_t* tops = p->top && p->R ? (top_t*)malloc(sizeof(top_t) * (size_t)p->R * (size_t)(nt < 1 ? 1 : nt)) : 0;
    if (p->top && p->R && !tops)
        for (int64_t r = 0; r < p->R; r++) p->top[r] = -2;
    int ran = 1;
#pragma omp parallel num_threads(nt)
    {
        team tm = {omp_get_thread_num(), omp_get_num_threads(), &bar};
        float *x = p->x, *h = p->h, *o = p->o, *qkv = p->qkv, *att = p->att;
        uint16_t *hb = p->hb, *attb = p->attb;
        float* ws = p->scores + tm.t * chunk_scratch(C, Hd);
        float* sc = ws; /* attend's scores [C], attend4's [4, C] */
        int64_t lo, hi;
        for (int64_t l = 0; l < L; l++) {
            const mx_layer* ly = &m->layers[l];
            const mat mqkv = {m->wt, ly->wqkv, ly->wqkv_scale, D, a16, ly->wqkv_p, inv},
                      mo = {m->wt, ly->wo, ly->wo_scale, QD, a16, ly->wo_p, inv};
            const mx_lora *lqkv = lora_site(m, p, l, MX_LORA_QKV), *lwo = lora_site(m, p, l, MX_LORA_WO);
            /* each thread's consecutive rows: a prompt chunk's updates in tiles */
            const int64_t t0 = T * tm.t / tm.nt, t1 = T * (tm.t + 1) / tm.nt;
            for (int64_t t = t0; t < t1; t++)
                rmsnorm(x + t * D, ly->attn_norm, m->eps, D, h + t * D, bf ? hb + t * D : 0);
            for (int64_t t = t0, e; lqkv && t < t1; t = e) {
                const mx_lora* z;
                e = row_run(lqkv, p->J, p->adapter, t, t1, &z);
                if (z) lora_down(z, D, h + t * D, bf ? hb + t * D : 0, e - t, p->lora_u + t * p->lora_ld, p->lora_ld);
            }
            sync_team(&tm);
            my_rows(&tm, QKV, &lo, &hi);
            gemm_rows(mqkv, h, hb, T, qkv, QKV, lo, hi);
            for (int64_t c = lo; lqkv && c < hi; c += LORA_BLOCK)
                for (int64_t t = 0, e; t < T; t = e) {
                    const mx_lora* z;
                    e = row_run(lqkv, p->J, p->adapter, t, T, &z);
                    if (z) lora_up(z, QKV, p->lora_u + t * p->lora_ld, p->lora_ld, e - t, qkv + t * QKV, QKV, c,
                                   block_end(c, hi));
                }
            sync_team(&tm);
            /* Per (token, kv head): store the rotated key and the value at index pos % C of the
               sequence's slot, then attend with the head's R query heads; when a sequence has
               several tokens, every key is stored first (one more barrier). */
            for (int pass = chunked ? 0 : 2; pass < (chunked ? 2 : 3); pass++) {
                /* pass 0: store; 1: attend; 2: both (one token per sequence) */
                for (int64_t w = tm.t; w < T * G; w += tm.nt) {
                    const int64_t t = w / G, g = w % G, pos = p->pos[t], n = pos + 1 < C ? pos + 1 : C;
                    float* qt = qkv + t * QKV;
                    const float *cs = p->rope + t * Hd, *sn = cs + half;
                    const int64_t off = ((p->seq[t] * G + g) * C) * Hd * es;
                    char* kbase = (char*)p->k_cache[l] + off;
                    char* vbase = (char*)p->v_cache[l] + off;
                    if (pass != 1) {
                        float* k = qt + QD + g * Hd;
                        const float* v = qt + QD + G * Hd + g * Hd;
                        const int64_t at = pos % C;
                        rope(k, cs, sn, half);
                        for (int64_t i = 0; i < Hd; i++) {
                            store_elem(kbase, m->ct, at * Hd + i, k[i]);
                            store_elem(vbase, m->ct, at * Hd + i, v[i]);
                        }
                    }
                    if (pass == 0) continue;
                    if (pass == 1 && (inv || (t > 0 && p->seq[t - 1] == p->seq[t]) || (t + 1 < T && p->seq[t + 1] == p->seq[t]))) {
                        /* a prompt chunk: its first row's unit attends for all of its rows */
                        if (t > 0 && p->seq[t - 1] == p->seq[t]) continue;
                        int64_t Tq = 1;
                        while (t + Tq < T && p->seq[t + Tq] == p->seq[t]) Tq++;
                        attend_chunk(m, p, l, t, Tq, g, ws);
                        continue;
                    }
#if defined(__AVX512F__)
                    if (R == 4 && Hd % 16 == 0) { /* the group's four query heads at once, as attn_head */
                        for (int64_t hh = g * R; hh < (g + 1) * R; hh++) rope(qt + hh * Hd, cs, sn, half);
                        attend4(m, qt + g * R * Hd, kbase, vbase, p->cache_pos + p->seq[t] * C, n, pos, scale, sc, C,
                                att + t * QD + g * R * Hd);
                        if (bf) round_to_bf16(att + t * QD + g * R * Hd, attb + t * QD + g * R * Hd, R * Hd);
                        continue;
                    }
#endif
                    for (int64_t hh = g * R; hh < (g + 1) * R; hh++) {
                        float* q = qt + hh * Hd;
                        float* y = att + t * QD + hh * Hd;
                        rope(q, cs, sn, half);
                        attend(m, q, kbase, vbase, p->cache_pos + p->seq[t] * C, n, pos, scale, sc, y);
                        if (bf) round_to_bf16(y, attb + t * QD + hh * Hd, Hd);
                    }
                }
                sync_team(&tm);
            }
            my_rows(&tm, D, &lo, &hi);
            float* uo = lwo ? p->lora_u + (1 + tm.t) * T * K * p->lora_ld : 0; /* this thread's own A att of each row */
            for (int64_t t = 0, e; lwo && lo < hi && t < T; t = e) {
                const mx_lora* z;
                e = row_run(lwo, p->J, p->adapter, t, T, &z);
                if (z) lora_down(z, QD, att + t * QD, bf ? attb + t * QD : 0, e - t, uo + t * p->lora_ld, p->lora_ld);
            }
            gemm_rows(mo, att, attb, T, o, D, lo, hi);
            for (int64_t c = lo; lwo && c < hi; c += LORA_BLOCK)
                for (int64_t t = 0, e; t < T; t = e) {
                    const mx_lora* z;
                    e = row_run(lwo, p->J, p->adapter, t, T, &z);
                    if (z) lora_up(z, D, uo + t * p->lora_ld, p->lora_ld, e - t, o + t * D, D, c, block_end(c, hi));
                }
            for (int64_t t = 0; t < T; t++)
                for (int64_t i = lo; i < hi; i++) x[t * D + i] += o[t * D + i];
            sync_team(&tm);
            /* FFN norm and routing per token (o: scratch for the bf16-rounded router input) */
            for (int64_t t = tm.t; t < T; t += tm.nt) {
                int32_t* ch = p->chosen + (l * T + t) * K;
                float* mix = p->mix + t * K;
                rmsnorm(x + t * D, ly->ffn_norm, m->eps, D, h + t * D, bf ? hb + t * D : 0);
                if (ly->router) {
                    const float* hr = h + t * D;
                    if (bf) {
                        for (int64_t i = 0; i < D; i++) o[t * D + i] = bf16_to_f32(hb[t * D + i]);
                        hr = o + t * D;
                    }
                    const mx_lora* z = lora_of(lora_site(m, p, l, MX_LORA_ROUTER), p->J, 0, p->J ? p->adapter[t] : -1);
                    float add[256];
                    if (z) {
                        float* u = p->lora_u + t * p->lora_ld;
                        lora_down(z, D, hr, 0, 1, u, 0);
                        for (int64_t e = 0; e < m->E; e++) add[e] = 0.f;
                        lora_up(z, m->E, u, 0, 1, add, 0, 0, m->E);
                    }
                    route(m, ly->router, hr, z ? add : 0, ch, mix);
                } else {
                    ch[0] = 0;
                    mix[0] = 1.f;
                }
                for (int64_t k = 0; k < K; k++) p->idx[t * K + k] = ch[k];
            }
            sync_team(&tm);
            const int64_t TE = compact && l == L - 1 ? p->R : T; /* the tokens this layer's experts run for */
            if (tm.t == 0) {
                if (TE < T)
                    for (int64_t r = 0; r < TE; r++) { /* rows[r] >= r, ascending: in place, in order */
                        const int64_t t = p->rows[r];
                        memmove(x + r * D, x + t * D, (size_t)D * sizeof(float));
                        memmove(h + r * D, h + t * D, (size_t)D * sizeof(float));
                        if (bf) memmove(hb + r * D, hb + t * D, (size_t)D * sizeof(uint16_t));
                        memmove(p->mix + r * K, p->mix + t * K, (size_t)K * sizeof(float));
                        memmove(p->idx + r * K, p->idx + t * K, (size_t)K * sizeof(int64_t));
                        if (p->J) p->adapter[r] = p->adapter[t];
                    }
                group_experts(p->idx, TE * K, m->E, start, p->order, p->inverse);
            }
            sync_team(&tm);
            const moe_job job = {{m->wt, ly->w13, ly->w13_scale, D, a16, ly->w13_p, inv},
                                 {m->wt, ly->w2, ly->w2_scale, m->F, a16, ly->w2_p, inv},
                                 TE, D, m->F, m->E, K, h, p->mix, start, p->order, p->inverse,
                                 p->xs, p->g, p->a, p->ys, x, p->xsb, p->ab, 1,
                                 lora_site(m, p, l, MX_LORA_W13), lora_site(m, p, l, MX_LORA_W2), p->J, p->adapter,
                                 p->idx, p->lora_u, T * K, p->lora_ld};
            moe_team(&tm, &job);
        }
        /* the final norm of the rows whose logits are wanted (moved to the front when `compact`),
           into h's first R rows */
        for (int64_t r = tm.t; r < p->R; r += tm.nt)
            rmsnorm(x + (compact ? r : p->rows[r]) * D, m->out_norm, m->eps, D, h + r * D, bf ? hb + r * D : 0);
        sync_team(&tm);
        const mat mout = {m->wt, m->out, m->out_scale, D, a16, m->out_p, inv};
        my_rows(&tm, m->V, &lo, &hi);
        gemm_rows(mout, h, hb, p->R, p->logits, m->V, lo, hi);
        if (tops)
            for (int64_t r = 0; r < p->R; r++) {
                top_t u = top_of(p->logits + r * m->V + lo, hi - lo);
                if (u.i >= 0) u.i += lo;
                tops[r * nt + tm.t] = u;
            }
        if (tm.t == 0) ran = tm.nt;
    }
    if (tops) {
        for (int64_t r = 0; r < p->R; r++) p->top[r] = top_combine(tops + r * nt, ran);
        free(tops);
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* The ABI check and CPU features (mixlab.h)                                                       */

int mx_abi_version(void) { return MX_ABI_VERSION; }

int64_t mx_sizeof(int which) {
    switch (which) {
    case MX_SIZEOF_LAYER: return (int64_t)sizeof(mx_layer);
    case MX_SIZEOF_MODEL: return (int64_t)sizeof(mx_model);
    case MX_SIZEOF_BUFS: return (int64_t)sizeof(mx_bufs);
    case MX_SIZEOF_MOE_ARGS: return (int64_t)sizeof(mx_moe_args);
    case MX_SIZEOF_BATCH: return (int64_t)sizeof(mx_batch);
    case MX_SIZEOF_LORA: return (int64_t)sizeof(mx_lora);
    default: return -1;
    }
}

/* Field offsets in declaration order, one table per structure (keep them next to mixlab.h's
   declarations when a field is added: Python compares them with its ctypes mirrors by position). */
#define MX_OFF(S, f) (int64_t) offsetof(S, f)
static const int64_t off_layer[] = {
    MX_OFF(mx_layer, attn_norm), MX_OFF(mx_layer, wqkv), MX_OFF(mx_layer, wqkv_scale), MX_OFF(mx_layer, wo),
    MX_OFF(mx_layer, wo_scale), MX_OFF(mx_layer, ffn_norm), MX_OFF(mx_layer, router), MX_OFF(mx_layer, w13),
    MX_OFF(mx_layer, w13_scale), MX_OFF(mx_layer, w2), MX_OFF(mx_layer, w2_scale), MX_OFF(mx_layer, k_cache),
    MX_OFF(mx_layer, v_cache), MX_OFF(mx_layer, wqkv_p), MX_OFF(mx_layer, wo_p), MX_OFF(mx_layer, w13_p),
    MX_OFF(mx_layer, w2_p), -1};
static const int64_t off_model[] = {
    MX_OFF(mx_model, D), MX_OFF(mx_model, H), MX_OFF(mx_model, G), MX_OFF(mx_model, Hd), MX_OFF(mx_model, E),
    MX_OFF(mx_model, K), MX_OFF(mx_model, F), MX_OFF(mx_model, V), MX_OFF(mx_model, L), MX_OFF(mx_model, window),
    MX_OFF(mx_model, eps), MX_OFF(mx_model, wt), MX_OFF(mx_model, ct), MX_OFF(mx_model, et),
    MX_OFF(mx_model, inv_freq), MX_OFF(mx_model, embed), MX_OFF(mx_model, out_norm), MX_OFF(mx_model, out),
    MX_OFF(mx_model, out_scale), MX_OFF(mx_model, layers), MX_OFF(mx_model, out_p), -1};
static const int64_t off_bufs[] = {
    MX_OFF(mx_bufs, x), MX_OFF(mx_bufs, h), MX_OFF(mx_bufs, qkv), MX_OFF(mx_bufs, att), MX_OFF(mx_bufs, scores),
    MX_OFF(mx_bufs, o), MX_OFF(mx_bufs, g), MX_OFF(mx_bufs, a), MX_OFF(mx_bufs, y), MX_OFF(mx_bufs, mix),
    MX_OFF(mx_bufs, hb), MX_OFF(mx_bufs, attb), MX_OFF(mx_bufs, ab), MX_OFF(mx_bufs, chosen), MX_OFF(mx_bufs, top),
    -1};
static const int64_t off_moe[] = {
    MX_OFF(mx_moe_args, T), MX_OFF(mx_moe_args, D), MX_OFF(mx_moe_args, F), MX_OFF(mx_moe_args, E),
    MX_OFF(mx_moe_args, K), MX_OFF(mx_moe_args, wt), MX_OFF(mx_moe_args, x), MX_OFF(mx_moe_args, idx),
    MX_OFF(mx_moe_args, mix), MX_OFF(mx_moe_args, w13), MX_OFF(mx_moe_args, w13_scale), MX_OFF(mx_moe_args, w2),
    MX_OFF(mx_moe_args, w2_scale), MX_OFF(mx_moe_args, out), MX_OFF(mx_moe_args, xs), MX_OFF(mx_moe_args, xsb),
    MX_OFF(mx_moe_args, g), MX_OFF(mx_moe_args, a), MX_OFF(mx_moe_args, ab), MX_OFF(mx_moe_args, ys),
    MX_OFF(mx_moe_args, order), MX_OFF(mx_moe_args, inverse), -1};
static const int64_t off_batch[] = {
    MX_OFF(mx_batch, T), MX_OFF(mx_batch, C), MX_OFF(mx_batch, nt), MX_OFF(mx_batch, R), MX_OFF(mx_batch, token),
    MX_OFF(mx_batch, pos), MX_OFF(mx_batch, seq), MX_OFF(mx_batch, rows), MX_OFF(mx_batch, cache_pos), MX_OFF(mx_batch, k_cache), MX_OFF(mx_batch, v_cache),
    MX_OFF(mx_batch, logits), MX_OFF(mx_batch, chosen), MX_OFF(mx_batch, x), MX_OFF(mx_batch, h), MX_OFF(mx_batch, o),
    MX_OFF(mx_batch, qkv), MX_OFF(mx_batch, att), MX_OFF(mx_batch, rope), MX_OFF(mx_batch, scores),
    MX_OFF(mx_batch, mix), MX_OFF(mx_batch, hb), MX_OFF(mx_batch, attb), MX_OFF(mx_batch, idx), MX_OFF(mx_batch, xs),
    MX_OFF(mx_batch, g), MX_OFF(mx_batch, a), MX_OFF(mx_batch, ys), MX_OFF(mx_batch, xsb), MX_OFF(mx_batch, ab),
    MX_OFF(mx_batch, order), MX_OFF(mx_batch, inverse), MX_OFF(mx_batch, top), MX_OFF(mx_batch, invariant),
    MX_OFF(mx_batch, J), MX_OFF(mx_batch, lora), MX_OFF(mx_batch, adapter), MX_OFF(mx_batch, lora_u),
    MX_OFF(mx_batch, lora_ld), -1};
static const int64_t off_lora[] = {MX_OFF(mx_lora, A), MX_OFF(mx_lora, B), MX_OFF(mx_lora, R), -1};

int64_t mx_offsetof(int which, int field) {
    const int64_t* t = which == MX_SIZEOF_LAYER ? off_layer : which == MX_SIZEOF_MODEL ? off_model
                     : which == MX_SIZEOF_BUFS  ? off_bufs  : which == MX_SIZEOF_MOE_ARGS ? off_moe
                     : which == MX_SIZEOF_BATCH ? off_batch : which == MX_SIZEOF_LORA ? off_lora : 0;
    if (!t || field < 0) return -1;
    for (int i = 0; i < field; i++)
        if (t[i] < 0) return -1;
    return t[field];
}

/* Whether the bf16 panels run on AMX's tile unit: `want` 1 asks for it (Linux's permission for the
   tile state, once per process), 0 turns it off, -1 only asks. 1 when on. */
int mx_amx(int want) {
#if defined(MX_AMX)
    static int granted = -1; /* -1 not asked yet */
    if (want == 1 && granted < 0) {
        unsigned a, b, c, d; /* cpuid leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE */
        const int cpu = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1);
        granted = cpu && syscall(158 /* SYS_arch_prctl */, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    }
    if (want >= 0) amx_on = want == 1 && granted == 1;
    return amx_on;
#else
    (void)want;
    return 0;
#endif
}

/* What this build vectorises (MX_SIMD_*). Without them the portable loops are correct but slower
   than PyTorch's kernels, so the Python side only routes work here for the dtypes this reports and
   `mx_cpu_features` confirms. */
int mx_simd(void) {
    int bits = 0;
#if defined(__AVX512F__)
    bits |= MX_SIMD_AVX512;
#endif
#if defined(__AVX512BF16__)
    bits |= MX_SIMD_AVX512_BF16;
#endif
#if defined(__AVX512VNNI__)
    bits |= MX_SIMD_AVX512_VNNI;
#endif
    return bits;
}

/* What the CPU running this process supports, asked at run time (cpuid): a library built with
   -march=native for another CPU (a shared cache folder) must not run instructions this one lacks. */
int mx_cpu_features(void) {
    int bits = 0;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        bits |= MX_SIMD_AVX512;
    /* AVX512-BF16 from cpuid (leaf 7, subleaf 1, EAX bit 5): clang before 16 has no "avx512bf16" for
       `__builtin_cpu_supports`, and its libraries were refused on every CPU with it */
    unsigned a, b, c, d;
    if (bits && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 5 & 1)) bits |= MX_SIMD_AVX512_BF16;
    if (bits && __builtin_cpu_supports("avx512vnni")) bits |= MX_SIMD_AVX512_VNNI;
#endif
    return bits;
}

/* One matrix-vector product y = W x (tests and benchmarks of the kernels alone). */
void mx_gemv(int wt, const void* w, const float* w_scale, int64_t N, int64_t K, const float* x, uint16_t* xb,
             float* y, int nt) {
    const mat m = {wt, w, w_scale, K};
    if (wt == MX_BF16) round_to_bf16(x, xb, K);
    barrier_t bar = {0, 0};
#pragma omp parallel num_threads(nt)
    {
        team tm = {omp_get_thread_num(), omp_get_num_threads(), &bar};
        int64_t lo, hi;
        my_rows(&tm, N, &lo, &hi);
        gemv_rows(m, x, xb, y, lo, hi);
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* Weight conversion: int4 quantisation and K-quant dequantisation (mixlab.h `mx_quantize_q4`,
   `mx_dequantize`). What reading a Q4_K_M file into int4 does per weight (an offloaded expert's
   read, `load_model(quant="int4")`): both bit for bit the PyTorch references they replace
   (`mixlab.ops.quant._quantize_int4_rows`, `mixlab.checkpoint.gguf_dequant`), so a model's bytes
   never depend on whether the kernels are loaded. */

/* float32 -> float16, round to nearest even (as PyTorch's `.to(torch.float16)` and F16C): overflow
   to infinity, subnormals rounded in float arithmetic (exact: a power-of-two scaling, then rint). */
static inline uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((a >> 13) & 0x3ffu); /* NaN stays NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520: rounds past 65504 */
    if (a >= 0x38800000u) {                      /* a normal float16: round at bit 13, rebias */
        const uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
        return sign | (uint16_t)(r >> 13);
    }
    return sign | (uint16_t)nearbyintf(fabsf(f) * 16777216.0f); /* subnormal (1024: the least normal) */
}

/* A code as PyTorch's float -> uint8 conversion gives it on x86 (truncation to int32, then its low
   byte; NaN and out-of-range values are int32's "indefinite" 0x80000000, so 0): what
   `_quantize_int4_rows` computes for a group whose scale is subnormal (1/d infinite). */
static inline uint8_t q4_code(float v) {
    return (v > -2147483648.0f && v < 2147483648.0f) ? (uint8_t)(int32_t)v : 0;
}

/* One group of G (32, 64, 128) float32 values: llama.cpp's quantize_row_q4_0_ref rounding, as
   mixlab.ops.quant: m the first element of largest |x| (the first NaN if any, as torch's argmax),
   d = m / -8, q = min(15, floor(x / d + 8.5)) with x / d as x * (1 / d) (0 where d == 0); bytes of
   each chunk of 32: input j low nibble, j + 16 high; the scale as float16. */
#if defined(__AVX512F__) && !defined(MX_CONVERT_PORTABLE) /* the portable loops: tests build them with this */
#define MX_CONVERT_AVX512 1
#else
#define MX_CONVERT_AVX512 0
#endif
static void quantize_group(const float* x, int64_t G, uint8_t* q, uint16_t* s) {
    int64_t at = 0;
#if MX_CONVERT_AVX512
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t j = 0; j < G; j += 16) {
        const __m512 a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(x + j), abs_mask));
        nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
        vmax = _mm512_max_ps(vmax, a);
    }
    if (!nan) { /* the first lane equal to the maximum, without a branch per piece (they mispredicted) */
        const __m512 amax = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        uint64_t eq[2] = {0, 0}; /* G <= 128 lanes */
        for (int64_t j = 0; j < G; j += 16) {
            const __m512 a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(x + j), abs_mask));
            eq[j >> 6] |= (uint64_t)_mm512_cmp_ps_mask(a, amax, _CMP_EQ_OQ) << (j & 63);
        }
        at = eq[0] ? __builtin_ctzll(eq[0]) : 64 + __builtin_ctzll(eq[1]);
    } else
#endif
    {
        float amax = -1.0f;
        for (int64_t j = 0; j < G; j++) {
            const float a = fabsf(x[j]);
            if (a != a) { /* NaN: torch's argmax takes the first */
                at = j;
                break;
            }
            if (a > amax) amax = a, at = j;
        }
    }
    const float d = x[at] / -8.0f, inv = d == 0.0f ? 0.0f : 1.0f / d;
#if MX_CONVERT_AVX512 && defined(__F16C__)
    *s = (uint16_t)_mm_cvtsi128_si32(_mm_cvtps_ph(_mm_set_ss(d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    *s = f32_to_f16(d);
#endif
    for (int64_t c = 0; c < G; c += 32, q += 16) {
#if MX_CONVERT_AVX512
        const __m512 vinv = _mm512_set1_ps(inv), half = _mm512_set1_ps(8.5f), fifteen = _mm512_set1_ps(15.0f);
        __m512i code[2];
        for (int h = 0; h < 2; h++) {
            __m512 t = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(x + c + 16 * h), vinv), half);
            t = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            code[h] = _mm512_cvttps_epi32(_mm512_min_ps(fifteen, t)); /* min(15, NaN) stays NaN: 0 */
        }
        _mm_storeu_si128((__m128i*)q, _mm512_cvtepi32_epi8(_mm512_or_si512(code[0], _mm512_slli_epi32(code[1], 4))));
#else
        for (int j = 0; j < 16; j++) {
            float lo = floorf(x[c + j] * inv + 8.5f), hi = floorf(x[c + j + 16] * inv + 8.5f);
            lo = 15.0f < lo ? 15.0f : lo; /* NaN stays NaN, as torch.clamp */
            hi = 15.0f < hi ? 15.0f : hi;
            q[j] = (uint8_t)(q4_code(lo) | (uint8_t)(q4_code(hi) << 4));
        }
#endif
    }
}

#if MX_CONVERT_AVX512
/* Sixteen consecutive groups of 32 (512 values) at once, the same bytes as `quantize_group` on each:
   the groups' maxima of |x| in one transposed reduction (each step halves the vectors, pairing the
   128-bit lanes, then the floats within them), and their scales, reciprocals and float16 roundings
   in one vector each, where one group at a time spent most of its time in horizontal maxima and
   scalar divisions. 0 (nothing written) when a value is NaN: the caller takes `quantize_group`. */
static int quantize16_g32(const float* x, uint8_t* q, uint16_t* s) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    __m512 m[16];
    __mmask16 nan = 0;
    for (int g = 0; g < 16; g++) {
        const __m512 a0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(x + 32 * g), abs_mask));
        const __m512 a1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(x + 32 * g + 16), abs_mask));
        nan |= _mm512_cmp_ps_mask(a0, a1, _CMP_UNORD_Q);
        m[g] = _mm512_max_ps(a0, a1);
    }
    if (nan) return 0;
    for (int i = 0; i < 8; i++) /* 128-bit lanes: [i: 0+2, 1+3 | i+8: 0+2, 1+3] */
        m[i] = _mm512_max_ps(_mm512_shuffle_f32x4(m[i], m[i + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(m[i], m[i + 8], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; i++) /* lanes: groups i, i+8, i+4, i+12 (4 floats each) */
        m[i] = _mm512_max_ps(_mm512_shuffle_f32x4(m[i], m[i + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(m[i], m[i + 4], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; i++) /* per lane: 2 floats of group i-ish, 2 of i+2-ish */
        m[i] = _mm512_max_ps(_mm512_shuffle_ps(m[i], m[i + 2], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(m[i], m[i + 2], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 mixed = _mm512_max_ps(_mm512_shuffle_ps(m[0], m[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_ps(m[0], m[1], _MM_SHUFFLE(3, 1, 3, 1)));
    /* lanes now hold groups 0 2 1 3 | 8 10 9 11 | 4 6 5 7 | 12 14 13 15: put them in order */
    const __m512 amax = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15),
                                              mixed);
    float am[16], mv[16], inv[16];
    _mm512_storeu_ps(am, amax);
    for (int g = 0; g < 16; g++) { /* the first element of largest |x|, sign kept */
        const __m512 a = _mm512_set1_ps(am[g]);
        const __m512 a0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(x + 32 * g), abs_mask));
        const __m512 a1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(x + 32 * g + 16), abs_mask));
        const uint32_t eq = (uint32_t)_mm512_cmp_ps_mask(a0, a, _CMP_EQ_OQ) |
                            (uint32_t)_mm512_cmp_ps_mask(a1, a, _CMP_EQ_OQ) << 16;
        mv[g] = x[32 * g + __builtin_ctz(eq)];
    }
    const __m512 d = _mm512_div_ps(_mm512_loadu_ps(mv), _mm512_set1_ps(-8.0f));
    _mm512_storeu_ps(inv, _mm512_maskz_div_ps(_mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_NEQ_UQ),
                                              _mm512_set1_ps(1.0f), d));
    _mm256_storeu_si256((__m256i*)s, _mm512_cvtps_ph(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m512 half = _mm512_set1_ps(8.5f), fifteen = _mm512_set1_ps(15.0f);
    for (int g = 0; g < 16; g++) {
        const __m512 vinv = _mm512_set1_ps(inv[g]);
        __m512i code[2];
        for (int h = 0; h < 2; h++) {
            __m512 t = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(x + 32 * g + 16 * h), vinv), half);
            t = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            code[h] = _mm512_cvttps_epi32(_mm512_min_ps(fifteen, t));
        }
        _mm_storeu_si128((__m128i*)(q + 16 * g),
                         _mm512_cvtepi32_epi8(_mm512_or_si512(code[0], _mm512_slli_epi32(code[1], 4))));
    }
    return 1;
}
#endif

void mx_quantize_q4(int xt, const void* x, int64_t R, int64_t D, int64_t G, uint8_t* q, uint16_t* s, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        float buf[512]; /* bf16 groups widened (exactly) to float32 */
        for (int64_t g = 0; g < D / G;) {
            const int64_t n = MX_CONVERT_AVX512 && G == 32 && g + 16 <= D / G ? 16 : 1; /* groups this pass */
            const float* xg = (const float*)x + r * D + g * G;
            if (xt == MX_BF16) {
                const uint16_t* b = (const uint16_t*)x + r * D + g * G;
                for (int64_t j = 0; j < n * G; j++) buf[j] = bf16_to_f32(b[j]);
                xg = buf;
            }
            uint8_t* qg = q + r * (D / 2) + g * (G / 2);
            uint16_t* sg = s + r * (D / G) + g;
#if MX_CONVERT_AVX512
            if (n == 16 && quantize16_g32(xg, qg, sg)) {
                g += 16;
                continue;
            }
#endif
            for (int64_t i = 0; i < n; i++) quantize_group(xg + i * G, G, qg + i * (G / 2), sg + i);
            g += n;
        }
    }
}

/* Q4_K / Q5_K's scale and min of sub-block j (6 bits each, packed in 12 bytes): for j < 4 the low 6
   bits of bytes j and j + 4; else byte j + 4's low / high nibble, with the top 2 bits of bytes
   j - 4 / j as bits 4-5. */
static inline void k_scale_min(int j, const uint8_t* sc, float* d, float* m) {
    if (j < 4) {
        *d = (float)(sc[j] & 63), *m = (float)(sc[j + 4] & 63);
    } else {
        *d = (float)((sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4));
        *m = (float)((sc[j + 4] >> 4) | ((sc[j] >> 6) << 4));
    }
}

/* One 256-value super-block (ggml-common.h's layouts; gguf_dequant's docstring). Q4_K: d, dmin (f16),
   12 scale bytes, 128 bytes of nibbles (sub-block 2i: the low nibbles of bytes 32i.., 2i + 1 the high);
   Q5_K: with 32 bytes of fifth bits (sub-block j: bit j) before the nibbles. y = (d sc) q - (dmin m).
   Inlined into one copy per type, each sub-block's loop with constant shifts: both GCC and clang
   vectorise that (clang left the shared copy's loops scalar: Q4_K 2.7x slower). */
static inline __attribute__((always_inline)) void deq_q45_k(const uint8_t* b, float* y, const int five) {
    uint16_t h[2];
    memcpy(h, b, 4);
    const float d = f16_to_f32(h[0]), dmin = f16_to_f32(h[1]);
    const uint8_t *sc = b + 4, *qh = b + 16, *qs = b + (five ? 48 : 16);
    for (int i = 0; i < 4; i++, qs += 32, y += 64) {
        float s, m;
        k_scale_min(2 * i, sc, &s, &m);
        const float d0 = d * s, m0 = dmin * m;
        k_scale_min(2 * i + 1, sc, &s, &m);
        const float d1 = d * s, m1 = dmin * m;
        for (int l = 0; l < 32; l++) {
            const int q = (qs[l] & 0xF) + (five ? ((qh[l] >> (2 * i)) & 1) << 4 : 0);
            y[l] = d0 * (float)q - m0;
        }
        for (int l = 0; l < 32; l++) {
            const int q = (qs[l] >> 4) + (five ? ((qh[l] >> (2 * i + 1)) & 1) << 4 : 0);
            y[32 + l] = d1 * (float)q - m1;
        }
    }
}

static void deq_q4_k(const uint8_t* b, float* y) { deq_q45_k(b, y, 0); }
static void deq_q5_k(const uint8_t* b, float* y) { deq_q45_k(b, y, 1); }

/* Q6_K: 128 bytes of low nibbles, 64 of 2-bit high parts, sixteen int8 scales, d (f16); per half of
   128 values, value 32 k + l (k < 4) takes nibble (k & 1 ? 32 + l : l) of the half's 64 bytes (low for
   k < 2) and bits 2k of high byte l; y = (d sc) (q - 32), sc per 16 values. */
static void deq_q6_k(const uint8_t* b, float* y) {
    uint16_t h;
    memcpy(&h, b + 208, 2);
    const float d = f16_to_f32(h);
    const int8_t* sc = (const int8_t*)(b + 192);
    for (int n = 0; n < 2; n++, y += 128) {
        const uint8_t *ql = b + 64 * n, *qh = b + 128 + 32 * n;
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) { /* loops over 16 values with one scale, constant shifts: vectorised */
            const uint8_t* lo = ql + 32 * (k & 1);
            const int shift = k & 2 ? 4 : 0;
            for (int h = 0; h < 2; h++) {
                const float dl = d * (float)sc[8 * n + 2 * k + h];
                for (int l = 16 * h; l < 16 * h + 16; l++) {
                    const int q = (((lo[l] >> shift) & 0xF) | ((qh[l] >> (2 * k)) & 3) << 4) - 32;
                    y[32 * k + l] = dl * (float)q;
                }
            }
        }
    }
}

int mx_dequantize(int type, const uint8_t* x, int64_t B, int yt, void* y, int nt) {
    const int64_t size = type == MX_GGML_Q4_K ? 144 : type == MX_GGML_Q5_K ? 176 : type == MX_GGML_Q6_K ? 210 : 0;
    if (!size || (yt != MX_F32 && yt != MX_BF16)) return -1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < B; i++) {
        float buf[256]; /* bf16 out: the float32 values, then rounded (as PyTorch's copy_ rounds them) */
        float* out = yt == MX_F32 ? (float*)y + i * 256 : buf;
        if (type == MX_GGML_Q6_K) deq_q6_k(x + i * size, out);
        else if (type == MX_GGML_Q5_K) deq_q5_k(x + i * size, out);
        else deq_q4_k(x + i * size, out);
        if (yt == MX_BF16) round_to_bf16(buf, (uint16_t*)y + i * 256, 256);
    }
    return 0;
}
