"""GEM budgets: K = ceil(budget * N) exactly, and every allocation rule against a float64 loop.

The references below are plain Python/NumPy loops in float64 written for this file (histogram
entropies, water-filling over layers one at a time, largest-remainder rounding, stable argsort
top-k), run on random inputs drawn here.
"""

import math
import random
from decimal import Decimal
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfl import masks

# ------------------------------------------------------------------------------------------
# K = ceil(budget * N)


@pytest.mark.parametrize("budget,n,want", [
    (1e-12, 1000, 1),        # budget * N = 1e-9
    (1e-15, 100, 1),         # 1e-13 (was 0 under ceil(round(budget * N, 9)))
    (3e-10, 1, 1),           # 3e-10 < 5e-10
    (1e-300, 10, 1),
    (5e-324, 10**6, 1),      # smallest subnormal
    (0.1, 1000, 100),        # 0.1 * 1000 = 100.00000000000001 in floats
    (0.7, 100, 70),          # 70.00000000000001
    (0.3, 10, 3),            # 3.0000000000000004
    (0.001, 1000, 1),
    (0.0015, 1000, 2),
    (0.001, 20_000_000_001, 20_000_001),  # exact on huge N: no tolerance swallows the .001
    (0.0, 10, 0),
    (1.0, 10, 10),
])
def test_resolve_budget_exact(budget, n, want):
  assert masks.resolve_budget(budget, n) == want


def test_resolve_budget_random_decimals_and_ratios():
  rng = random.Random(0)
  for _ in range(3000):
    n = rng.randint(1, 10**9)
    digits = rng.randint(1, 12)
    m = rng.randint(0, 10**digits)
    budget = float(f"{m}e-{digits}")  # a decimal budget with <= 12 digits
    want = -(-m * n // 10**digits)  # integer ceil, no floats
    assert masks.resolve_budget(budget, n) == want, (budget, n)
    k = rng.randint(1, min(n, 10**6))
    assert masks.resolve_budget(k / n, n) == k, (k, n)  # the float k/N means k of N
  for _ in range(300):
    n = rng.randint(1, 10**6)
    k = rng.randint(1, n)
    assert masks.resolve_budget(np.float32(k / n), n) == k, (k, n)


def test_resolve_budget_types_caps_and_errors():
  assert masks.resolve_budget(Fraction(1, 3), 10) == 4
  assert masks.resolve_budget(Decimal("0.25"), 10) == 3
  assert masks.resolve_budget(np.float32(0.1), 1000) == 100  # read as 0.1, not 0.100000001
  assert masks.resolve_budget(np.float64(1e-12), 10) == 1
  assert masks.resolve_budget(1, 7) == 7 and masks.resolve_budget(np.int64(0), 7) == 0
  assert masks.resolve_budget(0.5, 10, 100, "all") == 10  # capped at the eligible count
  assert masks.resolve_budget(1e-12, 10, 100, "all") == 1
  for bad in (-0.1, 1.5, float("nan"), float("inf"), Decimal("NaN"), Fraction(3, 2)):
    with pytest.raises(ValueError, match="budget"):
      masks.resolve_budget(bad, 10)
  with pytest.raises(TypeError, match="budget"):
    masks.resolve_budget(True, 10)


# ------------------------------------------------------------------------------------------
# Allocation rules against a float64 loop.


def ref_entropy(x, bins):
  x = np.asarray(x, np.float64).ravel()
  if x.max() == x.min():
    return 0.0
  counts, _ = np.histogram(x, bins=bins, range=(x.min(), x.max()))
  h = 0.0
  for c in counts:
    if c:
      p = c / x.size
      h -= p * math.log(p)
  return h


def ref_counts(weights, sizes, total):
  """Water-filling one layer at a time, then largest remainder (ties to the earlier layer)."""
  weights = [float(w) for w in weights]
  sizes = [int(s) for s in sizes]
  k = [0] * len(sizes)
  active = [s > 0 for s in sizes]
  left = total
  while left > 0 and any(active):
    w = [weights[i] if active[i] else 0.0 for i in range(len(sizes))]
    if sum(w) <= 0:
      w = [float(sizes[i] - k[i]) if active[i] else 0.0 for i in range(len(sizes))]
    share = [left * w[i] / sum(w) for i in range(len(sizes))]
    full = [i for i in range(len(sizes)) if active[i] and k[i] + share[i] >= sizes[i]]
    if full:
      for i in full:
        left -= sizes[i] - k[i]
        k[i] = sizes[i]
        active[i] = False
      continue
    floors = [math.floor(s) for s in share]
    rest = left - sum(floors)
    order = sorted((i for i in range(len(sizes)) if active[i]),
                   key=lambda i: (-(share[i] - floors[i]), i))
    for i in range(len(sizes)):
      k[i] += floors[i]
    for i in order[:rest]:
      k[i] += 1
    left = 0
  return k


def ref_topk(scores, k):
  flat = np.asarray(scores, np.float64).ravel()
  out = np.zeros(flat.size, bool)
  out[np.argsort(-flat, kind="stable")[:k]] = True
  return out.reshape(np.shape(scores))


def ref_mask(method, allocation, params, grads, budget, bins, eps):
  names = sorted(params)  # eligible = every >= 2-D leaf; one kernel per layer here
  w = {n: np.asarray(params[n]["kernel"], np.float64) for n in names}
  g = {n: np.asarray(grads[n]["kernel"], np.float64) for n in names}
  if method == "gem":
    score = {n: np.abs(g[n]) / (np.abs(w[n]) + eps) for n in names}
  elif method == "grad_magnitude":
    score = {n: np.abs(g[n]) for n in names}
  else:
    score = {n: np.abs(w[n]) for n in names}
  sizes = [w[n].size for n in names]
  n_all = sum(sizes)
  total = math.ceil(Decimal(repr(budget)) * n_all)  # decimal arithmetic, independent of masks
  if allocation == "global":
    flat = np.concatenate([score[n].ravel() for n in names])
    chosen = ref_topk(flat, total)
    out, start = {}, 0
    for n, s in zip(names, sizes):
      out[n] = chosen[start:start + s].reshape(w[n].shape)
      start += s
    return out
  ent = [ref_entropy(w[n], bins) for n in names]
  weights = {"entropy": ent, "entropy_size": [h * s for h, s in zip(ent, sizes)],
             "uniform": sizes, "equal": [1.0] * len(sizes)}[allocation]
  ks = ref_counts(weights, sizes, total)
  return {n: ref_topk(score[n], k) for n, k in zip(names, ks)}


def random_model(seed):
  """A fresh random 'model': 3-6 layers of random shapes and scales, plus 1-D biases."""
  rng = np.random.default_rng(seed)
  params, grads = {}, {}
  for i in range(int(rng.integers(3, 7))):
    shape = tuple(int(d) for d in rng.integers(1, 40, size=int(rng.integers(2, 4))))
    scale = float(rng.uniform(0.01, 3.0))
    dist = rng.laplace if i % 2 else rng.normal
    params[f"layer{i}"] = {"kernel": jnp.asarray(dist(size=shape) * scale, jnp.float32),
                           "bias": jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32)}
    grads[f"layer{i}"] = {"kernel": jnp.asarray(rng.normal(size=shape) * 1e-2, jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32)}
  return params, grads


RULES = {"entropy": lambda h, n: h, "entropy_size": lambda h, n: h * n,
         "uniform": lambda h, n: n.astype(float), "equal": lambda h, n: np.ones(len(n))}


@pytest.mark.parametrize("allocation", sorted(RULES))
def test_allocate_budget_matches_float64_loop(allocation):
  rng = np.random.default_rng(123)
  for trial in range(400):
    sizes = rng.choice([1, 2, 5, 17, 300, 4096, 10**6], size=int(rng.integers(1, 9)))
    ent = rng.uniform(0, 7, size=len(sizes))
    if trial % 7 == 0:
      ent[rng.integers(len(sizes))] = 0.0  # a constant layer
    if trial % 31 == 0:
      ent[:] = 0.0  # only constant layers: spread over capacity
    n = int(sizes.sum())
    total = int(rng.choice([0, 1, n, n - 1, int(rng.integers(0, n + 1)),
                            int(rng.integers(0, min(n, 50) + 1))]))
    got = masks.allocate_budget(total, sizes, ent, allocation)
    want = ref_counts(RULES[allocation](ent, sizes), sizes, total)
    assert got == want, (sizes, ent, total)


@pytest.mark.parametrize("allocation", ["entropy", "entropy_size", "uniform", "equal", "global"])
def test_build_mask_matches_float64_loop(allocation):
  params, grads = random_model(1000)
  n = sum(int(np.size(p["kernel"])) for p in params.values())
  for budget in (0.004, 0.2):
    for method in ("gem", "grad_magnitude", "weight_magnitude"):
      got = masks.build_mask(method, params, budget, grads=grads, allocation=allocation,
                             bins=64, eps=1e-6)
      want = ref_mask(method, allocation, params, grads, budget, 64, 1e-6)
      for name, m in want.items():
        np.testing.assert_array_equal(np.asarray(got[name]["kernel"]), m,
                                      err_msg=f"{method} {name} budget {budget}")
        assert not np.any(np.asarray(got[name]["bias"]))  # 1-D: not eligible by default
      assert masks.mask_count(got) == math.ceil(Decimal(repr(budget)) * n)


@pytest.mark.parametrize("allocation", ["entropy", "entropy_size", "uniform", "equal", "global"])
def test_budget_below_1e9_entries_gives_one(allocation):
  params, grads = random_model(1000)
  n = sum(int(np.size(p["kernel"])) for p in params.values())
  budget = 1e-10 / n  # budget * N = 1e-10 < 1e-9
  mask = masks.build_mask("gem", params, budget, grads=grads, allocation=allocation)
  assert masks.mask_count(mask) == 1
  if allocation == "global":  # the single entry is the best score over all layers
    ratio = jax.tree.map(lambda g, w: np.abs(np.asarray(g, np.float64)) /
                         (np.abs(np.asarray(w, np.float64)) + 1e-8), grads, params)
    best = max(ratio, key=lambda name: ratio[name]["kernel"].max())
    assert bool(np.asarray(mask[best]["kernel"]).ravel()[np.argmax(ratio[best]["kernel"])])


def test_uniform_gives_the_same_density_in_every_layer():
  params, grads = random_model(1000)
  sizes = {k: int(np.size(v["kernel"])) for k, v in params.items()}
  n = sum(sizes.values())
  mask = masks.build_mask("gem", params, 0.2, grads=grads, allocation="uniform")
  total = masks.mask_count(mask)
  for name, s in sizes.items():
    assert abs(int(np.sum(mask[name]["kernel"])) - total * s / n) < 1 + 1e-9, name


def test_allocate_budget_points_global_to_build_mask():
  with pytest.raises(ValueError, match="'global' is handled by build_mask"):
    masks.allocate_budget(3, [4, 4], [1.0, 1.0], "global")
  assert set(masks.ALLOCATIONS) == {"entropy", "entropy_size", "uniform", "equal", "global"}
