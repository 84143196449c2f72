"""Conv lowerings and max pooling: values and gradients against JAX's own ops (float64)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfl.models import batched_clients, conv2d, max_pool
from jaxfl.models._layers import resolve_conv_impl

# (H, k, stride, padding, c_in, c_out, batch): odd channel counts take the padded path
CASES = [(16, 5, 1, "SAME", 3, 4, 2), (15, 3, 2, "SAME", 2, 3, 3), (16, 3, 2, "SAME", 5, 3, 2),
         (16, 1, 2, "SAME", 2, 3, 1), (9, 3, 1, "VALID", 2, 2, 3), (10, 3, 2, "VALID", 1, 2, 2),
         (7, 2, 2, "VALID", 1, 2, 2), (8, 4, 3, "SAME", 3, 2, 5)]


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("h,k,stride,padding,cin,cout,n", CASES)
def test_canonical_conv_values_and_grads_equal_lax_autodiff(x64, h, k, stride, padding, cin,
                                                            cout, n):
  rng = np.random.default_rng(h * 100 + k * 10 + cin)
  x = rng.normal(size=(n, h, h + 1, cin))
  w = rng.normal(size=(k, k, cin, cout))
  loss = lambda impl: jax.jit(lambda x, w: jnp.sum(
      jnp.sin(conv2d(x, w, (stride, stride), padding, impl))))
  np.testing.assert_allclose(loss("xla")(x, w), loss("lax")(x, w), rtol=1e-12)
  got = jax.grad(loss("xla"), (0, 1))(x, w)
  ref = jax.grad(loss("lax"), (0, 1))(x, w)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(conv2d(x, w, (stride, stride), padding, "patches"),
                             conv2d(x, w, (stride, stride), padding, "lax"), rtol=1e-10,
                             atol=1e-12)


def test_canonical_conv_second_order_matches():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 2))
  hvp = lambda impl: jax.grad(lambda w: jnp.sum(jax.grad(
      lambda w: jnp.sum(conv2d(x, w, impl=impl) ** 3))(w) ** 2))(w)
  np.testing.assert_allclose(hvp("xla"), hvp("lax"), rtol=1e-4, atol=1e-4)


def test_vmapped_per_client_kernels_agree_across_lowerings():
  x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 2))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 2, 4))
  ref = jax.vmap(lambda xi, wi: conv2d(xi, wi, impl="lax"))(x, w)
  for impl in ("xla", "patches", "auto"):
    got = jax.vmap(lambda xi, wi, impl=impl: conv2d(xi, wi, impl=impl))(x, w)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_conv_inside_scan_lowers_to_canonical_convs_only():
  """JAX's own kernel-gradient conv (f01b_i01o->01bf) is slow inside loops on XLA:CPU; the
  custom VJP keeps every conv of the scanned training step in NHWC x HWIO form."""
  def train(impl):
    def step(w, x):
      return w - 0.1 * jax.grad(lambda w: jnp.sum(conv2d(x, w, impl=impl) ** 2))(w), None
    return jax.jit(lambda w, xs: jax.lax.scan(step, w, xs)[0])

  w = jnp.ones((5, 5, 3, 8))
  xs = jnp.ones((4, 2, 12, 12, 3))
  labels = lambda impl: re.findall(r"dim_labels=([^,\s]+)",
                                   train(impl).lower(w, xs).compile().as_text())
  assert labels("xla") and set(labels("xla")) == {"b01f_01io->b01f"}
  np.testing.assert_allclose(train("xla")(w, xs), train("lax")(w, xs), rtol=1e-5)


def test_auto_picks_patches_only_for_batched_clients():
  assert resolve_conv_impl("auto") == "xla"
  with batched_clients():
    assert resolve_conv_impl("auto") == "patches"
    assert resolve_conv_impl("lax") == "lax"
  assert resolve_conv_impl("auto") == "xla"
  with pytest.raises(ValueError, match="`impl`"):
    conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), impl="fft")


@pytest.mark.parametrize("shape,window", [((2, 8, 8, 3), (2, 2)), ((2, 9, 7, 2), (2, 2)),
                                          ((1, 9, 8, 2), (3, 2)), ((2, 4, 6, 1), (1, 2))])
def test_max_pool_values_and_first_max_gradient_equal_flax(shape, window):
  rng = np.random.default_rng(sum(shape))
  x = rng.normal(size=shape).astype(np.float32)
  x[0, 0, 0, 0] = x[0, 0, 1, 0] = x[0, 1, 0, 0] = 4.0  # a three-way tie in one window
  x[..., -1] = np.maximum(x[..., -1], 0.0) * (rng.random(shape[:-1]) < 0.3)  # ReLU zeros
  c = rng.normal(size=nn.max_pool(x, window, window).shape).astype(np.float32)
  ref = lambda x: jnp.sum(nn.max_pool(x, window, window) * c)
  got = lambda x: jnp.sum(max_pool(x, window) * c)
  np.testing.assert_array_equal(max_pool(x, window), nn.max_pool(x, window, window))
  np.testing.assert_allclose(jax.jit(jax.grad(got))(x), jax.jit(jax.grad(ref))(x), rtol=1e-6)
