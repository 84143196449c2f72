r"""GEM: gradient-to-weight ratio and entropy-guided masks for sparse fine-tuning.

GEM (Kang, Kim, Avestimehr and Lee, AAAI 2026) fine-tunes a fixed, sparse subset (about 0.1%)
of a pre-trained model's parameters. Two ideas, which this module lets you ablate separately:

1. **Score** each parameter by its calibration gradient *relative to its pre-trained magnitude*,
   :math:`r_j = |G_j| / (|w^0_j| + \epsilon)`, instead of by :math:`|G_j|` alone.
2. **Allocate** the global budget across layers in proportion to the Shannon entropy of each
   layer's parameter-value histogram.

Only the abstract of the paper is public and no code was released (ALGORITHMS.md §5), so every
detail below the two ideas is **[INFERRED]** and exposed as an option with a stated default:

==========================  ==========================================  =====================
option                      choices                                     default [INFERRED]
==========================  ==========================================  =====================
calibration ``reduce``      ``"mean"`` (mean gradient, the spec's G),   ``"mean"``
                            ``"abs_mean"`` (mean of :math:`|g|`)
ratio ``eps``               any float >= 0                              ``1e-8``
entropy ``bins``            int >= 2, equal width over [min, max]       ``256`` (nats)
``allocation``              ``"entropy"`` (k ∝ H), ``"entropy_size"``   ``"entropy"``
                            (k ∝ H·n), ``"uniform"`` (k ∝ n, the same
                            density in every layer), ``"equal"`` (the
                            same k per layer), ``"global"`` (one top-k
                            over all eligible entries), or a callable
``eligible``                ``"kernels"`` (``ndim >= 2``), ``"all"``,    ``"kernels"``
                            a callable ``(name, leaf) -> bool`` or a
                            tree of bools
``budget_of``               ``"eligible"`` or ``"all"`` parameters      ``"eligible"``
budget rounding             ``K = ceil(budget · N)``, capped at the     (fixed)
                            eligible count
==========================  ==========================================  =====================

A *layer* is one leaf of the params pytree (``jaxfl.tree`` convention). The per-layer counts
:math:`k_l` are computed on the host from the (concrete) entropies, so :func:`build_mask` as a
whole is not jit-able; every array computation it uses (:func:`calibration_gradients`,
:func:`gradient_weight_ratio`, :func:`layer_entropy`, :func:`topk_mask` with static ``k``) is.
The global budget is exact: the :math:`k_l` sum to :math:`K` (largest-remainder rounding, each
capped at its layer size with the excess redistributed).

The mask is applied by :func:`gem_mask`, an optax transformation chained *after* the optimizer,
so that frozen entries get an update of exactly zero, including weight decay and momentum
(``optax.chain(optax.adamw(lr), gem_mask(mask))``). In federated learning, :func:`masked_uplink`
zeroes the frozen entries of each client's delta before it is sent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]

METHODS = ("gem", "random", "grad_magnitude", "weight_magnitude", "gem_uniform_budget")
ALLOCATIONS = ("entropy", "entropy_size", "uniform", "equal", "global")
_DEFAULT_ALLOCATION = {"gem": "entropy", "gem_uniform_budget": "uniform", "random": "entropy",
                       "grad_magnitude": "entropy", "weight_magnitude": "entropy"}

__all__ = [
    "ALLOCATIONS", "METHODS", "GemMaskState", "allocate_budget", "build_mask",
    "calibration_gradients", "eligible_leaves", "gem_mask", "gradient_weight_ratio",
    "layer_entropy", "mask_count", "mask_density", "masked_uplink", "resolve_budget",
    "topk_mask",
]


# ------------------------------------------------------------------------------------------
# Calibration gradients and scores.


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
      return jax.tree.map(lambda a, x: a + fix(x), acc, g), None

    total, _ = jax.lax.scan(body, optax.tree.zeros_like(params), batches)
    return jax.tree.map(lambda t: t / num, total)

  step = jax.jit(lambda p, b: jax.tree.map(fix, grad_fn(p, b)))
  total, num = None, 0
  for batch in batches:
    g = step(params, batch)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
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


# ------------------------------------------------------------------------------------------
# Eligibility and budgets (host side).


def eligible_leaves(params: PyTree, eligible: str | Callable | PyTree = "kernels") -> PyTree:
  """Which leaves may be tuned, as a same-structure tree of Python bools.

  Args:
    params: parameter pytree.
    eligible: ``"kernels"`` (leaves with ``ndim >= 2``: conv, dense and embedding weights;
      default [INFERRED]), ``"all"``, a callable ``(name, leaf) -> bool`` where ``name`` is
      ``jax.tree_util.keystr`` of the leaf path (e.g. ``"['Dense_0']['kernel']"``), or a tree of
      bools with the structure of ``params``.
  """
  if isinstance(eligible, str):
    if eligible == "kernels":
      return jax.tree.map(lambda x: bool(np.ndim(x) >= 2), params)
    if eligible == "all":
      return jax.tree.map(lambda x: True, params)
    raise ValueError(f"`eligible` must be 'kernels', 'all', a callable or a tree of bools, "
                     f"got {eligible!r}.")
  if callable(eligible):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: bool(eligible(jax.tree_util.keystr(p), x)), params)
  try:
    return jax.tree.map(lambda x, e: bool(e), params, eligible)
  except (ValueError, TypeError) as err:
    raise ValueError(f"`eligible` tree does not match the structure of params: {err}") from err


def resolve_budget(budget: float, num_eligible: int, num_total: int | None = None,
                   budget_of: str = "eligible") -> int:
  r"""Global count :math:`K = \lceil \text{budget} \cdot N \rceil`, capped at ``num_eligible``.

  Args:
    budget: fraction in [0, 1].
    num_eligible: number of eligible entries.
    num_total: number of all entries (needed for ``budget_of="all"``).
    budget_of: ``"eligible"`` (default [INFERRED]) or ``"all"``: what N counts.
  """
  if not 0.0 <= float(budget) <= 1.0:
    raise ValueError(f"`budget` must be a fraction in [0, 1], got {budget}.")
  if budget_of == "eligible":
    base = num_eligible
  elif budget_of == "all":
    if num_total is None:
      raise ValueError("`num_total` is required when `budget_of='all'`.")
    base = num_total
  else:
    raise ValueError(f"`budget_of` must be 'eligible' or 'all', got {budget_of!r}.")
  # Round first so 0.001 * 1000 does not become 1.0000000000000002 -> 2.
  return int(min(num_eligible, math.ceil(round(float(budget) * base, 9))))


def _exact_allocation(weights: np.ndarray, caps: np.ndarray, total: int) -> np.ndarray:
  """Integer k with sum(k) == total, 0 <= k <= caps, k ≈ total * w / sum(w)."""
  weights = np.asarray(weights, np.float64)
  caps = np.asarray(caps, np.int64)
  k = np.zeros_like(caps)
  active = caps > 0
  remaining = int(total)
  # Water-filling: layers whose proportional share reaches their size are capped and removed.
  while remaining > 0 and active.any():
    w = np.where(active, weights, 0.0)
    if w.sum() <= 0:  # only zero-weight layers left: fall back to their remaining capacity
      w = np.where(active, (caps - k).astype(np.float64), 0.0)
    quota = remaining * w / w.sum()
    over = active & (k + quota >= caps)
    if over.any():
      remaining -= int((caps - k)[over].sum())
      k[over] = caps[over]
      active &= ~over
      continue
    base = np.floor(quota).astype(np.int64)
    frac = quota - base
    k += base
    left = remaining - int(base.sum())
    # Largest remainder; ties go to the earlier leaf (stable sort).
    order = np.argsort(-frac, kind="stable")
    order = order[active[order]]
    k[order[:left]] += 1
    remaining = 0
  return k


def allocate_budget(
    total: int,
    sizes: Iterable[int],
    entropies: Iterable[float] | None = None,
    allocation: str | Callable = "entropy",
) -> list[int]:
  r"""Exact per-layer counts :math:`k_l` for a global budget of ``total`` entries (host side).

  Each layer gets a share of ``total`` proportional to its weight :math:`a_l`:

  * ``"entropy"``: :math:`a_l = H_l` (GEM, default);
  * ``"entropy_size"``: :math:`a_l = H_l n_l`;
  * ``"uniform"``: :math:`a_l = n_l` (the same density in every layer);
  * ``"equal"``: :math:`a_l = 1` (the same count in every layer);
  * a callable ``(entropies f64[L], sizes i64[L]) -> f64[L]`` of non-negative weights.

  Shares are capped at the layer size :math:`n_l` and the excess is redistributed over the other
  layers by their weights (water-filling); the fractional shares are then rounded by largest
  remainder, so :math:`\sum_l k_l = \text{total}` exactly. If every remaining layer has weight 0
  (e.g. all-constant layers), the rest is spread in proportion to remaining capacity.

  Args:
    total: global count, ``0 <= total <= sum(sizes)``.
    sizes: :math:`n_l` per layer.
    entropies: :math:`H_l` per layer (required by the entropy rules).
    allocation: rule name or callable, as above.

  Returns:
    A list of Python ints.
  """
  sizes = np.asarray(list(sizes), np.int64)
  total = int(total)
  if total < 0 or total > int(sizes.sum()):
    raise ValueError(f"`total` must be in [0, {int(sizes.sum())}] (the eligible size), "
                     f"got {total}.")
  ent = None if entropies is None else np.asarray(list(entropies), np.float64)
  if callable(allocation):
    weights = np.asarray(allocation(ent, sizes), np.float64)
  elif allocation in ("entropy", "entropy_size"):
    if ent is None:
      raise ValueError(f"`entropies` are required for allocation={allocation!r}.")
    weights = ent if allocation == "entropy" else ent * sizes
  elif allocation == "uniform":
    weights = sizes.astype(np.float64)
  elif allocation == "equal":
    weights = np.ones(len(sizes))
  else:
    raise ValueError(f"`allocation` must be one of {ALLOCATIONS[:-1]} or a callable, "
                     f"got {allocation!r}.")
  if weights.shape != sizes.shape or np.any(weights < 0) or not np.all(np.isfinite(weights)):
    raise ValueError(f"allocation weights must be finite, >= 0 and one per layer, got {weights}.")
  return [int(v) for v in _exact_allocation(weights, sizes, total)]


# ------------------------------------------------------------------------------------------
# Masks.


def topk_mask(scores: jax.Array, k: int) -> jax.Array:
  """Boolean mask of the ``k`` largest entries of ``scores`` (static ``k``; jit-able).

  Ties are broken towards the lower flat index (``lax.top_k``).
  """
  flat = jnp.ravel(scores)
  k = int(k)
  if not 0 <= k <= flat.size:
    raise ValueError(f"`k` must be in [0, {flat.size}], got {k}.")
  if k == 0:
    return jnp.zeros(scores.shape, bool)
  if k == flat.size:
    return jnp.ones(scores.shape, bool)
  _, idx = jax.lax.top_k(flat, k)
  return jnp.zeros(flat.shape, bool).at[idx].set(True).reshape(scores.shape)


def mask_count(mask: PyTree) -> int:
  """Number of True entries in a mask tree."""
  return int(sum(int(np.sum(np.asarray(m))) for m in jax.tree.leaves(mask)))


def mask_density(mask: PyTree) -> float:
  """Fraction of True entries in a mask tree."""
  n = sum(int(np.size(m)) for m in jax.tree.leaves(mask))
  return mask_count(mask) / max(n, 1)


def build_mask(
    method: str,
    params: PyTree,
    budget: float,
    *,
    grads: PyTree | None = None,
    key: jax.Array | None = None,
    allocation: str | Callable | None = None,
    bins: int = 256,
    eps: float = 1e-8,
    eligible: str | Callable | PyTree = "kernels",
    budget_of: str = "eligible",
    always: Callable | PyTree | None = None,
) -> PyTree:
  r"""Builds a fixed sparse fine-tuning mask (a tree of bool arrays like ``params``).

  Methods (score per entry, then per-layer top-:math:`k_l`):

  =======================  =========================================  ====================
  ``method``               score                                      default allocation
  =======================  =========================================  ====================
  ``"gem"``                :math:`|G| / (|w^0| + \epsilon)`           ``"entropy"``
  ``"gem_uniform_budget"`` :math:`|G| / (|w^0| + \epsilon)`           ``"uniform"``
  ``"grad_magnitude"``     :math:`|G|` (no scale awareness)           ``"entropy"``
  ``"weight_magnitude"``   :math:`|w^0|` (largest weights)            ``"entropy"``
  ``"random"``             uniform random                             ``"entropy"``
  =======================  =========================================  ====================

  The baselines default to GEM's entropy allocation so that each differs from ``"gem"`` in the
  score only, and ``"gem_uniform_budget"`` differs in the allocation only; pass
  ``allocation=`` to change any of them (``"global"`` = one top-K over all eligible entries).

  Args:
    method: one of :data:`METHODS`.
    params: pre-trained weights :math:`w^0`.
    budget: fraction of parameters to tune, in [0, 1]; :math:`K = \lceil \text{budget}\cdot N
      \rceil` with N the eligible count (``budget_of="eligible"``, default) or all entries.
    grads: calibration gradient (from :func:`calibration_gradients`); required by ``"gem"``,
      ``"gem_uniform_budget"`` and ``"grad_magnitude"``.
    key: PRNG key, required by ``"random"``.
    allocation: per-layer budget rule (see :func:`allocate_budget`) or ``"global"``; ``None``
      uses the method's default above.
    bins: histogram bins for the layer entropies.
    eps: :math:`\epsilon` of the ratio score.
    eligible: which leaves may be tuned (see :func:`eligible_leaves`); default ``"kernels"``.
    budget_of: ``"eligible"`` or ``"all"``.
    always: leaves to tune fully regardless of the budget (e.g. a new classification head), a
      callable ``(name, leaf) -> bool`` or a tree of bools; they are not counted in the budget
      and must not be eligible.

  Returns:
    A tree of bool arrays with the shapes of ``params``.

  Raises:
    ValueError: for an unknown method/allocation, a budget outside [0, 1], ``bins < 2``, or a
      missing ``grads``/``key``.

  References:
    Kang, Kim, Avestimehr and Lee, `GEM: Gradient-to-weight ratio and Entropy-guided Masking
    for parameter-efficient fine-tuning <https://arxiv.org/abs/2508.16191>`_, AAAI 2026.
  """
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
  if not 0.0 <= float(budget) <= 1.0:
    raise ValueError(f"`budget` must be a fraction in [0, 1], got {budget}.")
  if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or bins < 2:
    raise ValueError(f"`bins` must be an int >= 2, got {bins!r}.")
  allocation = _DEFAULT_ALLOCATION[method] if allocation is None else allocation
  if not callable(allocation) and allocation not in ALLOCATIONS:
    raise ValueError(f"`allocation` must be one of {ALLOCATIONS} or a callable, "
                     f"got {allocation!r}.")
  needs_grads = method in ("gem", "gem_uniform_budget", "grad_magnitude")
  if needs_grads and grads is None:
    raise ValueError(f"`grads` (calibration gradients) are required for method={method!r}.")
  if method == "random" and key is None:
    raise ValueError("`key` is required for method='random'.")

  elig = eligible_leaves(params, eligible)
  leaves, treedef = jax.tree.flatten(params)
  elig_flat = treedef.flatten_up_to(elig)
  always_flat = [False] * len(leaves)
  if always is not None:
    always_flat = treedef.flatten_up_to(eligible_leaves(params, always))
    both = [i for i, (a, e) in enumerate(zip(always_flat, elig_flat)) if a and e]
    if both:
      raise ValueError("`always` leaves must not also be `eligible`; overlapping leaf indices "
                       f"{both}.")

  if method in ("gem", "gem_uniform_budget"):
    scores = gradient_weight_ratio(grads, params, eps)
  elif method == "grad_magnitude":
    scores = jax.tree.map(jnp.abs, grads)
  elif method == "weight_magnitude":
    scores = jax.tree.map(jnp.abs, params)
  else:
    keys = jax.random.split(key, len(leaves))
    scores = treedef.unflatten(
        [jax.random.uniform(k, jnp.shape(x)) for k, x in zip(keys, leaves)])
  score_flat = treedef.flatten_up_to(scores)

  idx = [i for i, e in enumerate(elig_flat) if e]
  sizes = [int(np.size(leaves[i])) for i in idx]
  total = resolve_budget(budget, sum(sizes), sum(int(np.size(x)) for x in leaves), budget_of)

  out = [jnp.full(jnp.shape(x), bool(a)) for x, a in zip(leaves, always_flat)]
  if not idx:
    return treedef.unflatten(out)
  if allocation == "global":
    flat = jnp.concatenate([jnp.ravel(score_flat[i]).astype(jnp.float32) for i in idx])
    chosen = topk_mask(flat, total)
    offsets = np.cumsum([0] + sizes)
    for j, i in enumerate(idx):
      out[i] = chosen[offsets[j]:offsets[j + 1]].reshape(jnp.shape(leaves[i]))
    return treedef.unflatten(out)

  ent = None
  if allocation in ("entropy", "entropy_size") or callable(allocation):
    ent_fn = jax.jit(_entropy_leaf, static_argnums=1)
    ent = [float(ent_fn(leaves[i], int(bins))) for i in idx]
  ks = allocate_budget(total, sizes, ent, allocation)
  for i, k in zip(idx, ks):
    out[i] = topk_mask(score_flat[i], k)
  return treedef.unflatten(out)


# ------------------------------------------------------------------------------------------
# Transforms.


class GemMaskState(NamedTuple):
  """State of :func:`gem_mask`.

  Attributes:
    mask: bool arrays with the shapes of params (:math:`M` in the paper's notation). Replace it
      with ``optax.tree.set(opt_state, mask=new_mask)`` to switch masks without rebuilding or
      recompiling the optimizer.
  """

  mask: PyTree


def _full_mask(mask: PyTree | None, like: PyTree) -> PyTree:
  if mask is None:
    return jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), like)
  try:
    return jax.tree.map(lambda m, x: jnp.broadcast_to(jnp.asarray(m, bool), jnp.shape(x)),
                        mask, like)
  except (ValueError, TypeError) as err:
    raise ValueError(f"`mask` does not match the structure/shapes of params: {err}") from err


def gem_mask(mask: PyTree | None = None) -> optax.GradientTransformationExtraArgs:
  r"""Zeroes the updates of frozen entries; chain it *after* the optimizer.

  .. math::
    u_j \leftarrow M_j\, u_j \qquad (\text{exactly } 0 \text{ where } M_j = 0).

  Because it acts on the final update, frozen entries receive no gradient step, no momentum and
  no weight decay: with ``optax.chain(optax.adamw(lr), gem_mask(mask))`` they stay bit-identical
  to the pre-trained values. (Moment buffers of frozen entries still evolve inside ``adamw`` but
  never reach the parameters.) The mask lives in the state as bool arrays, so a new mask of the
  same shapes re-uses the compiled step: ``optax.tree.set(opt_state, mask=new_mask)``.

  Args:
    mask: tree of bools (arrays or Python/NumPy scalars, broadcast to the leaf shape) with the
      structure of params, e.g. from :func:`build_mask`; ``None`` means all True.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`GemMaskState`.

  References:
    Kang, Kim, Avestimehr and Lee, `GEM: Gradient-to-weight ratio and Entropy-guided Masking
    for parameter-efficient fine-tuning <https://arxiv.org/abs/2508.16191>`_, AAAI 2026.
  """

  def init_fn(params):
    return GemMaskState(mask=_full_mask(mask, params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    new = jax.tree.map(lambda m, u: jnp.where(m, u, jnp.zeros_like(u)), state.mask, updates)
    return new, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def masked_uplink(mask: PyTree) -> optax.GradientTransformationExtraArgs:
  r"""Uplink transform: a client sends only the masked entries of its delta.

  .. math::
    \Delta^{\text{sent}}_j = M_j\, \Delta_j .

  Meant to run per client inside ``jax.vmap`` (``state = uplink.init(delta)`` each round, then
  ``sent, _ = uplink.update(delta, state, params=global_params)``). The mask is shared by all
  clients and captured as constant arrays; unmasked entries are exactly zero, so a ledger that
  counts non-zero entries counts at most ``mask_count(mask)`` floats per client.

  Args:
    mask: tree of bools with the structure of params (see :func:`build_mask`).

  Returns:
    A stateless ``optax.GradientTransformationExtraArgs`` (state ``optax.EmptyState``).
  """
  if mask is None:
    raise ValueError("`mask` is required for masked_uplink.")
  const = jax.tree.map(lambda m: np.asarray(m, bool), mask)

  def init_fn(delta):
    _full_mask(const, delta)  # structure/shape check only
    return optax.EmptyState()

  def update_fn(delta, state, params=None, **extra_args):
    del params, extra_args
    full = _full_mask(const, delta)
    sent = jax.tree.map(lambda m, u: jnp.where(m, u, jnp.zeros_like(u)), full, delta)
    return sent, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
