// smolvlm_fast._cpu's vision encoder bindings (register_vision): the fused bf16 encoder object, its attention alone
// (for tests), and a bf16 linear for the patch embedding and the connector. As in bindings.cpp, every array must
// have the exact dtype, be C-contiguous and aligned, with shapes that agree; anything else raises ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bf16_gemm.h"
#include "py_checks.h"
#include "vision_attention.h"
#include "vision_encoder.h"

namespace py = pybind11;
using namespace smolvlm_cpu::py_checks;

namespace {

enum class Kind { f32, mask, u16 };  // float32; uint8 or bool; uint16

bool has_kind(const py::array& a, Kind k) {
    const py::dtype t = a.dtype();
    if (t.byteorder() == '>') return false;
    switch (k) {
        case Kind::f32: return t.kind() == 'f' && t.itemsize() == 4;
        case Kind::mask: return (t.kind() == 'u' || t.kind() == 'b') && t.itemsize() == 1;
        case Kind::u16: return t.kind() == 'u' && t.itemsize() == 2;
    }
    return false;
}

// The array's data after checking that it is an array of that kind, C-contiguous, aligned (and writeable when
// asked), with exactly `shape`.
const void* checked(const std::string& where, const py::handle& obj, Kind kind, const std::vector<int64_t>& shape,
                    bool writeable = false) {
    if (!py::isinstance<py::array>(obj)) throw py::value_error(where + " must be a NumPy array");
    const py::array a = py::reinterpret_borrow<py::array>(obj);
    if (!has_kind(a, kind)) {
        const char* names[] = {"float32", "uint8 or bool", "uint16"};
        throw py::value_error(where + " must be " + names[static_cast<int>(kind)] + ", got " +
                              std::string(py::str(a.dtype())));
    }
    check_shape(where, a, shape);
    check_layout(where, a, writeable);
    return a.data();
}

const float* checked_f32(const std::string& where, const py::handle& obj, const std::vector<int64_t>& shape) {
    return static_cast<const float*>(checked(where, obj, Kind::f32, shape));
}

void check_no_overlap(const std::string& fn, const py::array& out, const py::handle& obj, const char* name) {
    const py::array a = py::reinterpret_borrow<py::array>(obj);
    const auto *o = static_cast<const char*>(out.data()), *p = static_cast<const char*>(a.data());
    if (o < p + a.nbytes() && p < o + out.nbytes()) throw py::value_error(fn + ": out overlaps " + name);
}

// key_mask None, or [B, S] uint8 / bool with an attended key in every tile (a tile without one has no softmax).
const uint8_t* checked_key_mask(const std::string& fn, const py::object& key_mask, int64_t B, int64_t S) {
    if (key_mask.is_none()) return nullptr;
    const auto* m = static_cast<const uint8_t*>(checked(fn + ": key_mask", key_mask, Kind::mask, {B, S}));
    for (int64_t b = 0; b < B; ++b) {
        bool any = false;
        for (int64_t s = 0; s < S && !any; ++s) any = m[b * S + s] != 0;
        if (!any) throw py::value_error(fn + ": key_mask[" + std::to_string(b) + "] masks every key of its tile");
    }
    return m;
}

void check_tiles(const std::string& fn, int64_t B, int64_t S) {
    if (B < 0 || S < 1)
        throw py::value_error(fn + ": need B >= 0 tiles of S >= 1 patches, got B = " + std::to_string(B) +
                              ", S = " + std::to_string(S));
}

// The encoder's weights, packed to bf16 (products) or copied (norms, biases) once, at construction: it owns them.
class VisionEncoder {
public:
    // layers: any iterable of dicts, read one at a time (a generator can make each layer's float32 arrays just
    // before they are packed, so that the whole tower is never float32 at once).
    VisionEncoder(const py::iterable& layers, const py::object& post_w, const py::object& post_b, int64_t heads,
                  float eps) {
        const std::string fn = "VisionEncoder";
        if (!py::isinstance<py::array>(post_w) || py::reinterpret_borrow<py::array>(post_w).ndim() != 1)
            throw py::value_error(fn + ": post_norm_weight must be a float32 [hidden_size] array");
        const int64_t D = py::reinterpret_borrow<py::array>(post_w).shape(0);
        if (D <= 0 || heads <= 0 || D % heads)
            throw py::value_error(fn + ": hidden_size " + std::to_string(D) + " must be a positive multiple of heads " +
                                  std::to_string(heads));
        if (!std::isfinite(eps) || eps < 0) throw py::value_error(fn + ": eps must be finite and >= 0");
        int64_t I = -1;
        size_t i = 0;
        for (const py::handle item : layers) {
            if (!py::isinstance<py::dict>(item)) throw py::value_error(fn + ": layers must be dicts");
            const py::dict l = py::reinterpret_borrow<py::dict>(item);
            const std::string p = fn + ": layer " + std::to_string(i) + " ";
            const auto get = [&](const char* name) -> py::object {
                if (!l.contains(name)) throw py::value_error(p + "has no " + name);
                return l[name];
            };
            if (i == 0) {
                const py::object fc1 = get("fc1_weight");
                if (!py::isinstance<py::array>(fc1) || py::reinterpret_borrow<py::array>(fc1).ndim() != 2)
                    throw py::value_error(p + "fc1_weight must be a float32 [intermediate_size, hidden_size] array");
                I = py::reinterpret_borrow<py::array>(fc1).shape(0);
                if (I <= 0) throw py::value_error(p + "fc1_weight has no rows");
            }
            const auto vec = [&](const char* name, int64_t n) { return keep(checked_f32(p + name, get(name), {n}), n); };
            const auto mat = [&](const char* name, int64_t n, int64_t k) {
                return pack(checked_f32(p + name, get(name), {n, k}), n, k);
            };
            smolvlm_cpu::VisionLayer w{};
            w.ln1_w = vec("ln1_weight", D), w.ln1_b = vec("ln1_bias", D);
            w.ln2_w = vec("ln2_weight", D), w.ln2_b = vec("ln2_bias", D);
            w.qkv = mat("qkv_weight", 3 * D, D), w.qkv_b = vec("qkv_bias", 3 * D);
            w.out = mat("out_weight", D, D), w.out_b = vec("out_bias", D);
            w.fc1 = mat("fc1_weight", I, D), w.fc1_b = vec("fc1_bias", I);
            w.fc2 = mat("fc2_weight", D, I), w.fc2_b = vec("fc2_bias", D);
            layers_.push_back(w);
            ++i;
        }
        post_w_ = keep(checked_f32(fn + ": post_norm_weight", post_w, {D}), D);
        post_b_ = keep(checked_f32(fn + ": post_norm_bias", post_b, {D}), D);
        shape_ = {D, I, heads, eps};
    }

    // x [B * S, D] float32 through the layers and the post norm, in place. Returns the seconds per kind of work
    // (a dict) when profile is set, else None.
    py::object run(const py::array& x, int64_t B, int64_t S, const py::object& key_mask, bool profile) {
        const std::string fn = "VisionEncoder.run";
        check_tiles(fn, B, S);
        float* xp = static_cast<float*>(const_cast<void*>(checked(fn + ": x", x, Kind::f32, {B * S, shape_.D}, true)));
        const uint8_t* mask = checked_key_mask(fn, key_mask, B, S);
        if (mask) check_no_overlap(fn, x, key_mask, "key_mask");
        smolvlm_cpu::VisionTimes times;
        {
            py::gil_scoped_release release;
            smolvlm_cpu::vision_encoder(layers_, post_w_, post_b_, shape_, xp, B, S, mask, profile ? &times : nullptr);
        }
        if (!profile) return py::none();
        py::dict d;
        d["norms"] = times.norms, d["qkv"] = times.qkv, d["attention"] = times.attention;
        d["out_proj"] = times.out_proj, d["fc1"] = times.fc1, d["fc2"] = times.fc2;
        return std::move(d);
    }

    int64_t hidden_size() const { return shape_.D; }
    int64_t intermediate_size() const { return shape_.I; }
    int64_t num_heads() const { return shape_.H; }
    size_t num_layers() const { return layers_.size(); }

private:
    const float* keep(const float* v, int64_t n) {
        floats_.emplace_back(v, v + n);  // a moved vector keeps its buffer: the pointer stays valid
        return floats_.back().data();
    }
    smolvlm_cpu::Bf16Matrix pack(const float* w, int64_t N, int64_t K) {
        packed_.emplace_back(static_cast<size_t>(smolvlm_cpu::bf16_packed_elems(N, K)));
        smolvlm_cpu::bf16_pack(w, N, K, packed_.back().data());
        return {packed_.back().data(), N, K};
    }

    std::vector<std::vector<float>> floats_;
    std::vector<std::vector<uint16_t>> packed_;
    std::vector<smolvlm_cpu::VisionLayer> layers_;
    const float *post_w_ = nullptr, *post_b_ = nullptr;
    smolvlm_cpu::VisionShape shape_{};
};

// The attention kernel named by isa ("amx", "amx-emulated", "avx512bf16", "f32"; None: what the encoder uses).
smolvlm_cpu::Bf16Isa attention_isa(const std::string& fn, const py::object& isa) {
    using smolvlm_cpu::Bf16Isa;
    if (isa.is_none()) return smolvlm_cpu::vision_attention_default_isa();
    const std::string name = py::isinstance<py::str>(isa) ? isa.cast<std::string>() : "";
    for (const Bf16Isa k : {Bf16Isa::amx, Bf16Isa::amx_emulated, Bf16Isa::avx512bf16, Bf16Isa::f32}) {
        if (name != smolvlm_cpu::bf16_isa_name(k)) continue;
        if (!smolvlm_cpu::vision_attention_runnable(k))
            throw py::value_error(fn + ": this CPU (or build, or OS) cannot run the " + name + " kernel");
        return k;
    }
    throw py::value_error(fn + ": isa must be None or one of 'amx', 'amx-emulated', 'avx512bf16', 'f32', got " +
                          std::string(py::repr(isa)));
}

// out [B * S, H * Dh] = attention over qkv [B * S, 3 * H * Dh]; isa: the kernel (attention_isa).
void vision_attention(const py::array& qkv, int64_t B, int64_t S, int64_t heads, const py::object& key_mask,
                      const py::array& out, const py::object& isa) {
    const std::string fn = "vision_attention";
    check_tiles(fn, B, S);
    if (qkv.ndim() != 2 || heads <= 0 || qkv.shape(1) % (3 * heads) || qkv.shape(1) == 0)
        throw py::value_error(fn + ": qkv must be [B * S, 3 * heads * head_dim] with head_dim >= 1, got " +
                              shape_of(qkv) + " for " + std::to_string(heads) + " heads");
    const int64_t Dh = qkv.shape(1) / (3 * heads);
    smolvlm_cpu::VisionAttention a{checked_f32(fn + ": qkv", qkv, {B * S, 3 * heads * Dh}), nullptr, B, S, heads, Dh,
                                   1.f / std::sqrt(static_cast<float>(Dh))};
    auto* op = static_cast<float*>(const_cast<void*>(checked(fn + ": out", out, Kind::f32, {B * S, heads * Dh}, true)));
    check_no_overlap(fn, out, qkv, "qkv");
    a.key_mask = checked_key_mask(fn, key_mask, B, S);
    if (a.key_mask) check_no_overlap(fn, out, key_mask, "key_mask");
    const smolvlm_cpu::Bf16Isa kernel = attention_isa(fn, isa);
    py::gil_scoped_release release;
    smolvlm_cpu::VisionAttentionWork work;
    smolvlm_cpu::vision_attention(a, kernel, work, op);
}

}  // namespace

void register_vision(py::module_& m) {
    py::class_<VisionEncoder>(m, "VisionEncoder",
                              "the SigLIP encoder's layers fused in C++ with bf16 products (csrc/cpu/vision_encoder.cpp)"
                              "; layers: an iterable (read once, in order) of dicts of float32 arrays ln1_weight, ln1_bias, qkv_weight [3D, D] (q | k | v), "
                              "qkv_bias, out_weight, out_bias, ln2_weight, ln2_bias, fc1_weight [I, D], fc1_bias, "
                              "fc2_weight [D, I], fc2_bias; packed to bf16 once, here (the object owns the copies)")
        .def(py::init<const py::iterable&, const py::object&, const py::object&, int64_t, float>(), py::arg("layers"),
             py::arg("post_norm_weight"), py::arg("post_norm_bias"), py::arg("heads"), py::arg("eps"))
        .def("run", &VisionEncoder::run, py::arg("x"), py::arg("B"), py::arg("S"), py::arg("key_mask") = py::none(),
             py::arg("profile") = false,
             "x [B * S, D] float32 (B tiles of S patches) through every layer and the post LayerNorm, in place; "
             "key_mask [B, S] uint8/bool (the real patches) or None; profile: return the seconds per kind of work")
        .def_property_readonly("hidden_size", &VisionEncoder::hidden_size)
        .def_property_readonly("intermediate_size", &VisionEncoder::intermediate_size)
        .def_property_readonly("num_heads", &VisionEncoder::num_heads)
        .def("__len__", &VisionEncoder::num_layers);
    m.def("vision_attention", &vision_attention, py::arg("qkv"), py::arg("B"), py::arg("S"), py::arg("heads"),
          py::arg("key_mask"), py::arg("out"), py::arg("isa") = py::none(),
          "the encoder's attention alone: out [B * S, H * Dh] from qkv [B * S, 3 * H * Dh] (q | k | v), bf16 "
          "operands and probabilities, float32 softmax; isa: the dot products, 'amx' (AMX tiles), 'amx-emulated' "
          "(that kernel with each tile instruction in software), 'avx512bf16' (vdpbf16ps), 'f32' (float32 FMAs), "
          "or None (what the encoder uses); one this CPU cannot run raises ValueError");
    m.def("vision_attention_isa",
          [] { return smolvlm_cpu::bf16_isa_name(smolvlm_cpu::vision_attention_default_isa()); },
          "the kernel the encoder's attention uses: 'amx', 'amx-emulated', 'avx512bf16' or 'f32'");
    m.def(
        "vision_attention_runnable",
        [](const std::string& isa) {
            using smolvlm_cpu::Bf16Isa;
            for (const Bf16Isa k : {Bf16Isa::amx, Bf16Isa::amx_emulated, Bf16Isa::avx512bf16, Bf16Isa::f32})
                if (isa == smolvlm_cpu::bf16_isa_name(k)) return smolvlm_cpu::vision_attention_runnable(k);
            throw py::value_error("vision_attention_runnable: not a kernel name: " + isa);
        },
        py::arg("isa"), "whether this CPU can run that attention kernel (see vision_attention)");
}
