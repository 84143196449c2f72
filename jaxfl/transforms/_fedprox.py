"""FedProx's proximal term as a client-side optax transformation."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

__all__ = ["ProximalState", "add_proximal_term"]


class ProximalState(NamedTuple):
  """State of :func:`add_proximal_term`.

  Attributes:
    anchor: the global model the client started the round from (x_t in the paper).
  """

  anchor: optax.Params


def add_proximal_term(mu: float) -> optax.GradientTransformation:
  r"""Adds the gradient of :math:`\frac{\mu}{2}\lVert x - x_t\rVert^2` to the gradient.

  .. math::
    g \leftarrow g + \mu (x - x_t)

  The anchor :math:`x_t` is captured by ``init``: the engine initialises the client
  optimizer at the global parameters every round, so chaining this before the client
  optimizer gives FedProx. With the anchor being the current global model this is also the
  local regulariser of FedACG as implemented in the FedLUAR code (ALGORITHMS.md §11).

  Args:
    mu: proximal coefficient :math:`\mu \ge 0`; may be a traced value under
      ``inject_hyperparams``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ProximalState`; ``update`` needs
    ``params`` (:math:`x`).

  References:
    Li et al., `Federated Optimization in Heterogeneous Networks
    <https://arxiv.org/abs/1812.06127>`_, MLSys 2020.
  """

  def init_fn(params):
    return ProximalState(anchor=jax.tree.map(lambda p: p.copy() if hasattr(p, "copy") else p,
                                             params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_proximal_term needs `params`.")
    new = jax.tree.map(lambda g, p, a: g + (mu * (p - a)).astype(g.dtype), updates, params,
                       state.anchor)
    return new, state

  return optax.GradientTransformation(init_fn, update_fn)
