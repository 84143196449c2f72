"""Test configuration and small shared builders."""

import os

# The CLI turns on a persistent compilation cache in ~/.cache by default; tests (in-process
# and their subprocesses) leave the user's cache alone unless a test asks for one.
os.environ.setdefault("JAXFL_COMPILE_CACHE", "off")

import jax  # noqa: E402
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# Tests that run for a minute or more (multi-device subprocesses, every golden preset, the
# notebooks). They go first, so that with `pytest -n auto` the run ends on short tests and no
# worker idles while another finishes a long one. The order is otherwise the collection order.
# (worksteal hands the first worker this whole head. Dealing it round-robin to both workers
# was tried at stop 41: 24:15 for the fast suite, and this order 21:30 then 24:24 on the same
# machine, so neither is shown faster.)
_LONG = ("golden_test.py", "two_devices", "sharded", "two_processes", "notebooks_test.py",
         "compilation_and_exact_resume", "sliced_forward_pass_equal_masked_rounds",
         "mlbfgs_benchmark_smoke")


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: not any(k in item.nodeid for k in _LONG))  # stable


def tiny_data(num_clients=6, dim=5, num_classes=3, sizes=None, seed=0):
  """A small federated dataset with ragged clients (fresh random values per seed)."""
  import jaxfl

  rng = np.random.default_rng(seed)
  sizes = list(sizes or rng.integers(2, 9, num_clients))
  m = int(sum(sizes))
  ds = jaxfl.data.ArrayDataset("tiny", rng.normal(size=(m, dim)).astype(np.float32),
                               rng.integers(0, num_classes, m).astype(np.int32),
                               rng.normal(size=(20, dim)).astype(np.float32),
                               rng.integers(0, num_classes, 20).astype(np.int32), num_classes)
  parts = np.split(rng.permutation(m), np.cumsum(sizes)[:-1])
  return jaxfl.data.from_client_indices(ds, parts, "tiny")


def tiny_model(dim=5, num_classes=3):
  import jaxfl

  return jaxfl.models.mlp((dim,), num_classes, hidden=(7,))


@pytest.fixture
def data():
  return tiny_data()


@pytest.fixture
def model():
  return tiny_model()
