"""FedMut (a server transform + a client view) against a plain loop over clients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_data

import jaxfl
from jaxfl.data import device_data
from jaxfl.views import ServerSnapshot, SlotInfo


def _ce(params, model, x, y):
  logits, _ = model.apply(params, {}, x, train=True)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


_grad_ce = jax.jit(jax.grad(_ce), static_argnums=1)


@pytest.mark.parametrize("cohort,seed", [(4, 0), (3, 1)])
def test_fedmut_equals_a_plain_loop_over_clients(cohort, seed):
  """Full-batch clients, so local SGD with momentum is deterministic. The loop: round t's
  slot i starts from x_t + alpha v_i (x_t - x_{t-1}) per leaf, trains in float64, and the
  server takes the unweighted mean of the uploads x_t - x_i. The signs come from the key the
  server state holds before the round; every other step is the loop's own."""
  n, rounds, lr, mom, steps, alpha, server_lr = 6, 4, 0.3, 0.9, 3, 0.7, 0.9
  data = tiny_data(num_clients=n, seed=seed)
  model = jaxfl.models.mlp((5,), 3, hidden=(7,))
  rng = np.random.default_rng(seed)
  schedule = np.stack([rng.permutation(n)[:cohort] for _ in range(rounds)])
  algo = jaxfl.algorithms.fedmut(alpha, server_lr=server_lr, client_lr=lr,
                                 client_momentum=mom, local_steps=steps,
                                 batch_size=data.max_client_size)
  algo = algo._replace(sampler=jaxfl.sampling.fixed_schedule(schedule))
  rnd = jaxfl.build_round(algo, model, num_clients=n, max_client_size=data.max_client_size,
                          clients_per_round=cohort, donate=False)
  state = rnd.init(jax.random.key(seed))
  f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
  x = f64(state.params)
  d = jax.tree.map(np.zeros_like, x)  # x_t - x_{t-1}; zero before the first round
  dd = device_data(data)
  for r in range(rounds):
    num_leaves = len(jax.tree.leaves(x))
    signs = np.asarray(jaxfl.transforms.balanced_signs(state.opt_state[-1].key, num_leaves,
                                                       cohort), np.float64)
    assert np.all(signs.sum(axis=1) == 0) and np.all(np.abs(signs).sum(axis=1) == cohort // 2 * 2)
    state, m = rnd.step(state, dd, jax.random.key(100 + r))
    leaves, treedef = jax.tree.flatten(x)
    uploads, starts = [], []
    for i, cid in enumerate(schedule[r]):
      start = treedef.unflatten([p + alpha * signs[l, i] * dl for l, (p, dl)
                                 in enumerate(zip(leaves, jax.tree.leaves(d)))])
      starts.append(start)
      idx = data.client_indices[cid, : data.client_sizes[cid]]
      xb, yb = jnp.asarray(data.x[idx]), jnp.asarray(data.y[idx])
      y, buf = start, jax.tree.map(np.zeros_like, start)
      for _ in range(steps):
        g = f64(_grad_ce(jax.tree.map(jnp.float32, y), model, xb, yb))
        buf = jax.tree.map(lambda b, gi: mom * b + gi, buf, g)
        y = jax.tree.map(lambda a, b: a - lr * b, y, buf)
      uploads.append(jax.tree.map(np.subtract, x, y))
    # the mutations cancel over the cohort (an odd cohort's extra slot is unmutated)
    jax.tree.map(lambda a, *s: np.testing.assert_allclose(np.mean(s, 0), a, atol=1e-12), x,
                 *starts)
    new_x = jax.tree.map(lambda a, *u: a - server_lr * np.mean(u, axis=0), x, *uploads)
    d, x = jax.tree.map(np.subtract, new_x, x), new_x
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5)
    jax.tree.map(close, state.params, x)
    jax.tree.map(close, state.opt_state[-1].direction, d)
    assert float(m["uplink_elements"]) == cohort * jaxfl.tree.num_params(state.params)
  assert max(float(np.max(np.abs(v))) for v in jax.tree.leaves(d)) > 1e-3  # it moved


def test_fedmut_with_alpha_zero_is_fedavg_bit_for_bit():
  data = tiny_data(num_clients=6, seed=3)
  model = jaxfl.models.mlp((5,), 3, hidden=(7,))
  kw = dict(client_lr=0.1, client_momentum=0.9, local_steps=3, batch_size=4)
  runs = []
  for algo in (jaxfl.algorithms.fedmut(0.0, **kw),
               jaxfl.algorithms.fedavg(weighting="uniform", **kw)):
    rnd = jaxfl.build_round(algo, model, num_clients=6, max_client_size=data.max_client_size,
                            clients_per_round=4, donate=False)
    state = rnd.init(jax.random.key(0))
    for r in range(3):
      state, _ = rnd.step(state, device_data(data), jax.random.key(r))
    runs.append(state.params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), *runs)


def test_balanced_signs_are_balanced_permutations_that_differ_by_key_and_layer():
  s = np.asarray(jax.jit(jaxfl.transforms.balanced_signs, static_argnums=(1, 2))(
      jax.random.key(0), 64, 8))
  assert s.shape == (64, 8) and set(np.unique(s)) == {-1.0, 1.0}
  assert np.all(s.sum(axis=1) == 0)
  assert len({tuple(row) for row in s}) > 20  # layers are shuffled independently
  # every slot gets +1 about half the time
  assert np.all(np.abs((s > 0).mean(axis=0) - 0.5) < 0.25)
  odd = np.asarray(jaxfl.transforms.balanced_signs(jax.random.key(1), 16, 5))
  assert np.all((odd == 0).sum(axis=1) == 1) and np.all(odd.sum(axis=1) == 0)
  other = np.asarray(jaxfl.transforms.balanced_signs(jax.random.key(1), 64, 8))
  assert not np.array_equal(s, other)
  with pytest.raises(ValueError, match="cohort_size"):
    jaxfl.transforms.balanced_signs(jax.random.key(0), 3, 0)


def test_fedmut_direction_records_the_step_and_draws_a_fresh_key():
  tx = optax.chain(optax.sgd(0.5), jaxfl.transforms.fedmut_direction())
  params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
  state = tx.init(params)
  assert all(float(jnp.max(jnp.abs(v))) == 0 for v in jax.tree.leaves(state[-1].direction))
  g = {"w": jnp.array([1.0, -2.0, 4.0]), "b": jnp.asarray(2.0)}
  step = jax.jit(lambda g, s, k: tx.update(g, s, params, key=k))
  u, s1 = step(g, state, jax.random.key(5))
  np.testing.assert_array_equal(u["w"], -0.5 * g["w"])
  jax.tree.map(np.testing.assert_array_equal, s1[-1].direction, u)
  _, s2 = step(g, s1, jax.random.key(6))
  assert not np.array_equal(s1[-1].key, state[-1].key)
  assert not np.array_equal(s2[-1].key, s1[-1].key)


def test_fedmut_bad_arguments_are_refused_by_name():
  with pytest.raises(ValueError, match="alpha"):
    jaxfl.algorithms.fedmut(-0.1)
  with pytest.raises(ValueError, match="alpha"):
    jaxfl.algorithms.fedmut_view("big")
  view = jaxfl.algorithms.fedmut_view(0.5)
  params = {"w": jnp.ones((2,))}
  st = optax.chain(jaxfl.transforms.fedmut_direction()).init(params)
  snap = ServerSnapshot(params, {}, st, jnp.int32(0))
  with pytest.raises(ValueError, match="cohort_size"):
    view.apply(snap, SlotInfo(jnp.int32(0), jnp.int32(0), jax.random.key(0)), None)
