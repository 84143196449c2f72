"""FedProx's proximal term against its formula, and as a client transform in the round."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxfl
from jaxfl.transforms import add_proximal_term


def test_proximal_gradient_matches_formula():
  rng = np.random.default_rng(0)
  anchor = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
  params = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
  grads = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
  tx = add_proximal_term(0.3)
  state = jax.jit(tx.init)(anchor)
  out, _ = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_allclose(out["w"], grads["w"] + 0.3 * (params["w"] - anchor["w"]), rtol=1e-6)


def test_fedprox_pulls_clients_towards_global_model():
  from conftest import tiny_data, tiny_model
  data, model = tiny_data(num_clients=4, seed=1), tiny_model()
  norms = {}
  for mu in (0.0, 5.0):
    algo = jaxfl.algorithms.fedprox(mu=mu, client_lr=0.2, local_steps=10, batch_size=4)
    res = jaxfl.simulate(algo, model, data, rounds=1, clients_per_round=4, progress=False)
    norms[mu] = res.history[0]["update_norm"]
  assert norms[5.0] < norms[0.0]


def test_fedprox_step_equals_manual_prox_gd():
  tx = optax.chain(add_proximal_term(0.5), optax.sgd(0.1))
  p0 = {"w": jnp.array([1.0, -2.0])}
  loss = lambda p: jnp.sum(p["w"] ** 2)
  p, s = p0, tx.init(p0)
  ref = np.array([1.0, -2.0])
  for _ in range(3):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    p = optax.apply_updates(p, u)
    ref = ref - 0.1 * (2 * ref + 0.5 * (ref - np.array([1.0, -2.0])))
  np.testing.assert_allclose(p["w"], ref, rtol=1e-6)
