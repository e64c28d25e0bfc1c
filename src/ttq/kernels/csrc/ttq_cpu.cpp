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
// torch.ops.ttq_cpu; the Python module holds the bound decode product, see ttq_bind.cpp).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "ttq_cpu.h"

#include <cmath>
#include <cstdint>
#include <cstring>
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
      const float safe = p.scale > 0 ? p.scale : 1.0f;
      for (int64_t i = c0; i < c1; ++i) {
        float v = std::rint((buf[i] - p.zero) / safe);  // round half to even, as torch.round
        v = v < 0.0f ? 0.0f : v;
        v = v > (float)qmax ? (float)qmax : v;
        codes[i] = (uint8_t)v;
      }
      if constexpr (sizeof(ST) == 2) {
        if (!half_ok(p.scale) || !half_ok(p.zero)) *status |= 2;
        sc[r * n_groups + gi] = f_to_half(p.scale);
        zr[r * n_groups + gi] = f_to_half(p.zero);
      } else {
        sc[r * n_groups + gi] = p.scale;
        zr[r * n_groups + gi] = p.zero;
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

#if TTQ_AVX512
// ---------------------------------------------------------------- AVX-512 helpers
// Masked loads are slow on some CPUs (AMD): full chunks use plain loads, only the row tail is masked.
template <typename T> inline __m512 load16(const T* p, __mmask16 k);
template <> inline __m512 load16<float>(const float* p, __mmask16 k) {
  return k == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(k, p);
}
template <> inline __m512 load16<at::BFloat16>(const at::BFloat16* p, __mmask16 k) {
  __m256i raw = k == 0xFFFF ? _mm256_loadu_si256((const __m256i*)p) : _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
template <> inline __m512 load16<at::Half>(const at::Half* p, __mmask16 k) {
  return _mm512_cvtph_ps(k == 0xFFFF ? _mm256_loadu_si256((const __m256i*)p) : _mm256_maskz_loadu_epi16(k, p));
}
template <> inline __m512 load16<uint16_t>(const uint16_t* p, __mmask16 k) {  // float16 bits
  return _mm512_cvtph_ps(k == 0xFFFF ? _mm256_loadu_si256((const __m256i*)p) : _mm256_maskz_loadu_epi16(k, p));
}

inline __mmask16 tail_mask(int64_t n) { return n >= CH ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

// vpermb indices: dword lane j <-> bytes 3j..3j+2 of a 3-bit block (the 4th byte of each lane is
// zeroed by the mask of the permute).
inline __m512i q3_unpack_idx() {
  alignas(64) static const uint8_t idx[64] = {
      0,  1,  2,  63, 3,  4,  5,  63, 6,  7,  8,  63, 9,  10, 11, 63, 12, 13, 14, 63, 15, 16,
      17, 63, 18, 19, 20, 63, 21, 22, 23, 63, 24, 25, 26, 63, 27, 28, 29, 63, 30, 31, 32, 63,
      33, 34, 35, 63, 36, 37, 38, 63, 39, 40, 41, 63, 42, 43, 44, 63, 45, 46, 47, 63};
  return _mm512_load_si512((const void*)idx);
}
inline __m512i q3_pack_idx() {  // bytes 3j..3j+2 <- bytes 4j..4j+2 of the dword lanes
  alignas(64) static const uint8_t idx[64] = {
      0,  1,  2,  4,  5,  6,  8,  9,  10, 12, 13, 14, 16, 17, 18, 20, 21, 22, 24, 25, 26, 28,
      29, 30, 32, 33, 34, 36, 37, 38, 40, 41, 42, 44, 45, 46, 48, 49, 50, 52, 53, 54, 56, 57,
      58, 60, 61, 62, 0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0};
  return _mm512_load_si512((const void*)idx);
}

// lane j of the result = op over the 16 lanes of v[j] (a transpose-reduce tree: 45 ops for 16 groups
// instead of 16 horizontal reductions of 8 ops each).
template <typename Op>
inline __m512 reduce16x16(const __m512* v, Op op) {
  const __m512i a0 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  const __m512i a1 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const __m512i b0 = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i b1 = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const __m512i c0 = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
  const __m512i c1 = _mm512_setr_epi32(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  const __m512i d0 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i d1 = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  __m512 r[8], s[4], u[2];
  for (int j = 0; j < 8; ++j)  // r[j]: lanes 0-7 = v[2j] folded to 8, lanes 8-15 = v[2j+1] folded to 8
    r[j] = op(_mm512_permutex2var_ps(v[2 * j], a0, v[2 * j + 1]), _mm512_permutex2var_ps(v[2 * j], a1, v[2 * j + 1]));
  for (int k = 0; k < 4; ++k)  // s[k]: group 4k + m at lanes 4m..4m+3
    s[k] = op(_mm512_permutex2var_ps(r[2 * k], b0, r[2 * k + 1]), _mm512_permutex2var_ps(r[2 * k], b1, r[2 * k + 1]));
  for (int l = 0; l < 2; ++l)  // u[l]: group 8l + m at lanes 2m, 2m+1
    u[l] = op(_mm512_permutex2var_ps(s[2 * l], c0, s[2 * l + 1]), _mm512_permutex2var_ps(s[2 * l], c1, s[2 * l + 1]));
  return op(_mm512_permutex2var_ps(u[0], d0, u[1]), _mm512_permutex2var_ps(u[0], d1, u[1]));
}

inline __mmask16 half_unsafe(__m512 x) {  // nonzero and outside float16's normal range
  const __m512 a = _mm512_abs_ps(x);
  const __mmask16 ok = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_EQ_OQ) |
                       (_mm512_cmp_ps_mask(a, _mm512_set1_ps(6.103515625e-05f), _CMP_GE_OQ) &
                        _mm512_cmp_ps_mask(a, _mm512_set1_ps(65504.0f), _CMP_LE_OQ));
  return (__mmask16)~ok;
}

// Quantize + pack rows [r0, r1), 16 groups at a time: pass 1 stores w * s and the per-group
// min/max vectors, one tree reduces them, the 16 (scale, zero) pairs are computed as one vector,
// pass 2 writes the codes into the layout's blocks.
template <typename T, typename ST, int CB>
void quant_rows_avx512(const T* w, const float* s, int64_t r0, int64_t r1, int64_t d_in, int bits, int64_t g,
                       int64_t n_groups, bool symmetric, float nu, uint8_t* q, ST* sc, ST* zr, int* status) {
  constexpr int CPB = CB == 4 ? 2 : CB == 3 ? 8 : CB == 2 ? 4 : 1;
  constexpr int BB = CB == 3 ? 48 : 16;
  const int qmax = (1 << bits) - 1;
  const int64_t rb = row_bytes(bits, d_in);
  const int64_t n_chunks = (d_in + CH - 1) / CH;
  const int64_t cpg = n_groups == 1 ? n_chunks : g / CH;  // chunks per group
  std::vector<float> buf(n_chunks * CH + CH);
  const __m512 vqmax = _mm512_set1_ps((float)qmax);
  const __m512 vzero = _mm512_setzero_ps();
  const __m512 vinf = _mm512_set1_ps(INFINITY), vninf = _mm512_set1_ps(-INFINITY);
  auto vmin = [](__m512 a, __m512 b) { return _mm512_min_ps(a, b); };
  auto vmax = [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); };
  alignas(64) float gs[16], gz[16];
  __m512 mns[16], mxs[16];
  int st = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const T* wrow = w + r * d_in;
    // pass 2 is compute-bound: meanwhile prefetch the next row, one 64-byte line per chunk
    const char* wnext = reinterpret_cast<const char*>(r + 1 < r1 ? wrow + d_in : wrow);
    const int64_t next_bytes = r + 1 < r1 ? d_in * (int64_t)sizeof(T) : 0;
    uint8_t* qrow = q + r * rb;
    __mmask16 bad = 0;
    for (int64_t g0 = 0; g0 < n_groups; g0 += 16) {
      const int ng = (int)std::min<int64_t>(16, n_groups - g0);
      // pass 1: v = w * s into buf, per-group min / max vectors (only the row's last chunk is partial)
      for (int j = 0; j < ng; ++j) {
        const int64_t c0 = (g0 + j) * g, c1 = std::min(d_in, c0 + g);
        __m512 vmn = vinf, vmx = vninf;
        int64_t c = c0;
        for (; c + CH <= c1; c += CH) {
          const __m512 v = _mm512_mul_ps(load16<T>(wrow + c, 0xFFFF), _mm512_loadu_ps(s + c));
          bad |= _mm512_fpclass_ps_mask(v, 0x99);  // NaN / +-Inf
          _mm512_storeu_ps(buf.data() + c, v);
          vmn = _mm512_min_ps(vmn, v);
          vmx = _mm512_max_ps(vmx, v);
        }
        if (c < c1) {
          const __mmask16 k = tail_mask(c1 - c);
          const __m512 v = _mm512_mul_ps(load16<T>(wrow + c, k), load16<float>(s + c, k));
          bad |= _mm512_mask_fpclass_ps_mask(k, v, 0x99);
          _mm512_storeu_ps(buf.data() + c, v);
          vmn = _mm512_mask_min_ps(vmn, k, vmn, v);
          vmx = _mm512_mask_max_ps(vmx, k, vmx, v);
        }
        mns[j] = vmn;
        mxs[j] = vmx;
      }
      for (int j = ng; j < 16; ++j) mns[j] = mxs[j] = vzero;
      // (scale, zero) of the 16 groups, float32 ops in the reference's order
      __m512 mn = reduce16x16(mns, vmin), mx = reduce16x16(mxs, vmax);
      if (symmetric) {
        mx = _mm512_max_ps(_mm512_abs_ps(mx), _mm512_abs_ps(mn));
        mn = _mm512_sub_ps(vzero, mx);
      }
      if (nu != 1.0f) {
        const __m512 two = _mm512_set1_ps(2.0f);
        const __m512 mid = _mm512_div_ps(_mm512_add_ps(mx, mn), two);
        const __m512 half = _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(nu), _mm512_sub_ps(mx, mn)), two);
        mx = _mm512_add_ps(mid, half);
        mn = _mm512_sub_ps(mid, half);
      }
      const __m512 scale = _mm512_div_ps(_mm512_sub_ps(mx, mn), vqmax);
      const __mmask16 kg = tail_mask(ng);
      if constexpr (sizeof(ST) == 2) {
        if ((half_unsafe(scale) | half_unsafe(mn)) & kg) st |= 2;
        _mm256_mask_storeu_epi16(sc + r * n_groups + g0, kg, _mm512_cvtps_ph(scale, _MM_FROUND_TO_NEAREST_INT));
        _mm256_mask_storeu_epi16(zr + r * n_groups + g0, kg, _mm512_cvtps_ph(mn, _MM_FROUND_TO_NEAREST_INT));
      } else {
        _mm512_mask_storeu_ps(sc + r * n_groups + g0, kg, scale);
        _mm512_mask_storeu_ps(zr + r * n_groups + g0, kg, mn);
      }
      // zero range: divide by 1 (code 0 -> W_hat = Z exactly), as the reference does
      _mm512_store_ps(gs, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(scale, vzero, _CMP_GT_OQ), _mm512_set1_ps(1.0f), scale));
      _mm512_store_ps(gz, mn);
      // pass 2: codes, packed into the row's blocks.  The batch's chunks [t0, t1) start on a block
      // boundary (16 groups of a multiple of 16 columns); full blocks take the unrolled path.
      const int64_t t0 = g0 * cpg, t1 = std::min(n_chunks, (g0 + ng) * cpg);
      int j = 0, left = (int)std::min<int64_t>(cpg, t1 - t0);  // group of the current chunk, chunks left in it
      for (int64_t b = t0 / CPB; b * CPB < t1; ++b) {
        __m512i blk = _mm512_setzero_si512();
        const bool full = (b + 1) * CPB <= t1 && (b + 1) * CPB * CH <= d_in;
        for (int slot = 0; slot < CPB; ++slot) {
          const int64_t t = b * CPB + slot;
          if (!full && t >= t1) break;
          const __mmask16 k = full ? (__mmask16)0xFFFF : tail_mask(d_in - t * CH);
          __m512 v = _mm512_div_ps(_mm512_sub_ps(_mm512_loadu_ps(buf.data() + t * CH), _mm512_set1_ps(gz[j])),
                                   _mm512_set1_ps(gs[j]));
          v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          v = _mm512_min_ps(_mm512_max_ps(v, vzero), vqmax);
          const __m512i code = full ? _mm512_cvtps_epi32(v) : _mm512_maskz_cvtps_epi32(k, v);
          if (t * 64 < next_bytes) _mm_prefetch(wnext + t * 64, _MM_HINT_T0);
          blk = CB == 8 ? code : _mm512_or_si512(blk, _mm512_slli_epi32(code, (CB == 8 ? 0 : CB) * slot));
          if (--left == 0) {
            ++j;
            left = (int)cpg;
          }
        }
        uint8_t* dst = qrow + b * BB;
        if constexpr (CB == 3) {  // 16 dwords -> 16 x 3 bytes
          const __m512i packed = _mm512_permutexvar_epi8(q3_pack_idx(), blk);
          _mm256_storeu_si256((__m256i*)dst, _mm512_castsi512_si256(packed));
          _mm_storeu_si128((__m128i*)(dst + 32), _mm512_extracti32x4_epi32(packed, 2));
        } else {
          _mm_storeu_si128((__m128i*)dst, _mm512_cvtepi32_epi8(blk));
        }
      }
    }
    if (bad) st |= 1;
  }
  if (st) __atomic_fetch_or(status, st, __ATOMIC_RELAXED);
}

// Float value of the 16 codes of one slot of a block, from the block's zero-extended bytes v.
template <int CB>
inline __m512 decode(__m512i v, int slot, const __m512 lut) {
  if constexpr (CB == 8) {
    return _mm512_cvtepi32_ps(v);
  } else {  // vpermps reads the low 4 index bits; the lut ignores the next code's bits
    return _mm512_permutexvar_ps(slot ? _mm512_srli_epi32(v, CB * slot) : v, lut);
  }
}

template <int CB>
inline __m512 code_lut() {
  if constexpr (CB == 4) return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  if constexpr (CB == 3) return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
  return _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
}

// The block at p as 16 dword lanes (lane j = byte j, or 24-bit lane j for 3-bit codes).
// last: the row's last block (3-bit reads only its 48 bytes there, never past the tensor).
template <int CB>
inline __m512i load_block(const uint8_t* p, bool last) {
  if constexpr (CB == 3) {
    const __m512i raw = last ? _mm512_maskz_loadu_epi8((__mmask64)((1ULL << 48) - 1), p)
                             : _mm512_loadu_si512((const void*)p);
    return _mm512_maskz_permutexvar_epi8((__mmask64)0x7777777777777777ULL, q3_unpack_idx(), raw);
  } else {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  }
}


// y[b, r] for rows r0..r0+R-1 and N batch rows; xs: N x dpad prescaled inputs (zero padded);
// xsum: N x n_groups sums of xs over each group.  The group scale is factored out of the inner
// loop: y = sum_g S_g (sum_{i in g} c_i xs_i) + sum_g Z_g xsum_g.
// The tile's end: facc += B t (rank-r term), then out[b * R + r] = the sum of facc[r][b]'s lanes.
template <int R, int N>
TTQ_ALWAYS_INLINE void tile_finish(__m512 (&facc)[R][N], const float* bmat, const float* tv, int64_t rank, int64_t r0,
                                 float* out) {
  for (int64_t k0 = 0; k0 < rank; k0 += 16) {
    const __mmask16 k = tail_mask(rank - k0);
    for (int r = 0; r < R; ++r) {
      const __m512 bv = load16<float>(bmat + (r0 + r) * rank + k0, k);
      for (int b = 0; b < N; ++b) facc[r][b] = _mm512_fmadd_ps(bv, load16<float>(tv + b * rank + k0, k), facc[r][b]);
    }
  }
  for (int b = 0; b < N; ++b)
    for (int r = 0; r < R; ++r) out[b * R + r] = _mm512_reduce_add_ps(facc[r][b]);
}

template <typename ST, int CB, int R, int N>
inline void gemm_tile(const uint8_t* q, int64_t rb, const ST* sc, const ST* zr, int64_t n_groups, int64_t cpg,
                      int64_t n_chunks, const float* xs, int64_t dpad, const float* xsum, const float* bmat,
                      const float* tv, int64_t rank, int64_t r0, float* out /* N x R */) {
  constexpr int CPB = CB == 4 ? 2 : CB == 3 ? 8 : CB == 2 ? 4 : 1;
  constexpr int BB = CB == 3 ? 48 : 16;
  const __m512 lut = code_lut<CB>();
  __m512 acc[R][N], gacc[R][N];
  __m512 S[R];
  for (int r = 0; r < R; ++r) {
    S[r] = _mm512_setzero_ps();
    for (int b = 0; b < N; ++b) acc[r][b] = gacc[r][b] = _mm512_setzero_ps();
  }
  const int64_t n_blocks = (n_chunks + CPB - 1) / CPB;
  constexpr int64_t PF = 1024;  // software prefetch distance (bytes) in each row's code stream
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    __m512i v[R];
    const uint8_t* base = q + r0 * rb + blk * BB;
    if ((blk * BB) % 64 < BB)  // never faults; short rows reach the next rows (the next tile)
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(base + r * rb + PF), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) v[r] = load_block<CB>(base + r * rb, blk + 1 == n_blocks);
    for (int slot = 0; slot < CPB; ++slot) {
      const int64_t t = blk * CPB + slot;
      if (CPB > 1 && t >= n_chunks) break;
      if (t % cpg == 0) {  // a new group: fold the previous one's partial sums with its scale
        const int64_t gi = t / cpg;
        if (gi % 16 == 0)  // never faults; short rows reach the next rows' entries
          for (int r = 0; r < R; ++r) {
            _mm_prefetch((const char*)(sc + (r0 + r) * n_groups + gi + 32), _MM_HINT_T0);
            _mm_prefetch((const char*)(zr + (r0 + r) * n_groups + gi + 32), _MM_HINT_T0);
          }
        for (int r = 0; r < R; ++r) {
          for (int b = 0; b < N; ++b) {
            acc[r][b] = _mm512_fmadd_ps(gacc[r][b], S[r], acc[r][b]);
            gacc[r][b] = _mm512_setzero_ps();
          }
          S[r] = _mm512_set1_ps(load_param(sc, (r0 + r) * n_groups + gi));
        }
      }
      __m512 xv[N];
      for (int b = 0; b < N; ++b) xv[b] = _mm512_loadu_ps(xs + b * dpad + t * CH);
      for (int r = 0; r < R; ++r) {
        const __m512 c = decode<CB>(v[r], slot, lut);
        for (int b = 0; b < N; ++b) gacc[r][b] = _mm512_fmadd_ps(c, xv[b], gacc[r][b]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    // zero-point term: sum_g Z_g xsum_g, 16 groups at a time
    const ST* zrow = zr + (r0 + r) * n_groups;
    for (int b = 0; b < N; ++b) acc[r][b] = _mm512_fmadd_ps(gacc[r][b], S[r], acc[r][b]);
    for (int64_t g0 = 0; g0 < n_groups; g0 += 16) {
      const __mmask16 k = tail_mask(n_groups - g0);
      const __m512 z = load16<ST>(zrow + g0, k);
      for (int b = 0; b < N; ++b) acc[r][b] = _mm512_fmadd_ps(z, load16<float>(xsum + b * n_groups + g0, k), acc[r][b]);
    }
  }
  tile_finish(acc, bmat, tv, rank, r0, out);  // rank-r term B t, then one horizontal sum per output
}

template <typename ST, int CB, int N>
void gemm_rows_avx512(const uint8_t* q, const ST* sc, const ST* zr, int bits, int64_t g, int64_t n_groups,
                      int64_t d_in, const float* xs, int64_t dpad, const float* xsum, const float* bmat,
                      const float* tv, int64_t rank, int64_t r0, int64_t r1, float* y, int64_t d_out) {
  constexpr int R = N <= 2 ? 4 : 2;
  const int64_t rb = row_bytes(bits, d_in);
  const int64_t n_chunks = (d_in + CH - 1) / CH;
  const int64_t cpg = n_groups == 1 ? n_chunks : g / CH;
  float out[N * R];
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    gemm_tile<ST, CB, R, N>(q, rb, sc, zr, n_groups, cpg, n_chunks, xs, dpad, xsum, bmat, tv, rank, r, out);
    for (int b = 0; b < N; ++b)
      for (int i = 0; i < R; ++i) y[b * d_out + r + i] = out[b * R + i];
  }
  for (; r < r1; ++r) {
    float o1[N];
    gemm_tile<ST, CB, 1, N>(q, rb, sc, zr, n_groups, cpg, n_chunks, xs, dpad, xsum, bmat, tv, rank, r, o1);
    for (int b = 0; b < N; ++b) y[b * d_out + r] = o1[b];
  }
}
#endif  // TTQ_AVX512

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

#if TTQ_AVX512
template <typename ST, int CB>
void dequant_rows_avx512(const uint8_t* q, const ST* sc, const ST* zr, int bits, int64_t g, int64_t n_groups,
                         int64_t d_in, int64_t r0, int64_t r1, float* out) {
  constexpr int CPB = CB == 4 ? 2 : CB == 3 ? 8 : CB == 2 ? 4 : 1;
  constexpr int BB = CB == 3 ? 48 : 16;
  const __m512 lut = code_lut<CB>();
  const int64_t rb = row_bytes(bits, d_in);
  const int64_t n_chunks = (d_in + CH - 1) / CH;
  const int64_t cpg = n_groups == 1 ? n_chunks : g / CH;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* qrow = q + r * rb;
    float* orow = out + r * d_in;
    __m512 S = _mm512_setzero_ps(), Z = _mm512_setzero_ps();
    for (int64_t t = 0; t < n_chunks; ++t) {
      const int64_t blk = t / CPB;
      const int slot = (int)(t % CPB);
      if (t % cpg == 0) {
        S = _mm512_set1_ps(load_param(sc, r * n_groups + t / cpg));
        Z = _mm512_set1_ps(load_param(zr, r * n_groups + t / cpg));
      }
      const __m512i v = load_block<CB>(qrow + blk * BB, (blk + 1) * CPB >= n_chunks);
      // mul then add (not fma): bit-identical to the reference's codes * S + Z
      const __m512 wv = _mm512_add_ps(_mm512_mul_ps(decode<CB>(v, slot, lut), S), Z);
      _mm512_mask_storeu_ps(orow + t * CH, tail_mask(d_in - t * CH), wv);
    }
  }
}

#endif  // TTQ_AVX512

// ---------------------------------------------------------------- int8-activation layouts (AVX-512 VNNI)
// cpu_q4_i8 and cpu_q8_i8 read cpu_q4 / cpu_q8 codes with _mm512_dpbusd_epi32 (llama.cpp's Q4 x Q8 idea).
// Per call, x / s is rounded to int8 per block of 32 columns (sx = absmax / 127, xq = round(x / s / sx)).
// With w s = S q + Z per group and codes centred at c = 2^(bits-1):
//   y = sum_b S_g(b) [sx_b sum_{i in b} (q_i - c) xq_i + c xsum_b] + sum_b Z_g(b) xsum_b,
//   xsum_b = sum_{i in b} x_i / s_i (exact float),
// i.e. only the S (q - c) part sees the int8 rounding of x.  Group sizes: multiples of 32 or one group
// per row (block b uses group min(32 b / g, n_groups - 1)).  The two layouts share the activation
// rounding, the per-window S / Z / sx / xsum epilogue, the rank-r term and the op's setup; only the
// inner code-loading loop (q4i8_tile, q8i8_tile) differs.
#if TTQ_AVX512 && defined(__AVX512VNNI__)
#define TTQ_VNNI 1

struct I8Acts {
  int64_t nb = 0, nw = 0, nbp = 0;  // blocks of 32 columns, windows of 16 blocks, padded blocks (16 nw)
  std::vector<int8_t> xq;            // N x (nbp * 32) codes (span order for cpu_q4_i8, natural for cpu_q8_i8)
  std::vector<float> sx, e, xsum;    // N x nbp each; zero past the row
  std::vector<int32_t> gfirst, gidx; // per window: first group, 16 block -> group offsets
  bool perm = false;                 // gidx is not the identity (g > 32 or one group)
  std::vector<int32_t> cq;           // cpu_q8_i8 only: N x nbp, centre * sum of the block's xq
};

// Per window of 16 blocks: its first group and the 16 block -> group offsets (A.nb, A.nw set).
inline void i8_group_index(int64_t g, int64_t n_groups, I8Acts& A) {
  A.gfirst.assign(A.nw, 0);
  A.gidx.assign(A.nw * 16, 0);
  A.perm = false;
  for (int64_t w = 0; w < A.nw; ++w) {
    auto grp = [&](int64_t blk) { return std::min<int64_t>(blk * 32 / g, n_groups - 1); };
    A.gfirst[w] = (int32_t)grp(w * 16);
    for (int k = 0; k < 16; ++k) {
      A.gidx[w * 16 + k] = (int32_t)(grp(w * 16 + k) - A.gfirst[w]);
      if (A.gidx[w * 16 + k] != k && w * 16 + k < A.nb) A.perm = true;
    }
  }
}

// xs: N rows of d_in prescaled float inputs (row stride d_in); centre = 2^(bits-1).
// SpanOrder (cpu_q4_i8): xq stored per span of 4 blocks (128 columns) as 64 bytes "low" (columns 0..15
// of the 4 blocks) then 64 bytes "high" (columns 16..31), the order of the nibbles of 64 packed bytes, and
// the centre folded into e_b = c (xsum_b - sx_b sum xq).  Otherwise (cpu_q8_i8): byte c = column c (rows
// zero padded to windows of 512 columns), e_b = c xsum_b and cq_b = c sum xq, subtracted in integers.
template <bool SpanOrder>
inline void i8_quantize_acts(const float* xs, int64_t n, int64_t d_in, int64_t g, int64_t n_groups, int centre,
                             I8Acts& A) {
  A.nb = (d_in + 31) / 32;
  A.nw = (A.nb + 15) / 16;
  A.nbp = A.nw * 16;
  const int64_t nbp = A.nbp;
  A.xq.assign(n * nbp * 32, 0);
  A.sx.assign(n * nbp, 0.0f);
  A.e.assign(n * nbp, 0.0f);
  A.xsum.assign(n * nbp, 0.0f);
  if (!SpanOrder) A.cq.assign(n * nbp, 0);
  for (int64_t b = 0; b < n; ++b) {
    const float* xr = xs + b * d_in;
    int8_t* qr = A.xq.data() + b * nbp * 32;
    for (int64_t k = 0; k < A.nb; ++k) {
      const int64_t c = k * 32;
      const __m512 v0 = load16<float>(xr + c, tail_mask(d_in - c));
      const __m512 v1 = c + 16 < d_in ? load16<float>(xr + c + 16, tail_mask(d_in - c - 16)) : _mm512_setzero_ps();
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float sx = amax / 127.0f;
      __m512i q0 = _mm512_setzero_si512(), q1 = _mm512_setzero_si512();
      if (sx > 0.0f) {  // xq = round-half-even(x / sx), as torch.round(x / sx)
        const __m512 d = _mm512_set1_ps(sx);
        const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        q0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(v0, d), rnd));
        q1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(v1, d), rnd));
      }
      int8_t* dst = SpanOrder ? qr + (k / 4) * 128 + (k % 4) * 16 : qr + c;
      _mm_storeu_si128((__m128i*)dst, _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128((__m128i*)(dst + (SpanOrder ? 64 : 16)), _mm512_cvtsepi32_epi8(q1));
      const float xsum = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
      const int32_t qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      A.sx[b * nbp + k] = sx;
      A.xsum[b * nbp + k] = xsum;
      if (SpanOrder) {
        A.e[b * nbp + k] = (float)centre * (xsum - sx * (float)qsum);
      } else {
        A.e[b * nbp + k] = (float)centre * xsum;
        A.cq[b * nbp + k] = centre * qsum;
      }
    }
  }
  i8_group_index(g, n_groups, A);
}

// The 16 per-block values of a group parameter row (S or Z) for window w.
template <typename ST>
inline __m512 i8_params(const ST* row, int64_t n_groups, const I8Acts& A, int64_t w) {
  const int64_t g0 = A.gfirst[w];
  const __m512 v = load16<ST>(row + g0, tail_mask(n_groups - g0));
  return A.perm ? _mm512_permutexvar_ps(_mm512_loadu_si512((const void*)(A.gidx.data() + w * 16)), v) : v;
}

// lane j = a[2j] + a[2j+1] over the 32 lanes of (a, b)
inline __m512i i8_pair_add(__m512i a, __m512i b) {
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_add_epi32(_mm512_permutex2var_epi32(a, ev, b), _mm512_permutex2var_epi32(a, od, b));
}

// Software prefetch distances (measured, 1 thread): bytes ahead in each row's code stream, and groups
// ahead in its scale / zero streams (the hardware prefetcher alone left 4096 x 11008 2x slower).  2048
// bytes beat 512 / 1024 / 3072 / 4096 on 4096 x 11008 with float16 scale / zero (1.12 vs 1.19 ms at 1024).
constexpr int64_t I8_PF = 2048, I8_SPF = 64;

// Prefetch the scale / zero entries I8_SPF groups past window w's first group for the tile's R rows.
template <typename ST, int R>
TTQ_ALWAYS_INLINE void i8_prefetch_params(const ST* sc, const ST* zr, int64_t n_groups, const I8Acts& A, int64_t w,
                                          int64_t r0) {
  for (int r = 0; r < R; ++r) {  // never faults; with short rows it reaches the next rows' entries
    const int64_t o = (r0 + r) * n_groups + A.gfirst[w] + I8_SPF;
    _mm_prefetch((const char*)(sc + o), _MM_HINT_T0);
    _mm_prefetch((const char*)(zr + o), _MM_HINT_T0);
  }
}

// Window w's epilogue: dot[r][b] lane j = the integer dot product of block 16 w + j with its centring
// already applied (sum_i (q_i - c) xq_i, or sum_i q_i xq_i with the centre in e); adds
// S (dot sx + e) + Z xsum to facc for the tile's R rows (from r0) and N tokens (from t0).
template <typename ST, int R, int N>
TTQ_ALWAYS_INLINE void i8_window_accum(__m512 (&facc)[R][N], const __m512i (&dot)[R][N], const ST* sc, const ST* zr,
                                       int64_t n_groups, const I8Acts& A, int64_t t0, int64_t w, int64_t r0) {
  const int64_t nbp = A.nbp, o = t0 * nbp + w * 16;
  __m512 sxv[N], ev[N], xsv[N];
  for (int b = 0; b < N; ++b) {
    sxv[b] = _mm512_loadu_ps(A.sx.data() + o + b * nbp);
    ev[b] = _mm512_loadu_ps(A.e.data() + o + b * nbp);
    xsv[b] = _mm512_loadu_ps(A.xsum.data() + o + b * nbp);
  }
  for (int r = 0; r < R; ++r) {
    const __m512 S = i8_params(sc + (r0 + r) * n_groups, n_groups, A, w);
    const __m512 Z = i8_params(zr + (r0 + r) * n_groups, n_groups, A, w);
    for (int b = 0; b < N; ++b) {
      facc[r][b] = _mm512_fmadd_ps(S, _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][b]), sxv[b], ev[b]), facc[r][b]);
      facc[r][b] = _mm512_fmadd_ps(Z, xsv[b], facc[r][b]);
    }
  }
}

template <int R, int N>
TTQ_ALWAYS_INLINE void i8_zero(__m512 (&facc)[R][N]) {
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < N; ++b) facc[r][b] = _mm512_setzero_ps();
}

// cpu_q4_i8: y[b, r0 + r] for R rows and N tokens; out is N x R.  rb: bytes per row.  One 64-byte load
// covers a span of 4 blocks (low / high nibbles against the span's low / high int8 halves).
template <typename ST, int R, int N>
inline void q4i8_tile(const uint8_t* q, int64_t rb, const ST* sc, const ST* zr, int64_t n_groups, const I8Acts& A,
                      int64_t t0, const float* bmat, const float* tv, int64_t rank, int64_t r0, float* out) {
  const int64_t nbp = A.nbp, nb = A.nb;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const int8_t* xq = A.xq.data() + t0 * nbp * 32;  // tokens t0 .. t0 + N - 1
  __m512 facc[R][N];
  i8_zero(facc);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t w = 0; w < A.nw; ++w) {
    const bool full = (w + 1) * 16 <= nb;
    if (full) i8_prefetch_params<ST, R>(sc, zr, n_groups, A, w, r0);
    // spans of this window holding a column < d_in (4 but in the row's last window); the others add zero,
    // so their loads and products are skipped (d_in = 576 leaves 3 of the last window's 4 spans empty)
    const int64_t nsp = full ? 4 : (nb - w * 16 + 3) / 4;
    __m512i half[2][R][N];
    for (int h = 0; h < 2; ++h) {
      if (h * 2 >= nsp) {
        for (int r = 0; r < R; ++r)
          for (int b = 0; b < N; ++b) half[h][r][b] = zero;
        continue;
      }
      __m512i u[2][R][N];
      for (int k = 0; k < 2; ++k) {
        const int64_t sp = w * 4 + h * 2 + k, blk0 = sp * 4;  // span and its first block
        if (h * 2 + k >= nsp) {
          for (int r = 0; r < R; ++r)
            for (int b = 0; b < N; ++b) u[k][r][b] = zero;
          continue;
        }
        __m512i xl[N], xh[N];
        for (int b = 0; b < N; ++b) {
          xl[b] = _mm512_loadu_si512((const void*)(xq + b * nbp * 32 + sp * 128));
          xh[b] = _mm512_loadu_si512((const void*)(xq + b * nbp * 32 + sp * 128 + 64));
        }
        for (int r = 0; r < R; ++r) {
          const uint8_t* p = q + (r0 + r) * rb + blk0 * 16;
          __m512i v;
          if (full) {
            _mm_prefetch((const char*)(p + I8_PF), _MM_HINT_T0);  // never faults; short rows reach the next rows
            v = _mm512_loadu_si512((const void*)p);
          } else {  // the row's last window: read only the span's bytes within the row
            const int64_t nbytes = std::min<int64_t>(4, nb - blk0) * 16;
            v = _mm512_maskz_loadu_epi8(nbytes >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << nbytes) - 1), p);
          }
          const __m512i lo = _mm512_and_si512(v, m4);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
          for (int b = 0; b < N; ++b)
            u[k][r][b] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl[b]), hi, xh[b]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < N; ++b) half[h][r][b] = i8_pair_add(u[0][r][b], u[1][r][b]);
    }
    __m512i dot[R][N];  // lane j = block 16 w + j: sum q xq (the centre 8 is in e)
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < N; ++b) dot[r][b] = i8_pair_add(half[0][r][b], half[1][r][b]);
    i8_window_accum<ST, R, N>(facc, dot, sc, zr, n_groups, A, t0, w, r0);
  }
  tile_finish(facc, bmat, tv, rank, r0, out);
}

// cpu_q8_i8: y[b, r0 + r] for R rows and N tokens; out is N x R.  rb: bytes per row (16 ceil(d_in / 16)).
// One 64-byte load of a row's codes covers 2 blocks; dpbusd gives 16 dword lanes of 4 columns each and a
// pair-add tree over the 8 loads of a window turns them into the 16 block dot products.
template <typename ST, int R, int N>
inline void q8i8_tile(const uint8_t* q, int64_t rb, const ST* sc, const ST* zr, int64_t n_groups, const I8Acts& A,
                      int64_t t0, const float* bmat, const float* tv, int64_t rank, int64_t r0, float* out) {
  const int64_t nbp = A.nbp;
  const int64_t nch = (rb + 63) / 64;  // 64-byte loads per row (the last may be partial)
  const int8_t* xq = A.xq.data() + t0 * nbp * 32;  // tokens t0 .. t0 + N - 1
  const int32_t* cqp = A.cq.data() + t0 * nbp;
  const __m512i zero = _mm512_setzero_si512();
  __m512 facc[R][N];
  i8_zero(facc);
  const uint8_t* qt = q + r0 * rb;  // the tile's R rows are contiguous
  for (int64_t w = 0; w < A.nw; ++w) {
    const int64_t c0 = w * 8;
    const int nc = (int)std::min<int64_t>(8, nch - c0);  // >= 1: every window holds a column < d_in
    i8_prefetch_params<ST, R>(sc, zr, n_groups, A, w, r0);
    // pair-add tree over the window's (up to) 8 loads: p = level 1 (2 loads), h = level 2 (4 loads)
    __m512i h[2][R][N];
    for (int hh = 0; hh < 2; ++hh) {
      __m512i p[2][R][N];
      for (int k = 0; k < 2; ++k) {
        const int c = hh * 4 + k * 2;  // first of the pair's two loads within the window
        if (c >= nc) {
          for (int r = 0; r < R; ++r)
            for (int b = 0; b < N; ++b) p[k][r][b] = zero;
          continue;
        }
        __m512i u[2][R][N];
        for (int m = 0; m < 2; ++m) {
          const int64_t kc = c0 + c + m;  // load index within the row
          if (c + m >= nc) {
            for (int r = 0; r < R; ++r)
              for (int b = 0; b < N; ++b) u[m][r][b] = zero;
            continue;
          }
          __m512i xv[N];
          for (int b = 0; b < N; ++b) xv[b] = _mm512_loadu_si512((const void*)(xq + b * nbp * 32 + kc * 64));
          const bool full = (kc + 1) * 64 <= rb;
          for (int r = 0; r < R; ++r) {
            const uint8_t* pr = qt + r * rb + kc * 64;
            __m512i v;
            if (full) {
              _mm_prefetch((const char*)(pr + I8_PF), _MM_HINT_T0);  // never faults; rows are contiguous
              v = _mm512_loadu_si512((const void*)pr);
            } else {  // the row's last load: read only its bytes
              v = _mm512_maskz_loadu_epi8((((__mmask64)1) << (rb - kc * 64)) - 1, pr);
            }
            for (int b = 0; b < N; ++b) u[m][r][b] = _mm512_dpbusd_epi32(zero, v, xv[b]);
          }
        }
        for (int r = 0; r < R; ++r)
          for (int b = 0; b < N; ++b) p[k][r][b] = i8_pair_add(u[0][r][b], u[1][r][b]);
      }
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < N; ++b)
          h[hh][r][b] = hh * 4 < nc ? i8_pair_add(p[0][r][b], p[1][r][b]) : zero;
    }
    __m512i dot[R][N];  // lane j = block 16 w + j: sum (q - c) xq, exact in int32
    for (int b = 0; b < N; ++b) {
      const __m512i cqv = _mm512_loadu_si512((const void*)(cqp + b * nbp + w * 16));
      for (int r = 0; r < R; ++r) dot[r][b] = _mm512_sub_epi32(i8_pair_add(h[0][r][b], h[1][r][b]), cqv);
    }
    i8_window_accum<ST, R, N>(facc, dot, sc, zr, n_groups, A, t0, w, r0);
  }
  tile_finish(facc, bmat, tv, rank, r0, out);
}

// y[t0 + b, r] for rows r0 .. r1 - 1 and N tokens with CB-bit codes (4: cpu_q4_i8, 8: cpu_q8_i8).  One row
// per tile (R = 1): with 1 thread and cold weights, more rows per tile (more concurrent code / scale /
// zero streams) measured slower: cpu_q4_i8 R = 2 / 4 took 1.4x / 1.8x the time on 4096 x 4096 and
// 4096 x 11008; cpu_q8_i8 R = 2 / 4 took 1.5x / 1.6x on 49152 x 576 and 1.4x / 1.7x on 4096 x 4096.
template <int CB, typename ST, int N>
void i8_rows(const uint8_t* q, const ST* sc, const ST* zr, int64_t n_groups, int64_t d_in, const I8Acts& A,
             int64_t t0, const float* bmat, const float* tv, int64_t rank, int64_t r0, int64_t r1, float* y, int64_t d_out) {
  const int64_t rb = row_bytes(CB, d_in);
  for (int64_t r = r0; r < r1; ++r) {
    float o1[N];
    if constexpr (CB == 4)
      q4i8_tile<ST, 1, N>(q, rb, sc, zr, n_groups, A, t0, bmat, tv, rank, r, o1);
    else
      q8i8_tile<ST, 1, N>(q, rb, sc, zr, n_groups, A, t0, bmat, tv, rank, r, o1);
    for (int b = 0; b < N; ++b) y[b * d_out + r] = o1[b];
  }
}
#else
#define TTQ_VNNI 0
#endif  // TTQ_AVX512 && __AVX512VNNI__

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

// ---------------------------------------------------------------- AVX2 + FMA packed GEMM (no AVX-512)
// CPUs without AVX-512 (most desktop / laptop x86) get this instead of the portable loop, which the
// compiler vectorizes poorly (measured ~5x slower than fp32 F.linear at 4096 x 4096).  Same algorithm
// as the portable gemm_rows_scalar: per group, S (codes . xs) + Z xsum, codes decoded to float32.
// Compute-bound (the uint8 -> float conversions); software prefetch as in the AVX-512 path measured no
// gain here.
#if !TTQ_AVX512 && defined(__AVX2__) && defined(__FMA__)
#define TTQ_AVX2 1
// One block of CB-bit codes; codes(slot) gives the 16 codes of chunk `slot` as two 8-float vectors.
template <int CB>
struct Avx2Block {
  __m128i v;       // CB 2 / 4 / 8: the block's 16 bytes
  __m256i l0, l1;  // CB 3: the 24-bit lanes 0..7 and 8..15
  inline void load(const uint8_t* p) {
    if constexpr (CB == 3) {  // lane j = bytes 3j..3j+2; every load stays inside the 48-byte block
      const __m256i i0 = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                          0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
      const __m256i i1 = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                          4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1);
      auto two = [&](int a, int b) {
        return _mm256_set_m128i(_mm_loadu_si128((const __m128i*)(p + b)), _mm_loadu_si128((const __m128i*)(p + a)));
      };
      l0 = _mm256_shuffle_epi8(two(0, 12), i0);   // lanes 0..3 from bytes 0..11, 4..7 from 12..23
      l1 = _mm256_shuffle_epi8(two(24, 32), i1);  // lanes 8..11 from bytes 24..35, 12..15 from 36..47
    } else {
      v = _mm_loadu_si128((const __m128i*)p);
    }
  }
  inline void codes(int slot, __m256& c0, __m256& c1) const {
    if constexpr (CB == 3) {
      const __m128i sh = _mm_cvtsi32_si128(3 * slot);
      const __m256i m = _mm256_set1_epi32(7);
      c0 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(l0, sh), m));
      c1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(l1, sh), m));
    } else {
      __m128i b = v;
      if constexpr (CB == 4) b = _mm_and_si128(_mm_srl_epi16(v, _mm_cvtsi32_si128(4 * slot)), _mm_set1_epi8(15));
      if constexpr (CB == 2) b = _mm_and_si128(_mm_srl_epi16(v, _mm_cvtsi32_si128(2 * slot)), _mm_set1_epi8(3));
      c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
      c1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
    }
  }
};

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// y[b, r] for N tokens and rows r0..r1-1 (xs zero padded to dpad, xsum per group, as gemm_rows_scalar).
template <typename ST, int CB, int N>
void gemm_rows_avx2(const uint8_t* q, const ST* sc, const ST* zr, int bits, int64_t g, int64_t n_groups,
                    int64_t d_in, const float* xs, int64_t dpad, const float* xsum, int64_t r0, int64_t r1,
                    float* y, int64_t d_out) {
  constexpr int CPB = CB == 4 ? 2 : CB == 3 ? 8 : CB == 2 ? 4 : 1;
  constexpr int BB = CB == 3 ? 48 : 16;
  const int64_t rb = row_bytes(bits, d_in);
  const int64_t n_chunks = (d_in + CH - 1) / CH;
  const int64_t cpg = n_groups == 1 ? n_chunks : g / CH;  // chunks per group
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* qrow = q + r * rb;
    __m256 acc[N], p0[N], p1[N];
    float zacc[N];
    for (int b = 0; b < N; ++b) {
      acc[b] = p0[b] = p1[b] = _mm256_setzero_ps();
      zacc[b] = 0.0f;
    }
    Avx2Block<CB> blk;
    for (int64_t gi = 0; gi < n_groups; ++gi) {  // nested loops: no integer division per chunk
      const int64_t t0 = gi * cpg, t1 = std::min(n_chunks, t0 + cpg);
      for (int64_t t = t0; t < t1; ++t) {
        const int slot = (int)(t % CPB);  // CPB: a constant power of two
        if (slot == 0 || t == t0) blk.load(qrow + (t / CPB) * BB);
        __m256 c0, c1;
        blk.codes(slot, c0, c1);
        for (int b = 0; b < N; ++b) {
          const float* xb = xs + b * dpad + t * CH;
          p0[b] = _mm256_fmadd_ps(c0, _mm256_loadu_ps(xb), p0[b]);
          p1[b] = _mm256_fmadd_ps(c1, _mm256_loadu_ps(xb + 8), p1[b]);
        }
      }
      const __m256 S = _mm256_set1_ps(load_param(sc, r * n_groups + gi));
      const float Z = load_param(zr, r * n_groups + gi);
      for (int b = 0; b < N; ++b) {
        acc[b] = _mm256_fmadd_ps(S, _mm256_add_ps(p0[b], p1[b]), acc[b]);
        zacc[b] += Z * xsum[b * n_groups + gi];
        p0[b] = p1[b] = _mm256_setzero_ps();
      }
    }
    for (int b = 0; b < N; ++b) y[b * d_out + r] = hsum8(acc[b]) + zacc[b];
  }
}
#else
#define TTQ_AVX2 0
#endif  // !TTQ_AVX512 && __AVX2__ && __FMA__

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
  at::Tensor y = at::empty({n, d_out}, x.options().dtype(at::kFloat));
  const bool half_params = sc.scalar_type() == at::kHalf;
  const float* xsp = xs.data();
  const float* xsump = xsum.data();
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* bp = rank ? bmat.data_ptr<float>() : nullptr;
  const float* biasp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  // split rows across threads only when each part has >= ~512K weights (thread wake-up costs more below)
  const int64_t grain = std::max<int64_t>(16, ((int64_t(1) << 19) / std::max<int64_t>(d_in, 1) + 3) / 4 * 4);
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
        dispatch_cb((int)bits, [&](auto cb) {
          constexpr int CB = decltype(cb)::value;
          switch (nb) {
            case 1: gemm_rows_avx512<ST, CB, 1>(qp, scp, zrp, (int)bits, g, n_groups, d_in, xb, dpad, xsb, bp, tb, rank, r0, r1, yb, d_out); break;
            case 2: gemm_rows_avx512<ST, CB, 2>(qp, scp, zrp, (int)bits, g, n_groups, d_in, xb, dpad, xsb, bp, tb, rank, r0, r1, yb, d_out); break;
            case 3: gemm_rows_avx512<ST, CB, 3>(qp, scp, zrp, (int)bits, g, n_groups, d_in, xb, dpad, xsb, bp, tb, rank, r0, r1, yb, d_out); break;
            default: gemm_rows_avx512<ST, CB, 4>(qp, scp, zrp, (int)bits, g, n_groups, d_in, xb, dpad, xsb, bp, tb, rank, r0, r1, yb, d_out); break;
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

int64_t has_avx512() { return TTQ_AVX512; }
#if TTQ_AVX2
// cpu_q4_i8 / cpu_q8_i8 on AVX2 (no AVX-512 VNNI): the same int8-activation products as the VNNI tiles, one 32-column block
// at a time as llama.cpp's q4 x q8 dot: the block's 16 code bytes expand to 32 unsigned nibbles (low nibbles =
// columns 0..15, high = 16..31), _mm256_maddubs_epi16 with the block's int8 activations (|15 x 127 x 2| fits
// int16) and _mm256_madd_epi16 give 8 int32 partial sums, scaled by S_g sx_b in float; the S e_b + Z xsum_b
// terms are scalar.  Activations: natural column order, e_b = 8 (xsum_b - sx_b sum xq) as in the span case.
#define TTQ_I8_AVX2 1
struct I8ActsAvx2 {
  int64_t nb = 0;
  std::vector<int8_t> xq;         // N x (nb * 32), zero past d_in
  std::vector<float> sx, e, xsum; // N x nb
};

// centre c: 4-bit codes are multiplied unsigned, so e_b = c (xsum_b - sx_b sum xq); 5..8-bit codes are
// centred before the product (q - c fits int8), so e_b = c xsum_b.
inline void i8_quantize_acts_avx2(const float* xs, int64_t n, int64_t d_in, int centre, bool centred_codes,
                                  I8ActsAvx2& A) {
  A.nb = (d_in + 31) / 32;
  A.xq.assign(n * A.nb * 32, 0);
  A.sx.assign(n * A.nb, 0.0f);
  A.e.assign(n * A.nb, 0.0f);
  A.xsum.assign(n * A.nb, 0.0f);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t k = 0; k < A.nb; ++k) {
      const float* xr = xs + b * d_in + k * 32;
      const int64_t m = std::min<int64_t>(32, d_in - k * 32);
      float amax = 0.0f, xsum = 0.0f;
      for (int64_t i = 0; i < m; ++i) {
        amax = std::max(amax, std::fabs(xr[i]));
        xsum += xr[i];
      }
      const float sx = amax / 127.0f;
      int32_t qsum = 0;
      int8_t* qr = A.xq.data() + (b * A.nb + k) * 32;
      if (sx > 0.0f)
        for (int64_t i = 0; i < m; ++i) {  // round half to even, as torch.round(x / sx)
          const int32_t v = (int32_t)std::nearbyint(xr[i] / sx);
          qr[i] = (int8_t)std::max(-127, std::min(127, v));
          qsum += qr[i];
        }
      A.sx[b * A.nb + k] = sx;
      A.xsum[b * A.nb + k] = xsum;
      A.e[b * A.nb + k] = (float)centre * (centred_codes ? xsum : xsum - sx * (float)qsum);
    }
}

// y[t, r] for rows r0 .. r1 - 1 and tokens 0 .. n - 1 (bias added by the caller); cpg: blocks per group.
// The per-block float factors of one row and token: wk[k] = S_g(k) sx_k, and the row's S e + Z xsum total.
template <typename ST>
inline float i8_avx2_factors(const ST* srow, const ST* zrow, int64_t n_groups, int64_t bpg, const float* sx,
                               const float* e, const float* xsum, int64_t nb, float* wk) {
  int64_t k = 0;
  float cz = 0.0f;
  if (bpg == 1) {  // g = 32: one group per block, 8 blocks per vector
    __m256 czv = _mm256_setzero_ps();
    for (; k + 8 <= nb && k + 8 <= n_groups; k += 8) {
      __m256 S, Z;
      if constexpr (sizeof(ST) == 2) {
        S = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(srow + k)));
        Z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(zrow + k)));
      } else {
        S = _mm256_loadu_ps((const float*)(srow + k));
        Z = _mm256_loadu_ps((const float*)(zrow + k));
      }
      _mm256_storeu_ps(wk + k, _mm256_mul_ps(S, _mm256_loadu_ps(sx + k)));
      czv = _mm256_fmadd_ps(S, _mm256_loadu_ps(e + k), czv);
      czv = _mm256_fmadd_ps(Z, _mm256_loadu_ps(xsum + k), czv);
    }
    cz = hsum8(czv);
  }
  for (; k < nb; ++k) {
    const int64_t gi = std::min<int64_t>(k / bpg, n_groups - 1);
    const float S = load_param(srow, gi), Z = load_param(zrow, gi);
    wk[k] = S * sx[k];
    cz += S * e[k] + Z * xsum[k];
  }
  return cz;
}

// y[t, r] for rows r0 .. r1 - 1 and tokens 0 .. n - 1 (bias added by the caller); bpg: blocks per group.
// CB = 4: cpu_q4 rows (16 bytes per 32-column block, nibbles unsigned); CB = 8: cpu_q8 rows (one byte per
// column, rows padded to 16 columns), codes centred to q - c in int8 and multiplied as llama.cpp's q8 x q8
// (maddubs of |q - c| with sign(q - c) xq: |128 x 127 x 2| fits int16).
template <int CB, typename ST>
void i8_rows_avx2(const uint8_t* q, const ST* sc, const ST* zr, int64_t n_groups, int64_t bpg, const I8ActsAvx2& A,
                  int64_t n, int centre, const float* bmat, const float* tv, int64_t rank, int64_t r0, int64_t r1,
                  float* y, int64_t d_out, int64_t rb) {
  const int64_t nb = A.nb;
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1), cv = _mm256_set1_epi8((char)centre);
  std::vector<float> wk(nb);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* qr = q + r * rb;
    for (int64_t t = 0; t < n; ++t) {
      const int8_t* xq = A.xq.data() + t * nb * 32;
      const float cz = i8_avx2_factors(sc + r * n_groups, zr + r * n_groups, n_groups, bpg, A.sx.data() + t * nb,
                                         A.e.data() + t * nb, A.xsum.data() + t * nb, nb, wk.data());
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      int64_t k = 0;
      auto block = [&](int64_t kk, __m256& acc) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + kk * 32));
        __m256i p16;
        if constexpr (CB == 4) {
          const __m128i c = _mm_loadu_si128((const __m128i*)(qr + kk * 16));
          const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(c, 4), m4), _mm_and_si128(c, m4));
          p16 = _mm256_maddubs_epi16(codes, xv);
        } else {
          const __m256i c = kk * 32 + 32 <= rb  // the row's last block may hold 16 columns: read only those
              ? _mm256_loadu_si256((const __m256i*)(qr + kk * 32))
              : _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128((const __m128i*)(qr + kk * 32)), 0);
          const __m256i a = _mm256_sub_epi8(c, cv);  // q - c in int8 (zero-padded columns meet xq = 0)
          p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(xv, a));
        }
        const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        acc = _mm256_fmadd_ps(d, _mm256_broadcast_ss(wk.data() + kk), acc);
      };
      for (; k + 4 <= nb; k += 4) {
        if (t == 0) _mm_prefetch((const char*)(qr + k * CB * 4 + 1024), _MM_HINT_T0);  // never faults
        block(k, acc0);
        block(k + 1, acc1);
        block(k + 2, acc0);
        block(k + 3, acc1);
      }
      for (; k < nb; ++k) block(k, acc0);
      float v = hsum8(_mm256_add_ps(acc0, acc1)) + cz;
      for (int64_t j = 0; j < rank; ++j) v += bmat[r * rank + j] * tv[t * rank + j];
      y[t * d_out + r] = v;
    }
  }
}

template <int CB>
at::Tensor i8_avx2_mm(const char* op, const at::Tensor& x_, const c10::optional<at::Tensor>& s_, const at::Tensor& q,
                      const at::Tensor& sc, const at::Tensor& zr, int64_t bits, int64_t g, int64_t d_out, int64_t d_in,
                      const c10::optional<at::Tensor>& bias_, const c10::optional<at::Tensor>& b_,
                      const c10::optional<at::Tensor>& a_) {
  TORCH_CHECK(CB == 4 || (bits >= 5 && bits <= 8), "ttq_cpu.", op, ": bits must be in 5..8 (the cpu_q8 layout), got ",
              bits);
  const int64_t n_groups = check_i8_args(op, CB, x_, q, sc, zr, g, d_out, d_in);
  const int64_t n = x_.size(0);
  const at::Tensor xf = x_.to(at::kFloat).contiguous();
  const at::Tensor xs = s_.has_value() ? (xf / s_->to(at::kFloat)).contiguous() : xf;
  const int64_t rank = (b_.has_value() && a_.has_value()) ? b_->size(1) : 0;
  at::Tensor bmat = rank ? b_->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor tv = rank ? at::matmul(xf, a_->to(at::kFloat).t()).contiguous() : at::Tensor();  // (n, r) = A x
  TORCH_CHECK(!rank || (bmat.size(0) == d_out && a_->size(0) == rank && a_->size(1) == d_in),
              "ttq_cpu.", op, ": low-rank factors must be (d_out, r) and (r, d_in)");
  const int centre = CB == 4 ? 8 : 1 << (bits - 1);
  I8ActsAvx2 acts;
  i8_quantize_acts_avx2(xs.data_ptr<float>(), n, d_in, centre, CB == 8, acts);
  at::Tensor y = at::empty({n, d_out}, xf.options());
  float* yp = y.data_ptr<float>();
  const int64_t bpg = g >= d_in ? acts.nb : g / 32;
  const float* bp = rank ? bmat.data_ptr<float>() : nullptr;
  const float* tp = rank ? tv.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(16, (int64_t(1) << 19) / std::max<int64_t>(d_in, 1));
  auto run = [&](auto st_tag) {
    using ST = decltype(st_tag);
    const ST* scp = reinterpret_cast<const ST*>(sc.data_ptr());
    const ST* zrp = reinterpret_cast<const ST*>(zr.data_ptr());
    at::parallel_for(0, d_out, grain, [&](int64_t r0, int64_t r1) {
      i8_rows_avx2<CB, ST>(q.data_ptr<uint8_t>(), scp, zrp, n_groups, bpg, acts, n, centre, bp, tp, rank, r0, r1, yp,
                           d_out, row_bytes(CB, d_in));
    });
  };
  if (sc.scalar_type() == at::kHalf) run(uint16_t{}); else run(float{});
  if (bias_.has_value()) y.add_(bias_->to(at::kFloat));
  return x_.scalar_type() == at::kFloat ? y : y.to(x_.scalar_type());
}
#else
#define TTQ_I8_AVX2 0
#endif  // TTQ_AVX2

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
  const int64_t grain = std::max<int64_t>(16, ((int64_t(1) << 19) / std::max<int64_t>(d_in, 1) + 3) / 4 * 4);
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
  m.def("has_avx512() -> int");
  m.def("has_avx2_gemm() -> int");
  m.def("packed_mm_q4i8(Tensor x, Tensor? s, Tensor qweight, Tensor scale, Tensor zero, int group, int d_out,"
        " int d_in, Tensor? bias, Tensor? b, Tensor? a) -> Tensor");
  m.def("packed_mm_q8i8(Tensor x, Tensor? s, Tensor qweight, Tensor scale, Tensor zero, int bits, int group,"
        " int d_out, int d_in, Tensor? bias, Tensor? b, Tensor? a) -> Tensor");
  m.def("has_vnni() -> int");
  m.def("has_i8() -> int");
}

TORCH_LIBRARY_IMPL(ttq_cpu, CPU, m) {
  m.impl("quant_pack", &quant_pack);
  m.impl("quant_pack_out", &quant_pack_out);
  m.impl("packed_mm", &packed_mm);
  m.impl("dequant", &dequant);
  m.impl("packed_mm_q4i8", &packed_mm_q4i8);
  m.impl("packed_mm_q8i8", &packed_mm_q8i8);
}

TORCH_LIBRARY_IMPL(ttq_cpu, CompositeExplicitAutograd, m) {
  m.impl("has_avx512", &has_avx512);
  m.impl("has_avx2_gemm", &has_avx2_gemm);
  m.impl("has_vnni", &has_vnni);
  m.impl("has_i8", &has_i8);
}
