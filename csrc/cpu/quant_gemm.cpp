// int4 / int8-weight matrix products for the CPU: out[M, N] = x[M, K] @ W[N, K]^T in float32.
//
// A job is split into chunks of weight rows (output columns) that the threads claim one at a time
// (thread_pool.h). Within a
// chunk, a tile computes MT rows of x against NR weight rows: each weight block (32 elements) is unpacked once
// into float32 registers and used for all MT rows of x, so decode (M = 1) reads every weight once and prefill
// reuses each chunk of weights from cache for every tile of x.
// AVX-512 unpacks int4 by table lookup: per group, table[i] = d * i + m (i = 0..15), and vpermps picks
// table[q] for 16 nibbles at once, giving the dequantized weights in two instructions. AVX2 converts and
// scales instead; the scalar fallback is plain loops. Layouts: smolvlm_fast/formats/int4.py.
#include "quant_gemm.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "half.h"
#include "simd.h"
#include "thread_pool.h"

namespace smolvlm_cpu {
namespace {

constexpr int kBlock = 32;       // elements per packed block
constexpr int kMaxMT = 8;        // rows of x per tile
constexpr int kGroupChunk = 64;  // groups whose scales a tile converts to float32 at a time
// Software prefetch distance along the weight rows, in bytes: the hardware prefetchers alone leave decode
// (weights streamed from L3 / memory) at a third of the speed it has from L2 (measured on Sapphire Rapids).
constexpr int kPrefetchInt4 = 2048, kPrefetchQ8 = 4096, kPrefetchF32 = 4096;

inline void prefetch(const void* p, int64_t ahead) {
#if defined(__x86_64__) || defined(__i386__)
    // a hint: an address past the end of the array is dropped by the CPU, never dereferenced
    _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + ahead), _MM_HINT_T0);
#endif
}

#if defined(__SSE2__)
inline __m128i load16(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline __m128i load8(const void* p) { return _mm_loadl_epi64(static_cast<const __m128i*>(p)); }
#endif

// Weight rows per tile for MT rows of x: as many accumulators as the registers hold.
constexpr int nr_for(int mt) {
#if SMOLVLM_AVX512
    return mt <= 2 ? 4 : mt <= 4 ? 2 : 1;
#else
    return mt <= 2 ? 2 : 1;
#endif
}

// ---------------------------------------------------------------- float16

void halves_to_floats(const uint16_t* src, int n, float* dst) {
    int i = 0;
#if SMOLVLM_AVX512
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
    if (i < n) {
        const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(dst + i, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, src + i)));
        return;
    }
#elif SMOLVLM_AVX2
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(load16(src + i)));
#endif
    for (; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}

// Rows per chunk: about 4 chunks per thread (so a late thread costs little), a multiple of 4, at most max_rows.
int64_t chunk_rows(int64_t n, int64_t max_rows) {
    const int64_t threads = pool_threads();
    const int64_t per_chunk = (n + 4 * threads - 1) / (4 * threads);
    return std::max<int64_t>(4, std::min(max_rows, (per_chunk + 3) / 4 * 4));
}

// ---------------------------------------------------------------- tiles
// Kernel::tile<MT, NR>(x, w, n, out, ldo): out[i * ldo + r] = sum_k x[i * K + k] * W[n + r, k], i < MT, r < NR.
// Int4 groups hold BPG blocks; ASYM: w = d * q + m, else w = d * (q - 8).

template <bool ASYM, int BPG>
struct Int4Kernel {
    using Matrix = Int4Matrix;
    static constexpr int GS = BPG * kBlock;
    template <int MT, int NR>
    static void tile(const float* x, const Int4Matrix& w, int64_t n, float* out, int64_t ldo);
};

struct Q8Kernel {
    using Matrix = Q8Matrix;
    template <int MT, int NR>
    static void tile(const float* x, const Q8Matrix& w, int64_t n, float* out, int64_t ldo);
};

struct F32Kernel {
    using Matrix = F32Matrix;
    template <int MT, int NR>
    static void tile(const float* x, const F32Matrix& w, int64_t n, float* out, int64_t ldo);
};

// The group scales (or mins) of rows n .. n + NR - 1, groups g0 .. g0 + gn - 1, as float32; row r's start at
// dst + r * (the stride returned). When the chunk is all of a row, the NR rows are one contiguous run.
template <int NR>
int group_scales(const uint16_t* src, int64_t G, int64_t n, int64_t g0, int gn, float* dst) {
    if (gn == G) {
        halves_to_floats(src + n * G, NR * gn, dst);
        return gn;
    }
    for (int r = 0; r < NR; ++r) halves_to_floats(src + (n + r) * G + g0, gn, dst + r * kGroupChunk);
    return kGroupChunk;
}

#if SMOLVLM_AVX512

// out[r] = the sum of v[r]'s lanes, r < NR; four at once by a transposing reduction.
template <int NR>
inline void store_sums(const __m512 (&v)[NR], float* out) {
    if constexpr (NR == 4) {
        // per 128-bit lane: ab = [a0 + a2, b0 + b2, a1 + a3, b1 + b3], cd likewise, s = [a, b, c, d]
        const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
        const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
        const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                       _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
        const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
        _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    } else {
        for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(v[r]);
    }
}

// out[i * ldo + r] = the lanes of acc[i][r][0] + acc[i][r][1] summed: the end of a tile that keeps two
// accumulators per output (low / high half of each block, or alternate blocks) to shorten FMA dependency chains.
template <int MT, int NR>
inline void store_pair_sums(const __m512 (&acc)[MT][NR][2], float* out, int64_t ldo) {
    for (int i = 0; i < MT; ++i) {
        __m512 sums[NR];
        for (int r = 0; r < NR; ++r) sums[r] = _mm512_add_ps(acc[i][r][0], acc[i][r][1]);
        store_sums<NR>(sums, out + i * ldo);
    }
}

template <bool ASYM, int BPG>
template <int MT, int NR>
void Int4Kernel<ASYM, BPG>::tile(const float* x, const Int4Matrix& w, int64_t n, float* out, int64_t ldo) {
    const int64_t K = w.K, G = K / GS;
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 levels = ASYM ? iota : _mm512_sub_ps(iota, _mm512_set1_ps(8.0f));
    __m512 acc[MT][NR][2];
    for (int i = 0; i < MT; ++i)
        for (int r = 0; r < NR; ++r) acc[i][r][0] = acc[i][r][1] = _mm512_setzero_ps();
    alignas(64) float d[NR * kGroupChunk];
    alignas(64) float m[NR * kGroupChunk];
    for (int64_t g0 = 0; g0 < G; g0 += kGroupChunk) {
        const int gn = static_cast<int>(std::min<int64_t>(kGroupChunk, G - g0));
        const int ds = group_scales<NR>(w.scales, G, n, g0, gn, d);
        if (ASYM) group_scales<NR>(w.mins, G, n, g0, gn, m);
        const float* xg = x + g0 * GS;
        const uint8_t* qg[NR];
        const float* dr[NR];
        const float* mr[NR];
        for (int r = 0; r < NR; ++r) {
            qg[r] = w.qweight + (n + r) * (K / 2) + g0 * (GS / 2);
            dr[r] = d + r * ds;
            mr[r] = m + r * ds;
        }
        for (int g = 0; g < gn; ++g) {
            __m512 table[NR];
            for (int r = 0; r < NR; ++r)
                table[r] = ASYM ? _mm512_fmadd_ps(_mm512_set1_ps(dr[r][g]), levels, _mm512_set1_ps(mr[r][g]))
                                : _mm512_mul_ps(_mm512_set1_ps(dr[r][g]), levels);
            for (int b = 0; b < BPG; ++b) {
                const int k = g * GS + b * kBlock;
                __m512 lo[NR], hi[NR];
                for (int r = 0; r < NR; ++r) {
                    prefetch(qg[r] + k / 2, kPrefetchInt4);
                    const __m512i v = _mm512_cvtepu8_epi32(load16(qg[r] + k / 2));
                    lo[r] = _mm512_permutexvar_ps(v, table[r]);  // vpermps reads the low 4 bits of each index
                    hi[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table[r]);
                }
                for (int i = 0; i < MT; ++i) {
                    const __m512 xl = _mm512_loadu_ps(xg + i * K + k), xh = _mm512_loadu_ps(xg + i * K + k + 16);
                    for (int r = 0; r < NR; ++r) {
                        acc[i][r][0] = _mm512_fmadd_ps(lo[r], xl, acc[i][r][0]);
                        acc[i][r][1] = _mm512_fmadd_ps(hi[r], xh, acc[i][r][1]);
                    }
                }
            }
        }
    }
    store_pair_sums<MT, NR>(acc, out, ldo);
}

template <int MT, int NR>
void Q8Kernel::tile(const float* x, const Q8Matrix& w, int64_t n, float* out, int64_t ldo) {
    const int64_t K = w.K, G = K / kBlock;
    __m512 acc[MT][NR][2];
    for (int i = 0; i < MT; ++i)
        for (int r = 0; r < NR; ++r) acc[i][r][0] = acc[i][r][1] = _mm512_setzero_ps();
    alignas(64) float d[NR * kGroupChunk];
    for (int64_t g0 = 0; g0 < G; g0 += kGroupChunk) {
        const int gn = static_cast<int>(std::min<int64_t>(kGroupChunk, G - g0));
        const int ds = group_scales<NR>(w.scales, G, n, g0, gn, d);
        const float* xg = x + g0 * kBlock;
        const int8_t* qg[NR];
        for (int r = 0; r < NR; ++r) qg[r] = w.q + (n + r) * K + g0 * kBlock;
        // One block of every row into acc[.][.][a]; groups alternate between the two accumulators.
        auto block = [&](int g, int a) {
            const int k = g * kBlock;
            __m512 lo[NR], hi[NR];
            for (int r = 0; r < NR; ++r) {
                prefetch(qg[r] + k, kPrefetchQ8);
                lo[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(qg[r] + k)));
                hi[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(qg[r] + k + 16)));
            }
            if constexpr (MT == 1) {  // scale the block's partial sum: one multiply fewer per block
                const __m512 xl = _mm512_loadu_ps(xg + k), xh = _mm512_loadu_ps(xg + k + 16);
                for (int r = 0; r < NR; ++r) {
                    const __m512 s = _mm512_fmadd_ps(hi[r], xh, _mm512_mul_ps(lo[r], xl));
                    acc[0][r][a] = _mm512_fmadd_ps(s, _mm512_set1_ps(d[r * ds + g]), acc[0][r][a]);
                }
            } else {
                for (int r = 0; r < NR; ++r) {
                    const __m512 dv = _mm512_set1_ps(d[r * ds + g]);
                    lo[r] = _mm512_mul_ps(lo[r], dv);
                    hi[r] = _mm512_mul_ps(hi[r], dv);
                }
                for (int i = 0; i < MT; ++i) {
                    const __m512 xl = _mm512_loadu_ps(xg + i * K + k), xh = _mm512_loadu_ps(xg + i * K + k + 16);
                    for (int r = 0; r < NR; ++r) {
                        acc[i][r][0] = _mm512_fmadd_ps(lo[r], xl, acc[i][r][0]);
                        acc[i][r][1] = _mm512_fmadd_ps(hi[r], xh, acc[i][r][1]);
                    }
                }
            }
        };
        int g = 0;
        for (; g + 2 <= gn; g += 2) {
            block(g, 0);
            block(g + 1, 1);
        }
        if (g < gn) block(g, 0);
    }
    store_pair_sums<MT, NR>(acc, out, ldo);
}

template <int MT, int NR>
void F32Kernel::tile(const float* x, const F32Matrix& w, int64_t n, float* out, int64_t ldo) {
    const int64_t K = w.K;
    const float* wr[NR];
    for (int r = 0; r < NR; ++r) wr[r] = w.w + (n + r) * K;
    __m512 acc[MT][NR];
    for (int i = 0; i < MT; ++i)
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
    auto step = [&](int64_t k, __mmask16 mask) {
        __m512 wv[NR];
        for (int r = 0; r < NR; ++r) {
            prefetch(wr[r] + k, kPrefetchF32);
            wv[r] = _mm512_maskz_loadu_ps(mask, wr[r] + k);
        }
        for (int i = 0; i < MT; ++i) {
            const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * K + k);
            for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(wv[r], xv, acc[i][r]);
        }
    };
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) step(k, 0xffff);
    if (k < K) step(k, static_cast<__mmask16>((1u << (K - k)) - 1));
    for (int i = 0; i < MT; ++i) store_sums<NR>(acc[i], out + i * ldo);
}

void int4_dequantize_row(const Int4Matrix& w, int64_t n, float* o) {
    const int64_t K = w.K, G = K / w.group_size;
    const uint8_t* q = w.qweight + n * (K / 2);
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t g = 0; g < G; ++g) {
        const __m512 d = _mm512_set1_ps(f16_to_f32(w.scales[n * G + g]));
        const __m512 table = w.mins ? _mm512_fmadd_ps(d, iota, _mm512_set1_ps(f16_to_f32(w.mins[n * G + g])))
                                    : _mm512_mul_ps(d, _mm512_sub_ps(iota, _mm512_set1_ps(8.0f)));
        for (int64_t k = g * w.group_size; k < (g + 1) * w.group_size; k += kBlock) {
            const __m512i v = _mm512_cvtepu8_epi32(load16(q + k / 2));
            _mm512_storeu_ps(o + k, _mm512_permutexvar_ps(v, table));
            _mm512_storeu_ps(o + k + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table));
        }
    }
}


#if SMOLVLM_AVX512 && defined(__AVX512VNNI__)
#define SMOLVLM_VNNI 1

// ---------------------------------------------------------------- int4 x int8 activations (AVX512-VNNI)
// llama.cpp's arithmetic for decode: each 32-element block of x is rounded to int8 with its own scale
// (s = max|x| / 127), and a block's product with the weights' nibbles is an exact integer dot (vpdpbusd: 64
// u8 x s8 products per instruction) scaled once by d * s. The weight's affine part (m, or -8 d) meets only the
// group sums of x, so it is one short float dot per row at the end. Per 128 weights that is ~10 vector
// instructions instead of ~24 with float32 x (nibble -> float table lookups, two FMAs per 16 weights).

// x rows prepared once per product: per chunk of 4 blocks (128 elements), lo[64] holds elements 0..15 of each
// block (bytes 16b .. 16b + 15) and hi[64] elements 16..31 — the byte order of the weight's nibbles after
// `& 0xf` and `>> 4` — then lane scales (lane 4b + t: block b's s), and per group of the weight the float sum of
// its (rounded) x.
struct Int8Rows {
    int64_t M, K, chunks, groups;
    std::vector<int8_t> q;      // [M, chunks, 2, 64]
    std::vector<float> scales;  // [M, chunks, 16]
    std::vector<float> sums;    // [M, groups]

    Int8Rows(const float* x, int64_t M_, int64_t K_, int group_size)
        : M(M_), K(K_), chunks((K_ + 127) / 128), groups(K_ / group_size),
          q(M_ * chunks * 128, 0), scales(M_ * chunks * 16, 0.f), sums(M_ * groups, 0.f) {
        const int blocks_per_group = group_size / kBlock;
        for (int64_t i = 0; i < M; ++i)
            for (int64_t b = 0; b < K / kBlock; ++b) {
                const float* xb = x + i * K + b * kBlock;
                const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
                const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
                const float s = amax / 127.f;
                const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
                const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));  // round to nearest even
                const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
                int8_t* dst = q.data() + (i * chunks + b / 4) * 128 + (b % 4) * 16;
                _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(qlo));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 64), _mm512_cvtsepi32_epi8(qhi));
                float* lane = scales.data() + (i * chunks + b / 4) * 16 + (b % 4) * 4;
                for (int t = 0; t < 4; ++t) lane[t] = s;
                const int32_t qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
                sums[i * groups + b / blocks_per_group] += s * static_cast<float>(qsum);
            }
    }
};

// out[i * ldo + r] for i < MT, r < NR: rows n .. n + NR - 1 of W against prepared rows m0 .. m0 + MT - 1 of x.
template <bool ASYM, int BPG, int MT, int NR>
void int4_int8_tile(const Int8Rows& x, int64_t m0, const Int4Matrix& w, int64_t n, float* out, int64_t ldo) {
    const int64_t K = w.K, G = K / (BPG * kBlock), blocks = K / kBlock;
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    // lane l of a chunk's integer dot belongs to block l / 4, so to group (l / 4) / BPG of the chunk
    const __m512i group_of_lane = _mm512_srli_epi32(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                                    BPG == 1 ? 0 : BPG == 2 ? 1 : 2);
    __m512 acc[MT][NR];
    for (int i = 0; i < MT; ++i)
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < x.chunks; ++c) {
        const int64_t nb = std::min<int64_t>(4, blocks - 4 * c), g0 = 4 * c / BPG, ng = (nb + BPG - 1) / BPG;
        const __mmask64 byte_mask = nb == 4 ? ~__mmask64(0) : (__mmask64(1) << (16 * nb)) - 1;
        __m512i lo[NR], hi[NR];
        __m512 d[NR];
        for (int r = 0; r < NR; ++r) {
            const uint8_t* qr = w.qweight + (n + r) * (K / 2) + c * 64;
            prefetch(qr, kPrefetchInt4);
            const __m512i v = _mm512_maskz_loadu_epi8(byte_mask, qr);
            lo[r] = _mm512_and_si512(v, nibble);
            hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            const __m256i dh = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << ng) - 1), w.scales + (n + r) * G + g0);
            d[r] = _mm512_permutexvar_ps(group_of_lane, _mm512_cvtph_ps(dh));
        }
        for (int i = 0; i < MT; ++i) {
            const int8_t* xq = x.q.data() + ((m0 + i) * x.chunks + c) * 128;
            const __m512i xlo = _mm512_loadu_si512(xq), xhi = _mm512_loadu_si512(xq + 64);
            const __m512 xs = _mm512_loadu_ps(x.scales.data() + ((m0 + i) * x.chunks + c) * 16);
            for (int r = 0; r < NR; ++r) {
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], xlo),
                                                        hi[r], xhi);
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d[r], xs), acc[i][r]);
            }
        }
    }
    for (int i = 0; i < MT; ++i) {
        float dots[NR];
        store_sums<NR>(acc[i], dots);
        const float* gsum = x.sums.data() + (m0 + i) * G;
        for (int r = 0; r < NR; ++r) {  // + sum_g m[g] * (group sum of x); symmetric: m = -8 d
            const uint16_t* m = (ASYM ? w.mins : w.scales) + (n + r) * G;
            __m512 affine = _mm512_setzero_ps();
            for (int64_t g = 0; g < G; g += 16) {
                const __mmask16 k = G - g >= 16 ? 0xffff : static_cast<__mmask16>((1u << (G - g)) - 1);
                affine = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, m + g)),
                                         _mm512_maskz_loadu_ps(k, gsum + g), affine);
            }
            out[i * ldo + r] = dots[r] + (ASYM ? 1.f : -8.f) * _mm512_reduce_add_ps(affine);
        }
    }
}

template <bool ASYM, int BPG>
struct Int4Int8Gemm {
    using Tile = void (*)(const Int8Rows&, int64_t, const Int4Matrix&, int64_t, float*, int64_t);
    static constexpr int kMT = 4;  // rows of x per tile; a decode batch larger than this goes in several passes
    static constexpr Tile kWide[kMT] = {&int4_int8_tile<ASYM, BPG, 1, 4>, &int4_int8_tile<ASYM, BPG, 2, 4>,
                                        &int4_int8_tile<ASYM, BPG, 3, 2>, &int4_int8_tile<ASYM, BPG, 4, 2>};
    static constexpr Tile kNarrow[kMT] = {&int4_int8_tile<ASYM, BPG, 1, 1>, &int4_int8_tile<ASYM, BPG, 2, 1>,
                                          &int4_int8_tile<ASYM, BPG, 3, 1>, &int4_int8_tile<ASYM, BPG, 4, 1>};
    const Int8Rows* x;
    const Int4Matrix* w;
    float* out;
    int64_t chunk = 0;

    static void task(void* ctx, int64_t c) {
        const auto* self = static_cast<const Int4Int8Gemm*>(ctx);
        const int64_t n0 = c * self->chunk, n1 = std::min(self->w->N, n0 + self->chunk), N = self->w->N;
        for (int64_t m0 = 0; m0 < self->x->M; m0 += kMT) {
            const int mt = static_cast<int>(std::min<int64_t>(kMT, self->x->M - m0));
            const int nr = mt <= 2 ? 4 : 2;
            int64_t n = n0;
            for (; n + nr <= n1; n += nr) kWide[mt - 1](*self->x, m0, *self->w, n, self->out + m0 * N + n, N);
            for (; n < n1; ++n) kNarrow[mt - 1](*self->x, m0, *self->w, n, self->out + m0 * N + n, N);
        }
    }
};

#endif

#elif SMOLVLM_AVX2

inline float hsum(__m256 v) {
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

template <bool ASYM, int BPG>
template <int MT, int NR>
void Int4Kernel<ASYM, BPG>::tile(const float* x, const Int4Matrix& w, int64_t n, float* out, int64_t ldo) {
    const int64_t K = w.K, G = K / GS;
    const __m256i low4 = _mm256_set1_epi32(0x0f);
    __m256 acc[MT][NR];
    for (int i = 0; i < MT; ++i)
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
    alignas(32) float d[NR * kGroupChunk];
    alignas(32) float m[NR * kGroupChunk];
    for (int64_t g0 = 0; g0 < G; g0 += kGroupChunk) {
        const int gn = static_cast<int>(std::min<int64_t>(kGroupChunk, G - g0));
        const int ds = group_scales<NR>(w.scales, G, n, g0, gn, d);
        if (ASYM) group_scales<NR>(w.mins, G, n, g0, gn, m);
        const float* xg = x + g0 * GS;
        const uint8_t* qg[NR];
        for (int r = 0; r < NR; ++r) qg[r] = w.qweight + (n + r) * (K / 2) + g0 * (GS / 2);
        for (int g = 0; g < gn; ++g) {
            for (int b = 0; b < BPG; ++b) {
                const int k = g * GS + b * kBlock;
                for (int r = 0; r < NR; ++r) prefetch(qg[r] + k / 2, kPrefetchInt4);
                for (int h = 0; h < 2; ++h) {  // bytes 8h .. 8h + 7: elements k + 8h + j (low), k + 16 + 8h + j (high)
                    __m256 lo[NR], hi[NR];
                    for (int r = 0; r < NR; ++r) {
                        const __m256 dv = _mm256_set1_ps(d[r * ds + g]);
                        const __m256 mv = ASYM ? _mm256_set1_ps(m[r * ds + g])
                                               : _mm256_mul_ps(dv, _mm256_set1_ps(-8.0f));
                        const __m256i v = _mm256_cvtepu8_epi32(load8(qg[r] + k / 2 + 8 * h));
                        lo[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low4)), dv, mv);
                        hi[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), dv, mv);
                    }
                    for (int i = 0; i < MT; ++i) {
                        const __m256 xl = _mm256_loadu_ps(xg + i * K + k + 8 * h);
                        const __m256 xh = _mm256_loadu_ps(xg + i * K + k + 16 + 8 * h);
                        for (int r = 0; r < NR; ++r)
                            acc[i][r] = _mm256_fmadd_ps(hi[r], xh, _mm256_fmadd_ps(lo[r], xl, acc[i][r]));
                    }
                }
            }
        }
    }
    for (int i = 0; i < MT; ++i)
        for (int r = 0; r < NR; ++r) out[i * ldo + r] = hsum(acc[i][r]);
}

template <int MT, int NR>
void Q8Kernel::tile(const float* x, const Q8Matrix& w, int64_t n, float* out, int64_t ldo) {
    const int64_t K = w.K, G = K / kBlock;
    __m256 acc[MT][NR];
    for (int i = 0; i < MT; ++i)
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
    alignas(32) float d[NR * kGroupChunk];
    for (int64_t g0 = 0; g0 < G; g0 += kGroupChunk) {
        const int gn = static_cast<int>(std::min<int64_t>(kGroupChunk, G - g0));
        const int ds = group_scales<NR>(w.scales, G, n, g0, gn, d);
        for (int g = 0; g < gn; ++g) {
            const int64_t k = (g0 + g) * kBlock;
            for (int r = 0; r < NR; ++r) prefetch(w.q + (n + r) * K + k, kPrefetchQ8);
            for (int j = 0; j < 4; ++j) {
                __m256 wv[NR];
                for (int r = 0; r < NR; ++r)
                    wv[r] = _mm256_mul_ps(_mm256_set1_ps(d[r * ds + g]), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                              load8(w.q + (n + r) * K + k + 8 * j))));
                for (int i = 0; i < MT; ++i) {
                    const __m256 xv = _mm256_loadu_ps(x + i * K + k + 8 * j);
                    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_fmadd_ps(wv[r], xv, acc[i][r]);
                }
            }
        }
    }
    for (int i = 0; i < MT; ++i)
        for (int r = 0; r < NR; ++r) out[i * ldo + r] = hsum(acc[i][r]);
}

template <int MT, int NR>
void F32Kernel::tile(const float* x, const F32Matrix& w, int64_t n, float* out, int64_t ldo) {
    const int64_t K = w.K;
    __m256 acc[MT][NR];
    for (int i = 0; i < MT; ++i)
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[NR];
        for (int r = 0; r < NR; ++r) {
            prefetch(w.w + (n + r) * K + k, kPrefetchF32);
            wv[r] = _mm256_loadu_ps(w.w + (n + r) * K + k);
        }
        for (int i = 0; i < MT; ++i) {
            const __m256 xv = _mm256_loadu_ps(x + i * K + k);
            for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_fmadd_ps(wv[r], xv, acc[i][r]);
        }
    }
    for (int i = 0; i < MT; ++i)
        for (int r = 0; r < NR; ++r) {
            float sum = hsum(acc[i][r]);
            for (int64_t t = k; t < K; ++t) sum += w.w[(n + r) * K + t] * x[i * K + t];
            out[i * ldo + r] = sum;
        }
}

#endif

#if !SMOLVLM_AVX512  // the scalar tiles (AVX2 builds keep this dequantization; it is not on a hot path)

void int4_dequantize_row(const Int4Matrix& w, int64_t n, float* o) {
    const int64_t K = w.K, G = K / w.group_size;
    const uint8_t* q = w.qweight + n * (K / 2);
    for (int64_t g = 0; g < G; ++g) {
        const float d = f16_to_f32(w.scales[n * G + g]);
        const float m = w.mins ? f16_to_f32(w.mins[n * G + g]) : 0.0f;
        for (int64_t k = g * w.group_size; k < (g + 1) * w.group_size; k += kBlock)
            for (int j = 0; j < 16; ++j) {
                const uint8_t byte = q[k / 2 + j];
                o[k + j] = w.mins ? d * float(byte & 0x0f) + m : d * (float(byte & 0x0f) - 8.0f);
                o[k + j + 16] = w.mins ? d * float(byte >> 4) + m : d * (float(byte >> 4) - 8.0f);
            }
    }
}

#endif

#if !SMOLVLM_AVX512 && !SMOLVLM_AVX2

template <bool ASYM, int BPG>
template <int MT, int NR>
void Int4Kernel<ASYM, BPG>::tile(const float* x, const Int4Matrix& w, int64_t n, float* out, int64_t ldo) {
    float row[kBlock];
    for (int r = 0; r < NR; ++r) {
        float acc[MT] = {};
        for (int64_t k = 0; k < w.K; k += kBlock) {
            const int64_t g = (n + r) * (w.K / GS) + k / GS;
            const float d = f16_to_f32(w.scales[g]), m = ASYM ? f16_to_f32(w.mins[g]) : 0.0f;
            const uint8_t* q = w.qweight + (n + r) * (w.K / 2) + k / 2;
            for (int j = 0; j < 16; ++j) {
                row[j] = ASYM ? d * float(q[j] & 0x0f) + m : d * (float(q[j] & 0x0f) - 8.0f);
                row[j + 16] = ASYM ? d * float(q[j] >> 4) + m : d * (float(q[j] >> 4) - 8.0f);
            }
            for (int i = 0; i < MT; ++i)
                for (int j = 0; j < kBlock; ++j) acc[i] += row[j] * x[i * w.K + k + j];
        }
        for (int i = 0; i < MT; ++i) out[i * ldo + r] = acc[i];
    }
}

template <int MT, int NR>
void Q8Kernel::tile(const float* x, const Q8Matrix& w, int64_t n, float* out, int64_t ldo) {
    for (int r = 0; r < NR; ++r) {
        float acc[MT] = {};
        for (int64_t k = 0; k < w.K; k += kBlock) {
            const float d = f16_to_f32(w.scales[((n + r) * w.K + k) / kBlock]);
            const int8_t* q = w.q + (n + r) * w.K + k;
            for (int i = 0; i < MT; ++i)
                for (int j = 0; j < kBlock; ++j) acc[i] += d * float(q[j]) * x[i * w.K + k + j];
        }
        for (int i = 0; i < MT; ++i) out[i * ldo + r] = acc[i];
    }
}

template <int MT, int NR>
void F32Kernel::tile(const float* x, const F32Matrix& w, int64_t n, float* out, int64_t ldo) {
    for (int r = 0; r < NR; ++r)
        for (int i = 0; i < MT; ++i) {
            float acc = 0.f;
            for (int64_t k = 0; k < w.K; ++k) acc += w.w[(n + r) * w.K + k] * x[i * w.K + k];
            out[i * ldo + r] = acc;
        }
}

#endif

void q8_dequantize_row(const Q8Matrix& w, int64_t n, float* o) {
    const int64_t G = w.K / kBlock;
    for (int64_t g = 0; g < G; ++g) {
        const float d = f16_to_f32(w.scales[n * G + g]);
        const int8_t* q = w.q + n * w.K + g * kBlock;
        for (int j = 0; j < kBlock; ++j) o[g * kBlock + j] = d * float(q[j]);
    }
}

// ---------------------------------------------------------------- drivers

template <class Kernel>
struct Gemm {
    using Matrix = typename Kernel::Matrix;
    using Tile = void (*)(const float*, const Matrix&, int64_t, float*, int64_t);

    template <int... I>
    static constexpr std::array<Tile, kMaxMT> wide(std::integer_sequence<int, I...>) {
        return {&Kernel::template tile<I + 1, nr_for(I + 1)>...};
    }
    template <int... I>
    static constexpr std::array<Tile, kMaxMT> narrow(std::integer_sequence<int, I...>) {
        return {&Kernel::template tile<I + 1, 1>...};
    }
    static constexpr std::array<Tile, kMaxMT> kWide = wide(std::make_integer_sequence<int, kMaxMT>{});
    static constexpr std::array<Tile, kMaxMT> kNarrow = narrow(std::make_integer_sequence<int, kMaxMT>{});

    const float* x;
    int64_t M;
    const Matrix* w;
    float* out;
    int64_t chunk = 0;  // weight rows per chunk

    // Rows [n0, n1), few enough to stay in L2 while every tile of x passes over them.
    void rows(int64_t n0, int64_t n1) const {
        const int64_t N = w->N, K = w->K;
        for (int64_t m0 = 0; m0 < M; m0 += kMaxMT) {
            const int mt = static_cast<int>(std::min<int64_t>(kMaxMT, M - m0));
            const int nr = nr_for(mt);
            const float* xm = x + m0 * K;
            float* om = out + m0 * N;
            int64_t n = n0;
            for (; n + nr <= n1; n += nr) kWide[mt - 1](xm, *w, n, om + n, N);
            for (; n < n1; ++n) kNarrow[mt - 1](xm, *w, n, om + n, N);
        }
    }

    static void task(void* ctx, int64_t c) {
        const auto* self = static_cast<const Gemm*>(ctx);
        self->rows(c * self->chunk, std::min(self->w->N, (c + 1) * self->chunk));
    }

    void run(int64_t row_bytes) {
        constexpr int64_t kL2Bytes = 256 << 10;
        chunk = chunk_rows(w->N, std::max<int64_t>(16, kL2Bytes / row_bytes));
        parallel_for(&Gemm::task, this, (w->N + chunk - 1) / chunk, M * w->N * w->K);
    }
};

template <bool ASYM>
void int4_gemm_by_group(const float* x, int64_t M, const Int4Matrix& w, float* out) {
    const int64_t row_bytes = w.K / 2 + (w.K / w.group_size) * (ASYM ? 4 : 2);
    switch (w.group_size) {
        case 32: Gemm<Int4Kernel<ASYM, 1>>{x, M, &w, out}.run(row_bytes); break;
        case 64: Gemm<Int4Kernel<ASYM, 2>>{x, M, &w, out}.run(row_bytes); break;
        default: Gemm<Int4Kernel<ASYM, 4>>{x, M, &w, out}.run(row_bytes); break;
    }
}

}  // namespace

// ---------------------------------------------------------------- entry points

void int4_gemm(const float* x, int64_t M, const Int4Matrix& w, float* out) {
    if (M == 0 || w.N == 0) return;
    if (w.mins) int4_gemm_by_group<true>(x, M, w, out);
    else int4_gemm_by_group<false>(x, M, w, out);
}

bool int4_gemm_int8(const float* x, int64_t M, const Int4Matrix& w, float* out) {
#if SMOLVLM_VNNI
    if (M == 0 || w.N == 0) return true;
    const Int8Rows rows(x, M, w.K, w.group_size);
    const int64_t row_bytes = w.K / 2 + (w.K / w.group_size) * (w.mins ? 4 : 2);
    auto run = [&](auto gemm) {
        gemm.chunk = chunk_rows(w.N, std::max<int64_t>(16, (256 << 10) / row_bytes));
        parallel_for(&decltype(gemm)::task, &gemm, (w.N + gemm.chunk - 1) / gemm.chunk, M * w.N * w.K / 4);
    };
    const int bpg = w.group_size / kBlock;
    if (w.mins) {
        if (bpg == 1) run(Int4Int8Gemm<true, 1>{&rows, &w, out});
        else if (bpg == 2) run(Int4Int8Gemm<true, 2>{&rows, &w, out});
        else run(Int4Int8Gemm<true, 4>{&rows, &w, out});
    } else {
        if (bpg == 1) run(Int4Int8Gemm<false, 1>{&rows, &w, out});
        else if (bpg == 2) run(Int4Int8Gemm<false, 2>{&rows, &w, out});
        else run(Int4Int8Gemm<false, 4>{&rows, &w, out});
    }
    return true;
#else
    (void)x, (void)M, (void)w, (void)out;
    return false;
#endif
}

void q8_gemm(const float* x, int64_t M, const Q8Matrix& w, float* out) {
    if (M == 0 || w.N == 0) return;
    Gemm<Q8Kernel>{x, M, &w, out}.run(w.K + w.K / kBlock * 2);
}

void f32_gemm(const float* x, int64_t M, const F32Matrix& w, float* out) {
    if (M == 0 || w.N == 0) return;
    Gemm<F32Kernel>{x, M, &w, out}.run(w.K * 4);
}

void int4_dequantize(const Int4Matrix& w, float* out) {
    for (int64_t n = 0; n < w.N; ++n) int4_dequantize_row(w, n, out + n * w.K);
}

void q8_dequantize(const Q8Matrix& w, float* out) {
    for (int64_t n = 0; n < w.N; ++n) q8_dequantize_row(w, n, out + n * w.K);
}

const char* simd_name() {
#if SMOLVLM_AVX512
    return "avx512";
#elif SMOLVLM_AVX2
    return "avx2";
#else
    return "scalar";
#endif
}

}  // namespace smolvlm_cpu
