"""The federated dataset: every client's examples as padded, stacked index arrays."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxfl.data._partition import Partitioner
from jaxfl.data._sources import ArrayDataset


class FederatedData(NamedTuple):
  """A federated dataset with static shapes.

  The training examples are stored once (``x``, ``y``); client ``i`` owns rows
  ``client_indices[i, :client_sizes[i]]``. Rows past a client's size are padding (they repeat
  the client's first example and are masked out), so every client has the same static shape
  and nothing retraces per client. Use :meth:`client_arrays` for explicitly padded
  ``x[C, n_max, ...]`` arrays with masks.

  Attributes:
    name: dataset name.
    x: f32[M, *example_shape] training examples.
    y: i32[M] labels.
    client_indices: i32[N, n_max] rows of ``x`` owned by each client (padded).
    client_sizes: i32[N] number of real examples per client (all >= 1).
    x_test: f32[T, *example_shape] centralized test set.
    y_test: i32[T].
    num_classes: number of classes.
    partition: name of the partitioner that produced the split.
  """

  name: str
  x: np.ndarray
  y: np.ndarray
  client_indices: np.ndarray
  client_sizes: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  partition: str = ""

  @property
  def num_clients(self) -> int:
    return int(self.client_indices.shape[0])

  @property
  def max_client_size(self) -> int:
    return int(self.client_indices.shape[1])

  @property
  def example_shape(self) -> tuple[int, ...]:
    return tuple(self.x.shape[1:])

  def client_mask(self) -> np.ndarray:
    """bool[N, n_max]: True for real examples."""
    return np.arange(self.max_client_size)[None, :] < self.client_sizes[:, None]

  def client_arrays(self, ids=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded ``(x[C, n_max, ...], y[C, n_max], mask[C, n_max])`` for clients ``ids``."""
    ids = np.arange(self.num_clients) if ids is None else np.asarray(ids)
    idx = self.client_indices[ids]
    return self.x[idx], self.y[idx], self.client_mask()[ids]

  def label_counts(self) -> np.ndarray:
    """i64[N, num_classes]: how many examples of each class every client holds."""
    counts = np.zeros((self.num_clients, self.num_classes), np.int64)
    mask = self.client_mask()
    for i in range(self.num_clients):
      counts[i] = np.bincount(self.y[self.client_indices[i][mask[i]]], minlength=self.num_classes)
    return counts

  def report(self) -> dict:
    """Partition report: client sizes and label distribution."""
    sizes = self.client_sizes
    counts = self.label_counts()
    return {
        "dataset": self.name, "partition": self.partition, "num_clients": self.num_clients,
        "num_train": int(sizes.sum()), "num_test": int(len(self.y_test)),
        "size_min": int(sizes.min()), "size_median": float(np.median(sizes)),
        "size_max": int(sizes.max()), "size_mean": float(sizes.mean()),
        "classes_per_client_mean": float((counts > 0).sum(1).mean()),
        "sizes": sizes.tolist(), "label_counts": counts.tolist(),
    }


def from_client_indices(ds: ArrayDataset, parts: list[np.ndarray],
                        partition: str = "") -> FederatedData:
  """Builds :class:`FederatedData` from one index array per client."""
  if not parts:
    raise ValueError("`parts` is empty: at least one client is needed.")
  sizes = np.array([len(p) for p in parts], np.int32)
  if sizes.min() < 1:
    empty = np.flatnonzero(sizes == 0)[:10].tolist()
    raise ValueError(f"Clients {empty} have no examples; every client needs at least one.")
  n_max = int(sizes.max())
  idx = np.zeros((len(parts), n_max), np.int32)
  for i, p in enumerate(parts):
    idx[i, : len(p)] = p
    idx[i, len(p):] = p[0]
  return FederatedData(ds.name, np.asarray(ds.x_train, np.float32), np.asarray(ds.y_train, np.int32),
                       idx, sizes, np.asarray(ds.x_test, np.float32),
                       np.asarray(ds.y_test, np.int32), int(ds.num_classes), partition)


def federate(ds: ArrayDataset, num_clients: int, partition: Partitioner,
             seed: int = 0) -> FederatedData:
  """Partitions a centralized dataset over ``num_clients`` clients (seeded)."""
  if len(ds.x_train) != len(ds.y_train):
    raise ValueError(f"x_train has {len(ds.x_train)} rows but y_train has {len(ds.y_train)}.")
  if len(ds.x_test) != len(ds.y_test):
    raise ValueError(f"x_test has {len(ds.x_test)} rows but y_test has {len(ds.y_test)}.")
  parts = partition(np.asarray(ds.y_train), num_clients, np.random.default_rng(seed))
  return from_client_indices(ds, parts, getattr(partition, "__name__", ""))
