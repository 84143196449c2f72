"""LBGM: the per-client look-back rule against NumPy, and per-client state in the round."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_data

import jaxfl
from jaxfl.client import make_client_update
from jaxfl.data import device_data
from jaxfl.round import build_round
from jaxfl.transforms import lbgm


def reference_lbgm(a, look_back, threshold):
  """(sent update, new look-back, used look-back) for flat float64 vectors."""
  nl, na = look_back @ look_back, a @ a
  if nl > 0 and na > 0:
    rho = (a @ look_back) / nl
    err = 1.0 - (a @ look_back) ** 2 / (na * nl)
    if err <= threshold:
      return rho * look_back, look_back, True
  return a, a, False


def _flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.95])
def test_rule_matches_numpy_over_a_sequence(threshold):
  rng = np.random.default_rng(int(threshold * 100))
  shapes = {"w": (4, 3), "b": (3,)}
  tx = lbgm(threshold)
  state = tx.init({k: jnp.zeros(s) for k, s in shapes.items()})
  step = jax.jit(tx.update)
  base = {k: rng.normal(size=s) for k, s in shapes.items()}
  lb = np.zeros(15)
  used_any = sent_any = False
  for _t in range(10):
    # A drifting direction: sometimes close to the look-back, sometimes not.
    noise = rng.uniform(0.0, 2.0)
    a = {k: (base[k] + noise * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
    out, state = step(a, state)
    want, lb, used = reference_lbgm(_flat(a), lb, threshold)
    np.testing.assert_allclose(_flat(out), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_flat(state.look_back), lb, rtol=1e-6)
    assert bool(state.used_look_back) == used
    sent = sum(float(x) for x in jax.tree.leaves(state.uplink_elements))
    assert sent == (1.0 if used else 15.0)
    used_any |= used
    sent_any |= not used
  assert sent_any  # the first update is always sent in full
  if threshold == 0.95:
    assert used_any


def test_first_update_and_zero_update_are_sent_in_full():
  tx = lbgm(1.0)
  p = {"w": jnp.zeros((2, 2))}
  out, s = tx.update({"w": jnp.ones((2, 2))}, tx.init(p))
  assert not bool(s.used_look_back) and float(s.uplink_elements["w"]) == 4
  out, s = tx.update({"w": jnp.zeros((2, 2))}, s)
  assert not bool(s.used_look_back)
  with pytest.raises(ValueError, match="threshold"):
    lbgm(1.5)


def test_round_keeps_one_look_back_per_client_and_counts_scalars():
  """A Python loop over rounds and clients, one NumPy look-back per client id."""
  data = tiny_data(num_clients=5, seed=3)
  model = jaxfl.models.mlp((5,), 3, hidden=(6,))
  algo = jaxfl.algorithms.lbgm(0.6, local_steps=2, client_lr=0.1, batch_size=3)
  rnd = build_round(algo, model, num_clients=5, max_client_size=data.max_client_size,
                    clients_per_round=3, donate=False)
  client_update = jax.jit(make_client_update(model, algo.local, data.max_client_size))
  dd = device_data(data)
  state = rnd.init(jax.random.key(0))
  n = jaxfl.tree.num_params(state.params)
  lbs = {i: np.zeros(n) for i in range(5)}
  x = _flat(state.params)
  unflat = lambda v: jax.tree.unflatten(
      jax.tree.structure(state.params),
      [jnp.asarray(c.reshape(p.shape), jnp.float32) for c, p in zip(
          np.split(v, np.cumsum([p.size for p in jax.tree.leaves(state.params)])[:-1]),
          jax.tree.leaves(state.params))])
  scalar_rounds = 0
  for r in range(6):
    key = jax.random.key(r)
    new, metrics = rnd.step(state, dd, key)
    _, _, k_clients, _, _ = jax.random.split(key, 5)
    sent, elems = [], 0.0
    for slot, cid in enumerate(np.asarray(new.cohort)):
      k = jax.random.split(jax.random.fold_in(k_clients, slot))[0]
      out = client_update(unflat(x), {}, jnp.asarray(data.x), jnp.asarray(data.y),
                          jnp.asarray(data.client_indices[cid]),
                          jnp.asarray(data.client_sizes[cid]), k)
      s, lbs[cid], used = reference_lbgm(_flat(out.delta), lbs[cid], 0.6)
      sent.append(s)
      elems += 1.0 if used else n
      scalar_rounds += used
    x = x - np.mean(sent, axis=0)
    np.testing.assert_allclose(_flat(new.params), x, rtol=1e-4, atol=1e-5)
    assert float(metrics["uplink_elements"]) == elems
    for cid in range(5):  # clients outside the cohort keep their look-back untouched
      got = _flat(jax.tree.map(lambda c, i=cid: c[i], new.memory.look_back))
      np.testing.assert_allclose(got, lbs[cid], rtol=1e-4, atol=1e-6)
    state = new
  assert scalar_rounds > 0
