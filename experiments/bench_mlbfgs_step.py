"""Per-step cost of mL-BFGS against AdamW (issue 17, item 4), measured side by side.

For each workload the script builds one jitted, state-donated training step per optimizer
(gradient + ``tx.update`` + ``apply_updates``, as in training) and one update-only step (the
optimizer alone, on a fixed gradient), runs every mL-BFGS state past ``2 T`` steps so that the
L-BFGS direction is active, and then

* reads XLA's ``cost_analysis()`` of each compiled step (flops, bytes accessed) and counts the
  kernels (fusions, dots, copies, custom calls, conditionals) in the optimised HLO;
* times them interleaved in one process (rotating order, the same number of repetitions each):
  median and mean (the mean includes the pair-extraction step every ``T`` steps), and times
  ``K`` update steps inside one jitted ``lax.scan`` (``scan``: the optimizer's device cost
  without the per-call dispatch, as in the FL engine's local steps).

``step / AdamW (derived)`` = (AdamW step + this update - AdamW update) / AdamW step: the step
ratio from the less noisy update timings (the gradient is the same computation for every
optimizer). Absolute times are noisy on the shared 2-core dev box; read the ratios.

``--baseline-dir DIR`` adds ``mlbfgs@before`` / ``mlbfgs_blocks@before``: the same optimizers
from another copy of ``_mlbfgs.py`` and ``_mlbfgs_two_loop.py`` (e.g. the files before a
change, ``git show <commit>:jaxfl/transforms/_mlbfgs.py``), timed in the same process.

Workloads (the two of ``mlbfgs_benchmark.py``):
  logreg  softmax regression + L2 on sklearn digits (650 parameters), batch 64, T = 10;
  cnn     ``jaxfl.models.cnn(dense=128)`` on Fashion-MNIST (454,922 parameters), batch 128,
          T = 20.
Optimizers: AdamW, SGD + momentum 0.9, mL-BFGS with one block (``mlbfgs``) and mL-BFGS with
one block per top-level layer (``mlbfgs_blocks``), M = 10.

Results accumulate under a label in ``experiments/results/bench_mlbfgs_step.json`` (one entry
per ``--label``) and the Markdown table ``bench_mlbfgs_step.md`` shows every label.

Usage::

  python experiments/bench_mlbfgs_step.py                            # both workloads
  python experiments/bench_mlbfgs_step.py --baseline-dir /tmp/old_mlbfgs --label before_after
  python experiments/bench_mlbfgs_step.py --workloads logreg --reps 300
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
import types

from _common import RESULTS, command_line, interleaved_times, md_table, write_json, write_text

OPTIMIZERS = ("adamw", "sgd", "mlbfgs", "mlbfgs_blocks")
WORKLOADS = {"logreg": dict(batch=64, update_every=10, reps=600, reps_update=1000, scan=1000,
                        reps_scan=15),
             "cnn": dict(batch=128, update_every=20, reps=40, reps_update=200, scan=20,
                         reps_scan=7)}
BASELINE = {}  # "mlbfgs@before" -> the module loaded from --baseline-dir


def load_baseline(directory: str):
  """``_mlbfgs.py`` of ``directory`` as a module, importing its ``_mlbfgs_two_loop.py``."""
  spec = importlib.util.spec_from_file_location(
      "_baseline_mlbfgs_two_loop", os.path.join(directory, "_mlbfgs_two_loop.py"))
  two_loop = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(two_loop)
  sys.modules["_baseline_mlbfgs_two_loop"] = two_loop
  with open(os.path.join(directory, "_mlbfgs.py")) as f:
    src = f.read().replace("from jaxfl.transforms._mlbfgs_two_loop import",
                           "from _baseline_mlbfgs_two_loop import")
  mod = types.ModuleType("_baseline_mlbfgs")
  exec(compile(src, os.path.join(directory, "_mlbfgs.py"), "exec"), mod.__dict__)
  return mod


def workload(name: str):
  """(loss_fn(params, x, y), params, x batch, y batch) of a workload."""
  import jax
  import jax.numpy as jnp
  import optax

  import jaxfl.data
  import jaxfl.models

  xent = lambda logits, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  bs = WORKLOADS[name]["batch"]
  if name == "logreg":
    ds = jaxfl.data.load_digits()
    x = jnp.asarray(ds.x_train.reshape(len(ds.x_train), -1)[:bs])
    y = jnp.asarray(ds.y_train[:bs])
    params = {"w": jnp.zeros((x.shape[1], 10)), "b": jnp.zeros(10)}
    loss = lambda p, xb, yb: xent(xb @ p["w"] + p["b"], yb) + 5e-4 * jnp.sum(p["w"] ** 2)
    return loss, params, x, y
  ds = jaxfl.data.load_fashion_mnist()
  model = jaxfl.models.cnn((28, 28, 1), 10, dense=128)
  params, mstate = model.init(jax.random.key(0))
  loss = lambda p, xb, yb: xent(model.apply(p, mstate, xb, train=True)[0], yb)
  return loss, params, jnp.asarray(ds.x_train[:bs]), jnp.asarray(ds.y_train[:bs])


def make_tx(name: str, params, update_every: int):
  import optax

  from jaxfl import transforms as M

  kw = dict(update_every=update_every, history=10, beta_p=0.99, beta_g=0.99,
            pair_momentum=0.9, damping=0.01)
  if name == "adamw":
    return optax.adamw(1e-3, weight_decay=1e-4)
  if name == "sgd":
    return optax.sgd(0.01, momentum=0.9)
  base, _, version = name.partition("@")
  lib = BASELINE[version] if version else M
  if base == "mlbfgs":
    return lib.mlbfgs(0.01, None, **kw)
  if base == "mlbfgs_blocks":
    return lib.mlbfgs(0.01, M.top_level_block_labels(params), **kw)
  raise ValueError(name)


def hlo_counts(text: str) -> dict:
  """Kernels in an optimised HLO module (all computations, branches included)."""
  ops = re.findall(r" ([a-z][\w-]*)\(", "\n".join(ln.split(", metadata=")[0] for ln in text.split("\n") if " = " in ln))
  count = lambda *names: sum(ops.count(n) for n in names)
  return {"fusions": count("fusion"), "dots": count("dot"), "copies": count("copy"),
          "custom_calls": count("custom-call"), "conditionals": count("conditional"),
          "while_loops": count("while"), "instructions": len(ops)}


def cost(compiled) -> dict:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  out = {k: float(ca.get(k, 0.0)) for k in ("flops", "bytes accessed", "transcendentals")}
  out.update(hlo_counts(compiled.as_text()))
  return out


def measure(name: str, optimizers, reps: int | None, reps_update: int | None, log) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  spec = WORKLOADS[name]
  loss, params, x, y = workload(name)
  grads0 = jax.grad(loss)(params, x, y)
  n_params = int(sum(np.size(v) for v in jax.tree.leaves(params)))
  k_scan = spec["scan"]
  rows, fns = {}, {"step": {}, "update": {}, "scan": {}}
  for opt in optimizers:
    tx = make_tx(opt, params, spec["update_every"])

    def step(p, s, tx=tx):
      g = jax.grad(loss)(p, x, y)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    def update(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    def scan(p, s, g, tx=tx):
      def body(carry, i):  # a gradient that changes every step, at no cost worth counting
        g_i = jax.tree.map(lambda v: v * (1 + 1e-3 * jnp.sin(i.astype(v.dtype))), g)
        return update(*carry, g_i, tx=tx), None
      return jax.lax.scan(body, (p, s), jnp.arange(k_scan))[0]

    jstep = jax.jit(step, donate_argnums=(0, 1))
    jupdate = jax.jit(update, donate_argnums=(0, 1))
    jscan = jax.jit(scan, donate_argnums=(0, 1))
    copy = lambda tree: jax.tree.map(jnp.array, tree)
    carry = (copy(params), tx.init(copy(params)))
    t0 = time.perf_counter()
    carry = jax.block_until_ready(jstep(*carry))
    compile_s = time.perf_counter() - t0
    for _ in range(2 * spec["update_every"] + 3):  # L-BFGS directions active from here on
      carry = jstep(*carry)
    carry = jax.block_until_ready(carry)
    ucarry = jax.block_until_ready(jupdate(*copy(carry), grads0))
    scarry = jax.block_until_ready(jscan(*copy(carry), grads0))
    rows[opt] = {"step": cost(jstep.lower(*carry).compile()),
                 "update": cost(jupdate.lower(*ucarry, grads0).compile()),
                 "compile_s": compile_s}
    boxes = {"step": [carry], "update": [ucarry], "scan": [scarry]}

    def runner(kind, fn, boxes=boxes):
      box = boxes[kind]

      def run(_):
        box[0] = fn(*box[0]) if kind == "step" else fn(*box[0], grads0)
        return box[0]
      return run

    for kind, fn in (("step", jstep), ("update", jupdate), ("scan", jscan)):
      fns[kind][opt] = runner(kind, fn)
    log(f"  {name} {opt}: compiled in {compile_s:.1f} s")
  n_reps = {"step": reps or spec["reps"], "update": reps_update or spec["reps_update"],
            "scan": spec["reps_scan"]}
  for kind in ("step", "update", "scan"):
    interleaved_times(fns[kind], 2, rotate=True)  # warm-up
    times = interleaved_times(fns[kind], n_reps[kind], rotate=True)
    per = k_scan if kind == "scan" else 1
    for opt, ts in times.items():
      rows[opt][f"{kind}_median_us"] = 1e6 * statistics.median(ts) / per
      rows[opt][f"{kind}_mean_us"] = 1e6 * statistics.fmean(ts) / per
  a = rows["adamw"]
  for opt in optimizers:
    r = rows[opt]
    for kind in ("step", "update", "scan"):
      r[f"{kind}_ratio_median"] = r[f"{kind}_median_us"] / a[f"{kind}_median_us"]
      r[f"{kind}_ratio_mean"] = r[f"{kind}_mean_us"] / a[f"{kind}_mean_us"]
    for kind in ("step", "update"):
      r[f"{kind}_bytes_ratio"] = r[kind]["bytes accessed"] / a[kind]["bytes accessed"]
      r[f"{kind}_flops_ratio"] = r[kind]["flops"] / a[kind]["flops"]
    r["step_ratio_derived"] = ((a["step_median_us"] + r["update_median_us"]
                                - a["update_median_us"]) / a["step_median_us"])
    log(f"  {name} {opt:20s} step {r['step_median_us']:9.0f} us (x{r['step_ratio_median']:.2f} "
        f"AdamW, derived x{r['step_ratio_derived']:.2f}), update {r['update_median_us']:8.1f} "
        f"us (x{r['update_ratio_median']:.2f}), in scan {r['scan_median_us']:8.1f} us "
        f"(x{r['scan_ratio_median']:.2f})")
  return {"num_params": n_params, "batch": spec["batch"], "update_every": spec["update_every"],
          "history": 10, "reps": n_reps, "scan_length": k_scan, "optimizers": rows}


def report(data: dict) -> str:
  fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
  lines = ["# mL-BFGS per-step cost vs AdamW", "",
           "Jitted, state-donated calls timed interleaved in one process (rotating order); "
           "ratios are to AdamW in the same run. `step` = gradient + update + apply, one call "
           "per step (as a Python training loop); `update` = optimizer + apply on a fixed "
           "gradient, one call per step; `scan` = the update inside a jitted `lax.scan` "
           "(device cost without per-call dispatch, as the FL engine's local steps); "
           "`derived` = (AdamW step + update - AdamW update) / AdamW step. XLA "
           "cost_analysis of the compiled call; kernels = fusions + dots + custom calls + "
           "copies in the optimised HLO, all branches included. mL-BFGS: M = 10, past 2T "
           "steps (L-BFGS direction active); medians (the pair extraction every T steps is "
           "in the means, in the JSON). `@before` = the implementation before the change "
           "(`--baseline-dir`).", ""]
  cols = ["label", "workload", "optimizer", "step us", "step / AdamW",
          "step / AdamW (derived)", "update us", "update / AdamW", "scan us / step",
          "scan / AdamW", "update MB accessed", "update bytes / AdamW", "update kernels"]
  cells = []
  for label, run in data["runs"].items():
    for wl, res in run["workloads"].items():
      for opt, r in res["optimizers"].items():
        u = r["update"]
        cells.append([label, wl, opt, r["step_median_us"], r["step_ratio_median"],
                      r.get("step_ratio_derived"), r["update_median_us"],
                      r["update_ratio_median"], r.get("scan_median_us"),
                      r.get("scan_ratio_median"), u["bytes accessed"] / 1e6,
                      r["update_bytes_ratio"],
                      u["fusions"] + u["dots"] + u["custom_calls"] + u["copies"]])
  lines.append(md_table(cols, cells, fmt))
  lines.append("")
  for label, run in data["runs"].items():
    lines.append(f"* `{label}`: `{run['command']}` ({run['machine']}, jax {run['jax']}, load "
                 f"average {run['load_avg_start']:.1f} -> {run['load_avg_end']:.1f}, "
                 f"{run['seconds']:.0f} s). {run.get('note', '')}")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--label", default="current", help="key of this run in the results file")
  p.add_argument("--note", default="", help="free text stored with the run")
  p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
  p.add_argument("--reps", type=int, default=None, help="timed training steps per optimizer")
  p.add_argument("--reps-update", type=int, default=None, help="timed update-only steps")
  p.add_argument("--baseline-dir", default=None,
                 help="folder with another _mlbfgs.py + _mlbfgs_two_loop.py to time alongside")
  p.add_argument("--out-dir", default=RESULTS)
  args = p.parse_args(argv)
  optimizers = list(OPTIMIZERS)
  if args.baseline_dir:
    BASELINE["before"] = load_baseline(args.baseline_dir)
    optimizers += ["mlbfgs@before", "mlbfgs_blocks@before"]
  import jax
  import optax

  log = lambda s: print(s, flush=True)
  path = os.path.join(args.out_dir, "bench_mlbfgs_step.json")
  data = {"runs": {}}
  if os.path.exists(path):
    with open(path) as f:
      data = json.load(f)
  run = {"command": command_line(__file__, argv), "note": args.note,
         "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                    f"{jax.devices()[0].platform}",
         "jax": jax.__version__, "optax": optax.__version__,
         "load_avg_start": os.getloadavg()[0], "workloads": {}}
  t0 = time.time()
  for wl in args.workloads:
    log(f"[{wl}]")
    run["workloads"][wl] = measure(wl, optimizers, args.reps, args.reps_update, log)
  run.update(load_avg_end=os.getloadavg()[0], seconds=time.time() - t0)
  data["runs"][args.label] = run
  write_json(path, data)
  write_text(os.path.join(args.out_dir, "bench_mlbfgs_step.md"), report(data))
  log(f"wrote {path} and bench_mlbfgs_step.md ({run['seconds']:.0f} s)")


if __name__ == "__main__":
  main()
