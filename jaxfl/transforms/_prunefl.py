"""PruneFL: periodic importance-based pruning of kernel tensors, as an optax server transform.

Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge Devices", IEEE TNNLS
2022; the variant and settings of the FedLUAR reference code (ALGORITHMS.md §11).

Every round the server accumulates the element-wise importance

.. math::
  q \\mathrel{+}= \\tfrac{1}{m} \\sum_i \\Big(\\sum_{s=1}^{\\tau} g^i_s\\Big)^{\\odot 2},

the squared sum of client :math:`i`'s (unmasked) local gradients. Every ``reconfig_every``
rounds each kernel tensor keeps the ``keep`` fraction of its entries with the largest
accumulated importance (a fresh mask over all entries, so pruned weights can come back), and
the accumulator restarts. Clients train and upload only the kept entries: the mask is
published as ``train_mask``, which :func:`jaxfl.algorithms.prunefl`'s client view
(:func:`jaxfl.views.server_masks`) hands to every client: local optimizer updates are
multiplied by it and the ledger counts its ones per sent tensor. Non-kernel leaves are never pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfl import tree as jtree

__all__ = ["PruneFLState", "keep_top_fraction", "prunefl"]


class PruneFLState(NamedTuple):
  """State of :func:`prunefl`.

  Attributes:
    count: i32[] rounds seen.
    importance: params-shaped f32 importance accumulated since the last reconfiguration.
    train_mask: params-shaped bool tree: element-wise masks for kernel leaves (all True until
      the first reconfiguration), bool[] True for the others. Read by the round.
  """

  count: jax.Array
  importance: Any
  train_mask: Any


def keep_top_fraction(scores: jax.Array, keep: float) -> jax.Array:
  """bool mask of ``ceil(keep * n)`` entries with the largest scores (ties: lower index)."""
  flat = scores.reshape(-1)
  k = max(1, int(np.ceil(keep * flat.size)))
  if k >= flat.size:
    return jnp.ones(scores.shape, bool)
  _, idx = jax.lax.top_k(flat, k)
  return jnp.zeros(flat.shape, bool).at[idx].set(True).reshape(scores.shape)


def prunefl(keep: float = 0.7, reconfig_every: int = 50, *,
            kernels: Any | Callable[[Any], Any] | None = None
            ) -> optax.GradientTransformationExtraArgs:
  r"""PruneFL's mask schedule.

  The importance accumulates :math:`q \mathrel{+}= \frac{1}{m}\sum_i (\sum_s g^i_s)^{\odot 2}`
  every round; every ``reconfig_every`` rounds each kernel keeps its
  :math:`\lceil \text{keep}\cdot n_l \rceil` most important entries.

  Args:
    keep: fraction of each kernel tensor kept at a reconfiguration (0.7).
    reconfig_every: rounds between reconfigurations (50); the first one ends round
      ``reconfig_every - 1`` (0-based), before it training is dense.
    kernels: prunable leaves (bool tree, callable on params, or None for ndim >= 2).

  ``update`` needs ``client_grad_sums`` (f32[C, ...]) and ``client_weights``: declare
  ``Algorithm(server_inputs=("client_grad_sums",))`` (:func:`jaxfl.algorithms.prunefl`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`PruneFLState` (updates pass
    unchanged; ``train_mask`` is what clients train and upload).

  References:
    Jiang, Wang, Valls, Ko, Lee, Leung & Tassiulas, "Model Pruning Enables Efficient
    Federated Learning on Edge Devices", IEEE TNNLS 2022.
  """
  if not 0.0 < keep <= 1.0:
    raise ValueError(f"`keep` must be in (0, 1], got {keep!r}.")
  if not isinstance(reconfig_every, int | np.integer) or reconfig_every < 1:
    raise ValueError(f"`reconfig_every` must be a positive int, got {reconfig_every!r}.")

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    masks = [jnp.ones(p.shape, bool) if k else jnp.ones([], bool)
             for p, k in zip(leaves, jtree.leaf_flags(kernels, params, "kernels"))]
    return PruneFLState(jnp.zeros([], jnp.int32),
                        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                        jax.tree.unflatten(treedef, masks))

  def update_fn(updates, state, params=None, *, client_grad_sums=None, client_weights=None,
                **extra_args):
    del params, extra_args
    if client_grad_sums is None:
      raise ValueError("prunefl needs `client_grad_sums`: declare "
                       "Algorithm(server_inputs=('client_grad_sums',)).")
    c = jax.tree.leaves(client_grad_sums)[0].shape[0]
    w = jnp.ones([c], jnp.float32) if client_weights is None else client_weights
    wn = w / jnp.maximum(jnp.sum(w), 1e-30)
    imp = jax.tree.map(
        lambda g: jnp.tensordot(wn, jnp.square(g.astype(jnp.float32)), axes=1),
        client_grad_sums)
    acc = jax.tree.map(jnp.add, state.importance, imp)
    reconfig = jnp.mod(state.count + 1, reconfig_every) == 0
    kern = jtree.leaf_flags(kernels, updates, "kernels")

    def new_masks(acc):
      leaves, treedef = jax.tree.flatten(acc)
      return jax.tree.unflatten(treedef, [keep_top_fraction(a, keep) if k else jnp.ones([], bool)
                                          for a, k in zip(leaves, kern)])

    mask = jax.lax.cond(reconfig, new_masks, lambda _: state.train_mask, acc)
    acc = jax.tree.map(lambda a: jnp.where(reconfig, jnp.zeros_like(a), a), acc)
    out = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, state.train_mask)
    return out, PruneFLState(optax.safe_increment(state.count), acc, mask)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
