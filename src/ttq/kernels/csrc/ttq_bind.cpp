// Python binding of the decode fast path: a product with every argument but x bound once per prompt.
//
// A decode step of a small model calls ~200 packed products of a few microseconds each; through
// torch.ops each call spends ~2 us boxing its 12 arguments and Python another ~2 us reshaping and
// checking.  BoundProduct keeps the packed tensors and checks x in C++ (~0.2 us per call).
#include <torch/extension.h>

#include <string>

#include "ttq_cpu.h"

namespace py = pybind11;

namespace {

class BoundProduct {
 public:
  BoundProduct(const std::string& op, c10::optional<at::Tensor> s, at::Tensor q, at::Tensor sc, at::Tensor zr,
               int64_t bits, int64_t g, int64_t d_out, int64_t d_in, c10::optional<at::Tensor> bias,
               c10::optional<at::Tensor> b, c10::optional<at::Tensor> a, int64_t max_rows, bool one_token)
      : s_(std::move(s)), q_(std::move(q)), sc_(std::move(sc)), zr_(std::move(zr)), bits_(bits), g_(g),
        d_out_(d_out), d_in_(d_in), bias_(std::move(bias)), b_(std::move(b)), a_(std::move(a)),
        max_rows_(max_rows), one_token_(one_token) {
    if (op == "packed_mm") op_ = ttq_cpu::Product::kPacked;
    else if (op == "packed_mm_q4i8") op_ = ttq_cpu::Product::kQ4I8;
    else if (op == "packed_mm_q8i8") op_ = ttq_cpu::Product::kQ8I8;
    else throw py::value_error("BoundProduct: unknown op '" + op + "' (allowed: packed_mm, packed_mm_q4i8, packed_mm_q8i8)");
    if (d_in <= 0 || d_out <= 0 || max_rows < 1) throw py::value_error("BoundProduct: d_in, d_out and max_rows must be positive");
  }

  // y (..., d_out) for x (..., d_in) on the CPU with at most max_rows rows (and, with one_token, one token:
  // x.size(-2) == 1); None for any other x, which the caller sends down its general path.
  py::object call(const at::Tensor& x) const {
    if (x.dim() == 0 || !x.device().is_cpu()) return py::none();
    if (x.size(-1) != d_in_)
      throw py::value_error("input has " + std::to_string(x.size(-1)) + " features, packed weight expects " +
                            std::to_string(d_in_) + " (shape (" + std::to_string(d_out_) + ", " +
                            std::to_string(d_in_) + "))");
    if (one_token_ && x.dim() >= 2 && x.size(-2) != 1) return py::none();
    const int64_t rows = x.numel() / d_in_;
    if (rows == 0 || rows > max_rows_) return py::none();
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = d_out_;
    at::Tensor y;
    {
      py::gil_scoped_release no_gil;
      y = ttq_cpu::product(op_, x.reshape({rows, d_in_}), s_, q_, sc_, zr_, bits_, g_, d_out_, d_in_, bias_, b_, a_)
              .view(sizes);
    }
    return py::cast(y);
  }

 private:
  ttq_cpu::Product op_;
  c10::optional<at::Tensor> s_;
  at::Tensor q_, sc_, zr_;
  int64_t bits_, g_, d_out_, d_in_;
  c10::optional<at::Tensor> bias_, b_, a_;
  int64_t max_rows_;
  bool one_token_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<BoundProduct>(m, "BoundProduct")
      .def(py::init<const std::string&, c10::optional<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, int64_t,
                    int64_t, int64_t, int64_t, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                    c10::optional<at::Tensor>, int64_t, bool>(),
           py::arg("op"), py::arg("s"), py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("bits"),
           py::arg("group"), py::arg("d_out"), py::arg("d_in"), py::arg("bias"), py::arg("b"), py::arg("a"),
           py::arg("max_rows"), py::arg("one_token"))
      .def("__call__", &BoundProduct::call, py::arg("x"))
      // copies share the bound (read-only) tensors, as the Python closure it replaces did
      .def("__copy__", [](py::object self) { return self; })
      .def("__deepcopy__", [](py::object self, py::dict) { return self; });
}
