"""Multi-process runs through ``jaxfl.launch``: 2 local processes x 1 CPU device over loopback
(gloo collectives) equal one process with 2 forced host devices, and agree with 1 device.

The same script runs in both set-ups: a plain ``simulate`` call (the cohort split over the
global ``("clients",)`` mesh and fully vmapped, so the aggregation is one all-reduce, gloo
across processes, as on GPU where that is the default) with orbax checkpoints (coordinated
across processes) and outputs written by process 0 only. One compilation per set-up: on 2
busy cores each costs ~5 s.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import xla_env

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_data, tiny_model
    import jaxfl
    out = sys.argv[2]
    assert jax.device_count() == 2, jax.devices()
    data, model = tiny_data(num_clients=9, seed=3), tiny_model()
    algo = jaxfl.algorithms.fedavgm(client_lr=0.1, local_steps=3, batch_size=3, server_lr=0.5)

    def run(devices, tag):
      return jaxfl.simulate(algo, model, data, rounds=3, clients_per_round=4, seed=0,
                            eval_every=1, devices=devices, progress=True, clients_per_chunk=None,
                            checkpoint_dir=os.path.join(out, tag + "_ckpt"), checkpoint_every=2,
                            output_dir=os.path.join(out, tag + "_out"))

    def dump(res, tag):
      # Replicated global arrays: every process can read them; process 0 writes.
      params = {"/".join(map(str, p)): np.asarray(v)
                for p, v in jax.tree_util.tree_leaves_with_path(res.state.params)}
      if jax.process_index() == 0:
        np.savez(os.path.join(out, tag + ".npz"), **params)
        with open(os.path.join(out, tag + ".json"), "w") as f:
          json.dump(res.history, f)

    tag = f"p{jax.process_count()}"
    dump(run(None, tag), tag)
    if jax.process_count() == 1:
      dump(run(jax.devices()[:1], "d1"), "d1")
    print(f"DONE process {jax.process_index()}")
""")


def _env(devices=None):
  env = xla_env(devices)
  return {k: v for k, v in env.items() if not k.startswith("JAXFL_")}


def _load(out, tag):
  with np.load(out / f"{tag}.npz") as z:
    params = dict(z)
  return params, json.loads((out / f"{tag}.json").read_text())


def test_two_processes_equal_one_process(tmp_path):
  script = tmp_path / "fl_script.py"
  script.write_text(SCRIPT)
  here = os.path.dirname(__file__)
  multi = subprocess.run(
      [sys.executable, "-m", "jaxfl.launch", "--num-processes", "2", "--local-devices", "1",
       "--", str(script), here, str(tmp_path)],
      env=_env(), capture_output=True, text=True, timeout=300)
  log = multi.stdout[-3000:] + multi.stderr[-3000:]
  assert multi.returncode == 0, log
  # output of each process is prefixed; both finished; only process 0 drew the progress bar
  assert "[0] DONE process 0" in multi.stdout and "[1] DONE process 1" in multi.stdout, log
  assert "[0] fedavgm" in multi.stderr and "[1] fedavgm" not in multi.stderr, log
  single = subprocess.run(
      [sys.executable, str(script), here, str(tmp_path)],
      env=_env(devices=2), capture_output=True,
      text=True, timeout=300)
  assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

  p2, h2 = _load(tmp_path, "p2")
  p1, h1 = _load(tmp_path, "p1")
  d1, hd = _load(tmp_path, "d1")
  # Bitwise: the same partitioned program on the same per-device inputs, and its one
  # cross-device all-reduce sums 2 operands (order-free in IEEE arithmetic), so gloo must
  # reproduce the in-process collective exactly.
  assert p2.keys() == p1.keys() and len(p2) >= 4
  for k in p2:
    np.testing.assert_array_equal(p2[k], p1[k], err_msg=k)
  assert h2 == h1 and [h["round"] for h in h2] == [1, 2, 3]
  # 1 device: the same maths compiled without partitioning, so equal up to float
  # reassociation only.
  for k in p2:
    np.testing.assert_allclose(p2[k], d1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_allclose([h["train_loss"] for h in h2], [h["train_loss"] for h in hd],
                             rtol=1e-5)
  # process 0 wrote the outputs; the checkpoints at rounds 2 and 3 are complete
  assert json.loads((tmp_path / "p2_out" / "history.json").read_text()) == h2
  assert sorted(p.name for p in (tmp_path / "p2_ckpt").iterdir() if "." not in p.name) == [
      "round_000002", "round_000003"]
  saved = json.loads((tmp_path / "p2_ckpt" / "round_000003.history.json").read_text())
  assert saved["history"] == h2 and saved["fingerprint"]["clients_per_round"] > 0


def test_launcher_rejects_bad_input(monkeypatch, capsys):
  from jaxfl import launch

  # All rejected before jax.distributed is touched, so in-process is safe.
  for args, env, needle in (
      (["--num-processes", "0", "--", "run"], {}, "--num-processes must be >= 1, got 0"),
      (["--num-processes", "2"], {}, "no command"),
      (["--num-processes", "2", "--process-id", "2", "--coordinator", "127.0.0.1:1", "--",
        "run"], {}, "--process-id must be in [0, 2), got 2"),
      (["--num-processes", "2", "--process-id", "0", "--", "run"], {}, "--coordinator"),
      (["--num-processes", "2", "--coordinator", "nohostport", "--", "run"], {},
       "--coordinator must be HOST:PORT"),
      (["--", "run"], {"JAXFL_PROCESS_ID": "x"}, "JAXFL_PROCESS_ID must be an int")):
    with monkeypatch.context() as m:
      for k, v in env.items():
        m.setenv(k, v)
      with pytest.raises(SystemExit) as exc:
        launch.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err, (args, err)


def test_child_failure_propagates(tmp_path):
  script = tmp_path / "fail.py"
  script.write_text("import jax, sys\nsys.exit(3 if jax.process_index() == 1 else 0)\n")
  proc = subprocess.run([sys.executable, "-m", "jaxfl.launch", "--num-processes", "2", "--",
                         str(script)], env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_command_dispatch(tmp_path, monkeypatch, capsys):
  from jaxfl import launch

  monkeypatch.setattr(sys, "argv", list(sys.argv))  # run_command sets sys.argv
  assert launch.run_command(["jaxfl", "list"]) == 0
  assert "fedavg" in capsys.readouterr().out
  script = tmp_path / "echo_args.py"
  script.write_text("import sys\nprint('ARGS', sys.argv[1:], __name__)\n")
  assert launch.run_command([str(script), "a", "--b"]) == 0
  assert "ARGS ['a', '--b'] __main__" in capsys.readouterr().out
  with pytest.raises(ValueError, match="No command"):
    launch.run_command(["jaxfl"])
