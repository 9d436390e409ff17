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
  const T* k_row = nullptr;
  const T* v_row = nullptr;

  explicit DenseKv(const CrossAttentionArgs& a)
      : k(reinterpret_cast<const T*>(a.k)), v(reinterpret_cast<const T*>(a.v)),
        stride_kb(a.stride_kb), stride_kt(a.stride_kt), stride_kh(a.stride_kh),
        stride_vb(a.stride_vb), stride_vt(a.stride_vt), stride_vh(a.stride_vh),
        kv_lens(reinterpret_cast<const void*>(a.kv_lens)), kv_lens_int64(a.kv_lens_int64),
        queries_per_batch(static_cast<int>(a.queries_per_batch)), kv_tokens(static_cast<int>(a.kv_tokens)) {}

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

void cross_attention(const CrossAttentionArgs& args) {
  using namespace decode_attention;
  const char* op = "cross_attention";
  check_dtype(args.dtype, op, "q");
  check_arg(args.out && args.q && args.k && args.v, "cross_attention: a required pointer is 0");
  const int64_t tokens = args.batch * args.queries_per_batch;
  check_arg(args.batch >= 1 && args.queries_per_batch >= 1 && tokens < (int64_t{1} << 31),
            "cross_attention: B * S must be in [1, 2^31)");
  check_arg(args.kv_tokens >= 0 && args.kv_tokens < (int64_t{1} << 31), "cross_attention: bad number of image tokens");
  check_heads(op, args);
  check_kv_aligned(op, "k and v rows", args.dtype, args.k, args.v,
                   {args.stride_kb, args.stride_kt, args.stride_kh, args.stride_vb, args.stride_vt, args.stride_vh});
  check_arg(args.split_size >= 1 && args.split_size <= kMaxSplit, "cross_attention: split_size must be in [1, 512]");
  check_arg(args.num_splits >= 1 && args.num_splits <= 65535 &&
                (args.num_splits - 1) * args.split_size < std::max<int64_t>(args.kv_tokens, 1),
            "cross_attention: num_splits must cover the image tokens without an empty split");
  const Output oa = make_output(op, args);
  const Shape shape = make_shape(op, args);
  const Query qa{reinterpret_cast<const void*>(args.q), args.stride_qt, args.stride_qh, nullptr, kFloat32, 0, nullptr,
                 false, 0, static_cast<float>(args.scale) * kLog2e};
  dispatch<DenseKv>(args, qa, oa, shape, tokens);
}

}  // namespace smolvlm_cuda
