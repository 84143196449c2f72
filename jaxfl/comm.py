"""Communication accounting (ALGORITHMS.md §1.3).

Per round and per layer (leaf) the round records the elements uploaded by the cohort. A
client uploads leaf l unless its delta for l is entirely zero (a skipped/recycled/frozen
layer); with ``sparse=True`` only the non-zero entries are counted (index + value each).
The relative uplink cost of a run is
``sum_l c_l n_l / (R sum_l n_l)`` = mean over rounds of uploaded / (clients x model size),
so FedAvg = 1.0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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


def find_uplink_mask(opt_state, field: str = "uplink_mask"):
  """Finds ``uplink_mask`` fields in a (possibly chained) optax state.

  A server transform that decides before a round which layers it will not use (FedLUAR's
  recycled layers) exposes ``uplink_mask``: a params-shaped tree of bool scalars, True =
  upload. Several masks are combined with AND. Returns None if there is none.
  ``field="train_mask"`` finds element-wise training masks instead (PruneFL): params-shaped
  trees of bool arrays broadcastable to each leaf, True = the entry is trained and sent.
  """
  masks = []

  def visit(s):
    if getattr(s, field, None) is not None:
      masks.append(getattr(s, field))
    if isinstance(s, tuple):
      for c in s:
        visit(c)
    elif isinstance(s, dict):
      for c in s.values():
        visit(c)

  visit(opt_state)
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = jax.tree.map(jnp.logical_and, out, m)
  return out


def model_bytes(params) -> int:
  """Bytes of one dense copy of ``params``."""
  return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def relative_uplink_cost(history: list[dict]) -> float:
  """Mean over rounds of the per-round relative uplink (FedAvg = 1.0)."""
  vals = [h["rel_uplink"] for h in history if "rel_uplink" in h]
  return float(np.mean(vals)) if vals else float("nan")


__all__ = ["find_uplink_mask", "model_bytes", "relative_uplink_cost", "uplink_elements"]
