"""A convolution that stays fast when vmapped over per-client weights.

``jax.vmap`` of ``lax.conv_general_dilated`` over a batch of *kernels* lowers to a grouped
convolution, which XLA:CPU runs 2-14x slower than the per-client convs (DESIGN.md,
measured). Written as image patches (im2col) times the kernel matrix, the vmapped conv
becomes a batched matmul instead. Same parameters (HWIO ``kernel``, ``bias``) and same math
as ``flax.linen.Conv``, so checkpoints are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
           padding: str = "SAME", impl: str = "patches") -> jax.Array:
  """NHWC x HWIO convolution, either XLA's conv (``impl="xla"``) or patches @ kernel."""
  dn = ("NHWC", "HWIO", "NHWC")
  if impl == "xla":
    return lax.conv_general_dilated(x, kernel, tuple(strides), padding, dimension_numbers=dn)
  if impl != "patches":
    raise ValueError(f"`impl` must be 'patches' or 'xla', got {impl!r}.")
  kh, kw, cin, cout = kernel.shape
  if kh == kw == 1:
    xs = x[:, :: strides[0], :: strides[1], :]
    return xs @ kernel.reshape(cin, cout)
  patches = lax.conv_general_dilated_patches(x, (kh, kw), tuple(strides), padding,
                                             dimension_numbers=dn)
  # Patch features are ordered (cin, kh, kw).
  return patches @ kernel.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout)


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
