"""The round's contracts are open: a sampler, a view and a memory written here, outside
``jaxfl/``, run inside the compiled round (1 device, chunked and vmapped), with no engine
change; and the built-in samplers and views behave as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_data

import jaxfl
from jaxfl.data import device_data


def round_robin() -> jaxfl.sampling.ClientSampler:
  """Clients 0..m-1, then m..2m-1, ...: a stateful sampler (next client in its state)."""

  def init(num_clients, cohort_size):
    return jnp.zeros([], jnp.int32)

  def select(key, state, round, *, num_clients, cohort_size, **context):
    return ((state + jnp.arange(cohort_size)) % num_clients).astype(jnp.int32)

  def update(state, ids, metrics):
    return state + ids.shape[0]

  return jaxfl.sampling.ClientSampler(init, select, update)


def frozen_biases() -> jaxfl.views.ClientView:
  """Clients neither train nor upload any bias (ndim < 2)."""

  def apply(server, slot, row):
    mask = jax.tree.map(lambda p: jnp.asarray(p.ndim >= 2, jnp.float32), server.params)
    return jaxfl.views.ClientStart(train_mask=mask, upload_mask=mask)

  return jaxfl.views.ClientView(apply)


def participation_count() -> jaxfl.memory.ClientMemory:
  """Per client: how often it took part, and the mean loss of its last round."""
  return jaxfl.memory.per_client(
      init_row=lambda params: (jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32)),
      write=lambda row, result, before, after: (row[0] + result.finite.astype(jnp.int32),
                                                result.loss))


@pytest.mark.parametrize("chunk", ["auto", None])
def test_contracts_defined_outside_jaxfl_run_in_the_compiled_round(chunk):
  data = tiny_data(num_clients=7, seed=2)
  model = jaxfl.models.mlp((5,), 3, hidden=(6,))
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=3)
  algo = algo._replace(sampler=round_robin(), view=frozen_biases(),
                       memory=participation_count())
  rnd = jaxfl.build_round(algo, model, num_clients=7, max_client_size=data.max_client_size,
                          clients_per_round=3, donate=False, clients_per_chunk=chunk)
  state = rnd.init(jax.random.key(0))
  biases0 = {k: v["bias"] for k, v in state.params.items()}
  dd = device_data(data)
  seen = []
  for r in range(5):
    state, m = rnd.step(state, dd, jax.random.key(r))
    seen.append(np.asarray(state.cohort).tolist())
  assert rnd.step._cache_size() == 1  # one compilation for every round
  assert seen == [[(3 * r + i) % 7 for i in range(3)] for r in range(5)]
  assert int(state.sampler_state) == 15
  counts = np.asarray(state.memory[0])
  np.testing.assert_array_equal(counts, np.bincount(np.ravel(seen), minlength=7))
  assert np.all(np.asarray(state.memory[1])[counts > 0] > 0)  # last losses were written
  for k, b in biases0.items():  # never trained, never uploaded: bit-unchanged
    np.testing.assert_array_equal(state.params[k]["bias"], b)
    assert not np.array_equal(state.params[k]["kernel"], rnd.init(jax.random.key(0)).params[k][
        "kernel"])
  kernels = sum(v["kernel"].size for v in state.params.values())
  assert float(m["uplink_elements"]) == 3 * kernels  # the ledger reads the declared mask


def test_uniform_sampler_frequencies_and_distinct_ids():
  s = jaxfl.sampling.uniform()
  st = s.init(10, 4)
  draws = jax.vmap(lambda k: s.select(k, st, 0, num_clients=10, cohort_size=4))(
      jax.random.split(jax.random.key(0), 4000))
  draws = np.asarray(draws)
  assert all(len(set(row)) == 4 for row in draws[:200])
  freq = np.bincount(draws.ravel(), minlength=10) / draws.size
  np.testing.assert_allclose(freq, 0.1, atol=0.01)


def test_periodic_sampler_keeps_the_cohort_for_its_period():
  s = jaxfl.sampling.periodic(3)
  st = s.init(20, 5)
  cohorts = []
  for r in range(9):
    ids = s.select(jax.random.key(r), st, jnp.asarray(r), num_clients=20, cohort_size=5)
    st = s.update(st, ids, None)
    cohorts.append(tuple(np.asarray(ids)))
  assert cohorts[0] == cohorts[1] == cohorts[2] and cohorts[3] == cohorts[5]
  assert len({cohorts[0], cohorts[3], cohorts[6]}) == 3


def test_fixed_schedule_replays_and_rejects_bad_schedules():
  sched = [[0, 1], [2, 3], [4, 0]]
  s = jaxfl.sampling.fixed_schedule(sched)
  st = s.init(5, 2)
  got = [np.asarray(s.select(None, st, jnp.asarray(r), num_clients=5, cohort_size=2)).tolist()
         for r in range(4)]
  assert got == [[0, 1], [2, 3], [4, 0], [0, 1]]
  with pytest.raises(ValueError, match="clients_per_round"):
    s.init(5, 3)
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    s.init(4, 2)
  with pytest.raises(ValueError, match="repeats"):
    jaxfl.sampling.fixed_schedule([[1, 1]])
  # refused by build_round, before any compile
  algo = jaxfl.algorithms.fedavg(local_steps=1)._replace(sampler=s)
  with pytest.raises(ValueError, match="cohorts"):
    jaxfl.build_round(algo, jaxfl.models.mlp((5,), 3), num_clients=4, max_client_size=3,
                      clients_per_round=2)


def test_bad_contract_types_are_named_before_compiling():
  algo = jaxfl.algorithms.fedavg(local_steps=1)
  model = jaxfl.models.mlp((5,), 3)
  for field, bad in (("sampler", "uniform"), ("view", lambda *a: None), ("memory", 3),
                     ("ledger", None), ("aggregator", jaxfl.aggregation.weighted_mean)):
    with pytest.raises(TypeError, match=f"`{field}`"):
      jaxfl.build_round(algo._replace(**{field: bad}), model, num_clients=4,
                        max_client_size=3, clients_per_round=2)
  for field in ("model_size", "downlink"):
    with pytest.raises(TypeError, match=f"`ledger.{field}`"):
      jaxfl.build_round(algo._replace(ledger=algo.ledger._replace(**{field: 7})), model,
                        num_clients=4, max_client_size=3, clients_per_round=2)


def test_memory_rows_lie_along_the_client_axis_and_per_slot_keeps_uncommitted_rows():
  mem = jaxfl.memory.per_slot(lambda p: p, lambda row, res, b, a: row + 1.0)
  m = mem.init(jnp.zeros([2]), 9, 4)
  assert m.shape == (4, 2)
  rows = mem.gather(m, jnp.arange(4), jnp.arange(4)) + 5.0
  out = mem.scatter(m, jnp.arange(4), jnp.arange(4), rows, jnp.array([1.0, 0.0, 1.0, 0.0]))
  np.testing.assert_array_equal(out[:, 0], [5.0, 0.0, 5.0, 0.0])
  pc = jaxfl.memory.per_client(lambda p: p, lambda row, res, b, a: row)
  m = pc.init(jnp.zeros([2]), 6, 3)
  out = pc.scatter(m, jnp.array([5, 1, 0]), jnp.arange(3), jnp.ones([3, 2]),
                   jnp.array([1.0, 1.0, 0.0]))
  np.testing.assert_array_equal(out[:, 0], [0, 1, 0, 0, 0, 1])


def test_an_algorithm_s_own_client_update_replaces_local_training():
  """``Algorithm.client_update``: the round trains each client with the factory's update. Here
  a client that doubles every upload: the global model moves twice as far as plain FedAvg's."""
  from jaxfl.client import make_client_update

  def doubled(model, local, max_client_size):
    update = make_client_update(model, local, max_client_size)

    def client_update(*args, **kwargs):
      out = update(*args, **kwargs)
      return out._replace(delta=jax.tree.map(lambda d: 2.0 * d, out.delta))

    return client_update

  data = tiny_data(num_clients=5, seed=3)
  model = jaxfl.models.mlp((5,), 3, hidden=(6,))
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=3)
  moved = []
  for a in (algo, algo._replace(client_update=doubled)):
    rnd = jaxfl.build_round(a, model, num_clients=5, max_client_size=data.max_client_size,
                            clients_per_round=3, donate=False)
    state = rnd.init(jax.random.key(0))
    new, _ = rnd.step(state, device_data(data), jax.random.key(1))
    moved.append(jax.tree.map(lambda p, q: np.asarray(q - p), state.params, new.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, 2.0 * a, rtol=1e-5, atol=1e-7),
               *moved)
