"""jaxfl.tree's client-axis contraction against NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfl import tree as jtree


@pytest.mark.parametrize("clients", [1, 2, 7])
def test_weighted_sum_equals_numpy(clients):
  rng = np.random.default_rng(clients)
  stack = {"k": rng.normal(size=(clients, 6, 5)).astype(np.float32),
           "b": rng.normal(size=(clients, 3)).astype(np.float32),
           "h": rng.normal(size=(clients, 4)).astype(jnp.bfloat16)}
  w = rng.uniform(0.0, 2.0, clients).astype(np.float32)
  out = jax.jit(jtree.weighted_sum)(stack, w)
  for k, u in stack.items():
    assert out[k].dtype == u.dtype and out[k].shape == u.shape[1:]
    ref = np.tensordot(w.astype(np.float64), np.asarray(u, np.float64), 1)
    tol = 1e-2 if u.dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(np.asarray(out[k], np.float64), ref, rtol=tol, atol=tol)
  mean = jtree.weighted_mean(stack, w)["k"]
  np.testing.assert_allclose(mean, np.tensordot(w / w.sum(), stack["k"].astype(np.float64), 1),
                             rtol=1e-5, atol=1e-6)
  assert not np.any(jtree.weighted_mean(stack, 0 * w)["k"])  # zero total weight: zeros


def test_module_ranks_follow_the_given_order_and_refuse_a_wrong_one():
  # Flattening order sorts keys: a_out/{bias,kernel}, b_in/{bias,kernel}, c_mid/scale.
  params = {"b_in": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)},
            "c_mid": {"scale": np.zeros(3)},
            "a_out": {"kernel": np.zeros((3, 1)), "bias": np.zeros(1)}}
  order = ["['b_in']", "['c_mid']", "['a_out']"]
  assert jtree.module_ranks(params, order) == [2, 2, 0, 0, 1]
  with pytest.raises(ValueError, match=r"`order` must name every module.*\['c_mid'\]"):
    jtree.module_ranks(params, order[:1] + order[2:])
  with pytest.raises(ValueError, match="`trained_order` must name every module"):
    jtree.module_ranks(params, order + order[:1], arg="trained_order")
