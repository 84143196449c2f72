"""The training set on device: what the compiled round reads."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from jaxfl import sharding as jshard


class DeviceData(NamedTuple):
  """The training set on device: shared examples plus per-client index arrays.

  Attributes:
    x: f32[M, *example_shape] every training example of every client.
    y: i32[M] labels.
    client_indices: i32[N, n_max] each client's rows of ``x`` (padded).
    client_sizes: i32[N] each client's number of examples.
  """

  x: jax.Array
  y: jax.Array
  client_indices: jax.Array
  client_sizes: jax.Array


def device_data(data, mesh=None) -> DeviceData:
  """Puts a :class:`jaxfl.data.FederatedData` on device (replicated over ``mesh``).

  Args:
    data: the federated dataset (``x``, ``y``, ``client_indices``, ``client_sizes``).
    mesh: the client mesh (:func:`jaxfl.sharding.client_mesh`) or None (default device).

  Returns:
    A :class:`DeviceData` to pass to ``Round.step`` every round.
  """
  host = DeviceData(np.asarray(data.x), np.asarray(data.y), np.asarray(data.client_indices),
                    np.asarray(data.client_sizes))
  return jshard.put_replicated(host, mesh)
