// TTQ CPU kernels: fused scale+quantize+pack, and GEMV / small-batch GEMM on packed codes.
//
// Layouts (documented once in ttq/kernels/api.py): per row, blocks of CPB chunks of 16 columns;
//   bits 4 (cpu_q4): 16 bytes / 32 columns, byte j = col j (low nibble) | col 16 + j (high nibble);
//   bits 2 (cpu_q2): 16 bytes / 64 columns, byte j bits 2k..2k+1 = col 16 k + j;
//   bits 3 (cpu_q3): 48 bytes / 128 columns, 16 little-endian 24-bit lanes, lane j bits 3k..3k+2 = col 16 k + j;
//   bits 5..8 (cpu_q8): 16 bytes / 16 columns, one code per byte.
// cpu_q4_i8 / cpu_q8_i8 read cpu_q4 / cpu_q8 codes with int8-rounded activations (AVX-512 VNNI or AVX2;
// see packed_mm_q4i8, packed_mm_q8i8).
// Codes are clamp(round((w * s - Z) / S), 0, 2^q - 1) with S = (max - min) / (2^q - 1), Z = min per
// group (after the symmetric / range-expansion transforms), exactly as ttq.formats.affine.quantize
// computes them in float32.  Group sizes must be multiples of 16 or cover the whole row.
//
// Built by ttq/kernels/cpu_build.py through torch.utils.cpp_extension.load with ttq_bind.cpp (ops under
// torch.ops.ttq_cpu; the Python module holds the bound decode product, see ttq_bind.cpp).  The
// instruction-set paths live in fragments included below: avx512.inc (exact layouts), vnni.inc (int8
// activations, AVX-512 VNNI), avx2.inc and avx2_i8.inc (builds without AVX-512), codes.inc (unpacked codes of
// ttq.formats.affine.quantize / dequantize in one pass); the portable C++ paths,
// the dispatch and the ops are here.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "ttq_cpu.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define TTQ_AVX512 1
#include <immintrin.h>
#else
#define TTQ_AVX512 0
#endif
#define TTQ_ALWAYS_INLINE inline __attribute__((always_inline))

namespace {

constexpr int CH = 16;  // chunk width (columns)

inline int chunks_per_block(int bits) { return bits == 4 ? 2 : bits == 3 ? 8 : bits == 2 ? 4 : 1; }
inline int block_bytes(int bits) { return bits == 3 ? 48 : 16; }
inline int64_t row_bytes(int bits, int64_t d_in) {
  const int64_t cols = (int64_t)CH * chunks_per_block(bits);
  return (d_in + cols - 1) / cols * block_bytes(bits);
}
inline int code_bits(int bits) { return bits > 4 ? 8 : bits; }  // 5..8 share the byte layout

// Rows per thread of a packed product: at least PARALLEL_MIN_WEIGHTS weights each (a multiple of 4 rows).  With
// threads that spin briefly between regions (the ttq command's GOMP_SPINCOUNT), 64 K beat 512 K / 128 K / 32 K at 2
// threads on SmolLM2 / Gemma3 shapes (a scratch timing: a SmolLM2 layer's four cpu_q4_i8 products 94 -> 76 us).
constexpr int64_t PARALLEL_MIN_WEIGHTS = int64_t(1) << 16;
inline int64_t product_grain(int64_t d_in) {
  return std::max<int64_t>(16, (PARALLEL_MIN_WEIGHTS / std::max<int64_t>(d_in, 1) + 3) / 4 * 4);
}

// ---------------------------------------------------------------- scalar helpers (all builds)
template <typename T> inline float to_f(T v) { return static_cast<float>(v); }
#if defined(__F16C__)
inline float half_to_f(uint16_t h) { return _cvtsh_ss(h); }
inline uint16_t f_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
#else
inline float half_to_f(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
inline uint16_t f_to_half(float f) { return c10::Half(f).x; }
#endif

struct GroupParams { float scale, zero; };

// (min, max) -> (scale, zero) exactly as ttq.formats.affine.group_params (float32 ops, no FMA).
inline GroupParams params_from_range(float mn, float mx, int qmax, bool symmetric, float nu) {
  if (symmetric) {
    float m = std::fmax(std::fabs(mx), std::fabs(mn));
    mx = m;
    mn = -m;
  }
  if (nu != 1.0f) {
    volatile float mid = (mx + mn) / 2.0f;
    volatile float prod = nu * (mx - mn);
    volatile float half = prod / 2.0f;
    mx = mid + half;
    mn = mid - half;
  }
  volatile float diff = mx - mn;
  return {diff / (float)qmax, mn};
}

// The integer code of v in a group (zero, scale): clamp(round((v - zero) / safe), 0, qmax), round half to even as
// torch.round, with safe = scale or 1 for a constant group (ttq.formats.affine.quantize, the same float32 ops).
inline float code_of(float v, float zero, float safe, int qmax) {
  float c = std::rint((v - zero) / safe);
  c = c < 0.0f ? 0.0f : c;
  return c > (float)qmax ? (float)qmax : c;
}

inline bool half_ok(float v) {
  float a = std::fabs(v);
  return a == 0.0f || (a >= 6.103515625e-05f && a <= 65504.0f);
}

// ---------------------------------------------------------------- packing of one block's codes
// Portable packer (loops the compiler vectorizes): codes[16 k + j] = code of column 16 k + j of the block,
// chunks_per_block(bits) chunks; writes the block's block_bytes(bits) bytes.  The AVX-512 path packs
// 16 codes at once.
inline void pack_block(const uint8_t* codes, int cb, uint8_t* p) {
  if (cb == 8) {
    for (int j = 0; j < CH; ++j) p[j] = codes[j];
  } else if (cb == 4) {
    for (int j = 0; j < CH; ++j) p[j] = (uint8_t)(codes[j] | (codes[CH + j] << 4));
  } else if (cb == 2) {
    for (int j = 0; j < CH; ++j)
      p[j] = (uint8_t)(codes[j] | (codes[CH + j] << 2) | (codes[2 * CH + j] << 4) | (codes[3 * CH + j] << 6));
  } else {  // 3-bit: 16 little-endian 24-bit lanes, lane j bits 3k..3k+2 = code of column 16 k + j
    for (int j = 0; j < CH; ++j) {
      uint32_t v = 0;
      for (int k = 0; k < 8; ++k) v |= (uint32_t)(codes[CH * k + j] & 7) << (3 * k);
      p[3 * j] = (uint8_t)v;
      p[3 * j + 1] = (uint8_t)(v >> 8);
      p[3 * j + 2] = (uint8_t)(v >> 16);
    }
  }
}

// ---------------------------------------------------------------- quantize + pack (portable)
template <typename T, typename ST>
void quant_rows_scalar(const T* w, const float* s, int64_t r0, int64_t r1, int64_t d_in, int bits, int64_t g,
                       int64_t n_groups, bool symmetric, float nu, uint8_t* q, ST* sc, ST* zr, int* status) {
  const int qmax = (1 << bits) - 1;
  const int64_t rb = row_bytes(bits, d_in);
  const int cb = code_bits(bits), cpb = chunks_per_block(bits), bb = block_bytes(bits);
  const int64_t n_blocks = rb / bb, bcols = (int64_t)cpb * CH;
  std::vector<float> buf(d_in);
  std::vector<uint8_t> codes(n_blocks * bcols, 0);  // the row's codes, zero past d_in
  for (int64_t r = r0; r < r1; ++r) {
    uint8_t* qrow = q + r * rb;
    for (int64_t i = 0; i < d_in; ++i) buf[i] = to_f(w[r * d_in + i]) * s[i];
    for (int64_t gi = 0; gi < n_groups; ++gi) {
      const int64_t c0 = gi * g, c1 = std::min(d_in, c0 + g);
      // plain compares / rint (not isfinite / fmin / nearbyint) so that the loops vectorize
      float mn = buf[c0], mx = buf[c0];
      int finite = 1;
      for (int64_t i = c0; i < c1; ++i) {
        finite &= (int)(std::fabs(buf[i]) <= 3.4028234663852886e38f);  // false for inf and NaN
        mn = buf[i] < mn ? buf[i] : mn;
        mx = buf[i] > mx ? buf[i] : mx;
      }
      if (!finite) *status |= 1;
      GroupParams p = params_from_range(mn, mx, qmax, symmetric, nu);
      if constexpr (sizeof(ST) == 2) {
        // float16 storage: the codes are chosen against the stored (rounded) scale / zero, so every weight stays
        // within half a step of the grid it is read with (rounding only the stored values would move a group far
        // from 0 by up to 2^-11 |zero|, which can be most of a step)
        if (!half_ok(p.scale) || !half_ok(p.zero)) *status |= 2;
        const uint16_t hs = f_to_half(p.scale), hz = f_to_half(p.zero);
        sc[r * n_groups + gi] = hs;
        zr[r * n_groups + gi] = hz;
        p.scale = half_to_f(hs);
        p.zero = half_to_f(hz);
      } else {
        sc[r * n_groups + gi] = p.scale;
        zr[r * n_groups + gi] = p.zero;
      }
      const float safe = p.scale > 0 ? p.scale : 1.0f;
      for (int64_t i = c0; i < c1; ++i) {
        codes[i] = (uint8_t)code_of(buf[i], p.zero, safe, qmax);
      }
    }
    for (int64_t k = 0; k < n_blocks; ++k) pack_block(codes.data() + k * bcols, cb, qrow + k * bb);
  }
}

// ---------------------------------------------------------------- packed GEMM (portable)
template <typename ST>
inline float load_param(const ST* p, int64_t i) {
  if constexpr (sizeof(ST) == 2) return half_to_f(p[i]); else return p[i];
}

// One block's codes (chunks_per_block(bits) chunks of 16 columns) as floats, written so that compilers
// vectorize it for any SIMD width (AVX2, NEON): out[16 k + j] = code of column 16 k + j of the block.
inline void decode_block(const uint8_t* p, int cb, float* out) {
  if (cb == 8) {
    for (int j = 0; j < CH; ++j) out[j] = (float)p[j];
  } else if (cb == 4) {
    for (int j = 0; j < CH; ++j) out[j] = (float)(p[j] & 15);
    for (int j = 0; j < CH; ++j) out[CH + j] = (float)(p[j] >> 4);
  } else if (cb == 2) {
    for (int k = 0; k < 4; ++k)
      for (int j = 0; j < CH; ++j) out[CH * k + j] = (float)((p[j] >> (2 * k)) & 3);
  } else {  // 3-bit: 16 little-endian 24-bit lanes
    uint32_t lane[CH];
    for (int j = 0; j < CH; ++j)
      lane[j] = (uint32_t)p[3 * j] | ((uint32_t)p[3 * j + 1] << 8) | ((uint32_t)p[3 * j + 2] << 16);
    for (int k = 0; k < 8; ++k)
      for (int j = 0; j < CH; ++j) out[CH * k + j] = (float)((lane[j] >> (3 * k)) & 7);
  }
}

// Portable packed GEMM for n <= 4 tokens: y[b, r] = sum_g S_g (codes_g . xs_g) + Z_g xsum_g for rows r0..r1-1.
// xs: n rows of x / s zero padded to dpad columns; xsum: n x n_groups group sums of xs.  The per-group
// code . x products accumulate in 16 float lanes (vectorized by the compiler), as the AVX-512 path does.
template <typename ST>
void gemm_rows_scalar(const uint8_t* q, const ST* sc, const ST* zr, int bits, int64_t g, int64_t n_groups,
                      int64_t d_in, const float* xs, int64_t dpad, const float* xsum, int64_t n, int64_t r0,
                      int64_t r1, float* y, int64_t d_out) {
  const int cb = code_bits(bits), cpb = chunks_per_block(bits), bb = block_bytes(bits);
  const int64_t rb = row_bytes(bits, d_in);
  const int64_t n_chunks = (d_in + CH - 1) / CH;
  const int64_t cpg = n_groups == 1 ? n_chunks : g / CH;  // chunks per group
  float codes[8 * CH];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* qrow = q + r * rb;
    float acc[4] = {0, 0, 0, 0};
    float part[4][CH] = {};
    for (int64_t gi = 0; gi < n_groups; ++gi) {  // nested loops: no integer division per chunk
      const int64_t t0 = gi * cpg, t1 = std::min(n_chunks, t0 + cpg);
      for (int64_t t = t0; t < t1; ++t) {
        const int slot = (int)(t % cpb);
        if (slot == 0 || t == t0) decode_block(qrow + (t / cpb) * bb, cb, codes);
        const float* c = codes + slot * CH;
        for (int64_t b = 0; b < n; ++b) {
          const float* xb = xs + b * dpad + t * CH;
          for (int j = 0; j < CH; ++j) part[b][j] += c[j] * xb[j];
        }
      }
      const float S = load_param(sc, r * n_groups + gi), Z = load_param(zr, r * n_groups + gi);
      for (int64_t b = 0; b < n; ++b) {
        float d = 0;
        for (int j = 0; j < CH; ++j) {
          d += part[b][j];
          part[b][j] = 0;
        }
        acc[b] += S * d + Z * xsum[b * n_groups + gi];
      }
    }
    for (int64_t b = 0; b < n; ++b) y[b * d_out + r] = acc[b];
  }
}

#include "avx512.inc"

inline float dot_f32(const float* a, const float* b, int64_t n) {
#if TTQ_AVX512
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + CH <= n; i += CH) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const __mmask16 k = tail_mask(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
#endif
}

#include "vnni.inc"

// ---------------------------------------------------------------- dispatch helpers
// Argument checks shared by the int8-activation products (packed_mm_q4i8 on VNNI or AVX2, packed_mm_q8i8):
// x (n, d_in), group size (clamped to d_in: a multiple of 32 or the whole row), CB-bit qweight of the
// base layout, contiguous (d_out, n_groups) float32 / float16 scale and zero.  Returns n_groups.
inline int64_t check_i8_args(const char* op, int CB, const at::Tensor& x, const at::Tensor& q, const at::Tensor& sc,
                             const at::Tensor& zr, int64_t& g, int64_t d_out, int64_t d_in) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == d_in, "ttq_cpu.", op, ": x must be (n, d_in)");
  g = std::min(g, d_in);
  TORCH_CHECK(g > 0 && (g % 32 == 0 || g >= d_in), "ttq_cpu.", op,
              ": group size must be a multiple of 32 or cover the row, got ", g);
  const int64_t n_groups = (d_in + g - 1) / g;
  TORCH_CHECK(q.is_contiguous() && q.scalar_type() == at::kByte && q.size(0) == d_out &&
              q.size(1) == row_bytes(CB, d_in), "ttq_cpu.", op, ": qweight is not a ", CB == 4 ? "cpu_q4" : "cpu_q8",
              " tensor of this shape");
  TORCH_CHECK(sc.is_contiguous() && zr.is_contiguous() && sc.numel() == d_out * n_groups &&
              zr.numel() == d_out * n_groups && sc.scalar_type() == zr.scalar_type() &&
              (sc.scalar_type() == at::kFloat || sc.scalar_type() == at::kHalf),
              "ttq_cpu.", op, ": scale/zero must be contiguous (d_out, n_groups) float32 or float16");
  return n_groups;
}

void check_layout_args(int64_t bits, int64_t g, int64_t d_in) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "ttq_cpu: bits must be in 2..8, got ", bits);
  TORCH_CHECK(g > 0 && (g % CH == 0 || g >= d_in), "ttq_cpu: group size must be a multiple of 16 or cover the row, got ",
              g, " for d_in=", d_in);
}

#include "avx2.inc"

template <typename F>
void dispatch_cb(int bits, F&& f) {
  switch (code_bits(bits)) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// ---------------------------------------------------------------- ops
// Quantize + pack into preallocated q (d_out, row_bytes) u8, sc / zr (d_out, n_groups) f16 or f32.
// Returns a status: bit 0 = non-finite w * s, bit 1 = a scale / zero outside float16's normal range.
int64_t quant_pack_out(const at::Tensor& w_, const at::Tensor& s_, int64_t bits, int64_t g, bool symmetric, double nu,
                       at::Tensor& q, at::Tensor& sc, at::Tensor& zr) {
  TORCH_CHECK(w_.dim() == 2, "ttq_cpu.quant_pack: weight must be 2-D");
  const at::Tensor w = w_.contiguous();
  const at::Tensor s = s_.to(at::kFloat).contiguous();
  const int64_t d_out = w.size(0), d_in = w.size(1);
  TORCH_CHECK(s.numel() == d_in, "ttq_cpu.quant_pack: scale must have d_in elements");
  g = std::min(g, d_in);
  check_layout_args(bits, g, d_in);
  const int64_t n_groups = (d_in + g - 1) / g;
  TORCH_CHECK(q.is_contiguous() && q.scalar_type() == at::kByte && q.size(0) == d_out &&
              q.size(1) == row_bytes(bits, d_in), "ttq_cpu.quant_pack: qweight buffer has the wrong shape/dtype");
  TORCH_CHECK(sc.is_contiguous() && zr.is_contiguous() && sc.numel() == d_out * n_groups &&
              zr.numel() == d_out * n_groups && sc.scalar_type() == zr.scalar_type() &&
              (sc.scalar_type() == at::kHalf || sc.scalar_type() == at::kFloat),
              "ttq_cpu.quant_pack: scale/zero buffers must be contiguous (d_out, n_groups) float16 or float32");
  const bool half_params = sc.scalar_type() == at::kHalf;
  int status = 0;
  const float fnu = (float)nu;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "ttq_quant_pack", [&] {
    using T = scalar_t;
    auto run = [&](auto st_tag) {
      using ST = decltype(st_tag);
      ST* scp = reinterpret_cast<ST*>(sc.data_ptr());
      ST* zrp = reinterpret_cast<ST*>(zr.data_ptr());
      at::parallel_for(0, d_out, 16, [&](int64_t r0, int64_t r1) {
        int local = 0;
#if TTQ_AVX512
        if constexpr (!std::is_same_v<T, double>) {
          dispatch_cb((int)bits, [&](auto cb) {
            quant_rows_avx512<T, ST, decltype(cb)::value>(w.data_ptr<T>(), s.data_ptr<float>(), r0, r1, d_in,
                                                           (int)bits, g, n_groups, symmetric, fnu,
                                                           q.data_ptr<uint8_t>(), scp, zrp, &local);
          });
        } else
#endif
        {
          quant_rows_scalar<T, ST>(w.data_ptr<T>(), s.data_ptr<float>(), r0, r1, d_in, (int)bits, g, n_groups,
                                   symmetric, fnu, q.data_ptr<uint8_t>(), scp, zrp, &local);
        }
        if (local) __atomic_fetch_or(&status, local, __ATOMIC_RELAXED);
      });
    };
    if (half_params) run(uint16_t{}); else run(float{});
  });
  return (int64_t)status;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> quant_pack(const at::Tensor& w, const at::Tensor& s,
                                                                   int64_t bits, int64_t g, bool symmetric,
                                                                   double nu, bool half_params) {
  TORCH_CHECK(w.dim() == 2, "ttq_cpu.quant_pack: weight must be 2-D");
  const int64_t d_out = w.size(0), d_in = w.size(1);
  const int64_t ge = std::max<int64_t>(1, std::min(g, d_in));
  const int64_t n_groups = (d_in + ge - 1) / ge;
  const auto pdt = half_params ? at::kHalf : at::kFloat;
  at::Tensor q = at::empty({d_out, row_bytes(bits, d_in)}, w.options().dtype(at::kByte));
  at::Tensor sc = at::empty({d_out, n_groups}, w.options().dtype(pdt));
  at::Tensor zr = at::empty({d_out, n_groups}, w.options().dtype(pdt));
  const int64_t status = quant_pack_out(w, s, bits, g, symmetric, nu, q, sc, zr);
  return {q, sc, zr, status};
}

// y (n, d_out) float32 = deq(q) @ (x / s)^T + B (A x) + bias
// y (n, d_out) float32 = deq(q) @ (x / s)^T + B (A x) + bias; prologue and epilogue in plain loops
// (no ATen ops on the decode path: their dispatch costs more than a small layer's product).
at::Tensor packed_mm(const at::Tensor& x_, const c10::optional<at::Tensor>& s_, const at::Tensor& q,
                     const at::Tensor& sc, const at::Tensor& zr, int64_t bits, int64_t g, int64_t d_out, int64_t d_in,
                     const c10::optional<at::Tensor>& bias_, const c10::optional<at::Tensor>& b_,
                     const c10::optional<at::Tensor>& a_) {
  TORCH_CHECK(x_.dim() == 2 && x_.size(1) == d_in, "ttq_cpu.packed_mm: x must be (n, d_in)");
  g = std::min(g, d_in);
  check_layout_args(bits, g, d_in);
  const int64_t n = x_.size(0);
  const int64_t n_groups = (d_in + g - 1) / g;
  TORCH_CHECK(q.is_contiguous() && q.size(0) == d_out && q.size(1) == row_bytes(bits, d_in),
              "ttq_cpu.packed_mm: qweight has the wrong shape for this layout");
  TORCH_CHECK(sc.is_contiguous() && zr.is_contiguous() && sc.numel() == d_out * n_groups &&
              zr.numel() == d_out * n_groups && sc.scalar_type() == zr.scalar_type(),
              "ttq_cpu.packed_mm: scale/zero must be contiguous (d_out, n_groups) of one dtype");
  const at::Tensor x = x_.contiguous();
  const bool has_s = s_.has_value();
  at::Tensor s = has_s ? s_->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t rank = (b_.has_value() && a_.has_value()) ? b_->size(1) : 0;
  at::Tensor bmat = rank ? b_->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor amat = rank ? a_->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor bias = bias_.has_value() ? bias_->to(at::kFloat).contiguous() : at::Tensor();
  TORCH_CHECK(!rank || (bmat.size(0) == d_out && amat.size(0) == rank && amat.size(1) == d_in),
              "ttq_cpu.packed_mm: low-rank factors must be (d_out, r) and (r, d_in)");
  // prologue: xf = x (float32), xs = x / s zero padded, xsum per group, t = A x
  const int64_t dpad = ((d_in + 63) / 64) * 64;
  std::vector<float> xf(n * d_in), xs(n * dpad, 0.0f), xsum(n * n_groups, 0.0f), tv(n * std::max<int64_t>(rank, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ttq_packed_mm_x", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n * d_in; ++i) xf[i] = static_cast<float>(xp[i]);
  });
  const float* sp = has_s ? s.data_ptr<float>() : nullptr;
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t i = 0; i < d_in; ++i) xs[b * dpad + i] = has_s ? xf[b * d_in + i] / sp[i] : xf[b * d_in + i];
    for (int64_t gi = 0; gi < n_groups; ++gi) {
      const int64_t c0 = gi * g, c1 = std::min(d_in, c0 + g);
      float acc = 0;
      for (int64_t i = c0; i < c1; ++i) acc += xs[b * dpad + i];
      xsum[b * n_groups + gi] = acc;
    }
    for (int64_t k = 0; k < rank; ++k) tv[b * rank + k] = dot_f32(amat.data_ptr<float>() + k * d_in, xf.data() + b * d_in, d_in);
  }
#if TTQ_AVX512
  // 4- and 8-bit codes: the inputs also in span order (avx512.inc, span_tile) where the group size allows
  const int cbits = code_bits((int)bits);
  const bool spans = (cbits == 4 && span_serves<4>(g, n_groups)) || (cbits == 8 && span_serves<8>(g, n_groups));
  const int64_t span_w = cbits == 4 ? span_cols<4>() : span_cols<8>();
  const int64_t dspan = spans ? (d_in + span_w - 1) / span_w * span_w : 0;
  std::vector<float> xspan(n * dspan);
  if (spans && cbits == 4) span_order<4>(xs.data(), n, dpad, d_in, xspan.data(), dspan);
  if (spans && cbits == 8) span_order<8>(xs.data(), n, dpad, d_in, xspan.data(), dspan);
#endif
  at::Tensor y = at::empty({n, d_out}, x.options().dtype(at::kFloat));
  const bool half_params = sc.scalar_type() == at::kHalf;
  const float* xsp = xs.data();
  const float* xsump = xsum.data();
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* bp = rank ? bmat.data_ptr<float>() : nullptr;
  const float* biasp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  // split rows across threads only when each part has >= PARALLEL_MIN_WEIGHTS weights (fork / join costs more below)
  const int64_t grain = product_grain(d_in);
  auto run = [&](auto st_tag) {
    using ST = decltype(st_tag);
    const ST* scp = reinterpret_cast<const ST*>(sc.data_ptr());
    const ST* zrp = reinterpret_cast<const ST*>(zr.data_ptr());
    at::parallel_for(0, d_out, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t b0 = 0; b0 < n; b0 += 4) {
        const int64_t nb = std::min<int64_t>(4, n - b0);
        const float* xb = xsp + b0 * dpad;
        const float* xsb = xsump + b0 * n_groups;
        const float* tb = tv.data() + b0 * std::max<int64_t>(rank, 1);
        float* yb = yp + b0 * d_out;
#if TTQ_AVX512
        const float* xspb = spans ? xspan.data() + b0 * dspan : nullptr;
        dispatch_cb((int)bits, [&](auto cb) {
          constexpr int CB = decltype(cb)::value;
          switch (nb) {
            case 1: gemm_rows_avx512<ST, CB, 1>(qp, scp, zrp, (int)bits, g, n_groups, d_in, xb, dpad, xsb, bp, tb, rank, r0, r1, yb, d_out, xspb, dspan); break;
            case 2: gemm_rows_avx512<ST, CB, 2>(qp, scp, zrp, (int)bits, g, n_groups, d_in, xb, dpad, xsb, bp, tb, rank, r0, r1, yb, d_out, xspb, dspan); break;
            case 3: gemm_rows_avx512<ST, CB, 3>(qp, scp, zrp, (int)bits, g, n_groups, d_in, xb, dpad, xsb, bp, tb, rank, r0, r1, yb, d_out, xspb, dspan); break;
            default: gemm_rows_avx512<ST, CB, 4>(qp, scp, zrp, (int)bits, g, n_groups, d_in, xb, dpad, xsb, bp, tb, rank, r0, r1, yb, d_out, xspb, dspan); break;
          }
        });
#elif TTQ_AVX2
        dispatch_cb((int)bits, [&](auto cb) {
          constexpr int CB = decltype(cb)::value;
          switch (nb) {
            case 1: gemm_rows_avx2<ST, CB, 1>(qp, scp, zrp, (int)bits, g, n_groups, d_in, xb, dpad, xsb, r0, r1, yb, d_out); break;
            case 2: gemm_rows_avx2<ST, CB, 2>(qp, scp, zrp, (int)bits, g, n_groups, d_in, xb, dpad, xsb, r0, r1, yb, d_out); break;
            case 3: gemm_rows_avx2<ST, CB, 3>(qp, scp, zrp, (int)bits, g, n_groups, d_in, xb, dpad, xsb, r0, r1, yb, d_out); break;
            default: gemm_rows_avx2<ST, CB, 4>(qp, scp, zrp, (int)bits, g, n_groups, d_in, xb, dpad, xsb, r0, r1, yb, d_out); break;
          }
        });
#else
        gemm_rows_scalar<ST>(qp, scp, zrp, (int)bits, g, n_groups, d_in, xb, dpad, xsb, nb, r0, r1, yb, d_out);
#endif
      }
      // epilogue: + B t (fused into the AVX-512 tiles) + bias
      for (int64_t b = 0; b < n; ++b) {
        for (int64_t r = r0; r < r1; ++r) {
          float v = yp[b * d_out + r];
#if !TTQ_AVX512
          if (rank) v += dot_f32(bp + r * rank, tv.data() + b * rank, rank);
#endif
          if (biasp) v += biasp[r];
          yp[b * d_out + r] = v;
        }
      }
    });
  };
  if (half_params) run(uint16_t{}); else run(float{});
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// deq(q) (d_out, d_in) in float32 (or bfloat16 when as_bf16), for large-batch products.
at::Tensor dequant(const at::Tensor& q, const at::Tensor& sc, const at::Tensor& zr, int64_t bits, int64_t g,
                   int64_t d_out, int64_t d_in, bool as_bf16) {
  g = std::min(g, d_in);
  check_layout_args(bits, g, d_in);
  const int64_t n_groups = (d_in + g - 1) / g;
  const int64_t rb = row_bytes(bits, d_in);
  TORCH_CHECK(q.is_contiguous() && q.size(0) == d_out && q.size(1) == rb, "ttq_cpu.dequant: bad qweight shape");
  at::Tensor out = at::empty({d_out, d_in}, q.options().dtype(at::kFloat));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
#if TTQ_AVX512
  auto run = [&](auto st_tag) {
    using ST = decltype(st_tag);
    const ST* scp = reinterpret_cast<const ST*>(sc.data_ptr());
    const ST* zrp = reinterpret_cast<const ST*>(zr.data_ptr());
    at::parallel_for(0, d_out, 16, [&](int64_t r0, int64_t r1) {
      dispatch_cb((int)bits, [&](auto cb) {
        dequant_rows_avx512<ST, decltype(cb)::value>(qp, scp, zrp, (int)bits, g, n_groups, d_in, r0, r1, op);
      });
    });
  };
  TORCH_CHECK(sc.is_contiguous() && zr.is_contiguous() && sc.scalar_type() == zr.scalar_type(),
              "ttq_cpu.dequant: scale/zero must be contiguous and of one dtype");
  if (sc.scalar_type() == at::kHalf) run(uint16_t{}); else run(float{});
  return as_bf16 ? out.to(at::kBFloat16) : out;
#endif
  const at::Tensor scf = sc.to(at::kFloat).contiguous(), zrf = zr.to(at::kFloat).contiguous();
  const float* scp = scf.data_ptr<float>();
  const float* zrp = zrf.data_ptr<float>();
  const int cb = code_bits((int)bits), cpb = chunks_per_block((int)bits), bb = block_bytes((int)bits);
  const int64_t n_chunks = (d_in + CH - 1) / CH;
  at::parallel_for(0, d_out, 16, [&](int64_t r0, int64_t r1) {
    float codes[8 * CH];
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* qrow = qp + r * rb;
      for (int64_t t = 0; t < n_chunks; ++t) {
        const int slot = (int)(t % cpb);
        if (slot == 0) decode_block(qrow + (t / cpb) * bb, cb, codes);
        const int64_t c0 = t * CH, w = std::min<int64_t>(CH, d_in - c0);
        const float S = scp[r * n_groups + c0 / g], Z = zrp[r * n_groups + c0 / g];  // g: a multiple of 16 or d_in
        float* o = op + r * d_in + c0;
        const float* c = codes + slot * CH;
        for (int64_t j = 0; j < w; ++j) o[j] = c[j] * S + Z;  // mul then add: the reference's codes * S + Z
      }
    }
  });
  return as_bf16 ? out.to(at::kBFloat16) : out;
}

#include "codes.inc"

int64_t has_avx512() { return TTQ_AVX512; }
#include "avx2_i8.inc"
#include "attention.inc"

int64_t has_avx2_gemm() { return TTQ_AVX2; }  // the AVX2 + FMA packed GEMM (builds without AVX-512)

#if TTQ_VNNI
// The int8-activation product shared by packed_mm_q4i8 (CB = 4) and packed_mm_q8i8 (CB = 8, bits 5..8):
// y (n, d_out) = deq(q) (x / s) + B (A x) + bias with x / s rounded to int8 per 32 columns (see
// i8_quantize_acts).  op names the calling op in error messages.
template <int CB>
at::Tensor i8_packed_mm(const char* op, const at::Tensor& x_, const c10::optional<at::Tensor>& s_, const at::Tensor& q,
                        const at::Tensor& sc, const at::Tensor& zr, int64_t bits, int64_t g, int64_t d_out,
                        int64_t d_in, const c10::optional<at::Tensor>& bias_, const c10::optional<at::Tensor>& b_,
                        const c10::optional<at::Tensor>& a_) {
  TORCH_CHECK(CB == 4 || (bits >= 5 && bits <= 8), "ttq_cpu.", op, ": bits must be in 5..8 (the cpu_q8 layout), got ",
              bits);
  const int64_t n_groups = check_i8_args(op, CB, x_, q, sc, zr, g, d_out, d_in);
  const int64_t n = x_.size(0);
  const at::Tensor x = x_.contiguous();
  const bool has_s = s_.has_value();
  at::Tensor s = has_s ? s_->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t rank = (b_.has_value() && a_.has_value()) ? b_->size(1) : 0;
  at::Tensor bmat = rank ? b_->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor amat = rank ? a_->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor bias = bias_.has_value() ? bias_->to(at::kFloat).contiguous() : at::Tensor();
  TORCH_CHECK(!rank || (bmat.size(0) == d_out && amat.size(0) == rank && amat.size(1) == d_in),
              "ttq_cpu.", op, ": low-rank factors must be (d_out, r) and (r, d_in)");
  // prologue: xf = x (float32), xs = x / s, t = A x, int8 activations
  const int64_t rs = std::max<int64_t>(rank, 1);
  std::vector<float> xf(n * d_in), xs(n * d_in), tv(n * rs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ttq_packed_mm_i8_x", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n * d_in; ++i) xf[i] = static_cast<float>(xp[i]);
  });
  const float* sp = has_s ? s.data_ptr<float>() : nullptr;
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t i = 0; i < d_in; ++i) xs[b * d_in + i] = has_s ? xf[b * d_in + i] / sp[i] : xf[b * d_in + i];
    for (int64_t k = 0; k < rank; ++k) tv[b * rs + k] = dot_f32(amat.data_ptr<float>() + k * d_in, xf.data() + b * d_in, d_in);
  }
  I8Acts acts;
  i8_quantize_acts<CB == 4>(xs.data(), n, d_in, g, n_groups, 1 << (CB == 4 ? 3 : bits - 1), acts);
  at::Tensor y = at::empty({n, d_out}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* bp = rank ? bmat.data_ptr<float>() : nullptr;
  const float* biasp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t grain = product_grain(d_in);
  auto run = [&](auto st_tag) {
    using ST = decltype(st_tag);
    const ST* scp = reinterpret_cast<const ST*>(sc.data_ptr());
    const ST* zrp = reinterpret_cast<const ST*>(zr.data_ptr());
    at::parallel_for(0, d_out, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t b0 = 0; b0 < n; b0 += 4) {
        const int64_t nb = std::min<int64_t>(4, n - b0);
        const float* tb = tv.data() + b0 * rs;
        float* yb = yp + b0 * d_out;
        switch (nb) {
          case 1: i8_rows<CB, ST, 1>(qp, scp, zrp, n_groups, d_in, acts, b0, bp, tb, rank, r0, r1, yb, d_out); break;
          case 2: i8_rows<CB, ST, 2>(qp, scp, zrp, n_groups, d_in, acts, b0, bp, tb, rank, r0, r1, yb, d_out); break;
          case 3: i8_rows<CB, ST, 3>(qp, scp, zrp, n_groups, d_in, acts, b0, bp, tb, rank, r0, r1, yb, d_out); break;
          default: i8_rows<CB, ST, 4>(qp, scp, zrp, n_groups, d_in, acts, b0, bp, tb, rank, r0, r1, yb, d_out); break;
        }
      }
      if (biasp)
        for (int64_t b = 0; b < n; ++b)
          for (int64_t r = r0; r < r1; ++r) yp[b * d_out + r] += biasp[r];
    });
  };
  if (sc.scalar_type() == at::kHalf) run(uint16_t{}); else run(float{});
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}
#endif  // TTQ_VNNI

// cpu_q4_i8 product (see i8_packed_mm).  Same arguments as packed_mm for 4-bit codes.
at::Tensor packed_mm_q4i8(const at::Tensor& x_, const c10::optional<at::Tensor>& s_, const at::Tensor& q,
                          const at::Tensor& sc, const at::Tensor& zr, int64_t g, int64_t d_out, int64_t d_in,
                          const c10::optional<at::Tensor>& bias_, const c10::optional<at::Tensor>& b_,
                          const c10::optional<at::Tensor>& a_) {
#if TTQ_VNNI
  return i8_packed_mm<4>("packed_mm_q4i8", x_, s_, q, sc, zr, 4, g, d_out, d_in, bias_, b_, a_);
#elif TTQ_I8_AVX2
  return i8_avx2_mm<4>("packed_mm_q4i8", x_, s_, q, sc, zr, 4, g, d_out, d_in, bias_, b_, a_);
#else
  TORCH_CHECK(false, "ttq_cpu.packed_mm_q4i8: this build has neither AVX-512 VNNI nor AVX2 (see has_i8())");
  return at::Tensor();
#endif
}

// cpu_q8_i8 product (see i8_packed_mm).  Same arguments as packed_mm for the cpu_q8 layout (bits 5..8).
at::Tensor packed_mm_q8i8(const at::Tensor& x_, const c10::optional<at::Tensor>& s_, const at::Tensor& q,
                          const at::Tensor& sc, const at::Tensor& zr, int64_t bits, int64_t g, int64_t d_out,
                          int64_t d_in, const c10::optional<at::Tensor>& bias_, const c10::optional<at::Tensor>& b_,
                          const c10::optional<at::Tensor>& a_) {
#if TTQ_VNNI
  return i8_packed_mm<8>("packed_mm_q8i8", x_, s_, q, sc, zr, bits, g, d_out, d_in, bias_, b_, a_);
#elif TTQ_I8_AVX2
  return i8_avx2_mm<8>("packed_mm_q8i8", x_, s_, q, sc, zr, bits, g, d_out, d_in, bias_, b_, a_);
#else
  TORCH_CHECK(false, "ttq_cpu.packed_mm_q8i8: this build has neither AVX-512 VNNI nor AVX2 (see has_i8())");
  return at::Tensor();
#endif
}

// 1 when packed_mm_q4i8 / packed_mm_q8i8 run here: the AVX-512 VNNI kernels on a CPU with avx512_vnni, or the
// AVX2 ones.
int64_t has_i8() {
#if TTQ_VNNI
  return __builtin_cpu_supports("avx512vnni") ? 1 : 0;
#else
  return TTQ_I8_AVX2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
#endif
}

// 1 when packed_mm_q4i8 / packed_mm_q8i8 are compiled (AVX-512 VNNI) and the running CPU has avx512_vnni.
int64_t has_vnni() {
#if TTQ_VNNI
  return __builtin_cpu_supports("avx512vnni") ? 1 : 0;
#else
  return 0;
#endif
}

}  // namespace

at::Tensor ttq_cpu::product(ttq_cpu::Product op, const at::Tensor& x, const c10::optional<at::Tensor>& s,
                            const at::Tensor& q, const at::Tensor& sc, const at::Tensor& zr, int64_t bits, int64_t g,
                            int64_t d_out, int64_t d_in, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& a) {
  switch (op) {
    case ttq_cpu::Product::kQ4I8: return packed_mm_q4i8(x, s, q, sc, zr, g, d_out, d_in, bias, b, a);
    case ttq_cpu::Product::kQ8I8: return packed_mm_q8i8(x, s, q, sc, zr, bits, g, d_out, d_in, bias, b, a);
    default: return packed_mm(x, s, q, sc, zr, bits, g, d_out, d_in, bias, b, a);
  }
}

TORCH_LIBRARY(ttq_cpu, m) {
  m.def("quant_pack(Tensor w, Tensor s, int bits, int group, bool symmetric, float nu, bool half_params)"
        " -> (Tensor, Tensor, Tensor, int)");
  m.def("quant_pack_out(Tensor w, Tensor s, int bits, int group, bool symmetric, float nu, Tensor(a!) qweight,"
        " Tensor(b!) scale, Tensor(c!) zero) -> int");
  m.def("packed_mm(Tensor x, Tensor? s, Tensor qweight, Tensor scale, Tensor zero, int bits, int group, int d_out,"
        " int d_in, Tensor? bias, Tensor? b, Tensor? a) -> Tensor");
  m.def("dequant(Tensor qweight, Tensor scale, Tensor zero, int bits, int group, int d_out, int d_in, bool as_bf16)"
        " -> Tensor");
  m.def("quant_codes(Tensor w, int bits, int group, bool symmetric, float nu) -> (Tensor, Tensor, Tensor, int)");
  m.def("dequant_codes(Tensor codes, Tensor scale, Tensor zero, int group) -> Tensor");
  m.def("clip_codes(Tensor v, Tensor hw, int bits, int group, bool symmetric, float nu, float[] grid,"
        " bool with_codes=True, Tensor? s=None)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("has_avx512() -> int");
  m.def("has_avx2_gemm() -> int");
  m.def("packed_mm_q4i8(Tensor x, Tensor? s, Tensor qweight, Tensor scale, Tensor zero, int group, int d_out,"
        " int d_in, Tensor? bias, Tensor? b, Tensor? a) -> Tensor");
  m.def("packed_mm_q8i8(Tensor x, Tensor? s, Tensor qweight, Tensor scale, Tensor zero, int bits, int group,"
        " int d_out, int d_in, Tensor? bias, Tensor? b, Tensor? a) -> Tensor");
  m.def("has_vnni() -> int");
  m.def("has_i8() -> int");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ttq_cpu, CPU, m) {
  m.impl("quant_pack", &quant_pack);
  m.impl("quant_pack_out", &quant_pack_out);
  m.impl("packed_mm", &packed_mm);
  m.impl("dequant", &dequant);
  m.impl("quant_codes", &quant_codes);
  m.impl("dequant_codes", &dequant_codes);
  m.impl("clip_codes", &clip_codes);
  m.impl("packed_mm_q4i8", &packed_mm_q4i8);
  m.impl("packed_mm_q8i8", &packed_mm_q8i8);
  m.impl("decode_attention", &decode_attention);
}

TORCH_LIBRARY_IMPL(ttq_cpu, CompositeExplicitAutograd, m) {
  m.impl("has_avx512", &has_avx512);
  m.impl("has_avx2_gemm", &has_avx2_gemm);
  m.impl("has_vnni", &has_vnni);
  m.impl("has_i8", &has_i8);
}
