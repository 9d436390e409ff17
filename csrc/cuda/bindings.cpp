// smolvlm_fast._C: the CUDA kernels of csrc/cuda/, one entry point per op. Tensors are passed as device addresses
// (Python ints, 0 for None), sizes and strides in elements, dtypes as codes (0 fp32, 1 fp16, 2 bf16), and the
// caller's CUDA stream as an integer; smolvlm_fast/ops/cuda.py builds these calls from torch tensors. Each entry point
// checks its arguments: ValueError for a bad one, RuntimeError when CUDA fails. Built by setup.py with nvcc; no
// PyTorch headers.
#include <pybind11/pybind11.h>

#include "cross_attention.cuh"
#include "device_info.cuh"
#include "int4_gemm.cuh"
#include "paged_attention.cuh"
#include "patch_embed.cuh"
#include "write_kv_cache.cuh"

#if __has_include("build_info.h")
#include "build_info.h"  // written by setup.py: the architectures compiled and a hash of csrc/cuda/
#endif
#ifndef SMOLVLM_FAST_CUDA_ARCHS
#define SMOLVLM_FAST_CUDA_ARCHS ""
#endif
#ifndef SMOLVLM_FAST_CUDA_SOURCE_HASH
#define SMOLVLM_FAST_CUDA_SOURCE_HASH ""
#endif

namespace py = pybind11;
namespace sc = smolvlm_cuda;

PYBIND11_MODULE(_C, m) {
  m.doc() = "smolvlm_fast's CUDA kernels (csrc/cuda/); called through smolvlm_fast.ops.cuda";

  m.def("int4_gemm", &sc::int4_gemm, py::arg("y"), py::arg("x"), py::arg("qweight"), py::arg("scales"),
        py::arg("mins"), py::arg("bias"), py::arg("workspace"), py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("group_size"), py::arg("stride_y"), py::arg("stride_x"), py::arg("stride_q"), py::arg("stride_s"),
        py::arg("dtype"), py::arg("bias_dtype"), py::arg("splits"), py::arg("device"), py::arg("stream"),
        "y[M, N] = x[M, K] @ dequantize(int4 weight).T (+ bias), M <= 16, fp16 / bf16 (csrc/cuda/int4_gemm.cuh)");

  m.def("paged_attention", &sc::paged_attention, py::arg("out"), py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"), py::arg("query_start_loc"),
        py::arg("cos_sin"), py::arg("positions"), py::arg("partial_acc"), py::arg("partial_max"),
        py::arg("partial_sum"), py::arg("num_tokens"), py::arg("num_seqs"), py::arg("num_q_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"), py::arg("stride_qt"),
        py::arg("stride_qh"), py::arg("stride_ot"), py::arg("stride_oh"), py::arg("stride_kb"), py::arg("stride_ks"),
        py::arg("stride_kh"), py::arg("stride_vb"), py::arg("stride_vs"), py::arg("stride_vh"), py::arg("stride_bt"),
        py::arg("stride_cs"), py::arg("rotary_dim"), py::arg("cos_sin_dtype"), py::arg("positions_int64"),
        py::arg("scale"), py::arg("split_size"), py::arg("num_splits"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"), "decode attention over the paged KV cache (csrc/cuda/paged_attention.cuh)");

  m.def("cross_attention", &sc::cross_attention, py::arg("out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("kv_lens"), py::arg("partial_acc"), py::arg("partial_max"), py::arg("partial_sum"),
        py::arg("batch"), py::arg("queries_per_batch"), py::arg("kv_tokens"), py::arg("num_q_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("stride_qt"), py::arg("stride_qh"),
        py::arg("stride_ot"), py::arg("stride_oh"), py::arg("stride_kb"), py::arg("stride_kt"), py::arg("stride_kh"),
        py::arg("stride_vb"), py::arg("stride_vt"), py::arg("stride_vh"), py::arg("kv_lens_int64"),
        py::arg("scale"), py::arg("split_size"), py::arg("num_splits"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"), "text queries over cached image K/V (csrc/cuda/cross_attention.cuh)");

  m.def("write_kv_cache", &sc::write_kv_cache, py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"), py::arg("cos_sin"), py::arg("positions"), py::arg("num_tokens"),
        py::arg("num_heads"), py::arg("head_dim"), py::arg("block_size"), py::arg("num_blocks"), py::arg("stride_kt"),
        py::arg("stride_kh"), py::arg("stride_vt"), py::arg("stride_vh"), py::arg("stride_kcb"),
        py::arg("stride_kcs"), py::arg("stride_kch"), py::arg("stride_vcb"), py::arg("stride_vcs"),
        py::arg("stride_vch"), py::arg("stride_cs"), py::arg("rotary_dim"), py::arg("slots_int64"),
        py::arg("positions_int64"), py::arg("cos_sin_dtype"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "k/v into the paged cache, k rotated on the way (csrc/cuda/write_kv_cache.cuh)");

  m.def("patch_embed", &sc::patch_embed, py::arg("out"), py::arg("pixels"), py::arg("weight"), py::arg("bias"),
        py::arg("pos_embed"), py::arg("position_ids"), py::arg("batch"), py::arg("channels"), py::arg("patches_h"),
        py::arg("patches_w"), py::arg("patch"), py::arg("dim"), py::arg("stride_pb"), py::arg("stride_pc"),
        py::arg("stride_ph"), py::arg("stride_pw"), py::arg("stride_pos"), py::arg("stride_ib"),
        py::arg("stride_in"), py::arg("ids_int64"), py::arg("dtype"), py::arg("bias_dtype"), py::arg("pos_dtype"),
        py::arg("out_dtype"), py::arg("device"), py::arg("stream"),
        "conv patch embedding (groups = 1) as a GEMM + bias + position embedding (csrc/cuda/patch_embed.cuh)");

  m.def("dwsep_patch_embed", &sc::dwsep_patch_embed, py::arg("out"), py::arg("pixels"), py::arg("dw_weight"),
        py::arg("dw_bias"), py::arg("pw_weight"), py::arg("pw_bias"), py::arg("pos_embed"), py::arg("position_ids"),
        py::arg("batch"), py::arg("channels"), py::arg("patches_h"), py::arg("patches_w"), py::arg("patch"),
        py::arg("dim"), py::arg("stride_pb"), py::arg("stride_pc"), py::arg("stride_ph"), py::arg("stride_pw"),
        py::arg("stride_pos"), py::arg("stride_ib"), py::arg("stride_in"), py::arg("ids_int64"), py::arg("dtype"),
        py::arg("bias_dtype"), py::arg("pos_dtype"), py::arg("out_dtype"), py::arg("device"), py::arg("stream"),
        "depthwise P x P conv + pointwise projection + bias + position embedding (csrc/cuda/patch_embed.cuh)");

  m.def("decode_attention_head_dim_supported", &sc::decode_attention_head_dim_supported, py::arg("head_dim"));
  m.def("cuda_runtime_version", &sc::cuda_runtime_version);
  m.def("cuda_driver_version", &sc::cuda_driver_version);
  m.def("device_count", &sc::device_count);
  m.def("compute_capability", &sc::compute_capability, py::arg("device"));
  m.attr("archs") = SMOLVLM_FAST_CUDA_ARCHS;  // the -gencode targets it was compiled for, e.g. "sm_80;sm_90"
  m.attr("source_hash") = SMOLVLM_FAST_CUDA_SOURCE_HASH;  // setup.py's cuda_source_hash() of csrc/cuda/ when built
  m.attr("int4_gemm_max_m") = sc::kInt4GemmMaxM;
  m.attr("attention_max_split") = sc::kPagedAttentionMaxSplit;
  m.attr("dwsep_max_channels") = sc::kDwsepMaxChannels;
}
