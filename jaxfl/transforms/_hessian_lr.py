"""Hessian-aware learning-rate adjustment for large-batch training.

Lee, He & Avestimehr, "Achieving small-batch accuracy with large-batch scalability via
Hessian-aware learning rate adjustment", Neural Networks 158:1-14, 2023
(doi:10.1016/j.neunet.2022.11.007); ALGORITHMS.md §10a. No public code; the spec reconstructs
the method from the abstract and the four highlights, so the schedule below is **inferred**:

1. Hessian information sets the gradient-noise scale: the (linearly scaled, warmed-up) peak
   learning rate is kept while the loss landscape is still changing, measured by the top
   Hessian eigenvalue :math:`\\lambda_{\\max}` (:func:`hessian_top_eigenvalue`); optionally the
   rate is capped at :math:`2\\kappa/\\lambda_{\\max}` (``sharpness_cap``), the largest stable
   step of a quadratic times :math:`\\kappa`.
2. Decaying too early harms the margin distribution: the decay starts only once
   :math:`\\lambda_{\\max}` has plateaued (``plateau_patience`` consecutive measurements within a
   relative ``plateau_rtol`` of the previous one) and not before ``min_hold_steps``
   (``max_hold_steps`` forces it).
3. The minimum rate after the decay sets the final sharpness: the decay ends at ``min_lr``.
4. The length of the noise-scale transition matters: the decay is a half-cosine over
   ``transition_steps`` steps, not a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["HessianAwareLRState", "hessian_aware_lr", "hessian_top_eigenvalue"]


def _tree_dot(a, b):
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)).real
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def hessian_top_eigenvalue(loss_fn: Callable[[Any], jax.Array], params: Any, key: jax.Array,
                           *, num_iters: int = 20, mode: str = "reverse"
                           ) -> tuple[jax.Array, Any]:
  """The dominant Hessian eigenvalue of ``loss_fn`` at ``params`` by power iteration.

  Each iteration is one Hessian-vector product, a few gradients' cost; nothing of size
  :math:`N^2` is formed. Starting from a Gaussian direction :math:`v_0`,

  .. math::
    v_{k+1} = H v_k / \\lVert H v_k \\rVert, \\qquad
    \\lambda = v_K^\\top H v_K .

  Args:
    loss_fn: ``params -> f32[]``, the loss on a fixed batch (close over the batch; it must be
      deterministic: no dropout key that changes between calls).
    params: the point.
    key: for the start direction.
    num_iters: :math:`K \\ge 1` (static). The error shrinks like
      :math:`(\\lambda_2/\\lambda_1)^{K}`.
    mode: ``"reverse"`` (reverse-over-reverse, ``grad`` of :math:`\\langle \\nabla L,
      v\\rangle`: works through ``jax.custom_vjp`` layers such as jaxfl's conv and max-pool)
      or ``"forward"`` (forward-over-reverse, ``jvp`` of ``grad``: cheaper, but JAX cannot
      push a tangent through a ``custom_vjp``).

  Returns:
    ``(lam, v)``: the Rayleigh quotient f32[] and the unit direction (a params-shaped tree).
    Power iteration finds the eigenvalue of largest magnitude; near a minimum that is
    :math:`\\lambda_{\\max}`.

  On XLA:CPU the second derivative of the native convolution is slow: 10 iterations on 512
  images of jaxfl's CNN took 37 s with ``conv_impl="xla"`` or ``"lax"`` and 2.4 s with
  ``conv_impl="patches"`` (docs/hessian_lr.md). The parameters do not depend on the lowering,
  so the measured model can be built with ``"patches"``.
  """
  if not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f"`num_iters` must be an int >= 1, got {num_iters!r}.")
  if mode not in ("reverse", "forward"):
    raise ValueError(f"`mode` must be 'reverse' or 'forward', got {mode!r}.")
  grad = jax.grad(loss_fn)

  def hvp(v):
    if mode == "forward":
      return jax.jvp(grad, (params,), (v,))[1]
    return jax.grad(lambda p: _tree_dot(grad(p), v))(params)

  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  v = jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(x), jnp.float32)
                                   for k, x in zip(keys, leaves)])

  def normalise(t):
    norm = jnp.sqrt(_tree_dot(t, t))
    return jax.tree.map(lambda x: x / jnp.where(norm > 0, norm, 1.0), t)

  def cast(t):
    return jax.tree.map(lambda x, p: x.astype(jnp.result_type(p)), t, params)

  v = normalise(v)

  def body(_, v):
    return normalise(hvp(cast(v)))

  v = jax.lax.fori_loop(0, num_iters - 1, body, v)
  hv = hvp(cast(v))
  return _tree_dot(v, hv), v


class HessianAwareLRState(NamedTuple):
  """State of :func:`hessian_aware_lr`.

  Attributes:
    count: i32[], updates so far.
    learning_rate: f32[], the rate applied by the last update.
    sharpness: f32[], the last measured :math:`\\lambda_{\\max}` (NaN before the first).
    stable: i32[], consecutive measurements within ``plateau_rtol`` of the one before.
    decay_start: i32[], the step the decay started (-1: still holding the peak).
  """

  count: jax.Array
  learning_rate: jax.Array
  sharpness: jax.Array
  stable: jax.Array
  decay_start: jax.Array


def hessian_aware_lr(peak_lr: float, *, warmup_steps: int = 0, init_lr: float = 0.0,
                     min_lr: float = 0.0, transition_steps: int = 1,
                     plateau_rtol: float = 0.05, plateau_patience: int = 3,
                     min_hold_steps: int = 0, max_hold_steps: int | None = None,
                     sharpness_cap: float | None = None
                     ) -> optax.GradientTransformationExtraArgs:
  r"""Scales updates by :math:`-\eta_t`, a rate driven by measured sharpness (inferred, §10a).

  Feed it :math:`\lambda_{\max}` (:func:`hessian_top_eigenvalue`) as the extra argument
  ``sharpness`` whenever it is measured (NaN or no argument: not measured this step). With
  :math:`t` the step count, :math:`\hat\eta` the peak and :math:`t_d` the step the decay
  started:

  .. math::
    \eta_t = \begin{cases}
      \eta_0 + (\hat\eta - \eta_0)\, t / T_w & t < T_w \text{ (warm-up)} \\
      \hat\eta & \text{until the plateau (or } t = T_{\max}\text{), not before } T_{\min} \\
      \eta_{\min} + (\hat\eta - \eta_{\min})\,
        \tfrac12\bigl(1 + \cos(\pi \min(1, (t - t_d)/T_d))\bigr) & \text{after}
    \end{cases}

  and, with ``sharpness_cap`` :math:`\kappa`, :math:`\eta_t \leftarrow \min(\eta_t,
  2\kappa/\lambda)` for the last measured :math:`\lambda > 0`. The plateau: after the warm-up
  and :math:`T_{\min}`, a measurement with :math:`|\lambda - \lambda_{prev}| \le \rho
  |\lambda_{prev}|` counts as stable; ``plateau_patience`` stable measurements in a row start
  the decay at that step. Chain it after a direction, e.g.
  ``optax.chain(optax.trace(0.9), hessian_aware_lr(...))`` for SGD with momentum.

  Args:
    peak_lr: :math:`\hat\eta` (e.g. linearly scaled with the batch size).
    warmup_steps: :math:`T_w`.
    init_lr: :math:`\eta_0`, the rate at step 0 of the warm-up.
    min_lr: :math:`\eta_{\min}`, the floor after the transition.
    transition_steps: :math:`T_d \ge 1`, the length of the decay.
    plateau_rtol: :math:`\rho`, relative change of :math:`\lambda_{\max}` that counts as stable.
    plateau_patience: stable measurements in a row that start the decay.
    min_hold_steps: :math:`T_{\min}`: no decay before this step.
    max_hold_steps: :math:`T_{\max}`: the decay starts here at the latest (None: only on a
      plateau).
    sharpness_cap: :math:`\kappa` or None (no cap).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; the state's ``learning_rate`` is the rate
    the last update applied.

  References:
    Lee, He & Avestimehr, Neural Networks 158:1-14, 2023 (the four highlights); the schedule's
    form is this library's reconstruction (ALGORITHMS.md §10a, open question 10).
  """
  # Floats are checked when they are Python numbers (under optax.inject_hyperparams they
  # arrive traced).
  for name, v in (("peak_lr", peak_lr), ("init_lr", init_lr), ("min_lr", min_lr),
                  ("plateau_rtol", plateau_rtol)):
    if isinstance(v, bool) or (isinstance(v, (int, float))
                               and not (math.isfinite(v) and v >= 0)):
      raise ValueError(f"`{name}` must be a finite number >= 0, got {v!r}.")
  if isinstance(min_lr, (int, float)) and isinstance(peak_lr, (int, float)) and min_lr > peak_lr:
    raise ValueError(f"`min_lr`={min_lr} must not exceed `peak_lr`={peak_lr}.")
  for name, v, lo in (("warmup_steps", warmup_steps, 0), ("transition_steps", transition_steps, 1),
                      ("plateau_patience", plateau_patience, 1),
                      ("min_hold_steps", min_hold_steps, 0)):
    if not isinstance(v, int) or v < lo:
      raise ValueError(f"`{name}` must be an int >= {lo}, got {v!r}.")
  if max_hold_steps is not None and (not isinstance(max_hold_steps, int) or max_hold_steps < 0):
    raise ValueError(f"`max_hold_steps` must be None or an int >= 0, got {max_hold_steps!r}.")
  if isinstance(sharpness_cap, bool) or (isinstance(sharpness_cap, (int, float))
                                         and not sharpness_cap > 0):
    raise ValueError(f"`sharpness_cap` must be None or a number > 0, got {sharpness_cap!r}.")
  hold_from = max(warmup_steps, min_hold_steps)

  def init_fn(params):
    del params
    return HessianAwareLRState(jnp.zeros([], jnp.int32), jnp.asarray(init_lr, jnp.float32),
                               jnp.asarray(jnp.nan, jnp.float32), jnp.zeros([], jnp.int32),
                               jnp.asarray(-1, jnp.int32))

  def update_fn(updates, state, params=None, *, sharpness=None, **extra):
    del params, extra
    t = state.count
    lam = (jnp.asarray(jnp.nan, jnp.float32) if sharpness is None
           else jnp.asarray(sharpness, jnp.float32))
    measured = jnp.isfinite(lam)
    prev = state.sharpness
    close = jnp.abs(lam - prev) <= plateau_rtol * jnp.abs(prev)  # False while prev is NaN
    watching = t >= hold_from
    stable = jnp.where(measured & watching,
                       jnp.where(close, state.stable + 1, 0), state.stable)
    holding = state.decay_start < 0
    start_now = holding & watching & (stable >= plateau_patience)
    if max_hold_steps is not None:
      start_now = start_now | (holding & (t >= max(max_hold_steps, warmup_steps)))
    decay_start = jnp.where(start_now, t, state.decay_start)
    tf = t.astype(jnp.float32)
    if warmup_steps > 0:
      warm = init_lr + (peak_lr - init_lr) * jnp.minimum(tf / warmup_steps, 1.0)
    else:
      warm = jnp.asarray(peak_lr, jnp.float32)
    progress = jnp.clip((t - decay_start).astype(jnp.float32) / transition_steps, 0.0, 1.0)
    decayed = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    lr = jnp.where(decay_start >= 0, decayed, warm)
    new_lam = jnp.where(measured, lam, prev)
    if sharpness_cap is not None:
      cap = 2.0 * sharpness_cap / new_lam
      lr = jnp.where(jnp.isfinite(cap) & (new_lam > 0), jnp.minimum(lr, cap), lr)
    lr = lr.astype(jnp.float32)
    updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    return updates, HessianAwareLRState(optax.safe_increment(t), lr, new_lam, stable,
                                        decay_start)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
