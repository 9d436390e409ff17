// smolvlm_fast._cpu: the module definition and the checks at its border. Kernels: quant_gemm.cpp, decoder_step.cpp,
// paged_attention.cpp, small_ops.cpp.
// Every array must have the exact dtype, be C-contiguous and aligned, and have shapes that agree; anything
// else raises ValueError (nothing is converted or copied silently, nothing is read out of bounds).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "decoder_step.h"
#include "paged_attention.h"
#include "py_checks.h"
#include "quant_gemm.h"
#include "small_ops.h"
#include "thread_pool.h"

namespace py = pybind11;
using namespace smolvlm_cpu::py_checks;

void register_bf16(py::module_& m);    // bindings_bf16.cpp: the bf16 products
void register_vision(py::module_& m);  // bindings_vision.cpp: the fused vision encoder

namespace {

enum class DType { f32, f16, u8, u16, i8, i32 };

const char* dtype_name(DType t) {
    switch (t) {
        case DType::f32: return "float32";
        case DType::f16: return "float16";
        case DType::u8: return "uint8";
        case DType::u16: return "uint16";
        case DType::i8: return "int8";
        case DType::i32: return "int32";
    }
    return "?";
}

bool has_dtype(const py::array& a, DType t) {
    const py::dtype dt = a.dtype();
    if (dt.byteorder() == '>') return false;
    switch (t) {
        case DType::f32: return dt.kind() == 'f' && dt.itemsize() == 4;
        case DType::f16: return dt.kind() == 'f' && dt.itemsize() == 2;
        case DType::u8: return dt.kind() == 'u' && dt.itemsize() == 1;
        case DType::u16: return dt.kind() == 'u' && dt.itemsize() == 2;
        case DType::i8: return dt.kind() == 'i' && dt.itemsize() == 1;
        case DType::i32: return dt.kind() == 'i' && dt.itemsize() == 4;
    }
    return false;
}

// The array's data, after checking dtype, layout and shape (-1 in `shape`: any size, returned through it).
template <class T>
T* checked(const char* fn, const char* name, const py::array& a, DType t, std::vector<int64_t> shape,
           bool writeable = false) {
    const std::string where = std::string(fn) + ": " + name;
    if (!has_dtype(a, t))
        throw py::value_error(where + " must be " + dtype_name(t) + ", got " + std::string(py::str(a.dtype())));
    check_shape(where, a, shape);
    check_layout(where, a, writeable);
    return static_cast<T*>(const_cast<void*>(a.data()));
}

void check_no_overlap(const char* fn, const py::array& out, const py::array& a, const char* name) {
    const auto* o = static_cast<const char*>(out.data());
    const auto* p = static_cast<const char*>(a.data());
    if (o < p + a.nbytes() && p < o + out.nbytes())
        throw py::value_error(std::string(fn) + ": out overlaps " + name);
}

void check_k(const std::string& fn, int64_t K, int group_size) {
    if (group_size != 32 && group_size != 64 && group_size != 128)
        throw py::value_error(fn + ": group_size must be 32, 64 or 128, got " + std::to_string(group_size));
    if (K <= 0 || K % group_size)
        throw py::value_error(fn + ": K = " + std::to_string(K) + " is not a positive multiple of group_size " +
                              std::to_string(group_size));
}

smolvlm_cpu::Int4Matrix int4_matrix(const char* fn, const py::array& qweight, const py::array& scales,
                                    const py::object& mins, int group_size, int64_t K) {
    check_k(fn, K, group_size);
    if (qweight.ndim() != 2) throw py::value_error(std::string(fn) + ": qweight must be 2-D, got " + shape_of(qweight));
    const int64_t N = qweight.shape(0), G = K / group_size;
    smolvlm_cpu::Int4Matrix w{};
    w.qweight = checked<const uint8_t>(fn, "qweight", qweight, DType::u8, {N, K / 2});
    w.scales = checked<const uint16_t>(fn, "scales", scales, DType::f16, {N, G});
    if (!mins.is_none()) {
        if (!py::isinstance<py::array>(mins))
            throw py::value_error(std::string(fn) + ": mins must be an array or None");
        w.mins = checked<const uint16_t>(fn, "mins", mins.cast<py::array>(), DType::f16, {N, G});
    }
    w.N = N;
    w.K = K;
    w.group_size = group_size;
    return w;
}

smolvlm_cpu::Q8Matrix q8_matrix(const char* fn, const py::array& q, const py::array& scales) {
    if (q.ndim() != 2) throw py::value_error(std::string(fn) + ": q must be 2-D, got " + shape_of(q));
    const int64_t N = q.shape(0), K = q.shape(1);
    check_k(fn, K, 32);
    smolvlm_cpu::Q8Matrix w{};
    w.q = checked<const int8_t>(fn, "q", q, DType::i8, {N, K});
    w.scales = checked<const uint16_t>(fn, "scales", scales, DType::f16, {N, K / 32});
    w.N = N;
    w.K = K;
    return w;
}

// x [M, K] and out [M, N], checked against the weight's N and K.
std::pair<const float*, float*> checked_x_out(const char* fn, const py::array& x, const py::array& out, int64_t N,
                                              int64_t K, int64_t* M) {
    if (x.ndim() != 2) throw py::value_error(std::string(fn) + ": x must be [M, K], got shape " + shape_of(x));
    *M = x.shape(0);
    const float* xp = checked<const float>(fn, "x", x, DType::f32, {*M, K});
    float* op = checked<float>(fn, "out", out, DType::f32, {*M, N}, true);
    check_no_overlap(fn, out, x, "x");
    return {xp, op};
}

// int8_x: round x to int8 per 32-element block first (int4_gemm_int8); returns whether that was done.
bool int4_gemm(const py::array& x, const py::array& qweight, const py::array& scales, const py::object& mins,
               int group_size, const py::array& out, bool int8_x) {
    const char* fn = "int4_gemm";
    if (qweight.ndim() != 2) throw py::value_error("int4_gemm: qweight must be 2-D, got " + shape_of(qweight));
    const int64_t K = qweight.shape(1) * 2;
    const smolvlm_cpu::Int4Matrix w = int4_matrix(fn, qweight, scales, mins, group_size, K);
    int64_t M;
    auto [xp, op] = checked_x_out(fn, x, out, w.N, K, &M);
    check_no_overlap(fn, out, qweight, "qweight");
    py::gil_scoped_release release;
    return smolvlm_cpu::linear(xp, M, smolvlm_cpu::Linear::of(w), op, int8_x);
}

void q8_gemm(const py::array& x, const py::array& q, const py::array& scales, const py::array& out) {
    const smolvlm_cpu::Q8Matrix w = q8_matrix("q8_gemm", q, scales);
    int64_t M;
    auto [xp, op] = checked_x_out("q8_gemm", x, out, w.N, w.K, &M);
    check_no_overlap("q8_gemm", out, q, "q");
    py::gil_scoped_release release;
    smolvlm_cpu::linear(xp, M, smolvlm_cpu::Linear::of(w), op);
}

// out[M, N] = x[M, K] @ w[N, K]^T for float32 w (the fused decode step's kernel for few rows, prefill_gemm for many).
void f32_gemm(const py::array& x, const py::array& w, const py::array& out) {
    const char* fn = "f32_gemm";
    if (w.ndim() != 2) throw py::value_error("f32_gemm: w must be 2-D, got " + shape_of(w));
    const int64_t N = w.shape(0), K = w.shape(1);
    const smolvlm_cpu::F32Matrix m{checked<const float>(fn, "w", w, DType::f32, {N, K}), N, K};
    int64_t M;
    auto [xp, op] = checked_x_out(fn, x, out, N, K, &M);
    check_no_overlap(fn, out, w, "w");
    py::gil_scoped_release release;
    smolvlm_cpu::linear(xp, M, smolvlm_cpu::Linear::of(m), op);
}

void int4_dequantize(const py::array& qweight, const py::array& scales, const py::object& mins, int group_size,
                     const py::array& out) {
    const char* fn = "int4_dequantize";
    if (qweight.ndim() != 2) throw py::value_error("int4_dequantize: qweight must be 2-D, got " + shape_of(qweight));
    const smolvlm_cpu::Int4Matrix w = int4_matrix(fn, qweight, scales, mins, group_size, qweight.shape(1) * 2);
    float* op = checked<float>(fn, "out", out, DType::f32, {w.N, w.K}, true);
    py::gil_scoped_release release;
    smolvlm_cpu::int4_dequantize(w, op);
}

void q8_dequantize(const py::array& q, const py::array& scales, const py::array& out) {
    const smolvlm_cpu::Q8Matrix w = q8_matrix("q8_dequantize", q, scales);
    float* op = checked<float>("q8_dequantize", "out", out, DType::f32, {w.N, w.K}, true);
    py::gil_scoped_release release;
    smolvlm_cpu::q8_dequantize(w, op);
}

// The KV cache's element type: k_cache float32 or float16, v_cache the same.
smolvlm_cpu::KvType kv_type(const std::string& where, const py::array& k_cache, const py::array& v_cache) {
    const bool f16 = has_dtype(k_cache, DType::f16);
    if (!f16 && !has_dtype(k_cache, DType::f32))
        throw py::value_error(where + "k_cache must be float32 or float16, got " +
                              std::string(py::str(k_cache.dtype())));
    if (!has_dtype(v_cache, f16 ? DType::f16 : DType::f32))
        throw py::value_error(where + "v_cache must be " + dtype_name(f16 ? DType::f16 : DType::f32) +
                              " as k_cache is, got " + std::string(py::str(v_cache.dtype())));
    return f16 ? smolvlm_cpu::KvType::f16 : smolvlm_cpu::KvType::f32;
}

DType dtype_of(smolvlm_cpu::KvType kv) { return kv == smolvlm_cpu::KvType::f16 ? DType::f16 : DType::f32; }

// The checks both attention entry points share: q [T, Hq, Dh] (T = S for decode), caches
// [num_blocks, block_size, Hkv, Dh] (float32 or float16, both alike), block_tables [S, max_blocks] and seq_lens [S]
// int32, out like q; every block below a sequence's seq_len must be a block id of the cache. Returns the
// arguments, *op the output's data.
smolvlm_cpu::PagedDecode paged_args(const char* fn, bool decode, const py::array& q, const py::array& k_cache,
                                    const py::array& v_cache, const py::array& block_tables,
                                    const py::array& seq_lens, float scale, const py::array& out, float** op) {
    const std::string where = std::string(fn) + ": ";
    if (q.ndim() != 3)
        throw py::value_error(where + "q must be [" + (decode ? "S" : "T") + ", Hq, Dh], got shape " + shape_of(q));
    if (k_cache.ndim() != 4)
        throw py::value_error(where + "k_cache must be [num_blocks, block_size, Hkv, Dh], got shape " +
                              shape_of(k_cache));
    if (block_tables.ndim() != 2)
        throw py::value_error(where + "block_tables must be [S, max_blocks], got shape " + shape_of(block_tables));
    const int64_t T = q.shape(0), Hq = q.shape(1), Dh = q.shape(2);
    const int64_t num_blocks = k_cache.shape(0), block_size = k_cache.shape(1), Hkv = k_cache.shape(2);
    const int64_t S = decode ? T : block_tables.shape(0), max_blocks = block_tables.shape(1);
    smolvlm_cpu::PagedDecode a{};
    a.q = checked<const float>(fn, "q", q, DType::f32, {T, Hq, Dh});
    a.kv = kv_type(where, k_cache, v_cache);
    a.k_cache = checked<const void>(fn, "k_cache", k_cache, dtype_of(a.kv), {num_blocks, block_size, Hkv, Dh});
    a.v_cache = checked<const void>(fn, "v_cache", v_cache, dtype_of(a.kv), {num_blocks, block_size, Hkv, Dh});
    a.block_tables = checked<const int32_t>(fn, "block_tables", block_tables, DType::i32, {S, max_blocks});
    a.seq_lens = checked<const int32_t>(fn, "seq_lens", seq_lens, DType::i32, {S});
    *op = checked<float>(fn, "out", out, DType::f32, {T, Hq, Dh}, true);
    check_no_overlap(fn, out, q, "q");
    check_no_overlap(fn, out, k_cache, "k_cache");
    check_no_overlap(fn, out, v_cache, "v_cache");
    check_no_overlap(fn, out, block_tables, "block_tables");
    check_no_overlap(fn, out, seq_lens, "seq_lens");
    if (Dh <= 0 || block_size <= 0 || Hkv <= 0 || Hq % Hkv)
        throw py::value_error(where + "need head_dim > 0, block_size > 0 and Hq a multiple of Hkv > 0, got q " +
                              shape_of(q) + ", k_cache " + shape_of(k_cache));
    if (!std::isfinite(scale)) throw py::value_error(where + "scale must be finite");
    for (int64_t s = 0; s < S; ++s) {
        const int64_t len = a.seq_lens[s];
        if (len < 1 || len > max_blocks * block_size)
            throw py::value_error(where + "seq_lens[" + std::to_string(s) + "] = " + std::to_string(len) +
                                  " is not in [1, max_blocks * block_size = " +
                                  std::to_string(max_blocks * block_size) + "]");
        for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b) {
            const int64_t id = a.block_tables[s * max_blocks + b];
            if (id < 0 || id >= num_blocks)
                throw py::value_error(where + "block_tables[" + std::to_string(s) + ", " + std::to_string(b) +
                                      "] = " + std::to_string(id) + " is not a block id in [0, " +
                                      std::to_string(num_blocks) + ")");
        }
    }
    a.S = S;
    a.Hq = Hq;
    a.Hkv = Hkv;
    a.Dh = Dh;
    a.block_size = block_size;
    a.max_blocks = max_blocks;
    a.scale = scale;
    return a;
}

void paged_decode_attention(const py::array& q, const py::array& k_cache, const py::array& v_cache,
                            const py::array& block_tables, const py::array& seq_lens, float scale,
                            const py::array& out) {
    float* op;
    const smolvlm_cpu::PagedDecode a = paged_args("paged_decode_attention", true, q, k_cache, v_cache, block_tables,
                                                  seq_lens, scale, out, &op);
    py::gil_scoped_release release;
    smolvlm_cpu::paged_decode_attention(a, op);
}

// query_start_loc [S + 1] int32: 0, then non-decreasing up to T, with 0 <= q_len_s <= seq_lens[s].
void paged_prefill_attention(const py::array& q, const py::array& k_cache, const py::array& v_cache,
                             const py::array& block_tables, const py::array& seq_lens,
                             const py::array& query_start_loc, float scale, const py::array& out, bool causal) {
    const char* fn = "paged_prefill_attention";
    const std::string where = std::string(fn) + ": ";
    smolvlm_cpu::PagedPrefill a{};
    float* op;
    static_cast<smolvlm_cpu::PagedDecode&>(a) =
        paged_args(fn, false, q, k_cache, v_cache, block_tables, seq_lens, scale, out, &op);
    a.T = q.shape(0);
    a.causal = causal;
    a.query_start_loc = checked<const int32_t>(fn, "query_start_loc", query_start_loc, DType::i32, {a.S + 1});
    check_no_overlap(fn, out, query_start_loc, "query_start_loc");
    if (a.query_start_loc[0] != 0 || a.query_start_loc[a.S] != a.T)
        throw py::value_error(where + "query_start_loc must run from 0 to T = " + std::to_string(a.T) + ", got " +
                              std::to_string(a.query_start_loc[0]) + " .. " + std::to_string(a.query_start_loc[a.S]));
    for (int64_t s = 0; s < a.S; ++s) {
        const int64_t q_len = int64_t(a.query_start_loc[s + 1]) - a.query_start_loc[s];
        if (q_len < 0 || q_len > a.seq_lens[s])
            throw py::value_error(where + "sequence " + std::to_string(s) + " has " + std::to_string(q_len) +
                                  " queries (query_start_loc), not in [0, seq_lens[" + std::to_string(s) +
                                  "] = " + std::to_string(a.seq_lens[s]) + "]");
    }
    py::gil_scoped_release release;
    smolvlm_cpu::paged_prefill_attention(a, op);
}

// ---------------------------------------------------------------- small ops (small_ops.cpp)

// out either is x (same data and shape: in place) or overlaps nothing.
void check_out_or_in_place(const char* fn, const py::array& out, const py::array& x) {
    if (out.data() != x.data()) check_no_overlap(fn, out, x, "x");
}

// A float32 [D] vector (weight, bias), or nullptr for None.
const float* checked_vector(const char* fn, const char* name, const py::object& v, int64_t D, const py::array& out) {
    if (v.is_none()) return nullptr;
    if (!py::isinstance<py::array>(v))
        throw py::value_error(std::string(fn) + ": " + name + " must be an array or None");
    const py::array a = v.cast<py::array>();
    const float* p = checked<const float>(fn, name, a, DType::f32, {D});
    check_no_overlap(fn, out, a, name);
    return p;
}

// A row op's x [M, D] float32 and its out of the same shape (out may be x), checked.
struct Rows {
    int64_t M, D;
    const float* x;
    float* out;
};

Rows checked_rows(const char* fn, const py::array& x, const py::array& out) {
    if (x.ndim() != 2) throw py::value_error(std::string(fn) + ": x must be [M, D], got shape " + shape_of(x));
    const int64_t M = x.shape(0), D = x.shape(1);
    const float* xp = checked<const float>(fn, "x", x, DType::f32, {M, D});
    float* op = checked<float>(fn, "out", out, DType::f32, {M, D}, true);
    check_out_or_in_place(fn, out, x);
    return {M, D, xp, op};
}

// x [M, D], weight [D], bias [D] or None -> out [M, D] (out may be x).
void layer_norm(const py::array& x, const py::array& weight, const py::object& bias, float eps,
                const py::array& out) {
    const char* fn = "layer_norm";
    const auto [M, D, xp, op] = checked_rows(fn, x, out);
    const float* wp = checked_vector(fn, "weight", weight, D, out);
    if (!wp) throw py::value_error(std::string(fn) + ": weight must be an array");
    const float* bp = checked_vector(fn, "bias", bias, D, out);
    if (!std::isfinite(eps) || eps < 0) throw py::value_error(std::string(fn) + ": eps must be finite and >= 0");
    py::gil_scoped_release release;
    smolvlm_cpu::layer_norm(xp, wp, bp, eps, M, D, op);
}

// x [M, D], bias [D] or None -> out [M, D] = gelu_tanh(x + bias) (out may be x).
void gelu_tanh(const py::array& x, const py::object& bias, const py::array& out) {
    const char* fn = "gelu_tanh";
    const auto [M, D, xp, op] = checked_rows(fn, x, out);
    const float* bp = checked_vector(fn, "bias", bias, D, out);
    py::gil_scoped_release release;
    smolvlm_cpu::gelu_tanh(xp, bp, M, D, op);
}

// ---------------------------------------------------------------- the fused decode step (decoder_step.cpp)

// Every block a sequence's seq_lens[s] keys live in is a block id of the cache.
void check_block_tables(const std::string& where, const int32_t* block_tables, const int32_t* seq_lens, int64_t S,
                        int64_t max_blocks, int64_t block_size, int64_t num_blocks) {
    for (int64_t s = 0; s < S; ++s) {
        const int64_t len = seq_lens[s];
        if (len < 1 || len > max_blocks * block_size)
            throw py::value_error(where + "seq_lens[" + std::to_string(s) + "] = " + std::to_string(len) +
                                  " is not in [1, max_blocks * block_size = " +
                                  std::to_string(max_blocks * block_size) + "]");
        for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b) {
            const int64_t id = block_tables[s * max_blocks + b];
            if (id < 0 || id >= num_blocks)
                throw py::value_error(where + "block_tables[" + std::to_string(s) + ", " + std::to_string(b) +
                                      "] = " + std::to_string(id) + " is not a block id in [0, " +
                                      std::to_string(num_blocks) + ")");
        }
    }
}

// query_start_loc [S + 1] runs from 0 to T without going down, and no sequence has more new tokens than keys.
void check_query_starts(const std::string& where, const int32_t* starts, const int32_t* seq_lens, int64_t S,
                        int64_t T) {
    if (starts[0] != 0 || starts[S] != T)
        throw py::value_error(where + "query_start_loc must run from 0 to T = " + std::to_string(T));
    for (int64_t s = 0; s < S; ++s) {
        const int64_t n = int64_t(starts[s + 1]) - starts[s];
        if (n < 0 || n > seq_lens[s])
            throw py::value_error(where + "sequence " + std::to_string(s) + " has " + std::to_string(n) +
                                  " new tokens for seq_lens " + std::to_string(seq_lens[s]));
    }
}

// A weight as smolvlm_fast.quant.cpu_linear_spec describes it: ("f32", w, bias), ("int4", qweight, scales, mins,
// group_size, bias), ("q8", q, scales, bias) or ("bf16", packed, N, K, bias) (bf16_pack's layout); bias None or float32 [N]. Shape [N, K] must be as expected.
smolvlm_cpu::Linear linear_spec(const std::string& name, const py::tuple& spec, int64_t N, int64_t K) {
    using smolvlm_cpu::Linear;
    const std::string fn = "Decoder: " + name;
    if (spec.size() < 3 || !py::isinstance<py::str>(spec[0]))
        throw py::value_error(fn + " must be a (kind, arrays..., bias) tuple from quant.cpu_linear_spec");
    const std::string kind = spec[0].cast<std::string>();
    Linear w;
    if (kind == "f32" && spec.size() == 3) {
        w = Linear::of(smolvlm_cpu::F32Matrix{
            checked<const float>(fn.c_str(), "weight", spec[1].cast<py::array>(), DType::f32, {N, K}), N, K});
    } else if (kind == "int4" && spec.size() == 6) {
        w = Linear::of(int4_matrix(fn.c_str(), spec[1].cast<py::array>(), spec[2].cast<py::array>(), spec[3],
                                   spec[4].cast<int>(), K));
    } else if (kind == "q8" && spec.size() == 4) {
        w = Linear::of(q8_matrix(fn.c_str(), spec[1].cast<py::array>(), spec[2].cast<py::array>()));
    } else if (kind == "bf16" && spec.size() == 5) {
        const int64_t n = spec[2].cast<int64_t>(), k = spec[3].cast<int64_t>();
        if (n < 1 || k < 1) throw py::value_error(fn + ": a bf16 weight needs N, K >= 1");
        w = Linear::of(smolvlm_cpu::Bf16Matrix{
            checked<const uint16_t>(fn.c_str(), "packed", spec[1].cast<py::array>(), DType::u16,
                                    {smolvlm_cpu::bf16_packed_elems(n, k)}), n, k});
    } else {
        throw py::value_error(fn + ": unknown weight spec (" + kind + " with " + std::to_string(spec.size()) +
                              " fields)");
    }
    if (w.N != N || w.K != K)
        throw py::value_error(fn + ": has shape [" + std::to_string(w.N) + ", " + std::to_string(w.K) +
                              "], expected [" + std::to_string(N) + ", " + std::to_string(K) + "]");
    const py::object bias = spec[spec.size() - 1];
    if (!bias.is_none()) w.bias = checked<const float>(fn.c_str(), "bias", bias.cast<py::array>(), DType::f32, {N});
    return w;
}

// The decoder's weights, checked once; step() runs a decode step over a paged KV cache. Holds references to the
// arrays it reads, so they live as long as it does.
class Decoder {
public:
    // final_norm None: no final norm, step() leaves the whole hidden state (a segment between cross layers);
    // the hidden size then comes from the first layer's input_norm.
    Decoder(const py::list& layers, const py::object& final_norm, int64_t intermediate, int64_t Hq, int64_t Hkv,
            int64_t Dh, int64_t rotary_dim, float eps, float scale, bool int8_activations, bool bf16_prefill)
        : keep_(layers) {
        const char* fn = "Decoder";
        if (final_norm.is_none() && layers.size() == 0)
            throw py::value_error("Decoder: without final_norm there must be layers to take the hidden size from");
        const py::array size_of = final_norm.is_none() ? layers[0].cast<py::dict>()["input_norm"].cast<py::array>()
                                                       : final_norm.cast<py::array>();
        if (size_of.ndim() != 1) throw py::value_error("Decoder: final_norm and input_norm must be [hidden_size]");
        const int64_t D = size_of.shape(0);
        if (D <= 0 || intermediate <= 0 || Hq <= 0 || Hkv <= 0 || Hq % Hkv || Dh <= 0 || rotary_dim <= 0 ||
            rotary_dim % 2 || rotary_dim > Dh || !std::isfinite(eps) || !std::isfinite(scale))
            throw py::value_error("Decoder: bad shape (hidden " + std::to_string(D) + ", intermediate " +
                                  std::to_string(intermediate) + ", heads " + std::to_string(Hq) + "/" +
                                  std::to_string(Hkv) + ", head_dim " + std::to_string(Dh) + ", rotary_dim " +
                                  std::to_string(rotary_dim) + ")");
        shape_ = {D, intermediate, Hq, Hkv, Dh, rotary_dim, eps, scale, int8_activations, bf16_prefill};
        if (!final_norm.is_none()) {
            final_norm_ = size_of;  // the array final_ points into, whatever final_norm was converted from
            final_ = checked<const float>(fn, "final_norm", final_norm_, DType::f32, {D});
        }
        const int64_t I = intermediate;
        for (size_t i = 0; i < layers.size(); ++i) {
            const py::dict l = layers[i].cast<py::dict>();
            const std::string p = "layer " + std::to_string(i) + " ";
            smolvlm_cpu::DecoderLayer d{};
            d.input_norm = checked<const float>(fn, (p + "input_norm").c_str(), l["input_norm"].cast<py::array>(),
                                                DType::f32, {D});
            d.post_norm = checked<const float>(fn, (p + "post_norm").c_str(), l["post_norm"].cast<py::array>(),
                                               DType::f32, {D});
            d.qkv = linear_spec(p + "qkv", l["qkv"].cast<py::tuple>(), (Hq + 2 * Hkv) * Dh, D);
            d.o = linear_spec(p + "o", l["o"].cast<py::tuple>(), D, Hq * Dh);
            d.gate_up = linear_spec(p + "gate_up", l["gate_up"].cast<py::tuple>(), 2 * I, D);
            d.down = linear_spec(p + "down", l["down"].cast<py::tuple>(), D, I);
            layers_.push_back(d);
        }
    }

    // x [T, D] float32: the step's packed tokens' embeddings in, final hidden states out. kv_caches: per layer
    // (k_cache, v_cache), each [num_blocks, block_size, Hkv, Dh], float32 or float16 (both alike); positions and
    // slot_mapping [T]; block_tables [S, max_blocks] and seq_lens [S] per sequence; query_start_loc [S + 1]
    // (None: one token per sequence, a decode step); cos_sin [P, rotary_dim] with every position < P.
    void step(const py::array& x, const py::list& kv_caches, const py::array& positions,
              const py::array& slot_mapping, const py::array& block_tables, const py::array& seq_lens,
              const py::array& cos_sin, const py::object& query_start_loc) {
        const char* fn = "Decoder.step";
        const std::string where = std::string(fn) + ": ";
        const auto& c = shape_;
        if (x.ndim() != 2) throw py::value_error(where + "x must be [T, hidden_size], got " + shape_of(x));
        if (block_tables.ndim() != 2)
            throw py::value_error(where + "block_tables must be [S, max_blocks], got " + shape_of(block_tables));
        smolvlm_cpu::StepBatch b{};
        b.T = x.shape(0);
        b.S = block_tables.shape(0);
        b.max_blocks = block_tables.shape(1);
        float* xp = checked<float>(fn, "x", x, DType::f32, {b.T, c.D}, true);
        if (kv_caches.size() != layers_.size())
            throw py::value_error(where + "expected " + std::to_string(layers_.size()) +
                                  " (k_cache, v_cache) pairs, got " + std::to_string(kv_caches.size()));
        b.positions = checked<const int32_t>(fn, "positions", positions, DType::i32, {b.T});
        b.slot_mapping = checked<const int32_t>(fn, "slot_mapping", slot_mapping, DType::i32, {b.T});
        b.block_tables = checked<const int32_t>(fn, "block_tables", block_tables, DType::i32, {b.S, b.max_blocks});
        b.seq_lens = checked<const int32_t>(fn, "seq_lens", seq_lens, DType::i32, {b.S});
        std::vector<int32_t> one_each;  // query_start_loc of a decode step: 0, 1, ..., S
        if (query_start_loc.is_none()) {
            if (b.T != b.S)
                throw py::value_error(where + "without query_start_loc every sequence has one token, but x has " +
                                      std::to_string(b.T) + " for " + std::to_string(b.S) + " sequences");
            for (int64_t s = 0; s <= b.S; ++s) one_each.push_back(static_cast<int32_t>(s));
            b.query_start_loc = one_each.data();
        } else {
            b.query_start_loc = checked<const int32_t>(fn, "query_start_loc", query_start_loc.cast<py::array>(),
                                                       DType::i32, {b.S + 1});
        }
        if (cos_sin.ndim() != 2) throw py::value_error(where + "cos_sin must be [positions, rotary_dim]");
        const int64_t P = cos_sin.shape(0);
        b.cos_sin = checked<const float>(fn, "cos_sin", cos_sin, DType::f32, {P, c.rotary_dim});
        int64_t num_blocks = -1, block_size = -1;
        std::vector<smolvlm_cpu::DecoderLayer> layers = layers_;
        for (size_t i = 0; i < layers.size(); ++i) {
            const py::tuple kv = kv_caches[i].cast<py::tuple>();
            if (kv.size() != 2) throw py::value_error(where + "kv_caches[" + std::to_string(i) + "] is not a pair");
            const py::array k = kv[0].cast<py::array>(), v = kv[1].cast<py::array>();
            if (k.ndim() != 4) throw py::value_error(where + "k_cache must be [num_blocks, block_size, Hkv, Dh]");
            if (i == 0) num_blocks = k.shape(0), block_size = k.shape(1);
            const std::vector<int64_t> cache_shape{num_blocks, block_size, c.Hkv, c.Dh};
            layers[i].kv = kv_type(where + "layer " + std::to_string(i) + " ", k, v);
            layers[i].k_cache = checked<void>(fn, "k_cache", k, dtype_of(layers[i].kv), cache_shape, true);
            layers[i].v_cache = checked<void>(fn, "v_cache", v, dtype_of(layers[i].kv), cache_shape, true);
            check_no_overlap(fn, k, v, "v_cache");
            check_no_overlap(fn, k, x, "x");
            check_no_overlap(fn, v, x, "x");
        }
        if (block_size <= 0) throw py::value_error(where + "block_size must be positive");
        b.block_size = block_size;
        check_block_tables(where, b.block_tables, b.seq_lens, b.S, b.max_blocks, block_size, num_blocks);
        check_query_starts(where, b.query_start_loc, b.seq_lens, b.S, b.T);
        for (int64_t t = 0; t < b.T; ++t) {
            if (b.positions[t] < 0 || b.positions[t] >= P)
                throw py::value_error(where + "positions[" + std::to_string(t) + "] = " +
                                      std::to_string(b.positions[t]) + " is outside the cos/sin table (" +
                                      std::to_string(P) + " rows)");
            if (b.slot_mapping[t] < -1 || b.slot_mapping[t] >= num_blocks * block_size)
                throw py::value_error(where + "slot_mapping[" + std::to_string(t) + "] = " +
                                      std::to_string(b.slot_mapping[t]) + " is not a cache slot");
        }
        py::gil_scoped_release release;
        smolvlm_cpu::decoder_step(layers, final_, shape_, b, xp);
    }

    size_t num_layers() const { return layers_.size(); }

private:
    py::list keep_;           // the layer specs: keep their arrays alive
    py::array final_norm_;
    const float* final_ = nullptr;  // null: no final norm
    smolvlm_cpu::DecoderShape shape_{};
    std::vector<smolvlm_cpu::DecoderLayer> layers_;
};

bool cpu_supports_build() {
#if defined(__AVX512F__)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
#elif defined(__AVX2__)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return true;
#endif
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    if (!cpu_supports_build())
        throw py::import_error(std::string("smolvlm_fast._cpu was built for ") + smolvlm_cpu::simd_name() +
                               ", which this CPU lacks: rebuild it here (pip install -e .)");
    m.doc() = "CPU kernels for int4 (Int4Weight) and int8 (GGUF Q8_0) weights (layouts in smolvlm_fast/formats/int4.py) "
              "and decode attention over the paged KV cache";
    m.def("int4_gemm", &int4_gemm, py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("mins"),
          py::arg("group_size"), py::arg("out"), py::arg("int8_x") = false,
          "out[M, N] = x[M, K] @ dequantize_int4(W).T in float32; mins None for symmetric weights. int8_x: round "
          "each 32-element block of x to int8 first (VNNI integer dots, ~1e-3 relative error); returns whether "
          "it did (False where the build has no AVX512-VNNI)");
    m.def("q8_gemm", &q8_gemm, py::arg("x"), py::arg("q"), py::arg("scales"), py::arg("out"),
          "out[M, N] = x[M, K] @ dequantize_q8(W).T in float32");
    m.def("f32_gemm", &f32_gemm, py::arg("x"), py::arg("w"), py::arg("out"), "out[M, N] = x[M, K] @ w[N, K].T");
    m.def("int4_dequantize", &int4_dequantize, py::arg("qweight"), py::arg("scales"), py::arg("mins"),
          py::arg("group_size"), py::arg("out"), "out[N, K] = dequantize_int4(W)");
    m.def("q8_dequantize", &q8_dequantize, py::arg("q"), py::arg("scales"), py::arg("out"),
          "out[N, K] = dequantize_q8(W)");
    m.def("paged_decode_attention", &paged_decode_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
          py::arg("block_tables"), py::arg("seq_lens"), py::arg("scale"), py::arg("out"),
          "decode attention, one query per sequence: out[s, h] = softmax(scale * q[s, h] . K_s) V_s over the "
          "seq_lens[s] keys of KV head h // (Hq // Hkv) in the paged cache [num_blocks, block_size, Hkv, Dh] "
          "(float32, or float16 widened as it is read)");
    m.def("paged_prefill_attention", &paged_prefill_attention, py::arg("q"), py::arg("k_cache"),
          py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"), py::arg("query_start_loc"),
          py::arg("scale"), py::arg("out"), py::arg("causal") = true,
          "attention for packed queries q [T, Hq, Dh]: query j of sequence s (q_len_s = query_start_loc[s + 1] "
          "- query_start_loc[s]) sits at position seq_lens[s] - q_len_s + j and sees the cache keys at positions <= "
          "its own; causal=False: every query sees all seq_lens[s] keys");
    m.def("layer_norm", &layer_norm, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("out"),
          "out[M, D] = (x - mean) / sqrt(var + eps) * weight + bias over each row of x [M, D]; bias may be None, "
          "out may be x");
    m.def("gelu_tanh", &gelu_tanh, py::arg("x"), py::arg("bias"), py::arg("out"),
          "out[M, D] = gelu_tanh(x + bias) (the tanh approximation); bias [D] or None, out may be x");
    py::class_<Decoder>(m, "Decoder",
                        "the Llama decoder's weights for fused steps (csrc/cpu/decoder_step.cpp); layers: "
                        "dicts of input_norm, post_norm (float32 [D]) and qkv, o, gate_up, down "
                        "(quant.cpu_linear_spec tuples); final_norm float32 [D], or None: no final norm, "
                        "step() leaves the whole hidden state (a run of layers before a cross-attention layer)")
        .def(py::init<const py::list&, const py::object&, int64_t, int64_t, int64_t, int64_t, int64_t, float, float,
                      bool, bool>(),
             py::arg("layers"), py::arg("final_norm"), py::arg("intermediate_size"), py::arg("num_heads"),
             py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("rotary_dim"), py::arg("eps"), py::arg("scale"),
             py::arg("int8_activations") = false, py::arg("bf16_prefill") = false)
        .def("step", &Decoder::step, py::arg("x"), py::arg("kv_caches"), py::arg("positions"),
             py::arg("slot_mapping"), py::arg("block_tables"), py::arg("seq_lens"), py::arg("cos_sin"),
             py::arg("query_start_loc") = py::none(),
             "one step over packed tokens: x [T, D] embeddings in, final hidden states out (final_norm None: "
             "the hidden state before any norm); writes each layer's new K/V")
        .def("__len__", &Decoder::num_layers);
    m.def("set_num_threads", &smolvlm_cpu::set_num_threads, py::arg("n"),
          "threads for the kernels; n <= 0 restores the default (SMOLVLM_FAST_NUM_THREADS, else the usable cores)");
    m.def("get_num_threads", &smolvlm_cpu::get_num_threads);
    m.attr("simd") = smolvlm_cpu::simd_name();
    register_bf16(m);
    register_vision(m);
}
