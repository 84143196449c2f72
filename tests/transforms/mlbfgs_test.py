"""Tests for jaxfl.transforms.mlbfgs (momentum L-BFGS).

Expected values come from independent references written here: a dense BFGS inverse-Hessian
recursion, and a NumPy float64 port of the authors' list-based update rule (ALGORITHMS.md §4).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import xla_env

from jaxfl import transforms as M

# ------------------------------------------------------------------------------------------
# Independent references.


def dense_bfgs_inverse(pairs, h0, n):
  """H_k from H_0 = h0 I by the BFGS inverse update over ``pairs`` (oldest first)."""
  h = h0 * np.eye(n)
  for s, y in pairs:
    r = 1.0 / (s @ y)
    v = np.eye(n) - r * np.outer(y, s)
    h = v.T @ h @ v + r * np.outer(s, s)
  return h


def np_damp(s, y, damping, lo, hi, eps):
  tau = (s @ y) / (s @ s + eps)
  phi = 1.0
  if tau < lo:
    phi = (1 - lo) / (1 - tau)
  elif tau > hi:
    phi = (hi - 1) / (tau - 1)
  phi = min(phi, 1 - damping)
  return phi * y + (1 - phi) * s


class NumpyMLBFGS:
  """Float64 NumPy port of the update rule with Python-list histories (pop(0) when full)."""

  def __init__(self, labels, *, lr, momentum, beta_p, beta_g, gamma, T, M, damping, lo, hi,
               eps, wd, reference_mode, normalize=True):
    self.labels = labels  # list per leaf: block id or None
    self.blocks = []
    for lb in labels:
      if lb is not None and lb not in self.blocks:
        self.blocks.append(lb)
    self.kw = dict(lr=lr, mu=momentum, bp=beta_p, bg=beta_g, gamma=gamma, T=T, M=M,
                   damping=damping, lo=lo, hi=hi, eps=eps, wd=wd)
    self.ref = reference_mode
    self.normalize = normalize
    self.t = 0
    self.P, self.G, self.Ps, self.Gs = {}, {}, {}, {}
    self.S = {b: [] for b in self.blocks}
    self.Y = {b: [] for b in self.blocks}
    self.h0 = {b: 0.0 for b in self.blocks}
    self.buf = None

  def _cat(self, leaves, b):
    return np.concatenate([x.ravel() for x, lb in zip(leaves, self.labels) if lb == b])

  def step(self, params, grads):
    """params, grads: lists of float64 arrays (one per leaf). Returns new params list."""
    k = self.kw
    self.t += 1
    t = self.t
    for b in self.blocks:
      p, g = self._cat(params, b), self._cat(grads, b)
      gm = g * (1 + k["wd"]) if self.ref else g + k["wd"] * p
      if t == 1:
        self.P[b], self.G[b] = p.copy(), gm.copy()
      elif self.ref:
        self.P[b] = k["bp"] * self.P[b] + p
        self.G[b] = k["bg"] * self.G[b] + gm
      else:
        self.P[b] = k["bp"] * self.P[b] + (1 - k["bp"]) * p
        self.G[b] = k["bg"] * self.G[b] + (1 - k["bg"]) * gm
      if t % k["T"] == 0:
        if b not in self.Ps:
          self.Ps[b], self.Gs[b] = self.P[b].copy(), self.G[b].copy()
        else:
          s = self.P[b] - self.Ps[b]
          y = self.G[b] - self.Gs[b]
          self.Ps[b], self.Gs[b] = self.P[b].copy(), self.G[b].copy()
          if self.S[b]:
            s = (1 - k["gamma"]) * s + k["gamma"] * self.S[b][-1]
            y = (1 - k["gamma"]) * y + k["gamma"] * self.Y[b][-1]
          yh = np_damp(s, y, k["damping"], k["lo"], k["hi"], k["eps"])
          if len(self.S[b]) == k["M"]:
            self.S[b].pop(0)
            self.Y[b].pop(0)
          self.S[b].append(s)
          self.Y[b].append(yh)
          if s @ yh > 0:
            self.h0[b] = (s @ yh) / (yh @ yh + k["eps"])
        if self.ref:
          self.G[b] = gm.copy()
    started = any(self.S[b] for b in self.blocks)
    out = [g + k["wd"] * p for p, g in zip(params, grads)]
    if started:
      dirs, sq = {}, 0.0
      for b in self.blocks:
        q = self._cat(grads, b) + k["wd"] * self._cat(params, b)
        pairs = [(s, y) for s, y in zip(self.S[b], self.Y[b]) if s @ y > 0]
        alphas = []
        for s, y in reversed(pairs):
          a = (s @ q) / (s @ y)
          alphas.append(a)
          q = q - a * y
        r = self.h0[b] * q
        for (s, y), a in zip(pairs, reversed(alphas)):
          r = r + (a - (y @ r) / (s @ y)) * s
        dirs[b] = r
        sq += r @ r
      scale = 1 / np.sqrt(sq) if self.normalize else 1.0
      offs = {b: 0 for b in self.blocks}
      for i, (p, g) in enumerate(zip(params, grads)):
        b = self.labels[i]
        if b is None:
          if self.ref:
            out[i] = g * scale
          continue
        out[i] = dirs[b][offs[b]:offs[b] + p.size].reshape(p.shape) * scale
        offs[b] += p.size
    if self.buf is None:
      self.buf = [np.zeros_like(u) for u in out]
    self.buf = [k["mu"] * v + u for v, u in zip(self.buf, out)]
    return [p - k["lr"] * v for p, v in zip(params, self.buf)]


# ------------------------------------------------------------------------------------------
# Helpers.


def _tree(rng, dtype=jnp.float32):
  return {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 2, 2)), dtype),
                   "bias": jnp.asarray(rng.normal(size=(2,)), dtype)},
          "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), dtype)},
          "head": {"kernel": jnp.asarray(rng.normal(size=(3,)), dtype)}}


LABELS = {"conv": {"kernel": "a", "bias": "a"}, "dense": {"kernel": "b"},
          "head": {"kernel": None}}


def _like(rng, tree):
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)


def _ordered_pairs(state, block):
  """Valid (s, y) of one block from the ring buffer, oldest first."""
  m = state.s_hist.shape[1]
  k = int(state.num_pairs)
  slots = [(k - m + i) % m for i in range(m)] if k >= m else list(range(k))
  return [(np.asarray(state.s_hist[block, j]), np.asarray(state.y_hist[block, j]))
          for j in slots if bool(state.valid[block, j])]


# ------------------------------------------------------------------------------------------
# Two-loop recursion, damping, ring buffer.


def test_two_loop_equals_dense_bfgs_with_wraparound_and_invalid_slots():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    n, m, b = 6, 4, 2
    s_hist = rng.normal(size=(b, m, n))
    y_hist = np.empty_like(s_hist)
    for i in range(b):
      for j in range(m):
        a = rng.normal(size=(n, n))
        y_hist[i, j] = (a @ a.T + np.eye(n)) @ s_hist[i, j]  # s^T y > 0
    valid = np.ones((b, m), bool)
    valid[1, 2] = False  # an invalid slot inside the ring: holds garbage
    s_hist[1, 2] = 1e30
    y_hist[1, 2] = -3e20
    newest = 1  # ring has wrapped: order oldest->newest is slots 2, 3, 0, 1
    h0 = np.array([0.7, 1.3])
    q = rng.normal(size=(b, n))
    got = M.two_loop(jnp.asarray(q), jnp.asarray(s_hist), jnp.asarray(y_hist),
                     jnp.asarray(valid), jnp.asarray(h0), jnp.asarray(newest))
    got = np.asarray(got)
    for i in range(b):
      order = [j for j in (2, 3, 0, 1) if valid[i, j]]
      h = dense_bfgs_inverse([(s_hist[i, j], y_hist[i, j]) for j in order], h0[i], n)
      np.testing.assert_allclose(got[i], h @ q[i], rtol=1e-10, atol=1e-12)


def test_invalid_slots_contribute_nothing():
  rng = np.random.default_rng(1)
  n, m = 5, 3
  s = rng.normal(size=(1, m, n)).astype(np.float32)
  y = s + 0.1 * rng.normal(size=s.shape).astype(np.float32)
  q = rng.normal(size=(1, n)).astype(np.float32)
  h0 = np.ones(1, np.float32)
  only_first = np.array([[True, False, False]])
  garbage_s, garbage_y = s.copy(), y.copy()
  garbage_s[0, 1:] = 1e6 * rng.normal(size=(m - 1, n))
  garbage_y[0, 1:] = -1e6 * rng.normal(size=(m - 1, n))
  a = M.two_loop(q, garbage_s, garbage_y, only_first, h0, jnp.asarray(2))
  b = M.two_loop(q, s[:, :1], y[:, :1], only_first[:, :1], h0, jnp.asarray(0))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
  # No valid slot at all: H = h0 I.
  c = M.two_loop(q, garbage_s, garbage_y, np.zeros((1, m), bool), 2 * h0, jnp.asarray(0))
  np.testing.assert_allclose(np.asarray(c), 2 * q, rtol=1e-6)


@pytest.mark.parametrize("lo,hi,eps_d", [(0.01, 1.5, 0.01), (0.2, 1.0, 0.0), (0.05, 3.0, 0.3)])
def test_damping_keeps_curvature_ratio_in_bounds(lo, hi, eps_d):
  rng = np.random.default_rng(2)
  n, b = 8, 400
  s = rng.normal(size=(b, n))
  # y with tau = s.y/s.s spread over [-5, 5]: y = tau s + orthogonal noise.
  tau = rng.uniform(-5, 5, size=b)
  noise = rng.normal(size=(b, n))
  noise -= (np.sum(noise * s, 1) / np.sum(s * s, 1))[:, None] * s
  y = tau[:, None] * s + noise
  yh = np.asarray(M.damp_pair(jnp.asarray(s, jnp.float32), jnp.asarray(y, jnp.float32),
                              eps_d, lo, hi, 1e-12))
  ratio = np.sum(s * yh, 1) / np.sum(s * s, 1)
  assert np.all(ratio >= lo - 1e-4) and np.all(ratio <= hi + 1e-4), (ratio.min(), ratio.max())
  for i in range(0, b, 37):  # equals the scalar NumPy formula
    np.testing.assert_allclose(yh[i], np_damp(s[i], y[i], eps_d, lo, hi, 1e-12), rtol=2e-4,
                               atol=2e-4)


def test_ring_buffer_wraparound_keeps_newest_pairs_in_slots():
  # beta = gamma = 0, no damping: pair k is exactly (theta_{k+1}-theta_k, g_{k+1}-g_k).
  rng = np.random.default_rng(3)
  tx = M.scale_by_mlbfgs(beta_p=0.0, beta_g=0.0, pair_momentum=0.0, update_every=1, history=3,
                         use_damping=False)
  p0 = {"w": jnp.zeros(4)}
  state = tx.init(p0)
  update = jax.jit(tx.update)
  ps = [rng.normal(size=4).astype(np.float32) for _ in range(8)]
  gs = [p * 2.0 for p in ps]  # y = 2 s: always valid
  for p, g in zip(ps, gs):
    _, state = update({"w": jnp.asarray(g)}, state, {"w": jnp.asarray(p)})
  assert int(state.num_pairs) == 7
  for k in range(4, 7):  # pairs 4, 5, 6 survive in slots k % 3
    j = k % 3
    np.testing.assert_allclose(state.s_hist[0, j], ps[k + 1] - ps[k], rtol=1e-6)
    np.testing.assert_allclose(state.y_hist[0, j], gs[k + 1] - gs[k], rtol=1e-6)
  assert bool(jnp.all(state.valid))


def test_transform_direction_equals_dense_bfgs_of_its_pairs():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    n = 7
    a = rng.normal(size=(n, n))
    hess = a @ a.T / n + 0.5 * np.eye(n)
    tx = M.scale_by_mlbfgs(beta_p=0.5, beta_g=0.5, pair_momentum=0.3, update_every=2,
                           history=3, weight_decay=0.01, normalize=False)
    theta = rng.normal(size=n)
    state = tx.init({"w": jnp.asarray(theta)})
    update = jax.jit(tx.update)
    for _ in range(12):  # pairs at t = 4, 6, 8, 10, 12: 5 pairs through a ring of 3
      g = hess @ theta + 0.3 * rng.normal(size=n)
      u, state = update({"w": jnp.asarray(g)}, state, {"w": jnp.asarray(theta)})
      theta = theta - 0.1 * np.asarray(u["w"]) + 0.05 * rng.normal(size=n)
    assert int(state.num_pairs) == 5
    pairs = _ordered_pairs(state, 0)
    assert len(pairs) == 3
    for s, y in pairs:  # damping bound on stored pairs
      assert 0.01 - 1e-9 <= (s @ y) / (s @ s) <= 1.5 + 1e-9
    s_new, y_new = pairs[-1]
    h0 = (s_new @ y_new) / (y_new @ y_new + 1e-12)
    h = dense_bfgs_inverse(pairs, h0, n)
    g = hess @ theta
    u, _ = update({"w": jnp.asarray(g)}, state, {"w": jnp.asarray(theta)})
    np.testing.assert_allclose(np.asarray(u["w"]), h @ (g + 0.01 * theta), rtol=1e-9)


# ------------------------------------------------------------------------------------------
# Whole update rule against the NumPy reference.


@pytest.mark.parametrize("reference_mode", [False, True], ids=["paper", "reference_mode"])
def test_matches_numpy_reference(reference_mode):
  hp = dict(momentum=0.9, beta_p=0.9, beta_g=0.8, gamma=0.5, T=3, M=2, damping=0.01, lo=0.01,
            hi=1.5, eps=1e-12, wd=0.01, lr=0.05)
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    params = _tree(rng, jnp.float64)
    tx = M.mlbfgs(hp["lr"], LABELS, momentum=hp["momentum"], beta_p=hp["beta_p"],
                  beta_g=hp["beta_g"], pair_momentum=hp["gamma"], update_every=hp["T"],
                  history=hp["M"], damping=hp["damping"], sigma_lo=hp["lo"], sigma_hi=hp["hi"],
                  eps=hp["eps"], weight_decay=hp["wd"], reference_mode=reference_mode)
    labels = jax.tree.leaves(LABELS, is_leaf=lambda x: x is None)
    ref = NumpyMLBFGS(labels, reference_mode=reference_mode, **hp)
    state = tx.init(params)
    update = jax.jit(tx.update)
    ref_params = [np.asarray(x) for x in jax.tree.leaves(params)]
    for _ in range(16):  # 4 pairs: snapshot at t=3, pairs at 6, 9, 12, 15; ring of 2 wraps
      grads = _like(rng, params)
      u, state = update(grads, state, params)
      params = optax.apply_updates(params, u)
      ref_params = ref.step(ref_params, [np.asarray(x) for x in jax.tree.leaves(grads)])
      for got, want in zip(jax.tree.leaves(params), ref_params):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-9, atol=1e-11)
    assert int(state[0].num_pairs) == 4


# ------------------------------------------------------------------------------------------
# Optimisation behaviour.


def _run_scan(tx, grad_fn, x0, steps, metric):
  @jax.jit
  def go():
    def body(carry, i):
      x, st = carry
      g = grad_fn(x, i)
      u, st = tx.update(g, st, x)
      x = optax.apply_updates(x, u)
      return (x, st), metric(x)
    return jax.lax.scan(body, (x0, tx.init(x0)), jnp.arange(steps))[1]
  return np.asarray(go())


def _first_below(curve, tol):
  hits = np.nonzero(curve < tol)[0]
  return int(hits[0]) + 1 if len(hits) else None


def test_quadratic_exact_gradients_far_fewer_steps_than_sgd():
  rng = np.random.default_rng(6)
  n = 20
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  eig = np.geomspace(0.02, 1.4, n)  # kappa = 70, inside the damping band [0.01, 1.5]
  a = jnp.asarray(q @ np.diag(eig) @ q.T, jnp.float32)
  b = jnp.asarray(rng.normal(size=n), jnp.float32)
  x_star = jnp.linalg.solve(a, b)
  grad = lambda x, i: a @ x - b
  err = lambda x: jnp.linalg.norm(x - x_star) / jnp.linalg.norm(x_star)
  x0 = jnp.zeros(n)
  steps = 1500
  ml = _run_scan(M.mlbfgs(1.0, momentum=0.0, beta_p=0.5, beta_g=0.5, pair_momentum=0.5,
                          update_every=1, history=10, normalize=False), grad, x0, steps, err)
  sgd = _run_scan(optax.sgd(1 / 1.4), grad, x0, steps, err)
  n_ml, n_sgd = _first_below(ml, 1e-4), _first_below(sgd, 1e-4)
  assert n_ml is not None and n_ml <= 60, n_ml
  assert n_sgd is None or n_sgd >= 5 * n_ml, (n_ml, n_sgd)


def test_minibatch_noise_stable_where_plain_stochastic_lbfgs_fails():
  rng = np.random.default_rng(0)
  num, n, bs, steps = 1024, 20, 8, 2000
  x = rng.normal(size=(num, n)) * np.geomspace(0.05, 1.0, n)  # ill-conditioned least squares
  y = x @ rng.normal(size=n) + 0.5 * rng.normal(size=num)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  loss = lambda w, xb, yb: 0.5 * jnp.mean((xb @ w - yb) ** 2)
  w_star = jnp.linalg.lstsq(x, y)[0]
  w0 = jnp.zeros(n)
  f0 = float(loss(w0, x, y) - loss(w_star, x, y))
  rel_excess = lambda w: (loss(w, x, y) - loss(w_star, x, y)) / f0

  def grad(w, i):
    idx = jax.random.randint(jax.random.fold_in(jax.random.key(0), i), (bs,), 0, num)
    return jax.grad(loss)(w, x[idx], y[idx])

  run = lambda tx: _run_scan(tx, grad, w0, steps, rel_excess)
  cosine = lambda lr: optax.cosine_decay_schedule(lr, steps)
  ml = run(M.mlbfgs(cosine(0.01), update_every=20, beta_p=0.99, beta_g=0.99))
  assert np.all(np.isfinite(ml)) and ml.max() <= 1.05  # never worse than the start
  assert ml[-1] < 0.005, ml[-1]
  # Textbook stochastic L-BFGS (a raw pair every step, no momentum, no damping, unnormalised
  # direction): blows up with a unit step, stalls near the start with a small one.
  big = run(M.plain_stochastic_lbfgs(1.0, normalize=False))
  small = run(M.plain_stochastic_lbfgs(0.03, normalize=False))
  assert not np.all(np.isfinite(big)) or np.nanmax(big) > 100, np.nanmax(big)
  assert small[-1] > 0.5, small[-1]
  # Same pipeline as mL-BFGS (normalised, heavy ball, same lr) minus pair momentum and
  # damping: stable thanks to the normalisation, but a worse final loss.
  same = run(M.plain_stochastic_lbfgs(cosine(0.01), momentum=0.9))
  assert ml[-1] < same[-1], (ml[-1], same[-1])


# ------------------------------------------------------------------------------------------
# optax conventions: jit, chain, inject_hyperparams, dtypes, vmap, sharding, errors.


def test_jit_single_compilation_and_stable_state_types():
  rng = np.random.default_rng(8)
  params = _tree(rng)
  tx = optax.chain(optax.clip_by_global_norm(10.0),
                   M.mlbfgs(0.1, LABELS, update_every=2, history=2, weight_decay=1e-4))
  state = tx.init(params)
  types0 = jax.tree.map(jax.typeof, state)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, grads):
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), state

  for _ in range(9):  # crosses the snapshot (t=2) and several pair extractions
    params, state = step(params, state, _like(rng, params))
    assert jax.tree.map(jax.typeof, state) == types0
  assert int(state[1][0].num_pairs) == 3
  chex.assert_tree_all_finite(params)


def test_eval_shape_init():
  tree = jax.eval_shape(lambda: _tree(np.random.default_rng(0)))
  # Blocks: "a" = conv kernel (12) + bias (2) = 14 values, "b" = 12. Without a sharding they
  # are packed back to back in one row of 26; per-block state has a leading axis of 2.
  st = jax.eval_shape(M.mlbfgs(0.1, LABELS, history=4).init, tree)[0]
  assert st.s_hist.shape == (1, 4, 26) and st.s_hist.dtype == jnp.float32
  assert st.param_avg.shape == (1, 26)
  assert st.sy.shape == (2, 4, 4) and st.w.shape == (2, 8, 8) and st.h0.shape == (2,)
  assert st.valid.shape == (2, 4) and st.valid.dtype == jnp.bool_
  assert st.count.dtype == jnp.int32
  # With a block sharding: one block per row, padded to the largest block (14).
  stacked = M.mlbfgs(0.1, LABELS, history=4, sharding=M.block_sharding(jax.devices()[:1]))
  st = jax.eval_shape(stacked.init, tree)[0]
  assert st.s_hist.shape == (2, 4, 14) and st.sy.shape == (2, 4, 4)


def test_packed_blocks_equal_one_block_per_row():
  """The packed layout (no sharding) and the stacked one (one block per padded row) are the
  same update rule: equal to float rounding over pair extractions and a ring wrap-around."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(13)
    params = _tree(rng, jnp.float64)
    kw = dict(update_every=2, history=2, beta_p=0.9, beta_g=0.9, weight_decay=1e-3)
    packed = M.mlbfgs(0.05, LABELS, **kw)
    stacked = M.mlbfgs(0.05, LABELS, sharding=M.block_sharding(jax.devices()[:1]), **kw)
    p1 = p2 = params
    s1, s2 = packed.init(params), stacked.init(params)
    up1, up2 = jax.jit(packed.update), jax.jit(stacked.update)
    for _ in range(11):
      g = _like(rng, params)
      u1, s1 = up1(g, s1, p1)
      u2, s2 = up2(g, s2, p2)
      p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
      chex.assert_trees_all_close(u1, u2, rtol=1e-10, atol=1e-12)
    assert int(s1[0].num_pairs) == 4
    chex.assert_trees_all_close(s1[0].sy, s2[0].sy, rtol=1e-10, atol=1e-12)
    # block "b" (12 values) sits at offset 14 of the packed row, at offset 0 of its own row
    np.testing.assert_allclose(s1[0].s_hist[0, :, 14:], s2[0].s_hist[1, :, :12], rtol=1e-12)


def test_inject_hyperparams_matches_plain_and_can_change_lr():
  rng = np.random.default_rng(9)
  params = _tree(rng)
  kw = dict(update_every=2, history=3, beta_p=0.9, beta_g=0.9, weight_decay=1e-3)
  plain = M.mlbfgs(0.05, LABELS, **kw)
  injected = optax.inject_hyperparams(M.mlbfgs, static_args=("update_every", "history"))(
      learning_rate=0.05, block_labels=LABELS, **kw)
  s1, s2 = plain.init(params), injected.init(params)
  up1, up2 = jax.jit(plain.update), jax.jit(injected.update)
  p1 = p2 = params
  for _ in range(7):
    g = _like(rng, params)
    u1, s1 = up1(g, s1, p1)
    u2, s2 = up2(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-6)
  # Halving the injected learning rate halves the next update.
  g = _like(rng, params)
  u_full, _ = up2(g, s2, p2)
  s2.hyperparams["learning_rate"] = jnp.asarray(0.025)
  u_half, _ = up2(g, s2, p2)
  chex.assert_trees_all_close(u_half, jax.tree.map(lambda x: x / 2, u_full), rtol=1e-5,
                              atol=1e-7)


def test_bf16_params_get_bf16_updates_and_f32_state():
  rng = np.random.default_rng(10)
  p32 = _tree(rng)
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
  tx = M.mlbfgs(0.05, LABELS, update_every=2, history=2)
  s16, s32 = tx.init(p16), tx.init(jax.tree.map(lambda x: x.astype(jnp.float32), p16))
  assert s16[0].s_hist.dtype == jnp.float32
  types0 = jax.tree.map(jax.typeof, s16)
  step = jax.jit(tx.update)
  for _ in range(6):
    g16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _like(rng, p32))
    u16, s16 = step(g16, s16, p16)
    u32, s32 = step(jax.tree.map(lambda x: x.astype(jnp.float32), g16), s32,
                    jax.tree.map(lambda x: x.astype(jnp.float32), p16))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u16))
    assert jax.tree.map(jax.typeof, s16) == types0
    chex.assert_trees_all_close(jax.tree.map(lambda x: x.astype(jnp.float32), u16), u32,
                                rtol=2e-2, atol=2e-3)


def test_vmap_over_clients_equals_python_loop():
  """The FL engine runs the client optimizer under vmap over a client axis."""
  rng = np.random.default_rng(11)
  num_clients, local_steps, d = 3, 9, 5
  tx = M.mlbfgs(0.1, update_every=2, history=2, beta_p=0.9, beta_g=0.9)
  targets = jnp.asarray(rng.normal(size=(num_clients, local_steps, d)), jnp.float32)
  server = {"w": jnp.zeros(d), "b": jnp.ones(2)}

  def client_update(params, data):
    def body(carry, target):
      p, st = carry
      g = jax.grad(lambda q: jnp.sum((q["w"] - target) ** 2) + jnp.sum(q["b"] ** 2))(p)
      u, st = tx.update(g, st, p)
      return (optax.apply_updates(p, u), st), None
    (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), data)
    return jax.tree.map(lambda a, b: a - b, params, p)

  batched = jax.jit(jax.vmap(client_update, in_axes=(None, 0)))(server, targets)
  single = jax.jit(client_update)
  for c in range(num_clients):
    chex.assert_trees_all_close(jax.tree.map(lambda x, c=c: x[c], batched),
                                single(server, targets[c]), rtol=1e-5, atol=1e-6)


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jaxfl import transforms as M
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    params = {"a": {"k": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)},
              "b": {"k": jnp.asarray(rng.normal(size=(9,)), jnp.float32)},
              "c": {"k": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)},
              "head": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    labels = M.top_level_block_labels(params)
    labels["head"] = None
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                          params) for _ in range(12)]

    def run(sharding):
      tx = M.mlbfgs(0.1, labels, update_every=2, history=3, beta_p=0.9, beta_g=0.9,
                    weight_decay=1e-3, sharding=sharding)
      p, st = params, tx.init(params)
      step = jax.jit(lambda g, st, p: tx.update(g, st, p))
      for g in grads:
        u, st = step(g, st, p)
        p = optax.apply_updates(p, u)
      return p, st[0]

    p1, s1 = run(None)
    p4, s4 = run(M.block_sharding())
    # 3 real blocks padded to 4, one per device: each device holds 1/4 of the history.
    assert s4.s_hist.shape == (4, 3, 30), s4.s_hist.shape
    assert {sh.data.shape for sh in s4.s_hist.addressable_shards} == {(1, 3, 30)}
    assert len({sh.device for sh in s4.s_hist.addressable_shards}) == 4
    assert int(s4.num_pairs) == 5
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(p1), jax.tree.leaves(p4)))
    # unsharded: the three blocks (30, 9, 16 values) packed in one row; sharded: one per row
    spans = [(0, 30), (30, 9), (39, 16)]
    assert s1.s_hist.shape == (1, 3, 55), s1.s_hist.shape
    hist = max(float(jnp.max(jnp.abs(s1.s_hist[0, :, o:o + n] - s4.s_hist[k, :, :n])))
               for k, (o, n) in enumerate(spans))
    print("MAXERR", err, hist)
    assert err < 1e-5 and hist < 1e-5, (err, hist)
""")


def test_sharded_blocks_equal_single_device():
  env = xla_env(4)
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "MAXERR" in proc.stdout


@pytest.mark.parametrize("kwargs,match", [
    (dict(history=0), "`history`"),
    (dict(update_every=0), "`update_every`"),
    (dict(sigma_hi=0.9), "`sigma_hi`"),
    (dict(sigma_lo=1.2), "`sigma_lo`"),
    (dict(damping=1.0), "`damping`"),
    (dict(beta_p=1.0), "`beta_p`"),
])
def test_bad_static_hyperparameters_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    M.scale_by_mlbfgs(**kwargs)


def test_bad_labels_raise():
  params = _tree(np.random.default_rng(0))
  with pytest.raises(ValueError, match="unknown block label"):
    M.scale_by_mlbfgs(LABELS, block_order=["a"]).init(params)
  with pytest.raises(ValueError, match="`block_labels` must have the structure"):
    M.scale_by_mlbfgs({"conv": "a"}).init(params)
  with pytest.raises(ValueError, match="`layout`"):
    M.resnet_block_labels(params, layout="two")
  with pytest.raises(ValueError, match="params"):
    M.scale_by_mlbfgs().update(params, M.scale_by_mlbfgs().init(params))


def test_unlabelled_leaves_pass_through():
  rng = np.random.default_rng(12)
  params = _tree(rng)
  tx = M.scale_by_mlbfgs(LABELS, update_every=1, history=2, weight_decay=0.1)
  state = tx.init(params)
  for _ in range(4):
    g = _like(rng, params)
    u, state = tx.update(g, state, params)
    np.testing.assert_allclose(u["head"]["kernel"],
                               g["head"]["kernel"] + 0.1 * params["head"]["kernel"], rtol=1e-6)
    params = optax.apply_updates(params, jax.tree.map(lambda v: -0.1 * v, u))
  assert int(state.num_pairs) == 3
  d = jnp.concatenate([u["conv"]["kernel"].ravel(), u["conv"]["bias"], u["dense"]["kernel"].ravel()])
  np.testing.assert_allclose(jnp.linalg.norm(d), 1.0, rtol=1e-5)  # global normalisation


def test_resnet_block_layouts():
  import jaxfl.models

  model = jaxfl.models.resnet20()
  params = jax.eval_shape(lambda: model.init(jax.random.key(0))[0])
  names = dict(zip(jax.tree.leaves(jax.tree_util.tree_map_with_path(
      lambda p, _: jax.tree_util.keystr(p), params)), range(10**6)))
  del names
  flat = lambda lb: dict(zip(
      [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]],
      jax.tree.leaves(lb, is_leaf=lambda x: x is None)))
  one = flat(M.resnet_block_labels(params, "one"))
  assert one["['Conv_0']['kernel']"] is None and one["['Dense_0']['kernel']"] is None
  assert one["['BatchNorm_0']['scale']"] is None
  assert {v for v in one.values() if v is not None} == {"body"}
  stage = flat(M.resnet_block_labels(params, "stage"))
  assert {v for v in stage.values() if v is not None} == {"stage16", "stage32", "stage64"}
  assert stage["['_BasicBlock_3']['Conv_2']['kernel']"] == "stage32"
  assert stage["['_BasicBlock_8']['BatchNorm_1']['bias']"] == "stage64"
  assert set(flat(M.resnet_block_labels(params, "single")).values()) == {"all"}
  st = jax.eval_shape(M.scale_by_mlbfgs(M.resnet_block_labels(params, "stage"), history=2).init,
                      params)
  # three stage blocks packed in one row (no padding), per-block state for 3 blocks
  body = sum(math.prod(x.shape) for k, sub in params.items() if "Block" in k
             for x in jax.tree.leaves(sub))
  assert st.s_hist.shape == (1, 2, body) and st.sy.shape == (3, 2, 2)
