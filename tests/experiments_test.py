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


def _common():
  """experiments/_common.py, the scripts' shared helpers (imported as the scripts do)."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import _common

  return _common


def test_md_table_formats_sequences_and_mappings():
  c = _common()
  fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
  assert c.md_table(["a", "b"], [[1, 0.5], {"b": 2.0, "a": "x"}], fmt) == (
      "| a | b |\n|---|---|\n| 1 | 0.50 |\n| x | 2.00 |")
  assert c.md_table(["only"], []) == "| only |\n|---|"


def test_command_line_is_relative_to_the_root_and_drops_pacing_flags():
  c = _common()
  script = os.path.join(ROOT, "experiments", "x.py")
  assert c.command_line(script, ["--a", "1", "--m", "f,g+h"]) == (
      "python experiments/x.py --a 1 --m f,g+h")
  assert c.command_line(script, ["--report-only", "--max-minutes", "5", "--max-minutes=3", "--b"],
                        drop={"--report-only": 0, "--max-minutes": 1}) == (
      "python experiments/x.py --b")
  assert c.command_line(script, ["--name", "a b"]) == "python experiments/x.py --name 'a b'"


def test_write_results_records_the_command_in_every_file(tmp_path):
  c = _common()
  cmd = "python experiments/x.py --quick"
  paths = c.write_results(str(tmp_path / "out"), "res", command=cmd, data={"acc": 0.5},
                          md="# title\n\n" + c.md_table(["m"], [["fedavg"]]))
  assert set(paths) == {"json", "md"}
  assert json.load(open(paths["json"])) == {"acc": 0.5, "command": cmd}
  md = open(paths["md"]).read()
  assert md == f"# title\n\n| m |\n|---|\n| fedavg |\n\nCommand: `{cmd}`\n"
  # a list is written as it is; a Markdown text that holds the command is not changed
  rows = [{"method": "fedavg", "final_acc": 0.25}]
  paths = c.write_results(str(tmp_path), "rows", command=cmd, data=rows,
                          md=f"Command: `{cmd}`\n")
  assert json.load(open(paths["json"])) == rows
  assert open(paths["md"]).read() == f"Command: `{cmd}`\n"
  assert not list(tmp_path.glob("**/*.tmp"))  # written through a temporary file, renamed


def test_accuracy_plot_of_one_run_and_of_seeds(tmp_path):
  pytest.importorskip("matplotlib")
  c = _common()
  hist = [{"round": r, "uplink_bytes": 1e6, **({"test_accuracy": r / 10} if r % 2 == 0 else {})}
          for r in range(1, 7)]
  assert c.accuracy_curve(hist) == ([2, 4, 6], [0.2, 0.4, 0.6])
  assert c.accuracy_curve(hist, x="uplink_bytes") == ([2.0, 4.0, 6.0], [0.2, 0.4, 0.6])
  paths = c.write_results(str(tmp_path), "curves", command="python experiments/x.py",
                          plot=lambda p: c.save_accuracy_plot(p, {"one": hist,
                                                                  "seeds": [hist, hist]},
                                                              x="uplink_bytes"))
  assert os.path.getsize(paths["png"]) > 1000


def test_timing_helpers_time_every_call_in_order():
  c = _common()
  calls = []
  times = c.interleaved_times({"a": lambda r: calls.append(("a", r)),
                               "b": lambda r: calls.append(("b", r))}, 3, rotate=True)
  assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
  assert [len(v) for v in times.values()] == [3, 3] and min(times["a"] + times["b"]) >= 0
  carry, ts = c.carry_times(lambda x: x + 1, 0, 4, warmup=2)
  assert carry == 6 and len(ts) == 4
  seen = []
  assert len(c.repeat_times(seen.append, 3, warmup=1)) == 3 and seen == [0, 0, 1, 2]
  out, secs = c.timed(lambda a, b=0: (a, b), 1, b=2)
  assert out == (1, 2) and secs >= 0
