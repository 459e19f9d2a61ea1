"""C source of the fused CPU kernels for ``binary`` and ``int2`` (compiled on first use by cpu.py).

Kept as a Python string so it ships with the package without package-data rules. Every kernel
repeats the reference arithmetic of sign.py exactly: fp32 math, one correctly rounded IEEE
operation at a time (the build uses -ffp-contract=off, so no FMA), fp16/bf16 conversions
round to nearest even. The order-dependent sums stay in torch (see cpu.py); kernels only do
elementwise work, bit packing and the per-vector scale arithmetic.

Two builds from one source: with AVX2+F16C (x86-64, -march=native) the inner loops use
intrinsics (movemask packs 8 sign bits in one instruction); CF_PORTABLE builds plain C, which
the tests also compare against the reference.
"""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if !defined(CF_PORTABLE) && defined(__AVX2__) && defined(__F16C__)
#define CF_SIMD 1
#include <immintrin.h>
#endif

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
#define CF_FP16_MAX 65504.0f
#define CF_PAR_MIN 65536  /* elements below which threads cost more than they save */

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* IEEE binary16 <-> binary32, bit-exact (the algorithms torch's c10::Half uses). */
static inline float cf_h2f(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
    return u2f(sign | (two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized)));
}
static inline uint16_t cf_f2h(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f2u(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = u2f((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f2u(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
/* bf16 round to nearest even, finite inputs (decoders never produce NaN/Inf). */
static inline uint16_t cf_f2bf(float f) {
    uint32_t u = f2u(f);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float cf_bf2f(uint16_t h) { return u2f((uint32_t)h << 16); }

static inline float load1(const void *x, int dt, int64_t i) {
    if (dt == DT_F32) return ((const float *)x)[i];
    if (dt == DT_F16) return cf_h2f(((const uint16_t *)x)[i]);
    return cf_bf2f(((const uint16_t *)x)[i]);
}
static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline void wr16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

static inline void store1(void *out, int dt, int64_t i, float v) {
    if (dt == DT_F32) { ((float *)out)[i] = v; return; }
    if (dt == DT_F16) {  /* saturate like numeric.finish: clamp, then round to nearest even */
        v = v > CF_FP16_MAX ? CF_FP16_MAX : (v < -CF_FP16_MAX ? -CF_FP16_MAX : v);
        ((uint16_t *)out)[i] = cf_f2h(v);
        return;
    }
    ((uint16_t *)out)[i] = cf_f2bf(v);
}

#ifdef CF_SIMD
static inline __m256 load8(const void *x, int dt, int64_t i) {
    if (dt == DT_F32) return _mm256_loadu_ps((const float *)x + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    if (dt == DT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline void store8(void *out, int dt, int64_t i, __m256 v) {
    if (dt == DT_F32) { _mm256_storeu_ps((float *)out + i, v); return; }
    if (dt == DT_F16) {
        v = _mm256_max_ps(_mm256_min_ps(v, _mm256_set1_ps(CF_FP16_MAX)), _mm256_set1_ps(-CF_FP16_MAX));
        _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        return;
    }
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)out + i), packed);
}
#endif

/* 8-bit -> 16-bit bit spread (bit i -> bit 2i), for interleaving int2 magnitude and sign bits. */
static inline uint16_t spread8(uint32_t m) {
    m = (m | (m << 4)) & 0x0F0Fu;
    m = (m | (m << 2)) & 0x3333u;
    m = (m | (m << 1)) & 0x5555u;
    return (uint16_t)m;
}

/* |x| as fp32 into ab (rows x c, dense) and, if bits != NULL, the sign bits [x >= 0] packed
   LSB-first into bits (rows x p), pad bits 0. x rows are ldx elements apart. With sub (fp32,
   rows x c dense, may be NULL) the kernels code x - sub instead: the residual x.float() - pred
   without materialising it (one correctly rounded subtraction, as in torch). */
static inline void abs_bits_row(const void *x, int dt, int64_t c, const float *sub, float *ab, uint8_t *bits) {
    int64_t j = 0;
#ifdef CF_SIMD
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 zero = _mm256_setzero_ps();
    for (; j + 8 <= c; j += 8) {
        __m256 v = load8(x, dt, j);
        if (sub) v = _mm256_sub_ps(v, _mm256_loadu_ps(sub + j));
        _mm256_storeu_ps(ab + j, _mm256_and_ps(v, absmask));
        if (bits) bits[j >> 3] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GE_OQ));
    }
#endif
    for (; j < c; j += 8) {
        uint32_t byte = 0;
        int64_t end = j + 8 < c ? j + 8 : c;
        for (int64_t k = j; k < end; ++k) {
            float v = load1(x, dt, k);
            if (sub) v = v - sub[k];
            ab[k] = fabsf(v);
            byte |= (uint32_t)(v >= 0.0f) << (k - j);
        }
        if (bits) bits[j >> 3] = (uint8_t)byte;
    }
}

void cf_abs_bits(const void *x, int dt, int64_t rows, int64_t c, int64_t ldx, const float *sub, float *ab,
                 uint8_t *bits, int64_t p) {
    const size_t es = dt == DT_F32 ? 4 : 2;
    #pragma omp parallel for schedule(static) if (rows * c >= CF_PAR_MIN)
    for (int64_t r = 0; r < rows; ++r)
        abs_bits_row((const uint8_t *)x + (size_t)r * ldx * es, dt, c, sub ? sub + r * c : NULL, ab + r * c,
                     bits ? bits + r * p : NULL);
}

/* In place: tok /= c, chan /= n (torch's division by a Python int, fp32). */
void cf_div_sums(float *tok, int64_t n, float *chan, int64_t c) {
    const float fc = (float)c, fn = (float)n;
    for (int64_t i = 0; i < n; ++i) tok[i] = tok[i] / fc;
    for (int64_t j = 0; j < c; ++j) chan[j] = chan[j] / fn;
}

static inline float nanmax(float acc, float v) { return (v > acc || v != v) ? v : acc; }

/* sign.sign_scales after mean(tok), part 1: the finiteness probe amax(tok) + amax(chan), and the
   argument of the balance gain's square root, q = amax(chan) / max(amax(tokn), tiny), into work[0]
   (work[1] = 1 where both maxima are > 0, else the gain is 1). *mean holds torch's sum(tok) on entry
   and mean(tok) on return: CPU torch computes tok.mean() as sum(tok) followed by one fp32 division
   by n (tests/test_fused_cpu.py checks that), and doing the division here saves a torch dispatch;
   reading the sum through a pointer saves a tensor -> Python float round trip. Returns 1 when the
   probe is not finite: the caller then falls back to the reference, which raises on NaN/Inf or
   re-sums with clamping. The square root itself is torch's (CPU torch.sqrt is not always correctly
   rounded, so an IEEE sqrtf here would differ from the reference in the last bit). */
int cf_sign_stats(const float *tok, int64_t n, const float *chan, int64_t c, float *mean, float *work) {
    const float tiny = 0x1.0p-126f;
    *mean = *mean / (float)n;
    float tmax = -INFINITY, cmax = -INFINITY;
    for (int64_t i = 0; i < n; ++i) tmax = nanmax(tmax, tok[i]);
    for (int64_t j = 0; j < c; ++j) cmax = nanmax(cmax, chan[j]);
    if (!isfinite(tmax + cmax)) return 1;
    const float den = *mean < tiny ? tiny : *mean;
    float tnmax = -INFINITY;
    for (int64_t i = 0; i < n; ++i) tnmax = nanmax(tnmax, tok[i] / den);
    work[0] = cmax / (tnmax < tiny ? tiny : tnmax);
    work[1] = (tnmax > 0.0f && cmax > 0.0f) ? 1.0f : 0.0f;
    return 0;
}

/* Part 2: g = sqrt(q) (*root, torch's) where work[1] else 1; a = fp16(clamp(tokn * g)),
   b = fp16(clamp(chan / max(g, tiny))), written unaligned into a16 (n) and b16 (c). */
static void sign_factors(const float *tok, int64_t n, const float *chan, int64_t c, float mean, const float *work,
                         float sqrt_q, uint8_t *a16, uint8_t *b16) {
    const float tiny = 0x1.0p-126f;
    const float den = mean < tiny ? tiny : mean;
    const float g = work[1] != 0.0f ? sqrt_q : 1.0f;
    const float gden = g < tiny ? tiny : g;
    for (int64_t i = 0; i < n; ++i) {
        float v = (tok[i] / den) * g;
        v = v > CF_FP16_MAX ? CF_FP16_MAX : (v < -CF_FP16_MAX ? -CF_FP16_MAX : v);
        wr16(a16 + 2 * i, cf_f2h(v));
    }
    for (int64_t j = 0; j < c; ++j) {
        float v = chan[j] / gden;
        v = v > CF_FP16_MAX ? CF_FP16_MAX : (v < -CF_FP16_MAX ? -CF_FP16_MAX : v);
        wr16(b16 + 2 * j, cf_f2h(v));
    }
}

/* int2 fields (sign << 1) | [|x| * (1/b[c]) > a[n]], 4 per byte LSB-first, pad fields 0.
   a16/b16 are the wire factors (unaligned fp16). */
static int int2_fields(const void *x, int dt, int64_t rows, int64_t c, int64_t ldx, const float *sub,
                    const uint8_t *a16, const uint8_t *b16, uint8_t *out, int64_t p) {
    float *inv_b = (float *)malloc((size_t)(c + 8) * sizeof(float));
    if (!inv_b) return -1;
    for (int64_t j = 0; j < c; ++j) inv_b[j] = 1.0f / cf_h2f(rd16(b16 + 2 * j));
    uint16_t spread[256];  /* byte -> its bits at even positions: two lookups interleave 8 fields */
    for (uint32_t m = 0; m < 256; ++m) spread[m] = spread8(m);
    const size_t es = dt == DT_F32 ? 4 : 2;
    #pragma omp parallel for schedule(static) if (rows * c >= CF_PAR_MIN)
    for (int64_t r = 0; r < rows; ++r) {
        const void *xr = (const uint8_t *)x + (size_t)r * ldx * es;
        const float *sr = sub ? sub + r * c : NULL;
        uint8_t *o = out + r * p;
        const float a = cf_h2f(rd16(a16 + 2 * r));
        int64_t j = 0;
#ifdef CF_SIMD
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        const __m256 zero = _mm256_setzero_ps(), av = _mm256_set1_ps(a);
        for (; j + 8 <= c; j += 8) {
            __m256 v = load8(xr, dt, j);
            if (sr) v = _mm256_sub_ps(v, _mm256_loadu_ps(sr + j));
            __m256 t = _mm256_mul_ps(_mm256_and_ps(v, absmask), _mm256_loadu_ps(inv_b + j));
            uint32_t s = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GE_OQ));
            uint32_t m = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(t, av, _CMP_GT_OQ));
            wr16(o + (j >> 2), (uint16_t)(spread[m] | (spread[s] << 1)));
        }
#endif
        for (; j < c; j += 4) {
            uint32_t byte = 0;
            int64_t end = j + 4 < c ? j + 4 : c;
            for (int64_t k = j; k < end; ++k) {
                float v = load1(xr, dt, k);
                if (sr) v = v - sr[k];
                uint32_t f = ((uint32_t)(v >= 0.0f) << 1) | (uint32_t)(fabsf(v) * inv_b[k] > a);
                byte |= f << (2 * (k - j));
            }
            o[j >> 2] = (uint8_t)byte;
        }
    }
    free(inv_b);
    return 0;
}

/* The rest of an encode after torch's sqrt, in one call: the wire factors into payload (after the
   n*p field bytes) and, for bits == 2, the int2 fields (binary's sign bits came with |x|). Returns -1
   when the int2 scratch cannot be allocated. */
int cf_sign_finish(const float *tok, int64_t n, const float *chan, int64_t c, const float *mean, const float *work,
                   const float *root, int bits, const void *x, int dt, int64_t ldx, const float *sub, uint8_t *payload,
                   int64_t p) {
    uint8_t *a16 = payload + n * p, *b16 = a16 + 2 * n;
    sign_factors(tok, n, chan, c, *mean, work, *root, a16, b16);
    return bits == 2 ? int2_fields(x, dt, n, c, ldx, sub, a16, b16, payload, p) : 0;
}

/* Decode x_hat[n, c] = (level(field) * b[c]) * a[n] into out (dtype odt). bits = 1 (binary:
   level -1/+1) or 2 (int2: levels lv[field]). a16/b16 follow the fields in the payload.
   acc (fp32 out only, may be NULL): out = acc + x_hat, one more separately rounded op (the
   residual update base + decoded without a second pass; -ffp-contract=off keeps it FMA-free). */
int cf_sign_decode(const uint8_t *payload, int64_t n, int64_t c, int bits, const float *lv, void *out,
                    int odt, const float *acc) {
    const int64_t p = bits == 1 ? (c + 7) / 8 : (c + 3) / 4;
    const uint8_t *a16 = payload + n * p, *b16 = a16 + 2 * n;
    float *b = (float *)malloc((size_t)(c + 8) * sizeof(float));
    if (!b) return -1;
    for (int64_t j = 0; j < c; ++j) b[j] = cf_h2f(rd16(b16 + 2 * j));
    #pragma omp parallel for schedule(static) if (n * c >= CF_PAR_MIN)
    for (int64_t r = 0; r < n; ++r) {
        const uint8_t *f = payload + r * p;
        const float a = cf_h2f(rd16(a16 + 2 * r));
        void *o = (uint8_t *)out + (size_t)r * c * (odt == DT_F32 ? 4 : 2);
        const float *accr = acc ? acc + r * c : NULL;
        int64_t j = 0;
#ifdef CF_SIMD
        const __m256 av = _mm256_set1_ps(a);
        if (bits == 1) {
            const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
            const __m256 plus = _mm256_set1_ps(1.0f), minus = _mm256_set1_ps(-1.0f);
            for (; j + 8 <= c; j += 8) {
                __m256i hit = _mm256_and_si256(_mm256_set1_epi32(f[j >> 3]), sel);
                __m256 is0 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(hit, _mm256_setzero_si256()));
                __m256 lvl = _mm256_blendv_ps(plus, minus, is0);
                __m256 v = _mm256_mul_ps(_mm256_mul_ps(lvl, _mm256_loadu_ps(b + j)), av);
                if (accr) v = _mm256_add_ps(_mm256_loadu_ps(accr + j), v);
                store8(o, odt, j, v);
            }
        } else {
            const __m256i sh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
            const __m256 table = _mm256_setr_ps(lv[0], lv[1], lv[2], lv[3], lv[0], lv[1], lv[2], lv[3]);
            for (; j + 8 <= c; j += 8) {
                __m256i w = _mm256_set1_epi32(rd16(f + (j >> 2)));
                __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(w, sh), _mm256_set1_epi32(3));
                __m256 lvl = _mm256_permutevar8x32_ps(table, idx);
                __m256 v = _mm256_mul_ps(_mm256_mul_ps(lvl, _mm256_loadu_ps(b + j)), av);
                if (accr) v = _mm256_add_ps(_mm256_loadu_ps(accr + j), v);
                store8(o, odt, j, v);
            }
        }
#endif
        for (; j < c; ++j) {
            float lvl;
            if (bits == 1) lvl = (f[j >> 3] >> (j & 7)) & 1 ? 1.0f : -1.0f;
            else lvl = lv[(f[j >> 2] >> (2 * (j & 3))) & 3];
            float v = (lvl * b[j]) * a;
            if (accr) v = accr[j] + v;
            store1(o, odt, j, v);
        }
    }
    free(b);
    return 0;
}

int cf_simd(void) {
#ifdef CF_SIMD
    return 1;
#else
    return 0;
#endif
}
"""
