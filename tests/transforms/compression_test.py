"""FedPAQ quantiser and FedDropoutAvg uplink transforms vs NumPy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfl import comm as qsgd_bits
from jaxfl import transforms


def _tree(rng):
  return {"k": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}


@pytest.mark.parametrize("levels", [1, 4, 16])
def test_qsgd_unbiased_statistically(levels):
  rng = np.random.default_rng(0)
  v = rng.normal(size=(40,)).astype(np.float32)
  n = 20000
  keys = jax.random.split(jax.random.key(1), n)
  q = np.asarray(jax.jit(jax.vmap(lambda k: transforms.qsgd(jnp.asarray(v), k, levels)))(keys),
                 np.float64)
  # Reference: xi = floor(r) + Bernoulli(r - floor(r)), r = s|v|/||v||.
  norm = np.linalg.norm(v.astype(np.float64))
  r = levels * np.abs(v) / norm
  frac = r - np.floor(r)
  sd = norm / levels * np.sqrt(frac * (1 - frac)) / np.sqrt(n)
  err = np.abs(q.mean(0) - v)
  assert (err <= 5 * sd + 1e-5).all(), (err / np.maximum(sd, 1e-12)).max()
  # Each entry rounds up with probability frac(r) (5 binomial standard errors).
  up = (np.round(np.abs(q) * levels / norm) > np.floor(r)).mean(0)
  assert (np.abs(up - frac) <= 5 * np.sqrt(frac * (1 - frac) / n) + 1e-3).all()


@pytest.mark.parametrize("levels", [1, 3, 16])
def test_qsgd_level_count_and_support(levels):
  rng = np.random.default_rng(2)
  v = rng.normal(size=(500,)).astype(np.float32)
  q = np.asarray(transforms.qsgd(jnp.asarray(v), jax.random.key(0), levels), np.float64)
  norm = np.linalg.norm(v.astype(np.float64))
  xi = np.abs(q) * levels / norm
  np.testing.assert_allclose(xi, np.round(xi), atol=1e-3)
  xi = np.round(xi).astype(int)
  assert xi.min() >= 0 and xi.max() <= levels
  # Each entry is rounded to one of its two neighbouring levels, never further.
  r = levels * np.abs(v) / norm
  assert ((xi == np.floor(r)) | (xi == np.ceil(r))).all()
  assert len(np.unique(xi)) <= levels + 1
  assert (np.sign(q)[xi > 0] == np.sign(v)[xi > 0]).all()


def test_qsgd_exact_cases_and_zero():
  v = jnp.array([0.0, -3.0, 0.0], jnp.float32)  # one non-zero: |v|/||v|| = 1 -> exact
  np.testing.assert_allclose(transforms.qsgd(v, jax.random.key(0), 7), v, rtol=1e-6)
  z = jnp.zeros((4, 4), jnp.float32)
  np.testing.assert_array_equal(transforms.qsgd(z, jax.random.key(0), 4), z)


def test_bits_per_element_and_bytes():
  assert qsgd_bits.qsgd_bits_per_element(16) == 1 + 5
  assert qsgd_bits.qsgd_bits_per_element(1) == 2
  assert qsgd_bits.qsgd_bits_per_element(15) == 1 + 4
  params = {"a": np.zeros((10, 10)), "b": np.zeros((4,))}
  elems = {"a": 3 * 100.0, "b": 2 * 4.0}  # 3 uploads of a, 2 of b
  want = (300 * 6 + 8 * 6) / 8 + (3 + 2) * 4
  assert math.isclose(qsgd_bits.qsgd_uplink_bytes(elems, params, 16), want)


def test_bad_arguments():
  for bad in (0, -2, 2.5, True):
    with pytest.raises(ValueError, match="levels"):
      transforms.qsgd_quantize(bad)
  with pytest.raises(ValueError, match="levels"):
    qsgd_bits.qsgd_bits_per_element(0)
  for bad in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match="rate"):
      transforms.random_dropout(bad)


def test_quantize_transform_with_and_without_key():
  rng = np.random.default_rng(3)
  t = _tree(rng)
  tx = transforms.qsgd_quantize(4)
  s = tx.init(t)
  f0 = jax.jit(lambda u: tx.update(u, s, None)[0])
  fk = jax.jit(lambda u, k: tx.update(u, s, None, key=k)[0])
  f = lambda u, k=None: f0(u) if k is None else fk(u, k)
  a, b = f(t), f(t)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # content key: deterministic
  t2 = jax.tree.map(lambda x: x * 1.0001, t)
  # A different delta gets a different draw (compared on the rounding pattern).
  xi1 = np.asarray(a["k"]) / np.linalg.norm(np.asarray(t["k"]))
  xi2 = np.asarray(f(t2)["k"]) / np.linalg.norm(np.asarray(t2["k"]))
  assert not np.allclose(xi1, xi2)
  c = f(t, jax.random.key(5))
  d = f(t, jax.random.key(6))
  assert not np.allclose(np.asarray(c["k"]), np.asarray(d["k"]))
  # vmapped over clients (as in the round): different clients, different draws.
  stacked = jax.tree.map(lambda x: jnp.stack([x, x + 1e-3]), t)
  out = jax.jit(jax.vmap(lambda u: tx.update(u, tx.init(u), None)[0]))(stacked)
  assert out["k"].shape == (2, 6, 5)


def test_dropout_rate_kernels_only_no_rescale():
  rng = np.random.default_rng(4)
  big = {"k": jnp.asarray(rng.normal(size=(200, 100)) + 3.0, jnp.float32),
         "b": jnp.asarray(rng.normal(size=(100,)), jnp.float32)}
  tx = transforms.random_dropout(0.75)
  out = jax.jit(lambda u, k: tx.update(u, tx.init(u), None, key=k)[0])(big, jax.random.key(0))
  k, kin = np.asarray(out["k"]), np.asarray(big["k"])
  kept = k != 0
  n = kept.size
  # Binomial(n, 0.25): 5 standard deviations.
  assert abs(kept.sum() - 0.25 * n) <= 5 * math.sqrt(n * 0.25 * 0.75)
  np.testing.assert_array_equal(k[kept], kin[kept])  # no 1/(1-r) rescaling
  np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(big["b"]))  # non-kernel kept
  # Content-derived masks differ between clients.
  stacked = jax.tree.map(lambda x: jnp.stack([x, x + 1.0]), big)
  o2 = jax.jit(jax.vmap(lambda u: tx.update(u, tx.init(u), None)[0]))(stacked)
  assert ((np.asarray(o2["k"][0]) != 0) != (np.asarray(o2["k"][1]) != 0)).any()


def test_dropout_zero_rate_is_identity():
  t = _tree(np.random.default_rng(5))
  tx = transforms.random_dropout(0.0)
  out = jax.jit(lambda u: tx.update(u, tx.init(u), None)[0])(t)
  jax.tree.map(np.testing.assert_array_equal, out, t)
