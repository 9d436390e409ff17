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
  const int32_t* table;
  int64_t k_head, v_head;

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

void paged_attention(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache,
                     std::uintptr_t block_tables, std::uintptr_t seq_lens, std::uintptr_t query_start_loc,
                     std::uintptr_t cos_sin, std::uintptr_t positions, std::uintptr_t partial_acc,
                     std::uintptr_t partial_max, std::uintptr_t partial_sum, int64_t num_tokens, int64_t num_seqs,
                     int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                     int64_t stride_qt, int64_t stride_qh, int64_t stride_ot, int64_t stride_oh, int64_t stride_kb,
                     int64_t stride_ks, int64_t stride_kh, int64_t stride_vb, int64_t stride_vs, int64_t stride_vh,
                     int64_t stride_bt, int64_t stride_cs, int64_t rotary_dim, int cos_sin_dtype,
                     bool positions_int64, double scale, int64_t split_size, int64_t num_splits, int dtype,
                     int device, std::uintptr_t stream) {
  using namespace decode_attention;
  const char* op = "paged_attention";
  check_dtype(dtype, op, "q");
  check_arg(out && q && k_cache && v_cache && block_tables && seq_lens, "paged_attention: a required pointer is 0");
  check_arg(num_tokens >= 1 && num_tokens < (int64_t{1} << 31), "paged_attention: T must be in [1, 2^31)");
  check_arg(num_seqs >= 1 && num_seqs < (int64_t{1} << 31), "paged_attention: num_seqs must be positive");
  check_arg(query_start_loc != 0 || num_tokens == num_seqs,
            "paged_attention: without query_start_loc there is one query per sequence");
  check_heads(op, num_q_heads, num_kv_heads, head_dim);
  check_arg(block_size >= 1, "paged_attention: block_size must be positive");
  check_kv_aligned(op, "cache rows", dtype, k_cache, v_cache,
                   {stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh});
  check_arg(split_size >= 1 && split_size <= kMaxSplit, "paged_attention: split_size must be in [1, 512]");
  check_arg(num_splits >= 1 && num_splits <= 65535, "paged_attention: num_splits must be in [1, 65535]");
  const Output oa = make_output(op, out, stride_ot, stride_oh, partial_acc, partial_max, partial_sum, num_splits);
  if (cos_sin != 0) {
    check_dtype(cos_sin_dtype, op, "cos_sin");
    check_arg(positions != 0, "paged_attention: cos_sin needs positions");
    check_arg(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
              "paged_attention: rotary_dim must be even and in [2, head_dim]");
  }
  const Shape shape = make_shape(op, num_q_heads, num_kv_heads, split_size);
  const Query qa{reinterpret_cast<const void*>(q), stride_qt, stride_qh, reinterpret_cast<const void*>(cos_sin),
                 cos_sin_dtype, stride_cs, reinterpret_cast<const void*>(positions), positions_int64,
                 static_cast<int>(rotary_dim), static_cast<float>(scale) * kLog2e};
  auto make = [&](auto tag) {
    using T = decltype(tag);
    PagedKv<T> kv{};
    kv.k_cache = reinterpret_cast<const T*>(k_cache);
    kv.v_cache = reinterpret_cast<const T*>(v_cache);
    kv.stride_kb = stride_kb, kv.stride_ks = stride_ks, kv.stride_kh = stride_kh;
    kv.stride_vb = stride_vb, kv.stride_vs = stride_vs, kv.stride_vh = stride_vh;
    kv.block_tables = reinterpret_cast<const int32_t*>(block_tables);
    kv.stride_bt = stride_bt;
    kv.seq_lens = reinterpret_cast<const int32_t*>(seq_lens);
    kv.query_start_loc = reinterpret_cast<const int32_t*>(query_start_loc);
    kv.num_seqs = static_cast<int>(num_seqs);
    kv.block_size = static_cast<int>(block_size);
    return kv;
  };
  DeviceGuard guard(device);
  dispatch_dtype(dtype, head_dim, qa, oa, shape, num_tokens, as_stream(stream), make);
}

}  // namespace smolvlm_cuda
