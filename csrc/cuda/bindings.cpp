// smolvlm_fast._C: the CUDA kernels of csrc/cuda/, one entry point per op. Tensors are passed as device addresses
// (Python ints, 0 for None), sizes and strides in elements, dtypes as codes (0 fp32, 1 fp16, 2 bf16), and the
// caller's CUDA stream as an integer; smolvlm_fast/ops/cuda.py builds these calls from torch tensors. Ops with many
// arguments take one argument struct (declared in the op's .cuh), built in Python by keyword, every field named:
// _C.paged_attention(_C.PagedAttentionArgs(out=..., q=..., ...)). Each entry point checks its arguments: ValueError
// for a bad one, RuntimeError when CUDA fails. Built by setup.py with nvcc; no PyTorch headers.
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

namespace {

// The Python class of an argument struct S: S(**fields) sets every field by keyword (TypeError when one is missing,
// AttributeError for an unknown name), each field then a read/write attribute. The fields follow as F(name) (with
// `using S = ...` in scope); Base: the struct S derives from, already bound.
template <typename S, typename... Base>
py::class_<S, Base...> arg_struct(py::module_& m, const char* name) {
  return py::class_<S, Base...>(m, name).def(py::init([name](const py::kwargs& fields) {
    static const size_t count = [] {  // the class's fields (def_readwrite properties), its bases' included
      size_t n = 0;
      const py::module_ builtins = py::module_::import("builtins");
      const py::object cls = py::type::of<S>(), property = builtins.attr("property");
      for (const auto& attr : builtins.attr("dir")(cls)) n += py::isinstance(py::getattr(cls, attr), property);
      return n;
    }();
    S args{};
    const py::object view = py::cast(&args, py::return_value_policy::reference);
    for (const auto& field : fields) py::setattr(view, field.first, field.second);
    if (fields.size() != count)
      throw py::type_error(std::string(name) + " takes all " + std::to_string(count) + " fields by keyword, got " +
                           std::to_string(fields.size()));
    return args;
  }));
}
#define F(field) .def_readwrite(#field, &S::field)

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "smolvlm_fast's CUDA kernels (csrc/cuda/); called through smolvlm_fast.ops.cuda";

  m.def("int4_gemm", &sc::int4_gemm, py::arg("y"), py::arg("x"), py::arg("qweight"), py::arg("scales"),
        py::arg("mins"), py::arg("bias"), py::arg("workspace"), py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("group_size"), py::arg("stride_y"), py::arg("stride_x"), py::arg("stride_q"), py::arg("stride_s"),
        py::arg("dtype"), py::arg("bias_dtype"), py::arg("splits"), py::arg("device"), py::arg("stream"),
        "y[M, N] = x[M, K] @ dequantize(int4 weight).T (+ bias), M <= 16, fp16 / bf16 (csrc/cuda/int4_gemm.cuh)");

  {
    using S = sc::PagedAttentionArgs;
    arg_struct<S>(m, "PagedAttentionArgs")
      F(out) F(q) F(k_cache) F(v_cache) F(block_tables) F(seq_lens) F(query_start_loc) F(cos_sin) F(positions)
      F(partial_acc) F(partial_max) F(partial_sum) F(num_tokens) F(num_seqs) F(num_q_heads) F(num_kv_heads)
      F(head_dim) F(block_size) F(stride_qt) F(stride_qh) F(stride_ot) F(stride_oh) F(stride_kb) F(stride_ks)
      F(stride_kh) F(stride_vb) F(stride_vs) F(stride_vh) F(stride_bt) F(stride_cs) F(rotary_dim) F(cos_sin_dtype)
      F(positions_int64) F(scale) F(split_size) F(num_splits) F(dtype) F(device) F(stream);
  }
  m.def("paged_attention", &sc::paged_attention, py::arg("args"),
        "decode attention over the paged KV cache (csrc/cuda/paged_attention.cuh)");

  {
    using S = sc::CrossAttentionArgs;
    arg_struct<S>(m, "CrossAttentionArgs")
      F(out) F(q) F(k) F(v) F(kv_lens) F(partial_acc) F(partial_max) F(partial_sum) F(batch) F(queries_per_batch)
      F(kv_tokens) F(num_q_heads) F(num_kv_heads) F(head_dim) F(stride_qt) F(stride_qh) F(stride_ot) F(stride_oh)
      F(stride_kb) F(stride_kt) F(stride_kh) F(stride_vb) F(stride_vt) F(stride_vh) F(kv_lens_int64) F(scale)
      F(split_size) F(num_splits) F(dtype) F(device) F(stream);
  }
  m.def("cross_attention", &sc::cross_attention, py::arg("args"),
        "text queries over cached image K/V (csrc/cuda/cross_attention.cuh)");

  {
    using S = sc::WriteKvCacheArgs;
    arg_struct<S>(m, "WriteKvCacheArgs")
      F(k) F(v) F(k_cache) F(v_cache) F(slot_mapping) F(cos_sin) F(positions) F(num_tokens) F(num_heads) F(head_dim)
      F(block_size) F(num_blocks) F(stride_kt) F(stride_kh) F(stride_vt) F(stride_vh) F(stride_kcb) F(stride_kcs)
      F(stride_kch) F(stride_vcb) F(stride_vcs) F(stride_vch) F(stride_cs) F(rotary_dim) F(slots_int64)
      F(positions_int64) F(cos_sin_dtype) F(dtype) F(device) F(stream);
  }
  m.def("write_kv_cache", &sc::write_kv_cache, py::arg("args"),
        "k/v into the paged cache, k rotated on the way (csrc/cuda/write_kv_cache.cuh)");

  {
    using S = sc::PatchImageArgs;
    py::class_<S>(m, "PatchImageArgs")  // the fields PatchEmbedArgs and DwsepPatchEmbedArgs share
      F(out) F(pixels) F(pos_embed) F(position_ids) F(batch) F(channels) F(patches_h) F(patches_w) F(patch) F(dim)
      F(stride_pb) F(stride_pc) F(stride_ph) F(stride_pw) F(stride_pos) F(stride_ib) F(stride_in) F(ids_int64)
      F(dtype) F(bias_dtype) F(pos_dtype) F(out_dtype) F(device) F(stream);
  }
  {
    using S = sc::PatchEmbedArgs;
    arg_struct<S, sc::PatchImageArgs>(m, "PatchEmbedArgs") F(weight) F(bias);
  }
  m.def("patch_embed", &sc::patch_embed, py::arg("args"),
        "conv patch embedding (groups = 1) as a GEMM + bias + position embedding (csrc/cuda/patch_embed.cuh)");
  {
    using S = sc::DwsepPatchEmbedArgs;
    arg_struct<S, sc::PatchImageArgs>(m, "DwsepPatchEmbedArgs") F(dw_weight) F(dw_bias) F(pw_weight) F(pw_bias);
  }
  m.def("dwsep_patch_embed", &sc::dwsep_patch_embed, py::arg("args"),
        "depthwise P x P conv + pointwise projection + bias + position embedding (csrc/cuda/patch_embed.cuh)");
#undef F

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
