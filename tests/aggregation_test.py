"""Aggregators against NumPy references on fresh random stacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfl
from jaxfl import aggregation


def _stack(seed, c=7):
  rng = np.random.default_rng(seed)
  tree = {"a": rng.normal(size=(c, 3, 4)).astype(np.float32),
          "b": rng.normal(size=(c, 5)).astype(np.float32)}
  w = rng.uniform(0.5, 2.0, c).astype(np.float32)
  w[rng.integers(0, c)] = 0.0
  return tree, w


def _apply(agg, tree, w, **kw):
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), tree)
  out = jax.jit(lambda t, s, p, w: agg.update(t, s, p, weights=w, **kw)[0])(
      tree, agg.init(params), params, w)
  return out


@pytest.mark.parametrize("seed", range(3))
def test_weighted_mean(seed):
  tree, w = _stack(seed)
  out = _apply(aggregation.weighted_mean(), tree, w)
  for k in tree:
    ref = np.tensordot(w.astype(np.float64), tree[k].astype(np.float64), 1) / w.sum()
    np.testing.assert_allclose(out[k], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_median_and_trimmed_mean_ignore_zero_weight(seed):
  tree, w = _stack(seed)
  inc = w > 0
  med = _apply(aggregation.coordinate_median(), tree, w)
  tm = _apply(aggregation.trimmed_mean(0.2), tree, w)
  for k in tree:
    v = tree[k][inc].astype(np.float64)
    np.testing.assert_allclose(med[k], np.median(v, 0), rtol=1e-5, atol=1e-6)
    t = int(np.floor(0.2 * len(v)))
    s = np.sort(v, 0)
    np.testing.assert_allclose(tm[k], s[t: len(v) - t].mean(0), rtol=1e-5, atol=1e-6)


def test_robust_aggregators_resist_an_outlier():
  tree = {"a": np.concatenate([np.ones((6, 3)), 1e6 * np.ones((1, 3))]).astype(np.float32)}
  w = np.ones(7, np.float32)
  assert np.allclose(_apply(aggregation.coordinate_median(), tree, w)["a"], 1.0)
  assert np.allclose(_apply(aggregation.trimmed_mean(0.15), tree, w)["a"], 1.0)
  assert _apply(aggregation.weighted_mean(), tree, w)["a"][0] > 1e5


def test_dp_mean_clips_and_noises():
  tree, w = _stack(0)
  out = _apply(aggregation.dp_mean(clip_norm=0.5), tree, w)
  ref = {}
  inc = w > 0
  norms = np.sqrt(sum((tree[k].reshape(len(w), -1) ** 2).sum(1) for k in tree))
  scale = np.minimum(1.0, 0.5 / norms)
  for k in tree:
    ref[k] = (tree[k] * scale.reshape((-1,) + (1,) * (tree[k].ndim - 1)))[inc].mean(0)
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-6)
  noisy = _apply(aggregation.dp_mean(0.5, 1.0), tree, w, key=jax.random.key(0))
  diff = np.concatenate([(noisy[k] - ref[k]).ravel() for k in tree])
  assert 0.5 * 0.5 / inc.sum() < diff.std() < 2 * 0.5 / inc.sum()
  with pytest.raises(ValueError, match="clip_norm"):
    aggregation.dp_mean(0.0)


def test_trimmed_mean_validates():
  with pytest.raises(ValueError, match="trim_fraction"):
    aggregation.trimmed_mean(0.5)


def test_robust_aggregator_in_a_round():
  from conftest import tiny_data, tiny_model
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=3,
                                 aggregator=aggregation.coordinate_median())
  res = jaxfl.simulate(algo, tiny_model(), tiny_data(), rounds=2, clients_per_round=4,
                       progress=False)
  assert jaxfl.tree.all_finite(res.state.params)
