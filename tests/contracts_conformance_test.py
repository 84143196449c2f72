"""Conformance battery for every public aggregator and sampler, generated from ``__all__``.

A new public factory in :mod:`jaxfl.aggregation` or :mod:`jaxfl.sampling` is picked up
automatically; one that needs arguments must get them in ``ARGS`` (the test fails, naming
it, until it does), so nothing is skipped silently.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfl import aggregation, sampling


def _mean_finalize(total, sums):
  return jax.tree.map(lambda t: (t / sums["weight"]).astype(t.dtype), total)


ARGS = {  # required arguments of factories that have some
    "linear_aggregator": dict(coefficients=lambda w, m: (w, {"weight": w}),
                              finalize=_mean_finalize),
    "dp_mean": dict(clip_norm=1.0, noise_multiplier=0.5),
    "fixed_schedule": dict(cohorts=[[0, 3, 5], [1, 2, 4]]),
    "periodic": dict(period=2),
    "power_of_choice": dict(candidates=5),
    "multi_metric": dict(extra=2),
}


def _factories(module, kinds):
  out = []
  for name in module.__all__:
    obj = getattr(module, name)
    if not inspect.isfunction(obj):
      continue
    hint = inspect.signature(obj).return_annotation
    if any(k in str(hint) for k in kinds):
      out.append(name)
  return out


def _build(module, name):
  fn = getattr(module, name)
  required = [p for p in inspect.signature(fn).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind != p.VAR_KEYWORD]
  if required and name not in ARGS:
    pytest.fail(f"{module.__name__}.{name} needs arguments: add them to ARGS in {__file__}.")
  return fn(**ARGS.get(name, {}))


AGGREGATORS = _factories(aggregation, ("GradientTransformation", "LinearAggregator"))
SAMPLERS = _factories(sampling, ("ClientSampler",))


def test_the_battery_sees_every_public_factory():
  assert {"weighted_mean", "fednova", "coordinate_median", "trimmed_mean", "dp_mean"} <= set(
      AGGREGATORS)
  assert {"uniform", "periodic", "fixed_schedule", "multi_metric", "power_of_choice"} <= set(
      SAMPLERS)


def _updates(seed, c=6):
  rng = np.random.default_rng(seed)
  u = {"w": rng.normal(size=(c, 4, 3)).astype(np.float32),
       "b": rng.normal(size=(c, 3)).astype(np.float32)}
  w = rng.integers(1, 9, c).astype(np.float32)
  w[1] = 0.0
  metrics = {k: rng.uniform(1, 5, c).astype(np.float32)
             for k in ("loss", "grad_norm", "examples", "steps")}
  return u, w, metrics


@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_conformance(name):
  agg = _build(aggregation, name)
  u, w, metrics = _updates(0)
  params = jax.tree.map(lambda a: a[0], u)
  state = agg.init(params)

  def run(u, w, metrics, key):
    out = agg.update(u, state, params, weights=w, key=key, client_metrics=metrics)
    return out[0], out[1:]

  key = jax.random.key(3)
  eager, _ = run(u, w, metrics, key)
  jitted, _ = jax.jit(run)(u, w, metrics, key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), eager,
               jitted)
  shapes = jax.eval_shape(run, u, w, metrics, key)[0]
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(
      lambda p: (p.shape, p.dtype), params)
  again, _ = jax.jit(run)(u, w, metrics, key)  # deterministic under a key
  jax.tree.map(np.testing.assert_array_equal, jitted, again)
  # a client with weight 0 is inert: changing its update changes nothing
  u2 = jax.tree.map(lambda a: a.copy(), u)
  u2["w"][1] += 100.0
  inert, _ = jax.jit(run)(u2, w, metrics, key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), jitted,
               inert)
  # bfloat16 updates: the aggregate keeps the params' dtype and shapes
  bf = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), u)
  bf_params = jax.tree.map(lambda a: a[0], bf)
  out = jax.jit(lambda u: agg.update(u, agg.init(bf_params), bf_params, weights=w, key=key,
                                     client_metrics=metrics)[0])(bf)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), out) == jax.tree.map(
      lambda a: (a.shape, a.dtype), bf_params)
  if isinstance(agg, aggregation.LinearAggregator):  # streamed form == stacked form
    c, scalars = agg.coefficients(jnp.asarray(w), metrics)
    parts = [(jax.tree.map(lambda a, s=s: jnp.tensordot(c[s], a[s], axes=1), u),
              {k: jnp.sum(v[s]) for k, v in scalars.items()})
             for s in (slice(0, 3), slice(3, 6))]
    total = jax.tree.map(jnp.add, parts[0][0], parts[1][0])
    sums = {k: parts[0][1][k] + parts[1][1][k] for k in scalars}
    streamed = agg.finalize(total, sums, *((None,) if agg.masked else ()))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), streamed,
                 jitted)
    if agg.masked:  # with upload masks: the streamed mask sums give the stacked aggregate
      rng = np.random.default_rng(1)
      masks = {"w": (rng.random((6, 4, 1)) < 0.5).astype(np.float32),
               "b": (rng.random((6,)) < 0.7).astype(np.float32)}
      stacked = jax.jit(lambda u, m: agg.update(u, state, params, weights=w, key=key,
                                                client_metrics=metrics, client_masks=m)[0])(
                                                    u, masks)
      mask_sum = jax.tree.map(lambda m: jnp.tensordot(c, m, axes=1), masks)
      streamed = agg.finalize(total, sums, mask_sum)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                   streamed, stacked)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_conformance(name):
  s = _build(sampling, name)
  n, m = 6, 3
  state = s.init(n, m)

  sizes = jnp.arange(1.0, n + 1.0)
  # a stand-in loss oracle: deterministic in the ids (the real one evaluates the model)
  client_loss = lambda ids, key: jnp.sin(ids.astype(jnp.float32))

  def select(key, state, r):
    return s.select(key, state, r, num_clients=n, cohort_size=m, client_sizes=sizes,
                    client_loss=client_loss)

  for r in range(4):
    key = jax.random.key(r)
    ids = jax.jit(select)(key, state, jnp.asarray(r, jnp.int32))
    assert ids.shape == (m,) and ids.dtype == jnp.int32
    np.testing.assert_array_equal(ids, select(key, state, jnp.asarray(r, jnp.int32)))
    np.testing.assert_array_equal(ids, jax.jit(select)(key, state, jnp.asarray(r, jnp.int32)))
    ids_np = np.asarray(ids)
    assert len(set(ids_np.tolist())) == m and ids_np.min() >= 0 and ids_np.max() < n
    metrics = sampling.ClientMetrics(*(jnp.ones([m]) for _ in range(5)))
    new = jax.jit(s.update)(state, ids, metrics)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(name),
                 jax.tree.map(jnp.asarray, new), jax.tree.map(jnp.asarray, state))
    state = new
  if s.metrics is not None:  # diagnostics are scalars
    for k, v in jax.jit(s.metrics)(state).items():
      assert jnp.shape(v) == (), k
