"""EmbracingFL (weak clients train output-side layers only) against full and strong-only FedAvg.

Lee, Zhang, Prakash, Niu and Avestimehr, IEEE TMC 2024 (ALGORITHMS.md §8b; docs/embracing.md).
The setting is PriSM's Fashion-MNIST preset (``experiments/prism.py``: N=100 equal-size
Dirichlet(0.1) clients, 20 per round, one local epoch of batch 32, SGD momentum 0.9 with clip 5,
weight decay 2e-4 and a cosine LR per round from 0.05 to 1e-4, 200 rounds, unweighted mean,
CNN conv 16/32/32 + BN + fc), so every arm uses the same client recipe, untuned, and the
full-model arm is PriSM's own ``full`` pieces when they exist. Each client is weak, moderate or
strong with probabilities 0.5 / 0.3 / 0.2 (PriSM's capacity ratios), drawn once per seed.

  full          every client trains the whole model (FedAvg; the paper's "all strong" bound)
  embracing     weak clients train the last conv block + fc, moderate ones the last two conv
                blocks + fc, strong ones everything (the paper's method)
  strong_only   only the strong clients train (the others are sampled but send nothing: what
                FedAvg does when weak clients cannot hold the model)
  weak_all      every client trains the weak suffix only (no client trains conv1/conv2)
  heterofl      HeteroFL (Diao et al., ICLR 2021), the paper's width baseline: weak and moderate
                clients train the first ceil(r C) channels of every layer, r the widest ratio
                (in 1/16 steps) whose training memory fits the class's EmbracingFL memory
  fjord         FjORD's ordered dropout (Horvath et al., NeurIPS 2021), drawn once per round
                (the paper: per batch): each client trains a width drawn uniformly from 5
                evenly spaced levels between the weak width and 1, up to its class's width

The suffix lengths are fixed by layers (3 / 5 / 7 of the 7 modules); the memory each needs is
XLA's estimate for one local step (``jaxfl.algorithms.suffix_training_bytes``), reported.

Resumable: one arm x one seed per child process, each writing its own JSON under
``<out-dir>/embracing/<tag>/``; the driver skips pieces already done and rewrites the report
(``embracing.{json,md,png}``) after each.

  python experiments/embracing.py                       # 3 arms x 3 seeds (+ PriSM's full pieces)
  python experiments/embracing.py --arms weak_all       # the extra arm
  python experiments/embracing.py --arms heterofl fjord # the width baselines at equal memory
  python experiments/embracing.py --smoke --seeds 0     # 2 rounds, a check
  python experiments/embracing.py --report-only
  python experiments/embracing.py --preset cifar10_resnet18 --data-npz cifar10.npz   # GPU
"""

from __future__ import annotations

import argparse
import json
import math
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
from prism import PRESETS, _fmt, _mean_std, load_data, make_model

ARMS = ("full", "embracing", "strong_only")
EXTRA_ARMS = ("weak_all", "heterofl", "fjord")
FJORD_LEVELS = 5  # FjORD's uniform discrete set D: this many widths, the weak width to 1
CLASSES = ("weak", "moderate", "strong")
RATIOS = (0.5, 0.3, 0.2)
# modules trained per class, counted from the output side (the CNN: conv1 bn1 conv2 bn2 conv3
# bn3 fc -> weak: conv3 bn3 fc, moderate: conv2 .. fc, strong: all). For a deeper model the
# same share of its modules is used (rounded up).
SUFFIX_SHARE = {"weak": 3 / 7, "moderate": 5 / 7, "strong": 1.0}


def client_classes(num_clients: int, seed: int) -> np.ndarray:
  """i32[N]: each client's class (0 weak, 1 moderate, 2 strong), drawn once per seed."""
  rng = np.random.default_rng(seed)
  return rng.choice(len(CLASSES), size=num_clients, p=RATIOS).astype(np.int32)


def suffix_lengths(num_modules: int) -> dict:
  return {c: max(1, math.ceil(SUFFIX_SHARE[c] * num_modules - 1e-9)) for c in CLASSES}


def narrow_model(cfg: dict, shape, classes: int, keep: float):
  """The dense model with every hidden layer cut to ``ceil(keep * C)`` channels (HeteroFL's
  sub-model as a network of its own, for its memory estimate)."""
  import jaxfl
  from jaxfl.models._factorised import keep_count

  if cfg["model"] == "resnet18":
    widths = [keep_count(keep, w) for w in (64, 128, 256, 512)]
    return jaxfl.models.prism_resnet18(shape, classes, factorise=False, widths=widths)
  return jaxfl.models.prism_cnn(shape, classes, features=[keep_count(keep, f)
                                                          for f in cfg["features"]],
                                factorise=False)


WIDTH_STEPS = 16  # HeteroFL's ratio is searched on a grid of 1/16 steps


def width_fractions(cfg, data, memory) -> dict:
  """XLA's bytes for one local step of each width ratio's sub-model, as a fraction of full
  training, and per class the widest ratio within that class's EmbracingFL memory."""
  import jax
  import optax

  import jaxfl

  opt = optax.sgd(cfg["lr"], momentum=0.9)
  keeps = [(i + 1) / WIDTH_STEPS for i in range(WIDTH_STEPS)]
  fractions = []
  for keep in keeps:
    model = narrow_model(cfg, data.example_shape, data.num_classes, keep)
    params = model.init(jax.random.key(0))[0]
    order = jaxfl.algorithms.depth_order(model, params)
    full = jaxfl.algorithms.suffix_training_bytes(model, params, order, opt, cfg["batch"],
                                                  lengths=[len(order)])[0]
    fractions.append(float(full / memory["bytes_by_suffix"][-1]))
  pick = {}
  for c in CLASSES:
    budget = 1.0 if c == "strong" else memory[c]["memory_fraction"]
    fits = [k for k, f in zip(keeps, fractions) if f <= budget * (1 + 1e-9)]
    pick[c] = max(fits) if fits else None
  return {"keeps": keeps, "fractions": fractions, **pick}


def fjord_levels(widths) -> list[float]:
  """FjORD's width set: ``FJORD_LEVELS`` evenly spaced ratios from the weak width to 1 (with
  the study's widths 1/4 and 7/16 both are levels)."""
  return [float(x) for x in np.linspace(widths["weak"], 1.0, FJORD_LEVELS)]


def build(cfg: dict, arm: str, seed: int, data, widths=None):
  """(algorithm, model, per-client suffix length or width ratio or None, the module order)
  of one arm (``widths``: :func:`width_fractions`'s table, for ``heterofl``)."""
  import jax

  import jaxfl

  A = jaxfl.algorithms
  common = dict(client_lr=cfg["lr"], client_momentum=0.9, weight_decay=cfg["weight_decay"],
                clip_norm=cfg["clip"], rounds=cfg["rounds"], final_lr=cfg["final_lr"],
                batch_size=cfg["batch"], local_epochs=cfg["local_epochs"])
  model = make_model(cfg, data.example_shape, data.num_classes, False)
  params = model.init(jax.random.key(0))[0]
  order = A.depth_order(model, params)
  if arm == "full":
    return A.prism_fedavg(name=arm, **common), model, None, order
  classes = client_classes(data.num_clients, seed)
  if arm in ("heterofl", "fjord"):
    if widths is None or any(widths[c] is None for c in CLASSES):
      raise ValueError(f"{arm} needs a width per class within its memory, got {widths}")
    keep = np.asarray([widths[c] for c in CLASSES], np.float64)[classes]
    if arm == "heterofl":
      return A.heterofl(keep, order, name=arm, **common), model, keep, order
    levels = fjord_levels(widths)
    return A.fjord(keep, order, levels=levels, name=arm, **common), model, keep, order
  ell = suffix_lengths(len(order))
  per_class = {"embracing": [ell["weak"], ell["moderate"], ell["strong"]],
               "strong_only": [0, 0, ell["strong"]],
               "weak_all": [ell["weak"]] * 3}[arm]
  trained = np.asarray(per_class, np.int32)[classes]
  algo = A.embracingfl(trained, order, name=arm, **common)
  return algo, model, trained, order


def memory_fractions(cfg, data, order) -> dict:
  """XLA's bytes for one local step per class's suffix, as a fraction of full training."""
  import jax
  import optax

  import jaxfl

  model = make_model(cfg, data.example_shape, data.num_classes, False)
  params = model.init(jax.random.key(0))[0]
  opt = optax.sgd(cfg["lr"], momentum=0.9)
  mem = jaxfl.algorithms.suffix_training_bytes(model, params, order, opt, cfg["batch"])
  ell = suffix_lengths(len(order))
  return {"bytes_by_suffix": mem.tolist(), "num_params": jaxfl.tree.num_params(params),
          **{c: {"modules": ell[c], "trains": list(order[len(order) - ell[c]:]),
                 "memory_fraction": float(mem[ell[c] - 1] / mem[-1])} for c in CLASSES}}


def run_piece(cfg: dict, arm: str, seed: int, out: str, data_dir=None, data_npz=None,
              widths=None) -> None:
  import jaxfl

  jaxfl.set_cpu_devices()
  data = load_data(cfg, data_dir, data_npz)
  algo, model, trained, order = build(cfg, arm, seed, data, widths)
  res, seconds = timed(jaxfl.simulate, algo, model, data, rounds=cfg["rounds"],
                       clients_per_round=cfg["cohort"], seed=seed, eval_every=cfg["eval_every"],
                       progress=False)
  keep = ("round", "test_accuracy", "train_loss", "rel_uplink", "uplink_bytes")
  hist = [{k: v for k, v in h.items() if k in keep} for h in res.history]
  per_client = None if trained is None else np.asarray(trained).tolist()
  piece = {"arm": arm, "seed": seed, "config": cfg, "seconds": seconds,
           "summary": res.summary, "order": order,
           "trained": per_client if arm not in ("heterofl", "fjord") else None,
           "keep": per_client if arm in ("heterofl", "fjord") else None, "history": hist}
  write_json(out, piece, indent=None)  # atomic: a killed piece leaves no half-written result
  print(f"{arm} seed {seed}: final {res.summary['final_acc']:.4f} "
        f"best {res.summary['best_acc']:.4f} ({seconds:.0f} s)", flush=True)


def _load_pieces(tag, arms, seeds, out_dir, cfg) -> dict:
  """Pieces per arm; ``full`` falls back to PriSM's pieces of the same preset and config."""
  pieces = {}
  for arm in arms:
    for s in seeds:
      paths = [os.path.join(out_dir, "embracing", tag, f"{arm}_s{s}.json")]
      if arm == "full":
        paths.append(os.path.join(out_dir, "prism", tag, f"full_s{s}.json"))
      for p in paths:
        if os.path.exists(p):
          with open(p) as f:
            piece = json.load(f)
          if {k: piece["config"].get(k) for k in cfg} == cfg:
            pieces.setdefault(arm, []).append({**piece, "source": os.path.relpath(p, out_dir)})
            break
  return pieces


def _round_bytes(piece, cfg, memory) -> list | None:
  """Uplink bytes per round: recorded, or (PriSM's pieces keep only ``rel_uplink``) that
  share of every sampled client sending one dense float32 model."""
  hist = piece["history"]
  if all("uplink_bytes" in h for h in hist):
    return [h["uplink_bytes"] for h in hist]
  if memory and all("rel_uplink" in h for h in hist):
    return [h["rel_uplink"] * cfg["cohort"] * 4 * memory["num_params"] for h in hist]
  return None


def _rel_uplink(piece, cfg, memory) -> float | None:
  """Uplink bytes over all rounds / (rounds x cohort x one dense float32 model)."""
  sent = _round_bytes(piece, cfg, memory)
  if not sent or not memory:
    return None
  return sum(sent) / (cfg["rounds"] * cfg["cohort"] * 4 * memory["num_params"])


def report(tag: str, cfg: dict, arms, seeds, command: str, out_dir: str, memory=None):
  pieces = _load_pieces(tag, arms, seeds, out_dir, cfg)
  if not pieces:
    return None
  finals = {arm: [p["summary"]["final_acc"] for p in ps] for arm, ps in pieces.items()}
  rows = []
  for arm, ps in pieces.items():
    f, b = _mean_std(finals[arm]), _mean_std([p["summary"]["best_acc"] for p in ps])
    ups = [_rel_uplink(p, cfg, memory) for p in ps]
    share = [np.mean(np.asarray(p["trained"]) == len(p["order"])) for p in ps
             if p.get("trained")]
    rows.append({"arm": arm, "seeds": [p["seed"] for p in ps], "final_acc_mean": f[0],
                 "final_acc_std": f[1], "best_acc_mean": b[0], "best_acc_std": b[1],
                 "rel_uplink": _mean_std(ups)[0],
                 "full_model_clients": float(np.mean(share)) if share else 1.0,
                 "seconds_per_piece": float(np.mean([p["seconds"] for p in ps])),
                 "sources": [p["source"] for p in ps]})
  claims = []

  def diff(a, b):
    """a - b over paired seeds: (mean, its standard error (ddof 0 std / sqrt(n)), n)."""
    sa = {p["seed"]: p["summary"]["final_acc"] for p in pieces.get(a, [])}
    sb = {p["seed"]: p["summary"]["final_acc"] for p in pieces.get(b, [])}
    common = sorted(set(sa) & set(sb))
    if not common:
      return None
    d = np.array([sa[s] - sb[s] for s in common])
    return float(d.mean()), float(d.std() / math.sqrt(len(d))), len(d)

  for a, b, what in (("embracing", "full", "EmbracingFL within 1 point of all-strong FedAvg"),
                     ("embracing", "strong_only", "EmbracingFL above strong-only FedAvg"),
                     ("embracing", "weak_all", "strong clients' prefix training matters"),
                     ("embracing", "heterofl",
                      "EmbracingFL above HeteroFL at the same client memory"),
                     ("embracing", "fjord",
                      "EmbracingFL above FjORD (per-round ordered dropout) at the same memory")):
    d = diff(a, b)
    if d is None:
      continue
    m, se, n = d
    ok = m > -0.01 if b == "full" else m > 2 * se
    claims.append({"claim": what, "a": a, "b": b, "difference": m, "se": se, "seeds": n,
                   "holds": bool(ok)})
  result = {"tag": tag, "config": cfg, "command": command, "memory": memory, "rows": rows,
            "claims": claims}
  stem = "embracing" if tag == "fashion_mnist" else f"embracing_{tag}"
  write_results(out_dir, stem, command=command, data=result,
                md=_report_md(tag, cfg, rows, claims, memory),
                plot=lambda path: _plot(path, pieces, cfg, memory))
  return result


def _report_md(tag, cfg, rows, claims, memory):
  part = "IID" if cfg["alpha"] is None else f"equal-size Dirichlet alpha={cfg['alpha']}"
  lines = [f"# EmbracingFL: {tag}", "",
           f"{cfg['dataset']}, model {cfg['model']} {cfg.get('features') or ''}, "
           f"N={cfg['num_clients']}, m={cfg['cohort']}, {part}, batch {cfg['batch']}, "
           f"{cfg['local_epochs']} local epoch(s), SGD(lr={cfg['lr']}, momentum 0.9) cosine per "
           f"round to {cfg['final_lr']}, clip {cfg['clip']}, weight decay {cfg['weight_decay']}, "
           f"{cfg['rounds']} rounds; unweighted mean. Clients weak / moderate / strong with "
           f"probabilities {RATIOS[0]} / {RATIOS[1]} / {RATIOS[2]}, drawn once per seed.", ""]
  if memory:
    widths = memory.get("widths")
    mrows = [[c, memory[c]["modules"], ", ".join(n.strip("[]'") for n in memory[c]["trains"]),
              _fmt(memory[c]["memory_fraction"], ".3f")] for c in CLASSES]
    head = ["class", "modules", "trains", "memory"]
    if widths:
      head += ["HeteroFL width r", "its memory"]
      for row, c in zip(mrows, CLASSES):
        k = widths[c]
        row += [_fmt(k, ".4g"), _fmt(widths["fractions"][widths["keeps"].index(k)], ".3f")
                if k is not None else "-"]
    lines += ["What each class trains (output side) and XLA's memory estimate of one local "
              "step of it, over full training:", "", md_table(head, mrows), ""]
    if widths:
      lines += ["HeteroFL's width per class is the widest ratio r (a multiple of "
                f"1/{WIDTH_STEPS}) whose sub-model (every hidden layer cut to ceil(r C) "
                "channels) needs no more memory for one local step than that class's "
                "EmbracingFL suffix. FjORD's clients draw a width each round, uniformly "
                "among " + ", ".join(f"{x:.4g}" for x in fjord_levels(widths))
                + " up to their class's width.", ""]
  cells = [[r["arm"], len(r["seeds"]),
            f"{_fmt(r['final_acc_mean'])} ± {_fmt(r['final_acc_std'])}",
            f"{_fmt(r['best_acc_mean'])} ± {_fmt(r['best_acc_std'])}",
            _fmt(r["rel_uplink"], ".3f"), _fmt(r["full_model_clients"], ".2f"),
            f"{r['seconds_per_piece'] / 60:.1f}"] for r in rows]
  lines += [md_table(["arm", "seeds", "final acc", "best acc", "rel. uplink",
                      "clients training conv1", "min / piece"], cells), "",
            "Mean ± std (ddof 0) over the seeds; final = the last evaluation. Rel. uplink: "
            "bytes sent over all rounds over a dense float32 upload by every sampled client "
            "every round."]
  if claims:
    lines += ["", "| claim | difference (points, paired seeds) | holds? |", "|---|---|---|"]
    for c in claims:
      lines.append(f"| {c['claim']} ({c['a']} - {c['b']}) | {100 * c['difference']:+.2f} ± "
                   f"{100 * c['se']:.2f} ({c['seeds']} seeds) | "
                   f"{'yes' if c['holds'] else 'no'} |")
    lines += ["", "The first claim holds when the mean difference is above -1 point; the others "
              "when it is above two standard errors."]
  srcs = sorted({s for r in rows for s in r["sources"] if s.startswith("prism")})
  if srcs:
    lines += ["", "The `full` pieces are PriSM's (same preset and config): " + ", ".join(srcs)]
  return "\n".join(lines) + "\n"


def _plot(path, pieces, cfg, memory):
  def draw(axes):
    ax, bx = axes
    plot_accuracy(ax, {arm: [p["history"] for p in ps] for arm, ps in pieces.items()})
    for arm, ps in pieces.items():
      h, sent = ps[0]["history"], _round_bytes(ps[0], cfg, memory)
      if sent:
        cum = np.cumsum(sent) / 1e6
        acc = [x.get("test_accuracy") for x in h]
        pts = [(u, a) for u, a in zip(cum, acc) if a is not None]
        bx.plot([u for u, _ in pts], [a for _, a in pts], label=f"{arm} (seed {ps[0]['seed']})")
    bx.set_xlabel("cumulative uplink MB")
    bx.set_ylabel("test accuracy")
    bx.grid(alpha=0.3)
    if bx.lines:
      bx.legend()

  return save_plot(path, draw, ncols=2, figsize=(11, 4))


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="fashion_mnist")
  p.add_argument("--arms", nargs="+", choices=ARMS + EXTRA_ARMS, default=list(ARMS))
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--piece", nargs=2, metavar=("ARM", "SEED"), help="run one piece (child)")
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--max-minutes", type=float, default=None,
                 help="start no new piece after this long (the driver resumes next time)")
  p.add_argument("--smoke", action="store_true", help="2 rounds, evaluated every round")
  p.add_argument("--lr", type=float, default=None,
                 help="client LR other than the preset's (pieces and report get an _lr tag)")
  p.add_argument("--lr-grid-report", type=float, nargs="+", default=None, metavar="LR",
                 help="only write embracing_lr_grid.{md,json}: seed-0 final accuracy of every "
                      "arm at these LRs (the preset's LR is the untagged study)")
  p.add_argument("--out-dir", default=RESULTS, help="results folder (default experiments/results)")
  p.add_argument("--data-dir", default=None, help="raw data folder (Fashion-MNIST IDX, TFDS)")
  p.add_argument("--data-npz", default=None,
                 help=".npz with x_train, y_train, x_test, y_test (e.g. CIFAR-10 on a GPU box)")
  args = p.parse_args()
  cfg = dict(PRESETS[args.preset])
  tag = args.preset
  if args.smoke:
    cfg.update(rounds=2, eval_every=1)
    tag += "_smoke"
  if args.lr_grid_report:
    lr_grid_report(args, cfg, tag)
    return
  if args.lr is not None and args.lr != cfg["lr"]:
    cfg["lr"] = args.lr
    tag += f"_lr{args.lr:g}"
  piece_path = lambda arm, s: os.path.join(args.out_dir, "embracing", tag, f"{arm}_s{s}.json")
  if args.piece:
    arm, seed = args.piece[0], int(args.piece[1])
    widths = _widths(cfg, args, _memory(cfg, args)) if arm in ("heterofl", "fjord") else None
    run_piece(cfg, arm, seed, piece_path(arm, seed), args.data_dir, args.data_npz, widths)
    return
  command = command_line(__file__, drop={"--report-only": 0, "--max-minutes": 1})
  forward = list(sys.argv[1:])
  for flag in ("--report-only", "--max-minutes", "--arms", "--seeds"):
    while flag in forward:
      i = forward.index(flag)
      j = i + 1
      while j < len(forward) and not forward[j].startswith("--") and flag != "--report-only":
        j += 1
      del forward[i:j]
  all_arms = list(ARMS + EXTRA_ARMS)  # the report covers every arm with pieces
  memory = _memory(cfg, args)
  if {"heterofl", "fjord"} & set(args.arms) or os.path.exists(_widths_path(args)):
    memory = {**memory, "widths": _widths(cfg, args, memory)}
  t0 = time.time()
  if not args.report_only:
    for seed in args.seeds:  # seed-major: every arm gets a first seed before any gets three
      for arm in args.arms:
        if _load_pieces(tag, [arm], [seed], args.out_dir, cfg):
          continue
        if args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes:
          print("time budget reached; rerun to continue", flush=True)
          break
        subprocess.run([sys.executable, __file__, *forward, "--piece", arm, str(seed)],
                       check=True)
        report(tag, cfg, all_arms, args.seeds, command, args.out_dir, memory)
  res = report(tag, cfg, all_arms, args.seeds, command, args.out_dir, memory)
  if res:
    for r in res["rows"]:
      print(f"{r['arm']:14s} final {_fmt(r['final_acc_mean'])} ± {_fmt(r['final_acc_std'])} "
            f"({len(r['seeds'])} seeds), uplink {_fmt(r['rel_uplink'], '.3f')}")


def _memory(cfg, args):
  """The memory table (cached next to the pieces; a few seconds of compiling)."""
  path = os.path.join(args.out_dir, "embracing", args.preset, "memory.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  import jaxfl

  jaxfl.set_cpu_devices()
  data = load_data(cfg, args.data_dir, args.data_npz)
  import jax

  model = make_model(cfg, data.example_shape, data.num_classes, False)
  order = jaxfl.algorithms.depth_order(model, model.init(jax.random.key(0))[0])
  mem = memory_fractions(cfg, data, order)
  write_json(path, mem)
  return mem


def lr_grid_report(args, cfg, tag):
  """Seed-0 final accuracy per arm and client LR (pieces of the untagged study at the
  preset's LR, of ``<tag>_lr<LR>`` otherwise) and each arm's best LR."""
  lrs = sorted(set(args.lr_grid_report) | {cfg["lr"]})
  arms = list(ARMS + EXTRA_ARMS)
  grid = {}
  for lr in lrs:
    c = {**cfg, "lr": lr}
    t = tag if lr == cfg["lr"] else f"{tag}_lr{lr:g}"
    for arm, ps in _load_pieces(t, arms, [0], args.out_dir, c).items():
      grid.setdefault(arm, {})[lr] = ps[0]["summary"]["final_acc"]
  rows, cells = [], []
  for arm in arms:
    if len(grid.get(arm, {})) < 2:
      continue
    best = max(grid[arm], key=grid[arm].get)
    rows.append({"arm": arm, "final_acc": {str(k): v for k, v in grid[arm].items()},
                 "best_lr": best})
    cells.append([arm] + [_fmt(grid[arm].get(lr)) if lr in grid[arm] else "-" for lr in lrs]
                 + [f"{best:g}"])
  command = command_line(__file__, drop={})
  md = "\n".join([
      f"# EmbracingFL study: client LR grid ({tag}, seed 0)", "",
      "Final test accuracy of seed 0 at each client LR (the rest of the recipe fixed). The main "
      f"study runs every arm at the preset's LR {cfg['lr']:g}, untuned; this grid checks that "
      "no arm's ranking rests on that choice.", "",
      md_table(["arm"] + [f"lr {lr:g}" for lr in lrs] + ["best"], cells), ""])
  write_results(args.out_dir, f"embracing_lr_grid{'' if tag == 'fashion_mnist' else '_' + tag}",
                command=command, data={"lrs": lrs, "rows": rows}, md=md)
  print(md)


def _widths_path(args):
  return os.path.join(args.out_dir, "embracing", args.preset, "widths.json")


def _widths(cfg, args, memory):
  """HeteroFL's width per class at EmbracingFL's memory (cached next to the pieces)."""
  path = _widths_path(args)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  import jaxfl

  jaxfl.set_cpu_devices()
  data = load_data(cfg, args.data_dir, args.data_npz)
  widths = width_fractions(cfg, data, memory)
  write_json(path, widths)
  return widths


if __name__ == "__main__":
  main()
