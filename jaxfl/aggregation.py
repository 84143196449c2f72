r"""Aggregators: from the cohort's updates to one update, in two declared kinds.

A **general** aggregator is an ``optax.GradientTransformationExtraArgs`` (mirrors
``optax.experimental.aggregating``) whose ``update(client_updates, state, params, *, weights,
key, client_metrics)`` maps ``f32[C, *s]`` stacked client updates and ``f32[C]`` weights
(0 = not participating: padded, dropped or quarantined) to an ``f32[*s]`` aggregate. It needs
every client's update at once (median, trimmed mean, DP clipping).

A **linear** aggregator (:class:`LinearAggregator`) is one whose aggregate is
``finalize(sum_i c_i u_i, {name: sum_i s_i})`` for per-client coefficients ``c_i`` and
scalars ``s_i`` computed from the weights and client metrics alone. The engine can then
accumulate the sums chunk by chunk (streaming: memory grows with the chunk, not the cohort)
and, on a mesh, all-reduce partial sums. The kind is declared by the type, never detected.

``update`` may return ``(aggregate, state, aux)``: ``aux`` is a dict of scalars that the round
adds to its metrics as ``aggregator/<name>``; a linear aggregator declares its ``aux`` from the
sums, so it is reported streamed too.

``client_metrics`` is a dict of f32[C] per-client values: ``loss``, ``grad_norm``,
``examples``, ``steps``.

**Upload masks.** Sub-model methods (PriSM, HeteroFL, FjORD, EmbracingFL) have each client
train and upload part of the model, declared per client by the view
(``jaxfl.views.ClientStart.upload_mask``). Where the view declares masks, the round hands a
general aggregator the stacked masks as ``client_masks=`` (leaves ``f32[C, *m]``, each
broadcastable to its update leaf after the client axis), and a linear aggregator declared
``masked=True`` also receives :math:`\sum_i c_i m_i` in its streamed form
(:class:`LinearAggregator`), so a per-entry mean over the clients that trained each entry
(:func:`masked_mean`) streams and all-reduces like the plain mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxfl import tree as jtree


def _empty_init(params):
  del params
  return optax.EmptyState()


class LinearAggregator(NamedTuple):
  """A linear (streamable) aggregator.

  Attributes:
    init: ``params -> state``.
    update: the stacked form, ``(client_updates, state, params, *, weights, **extra) ->
      (aggregate, state)`` (what a general aggregator has).
    coefficients: ``(weights, client_metrics) -> (c, scalars)``: f32[C] coefficients of the
      updates and a dict of f32[C] per-client scalars to be summed.
    finalize: ``(weighted_sum, scalar_sums) -> aggregate`` from ``sum_i c_i u_i`` and the
      summed scalars; with ``masked``, ``(weighted_sum, scalar_sums, mask_sum)``.
    masked: whether the streamed form also sums ``c_i m_i`` over the clients' upload masks
      (``jaxfl.views.ClientStart.upload_mask``): ``mask_sum`` is that tree (leaves shaped like
      the masks, f32), or None where the view declares no masks (every client sent
      everything).
    aux: None, or ``(scalar_sums, mask_sum, num_slots) -> {name: f32[]}``: auxiliary
      scalars computed from the sums (``mask_sum`` None unless ``masked``; ``num_slots`` the
      static number of cohort slots, padding included), reported by the round as
      ``aggregator/<name>`` in the stacked and the streamed form alike.
  """

  init: Callable[[Any], Any]
  update: Callable[..., Any]
  coefficients: Callable[[jax.Array, dict], tuple[jax.Array, dict]]
  finalize: Callable[..., Any]
  masked: bool = False
  aux: Callable[[dict, Any, int], dict] | None = None


def _mask_sum(client_masks, c):
  """``sum_i c_i m_i`` of stacked upload masks (f32), or None without masks."""
  if client_masks is None:
    return None
  return jtree.weighted_sum(jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), client_masks), c)


def linear_aggregator(coefficients: Callable[[jax.Array, dict], tuple[jax.Array, dict]],
                      finalize: Callable[..., Any], masked: bool = False,
                      aux: Callable[[dict, Any, int], dict] | None = None) -> LinearAggregator:
  """A :class:`LinearAggregator` whose stacked ``update`` is its streamed form in one chunk.

  Args:
    coefficients: ``(weights, client_metrics) -> (c f32[C], {name: f32[C]})``.
    finalize: ``(sum_i c_i u_i, {name: sum_i s_i}) -> aggregate``; with ``masked``, also
      ``sum_i c_i m_i`` of the upload masks (or None) as a third argument.
    masked: see :attr:`LinearAggregator.masked`.
    aux: see :attr:`LinearAggregator.aux` (the stacked ``update`` then returns
      ``(aggregate, state, aux)``).

  Returns:
    The aggregator (stateless).
  """

  def update_fn(client_updates, state, params=None, *, weights, client_metrics=None,
                client_masks=None, **extra):
    del params, extra
    c, scalars = coefficients(weights, client_metrics)
    total = jtree.weighted_sum(client_updates, c)
    sums = {k: jnp.sum(v) for k, v in scalars.items()}
    mask_sum = _mask_sum(client_masks, c) if masked else None
    agg = finalize(total, sums, mask_sum) if masked else finalize(total, sums)
    if aux is None:
      return agg, state
    return agg, state, aux(sums, mask_sum, weights.shape[0])

  return LinearAggregator(_empty_init, update_fn, coefficients, finalize, masked, aux)


def weighted_mean() -> LinearAggregator:
  r"""FedAvg aggregation :math:`\bar\Delta = \sum_i w_i \Delta_i / \sum_i w_i` (linear).

  A zero total weight gives zeros.

  Returns:
    A :class:`LinearAggregator`; streamed, it sums :math:`w_i\Delta_i` and :math:`w_i`.

  References:
    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
    Data", AISTATS 2017.
  """

  def update_fn(client_updates, state, params=None, *, weights, **extra):
    del params, extra
    return jtree.weighted_mean(client_updates, weights), state

  def coefficients(weights, client_metrics):
    del client_metrics
    return weights, {"weight": weights}

  def finalize(total, sums):
    inv = jtree.safe_reciprocal(sums["weight"])
    return jax.tree.map(lambda s: s * inv.astype(s.dtype), total)

  return LinearAggregator(_empty_init, update_fn, coefficients, finalize)


def fednova(momentum: float = 0.0) -> LinearAggregator:
  r"""FedNova normalized averaging (Wang et al., NeurIPS 2020), linear.

  Client :math:`i` took :math:`\tau_i` local steps of SGD with momentum :math:`\rho`; its
  update is normalised by :math:`a_i = \lVert\mathbf a_i\rVert_1 = [\tau_i - \rho(1 -
  \rho^{\tau_i})/(1-\rho)]/(1-\rho)` (:math:`a_i = \tau_i` for plain SGD), and the
  aggregate is rescaled by the effective number of steps:

  .. math::
    \bar\Delta = \tau_{\mathrm{eff}} \sum_i p_i \frac{\Delta_i}{a_i}, \qquad
    \tau_{\mathrm{eff}} = \sum_i p_i a_i, \qquad p_i = w_i / \textstyle\sum_j w_j.

  With equal :math:`\tau_i` it is the weighted mean; with ragged local work (one local epoch
  over clients of different sizes) it removes the objective inconsistency of FedAvg, which
  over-weights clients that took more steps.

  Args:
    momentum: the client optimizer's heavy-ball momentum :math:`\rho` (0 for plain SGD).

  Returns:
    A :class:`LinearAggregator` reading ``client_metrics["steps"]``.

  References:
    Wang, Liu, Liang, Joshi & Poor, "Tackling the Objective Inconsistency Problem in
    Heterogeneous Federated Optimization", NeurIPS 2020.
  """
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")

  def norm_a(steps):
    if momentum == 0.0:
      return steps
    rho = momentum
    return (steps - rho * (1.0 - rho ** steps) / (1.0 - rho)) / (1.0 - rho)

  def coefficients(weights, client_metrics):
    if client_metrics is None or "steps" not in client_metrics:
      raise ValueError("fednova needs `client_metrics['steps']` (the round passes it).")
    a = norm_a(jnp.asarray(client_metrics["steps"], jnp.float32))
    c = jnp.where(a > 0, weights / jnp.where(a > 0, a, 1.0), 0.0)
    return c, {"weight": weights, "weighted_a": weights * a}

  def finalize(total, sums):
    inv = jtree.safe_reciprocal(sums["weight"])
    scale = sums["weighted_a"] * inv * inv  # tau_eff / sum_i w_i
    return jax.tree.map(lambda s: s * scale.astype(s.dtype), total)

  return linear_aggregator(coefficients, finalize)


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

    return jax.tree.map(agg, client_updates), state, {"clients": k.astype(jnp.float32)}

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

    return jax.tree.map(agg, client_updates), state, {"clients": k.astype(jnp.float32)}

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


def masked_mean(diagnostics: Callable[[Any, int], dict] | None = None) -> LinearAggregator:
  r"""Per-entry masked mean over the clients that trained each entry (linear).

  Sub-model methods (PriSM, HeteroFL, FjORD, EmbracingFL) train and upload a different part
  of the model on every client: client :math:`i` declares its upload mask :math:`m_i`
  (``jaxfl.views.ClientStart.upload_mask``, leaves broadcastable to the params) and uploads
  :math:`m_i \odot \Delta_i`. With weights :math:`w_i` (0 = not taking part),

  .. math::
    c = \sum_i w_i m_i, \qquad
    ar\Delta = egin{cases} \sum_i w_i m_i\Delta_i \,/\, c & c > 0 \
                               0 & c = 0 \end{cases}

  per entry (:math:`c` has the mask's shape and broadcasts to the entry's leaf). Both sums are
  weighted sums over the cohort, so this is a ``masked`` :class:`LinearAggregator`: the
  round may stream it chunk by chunk and all-reduce it over devices like
  :func:`weighted_mean`. With ``weighting="uniform"`` :math:`c` counts the clients that
  trained each entry. Without declared masks it is the weighted mean.

  **Fallback to the old server value.** Where no client trained an entry (:math:`c = 0`) the
  mean delta is 0, so a server step that maps a zero pseudo-gradient to no change (FedAvg's
  ``sgd(1.0)``, :func:`jaxfl.transforms.prism_server`) keeps the old server value there.

  Args:
    diagnostics: optional ``(mask_sum, num_slots) -> {name: f32[]}`` of :math:`c` and the
      static number of cohort slots (PriSM's component coverage), reported as the
      aggregator's aux (:attr:`LinearAggregator.aux`: streamed too); not called where the
      view declares no masks.

  Returns:
    A :class:`LinearAggregator` with ``masked=True``.

  References:
    Niu, Prakash, Kundu, Lee and Avestimehr, `Overcoming Resource Constraints in Federated
    Learning: Large Models Can Be Trained with only Weak Clients
    <https://openreview.net/forum?id=lx1WnkL9fk>`_, TMLR 2023 (per-component aggregation
    counts, ALGORITHMS.md §7.2); Diao, Ding and Tarokh, `HeteroFL
    <https://arxiv.org/abs/2010.01264>`_, ICLR 2021.
  """

  def coefficients(weights, client_metrics):
    del client_metrics
    return weights, {"weight": weights}

  def finalize(total, sums, mask_sum):
    if mask_sum is None:
      inv = jtree.safe_reciprocal(sums["weight"])
      return jax.tree.map(lambda s: s * inv.astype(s.dtype), total)

    def mean(path, s, c):
      if c.ndim not in (0, s.ndim) or any(a not in (1, b) for a, b in zip(c.shape, s.shape)):
        raise ValueError(f"masked_mean: the upload mask of {jax.tree_util.keystr(path)} "
                         f"(shape {c.shape}) does not broadcast to its leaf {s.shape}.")
      inv = jnp.where(c > 0, 1.0 / jnp.where(c > 0, c, 1.0), 0.0)
      return (s.astype(jnp.float32) * inv).astype(s.dtype)

    try:
      return jax.tree_util.tree_map_with_path(mean, total, mask_sum)
    except ValueError as e:
      if "masked_mean" in str(e):
        raise
      raise ValueError(f"masked_mean: the upload masks must have the structure of the "
                       f"updates: {e}") from e

  aux = None
  if diagnostics is not None:
    aux = lambda sums, mask_sum, n: {} if mask_sum is None else diagnostics(mask_sum, n)
  return linear_aggregator(coefficients, finalize, masked=True, aux=aux)


AGGREGATORS = {"mean": weighted_mean, "median": coordinate_median, "trimmed_mean": trimmed_mean,
               "dp_mean": dp_mean, "fednova": fednova, "masked_mean": masked_mean}

__all__ = ["AGGREGATORS", "LinearAggregator", "coordinate_median", "dp_mean", "fednova",
           "linear_aggregator", "masked_mean", "trimmed_mean", "weighted_mean"]
