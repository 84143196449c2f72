"""Communication accounting (ALGORITHMS.md §1.3).

Per round and per layer (leaf) the round records the elements uploaded by the cohort. A
client uploads leaf l unless its delta for l is entirely zero (a skipped/recycled/frozen
layer); with ``sparse=True`` only the non-zero entries are counted (index + value each).
The relative uplink cost of a run is
``sum_l c_l n_l / (R sum_l n_l)`` = mean over rounds of uploaded / (clients x model size),
so FedAvg = 1.0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxfl._qsgd_bits import qsgd_bits_per_element as qsgd_bits_per_element
from jaxfl._qsgd_bits import qsgd_uplink_bytes as qsgd_uplink_bytes


def uplink_elements(delta, sparse: bool = False, mask=None, abs_sums=None):
  """Per-leaf f32[] elements one client uploads for ``delta``.

  A leaf that is all zeros is not sent. With a shared ``mask`` (known to the server, e.g.
  PruneFL's), a sent leaf costs its mask's ones and no indices. ``abs_sums`` (per-leaf
  ``sum(|delta|)``, already computed by the caller) answers "all zeros?" without another pass
  over the leaf; ``sparse`` counts the non-zeros, which needs one.
  """
  leaves, treedef = jax.tree.flatten(delta)
  masks = [None] * len(leaves) if mask is None else treedef.flatten_up_to(mask)
  sums = [None] * len(leaves) if abs_sums is None else treedef.flatten_up_to(abs_sums)

  def count(d, m, a):
    if sparse:
      return jnp.sum(d != 0).astype(jnp.float32)
    nonzero = jnp.any(d != 0) if a is None else a > 0
    full = float(d.size) if m is None else jnp.sum(
        jnp.broadcast_to(jnp.asarray(m, jnp.float32), d.shape))
    return jnp.where(nonzero, full, 0.0)

  return jax.tree.unflatten(treedef, [count(*t) for t in zip(leaves, masks, sums)])


class Ledger(NamedTuple):
  """How the round counts what one client uploads (the uplink ledger).

  Attributes:
    count: ``(delta, abs_sums, start, uplink_state) -> per-leaf f32[]`` elements sent by one
      client: ``delta`` is the uploaded update, ``abs_sums`` its per-leaf L1 norms (0 when
      quarantined), ``start`` the client's :class:`jaxfl.views.ClientStart` (its declared
      masks) and ``uplink_state`` the uplink transform's state after the update.
    words_per_element: bytes per element in units of the parameter dtype: 1 for dense
      leaves, 2 for sparse uploads (index + value).
    model_size: ``params -> int``, the elements of one full model (the unit of
      ``rel_uplink`` and of ``downlink_bytes``), or None for every leaf.
    downlink: ``(params, round) -> f32[]`` elements each client of the round receives
      (``downlink_bytes`` = that x clients x itemsize), or None for one full model
      (``model_size``). A method whose clients keep most of their model between rounds
      declares what actually travels (partial model averaging: the group averaged last round).
  """

  count: Callable[[Any, Any, Any, Any], Any]
  words_per_element: float = 1.0
  model_size: Callable[[Any], int] | None = None
  downlink: Callable[[Any, Any], Any] | None = None


def dense_ledger() -> Ledger:
  """A leaf is sent in full unless its delta is all zeros; with a declared ``train_mask``
  (shared with the server, e.g. PruneFL's) a sent leaf costs the mask's ones and no indices."""

  def count(delta, abs_sums, start, uplink_state):
    del uplink_state
    return uplink_elements(delta, False, start.train_mask, abs_sums)

  return Ledger(count, 1.0)


def sparse_ledger() -> Ledger:
  """Only the non-zero entries are sent, each with its index (FedDropoutAvg, top-k)."""

  def count(delta, abs_sums, start, uplink_state):
    del uplink_state
    return uplink_elements(delta, True, start.train_mask, abs_sums)

  return Ledger(count, 2.0)


def upload_mask_ledger(downlink: Callable[[Any, Any], Any] | None = None) -> Ledger:
  """A sent leaf costs the ones of the client's declared ``upload_mask`` and no indices: the
  server knows the mask (a schedule such as partial model averaging's groups, which cut
  through leaves). ``downlink``: :attr:`Ledger.downlink` (None: a full model per client)."""

  def count(delta, abs_sums, start, uplink_state):
    del uplink_state
    return uplink_elements(delta, False, start.upload_mask, abs_sums)

  return Ledger(count, 1.0, None, downlink)


def shared_mask_ledger(mask) -> Ledger:
  """A fixed mask both sides know: a sent leaf costs its mask's ones and no indices.

  For sparse fine-tuning with one mask for every client and round, built by the server and
  sent down once (GEM) or drawn by every client from a shared seed (a random mask): the
  server knows which entries arrive, so only their values travel (half of
  :func:`sparse_ledger`'s index + value). ``mask``: a tree of bools like the params.
  """
  if mask is None:
    raise ValueError("`mask` must be a tree of bools like the params, got None.")
  mask = jax.tree.map(lambda m: np.asarray(m, bool), mask)

  def count(delta, abs_sums, start, uplink_state):
    del start, uplink_state
    return uplink_elements(delta, False, mask, abs_sums)

  return Ledger(count, 1.0)


def model_bytes(params) -> int:
  """Bytes of one dense copy of ``params``."""
  return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def relative_uplink_cost(history: list[dict]) -> float:
  """Mean over rounds of the per-round relative uplink (FedAvg = 1.0)."""
  vals = [h["rel_uplink"] for h in history if "rel_uplink" in h]
  return float(np.mean(vals)) if vals else float("nan")


__all__ = ["Ledger", "dense_ledger", "model_bytes", "qsgd_bits_per_element", "qsgd_uplink_bytes",
           "relative_uplink_cost", "shared_mask_ledger", "sparse_ledger",
           "upload_mask_ledger",
           "uplink_elements"]
