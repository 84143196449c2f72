"""A convolution that stays fast when vmapped over per-client weights.

``jax.vmap`` of ``lax.conv_general_dilated`` over a batch of *kernels* lowers to a grouped
convolution, which XLA:CPU runs 2-14x slower than the per-client convs, and a conv inside a
vmapped ``lax.scan`` was ~14x slower still (DESIGN.md; measured again here). Written as
image patches (im2col) times the kernel matrix, the vmapped conv becomes a batched matmul.
The patches are built from shifted slices, not ``lax.conv_general_dilated_patches`` (which
is itself a convolution on XLA:CPU and measured 3x slower than the native conv). Same parameters (HWIO ``kernel``, ``bias``) and same math
as ``flax.linen.Conv``, so checkpoints are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + k - size, 0)
  return total // 2, total - total // 2


def im2col(x: jax.Array, kh: int, kw: int, strides: Sequence[int] = (1, 1),
           padding: str = "SAME") -> jax.Array:
  """``f32[N, H, W, C] -> f32[N, Ho, Wo, kh*kw*C]`` patches built from shifted slices.

  Plain slices and one concatenate (its gradient is pads and adds), so neither the forward
  nor the backward pass contains a convolution; features are ordered (kh, kw, C), matching
  an HWIO kernel reshaped to ``[kh*kw*C, Cout]``.
  """
  sh, sw = strides
  if padding == "SAME":
    (pt, pb), (pl, pr) = _same_pads(x.shape[1], kh, sh), _same_pads(x.shape[2], kw, sw)
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  elif padding != "VALID":
    raise ValueError(f"`padding` must be 'SAME' or 'VALID', got {padding!r}.")
  ho = (x.shape[1] - kh) // sh + 1
  wo = (x.shape[2] - kw) // sw + 1
  cols = [x[:, i: i + sh * (ho - 1) + 1: sh, j: j + sw * (wo - 1) + 1: sw, :]
          for i in range(kh) for j in range(kw)]
  return jnp.concatenate(cols, axis=-1)


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
           padding: str = "SAME", impl: str = "patches") -> jax.Array:
  """NHWC x HWIO convolution: ``impl="patches"`` (im2col slices @ kernel, the default) or
  ``impl="xla"`` (``lax.conv_general_dilated``)."""
  dn = ("NHWC", "HWIO", "NHWC")
  if impl == "xla":
    return lax.conv_general_dilated(x, kernel, tuple(strides), padding, dimension_numbers=dn)
  if impl != "patches":
    raise ValueError(f"`impl` must be 'patches' or 'xla', got {impl!r}.")
  kh, kw, cin, cout = kernel.shape
  if kh == kw == 1 and padding in ("SAME", "VALID"):
    return x[:, :: strides[0], :: strides[1], :] @ kernel.reshape(cin, cout)
  return im2col(x, kh, kw, tuple(strides), padding) @ kernel.reshape(kh * kw * cin, cout)


class Conv(nn.Module):
  """Drop-in for ``nn.Conv`` (NHWC, 2-D) with a selectable lowering."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: str = "SAME"
  use_bias: bool = True
  impl: str = "patches"
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
