"""The device mesh of the client axis.

One 1-D mesh named ``"clients"`` over the local (or, after ``jax.distributed.initialize``,
global) devices. The round constrains per-client arrays to ``P("clients")`` and keeps the
server state replicated; XLA partitions the vmapped local training along the client axis
and turns the aggregation into one all-reduce. ``Auto`` axes are used on purpose: the
round is written with ``jit`` + sharding constraints (no ``shard_map``), so gradients with
respect to replicated parameters are never summed over devices by accident (DESIGN.md).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "clients"


def client_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D ``("clients",)`` mesh over ``devices`` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("`devices` is empty.")
  return jax.sharding.Mesh(np.array(devices), (AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def client_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def padded_cohort_size(clients_per_round: int, mesh) -> int:
  """Cohort size rounded up to a multiple of the device count (extra clients get weight 0)."""
  d = 1 if mesh is None else mesh.devices.size
  return -(-clients_per_round // d) * d


def constrain_clients(x, mesh):
  """Shards the leading (client) axis of every leaf inside ``jit``."""
  if mesh is None or mesh.devices.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, client_sharded(mesh))


def constrain_replicated(x, mesh):
  if mesh is None or mesh.devices.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, replicated(mesh))


def put_replicated(x, mesh):
  """Places a host tree on every device of ``mesh`` (or the default device)."""
  if mesh is None:
    return jax.device_put(x)
  return jax.device_put(x, replicated(mesh))


def to_host(tree):
  """NumPy copy of a tree of arrays, whole on every process (also in multi-process runs).

  ``jax.device_get`` cannot fetch an array sharded over other processes' devices (e.g. the
  round's ``cohort``, laid along ``"clients"``); those leaves are all-gathered, so in a
  multi-process run every process must call this together (``simulate`` does).
  """
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)
