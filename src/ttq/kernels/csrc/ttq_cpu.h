// Entry point of the TTQ CPU products for the Python binding (ttq_bind.cpp): the same functions as the
// torch.ops.ttq_cpu ops packed_mm / packed_mm_q4i8 / packed_mm_q8i8 (ttq_cpu.cpp), called directly.
#pragma once

#include <ATen/ATen.h>

namespace ttq_cpu {

enum class Product : int { kPacked = 0, kQ4I8 = 1, kQ8I8 = 2 };

// y (n, d_out) = deq(q) (x / s) + B (A x) + bias for x (n, d_in), in x's dtype (see packed_mm).
at::Tensor product(Product op, const at::Tensor& x, const c10::optional<at::Tensor>& s, const at::Tensor& q,
                   const at::Tensor& sc, const at::Tensor& zr, int64_t bits, int64_t g, int64_t d_out, int64_t d_in,
                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& b,
                   const c10::optional<at::Tensor>& a);

}  // namespace ttq_cpu
