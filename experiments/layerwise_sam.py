"""Layer-wise SAM against SGD and full SAM: accuracy, gradient norm and cost (ALGORITHMS.md §9).

The paper's claims (Lee, KDD 2024; abstract and reviews, the PDF was not retrievable): perturbing
only a few critical layers (i) suppresses the gradient norm of the whole model, (ii) reaches
accuracy comparable to or better than full SAM, (iii) at a throughput close to mini-batch SGD.

Resumable study: one (arm, grid point, seed) per child process, each writing its own JSON under
``experiments/results/layerwise_sam/<workload>/``; the driver skips pieces already written,
starts no new piece after ``--max-minutes`` and rewrites the report after every piece.
``--report-only`` writes ``experiments/results/layerwise_sam.{json,md,png}``.

Arms (base optimizer: SGD + momentum 0.9 with coupled weight decay, the workload's cosine
schedule, as the ``sgd`` arm of ``mlbfgs_benchmark.py``; ``jaxfl.transforms.layerwise_sam``
wraps it):

  sgd        the base optimizer (one gradient per step).
  sam        every layer perturbed (``num_layers=None``): SAM, rho g / |g|.
  lwsam      the paper's rule: the k = 1 module (of the CNN's 4; a module = kernel + bias) with
             the largest gradient norm is perturbed, re-selected every step; every layer takes
             the gradient at the perturbed point (``perturbed="all"``).
  lwsam_out  the two output-side modules (``depth_order(model, params)[-2:]``: Dense_0,
             Dense_1) perturbed, fixed, and only they take the perturbed gradient
             (``perturbed="selected"``): the variant whose second pass XLA can cut short.

Tuning (the same budget, 4 points, for every arm): ``sgd`` over the learning rate
{0.025, 0.05, 0.1, 0.2}; the SAM arms over rho {0.01, 0.02, 0.05, 0.1} at lr 0.1 (SGD's best
on this workload in ``mlbfgs_benchmark.py``'s grid of six). The grids started at 3 points
(0.05-0.2, 0.02-0.1); SAM's best sat at the low edge, so every arm got one more point below.
Seed 0 runs the grids; seeds 1 and 2 run each arm's best point. Best = highest mean validation
accuracy over the last two evaluations, on 5,000 training images held out from training (the
test set is never used to choose); a best point at an edge of its grid is flagged EDGE.

Workloads:

  cnn14   Fashion-MNIST at 14x14 (2x2 mean), ``jaxfl.models.cnn(dense=128)`` (127,242
          parameters, conv 32/64, dense 128), 55,000 training images (5,000 held out), batch
          128, 6 epochs (2,574 steps), wd 5e-4, cosine from lr to lr/1000 per epoch, 10
          evaluations: CPU scale (~45 ms per SGD step, ~90 per SAM step on 2 cores: ~2 min
          per SGD piece, ~4 per SAM piece, ~80 min for the 24 pieces; 10 epochs, the
          mL-BFGS study's length, would take ~110 min and reached 0.900 test accuracy with
          SGD at lr 0.05, seed 0).
  cifar10_resnet20  GPU (paper scale): CIFAR-10 from TFDS (``--data-dir``), ResNet-20, batch
          128, 100 epochs, wd 5e-4; the modules are ResNet-20's 22 conv/BN/dense modules,
          k = 2, and ``lwsam_out`` the last two.

Measurements per piece: every ~1/10 of the run, loss and accuracy on a fixed 5,000-image
training subset, the held-out validation set and the test set, and the full-batch gradient norm
|grad L| over the training subset (claim i); the per-step wall clock (compile excluded); how
often each module was selected (``lwsam``). A ``cost`` piece times every arm side by side in
one process (interleaved rounds of 10 steps, 100 timed steps each) and records XLA's FLOP
count of each compiled step (claim iii).

Usage (each command resumes; ``--max-minutes`` paces a session)::

  python experiments/layerwise_sam.py --max-minutes 80
  python experiments/layerwise_sam.py --report-only
  python experiments/layerwise_sam.py --smoke --out-dir /tmp/lwsam_smoke   # < 2 min
  # GPU (paper scale; experiments/bench_gpu.sh):
  python experiments/layerwise_sam.py --workload cifar10_resnet20 --data-dir ~/tensorflow_datasets
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
from _common import (
  RESULTS,
  command_line,
  md_table,
  read_json,
  save_plot,
  write_json,
  write_results,
)
from mlbfgs_benchmark import (
  _downsample,
  _epoch_indices,
  eval_chunks,
  lr_schedule,
)

ARMS = ("sgd", "sam", "lwsam", "lwsam_out")
MOMENTUM = 0.9
# 4 points each; the first grids (3 points, 0.05-0.2 and 0.02-0.1) had SAM's best at their low
# edge, so both were extended one point down (every piece is kept)
SGD_LRS = (0.025, 0.05, 0.1, 0.2)
RHOS = (0.01, 0.02, 0.05, 0.1)
SAM_LR = 0.1
NUM_VAL = 5_000
NUM_TRAIN_EVAL = 5_000
PRESETS = {
    "cnn14": dict(dataset="fashion_mnist", model="cnn", image=14, batch=128, epochs=6,
                  weight_decay=5e-4, evals=10, k=1, out_modules=2),
    "cifar10_resnet20": dict(dataset="tfds:cifar10", model="resnet20", image=32, batch=128,
                             epochs=100, weight_decay=5e-4, evals=25, k=2, out_modules=2),
}
SMOKE = dict(num_train=8 * 128, epochs=1, evals=2, num_val=512, num_test=512,
             num_train_eval=512, cost_steps=4)


def config(workload: str, smoke: bool = False) -> dict:
  cfg = dict(PRESETS[workload], workload=workload, smoke=smoke, num_train=None, num_test=None,
             num_val=NUM_VAL, num_train_eval=NUM_TRAIN_EVAL, cost_steps=100)
  if smoke:
    cfg.update(SMOKE)
  return cfg


def grid(arm: str) -> tuple[float, ...]:
  """The arm's tuned values: learning rates for ``sgd``, radii rho for the SAM arms."""
  return SGD_LRS if arm == "sgd" else RHOS


def tag(cfg: dict) -> str:
  return cfg["workload"] + ("_smoke" if cfg["smoke"] else "")


# ------------------------------------------------------------------------------------ set-up


def load_data(cfg: dict, data_dir: str | None = None):
  """(train, val, test, train-eval subset) as NumPy ``(x, y)`` pairs; the validation images
  are a fixed random 5,000 of the training set, never trained on."""
  import jaxfl.data

  if cfg["dataset"] == "fashion_mnist":
    ds = jaxfl.data.load_fashion_mnist()
  else:
    ds = jaxfl.data.load_tfds(cfg["dataset"].split(":", 1)[1], data_dir)
  x, y = _downsample(ds.x_train, cfg["image"]), ds.y_train.astype(np.int32)
  xte, yte = _downsample(ds.x_test, cfg["image"]), ds.y_test.astype(np.int32)
  perm = np.random.default_rng(4321).permutation(len(x))
  val, train = perm[:cfg["num_val"]], np.sort(perm[cfg["num_val"]:])
  if cfg["num_train"]:
    train = train[:cfg["num_train"]]
  if cfg["num_test"]:
    xte, yte = xte[:cfg["num_test"]], yte[:cfg["num_test"]]
  sub = np.sort(np.random.default_rng(1234).permutation(len(train))[:cfg["num_train_eval"]])
  return (x[train], y[train]), (x[val], y[val]), (xte, yte), (x[train][sub], y[train][sub])


def build_model(cfg: dict, input_shape):
  import jaxfl.models

  if cfg["model"] == "cnn":
    return jaxfl.models.cnn(tuple(input_shape), 10, dense=128, conv_impl="lax")
  return jaxfl.models.resnet20(tuple(input_shape), 10, conv_impl="lax")


def make_tx(cfg: dict, arm: str, value: float, model, params, steps_per_epoch: int):
  """The arm's optax transformation (``value``: lr for ``sgd``, rho for the others)."""
  import optax

  import jaxfl

  lr = value if arm == "sgd" else SAM_LR
  base = optax.chain(optax.add_decayed_weights(cfg["weight_decay"]),
                     optax.sgd(lr_schedule(lr, steps_per_epoch, cfg["epochs"]),
                               momentum=MOMENTUM))
  if arm == "sgd":
    return optax.with_extra_args_support(base)
  L = jaxfl.transforms.layerwise_sam
  if arm == "sam":
    return L(base, rho=value, num_layers=None)
  if arm == "lwsam":
    return L(base, rho=value, num_layers=cfg["k"])
  order = jaxfl.algorithms.depth_order(model, params)
  return L(base, rho=value, select=order[-cfg["out_modules"]:], perturbed="selected")


class Trainer:
  """A jitted step ``(params, opt_state, model_state, x, y, idx) -> (params, opt_state,
  model_state, loss, selected)``."""

  def __init__(self, cfg, arm, value, model, params, steps_per_epoch):
    import jax
    import jax.numpy as jnp
    import optax

    self.tx = make_tx(cfg, arm, value, model, params, steps_per_epoch)
    two_pass = arm != "sgd"

    def xent(p, ms, xb, yb):
      logits, new_ms = model.apply(p, ms, xb, train=True)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb)), new_ms

    def step(p, s, ms, x, y, idx):
      xb, yb = x[idx], y[idx]
      (loss, new_ms), g = jax.value_and_grad(xent, has_aux=True)(p, ms, xb, yb)
      # the second pass sees the step's model state and discards the one it computes
      extra = {"grad_fn": lambda q, _: jax.grad(xent, has_aux=True)(q, ms, xb, yb)[0]} \
          if two_pass else {}
      u, s = self.tx.update(g, s, p, **extra)
      selected = s.selected if two_pass else jnp.zeros([0], jnp.float32)
      return optax.apply_updates(p, u), s, new_ms, loss, selected

    self.step = jax.jit(step, donate_argnums=(0, 1))
    self.init = jax.jit(self.tx.init)


def make_evaluate(model):
  """``evaluate(params, model_state, chunks, grad_norm) -> dict``: loss and accuracy over
  ``[k, chunk, ...]`` arrays, and with ``grad_norm`` the norm of the full-batch gradient.

  A Python loop over jitted per-chunk calls: the same loop as a ``lax.scan`` took 20x longer
  on XLA:CPU (the lax conv's gradient inside a while loop; 40 s against 2 s for 5,000 images).
  """
  import jax
  import jax.numpy as jnp
  import optax

  def total_loss(p, ms, xb, yb):
    logits = model.apply(p, ms, xb, train=False)[0]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
    return jnp.sum(loss), jnp.sum(jnp.argmax(logits, -1) == yb)

  part = jax.jit(total_loss)
  part_grad = jax.jit(jax.grad(lambda p, ms, xb, yb: total_loss(p, ms, xb, yb)[0]))
  add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))

  def evaluate(p, ms, data, with_grad=False):
    xs, ys = data
    loss = hits = 0.0
    total = None
    for k in range(xs.shape[0]):
      l_k, h_k = part(p, ms, xs[k], ys[k])
      loss, hits = loss + float(l_k), hits + float(h_k)
      if with_grad:
        g = part_grad(p, ms, xs[k], ys[k])
        total = g if total is None else add(total, g)
    out = {"loss": loss / ys.size, "acc": hits / ys.size}
    if with_grad:
      out["grad_norm"] = float(optax.tree.norm(total)) / ys.size
    return out
  return evaluate


def setup(cfg: dict, arm: str, value: float, seed: int, data_dir=None):
  import jax

  train, val, test, sub = load_data(cfg, data_dir)
  model = build_model(cfg, train[0].shape[1:])
  params, ms = model.init(jax.random.key(seed))
  spe = len(train[0]) // cfg["batch"]
  trainer = Trainer(cfg, arm, value, model, params, spe)
  put = lambda xy: eval_chunks(*xy, jax.device_put)
  arrays = dict(x=jax.device_put(train[0]), y=jax.device_put(train[1]), val=put(val),
                test=put(test), train_sub=put(sub))
  return model, params, ms, trainer, arrays, spe


# ------------------------------------------------------------------------------------ pieces


def piece_path(root: str, arm: str, value: float, seed: int) -> str:
  return os.path.join(root, f"{arm}_{value:g}_s{seed}.json")


def run_piece(cfg: dict, arm: str, value: float, seed: int, out: str, data_dir=None) -> dict:
  import jax

  model, params, ms, trainer, a, spe = setup(cfg, arm, value, seed, data_dir)
  evaluate = make_evaluate(model)
  state = trainer.init(params)
  total = spe * cfg["epochs"]
  every = max(1, total // cfg["evals"])

  def do_eval(step):
    tr = evaluate(params, ms, a["train_sub"], with_grad=True)
    va, te = evaluate(params, ms, a["val"]), evaluate(params, ms, a["test"])
    return {"step": step, "epoch": step / spe, "train_loss": tr["loss"], "train_acc": tr["acc"],
            "grad_norm": tr["grad_norm"], "val_acc": va["acc"], "test_loss": te["loss"],
            "test_acc": te["acc"]}

  history, times, i, diverged = [do_eval(0)], [], 0, False
  selected_counts = None
  for epoch in range(cfg["epochs"]):
    for idx in _epoch_indices(a["x"].shape[0], cfg["batch"], epoch, seed):
      t0 = time.perf_counter()
      params, state, ms, loss, sel = trainer.step(params, state, ms, a["x"], a["y"],
                                                  jax.device_put(idx))
      loss = float(jax.block_until_ready(loss))
      times.append(time.perf_counter() - t0)
      sel = np.asarray(sel)
      selected_counts = sel if selected_counts is None else selected_counts + sel
      i += 1
      if not np.isfinite(loss):
        diverged = True
        break
      if i % every == 0 or i == total:
        history.append(do_eval(i))
    if diverged:
      break
  compile_s = times[0] - float(np.median(times[1:])) if len(times) > 1 else 0.0
  times[0] = float(np.median(times[1:])) if len(times) > 1 else times[0]
  clock = np.concatenate([[0.0], np.cumsum(times)])
  for h in history:
    h["time"] = float(clock[h["step"]])
  import jaxfl

  names = jaxfl.transforms.layer_ids(params)[1]
  last = history[-1]
  piece = {
      "workload": cfg["workload"], "arm": arm, "value": float(value), "seed": int(seed),
      "lr": float(value) if arm == "sgd" else SAM_LR,
      "rho": None if arm == "sgd" else float(value),
      "config": cfg, "steps": i, "total_steps": total, "diverged": diverged,
      "train_seconds": float(clock[-1]), "compile_seconds": compile_s,
      "step_seconds_median": float(np.median(times)),
      "selected_share": None if arm == "sgd" else {
          n: float(c) / max(i, 1) for n, c in zip(names, selected_counts)},
      "final": {k: last[k] for k in ("train_loss", "train_acc", "grad_norm", "val_acc",
                                     "test_acc")},
      "history": history,
      "host": {"load_avg": os.getloadavg()[0], "cpu_count": os.cpu_count(),
               "platform": jax.devices()[0].platform, "jax": jax.__version__},
  }
  write_json(out, piece, indent=None)
  print(f"{cfg['workload']} {arm} {value:g} seed {seed}: val {last['val_acc']:.4f} test "
        f"{last['test_acc']:.4f} |g| {last['grad_norm']:.4f} ({clock[-1]:.0f} s, "
        f"{1e3 * piece['step_seconds_median']:.1f} ms/step)", flush=True)
  return piece


def run_cost(cfg: dict, out: str, data_dir=None) -> dict:
  """Every arm's step side by side (interleaved rounds of 10 steps) and XLA's FLOP count."""
  import jax

  runs, flops = {}, {}
  for arm in ARMS:
    value = grid(arm)[1]
    model, params, ms, trainer, a, spe = setup(cfg, arm, value, 0, data_dir)
    state = trainer.init(params)
    idx = _epoch_indices(a["x"].shape[0], cfg["batch"], 0, 0)
    lowered = trainer.step.lower(params, state, ms, a["x"], a["y"], jax.device_put(idx[0]))
    flops[arm] = float(lowered.compile().cost_analysis().get("flops", float("nan")))
    runs[arm] = dict(trainer=trainer, carry=[params, state, ms], a=a, idx=idx, i=0, times=[])
    for _ in range(3):
      _cost_step(runs[arm], timed=False)
  rounds = max(1, cfg["cost_steps"] // 10)
  for r in range(rounds):
    for arm in ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]:
      for _ in range(10):
        _cost_step(runs[arm], timed=True)
  ms_step = {arm: 1e3 * float(np.median(run["times"])) for arm, run in runs.items()}
  res = {"workload": cfg["workload"], "ms_per_step": ms_step,
         "step_vs_sgd": {a: ms_step[a] / ms_step["sgd"] for a in ARMS},
         "flops": flops, "flops_vs_sgd": {a: flops[a] / flops["sgd"] for a in ARMS},
         "steps_timed": {a: len(r["times"]) for a, r in runs.items()},
         "host": {"load_avg": os.getloadavg()[0], "cpu_count": os.cpu_count()}}
  write_json(out, res)
  print("cost:", {a: f"{v:.2f}x" for a, v in res["step_vs_sgd"].items()}, flush=True)
  return res


def _cost_step(run, timed):
  import jax

  p, s, ms = run["carry"]
  idx = jax.device_put(run["idx"][run["i"] % len(run["idx"])])
  t0 = time.perf_counter()
  p, s, ms, loss, _ = run["trainer"].step(p, s, ms, run["a"]["x"], run["a"]["y"], idx)
  jax.block_until_ready(loss)
  if timed:
    run["times"].append(time.perf_counter() - t0)
  run["carry"] = [p, s, ms]
  run["i"] += 1


# ------------------------------------------------------------------------------------ report


def _score(piece: dict) -> float:
  """Mean validation accuracy of the last two evaluations (-inf if diverged)."""
  if piece["diverged"]:
    return -np.inf
  return float(np.mean([h["val_acc"] for h in piece["history"][-2:]]))


def late_grad_norm(piece: dict) -> float:
  """Mean full-batch |grad L| over the last three evaluations (the last 30% of training): a
  single evaluation's value swings by 2x from one to the next."""
  return float(np.mean([h["grad_norm"] for h in piece["history"][-3:]]))


def collect(cfg: dict, root: str, seeds) -> dict:
  done = {}
  for arm in ARMS:
    for v in grid(arm):
      for s in seeds:
        piece = read_json(piece_path(root, arm, v, s))
        if piece is not None and piece["config"] == cfg:  # another configuration's: ignored
          done[(arm, v, s)] = piece
  return done


def best_values(done: dict, seed0: int) -> dict:
  best = {}
  for arm in ARMS:
    scored = [(_score(done[(arm, v, seed0)]), v) for v in grid(arm) if (arm, v, seed0) in done]
    if len(scored) == len(grid(arm)):
      best[arm] = max(scored)[1]
  return best


def plan(seeds, best: dict) -> list[tuple[str, float, int]]:
  todo = [(arm, v, seeds[0]) for arm in ARMS for v in grid(arm)]
  todo += [(arm, best[arm], s) for s in seeds[1:] for arm in ARMS if arm in best]
  return todo


def _ms(xs):
  xs = [x for x in xs if x is not None]
  if not xs:
    return None, None
  return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def summarize(cfg: dict, done: dict, cost: dict | None, seeds) -> dict:
  best = best_values(done, seeds[0])
  rows, per_seed = [], {}
  for arm in ARMS:
    if arm not in best:
      continue
    pieces = [done[(arm, best[arm], s)] for s in seeds if (arm, best[arm], s) in done]
    per_seed[arm] = {p["seed"]: p for p in pieces}
    f = lambda k: _ms([p["final"][k] for p in pieces])
    share = pieces[0]["selected_share"]
    rows.append({"arm": arm, "best": best[arm], "lr": pieces[0]["lr"], "rho": pieces[0]["rho"],
                 "seeds": len(pieces), "test_acc": f("test_acc"), "val_acc": f("val_acc"),
                 "train_loss": f("train_loss"),
                 "grad_norm": _ms([late_grad_norm(p) for p in pieces]),
                 "train_s": _ms([p["train_seconds"] for p in pieces]),
                 "selected_share": share})
  paired = {}
  for a, b in (("sam", "sgd"), ("lwsam", "sgd"), ("lwsam_out", "sgd"), ("lwsam", "sam"),
               ("lwsam_out", "sam")):
    if a in per_seed and b in per_seed:
      common = sorted(set(per_seed[a]) & set(per_seed[b]))
      d = [per_seed[a][s]["final"]["test_acc"] - per_seed[b][s]["final"]["test_acc"]
           for s in common]
      if d:
        se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None
        paired[f"{a} - {b}"] = {"mean": float(np.mean(d)), "se": se, "seeds": common}
  grid_rows = [{"arm": arm, "value": v, "val_acc": _score(done[(arm, v, seeds[0])]),
                "test_acc": done[(arm, v, seeds[0])]["final"]["test_acc"],
                "grad_norm": late_grad_norm(done[(arm, v, seeds[0])])}
               for arm in ARMS for v in grid(arm) if (arm, v, seeds[0]) in done]
  return {"workload": cfg["workload"], "config": cfg, "rows": rows, "paired_test_acc": paired,
          "grid": grid_rows, "cost": cost, "pieces_done": len(done),
          "pieces_planned": len(plan(seeds, best)),
          "curves": {arm: _mean_curve(list(per_seed[arm].values())) for arm in per_seed}}


def _mean_curve(pieces: list[dict]) -> dict:
  n = min(len(p["history"]) for p in pieces)
  out = {"epoch": [h["epoch"] for h in pieces[0]["history"][:n]]}
  for k in ("test_acc", "grad_norm", "train_loss", "time"):
    out[k] = [float(np.mean([p["history"][j][k] for p in pieces])) for j in range(n)]
  return out


def _pm(pair, digits=4, scale=1.0):
  m, s = pair
  if m is None:
    return "-"
  return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def claims(res: dict) -> list[str]:
  rows = {r["arm"]: r for r in res["rows"]}
  out = []
  pd = res["paired_test_acc"]
  for key in ("sam - sgd", "lwsam - sgd", "lwsam - sam", "lwsam_out - sgd", "lwsam_out - sam"):
    if key in pd and pd[key]["se"] is not None:
      d = pd[key]
      out.append(f"test accuracy, {key}: {100 * d['mean']:+.2f} ± {100 * d['se']:.2f} points "
                 f"(paired over seeds {d['seeds']}, mean ± SE)")
  if "sgd" in rows:
    g0 = rows["sgd"]["grad_norm"][0]
    for arm in ("sam", "lwsam", "lwsam_out"):
      if arm in rows:
        out.append(f"full-batch |grad L| on the training subset (last 3 evaluations), "
                   f"{arm} / sgd at the best points: {rows[arm]['grad_norm'][0] / g0:.2f}")
  by = {(g["arm"], g["value"]): g["grad_norm"] for g in res["grid"]}
  for arm in ("sam", "lwsam", "lwsam_out"):
    if all((arm, v) in by for v in grid(arm)):
      out.append(f"|grad L| (last 3 evaluations, seed 0) against rho, {arm}: " + ", ".join(
          f"{v:g}: {by[(arm, v)]:.3f}" for v in grid(arm)))
  if res["cost"]:
    c = res["cost"]
    out.append("step time / SGD's, side by side: " + ", ".join(
        f"{a} {c['step_vs_sgd'][a]:.2f}x" for a in ARMS) + "; XLA FLOPs / SGD's: " + ", ".join(
        f"{a} {c['flops_vs_sgd'][a]:.2f}x" for a in ARMS))
  return out


def report_md(res: dict, command: str) -> str:
  cols = ["arm", "tuned", "seeds", "test acc", "val acc", "train loss",
          "|grad L| (train, last 3 evals)", "train s"]
  table = []
  for r in res["rows"]:
    tuned = f"lr {r['lr']:g}" if r["arm"] == "sgd" else f"rho {r['rho']:g} (lr {r['lr']:g})"
    if r["best"] in (grid(r["arm"])[0], grid(r["arm"])[-1]):
      tuned += " EDGE"
    table.append([r["arm"], tuned, r["seeds"], _pm(r["test_acc"]), _pm(r["val_acc"]),
                  _pm(r["train_loss"]), _pm(r["grad_norm"]), _pm(r["train_s"], 0)])
  lines = [f"# Layer-wise SAM vs SGD and SAM: {res['workload']}", "",
           "Protocol: the docstring of `experiments/layerwise_sam.py` and `docs/layerwise_sam.md`. "
           f"Pieces done: {res['pieces_done']} of {res['pieces_planned']}. Rows are each arm at "
           "its best grid point (seed 0, validation accuracy), mean ± std over seeds; accuracies "
           "are at the end of training.", "", md_table(cols, table), "", "## Claims", ""]
  lines += [f"* {c}" for c in claims(res)] or ["* (not enough pieces yet)"]
  shares = [r for r in res["rows"] if r["selected_share"] and r["arm"] == "lwsam"]
  if shares:
    lines += ["", "## Which module the adaptive rule perturbs (share of steps, best seed-0 run)",
              "", md_table(["module", "share"], [[k, f"{v:.3f}"] for k, v in
                                                  shares[0]["selected_share"].items()])]
  if res["cost"]:
    c = res["cost"]
    lines += ["", "## Cost (one process, side by side)", "",
              md_table(["arm", "ms/step", "step / SGD", "XLA FLOPs / SGD"],
                       [[a, f"{c['ms_per_step'][a]:.2f}", f"{c['step_vs_sgd'][a]:.2f}",
                         f"{c['flops_vs_sgd'][a]:.2f}"] for a in ARMS])]
  lines += ["", "## Grid (seed 0)", "",
            md_table(["arm", "value", "val acc (last 2 evals)", "test acc",
                      "|grad L| (last 3 evals)"],
                     [[g["arm"], f"{g['value']:g}", f"{g['val_acc']:.4f}",
                       f"{g['test_acc']:.4f}", f"{g['grad_norm']:.3f}"] for g in res["grid"]])]
  return "\n".join(lines) + "\n"


def _plot(path: str, res: dict) -> bool:
  curves = res["curves"]

  def draw(axes):
    for arm, c in curves.items():
      axes[0].plot(c["epoch"], c["test_acc"], label=arm)
      axes[1].plot(c["epoch"], c["grad_norm"], label=arm)
      axes[2].plot(c["time"], c["test_acc"], label=arm)
    axes[0].set(xlabel="epoch", ylabel="test accuracy", ylim=(0.8, None))
    axes[1].set(xlabel="epoch", ylabel="full-batch |grad L| (train subset)", yscale="log")
    axes[2].set(xlabel="training seconds (per-piece clock)", ylabel="test accuracy",
                ylim=(0.8, None))
    for ax in axes:
      ax.legend(fontsize=7)
  return save_plot(path, draw, ncols=3, figsize=(14, 4))


def report(cfg: dict, out_dir: str, seeds, command: str) -> dict:
  root = os.path.join(out_dir, "layerwise_sam", tag(cfg))
  done = collect(cfg, root, seeds)
  res = summarize(cfg, done, read_json(os.path.join(root, "cost.json")), seeds)
  res["command"] = command
  stem = "layerwise_sam" + ("" if cfg["workload"] == "cnn14" else f"_{tag(cfg)}")
  write_results(out_dir, stem, command=command, data=res, md=report_md(res, command),
                plot=(lambda p: _plot(p, res)) if res["curves"] else None)
  return res


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workload", choices=sorted(PRESETS), default="cnn14")
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--piece", nargs=3, metavar=("ARM", "VALUE", "SEED"))
  p.add_argument("--cost", action="store_true", help="run the side-by-side cost piece (child)")
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--max-minutes", type=float, default=None)
  p.add_argument("--smoke", action="store_true", help="8 steps, seed 0 (tests)")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--out-dir", default=RESULTS)
  args = p.parse_args(argv)
  if args.smoke:
    args.seeds = [0]
  cfg = config(args.workload, args.smoke)
  root = os.path.join(args.out_dir, "layerwise_sam", tag(cfg))
  if args.piece:
    arm, value, seed = args.piece[0], float(args.piece[1]), int(args.piece[2])
    run_piece(cfg, arm, value, seed, piece_path(root, arm, value, seed), args.data_dir)
    return
  if args.cost:
    run_cost(cfg, os.path.join(root, "cost.json"), args.data_dir)
    return
  command = command_line(__file__, argv, drop={"--report-only": 0, "--max-minutes": 1})
  t0 = time.time()

  def child(extra):
    cmd = [sys.executable, os.path.abspath(__file__), "--workload", args.workload,
           "--out-dir", args.out_dir, *extra] + (["--smoke"] if args.smoke else []) + (
               ["--data-dir", args.data_dir] if args.data_dir else [])
    subprocess.run(cmd, check=True)

  out_of_time = lambda: args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes
  if not args.report_only:
    if read_json(os.path.join(root, "cost.json")) is None:
      child(["--cost"])
    while not out_of_time():
      done = collect(cfg, root, args.seeds)
      todo = [x for x in plan(args.seeds, best_values(done, args.seeds[0])) if x not in done]
      if not todo:
        break
      arm, v, s = todo[0]
      child(["--piece", arm, str(v), str(s)])
      report(cfg, args.out_dir, args.seeds, command)
  report(cfg, args.out_dir, args.seeds, command)


if __name__ == "__main__":
  main()
