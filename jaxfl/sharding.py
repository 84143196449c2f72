"""The device mesh of the client axis.

One 1-D mesh named ``"clients"`` over the local (or, after ``jax.distributed.initialize``,
global) devices. The round keeps the server state replicated and trains the cohort under
``shard_map``: each device runs its own contiguous block of slots with plain per-device code,
the per-client inputs made device-varying first (``lax.pcast``), so gradients with respect to
the replicated parameters are never summed over devices by accident (DESIGN.md); the
aggregation is one all-reduce (``psum`` of streamed sums, or the contraction of the
client-sharded stacked updates).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfl.xla_options import host_cores

AXIS = "clients"


def client_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D ``("clients",)`` mesh over ``devices`` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("`devices` is empty.")
  return jax.sharding.Mesh(np.array(devices), (AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def set_cpu_devices(n: int | None = None) -> int:
  """Splits the host CPU into ``n`` XLA devices (default: one per core) for the client axis.

  On one XLA:CPU device the round's local-step loop runs its ops one after another (XLA
  executes while-loop bodies without inter-op concurrency), while a per-step Python loop gets
  some overlap; with one device per core the cohort is split over the cores and each trains
  its own clients (1.2-2.4x faster rounds on 2 cores, README 'Performance'). Call
  it right after ``import jax``, before any JAX computation; ``jax.devices("cpu")`` then
  lists ``n`` devices and :func:`jaxfl.simulate` shards over them. No effect on GPU/TPU
  backends, whose devices stay the default.

  Returns the device count set. Raises ``RuntimeError`` if JAX's backends are already up.
  """
  n = host_cores() if n is None else n
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"`n` must be a positive int (CPU devices), got {n!r}.")
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError as e:
    raise RuntimeError(f"set_cpu_devices({n}) must run before any JAX computation (JAX's "
                       "backends are already initialised); call it right after `import jax`, "
                       "or set XLA_FLAGS=--xla_force_host_platform_device_count=N.") from e
  return n


def cpu_devices_configured() -> bool:
  """True if the CPU device count was chosen already (config, XLA_FLAGS or jaxfl.launch)."""
  return (jax.config.jax_num_cpu_devices > 0
          or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""))


def psum_packed(tree, axis_name: str = AXIS):
  """``lax.psum`` of a pytree as one all-reduce per dtype instead of one per leaf.

  XLA:CPU runs a tuple all-reduce as one rendezvous of the devices per leaf (a round's
  streamed sums are ~20 leaves), so on small rounds the synchronisation, not the adds,
  costs; packing the leaves of each dtype into one vector makes it one rendezvous per dtype.
  The result is the same bit for bit (the same element-wise sums, only laid out together).
  Call inside ``shard_map`` over ``axis_name``.
  """
  leaves, treedef = jax.tree.flatten(tree)
  groups: dict = {}
  for i, leaf in enumerate(leaves):
    groups.setdefault(jax.numpy.result_type(leaf), []).append(i)
  out = list(leaves)
  for idx in groups.values():
    if len(idx) == 1:
      out[idx[0]] = jax.lax.psum(leaves[idx[0]], axis_name)
      continue
    flat = jax.numpy.concatenate([jax.numpy.ravel(leaves[i]) for i in idx])
    flat = jax.lax.psum(flat, axis_name)
    offset = 0
    for i in idx:
      size = int(np.prod(np.shape(leaves[i])))
      out[i] = flat[offset:offset + size].reshape(np.shape(leaves[i]))
      offset += size
  # The barrier keeps the unpacking slices out of the consumers' fusions, so the code after
  # the sum compiles as it does after a per-leaf psum (the same bits, not just the same sums).
  return jax.tree.unflatten(treedef, jax.lax.optimization_barrier(out))


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
