"""Aggregators against NumPy references on fresh random stacks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


# ----------------------------------------------------------------------------- masked mean


def _masked_case(seed, c=5):
  rng = np.random.default_rng(seed)
  masks = {"a": (rng.random((c, 4, 3)) < 0.4).astype(np.float32),
           "b": (rng.random((c, 1, 3)) < 0.5).astype(np.float32),  # broadcast along axis 0
           "d": np.ones((c,), np.float32)}  # a leaf every client trains whole
  masks["a"][:, 0, 0] = 0.0  # nobody trains this entry
  shapes = {"a": (4, 3), "b": (2, 3), "d": (2,)}
  vals = {k: rng.normal(size=(c,) + shapes[k]) for k in shapes}
  w = rng.integers(1, 4, c).astype(np.float32)
  w[1] = 0.0

  def full(k):  # client i's mask broadcast to the value leaf
    m = masks[k]
    return np.broadcast_to(m.reshape((c,) + (1,) * (len(shapes[k]) - m.ndim + 1) + m.shape[1:]),
                           (c,) + shapes[k])

  up = {k: (vals[k] * full(k)).astype(np.float32) for k in vals}
  ref = {}
  for k in vals:  # the float64 loop over clients
    num, cnt = np.zeros(shapes[k]), np.zeros(shapes[k])
    for i in range(c):
      num += w[i] * full(k)[i] * vals[k][i]
      cnt += w[i] * full(k)[i]
    ref[k] = np.where(cnt > 0, num / np.where(cnt > 0, cnt, 1), 0.0)
  return up, masks, w, ref


@pytest.mark.parametrize("seed", range(3))
def test_masked_mean_matches_a_float64_loop_with_random_masks(seed):
  """sum_i w_i m_i d_i / sum_i w_i m_i per entry, 0 where nobody trained it, from the stacked
  masks the round hands over as ``client_masks``; the streamed form (two chunks summing
  c_i u_i and c_i m_i) agrees; a zero-weight client is inert."""
  up, masks, w, ref = _masked_case(seed)
  agg = aggregation.masked_mean()
  assert isinstance(agg, aggregation.LinearAggregator) and agg.masked
  out = _apply(agg, up, w, client_masks=masks)
  for k in ref:
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["a"][0, 0], 0.0)  # fallback: zero delta
  coeff, scal = agg.coefficients(jnp.asarray(w), None)
  chunks = (slice(0, 2), slice(2, 5))
  dot = lambda t, s: jax.tree.map(lambda a: jnp.tensordot(coeff[s], jnp.asarray(a)[s], 1), t)
  total = jax.tree.map(jnp.add, *[dot(up, s) for s in chunks])
  mask_sum = jax.tree.map(jnp.add, *[dot(masks, s) for s in chunks])
  sums = {k: sum(jnp.sum(v[s]) for s in chunks) for k, v in scal.items()}
  streamed = agg.finalize(total, sums, mask_sum)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), streamed,
               out)
  inert = jax.tree.map(np.copy, up)
  inert["a"][1] += 100.0
  jax.tree.map(np.testing.assert_array_equal, _apply(agg, inert, w, client_masks=masks), out)
  # without declared masks: the weighted mean
  plain = _apply(agg, up, w)
  np.testing.assert_allclose(plain["a"], np.tensordot(w, up["a"], 1) / w.sum(), rtol=1e-5)


def test_masked_mean_diagnostics_see_the_per_entry_counts_stacked_and_streamed():
  up, masks, w, ref = _masked_case(0)
  seen = {}

  def diagnostics(counts, num_slots):
    seen["counts"], seen["slots"] = counts, num_slots
    return {"covered": jnp.mean(counts["a"] > 0)}

  agg = aggregation.masked_mean(diagnostics)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), up)
  out, _, aux = agg.update(up, agg.init(params), params, weights=w, client_masks=masks)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out, ref)
  counts = np.tensordot(w, masks["a"], 1)
  np.testing.assert_allclose(seen["counts"]["a"], counts)
  assert seen["slots"] == 5
  assert float(aux["covered"]) == pytest.approx(np.mean(counts > 0))
  # the streamed form: the same scalars from the summed masks
  mask_sum = jax.tree.map(lambda m: jnp.tensordot(jnp.asarray(w), m, 1), masks)
  streamed = agg.aux({"weight": jnp.sum(w)}, mask_sum, 5)
  assert float(streamed["covered"]) == pytest.approx(np.mean(counts > 0))
  assert agg.aux({"weight": jnp.sum(w)}, None, 5) == {}  # no declared masks: nothing


def test_masked_mean_refuses_masks_that_do_not_fit():
  agg = aggregation.masked_mean()
  up = {"a": np.ones((2, 3, 4), np.float32)}
  with pytest.raises(ValueError, match=r"masked_mean.*\['a'\].*\(2, 4\)"):
    agg.update(up, None, None, weights=np.ones(2, np.float32),
               client_masks={"a": np.ones((2, 2, 4), np.float32)})
  with pytest.raises(ValueError, match="structure"):
    agg.update(up, None, None, weights=np.ones(2, np.float32),
               client_masks={"b": np.ones((2,), np.float32)})


def test_the_round_hands_declared_upload_masks_to_the_aggregator():
  """A view declaring upload masks: a general aggregator receives them stacked as
  ``client_masks``; a masked linear aggregator streams sum_i c_i m_i (chunks of 2 over 6
  clients) to the same aggregate and the same aux scalars as its stacked form; a view without
  masks hands none."""
  data = jaxfl.data.synthetic(num_clients=6, dim=4, num_classes=3, mean_size=10, seed=0)
  model = jaxfl.models.mlp((4,), 3, hidden=(5,))

  def view(server, slot, row):  # client i trains and sends the hidden layer iff i is even
    on = (slot.client_id % 2 == 0).astype(jnp.float32)
    mask = jax.tree.map(lambda _: jnp.ones(()), server.params)
    mask = jax.tree_util.tree_map_with_path(
        lambda p, m: on if "Dense_0" in jax.tree_util.keystr(p) else m, mask)
    return jaxfl.views.ClientStart(train_mask=mask, upload_mask=mask)

  seen = []

  def general(u, state, params=None, *, weights, client_masks=None, **extra):
    seen.append(client_masks)
    return masked.aggregator.update(u, state, params, weights=weights,
                                    client_masks=client_masks)

  base = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=4)
  diagnostics = lambda counts, n: {"trained": sum(jnp.sum(c) for c in jax.tree.leaves(counts)),
                                   "slots": jnp.float32(n)}
  masked = base._replace(aggregator=aggregation.masked_mean(diagnostics),
                         view=jaxfl.views.ClientView(view))
  runs, hist = {}, {}
  for name, algo, kw in [  # the general one is the stacked form, with the masks seen
      ("stacked", masked._replace(aggregator=optax_general(general)), {}),
      ("streamed", masked, dict(clients_per_chunk=2, stream_aggregate=True))]:
    res = jaxfl.simulate(algo, model, data, rounds=2, clients_per_round=6, seed=1,
                         progress=False, **kw)
    runs[name], hist[name] = res.state.params, res.history
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               runs["stacked"], runs["streamed"])
  for h_stacked, h_streamed in zip(hist["stacked"], hist["streamed"]):
    assert h_stacked["aggregator/slots"] == h_streamed["aggregator/slots"] == 6
    assert h_stacked["aggregator/trained"] == h_streamed["aggregator/trained"] > 0
  masks = seen[0]
  hidden = [m for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]
            if "Dense_0" in jax.tree_util.keystr(p)]
  assert hidden and all(m.shape == (6,) for m in hidden)
  seen.clear()
  jaxfl.simulate(base._replace(aggregator=optax_general(general)), model, data, rounds=1,
                 clients_per_round=6, seed=1, progress=False)
  assert seen == [None]


def optax_general(update_fn):
  return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)
