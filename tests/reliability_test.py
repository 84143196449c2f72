"""Faults and bad inputs: nothing lost, nothing silent (issue "Nothing lost, nothing silent")."""

import json
import os
import re

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
                       output_dir=str(tmp_path), check_data=False, report_grad_norm=True)
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
                 output_dir=str(tmp_path), check_data=False)
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


# ----------------------------------------------------------------------------- zero weight


def test_a_round_without_participants_skips_the_server_step():
  """FedAvgM: every client of round 2 quarantined -> params and momentum stay as after round 1
  (no step on stale momentum), and the metrics say the step was skipped."""
  data = tiny_data(num_clients=4, seed=3)
  rows = np.concatenate([data.client_indices[c, : data.client_sizes[c]] for c in (2, 3)])
  x = data.x.copy()
  x[rows] = np.nan
  data = data._replace(x=x)
  algo = jaxfl.algorithms.fedavgm(client_lr=0.1, local_steps=2, batch_size=3)._replace(
      sampler=jaxfl.sampling.fixed_schedule([[0, 1], [2, 3], [0, 1]]))
  run = lambda r: jaxfl.simulate(algo, jaxfl.models.mlp((5,), 3, hidden=(4,)), data, rounds=r,
                                 clients_per_round=2, progress=False, check_data=False)
  one, two = run(1), run(2)
  assert [h["server_step_skipped"] for h in two.history] == [0.0, 1.0]
  assert two.history[1]["update_norm"] == 0.0
  for a, b in zip(jax.tree.leaves((one.state.params, one.state.opt_state)),
                  jax.tree.leaves((two.state.params, two.state.opt_state)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  three = run(3)  # the next round with participants moves the model again
  assert three.history[2]["server_step_skipped"] == 0.0 and three.history[2]["update_norm"] > 0


# ----------------------------------------------------------------------------- bad data


def _set(arr, index, value, dtype=None):
  arr = np.array(arr, dtype=dtype)
  arr[index] = value
  return arr


BAD_DATA = [
    ("x_test", lambda d, m: (d._replace(x_test=_set(d.x_test, 4, np.nan)), m),
     r"`data.x_test`\[4\] has non-finite"),
    ("x", lambda d, m: (d._replace(x=_set(d.x, int(d.client_indices[1, 0]), np.inf)), m),
     r"`data.x`\[\d+\] has non-finite"),
    ("y range", lambda d, m: (d._replace(y=_set(d.y, 7, 5)), m), r"`data.y`\[7\] = 5 is outside"),
    ("y_test range", lambda d, m: (d._replace(y_test=_set(d.y_test, 2, -1)), m),
     r"`data.y_test`\[2\] = -1 is outside"),
    ("float labels", lambda d, m: (d._replace(y=d.y.astype(np.float32)), m),
     r"`data.y` must hold integer class ids"),
    ("x/y rows", lambda d, m: (d._replace(y=d.y[:-1]), m), r"`data.x` has \d+ rows but `data.y`"),
    ("test x/y rows", lambda d, m: (d._replace(y_test=d.y_test[:-2]), m),
     r"`data.x_test` has 20 rows but `data.y_test` has 18"),
    ("index past end", lambda d, m: (d._replace(
        client_indices=_set(d.client_indices, (1, 0), 10**6)), m),
     r"`data.client_indices`\[1, 0\] = 1000000 is outside `data.x`"),
    ("sizes past columns", lambda d, m: (d._replace(
        client_sizes=_set(d.client_sizes, 2, d.max_client_size + 1)), m),
     r"`data.client_sizes`\[2\]"),
    ("test shape", lambda d, m: (d._replace(x_test=d.x_test[:, :4]), m),
     r"`data.x_test` examples have shape \(4,\)"),
    ("model width", lambda d, m: (d, jaxfl.models.mlp((5,), 4)), r"outputs 4 logits .* 3 classes"),
]


@pytest.mark.parametrize("case", range(len(BAD_DATA)), ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_refused_naming_the_array_and_index_before_any_compile(case, monkeypatch):
  _, corrupt, match = BAD_DATA[case]
  data, model = corrupt(tiny_data(), jaxfl.models.mlp((5,), 3))
  compiled = []
  real_jit = jax.jit
  monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1) or real_jit(*a, **k))
  with pytest.raises(ValueError, match=match):
    jaxfl.simulate(jaxfl.algorithms.fedavg(local_steps=1), model, data, rounds=1,
                   clients_per_round=2, progress=False)
  assert not compiled


# ----------------------------------------------------------------------------- resume checks


def _ckpt_run(tmp_path, rounds=2, *, lr=0.1, data=None, model=None, **kw):
  algo = jaxfl.algorithms.fedavg(client_lr=lr, local_steps=2, batch_size=3)
  kw.setdefault("clients_per_round", 3)
  return jaxfl.simulate(algo, model or jaxfl.models.mlp((5,), 3, hidden=(7,)),
                        data or tiny_data(), rounds=rounds, progress=False,
                        checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1, **kw)


@pytest.mark.parametrize("change,match", [
    (dict(lr=0.2), r"hyperparameters.client_lr: 0.1 -> 0.2"),
    (dict(seed=1), r"seed: 0 -> 1"),
    (dict(clients_per_round=2), r"clients_per_round: 3 -> 2"),
    (dict(data=tiny_data(seed=5)), r"data\.(labels|partition)"),
    (dict(model=jaxfl.models.mlp((5,), 3, hidden=(9,))), r"model\.(params|shapes)"),
], ids=["client_lr", "seed", "cohort", "data", "model width"])
def test_resume_with_another_configuration_is_refused(tmp_path, change, match):
  _ckpt_run(tmp_path)
  with pytest.raises(ValueError, match=rf"`checkpoint_dir`=.*ckpt.*another configuration.*{match}"):
    _ckpt_run(tmp_path, rounds=4, **change)
  assert sorted(os.listdir(tmp_path / "ckpt")) == [
      "round_000001", "round_000001.history.json", "round_000002", "round_000002.history.json"]


def test_allowed_config_change_is_recorded_and_fewer_rounds_refused(tmp_path):
  _ckpt_run(tmp_path)
  with pytest.raises(ValueError, match=r"`rounds`=1 is below the 2 rounds already"):
    _ckpt_run(tmp_path, rounds=1)
  res = _ckpt_run(tmp_path, rounds=3, lr=0.2, allow_config_change=True)
  assert len(res.history) == 3 and res.history[2]["config_changed"] == 1.0
  assert "config_changed" not in res.history[1]
  assert any("client_lr" in f for f in res.summary["config_changes"][0]["fields"])


def test_a_directory_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path):
  import socket
  import subprocess
  import sys

  out = tmp_path / "out"
  out.mkdir()
  owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (out / ".jaxfl.lock").write_text(json.dumps({"pid": owner.pid,
                                                 "host": socket.gethostname()}))
    with pytest.raises(RuntimeError, match=rf"`output_dir`=.* in use by another run \(pid "
                                           rf"{owner.pid}"):
      jaxfl.simulate(jaxfl.algorithms.fedavg(local_steps=1), jaxfl.models.mlp((5,), 3),
                     tiny_data(), rounds=1, clients_per_round=2, progress=False,
                     output_dir=str(out))
  finally:
    owner.kill()
    owner.wait()
  with pytest.warns(UserWarning, match=rf"stale lock of dead process {owner.pid}"):
    jaxfl.simulate(jaxfl.algorithms.fedavg(local_steps=1), jaxfl.models.mlp((5,), 3),
                   tiny_data(), rounds=1, clients_per_round=2, progress=False,
                   output_dir=str(out))
  assert not (out / ".jaxfl.lock").exists()  # released when the run ends
  assert (out / "history.json").exists()


def _files(path):
  if os.path.isfile(path):
    return [path]
  return [os.path.join(root, f) for root, _, files in os.walk(path) for f in files]


def _truncate(path):
  for p in _files(path):
    with open(p, "r+b") as fh:
      fh.truncate(os.path.getsize(p) // 2)


def _zero(path):
  for p in _files(path):
    size = os.path.getsize(p)
    with open(p, "wb") as fh:
      fh.write(b"\0" * size)


CORRUPTIONS = {
    "truncated state": (lambda d: _truncate(d / "round_000004"), "round_000004", 2),
    "zeroed state": (lambda d: _zero(d / "round_000004"), "round_000004", 2),
    "truncated history": (lambda d: _truncate(d / "round_000004.history.json"), "round_000004",
                          2),
    "stray empty dir": (lambda d: (d / "round_000006").mkdir(), "round_000006 (uncommitted", 4),
    "non-numeric name": (lambda d: (d / "round_latest").mkdir(), "round_latest (not a round", 4),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, kind):
  corrupt, named, resumed_from = CORRUPTIONS[kind]
  data, model = tiny_data(seed=4), jaxfl.models.mlp((5,), 3, hidden=(7,))
  algo = jaxfl.algorithms.fedavgm(client_lr=0.1, local_steps=2, batch_size=3)
  run = lambda r, d: jaxfl.simulate(algo, model, data, rounds=r, clients_per_round=3,
                                    progress=False, checkpoint_dir=d, checkpoint_every=2)
  reference = run(6, None)
  ckpt = tmp_path / "ckpt"
  run(4, str(ckpt))
  corrupt(ckpt)
  with pytest.warns(UserWarning, match=rf"skipped .*{re.escape(named)}.*resuming from round "
                                       rf"{resumed_from}"):
    res = run(6, str(ckpt))
  assert res.history == reference.history
  for a, b in zip(jax.tree.leaves(res.state), jax.tree.leaves(reference.state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- processes

_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
from conftest import tiny_data
import jaxfl
out, ckpt, rounds = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
algo = jaxfl.algorithms.fedavgm(client_lr=0.1, local_steps=2, batch_size=3)
res = jaxfl.simulate(algo, jaxfl.models.mlp((5,), 3, hidden=(7,)), tiny_data(8, seed=6),
                     rounds=rounds, clients_per_round=3, progress=False, checkpoint_dir=ckpt,
                     checkpoint_every=1, output_dir=out)
np.savez(out + "/final.npz", *[np.asarray(x) for x in jax.tree.leaves(res.state)])
"""


def _script(tmp_path):
  path = tmp_path / "run.py"
  path.write_text(_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
  return path


def _committed(ckpt):
  return len([f for f in os.listdir(ckpt) if f.endswith(".history.json")]) if ckpt.exists() else 0


@pytest.mark.slow
def test_sigkill_after_checkpoints_and_during_saves_then_resume_is_bit_identical(tmp_path):
  import subprocess
  import sys
  import time

  script, rounds = _script(tmp_path), 30
  ref, out, ckpt = tmp_path / "ref", tmp_path / "out", tmp_path / "ckpt"
  subprocess.run([sys.executable, script, str(ref), "", str(rounds)], check=True)
  rng = np.random.default_rng(0)
  kills = 0
  for _ in range(4):  # killed at a random moment after a new checkpoint: mostly mid-save
    before = _committed(ckpt)
    proc = subprocess.Popen([sys.executable, script, str(out), str(ckpt), str(rounds)],
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None and _committed(ckpt) <= before:
      time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.1))
    if proc.poll() is None:
      proc.kill()
      kills += 1
    proc.wait()
  assert kills >= 3, "the run finished before it could be killed"
  subprocess.run([sys.executable, script, str(out), str(ckpt), str(rounds)], check=True,
                 stderr=subprocess.DEVNULL)
  assert (out / "history.json").read_bytes() == (ref / "history.json").read_bytes()
  a, b = np.load(out / "final.npz"), np.load(ref / "final.npz")
  assert a.files == b.files
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow
def test_two_runs_on_one_directory_the_second_is_refused(tmp_path):
  import subprocess
  import sys
  import time

  script, out = _script(tmp_path), tmp_path / "out"
  first = subprocess.Popen([sys.executable, script, str(out), str(tmp_path / "c1"), "100000"],
                           stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while not (out / ".jaxfl.lock").exists() and time.time() < deadline:
      time.sleep(0.05)
    second = subprocess.run([sys.executable, script, str(out), str(tmp_path / "c2"), "2"],
                            capture_output=True, text=True)
    assert second.returncode != 0
    assert f"in use by another run (pid {first.pid}" in second.stderr
    assert first.poll() is None  # the first run is untouched
  finally:
    first.kill()
    first.wait()
