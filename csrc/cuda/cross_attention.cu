// cross_attention for decode (contract and layouts: cross_attention.cuh; the kernel: decode_attention.cuh).
#include "cross_attention.cuh"
#include "decode_attention.cuh"

namespace smolvlm_cuda {
namespace {

// Image token j of the token's batch row: k + b * stride_kb + j * stride_kt + kv_head * stride_kh.
template <typename T>
struct DenseKv {
  const T* k;
  const T* v;
  int64_t stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh;
  const void* kv_lens;  // nullptr: every image token counts
  bool kv_lens_int64;
  int queries_per_batch, kv_tokens;
  // set by begin()
  const T* k_row;
  const T* v_row;

  __device__ int begin(int64_t token, int kv_head) {
    const int64_t b = token / queries_per_batch;
    k_row = k + b * stride_kb + kv_head * stride_kh;
    v_row = v + b * stride_vb + kv_head * stride_vh;
    int64_t n = kv_tokens;
    if (kv_lens != nullptr) n = load_index(kv_lens, b, kv_lens_int64);
    return static_cast<int>(n < 0 ? 0 : n > kv_tokens ? kv_tokens : n);
  }
  __device__ const T* key(int j) const { return k_row + j * stride_kt; }
  __device__ const T* value(int j) const { return v_row + j * stride_vt; }
};

}  // namespace

void cross_attention(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t kv_lens,
                     std::uintptr_t partial_acc, std::uintptr_t partial_max, std::uintptr_t partial_sum,
                     int64_t batch, int64_t queries_per_batch, int64_t kv_tokens, int64_t num_q_heads,
                     int64_t num_kv_heads, int64_t head_dim, int64_t stride_qt, int64_t stride_qh, int64_t stride_ot,
                     int64_t stride_oh, int64_t stride_kb, int64_t stride_kt, int64_t stride_kh, int64_t stride_vb,
                     int64_t stride_vt, int64_t stride_vh, bool kv_lens_int64, double scale, int64_t split_size,
                     int64_t num_splits, int dtype, int device, std::uintptr_t stream) {
  using namespace decode_attention;
  const char* op = "cross_attention";
  check_dtype(dtype, op, "q");
  check_arg(out && q && k && v, "cross_attention: a required pointer is 0");
  check_arg(batch >= 1 && queries_per_batch >= 1 && batch * queries_per_batch < (int64_t{1} << 31),
            "cross_attention: B * S must be in [1, 2^31)");
  check_arg(kv_tokens >= 0 && kv_tokens < (int64_t{1} << 31), "cross_attention: bad number of image tokens");
  check_heads(op, num_q_heads, num_kv_heads, head_dim);
  check_kv_aligned(op, "k and v rows", dtype, k, v,
                   {stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh});
  check_arg(split_size >= 1 && split_size <= kMaxSplit, "cross_attention: split_size must be in [1, 512]");
  check_arg(num_splits >= 1 && num_splits <= 65535 && (num_splits - 1) * split_size < std::max<int64_t>(kv_tokens, 1),
            "cross_attention: num_splits must cover the image tokens without an empty split");
  const Output oa = make_output(op, out, stride_ot, stride_oh, partial_acc, partial_max, partial_sum, num_splits);
  const Shape shape = make_shape(op, num_q_heads, num_kv_heads, split_size);
  const Query qa{reinterpret_cast<const void*>(q), stride_qt, stride_qh, nullptr, kFloat32, 0, nullptr, false, 0,
                 static_cast<float>(scale) * kLog2e};
  auto make = [&](auto tag) {
    using T = decltype(tag);
    DenseKv<T> kv{};
    kv.k = reinterpret_cast<const T*>(k);
    kv.v = reinterpret_cast<const T*>(v);
    kv.stride_kb = stride_kb, kv.stride_kt = stride_kt, kv.stride_kh = stride_kh;
    kv.stride_vb = stride_vb, kv.stride_vt = stride_vt, kv.stride_vh = stride_vh;
    kv.kv_lens = reinterpret_cast<const void*>(kv_lens);
    kv.kv_lens_int64 = kv_lens_int64;
    kv.queries_per_batch = static_cast<int>(queries_per_batch);
    kv.kv_tokens = static_cast<int>(kv_tokens);
    return kv;
  };
  DeviceGuard guard(device);
  dispatch_dtype(dtype, head_dim, qa, oa, shape, batch * queries_per_batch, as_stream(stream), make);
}

}  // namespace smolvlm_cuda
