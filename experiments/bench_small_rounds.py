"""Issue 20's small rounds: jaxfl's round against the lean sequential loop, MLP and CNN, 10 and
100 clients per round, 1 and 2 XLA CPU devices.

Each cell is one ``bench_round.py --workload digits10`` process (the digits training set
repeated 10 times, 100 clients, Dirichlet 0.5, 5 local steps of batch 32, plain FedAvg), in
which the two simulators' rounds are timed interleaved; a cell runs ``--repeats`` times (fresh
processes, cells in rotating order) and the table gives the median ratio and its spread over
the repeats. Ratio = jaxfl's time per round / the lean loop's (the faster of its two XLA
builds); < 1 means jaxfl is faster.

Two timing modes, reported as separate rows (column ``block``):

* ``block`` 1: round by round, the two simulators alternating every round. Each jaxfl round
  then starts after ~one loop round of idle device threads.
* ``block`` K > 1 (``--block K``): K rounds back to back per simulator, blocks alternating;
  jaxfl's rounds dispatched as ``jaxfl.simulate`` runs them (round r + 1 queued before round
  r's metrics are read). This is how either simulator runs a study.

On a VM, an idle multi-device round pays a wake-up at every hand-off between threads, so mode 1
charges jaxfl's 2-device rounds for the interleaving itself (BUILD.md "Performance notes").

  python experiments/bench_small_rounds.py --repeats 5 --rounds 10
  python experiments/bench_small_rounds.py --repeats 3 --rounds 30 --block 10
  python experiments/bench_small_rounds.py --report-only

Results: ``experiments/results/bench_small_rounds.{json,md}``, the per-run rows under
``experiments/results/bench_small_rounds/``.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys

from _common import RESULTS, command_line, md_table, read_json, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
CELLS = [(model, cohort, devices) for model in ("mlp", "small_cnn") for cohort in (10, 100)
         for devices in (1, 2)]


def cell_path(out: str, model: str, cohort: int, devices: int, rep, block: int = 1) -> str:
  mode = "" if block == 1 else f"_b{block}"
  return os.path.join(out, f"{model}_c{cohort}_{devices}dev{mode}_r{rep}.json")


def _blocks(out: str) -> list[int]:
  """The block sizes with runs under ``out`` (1 = round by round)."""
  found = {1}
  for path in glob.glob(os.path.join(out, "*_b*_r*.json")):
    found.add(int(os.path.basename(path).rsplit("_b", 1)[1].split("_r", 1)[0]))
  return sorted(found)


def report(out: str, command: str, out_dir: str) -> dict:
  rows = []
  for block in _blocks(out):
    for model, cohort, devices in CELLS:
      runs = [read_json(p) for p in sorted(glob.glob(cell_path(out, model, cohort, devices, "*",
                                                                block)))]
      if runs:
        rows.append(_row(model, cohort, devices, block, runs))
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  table = md_table(["model", "cohort", "devices", "block", "runs", "jaxfl_s", "loop_s", "ratio",
                    "ratio_min", "ratio_max", "compile_s", "loop_first_round_s"], rows, fmt=fmt)
  md = ("# Small rounds: jaxfl vs the lean sequential loop (issue 20)\n\n"
        "digits x10 (14,370 examples), 100 clients, Dirichlet 0.5, 5 local steps of batch 32, "
        "FedAvg. ratio = jaxfl s/round / loop s/round (median over runs; each run the median "
        "of its interleaved rounds, or of its interleaved blocks / block); < 1: jaxfl faster. "
        "block 1: the simulators alternate every round; block K: K rounds back to back each "
        "(jaxfl's dispatched as jaxfl.simulate does), blocks alternating. compile_s: jaxfl's "
        "round; loop_first_round_s: the loop's first round (its compiles included).\n\n"
        + table + "\n\nRuns: `python experiments/bench_small_rounds.py --repeats 5 --rounds 10` "
        "(block 1) and `python experiments/bench_small_rounds.py --repeats 3 --rounds 30 "
        "--block 10` (block 10); the per-run rows are in `bench_small_rounds/`.\n")
  res = {"rows": rows}
  write_results(out_dir, "bench_small_rounds", command=command, data=res, md=md)
  print(table)
  return res


def _row(model: str, cohort: int, devices: int, block: int, runs: list[dict]) -> dict:
  ratio = [r["vectorized_s_per_round"] / r["sequential_s_per_round"] for r in runs]
  return {
    "model": model, "cohort": cohort, "devices": devices, "block": block,
    "runs": len(runs),
    "jaxfl_s": statistics.median(r["vectorized_s_per_round"] for r in runs),
    "loop_s": statistics.median(r["sequential_s_per_round"] for r in runs),
    "ratio": statistics.median(ratio), "ratio_min": min(ratio), "ratio_max": max(ratio),
    "compile_s": statistics.median(r["compile_s"] for r in runs),
    "loop_first_round_s": statistics.median(
        min(r["sequential_first_round_s"].values()) for r in runs),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--rounds", type=int, default=15, help="timed rounds per simulator per run")
  p.add_argument("--block", type=int, default=1,
                 help="rounds per timed block (bench_round.py --block); 1 = round by round")
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--out-dir", default=RESULTS)
  args = p.parse_args(argv)
  out = os.path.join(args.out_dir, "bench_small_rounds")
  os.makedirs(out, exist_ok=True)
  command = command_line(__file__, argv, drop={"--report-only": 0})
  if not args.report_only:
    for rep in range(args.repeats):
      k = rep % len(CELLS)
      for model, cohort, devices in CELLS[k:] + CELLS[:k]:
        path = cell_path(out, model, cohort, devices, rep, args.block)
        if os.path.exists(path):
          continue
        subprocess.run([sys.executable, os.path.join(HERE, "bench_round.py"), "--workload",
                        "digits10", "--model", model, "--cohort", str(cohort), "--devices",
                        str(devices), "--rounds", str(args.rounds), "--block", str(args.block),
                        "--json", path], check=True)
  report(out, command, args.out_dir)


if __name__ == "__main__":
  main()
