"""Partial model averaging (PMA) as an optax server transform.

Lee, Sahu, He & Avestimehr, "Partial Model Averaging in Federated Learning: Performance
Guarantees and Benefits", Neurocomputing 556:126647, 2023 (arXiv 2201.03789);
ALGORITHMS.md §8a (no public code; the partition rule is inferred, see ``granularity``).

Local SGD with full averaging every :math:`\\tau` steps (FedAvg) lets the local models drift
apart for :math:`\\tau` steps. PMA splits the parameters, in depth order, into :math:`P`
disjoint groups :math:`G_0, \\dots, G_{P-1}` of (nearly) equal size and averages one group per
round of :math:`\\tau / P` local steps: after round :math:`r` (0-based),

.. math::
  x^i_{G_g} \\leftarrow \\tfrac{1}{m} \\textstyle\\sum_j x^j_{G_g} \\quad
  \\text{for } g = r \\bmod P,

the other groups stay on the clients. Every parameter is averaged once per :math:`\\tau` steps,
as in FedAvg(:math:`\\tau`), so the bytes are FedAvg's; the averaging events are staggered.

In jaxfl's pseudo-gradient domain the transform zeroes the aggregate outside the due group,
so the server model moves only there; :func:`jaxfl.algorithms.pma` composes the per-slot
client memory and view that keep the other groups on the clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfl.tree import module_ranks

__all__ = ["PartialAveragingState", "partial_averaging", "pma_group_mask", "pma_group_sizes"]


class PartialAveragingState(NamedTuple):
  """State of :func:`partial_averaging`.

  Attributes:
    count: i32[] rounds seen; the group due in round ``r`` is ``r % num_groups``.
  """

  count: jax.Array


def _leaf_order(params: Any, order: Sequence[str] | None) -> list[int]:
  """Flattened-leaf indices in depth order (modules by ``order``, leaves of one module in
  flattening order); None keeps the flattening order."""
  n = len(jax.tree.leaves(params))
  if order is None:
    return list(range(n))
  rank = module_ranks(params, order)
  return sorted(range(n), key=lambda i: rank[i])  # stable: ties keep leaf order


def _layout(params: Any, num_groups: int, order: Sequence[str] | None, granularity: str):
  """Per flattened leaf: (offset of the leaf in the depth-ordered vector, total size N, the
  leaf's group for ``"leaf"`` granularity)."""
  leaves = jax.tree.leaves(params)
  sizes = [int(np.size(x)) for x in leaves]
  total = sum(sizes)
  if total < num_groups:
    raise ValueError(f"`num_groups`={num_groups} exceeds the {total} parameters.")
  offsets = [0] * len(leaves)
  position = 0
  for i in _leaf_order(params, order):
    offsets[i] = position
    position += sizes[i]
  # A whole leaf goes to the group its middle element falls in: contiguous in depth order,
  # each group within one leaf of total / num_groups.
  leaf_group = [min((2 * offsets[i] + sizes[i]) * num_groups // (2 * total), num_groups - 1)
                for i in range(len(leaves))]
  if granularity == "leaf":
    empty = sorted(set(range(num_groups)) - set(leaf_group))
    if empty:
      raise ValueError(f"granularity='leaf': groups {empty} get no leaf ({len(leaves)} "
                       f"leaves for num_groups={num_groups}); use granularity='element' or "
                       "fewer groups.")
  return offsets, total, leaf_group


def _check(num_groups, granularity):
  if not isinstance(num_groups, int | np.integer) or num_groups < 1:
    raise ValueError(f"`num_groups` must be an int >= 1, got {num_groups!r}.")
  if granularity not in ("element", "leaf"):
    raise ValueError(f"`granularity` must be 'element' or 'leaf', got {granularity!r}.")


def pma_group_mask(params: Any, group: jax.Array | int, num_groups: int, *,
                   order: Sequence[str] | None = None, granularity: str = "element") -> Any:
  """A params-shaped tree of bool arrays: True on the entries of group ``group``.

  With ``granularity="element"`` the depth-ordered parameter vector of :math:`N` entries is
  cut into ``num_groups`` contiguous pieces, entry :math:`k` in group
  :math:`\\lfloor kP/N \\rfloor` (sizes differ by at most one); with ``"leaf"`` every leaf
  belongs to one group, the one its middle entry falls in. The mask is computed from an iota
  and static offsets, so no group table is stored or embedded in the program.

  Args:
    params: the parameter tree (arrays or shape structs).
    group: i32[] (traced is fine) or int in ``[0, num_groups)``.
    num_groups: :math:`P`.
    order: module names in depth order (:func:`jaxfl.algorithms.depth_order`), or None for
      the flattening order.
    granularity: ``"element"`` or ``"leaf"``.
  """
  _check(num_groups, granularity)
  offsets, total, leaf_group = _layout(params, num_groups, order, granularity)
  leaves, treedef = jax.tree.flatten(params)
  g = jnp.asarray(group, jnp.int32)

  def mask(i, leaf):
    shape = np.shape(leaf)
    if granularity == "leaf":
      return jnp.broadcast_to(g == leaf_group[i], shape)
    # the entry's position in the depth-ordered vector (row-major inside the leaf)
    k = offsets[i] + jax.lax.iota(jnp.int32, int(np.size(leaf))).reshape(shape)
    return (k * num_groups) // total == g

  if total * num_groups >= 2**31:
    raise ValueError(f"pma_group_mask: {total} parameters x num_groups={num_groups} overflow "
                     "int32 entry ids; use granularity='leaf'.")
  return jax.tree.unflatten(treedef, [mask(i, x) for i, x in enumerate(leaves)])


def pma_group_sizes(params: Any, num_groups: int, *, order: Sequence[str] | None = None,
                    granularity: str = "element") -> np.ndarray:
  """int64[P]: the entries of each group (for the byte accounting and its tests)."""
  _check(num_groups, granularity)
  offsets, total, leaf_group = _layout(params, num_groups, order, granularity)
  sizes = np.zeros([num_groups], np.int64)
  for i, leaf in enumerate(jax.tree.leaves(params)):
    n = int(np.size(leaf))
    if granularity == "leaf":
      sizes[leaf_group[i]] += n
    else:
      ids = (np.arange(offsets[i], offsets[i] + n, dtype=np.int64) * num_groups) // total
      sizes += np.bincount(ids, minlength=num_groups)
  return sizes


def partial_averaging(num_groups: int, *, order: Sequence[str] | None = None,
                      granularity: str = "element") -> optax.GradientTransformation:
  """PMA's staggered schedule: round ``r`` applies the aggregate of group ``r % P`` only.

  Place it first in the server chain, e.g. ``optax.chain(partial_averaging(4), sgd(1.0))``
  (with ``sgd(1.0)`` the due group becomes the clients' mean), and run it with
  :func:`jaxfl.algorithms.pma`, whose view and memory keep the other groups on the clients.

  Args:
    num_groups: :math:`P \\ge 1`, the groups (``1`` = FedAvg).
    order: module names in depth order (:func:`jaxfl.algorithms.depth_order`), or None for
      the flattening order. Groups are contiguous in this order.
    granularity: ``"element"`` (default: exactly equal pieces of the depth-ordered vector,
      so every round sends :math:`N/P` entries) or ``"leaf"`` (whole tensors, as the spec's
      "contiguous layers"; sizes are then only roughly equal).

  Returns:
    An ``optax.GradientTransformation`` with :class:`PartialAveragingState`; the update of
    every entry outside the due group is zeroed.

  References:
    Lee, Sahu, He & Avestimehr, "Partial Model Averaging in Federated Learning: Performance
    Guarantees and Benefits", Neurocomputing 556:126647, 2023.
  """
  _check(num_groups, granularity)

  def init_fn(params):
    _layout(params, num_groups, order, granularity)  # bad layouts fail at init, not in jit
    return PartialAveragingState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    due = pma_group_mask(updates, jnp.mod(state.count, num_groups), num_groups, order=order,
                         granularity=granularity)
    out = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, due)
    return out, PartialAveragingState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
