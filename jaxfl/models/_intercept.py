"""Stock Flax layers inside a user's model, lowered the fast way at apply time.

A model written with ``flax.linen.Conv`` and ``flax.linen.max_pool`` gets XLA's default
lowerings, which are slow exactly where jaxfl runs them: a conv vmapped over per-client kernels
becomes a grouped conv, its kernel gradient inside the local-step ``lax.scan`` misses XLA:CPU's
fast path, and ``reduce_window``'s select-and-scatter gradient is a fifth of a CNN step
(BUILD.md "Performance notes"). :func:`fast_layers` reroutes those calls while a model is
applied: every ``nn.Conv.__call__`` whose configuration :func:`jaxfl.models.conv2d` computes
identically (2-D NHWC, ``SAME``/``VALID``, no dilation, groups or mask) runs
:func:`jaxfl.models.conv2d` on the module's own ``kernel``/``bias``, and ``nn.max_pool`` with
non-overlapping windows runs :func:`jaxfl.models.max_pool`. Parameters, values and gradients are
the same; anything else falls through to Flax untouched, and :func:`slow_layers` lists what
fell through so :func:`jaxfl.models.from_linen` can say so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax.numpy as jnp

from jaxfl.models import _layers


def _pair(v, default):
  if v is None:
    return default
  if isinstance(v, int):
    return (v, v)
  return tuple(int(a) for a in v)


def conv_is_fast(module: nn.Conv, x) -> str | None:
  """None when ``module(x)`` can take jaxfl's conv lowering, else why not."""
  if x.ndim != 4:
    return f"input rank {x.ndim} (the fast path is 2-D NHWC with a batch axis)"
  if len(_pair(module.kernel_size, ())) != 2:
    return f"kernel_size {module.kernel_size!r} (2-D only)"
  if module.padding not in ("SAME", "VALID"):
    return f"padding {module.padding!r} ('SAME' or 'VALID' only)"
  if _pair(module.input_dilation, (1, 1)) != (1, 1) or _pair(module.kernel_dilation,
                                                             (1, 1)) != (1, 1):
    return "dilation"
  if module.feature_group_count != 1:
    return f"feature_group_count={module.feature_group_count}"
  if module.mask is not None:
    return "a kernel mask"
  if module.precision is not None:
    return f"precision={module.precision!r}"
  if module.conv_general_dilated is not None or module.conv_general_dilated_cls is not None:
    return "a custom conv_general_dilated"
  return None


def _conv_interceptor(slow: list | None):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (type(module) is not nn.Conv or context.method_name != "__call__" or kwargs
        or len(args) != 1 or not module.has_variable("params", "kernel")):
      return next_fun(*args, **kwargs)  # init, subclasses and other methods: Flax's own
    x = args[0]
    why = conv_is_fast(module, x)
    if why is not None:
      if slow is not None:
        slow.append(f"{module.name or 'Conv'}: {why}")
      return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    # Flax's dtype rule (promote_dtype): module.dtype, else the inputs' common type.
    dtype = module.dtype or jnp.result_type(*(a for a in (x, kernel, bias) if a is not None))
    y = _layers.conv2d(x.astype(dtype), kernel.astype(dtype), _pair(module.strides, (1, 1)),
                       module.padding)
    if bias is not None:
      y = y + bias.astype(dtype).reshape((1, 1, 1, -1))
    return y

  return intercept


def _fast_max_pool(flax_max_pool):
  def max_pool(inputs, window_shape, strides=None, padding="VALID"):
    window = tuple(window_shape)
    if (len(window) == 2 and inputs.ndim == 4 and padding == "VALID"
        and strides is not None and tuple(strides) == window):
      return _layers.max_pool(inputs, window)
    return flax_max_pool(inputs, window_shape, strides, padding)

  max_pool.__wrapped__ = flax_max_pool
  return max_pool


@contextlib.contextmanager
def fast_layers(slow: list | None = None) -> Iterator[None]:
  """While tracing in this context, stock ``nn.Conv`` / ``nn.max_pool`` calls take jaxfl's
  lowerings (same parameters, values and gradients).

  Args:
    slow: optional list that receives ``"layer: reason"`` for every conv left to Flax.
  """
  original = nn.max_pool
  nn.max_pool = _fast_max_pool(original)  # looked up at call time by ``nn.max_pool(...)``
  try:
    with nn.intercept_methods(_conv_interceptor(slow)):
      yield
  finally:
    nn.max_pool = original
