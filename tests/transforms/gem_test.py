"""Tests for jaxfl.masks (GEM masks, sparse deltas) and the GEM mask / uplink transforms.

Expected values come from NumPy references written here, independently of the code under test.
"""

import importlib.util
import math
import pathlib
import sys
from decimal import Decimal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfl import masks
from jaxfl.transforms import GemMaskState, gem_mask, masked_uplink

# ------------------------------------------------------------------------------------------
# NumPy references.


def random_tree(seed, shapes=None):
  rng = np.random.default_rng(seed)
  shapes = shapes or {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)},
                      "dense": {"kernel": (20, 8), "bias": (8,)},
                      "head": {"kernel": (8, 3), "bias": (3,)},
                      "tiny": {"kernel": (1, 2)}}
  tree = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32) * rng.uniform(0.1, 2),
                      shapes, is_leaf=lambda x: isinstance(x, tuple))
  return jax.tree.map(jnp.asarray, tree)


def ref_entropy(x, bins):
  x = np.asarray(x, np.float64).ravel()
  if x.max() == x.min():
    return 0.0
  counts, _ = np.histogram(x, bins=bins, range=(x.min(), x.max()))
  p = counts[counts > 0] / x.size
  return float(-(p * np.log(p)).sum())


def ref_ideal_shares(weights, caps, total):
  """Real-valued shares min(cap, lam * w) summing to total, lam found by bisection."""
  w = np.asarray(weights, np.float64)
  caps = np.asarray(caps, np.float64)
  if total == 0:
    return np.zeros_like(caps)
  pos = (w > 0) & (caps > 0)
  if caps[pos].sum() < total:  # positive-weight layers cannot hold it: fill them, spread rest
    rest = total - caps[pos].sum()
    spare = np.where(pos, 0.0, caps)
    return np.where(pos, caps, 0.0) + ref_ideal_shares(spare, spare, rest)
  lo, hi = 0.0, 1.0
  while np.minimum(caps, hi * w).sum() < total:
    hi *= 2
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if np.minimum(caps, mid * w).sum() < total else (lo, mid)
  return np.minimum(caps, hi * w)


def ref_hamilton(weights, total):
  """Largest-remainder apportionment without caps; ties to the earlier index."""
  w = np.asarray(weights, np.float64)
  q = total * w / w.sum()
  k = np.floor(q).astype(int)
  order = sorted(range(len(w)), key=lambda i: (-(q[i] - k[i]), i))
  for i in order[:total - k.sum()]:
    k[i] += 1
  return k


def ref_topk(scores, k):
  s = np.asarray(scores).ravel()
  m = np.zeros(s.size, bool)
  m[np.argsort(-s, kind="stable")[:k]] = True
  return m.reshape(np.shape(scores))


# ------------------------------------------------------------------------------------------
# Scores, entropies, budgets.


def test_gradient_weight_ratio_matches_numpy():
  w, g = random_tree(0), random_tree(1)
  w = {**w, "dense": {**w["dense"], "bias": jnp.zeros(8)}}  # exact zeros -> |g| / eps
  got = jax.jit(masks.gradient_weight_ratio, static_argnums=2)(g, w, 1e-3)
  want = jax.tree.map(lambda a, b: np.abs(np.asarray(a)) / (np.abs(np.asarray(b)) + 1e-3), g, w)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


@pytest.mark.parametrize("bins", [2, 7, 256])
def test_layer_entropy_matches_numpy_histogram(bins):
  tree = random_tree(2)
  tree["const"] = jnp.full((5, 5), 0.3)
  tree["two"] = jnp.array([[0.0, 1.0], [0.0, 1.0]])  # entropy log 2 for any bins
  got = jax.jit(masks.layer_entropy, static_argnums=1)(tree, bins)
  want = jax.tree.map(lambda x: ref_entropy(x, bins), tree)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(float(a), b, rtol=1e-4, atol=1e-5),
               got, want)
  assert float(got["const"]) == 0.0 and not np.signbit(float(got["const"]))
  np.testing.assert_allclose(float(got["two"]), math.log(2), rtol=1e-6)


def _alloc_weights(rule, ent, sizes):
  return {"entropy": ent, "entropy_size": ent * sizes, "uniform": sizes.astype(float),
          "equal": np.ones(len(sizes))}[rule]


@pytest.mark.parametrize("rule", ["entropy", "entropy_size", "uniform", "equal"])
def test_allocation_exact_capped_and_proportional(rule):
  rng = np.random.default_rng(3)
  for trial in range(150):
    n_layers = int(rng.integers(1, 7))
    sizes = rng.choice([1, 2, 3, 10, 100, 5000], size=n_layers)
    ent = rng.uniform(0, 6, size=n_layers)
    if trial % 10 == 0:
      ent[0] = 0.0  # a constant layer
    n = int(sizes.sum())
    total = int(rng.choice([0, n, 1, n - 1, int(rng.integers(0, n + 1))]))
    total = max(0, min(n, total))
    k = np.array(masks.allocate_budget(total, sizes, ent, rule))
    assert k.sum() == total, (sizes, ent, total, k)
    assert np.all(k >= 0) and np.all(k <= sizes)
    ideal = ref_ideal_shares(_alloc_weights(rule, ent, sizes), sizes, total)
    np.testing.assert_allclose(ideal.sum(), total, atol=1e-6)
    assert np.all(np.abs(k - ideal) < 1 + 1e-6), (sizes, ent, total, k, ideal)


def test_allocation_equals_hamilton_reference_without_caps():
  rng = np.random.default_rng(4)
  for _ in range(200):
    sizes = rng.integers(1000, 5000, size=int(rng.integers(1, 8)))
    ent = rng.uniform(0.5, 6, size=len(sizes))
    total = int(rng.integers(0, 500))
    for rule in ("entropy", "entropy_size", "uniform"):
      np.testing.assert_array_equal(masks.allocate_budget(total, sizes, ent, rule),
                                    ref_hamilton(_alloc_weights(rule, ent, sizes), total))


def test_allocation_callable_rule_and_zero_weights():
  sizes = np.array([10, 10, 10])
  assert masks.allocate_budget(12, sizes, [1.0, 2.0, 3.0], lambda e, n: e ** 2) == [1, 3, 8]
  # All-zero entropies fall back to spreading over capacity.
  assert sum(masks.allocate_budget(7, sizes, [0.0, 0.0, 0.0], "entropy")) == 7
  # The capped layer is full, the rest goes to the zero-weight layer.
  assert masks.allocate_budget(15, sizes, [1.0, 0.0, 0.0], "entropy") == [10, 3, 2]


def test_resolve_budget():
  assert masks.resolve_budget(0.001, 1000) == 1  # no float drift to 2
  assert masks.resolve_budget(0.0015, 1000) == 2  # ceil
  assert masks.resolve_budget(0.0, 10) == 0 and masks.resolve_budget(1.0, 10) == 10
  assert masks.resolve_budget(0.5, 10, 100, "all") == 10  # capped at the eligible count
  assert masks.resolve_budget(1e-12, 1000) == 1  # budget * N = 1e-9: at least one entry
  assert masks.resolve_budget(0.1, 1000) == 100  # not 101 from 100.00000000000001


# ------------------------------------------------------------------------------------------
# Masks.


def ref_mask(method, params, grads, budget, bins, eps, allocation, candidates=None):
  names = ["conv", "dense", "head", "tiny"]  # eligible = kernels, sorted like jax dicts
  w = {n: np.asarray(params[n]["kernel"]) for n in names}
  g = {n: np.asarray(grads[n]["kernel"]) for n in names}
  raw = {"gem": lambda n: np.abs(g[n]) / (np.abs(w[n]) + eps),
         "gem_uniform_budget": lambda n: np.abs(g[n]) / (np.abs(w[n]) + eps),
         "grad_magnitude": lambda n: np.abs(g[n]),
         "grad_weight_product": lambda n: np.abs(g[n].astype(np.float64) * w[n]),
         "weight_magnitude": lambda n: np.abs(w[n])}[method]

  def score(n):  # non-candidates can never be picked
    return raw(n) if candidates is None else np.where(candidates[n], raw(n), -np.inf)

  sizes = np.array([w[n].size for n in names])
  total = math.ceil(Decimal(repr(budget)) * int(sizes.sum()))  # exact K = ceil(budget N)
  if allocation == "global":
    flat = np.concatenate([score(n).ravel() for n in names])
    chosen = ref_topk(flat, total)
    offs = np.cumsum([0, *sizes])
    return {n: chosen[offs[i]:offs[i + 1]].reshape(w[n].shape) for i, n in enumerate(names)}
  ent = np.array([ref_entropy(w[n], bins) for n in names])
  ideal = ref_ideal_shares(_alloc_weights(allocation, ent, sizes), sizes, total)
  ks = np.floor(ideal + 1e-9).astype(int)  # caps bind only at integers here
  for i in sorted(range(len(names)), key=lambda i: (-(ideal[i] - ks[i]), i))[:total - ks.sum()]:
    ks[i] += 1
  return {n: ref_topk(score(n), k) for n, k in zip(names, ks)}


@pytest.mark.parametrize("method,allocation", [
    ("gem", None), ("gem_uniform_budget", None), ("grad_magnitude", None),
    ("weight_magnitude", None), ("grad_weight_product", None), ("gem", "entropy"),
    ("gem", "global"), ("grad_magnitude", "global"), ("grad_weight_product", "global")])
@pytest.mark.parametrize("budget", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_masks_match_numpy_reference(method, allocation, budget):
  params, grads = random_tree(5), random_tree(6)
  # the documented defaults (docs/gem.md: k ∝ H·n, chosen from the MiniLM-L6 experiment)
  default = {"gem": "entropy_size", "gem_uniform_budget": "uniform",
             "grad_magnitude": "entropy_size", "weight_magnitude": "entropy_size",
             "grad_weight_product": "entropy_size"}
  alloc = allocation or default[method]
  mask = masks.build_mask(method, params, budget, grads=grads, bins=32, eps=1e-4,
                        allocation=allocation)
  want = ref_mask(method, params, grads, budget, 32, 1e-4, alloc)
  for n, m in want.items():
    np.testing.assert_array_equal(np.asarray(mask[n]["kernel"]), m, err_msg=n)
    if "bias" in mask[n]:  # not eligible by default
      assert not np.any(np.asarray(mask[n]["bias"]))
  assert masks.mask_count(mask) == math.ceil(Decimal(repr(budget)) * (72 + 160 + 24 + 2))


@pytest.mark.parametrize("method,allocation", [
    ("gem", "entropy_size"), ("weight_magnitude", "uniform"), ("gem", "global")])
def test_candidates_restrict_the_pick_to_the_numpy_reference(method, allocation):
  params, grads = random_tree(21), random_tree(22)
  names = ["conv", "dense", "head", "tiny"]
  # The larger half of each kernel by |w| (per-layer median); biases left unrestricted.
  big = {n: np.abs(np.asarray(params[n]["kernel"])) >= np.median(
      np.abs(np.asarray(params[n]["kernel"]))) for n in names}
  cand = jax.tree.map(lambda x: None, params)
  for n in names:
    cand[n]["kernel"] = big[n]
  budget = 0.2
  mask = masks.build_mask(method, params, budget, grads=grads, bins=32, eps=1e-4,
                          allocation=allocation, candidates=cand)
  want = ref_mask(method, params, grads, budget, 32, 1e-4, allocation, candidates=big)
  for n in names:
    got = np.asarray(mask[n]["kernel"])
    np.testing.assert_array_equal(got, want[n], err_msg=n)
    assert not np.any(got & ~big[n]), n
  # The allocation is unchanged by the restriction: the same per-layer counts as without it.
  free = masks.build_mask(method, params, budget, grads=grads, bins=32, eps=1e-4,
                          allocation=allocation)
  if allocation != "global":
    for n in names:
      assert int(np.sum(mask[n]["kernel"])) == int(np.sum(free[n]["kernel"])), n
  # Random scores with the smaller half: never an entry outside it.
  small = jax.tree.map(lambda x: None, params)
  for n in names:
    small[n]["kernel"] = ~big[n]
  r = masks.build_mask("random", params, 0.1, key=jax.random.key(3), candidates=small)
  for n in names:
    assert not np.any(np.asarray(r[n]["kernel"]) & big[n]), n


def test_candidates_bad_input_raises():
  params, grads = random_tree(23), random_tree(24)
  with pytest.raises(ValueError, match="candidates"):  # wrong structure
    masks.build_mask("gem", params, 0.1, grads=grads, candidates={"conv": None})
  bad = jax.tree.map(lambda x: None, params)
  bad["dense"]["kernel"] = np.ones((3, 3), bool)  # wrong shape
  with pytest.raises(ValueError, match="shaped like"):
    masks.build_mask("gem", params, 0.1, grads=grads, candidates=bad)
  few = jax.tree.map(lambda x: None, params)
  few["dense"]["kernel"] = np.zeros((20, 8), bool)
  few["dense"]["kernel"][0, :2] = True  # 2 candidates, but the layer's share is larger
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\]"):
    masks.build_mask("gem", params, 0.5, grads=grads, candidates=few, allocation="uniform")
  none = jax.tree.map(lambda x: np.zeros(np.shape(x), bool), params)
  with pytest.raises(ValueError, match="fewer than the budget"):
    masks.build_mask("gem", params, 0.1, grads=grads, candidates=none, allocation="global")


def test_random_mask_counts_and_determinism():
  params = random_tree(7)
  m1 = masks.build_mask("random", params, 0.2, key=jax.random.key(0))
  m2 = masks.build_mask("random", params, 0.2, key=jax.random.key(0))
  m3 = masks.build_mask("random", params, 0.2, key=jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, m1, m2)
  assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), m1, m3)))
  gm = masks.build_mask("weight_magnitude", params, 0.2)  # same allocation, per-layer counts match
  jax.tree.map(lambda a, b: np.testing.assert_equal(int(a.sum()), int(b.sum())), m1, gm)


def test_eligibility_and_always():
  params, grads = random_tree(8), random_tree(9)
  m = masks.build_mask("gem", params, 1.0, grads=grads, eligible="all")
  assert all(bool(np.all(x)) for x in jax.tree.leaves(m))
  m = masks.build_mask("gem", params, 0.3, grads=grads,
                     eligible=lambda name, x: name.startswith("['dense']"),
                     always=lambda name, x: name.startswith("['head']"))
  assert masks.mask_count(m["dense"]) == math.ceil(0.3 * (160 + 8))
  assert np.all(np.asarray(m["head"]["kernel"])) and np.all(np.asarray(m["head"]["bias"]))
  assert not np.any(np.asarray(m["conv"]["kernel"])) and not np.any(np.asarray(m["tiny"]["kernel"]))
  tree_elig = jax.tree.map(lambda x: False, params)
  tree_elig["tiny"]["kernel"] = True
  m = masks.build_mask("weight_magnitude", params, 0.5, eligible=tree_elig)
  assert masks.mask_count(m) == 1 and bool(m["tiny"]["kernel"].ravel()[np.argmax(
      np.abs(np.asarray(params["tiny"]["kernel"])).ravel())])
  with pytest.raises(ValueError, match="always"):
    masks.build_mask("random", params, 0.1, key=jax.random.key(0), eligible="all",
                   always=lambda name, x: True)


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "gem", "budget": -0.1}, "budget"),
    ({"method": "gem", "budget": 1.5}, "budget"),
    ({"method": "nope", "budget": 0.1}, "method"),
    ({"method": "gem", "budget": 0.1, "bins": 1}, "bins"),
    ({"method": "gem", "budget": 0.1, "allocation": "foo"}, "allocation"),
    ({"method": "gem", "budget": 0.1, "eligible": "some"}, "eligible"),
    ({"method": "gem", "budget": 0.1, "budget_of": "x"}, "budget_of"),
])
def test_bad_arguments_raise(kwargs, match):
  params = random_tree(10)
  with pytest.raises(ValueError, match=match):
    masks.build_mask(params=params, grads=params, **kwargs)


def test_missing_inputs_raise():
  params = random_tree(10)
  with pytest.raises(ValueError, match="grads"):
    masks.build_mask("gem", params, 0.1)
  with pytest.raises(ValueError, match="key"):
    masks.build_mask("random", params, 0.1)
  with pytest.raises(ValueError, match="bins"):
    masks.layer_entropy(params, bins=1)
  with pytest.raises(ValueError, match="reduce"):
    masks.calibration_gradients(lambda p, b: 0.0, params, [1], reduce="max")


def test_calibration_gradients_stacked_and_sequence():
  rng = np.random.default_rng(11)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
  xs = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(4, 5, 2)), jnp.float32)
  loss = lambda p, b: 0.5 * jnp.mean(jnp.sum((b[0] @ p["w"] - b[1]) ** 2, -1))
  # Reference: d/dW of 0.5 mean ||xW - y||^2 = x^T (xW - y) / n, per batch.
  w = np.asarray(params["w"], np.float64)
  per = [np.asarray(x, np.float64).T @ (np.asarray(x, np.float64) @ w - np.asarray(y)) / 5
         for x, y in zip(xs, ys)]
  stacked = jax.jit(lambda p, b: masks.calibration_gradients(loss, p, b))(params, (xs, ys))
  seq = masks.calibration_gradients(loss, params, [(x, y) for x, y in zip(xs, ys)])
  np.testing.assert_allclose(stacked["w"], np.mean(per, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(seq["w"], np.mean(per, 0), rtol=1e-5, atol=1e-6)
  ab = masks.calibration_gradients(loss, params, (xs, ys), reduce="abs_mean")
  np.testing.assert_allclose(ab["w"], np.mean(np.abs(per), 0), rtol=1e-5, atol=1e-6)


def test_topk_mask_jit_and_edges():
  s = jnp.asarray(np.random.default_rng(12).normal(size=(6, 5)), jnp.float32)
  for k in (0, 1, 7, 30):
    got = jax.jit(masks.topk_mask, static_argnums=1)(s, k)
    np.testing.assert_array_equal(got, ref_topk(s, k))
  with pytest.raises(ValueError, match="k"):
    masks.topk_mask(s, 31)


# ------------------------------------------------------------------------------------------
# The transform.


def _quad_loss(params, x):
  return sum(jnp.sum((p - x) ** 2) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("make_opt", [
    lambda: optax.adamw(0.1, weight_decay=0.5),
    lambda: optax.sgd(0.1, momentum=0.9),
    lambda: optax.chain(optax.add_decayed_weights(0.3), optax.sgd(0.05, momentum=0.9,
                                                                  nesterov=True)),
], ids=["adamw", "sgd_momentum", "decay_nesterov"])
def test_frozen_entries_bit_identical_after_training(make_opt):
  params = random_tree(13)
  mask = masks.build_mask("weight_magnitude", params, 0.3)
  tx = optax.chain(make_opt(), gem_mask(mask))

  @jax.jit
  def step(p, s, x):
    g = jax.grad(_quad_loss)(p, x)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p, s = params, jax.jit(tx.init)(params)
  for i in range(5):
    p, s = step(p, s, jnp.float32(i + 1.0))
  for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(p), jax.tree.leaves(params)):
    m, a, b = np.asarray(m), np.asarray(a), np.asarray(b)
    np.testing.assert_array_equal(a.view(np.uint32)[~m], b.view(np.uint32)[~m])  # bit-for-bit
    assert np.all(a[m] != b[m])  # tuned entries did move
  # Control: the same optimizer without the mask moves every entry (the test can fail).
  tx0, p0 = make_opt(), params
  s0 = tx0.init(p0)
  for i in range(2):
    u, s0 = tx0.update(jax.grad(_quad_loss)(p0, jnp.float32(i + 1.0)), s0, p0)
    p0 = optax.apply_updates(p0, u)
  assert all(np.all(np.asarray(a) != np.asarray(b))
             for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(params)))


def test_state_type_stable_and_mask_swap_without_recompile():
  params = random_tree(14)
  tx = optax.chain(optax.adamw(1e-2), gem_mask())
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(1)
    u, s = tx.update(jax.grad(_quad_loss)(p, 1.0), s, p)
    return optax.apply_updates(p, u), s

  s = tx.init(params)
  types0 = jax.tree.map(jax.typeof, s)
  p, s = step(params, s)
  assert jax.tree.map(jax.typeof, s) == types0
  m1 = masks.build_mask("weight_magnitude", params, 0.1)
  m2 = masks.build_mask("random", params, 0.1, key=jax.random.key(3))
  for m in (m1, m2):
    s = optax.tree.set(s, mask=m)
    p2, _ = step(params, s)
    for mm, a, b in zip(jax.tree.leaves(m), jax.tree.leaves(p2), jax.tree.leaves(params)):
      np.testing.assert_array_equal(np.asarray(a)[~np.asarray(mm)], np.asarray(b)[~np.asarray(mm)])
  assert len(traces) == 1
  assert isinstance(tx.init(params)[1], GemMaskState)
  # Shape-only init works and scalar leaves broadcast.
  shapes = jax.eval_shape(gem_mask(jax.tree.map(lambda x: True, params)).init, params)
  assert jax.tree.map(lambda x: x.shape, shapes.mask) == jax.tree.map(jnp.shape, params)
  with pytest.raises(ValueError, match="mask"):
    gem_mask({"a": True}).init(params)


def test_with_inject_hyperparams():
  params = random_tree(15)
  mask = masks.build_mask("weight_magnitude", params, 0.2)
  tx = optax.chain(optax.inject_hyperparams(optax.adamw)(learning_rate=0.1, weight_decay=0.1),
                   gem_mask(mask))
  s = tx.init(params)
  s = optax.tree.set(s, learning_rate=jnp.asarray(0.0))  # lr 0: nothing moves at all
  u, s = jax.jit(tx.update)(jax.grad(_quad_loss)(params, 1.0), s, params)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
  s = optax.tree.set(s, learning_rate=jnp.asarray(0.1))
  u, s = jax.jit(tx.update)(jax.grad(_quad_loss)(params, 1.0), s, params)
  for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(u)):
    m, x = np.asarray(m), np.asarray(x)
    assert np.all(x[~m] == 0) and np.all(x[m] != 0)


def test_masked_uplink_under_vmap():
  params = random_tree(16)
  mask = masks.build_mask("weight_magnitude", params, 0.25)
  up = masked_uplink(mask)
  rng = np.random.default_rng(17)
  deltas = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=(3, *x.shape)), x.dtype), params)

  def client(delta):
    state = up.init(delta)
    sent, _ = up.update(delta, state, params=params, round=0)  # extra args accepted
    return sent

  sent = jax.jit(jax.vmap(client))(deltas)
  for m, d, s in zip(jax.tree.leaves(mask), jax.tree.leaves(deltas), jax.tree.leaves(sent)):
    np.testing.assert_array_equal(np.asarray(s), np.where(np.asarray(m)[None], np.asarray(d), 0))
  nnz = sum(int(np.count_nonzero(np.asarray(s))) for s in jax.tree.leaves(sent))
  assert nnz == 3 * masks.mask_count(mask)


# ------------------------------------------------------------------------------------------
# Sparse delta export.


def test_sparse_delta_round_trip(tmp_path):
  pre = random_tree(18)
  mask = masks.build_mask("weight_magnitude", pre, 0.05)
  tx = optax.chain(optax.adamw(0.1), gem_mask(mask))
  s = tx.init(pre)
  u, _ = tx.update(jax.grad(_quad_loss)(pre, 1.0), s, pre)
  ft = optax.apply_updates(pre, u)
  path = tmp_path / "delta.npz"
  size = masks.save_sparse_delta(path, ft, pre)
  assert size == path.stat().st_size > 0
  back = masks.load_sparse_delta(path, pre)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ft)):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
  delta = masks.sparse_delta(ft, pre)
  assert sum(len(i) for i, _ in delta.values()) == masks.mask_count(mask)
  # With an explicit mask exactly its entries are stored, unchanged or not.
  delta_m = masks.sparse_delta(pre, pre, mask)
  assert sum(len(i) for i, _ in delta_m.values()) == masks.mask_count(mask)
  with pytest.raises(ValueError, match="structure"):
    masks.sparse_delta({"a": jnp.zeros(2)}, pre)


@pytest.mark.slow
def test_glue_path_smoke_on_mock_data(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  path = pathlib.Path(__file__).parents[2] / "experiments" / "gem_glue.py"
  spec = importlib.util.spec_from_file_location("gem_glue", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules["gem_glue"] = mod  # flax dataclasses look their module up in sys.modules
  spec.loader.exec_module(mod)
  out = mod.main(["--mock", "16", "--steps", "2", "--batch", "4", "--calib-batches", "2",
                  "--max-len", "16", "--out-dir", str(tmp_path)])
  assert out["task"] == "glue/sst2" and 0.0 <= out["eval_acc"] <= 1.0
  assert np.isfinite(out["final_loss"]) and (tmp_path / "gem_glue.json").exists()
