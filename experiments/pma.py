"""Partial model averaging (ALGORITHMS.md §8a) against FedAvg at the same local steps and bytes.

Claim (Lee, Sahu, He & Avestimehr, Neurocomputing 2023, abstract): with many workers, averaging
one of P parameter groups every tau/P local steps, instead of the whole model every tau steps
(FedAvg(tau): the same bytes), keeps the local models closer and reaches a higher accuracy at a
fixed number of iterations (up to +2.2 points with 128 workers on CIFAR-10/100, FEMNIST).

Protocol (every arm): N workers, **all** of them train every round (the paper's setting; PMA keeps
its cohort), Dirichlet(alpha) split (seed 0 for every run seed), unweighted mean, plain local SGD
(no momentum: the client optimizer restarts each round, and a PMA round is P times shorter, so
momentum would be reset P times as often), batch 32, ``steps`` local steps per worker for every
arm, local LR x0.1 at 50% and 75% of the steps. Arms:

  fedavg        FedAvg(tau): full averaging every tau steps                 (uplink 1.0)
  pma           PMA: P groups (equal contiguous pieces of the depth-ordered parameter
                vector), one averaged per round of tau/P steps             (uplink 1.0)
  fedavg_fast   FedAvg(tau/P): full averaging every tau/P steps            (uplink P.0): the
                frequent-averaging reference PMA tries to approach at FedAvg(tau)'s bytes

Evaluated every ``eval_steps`` (a multiple of tau) local steps on the test set: the server model (PMA: each group as of its last
averaging) and, for PMA, also the mean of the workers' local models (what one final full
averaging would give: ``jaxfl.algorithms.pma_local_average``). Also recorded: the workers'
discrepancy (1/m) sum_i ||x_i - mean||^2 of PMA's local models at each evaluation.

Grid (the same budget and rule for every arm): ``lrs`` at seed 0; seeds 1 and 2 at each arm's
``TOP`` best seed-0 LRs (tail = mean test accuracy of the server model over the last 3
evaluations); each arm's LR = the one of those with the highest 3-seed mean tail accuracy (a seed
that diverges counts with its measured accuracy, so an LR at the edge of stability is penalised).

Pieces (``experiments/results/pma/<preset>/<arm>_lr<lr>_s<seed>.json``), one per child
process; the driver skips pieces already written, starts none after ``--max-minutes``, and
rewrites ``experiments/results/pma_<preset>.{json,md,png}`` after each.

  python experiments/pma.py --preset fmnist_cnn14 --max-minutes 120   # the CPU study
  python experiments/pma.py --preset fmnist_cnn14 --report-only
  python experiments/pma.py --preset cifar10_resnet20 --data-dir ~/tensorflow_datasets  # GPU
  python experiments/pma.py --preset fmnist_cnn14 --smoke --out-dir /tmp/pma
"""

from __future__ import annotations

import os
import sys

import numpy as np
from _common import (
  SeedGrid,
  command_line,
  federated_images,
  md_table,
  save_plot,
  study_main,
  timed,
  write_json,
  write_results,
)

PRESETS = {
    # CPU scale: 32 workers (the paper: 128), Fashion-MNIST mean-pooled to 14x14, the pfl/FedAvg
    # CNN; tau = 16 = 4 groups x 4 steps.
    "fmnist_cnn14": dict(dataset="fashion_mnist", model="cnn", image=14, num_clients=32,
                         alpha=0.1, tau=16, groups=4, steps=1280, batch=32,
                         lrs=(0.02, 0.05, 0.1, 0.2, 0.4, 0.8),
                         eval_steps=64, num_test=None),
    # the paper's scale, for a GPU: 128 workers, CIFAR-10 (TFDS), ResNet-20.
    "cifar10_resnet20": dict(dataset="tfds:cifar10", model="resnet20", image=32, num_clients=128,
                             alpha=0.1, tau=16, groups=4, steps=8000, batch=32,
                             lrs=(0.05, 0.1, 0.2), eval_steps=160, num_test=None),
}
SMOKE = dict(num_clients=4, tau=4, groups=2, steps=8, batch=8, lrs=(0.05,), eval_steps=4,
             num_test=256)
ARMS = ("fedavg", "pma", "fedavg_fast")
SEEDS = (0, 1, 2)
COLORS = {"fedavg": "C0", "pma": "C1", "fedavg_fast": "C3"}
TAIL = 3
TOP = 2  # seed-0 LRs per arm that get seeds 1 and 2


def config(preset: str, smoke: bool = False) -> dict:
  cfg = dict(PRESETS[preset], preset=preset, smoke=smoke)
  if smoke:
    cfg.update(SMOKE)
  return cfg


def interval_of(cfg, arm):
  """Local steps per round."""
  return cfg["tau"] if arm == "fedavg" else cfg["tau"] // cfg["groups"]


def rounds_of(cfg, arm):
  return cfg["steps"] // interval_of(cfg, arm)


def load_setup(cfg, data_dir=None):
  import jaxfl

  data = federated_images(cfg["dataset"], cfg["num_clients"], cfg["alpha"], cfg["image"],
                          cfg["num_test"], data_dir)
  model = jaxfl.models.get_model(cfg["model"], data.example_shape, data.num_classes)
  return data, model


def build_arm(cfg, arm, lr, model):
  import jax
  import optax

  import jaxfl

  k = interval_of(cfg, arm)
  rounds = rounds_of(cfg, arm)
  common = dict(client_lr=lr, client_momentum=0.0, batch_size=cfg["batch"], local_steps=k)
  if arm == "pma":
    params, state = model.init(jax.random.key(0))
    algo = jaxfl.algorithms.pma(cfg["groups"], order=jaxfl.algorithms.depth_order(
        model, params, state), name=arm, **common)
  else:
    algo = jaxfl.algorithms.fedavg(weighting="uniform", name=arm, **common)
  decay = optax.piecewise_constant_schedule(1.0, {int(0.5 * rounds): 0.1,
                                                  int(0.75 * rounds): 0.1})
  client = optax.chain(algo.local.optimizer, jaxfl.transforms.scale_by_round_schedule(decay))
  return algo._replace(local=algo.local._replace(optimizer=client)), rounds


def run_piece(cfg, arm, lr, seed, out, data_dir=None):
  import jaxfl
  try:
    jaxfl.set_cpu_devices()
  except RuntimeError:
    pass
  import jax
  import jax.numpy as jnp

  from jaxfl import sharding as jshard
  from jaxfl.data import device_data
  from jaxfl.evaluation import make_evaluate
  from jaxfl.round import build_round

  data, model = load_setup(cfg, data_dir)
  algo, rounds = build_arm(cfg, arm, lr, model)
  devices = jax.devices()
  mesh = jshard.client_mesh(devices) if len(devices) > 1 else None
  rnd = build_round(algo, model, num_clients=data.num_clients,
                    max_client_size=data.max_client_size, clients_per_round=cfg["num_clients"],
                    mesh=mesh)
  dd = device_data(data, mesh)
  evaluate = make_evaluate(model)
  x_test, y_test = jshard.put_replicated((data.x_test, data.y_test), mesh)
  n = cfg["num_clients"]
  local_mean = jax.jit(lambda m: jaxfl.algorithms.pma_local_average(m, n))
  spread = jax.jit(lambda m, avg: sum(
      jnp.sum(jnp.square(r[:n] - a[None])) for r, a in
      zip(jax.tree.leaves(m), jax.tree.leaves(avg))) / n)
  every = cfg["eval_steps"] // interval_of(cfg, arm)  # rounds between evaluations
  key = jax.random.key(seed)
  state = rnd.init(jax.random.fold_in(key, 0))

  def loop():
    nonlocal state
    hist = []
    for r in range(rounds):
      state, m = rnd.step(state, dd, jax.random.fold_in(key, r + 1))
      row = {"round": r + 1, "steps": (r + 1) * interval_of(cfg, arm),
             "train_loss": float(m["train_loss"]), "uplink_bytes": float(m["uplink_bytes"])}
      if (r + 1) % every == 0:
        row["test_accuracy"] = float(evaluate(state.params, state.model_state, x_test,
                                              y_test)["accuracy"])
        if state.memory is not None:
          avg = local_mean(state.memory)
          row["local_mean_accuracy"] = float(evaluate(avg, state.model_state, x_test,
                                                      y_test)["accuracy"])
          row["discrepancy"] = float(spread(state.memory, avg))
      hist.append(row)
    return hist

  history, seconds = timed(loop)
  cum = np.cumsum([h["uplink_bytes"] for h in history])
  for h, c in zip(history, cum):
    h["cum_uplink_bytes"] = float(c)
  evals = [h for h in history if "test_accuracy" in h]
  piece = {"preset": cfg["preset"], "arm": arm, "lr": float(lr), "seed": int(seed),
           "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
           "rounds": rounds, "interval": interval_of(cfg, arm), "seconds": seconds,
           "final_acc": evals[-1]["test_accuracy"],
           "tail_acc": float(np.mean([h["test_accuracy"] for h in evals[-TAIL:]])),
           "uplink_bytes": float(cum[-1]), "history": history,
           "host": {"load_avg": os.getloadavg()[0], "devices": len(devices),
                    "platform": devices[0].platform, "jax": jax.__version__}}
  if arm == "pma":
    piece["final_local_mean_acc"] = evals[-1]["local_mean_accuracy"]
  write_json(out, piece, indent=None)
  print(f"{arm} lr {lr:g} seed {seed}: final {piece['final_acc']:.4f} ({seconds:.0f} s)",
        flush=True)
  return piece


# ----------------------------------------------------------------------------------- driver


def piece_path(out_dir, cfg, arm, lr, seed):
  return os.path.join(out_dir, "pma", cfg["preset"] + ("_smoke" if cfg["smoke"] else ""),
                      f"{arm}_lr{lr:g}_s{seed}.json")


def load_pieces(out_dir, cfg):
  grid = SeedGrid(ARMS, lambda arm: cfg["lrs"], "tail_acc", SEEDS, TOP)
  return grid.load(lambda a, lr, s: piece_path(out_dir, cfg, a, lr, s))


def finalists(cfg, pieces, arm):
  """The arm's ``TOP`` best seed-0 LRs, once its seed-0 grid is done (else None)."""
  got = [(pieces[(arm, lr, 0)]["tail_acc"], lr) for lr in cfg["lrs"] if (arm, lr, 0) in pieces]
  if len(got) < len(cfg["lrs"]):
    return None
  return [lr for _, lr in sorted(got, reverse=True)[:TOP]]


def seed_mean_tail(pieces, arm, lr):
  return float(np.mean([pieces[(arm, lr, s)]["tail_acc"] for s in SEEDS]))


def best_lr(cfg, pieces, arm):
  """The finalist LR with the highest 3-seed mean tail accuracy, once all finalists have 3 seeds."""
  fin = finalists(cfg, pieces, arm)
  if fin is None or any((arm, lr, s) not in pieces for lr in fin for s in SEEDS):
    return None
  return max((seed_mean_tail(pieces, arm, lr), lr) for lr in fin)[1]


def plan(cfg, pieces):
  """Seed 0 over the grid (middle LR first, all arms), then seeds 1, 2 at each arm's finalists."""
  lrs = list(cfg["lrs"])
  mid = lrs[len(lrs) // 2]
  order = [(arm, mid, 0) for arm in ARMS] + [(arm, lr, 0) for lr in lrs if lr != mid
                                             for arm in ARMS]
  todo = [p for p in order if p not in pieces]
  if todo:
    return todo
  return [(arm, lr, s) for s in SEEDS[1:] for rank in range(TOP) for arm in ARMS
          for lr in finalists(cfg, pieces, arm)[rank:rank + 1] if (arm, lr, s) not in pieces]


def provisional_lr(cfg, pieces, arm):
  """Before :func:`best_lr` is known: the best LR by mean tail accuracy over the seeds done so
  far, among the finalists once the seed-0 grid is done, else among the seed-0 points done."""
  fin = finalists(cfg, pieces, arm)
  cands = fin if fin is not None else [lr for lr in cfg["lrs"] if (arm, lr, 0) in pieces]
  got = [(np.mean([pieces[(arm, lr, s)]["tail_acc"] for s in SEEDS if (arm, lr, s) in pieces]),
          lr) for lr in cands]
  return max(got)[1] if got else None


def diverged(piece) -> bool:
  """Chance-level final accuracy (10 classes): the run blew up."""
  return piece["final_acc"] <= 0.11


def seed_stats(pieces, arm, lr):
  runs = [pieces[(arm, lr, s)] for s in SEEDS if (arm, lr, s) in pieces]
  fin = np.array([r["final_acc"] for r in runs])
  tail = np.array([r["tail_acc"] for r in runs])
  out = {"arm": arm, "lr": lr, "seeds": len(runs), "final_mean": float(fin.mean()),
         "final_std": float(fin.std()), "tail_mean": float(tail.mean()),
         "diverged": int(sum(diverged(r) for r in runs))}
  if arm == "pma":
    lm = np.array([r["final_local_mean_acc"] for r in runs])
    out.update(local_mean_mean=float(lm.mean()), local_mean_std=float(lm.std()))
  return out, runs


def summarise(cfg, pieces):
  table, finals = {}, []
  complete = all(best_lr(cfg, pieces, arm) is not None for arm in ARMS)
  for arm in ARMS:
    lr = best_lr(cfg, pieces, arm) if complete else provisional_lr(cfg, pieces, arm)
    if lr is None:
      continue
    entry, runs = seed_stats(pieces, arm, lr)
    entry.update(uplink_bytes=float(runs[0]["uplink_bytes"]), rounds=runs[0]["rounds"],
                 interval=runs[0]["interval"],
                 seconds=float(np.mean([r["seconds"] for r in runs])), grid_complete=complete)
    table[arm] = entry
    for f in finalists(cfg, pieces, arm) or []:
      finals.append(seed_stats(pieces, arm, f)[0])
  grid = [{"arm": a, "lr": lr, "tail_acc": pieces[(a, lr, 0)]["tail_acc"],
           "final_acc": pieces[(a, lr, 0)]["final_acc"]}
          for a in ARMS for lr in cfg["lrs"] if (a, lr, 0) in pieces]
  return table, grid, finals


def report(cfg, pieces, out_dir, argv):
  table, grid, finals = summarise(cfg, pieces)
  stem = "pma_" + cfg["preset"] + ("_smoke" if cfg["smoke"] else "")
  base = table.get("fedavg", {}).get("uplink_bytes")
  lines = [f"# Partial model averaging vs FedAvg ({cfg['preset']})", "",
           f"{cfg['num_clients']} workers, all training every round, Dirichlet "
           f"{cfg['alpha']}, {cfg['steps']} local steps per worker, tau = {cfg['tau']}, "
           f"P = {cfg['groups']} groups. LR per arm: seed 0 over the grid {list(cfg['lrs'])}, "
           f"seeds 1-2 at each arm's {TOP} best seed-0 LRs, then the one with the best 3-seed "
           "mean tail accuracy (a diverged seed counts at its accuracy). Final test accuracy "
           "over seeds (mean ± std).", ""]
  rows = []
  for arm, e in table.items():
    acc = f"{e['final_mean']:.4f} ± {e['final_std']:.4f}"
    local = (f"{e['local_mean_mean']:.4f} ± {e['local_mean_std']:.4f}"
             if "local_mean_mean" in e else "—")
    rel = e["uplink_bytes"] / base if base else float("nan")
    rows.append([arm, e["interval"], e["rounds"], f"{e['lr']:g}", e["seeds"], acc, local,
                 f"{rel:.2f}", f"{e['seconds']:.0f}"])
  if table and not next(iter(table.values()))["grid_complete"]:
    lines += ["**Provisional:** not every finalist LR has 3 seeds yet, so each arm's LR below "
              "is its best on the runs done so far.", ""]
  lines.append(md_table(["arm", "steps/round", "rounds", "LR", "seeds", "final acc (server)",
                         "final acc (local mean)", "uplink vs FedAvg", "s/run"], rows))
  if finals:
    lines += ["", "Finalist LRs (diverged = seeds ending at chance accuracy):", "",
              md_table(["arm", "LR", "seeds", "diverged", "final acc", "tail acc (mean)"],
                       [[f["arm"], f"{f['lr']:g}", f["seeds"], f["diverged"],
                         f"{f['final_mean']:.4f} ± {f['final_std']:.4f}",
                         f"{f['tail_mean']:.4f}"] for f in finals])]
  lines += ["", "Seed-0 grid (tail = mean of the last 3 evaluations):", "",
            md_table(["arm", "LR", "tail acc", "final acc"],
                     [[g["arm"], f"{g['lr']:g}", f"{g['tail_acc']:.4f}",
                       f"{g['final_acc']:.4f}"] for g in grid])]
  md = "\n".join(lines) + "\n"

  def draw(axes):
    for arm, e in table.items():
      runs = [pieces[(arm, e["lr"], s)] for s in SEEDS if (arm, e["lr"], s) in pieces]
      for key, ax, xkey in (("test_accuracy", axes[0], "steps"),
                            ("test_accuracy", axes[1], "cum_uplink_bytes")):
        ev = [[h for h in r["history"] if key in h] for r in runs]
        x = np.array([h[xkey] for h in ev[0]], float)
        y = np.array([[h[key] for h in e_] for e_ in ev])
        c = COLORS[arm]
        ax.plot(x, y.mean(0), color=c, label=f"{arm} (lr {e['lr']:g})")
        ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=c, alpha=0.2)
      if arm == "pma":
        ev = [[h for h in r["history"] if "local_mean_accuracy" in h] for r in runs]
        x = np.array([h["steps"] for h in ev[0]], float)
        y = np.array([[h["local_mean_accuracy"] for h in e_] for e_ in ev])
        axes[0].plot(x, y.mean(0), "--", color="k", label="pma, local mean")
    axes[0].set_xlabel("local steps per worker")
    axes[1].set_xlabel("cumulative uplink bytes")
    for ax in axes:
      ax.set_ylabel("test accuracy")
      ax.set_ylim(bottom=0.5)
      ax.legend(fontsize=7)

  plot = os.path.join(out_dir, stem + ".png")
  if table:
    save_plot(plot, draw, ncols=2)
  write_results(out_dir, stem, command=command_line(__file__, argv),
                data={"config": cfg, "table": table, "finalists": finals, "grid": grid},
                md=md)
  return md


def main(argv=None):
  return study_main(sys.modules[__name__], argv)


if __name__ == "__main__":
  sys.exit(main())
