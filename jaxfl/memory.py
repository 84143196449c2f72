"""Client memory: per-client state that lives across rounds (the ``ClientMemory`` contract).

Memory is a pytree whose leaves have a leading *row* axis: one row per client of the
population (:func:`per_client`: SCAFFOLD's control variates, LBGM's look-back update) or one
row per cohort slot (:func:`per_slot`: FedLAMA's layers that a client keeps locally until
they are synchronised). Each round the engine

1. ``gather(memory, ids, slots)`` the cohort's rows (leading axis = cohort slot) and hands
   each slot its row (the :class:`jaxfl.views.ClientView` and the mapped client stage see it);
2. after the server step, computes every slot's new row with
   ``write(row, result, before, after)`` (``result`` a :class:`ClientResult`, ``before`` /
   ``after`` :class:`jaxfl.views.ServerSnapshot` of the round's start and end);
3. ``scatter(memory, ids, slots, rows, commit)`` them back, where ``commit`` (f32[slots]) is 1
   for the slots of real clients that took part (not padding, not dropped out). A write
   decides itself what a quarantined client (``result.finite == 0``) keeps.

Rows are laid along the ``"clients"`` mesh axis (padded to a multiple of the device count),
so memory grows with N / devices per device.

Example, each client remembers how many times it trained::

    count = jaxfl.memory.per_client(
        init_row=lambda params: jnp.zeros([], jnp.int32),
        write=lambda row, result, before, after: row + result.finite.astype(jnp.int32))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class ClientResult(NamedTuple):
  """One slot's outcome of the client stage, as a memory ``write`` sees it.

  Attributes:
    delta: the uploaded update :math:`x_t - x^i` after the uplink transform and the upload
      mask (zeros when quarantined).
    local: the client's local params after training when its view set ``params``, else None.
    uplink_state: the uplink transform's state after this round's update (None without an
      uplink).
    finite: f32[] 1 if the update was finite (not quarantined), else 0.
    steps: f32[] local steps taken.
    loss: f32[] mean training loss.
  """

  delta: Any
  local: Any
  uplink_state: Any
  finite: jax.Array
  steps: jax.Array
  loss: jax.Array


class ClientMemory(NamedTuple):
  """The memory contract (module docstring).

  Attributes:
    init: ``(params, num_clients, num_slots) -> memory``.
    gather: ``(memory, ids, slots) -> rows`` (leading axis = cohort slot).
    scatter: ``(memory, ids, slots, rows, commit) -> memory``.
    write: ``(row, result, before, after) -> row`` for one slot (the engine maps it).
  """

  init: Callable[[Any, int, int], Any]
  gather: Callable[[Any, jax.Array, jax.Array], Any]
  scatter: Callable[[Any, jax.Array, jax.Array, Any, jax.Array], Any]
  write: Callable[[Any, ClientResult, Any, Any], Any]


def _rows(init_row, params, n):
  row = init_row(params)
  return jax.tree.map(lambda r: jnp.broadcast_to(jnp.asarray(r)[None], (n,) + jnp.shape(r)), row)


def per_client(init_row: Callable[[Any], Any],
               write: Callable[[Any, ClientResult, Any, Any], Any]) -> ClientMemory:
  """One row per client of the population, read and written by client id.

  Args:
    init_row: ``params -> row``: a client's memory before it first trains.
    write: ``(row, result, before, after) -> row``: the new row of a client that took part.

  Returns:
    A :class:`ClientMemory` with N rows (the engine may pad N to a multiple of the device
    count; padded rows are never read).
  """

  def init(params, num_clients, num_slots):
    del num_slots
    return _rows(init_row, params, num_clients)

  def gather(memory, ids, slots):
    del slots
    return jax.tree.map(lambda m: m[ids], memory)

  def scatter(memory, ids, slots, rows, commit):
    del slots
    # Rows of slots that do not commit point past the end and the write is dropped.
    n = jax.tree.leaves(memory)[0].shape[0]
    target = jnp.where(commit > 0, ids, n)
    return jax.tree.map(lambda m, r: m.at[target].set(r, mode="drop"), memory, rows)

  return ClientMemory(init, gather, scatter, write)


def per_slot(init_row: Callable[[Any], Any],
             write: Callable[[Any, ClientResult, Any, Any], Any]) -> ClientMemory:
  """One row per cohort slot: state of whichever client holds the slot.

  For methods whose cohort persists over several rounds (FedLAMA with
  :func:`jaxfl.sampling.periodic`), so memory costs the cohort size, not the population.

  Args:
    init_row: ``params -> row``.
    write: ``(row, result, before, after) -> row``.

  Returns:
    A :class:`ClientMemory` with one row per padded cohort slot.
  """

  def init(params, num_clients, num_slots):
    del num_clients
    return _rows(init_row, params, num_slots)

  def gather(memory, ids, slots):
    del ids
    return jax.tree.map(lambda m: m[slots], memory)

  def scatter(memory, ids, slots, rows, commit):
    del ids
    keep = lambda m, r: jnp.where(commit.reshape((-1,) + (1,) * (r.ndim - 1)) > 0, r, m[slots])
    return jax.tree.map(lambda m, r: m.at[slots].set(keep(m, r)), memory, rows)

  return ClientMemory(init, gather, scatter, write)


__all__ = ["ClientMemory", "ClientResult", "per_client", "per_slot"]
