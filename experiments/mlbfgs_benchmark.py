"""mL-BFGS benchmark: loss vs steps / wall-clock and per-step cost against SGD, Adam, L-BFGS.

Problems:
  logreg             softmax regression + L2 1e-3 on sklearn digits (64 features, 1438 train);
  cnn_fashion_mnist  jaxfl.models.cnn((28, 28, 1), 10, dense=128) on a Fashion-MNIST subset;
  resnet20_cost      ResNet-20 on random CIFAR-shaped data, per-step time only.

Every stochastic optimizer uses batch 64 and a cosine-decayed learning rate picked from a
small grid by final training loss (logged). optax.lbfgs (zoom line search) runs full-batch on
logreg only. The target loss of a problem is 1.05 x the worst final loss among SGD, Adam and
mL-BFGS, so all three reach it and ``steps_to_target`` compares their speed. Per-step times
are medians of repeated jitted steps (gradient + update) after compilation, measured in the
same process; ``step_time_ratio_vs_adam`` divides by Adam's median.

Usage:
  python experiments/mlbfgs_benchmark.py                      # full run -> experiments/results
  python experiments/mlbfgs_benchmark.py --quick --out-dir /tmp/mlbfgs_quick   # smoke run:
      # few steps, one lr each, no ResNet; about a minute on an idle 2-core CPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import carry_times, command_line, md_table, save_plot, timed, write_json, write_results

import jaxfl.data
import jaxfl.models
from jaxfl import transforms as M

BATCH = 64
MLBFGS_KW = dict(update_every=10, history=10, beta_p=0.99, beta_g=0.99, pair_momentum=0.9,
                 damping=0.01)


def make_tx(name, lr, steps, labels=None):
  sched = optax.cosine_decay_schedule(lr, steps)
  if name == "sgd":
    return optax.sgd(sched, momentum=0.9)
  if name == "adam":
    return optax.adamw(sched, weight_decay=0.0)
  if name == "mlbfgs":
    return M.mlbfgs(sched, labels, **MLBFGS_KW)
  if name == "stochastic_lbfgs":
    return M.plain_stochastic_lbfgs(sched, labels)
  raise ValueError(name)


def xent(logits, y):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def train(loss_fn, params, tx, data, steps, eval_fn, eval_every, seed=0):
  """Minibatch training; returns (steps, losses, cumulative seconds)."""
  x, y = data
  n = x.shape[0]

  @jax.jit
  def step(params, state, x, y, idx):
    g = jax.grad(loss_fn)(params, x[idx], y[idx])
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  rng = np.random.default_rng(seed)
  idx = jnp.asarray(rng.integers(0, n, size=(steps, BATCH)))
  jax.block_until_ready(step(params, state, x, y, idx[0]))  # compile outside the clock
  hist_s, hist_l, hist_t, clock = [0], [float(eval_fn(params))], [0.0], 0.0
  for i in range(steps):
    (params, state), dt = timed(lambda: step(params, state, x, y, idx[i]),
                                ready=lambda out: out[0])
    clock += dt
    if (i + 1) % eval_every == 0 or i + 1 == steps:
      loss = float(eval_fn(params))
      hist_s.append(i + 1)
      hist_l.append(loss if np.isfinite(loss) else float("nan"))
      hist_t.append(clock)
  return hist_s, hist_l, hist_t


def train_lbfgs_full(loss_full, params, steps, eval_every):
  tx = optax.lbfgs()
  vg = optax.value_and_grad_from_state(loss_full)

  @jax.jit
  def step(params, state):
    value, grad = vg(params, state=state)
    u, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=loss_full)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  jax.block_until_ready(step(params, state))
  step_fn = lambda carry: step(*carry)
  hist_s, hist_l, hist_t, clock = [0], [float(loss_full(params))], [0.0], 0.0
  for i in range(steps):
    (params, state), dt = timed(step, params, state, ready=lambda out: out[0])
    clock += dt
    if (i + 1) % eval_every == 0 or i + 1 == steps:
      hist_s.append(i + 1)
      hist_l.append(float(loss_full(params)))
      hist_t.append(clock)
  return hist_s, hist_l, hist_t, step_fn, (params, tx.init(params))


def median_step_time(step_fn, carry, reps):
  """Median seconds of ``carry = step_fn(carry)`` after two warm-up calls."""
  return float(statistics.median(carry_times(step_fn, carry, reps, warmup=2)[1]))


def step_timer(loss_fn, params, tx, xb, yb):
  """A jitted gradient+update step with the optimizer state donated (as in training)."""
  @jax.jit
  def step(params, state):
    g = jax.grad(loss_fn)(params, xb, yb)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  donated = jax.jit(step, donate_argnums=(1,))
  params = jax.tree.map(jnp.array, params)
  return (lambda carry: donated(*carry)), (params, tx.init(params))


def run_problem(problem, loss_fn, params0, data, eval_fn, steps, grids, eval_every, reps,
                labels, log, loss_full=None):
  rows, curves = [], {}
  for name, grid in grids.items():
    best = None
    for lr in grid:
      s, losses, t = train(loss_fn, params0, make_tx(name, lr, steps, labels), data, steps,
                           eval_fn, eval_every)
      final = losses[-1] if np.isfinite(losses[-1]) else float("inf")
      log(f"  {problem:18s} {name:17s} lr={lr:<8g} final loss {final:.4f}")
      if best is None or final < best[0]:
        best = (final, lr, s, losses, t)
    curves[name] = dict(lr=best[1], steps=best[2], loss=best[3], time=best[4], grid=grid)
  xb, yb = data[0][:BATCH], data[1][:BATCH]
  timing = {}
  for name in grids:
    fn, carry = step_timer(loss_fn, params0, make_tx(name, curves[name]["lr"], steps, labels),
                           xb, yb)
    timing[name] = median_step_time(fn, carry, reps)
  if loss_full is not None:
    s, losses, t, fn, st = train_lbfgs_full(loss_full, params0, steps, eval_every)
    log(f"  {problem:18s} lbfgs (full batch)  final loss {losses[-1]:.4f}")
    curves["lbfgs"] = dict(lr=None, steps=s, loss=losses, time=t, grid=None)
    timing["lbfgs"] = median_step_time(fn, st, reps)
  main = [curves[k]["loss"][-1] for k in ("sgd", "adam", "mlbfgs") if k in curves]
  target = 1.05 * max(v if np.isfinite(v) else 0.0 for v in main)
  for name, c in curves.items():
    hit = [st for st, lo in zip(c["steps"], c["loss"]) if np.isfinite(lo) and lo <= target]
    hit_t = [tt for tt, lo in zip(c["time"], c["loss"]) if np.isfinite(lo) and lo <= target]
    rows.append(dict(
        problem=problem, optimizer=name, lr=c["lr"], lr_grid=c["grid"], steps=steps,
        target_loss=round(target, 5), steps_to_target=hit[0] if hit else None,
        seconds_to_target=round(hit_t[0], 3) if hit_t else None,
        final_loss=None if not np.isfinite(c["loss"][-1]) else round(c["loss"][-1], 5),
        step_time_ms=round(1e3 * timing[name], 3),
        step_time_ratio_vs_adam=round(timing[name] / timing["adam"], 3),
        full_batch=name == "lbfgs"))
  return rows, curves


def logreg_problem(quick, log):
  ds = jaxfl.data.load_digits()
  x = jnp.asarray(ds.x_train.reshape(len(ds.x_train), -1))
  y = jnp.asarray(ds.y_train)
  d, k = x.shape[1], ds.num_classes
  params0 = {"w": jnp.zeros((d, k)), "b": jnp.zeros(k)}
  l2 = 1e-3  # strongly convex
  loss_fn = lambda p, xb, yb: xent(xb @ p["w"] + p["b"], yb) + 0.5 * l2 * jnp.sum(p["w"] ** 2)
  full_fn = jax.jit(loss_fn)
  full = lambda p: full_fn(p, x, y)
  steps = 40 if quick else 400
  grids = ({"sgd": [0.3], "adam": [0.03], "mlbfgs": [0.1], "stochastic_lbfgs": [0.03]} if quick
           else {"sgd": [0.1, 0.3, 1.0], "adam": [0.01, 0.03, 0.1],
                 "mlbfgs": [0.01, 0.03, 0.1], "stochastic_lbfgs": [0.01, 0.03, 0.1]})
  return run_problem("logreg", loss_fn, params0, (x, y), full, steps, grids,
                     5 if quick else 10, 5 if quick else 50, None, log, loss_full=full)


def cnn_problem(quick, log):
  ds = jaxfl.data.load_fashion_mnist()
  n_train = 1000 if quick else 8000
  x = jnp.asarray(ds.x_train[:n_train])
  y = jnp.asarray(ds.y_train[:n_train])
  model = jaxfl.models.cnn((28, 28, 1), 10, dense=128)
  params0, mstate = model.init(jax.random.key(0))
  loss_fn = lambda p, xb, yb: xent(model.apply(p, mstate, xb, train=True)[0], yb)
  xe, ye = x[:1000], y[:1000]
  full_fn = jax.jit(loss_fn)
  full = lambda p: full_fn(p, xe, ye)
  steps = 10 if quick else 200
  grids = ({"sgd": [0.05], "adam": [3e-3], "mlbfgs": [0.03]}
           if quick else {"sgd": [0.05, 0.15], "adam": [1e-3, 3e-3],
                          "mlbfgs": [0.01, 0.03], "stochastic_lbfgs": [0.03]})
  return run_problem("cnn_fashion_mnist", loss_fn, params0, (x, y), full, steps, grids,
                     5 if quick else 10, 3 if quick else 20, None, log)


def resnet_cost(quick, log):
  model = jaxfl.models.resnet20()
  params0, mstate = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  bs = 8 if quick else 32
  xb = jnp.asarray(rng.random((bs, 32, 32, 3)), jnp.float32)
  yb = jnp.asarray(rng.integers(0, 10, bs))
  loss_fn = lambda p, xb, yb: xent(model.apply(p, mstate, xb, train=True)[0], yb)
  labels = M.resnet_block_labels(params0, "one")
  reps = 2 if quick else 10
  rows, timing = [], {}
  for name, lr in (("sgd", 0.1), ("adam", 1e-3), ("mlbfgs", 0.03), ("stochastic_lbfgs", 0.03)):
    fn, carry = step_timer(loss_fn, params0, make_tx(name, lr, 100, labels), xb, yb)
    timing[name] = median_step_time(fn, carry, reps)
    log(f"  resnet20_cost      {name:17s} {1e3 * timing[name]:.1f} ms/step")
  for name, t in timing.items():
    rows.append(dict(problem="resnet20_cost", optimizer=name, target_loss=None,
                     steps_to_target=None, final_loss=None, step_time_ms=round(1e3 * t, 3),
                     step_time_ratio_vs_adam=round(t / timing["adam"], 3),
                     note=f"random CIFAR-shaped data, batch {bs}, per-step cost only; mL-BFGS "
                          "blocks = resnet_block_labels(layout='one')"))
  return rows


def write_outputs(out_dir, rows, curves, meta):
  write_json(os.path.join(out_dir, "mlbfgs_curves.json"), {"meta": meta, "curves": curves},
             indent=None)
  fmt = lambda v: "-" if v is None else str(v)
  cols = ["problem", "optimizer", "lr", "target loss", "steps to target", "s to target",
          "final loss", "ms/step", "step time / Adam"]
  cells = [[r["problem"], r["optimizer"], r.get("lr"), r["target_loss"], r["steps_to_target"],
            r.get("seconds_to_target"), r["final_loss"], r["step_time_ms"],
            r["step_time_ratio_vs_adam"]] for r in rows]
  lines = [
      "# mL-BFGS benchmark", "",
      f"Command: `{meta['command']}`  ",
      f"Machine: {meta['machine']}; jax {meta['jax']}, optax {meta['optax']}; "
      f"total wall time {meta['seconds']:.0f} s.  ",
      f"mL-BFGS settings: {MLBFGS_KW}, heavy-ball 0.9, single block; plain stochastic L-BFGS: "
      "pair every step, no pair momentum, no damping, no heavy ball, normalised direction. "
      "Cosine-decayed lr from the grid, picked by final loss; batch 64. Target loss = 1.05 x "
      "worst final loss of SGD/Adam/mL-BFGS. optax.lbfgs is full-batch (one step = one "
      "iteration incl. its zoom line search).", "",
      md_table(cols, cells, fmt)]

  def draw(axes):
    for row, problem in enumerate(("logreg", "cnn_fashion_mnist")):
      for name, c in curves.get(problem, {}).items():
        axes[row, 0].plot(c["steps"], c["loss"], label=name)
        axes[row, 1].plot(c["time"], c["loss"], label=name)
      for col, xl in enumerate(("step", "training-step wall-clock [s]")):
        ax = axes[row, col]
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("train loss")
        ax.set_title(problem)
        ax.legend(fontsize=8)

  write_results(out_dir, "mlbfgs", command=meta["command"], data=rows, md="\n".join(lines),
                plot=lambda path: save_plot(path, draw, nrows=2, ncols=2, figsize=(11, 8),
                                            dpi=110))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="short smoke run (no ResNet)")
  parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args(argv)
  log = lambda s: print(s, flush=True)
  t0 = time.time()
  rows, curves = [], {}
  for fn, name in ((logreg_problem, "logreg"), (cnn_problem, "cnn_fashion_mnist")):
    log(f"[{name}]")
    r, c = fn(args.quick, log)
    rows += r
    curves[name] = c
  if not args.quick:  # ResNet-20 compiles take minutes on a small CPU
    log("[resnet20_cost]")
    rows += resnet_cost(args.quick, log)
  meta = dict(command=command_line(__file__, argv),
              machine=f"{platform.processor() or platform.machine()}, "
                      f"{os.cpu_count()} cores, {jax.devices()[0].platform}",
              jax=jax.__version__, optax=optax.__version__, seconds=time.time() - t0,
              quick=args.quick)
  write_outputs(args.out_dir, rows, curves, meta)
  log(f"wrote {args.out_dir}/mlbfgs.json, mlbfgs.md, mlbfgs.png in {meta['seconds']:.0f} s")


if __name__ == "__main__":
  main()
