/* The interface between mixlab's native kernels (decode.c) and Python (mixlab/ops/native/__init__.py):
 * the weight types, the structures Python fills in, and the entry points.
 *
 * Python mirrors every structure here as a ctypes Structure with the same fields in the same order.
 * Nothing can check field order across that boundary, so both sides carry MX_ABI_VERSION, and the
 * library reports its structure sizes and field offsets (`mx_sizeof`, `mx_offsetof`): Python refuses
 * a library whose version, sizes or offsets differ from its own instead of passing it pointers it would misread. Any change to a structure,
 * an enum or an entry point's arguments bumps MX_ABI_VERSION here and ABI_VERSION in __init__.py.
 *
 * Adding a kernel: declare the entry point below, define it in decode.c (or a new .c file listed in
 * SOURCES in __init__.py), give its argument types in _SIGNATURES there, and wrap it as a
 * torch.library custom op in ops.py. A new weight type: a new MX_* code below, its branch in
 * decode.c's `gemm_rows`, and its torch dtype in TYPE_CODES.
 *
 * Shape legend: D model width, H query heads, G key/value heads, Hd head dim, C cache slots,
 * E experts, K experts per token, F expert FFN width, V vocabulary, L layers, T tokens.
 */

#ifndef MIXLAB_H
#define MIXLAB_H

#include <stdint.h>

#ifndef MX_ABI_VERSION
#define MX_ABI_VERSION 12
#endif

/* Element types of weights (`wt`), caches (`ct`) and embeddings (`et`). */
enum {
    MX_F32 = 0,
    MX_BF16 = 1, /* raw bfloat16 bits */
    MX_I8 = 2,   /* int8, one float32 scale per output row: w = q * s */
    /* int4 (mixlab.ops.quant, llama.cpp Q4_0's layout): rows of K/2 bytes, each chunk of 32 inputs
       in 16 bytes (input j low nibble, j + 16 high), w = (q - 8) * s with one float16 scale per
       group of 32, 64 or 128 inputs; the `*_scale` pointers then point at float16 [rows, K / G]. */
    MX_Q4_32 = 3,
    MX_Q4_64 = 4,
    MX_Q4_128 = 5,
    /* The same int4 weights, multiplied by activations rounded to int8 per block of 32 inputs
       (llama.cpp's Q8_0: d = max|x| / 127, q = round-to-even(x * 127 / max|x|)), with integer dot
       products (AVX512-VNNI `vpdpbusd`; without VNNI the same sums from AVX512-BW): about 4x less
       work per weight than the float32 path above, which cannot keep up with the memory. Not
       exact: decode.c `quant_a8` and mixlab.ops.quant
       `round_activations_q8` (the reference the tests compare against) describe the rounding. */
    MX_Q4_32_A8 = 6,
    MX_Q4_64_A8 = 7,
    MX_Q4_128_A8 = 8,
    /* int8 weights as MX_I8 (rows of K int8 codes, one float32 scale per row), multiplied by
       activations rounded to int8 as above (per block of 32, natural input order) with integer dot
       products: what llama.cpp's Q8_0 x Q8_0 does; about 3x less work per weight than MX_I8, whose
       widening of each weight to float32 cannot keep up with the memory at Mixtral's widths. Rows
       of K a multiple of 32. Not exact (the activations' rounding): decode.c `tile_i8a8`. */
    MX_I8_A8 = 9,
};

/* What `mx_simd` (compiled in) and `mx_cpu_features` (this CPU, detected at run time) report. */
enum {
    MX_SIMD_AVX512 = 1,      /* AVX-512F (+BW/VL): float32 and int8 kernels */
    MX_SIMD_AVX512_BF16 = 2, /* AVX512-BF16: bf16 kernels */
    MX_SIMD_AVX512_VNNI = 4, /* AVX512-VNNI: `vpdpbusd` in the int x int8 kernels (MX_Q4_*_A8, MX_I8_A8) */
};

typedef struct { /* one layer's weights; scales are NULL for float weights; router NULL when dense */
    const float* attn_norm;
    const void* wqkv;
    const float* wqkv_scale;
    const void* wo;
    const float* wo_scale;
    const float* ffn_norm;
    const float* router; /* [E, D] float32 */
    const void* w13;     /* [E, 2F, D]: gate rows, then up rows */
    const float* w13_scale;
    const void* w2; /* [E, D, F] */
    const float* w2_scale;
    void* k_cache; /* [G, C, Hd] of type ct: this layer's cache for the one sequence */
    void* v_cache;
    /* bf16 weights also kept in 32-row panels (`mx_pack_bf16`), or NULL: what the engine step
       (`mx_decode_batch`) reads instead of the rows above; the batch-1 step reads the rows */
    const void *wqkv_p, *wo_p, *w13_p, *w2_p;
} mx_layer;

typedef struct {
    int64_t D, H, G, Hd, E, K, F, V, L, window; /* window 0: no sliding window */
    float eps;
    int wt, ct, et;         /* weight, cache and embedding types */
    const float* inv_freq;  /* [Hd / 2] rotary frequencies */
    const void* embed;      /* [V, D] of type et */
    const float* out_norm;
    const void* out;        /* [V, D] */
    const float* out_scale;
    const mx_layer* layers; /* [L] */
    const void* out_p;      /* `out` in 32-row panels (bf16), or NULL (see mx_layer's `*_p`) */
} mx_model;

typedef struct { /* work buffers, float32 unless noted (bf16 copies: the rounded inputs of bf16 GEMVs) */
    float *x, *h, *qkv, *att, *scores, *o, *g, *a, *y, *mix; /* scores [H, C]; g [max(K 2F, D)]; mix [L, K] */
    uint16_t *hb, *attb, *ab;
    int32_t* chosen; /* [L, K]: the experts each layer chose */
    int64_t* top;    /* [1] or NULL: the logits' argmax (first index on ties; -1 when one is NaN) */
} mx_bufs;

typedef struct { /* the experts of one MoE layer for T tokens (`mx_moe`); N = T * K (token, slot) pairs */
    int64_t T, D, F, E, K; /* E <= 256 */
    int wt;
    const float* x;     /* [T, D] */
    const int64_t* idx; /* [T, K] chosen experts */
    const float* mix;   /* [T, K] their weights */
    const void* w13;    /* [E, 2F, D] */
    const float* w13_scale;
    const void* w2; /* [E, D, F] */
    const float* w2_scale;
    float* out; /* [T, D] */
    /* work buffers: xs [N, D], xsb [N, D] (bf16), g [N, 2F], a [N, F], ab [N, F] (bf16), ys [N, D],
       order and inverse [N] */
    float* xs;
    uint16_t* xsb;
    float *g, *a;
    uint16_t* ab;
    float* ys;
    int32_t *order, *inverse;
} mx_moe_args;

/* LoRA adapters served over the base (the engine's `adapters=`): one adapter's low-rank update of one
   weight, rows x that the weight multiplies getting y += B (A x) (the adapter's scale folded into B). */
typedef struct {
    const float* A; /* [R, I], or NULL: the adapter leaves this weight alone */
    const float* B; /* [R, X]: B transposed */
    int64_t R;
} mx_lora;

/* The weights an adapter can update, per layer (`mx_batch.lora`): the fused qkv, the attention
   output, the router (its logits, before the top K) and each expert's w13 and w2 (a dense FFN: expert 0). */
enum { MX_LORA_QKV = 0, MX_LORA_WO = 1, MX_LORA_ROUTER = 2, MX_LORA_W13 = 3, MX_LORA_W2 = 4, MX_LORA_SITES = 5 };

typedef struct { /* one engine step (`mx_decode_batch`): T tokens, rows of B sequences' items */
    int64_t T, C;          /* tokens (rows); positions per cache slot */
    int64_t nt;            /* threads `scores` has room for (a call uses at most this many) */
    int64_t R;             /* rows whose logits are wanted */
    const int64_t* token;  /* [T] */
    const int64_t* pos;    /* [T] each token's position */
    const int64_t* seq;    /* [T] each token's slot in the pool: one sequence's tokens are consecutive
                              rows at consecutive positions (a decoding token, or a prompt chunk) */
    const int64_t* rows;   /* [R] the rows whose logits are written, in this order */
    int64_t* cache_pos;    /* [S, C]: the position each cache index holds (-1 empty); row seq[t] gets
                              pos[t] at index pos[t] % C */
    void* const* k_cache;  /* [L]: each layer's pool [S, G, C, Hd] of type ct (not mx_layer's) */
    void* const* v_cache;
    float* logits;         /* [R, V] */
    int32_t* chosen;       /* [L, T, K]: the experts each layer chose for each token */
    /* work buffers, float32 unless noted; N = T * K (token, expert) pairs */
    float *x, *h, *o;      /* [T, D] */
    float *qkv, *att;      /* [T, (H + 2 G) Hd], [T, H Hd] */
    float *rope, *scores;  /* [T, Hd] (cos, then sin); [nt, (2 Hd + 6) Cp], Cp = C rounded up to 16:
                              each thread's attention scratch (decode.c `chunk_scratch`) */
    float* mix;            /* [T, K] */
    uint16_t *hb, *attb;   /* bf16: [T, D], [T, H Hd] */
    int64_t* idx;          /* [T, K] */
    float *xs, *g, *a, *ys; /* [N, D], [N, 2F], [N, F], [N, D] */
    uint16_t *xsb, *ab;    /* bf16: [N, D], [N, F] */
    int32_t *order, *inverse; /* [N] */
    int64_t* top;          /* [R] or NULL: each logit row's argmax (first index on ties; -1 when one is NaN) */
    int64_t invariant;     /* nonzero: batch-invariant (each row's numbers whatever else the step holds;
                              bf16 and float32 weights; see mx_decode_batch) */
    /* LoRA adapters (J = 0: none): after each product an adapter updates, the rows under it get their
       update, computed in float32 from the product's input (its bf16 rounding for bf16 weights) */
    int64_t J;             /* adapters */
    const mx_lora* lora;   /* [L, MX_LORA_SITES, E, J] (router, qkv, wo: expert 0 only) */
    int32_t* adapter;      /* [T]: each row's adapter in [0, J), or -1 (the base); moved with the rows
                              the last layer keeps (see mx_decode_batch) */
    float* lora_u;         /* [(1 + nt) N, lora_ld]: work buffer, each row's A x (N rows shared, then N of
                              each thread's own: decode.c, "LoRA adapters"); lora_ld >= every R */
    int64_t lora_ld;
} mx_batch;

/* Structures whose size `mx_sizeof` reports, in this order. */
enum { MX_SIZEOF_LAYER = 0, MX_SIZEOF_MODEL = 1, MX_SIZEOF_BUFS = 2, MX_SIZEOF_MOE_ARGS = 3, MX_SIZEOF_BATCH = 4,
       MX_SIZEOF_LORA = 5 };

/* The ABI check: MX_ABI_VERSION, sizeof of structure `which` (-1 for an unknown one), and the
   offset of its field number `field` in declaration order (-1 past the last field). */
int mx_abi_version(void);
int64_t mx_sizeof(int which);
int64_t mx_offsetof(int which, int field);
/* SIMD bits (MX_SIMD_*) this build uses, and those this CPU has (run-time detection). */
int mx_simd(void);
int mx_cpu_features(void);

void mx_decode_step(const mx_model* m, const mx_bufs* b, int64_t token, int64_t pos, int64_t* cache_pos,
                    int64_t C, int64_t slot, int64_t n, float* logits, int nt);
/* One engine step (`mx_batch`): each sequence's item is one decoding token or a prompt chunk of
   consecutive positions; every dense weight read once for all T tokens, each chosen expert once for
   the tokens that chose it; writes logits [R, V] (the rows asked for) and chosen [L, T, K]. */
void mx_decode_batch(const mx_model* m, const mx_batch* p, int nt);
/* `act16` (int8 weights, MX_I8): X rounded to bf16 (XB) and the int8 rows multiplied as bf16, as a
   bf16 model's engine step does (`mat.act16`: panels for many rows); exact for X already bf16. */
void mx_linear(int wt, const void* w, const float* w_scale, int64_t N, int64_t K, int64_t M, const float* X,
               uint16_t* XB, float* Y, int act16, int nt);
void mx_moe(const mx_moe_args* p, int nt);
/* P = the N rows of bf16 matrix w [N, K] in 32-row panels (N % 32 == 0, K % 32 == 0): panel r / 32
   holds rows r..r+31 as P[(r / 32) * 32 K + (k / 2) * 64 + 2 (r % 32) + (k % 2)], so that one
   64-byte vector holds 16 rows' weights for inputs (k, k + 1) and a panel streams as one sequential
   read. `mx_linear_packed`: mx_linear for bf16 weights with their panels. */
void mx_pack_bf16(const void* w, int64_t N, int64_t K, void* P, int nt);
void mx_linear_packed(const void* w, const void* P, int64_t N, int64_t K, int64_t M, const float* X, uint16_t* XB,
                      float* Y, int nt);
/* Whether the bf16 panels run on AMX's tile unit (Intel Xeon, Linux): `want` 1 turns it on where
   this CPU, this build and the kernel allow, 0 off, -1 only asks; returns 1 when on. */
int mx_amx(int want);
void mx_gemv(int wt, const void* w, const float* w_scale, int64_t N, int64_t K, const float* x, uint16_t* xb,
             float* y, int nt);

/* Weight conversion, bit for bit the PyTorch references (decode.c, "Weight conversion").
   `mx_quantize_q4`: R rows of D values of type xt (MX_F32 or MX_BF16) to int4 (MX_Q4_*'s layout) with
   groups of G (32, 64, 128; D % G == 0): q [R, D / 2] codes, s [R, D / G] float16 scales
   (mixlab.ops.quant.quantize_int4). `mx_dequantize`: B blocks of a ggml K-quant type (ggml's type ids
   below) to y [B, 256] of type yt (MX_F32: llama.cpp's dequantize_row_*, mixlab.checkpoint.gguf_dequant;
   MX_BF16: those rounded to nearest even, as PyTorch rounds them; a NaN's payload may differ); -1 for
   a type it does not take, else 0. */
enum { MX_GGML_Q4_K = 12, MX_GGML_Q5_K = 13, MX_GGML_Q6_K = 14 };
void mx_quantize_q4(int xt, const void* x, int64_t R, int64_t D, int64_t G, uint8_t* q, uint16_t* s, int nt);
int mx_dequantize(int type, const uint8_t* x, int64_t B, int yt, void* y, int nt);

#endif
