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


def uplink_elements(delta, sparse: bool = False, mask=None):
  """Per-leaf f32[] elements one client uploads for ``delta``.

  With a shared ``mask`` (known to the server, e.g. PruneFL's), a sent leaf costs its mask's
  ones and no indices.
  """

  def count(d, m=None):
    nnz = jnp.sum(d != 0).astype(jnp.float32)
    if sparse:
      return nnz
    full = float(d.size) if m is None else jnp.sum(
        jnp.broadcast_to(jnp.asarray(m, jnp.float32), d.shape))
    return jnp.where(nnz > 0, full, 0.0)

  if mask is None:
    return jax.tree.map(count, delta)
  return jax.tree.map(count, delta, mask)


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
