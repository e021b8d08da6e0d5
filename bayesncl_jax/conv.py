r"""The encoders' 2-D convolution, with a CPU-specific backward pass.

`conv_fn(impl)` returns a drop-in replacement of `lax.conv_general_dilated`
for `nn.Conv(conv_general_dilated=...)`: parameters, names and the forward
value are nn.Conv's own, so checkpoints and the PyTorch interop see no
difference.

On any backend other than CPU (chosen when the function is traced, by
`jax.default_backend()`), and for `impl="xla"`, it *is*
`lax.conv_general_dilated`: cuDNN and the TPU compiler keep their path.

On CPU with `impl` in {auto, per_tap, im2col} it is a `jax.custom_vjp`
whose forward is XLA's convolution and whose backward computes, for
y[n,i,j,o] = Σ_{a,b,c} xp[n, i·s+a, j·s+b, c] · w[a,b,c,o]
(xp = x zero-padded, s the stride):

  dw[a,b,c,o] = Σ_{n,i,j} xp[n, i·s+a, j·s+b, c] · dy[n,i,j,o]
  dxp[n, i·s+a, j·s+b, c] += Σ_o dy[n,i,j,o] · w[a,b,c,o]   (dx = crop of dxp)

by one of three formulations per shape:

  per_tap  one matmul per kernel tap (a, b): dw[a,b] = einsum('nhwc,nhwo->co')
           of the tap's strided slice of xp with dy; dx accumulates each
           tap's einsum('nhwo,co->nhwc') scattered back (interior padding
           for stride > 1).
  im2col   the k·k slices side by side as one (N·Ho·Wo, k·k·C) matrix, one
           matmul (dx: one matmul into the k·k·C columns, then the same
           scatter-add).
  xla      XLA's own transpose convolutions.

`auto` takes, per (dw | dx, shape), the formulation `bench/conv_grad.py`
measured fastest: the rule is `choose()`, its numbers bench/RESULTS.md §2b
(matmuls for the few-channel stem and the 1×1 shortcuts, where XLA:CPU is
3–12× slower; XLA's own for the wider 3×3 layers, where it is faster).

Sums are accumulated in float32 and cast once to the operand's dtype
(bfloat16 included). A convolution the custom path cannot serve (grouped,
dilated, not NHWC/HWIO, not 2-D) uses XLA's and says so once in the log.
"""
from __future__ import annotations

import functools
from absl import logging
import jax
from jax import lax
import jax.numpy as jnp

CONV_IMPLS = ("auto", "xla", "per_tap", "im2col")
# Formulations of one gradient (dw or dx) on CPU.
GRAD_IMPLS = ("xla", "per_tap", "im2col")

_NHWC_DN = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2),
                                    rhs_spec=(3, 2, 0, 1),
                                    out_spec=(0, 3, 1, 2))
_logged_fallbacks: set[str] = set()


def _backend() -> str:
  """The platform the convolution is traced for (patched in tests)."""
  return jax.default_backend()


def _log_once(message: str) -> None:
  if message not in _logged_fallbacks:
    _logged_fallbacks.add(message)
    logging.warning("%s", message)


# ----------------------------------------------------------------------------
# The formulations. Shapes: x (N, H, W, C), w (kh, kw, C, O),
# dy (N, Ho, Wo, O); strides (sh, sw); padding ((pt, pb), (pl, pr)).
# ----------------------------------------------------------------------------
def xla_conv(x, w, strides, padding):
  """lax.conv_general_dilated, NHWC/HWIO/NHWC, as nn.Conv calls it."""
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=_NHWC_DN)


def _tap_slices(x, w_shape, dy_shape, strides, padding):
  """[(a, b, xp[:, a::sh, b::sw, :] cropped to (N, Ho, Wo, C))] per tap."""
  kh, kw = w_shape[:2]
  n, ho, wo = dy_shape[:3]
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  c = x.shape[-1]
  return [(a, b, lax.slice(xp, (0, a, b, 0),
                           (n, a + (ho - 1) * sh + 1, b + (wo - 1) * sw + 1,
                            c), (1, sh, sw, 1)))
          for a in range(kh) for b in range(kw)]


def dw_xla(x, w_shape, dy, strides, padding, w_dtype):
  w0 = jnp.zeros(w_shape, w_dtype)
  _, vjp = jax.vjp(lambda w: xla_conv(x, w, strides, padding), w0)
  return vjp(dy)[0]


def dw_per_tap(x, w_shape, dy, strides, padding, w_dtype):
  kh, kw, c, o = w_shape
  taps = [jnp.einsum("nhwc,nhwo->co", xs, dy,
                     preferred_element_type=jnp.float32)
          for _, _, xs in _tap_slices(x, w_shape, dy.shape, strides, padding)]
  return jnp.stack(taps).reshape(kh, kw, c, o).astype(w_dtype)


def dw_im2col(x, w_shape, dy, strides, padding, w_dtype):
  kh, kw, c, o = w_shape
  cols = jnp.concatenate(
      [xs for _, _, xs in _tap_slices(x, w_shape, dy.shape, strides,
                                      padding)], axis=-1)
  dw = jnp.einsum("nhwk,nhwo->ko", cols, dy,
                  preferred_element_type=jnp.float32)
  return dw.reshape(kh, kw, c, o).astype(w_dtype)


def dx_xla(x_shape, w, dy, strides, padding, x_dtype):
  x0 = jnp.zeros(x_shape, x_dtype)
  _, vjp = jax.vjp(lambda x: xla_conv(x, w, strides, padding), x0)
  return vjp(dy)[0]


def _scatter_taps(per_tap, x_shape, dy_shape, strides, padding, x_dtype):
  """Σ_taps of each (N, Ho, Wo, C) tap product put back at xp[:, a::s, b::s],
  cropped to x's (N, H, W, C)."""
  n, h, wd, c = x_shape
  ho, wo = dy_shape[1:3]
  sh, sw = strides
  (pt, pb), (pl, pr) = padding
  hp, wp = h + pt + pb, wd + pl + pr
  dxp = None
  for a, b, t in per_tap:
    t = lax.pad(t, jnp.zeros((), t.dtype),
                ((0, 0, 0), (a, hp - a - ((ho - 1) * sh + 1), sh - 1),
                 (b, wp - b - ((wo - 1) * sw + 1), sw - 1), (0, 0, 0)))
    dxp = t if dxp is None else dxp + t
  return dxp[:, pt:pt + h, pl:pl + wd, :].astype(x_dtype)


def dx_per_tap(x_shape, w, dy, strides, padding, x_dtype):
  kh, kw = w.shape[:2]
  per_tap = [(a, b, jnp.einsum("nhwo,co->nhwc", dy, w[a, b],
                               preferred_element_type=jnp.float32))
             for a in range(kh) for b in range(kw)]
  return _scatter_taps(per_tap, x_shape, dy.shape, strides, padding, x_dtype)


def dx_im2col(x_shape, w, dy, strides, padding, x_dtype):
  kh, kw, c, o = w.shape
  cols = jnp.einsum("nhwo,ko->nhwk", dy, w.reshape(kh * kw * c, o),
                    preferred_element_type=jnp.float32)
  cols = cols.reshape(*dy.shape[:3], kh, kw, c)
  per_tap = [(a, b, cols[:, :, :, a, b, :])
             for a in range(kh) for b in range(kw)]
  return _scatter_taps(per_tap, x_shape, dy.shape, strides, padding, x_dtype)


DW = {"xla": dw_xla, "per_tap": dw_per_tap, "im2col": dw_im2col}
DX = {"xla": dx_xla, "per_tap": dx_per_tap, "im2col": dx_im2col}


# ----------------------------------------------------------------------------
# The rule of `auto` (bench/RESULTS.md §2 has the measurements behind it).
# ----------------------------------------------------------------------------
def choose(x_shape, w_shape, strides) -> tuple[str, str]:
  """(dw formulation, dx formulation) `auto` uses for this shape on CPU.

  Measured with bench/conv_grad.py on the 2-core CPU (bench/RESULTS.md §2,
  process CPU ms per call, XLA → chosen):
    1×1 kernels (the strided shortcuts) are one matmul: im2col for both
      (dw 27 → 7 at 64×34×34×64→128; 2 → 2 at width 8).
    3×3 kernels over ≤ 4 input channels (the cifar stems) with ≥ 16
      outputs: dw per_tap (122 → 8 at 64×32×32×3→64, 23 → 5 at →16; with
      8 outputs XLA's is as fast or faster, 20 vs 37), dx im2col
      (92 → 3; it is dead code in a training step, whose images need no
      gradient).
    Everything else — the 3×3 layers with ≥ 8 input channels and the 7×7/2
      ImageNet stem — keeps XLA's (per_tap 1.2–3× slower there: 204 vs 71
      at 64×34×34×64→64, 98 vs 49 for the 7×7 stem).
  """
  del x_shape, strides
  kh, kw, c_in, c_out = w_shape
  if kh == kw == 1:
    return "im2col", "im2col"
  if kh * kw <= 9 and c_in <= 4:
    return ("per_tap" if c_out >= 16 else "xla"), "im2col"
  return "xla", "xla"


# ----------------------------------------------------------------------------
# The custom-gradient convolution and the nn.Conv hook.
# ----------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_custom_grad(x, w, strides, padding, dw_impl, dx_impl):
  del dw_impl, dx_impl
  return xla_conv(x, w, strides, padding)


def _fwd(x, w, strides, padding, dw_impl, dx_impl):
  return _conv_custom_grad(x, w, strides, padding, dw_impl, dx_impl), (x, w)


def _bwd(strides, padding, dw_impl, dx_impl, res, dy):
  x, w = res
  dx = DX[dx_impl](x.shape, w, dy, strides, padding, x.dtype)
  dw = DW[dw_impl](x, w.shape, dy, strides, padding, w.dtype)
  return dx, dw


_conv_custom_grad.defvjp(_fwd, _bwd)


def _unsupported(lhs, rhs, padding, lhs_dilation, rhs_dilation,
                 dimension_numbers, feature_group_count,
                 batch_group_count) -> str | None:
  """Why the custom path cannot serve this call (None: it can)."""
  if lhs.ndim != 4:
    return f"{lhs.ndim - 2}-D convolution"
  if dimension_numbers is None or lax.conv_dimension_numbers(
      lhs.shape, rhs.shape, dimension_numbers) != _NHWC_DN:
    return f"dimension_numbers={dimension_numbers} (not NHWC/HWIO/NHWC)"
  if feature_group_count != 1 or batch_group_count != 1:
    return "grouped convolution"
  if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    return "dilated convolution"
  if not isinstance(padding, str) and any(p < 0 for pair in padding
                                          for p in pair):
    return f"negative padding {padding}"
  if lhs.dtype != rhs.dtype:
    return f"mixed dtypes {lhs.dtype}/{rhs.dtype}"
  return None


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, *,
                         impl: str = "auto"):
  """`lax.conv_general_dilated` with `impl`'s backward on the CPU backend."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"Unknown conv_impl={impl!r}; allowed: "
                     f"{', '.join(CONV_IMPLS)}")
  xla = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  if impl == "xla" or _backend() != "cpu":
    return xla()
  why = _unsupported(lhs, rhs, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count,
                     batch_group_count)
  if why is None and (precision is not None
                      or preferred_element_type is not None):
    why = "explicit precision / preferred_element_type"
  if why is not None:
    _log_once(f"conv_impl={impl!r}: {why} with input {lhs.shape} and kernel "
              f"{rhs.shape}; using XLA's convolution and its gradient.")
    return xla()
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides,
                                  padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if impl == "auto":
    dw_impl, dx_impl = choose(lhs.shape, rhs.shape, strides)
  else:
    dw_impl = dx_impl = impl
  if dw_impl == dx_impl == "xla":
    return xla()
  return _conv_custom_grad(lhs, rhs, strides, padding, dw_impl, dx_impl)


@functools.lru_cache(maxsize=None)
def conv_fn(impl: str):
  """The `conv_general_dilated` to hand nn.Conv for `model.conv_impl`.

  One function object per impl (cached), so modules built from equal
  configs compare equal.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"Unknown conv_impl={impl!r}; allowed: "
                     f"{', '.join(CONV_IMPLS)}")
  return functools.partial(conv_general_dilated, impl=impl)
