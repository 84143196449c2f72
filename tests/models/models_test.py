"""Models: the patch convolution, the zoo's shapes, and linen/nnx adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfl
from jaxfl.models import conv2d


@pytest.mark.parametrize("k,stride,padding", [(3, 1, "SAME"), (5, 1, "SAME"), (3, 2, "SAME"),
                                              (1, 2, "SAME"), (3, 1, "VALID")])
def test_patch_conv_equals_xla_conv(k, stride, padding):
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  w = jax.random.normal(jax.random.key(1), (k, k, 3, 4))
  a = conv2d(x, w, (stride, stride), padding, impl="xla")
  b = conv2d(x, w, (stride, stride), padding, impl="patches")
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_vmapped_patch_conv_over_per_client_kernels():
  x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 2))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 2, 4))
  a = jax.vmap(lambda xi, wi: conv2d(xi, wi, impl="xla"))(x, w)
  b = jax.vmap(lambda xi, wi: conv2d(xi, wi))(x, w)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,shape,classes,n_kernels,n_params", [
    ("femnist_cnn", (28, 28, 1), 62, 4, 6603710),  # LEAF FEMNIST CNN size (ALGORITHMS §1.2)
    ("resnet20", (32, 32, 3), 10, 23, None),
    ("cnn", (32, 32, 3), 10, 4, None),
    ("small_cnn", (8, 8, 1), 10, 4, None),
    ("mlp", (8, 8, 1), 10, 3, None)])
def test_zoo_shapes(name, shape, classes, n_kernels, n_params):
  m = jaxfl.models.get_model(name, shape, classes)
  params, state = jax.eval_shape(m.init, jax.random.key(0))
  assert sum(p.ndim >= 2 for p in jax.tree.leaves(params)) == n_kernels
  if n_params:
    assert jaxfl.tree.num_params(params) == n_params
  logits, _ = jax.eval_shape(lambda p, s: m.apply(p, s, jnp.zeros((2,) + shape), train=False),
                             params, state)
  assert logits.shape == (2, classes)


def test_resnet20_batchnorm_state_and_zero_gamma():
  m = jaxfl.models.resnet20()
  params, state = jax.jit(m.init)(jax.random.key(0))
  assert "batch_stats" in state
  assert np.all(params["_BasicBlock_0"]["BatchNorm_1"]["scale"] == 0)  # zero-init gamma
  _, new = jax.jit(lambda p, s, x: m.apply(p, s, x, train=True))(params, state,
                                                                  jnp.ones((2, 32, 32, 3)))
  assert not np.allclose(new["batch_stats"]["BatchNorm_0"]["mean"],
                         state["batch_stats"]["BatchNorm_0"]["mean"])


def test_user_linen_and_nnx_models_plug_in():
  import flax.linen as nn
  from flax import nnx

  class UserNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(x.reshape((x.shape[0], -1)))

  class NnxNet(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
      return self.fc(x)

  from conftest import tiny_data
  data = tiny_data(num_clients=4)
  for model in (jaxfl.models.from_linen(UserNet(), (5,)),
                jaxfl.models.from_nnx(NnxNet(nnx.Rngs(0)), input_shape=(5,))):
    res = jaxfl.simulate(jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=4),
                         model, data, rounds=2, clients_per_round=2, progress=False)
    assert res.history[-1]["train_loss"] > 0 and res.summary["final_acc"] is not None
