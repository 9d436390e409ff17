// The argument checks the pybind11 bindings (bindings*.cpp) share: shapes as messages print them, an exact shape,
// and the layout a kernel reads (C-contiguous, aligned, writeable where it writes). Each throws ValueError
// (py::value_error) naming `where`, so that bad input from Python is an error there, never a crash here.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace smolvlm_cpu {
namespace py_checks {

namespace py = pybind11;

inline std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

inline std::string shape_of(const py::array& a) {
    return shape_str(std::vector<int64_t>(a.shape(), a.shape() + a.ndim()));
}

// a has exactly `shape`, but for entries of -1 (any size).
inline void check_shape(const std::string& where, const py::array& a, const std::vector<int64_t>& shape) {
    bool same = a.ndim() == static_cast<py::ssize_t>(shape.size());
    for (size_t i = 0; same && i < shape.size(); ++i) same = shape[i] < 0 || a.shape(i) == shape[i];
    if (!same) throw py::value_error(where + " must have shape " + shape_str(shape) + ", got " + shape_of(a));
}

inline int flags_of(const py::array& a) { return py::detail::array_proxy(a.ptr())->flags; }

inline void check_aligned(const std::string& where, const py::array& a) {
    if (!(flags_of(a) & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) throw py::value_error(where + " must be aligned");
}

// C-contiguous and aligned, and writeable when asked.
inline void check_layout(const std::string& where, const py::array& a, bool writeable = false) {
    if (!(flags_of(a) & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
        throw py::value_error(where + " must be C-contiguous (np.ascontiguousarray)");
    check_aligned(where, a);
    if (writeable && !a.writeable()) throw py::value_error(where + " must be writeable");
}

}  // namespace py_checks
}  // namespace smolvlm_cpu
