"""The vmapped, jitted round against plain per-client references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_data, tiny_model

import jaxfl
from jaxfl.client import make_client_update
from jaxfl.data import device_data
from jaxfl.round import build_round


def _round(algo, model, data, cohort, **kw):
  return build_round(algo, model, num_clients=data.num_clients,
                     max_client_size=data.max_client_size, clients_per_round=cohort,
                     donate=False, **kw)


def _ce(params, model, x, y):
  logits, _ = model.apply(params, {}, x, train=True)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


_grad_ce = jax.jit(jax.grad(_ce), static_argnums=1)


@pytest.mark.parametrize("seed,weighting", [(0, "examples"), (1, "uniform"), (2, "examples")])
def test_full_batch_round_equals_python_loop_reference(seed, weighting):
  """Batch >= client size: each local step is full-batch GD on the client's own data, so an
  independent loop over clients (plain jax.grad, no vmap/scan/jit) must give the same model."""
  data = tiny_data(num_clients=7, seed=seed)
  model = tiny_model()
  lr, steps, server_lr = 0.3, 3, 0.7
  algo = jaxfl.algorithms.fedavg(client_lr=lr, local_steps=steps,
                                 batch_size=data.max_client_size, server_lr=server_lr,
                                 weighting=weighting)
  rnd = _round(algo, model, data, cohort=4)
  state = rnd.init(jax.random.key(seed))
  new_state, metrics = rnd.step(state, device_data(data), jax.random.key(100 + seed))

  params0 = jax.tree.map(np.asarray, state.params)
  deltas, weights = [], []
  for cid in np.asarray(new_state.cohort):
    idx = data.client_indices[cid, : data.client_sizes[cid]]
    x, y = jnp.asarray(data.x[idx]), jnp.asarray(data.y[idx])
    p = params0
    for _ in range(steps):
      g = _grad_ce(p, model, x, y)
      p = jax.tree.map(lambda a, b: a - lr * b, p, g)
    deltas.append(jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b), params0, p))
    weights.append(float(data.client_sizes[cid]) if weighting == "examples" else 1.0)
  w = np.array(weights) / np.sum(weights)
  expected = jax.tree.map(lambda p0, *ds: p0 - server_lr * sum(wi * d for wi, d in zip(w, ds)),
                          params0, *deltas)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
               new_state.params, expected)
  assert float(metrics["participants"]) == 4
  assert len(set(np.asarray(new_state.cohort).tolist())) == 4  # without replacement


def test_vmapped_round_equals_unvmapped_client_loop(data, model):
  """Minibatch local SGD with momentum: the round equals calling the (unvmapped) client
  update client by client with the same per-client keys, then averaging by hand."""
  algo = jaxfl.algorithms.fedavgm(client_lr=0.1, client_momentum=0.9, local_steps=4,
                                  batch_size=3, server_lr=0.5, server_momentum=0.9)
  rnd = _round(algo, model, data, cohort=3)
  state = rnd.init(jax.random.key(0))
  key = jax.random.key(7)
  new_state, _ = rnd.step(state, device_data(data), key)

  client_update = make_client_update(model, algo.local, data.max_client_size)
  _, _, k_clients, _, _ = jax.random.split(key, 5)
  deltas, ws = [], []
  for slot, cid in enumerate(np.asarray(new_state.cohort)):
    k_train = jax.random.split(jax.random.fold_in(k_clients, slot))[0]
    out = client_update(state.params, {}, jnp.asarray(data.x), jnp.asarray(data.y),
                        jnp.asarray(data.client_indices[cid]),
                        jnp.asarray(data.client_sizes[cid]), k_train)
    deltas.append(out.delta)
    ws.append(float(data.client_sizes[cid]))
  w = np.array(ws) / sum(ws)
  mean = jax.tree.map(lambda *ds: sum(wi * np.asarray(d) for wi, d in zip(w, ds)), *deltas)
  # server SGD with momentum from zero: first step is -lr * g
  expected = jax.tree.map(lambda p, g: np.asarray(p) - 0.5 * g, state.params, mean)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_state.params, expected)


def test_one_client_full_batch_one_step_is_centralized_gd(model):
  data = tiny_data(num_clients=1, sizes=[11])
  algo = jaxfl.algorithms.fedavg(client_lr=0.2, local_steps=1, batch_size=11)
  rnd = _round(algo, model, data, cohort=1)
  state = rnd.init(jax.random.key(3))
  new_state, _ = rnd.step(state, device_data(data), jax.random.key(4))
  g = _grad_ce(state.params, model, jnp.asarray(data.x), jnp.asarray(data.y))
  expected = jax.tree.map(lambda p, gi: p - 0.2 * gi, state.params, g)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               new_state.params, expected)


def test_padding_examples_is_inert(model):
  """Padded example slots point at a NaN row: if padding were ever used, params would be NaN.
  Extra padding (larger n_max) must not change the result either."""
  base = tiny_data(num_clients=5, seed=3)
  nan_row = np.full((1,) + base.x.shape[1:], np.nan, np.float32)
  x = np.concatenate([base.x, nan_row])
  pad = np.full((base.num_clients, 6), len(base.x), np.int32)
  idx = np.concatenate([base.client_indices, pad], axis=1)
  mask = np.arange(base.max_client_size)[None] < base.client_sizes[:, None]
  idx[:, : base.max_client_size] = np.where(mask, base.client_indices, len(base.x))
  padded = base._replace(x=x, y=np.concatenate([base.y, [0]]).astype(np.int32),
                         client_indices=idx)
  for local in (dict(local_steps=4), dict(local_epochs=2.0)):
    algo = jaxfl.algorithms.fedavg(client_lr=0.1, batch_size=3, **local)
    outs = []
    for d in (base, padded):
      rnd = _round(algo, model, d, cohort=3)
      st, m = rnd.step(rnd.init(jax.random.key(0)), device_data(d), jax.random.key(1))
      outs.append((st.params, m))
    assert float(outs[1][1]["nonfinite_clients"]) == 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 outs[0][0], outs[1][0])
    assert float(outs[0][1]["examples"]) == float(outs[1][1]["examples"])


def test_epoch_mode_processes_each_example_once_per_epoch(model):
  data = tiny_data(num_clients=4, sizes=[2, 5, 7, 9])
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, batch_size=3, local_epochs=2.0)
  rnd = _round(algo, model, data, cohort=4)
  st, m = rnd.step(rnd.init(jax.random.key(0)), device_data(data), jax.random.key(1))
  assert float(m["examples"]) == 2 * (2 + 5 + 7 + 9)


def test_zero_weight_clients_are_inert(data, model):
  """A cohort padded with zero-weight clients (as for device counts) gives the same model."""
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=4)
  rnd = _round(algo, model, data, cohort=3)
  state = rnd.init(jax.random.key(0))
  ref, _ = rnd.step(state, device_data(data), jax.random.key(5))

  class FakeMesh:  # pads the cohort to a multiple of 4 devices without real devices
    class devices:
      size = 4
  from jaxfl import sharding
  assert sharding.padded_cohort_size(3, FakeMesh) == 4
  rnd_chunked = _round(algo, model, data, cohort=3, clients_per_chunk=2)  # pads to 4
  assert rnd_chunked.padded_cohort_size == 4
  out, m = rnd_chunked.step(state, device_data(data), jax.random.key(5))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               ref.params, out.params)
  assert float(m["participants"]) == 3


class _TinyBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.Dense(3)(nn.relu(x))


def test_chunked_equals_unchunked_with_batchnorm():
  data = tiny_data(num_clients=9, dim=4, seed=5)
  model = jaxfl.models.from_linen(_TinyBN(), (4,))
  algo = jaxfl.algorithms.fedavg(client_lr=0.05, local_steps=2, batch_size=3)
  outs = []
  for chunk in (None, 2, 7):
    rnd = _round(algo, model, data, cohort=7, clients_per_chunk=chunk)
    st, _ = rnd.step(rnd.init(jax.random.key(0)), device_data(data), jax.random.key(2))
    outs.append(st)
  for st in outs[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 (outs[0].params, outs[0].model_state), (st.params, st.model_state))
  # BN statistics moved away from their init and were averaged back to the server
  assert not np.allclose(outs[0].model_state["batch_stats"]["BatchNorm_0"]["mean"], 0.0)


def test_layerwise_methods_run_a_batchnorm_model():
  """FedLAMA (per-layer intervals over client memory) and FedLUAR (recycled layers) on a model
  with BatchNorm statistics: the statistics are trained and averaged back, nothing goes
  non-finite (the CIFAR-10 / ResNet-20 smoke in experiments_test runs FedLUAR at full size)."""
  data = tiny_data(num_clients=9, dim=4, seed=5)
  model = jaxfl.models.from_linen(_TinyBN(), (4,))
  for algo in (jaxfl.algorithms.fedlama(2, local_steps=2, warmup_rounds=0, client_lr=0.05,
                                        batch_size=3),
               jaxfl.algorithms.fedluar(1, local_steps=2, client_lr=0.05, batch_size=3)):
    rnd = _round(algo, model, data, cohort=5)
    st = rnd.init(jax.random.key(0))
    for r in range(3):
      st, m = rnd.step(st, device_data(data), jax.random.key(r))
      assert float(m["participants"]) == 5, algo.name
    assert jaxfl.tree.all_finite((st.params, st.model_state)), algo.name
    assert not np.allclose(st.model_state["batch_stats"]["BatchNorm_0"]["mean"], 0.0), algo.name


def test_nonfinite_client_is_quarantined(model):
  data = tiny_data(num_clients=4, sizes=[3, 3, 3, 3])
  bad = data.x.copy()
  bad[data.client_indices[2, 0]] = np.inf  # client 2 produces a non-finite update
  data_bad = data._replace(x=bad)
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=3)
  rnd = _round(algo, model, data_bad, cohort=4)
  st, m = rnd.step(rnd.init(jax.random.key(0)), device_data(data_bad), jax.random.key(1))
  assert float(m["nonfinite_clients"]) == 1 and float(m["participants"]) == 3
  assert jaxfl.tree.all_finite(st.params)
  # equals the round over the three good clients only (all four are in the cohort)
  client_update = make_client_update(model, algo.local, data.max_client_size)
  _, _, k_clients, _, _ = jax.random.split(jax.random.key(1), 5)
  params0 = rnd.init(jax.random.key(0)).params
  deltas = []
  for slot, cid in enumerate(np.asarray(st.cohort)):
    if cid == 2:
      continue
    k = jax.random.split(jax.random.fold_in(k_clients, slot))[0]
    deltas.append(client_update(params0, {}, jnp.asarray(data.x), jnp.asarray(data.y),
                                jnp.asarray(data.client_indices[cid]),
                                jnp.asarray(data.client_sizes[cid]), k).delta)
  expected = jax.tree.map(lambda p, *ds: p - sum(ds) / 3, params0, *deltas)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               st.params, expected)


def test_dropout_rate_removes_clients(data, model):
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=1, batch_size=4)
  rnd = _round(algo, model, data, cohort=6, dropout_rate=0.5)
  parts = []
  st = rnd.init(jax.random.key(0))
  for r in range(20):
    st, m = rnd.step(st, device_data(data), jax.random.key(r))
    parts.append(float(m["participants"]))
    assert float(m["rel_uplink"]) == 1.0 or float(m["participants"]) == 0
  assert 1.0 < np.mean(parts) < 5.0  # about half of 6


def test_comm_accounting_counts_full_model_per_participant(data, model):
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=1, batch_size=4)
  rnd = _round(algo, model, data, cohort=4)
  st = rnd.init(jax.random.key(0))
  n = jaxfl.tree.num_params(st.params)
  st2, m = rnd.step(st, device_data(data), jax.random.key(1))
  assert float(m["uplink_elements"]) == 4 * n
  assert float(m["uplink_bytes"]) == 4 * n * 4
  assert float(m["downlink_bytes"]) == 4 * n * 4
  assert float(m["rel_uplink"]) == 1.0
  sizes = jaxfl.tree.leaf_sizes(st.params)
  jax.tree.map(lambda c, s: np.testing.assert_equal(float(c), 4 * s), st2.uplink_elements, sizes)


def test_one_compilation_for_many_rounds(data, model):
  algo = jaxfl.algorithms.fedadam(client_lr=0.1, local_steps=2, batch_size=4)
  rnd = build_round(algo, model, num_clients=data.num_clients,
                    max_client_size=data.max_client_size, clients_per_round=3)
  dd = device_data(data)
  state = jax.tree.map(np.asarray, rnd.init(jax.random.key(0)))
  traces = []
  import logging

  class Count(logging.Handler):
    def emit(self, record):
      if "Finished XLA compilation of jit(step)" in record.getMessage():
        traces.append(record.getMessage())

  h = Count()
  logger = logging.getLogger("jax")
  logger.addHandler(h)
  try:
    with jax.log_compiles(True):
      for r in range(5):
        state, _ = rnd.step(state, dd, jax.random.fold_in(jax.random.key(1), r))
      jax.block_until_ready(state)
  finally:
    logger.removeHandler(h)
  assert len(traces) == 1, traces


def test_stream_aggregate_follows_the_declared_kinds(data, model):
  """Streaming is decided by declarations (a LinearAggregator, no ``server_inputs``), never
  by tracing the server transform; a transform that reads updates must declare it."""
  import optax

  from jaxfl.aggregation import coordinate_median

  def build(algo, **kw):
    return _round(algo, model, data, cohort=4, **kw)

  fedavg = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=3)
  assert build(fedavg, clients_per_chunk=1).stream_aggregate
  assert not build(fedavg, clients_per_chunk=None).stream_aggregate  # one chunk: stacked
  assert not build(fedavg._replace(aggregator=coordinate_median()),
                   clients_per_chunk=1).stream_aggregate

  def reads_updates():  # a server transform that looks at every client's update
    def update(u, state, params=None, *, client_updates=None, **extra):
      return jax.tree.map(lambda a, c: a + 0.0 * jnp.max(c), u, client_updates), state
    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

  declared = fedavg._replace(server_optimizer=reads_updates(), server_inputs=("client_updates",))
  assert not build(declared, clients_per_chunk=1).stream_aggregate
  rnd = build(declared, clients_per_chunk=1)
  rnd.step(rnd.init(jax.random.key(0)), device_data(data), jax.random.key(3))
  with pytest.raises(ValueError, match="stream_aggregate=True"):
    build(declared, clients_per_chunk=1, stream_aggregate=True)
  with pytest.raises(ValueError, match="server_inputs"):
    build(fedavg._replace(server_inputs=("client_update",)))
  # undeclared: the transform gets client_updates=None (a clear failure, not a silent guess)
  undeclared = build(fedavg._replace(server_optimizer=reads_updates()), clients_per_chunk=1)
  assert undeclared.stream_aggregate
  with pytest.raises((TypeError, AttributeError, ValueError)):
    undeclared.step(undeclared.init(jax.random.key(0)), device_data(data), jax.random.key(3))
  lama = jaxfl.algorithms.fedlama(2, local_steps=2, client_lr=0.1, batch_size=3)
  assert not build(lama, clients_per_chunk=1).stream_aggregate
  # streamed and stacked aggregation give the same round
  outs = []
  for stream in (True, False):
    rnd = build(fedavg, clients_per_chunk=1, stream_aggregate=stream)
    assert rnd.stream_aggregate == stream
    state, m = rnd.step(rnd.init(jax.random.key(0)), device_data(data), jax.random.key(3))
    outs.append((state.params, m["train_loss"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *outs)
  with pytest.raises(ValueError, match="stream_aggregate"):
    build(fedavg, stream_aggregate="yes")



def _global_norm64(tree):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize("seed", [0, 1])
def test_grad_norm_is_reported_only_when_asked_and_equals_the_client_loop_reference(seed):
  """``report_grad_norm=True`` adds ``grad_norm``: the participants' mean of each client's
  mean per-step gradient norm (full-batch steps, so an independent loop gives the same
  gradients); without it the metric is absent and the model is the same bit for bit."""
  data = tiny_data(num_clients=7, seed=seed)
  model = tiny_model()
  lr, steps = 0.3, 3
  algo = jaxfl.algorithms.fedavg(client_lr=lr, local_steps=steps,
                                 batch_size=data.max_client_size)
  dd = device_data(data)
  key = jax.random.key(100 + seed)
  plain = _round(algo, model, data, cohort=4)
  reported = _round(algo, model, data, cohort=4, report_grad_norm=True)
  state = plain.init(jax.random.key(seed))
  s_plain, m_plain = plain.step(state, dd, key)
  s_rep, m_rep = reported.step(state, dd, key)
  assert "grad_norm" not in m_plain
  jax.tree.map(np.testing.assert_array_equal, s_plain.params, s_rep.params)

  norms = []
  for cid in np.asarray(s_rep.cohort):
    idx = data.client_indices[cid, : data.client_sizes[cid]]
    x, y = jnp.asarray(data.x[idx]), jnp.asarray(data.y[idx])
    p, per_step = jax.tree.map(np.asarray, state.params), []
    for _ in range(steps):
      g = _grad_ce(p, model, x, y)
      per_step.append(_global_norm64(g))
      p = jax.tree.map(lambda a, b: a - lr * b, p, g)
    norms.append(np.mean(per_step))
  np.testing.assert_allclose(float(m_rep["grad_norm"]), np.mean(norms), rtol=1e-5)


def _sqrt_ops(rnd, data):
  state = rnd.init(jax.random.key(0))
  text = rnd.step.lower(state, device_data(data), jax.random.key(1)).compile().as_text()
  return text.count(" sqrt(")


def test_an_unread_grad_norm_is_not_computed(data, model):
  """Nothing reads the per-step gradient norms of a uniform-sampler FedAvg round unless the
  round reports them, so the compiled round computes fewer square roots; a sampler that reads
  them (multi-metric) keeps them whether or not they are reported."""
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=3, batch_size=4)
  build = lambda a, **kw: _round(a, model, data, cohort=3, **kw)
  mm = algo._replace(sampler=jaxfl.sampling.multi_metric(extra=1))
  plain, reported = (_sqrt_ops(build(algo, report_grad_norm=r), data) for r in (False, True))
  mm_plain, mm_reported = (_sqrt_ops(build(mm, report_grad_norm=r), data) for r in (False, True))
  assert plain < reported
  assert mm_plain == mm_reported > plain


def test_report_grad_norm_must_be_a_bool(data, model):
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=1, batch_size=4)
  with pytest.raises(TypeError, match="report_grad_norm"):
    _round(algo, model, data, cohort=2, report_grad_norm="yes")
