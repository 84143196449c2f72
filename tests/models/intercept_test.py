"""A user's stock-Flax CNN through ``from_linen`` takes jaxfl's conv/pool lowerings with the
same parameters, values and gradients (float64), and says which layers it could not reroute."""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfl
from jaxfl.models import batched_clients


class StockCNN(nn.Module):
  """Written as a researcher would, with no jaxfl layers."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(5, (3, 3), strides=2, padding="VALID")(x))
    x = nn.Conv(4, (1, 1), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.max_pool(x, (2, 2), strides=(1, 1))  # overlapping: stays Flax's
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def _models():
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # every conv of StockCNN has a fast lowering
    fast = jaxfl.models.from_linen(StockCNN(), (13, 13, 2))
  plain = jaxfl.models.from_linen(StockCNN(), (13, 13, 2), fast_layers=False)
  return fast, plain


def _loss(model):
  def loss(params, state, x, y):
    logits, new_state = model.apply(params, state, x, train=True)
    return jnp.mean((logits - y) ** 2), new_state
  return loss


def test_same_params_values_and_gradients_as_stock_flax(x64):
  fast, plain = _models()
  key = jax.random.key(0)
  params, state = fast.init(key)
  p2, s2 = plain.init(key)
  jax.tree.map(np.testing.assert_array_equal, params, p2)  # interchangeable checkpoints
  params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 13, 13, 2)))
  y = jnp.asarray(rng.normal(size=(4, 3)))
  for batched in (False, True):  # native conv with canonical VJP / patches @ kernel
    with batched_clients(batched):
      (lf, sf), gf = jax.jit(jax.value_and_grad(_loss(fast), has_aux=True))(params, state, x, y)
      (lp, sp), gp = jax.jit(jax.value_and_grad(_loss(plain), has_aux=True))(params, state, x,
                                                                           y)
    np.testing.assert_allclose(lf, lp, rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), gf, gp)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), sf, sp)


def test_vmapped_clients_take_the_patches_lowering_not_a_grouped_conv():
  fast, plain = _models()
  params, state = fast.init(jax.random.key(0))
  stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
  x = jnp.ones((2, 3, 13, 13, 2))

  def hlo(model):
    f = jax.vmap(lambda p, xb: model.apply(p, state, xb, train=False)[0])
    with batched_clients():
      return jax.jit(f).lower(stacked, x).as_text()

  convs = lambda text: len(re.findall(r"convolution", text))
  assert convs(hlo(plain)) >= 3  # Flax: one (grouped) conv per layer
  assert convs(hlo(fast)) == 0  # jaxfl: patches @ kernel (batched matmuls)


def test_pool_and_conv_swaps_are_undone_after_the_call():
  fast, _ = _models()
  fast.apply(*fast.init(jax.random.key(0)), jnp.ones((1, 13, 13, 2)), train=False)
  from flax.linen import pooling

  assert nn.max_pool is pooling.max_pool


def test_a_conv_without_a_fast_lowering_is_named_in_a_warning():
  class Dilated(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), kernel_dilation=2, name="atrous")(x)
      x = nn.Conv(4, (3, 3), padding="CIRCULAR", name="ring")(x)
      return nn.Dense(2)(x.reshape(x.shape[0], -1))

  with pytest.warns(UserWarning, match=r"2 nn.Conv call\(s\).*atrous: dilation.*ring: padding"):
    model = jaxfl.models.from_linen(Dilated(), (9, 9, 1))
  params, state = model.init(jax.random.key(0))
  out, _ = model.apply(params, state, jnp.ones((2, 9, 9, 1)), train=False)
  plain = jaxfl.models.from_linen(Dilated(), (9, 9, 1), fast_layers=False)
  np.testing.assert_array_equal(out, plain.apply(params, state, jnp.ones((2, 9, 9, 1)),
                                                 train=False)[0])
