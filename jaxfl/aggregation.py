"""Aggregators: optax-shaped transforms from stacked client updates to one update.

Contract (mirrors ``optax.experimental.aggregating``): an
``optax.GradientTransformationExtraArgs`` whose ``update(client_updates, state, params, *,
weights, key)`` maps ``f32[C, *s]`` client updates and ``f32[C]`` weights (0 = not
participating: padded, dropped or quarantined clients) to an ``f32[*s]`` aggregate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxfl import tree as jtree


def _empty_init(params):
  del params
  return optax.EmptyState()


def weighted_mean() -> optax.GradientTransformationExtraArgs:
  r"""FedAvg aggregation :math:`\bar\Delta = \sum_i w_i \Delta_i / \sum_i w_i`."""

  def update_fn(client_updates, state, params=None, *, weights, **extra):
    del params, extra
    return jtree.weighted_mean(client_updates, weights), state

  return optax.GradientTransformationExtraArgs(_empty_init, update_fn)


def _masked_sorted(u, include):
  """Sorts along the client axis with excluded clients pushed to the end (+inf)."""
  inc = include.reshape((-1,) + (1,) * (u.ndim - 1))
  return jnp.sort(jnp.where(inc, u.astype(jnp.float32), jnp.inf), axis=0)


def trimmed_mean(trim_fraction: float = 0.1) -> optax.GradientTransformationExtraArgs:
  """Coordinate-wise trimmed mean (Yin et al., 2018) over participating clients.

  Drops ``floor(trim_fraction * k)`` largest and smallest values per coordinate, where k is
  the number of clients with positive weight; weights are otherwise ignored.
  """
  if not 0.0 <= trim_fraction < 0.5:
    raise ValueError(f"`trim_fraction` must be in [0, 0.5), got {trim_fraction!r}.")

  def update_fn(client_updates, state, params=None, *, weights, **extra):
    del params, extra
    include = weights > 0
    k = jnp.sum(include)
    t = jnp.floor(trim_fraction * k).astype(jnp.int32)

    def agg(u):
      s = _masked_sorted(u, include)
      pos = jnp.arange(u.shape[0]).reshape((-1,) + (1,) * (u.ndim - 1))
      keep = (pos >= t) & (pos < k - t)
      total = jtree.weighted_sum(jnp.where(keep, s, 0.0), jnp.ones(u.shape[:1]))
      return (total / jnp.maximum(k - 2 * t, 1)).astype(u.dtype)

    return jax.tree.map(agg, client_updates), state

  return optax.GradientTransformationExtraArgs(_empty_init, update_fn)


def coordinate_median() -> optax.GradientTransformationExtraArgs:
  """Coordinate-wise median over participating clients (Yin et al., 2018)."""

  def update_fn(client_updates, state, params=None, *, weights, **extra):
    del params, extra
    include = weights > 0
    k = jnp.sum(include)

    def agg(u):
      s = _masked_sorted(u, include)
      lo = jnp.take(s, jnp.maximum((k - 1) // 2, 0), axis=0)
      hi = jnp.take(s, jnp.maximum(k // 2, 0), axis=0)
      return jnp.where(k > 0, 0.5 * (lo + hi), 0.0).astype(u.dtype)

    return jax.tree.map(agg, client_updates), state

  return optax.GradientTransformationExtraArgs(_empty_init, update_fn)


def dp_mean(clip_norm: float, noise_multiplier: float = 0.0) -> optax.GradientTransformationExtraArgs:
  r"""DP-FedAvg aggregation (McMahan et al., 2018): clip, average uniformly, add noise.

  Each participating client's update is scaled to global L2 norm at most ``clip_norm``; the
  uniform mean over the k participants gets Gaussian noise of standard deviation
  ``noise_multiplier * clip_norm / k``. Requires ``key`` (the round passes it).
  """
  if not clip_norm > 0:
    raise ValueError(f"`clip_norm` must be > 0, got {clip_norm!r}.")
  if noise_multiplier < 0:
    raise ValueError(f"`noise_multiplier` must be >= 0, got {noise_multiplier!r}.")

  def update_fn(client_updates, state, params=None, *, weights, key=None, **extra):
    del params, extra
    include = (weights > 0).astype(jnp.float32)
    norms = jax.vmap(jtree.global_norm)(client_updates)
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))
    mean = jtree.weighted_sum(client_updates,
                              include * scale * jtree.safe_reciprocal(jnp.sum(include)))
    if noise_multiplier > 0:
      if key is None:
        raise ValueError("dp_mean with noise needs `key`.")
      std = noise_multiplier * clip_norm / jnp.maximum(jnp.sum(include), 1.0)
      leaves, treedef = jax.tree.flatten(mean)
      keys = jax.random.split(key, len(leaves))
      leaves = [x + (std * jax.random.normal(k, x.shape)).astype(x.dtype)
                for x, k in zip(leaves, keys)]
      mean = jax.tree.unflatten(treedef, leaves)
    return mean, state

  return optax.GradientTransformationExtraArgs(_empty_init, update_fn)


AGGREGATORS = {"mean": weighted_mean, "median": coordinate_median, "trimmed_mean": trimmed_mean,
               "dp_mean": dp_mean}
