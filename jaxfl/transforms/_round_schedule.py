"""Per-round schedules for client optimizers (the round passes ``round=`` to them)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

__all__ = ["scale_by_round_schedule"]


def scale_by_round_schedule(schedule: Callable[[jax.Array], jax.Array]
                            ) -> optax.GradientTransformationExtraArgs:
  r"""Multiplies updates by ``schedule(round)``: a learning rate that changes across rounds.

  A client optimizer's state is fresh every round, so an optax schedule (indexed by the
  local step count) cannot express "LR x0.1 at rounds 125 and 180". The round passes its
  index as the extra argument ``round`` to every client optimizer; chained after the
  optimizer, this transform scales the round's updates:

  .. math:: u \leftarrow s(r)\, u .

  For SGD with momentum restarted every round this is exactly SGD with learning rate
  :math:`\eta\, s(r)`. Without ``round`` (called outside the engine) the updates pass
  unchanged.

  Args:
    schedule: ``round -> scale`` (an optax schedule works: e.g.
      ``optax.piecewise_constant_schedule(1.0, {50: 0.1, 72: 0.1})``).

  Returns:
    A stateless ``optax.GradientTransformationExtraArgs``.

  References:
    The lab's reference code decays the client LR per round (Keras ``LearningRateScheduler``
    in ``jjihyunh/multi-metric-fl`` and ``swblaster/FedLAMA``, ALGORITHMS.md §6.3).
  """
  if not callable(schedule):
    raise TypeError(f"`schedule` must be callable (round -> scale), got {type(schedule).__name__}.")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, round=None, **extra):
    del params, extra
    if round is None:
      return updates, state
    scale = jnp.asarray(schedule(round))
    return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
