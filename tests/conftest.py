"""Test configuration and small shared builders."""

import contextlib
import logging
import os

import numpy as np
import pytest

# The CLI turns on a persistent compilation cache in ~/.cache by default; tests (in-process
# and their subprocesses) leave the user's cache alone unless a test asks for one.
os.environ.setdefault("JAXFL_COMPILE_CACHE", "off")

# XLA flags for every program the suite compiles, in this process and in its subprocesses
# (`xla_env`). Compiling dominates this suite, and XLA:CPU's LLVM optimisation is ~30% of it.
# Level 0 keeps each program's HLO, so its operations and their order; results move only by
# rounding (~2e-7 relative after the golden runs' 4 rounds), and every equality the tests
# assert is between two programs compiled the same way. The golden
# test (tests/golden/record.py) sets its own XLA_FLAGS, so it pins bits at XLA's default level,
# as users compile. JAXFL_TEST_XLA_FLAGS="" runs the whole suite at the default level.
TEST_XLA_FLAGS = os.environ.get("JAXFL_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")
_flags = os.environ.get("XLA_FLAGS", "")
if TEST_XLA_FLAGS not in _flags:  # idempotent: xdist workers inherit the controller's env
  os.environ["XLA_FLAGS"] = f"{_flags} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402

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


def xla_env(devices: int | None = None, **extra) -> dict:
  """The environment for a test subprocess on CPU: this suite's XLA flags (above), with
  ``devices`` host devices when given, plus ``extra`` variables."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return dict(os.environ, JAX_PLATFORMS="cpu", **extra, XLA_FLAGS=" ".join(flags))


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


class _StepCompiles(logging.Handler):
  def __init__(self):
    super().__init__()
    self.n = 0

  def emit(self, record):
    if "Finished XLA compilation of jit(step)" in record.getMessage():
      self.n += 1


@contextlib.contextmanager
def count_step_compiles():
  """Counts XLA compilations of the round's ``jit(step)`` in the block (``.n`` of the
  handler it yields)."""
  handler = _StepCompiles()
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield handler
  finally:
    logger.removeHandler(handler)
