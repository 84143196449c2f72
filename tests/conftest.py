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
# notebooks, the slow suite's study smokes). The order is otherwise the collection order.
_LONG = ("golden_test.py", "two_devices", "sharded", "two_processes", "notebooks_test.py",
         "compilation_and_exact_resume", "sliced_forward_pass_equal_masked_rounds",
         "mlbfgs_benchmark_smoke", "mlbfgs_direction_diagnostic", "sigkill",
         "cifar10_resnet20_configuration")


def _worksteal_blocks(total: int, workers: int) -> list[int]:
  """The sizes of the contiguous blocks xdist's worksteal scheduler first hands its workers
  (``len(pending) // nodes_remaining`` each, in turn)."""
  sizes, left = [], total
  for k in range(workers):
    sizes.append(left // (workers - k))
    left -= sizes[-1]
  return sizes


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: the blocks are of what runs
def pytest_collection_modifyitems(config, items):
  """Each worker's first block opens with its share of the long tests (dealt round-robin), so
  the long tests start at once on every worker and the run ends on short ones: worksteal
  later steals only from the blocks' tails, so long tests all in front would stay with the
  first worker."""
  del config
  workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
  long = [i for i in items if any(k in i.nodeid for k in _LONG)]
  short = [i for i in items if not any(k in i.nodeid for k in _LONG)]
  ordered = []
  for w, size in enumerate(_worksteal_blocks(len(items), workers)):
    block = long[w::workers]
    take = max(0, size - len(block))
    ordered += block + short[:take]
    short = short[take:]
  items[:] = ordered + short


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
