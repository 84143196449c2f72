"""Faults and bad inputs: nothing lost, nothing silent (issue "Nothing lost, nothing silent")."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import tiny_data

import jaxfl


def _strict_json(path):
  def refuse(token):
    raise ValueError(f"non-strict JSON token {token}")
  with open(path) as f:
    return json.load(f, parse_constant=refuse)


def test_a_quarantined_client_does_not_turn_the_round_metrics_nan(tmp_path):
  data = tiny_data(num_clients=6, seed=1)
  bad = data.client_indices[2, : data.client_sizes[2]]
  x = data.x.copy()
  x[bad] = np.nan  # client 2's features are NaN: its update is quarantined
  data = data._replace(x=x)
  model = jaxfl.models.mlp((5,), 3, hidden=(4,))
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=3)._replace(
      sampler=jaxfl.sampling.fixed_schedule([[2, 0, 1]]))
  res = jaxfl.simulate(algo, model, data, rounds=2, clients_per_round=3, progress=False,
                       output_dir=str(tmp_path))
  for h in res.history:
    assert h["nonfinite_clients"] == 1 and h["participants"] == 2
    assert np.isfinite(h["train_loss"]) and np.isfinite(h["grad_norm"])
  assert jaxfl.tree.all_finite(res.state.params)
  _strict_json(tmp_path / "history.json")


def test_a_round_without_participants_reports_no_loss_and_strict_json(tmp_path):
  """Every client of round 2 quarantined: its loss is reported as missing (NaN in-graph, null
  in JSON, not 0.0) and the history and summary stay strict JSON."""
  data = tiny_data(num_clients=4, seed=2)
  model = jaxfl.models.mlp((5,), 3, hidden=(4,))
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=3)
  sched = [[0, 1], [2, 3], [0, 1]]
  rows = np.concatenate([data.client_indices[c, : data.client_sizes[c]] for c in (2, 3)])
  nan_x = data.x.copy()
  nan_x[rows] = np.nan
  data = data._replace(x=nan_x.astype(np.float32))
  algo = algo._replace(sampler=jaxfl.sampling.fixed_schedule(sched))
  jaxfl.simulate(algo, model, data, rounds=3, clients_per_round=2, progress=False,
                 output_dir=str(tmp_path))
  hist = _strict_json(tmp_path / "history.json")
  assert hist[1]["train_loss"] is None and hist[1]["participants"] == 0.0
  assert hist[0]["train_loss"] is not None and hist[2]["train_loss"] is not None
  _strict_json(tmp_path / "summary.json")


@pytest.mark.parametrize("arg", ["output_dir", "checkpoint_dir"])
def test_output_locations_are_checked_before_any_compile(arg, tmp_path, monkeypatch):
  a_file = tmp_path / "taken"
  a_file.write_text("x")
  compiled = []
  real_jit = jax.jit
  monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1) or real_jit(*a, **k))
  algo = jaxfl.algorithms.fedavg(local_steps=1)
  with pytest.raises(ValueError, match=f"`{arg}`.*is a file"):
    jaxfl.simulate(algo, jaxfl.models.mlp((5,), 3), tiny_data(), rounds=1,
                   clients_per_round=2, progress=False, **{arg: str(a_file)})
  assert not compiled
  locked = tmp_path / "ro"
  locked.mkdir()
  locked.chmod(0o500)
  if os.access(locked, os.W_OK):  # root ignores permission bits: nothing more to test here
    return
  with pytest.raises(ValueError, match="not a writable directory"):
    jaxfl.simulate(algo, jaxfl.models.mlp((5,), 3), tiny_data(), rounds=1,
                   clients_per_round=2, progress=False, **{arg: str(locked / "sub")})


@pytest.mark.parametrize("preset", ["fedavg", "fedavgm", "fedadam", "fedprox", "fedluar",
                                    "fedlama", "lbgm", "prunefl", "fedpaq", "fednova"])
@pytest.mark.parametrize("bad", [dict(client_lr=-0.1), dict(client_lr=float("nan")),
                                 dict(client_lr=float("inf")), dict(server_lr=float("nan")),
                                 dict(server_lr=-1.0), dict(client_momentum=1.0)])
def test_bad_learning_rates_and_momentum_are_refused_by_every_preset(preset, bad):
  factory = getattr(jaxfl.algorithms, preset)
  name = next(iter(bad))
  with pytest.raises(ValueError, match=f"`{name}`"):
    factory(**bad)
