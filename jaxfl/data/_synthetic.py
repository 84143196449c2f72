"""LEAF-style Synthetic(alpha, beta) federated data (Shamir et al.; Li et al., FedProx)."""

from __future__ import annotations

import numpy as np

from jaxfl.data._federated import FederatedData, from_client_indices
from jaxfl.data._sources import ArrayDataset


def synthetic(alpha: float = 1.0, beta: float = 1.0, num_clients: int = 100, dim: int = 60,
              num_classes: int = 10, mean_size: float = 100.0, iid: bool = False,
              test_fraction: float = 0.2, seed: int = 0) -> FederatedData:
  """Generates Synthetic(alpha, beta).

  Per client k: u_k ~ N(0, alpha), W_k, b_k ~ N(u_k, 1); B_k ~ N(0, beta),
  v_k ~ N(B_k, 1); x ~ N(v_k, Sigma) with Sigma_jj = j^-1.2; y = argmax(W_k x + b_k).
  Client sizes are log-normal (at least 10). ``iid=True`` shares one W, b and v. A fraction
  ``test_fraction`` of every client's data is pooled into the test set.
  """
  if alpha < 0 or beta < 0:
    raise ValueError(f"`alpha` and `beta` must be >= 0, got alpha={alpha}, beta={beta}.")
  if num_clients < 1:
    raise ValueError(f"`num_clients` must be >= 1, got {num_clients}.")
  rng = np.random.default_rng(seed)
  sizes = np.maximum(10, rng.lognormal(np.log(mean_size), 1.0, num_clients).astype(int))
  sigma = np.diag(np.arange(1, dim + 1, dtype=np.float64) ** -1.2)
  shared_w, shared_b = rng.normal(0, 1, (dim, num_classes)), rng.normal(0, 1, num_classes)
  shared_v = rng.normal(0, 1, dim)
  xs, ys, owners = [], [], []
  for k in range(num_clients):
    if iid:
      w, b, v = shared_w, shared_b, shared_v
    else:
      u = rng.normal(0, np.sqrt(alpha))
      w, b = rng.normal(u, 1, (dim, num_classes)), rng.normal(u, 1, num_classes)
      v = rng.normal(rng.normal(0, np.sqrt(beta)), 1, dim)
    x = rng.multivariate_normal(v, sigma, sizes[k])
    xs.append(x.astype(np.float32))
    ys.append(np.argmax(x @ w + b, axis=1).astype(np.int32))
    owners.append(np.full(sizes[k], k))
  train_parts, test_rows, start = [], [], 0
  x_all, y_all = np.concatenate(xs), np.concatenate(ys)
  for k in range(num_clients):
    rows = start + rng.permutation(sizes[k])
    n_test = int(test_fraction * sizes[k])
    test_rows.append(rows[:n_test])
    train_parts.append(np.sort(rows[n_test:]))
    start += sizes[k]
  test_rows = np.concatenate(test_rows)
  train_rows = np.concatenate(train_parts)
  remap = np.full(len(y_all), -1)
  remap[train_rows] = np.arange(len(train_rows))
  ds = ArrayDataset("synthetic", x_all[train_rows], y_all[train_rows], x_all[test_rows],
                    y_all[test_rows], num_classes)
  parts = [remap[p] for p in train_parts]
  return from_client_indices(ds, parts, f"synthetic({alpha},{beta})")
