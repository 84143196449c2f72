"""Hessian-aware learning rate (ALGORITHMS.md §10a): the eigenvalue estimate against a dense
float64 eigendecomposition, the schedule against a plain Python state machine."""

import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfl.transforms import hessian_aware_lr, hessian_top_eigenvalue


def _spectrum_matrix(rng, n, top):
  """A random symmetric n x n matrix with eigenvalues ``top`` then uniform in [-2, 2]."""
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  eig = np.concatenate([top, rng.uniform(-2, 2, n - len(top))])
  return (q * eig) @ q.T


@pytest.mark.parametrize("seed,mode", [(0, "reverse"), (1, "forward")])
def test_top_eigenvalue_of_a_quadratic_equals_numpy(seed, mode):
  rng = np.random.default_rng(seed)
  a = _spectrum_matrix(rng, 9, [rng.uniform(8, 12), rng.uniform(3, 4)])
  b = rng.normal(size=9)
  # The parameters as a two-leaf tree (5 + 4 entries) over the 9-dim quadratic.
  params = {"u": jnp.asarray(rng.normal(size=5), jnp.float32),
            "w": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}
  A, B = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

  def loss(p):
    x = jnp.concatenate([p["u"], p["w"].reshape(-1)])
    return 0.5 * x @ A @ x + B @ x

  lam, v = jax.jit(lambda p, k: hessian_top_eigenvalue(loss, p, k, num_iters=60, mode=mode))(
      params, jax.random.key(seed))
  want = np.linalg.eigvalsh(a)  # float64
  np.testing.assert_allclose(float(lam), want[-1], rtol=1e-4)
  vec = np.concatenate([np.asarray(v["u"]), np.asarray(v["w"]).reshape(-1)]).astype(np.float64)
  np.testing.assert_allclose(np.linalg.norm(vec), 1.0, rtol=1e-5)
  top = np.linalg.eigh(a)[1][:, -1]
  assert abs(vec @ top) > 1 - 1e-4  # the eigenvector, up to sign


def test_top_eigenvalue_of_a_network_loss_equals_the_dense_hessian():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 16))
  params = {"w1": jnp.asarray(rng.normal(size=(4, 5)) * 0.8, jnp.float32),
            "b1": jnp.zeros(5, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(5, 3)) * 0.8, jnp.float32)}

  def loss(p):
    logits = jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  flat, unravel = jax.flatten_util.ravel_pytree(params)
  dense = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat), np.float64)
  eig = np.linalg.eigvalsh(0.5 * (dense + dense.T))
  want = eig[np.argmax(np.abs(eig))]
  lam, _ = jax.jit(lambda p, k: hessian_top_eigenvalue(loss, p, k, num_iters=200))(
      params, jax.random.key(0))
  np.testing.assert_allclose(float(lam), want, rtol=2e-3)


def test_reverse_mode_goes_through_custom_vjp_layers():
  """jaxfl's max-pool carries a custom VJP: forward-over-reverse cannot pass it, the default
  reverse-over-reverse can, and equals the dense Hessian's eigenvalue (a tiny conv net)."""
  import flax.linen as nn

  import jaxfl

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = jnp.tanh(nn.Conv(2, (3, 3))(x))
      x = jaxfl.models.max_pool(x, (2, 2))
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(8, 4, 4, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 8))
  model = jaxfl.models.from_linen(Tiny(), (4, 4, 1))
  params, state = model.init(jax.random.key(0))

  def loss(p):
    logits = model.apply(p, state, x, train=False)[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  lam, _ = jax.jit(lambda p: hessian_top_eigenvalue(loss, p, jax.random.key(1),
                                                    num_iters=80))(params)
  with pytest.raises(TypeError, match="custom_vjp"):
    hessian_top_eigenvalue(loss, params, jax.random.key(1), num_iters=2, mode="forward")
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  assert flat.size < 100
  dense = np.asarray(jax.jit(jax.jacrev(jax.grad(lambda f: loss(unravel(f)))))(flat), np.float64)
  eig = np.linalg.eigvalsh(0.5 * (dense + dense.T))
  np.testing.assert_allclose(float(lam), eig[np.argmax(np.abs(eig))], rtol=2e-3)


def _reference_rates(steps, sharpness, *, peak_lr, warmup_steps=0, init_lr=0.0, min_lr=0.0,
                     transition_steps=1, plateau_rtol=0.05, plateau_patience=3,
                     min_hold_steps=0, max_hold_steps=None, sharpness_cap=None):
  """The schedule as a plain Python loop (float64)."""
  prev, stable, start, out = math.nan, 0, None, []
  hold_from = max(warmup_steps, min_hold_steps)
  for t in range(steps):
    lam = sharpness[t]
    measured = not math.isnan(lam)
    if measured and t >= hold_from:
      stable = stable + 1 if (not math.isnan(prev) and abs(lam - prev) <= plateau_rtol
                              * abs(prev)) else 0
    if start is None and t >= hold_from and stable >= plateau_patience:
      start = t
    if (start is None and max_hold_steps is not None
        and t >= max(max_hold_steps, warmup_steps)):
      start = t
    if start is None:
      lr = (init_lr + (peak_lr - init_lr) * min(t / warmup_steps, 1.0) if warmup_steps
            else peak_lr)
    else:
      p = min(max((t - start) / transition_steps, 0.0), 1.0)
      lr = min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p))
    if measured:
      prev = lam
    if sharpness_cap is not None and not math.isnan(prev) and prev > 0:
      lr = min(lr, 2 * sharpness_cap / prev)
    out.append(lr)
  return np.array(out)


def _sharpness_sequence(rng, steps, every):
  """Drifting sharpness that settles: measured every ``every`` steps, NaN otherwise."""
  base = 5.0 + 20.0 * np.exp(-np.arange(steps) / (steps / 5)) + rng.normal(0, 0.05, steps)
  return np.where(np.arange(steps) % every == 0, base, np.nan)


@pytest.mark.parametrize("kw", [
    dict(peak_lr=0.8, warmup_steps=10, init_lr=0.1, min_lr=0.01, transition_steps=25),
    dict(peak_lr=0.5, warmup_steps=0, min_lr=0.05, transition_steps=7, plateau_rtol=0.02,
         plateau_patience=2, min_hold_steps=40),
    dict(peak_lr=1.0, warmup_steps=5, transition_steps=30, plateau_rtol=1e-6,
         max_hold_steps=50),
    dict(peak_lr=2.0, warmup_steps=8, min_lr=0.1, transition_steps=20, sharpness_cap=0.5),
])
def test_schedule_equals_a_python_loop(kw):
  rng = np.random.default_rng(len(kw))
  steps = 120
  lam = _sharpness_sequence(rng, steps, every=3)
  want = _reference_rates(steps, lam, **kw)
  tx = optax.with_extra_args_support(hessian_aware_lr(**kw))
  params = {"a": jnp.ones([3]), "b": jnp.ones([2, 2])}
  g = jax.tree.map(lambda p: 2.0 * p, params)

  @jax.jit
  def step(state, s):
    u, state = tx.update(g, state, params, sharpness=s)
    return state, (u, state.learning_rate, state.decay_start)

  state, (u, lr, starts) = jax.lax.scan(step, tx.init(params), jnp.asarray(lam, jnp.float32))
  np.testing.assert_allclose(np.asarray(lr, np.float64), want, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(u["b"])[:, 0, 0], -2.0 * np.asarray(lr), rtol=1e-6)
  assert int(state.count) == steps
  started = np.asarray(starts)[-1]
  if "max_hold_steps" in kw:  # rtol 1e-6 never sees a plateau: forced at max_hold_steps
    assert started == kw["max_hold_steps"]
  else:  # the decay started on a plateau, after the hold
    assert max(kw.get("warmup_steps", 0), kw.get("min_hold_steps", 0)) < started < steps
  assert want[-1] == pytest.approx(kw.get("min_lr", 0.0) if "sharpness_cap" not in kw
                                   else min(kw["min_lr"], 2 * 0.5 / lam[~np.isnan(lam)][-1]))


def test_without_sharpness_it_is_warmup_then_the_peak():
  tx = hessian_aware_lr(0.4, warmup_steps=4)
  params = jnp.ones([2])
  state = tx.init(params)
  rates = []
  for _ in range(8):
    u, state = tx.update(jnp.ones([2]), state, params)
    rates.append(float(state.learning_rate))
  np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4], atol=1e-7)
  assert int(state.decay_start) == -1


@pytest.mark.parametrize("kwargs,match", [
    (dict(peak_lr=-1.0), "peak_lr"), (dict(peak_lr=float("nan")), "peak_lr"),
    (dict(peak_lr=0.1, min_lr=0.2), "min_lr"), (dict(peak_lr=0.1, warmup_steps=1.5),
                                                 "warmup_steps"),
    (dict(peak_lr=0.1, transition_steps=0), "transition_steps"),
    (dict(peak_lr=0.1, plateau_patience=0), "plateau_patience"),
    (dict(peak_lr=0.1, max_hold_steps=-2), "max_hold_steps"),
    (dict(peak_lr=0.1, sharpness_cap=0.0), "sharpness_cap"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=f"`{match}`"):
    hessian_aware_lr(**kwargs)
  with pytest.raises(ValueError, match="num_iters"):
    hessian_top_eigenvalue(lambda p: jnp.sum(p ** 2), jnp.ones(2), jax.random.key(0),
                           num_iters=0)
  with pytest.raises(ValueError, match="mode"):
    hessian_top_eigenvalue(lambda p: jnp.sum(p ** 2), jnp.ones(2), jax.random.key(0),
                           mode="fwd")
