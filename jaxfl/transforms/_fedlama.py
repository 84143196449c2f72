"""FedLAMA: layer-wise adaptive model aggregation, as an optax server transform.

Lee, Zhang, He & Avestimehr, "Layer-wise Adaptive Model Aggregation for Scalable Federated
Learning", AAAI 2023 (arXiv 2110.10302); ALGORITHMS.md §2, read from the authors' code.

Every layer (leaf) :math:`l` has an aggregation interval :math:`I_l\\,\\tau'` with
:math:`I_l \\in \\{1, \\phi\\}`. After round :math:`r` (0-based) the layers with
:math:`(r+1) \\bmod I_l = 0` are synchronised: with client models :math:`x^i_l` and their mean
:math:`u_l`,

.. math::
  D_l = \\tfrac{1}{m}\\sum_i \\lVert u_l - x^i_l \\rVert_2^2,\\quad
  d_l = D_l / (I_l \\tau'),\\quad \\check d_l = d_l / n_l.

Layers not due stay on the clients (the round's persistent cohort keeps them). At the end of
every :math:`\\phi`-th round after the warm-up, intervals are reassigned: reset all to 1, visit
kernel layers in ascending :math:`\\check d_l`, accumulate
:math:`\\delta = \\sum_S d_l / \\sum_{\\text{all}} d_l` and
:math:`\\lambda = \\sum_S n_l / \\sum_{K} n_l`, and stop at the first layer with
:math:`1-\\lambda < \\delta` (that layer included); the visited set gets :math:`I_l=\\phi`.

In jaxfl's pseudo-gradient domain the client update is :math:`\\Delta^i = x_t - x^i`, so
:math:`u_l - x^i_l = \\Delta^i_l - \\bar\\Delta_l` and :math:`D_l` is the (weighted) variance of
the stacked ``client_updates``. The transform zeroes the update of layers not due and
publishes ``uplink_mask`` (the layers due in the *next* round), which
:func:`jaxfl.algorithms.fedlama`'s client view uses both to skip uploads and to decide which
layers the cohort's clients keep locally (in per-slot client memory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfl import tree as jtree

__all__ = ["FedLAMAState", "fedlama", "fedlama_intervals", "layer_discrepancy"]


class FedLAMAState(NamedTuple):
  """State of :func:`fedlama` (one entry per leaf, in ``jax.tree.leaves`` order).

  Attributes:
    count: i32[] rounds seen.
    intervals: i32[L] interval multipliers :math:`I_l \\in \\{1, \\phi\\}` (init 1).
    discrepancy: f32[L] :math:`d_l` from the layer's last synchronisation (init 0).
    unit_discrepancy: f32[L] :math:`\\check d_l = d_l / n_l` (init 0).
    syncs: i32[L] :math:`c_l`, rounds in which the layer was aggregated.
    uplink_mask: params-shaped tree of bool[]: the layers due in the next round (True =
      clients upload it; False = it stays local on the clients).
  """

  count: jax.Array
  intervals: jax.Array
  discrepancy: jax.Array
  unit_discrepancy: jax.Array
  syncs: jax.Array
  uplink_mask: Any


def fedlama_intervals(discrepancy: jax.Array, unit_discrepancy: jax.Array, sizes: jax.Array,
                      is_kernel: jax.Array, phi: int) -> jax.Array:
  """The sort-and-cross reassignment rule (§2.2 step 1-4): i32[L] intervals in {1, phi}.

  Traced (no Python control flow on values), so changing intervals never recompiles. Ties in
  ``unit_discrepancy`` are visited in leaf order (stable sort). If the total discrepancy is
  zero, :math:`\\delta` is taken as 0, the curves never cross, and every kernel layer is
  relaxed (the authors' code would divide by zero).
  """
  d = jnp.asarray(discrepancy, jnp.float32)
  kern = jnp.asarray(is_kernel, bool)
  n = jnp.asarray(sizes, jnp.int32)
  order = jnp.argsort(jnp.where(kern, unit_discrepancy, jnp.inf), stable=True)
  kern_s = kern[order]
  acc_d = jnp.cumsum(jnp.where(kern_s, d[order], 0.0))
  acc_n = jnp.cumsum(jnp.where(kern_s, n[order], 0))
  total = jnp.sum(d)
  n_kernel = jnp.maximum(jnp.sum(jnp.where(kern, n, 0)), 1)
  share_d = jnp.where(total > 0, acc_d / jnp.where(total > 0, total, 1.0), 0.0)
  share_n = acc_n.astype(jnp.float32) / n_kernel.astype(jnp.float32)
  cross = kern_s & ((1.0 - share_n) < share_d)
  stop = jnp.where(jnp.any(cross), jnp.argmax(cross), d.shape[0])
  relaxed_s = kern_s & (jnp.arange(d.shape[0]) <= stop)
  relaxed = jnp.zeros_like(kern).at[order].set(relaxed_s)
  return jnp.where(relaxed, phi, 1).astype(jnp.int32)


def layer_discrepancy(client_updates, weights: jax.Array) -> jax.Array:
  """f32[L]: :math:`D_l`, the weighted mean over clients of :math:`\\lVert\\Delta^i_l -
  \\bar\\Delta_l\\rVert^2` (zero-weight clients excluded)."""
  w = jnp.asarray(weights, jnp.float32)
  wn = w / jnp.maximum(jnp.sum(w), 1e-30)

  def one(u):
    # tensordot and a reduction over the trailing axes, no reshape: inside the round the
    # stacked updates come out of the client scan, and the reshape/broadcast form measured
    # 20x slower there (a relayout per leaf).
    u = u.astype(jnp.float32)
    mean = jnp.tensordot(wn, u, axes=1, precision=jax.lax.Precision.HIGHEST)  # no TF32/bf16
    sq = jnp.sum(jnp.square(u - mean[None]), axis=tuple(range(1, u.ndim)))
    return jnp.sum(wn * sq)

  return jnp.stack([one(u) for u in jax.tree.leaves(client_updates)])


def fedlama(tau_prime: int, phi: int = 2, *, warmup_rounds: int = 6,
            kernels: Any | Callable[[Any], Any] | None = None
            ) -> optax.GradientTransformationExtraArgs:
  """FedLAMA's layer-wise aggregation schedule as a server transform.

  Place it first in the server chain, e.g. ``optax.chain(fedlama(10, 2), optax.sgd(1.0))``,
  and run it with an :class:`~jaxfl.algorithms.Algorithm` whose sampler keeps the cohort for
  ``phi`` rounds and whose view and memory keep un-synchronised layers on the clients
  (:func:`jaxfl.algorithms.fedlama` composes them), so that layers not due stay on the same
  clients, and the cohort is resampled only when every layer is in sync. It reads
  ``client_updates``: declare ``server_inputs=("client_updates",)``.

  Args:
    tau_prime: :math:`\\tau'`, local steps per round (scales :math:`d_l` only).
    phi: the relaxed interval multiplier :math:`\\phi \\ge 1` (repo default 2).
    warmup_rounds: no reassignment at the end of rounds ``r < warmup_rounds`` (the code's
      ``r > 5``, i.e. 6; with ``phi=2`` the first reassignment ends round 7).
    kernels: which leaves may be relaxed: a bool tree, a callable on params, or None for
      ndim >= 2 leaves (conv/dense kernels, embeddings). Others always sync every round.

  ``update`` needs ``client_updates`` (f32[C, ...]) and ``client_weights`` (f32[C]) keyword
  arguments, which :func:`jaxfl.round.build_round` passes when the algorithm declares them.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`FedLAMAState`: the update of
    layers not due this round is zeroed, ``uplink_mask`` says which layers are due next.

  References:
    Lee, Wang, Li, Pedarsani & Avestimehr, "Layer-wise Adaptive Model Aggregation for
    Scalable Federated Learning", AAAI 2023 (reference code ``swblaster/FedLAMA``).
  """
  for name, v, lo in (("tau_prime", tau_prime, 1), ("phi", phi, 1),
                      ("warmup_rounds", warmup_rounds, 0)):
    if not isinstance(v, int | np.integer) or v < lo:
      raise ValueError(f"`{name}` must be an int >= {lo}, got {v!r}.")

  def mask_tree(params, due):
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [due[i] for i in range(len(leaves))])

  def init_fn(params):
    n_leaves = len(jax.tree.leaves(params))
    ones = jnp.ones([n_leaves], jnp.int32)
    return FedLAMAState(
        count=jnp.zeros([], jnp.int32), intervals=ones,
        discrepancy=jnp.zeros([n_leaves], jnp.float32),
        unit_discrepancy=jnp.zeros([n_leaves], jnp.float32),
        syncs=jnp.zeros([n_leaves], jnp.int32),
        uplink_mask=mask_tree(params, jnp.ones([n_leaves], bool)))

  def update_fn(updates, state, params=None, *, client_updates=None, client_weights=None,
                **extra_args):
    del extra_args
    if client_updates is None:
      raise ValueError("fedlama needs `client_updates` (per-client deltas) to measure the "
                       "layer discrepancy; they are not available with stream_aggregate=True.")
    leaves, treedef = jax.tree.flatten(updates)
    c = jax.tree.leaves(client_updates)[0].shape[0]
    if client_weights is None:
      client_weights = jnp.ones([c], jnp.float32)
    kern = jnp.asarray(jtree.leaf_flags(kernels, updates, "kernels"))
    sizes = jnp.asarray([int(np.size(x)) for x in leaves], jnp.int32)
    r = state.count
    due = jnp.mod(r + 1, state.intervals) == 0
    big_d = layer_discrepancy(client_updates, client_weights)
    d = big_d / (state.intervals * tau_prime).astype(jnp.float32)
    disc = jnp.where(due, d, state.discrepancy)
    unit = jnp.where(due, d / sizes.astype(jnp.float32), state.unit_discrepancy)
    out = jax.tree.unflatten(treedef, [jnp.where(due[i], u, jnp.zeros_like(u))
                                       for i, u in enumerate(leaves)])
    reassign = (jnp.mod(r + 1, phi) == 0) & (r >= warmup_rounds)
    intervals = jnp.where(reassign, fedlama_intervals(disc, unit, sizes, kern, phi),
                          state.intervals)
    next_due = jnp.mod(r + 2, intervals) == 0
    new_state = FedLAMAState(
        count=optax.safe_increment(r), intervals=intervals, discrepancy=disc,
        unit_discrepancy=unit, syncs=state.syncs + due.astype(jnp.int32),
        uplink_mask=mask_tree(updates, next_due))
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
