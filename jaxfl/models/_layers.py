"""Convolution and pooling lowerings that stay fast inside jaxfl's compiled round.

Two facts about XLA (measured on XLA:CPU, jax 0.10; BUILD.md "Performance notes") shape this
module:

* ``jax.vmap`` of ``lax.conv_general_dilated`` over a batch of per-client *kernels* lowers to
  a grouped convolution, which runs several times slower than per-client convs. Written as
  image patches (im2col) times the kernel matrix, the vmapped conv becomes a batched matmul
  (``impl="patches"``).
* Unbatched, the native conv is the fastest lowering, but JAX's autodiff writes the kernel
  gradient as a conv with permuted dimension labels (``f01b_i01o->01bf``). Outside loops XLA
  canonicalises it; inside ``lax.scan`` (the local-step loop) it does not, and XLA:CPU falls
  back to a naive kernel about 10x slower. ``impl="xla"`` therefore carries its own VJP in
  which both backward convs are written in the canonical ``NHWC x HWIO`` form (explicit
  transposes, lhs/rhs dilation for strides), so all three convs take the fast path anywhere.

``impl="auto"`` (the default) picks per call site: ``"patches"`` while jaxfl traces clients
that are vmapped (:func:`batched_clients`), ``"xla"`` otherwise. Every lowering has the same
parameters (HWIO ``kernel``, ``bias``) and the same math as ``flax.linen.Conv``, so
checkpoints are interchangeable.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "patches", "lax")
_DN = ("NHWC", "HWIO", "NHWC")
_BATCHED = contextvars.ContextVar("jaxfl_batched_clients", default=False)


@contextlib.contextmanager
def batched_clients(batched: bool = True):
  """While tracing inside this context, ``impl="auto"`` convs lower as patches @ kernel.

  The round enters it around a vmapped client update (per-client kernels); a client run
  one at a time (``lax.map``) is traced outside it and gets the native conv.
  """
  token = _BATCHED.set(batched)
  try:
    yield
  finally:
    _BATCHED.reset(token)


def _same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + k - size, 0)
  return total // 2, total - total // 2


def _pads(x_shape, k_shape, strides, padding) -> list[tuple[int, int]]:
  if padding == "SAME":
    return [_same_pads(x_shape[1 + i], k_shape[i], strides[i]) for i in range(2)]
  if padding == "VALID":
    return [(0, 0), (0, 0)]
  raise ValueError(f"`padding` must be 'SAME' or 'VALID', got {padding!r}.")


def im2col(x: jax.Array, kh: int, kw: int, strides: Sequence[int] = (1, 1),
           padding: str = "SAME") -> jax.Array:
  """``f32[N, H, W, C] -> f32[N, Ho, Wo, kh*kw*C]`` patches built from shifted slices.

  Plain slices and one concatenate (its gradient is pads and adds), so neither the forward
  nor the backward pass contains a convolution (``lax.conv_general_dilated_patches`` is
  itself a conv on XLA:CPU); features are ordered (kh, kw, C), matching an HWIO kernel
  reshaped to ``[kh*kw*C, Cout]``.
  """
  sh, sw = strides
  (pt, pb), (pl, pr) = _pads(x.shape, (kh, kw), strides, padding)
  x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho = (x.shape[1] - kh) // sh + 1
  wo = (x.shape[2] - kw) // sw + 1
  cols = [x[:, i: i + sh * (ho - 1) + 1: sh, j: j + sw * (wo - 1) + 1: sw, :]
          for i in range(kh) for j in range(kw)]
  return jnp.concatenate(cols, axis=-1)


def _nhwc_conv(lhs, rhs, strides, pads, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
  """``lax.conv_general_dilated`` in NHWC x HWIO, the contracted channels padded to even.

  XLA:CPU's conv kernels ran 3-4x slower on an odd channel count above 1 (a 5x5 conv on
  RGB input: 1.56 ms at 3 channels, 0.37 ms zero-padded to 4); zeros add nothing to the sum.
  """
  c = lhs.shape[-1]
  if c > 1 and c % 2:
    lhs = jnp.pad(lhs, ((0, 0),) * 3 + ((0, 1),))
    rhs = jnp.pad(rhs, ((0, 0),) * 2 + ((0, 1), (0, 0)))
  return lax.conv_general_dilated(lhs, rhs, strides, pads, lhs_dilation, rhs_dilation,
                                  dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _canonical_conv(x, kernel, strides, padding):
  return _nhwc_conv(x, kernel, strides, _pads(x.shape, kernel.shape, strides, padding))


def _canonical_conv_fwd(x, kernel, strides, padding):
  return _canonical_conv(x, kernel, strides, padding), (x, kernel)


def _canonical_conv_bwd(strides, padding, res, dy):
  x, kernel = res
  k = kernel.shape[:2]
  pads = _pads(x.shape, kernel.shape, strides, padding)
  size_in, size_out = x.shape[1:3], dy.shape[1:3]
  # dx: the stride-dilated dy convolved with the flipped kernel, in/out channels swapped.
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  pad_dx = []
  for i in range(2):
    lo = k[i] - 1 - pads[i][0]
    pad_dx.append((lo, size_in[i] + k[i] - 2 - (size_out[i] - 1) * strides[i] - lo))
  dx = _nhwc_conv(dy, flipped, (1, 1), pad_dx, lhs_dilation=strides)
  # dW[kh, kw, ci, co] = sum_{n, oh, ow} x_pad[n, s*oh + kh, s*ow + kw, ci] dy[n, oh, ow, co]:
  # a conv with the input channels as batch and the examples as contracted features.
  pad_dw = [(pads[i][0], k[i] + (size_out[i] - 1) * strides[i] - size_in[i] - pads[i][0])
            for i in range(2)]
  dw = _nhwc_conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)), (1, 1),
                  pad_dw, rhs_dilation=strides)
  return dx, jnp.transpose(dw, (1, 2, 0, 3))


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def resolve_conv_impl(impl: str) -> str:
  """``"auto"`` -> ``"patches"`` inside :func:`batched_clients`, else ``"xla"``."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"`impl` must be one of {CONV_IMPLS}, got {impl!r}.")
  if impl == "auto":
    return "patches" if _BATCHED.get() else "xla"
  return impl


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
           padding: str = "SAME", impl: str = "auto") -> jax.Array:
  """NHWC x HWIO 2-D convolution.

  ``impl``: ``"xla"`` (native conv with a canonical-layout VJP; fast unbatched, also inside
  ``lax.scan``), ``"patches"`` (im2col slices @ kernel; fast when vmapped over per-client
  kernels), ``"lax"`` (plain ``lax.conv_general_dilated`` with JAX's own autodiff; supports
  forward-mode ``jax.jvp``, which the custom VJP of ``"xla"`` does not) or ``"auto"``
  (:func:`resolve_conv_impl`).
  """
  impl = resolve_conv_impl(impl)
  strides = tuple(int(s) for s in strides)
  if impl == "lax":
    return lax.conv_general_dilated(x, kernel, strides, _pads(x.shape, kernel.shape, strides,
                                                              padding), dimension_numbers=_DN)
  if impl == "xla":
    return _canonical_conv(x, kernel, strides, padding)
  kh, kw, cin, cout = kernel.shape
  if kh == kw == 1 and padding in ("SAME", "VALID"):
    return x[:, :: strides[0], :: strides[1], :] @ kernel.reshape(cin, cout)
  return im2col(x, kh, kw, strides, padding) @ kernel.reshape(kh * kw * cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _window_max(x, window):
  a, b = window
  n, h, w, c = x.shape
  return x.reshape(n, h // a, a, w // b, b, c).max(axis=(2, 4))


def _window_max_fwd(x, window):
  y = _window_max(x, window)
  return y, (x, y)


def _window_max_bwd(window, res, dy):
  x, y = res
  a, b = window
  n, h, w, c = x.shape
  xr = x.reshape(n, h // a, a, w // b, b, c)
  # The first maximum in row-major window order takes the gradient, as XLA's
  # select-and-scatter does for lax.reduce_window's max.
  taken = jnp.zeros(y.shape, bool)
  rows = []
  for i in range(a):
    cols = []
    for j in range(b):
      hit = (xr[:, :, i, :, j, :] == y) & ~taken
      taken = taken | hit
      cols.append(jnp.where(hit, dy, 0).astype(dy.dtype))
    rows.append(jnp.stack(cols, axis=3))  # [n, ho, wo, b, c]
  dx = jnp.stack(rows, axis=2)  # [n, ho, a, wo, b, c]
  return (dx.reshape(n, h, w, c),)


_window_max.defvjp(_window_max_fwd, _window_max_bwd)


def max_pool(x: jax.Array, window: Sequence[int] = (2, 2)) -> jax.Array:
  """Non-overlapping max pooling (stride = window, VALID), NHWC.

  Same values and gradients as ``flax.linen.max_pool(x, window, window)``, written as a
  reshape + max with an elementwise backward pass: XLA's select-and-scatter gradient of
  ``reduce_window`` cost about a fifth of a whole CNN training step on XLA:CPU.
  """
  window = tuple(int(v) for v in window)
  if x.ndim != 4 or len(window) != 2:
    return nn.max_pool(x, window, window)
  a, b = window
  h, w = x.shape[1] // a * a, x.shape[2] // b * b
  return _window_max(x[:, :h, :w, :], window)


class Conv(nn.Module):
  """Drop-in for ``nn.Conv`` (NHWC, 2-D) with a selectable lowering (:func:`conv2d`)."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: str = "SAME"
  use_bias: bool = True
  impl: str = "auto"
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features))
    y = conv2d(x, kernel.astype(x.dtype), self.strides, self.padding, self.impl)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y
