// A standalone program that runs every entry point of csrc/cuda/ once under the CPU emulator on small inputs and
// checks the results against float64 loops written here: what tests/test_cuda_emu.py builds with AddressSanitizer
// and ThreadSanitizer (which a Python process cannot host) and runs with the planted bugs of emu/runtime.h (the
// SMOLVLM_EMU_PLANT variable). The thorough checks, on many shapes against smolvlm_fast/ops/reference.py, are
// test_cuda_emu.py's through the emulated module.
//
// Usage: driver [int4 patch paged cross write dwsep]... (no argument: all). Exit 0 when every check holds, 1 with a
// line per failed check; a sanitizer report exits non-zero on its own.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cross_attention.cuh"
#include "emu/half_types.h"
#include "int4_gemm.cuh"
#include "paged_attention.cuh"
#include "patch_embed.cuh"
#include "write_kv_cache.cuh"

namespace {

namespace sc = smolvlm_cuda;
using U = std::uintptr_t;
constexpr int kBf16 = 2, kFp32 = 0;  // dtype codes (common.cuh: DType)

std::mt19937 rng(1234);
int failures = 0;

float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
float bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
U ptr(const void* p) { return reinterpret_cast<U>(p); }

// inputs are drawn already rounded to bf16 and stored as bf16 bits
std::vector<__nv_bfloat16> random_bf16(size_t n, float scale) {
  std::vector<__nv_bfloat16> v(n);
  for (auto& e : v) e = __float2bfloat16_rn(uniform(-scale, scale));
  return v;
}

void check(const char* what, const std::vector<double>& got, const std::vector<double>& expect, double rel_tol) {
  double peak = 0, worst = 0;
  for (double e : expect) peak = std::max(peak, std::fabs(e));
  for (size_t i = 0; i < got.size(); ++i)
    worst = std::max(worst, std::isnan(got[i]) ? INFINITY : std::fabs(got[i] - expect[i]));  // NaN: unwritten
  const bool ok = worst <= rel_tol * peak;
  std::printf("%s: max error %.3g, limit %.3g: %s\n", what, worst, rel_tol * peak, ok ? "ok" : "MISMATCH");
  failures += !ok;
}

template <typename T>
std::vector<double> widen(const std::vector<T>& v) {
  std::vector<double> out;
  for (const T& e : v) out.push_back(__bfloat162float(e));
  return out;
}

// y [M, N] = x @ dequantize(w).T, asymmetric, group 64, bf16, 2 K splits; 9 rows: two MMA column tiles
void int4() {
  const int M = 9, N = 72, K = 256, G = 64, splits = 2;
  auto x = random_bf16(M * K, 1.0f);
  alignas(16) static uint8_t q[N * K / 2];
  std::vector<__half> scales(N * K / G), mins(N * K / G);
  for (auto& b : q) b = static_cast<uint8_t>(rng());
  for (size_t i = 0; i < scales.size(); ++i) {
    scales[i] = __float2half_rn(uniform(0.01f, 0.1f));
    mins[i] = __float2half_rn(uniform(-0.5f, 0.5f));
  }
  std::vector<__nv_bfloat16> y(M * N, __float2bfloat16_rn(NAN));
  std::vector<float> workspace(splits * M * N);
  sc::int4_gemm(ptr(y.data()), ptr(x.data()), ptr(q), ptr(scales.data()), ptr(mins.data()), 0, ptr(workspace.data()),
                M, N, K, G, N, K, K / 2, K / G, kBf16, kFp32, splits, 0, 0);
  std::vector<double> expect(M * N);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double s = 0;
      for (int k = 0; k < K; ++k) {
        const uint8_t byte = q[n * K / 2 + k / 32 * 16 + k % 16];  // element j and j + 16 of a block share a byte
        const int nibble = k % 32 < 16 ? byte & 15 : byte >> 4;
        const double w = __half2float(scales[n * K / G + k / G]) * nibble + __half2float(mins[n * K / G + k / G]);
        s += __bfloat162float(x[m * K + k]) * w;
      }
      expect[m * N + n] = s;
    }
  check("int4_gemm", widen(y), expect, 1.0 / 128);  // bf16 output rounding (2^-9 relative) with room
}

// plain softmax attention of one query row over n keys (float64)
void attend(const float* q, const std::function<const float*(int)>& key, const std::function<const float*(int)>& value,
            int n, int dim, double scale, double* out) {
  std::vector<double> p(n);
  double peak = -INFINITY, total = 0;
  for (int j = 0; j < n; ++j) {
    double s = 0;
    for (int d = 0; d < dim; ++d) s += double(q[d]) * key(j)[d];
    p[j] = s * scale;
    peak = std::max(peak, p[j]);
  }
  for (int d = 0; d < dim; ++d) out[d] = 0;
  for (int j = 0; j < n; ++j) {
    p[j] = std::exp(p[j] - peak);
    total += p[j];
  }
  for (int j = 0; j < n; ++j)
    for (int d = 0; d < dim; ++d) out[d] += p[j] / total * value(j)[d];
}

// fp32 decode over a paged cache: 2 sequences (1 and 40 keys), GQA 6 / 2, head_dim 64, 3 context splits of 16
void paged() {
  const int S = 2, Hq = 6, Hkv = 2, D = 64, B = 16, splits = 3, blocks = 4;
  const int seq_lens[S] = {1, 40};
  const int32_t tables[S][3] = {{3, 0, 0}, {1, 0, 2}};
  std::vector<float> q(S * Hq * D), kc(blocks * B * Hkv * D), vc(kc.size()), out(q.size(), NAN);
  for (auto* v : {&q, &kc, &vc})
    for (auto& e : *v) e = uniform(-1, 1);
  std::vector<float> acc(S * Hq * splits * D), mx(S * Hq * splits), sm(S * Hq * splits);
  sc::PagedAttentionArgs a{};
  a.out = ptr(out.data()), a.q = ptr(q.data()), a.k_cache = ptr(kc.data()), a.v_cache = ptr(vc.data());
  a.block_tables = ptr(tables), a.seq_lens = ptr(seq_lens);
  a.partial_acc = ptr(acc.data()), a.partial_max = ptr(mx.data()), a.partial_sum = ptr(sm.data());
  a.num_tokens = S, a.num_seqs = S, a.num_q_heads = Hq, a.num_kv_heads = Hkv, a.head_dim = D, a.block_size = B;
  a.stride_qt = a.stride_ot = Hq * D, a.stride_qh = a.stride_oh = D;
  a.stride_kb = a.stride_vb = B * Hkv * D, a.stride_ks = a.stride_vs = Hkv * D, a.stride_kh = a.stride_vh = D;
  a.stride_bt = 3, a.scale = 0.125, a.split_size = 16, a.num_splits = splits, a.dtype = kFp32;
  sc::paged_attention(a);
  std::vector<double> expect(out.size());
  for (int s = 0; s < S; ++s)
    for (int h = 0; h < Hq; ++h) {
      auto row = [&](const std::vector<float>& c, int j) {
        return &c[(tables[s][j / B] * B + j % B) * Hkv * D + (h / (Hq / Hkv)) * D];
      };
      attend(&q[(s * Hq + h) * D], [&](int j) { return row(kc, j); }, [&](int j) { return row(vc, j); }, seq_lens[s],
             D, 0.125, &expect[(s * Hq + h) * D]);
    }
  check("paged_attention", std::vector<double>(out.begin(), out.end()), expect, 1e-5);
}

// fp32 text queries over image tokens: batch 2 with kv_lens 0 (zeros) and 20, head_dim 80, 2 splits of 16
void cross() {
  const int Bt = 2, T = 24, Hq = 3, Hkv = 1, D = 80;
  const int32_t kv_lens[Bt] = {0, 20};
  std::vector<float> q(Bt * Hq * D), k(Bt * T * Hkv * D), v(k.size()), out(q.size(), NAN);
  for (auto* t : {&q, &k, &v})
    for (auto& e : *t) e = uniform(-1, 1);
  std::vector<float> acc(Bt * Hq * 2 * D), mx(Bt * Hq * 2), sm(Bt * Hq * 2);
  sc::CrossAttentionArgs a{};
  a.out = ptr(out.data()), a.q = ptr(q.data()), a.k = ptr(k.data()), a.v = ptr(v.data()), a.kv_lens = ptr(kv_lens);
  a.partial_acc = ptr(acc.data()), a.partial_max = ptr(mx.data()), a.partial_sum = ptr(sm.data());
  a.batch = Bt, a.queries_per_batch = 1, a.kv_tokens = T, a.num_q_heads = Hq, a.num_kv_heads = Hkv, a.head_dim = D;
  a.stride_qt = a.stride_ot = Hq * D, a.stride_qh = a.stride_oh = D;
  a.stride_kb = a.stride_vb = T * Hkv * D, a.stride_kt = a.stride_vt = Hkv * D, a.stride_kh = a.stride_vh = D;
  a.scale = 0.1, a.split_size = 16, a.num_splits = 2, a.dtype = kFp32;
  sc::cross_attention(a);
  std::vector<double> expect(out.size(), 0.0);
  for (int h = 0; h < Hq; ++h)
    attend(&q[(Hq + h) * D], [&](int j) { return &k[(T + j) * D]; }, [&](int j) { return &v[(T + j) * D]; },
           kv_lens[1], D, 0.1, &expect[(Hq + h) * D]);
  check("cross_attention", std::vector<double>(out.begin(), out.end()), expect, 1e-5);
}

// bf16 k / v into a NaN cache, RoPE on half the features; slots -1 and past the cache are skipped
void write() {
  const int T = 4, H = 2, D = 64, B = 16, blocks = 2, R = 32;
  const int32_t slots[T] = {5, -1, 31, 32};
  const int32_t positions[T] = {3, 0, 7, 1};
  auto k = random_bf16(T * H * D, 1), v = random_bf16(T * H * D, 1);
  std::vector<float> cos_sin(8 * R);
  for (int p = 0; p < 8; ++p)
    for (int f = 0; f < R / 2; ++f) {
      cos_sin[p * R + f] = std::cos(p * 0.1f * (f + 1));
      cos_sin[p * R + R / 2 + f] = std::sin(p * 0.1f * (f + 1));
    }
  std::vector<__nv_bfloat16> kc(blocks * B * H * D, __float2bfloat16_rn(NAN)), vc(kc);
  sc::WriteKvCacheArgs a{};
  a.k = ptr(k.data()), a.v = ptr(v.data()), a.k_cache = ptr(kc.data()), a.v_cache = ptr(vc.data());
  a.slot_mapping = ptr(slots), a.cos_sin = ptr(cos_sin.data()), a.positions = ptr(positions);
  a.num_tokens = T, a.num_heads = H, a.head_dim = D, a.block_size = B, a.num_blocks = blocks;
  a.stride_kt = a.stride_vt = H * D, a.stride_kh = a.stride_vh = D;
  a.stride_kcb = a.stride_vcb = B * H * D, a.stride_kcs = a.stride_vcs = H * D, a.stride_kch = a.stride_vch = D;
  a.stride_cs = R, a.rotary_dim = R, a.cos_sin_dtype = kFp32, a.dtype = kBf16;
  sc::write_kv_cache(a);
  std::vector<double> got, expect;
  for (int slot = 0; slot < blocks * B; ++slot) {
    int t = -1;
    for (int i = 0; i < T; ++i) t = slots[i] == slot ? i : t;
    for (int e = 0; e < H * D; ++e) {
      const int d = e % D;
      double kx = NAN, vx = NAN;
      if (t >= 0) {
        auto kk = [&](int dd) { return double(__bfloat162float(k[t * H * D + e - d + dd])); };
        const float* table = &cos_sin[positions[t] * R];
        const double c = bf16(table[d % (R / 2)]), s = bf16(table[R / 2 + d % (R / 2)]);  // rounded as k is
        kx = d >= R ? kk(d) : d < R / 2 ? kk(d) * c - kk(d + R / 2) * s : kk(d) * c + kk(d - R / 2) * s;
        vx = __bfloat162float(v[t * H * D + e]);
      }
      for (auto [cache, want] : {std::pair{&kc, kx}, std::pair{&vc, vx}}) {
        const double have = __bfloat162float((*cache)[slot * H * D + e]);
        got.push_back(std::isnan(want) ? (std::isnan(have) ? 0.0 : INFINITY) : have);
        expect.push_back(std::isnan(want) ? 0.0 : want);
      }
    }
  }
  check("write_kv_cache", got, expect, 1.0 / 128);
}

// bf16 conv patch embedding, P = 16 (16-byte tile loads), 2 x 3 patches, D = 40 (a partial tile), + bias
void patch() {
  const int C = 3, Hp = 2, Wp = 3, P = 16, D = 40, K = C * P * P;
  auto pixels = random_bf16(C * Hp * P * Wp * P, 1), weight = random_bf16(D * K, 0.05f), bias = random_bf16(D, 1);
  std::vector<float> out(Hp * Wp * D, NAN);
  sc::PatchEmbedArgs a{};
  a.out = ptr(out.data()), a.pixels = ptr(pixels.data()), a.weight = ptr(weight.data()), a.bias = ptr(bias.data());
  a.batch = 1, a.channels = C, a.patches_h = Hp, a.patches_w = Wp, a.patch = P, a.dim = D;
  a.stride_pb = C * Hp * P * Wp * P, a.stride_pc = Hp * P * Wp * P, a.stride_ph = Wp * P, a.stride_pw = 1;
  a.dtype = kBf16, a.bias_dtype = kBf16, a.out_dtype = kFp32;
  sc::patch_embed(a);
  std::vector<double> expect(out.size());
  for (int n = 0; n < Hp * Wp; ++n)
    for (int d = 0; d < D; ++d) {
      double s = __bfloat162float(bias[d]);
      for (int c = 0; c < C; ++c)
        for (int i = 0; i < P; ++i)
          for (int j = 0; j < P; ++j)
            s += double(__bfloat162float(pixels[c * a.stride_pc + (n / Wp * P + i) * a.stride_ph + n % Wp * P + j])) *
                 __bfloat162float(weight[d * K + (c * P + i) * P + j]);
      expect[n * D + d] = s;
    }
  check("patch_embed", std::vector<double>(out.begin(), out.end()), expect, 1e-5);
}

// fp32 depthwise + pointwise patch embedding, P = 14, 17 patches (two blocks of 16, the second nearly empty)
void dwsep() {
  const int C = 5, Hp = 1, Wp = 17, P = 14, D = 24;
  std::vector<float> pixels(C * Hp * P * Wp * P), dw(C * P * P), pw(D * C), out(Hp * Wp * D, NAN);
  for (auto* t : {&pixels, &dw, &pw})
    for (auto& e : *t) e = uniform(-1, 1);
  sc::DwsepPatchEmbedArgs a{};
  a.out = ptr(out.data()), a.pixels = ptr(pixels.data()), a.dw_weight = ptr(dw.data()), a.pw_weight = ptr(pw.data());
  a.batch = 1, a.channels = C, a.patches_h = Hp, a.patches_w = Wp, a.patch = P, a.dim = D;
  a.stride_pb = C * P * Wp * P, a.stride_pc = P * Wp * P, a.stride_ph = Wp * P, a.stride_pw = 1, a.dtype = kFp32;
  sc::dwsep_patch_embed(a);
  std::vector<double> expect(out.size());
  for (int n = 0; n < Wp; ++n)
    for (int d = 0; d < D; ++d) {
      double s = 0;
      for (int c = 0; c < C; ++c) {
        double depthwise = 0;
        for (int i = 0; i < P; ++i)
          for (int j = 0; j < P; ++j)
            depthwise += double(pixels[c * a.stride_pc + i * a.stride_ph + n * P + j]) * dw[(c * P + i) * P + j];
        s += float(depthwise) * double(pw[d * C + c]);  // the kernel keeps the depthwise output in fp32
      }
      expect[n * D + d] = s;
    }
  check("dwsep_patch_embed", std::vector<double>(out.begin(), out.end()), expect, 1e-5);
}

}  // namespace

int main(int argc, char** argv) {
  const std::pair<const char*, void (*)()> cases[] = {{"int4", int4},   {"patch", patch}, {"paged", paged},
                                                      {"cross", cross}, {"write", write}, {"dwsep", dwsep}};
  for (const auto& [name, run] : cases) {
    bool wanted = argc == 1;
    for (int i = 1; i < argc; ++i) wanted = wanted || std::strcmp(argv[i], name) == 0;
    if (wanted) run();
  }
  return failures == 0 ? 0 : 1;
}
