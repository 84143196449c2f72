r"""GEM's element scores: calibration gradients, gradient-to-weight ratio, layer entropies.

Every function here is jit-able (``calibration_gradients`` when given stacked batches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]

__all__ = ["calibration_gradients", "gradient_weight_ratio", "layer_entropy"]


def _is_sequence_of_batches(batches: Any) -> bool:
  if isinstance(batches, (tuple, dict, np.ndarray, jax.Array)) or hasattr(batches, "_fields"):
    return False
  return isinstance(batches, Iterable)


def calibration_gradients(
    loss_fn: LossFn,
    params: PyTree,
    batches: Any,
    *,
    reduce: str = "mean",
    stacked: bool | None = None,
) -> PyTree:
  r"""Calibration gradient at the pre-trained weights, averaged over a few batches.

  .. math::
    G = \frac{1}{B} \sum_{b=1}^{B} \nabla_w L(w^0; \text{batch}_b)
    \quad\text{or}\quad
    G = \frac{1}{B} \sum_{b=1}^{B} |\nabla_w L(w^0; \text{batch}_b)|.

  Args:
    loss_fn: ``loss_fn(params, batch) -> f32[]``.
    params: pre-trained parameters :math:`w^0`.
    batches: either a *sequence* of batches (a ``list``, generator or other iterable; each is
      passed to ``loss_fn`` as is, one jitted gradient call per batch) or a *stacked* pytree
      whose leaves carry a leading batch-index axis of size B (a tuple, dict, NamedTuple or
      array; reduced inside one ``lax.scan``, so the whole call is jit-able).
    reduce: ``"mean"`` (mean signed gradient, default, the spec's G) or ``"abs_mean"`` (mean
      absolute gradient, which does not cancel across batches) [INFERRED].
    stacked: overrides the sequence/stacked detection described above.

  Returns:
    A tree like ``params`` (f32 leaves, or the params dtype).

  Raises:
    ValueError: for an unknown ``reduce`` or an empty sequence of batches.
  """
  if reduce not in ("mean", "abs_mean"):
    raise ValueError(f"`reduce` must be 'mean' or 'abs_mean', got {reduce!r}.")
  fix = (lambda g: jnp.abs(g)) if reduce == "abs_mean" else (lambda g: g)
  grad_fn = jax.grad(loss_fn)
  if stacked is None:
    stacked = not _is_sequence_of_batches(batches)

  if stacked:
    num = jax.tree.leaves(batches)[0].shape[0]

    def body(acc, batch):
      g = grad_fn(params, batch)
      return optax.tree.add(acc, jax.tree.map(fix, g)), None

    total, _ = jax.lax.scan(body, optax.tree.zeros_like(params), batches)
    return jax.tree.map(lambda t: t / num, total)

  step = jax.jit(lambda p, b: jax.tree.map(fix, grad_fn(p, b)))
  total, num = None, 0
  for batch in batches:
    g = step(params, batch)
    total = g if total is None else optax.tree.add(total, g)
    num += 1
  if num == 0:
    raise ValueError("`batches` is empty; pass at least one calibration batch.")
  return jax.tree.map(lambda t: t / num, total)


def gradient_weight_ratio(grads: PyTree, params: PyTree, eps: float = 1e-8) -> PyTree:
  r"""GEM's element score :math:`r_j = |G_j| / (|w^0_j| + \epsilon)` (jit-able).

  Args:
    grads: calibration gradient :math:`G`, same tree as ``params``.
    params: pre-trained weights :math:`w^0`.
    eps: :math:`\epsilon` >= 0 [INFERRED default 1e-8]. Entries with :math:`w^0_j = 0` then
      rank first in their layer whenever their gradient is non-zero.
  """
  if not eps >= 0:
    raise ValueError(f"`eps` must be >= 0, got {eps}.")
  return jax.tree.map(lambda g, w: jnp.abs(g) / (jnp.abs(w) + eps), grads, params)


def _entropy_leaf(x: jax.Array, bins: int) -> jax.Array:
  x = jnp.ravel(x).astype(jnp.float32)
  if x.size == 0:
    return jnp.zeros([], jnp.float32)
  lo, hi = jnp.min(x), jnp.max(x)
  width = hi - lo
  scaled = jnp.where(width > 0, (x - lo) / jnp.where(width > 0, width, 1.0), 0.0) * bins
  idx = jnp.clip(jnp.floor(scaled).astype(jnp.int32), 0, bins - 1)
  counts = jnp.zeros([bins], jnp.float32).at[idx].add(1.0)
  p = counts / x.size
  ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.maximum(ent, 0.0)  # no -0.0 for constant layers


def layer_entropy(params: PyTree, bins: int = 256) -> PyTree:
  r"""Shannon entropy (nats) of each leaf's parameter-value histogram (jit-able).

  .. math::
    H_l = -\sum_{k=1}^{\text{bins}} p_{l,k} \log p_{l,k},

  where :math:`p_{l,k}` is the fraction of layer :math:`l`'s values in the :math:`k`-th of
  ``bins`` equal-width bins over :math:`[\min_l, \max_l]` (half-open, the last one closed, as
  ``numpy.histogram``). A constant layer has entropy 0.

  Args:
    params: parameter pytree.
    bins: number of histogram bins, a static int >= 2 [INFERRED default 256].

  Returns:
    A same-structure tree of f32[] entropies.
  """
  if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or bins < 2:
    raise ValueError(f"`bins` must be an int >= 2, got {bins!r}.")
  return jax.tree.map(lambda x: _entropy_leaf(x, int(bins)), params)
