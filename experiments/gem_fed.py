"""Federated sparse fine-tuning with GEM masks: accuracy against uplink bytes, 3 seeds.

Question: in federated fine-tuning of a pre-trained transformer, does uploading only a GEM
mask's entries (1% of the encoder) reach full FedAvg's accuracy for a fraction of the uplink,
and does GEM's mask do better than a random mask of the same size, which the centralized study
(``gem_text.py``) found level with GEM at 1%?

Task (the centralized study's, ``gem_text.task``): pre-trained MiniLM-L6 (all-MiniLM-L6-v2,
installed from a package) with a new 6-way head on the fortunes topics, L=32 tokens. The
training quotes over ``clients`` clients by a Dirichlet(``alpha``) topic split (split seed 0
for every run seed); FedAvg (``jaxfl.simulate``), ``cohort`` clients per round, each
``local_steps`` AdamW steps of ``batch`` (fresh optimizer state each round; decoupled decay
0.01 on >= 2-D leaves; the head at lr 3e-3, the encoder at the arm's lr). Arms:

  full              dense FedAvg; uplink = the whole model per client per round
  gem_entropy_size  GEM's mask (score |G| / |w0|, k_l ∝ H_l n_l: the GEM rule with the best
                    centralized accuracy) at ``budget`` of the eligible encoder entries, built
                    once by the server from the pooled gradients of ``calib_clients`` clients
                    (one batch each at the pre-trained weights: a dense one-time uplink, counted)
  random            a uniform random mask of the same size (per-leaf share as in the
                    centralized study's random arm); it costs no uplink: the clients draw it
                    from the shared seed
  gem_large_w       GEM's mask built the same way but only among the larger half of each
                    leaf's |w0| (added at stop 47: centrally, GEM's ratio with eps = 1e-8
                    spends 30% of its budget on each layer's 1% smallest weights, and without
                    that tail it gains 1.7 points, docs/gem.md)

Masked arms train and upload only the mask's entries plus the head (``masked_uplink``). Both
sides know the mask (the server built GEM's and sent it down once; a random one comes from the
shared seed), so an upload is the mask's values only (``comm.shared_mask_ledger``; no indices).

Tuning (``_common.SeedGrid``, the same rule for every arm): 3 encoder rates per arm, the
arm's centralized pick and its two neighbours on the centralized grid (full 1e-5..1e-4; GEM
1e-4..1e-2; random 1e-3..3e-2), at seed 0; seeds 1-2 at the rate with the best final
*validation* accuracy (300 held-out training quotes); test accuracy (600 test quotes) reported.

Pieces (``experiments/results/gem_fed/<preset>/<arm>_lr<lr>_s<seed>.json``, one per child
process, ~6 min each on 2 CPU cores: 30 rounds of 5 clients x 4 steps), a driver that skips
pieces already written, the report ``experiments/results/gem_fed_<preset>.{json,md,png}``.

  python experiments/gem_fed.py --max-minutes 60        # the CPU study (resumes)
  python experiments/gem_fed.py --report-only
  python experiments/gem_fed.py --preset minilm_fortunes_long   # GPU: 100 clients, 200 rounds
  python experiments/gem_fed.py --smoke --out-dir /tmp/gem_fed  # < 2 min
"""

from __future__ import annotations

import os
import sys

import numpy as np
from _common import (
  SeedGrid,
  command_line,
  md_table,
  save_plot,
  study_main,
  timed,
  write_json,
  write_results,
)

PRESETS = {
    # CPU scale (the centralized study's federated setting, 2.5x longer: at 12 rounds full
    # FedAvg was still climbing).
    "minilm_fortunes": dict(clients=20, alpha=0.5, cohort=5, local_steps=4, batch=16,
                            rounds=30, eval_every=3, calib_clients=10, budget=0.01,
                            test_examples=600),
    # For a GPU: more clients, a larger cohort, the whole test split, 200 rounds.
    "minilm_fortunes_long": dict(clients=100, alpha=0.5, cohort=10, local_steps=8, batch=16,
                                 rounds=200, eval_every=10, calib_clients=20, budget=0.01,
                                 test_examples=0),
}
SMOKE = dict(clients=4, cohort=2, local_steps=1, rounds=2, eval_every=1, calib_clients=2,
             test_examples=50)
ARMS = ("full", "gem_entropy_size", "random", "gem_large_w")
# Each arm's centralized pick (gem_text.md, 1%) and its two neighbours on the centralized grid.
LRS = {"full": (1e-5, 3e-5, 1e-4), "gem_entropy_size": (1e-4, 1e-3, 1e-2),
       "random": (1e-3, 1e-2, 3e-2), "gem_large_w": (1e-4, 1e-3, 1e-2)}
SMOKE_LRS = {"full": (3e-5,), "gem_entropy_size": (1e-3,), "random": (1e-2,),
             "gem_large_w": (1e-3,)}
SEEDS = (0, 1, 2)
TOP = 1
TAIL = 3
COLORS = {"full": "k", "gem_entropy_size": "C3", "random": "C0", "gem_large_w": "C2"}
PAIRS = (("gem_entropy_size", "random"), ("gem_entropy_size", "full"), ("random", "full"),
         ("gem_large_w", "gem_entropy_size"), ("gem_large_w", "random"))


def config(preset: str, smoke: bool = False) -> dict:
  cfg = dict(PRESETS[preset], preset=preset, smoke=smoke)
  if smoke:
    cfg.update(SMOKE)
  return cfg


def lrs_of(cfg, arm):
  return (SMOKE_LRS if cfg["smoke"] else LRS)[arm]


def text_args(cfg):
  """``gem_text``'s arguments for this configuration (its task, optimizer and ``run_fed``)."""
  import gem_text

  argv = ["--fed-clients", str(cfg["clients"]), "--fed-alpha", str(cfg["alpha"]),
          "--fed-cohort", str(cfg["cohort"]), "--fed-local-steps", str(cfg["local_steps"]),
          "--batch", str(cfg["batch"]), "--fed-rounds", str(cfg["rounds"]),
          "--fed-eval-every", str(cfg["eval_every"]),
          "--fed-calib-clients", str(cfg["calib_clients"]),
          "--test-examples", str(cfg["test_examples"])]
  return gem_text.parse_args(argv)


def run_piece(cfg, arm, lr, seed, out, data_dir=None):
  """Trains one (arm, encoder lr, seed) and writes its JSON at ``out``."""
  del data_dir  # the fortunes quotes and the checkpoint install from packages
  import gem_text
  import jax

  gem_text._setup_jax()
  args = text_args(cfg)
  budget = 1.0 if arm == "full" else cfg["budget"]
  r, seconds = timed(gem_text.run_fed, args, gem_text.Piece("fed", arm, budget, lr, seed),
                     "shared", ready=lambda _: None)
  evals = [h for h in r["history"] if "test_accuracy" in h]
  piece = {"preset": cfg["preset"], "arm": arm, "lr": float(lr), "seed": int(seed),
           "budget": budget, "config": cfg, **r, "seconds": seconds,
           "tail_acc": float(np.mean([h["test_accuracy"] for h in evals[-TAIL:]])),
           "backend": jax.default_backend()}
  write_json(out, piece, indent=None)
  print(f"{arm} lr {lr:g} seed {seed}: val {piece['val_acc']:.4f} test {piece['final_acc']:.4f}"
        f" ({r['sim_seconds']:.0f} s)", flush=True)
  return piece


# ----------------------------------------------------------------------------------- driver


def grid_rule(cfg) -> SeedGrid:
  return SeedGrid(ARMS, lambda arm: lrs_of(cfg, arm), "val_acc", SEEDS, TOP)


def plan(cfg, pieces):
  return grid_rule(cfg).plan(pieces)


def piece_path(out_dir, cfg, arm, lr, seed):
  return os.path.join(out_dir, "gem_fed", cfg["preset"] + ("_smoke" if cfg["smoke"] else ""),
                      f"{arm}_lr{lr:g}_s{seed}.json")


def load_pieces(out_dir, cfg):
  return grid_rule(cfg).load(lambda a, lr, s: piece_path(out_dir, cfg, a, lr, s))


def total_bytes(piece) -> np.ndarray:
  """Cumulative uplink after each round, the one-time calibration upload included."""
  return piece["calibration_uplink_bytes"] + np.cumsum(
      [h.get("uplink_bytes", 0.0) for h in piece["history"]])


def bytes_to(piece, target) -> float | None:
  """Uplink (incl. calibration) at the first evaluation at or above ``target``; None if never."""
  cum = total_bytes(piece)
  for i, h in enumerate(piece["history"]):
    if h.get("test_accuracy", -1.0) >= target:
      return float(cum[i])
  return None


def summarise(cfg, pieces):
  rule = grid_rule(cfg)
  table = {}
  for arm in ARMS:
    lr = rule.best(pieces, arm, partial=True)
    if lr is None:
      continue
    runs = [pieces[(arm, lr, s)] for s in SEEDS if (arm, lr, s) in pieces]
    get = lambda k: np.array([r[k] for r in runs], float)
    table[arm] = {"arm": arm, "lr": lr, "seeds": len(runs), "budget": runs[0]["budget"],
                  "final_mean": float(get("final_acc").mean()),
                  "final_std": float(get("final_acc").std()),
                  "tail_mean": float(get("tail_acc").mean()),
                  "tail_std": float(get("tail_acc").std()),
                  "best_mean": float(np.mean([max(h["test_accuracy"] for h in r["history"]
                                                  if "test_accuracy" in h) for r in runs])),
                  "val_mean": float(get("val_acc").mean()),
                  "round_mb": float(np.mean([r["uplink_bytes"] for r in runs])) / 1e6
                  / cfg["rounds"],
                  "calibration_mb": float(runs[0]["calibration_uplink_bytes"]) / 1e6,
                  "total_mb": float(np.mean([total_bytes(r)[-1] for r in runs])) / 1e6,
                  "tuned_entries": runs[0]["tuned_entries"],
                  "seconds": float(get("seconds").mean())}
  targets = []
  if "full" in table:  # bytes to reach fractions of dense FedAvg's final accuracy
    for frac in (0.9, 0.95, 1.0):
      target = frac * table["full"]["tail_mean"]
      row = {"fraction": frac, "target": target}
      for arm, e in table.items():
        got = [bytes_to(pieces[(arm, e["lr"], s)], target) for s in SEEDS
               if (arm, e["lr"], s) in pieces]
        reached = [b for b in got if b is not None]
        row[arm] = {"reached": len(reached), "runs": len(got),
                    "mb_mean": float(np.mean(reached)) / 1e6 if reached else None}
      targets.append(row)
  grid = [{"arm": a, "lr": lr, "seed": s, "val_acc": p["val_acc"], "final_acc": p["final_acc"],
           "tail_acc": p["tail_acc"]} for (a, lr, s), p in sorted(pieces.items())]
  paired = {}
  for a, b in PAIRS:  # arms whose seeds are all in, at their chosen rates
    if a in table and b in table and all((x, table[x]["lr"], s) in pieces
                                         for x in (a, b) for s in SEEDS):
      paired[f"{a} - {b}"] = [pieces[(a, table[a]["lr"], s)]["tail_acc"]
                              - pieces[(b, table[b]["lr"], s)]["tail_acc"] for s in SEEDS]
  return table, targets, grid, paired, rule.complete(pieces)


def report(cfg, pieces, out_dir, argv):
  table, targets, grid, paired, complete = summarise(cfg, pieces)
  stem = "gem_fed_" + cfg["preset"] + ("_smoke" if cfg["smoke"] else "")
  lines = [f"# Federated sparse fine-tuning: GEM vs random masks vs dense FedAvg "
           f"({cfg['preset']})", "",
           f"MiniLM-L6 (pre-trained) + a new head, fortunes topics (L=32). {cfg['clients']} "
           f"clients, Dirichlet({cfg['alpha']}) topics, {cfg['cohort']} per round, "
           f"{cfg['local_steps']} AdamW steps of {cfg['batch']}, {cfg['rounds']} rounds. "
           f"Masks: {100 * cfg['budget']:g}% of the eligible encoder entries (+ the head). "
           "Encoder lr per arm: 3 rates at seed 0, seeds 1-2 at the best final validation "
           "accuracy. Test accuracy over seeds (mean ± std); tail = the mean of the last 3 "
           "evaluations. Uplink: client → server bytes, GEM's one-time dense calibration "
           "gradients included.", ""]
  if not complete:
    lines += ["**Provisional:** not every arm has run its 3 seeds yet.", ""]
  lines.append(md_table(
      ["arm", "lr", "seeds", "tail test acc", "final test acc", "best (mean)", "uplink MB/round",
       "calibration MB", "total uplink MB", "s/run"],
      [[e["arm"], f"{e['lr']:g}", e["seeds"], f"{e['tail_mean']:.4f} ± {e['tail_std']:.4f}",
        f"{e['final_mean']:.4f} ± {e['final_std']:.4f}", f"{e['best_mean']:.4f}",
        f"{e['round_mb']:.1f}", f"{e['calibration_mb']:.1f}", f"{e['total_mb']:.0f}",
        f"{e['seconds']:.0f}"] for e in table.values()]))
  if paired:
    lines += ["", "Paired by seed (same head, split and cohorts), tail accuracy, points:", ""]
    lines += [f"* {k}: " + ", ".join(f"{round(100 * d, 2) + 0.0:+.2f}" for d in v)
              + f" (mean {100 * np.mean(v) + 0.0:+.2f})" for k, v in paired.items()]
    for a in ("gem_entropy_size", "gem_large_w"):
      d = paired.get(f"{a} - random")
      if d is not None:  # the paper's claim: GEM's mask beats other sparse masks
        lines.append(f"* Paper's claim, {a} above the random mask on every seed: "
                     + ("holds" if min(d) > 0 else "does not hold")
                     + f" (mean {100 * np.mean(d) + 0.0:+.2f} points)")
  if targets:
    lines += ["", "Uplink to first reach a fraction of dense FedAvg's tail accuracy (MB, mean "
              "over the seeds that reach it; calibration included):", "",
              md_table(["target"] + list(table),
                       [[f"{100 * t['fraction']:g}% ({t['target']:.4f})"]
                        + [("—" if t[a]["mb_mean"] is None else f"{t[a]['mb_mean']:.0f}")
                           + f" ({t[a]['reached']}/{t[a]['runs']})" for a in table]
                        for t in targets])]
  lines += ["", "Every piece:", "",
            md_table(["arm", "lr", "seed", "val acc", "tail test acc", "final test acc"],
                     [[g["arm"], f"{g['lr']:g}", g["seed"], f"{g['val_acc']:.4f}",
                       f"{g['tail_acc']:.4f}", f"{g['final_acc']:.4f}"] for g in grid])]
  md = "\n".join(lines) + "\n"

  def draw(axes):
    ax, bx = axes
    for arm, e in table.items():
      runs = [pieces[(arm, e["lr"], s)] for s in SEEDS if (arm, e["lr"], s) in pieces]
      idx = [i for i, h in enumerate(runs[0]["history"]) if "test_accuracy" in h]
      x = np.array([runs[0]["history"][i]["round"] for i in idx])
      ys = np.array([[r["history"][i]["test_accuracy"] for i in idx] for r in runs])
      mb = np.mean([total_bytes(r)[idx] for r in runs], 0) / 1e6
      label = f"{arm} (lr {e['lr']:g}, {len(runs)} seeds)"
      for axis, xs in ((ax, x), (bx, mb)):
        axis.plot(xs, ys.mean(0), color=COLORS[arm], marker=".", label=label)
        axis.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0),
                          color=COLORS[arm], alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    bx.set_xscale("log")
    bx.set_xlabel("cumulative uplink MB (GEM: calibration included)")
    bx.set_ylabel("test accuracy")
    bx.legend(fontsize=8)

  if table:
    save_plot(os.path.join(out_dir, stem + ".png"), draw, ncols=2, figsize=(11, 4))
  write_results(out_dir, stem, command=command_line(__file__, argv),
                data={"config": cfg, "lrs": {a: list(lrs_of(cfg, a)) for a in ARMS},
                      "table": table, "targets": targets, "grid": grid, "paired": paired,
                      "complete": complete}, md=md)
  return md


def main(argv=None):
  if "--piece" in (sys.argv[1:] if argv is None else argv):
    import jaxfl

    # A child process: the cohort over the cores, as gem_text's federated pieces ran.
    jaxfl.set_cpu_devices()
  return study_main(sys.modules[__name__], argv)


if __name__ == "__main__":
  sys.exit(main())
