"""Client views: what each cohort slot starts from (the downlink ``ClientView`` contract).

A view is one pure function, called once per cohort slot inside the mapped client stage
(under ``vmap`` / ``shard_map``)::

    view.apply(server: ServerSnapshot, slot: SlotInfo, row) -> ClientStart

``server`` is the server state at the start of the round (global params, BN statistics, the
server optimizer state, the round index), ``slot`` says which client this slot holds, and
``row`` is the slot's row of the algorithm's :class:`jaxfl.memory.ClientMemory` (None without
memory). Every field of the returned :class:`ClientStart` is optional; None means the plain
FedAvg behaviour (start from the global params, train and upload everything).

A view has no state of its own: what it needs lives in the server optimizer state (read
through the accessor the algorithm preset composed it with, e.g. FedLUAR's chosen layers) or
in client memory (FedLAMA's unsynchronised layers, SCAFFOLD's control variates). Sub-model
methods (PriSM, HeteroFL, FjORD) return per-client ``train_mask`` / ``upload_mask`` drawn
from ``slot.key``.

Example, a view that freezes every bias (clients neither train nor upload them)::

    def no_bias(server, slot, row):
      mask = jax.tree.map(lambda p: jnp.asarray(p.ndim >= 2), server.params)
      return jaxfl.views.ClientStart(train_mask=mask, upload_mask=mask)
    view = jaxfl.views.ClientView(no_bias)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax


class ServerSnapshot(NamedTuple):
  """The server state a view (or a memory write) may read.

  Attributes:
    params: global params :math:`x_t`.
    model_state: global non-trainable collections (BN statistics).
    opt_state: the server optimizer's state (e.g. a layer-wise transform's masks).
    round: i32[] index of the round (0-based).
    hyperparams: the client side of :attr:`jaxfl.ServerState.hyperparams` (``{name:
      f32[]}``, traced; see :mod:`jaxfl.hyperparams`), or None.
  """

  params: Any
  model_state: Any
  opt_state: Any
  round: jax.Array
  hyperparams: Any = None


class SlotInfo(NamedTuple):
  """Which client a cohort slot holds.

  Attributes:
    client_id: i32[] the client's id in the population.
    slot: i32[] the slot's position in the (padded) cohort.
    key: the slot's PRNG key for the view (independent of its training key).
    cohort_size: the round's cohort size :math:`C` (a static int; slots ``>= C`` are
      padding), for views that assign something across the cohort (FedMut's balanced
      signs); None where a caller does not say.
  """

  client_id: jax.Array
  slot: jax.Array
  key: jax.Array
  cohort_size: int | None = None


class ClientStart(NamedTuple):
  """What one client starts from; None fields take the FedAvg default.

  Attributes:
    params: the params the client trains from (default: the global params). When set, the
      client's upload is :math:`x_t - x^i` (its drift from the global model).
    train_mask: params-shaped tree of 0/1 (or bool) arrays broadcastable to each leaf; every
      local optimizer update is multiplied by it, so masked entries never move.
    upload_mask: params-shaped tree of 0/1 (or bool) arrays broadcastable to each leaf; the
      uploaded delta is multiplied by it, the ledger counts only what is sent, and an
      aggregator that reads masks gets the cohort's stacked (``client_masks=``) or summed
      (a ``masked`` :class:`jaxfl.aggregation.LinearAggregator`) masks.
    uplink_state: the state the uplink transform starts from (default: ``uplink.init``
      every round); a view returns a memory row here to make the uplink stateful per client
      (LBGM's look-back update).
    context: a dict passed to the client optimizer's ``update`` as keyword arguments
      (SCAFFOLD's control-variate correction), besides ``round`` (i32[], always passed, for
      per-round schedules); transforms that are not ``GradientTransformationExtraArgs``
      ignore them.
  """

  params: Any = None
  train_mask: Any = None
  upload_mask: Any = None
  uplink_state: Any = None
  context: dict | None = None


class ClientView(NamedTuple):
  """The view contract: ``apply(server, slot, row) -> ClientStart`` (module docstring)."""

  apply: Callable[[ServerSnapshot, SlotInfo, Any], ClientStart]


def global_view() -> ClientView:
  """FedAvg's downlink: every client starts from the global model, trains and sends all.

  Returns:
    A :class:`ClientView` returning an all-default :class:`ClientStart`.
  """
  return ClientView(lambda server, slot, row: ClientStart())


def server_masks(upload: Callable[[Any], Any] | None = None,
                 train: Callable[[Any], Any] | None = None) -> ClientView:
  """Masks that a server transform publishes in its state, read by declared accessors.

  FedLUAR decides at the end of round t which layers round t+1 recycles (not uploaded);
  PruneFL publishes the element-wise masks that clients train and upload. The algorithm
  preset that chained the transform knows where its state sits and passes an accessor, e.g.
  ``server_masks(upload=lambda s: s[0].uplink_mask)`` for ``optax.chain(fedluar(..), sgd)``.

  Args:
    upload: ``opt_state -> upload mask`` (params-shaped), or None.
    train: ``opt_state -> train mask`` (params-shaped); a trained-entries mask is also an
      upload mask (an entry that never moves has a zero delta).

  Returns:
    A :class:`ClientView`.
  """

  def apply(server, slot, row):
    del slot, row
    return ClientStart(upload_mask=None if upload is None else upload(server.opt_state),
                       train_mask=None if train is None else train(server.opt_state))

  return ClientView(apply)


__all__ = ["ClientStart", "ClientView", "ServerSnapshot", "SlotInfo", "global_view",
           "server_masks"]
