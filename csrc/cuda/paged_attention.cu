// paged_attention for decode (contract and layouts: paged_attention.cuh; the kernel: decode_attention.cuh).
#include "decode_attention.cuh"
#include "paged_attention.cuh"

namespace smolvlm_cuda {
namespace {

// Key j of a token's sequence: block_tables[seq, j / block_size] is its page, j % block_size its slot.
template <typename T>
struct PagedKv {
  const T* k_cache;
  const T* v_cache;
  int64_t stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh;
  const int32_t* block_tables;
  int64_t stride_bt;
  const int32_t* seq_lens;
  const int32_t* query_start_loc;  // nullptr: token t is the only query of sequence t
  int num_seqs, block_size;
  // set by begin()
  const int32_t* table = nullptr;
  int64_t k_head = 0, v_head = 0;

  explicit PagedKv(const PagedAttentionArgs& a)
      : k_cache(reinterpret_cast<const T*>(a.k_cache)), v_cache(reinterpret_cast<const T*>(a.v_cache)),
        stride_kb(a.stride_kb), stride_ks(a.stride_ks), stride_kh(a.stride_kh),
        stride_vb(a.stride_vb), stride_vs(a.stride_vs), stride_vh(a.stride_vh),
        block_tables(reinterpret_cast<const int32_t*>(a.block_tables)), stride_bt(a.stride_bt),
        seq_lens(reinterpret_cast<const int32_t*>(a.seq_lens)),
        query_start_loc(reinterpret_cast<const int32_t*>(a.query_start_loc)),
        num_seqs(static_cast<int>(a.num_seqs)), block_size(static_cast<int>(a.block_size)) {}

  // The sequence of `token` and how many of its keys the token sees (its position + 1).
  __device__ int begin(int64_t token, int kv_head) {
    int64_t seq = token, first = token, q_len = 1;
    if (query_start_loc != nullptr) {  // the last sequence whose queries start at or before the token
      int lo = 0, hi = num_seqs;
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (query_start_loc[mid] <= token) lo = mid;
        else hi = mid;
      }
      seq = lo;
      first = query_start_loc[lo];
      q_len = query_start_loc[lo + 1] - first;
    }
    const int64_t seq_len = seq_lens[seq];
    table = block_tables + seq * stride_bt;
    k_head = kv_head * stride_kh;
    v_head = kv_head * stride_vh;
    const int64_t visible = seq_len - q_len + (token - first) + 1;
    return static_cast<int>(visible < 0 ? 0 : visible > seq_len ? seq_len : visible);
  }
  __device__ const T* key(int j) const {
    return k_cache + static_cast<int64_t>(table[j / block_size]) * stride_kb + (j % block_size) * stride_ks + k_head;
  }
  __device__ const T* value(int j) const {
    return v_cache + static_cast<int64_t>(table[j / block_size]) * stride_vb + (j % block_size) * stride_vs + v_head;
  }
};

}  // namespace

bool decode_attention_head_dim_supported(int64_t head_dim) { return decode_attention::head_dim_supported(head_dim); }

void paged_attention(const PagedAttentionArgs& args) {
  using namespace decode_attention;
  const char* op = "paged_attention";
  check_dtype(args.dtype, op, "q");
  check_arg(args.out && args.q && args.k_cache && args.v_cache && args.block_tables && args.seq_lens,
            "paged_attention: a required pointer is 0");
  check_arg(args.num_tokens >= 1 && args.num_tokens < (int64_t{1} << 31), "paged_attention: T must be in [1, 2^31)");
  check_arg(args.num_seqs >= 1 && args.num_seqs < (int64_t{1} << 31), "paged_attention: num_seqs must be positive");
  check_arg(args.query_start_loc != 0 || args.num_tokens == args.num_seqs,
            "paged_attention: without query_start_loc there is one query per sequence");
  check_heads(op, args);
  check_arg(args.block_size >= 1, "paged_attention: block_size must be positive");
  check_kv_aligned(op, "cache rows", args.dtype, args.k_cache, args.v_cache,
                   {args.stride_kb, args.stride_ks, args.stride_kh, args.stride_vb, args.stride_vs, args.stride_vh});
  check_arg(args.split_size >= 1 && args.split_size <= kMaxSplit, "paged_attention: split_size must be in [1, 512]");
  check_arg(args.num_splits >= 1 && args.num_splits <= 65535, "paged_attention: num_splits must be in [1, 65535]");
  const Output oa = make_output(op, args);
  if (args.cos_sin != 0) {
    check_dtype(args.cos_sin_dtype, op, "cos_sin");
    check_arg(args.positions != 0, "paged_attention: cos_sin needs positions");
    check_arg(args.rotary_dim >= 2 && args.rotary_dim % 2 == 0 && args.rotary_dim <= args.head_dim,
              "paged_attention: rotary_dim must be even and in [2, head_dim]");
  }
  const Shape shape = make_shape(op, args);
  const Query qa{reinterpret_cast<const void*>(args.q), args.stride_qt, args.stride_qh,
                 reinterpret_cast<const void*>(args.cos_sin), args.cos_sin_dtype, args.stride_cs,
                 reinterpret_cast<const void*>(args.positions), args.positions_int64, static_cast<int>(args.rotary_dim),
                 static_cast<float>(args.scale) * kLog2e};
  dispatch<PagedKv>(args, qa, oa, shape, args.num_tokens);
}

}  // namespace smolvlm_cuda
