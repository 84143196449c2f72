"""Multi-metric client activation against uniform, Power-of-choice and its ablations.

Lim, Zhang & Lee, ACM TIST 2026 (ALGORITHMS.md §6, NEXT_METHODS.md §A). Every arm runs the same
FedAvg (unweighted mean, client SGD momentum 0.9, L2 1e-4 as decayed weights 2e-4, client LR
x0.1 at 50% and 72% of the rounds, one learning rate for every arm) and differs only in its
ClientSampler. Resumable: one arm x one seed per child process, each writing its own JSON under
``experiments/results/client_activation/<preset>/``; the driver skips pieces already done and
rewrites the report (``client_activation.{json,md,png}``) after each.

  python experiments/client_activation.py                  # Fashion-MNIST, 5 arms x 3 seeds
  python experiments/client_activation.py --preset synthetic   # Synthetic(1,1) sanity, seconds
  python experiments/client_activation.py --report-only    # tables/plots from the pieces done
  python experiments/client_activation.py --preset cifar10_resnet20   # the paper's (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from _common import (
  RESULTS,
  command_line,
  md_table,
  plot_accuracy,
  save_plot,
  timed,
  write_json,
  write_results,
)

PRESETS = {
    # 2-core CPU scale: tau 10 instead of the paper's 20 and 100 rounds instead of 250, so
    # one arm x one seed takes ~10 minutes; LR 0.02 as experiments/layerwise_comm.py.
    "fashion_mnist": dict(dataset="fashion_mnist", model="cnn", num_clients=128, cohort=32,
                          alpha=0.1, rounds=100, tau=10, lr=0.02, batch=32, weight_decay=2e-4,
                          eval_every=5),
    # LEAF Synthetic(1,1): natural size skew, logistic regression; seconds per run.
    "synthetic": dict(dataset="synthetic", model="logreg", num_clients=128, cohort=32,
                      alpha=None, rounds=100, tau=10, lr=0.05, batch=32, weight_decay=2e-4,
                      eval_every=5),
    # The paper's setting (ALGORITHMS.md §6.3): CIFAR-10 via TFDS, ResNet-20, 250 rounds.
    "cifar10_resnet20": dict(dataset="tfds:cifar10", model="resnet20", num_clients=128,
                             cohort=32, alpha=0.1, rounds=250, tau=20, lr=0.2, batch=32,
                             weight_decay=2e-4, eval_every=10),
}

ARMS = ("uniform", "multi_metric", "power_of_choice", "loss_only", "norm_only")


def make_sampler(arm: str, seed: int):
  from jaxfl import sampling

  return {
      "uniform": lambda: sampling.uniform(),
      "multi_metric": lambda: sampling.multi_metric(8, 256.0, seed=seed),
      "power_of_choice": lambda: sampling.power_of_choice(48),
      "loss_only": lambda: sampling.multi_metric(8, 256.0, mode="loss", seed=seed),
      "norm_only": lambda: sampling.multi_metric(8, 256.0, mode="norm", seed=seed),
  }[arm]()


def counting(sampler):
  """Wraps any sampler to count each client's participations (a sampler written outside
  jaxfl: the contract is open)."""
  import jax.numpy as jnp

  from jaxfl.sampling import ClientSampler

  def init(n, m):
    return (sampler.init(n, m), jnp.zeros([n], jnp.int32))

  def select(key, state, round, **kw):
    return sampler.select(key, state[0], round, **kw)

  def update(state, ids, metrics):
    counts = state[1].at[ids].add((metrics.participated > 0).astype(jnp.int32))
    return (sampler.update(state[0], ids, metrics), counts)

  def metrics(state):
    out = {} if sampler.metrics is None else dict(sampler.metrics(state[0]))
    out["unseen_clients"] = jnp.sum(state[1] == 0).astype(jnp.float32)
    return out

  return ClientSampler(init, select, update, metrics)


def build(cfg: dict, arm: str, seed: int):
  import optax

  import jaxfl

  if cfg["dataset"] == "synthetic":
    data = jaxfl.data.load("synthetic", num_clients=cfg["num_clients"], alpha=1.0, beta=1.0,
                           seed=0)
  else:
    data = jaxfl.data.load(cfg["dataset"], num_clients=cfg["num_clients"],
                           partition=jaxfl.data.dirichlet(cfg["alpha"]), seed=0)
  if cfg["model"] == "logreg":
    model = jaxfl.models.mlp(data.example_shape, data.num_classes, hidden=())
  else:
    model = jaxfl.models.get_model(cfg["model"], data.example_shape, data.num_classes)
  r = cfg["rounds"]
  decay = optax.piecewise_constant_schedule(1.0, {int(0.5 * r): 0.1, int(0.72 * r): 0.1})
  algo = jaxfl.algorithms.fedavg(name=arm, client_lr=cfg["lr"], client_momentum=0.9,
                                 weight_decay=cfg["weight_decay"], batch_size=cfg["batch"],
                                 local_steps=cfg["tau"], weighting="uniform")
  # the preset's client optimizer (decayed weights, SGD with momentum), then the round schedule
  client = optax.chain(algo.local.optimizer, jaxfl.transforms.scale_by_round_schedule(decay))
  algo = algo._replace(local=algo.local._replace(optimizer=client),
                       sampler=counting(make_sampler(arm, seed)))
  return algo, model, data


def run_piece(preset: str, arm: str, seed: int, out: str) -> None:
  import jax

  import jaxfl

  jaxfl.set_cpu_devices()
  cfg = PRESETS[preset]
  algo, model, data = build(cfg, arm, seed)
  res, seconds = timed(jaxfl.simulate, algo, model, data, rounds=cfg["rounds"],
                       clients_per_round=cfg["cohort"], seed=seed, eval_every=cfg["eval_every"],
                       progress=False)
  counts = np.asarray(jax.device_get(res.state.sampler_state[1])).tolist()
  keep = ("round", "test_accuracy", "train_loss", "sampler/outside_norm_set",
          "sampler/outside_loss_set", "sampler/unseen_clients")
  piece = {"preset": preset, "arm": arm, "seed": seed, "config": cfg,
           "seconds": seconds, "summary": res.summary,
           "participation": counts,
           "history": [{k: h[k] for k in keep if k in h} for h in res.history]}
  write_json(out, piece, indent=None)  # atomic: a killed piece leaves no half-written result
  print(f"{arm} seed {seed}: final {res.summary['final_acc']:.4f} "
        f"best {res.summary['best_acc']:.4f} ({piece['seconds']:.0f} s)", flush=True)


def _piece_path(preset, arm, seed):
  return os.path.join(RESULTS, "client_activation", preset, f"{arm}_s{seed}.json")


def _mean_std(xs):
  return float(np.mean(xs)), float(np.std(xs))


def report(preset: str, arms, seeds, command: str) -> dict | None:
  pieces = {}
  for arm in arms:
    for s in seeds:
      p = _piece_path(preset, arm, s)
      if os.path.exists(p):
        with open(p) as f:
          pieces.setdefault(arm, []).append(json.load(f))
  if not pieces:
    return None
  cfg = PRESETS[preset]
  rows = []
  for arm, ps in pieces.items():
    finals = [p["summary"]["final_acc"] for p in ps]
    bests = [p["summary"]["best_acc"] for p in ps]
    outside_n = [np.mean([h.get("sampler/outside_norm_set", np.nan) for h in p["history"]])
                 for p in ps]
    outside_l = [np.mean([h.get("sampler/outside_loss_set", np.nan) for h in p["history"]])
                 for p in ps]
    all_seen = [next((h["round"] for h in p["history"] if h["sampler/unseen_clients"] == 0),
                     None) for p in ps]
    parts = np.array([p["participation"] for p in ps], float)
    rows.append({
        "arm": arm, "seeds": [p["seed"] for p in ps],
        "final_acc_mean": _mean_std(finals)[0], "final_acc_std": _mean_std(finals)[1],
        "best_acc_mean": _mean_std(bests)[0], "best_acc_std": _mean_std(bests)[1],
        "outside_norm_set_per_round": float(np.mean(outside_n)),
        "outside_loss_set_per_round": float(np.mean(outside_l)),
        "rounds_until_all_seen": all_seen,
        "never_selected_clients": float(np.mean(np.sum(parts == 0, axis=1))),
        "participation_max": float(np.mean(parts.max(axis=1))),
        "seconds_per_piece": float(np.mean([p["seconds"] for p in ps])),
    })
  name = "client_activation" if preset == "fashion_mnist" else f"client_activation_{preset}"
  result = {"preset": preset, "config": cfg, "command": command, "rows": rows}
  write_results(RESULTS, name, command=command, data=result,
                md=_report_md(preset, cfg, rows, command),
                plot=lambda path: _plot(path, pieces))
  return result


def _report_md(preset, cfg, rows, command):
  cols = ["arm", "seeds", "final acc", "best acc", "outside S_N / round", "outside S_L / round",
          "rounds until all seen", "never selected", "max participations", "s / piece"]
  cells = [[r["arm"], len(r["seeds"]), f"{r['final_acc_mean']:.4f} ± {r['final_acc_std']:.4f}",
            f"{r['best_acc_mean']:.4f} ± {r['best_acc_std']:.4f}",
            f"{r['outside_norm_set_per_round']:.3f}", f"{r['outside_loss_set_per_round']:.3f}",
            r["rounds_until_all_seen"], f"{r['never_selected_clients']:.1f}",
            f"{r['participation_max']:.0f}", f"{r['seconds_per_piece']:.0f}"] for r in rows]
  lines = [f"# Client activation: {preset}", "",
           f"Command: `{command}`", "",
           f"N={cfg['num_clients']}, m={cfg['cohort']}, Dirichlet alpha={cfg['alpha']}, "
           f"tau={cfg['tau']}, batch {cfg['batch']}, client SGD(lr={cfg['lr']}, momentum 0.9) + "
           f"decayed weights {cfg['weight_decay']}, LR x0.1 at rounds "
           f"{int(0.5 * cfg['rounds'])} and {int(0.72 * cfg['rounds'])}, {cfg['rounds']} rounds, "
           "unweighted mean, the same LR for every arm (only the sampler differs).", "",
           md_table(cols, cells), "",
           "Mean ± std over the seeds listed; outside-set counts are nan for samplers "
           "without those sets."]
  return "\n".join(lines) + "\n"


def _plot(path, pieces):
  def draw(axes):
    ax, bx = axes
    plot_accuracy(ax, {arm: [p["history"] for p in ps] for arm, ps in pieces.items()})
    for arm, ps in pieces.items():
      counts = np.sort(np.array(ps[0]["participation"]))[::-1]
      bx.plot(np.arange(len(counts)), counts, label=arm)
    bx.set_xlabel("client (sorted by participations, first seed)")
    bx.set_ylabel("rounds participated")
    bx.grid(alpha=0.3)
    bx.legend()

  return save_plot(path, draw, ncols=2, figsize=(11, 4))


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="fashion_mnist")
  p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--piece", nargs=2, metavar=("ARM", "SEED"), help="run one piece (child)")
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--max-minutes", type=float, default=None,
                 help="start no new piece after this long (the driver resumes next time)")
  args = p.parse_args()
  if args.piece:
    arm, seed = args.piece[0], int(args.piece[1])
    run_piece(args.preset, arm, seed, _piece_path(args.preset, arm, seed))
    return
  # the driver's command, less the flags that only pace it (the report covers all pieces done)
  command = command_line(__file__, drop={"--report-only": 0, "--max-minutes": 1})
  t0 = time.time()
  if not args.report_only:
    for seed in args.seeds:  # seed-major: every arm gets a first seed before any gets three
      for arm in args.arms:
        if os.path.exists(_piece_path(args.preset, arm, seed)):
          continue
        if args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes:
          print("time budget reached; rerun to continue", flush=True)
          break
        subprocess.run([sys.executable, __file__, "--preset", args.preset, "--piece", arm,
                        str(seed)], check=True)
        report(args.preset, args.arms, args.seeds, command)
  res = report(args.preset, args.arms, args.seeds, command)
  if res:
    for r in res["rows"]:
      print(f"{r['arm']:16s} final {r['final_acc_mean']:.4f} ± {r['final_acc_std']:.4f} "
            f"({len(r['seeds'])} seeds)")


if __name__ == "__main__":
  main()
