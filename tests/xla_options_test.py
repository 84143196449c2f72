"""jaxfl's XLA compiler options: which apply where, that they reach the compiled round, and
that they change speed only (region-analysis copies: not a bit; the conv kernel: floats)."""

import re

import jax
import numpy as np
import pytest
from conftest import tiny_data

import jaxfl
from jaxfl import xla_options
from jaxfl.data import device_data
from jaxfl.round import build_round


def _round(algo, model, data, cohort=4):
  return build_round(algo, model, num_clients=data.num_clients,
                     max_client_size=data.max_client_size, clients_per_round=cohort,
                     clients_per_chunk=1, donate=False)


def _run(rnd, data, rounds=2):
  state, dd = rnd.init(jax.random.key(0)), device_data(data)
  hlo = rnd.step.lower(state, dd, jax.random.key(1)).compile().as_text()
  for r in range(rounds):
    state, m = rnd.step(state, dd, jax.random.fold_in(jax.random.key(1), r))
  return hlo, (state.params, state.opt_state, m["train_loss"])


def _ynn_convs(hlo: str) -> tuple[int, int]:
  """(convolutions inside YNNPACK fusions, all convolutions) of compiled HLO text."""
  bodies = dict(re.findall(r"^%([\w.\-]+) \(.*?\n(.*?)^}", hlo, re.S | re.M))
  names = {m.group(1) for ln in hlo.splitlines() if "__ynn_fusion" in ln
           for m in [re.search(r"calls=%([\w.\-]+)", ln)] if m}
  inside = sum(bodies.get(n, "").count(" convolution(") for n in names)
  return inside, hlo.count(" convolution(")


def test_options_by_platform_and_cores(monkeypatch):
  monkeypatch.setenv(xla_options.ENV_HOST_CORES, "2")
  one = xla_options.compiler_options("cpu", 1)
  assert one == {**xla_options.CPU_COMPILER_OPTIONS, **xla_options.CPU_MULTICORE_DEVICE_OPTIONS}
  # one device per core: YNNPACK's single-core convs stay
  assert xla_options.compiler_options("cpu", 2) == xla_options.CPU_COMPILER_OPTIONS
  assert xla_options.compiler_options("gpu", 1) is None
  assert xla_options.compiler_options("tpu") is None
  with pytest.raises(ValueError, match="devices"):
    xla_options.compiler_options("cpu", 0)
  monkeypatch.setenv(xla_options.ENV_HOST_CORES, "many")
  with pytest.raises(ValueError, match="JAXFL_HOST_CORES"):
    xla_options.host_cores()
  monkeypatch.delenv(xla_options.ENV_HOST_CORES)
  assert xla_options.host_cores() >= 1


def test_an_option_this_xla_rejects_is_dropped_with_a_warning(monkeypatch):
  monkeypatch.setenv(xla_options.ENV_HOST_CORES, "1")
  monkeypatch.setattr(xla_options, "CPU_COMPILER_OPTIONS", {
      "xla_cpu_copy_insertion_use_region_analysis": True,
      "xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"})
  with pytest.warns(UserWarning, match="NOT_A_FUSION_TYPE"):
    opts = xla_options.compiler_options("cpu")
  assert opts == {"xla_cpu_copy_insertion_use_region_analysis": True}


def test_region_analysis_removes_copies_and_changes_no_bits(monkeypatch):
  monkeypatch.setenv(xla_options.ENV_HOST_CORES, "1")  # the copy option alone
  data = tiny_data(num_clients=8, seed=3)
  model = jaxfl.models.mlp((5,), 3, hidden=(7,))
  algo = jaxfl.algorithms.fedavgm(client_lr=0.1, local_steps=3, batch_size=3)
  outs, copies = [], []
  for opts in (dict(xla_options.CPU_COMPILER_OPTIONS), {}):
    monkeypatch.setattr(xla_options, "CPU_COMPILER_OPTIONS", opts)
    hlo, out = _run(_round(algo, model, data), data)
    copies.append(hlo.count(" copy("))
    outs.append(out)
  assert copies[0] < copies[1], copies
  jax.tree.map(np.testing.assert_array_equal, *outs)


def test_multicore_device_compiles_convs_outside_ynnpack(monkeypatch):
  monkeypatch.setenv(xla_options.ENV_HOST_CORES, "4")  # 1 device, 4 cores
  data = jaxfl.data.random_images(8, 6, (8, 8, 3), 4, seed=1)
  model = jaxfl.models.get_model("small_cnn", data.example_shape, data.num_classes)
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=3)
  convs, outs = [], []
  for multi in (dict(xla_options.CPU_MULTICORE_DEVICE_OPTIONS), {}):
    monkeypatch.setattr(xla_options, "CPU_MULTICORE_DEVICE_OPTIONS", multi)
    hlo, out = _run(_round(algo, model, data), data)
    convs.append(_ynn_convs(hlo))
    outs.append(out)
  (with_inside, with_all), (without_inside, without_all) = convs
  assert with_all > 0 and with_inside == 0, convs
  assert without_inside > 0, convs  # XLA's default: YNNPACK convs
  # another conv kernel: the same maths up to float summation order
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *outs)
