"""The CPU block-sparse product of this project: C++ built on first use, with one warning and ``None`` without it.

Built like :mod:`sapp_lightning.fused` (``torch.utils.cpp_extension.load_inline``, once per machine and torch
version, then cached; about 40 s). Two products over a packed matrix (:class:`~.matrix.BlockSparseMatrix`: the
kernel matrix's nonzero blocks, block column by block column, each block ``r x cp`` row-major, ``cp`` the block's
columns rounded up to 8):

* ``linear(x, ...)``: ``y = x @ K + bias`` for ``x`` of ``M x K`` rows;
* ``conv(x, ...)``: the same product for a convolution without an im2col copy: ``x`` is channels-last
  ``(B, H, W, C)`` and each block row of ``K`` (``r`` channels at one kernel tap, split where a block straddles two
  taps) reads the input pixels that tap sees, or zeros in the padding.

Each output tile is ``MR`` rows (up to 6) by 16 columns held in 12 AVX2 registers while every nonzero block of its
block column is added in (a block's row of 16 floats is two vector loads; each input value is broadcast once per
row). ``at::parallel_for`` splits the work into block-column ranges (one per thread where there are enough) times
row chunks (an x chunk stays in L2 while every block column of the range is applied to it). Where the rows of ``x``
are a multiple of 1 KiB apart (1024 inputs: 4 KiB), the six rows of a tile would share L1 sets; the linear product
then copies its chunk of rows 64 bytes further apart (1.2-1.6x faster than reading them in place, and than a k-major
repacking). docs/results.md section 3 has the measurements.

The same code is compiled twice: for AVX2 + FMA (chosen at run time where the CPU has both) and for the baseline
x86-64 (SSE2, GCC's vector extensions split each 8-float vector in two); the sums run in another order than
MKL's, so results equal dense ones within float32 rounding.
"""

from __future__ import annotations

import threading
import warnings
from types import ModuleType

_BODY = r"""
typedef float v8 __attribute__((vector_size(32)));
static inline v8 ld(const float* p) { v8 v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
static inline void st(float* p, v8 v) { __builtin_memcpy(p, &v, sizeof(v)); }

// acc[s][m][v] += a[m][k * AK] * b[k * ldb + 8 v ...] for k < len; k % KS picks s: independent FMA chains where
// MR * NV accumulators alone would leave the FMA units waiting on each other (1-3 rows).
template <int MR, int NV, int KS, int AK>
static inline __attribute__((always_inline)) void accumulate(v8 (&acc)[KS][MR][NV], const float* const (&a)[MR],
                                                             const float* b, int64_t ldb, int64_t len) {
  int64_t k = 0;
  for (; k + KS <= len; k += KS) {
#pragma GCC unroll 4
    for (int s = 0; s < KS; ++s) {
      v8 bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = ld(b + (k + s) * ldb + 8 * v);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const float x = a[m][(k + s) * AK];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[s][m][v] += x * bv[v];
      }
    }
  }
  for (; k < len; ++k) {
    v8 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = ld(b + k * ldb + 8 * v);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const float x = a[m][k * AK];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[0][m][v] += x * bv[v];
    }
  }
}

template <int MR, int NV, int KS>
static inline __attribute__((always_inline)) void zero(v8 (&acc)[KS][MR][NV]) {
  for (int s = 0; s < KS; ++s)
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) acc[s][m][v] = v8{};
}

// y[m][j] = sum_s acc[s][m][j] + bias[j] for the tile's `width` valid columns
template <int MR, int NV, int KS>
static inline __attribute__((always_inline)) void store(v8 (&acc)[KS][MR][NV], const float* bias, float* y,
                                                        int64_t ldy, int64_t width) {
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    v8 out[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      out[v] = acc[0][m][v];
      for (int s = 1; s < KS; ++s) out[v] += acc[s][m][v];
    }
    float* row = y + m * ldy;
    if (width == 8 * NV) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) st(row + 8 * v, bias ? out[v] + ld(bias + 8 * v) : out[v]);
    } else {  // the matrix's last block column, or a block narrower than 8 * NV
      float tmp[8 * NV];
      for (int v = 0; v < NV; ++v) st(tmp + 8 * v, out[v]);
      for (int64_t j = 0; j < width; ++j) row[j] = bias ? tmp[j] + bias[j] : tmp[j];
    }
  }
}

// One tile of MR rows of x (ldx apart) against block column p (its columns sub .. sub + 8 NV).
template <int MR, int NV, int KS>
static void linear_tile(const Packed& w, const float* x, int64_t ldx, int64_t p, int64_t sub, const float* bias,
                        float* y, int64_t ldy, int64_t width) {
  v8 acc[KS][MR][NV];
  zero(acc);
  for (int32_t b = w.ptr[p]; b < w.ptr[p + 1]; ++b) {
    const int64_t k0 = int64_t(w.rows[b]) * w.r;
    const int64_t len = std::min(w.r, w.K - k0);
    const float* a[MR];
    for (int m = 0; m < MR; ++m) a[m] = x + m * ldx + k0;
    accumulate<MR, NV, KS, 1>(acc, a, w.vals + int64_t(b) * w.r * w.cp + sub, w.cp, len);
  }
  store(acc, bias, y, ldy, width);
}

template <int NV>
static void linear_rows(const Packed& w, const float* x, int64_t ldx, int64_t rows, int64_t p, int64_t sub,
                        const float* bias, float* y, int64_t ldy, int64_t width) {
  int64_t m = 0;
  for (; m + 6 <= rows; m += 6) linear_tile<6, NV, 1>(w, x + m * ldx, ldx, p, sub, bias, y + m * ldy, ldy, width);
  const float* xt = x + m * ldx;
  float* yt = y + m * ldy;
  switch (rows - m) {
    case 5: linear_tile<5, NV, 1>(w, xt, ldx, p, sub, bias, yt, ldy, width); break;
    case 4: linear_tile<4, NV, 1>(w, xt, ldx, p, sub, bias, yt, ldy, width); break;
    case 3: linear_tile<3, NV, 2>(w, xt, ldx, p, sub, bias, yt, ldy, width); break;
    case 2: linear_tile<2, NV, 2>(w, xt, ldx, p, sub, bias, yt, ldy, width); break;
    case 1: linear_tile<1, NV, 4>(w, xt, ldx, p, sub, bias, yt, ldy, width); break;
    default: break;
  }
}

// Rows m0 .. m1 of y against block columns p0 .. p1. Where rows of x are a multiple of 1 KiB apart, several rows
// of a tile would share an L1 set (4 KiB aliasing); buf then holds (m1 - m0) rows copied PAD floats apart.
constexpr int64_t PAD = 16;

static void linear_unit(const Packed& w, const float* x, const float* bias, float* y, int64_t p0, int64_t p1,
                        int64_t m0, int64_t m1, float* buf) {
  const int64_t rows = m1 - m0;
  const bool copy = rows > 6 && w.K % 256 == 0;
  const int64_t ldx = copy ? w.K + PAD : w.K;
  const float* xs = x + m0 * w.K;
  if (copy) {
    for (int64_t m = 0; m < rows; ++m) std::memcpy(buf + m * ldx, xs + m * w.K, w.K * sizeof(float));
    xs = buf;
  }
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t sub = 0; sub < w.cp; sub += 16) {
      const int64_t n0 = p * w.c + sub;
      const int64_t width = std::min<int64_t>({w.c - sub, w.N - n0, 16});
      if (width <= 0) break;
      const float* b = bias ? bias + n0 : nullptr;
      float* yt = y + m0 * w.N + n0;
      if (w.cp - sub >= 16) linear_rows<2>(w, xs, ldx, rows, p, sub, b, yt, w.N, width);
      else linear_rows<1>(w, xs, ldx, rows, p, sub, b, yt, w.N, width);
    }
  }
}

// Convolution: tile rows are output pixels; off[m * taps + t] is where pixel m's input for tap t starts in x
// (channels-last), or -1 in the padding.
template <int MR, int NV, int KS>
static void conv_tile(const Packed& w, const Conv& g, const float* x, const int64_t* off, const float* zeros,
                      int64_t p, int64_t sub, const float* bias, float* y, int64_t ldy, int64_t width) {
  v8 acc[KS][MR][NV];
  zero(acc);
  const int64_t taps = g.kh * g.kw;
  for (int32_t b = w.ptr[p]; b < w.ptr[p + 1]; ++b) {
    const int64_t k0 = int64_t(w.rows[b]) * w.r;
    const int64_t len = std::min(w.r, w.K - k0);
    const float* vb = w.vals + int64_t(b) * w.r * w.cp + sub;
    for (int64_t k = 0; k < len;) {  // one piece per kernel tap the block covers (one where r divides C)
      const int64_t tap = (k0 + k) / g.C, ch = (k0 + k) - tap * g.C;
      const int64_t piece = std::min(len - k, g.C - ch);
      const float* a[MR];
      for (int m = 0; m < MR; ++m) {
        const int64_t o = off[m * taps + tap];
        a[m] = o >= 0 ? x + o + ch : zeros;
      }
      accumulate<MR, NV, KS, 1>(acc, a, vb + k * w.cp, w.cp, piece);
      k += piece;
    }
  }
  store(acc, bias, y, ldy, width);
}

template <int NV>
static void conv_rows(const Packed& w, const Conv& g, const float* x, const int64_t* off, const float* zeros,
                      int64_t rows, int64_t p, int64_t sub, const float* bias, float* y, int64_t width) {
  const int64_t taps = g.kh * g.kw;
  int64_t m = 0;
  for (; m + 6 <= rows; m += 6)
    conv_tile<6, NV, 1>(w, g, x, off + m * taps, zeros, p, sub, bias, y + m * w.N, w.N, width);
  const int64_t* ot = off + m * taps;
  float* yt = y + m * w.N;
  switch (rows - m) {
    case 5: conv_tile<5, NV, 1>(w, g, x, ot, zeros, p, sub, bias, yt, w.N, width); break;
    case 4: conv_tile<4, NV, 1>(w, g, x, ot, zeros, p, sub, bias, yt, w.N, width); break;
    case 3: conv_tile<3, NV, 2>(w, g, x, ot, zeros, p, sub, bias, yt, w.N, width); break;
    case 2: conv_tile<2, NV, 2>(w, g, x, ot, zeros, p, sub, bias, yt, w.N, width); break;
    case 1: conv_tile<1, NV, 4>(w, g, x, ot, zeros, p, sub, bias, yt, w.N, width); break;
    default: break;
  }
}

static void conv_unit(const Packed& w, const Conv& g, const float* x, const float* bias, float* y, int64_t p0,
                      int64_t p1, int64_t m0, int64_t m1, int64_t* off, const float* zeros) {
  const int64_t taps = g.kh * g.kw, plane = g.OH * g.OW;
  for (int64_t q = m0; q < m1; ++q) {
    const int64_t n = q / plane, oy = (q % plane) / g.OW, ox = q % g.OW;
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t iy = oy * g.sh - g.ph + (t / g.kw) * g.dh, ix = ox * g.sw - g.pw + (t % g.kw) * g.dw;
      const bool inside = iy >= 0 && iy < g.H && ix >= 0 && ix < g.W;
      off[(q - m0) * taps + t] = inside ? ((n * g.H + iy) * g.W + ix) * g.C : -1;
    }
  }
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t sub = 0; sub < w.cp; sub += 16) {
      const int64_t n0 = p * w.c + sub;
      const int64_t width = std::min<int64_t>({w.c - sub, w.N - n0, 16});
      if (width <= 0) break;
      const float* b = bias ? bias + n0 : nullptr;
      float* yt = y + m0 * w.N + n0;
      if (w.cp - sub >= 16) conv_rows<2>(w, g, x, off, zeros, m1 - m0, p, sub, b, yt, width);
      else conv_rows<1>(w, g, x, off, zeros, m1 - m0, p, sub, b, yt, width);
    }
  }
}
"""

_SOURCE = (
    r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>

// The kernel matrix K (K x N, fan_in x fan_out) as block columns ("panels") of c columns: panel p holds blocks
// ptr[p] .. ptr[p + 1], block b sits at block row rows[b] and its r x cp values start at vals + b * r * cp.
struct Packed {
  const int32_t* ptr;
  const int32_t* rows;
  const float* vals;
  int64_t K, N, r, c, cp;
};

struct Conv {
  int64_t B, H, W, C, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw;
};

namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
"""
    + _BODY
    + r"""
#pragma GCC pop_options
}  // namespace avx2

namespace baseline {
"""
    + _BODY
    + r"""
}  // namespace baseline

static bool use_avx2(bool allowed) {
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return allowed && cpu;
}

static Packed packed(const at::Tensor& ptr, const at::Tensor& rows, const at::Tensor& vals,
                     const c10::optional<at::Tensor>& bias, int64_t K, int64_t N, int64_t r, int64_t c) {
  TORCH_CHECK(ptr.scalar_type() == at::kInt && rows.scalar_type() == at::kInt, "indices must be int32");
  TORCH_CHECK(ptr.is_contiguous() && rows.is_contiguous() && ptr.numel() == (N + c - 1) / c + 1, "bad block columns");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "bias: contiguous float32 of the output size");
  TORCH_CHECK(vals.scalar_type() == at::kFloat && vals.is_contiguous() && vals.dim() == 3,
              "values: float32 (nnz, r, cp)");
  TORCH_CHECK(vals.size(1) == r && vals.size(2) % 8 == 0 && vals.size(2) >= c, "values do not match the block size");
  return Packed{ptr.data_ptr<int32_t>(), rows.data_ptr<int32_t>(), vals.data_ptr<float>(), K, N, r, c, vals.size(2)};
}

// Work units: block-column ranges times chunks of rows (at most about 256 KiB of x each). Several threads split
// the block columns where the packed weights outweigh x (each thread then reads part of the weights and all of x),
// else the rows (all of the weights, part of x): the smaller share of memory traffic per thread. parallel_for hands
// each thread a contiguous run of units, column range first. A product under SERIAL multiply-adds runs on the
// calling thread: waking the pool costs more than it saves there, and far more on a loaded machine, where a
// descheduled thread holds up the whole region.
constexpr int64_t SERIAL = 1 << 20;

template <class F>
static void split(int64_t rows, int64_t row_floats, int64_t panels, int64_t weight_floats, const F& unit) {
  const int64_t threads = rows * weight_floats < SERIAL ? 1 : at::get_num_threads();
  const bool by_rows = rows * row_floats > weight_floats;
  const int64_t ranges = by_rows ? 1 : std::max<int64_t>(1, std::min<int64_t>(panels, threads));
  const int64_t most = std::max<int64_t>(6, std::min<int64_t>(240, 65536 / std::max<int64_t>(row_floats, 1)));
  // as many chunks as needed to stay under `most` rows, rounded up to a multiple of the threads sharing them
  const int64_t sharing = by_rows ? threads : 1;
  const int64_t chunks = std::max<int64_t>(1, (rows + most * sharing - 1) / (most * sharing) * sharing);
  const int64_t chunk = (rows + chunks - 1) / chunks;
  auto body = [&](int64_t u0, int64_t u1) {
    std::vector<char> scratch;  // one per thread: each unit grows it to what it needs
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t range = u / chunks, c = u % chunks;
      const int64_t m0 = std::min(rows, c * chunk), m1 = std::min(rows, c * chunk + chunk);
      if (m0 < m1) unit(range * panels / ranges, (range + 1) * panels / ranges, m0, m1, scratch);
    }
  };
  if (threads == 1) body(0, ranges * chunks);
  else at::parallel_for(0, ranges * chunks, 1, body);
}

at::Tensor linear(at::Tensor x, at::Tensor ptr, at::Tensor rows, at::Tensor vals, c10::optional<at::Tensor> bias,
                  int64_t K, int64_t N, int64_t r, int64_t c, bool vector) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == K,
              "x: contiguous float32 (M, ", K, ")");
  const int64_t M = x.size(0);
  const Packed w = packed(ptr, rows, vals, bias, K, N, r, c);
  auto y = at::empty({M, N}, x.options());
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  auto run = use_avx2(vector) ? avx2::linear_unit : baseline::linear_unit;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  split(M, K, ptr.size(0) - 1, vals.numel(),
        [&](int64_t p0, int64_t p1, int64_t m0, int64_t m1, std::vector<char>& scratch) {
          scratch.resize(std::max(scratch.size(), size_t((m1 - m0) * (K + 16) * sizeof(float))));
          run(w, xp, bp, yp, p0, p1, m0, m1, reinterpret_cast<float*>(scratch.data()));
        });
  return y;
}

// x: (B, H, W, C) contiguous (a channels-last NCHW tensor permuted); returns (B, OH, OW, N)
at::Tensor conv(at::Tensor x, at::Tensor ptr, at::Tensor rows, at::Tensor vals, c10::optional<at::Tensor> bias,
                int64_t K, int64_t N, int64_t r, int64_t c, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                std::vector<int64_t> padding, std::vector<int64_t> dilation, bool vector) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 4, "x: contiguous float32 (B, H, W, C)");
  Conv g{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, kernel[0], kernel[1], stride[0], stride[1],
         padding[0], padding[1], dilation[0], dilation[1]};
  g.OH = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "the input is smaller than the kernel");
  TORCH_CHECK(g.kh * g.kw * g.C == K, "x has ", g.C, " channels, the kernel matrix ", K, " rows");
  const Packed w = packed(ptr, rows, vals, bias, K, N, r, c);
  auto y = at::empty({g.B, g.OH, g.OW, N}, x.options());
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  auto run = use_avx2(vector) ? avx2::conv_unit : baseline::conv_unit;
  const std::vector<float> zeros(r, 0.f);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t taps = g.kh * g.kw;
  split(g.B * g.OH * g.OW, taps * g.C, ptr.size(0) - 1, vals.numel(),
        [&](int64_t p0, int64_t p1, int64_t m0, int64_t m1, std::vector<char>& scratch) {
          scratch.resize(std::max(scratch.size(), size_t((m1 - m0) * taps * sizeof(int64_t))));
          run(w, g, xp, bp, yp, p0, p1, m0, m1, reinterpret_cast<int64_t*>(scratch.data()), zeros.data());
        });
  return y;
}
"""
)

NAME = "sapp_lightning_block_sparse_v4"  # change it with the source: the build cache is keyed by this name
_lock = threading.Lock()
_state: dict[str, object] = {"module": None, "failed": False}


def extension() -> ModuleType | None:
    """The built extension, or ``None`` where it cannot be built (no compiler, no headers; warned once)."""
    if _state["module"] is None and not _state["failed"]:
        with _lock:
            if _state["module"] is None and not _state["failed"]:
                try:
                    from torch.utils.cpp_extension import load_inline

                    _state["module"] = load_inline(
                        NAME,
                        cpp_sources=_SOURCE,
                        functions=["linear", "conv"],
                        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=fast"],
                        extra_ldflags=["-fopenmp"],
                        with_cuda=False,  # a CPU kernel: no CUDA toolkit looked for (and no warning without one)
                    )
                except Exception as error:  # the torch.sparse products do the same math, slower
                    _state["failed"] = True
                    message = f"sapp_lightning: block-sparse CPU kernel unavailable, using torch.sparse ({error})"
                    warnings.warn(message, stacklevel=3)
    return _state["module"]  # type: ignore[return-value]


def available() -> bool:
    """Whether this project's CPU kernel is built (building it on first call)."""
    return extension() is not None
