"""Benchmark: a user's own stock-Flax CNN through ``from_linen`` vs the same network built from
``jaxfl.models.Conv`` / ``max_pool``, in the same compiled round, side by side.

Three builds of one architecture (SmallCNN: conv3x3-16, conv3x3-32, maxpool2, dense 64,
dense 10) on digits, 100 clients (Dirichlet 0.5), FedAvg, 5 local steps of batch 32:

* ``jaxfl``: ``jaxfl.models.small_cnn`` (jaxfl's conv and pool layers);
* ``stock``: the same network written with ``nn.Conv`` / ``nn.max_pool``, wrapped by
  ``from_linen`` (its default ``fast_layers=True`` reroutes them to jaxfl's lowerings);
* ``stock, fast_layers=False``: what a user got before (Flax's lowerings).

Rounds of the three are interleaved (rotating order) and the median of ``--reps`` rounds is
reported with each build's time divided by ``jaxfl``'s. Each device count runs in its own
process (XLA's CPU device count is fixed at start-up)::

  python experiments/bench_own_model.py --devices 1 2 --cohorts 10 100 \\
      --json experiments/results/bench_own_model.json --md experiments/results/bench_own_model.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from _common import command_line, md_table, write_json, write_text  # noqa: E402


def _one(devices: int, cohort: int, reps: int) -> dict:
  import jaxfl

  jaxfl.set_cpu_devices(devices)
  import flax.linen as nn
  import jax
  import numpy as np
  from _common import interleaved_times, timed

  from jaxfl.data import device_data
  from jaxfl.round import build_round

  class StockSmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(16, (3, 3))(x))
      x = nn.relu(nn.Conv(32, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = nn.relu(nn.Dense(64)(x.reshape((x.shape[0], -1))))
      return nn.Dense(10)(x)

  data = jaxfl.data.load("digits", 100, jaxfl.data.dirichlet(0.5), seed=0)
  shape = data.example_shape
  models = {
      "jaxfl": jaxfl.models.small_cnn(shape, data.num_classes),
      "stock": jaxfl.models.from_linen(StockSmallCNN(), shape),
      "stock, fast_layers=False": jaxfl.models.from_linen(StockSmallCNN(), shape,
                                                          fast_layers=False),
  }
  algo = jaxfl.algorithms.fedavg(client_lr=0.05, batch_size=32, local_steps=5)
  mesh = jaxfl.sharding.client_mesh(jax.devices()[:devices]) if devices > 1 else None
  dd = device_data(data, mesh)
  steps, states, compile_s = {}, {}, {}
  for name, model in models.items():
    rnd = build_round(algo, model, num_clients=data.num_clients,
                      max_client_size=data.max_client_size, clients_per_round=cohort, mesh=mesh)
    state = jaxfl.sharding.put_replicated(
        jax.tree.map(np.asarray, rnd.init(jax.random.key(0))), mesh)
    compiled, compile_s[name] = timed(lambda rnd=rnd, state=state: rnd.step.lower(
        state, dd, jax.random.key(1)).compile())
    steps[name], states[name] = rnd.step, state

  def runner(name):
    def run(i):
      states[name], m = steps[name](states[name], dd, jax.random.fold_in(jax.random.key(1), i))
      return jax.block_until_ready(m)
    return run

  runners = {n: runner(n) for n in models}
  for run in runners.values():  # warm-up: first executions, allocator
    run(10**6), run(10**6 + 1)
  times = interleaved_times(runners, reps, rotate=True)
  med = {n: float(np.median(t)) for n, t in times.items()}
  return {"devices": devices, "cohort": cohort, "reps": reps,
          "seconds_per_round": med, "compile_seconds": compile_s,
          "ratio_to_jaxfl": {n: med[n] / med["jaxfl"] for n in med},
          "spread": {n: [float(np.percentile(t, 25)), float(np.percentile(t, 75))]
                     for n, t in times.items()}}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, nargs="+", default=[1, 2])
  p.add_argument("--cohorts", type=int, nargs="+", default=[10, 100])
  p.add_argument("--reps", type=int, default=15)
  p.add_argument("--json", default=None)
  p.add_argument("--md", default=None)
  p.add_argument("--child", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(_one(*args.child, args.reps)))
    return
  rows = []
  for d in args.devices:
    for c in args.cohorts:
      out = subprocess.run([sys.executable, __file__, "--child", str(d), str(c), "--reps",
                            str(args.reps)], check=True, capture_output=True, text=True)
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
      r = rows[-1]["ratio_to_jaxfl"]
      print(f"devices {d} cohort {c}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()),
            flush=True)
  command = command_line("experiments/bench_own_model.py", argv)
  result = {"command": command, "rows": rows}
  if args.json:
    write_json(args.json, result)
  if args.md:
    names = list(rows[0]["ratio_to_jaxfl"])
    table = md_table(
        ["devices", "clients / round"] + [f"{n}: s/round (x jaxfl)" for n in names]
        + ["compile s (jaxfl / stock)"],
        [[r["devices"], r["cohort"]]
         + [f"{r['seconds_per_round'][n]:.4f} ({r['ratio_to_jaxfl'][n]:.2f}x)" for n in names]
         + [f"{r['compile_seconds']['jaxfl']:.1f} / {r['compile_seconds']['stock']:.1f}"]
         for r in rows])
    write_text(args.md, "# Own stock-Flax CNN vs jaxfl layers, same round\n\n"
               f"Command: `{command}`\n\n{table}\n\nMedian of {args.reps} interleaved rounds "
               "per build (rotating order), 2-core CPU; ratios are the build's time / jaxfl's "
               "in the same process.\n")


if __name__ == "__main__":
  main()
