"""Does FedLUAR's gap to FedAvg close in a longer run? (a follow-up to layerwise_converged.py)

In the converged layer-wise study (``layerwise_converged.py --preset fmnist_resnet20``: ResNet-20,
Fashion-MNIST 14x14, 128 clients, Dirichlet 0.1, 32 per round, tau' = 10, 800 local steps = 80
rounds, client LR x0.1 at 50% and 75% of the rounds), FedLUAR (delta = 12) ends 1.2 points below
FedAvg(tau'), and its gap narrows through the run (3-seed mean: -5.2 points at round 40, -2.7 at
60, -1.2 at 80). The paper trains longer (200 rounds of tau = 20). This study asks whether the
gap is a slower approach to the same plateau, which a longer run would close, or a lower plateau.

Protocol: each arm of the base study reruns with ``factor`` x the local-step budget (so
``factor`` x the rounds; the LR decays at 50% and 75% of the longer run, as in the base study),
at the LR the base study tuned for that arm (its seed-0 five-point grid; the same rule for every
arm and no re-tuning at the longer length, so any LR drift with length counts against every
arm alike), three seeds. Everything else is the base study's piece (``layerwise_converged.
run_piece``): the pieces are ``experiments/results/layerwise_converged/<preset>_steps<N>/``, the
same files ``layerwise_converged.py --steps N`` reads.

Arms: ``fedavg_tau`` (the reference), ``fedluar`` (delta = 12, the paper's method),
``fedavg_2tau`` (averaging half as often: the control that says whether any arm behind
FedAvg(tau') at 80 rounds catches up when runs are longer), then ``fedlama_phi2`` and
``fedlama_phi4`` (does FedLAMA's parity with FedAvg(tau') at 80 rounds survive the longer
budget?). Pieces run seed by seed, FedAvg(tau') and FedLUAR first (the claim), the other arms
after, one arm's three seeds at a time.

Report (``experiments/results/layerwise_length_<preset>.{json,md,png}``): per arm and length the
final accuracy (mean +- population std over seeds), the relative uplink, the slope of the last
20% (plateau evidence), the gap to FedAvg(tau') at the same length with its standard error, and
the gap along the run (at 50%, 75% and 100% of the steps); the png shows accuracy against local
steps for both lengths and the gap against the fraction of the run.

  python experiments/layerwise_length.py --preset fmnist_resnet20  # CPU: ~13-16 min a piece
  python experiments/layerwise_length.py --preset fmnist_resnet20 --report-only
  python experiments/layerwise_length.py --preset fmnist_cnn --smoke --out-dir /tmp/lwl
"""

from __future__ import annotations

import math

import layerwise_converged as lc
import numpy as np
from _common import command_line, md_table, save_plot, study_main, write_results

PRESETS = {
    # the base study's preset and the step factor of the longer run
    "fmnist_resnet20": dict(base="fmnist_resnet20", factor=2),
    "fmnist_cnn": dict(base="fmnist_cnn", factor=2),
    # no CIFAR-10 preset: the base study's cifar10_resnet20 already runs the paper's length
    # (200 rounds of tau = 20; experiments/bench_gpu.sh)
}
ARMS = ("fedavg_tau", "fedluar", "fedavg_2tau", "fedlama_phi2", "fedlama_phi4")
CLAIM_ARMS = ("fedavg_tau", "fedluar")  # run first: the claim's two arms
SEEDS = (0, 1, 2)
FRACTIONS = (0.5, 0.75, 1.0)  # points of the run where the gap is read


def config(preset: str, smoke: bool = False) -> dict:
  """``base``: the base study's configuration; ``long``: the same with ``factor`` x steps."""
  spec = PRESETS[preset]
  base = lc.config(spec["base"], smoke=smoke)
  long = lc.config(spec["base"], steps=spec["factor"] * base["steps"], smoke=smoke)
  return {"preset": preset, "factor": spec["factor"], "smoke": smoke, "base": base, "long": long}


def _root(out_dir: str, cfg_run: dict) -> str:
  return lc._roots(cfg_run, out_dir)["main"]


def piece_path(out_dir: str, cfg: dict, arm: str, lr: float, seed: int) -> str:
  return lc.piece_path(_root(out_dir, cfg["long"]), arm, lr, seed)


def run_piece(cfg: dict, arm: str, lr: float, seed: int, out: str, data_dir=None) -> dict:
  return lc.run_piece(cfg["long"], arm, lr, seed, out, data_dir)


def base_lrs(cfg: dict, base_pieces: dict) -> dict[str, float]:
  """Each arm's LR as the base study chose it (its complete seed-0 grid); arms whose base grid
  is incomplete are left out."""
  grid = {(a, lr): q for (a, lr, s), q in base_pieces.items() if s == SEEDS[0]}
  return lc.best_lrs(grid, ARMS, list(cfg["base"]["lrs"]))


def load_pieces(out_dir: str, cfg: dict) -> dict:
  """``{"base": {(arm, lr, seed): piece}, "long": {...}, "lr": {arm: lr}}``: the base study's
  pieces, the longer run's pieces at the base LRs, and those LRs."""
  base, _ = lc._collect(cfg["base"], _root(out_dir, cfg["base"]), ARMS, cfg["base"]["lrs"],
                        SEEDS)
  lrs = base_lrs(cfg, base)
  long = {}
  for arm, lr in lrs.items():
    done, _ = lc._collect(cfg["long"], _root(out_dir, cfg["long"]), [arm], [lr], SEEDS)
    long.update(done)
  return {"base": base, "long": long, "lr": lrs}


def plan(cfg: dict, pieces: dict) -> list[tuple[str, float, int]]:
  """The longer run's pieces still to run: the claim's arms seed by seed, then each other arm's
  seeds in ``ARMS`` order."""
  order = [(a, s) for s in SEEDS for a in CLAIM_ARMS]
  order += [(a, s) for a in ARMS if a not in CLAIM_ARMS for s in SEEDS]
  return [(a, pieces["lr"][a], s) for a, s in order
          if a in pieces["lr"] and (a, pieces["lr"][a], s) not in pieces["long"]]


def _acc_at(piece: dict, frac: float) -> float:
  """Test accuracy at the last evaluation at or before ``frac`` of the run's rounds."""
  rounds = piece["run"]["rounds"]
  accs = [(h["round"], h["test_accuracy"]) for h in piece["history"] if "test_accuracy" in h]
  return float([a for r, a in accs if r <= frac * rounds + 1e-9][-1])


def arm_stats(runs: dict, lrs: dict, arm: str) -> dict | None:
  """Per-seed finals, their mean / population std, uplink, tail slope and the accuracy at each
  of ``FRACTIONS`` of the run, for one arm at one length (None: no seed done)."""
  got = {s: runs[(arm, lrs[arm], s)] for s in SEEDS if (arm, lrs[arm], s) in runs}
  if not got:
    return None
  finals = [p["final_acc"] for p in got.values()]
  mean, std = lc._ms(finals)
  return {"arm": arm, "lr": lrs[arm], "seeds": sorted(got), "rounds": next(iter(
      got.values()))["run"]["rounds"], "final": finals, "final_mean": mean, "final_std": std,
      "rel_uplink": float(np.mean([p["rel_uplink"] for p in got.values()])),
      "tail_slope": float(np.mean([lc.tail_slope(p) for p in got.values()])),
      "at": {str(f): [_acc_at(p, f) for p in got.values()] for f in FRACTIONS}}


def gap(row: dict | None, ref: dict | None) -> dict | None:
  """``row`` minus ``ref`` (final mean accuracy) and the standard error of that difference
  from the two rows' population std (``layerwise_converged.claims``' convention); with the
  seeds both rows share, also the mean gap at each of ``FRACTIONS``."""
  if row is None or ref is None:
    return None
  se = math.sqrt(row["final_std"] ** 2 / len(row["seeds"])
                 + ref["final_std"] ** 2 / len(ref["seeds"]))
  both = [s for s in row["seeds"] if s in ref["seeds"]]
  along = {}
  for f in FRACTIONS:
    a = dict(zip(row["seeds"], row["at"][str(f)]))
    b = dict(zip(ref["seeds"], ref["at"][str(f)]))
    along[str(f)] = float(np.mean([a[s] - b[s] for s in both])) if both else None
  return {"difference": row["final_mean"] - ref["final_mean"], "se": se, "along": along,
          "paired_seeds": both}


def summarise(cfg: dict, pieces: dict) -> dict:
  lrs = pieces["lr"]
  out = {}
  for length, runs in (("base", pieces["base"]), ("long", pieces["long"])):
    rows = {a: arm_stats(runs, lrs, a) for a in ARMS if a in lrs}
    out[length] = {"steps": cfg[length]["steps"], "rows": rows,
                   "gaps": {a: gap(rows[a], rows.get("fedavg_tau")) for a in rows
                            if a != "fedavg_tau"}}
  return out


def claims(summary: dict) -> list[dict]:
  """Verdicts on complete (3-seed) rows only: within 1 point of FedAvg(tau') at the longer
  length, and a gain on FedAvg(tau') against the base length (a narrower gap for an arm below
  it, a wider lead for one above)."""
  out = []
  for arm in ARMS[1:]:
    g0, g1 = summary["base"]["gaps"].get(arm), summary["long"]["gaps"].get(arm)
    rows = [summary[k]["rows"].get(a) for k in ("base", "long") for a in ("fedavg_tau", arm)]
    if g0 is None or g1 is None or any(r is None or len(r["seeds"]) < len(SEEDS) for r in rows):
      continue
    out.append({"claim": f"{arm} within 1 point of FedAvg(tau') with the longer run",
                "holds": g1["difference"] > -lc.MARGIN, "difference": g1["difference"],
                "difference_se": g1["se"]})
    out.append({"claim": f"{arm} gains on FedAvg(tau') with the longer run",
                "holds": g1["difference"] > g0["difference"],
                "difference": g1["difference"] - g0["difference"],
                "difference_se": math.hypot(g0["se"], g1["se"])})
  return out


def _pct(x: float | None, sign: bool = False) -> str:
  if x is None:
    return "—"
  return f"{100 * x:+.2f}" if sign else f"{x:.4f}"


def report(cfg: dict, pieces: dict, out_dir: str, argv=None) -> str:
  summary = summarise(cfg, pieces)
  verdicts = claims(summary)
  command = command_line(__file__, argv, drop={"--report-only": 0, "--max-minutes": 1})
  base_steps, long_steps = cfg["base"]["steps"], cfg["long"]["steps"]
  rows = []
  for length in ("base", "long"):
    for arm, r in summary[length]["rows"].items():
      if r is None:
        rows.append([arm, summary[length]["steps"], "—", "0", "—", "—", "—", "—", "—", "—"])
        continue
      g = summary[length]["gaps"].get(arm)
      rows.append([arm, summary[length]["steps"], r["rounds"], len(r["seeds"]),
                   f"{r['lr']:g}", f"{r['final_mean']:.4f} ± {r['final_std']:.4f}",
                   ", ".join(f"{x:.4f}" for x in r["final"]), f"{r['rel_uplink']:.3f}",
                   f"{r['tail_slope']:+.4f}",
                   "—" if g is None else f"{100 * g['difference']:+.2f} ± {100 * g['se']:.2f}"])
  along = []
  for length in ("base", "long"):
    for arm, g in summary[length]["gaps"].items():
      if g is not None:
        along.append([arm, summary[length]["steps"], len(g["paired_seeds"])]
                     + [_pct(g["along"][str(f)], sign=True) for f in FRACTIONS])
  lines = [
      f"# Layer-wise study, longer runs: {cfg['preset']}{' (smoke)' if cfg['smoke'] else ''}",
      "",
      f"Each arm at the LR the base study ({base_steps} local steps) tuned for it, rerun with "
      f"{cfg['factor']}x the steps ({long_steps}; the LR decays at 50% and 75% of each run). "
      "Final test accuracy, mean ± population std over seeds; the gap is to FedAvg(tau') at the "
      "same length, ± its standard error; tail slope = accuracy per 10% of the run over the "
      "last 20%.", "",
      md_table(["arm", "local steps", "rounds", "seeds", "LR", "final", "per seed",
                "rel. uplink", "tail slope", "gap (points)"], rows), "",
      "The gap to FedAvg(tau') along the run (points; mean over the seeds both arms ran, at the "
      "last evaluation at or before each fraction of the run's rounds):", "",
      md_table(["arm", "local steps", "seeds", *[f"{int(100 * f)}%" for f in FRACTIONS]],
               along), ""]
  if verdicts:
    lines += ["Claims (complete rows only):", "",
              md_table(["claim", "holds", "difference (points)"],
                       [[c["claim"], "yes" if c["holds"] else "no",
                         f"{100 * c['difference']:+.2f} ± {100 * c['difference_se']:.2f}"]
                        for c in verdicts]), ""]
  else:
    lines += ["Claims: none judged yet (every claim waits for 3 seeds of both arms at both "
              "lengths).", ""]
  missing = [a for a in ARMS if a not in pieces["lr"]]
  if missing:
    lines += [f"Not run: {', '.join(missing)} (the base study's seed-0 grid is incomplete; "
              f"run `layerwise_converged.py --preset {cfg['base']['preset']}` first).", ""]
  md = "\n".join(lines)
  stem = f"layerwise_length_{cfg['preset']}{'_smoke' if cfg['smoke'] else ''}"
  data = {"preset": cfg["preset"], "factor": cfg["factor"], "smoke": cfg["smoke"],
          "lr": pieces["lr"], "summary": summary, "claims": verdicts}
  write_results(out_dir, stem, command=command, data=data, md=md,
                plot=lambda path: _plot(path, cfg, pieces))
  return md


def _plot(path: str, cfg: dict, pieces: dict) -> bool:
  lrs = pieces["lr"]

  def mean_curve(runs, arm):
    curves = [lc._curve(runs[(arm, lrs[arm], s)], "steps") for s in SEEDS
              if (arm, lrs[arm], s) in runs]
    if not curves:
      return None
    n = min(len(c[0]) for c in curves)
    return curves[0][0][:n], np.mean([c[1][:n] for c in curves], axis=0)

  def draw(axes):
    ax, gx = axes
    for i, arm in enumerate(a for a in ARMS if a in lrs):
      for length, style in (("base", ":"), ("long", "-")):
        got = mean_curve(pieces[length], arm)
        if got is None:
          continue
        xs, ys = got
        ax.plot(xs, ys, style, color=f"C{i}", label=f"{arm}, {cfg[length]['steps']} steps")
        ref = mean_curve(pieces[length], "fedavg_tau")
        if arm != "fedavg_tau" and ref is not None:
          n = min(len(ys), len(ref[1]))
          gx.plot(xs[:n] / cfg[length]["steps"], 100 * (ys[:n] - ref[1][:n]), style,
                  color=f"C{i}", label=f"{arm}, {cfg[length]['steps']} steps")
    ax.set_xlabel("local steps per client")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
    ax.legend(fontsize=7)
    gx.axhline(0.0, color="k", lw=0.5)
    gx.axhline(-100 * lc.MARGIN, color="k", lw=0.5, ls="--")
    gx.set_xlabel("fraction of the run")
    gx.set_ylabel("accuracy − FedAvg(tau') (points)")
    gx.set_ylim(-10, 5)
    gx.legend(fontsize=7)

  return save_plot(path, draw, ncols=2, figsize=(11, 4))


if __name__ == "__main__":
  import sys

  sys.exit(study_main(sys.modules[__name__]))
