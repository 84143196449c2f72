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
``allocation``              ``"entropy"`` (k ∝ H), ``"entropy_size"``   ``"entropy_size"``
                            (k ∝ H·n), ``"uniform"`` (k ∝ n, the same   (chosen from the
                            density in every layer), ``"equal"`` (the   evidence, below)
                            same k per layer), ``"global"`` (one top-k
                            over all eligible entries), or a callable
``eligible``                ``"kernels"`` (``ndim >= 2``), ``"all"``,    ``"kernels"``
                            a callable ``(name, leaf) -> bool`` or a
                            tree of bools
``budget_of``               ``"eligible"`` or ``"all"`` parameters      ``"eligible"``
budget rounding             ``K = ceil(budget · N)`` exactly (>= 1 for  (fixed)
                            any positive budget), capped at the
                            eligible count; see :func:`resolve_budget`
==========================  ==========================================  =====================

The default allocation ``"entropy_size"`` (k ∝ H·n: the layer's density ∝ its entropy) was
chosen from the evidence; the spec's reading of the abstract, ``"entropy"`` (k ∝ H, "decides
how many parameters to tune per layer from the entropy"), stays available. On the pre-trained
MiniLM-L6 (``experiments/results/gem_text.md``, 3 seeds, each rule at its own learning rate)
k ∝ H·n had the best test accuracy averaged over the 0.1% and 1% budgets (0.739, against
0.736 uniform (a tie within the seeds' spread), 0.729 global and 0.710 for k ∝ H, which at 0.1% gives the word embeddings,
52% of the entries, almost none of the budget: 0.665); on a small CNN k ∝ H likewise starved
the large layers (``experiments/results/gem.md``). Pass ``allocation=`` where the choice
matters.

The ratio's ``eps`` matters more than its size suggests. With the default 1e-8 (a numerical
guard, the literal reading of the abstract) the score is dominated by :math:`1/|w^0|` on each
layer's near-zero weights: on MiniLM-L6 at 1% the GEM mask put 30% of its entries on the 1%
smallest weights of their layers and ended 2.2 points below a random mask; the same score with
``eps=1e-2`` (about the weights' 10th percentile there), or with ``candidates=`` the larger half
of the weights, gained 1.7-1.8 points, to the random mask's level
(``experiments/results/gem_text_weightsize/``, 3 seeds). The paper's value is not public.

A *layer* is one leaf of the params pytree (``jaxfl.tree`` convention). The per-layer counts
:math:`k_l` are computed on the host from the (concrete) entropies, so :func:`build_mask` as a
whole is not jit-able; every array computation it uses (:func:`calibration_gradients`,
:func:`gradient_weight_ratio`, :func:`layer_entropy`, :func:`topk_mask` with static ``k``) is.
The global budget is exact: the :math:`k_l` sum to :math:`K` (largest-remainder rounding, each
capped at its layer size with the excess redistributed).

The mask is applied by :func:`jaxfl.transforms.gem_mask`, an optax transformation chained
*after* the optimizer, so that frozen entries get an update of exactly zero, including weight
decay and momentum (``optax.chain(optax.adamw(lr), gem_mask(mask))``). In federated learning,
:func:`jaxfl.transforms.masked_uplink` zeroes the frozen entries of each client's delta before
it is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfl.masks._budget import ALLOCATIONS, allocate_budget, eligible_leaves, resolve_budget
from jaxfl.masks._scores import _entropy_leaf, gradient_weight_ratio
from jaxfl.tree import leaf_names

PyTree = Any

METHODS = ("gem", "random", "grad_magnitude", "weight_magnitude", "gem_uniform_budget",
           "grad_weight_product")
# The baselines share GEM's allocation, so each differs from "gem" in its score only.
_DEFAULT_ALLOCATION = {"gem": "entropy_size", "gem_uniform_budget": "uniform",
                       "random": "entropy_size", "grad_magnitude": "entropy_size",
                       "weight_magnitude": "entropy_size", "grad_weight_product": "entropy_size"}
_NEEDS_GRADS = ("gem", "gem_uniform_budget", "grad_magnitude", "grad_weight_product")

__all__ = ["METHODS", "build_mask", "mask_count", "mask_density", "topk_mask"]


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
    candidates: PyTree | None = None,
) -> PyTree:
  r"""Builds a fixed sparse fine-tuning mask (a tree of bool arrays like ``params``).

  Methods (score per entry, then per-layer top-:math:`k_l`):

  =======================  =========================================  ====================
  ``method``               score                                      default allocation
  =======================  =========================================  ====================
  ``"gem"``                :math:`|G| / (|w^0| + \epsilon)`           ``"entropy_size"``
  ``"gem_uniform_budget"`` :math:`|G| / (|w^0| + \epsilon)`           ``"uniform"``
  ``"grad_magnitude"``     :math:`|G|` (no scale awareness)           ``"entropy_size"``
  ``"weight_magnitude"``   :math:`|w^0|` (largest weights)            ``"entropy_size"``
  ``"grad_weight_product"`` :math:`|G| \cdot |w^0|` (SNIP's saliency)    ``"entropy_size"``
  ``"random"``             uniform random                             ``"entropy_size"``
  =======================  =========================================  ====================

  The baselines default to GEM's allocation (k ∝ H·n) so that each differs from ``"gem"`` in
  the score only, and ``"gem_uniform_budget"`` differs in the allocation only; pass
  ``allocation=`` to change any of them (``"global"`` = one top-K over all eligible entries).
  The default was chosen from the evidence in the module docstring.

  Args:
    method: one of :data:`METHODS`.
    params: pre-trained weights :math:`w^0`.
    budget: fraction of parameters to tune, in [0, 1]; :math:`K = \lceil \text{budget}\cdot N
      \rceil` with N the eligible count (``budget_of="eligible"``, default) or all entries.
    grads: calibration gradient (from :func:`calibration_gradients`); required by ``"gem"``,
      ``"gem_uniform_budget"`` and ``"grad_magnitude"``.
    key: PRNG key, required by ``"random"``.
    allocation: ``"entropy"`` (:math:`k_l \propto H_l`), ``"entropy_size"``
      (:math:`k_l \propto H_l n_l`), ``"uniform"`` (:math:`k_l \propto n_l`), ``"equal"``,
      a callable (see :func:`allocate_budget`) or ``"global"`` (one top-K of the score over all
      eligible entries); ``None`` uses the method's default above.
    bins: histogram bins for the layer entropies.
    eps: :math:`\epsilon` of the ratio score.
    eligible: which leaves may be tuned (see :func:`eligible_leaves`); default ``"kernels"``.
    budget_of: ``"eligible"`` or ``"all"``.
    always: leaves to tune fully regardless of the budget (e.g. a new classification head), a
      callable ``(name, leaf) -> bool`` or a tree of bools; they are not counted in the budget
      and must not be eligible.
    candidates: optional tree of bool arrays like ``params`` (``None`` leaves mean "all"): the
      only entries a layer may pick from. The per-layer counts :math:`k_l` are allocated as
      without it (from the full layer sizes and entropies); then each layer takes its top
      :math:`k_l` scores among its candidates (with ``"global"``, the top K among all
      candidates). Use it to ablate one property of a score, e.g. GEM's ratio restricted to
      the larger half of the weights.

  Returns:
    A tree of bool arrays with the shapes of ``params``.

  Raises:
    ValueError: for an unknown method/allocation, a budget outside [0, 1], ``bins < 2``, a
      missing ``grads``/``key``, ``candidates`` that do not match ``params``, or a layer (or,
      with ``"global"``, the whole model) given more entries than it has candidates.

  References:
    Lee, Ajanthan and Torr, `SNIP: Single-shot network pruning based on connection
    sensitivity <https://arxiv.org/abs/1810.02340>`_, ICLR 2019 (``"grad_weight_product"``).
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
  if method in _NEEDS_GRADS and grads is None:
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
  elif method == "grad_weight_product":
    scores = jax.tree.map(lambda g, w: jnp.abs(g) * jnp.abs(w), grads, params)
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
  allowed = [None] * len(leaves)  # per leaf: number of candidates (None: every entry)
  if candidates is not None:
    score_flat, allowed = _restrict(score_flat, candidates, leaves, treedef)

  out = [jnp.full(jnp.shape(x), bool(a)) for x, a in zip(leaves, always_flat)]
  if not idx:
    return treedef.unflatten(out)
  if allocation == "global":
    flat = jnp.concatenate([jnp.ravel(score_flat[i]).astype(jnp.float32) for i in idx])
    room = sum(sizes[j] if allowed[i] is None else allowed[i] for j, i in enumerate(idx))
    if total > room:
      raise ValueError(f"`candidates` allow {room} eligible entries, fewer than the budget's "
                       f"{total}.")
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
    if allowed[i] is not None and k > allowed[i]:
      raise ValueError(f"`candidates` allow {allowed[i]} entries in {leaf_names(params)[i]}, "
                       f"fewer than its share of the budget ({k}).")
    out[i] = topk_mask(score_flat[i], k)
  return treedef.unflatten(out)


def _restrict(score_flat, candidates, leaves, treedef):
  """Scores with non-candidates at -inf (never picked), and each leaf's candidate count."""
  try:
    cand_flat = treedef.flatten_up_to(candidates)
  except (TypeError, ValueError) as e:
    raise ValueError(f"`candidates` must be a tree of bool arrays like `params`: {e}") from None
  scores, allowed = [], []
  for s, c, x in zip(score_flat, cand_flat, leaves):
    if c is None:
      scores.append(s)
      allowed.append(None)
      continue
    c = np.asarray(c)
    if c.dtype != bool or c.shape != np.shape(x):
      raise ValueError(f"`candidates` leaves must be bool arrays shaped like `params`; got "
                       f"{c.dtype}{list(c.shape)} for a leaf of shape {list(np.shape(x))}.")
    scores.append(jnp.where(c, jnp.asarray(s, jnp.float32), -jnp.inf))
    allowed.append(int(c.sum()))
  return scores, allowed
