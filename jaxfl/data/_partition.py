"""Seeded federated partitioners. Each returns one int index array per client."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

Partitioner = Callable[[np.ndarray, int, np.random.Generator], list[np.ndarray]]


def _check_clients(num_clients: int, n: int) -> None:
  if not isinstance(num_clients, int | np.integer) or num_clients < 1:
    raise ValueError(f"`num_clients` must be a positive int, got {num_clients!r}.")
  if num_clients > n:
    raise ValueError(f"`num_clients`={num_clients} exceeds the {n} training examples; "
                     "every client needs at least one example.")


def iid() -> Partitioner:
  """Shuffle and split into near-equal parts."""

  def part(labels, num_clients, rng):
    _check_clients(num_clients, len(labels))
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_clients)]

  part.__name__ = "iid"
  return part


def dirichlet(alpha: float, min_size: int = 1, max_tries: int = 1000) -> Partitioner:
  """Dirichlet label skew: for each class, p ~ Dir(alpha * 1_N) over clients.

  The class's shuffled indices are split by ``cumsum(p)``; the draw is repeated until every
  client has at least ``min_size`` examples (Hsu et al., 2019; the LMLS-lab splits use
  alpha = 0.1).
  """
  if not alpha > 0:
    raise ValueError(f"`alpha` must be > 0, got {alpha!r}.")
  if min_size < 1:
    raise ValueError(f"`min_size` must be >= 1 (no empty clients), got {min_size!r}.")

  def part(labels, num_clients, rng):
    _check_clients(num_clients, len(labels))
    if min_size * num_clients > len(labels):
      raise ValueError(f"`min_size`={min_size} x `num_clients`={num_clients} exceeds the "
                       f"{len(labels)} examples.")
    classes = np.unique(labels)
    for _ in range(max_tries):
      buckets = [[] for _ in range(num_clients)]
      for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(alpha * np.ones(num_clients))
        cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
        for b, chunk in zip(buckets, np.split(idx, cuts)):
          b.append(chunk)
      sizes = [sum(len(c) for c in b) for b in buckets]
      if min(sizes) >= min_size:
        return [np.sort(np.concatenate(b)) for b in buckets]
    raise ValueError(f"dirichlet(alpha={alpha}) could not give every one of {num_clients} "
                     f"clients >= {min_size} examples in {max_tries} draws; raise `alpha` or "
                     "lower `min_size`.")

  part.__name__ = f"dirichlet({alpha})"
  return part


def shards(shards_per_client: int = 2) -> Partitioner:
  """Pathological non-IID (McMahan et al., 2017): sort by label, deal out equal shards."""
  if shards_per_client < 1:
    raise ValueError(f"`shards_per_client` must be >= 1, got {shards_per_client!r}.")

  def part(labels, num_clients, rng):
    _check_clients(num_clients, len(labels))
    n_shards = num_clients * shards_per_client
    if n_shards > len(labels):
      raise ValueError(f"{n_shards} shards need at least as many examples ({len(labels)}).")
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, n_shards)
    assign = rng.permutation(n_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in assign]

  part.__name__ = f"shards({shards_per_client})"
  return part


def quantity_skew(alpha: float = 1.0, min_size: int = 1) -> Partitioner:
  """IID labels, client sizes proportional to a Dir(alpha) draw (at least ``min_size``)."""
  if not alpha > 0:
    raise ValueError(f"`alpha` must be > 0, got {alpha!r}.")
  if min_size < 1:
    raise ValueError(f"`min_size` must be >= 1, got {min_size!r}.")

  def part(labels, num_clients, rng):
    _check_clients(num_clients, len(labels))
    n = len(labels)
    if min_size * num_clients > n:
      raise ValueError(f"`min_size`={min_size} x `num_clients`={num_clients} exceeds {n}.")
    extra = n - min_size * num_clients
    sizes = min_size + np.floor(rng.dirichlet(alpha * np.ones(num_clients)) * extra).astype(int)
    sizes[: n - sizes.sum()] += 1  # hand out the rounding remainder
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(p) for p in np.split(rng.permutation(n), cuts)]

  part.__name__ = f"quantity_skew({alpha})"
  return part


def from_index_files(directory: str, prefix: str, num_clients: int | None = None) -> Partitioner:
  """Reads the LMLS-lab per-client index files ``{directory}/{prefix}_{i}.txt``.

  One training-set index per line per client, as shipped with FedLAMA/FedLUAR/multi-metric
  (e.g. ``prefix="cifar10"``, 128 clients). ``num_clients`` defaults to all files found.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"`directory` {directory!r} does not exist.")

  def read_all():
    i, out = 0, []
    while os.path.exists(os.path.join(directory, f"{prefix}_{i}.txt")):
      out.append(np.loadtxt(os.path.join(directory, f"{prefix}_{i}.txt"), dtype=np.int64, ndmin=1))
      i += 1
    if not out:
      raise FileNotFoundError(f"No files {prefix}_0.txt, {prefix}_1.txt, ... in {directory!r}.")
    return out

  def part(labels, n_clients, rng):
    del rng
    parts = read_all()
    want = num_clients or n_clients
    if want != len(parts):
      raise ValueError(f"`num_clients`={want} but {len(parts)} index files were found for "
                       f"prefix {prefix!r} in {directory!r}.")
    hi = max(int(p.max()) for p in parts)
    if hi >= len(labels):
      raise ValueError(f"Index files refer to example {hi} but the dataset has {len(labels)}.")
    return [np.sort(p) for p in parts]

  part.__name__ = f"index_files({prefix})"
  return part


PARTITIONERS = {"iid": iid, "dirichlet": dirichlet, "shards": shards,
                "quantity_skew": quantity_skew}
