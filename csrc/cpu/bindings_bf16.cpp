// smolvlm_fast._cpu's bf16 products (bf16_gemm.h, prefill_gemm_bf16.h) and the checks at their border.
// Arrays must have the exact dtype (native byte order) and be aligned; x and out may have a row stride (a row
// slice of a wider array) but their rows must be contiguous; packed weights, bias and the quantized arrays must
// be C-contiguous. out must overlap none of the inputs. Anything else raises ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bf16_gemm.h"
#include "bf16_kernels.h"
#include "prefill_gemm_bf16.h"
#include "py_checks.h"

namespace py = pybind11;
using namespace smolvlm_cpu::py_checks;

namespace {

using smolvlm_cpu::Bf16Isa;

// kind 'f' / 'u' / 'i' and itemsize, native byte order.
void check_dtype(const std::string& where, const py::array& a, char kind, int itemsize, const char* name) {
    const py::dtype dt = a.dtype();
    if (dt.kind() != kind || dt.itemsize() != itemsize || dt.byteorder() == '>')
        throw py::value_error(where + " must be " + name + ", got " + std::string(py::str(dt)));
}

// A C-contiguous array of the given dtype and shape.
template <class T>
T* contiguous(const std::string& where, const py::array& a, char kind, const char* dtype,
              const std::vector<int64_t>& shape) {
    check_dtype(where, a, kind, sizeof(T), dtype);
    check_shape(where, a, shape);
    check_layout(where, a);
    return static_cast<T*>(const_cast<void*>(a.data()));
}

// A float32 [rows, cols] matrix whose rows are contiguous, rows `*ld` floats apart (ld >= cols).
struct Rows {
    float* data;
    int64_t ld;
    const char *begin, *end;  // the bytes it spans
};

Rows float_rows(const std::string& where, const py::array& a, int64_t rows, int64_t cols, bool writeable) {
    check_dtype(where, a, 'f', 4, "float32");
    if (a.ndim() != 2 || a.shape(0) != rows || a.shape(1) != cols)
        throw py::value_error(where + " must have shape [" + std::to_string(rows) + ", " + std::to_string(cols) +
                              "], got " + shape_of(a));
    check_aligned(where, a);
    if (writeable && !a.writeable()) throw py::value_error(where + " must be writeable");
    int64_t ld = cols;
    if (rows > 1) {
        if (cols > 1 && a.strides(1) != 4)
            throw py::value_error(where + " must have contiguous rows (np.ascontiguousarray)");
        if (a.strides(0) % 4 || a.strides(0) / 4 < cols)
            throw py::value_error(where + " must have rows that follow one another, a row stride >= its width");
        ld = a.strides(0) / 4;
    } else if (cols > 1 && a.strides(1) != 4) {
        throw py::value_error(where + " must have contiguous rows (np.ascontiguousarray)");
    }
    auto* p = static_cast<float*>(const_cast<void*>(a.data()));
    const char* b = reinterpret_cast<const char*>(p);
    const int64_t bytes = rows > 0 ? ((rows - 1) * ld + cols) * 4 : 0;
    return {p, ld, b, b + bytes};
}

void check_apart(const std::string& fn, const Rows& out, const char* begin, const char* end, const char* name) {
    if (out.begin < end && begin < out.end) throw py::value_error(fn + ": out overlaps " + name);
}

void check_apart(const std::string& fn, const Rows& out, const py::array& a, const char* name) {
    const auto* b = static_cast<const char*>(a.data());
    check_apart(fn, out, b, b + a.nbytes(), name);
}

const char* isa_names = "'amx', 'avx512bf16', 'f32' or 'amx-emulated'";

Bf16Isa isa_of(const std::string& name) {
    for (Bf16Isa isa : {Bf16Isa::amx, Bf16Isa::avx512bf16, Bf16Isa::f32, Bf16Isa::amx_emulated})
        if (name == smolvlm_cpu::bf16_isa_name(isa)) return isa;
    throw py::value_error("bf16_set_isa: isa must be " + std::string(isa_names) + ", got '" + name + "'");
}

// w [N, K] float32 -> the packed bf16 layout (bf16_gemm.h), 1-D uint16.
py::array bf16_pack(const py::array& w) {
    const std::string fn = "bf16_pack";
    if (w.ndim() != 2) throw py::value_error(fn + ": w must be [N, K], got shape " + shape_of(w));
    const int64_t N = w.shape(0), K = w.shape(1);
    if (N < 1 || K < 1) throw py::value_error(fn + ": w must have N, K >= 1, got shape " + shape_of(w));
    const float* wp = contiguous<const float>(fn + ": w", w, 'f', "float32", {N, K});
    py::array_t<uint16_t> packed(smolvlm_cpu::bf16_packed_elems(N, K));
    uint16_t* pp = packed.mutable_data();
    {
        py::gil_scoped_release release;
        smolvlm_cpu::bf16_pack(wp, N, K, pp);
    }
    return std::move(packed);
}

void bf16_gemm(const py::array& x, const py::array& packed, int64_t N, int64_t K, const py::object& bias, bool gelu,
               bool accumulate, const py::array& out) {
    const std::string fn = "bf16_gemm";
    if (N < 1 || K < 1)
        throw py::value_error(fn + ": N and K must be >= 1, got N = " + std::to_string(N) + ", K = " +
                              std::to_string(K));
    if (x.ndim() != 2) throw py::value_error(fn + ": x must be [M, K], got shape " + shape_of(x));
    const int64_t M = x.shape(0);
    const Rows xr = float_rows(fn + ": x", x, M, K, false);
    const Rows orow = float_rows(fn + ": out", out, M, N, true);
    const int64_t elems = smolvlm_cpu::bf16_packed_elems(N, K);
    const uint16_t* wp = contiguous<const uint16_t>(fn + ": packed", packed, 'u', "uint16", {elems});
    const float* bp = nullptr;
    if (!bias.is_none()) {
        if (!py::isinstance<py::array>(bias)) throw py::value_error(fn + ": bias must be an array or None");
        const py::array b = bias.cast<py::array>();
        bp = contiguous<const float>(fn + ": bias", b, 'f', "float32", {N});
        check_apart(fn, orow, b, "bias");
    }
    check_apart(fn, orow, xr.begin, xr.end, "x");
    check_apart(fn, orow, packed, "packed");
    const smolvlm_cpu::Bf16Matrix w{wp, N, K};
    const auto e = gelu ? smolvlm_cpu::Epilogue::gelu_tanh : smolvlm_cpu::Epilogue::none;
    py::gil_scoped_release release;
    smolvlm_cpu::bf16_gemm(xr.data, M, xr.ld, w, bp, e, accumulate, orow.data, orow.ld);
}

// A weight as smolvlm_fast.cpu.linear.cpu_linear_spec gives it, with bias None: ("f32", w, None),
// ("int4", qweight, scales, mins, group_size, None) or ("q8", q, scales, None); arrays C-contiguous.
struct AnyWeight {
    smolvlm_cpu::F32Matrix f32{};
    smolvlm_cpu::Int4Matrix int4{};
    smolvlm_cpu::Q8Matrix q8{};
    smolvlm_cpu::AnyMatrix any{};
    int64_t N = 0, K = 0;
};

AnyWeight any_weight(const std::string& fn, const py::tuple& spec, const Rows& out) {
    if (spec.size() < 3 || !py::isinstance<py::str>(spec[0]))
        throw py::value_error(fn + ": w must be a (kind, arrays..., bias) tuple from cpu_linear_spec");
    if (!spec[spec.size() - 1].is_none()) throw py::value_error(fn + ": adds no bias; the spec's bias must be None");
    const std::string kind = spec[0].cast<std::string>();
    auto arr = [&](size_t i) {
        if (!py::isinstance<py::array>(spec[i])) throw py::value_error(fn + ": the spec's fields must be arrays");
        const py::array a = spec[i].cast<py::array>();
        check_apart(fn, out, a, "the weight");
        return a;
    };
    AnyWeight w;
    if (kind == "f32" && spec.size() == 3) {
        const py::array a = arr(1);
        if (a.ndim() != 2) throw py::value_error(fn + ": w must be [N, K], got " + shape_of(a));
        w.N = a.shape(0), w.K = a.shape(1);
        w.f32 = {contiguous<const float>(fn + ": w", a, 'f', "float32", {w.N, w.K}), w.N, w.K};
        w.any.f32 = &w.f32;
    } else if (kind == "int4" && spec.size() == 6) {
        const py::array q = arr(1), s = arr(2);
        const int g = spec[4].cast<int>();
        if (q.ndim() != 2) throw py::value_error(fn + ": qweight must be [N, K / 2], got " + shape_of(q));
        w.N = q.shape(0), w.K = q.shape(1) * 2;
        if ((g != 32 && g != 64 && g != 128) || w.K % g)
            throw py::value_error(fn + ": group_size must be 32, 64 or 128 and divide K = " + std::to_string(w.K) +
                                  ", got " + std::to_string(g));
        w.int4.qweight = contiguous<const uint8_t>(fn + ": qweight", q, 'u', "uint8", {w.N, w.K / 2});
        w.int4.scales = contiguous<const uint16_t>(fn + ": scales", s, 'f', "float16", {w.N, w.K / g});
        if (!spec[3].is_none())
            w.int4.mins = contiguous<const uint16_t>(fn + ": mins", arr(3), 'f', "float16", {w.N, w.K / g});
        w.int4.N = w.N, w.int4.K = w.K, w.int4.group_size = g;
        w.any.int4 = &w.int4;
    } else if (kind == "q8" && spec.size() == 4) {
        const py::array q = arr(1), s = arr(2);
        if (q.ndim() != 2) throw py::value_error(fn + ": q must be [N, K], got " + shape_of(q));
        w.N = q.shape(0), w.K = q.shape(1);
        if (w.K % 32) throw py::value_error(fn + ": K = " + std::to_string(w.K) + " is not a multiple of 32");
        w.q8 = {contiguous<const int8_t>(fn + ": q", q, 'i', "int8", {w.N, w.K}),
                contiguous<const uint16_t>(fn + ": scales", s, 'f', "float16", {w.N, w.K / 32}), w.N, w.K};
        w.any.q8 = &w.q8;
    } else {
        throw py::value_error(fn + ": unknown weight spec (" + kind + " with " + std::to_string(spec.size()) +
                              " fields)");
    }
    if (w.N < 1 || w.K < 1) throw py::value_error(fn + ": the weight must have N, K >= 1");
    return w;
}

bool bf16_prefill_gemm(const py::array& x, const py::tuple& spec, const py::array& out) {
    const std::string fn = "bf16_prefill_gemm";
    if (x.ndim() != 2 || out.ndim() != 2)
        throw py::value_error(fn + ": x must be [M, K] and out [M, N], got " + shape_of(x) + " and " + shape_of(out));
    const int64_t M = x.shape(0);
    const Rows orow = {contiguous<float>(fn + ": out", out, 'f', "float32", {M, out.shape(1)}), out.shape(1),
                       static_cast<const char*>(out.data()), static_cast<const char*>(out.data()) + out.nbytes()};
    if (!out.writeable()) throw py::value_error(fn + ": out must be writeable");
    const AnyWeight w = any_weight(fn, spec, orow);
    const float* xp = contiguous<const float>(fn + ": x", x, 'f', "float32", {M, w.K});
    contiguous<float>(fn + ": out", out, 'f', "float32", {M, w.N});
    check_apart(fn, orow, x, "x");
    py::gil_scoped_release release;
    return smolvlm_cpu::prefill_gemm_bf16(xp, M, w.any, orow.data);
}

}  // namespace

void register_bf16(py::module_& m) {
    m.def("bf16_pack", &bf16_pack, py::arg("w"),
          "w float32 [N, K] -> uint16 [ceil(N / 16) * 16 * Kp]: bf16 (round to nearest even) in the packed layout "
          "of csrc/cpu/bf16_gemm.h (blocks of 16 rows, k pairs adjacent, K padded with zeros to Kp, a multiple of "
          "32)");
    m.def("bf16_gemm", &bf16_gemm, py::arg("x"), py::arg("packed"), py::arg("N"), py::arg("K"), py::arg("bias"),
          py::arg("gelu"), py::arg("accumulate"), py::arg("out"),
          "out[M, N] = (accumulate ? out : 0) + epilogue(bf16(x) @ W^T + bias): x float32 [M, K] and out float32 "
          "[M, N] with contiguous rows (a row stride is fine), packed from bf16_pack, bias float32 [N] or None, "
          "gelu: the tanh GELU as epilogue; float32 sums");
    m.def("bf16_isa", [] { return std::string(smolvlm_cpu::bf16_isa_name(smolvlm_cpu::bf16_isa())); },
          "the kernel bf16_gemm runs: 'amx', 'avx512bf16', 'f32' or 'amx-emulated'");
    m.def("bf16_set_isa", [](const std::string& name) { return smolvlm_cpu::bf16_set_isa(isa_of(name)); },
          py::arg("isa"), "force a kernel (tests, benchmarks); False where this CPU cannot run it");
    m.def("bf16_peak_gflops",
          [](int64_t iterations) {
              if (iterations < 1) throw py::value_error("bf16_peak_gflops: iterations must be >= 1");
              py::gil_scoped_release release;
              return smolvlm_cpu::bf16::dpbf16_peak_gflops(iterations);
          },
          py::arg("iterations"),
          "GFLOP/s of a tight loop of independent vdpbf16ps (24 accumulators, register operands), on all the "
          "pool's threads: this CPU's bf16 dot-product peak; 0.0 without AVX512-BF16");
    m.def("bf16_prefill_gemm", &bf16_prefill_gemm, py::arg("x"), py::arg("w"), py::arg("out"),
          "out[M, N] = bf16(x) @ bf16(W)^T for w a cpu_linear_spec tuple (float32, int4 or q8 weights, bias None), "
          "dequantized a panel at a time; x, out C-contiguous. Returns False, doing nothing, where bf16_isa() is "
          "'f32'");
}
