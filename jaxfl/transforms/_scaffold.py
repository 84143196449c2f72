r"""SCAFFOLD's control variates as optax transforms (client correction, uplink, server).

Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning", ICML 2020, Algorithm 1 with option II.

The server keeps a control variate :math:`c`, each client :math:`i` its own :math:`c_i`
(zeros at first). A sampled client runs :math:`K` local steps from :math:`y_i = x`,

.. math::
  y_i \leftarrow y_i - \eta_l\,(g_i(y_i) - c_i + c),

then (option II) :math:`c_i^+ = c_i - c + (x - y_i)/(K\eta_l)` and uploads
:math:`\Delta y_i = y_i - x` and :math:`\Delta c_i = c_i^+ - c_i`. The server applies
:math:`x \leftarrow x + \eta_g \frac{1}{|S|}\sum_{i\in S}\Delta y_i` and
:math:`c \leftarrow c + \frac{1}{N}\sum_{i\in S}\Delta c_i`.

In jaxfl's pseudo-gradient domain (:math:`\Delta_i = x - y_i`) the server's control update is
computed from the unweighted mean :math:`\bar\Delta` it already has: with every client taking
the same :math:`K` steps, :math:`\sum_{i\in S}\Delta c_i = |S|\,(\bar\Delta/(K\eta_l) - c)`.
:func:`jaxfl.algorithms.scaffold` composes the three transforms with a per-client
:mod:`jaxfl.memory` row for :math:`c_i` and a view that hands each client :math:`c - c_i`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["ScaffoldClientState", "ScaffoldState", "scaffold_client_control",
           "scaffold_correction", "scaffold_server_control"]


def scaffold_correction() -> optax.GradientTransformationExtraArgs:
  r"""Client-side gradient correction :math:`g \mapsto g + (c - c_i)`.

  .. math:: g \leftarrow g + (c - c_i)

  Chain it before the client optimizer: ``optax.chain(scaffold_correction(), optax.sgd(lr))``.
  ``update`` takes the correction as the keyword argument ``control`` (a params-shaped
  tree; the round passes it from the client view's ``ClientStart.context``); without it the
  gradients pass unchanged.

  Returns:
    A stateless ``optax.GradientTransformationExtraArgs``.

  References:
    Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, `SCAFFOLD: Stochastic Controlled
    Averaging for Federated Learning <https://arxiv.org/abs/1910.06378>`_, ICML 2020,
    Algorithm 1 line 10.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, control=None, **extra):
    del params, extra
    if control is None:
      return updates, state
    return jax.tree.map(lambda g, c: g + c.astype(g.dtype), updates, control), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ScaffoldClientState(NamedTuple):
  """A client's control variates during its round.

  Attributes:
    client_control: :math:`c_i` (after ``update``: :math:`c_i^+`).
    server_control: :math:`c`, the server's control variate at the round's start.
  """

  client_control: Any
  server_control: Any


def scaffold_client_control(local_steps: int, client_lr: float
                            ) -> optax.GradientTransformationExtraArgs:
  r"""Option II control-variate update, as an uplink transform (the delta passes unchanged).

  .. math:: c_i^+ = c_i - c + \Delta_i / (K\eta_l), \qquad \Delta_i = x - y_i.

  Args:
    local_steps: :math:`K`, local steps every client takes.
    client_lr: :math:`\eta_l`, the client SGD learning rate.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`ScaffoldClientState`; ``init``
    gives zero controls (the view normally supplies the state).

  References:
    Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, `SCAFFOLD: Stochastic Controlled
    Averaging for Federated Learning <https://arxiv.org/abs/1910.06378>`_, ICML 2020,
    Algorithm 1 line 12, option II.
  """
  if not isinstance(local_steps, int) or local_steps < 1:
    raise ValueError(f"`local_steps` must be a positive int, got {local_steps!r}.")
  if isinstance(client_lr, int | float) and not client_lr > 0:  # traced: inject_hyperparams
    raise ValueError(f"`client_lr` must be > 0, got {client_lr!r}.")
  inv = 1.0 / (local_steps * client_lr)

  def init_fn(params):
    zeros = optax.tree.zeros_like(params)
    return ScaffoldClientState(zeros, zeros)

  def update_fn(updates, state, params=None, **extra):
    del params, extra
    new = jax.tree.map(lambda ci, c, d: ci - c + d * inv, state.client_control,
                       state.server_control, updates)
    return updates, ScaffoldClientState(new, state.server_control)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ScaffoldState(NamedTuple):
  """State of :func:`scaffold_server_control`.

  Attributes:
    control: :math:`c`, the server control variate (params-shaped).
  """

  control: Any


def scaffold_server_control(num_clients: int, local_steps: int, client_lr: float
                            ) -> optax.GradientTransformationExtraArgs:
  r"""Server control-variate update; the pseudo-gradient passes unchanged.

  .. math::
    c \leftarrow c + \frac{1}{N}\sum_{i\in S}\Delta c_i
      = c + \frac{|S|}{N}\Big(\frac{\bar\Delta}{K\eta_l} - c\Big),

  with :math:`\bar\Delta` the *unweighted* mean of the participants' deltas and :math:`|S|`
  the number of clients with positive ``client_weights`` (quarantined and dropped clients
  have weight 0). Exact when every client takes :math:`K` steps and the aggregate is the
  unweighted mean (``weighting="uniform"``), as :func:`jaxfl.algorithms.scaffold` sets up.

  Args:
    num_clients: :math:`N`, the population size.
    local_steps: :math:`K`.
    client_lr: :math:`\eta_l`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`ScaffoldState`; ``update``
    needs ``client_weights``.

  References:
    Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, `SCAFFOLD: Stochastic Controlled
    Averaging for Federated Learning <https://arxiv.org/abs/1910.06378>`_, ICML 2020,
    Algorithm 1 line 17.
  """
  if not isinstance(num_clients, int) or num_clients < 1:
    raise ValueError(f"`num_clients` must be a positive int, got {num_clients!r}.")
  inv = 1.0 / (local_steps * client_lr)

  def init_fn(params):
    return ScaffoldState(optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None, *, client_weights=None, **extra):
    del params, extra
    if client_weights is None:
      raise ValueError("scaffold_server_control needs `client_weights` (the round passes it).")
    frac = jnp.sum(client_weights > 0).astype(jnp.float32) / num_clients
    control = jax.tree.map(lambda c, d: (c + frac * (d * inv - c)).astype(c.dtype),
                           state.control, updates)
    return updates, ScaffoldState(control)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
