"""PruneFL: importance accumulation and masks against NumPy; masked training in the round."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_data

import jaxfl
from jaxfl.client import LocalTraining, make_client_update
from jaxfl.transforms import keep_top_fraction, prunefl


def test_keep_top_fraction_keeps_exactly_the_largest():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(7, 9)).astype(np.float32)
  m = np.asarray(keep_top_fraction(jnp.asarray(s), 0.3))
  k = int(np.ceil(0.3 * 63))
  assert m.sum() == k
  assert s[m].min() >= s[~m].max()
  assert np.asarray(keep_top_fraction(jnp.asarray(s), 1.0)).all()


def test_transform_matches_numpy_reference():
  rng = np.random.default_rng(1)
  shapes = {"k": (6, 5), "b": (5,)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  tx = prunefl(0.4, 3)
  state = tx.init(params)
  step = jax.jit(tx.update)
  acc = np.zeros(shapes["k"])
  mask = np.ones(shapes["k"], bool)
  for r in range(8):
    g = {k: rng.normal(size=(4,) + s).astype(np.float32) for k, s in shapes.items()}
    w = np.array([1.0, 2.0, 0.0, 1.0], np.float32)
    upd = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    out, state = step(upd, state, client_grad_sums=g, client_weights=jnp.asarray(w))
    np.testing.assert_allclose(out["k"], np.asarray(upd["k"]) * mask, rtol=1e-6)
    np.testing.assert_allclose(out["b"], upd["b"], rtol=1e-6)
    acc += np.tensordot(w / w.sum(), np.float64(g["k"]) ** 2, axes=1)
    if (r + 1) % 3 == 0:
      flat = acc.ravel()
      k = int(np.ceil(0.4 * flat.size))
      mask = np.zeros(flat.size, bool)
      mask[np.argsort(-flat, kind="stable")[:k]] = True
      mask = mask.reshape(acc.shape)
      acc = np.zeros_like(acc)
    np.testing.assert_array_equal(np.asarray(state.train_mask["k"]), mask)
    np.testing.assert_allclose(state.importance["k"], acc, rtol=1e-5, atol=1e-7)
    assert bool(state.train_mask["b"])
  with pytest.raises(ValueError, match="client_grad_sums"):
    tx.update(params, tx.init(params))
  for kw in ({"keep": 0.0}, {"reconfig_every": 0}):
    with pytest.raises(ValueError, match=list(kw)[0]):
      prunefl(**kw)


def test_grad_sum_is_the_sum_of_step_gradients():
  """Plain SGD, no mask: delta = lr * sum of gradients."""
  data = tiny_data(num_clients=3, seed=2)
  model = jaxfl.models.mlp((5,), 3, hidden=(6,))
  lt = LocalTraining(optax.sgd(0.1), batch_size=3, local_steps=4, track_grad_sum=True)
  cu = jax.jit(make_client_update(model, lt, data.max_client_size))
  params, ms = model.init(jax.random.key(0))
  out = cu(params, ms, data.x, data.y, data.client_indices[1], data.client_sizes[1],
           jax.random.key(1))
  jax.tree.map(lambda d, g: np.testing.assert_allclose(d, 0.1 * g, rtol=1e-5, atol=1e-7),
               out.delta, out.grad_sum)


def test_round_trains_only_kept_entries_and_counts_mask_ones():
  data = tiny_data(num_clients=6, seed=4)
  model = jaxfl.models.mlp((5,), 3, hidden=(8,))
  algo = jaxfl.algorithms.prunefl(0.5, 2, local_steps=2, client_lr=0.1, batch_size=3)
  res = jaxfl.simulate(algo, model, data, rounds=2, clients_per_round=3, progress=False)
  mask = res.state.opt_state[0].train_mask
  n = jaxfl.tree.num_params(res.state.params)
  ones = sum(int(np.sum(np.broadcast_to(m, p.shape)))
             for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(res.state.params)))
  assert ones < n
  more = jaxfl.simulate(algo, model, data, rounds=3, clients_per_round=3, progress=False)
  # Round 2 (0-based) trains with the mask chosen at the end of round 1: nothing outside it
  # moves, and every client uploads exactly the mask's ones.
  moved = jax.tree.map(lambda a, b: np.asarray(a) != np.asarray(b), res.state.params,
                       more.state.params)
  jax.tree.map(lambda mv, m: np.testing.assert_array_equal(mv & ~np.asarray(m), False),
               moved, mask)
  assert any(np.any(m) for m in jax.tree.leaves(moved))
  np.testing.assert_allclose(more.history[2]["uplink_elements"], 3 * ones)
  assert more.history[0]["uplink_elements"] == 3 * n
