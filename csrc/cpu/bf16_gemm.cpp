// The bf16 products' driver (contract in bf16_gemm.h): packing W, the choice of kernel, and the product's loop.
//
// A product goes in slabs of at most kSlabRows rows of x (so the converted copy of x stays a few MB whatever M
// is). Each slab's rows are rounded to bf16 once, into a buffer in the chosen kernel's form (bf16_kernels.h), on
// the thread pool; then chunks of (a block of kBlockRows rows, a group of panels of 32 columns) go to the pool.
// Within a chunk each panel of W (32 columns x Kp: 48 KB at K = 768) is read from memory once and then serves
// every row tile of the block from L2, while the block of x (kBlockRows x Kp bf16) stays in L2 across the panels.
// Row tiles start at fixed rows of the slab whatever the thread count, so every output element is summed in the
// same order with 1 or many threads.
#include "bf16_gemm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bf16_kernels.h"
#include "thread_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace smolvlm_cpu {

int64_t bf16_padded_k(int64_t K) { return (K + kBf16BlockK - 1) / kBf16BlockK * kBf16BlockK; }

int64_t bf16_packed_elems(int64_t N, int64_t K) {
    return (N + kBf16BlockN - 1) / kBf16BlockN * kBf16BlockN * bf16_padded_k(K);
}

namespace bf16 {

// ---------------------------------------------------------------- the epilogue, scalar

void finish_row(const float* c, int64_t n, const float* bias, Epilogue e, bool accumulate, float* out) {
#if SMOLVLM_AVX512
    for (int64_t j = 0; j < n; j += 16)
        finish16(_mm512_maskz_loadu_ps(first_lanes(n - j), c + j), n - j, bias ? bias + j : nullptr, e, accumulate,
                 out + j);
#else
    for (int64_t j = 0; j < n; ++j) {
        float z = c[j] + (bias ? bias[j] : 0.f);
        if (e == Epilogue::gelu_tanh) z = gelu1(z);
        out[j] = accumulate ? out[j] + z : z;
    }
#endif
}

// ---------------------------------------------------------------- packing W

void pack_slice(const float* w, int64_t ldw, int64_t rows, int64_t k0, int64_t kc, uint16_t* block) {
    for (int64_t j = 0; j < rows; ++j)
        for (int64_t k = k0; k < k0 + kc; ++k) block[(k / 2) * 32 + j * 2 + (k & 1)] = to_bf16(w[j * ldw + k - k0]);
}

namespace {

struct PackJob {
    const float* w;
    int64_t N, K, Kp;
    uint16_t* packed;
    static void task(void* ctx, int64_t nb) {
        const auto* j = static_cast<const PackJob*>(ctx);
        uint16_t* block = j->packed + nb * kBf16BlockN * j->Kp;
        std::memset(block, 0, sizeof(uint16_t) * kBf16BlockN * j->Kp);  // rows past N, k past K
        pack_slice(j->w + nb * kBf16BlockN * j->K, j->K, std::min(kBf16BlockN, j->N - nb * kBf16BlockN), 0, j->K,
                   block);
    }
};

// ---------------------------------------------------------------- which kernel

bool cpuid_bit(unsigned leaf, unsigned subleaf, int reg, int bit) {
#if defined(__x86_64__) || defined(__i386__)
    unsigned r[4];
    if (!__get_cpuid_count(leaf, subleaf, &r[0], &r[1], &r[2], &r[3])) return false;
    return (r[reg] >> bit) & 1u;
#else
    (void)leaf, (void)subleaf, (void)reg, (void)bit;
    return false;
#endif
}

enum { kEax, kEbx, kEcx, kEdx };

bool amx_available() {
    static const bool ok = amx_compiled() && cpuid_bit(7, 0, kEdx, 24) && cpuid_bit(7, 0, kEdx, 22) &&
                           amx_request_permission();  // AMX-TILE, AMX-BF16, and Linux's permission
    return ok;
}

bool runnable(Bf16Isa isa) {
    switch (isa) {
        case Bf16Isa::amx: return amx_available();
        case Bf16Isa::avx512bf16: return avx512bf16_available();
        case Bf16Isa::f32:
        case Bf16Isa::amx_emulated: return true;
    }
    return false;
}

// The best runnable kernel no better than SMOLVLM_FAST_CPU_ISA's (amx_emulated is never chosen).
Bf16Isa default_isa() {
    const Bf16Isa order[] = {Bf16Isa::amx, Bf16Isa::avx512bf16, Bf16Isa::f32};
    int cap = 0;
    if (const char* env = std::getenv("SMOLVLM_FAST_CPU_ISA"); env && *env) {
        const std::string v = env;
        cap = v == "amx" ? 0 : v == "avx512bf16" ? 1 : v == "f32" ? 2 : -1;
        if (cap < 0) {
            std::fprintf(stderr, "smolvlm_fast: SMOLVLM_FAST_CPU_ISA=%s is not one of amx, avx512bf16, f32; ignored\n",
                         env);
            cap = 0;
        }
    }
    for (int i = cap; i < 3; ++i)
        if (runnable(order[i])) return order[i];
    return Bf16Isa::f32;
}

std::atomic<int> g_isa{-1};  // -1: not chosen yet

// ---------------------------------------------------------------- converting x

constexpr int64_t kSlabRows = 1024;  // rows of x converted at a time
constexpr int64_t kBlockRows = 192;  // rows per chunk: 16 register tiles of 12, 6 AMX steps of 32 (see product)
constexpr int64_t kConvertRows = 32;

bool bf16_form(Bf16Isa isa) { return isa != Bf16Isa::f32; }

#if SMOLVLM_AVX512
// bf16 bits of 16 floats in the low halves of the lanes: to_bf16 on each.
inline __m512i round16(__m512 v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40));
}
#endif

// One row of x [K] -> dst [Kp]: bf16 bits (bf16 form) or those values as float32, zero past K.
void convert_row(const float* x, int64_t K, int64_t Kp, bool bf16, void* dst) {
#if SMOLVLM_AVX512
    for (int64_t k = 0; k < Kp; k += 16) {
        const __mmask16 m = K - k > 0 ? first_lanes(K - k) : __mmask16(0);
        const __m512i r = round16(_mm512_maskz_loadu_ps(m, x + k));
        if (bf16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(dst) + k),
                                      _mm512_cvtepi32_epi16(r));
        else _mm512_storeu_si512(static_cast<float*>(dst) + k, _mm512_slli_epi32(r, 16));
    }
#else
    for (int64_t k = 0; k < Kp; ++k) {
        const uint16_t h = k < K ? to_bf16(x[k]) : 0;
        if (bf16) static_cast<uint16_t*>(dst)[k] = h;
        else static_cast<float*>(dst)[k] = from_bf16(h);
    }
#endif
}

struct ConvertJob {
    const float* x;
    int64_t rows, ldx, K, Kp;
    bool bf16;
    uint8_t* buf;  // [rows, Kp] of 2 (bf16) or 4 bytes
    static void task(void* ctx, int64_t c) {
        const auto* j = static_cast<const ConvertJob*>(ctx);
        const int64_t bytes = j->bf16 ? 2 : 4;
        for (int64_t r = c * kConvertRows; r < std::min(j->rows, (c + 1) * kConvertRows); ++r)
            convert_row(j->x + r * j->ldx, j->K, j->Kp, j->bf16, j->buf + r * j->Kp * bytes);
    }
};

// ---------------------------------------------------------------- the product

using PanelFn = void (*)(const Panel&);

PanelFn kernel_of(Bf16Isa isa) {
    switch (isa) {
        case Bf16Isa::amx: return &panel_amx;
        case Bf16Isa::avx512bf16: return &panel_dpbf16;
        case Bf16Isa::amx_emulated: return &panel_amx_emulated;
        case Bf16Isa::f32: break;
    }
    return &panel_f32;
}

struct ProductJob {
    const uint8_t* xc;  // the slab's converted rows
    int64_t ldx, rows, N, Kp;
    const PanelSource* src;
    const float* bias;
    Epilogue epilogue;
    bool accumulate;
    float* out;  // the slab's first row
    int64_t ldo;
    PanelFn kernel;
    int64_t block_rows, groups, panels_per_group;

    static void task(void* ctx, int64_t c) { static_cast<const ProductJob*>(ctx)->run(c); }

    void run(int64_t chunk) const {
        const int64_t mb = chunk / groups, g = chunk % groups;
        const int64_t r0 = mb * block_rows, rows_here = std::min(block_rows, rows - r0);
        const int64_t panels = (N + kPanelN - 1) / kPanelN;
        thread_local std::vector<uint16_t> buf;
        if (src->make) buf.resize(static_cast<size_t>(kPanelN * Kp));
        for (int64_t pi = g * panels_per_group; pi < std::min(panels, (g + 1) * panels_per_group); ++pi) {
            const int64_t n0 = pi * kPanelN, n = std::min(kPanelN, N - n0);
            Panel p{};
            p.x = xc + r0 * ldx * 4;  // ldx counts 4-byte words in both forms
            p.ldx = ldx;
            p.rows = rows_here;
            p.w = src->make ? src->make(src->ctx, pi, buf.data()) : src->packed + n0 * Kp;
            p.blocks = (n + kBf16BlockN - 1) / kBf16BlockN;
            p.Kp = Kp;
            p.n = n;
            p.bias = bias ? bias + n0 : nullptr;
            p.epilogue = epilogue;
            p.accumulate = accumulate;
            p.out = out + r0 * ldo + n0;
            p.ldo = ldo;
            kernel(p);
        }
    }
};

}  // namespace

bool avx512bf16_available() {
#if SMOLVLM_AVX512
    static const bool ok = cpuid_bit(7, 1, kEax, 5);  // AVX512-BF16 (the module checks AVX-512 F/BW/VL on import)
    return ok;
#else
    return false;
#endif
}

void product(const float* x, int64_t M, int64_t ldx, int64_t N, int64_t K, const PanelSource& src, const float* bias,
             Epilogue epilogue, bool accumulate, float* out, int64_t ldo, Bf16Isa isa, int64_t block_rows) {
    if (M <= 0 || N <= 0) return;
    if (block_rows <= 0) block_rows = kBlockRows;
    const int64_t Kp = bf16_padded_k(K);
    const bool bf16 = bf16_form(isa);
    const int64_t ldc = bf16 ? Kp / 2 : Kp;  // 4-byte words per converted row
    const int64_t slabs = (M + kSlabRows - 1) / kSlabRows;
    const int64_t slab_rows = (M + slabs - 1) / slabs;  // even slabs: M = 1088 is 2 x 544, not 1024 + 64
    const int64_t panels = (N + kPanelN - 1) / kPanelN;
    thread_local std::vector<uint32_t> xc;
    for (int64_t s0 = 0; s0 < M; s0 += slab_rows) {
        const int64_t rows = std::min(slab_rows, M - s0);
        const int64_t padded = (rows + kAmxRows - 1) / kAmxRows * kAmxRows;  // AMX reads whole 32-row steps
        xc.resize(static_cast<size_t>(padded * ldc));
        std::fill(xc.begin() + rows * ldc, xc.begin() + padded * ldc, 0u);
        ConvertJob cj{x + s0 * ldx, rows, ldx, K, Kp, bf16, reinterpret_cast<uint8_t*>(xc.data())};
        parallel_for(&ConvertJob::task, &cj, (rows + kConvertRows - 1) / kConvertRows, rows * Kp);
        ProductJob pj{reinterpret_cast<const uint8_t*>(xc.data()), ldc, rows, N, Kp, &src, bias, epilogue,
                      accumulate, out + s0 * ldo, ldo, kernel_of(isa), block_rows, 0, 0};
        // Panels per chunk: enough chunks for every thread several times over (a late thread then costs little).
        const int64_t blocks = (rows + block_rows - 1) / block_rows;
        const int64_t want = 4 * pool_threads();
        pj.panels_per_group = std::clamp<int64_t>(blocks * panels / want, 1, 8);
        pj.groups = (panels + pj.panels_per_group - 1) / pj.panels_per_group;
        parallel_for(&ProductJob::task, &pj, blocks * pj.groups, rows * N * Kp);
    }
}

}  // namespace bf16

void bf16_pack(const float* w, int64_t N, int64_t K, uint16_t* packed) {
    const int64_t Kp = bf16_padded_k(K);
    bf16::PackJob job{w, N, K, Kp, packed};
    parallel_for(&bf16::PackJob::task, &job, (N + kBf16BlockN - 1) / kBf16BlockN, N * K);
}

void bf16_gemm(const float* x, int64_t M, int64_t ldx, const Bf16Matrix& w, const float* bias, Epilogue epilogue,
               bool accumulate, float* out, int64_t ldo) {
    const bf16::PanelSource src{w.w, nullptr, nullptr};
    bf16::product(x, M, ldx, w.N, w.K, src, bias, epilogue, accumulate, out, ldo, bf16_isa());
}

Bf16Isa bf16_isa() {
    int v = bf16::g_isa.load();
    if (v < 0) {
        const int chosen = static_cast<int>(bf16::default_isa());
        bf16::g_isa.compare_exchange_strong(v, chosen);  // a concurrent first call chose the same
        v = bf16::g_isa.load();
    }
    return static_cast<Bf16Isa>(v);
}

bool bf16_set_isa(Bf16Isa isa) {
    if (!bf16::runnable(isa)) return false;
    bf16::g_isa.store(static_cast<int>(isa));
    return true;
}

const char* bf16_isa_name(Bf16Isa isa) {
    switch (isa) {
        case Bf16Isa::amx: return "amx";
        case Bf16Isa::avx512bf16: return "avx512bf16";
        case Bf16Isa::f32: return "f32";
        case Bf16Isa::amx_emulated: return "amx-emulated";
    }
    return "?";
}

}  // namespace smolvlm_cpu
