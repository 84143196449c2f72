"""SCAFFOLD and FedNova, built only from the public contracts, against loop references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_data

import jaxfl
from jaxfl.client import make_client_update
from jaxfl.data import device_data


def _ce(params, model, x, y):
  logits, _ = model.apply(params, {}, x, train=True)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


_grad_ce = jax.jit(jax.grad(_ce), static_argnums=1)


@pytest.mark.parametrize("seed", [0, 1])
def test_scaffold_equals_a_plain_loop_over_clients(seed):
  """Full-batch clients (batch >= size): every local step is deterministic, so SCAFFOLD
  option II written as a loop over clients (un-vmapped jax.grad, float64 bookkeeping) must
  give the same model, server control variate and client control variates."""
  data = tiny_data(num_clients=6, seed=seed)
  model = jaxfl.models.mlp((5,), 3, hidden=(7,))
  rng = np.random.default_rng(seed)
  schedule = np.stack([rng.permutation(6)[:3] for _ in range(4)])
  lr, steps, server_lr = 0.2, 3, 0.8
  algo = jaxfl.algorithms.scaffold(6, server_lr=server_lr, client_lr=lr, local_steps=steps,
                                   batch_size=data.max_client_size)
  algo = algo._replace(sampler=jaxfl.sampling.fixed_schedule(schedule))
  rnd = jaxfl.build_round(algo, model, num_clients=6, max_client_size=data.max_client_size,
                          clients_per_round=3, donate=False)
  state = rnd.init(jax.random.key(seed))
  f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
  x = f64(state.params)
  c = jax.tree.map(np.zeros_like, x)
  ci = [jax.tree.map(np.zeros_like, x) for _ in range(6)]
  dd = device_data(data)
  for r in range(4):
    state, m = rnd.step(state, dd, jax.random.key(100 + r))
    deltas, dcs = [], []
    for cid in schedule[r]:
      idx = data.client_indices[cid, : data.client_sizes[cid]]
      xb, yb = jnp.asarray(data.x[idx]), jnp.asarray(data.y[idx])
      y = x
      for _ in range(steps):
        g = f64(_grad_ce(jax.tree.map(jnp.float32, y), model, xb, yb))
        y = jax.tree.map(lambda a, gi, cc, cl: a - lr * (gi - cl + cc), y, g, c, ci[cid])
      new_ci = jax.tree.map(lambda cl, cc, a, b: cl - cc + (a - b) / (steps * lr), ci[cid], c,
                            x, y)
      dcs.append(jax.tree.map(np.subtract, new_ci, ci[cid]))
      ci[cid] = new_ci
      deltas.append(jax.tree.map(np.subtract, x, y))
    x = jax.tree.map(lambda a, *d: a - server_lr * np.mean(d, axis=0), x, *deltas)
    c = jax.tree.map(lambda a, *d: a + np.sum(d, axis=0) / 6, c, *dcs)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    jax.tree.map(close, state.params, x)
    jax.tree.map(close, state.opt_state[0].control, c)
    for cid in range(6):
      jax.tree.map(lambda mem, ref, i=cid: close(mem[i], ref), state.memory, ci[cid])
    # two model-sized uploads (Delta y, Delta c) per client
    assert float(m["uplink_elements"]) == 3 * 2 * jaxfl.tree.num_params(state.params)


def _fednova_reference(deltas, weights, steps, momentum):
  a = np.asarray(steps, np.float64)
  if momentum:
    a = (a - momentum * (1 - momentum ** a) / (1 - momentum)) / (1 - momentum)
  p = np.asarray(weights, np.float64) / np.sum(weights)
  tau_eff = np.sum(p * a)
  return tau_eff * np.tensordot(p / a, np.asarray(deltas, np.float64), axes=1)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fednova_aggregator_matches_numpy_float64(momentum):
  rng = np.random.default_rng(int(momentum * 10))
  agg = jaxfl.aggregation.fednova(momentum)
  for _ in range(3):
    u = rng.normal(size=(7, 4, 3)).astype(np.float32)
    w = rng.integers(1, 20, 7).astype(np.float32)
    w[rng.integers(0, 7)] = 0.0  # a quarantined client
    steps = rng.integers(1, 12, 7).astype(np.float32)
    metrics = {"steps": jnp.asarray(steps)}
    got, _ = jax.jit(lambda u, w, m: agg.update(u, agg.init(u[0]), weights=w,
                                                client_metrics=m))(u, w, metrics)
    keep = w > 0
    want = _fednova_reference(u[keep], w[keep], steps[keep], momentum)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    # the streamed form (coefficients, sums, finalize) equals the stacked update
    c, scalars = agg.coefficients(jnp.asarray(w), metrics)
    streamed = agg.finalize(jnp.tensordot(c, u, axes=1),
                            {k: jnp.sum(v) for k, v in scalars.items()})
    np.testing.assert_allclose(streamed, got, rtol=1e-5, atol=1e-6)


def test_fednova_round_equals_unvmapped_clients_with_ragged_steps():
  """One local epoch over clients of different sizes (ragged step counts): the round equals
  calling the client update client by client and applying the FedNova formula in float64."""
  data = tiny_data(num_clients=6, sizes=[2, 9, 4, 7, 3, 8], seed=4)
  model = jaxfl.models.mlp((5,), 3, hidden=(7,))
  algo = jaxfl.algorithms.fednova(client_lr=0.1, client_momentum=0.5, batch_size=2,
                                  local_epochs=1.0, server_lr=0.9)
  rnd = jaxfl.build_round(algo, model, num_clients=6, max_client_size=data.max_client_size,
                          clients_per_round=4, donate=False)
  state = rnd.init(jax.random.key(0))
  key = jax.random.key(9)
  new, _ = rnd.step(state, device_data(data), key)
  assert rnd.stream_aggregate  # linear: streamed chunk by chunk on CPU
  client_update = make_client_update(model, algo.local, data.max_client_size)
  _, _, k_clients, _, _ = jax.random.split(key, 5)
  deltas, ws, steps = [], [], []
  for slot, cid in enumerate(np.asarray(new.cohort)):
    k_train = jax.random.split(jax.random.fold_in(k_clients, slot))[0]
    out = client_update(state.params, {}, jnp.asarray(data.x), jnp.asarray(data.y),
                        jnp.asarray(data.client_indices[cid]),
                        jnp.asarray(data.client_sizes[cid]), k_train)
    deltas.append(out.delta)
    ws.append(float(data.client_sizes[cid]))
    steps.append(float(out.metrics["steps"]))
  assert len(set(steps)) > 1  # the clients really took different numbers of steps
  want = jax.tree.map(lambda p, *d: np.asarray(p, np.float64) - 0.9 * _fednova_reference(
      np.stack(d), ws, steps, 0.5), state.params, *deltas)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new.params, want)
  # with equal steps FedNova is FedAvg
  eq = jaxfl.algorithms.fednova(client_lr=0.1, local_steps=3, local_epochs=None, batch_size=2)
  avg = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=3, batch_size=2)
  outs = []
  for a in (eq, avg):
    r = jaxfl.build_round(a, model, num_clients=6, max_client_size=data.max_client_size,
                          clients_per_round=4, donate=False)
    outs.append(r.step(r.init(jax.random.key(0)), device_data(data), key)[0].params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *outs)
