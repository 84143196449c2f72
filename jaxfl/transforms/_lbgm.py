"""LBGM: look-back gradient multiplier, as a per-client uplink transform with state.

Azam, Hosseinalipour, Qiu & Brinton, "Recycling Model Updates in Federated Learning: Are
Gradient Subspaces Low-Rank?", ICLR 2022; settings from the FedLUAR reference code
(ALGORITHMS.md §11).

Client :math:`i` keeps its look-back update :math:`\\ell_i` (the last update it sent in full).
For the new accumulated update :math:`a_i` (here the delta :math:`x_t - x^i`, which is the
learning-rate-scaled sum of the local gradients for plain SGD) the look-back phase error is

.. math::
  e_i = 1 - \\cos^2(a_i, \\ell_i).

If :math:`e_i \\le` ``threshold`` the client sends one scalar
:math:`\\rho_i = \\langle a_i, \\ell_i\\rangle / \\lVert \\ell_i \\rVert^2` and the server uses
:math:`\\rho_i \\ell_i`; otherwise it sends :math:`a_i` in full and :math:`\\ell_i \\leftarrow a_i`.
The reference code keeps one look-back update shared by all clients [QUIRK]; here every client
has its own (a per-client :mod:`jaxfl.memory` row, as LBGM defines it;
:func:`jaxfl.algorithms.lbgm` composes the transform with that memory and the ledger).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["LBGMState", "lbgm", "lbgm_ledger", "lbgm_memory_write"]


class LBGMState(NamedTuple):
  """Per-client state of :func:`lbgm`.

  Attributes:
    look_back: :math:`\\ell_i`, the last update sent in full (zeros before the first).
    uplink_elements: per-leaf f32[] elements the last ``update`` sent (1 scalar in total on
      a look-back round, on the first leaf; the leaf sizes on a full round); read by the
      round's ledger.
    used_look_back: bool[] whether the last update was replaced by :math:`\\rho_i \\ell_i`.
    phase_error: f32[] :math:`e_i` of the last update (1 when there was no look-back yet).
  """

  look_back: Any
  uplink_elements: Any
  used_look_back: jax.Array
  phase_error: jax.Array


def _vdot(a, b):
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def lbgm(threshold: float = 0.95) -> optax.GradientTransformationExtraArgs:
  """LBGM's per-client uplink rule (whole-model look-back).

  Args:
    threshold: the largest look-back phase error :math:`e_i = 1-\\cos^2` for which the client
      sends only the scalar :math:`\\rho_i` (0.95 in the reference code; 0 = always send).

  Use through :func:`jaxfl.algorithms.lbgm` (per-client memory of the state, handed to the
  transform by the view); ``init(params)`` is the state of one client.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`LBGMState`.

  References:
    Azam, Hosseinalipour, Qiu & Brinton, "Recycling Model Updates in Federated Learning: Are
    Gradient Subspaces Low-Rank?", ICLR 2022.
  """
  if isinstance(threshold, int | float) and not 0.0 <= threshold <= 1.0:
    raise ValueError(f"`threshold` must be in [0, 1], got {threshold!r}.")

  def init_fn(params):
    return LBGMState(
        look_back=jax.tree.map(jnp.zeros_like, params),
        uplink_elements=jax.tree.map(lambda p: jnp.asarray(float(p.size), jnp.float32), params),
        used_look_back=jnp.zeros([], bool), phase_error=jnp.ones([], jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    dot = _vdot(updates, state.look_back)
    nl = _vdot(state.look_back, state.look_back)
    na = _vdot(updates, updates)
    ok = (nl > 0) & (na > 0)
    cos2 = jnp.where(ok, dot * dot / jnp.where(ok, na * nl, 1.0), 0.0)
    err = 1.0 - cos2
    use = ok & (err <= threshold)
    rho = jnp.where(ok, dot / jnp.where(ok, nl, 1.0), 0.0)
    out = jax.tree.map(lambda a, l: jnp.where(use, (rho * l).astype(a.dtype), a), updates,
                       state.look_back)
    look_back = jax.tree.map(lambda a, l: jnp.where(use, l, a), updates, state.look_back)
    leaves, treedef = jax.tree.flatten(updates)
    sent = [jnp.where(use, 1.0 if i == 0 else 0.0, float(x.size)).astype(jnp.float32)
            for i, x in enumerate(leaves)]
    return out, LBGMState(look_back, jax.tree.unflatten(treedef, sent), use, err)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lbgm_ledger():
  """The uplink ledger of :func:`lbgm`: a look-back round sends one scalar, a full round the
  whole (dense) update; read from the transform's state after the update."""
  from jaxfl import comm

  dense = comm.dense_ledger()

  def count(delta, abs_sums, start, uplink_state):
    sent = dense.count(delta, abs_sums, start, uplink_state)
    return jax.tree.map(lambda s, c: jnp.where(s > 0, c, 0.0), sent,
                        uplink_state.uplink_elements)

  return comm.Ledger(count, 1.0)


def lbgm_memory_write(row, result, before, after):
  """A client's new memory row: its LBGM state after the round, unless it was quarantined."""
  del before, after
  keep = result.finite > 0
  return jax.tree.map(lambda new, old: jnp.where(keep, new, old), result.uplink_state, row)
