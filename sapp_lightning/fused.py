"""Fused CPU kernels for the block parametrizations: one pass over the weight where eager PyTorch needs several.

On by default wherever they build; ``SAPP_FUSED_KERNELS=0`` or ``use_fused_kernels(False)`` turns them off. The
kernels are C++ built on first use with ``torch.utils.cpp_extension`` (about 30 s once per machine and torch
version, then cached; it needs a C++ compiler), and any failure to build falls back to the eager code with one
warning. Where they apply (CPU, float32, contiguous,
a first-order backward, outside ``torch.compile``), they replace:

* SA++'s backward (:class:`~sapp_lightning.blocks._ScaleBlocks`): the weight's gradient ``g * A`` and the block sums
  ``<g_b, W_b>`` in one pass instead of three tensor operations;
* PowerPropagation's forward and backward (``_NormScaledBlocks``): a block-row's norms, or ``<g_b, V_b>``, and its
  scaled values in one pass over that block-row while it is in cache.

Results equal the eager ones within float rounding (the sums run in another order). docs/results.md section 2 has
the measurements; ``tests/test_fused.py`` checks both paths against each other.

Every kernel sees a blocked tensor as 5-D ``(A0, a, A1, b, T)``, contiguous, with the blocks indexed by
``(A0, A1, T)`` and ``a x b`` entries each: a Linear view ``(gc, c, gr, r, 1)``, a Conv2d view
``(gc, c, cin / r, r, kh * kw)``, a padded kernel ``(gr, r, gc, c, 1)``.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// A blocked tensor is (A0, a, A1, b, T) contiguous: a "block-row" A0 is a rows of n = A1 * b * T floats, and
// element x of a row belongs to block (A0, x / (b * T), x % T).
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

struct Shape {
  int64_t A0, a, A1, b, T, n;
  explicit Shape(const at::Tensor& t)
      : A0(t.size(0)), a(t.size(1)), A1(t.size(2)), b(t.size(3)), T(t.size(4)), n(t.size(2) * t.size(3) * t.size(4)) {}
};

// row[x] = grid[j, x / (b T), x % T]
static void spread(const float* grid, const Shape& s, int64_t j, float* row) {
  for (int64_t i = 0; i < s.A1; ++i)
    for (int64_t k = 0; k < s.b; ++k)
      for (int64_t t = 0; t < s.T; ++t) row[(i * s.b + k) * s.T + t] = grid[(j * s.A1 + i) * s.T + t];
}

// out[j, i, t] = sum_k acc[(i b + k) T + t]
static void block_sums(const float* acc, const Shape& s, int64_t j, float* out) {
  for (int64_t i = 0; i < s.A1; ++i)
    for (int64_t t = 0; t < s.T; ++t) {
      float sum = 0.f;
      for (int64_t k = 0; k < s.b; ++k) sum += acc[(i * s.b + k) * s.T + t];
      out[(j * s.A1 + i) * s.T + t] = sum;
    }
}

CLONES static void mul_and_dot(const float* g, const float* w, const float* f, float* d, float* acc, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const float gx = g[x];
    d[x] = gx * f[x];
    acc[x] += gx * w[x];
  }
}

CLONES static void dot(const float* u, const float* v, float* acc, int64_t n) {
  for (int64_t x = 0; x < n; ++x) acc[x] += u[x] * v[x];
}

CLONES static void mul(const float* u, const float* f, float* d, int64_t n) {
  for (int64_t x = 0; x < n; ++x) d[x] = u[x] * f[x];
}

CLONES static void mul_add(const float* g, const float* f, const float* v, const float* e, float* d, int64_t n) {
  for (int64_t x = 0; x < n; ++x) d[x] = g[x] * f[x] + v[x] * e[x];
}

// SA++ backward: d = g * grid (spread), sums = block sums of g * w.
std::vector<at::Tensor> scale_backward(at::Tensor g, at::Tensor w, at::Tensor grid) {
  const Shape s(w);
  auto d = at::empty_like(w);
  auto sums = at::empty({s.A0, s.A1, s.T}, w.options());
  const float *gp = g.data_ptr<float>(), *wp = w.data_ptr<float>(), *fp = grid.data_ptr<float>();
  float *dp = d.data_ptr<float>(), *sp = sums.data_ptr<float>();
  at::parallel_for(0, s.A0, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> acc(s.n), row(s.n);
    for (int64_t j = j0; j < j1; ++j) {
      spread(fp, s, j, row.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c = 0; c < s.a; ++c) {
        const int64_t base = (j * s.a + c) * s.n;
        mul_and_dot(gp + base, wp + base, row.data(), dp + base, acc.data(), s.n);
      }
      block_sums(acc.data(), s, j, sp);
    }
  });
  return {d, sums};
}

// PowerPropagation forward: norms = ||v_b||, out = v * (norms * mask). A block-row is read twice, the second time
// from cache (it is a * n floats).
std::vector<at::Tensor> norm_scale_forward(at::Tensor v, at::Tensor mask) {
  const Shape s(v);
  auto out = at::empty_like(v);
  auto norms = at::empty({s.A0, s.A1, s.T}, v.options());
  const float *vp = v.data_ptr<float>(), *mp = mask.data_ptr<float>();
  float *op = out.data_ptr<float>(), *np = norms.data_ptr<float>();
  at::parallel_for(0, s.A0, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> acc(s.n), row(s.n), scale(s.A1 * s.T);
    for (int64_t j = j0; j < j1; ++j) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c = 0; c < s.a; ++c) dot(vp + (j * s.a + c) * s.n, vp + (j * s.a + c) * s.n, acc.data(), s.n);
      block_sums(acc.data(), s, j, np);
      for (int64_t q = 0; q < s.A1 * s.T; ++q) {
        const int64_t at = j * s.A1 * s.T + q;
        np[at] = std::sqrt(np[at]);
        scale[q] = np[at] * mp[at];
      }
      spread(scale.data(), s, 0, row.data());
      for (int64_t c = 0; c < s.a; ++c) {
        const int64_t base = (j * s.a + c) * s.n;
        mul(vp + base, row.data(), op + base, s.n);
      }
    }
  });
  return {out, norms};
}

// PowerPropagation backward: d = g * (n m) + v * (m <g_b, v_b> / n), 0 where n = 0.
at::Tensor norm_scale_backward(at::Tensor g, at::Tensor v, at::Tensor norms, at::Tensor mask) {
  const Shape s(v);
  auto d = at::empty_like(v);
  const float *gp = g.data_ptr<float>(), *vp = v.data_ptr<float>(), *np = norms.data_ptr<float>();
  const float* mp = mask.data_ptr<float>();
  float* dp = d.data_ptr<float>();
  at::parallel_for(0, s.A0, 1, [&](int64_t j0, int64_t j1) {
    const int64_t q_n = s.A1 * s.T;
    std::vector<float> acc(s.n), row(s.n), row2(s.n), inner(q_n), scale(q_n), coef(q_n);
    for (int64_t j = j0; j < j1; ++j) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c = 0; c < s.a; ++c) dot(gp + (j * s.a + c) * s.n, vp + (j * s.a + c) * s.n, acc.data(), s.n);
      block_sums(acc.data(), s, 0, inner.data());
      for (int64_t q = 0; q < q_n; ++q) {
        const float n = np[j * q_n + q], m = mp[j * q_n + q];
        scale[q] = n * m;
        coef[q] = n > 0.f ? inner[q] * m / n : 0.f;
      }
      spread(scale.data(), s, 0, row.data());
      spread(coef.data(), s, 0, row2.data());
      for (int64_t c = 0; c < s.a; ++c) {
        const int64_t base = (j * s.a + c) * s.n;
        mul_add(gp + base, row.data(), vp + base, row2.data(), dp + base, s.n);
      }
    }
  });
  return d;
}
"""

_lock = threading.Lock()
_state: dict[str, object] = {"enabled": os.environ.get("SAPP_FUSED_KERNELS", "1") != "0", "module": None}
log = logging.getLogger(__name__)


def use_fused_kernels(enabled: bool = True) -> bool:
    """Turn the fused CPU kernels on or off in this process; returns whether they are in use (building them on
    first use when ``enabled``).

    Example:
        >>> previous = fused_kernels_enabled()
        >>> use_fused_kernels(False), fused_kernels_enabled()
        (False, False)
        >>> _ = use_fused_kernels(previous)
    """
    _state["enabled"] = bool(enabled)
    return _module() is not None


def fused_kernels_enabled() -> bool:
    """Whether the fused kernels are asked for (``SAPP_FUSED_KERNELS`` unset or not ``0``, or
    :func:`use_fused_kernels`); they still fall back to eager PyTorch where they cannot be built."""
    return bool(_state["enabled"])


def _module():
    """The built extension, ``None`` when the kernels are off or cannot be built (warned once)."""
    if not _state["enabled"]:
        return None
    if _state["module"] is None:
        with _lock:
            if _state["module"] is None:
                try:
                    from torch.utils.cpp_extension import load_inline

                    # a first use in an environment compiles for about a minute: say so before it seems to hang
                    log.info(
                        "loading the fused CPU kernels (compiled on first use in an environment, about a minute; "
                        "SAPP_FUSED_KERNELS=0 skips them)"
                    )
                    _state["module"] = load_inline(
                        "sapp_lightning_fused_v1",
                        cpp_sources=_SOURCE,
                        functions=["scale_backward", "norm_scale_forward", "norm_scale_backward"],
                        extra_cflags=["-O3", "-fopenmp"],
                        extra_ldflags=["-fopenmp"],
                        with_cuda=False,  # CPU kernels: no CUDA toolkit looked for (and no warning without one)
                    )
                except Exception as error:  # no compiler, no headers, ...: the eager code does the same math
                    message = f"sapp_lightning: fused kernels unavailable, using eager PyTorch ({error})"
                    warnings.warn(message, stacklevel=3)
                    _state["enabled"] = False
                    return None
    return _state["module"]


def _as_5d(blocks: Tensor) -> Tensor | None:
    """``blocks`` (4-D, or a 6-D conv view) as ``(A0, a, A1, b, T)``, or ``None`` where the kernels do not apply."""
    if not (blocks.device.type == "cpu" and blocks.dtype == torch.float32 and blocks.is_contiguous()):
        return None
    if blocks.dim() == 4:
        return blocks.view(*blocks.shape, 1)
    if blocks.dim() == 6:
        return blocks.view(*blocks.shape[:4], blocks.shape[4] * blocks.shape[5])
    return None


def _grid_3d(grid: Tensor, blocks5: Tensor) -> Tensor:
    """A per-block grid laid out to broadcast over the blocked tensor (size 1 on its axes 1 and 3), as a contiguous
    float32 ``(A0, A1, T)``."""
    a0, _, a1, _, t = blocks5.shape
    return grid.reshape(a0, a1, t).float().contiguous()


def active(*tensors: Tensor) -> bool:
    """Whether a kernel can run now: kernels on and built, not tracing for torch.compile, no graph being built
    (a double backward needs the differentiable eager formulas), every tensor on the CPU in float32."""
    if not _state["enabled"] or torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return _module() is not None


def scale_backward(grad: Tensor, view: Tensor, grid: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(grad * grid, block sums of grad * view)`` (the sums keep the grid's shape), or ``None`` if not applicable."""
    view5, grad5 = _as_5d(view), _as_5d(grad)
    if view5 is None or grad5 is None or grad.shape != view.shape:
        return None
    d, sums = _module().scale_backward(grad5, view5, _grid_3d(grid, view5))
    return d.view(view.shape), sums.view(grid.shape).to(grid.dtype)


def norm_scale_forward(blocks: Tensor, mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(blocks * ||block|| * mask, norms)`` (the norms in the mask's shape), or ``None`` if not applicable."""
    blocks5 = _as_5d(blocks)
    if blocks5 is None:
        return None
    out, norms = _module().norm_scale_forward(blocks5, _grid_3d(mask, blocks5))
    return out.view(blocks.shape), norms.view(mask.shape)


def norm_scale_backward(grad: Tensor, blocks: Tensor, norms: Tensor, mask: Tensor) -> Tensor | None:
    """The gradient of :func:`norm_scale_forward` with respect to ``blocks``, or ``None`` if not applicable."""
    blocks5, grad5 = _as_5d(blocks), _as_5d(grad)
    if blocks5 is None or grad5 is None or grad.shape != blocks.shape:
        return None
    d = _module().norm_scale_backward(grad5, blocks5, _grid_3d(norms, blocks5), _grid_3d(mask, blocks5))
    return d.view(blocks.shape)
