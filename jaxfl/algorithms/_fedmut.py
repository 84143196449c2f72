"""FedMut: every client starts from its own mutation of the global model (a client view).

Built only from public contracts: the server transform
:func:`jaxfl.transforms.fedmut_direction` keeps the last global change and a key, and the view
:func:`fedmut_view` turns them into each slot's start point. Nothing in the engine knows it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxfl import views
from jaxfl.aggregation import weighted_mean
from jaxfl.algorithms._base import Algorithm, preset
from jaxfl.algorithms._fedopt import _lr
from jaxfl.algorithms.layerwise import _lab_local
from jaxfl.transforms._fedmut import FedMutState, balanced_signs, fedmut_direction

__all__ = ["fedmut", "fedmut_view"]


def _alpha(alpha):
  if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha < 0:
    raise ValueError(f"`alpha` must be a float >= 0, got {alpha!r}.")
  return float(alpha)


def fedmut_view(alpha: float,
                state: Callable[[Any], FedMutState] = lambda opt_state: opt_state[-1]
                ) -> views.ClientView:
  r"""FedMut's downlink: cohort slot :math:`i` starts from the mutated global model

  .. math::
    x^i_{l} = x_{t,l} + \alpha\, v^i_l\, d_l \qquad \text{for every layer (leaf) } l,

  with :math:`d = x_t - x_{t-1}` and the signs :math:`v_l = (v^1_l, \dots, v^C_l)` a random
  arrangement of as many :math:`+1` as :math:`-1` (:func:`jaxfl.transforms.balanced_signs`;
  with an odd cohort one slot gets 0, the plain global model). Every layer's mutations
  cancel over the cohort, so the clients' start points average to :math:`x_t`. The client
  uploads :math:`x_t - x^i_{\text{final}}` (the engine's rule for a view that sets
  ``params``), so the aggregate is FedAvg's.

  Args:
    alpha: :math:`\alpha \ge 0`, the mutation radius (0.5 in the FedLUAR reference code's
      FedMut solver; 0 is FedAvg).
    state: ``opt_state -> FedMutState``, where the server chain keeps
      :func:`jaxfl.transforms.fedmut_direction` (default: its last element).

  Returns:
    A :class:`jaxfl.views.ClientView`; it needs the round's ``SlotInfo.cohort_size``.
  """
  alpha = _alpha(alpha)

  def apply(server, slot, row):
    del row
    if slot.cohort_size is None:
      raise ValueError("fedmut_view needs the cohort size: `SlotInfo.cohort_size` is None "
                       "(build_round always sets it).")
    st = state(server.opt_state)
    leaves, treedef = jax.tree.flatten(server.params)
    directions = treedef.flatten_up_to(st.direction)
    signs = balanced_signs(st.key, len(leaves), slot.cohort_size)  # f32[L, C]
    # A padding slot (>= C) trains nothing that counts; it starts unmutated.
    v = jnp.take(signs, slot.slot, axis=1, mode="fill", fill_value=0.0)
    start = [p + (alpha * v[l]).astype(p.dtype) * d.astype(p.dtype)
             for l, (p, d) in enumerate(zip(leaves, directions))]
    return views.ClientStart(params=treedef.unflatten(start))

  return views.ClientView(apply)


@preset
def fedmut(alpha: float = 0.5, *, server_lr: float = 1.0, client_lr: float = 0.01,
           client_momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 32,
           local_steps: int = 20, seed: int = 0, name: str = "fedmut") -> Algorithm:
  r"""FedMut (Hu et al., AAAI 2024) with the FedLUAR reference code's settings.

  Each round's clients start from balanced mutations of the global model along its last
  change (:func:`fedmut_view`); the server averages the uploads unweighted and applies
  ``sgd(server_lr)``, then :func:`jaxfl.transforms.fedmut_direction` records the step for the
  next round's mutations. Local training: SGD with momentum (fresh each round), ``local_steps``
  steps of ``batch_size``.

  The reference code (``solvers/fedmut.py``) differs from the paper in two places, and jaxfl
  follows the paper (see docs/fedmut.md): its mutated models share one list with the global
  weights, so client :math:`i` gets :math:`x + \alpha (\sum_{k \le i} v^k) \odot d` (a
  cumulative sum of the signs), and with an odd number of clients no client is mutated.

  Args:
    alpha: mutation radius :math:`\alpha` (0.5 in the reference code).
    server_lr: :math:`\eta_g` (1.0: the new global model is the clients' mean).
    client_lr, client_momentum, weight_decay, batch_size, local_steps: local training.
    seed: seed of the transform's internal key (only used without an engine key).
    name: label.

  Returns:
    An :class:`Algorithm`.
  """
  alpha = _alpha(alpha)
  server = optax.chain(optax.sgd(_lr("server_lr", server_lr)), fedmut_direction(seed))
  return Algorithm(name, _lab_local(client_lr, client_momentum, weight_decay, batch_size,
                                    local_steps),
                   server, weighted_mean(), None, "uniform", view=fedmut_view(alpha))
