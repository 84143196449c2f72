"""The command line and the public API surface."""

import subprocess
import sys

import numpy as np

import jaxfl


def test_help_lists_algorithms_datasets_models():
  out = subprocess.run([sys.executable, "-m", "jaxfl", "--help"], capture_output=True, text=True,
                       check=True).stdout
  for name in ("fedavg", "fedadam", "digits", "fashion_mnist", "resnet20"):
    assert name in out


def test_run_command_writes_outputs(tmp_path):
  from jaxfl.cli import main
  rc = main(["run", "--dataset", "digits", "--model", "mlp", "--num-clients", "20",
             "--clients-per-round", "4", "--rounds", "2", "--eval-every", "1", "--out",
             str(tmp_path), "--no-progress"])
  assert rc == 0 and (tmp_path / "history.csv").exists()


def test_run_with_the_multi_metric_sampler_reports_its_diagnostics(tmp_path):
  import json

  from jaxfl.cli import main
  rc = main(["run", "--dataset", "digits", "--model", "mlp", "--num-clients", "20",
             "--clients-per-round", "4", "--rounds", "3", "--eval-every", "3", "--out",
             str(tmp_path), "--no-progress", "--sampler", "multi_metric", "--sampler-extra", "2"])
  assert rc == 0
  hist = json.loads((tmp_path / "history.json").read_text())
  assert [h["sampler/unseen_clients"] for h in hist] == [16.0, 12.0, 8.0]


def test_cli_defaults_to_the_library_chunking_and_reports_errors_in_one_line(tmp_path):
  base = [sys.executable, "-m", "jaxfl", "run", "--dataset", "digits", "--model", "mlp",
          "--num-clients", "20", "--rounds", "1", "--no-progress", "--cpu-devices", "1"]
  proc = subprocess.run(base + ["--clients-per-round", "30"], capture_output=True, text=True)
  assert proc.returncode == 2
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert lines[-1].startswith("jaxfl run: error: ") and "clients_per_round" in lines[-1]
  assert "Traceback" not in proc.stderr
  proc = subprocess.run(base + ["--clients-per-chunk", "0"], capture_output=True, text=True)
  assert proc.returncode == 2 and "clients-per-chunk" in proc.stderr
  from jaxfl.cli import _chunk_arg, main
  assert _chunk_arg("auto") == "auto" and _chunk_arg("all") is None and _chunk_arg("3") == 3
  assert main(["run", "--dataset", "digits", "--model", "mlp", "--num-clients", "20",
               "--clients-per-round", "4", "--rounds", "1", "--no-progress",
               "--out", str(tmp_path)]) == 0


def test_cli_persistent_compile_cache_is_reused_by_a_rerun(tmp_path):
  import os

  cache = tmp_path / "cache"
  cmd = [sys.executable, "-m", "jaxfl", "run", "--dataset", "digits", "--model", "mlp",
         "--num-clients", "20", "--clients-per-round", "4", "--rounds", "2", "--no-progress",
         "--cpu-devices", "1", "--compile-cache", str(cache)]
  # Cache every program, however fast it compiled, so the listing does not depend on load.
  env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  subprocess.run(cmd + ["--out", str(tmp_path / "a")], check=True, capture_output=True, env=env)
  first = sorted(os.listdir(cache))
  assert any(f.startswith("jit_step-") for f in first), first  # the round was cached
  subprocess.run(cmd + ["--out", str(tmp_path / "b")], check=True, capture_output=True, env=env)
  assert sorted(os.listdir(cache)) == first  # every program was a cache hit
  assert (tmp_path / "a" / "history.json").read_text() == (
      tmp_path / "b" / "history.json").read_text()


def test_every_public_name_imports():
  for mod in (jaxfl, jaxfl.data, jaxfl.models, jaxfl.algorithms, jaxfl.transforms, jaxfl.masks):
    for name in mod.__all__:
      assert getattr(mod, name) is not None, (mod.__name__, name)


def test_demo_writes_under_an_ignored_run_folder():
  import os

  from jaxfl.cli import DEMO_DIR
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  ignored = open(os.path.join(root, ".gitignore")).read().split()
  top = DEMO_DIR.split(os.sep)[0]
  assert not os.path.isabs(DEMO_DIR) and f"/{top}/" in ignored


def test_run_prism_trains_a_sliced_sub_model_and_refuses_a_dense_model(tmp_path, capsys):
  import json

  from jaxfl.cli import main
  base = ["run", "--dataset", "digits", "--num-clients", "12", "--clients-per-round", "3",
          "--rounds", "2", "--eval-every", "2", "--no-progress", "--algorithm", "prism",
          "--local-steps", "2", "--batch-size", "8"]
  assert main(base + ["--model", "prism_cnn", "--sliced", "--prism-sampling", "uniform",
                      "--out", str(tmp_path)]) == 0
  hist = json.loads((tmp_path / "history.json").read_text())
  assert len(hist) == 2 and all(np.isfinite(h["train_loss"]) for h in hist)
  assert "aggregator/coverage" in hist[-1]  # PriSM's per-round component coverage
  capsys.readouterr()
  assert main(base + ["--model", "mlp"]) == 2
  assert "needs an SVD-factorised model (--model prism_cnn" in capsys.readouterr().err


def test_run_embracingfl_by_module_shares_or_memory_budgets(tmp_path, capsys):
  import json

  from jaxfl.cli import main
  base = ["run", "--dataset", "digits", "--num-clients", "12", "--clients-per-round", "4",
          "--rounds", "2", "--eval-every", "2", "--no-progress", "--algorithm", "embracingfl",
          "--model", "small_cnn", "--local-steps", "2", "--batch-size", "8"]
  assert main(base + ["--out", str(tmp_path)]) == 0
  hist = json.loads((tmp_path / "history.json").read_text())
  assert len(hist) == 2 and all(np.isfinite(h["train_loss"]) for h in hist)
  assert 0 < hist[-1]["rel_uplink"] < 1  # weak clients upload their suffix only
  assert main(base + ["--embracing-budgets", "0.5", "1.0", "--embracing-ratios", "0.5",
                      "0.5"]) == 0
  capsys.readouterr()
  assert main(base + ["--embracing-budgets", "0.001", "1.0", "--embracing-ratios", "0.5",
                      "0.5"]) == 2
  assert "budget" in capsys.readouterr().err
  assert main(base + ["--embracing-ratios", "0.5", "0.5"]) == 2
  assert "--embracing-ratios" in capsys.readouterr().err


def test_run_heterofl_with_client_widths(tmp_path, capsys):
  import json

  from jaxfl.cli import main
  base = ["run", "--dataset", "digits", "--num-clients", "12", "--clients-per-round", "4",
          "--rounds", "2", "--eval-every", "2", "--no-progress", "--algorithm", "heterofl",
          "--model", "prism_cnn", "--local-steps", "2", "--batch-size", "8"]
  assert main(base + ["--out", str(tmp_path)]) == 0
  hist = json.loads((tmp_path / "history.json").read_text())
  assert len(hist) == 2 and all(np.isfinite(h["train_loss"]) for h in hist)
  assert 0 < hist[-1]["rel_uplink"] < 1  # narrow clients upload their sub-model only
  capsys.readouterr()
  assert main(base + ["--heterofl-widths", "0.5", "1.0"]) == 2
  assert "--heterofl-ratios" in capsys.readouterr().err
  assert main(base + ["--heterofl-widths", "0.0", "0.5", "1.0"]) == 2
  assert "--heterofl-widths" in capsys.readouterr().err
  fj = [a if a != "heterofl" else "fjord" for a in base]
  assert main(fj + ["--fjord-levels", "0.5", "1.0", "--heterofl-widths", "0.5", "0.5", "1.0"]) == 0
  capsys.readouterr()
  assert main(fj + ["--fjord-levels", "0.5", "1.0"]) == 2  # a 0.25 cap below every level
  assert "levels" in capsys.readouterr().err


def test_run_with_local_sam_wraps_the_client_optimizer(tmp_path, capsys):
  import json

  from jaxfl.cli import main
  base = ["run", "--dataset", "digits", "--num-clients", "12", "--clients-per-round", "4",
          "--rounds", "2", "--eval-every", "2", "--no-progress", "--model", "mlp",
          "--local-steps", "2", "--batch-size", "8"]
  outs = {}
  for name, extra in (("plain", []), ("sam", ["--local-sam-rho", "0.05"]),
                      ("lwsam", ["--local-sam-rho", "0.05", "--local-sam-layers", "1"])):
    assert main(base + extra + ["--out", str(tmp_path / name)]) == 0
    outs[name] = json.loads((tmp_path / name / "history.json").read_text())
    assert all(np.isfinite(h["train_loss"]) for h in outs[name])
  # the perturbation changes the trajectory, and perturbing one module differs from all
  assert outs["sam"][-1]["train_loss"] != outs["plain"][-1]["train_loss"]
  assert outs["lwsam"][-1]["train_loss"] != outs["sam"][-1]["train_loss"]
  capsys.readouterr()
  assert main(base + ["--local-sam-rho", "0.05", "--local-sam-layers", "0"]) == 2
  assert "--local-sam-layers" in capsys.readouterr().err


def test_run_pma_sends_one_group_per_round(tmp_path, capsys):
  """`--algorithm pma`: every client every round, groups from the traced depth order."""
  import json

  from jaxfl.cli import main
  base = ["run", "--dataset", "digits", "--num-clients", "6", "--clients-per-round", "6",
          "--rounds", "3", "--eval-every", "3", "--no-progress", "--model", "mlp",
          "--local-steps", "2", "--batch-size", "8", "--algorithm", "pma", "--pma-groups", "3"]
  assert main(base + ["--out", str(tmp_path / "pma")]) == 0
  hist = json.loads((tmp_path / "pma" / "history.json").read_text())
  np.testing.assert_allclose([h["rel_uplink"] for h in hist], [1 / 3] * 3, rtol=1e-3)
  capsys.readouterr()
  assert main(base[:6] + ["3"] + base[7:]) == 2  # a held cohort needs every client
  assert "clients_per_round == num_clients" in capsys.readouterr().err
