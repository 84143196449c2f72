r"""Which leaves may be tuned, and how a global budget is split over them (host side)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import jax
import numpy as np

PyTree = Any

ALLOCATIONS = ("entropy", "entropy_size", "uniform", "equal", "global")
_PER_LAYER = ALLOCATIONS[:-1]  # the rules allocate_budget computes ("global" needs scores)

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


def _as_fraction(budget) -> tuple[Fraction, float]:
  """The budget as an exact rational, and the relative rounding error of its type.

  A float is read as the decimal it prints as; ints, ``Fraction`` and ``Decimal`` are exact.
  """
  if isinstance(budget, bool):
    raise TypeError(f"`budget` must be a number, got {budget!r}.")
  if isinstance(budget, np.integer):
    return Fraction(int(budget)), 0.0
  if isinstance(budget, Fraction | int):
    return Fraction(budget), 0.0
  if isinstance(budget, Decimal):
    if not budget.is_finite():
      raise ValueError(f"`budget` must be a fraction in [0, 1], got {budget}.")
    return Fraction(budget), 0.0
  if isinstance(budget, np.floating):
    # shortest repr at the scalar's own precision: np.float32(0.1) reads as 0.1
    value, text, eps = float(budget), str(budget), float(np.finfo(budget.dtype).eps)
  else:
    value = float(budget)
    text, eps = repr(value), float(np.finfo(np.float64).eps)
  if not math.isfinite(value):
    raise ValueError(f"`budget` must be a fraction in [0, 1], got {budget}.")
  return Fraction(text), 4.0 * eps


def resolve_budget(budget: float, num_eligible: int, num_total: int | None = None,
                   budget_of: str = "eligible") -> int:
  r"""Global count :math:`K = \lceil \text{budget} \cdot N \rceil`, capped at ``num_eligible``.

  Every positive budget gives at least one entry (``1e-12`` of 1,000 entries gives 1). The
  product is computed exactly, on rationals:

  * a float ``budget`` is read as the decimal it prints as (Python's shortest round-tripping
    ``repr``; ``str`` for NumPy scalars, at their own precision), so ``0.1`` means 1/10 and
    ``0.1`` of 1,000 gives 100, not 101 as ``ceil(0.1 * 1000) = ceil(100.00000000000001)``;
  * a float cannot hold a budget such as ``k / N`` exactly, so a product that exceeds an integer
    :math:`m \geq 1` by at most 4 machine epsilons of the budget's float type, relative to the
    product (:math:`8.9 \cdot 10^{-16}` for Python floats), is taken as :math:`m`: ``k / N`` of
    N gives k. Only a budget with more than ~15 significant digits on more than ~10^15 entries
    could be rounded down by this rule;
  * ``fractions.Fraction``, ``decimal.Decimal`` and ints are used as they are (no tolerance).

  Args:
    budget: fraction in [0, 1].
    num_eligible: number of eligible entries.
    num_total: number of all entries (needed for ``budget_of="all"``).
    budget_of: ``"eligible"`` (default [INFERRED]) or ``"all"``: what N counts.

  Returns:
    K as a Python int.
  """
  frac, rel_tol = _as_fraction(budget)
  if not 0 <= frac <= 1:
    raise ValueError(f"`budget` must be a fraction in [0, 1], got {budget}.")
  if budget_of == "eligible":
    base = num_eligible
  elif budget_of == "all":
    if num_total is None:
      raise ValueError("`num_total` is required when `budget_of='all'`.")
    base = num_total
  else:
    raise ValueError(f"`budget_of` must be 'eligible' or 'all', got {budget_of!r}.")
  product = frac * int(base)
  k = math.floor(product)
  if product != k and not (k >= 1 and product - k <= rel_tol * product):
    k += 1
  return int(min(int(num_eligible), k))


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
    allocation: str | Callable = "entropy_size",
) -> list[int]:
  r"""Exact per-layer counts :math:`k_l` for a global budget of ``total`` entries (host side).

  Each layer gets a share of ``total`` proportional to its weight :math:`a_l`:

  * ``"entropy"``: :math:`a_l = H_l` (the spec's reading of GEM's abstract [INFERRED]; it
    starves large layers: on MiniLM-L6 the word embeddings get almost none of a 0.1% budget,
    see ``docs/gem.md``);
  * ``"entropy_size"``: :math:`a_l = H_l n_l` (entropy-weighted density; the default, chosen
    from the evidence in ``docs/gem.md``);
  * ``"uniform"``: :math:`a_l = n_l` (the same density in every layer);
  * ``"equal"``: :math:`a_l = 1` (the same count in every layer);
  * a callable ``(entropies f64[L], sizes i64[L]) -> f64[L]`` of non-negative weights.

  ``"global"`` (one top-K of the scores over all eligible entries, no per-layer counts) needs the
  scores and is done by :func:`jaxfl.masks.build_mask`, not here.

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
    hint = " ('global' is handled by build_mask)" if allocation == "global" else ""
    raise ValueError(f"`allocation` must be one of {_PER_LAYER} or a callable{hint}, "
                     f"got {allocation!r}.")
  if weights.shape != sizes.shape or np.any(weights < 0) or not np.all(np.isfinite(weights)):
    raise ValueError(f"allocation weights must be finite, >= 0 and one per layer, got {weights}.")
  return [int(v) for v in _exact_allocation(weights, sizes, total)]
