"""FedLUAR server transform vs a plain NumPy float64 reference of ALGORITHMS.md §3.2."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import jaxfl
from jaxfl.algorithms import layerwise
from jaxfl.round import build_round
from jaxfl.transforms._fedluar import fedluar, fedluar_bypass

EPS = 1e-6


def _params(rng, scale=1.0):
  return {
      "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)) * scale, "bias": rng.normal(size=(4,))},
      "dense1": {"kernel": rng.normal(size=(8, 5)) * scale * 2, "bias": rng.normal(size=(5,))},
      "dense2": {"kernel": rng.normal(size=(5, 3)) * scale * 0.5},
      "emb": rng.normal(size=(6, 2)) * scale * 3,
      "scalar_gain": rng.normal(size=()),
  }


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _names(tree):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _flat(tree):
  return dict(zip(_names(tree), [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]))


class Reference:
  """NumPy float64 FedLUAR (§3.2): a Python loop over layers, round by round."""

  def __init__(self, params, recycle=True):
    self.kernels = [k for k, v in _flat(params).items() if v.ndim >= 2]
    self.stored = {k: 0.0 for k in self.kernels}
    self.score = {k: 0.0 for k in self.kernels}
    self.recycle = recycle

  def step(self, g, x, recycled):
    """g, x: name -> array (pseudo-gradient, params before the update); recycled: set."""
    out = {}
    for name, gl in g.items():
      if name not in self.kernels:
        out[name] = gl
      elif name in recycled:
        out[name] = self.stored[name] if self.recycle else np.zeros_like(gl)
        out[name] = np.broadcast_to(out[name], gl.shape)
      else:
        out[name] = gl
        self.stored[name] = gl.copy()
        self.score[name] = np.linalg.norm(gl.ravel()) / (np.linalg.norm(x[name].ravel()) + EPS)
    return out


def _recycled_names(state, params):
  mask = _flat(state.uplink_mask)
  return {k for k, v in mask.items() if not bool(v)}


@pytest.mark.parametrize("recycle", [True, False])
@pytest.mark.parametrize("selection", ["inverse_score", "uniform"])
def test_matches_numpy_reference_over_rounds(recycle, selection):
  rng = np.random.default_rng(0)
  params = _f32(_params(rng))
  tx = fedluar(2, selection=selection, recycle=recycle)
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  ref = Reference(params, recycle)
  kernels = set(ref.kernels)
  assert len(kernels) == 4
  x = params
  seen_recycled = set()
  for t in range(8):
    g = _f32(jax.tree.map(lambda p: rng.normal(size=np.shape(p)) * 0.1, params))
    recycled = _recycled_names(state, params)
    if t == 0:
      assert recycled == set()  # no recycling in the first round
    else:
      assert len(recycled) == 2 and recycled <= kernels
    seen_recycled |= recycled
    stale_before = {k: np.asarray(v) for k, v in _flat(state.stored).items()}
    want = ref.step(_flat(g), _flat(x), recycled)
    out, state = update(g, state, x, key=jax.random.key(100 + t))
    got = _flat(out)
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
      if name in recycled and recycle and t > 0:
        np.testing.assert_array_equal(got[name], stale_before[name])  # bit-exact reuse
    np.testing.assert_allclose(np.asarray(state.score), [ref.score[k] for k in _names(params)
                                                         if k in kernels], rtol=1e-5)
    assert int(state.count) == t + 1
    x = optax.apply_updates(x, jax.tree.map(lambda u: -u, out))
  assert len(seen_recycled) >= 2


def test_recycled_layer_keeps_old_score_and_stale_update_in_consecutive_rounds():
  # Layer scores differ by orders of magnitude, so the tiny-score layers are recycled
  # again and again: the stale update is re-applied and the score is frozen.
  rng = np.random.default_rng(1)
  params = _f32(_params(rng))
  tx = fedluar(1, candidates=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  state = tx.init(params)
  scale = {"['conv']['kernel']": 1e-6, "['dense1']['kernel']": 1.0,
           "['dense2']['kernel']": 1.0, "['emb']": 1.0}
  ref = Reference(params)
  consecutive = 0
  prev = set()
  for t in range(6):
    g = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(size=np.shape(x)) * scale.get(
            jax.tree_util.keystr(p), 1.0), jnp.float32), params)
    recycled = _recycled_names(state, params)
    want = ref.step(_flat(g), _flat(params), recycled)
    out, state = jax.jit(tx.update)(g, state, params, key=jax.random.key(t))
    for name, w in want.items():
      np.testing.assert_allclose(_flat(out)[name], w, rtol=1e-6, atol=1e-12)
    consecutive += bool(recycled & prev)
    prev = recycled
  assert consecutive >= 3  # p(conv) ~ 1 - 3e-6: recycled every round after the first


def _pair_probs(p):
  """Exact P({a, b}) of two successive draws without replacement (numpy choice semantics)."""
  out = {}
  for a, b in itertools.combinations(range(len(p)), 2):
    out[(a, b)] = p[a] * p[b] / (1 - p[a]) + p[b] * p[a] / (1 - p[b])
  return out


@pytest.mark.parametrize("num_recycle", [1, 2])
def test_sampling_distribution_chi_square(num_recycle):
  rng = np.random.default_rng(2)
  params = _f32(_params(rng))
  g = _f32(jax.tree.map(lambda p: rng.normal(size=np.shape(p)) * 0.1, params))
  tx = fedluar(num_recycle)
  state0 = tx.init(params)
  ref = Reference(params)
  ref.step(_flat(g), _flat(params), set())
  inv = np.array([1.0 / ref.score[k] for k in _names(params) if k in ref.kernels])
  p = inv / inv.sum()
  n = 20000
  keys = jax.random.split(jax.random.key(7), n)
  draws = np.asarray(jax.jit(jax.vmap(
      lambda k: tx.update(g, state0, params, key=k)[1].recycle))(keys))
  assert (draws.sum(1) == num_recycle).all()  # distinct layers
  if num_recycle == 1:
    expected = p * n
    observed = draws.sum(0)
  else:
    probs = _pair_probs(p)
    cats = list(probs)
    index = {c: i for i, c in enumerate(cats)}
    observed = np.zeros(len(cats))
    for row in draws:
      observed[index[tuple(np.flatnonzero(row))]] += 1
    expected = np.array([probs[c] for c in cats]) * n
  np.testing.assert_allclose(expected.sum(), n)
  _, pval = stats.chisquare(observed, expected)
  assert pval > 1e-3, (observed, expected)
  # A wrong rule (uniform) must be rejected on the same draws.
  uni = np.full_like(expected, n / len(expected))
  assert stats.chisquare(observed, uni)[1] < 1e-6


def test_uniform_selection_ignores_scores():
  rng = np.random.default_rng(3)
  params = _f32(_params(rng))
  g = _f32(jax.tree.map(lambda p: rng.normal(size=np.shape(p)) * 0.1, params))
  tx = fedluar(1, selection="uniform")
  s0 = tx.init(params)
  keys = jax.random.split(jax.random.key(3), 8000)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: tx.update(g, s0, params, key=k)[1].recycle))(
      keys))
  assert stats.chisquare(draws.sum(0), np.full(4, 2000.0))[1] > 1e-3


def test_one_compilation_over_many_rounds_and_uplink_mask_consistency():
  rng = np.random.default_rng(4)
  params = _f32(_params(rng))
  tx = fedluar(3)
  traces = []

  def step(g, s, x, k):
    traces.append(1)
    return tx.update(g, s, x, key=k)

  jstep = jax.jit(step)
  state = tx.init(params)
  for t in range(20):
    g = _f32(jax.tree.map(lambda p: rng.normal(size=np.shape(p)), params))
    _, state = jstep(g, state, params, jax.random.key(t))
    mask = _flat(state.uplink_mask)
    names = [k for k in _names(params)]
    kern = [k for k in names if mask[k].ndim == 0 and np.ndim(_flat(params)[k]) >= 2]
    np.testing.assert_array_equal(~np.asarray(state.recycle), [bool(mask[k]) for k in kern])
    assert all(bool(mask[k]) for k in names if k not in kern)  # non-kernels always upload
  assert len(traces) == 1


def test_without_key_uses_internal_key_and_is_deterministic():
  rng = np.random.default_rng(5)
  params = _f32(_params(rng))
  g = _f32(jax.tree.map(lambda p: rng.normal(size=np.shape(p)), params))
  tx = fedluar(2, seed=3)
  s = tx.init(params)
  a = [np.asarray(s.recycle)]
  b = [np.asarray(s.recycle)]
  sa, sb = s, s
  for _ in range(5):
    sa = jax.jit(tx.update)(g, sa, params)[1]
    sb = jax.jit(tx.update)(g, sb, params)[1]
    a.append(np.asarray(sa.recycle))
    b.append(np.asarray(sb.recycle))
  np.testing.assert_array_equal(a, b)
  assert len({tuple(x) for x in a[1:]}) > 1  # the internal key advances


def test_bad_arguments():
  params = _f32(_params(np.random.default_rng(0)))
  with pytest.raises(ValueError, match="num_recycle"):
    fedluar(-1)
  with pytest.raises(ValueError, match="num_recycle"):
    fedluar(1.5)
  with pytest.raises(ValueError, match="selection"):
    fedluar(1, selection="topk")
  with pytest.raises(ValueError, match="num_recycle"):
    fedluar(5).init(params)  # only 4 kernel layers
  with pytest.raises(ValueError, match="params"):
    fedluar(1).update(params, fedluar(1).init(params))


def test_zero_recycle_is_identity_and_all_recycled_is_allowed():
  rng = np.random.default_rng(6)
  params = _f32(_params(rng))
  g = _f32(jax.tree.map(lambda p: rng.normal(size=np.shape(p)), params))
  tx = fedluar(0)
  s = tx.init(params)
  for t in range(3):
    out, s = tx.update(g, s, params, key=jax.random.key(t))
    jax.tree.map(np.testing.assert_array_equal, out, g)
    assert not np.asarray(s.recycle).any()
  s4 = fedluar(4).update(g, fedluar(4).init(params), params, key=jax.random.key(0))[1]
  assert np.asarray(s4.recycle).all()


def test_fedacg_bypass_matches_reference():
  rng = np.random.default_rng(8)
  params = _f32(_params(rng))
  lam = 0.7
  tx = fedluar_bypass(fedluar(2), optax.sgd(1.0, momentum=lam))
  state = tx.init(params)
  ref = Reference(params)
  mom = {k: np.zeros_like(v) for k, v in _flat(params).items()}
  x = params
  for t in range(6):
    g = _f32(jax.tree.map(lambda p: rng.normal(size=np.shape(p)) * 0.1, params))
    recycled = _recycled_names(state.luar, params)
    u = ref.step(_flat(g), _flat(x), recycled)
    want = {}
    for name, ul in u.items():
      if name in recycled:
        want[name] = -ul  # x += stored delta; momentum untouched
      else:
        mom[name] = lam * mom[name] + ul
        want[name] = -mom[name]
    out, state = jax.jit(tx.update)(g, state, x, key=jax.random.key(t))
    for name, w in want.items():
      np.testing.assert_allclose(_flat(out)[name], w, rtol=1e-5, atol=1e-7, err_msg=name)
    x = optax.apply_updates(x, out)
  # The preset's view reads the LUAR mask from the chained state by position.
  view = jaxfl.algorithms.fedluar(2).view
  snap = jaxfl.views.ServerSnapshot(x, {}, state, jnp.zeros([], jnp.int32))
  start = view.apply(snap, None, None)
  assert jax.tree.structure(start.upload_mask) == jax.tree.structure(x)


def _round_setup(algo, rounds_seed=0):
  data = jaxfl.data.load("digits", 8, jaxfl.data.dirichlet(0.5), seed=0)
  model = jaxfl.models.small_cnn(data.example_shape, data.num_classes)
  rnd = build_round(algo, model, num_clients=data.num_clients,
                    max_client_size=data.max_client_size, clients_per_round=4, donate=False)
  return data, model, rnd


@pytest.mark.slow
def test_engine_round_skips_recycled_uploads_and_applies_reference_math():
  algo = layerwise.fedluar(2, local_steps=2, client_lr=0.05)
  data, _, rnd = _round_setup(algo)
  dd = jaxfl.data.device_data(data)
  state = rnd.init(jax.random.key(0))
  names = _names(state.params)
  sizes = {k: v.size for k, v in _flat(state.params).items()}
  total = sum(sizes.values())
  ref = Reference(state.params)
  rels = []
  for t in range(4):
    luar = state.opt_state[0]
    recycled = _recycled_names(luar, state.params)
    x = _flat(state.params)
    stale = _flat(luar.stored)
    ledger = _flat(state.uplink_elements)
    new, metrics = rnd.step(state, dd, jax.random.key(10 + t))
    xn = _flat(new.params)
    # The fresh pseudo-gradient g = x_t - x_{t+1} for fresh layers (server sgd(1.0)).
    g = {k: (x[k] - xn[k]) if k not in recycled else np.zeros_like(x[k]) for k in names}
    want = ref.step(g, x, recycled)
    for k in names:
      np.testing.assert_allclose(x[k] - xn[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
      if k in recycled:
        np.testing.assert_allclose(x[k] - xn[k], stale[k], rtol=1e-5, atol=1e-7)
        assert _flat(new.uplink_elements)[k] == ledger[k]  # not uploaded
      else:
        assert _flat(new.uplink_elements)[k] == ledger[k] + 4 * sizes[k]
    np.testing.assert_allclose(np.asarray(new.opt_state[0].score),
                               [ref.score[k] for k in names if k in ref.kernels], rtol=1e-4)
    want_rel = 1.0 - sum(sizes[k] for k in recycled) / total
    np.testing.assert_allclose(float(metrics["rel_uplink"]), want_rel, rtol=1e-6)
    rels.append(want_rel)
    state = new
  assert rels[0] == 1.0 and min(rels[1:]) < 1.0


@pytest.mark.slow
def test_simulate_fedluar_on_digits_uploads_less():
  data = jaxfl.data.load("digits", 8, jaxfl.data.dirichlet(0.5), seed=0)
  model = jaxfl.models.small_cnn(data.example_shape, data.num_classes)
  res = jaxfl.simulate(layerwise.fedluar(2, local_steps=2, client_lr=0.05), model, data,
                       rounds=4, clients_per_round=4, seed=0, eval_every=0, progress=False)
  rel = [h["rel_uplink"] for h in res.history]
  assert rel[0] == 1.0 and all(r < 1.0 for r in rel[1:])
  assert res.summary["rel_uplink_cost"] < 1.0
  np.testing.assert_allclose(res.summary["rel_uplink_cost"], np.mean(rel))
  assert np.isfinite(res.summary["final_acc"])


def test_aggregate_transform_stores_processed_update_but_scores_raw_mean():
  from jaxfl.transforms import _compression as compression

  rng = np.random.default_rng(9)
  params = _f32(_params(rng))
  tx = fedluar(1, aggregate_transform=compression.qsgd_quantize(2))
  state = tx.init(params)
  ref = Reference(params)
  for t in range(4):
    g = _f32(jax.tree.map(lambda p: rng.normal(size=np.shape(p)) * 0.1, params))
    recycled = _recycled_names(state, params)
    stored_before = _flat(state.stored)
    ref.step(_flat(g), _flat(params), recycled)
    out, state = jax.jit(tx.update)(g, state, params, key=jax.random.key(t))
    o, st, gf = _flat(out), _flat(state.stored), _flat(g)
    for k in ref.kernels:
      if k in recycled:
        np.testing.assert_array_equal(o[k], stored_before[k])
      else:
        np.testing.assert_array_equal(st[k], o[k])  # stored = quantised output
        norm = np.linalg.norm(gf[k])
        xi = np.abs(o[k]) * 2 / norm  # QSGD(2) levels of the raw aggregate
        np.testing.assert_allclose(xi, np.round(xi), atol=1e-4)
        assert not np.allclose(o[k], gf[k])
    np.testing.assert_allclose(np.asarray(state.score),
                               [ref.score[k] for k in _names(params) if k in ref.kernels],
                               rtol=1e-5)


def test_layerwise_factories():
  a = layerwise.fedluar(2)
  assert a.weighting == "uniform" and a.name == "fedluar" and a.local.local_steps == 20
  assert layerwise.fedluar(2, server_lr=0.9).name == "fedopt+fedluar"
  assert layerwise.fedluar(2, quantize_levels=16).uplink is not None
  assert layerwise.feddropoutavg().ledger.words_per_element == 2
  assert layerwise.fedacg(num_recycle=2).name == "fedacg+fedluar"
  with pytest.raises(ValueError, match="num_recycle"):
    layerwise.fedluar(-2)
  with pytest.raises(ValueError, match="levels"):
    layerwise.fedpaq(0)
  with pytest.raises(ValueError, match="server_momentum"):
    layerwise.fedacg(server_momentum=1.0)
  with pytest.raises(ValueError, match="beta"):
    layerwise.fedacg(beta=-1.0)
