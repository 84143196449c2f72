r"""Which leaves may be tuned, and how a global budget is split over them (host side)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

PyTree = Any

ALLOCATIONS = ("entropy", "entropy_size", "uniform", "equal", "global")

__all__ = ["ALLOCATIONS", "allocate_budget", "eligible_leaves", "resolve_budget"]


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
