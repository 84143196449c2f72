"""The paper-experiment scripts run end to end (CI-sized), and write the promised rows."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"method", "dataset", "rounds", "final_acc", "best_acc", "rel_uplink_cost",
            "uplink_bytes", "seed"}


def _run(args, tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "layerwise_comm.py"),
                         *args, "--out-dir", str(tmp_path)], capture_output=True, text=True,
                        timeout=1500, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_cifar10_resnet20_configuration_smoke_on_random_images(tmp_path):
  """The papers' CIFAR-10 / ResNet-20 preset on random images of the same shapes."""
  _run(["--config", "cifar10_resnet20", "--smoke", "--methods", "fedavg,fedlama,fedluar"],
       tmp_path)
  rows = json.load(open(tmp_path / "layerwise_comm_cifar10_resnet20_smoke.json"))
  assert [r["method"] for r in rows] == ["fedavg", "fedlama", "fedluar"]
  for r in rows:
    assert REQUIRED <= set(r) and 0.0 <= r["final_acc"] <= 1.0
  assert rows[0]["rel_uplink_cost"] == 1.0 and rows[2]["rel_uplink_cost"] < 1.0


@pytest.mark.slow
def test_digits_quick_comparison_writes_results(tmp_path):
  _run(["--dataset", "digits", "--quick", "--no-bench",
        "--methods", "fedavg,fedavg_2tau,fedlama,lbgm,prunefl"], tmp_path)
  rows = json.load(open(tmp_path / "layerwise_comm_digits_quick.json"))
  by = {r["method"]: r for r in rows}
  assert set(by) == {"fedavg", "fedavg_2tau", "fedlama", "lbgm", "prunefl"}
  for r in rows:
    assert REQUIRED <= set(r) and 0.0 <= r["best_acc"] <= 1.0
  assert by["fedavg_2tau"]["rel_uplink_cost"] == pytest.approx(0.5)
  assert by["lbgm"]["rel_uplink_cost"] < 1.0
  assert (tmp_path / "layerwise_comm_digits_quick.md").exists()


@pytest.mark.slow
def test_bench_round_writes_the_promised_fields(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_round.py"),
                         "--workload", "digits", "--cohort", "4", "--rounds", "2", "--devices",
                         "2", "--json", str(out)], capture_output=True, text=True, timeout=900,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  row = json.load(open(out))
  for k in ("workload", "cohort", "vectorized_s_per_round", "sequential_s_per_round", "speedup",
            "flop_bound_s_per_round", "x_of_bound", "compile_s", "devices", "jax_version"):
    assert k in row, k
  assert row["devices"] == 2 and row["cohort"] == 4
  assert row["speedup"] == pytest.approx(row["sequential_s_per_round"]
                                         / row["vectorized_s_per_round"])
  # the baseline is the faster of its two builds (jaxfl's XLA options, XLA's defaults)
  assert row["sequential_s_per_round"] == min(row["sequential_jaxfl_xla_s_per_round"],
                                              row["sequential_default_xla_s_per_round"])
  from jaxfl.xla_options import compiler_options
  assert row["vectorized_compiler_options"] == compiler_options("cpu", 2)
  assert row["sequential_compiler_options"] == compiler_options("cpu", 1)
  # XLA's FLOP count and the conv/dense formula agree to a few percent
  assert abs(row["flops_per_round"] / row["formula_flops_per_round"] - 1) < 0.1
