"""XLA compiler options for jaxfl's compiled rounds, chosen per platform from measurements.

Passed as ``jax.jit(..., compiler_options=...)``, so they apply to jaxfl's programs only and
never to the user's own (BUILD.md "Performance notes" has the measurements; 2-core CPU,
pfl-research CIFAR-10 CNN round):

* ``xla_cpu_copy_insertion_use_region_analysis``: XLA:CPU's default copy insertion copies the
  loop-carried parameters at every local step and makes the optimizer update write a fresh
  buffer; region analysis proves the in-place update safe (1.34 -> 1.17 s per round on 2 CPU
  devices, the same bits).
* ``xla_cpu_experimental_ynn_fusion_type`` without ``INDIVIDUAL_CONVOLUTION`` where a device
  has more than one core to itself: XLA:CPU's YNNPACK convolutions ran single-threaded (1.45
  ms for the CNN's 5x5 32->64 conv with one core or two), Eigen's use every core (0.86 ms on
  two), so a round on one device of a multi-core CPU takes Eigen's (2.02 -> 1.75 s per
  round). With one device per core (:func:`jaxfl.set_cpu_devices`) YNNPACK's single-core
  kernels are the faster ones (1.17 s against 1.58 s) and are kept. The list is the default
  of jaxlib 0.10 (YNNPACK dots and reductions) less the convolutions.

An option this XLA does not know (they are experimental) is dropped, once, with a warning,
so a jaxlib upgrade can cost speed but never break a round.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
import numpy as np

CPU_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
CPU_MULTICORE_DEVICE_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


ENV_HOST_CORES = "JAXFL_HOST_CORES"


def host_cores() -> int:
  """CPU cores this process may use: ``$JAXFL_HOST_CORES`` (set by the local multi-process
  launcher to each process's share), else the process's CPU affinity."""
  env = os.environ.get(ENV_HOST_CORES)
  if env:
    try:
      n = int(env)
    except ValueError:
      n = 0
    if n < 1:
      raise ValueError(f"${ENV_HOST_CORES} must be a positive int, got {env!r}.")
    return n
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def compiler_options(platform: str, devices: int = 1) -> dict | None:
  """XLA options for a jaxfl program on ``platform`` (None: XLA's defaults).

  Args:
    platform: ``jax.Device.platform`` of the devices the program runs on.
    devices: how many of this process's devices run the program at once (they share the
      host's cores on a CPU).
  """
  if platform != "cpu":
    return None
  if devices < 1:
    raise ValueError(f"`devices` must be >= 1, got {devices!r}.")
  opts = dict(CPU_COMPILER_OPTIONS)
  if host_cores() >= 2 * devices:
    opts.update(CPU_MULTICORE_DEVICE_OPTIONS)
  return {k: v for k, v in opts.items() if _accepted(k, v)}


@functools.cache
def _accepted(name: str, value) -> bool:
  """Whether this XLA compiles with option ``name=value`` (a tiny CPU program, once)."""
  x = jax.device_put(np.float32(0), jax.devices("cpu")[0])
  try:
    jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(x).compile()
  except (jax.errors.JaxRuntimeError, ValueError) as e:
    warnings.warn(f"jaxfl: this XLA rejects the compiler option {name}={value!r} ({e}); "
                  "compiling without it.", stacklevel=3)
    return False
  return True
