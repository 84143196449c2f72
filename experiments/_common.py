"""Helpers shared by the experiment scripts: timing, Markdown tables, plots and result files.

The scripts run as ``python experiments/<name>.py`` (so this folder is on ``sys.path``) and import
``from _common import ...``. JAX, NumPy and matplotlib are imported only where needed, so a
parent process (``bench_memory.py``'s watchdog) stays free of them.

Timing: every timed call waits for its outputs (``jax.block_until_ready``) before the clock
stops; ``ready`` picks what to wait for (default: the whole output).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# ------------------------------------------------------------------------------------- timing


def timed(fn: Callable, *args, ready: Callable | None = None, **kwargs) -> tuple[Any, float]:
  """``(fn(*args, **kwargs), wall seconds)``, the clock stopped once the output is ready."""
  import jax

  t0 = time.perf_counter()
  out = fn(*args, **kwargs)
  jax.block_until_ready(out if ready is None else ready(out))
  return out, time.perf_counter() - t0


def repeat_times(fn: Callable[[int], Any], reps: int, *, warmup: int = 0,
                 ready: Callable | None = None) -> list[float]:
  """Seconds of ``fn(i)`` for ``i < reps``, after ``warmup`` untimed calls ``fn(i)``, ``i < warmup``."""
  for i in range(warmup):
    timed(fn, i, ready=ready)
  return [timed(fn, i, ready=ready)[1] for i in range(reps)]


def median_time(fn: Callable[[int], Any], reps: int, *, warmup: int = 0,
                ready: Callable | None = None) -> float:
  """Median of :func:`repeat_times`."""
  return statistics.median(repeat_times(fn, reps, warmup=warmup, ready=ready))


def carry_times(step: Callable, carry, reps: int, *, warmup: int = 0,
                ready: Callable | None = None) -> tuple[Any, list[float]]:
  """``carry = step(carry)`` ``warmup`` times untimed, then ``reps`` times timed.

  Returns the last carry and the ``reps`` step times (seconds).
  """
  for _ in range(warmup):
    carry, _ = timed(step, carry, ready=ready)
  times = []
  for _ in range(reps):
    carry, t = timed(step, carry, ready=ready)
    times.append(t)
  return carry, times


def interleaved_times(fns: Mapping[str, Callable[[int], Any]], reps: int, *, rotate: bool = False,
                      ready: Callable | None = None) -> dict[str, list[float]]:
  """Times ``fns[name](r)`` for every name in every repetition ``r``, interleaved in one process.

  ``rotate``: repetition ``r`` starts at the ``r % len(fns)``-th name (rotating order), else
  always in the mapping's order. Returns ``{name: [seconds per repetition]}``.
  """
  names = list(fns)
  times: dict[str, list[float]] = {name: [] for name in names}
  for r in range(reps):
    k = r % len(names) if rotate else 0
    for name in names[k:] + names[:k]:
      times[name].append(timed(fns[name], r, ready=ready)[1])
  return times


# ------------------------------------------------------------------------------------- tables


def md_table(cols: Sequence[str], rows: Sequence[Sequence | Mapping],
             fmt: Callable[[Any], str] = str) -> str:
  """A Markdown table: header ``cols``, then one line per row (a sequence of cells, or a mapping
  read at ``cols``), every cell written by ``fmt``."""
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for row in rows:
    cells = [row[c] for c in cols] if isinstance(row, Mapping) else row
    lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------- result files


def command_line(script: str, argv: Sequence[str] | None = None,
                 drop: Mapping[str, int] | None = None) -> str:
  """``python experiments/<script> ARGS``: the command that ran, ``script`` relative to the
  repository root, ``argv`` defaulting to ``sys.argv[1:]``.

  ``drop``: flags that do not change the results, each with its number of values (e.g.
  ``{"--report-only": 0, "--max-minutes": 1}``), left out of the record.
  """
  args = list(sys.argv[1:] if argv is None else argv)
  return shlex.join(["python", os.path.relpath(os.path.abspath(script), ROOT),
                     *without_flags(args, drop or {})])


# Flags that pace a resumable study's driver and never change its results.
PACING_FLAGS = {"--report-only": 0, "--max-minutes": 1}


def without_flags(args: Sequence[str], drop: Mapping[str, int]) -> list[str]:
  """``args`` without the flags in ``drop`` (each with its number of values)."""
  kept, i = [], 0
  while i < len(args):
    flag = args[i].split("=", 1)[0]
    if flag in drop:
      i += 1 + (drop[flag] if "=" not in args[i] else 0)
      continue
    kept.append(args[i])
    i += 1
  return kept


def _atomic_write(path: str, write: Callable) -> str:
  """Writes through ``path + ".tmp"`` and renames: a killed run leaves no half-written file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    write(f)
  os.replace(tmp, path)
  return path


def write_json(path: str, obj, indent: int | None = 1) -> str:
  """``obj`` as JSON at ``path`` (folders created); returns ``path``."""
  return _atomic_write(path, lambda f: json.dump(obj, f, indent=indent))


def read_json(path: str):
  """The JSON at ``path``, or None when there is no such file (a piece not run yet)."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_text(path: str, text: str) -> str:
  """``text`` at ``path``, ending in a newline (folders created); returns ``path``."""
  return _atomic_write(path, lambda f: f.write(text if text.endswith("\n") else text + "\n"))


def write_results(out_dir: str, stem: str, *, command: str, data=None, md: str | None = None,
                  plot: Callable[[str], Any] | None = None) -> dict[str, str]:
  """``<stem>.json`` (``data``), ``<stem>.md`` (``md``) and ``<stem>.png`` (``plot(path)``, e.g.
  a :func:`save_accuracy_plot`) under ``out_dir``; returns ``{"json"|"md"|"png": path}``.

  The command is recorded in both files: as ``"command"`` of a dict ``data`` (a list is written
  as it is) and as a ``Command:`` line appended to ``md`` unless the text already holds it.
  """
  base = os.path.join(out_dir, stem)
  paths = {}
  if data is not None:
    if isinstance(data, dict) and "command" not in data:
      data = {**data, "command": command}
    paths["json"] = write_json(base + ".json", data)
  if md is not None:
    if command not in md:
      md = md.rstrip("\n") + f"\n\nCommand: `{command}`\n"
    paths["md"] = write_text(base + ".md", md)
  if plot is not None:
    os.makedirs(out_dir, exist_ok=True)
    if plot(base + ".png") is not False:
      paths["png"] = base + ".png"
  return paths


# ------------------------------------------------------------------------ resumable studies


def drive_pieces(script: str, child_args: Sequence[str], *, load: Callable[[], Any],
                 plan: Callable[[Any], list], report: Callable[[Any], str],
                 max_minutes: float | None = None, report_only: bool = False) -> str:
  """The resumable-study loop: while ``plan(load())`` has pieces and ``max_minutes`` have not
  passed, run the first ``(arm, value, seed)`` as ``python script *child_args --piece ARM
  VALUE SEED`` (a child process: one piece's memory and compile caches go with it), then
  ``report(load())``. Returns the last report's text."""
  start = time.time()
  while not report_only:
    todo = plan(load())
    if not todo or (max_minutes and time.time() - start > 60 * max_minutes):
      break
    arm, value, seed = todo[0]
    subprocess.run([sys.executable, script, *child_args, "--piece", str(arm), repr(value),
                    str(seed)], check=True)
    report(load())
  return report(load())


class SeedGrid:
  """The tuning rule of the resumable studies, the same for every arm.

  Seed 0 runs over each arm's grid (the middle value first, then outwards), then seeds
  ``seeds[1:]`` run at each arm's ``top`` best seed-0 values (by the piece's ``score``); the
  arm's value is the finalist with the best mean score over all seeds. Pieces are a dict
  ``{(arm, value, seed): piece dict}``.
  """

  def __init__(self, arms: Sequence[str], grid: Callable[[str], Sequence[float]], score: str,
               seeds: Sequence[int] = (0, 1, 2), top: int = 2):
    self.arms, self.grid, self.score = tuple(arms), grid, score
    self.seeds, self.top = tuple(seeds), top

  def finalists(self, pieces, arm) -> list | None:
    """The arm's ``top`` best seed-0 values (None until its seed-0 grid is done)."""
    got = [(pieces[(arm, v, 0)][self.score], v) for v in self.grid(arm) if (arm, v, 0) in pieces]
    if len(got) < len(self.grid(arm)):
      return None
    return [v for _, v in sorted(got, reverse=True)[:self.top]]

  def mean_score(self, pieces, arm, value) -> float:
    """Mean score over the seeds done at ``value``."""
    got = [pieces[(arm, value, s)][self.score] for s in self.seeds if (arm, value, s) in pieces]
    return sum(got) / len(got)

  def best(self, pieces, arm, partial: bool = False):
    """The finalist with the best mean score over all seeds (None until every finalist has
    them). ``partial``: the best so far instead (among the finalists, or the seed-0 points
    done before the grid is)."""
    fin = self.finalists(pieces, arm)
    if not partial and (fin is None or any((arm, v, s) not in pieces for v in fin
                                           for s in self.seeds)):
      return None
    cands = fin if fin is not None else [v for v in self.grid(arm) if (arm, v, 0) in pieces]
    return max(((self.mean_score(pieces, arm, v), v) for v in cands), default=(None, None))[1]

  def load(self, path: Callable[[str, float, int], str]) -> dict:
    """``{(arm, value, seed): piece}`` for every grid piece whose file ``path(arm, value,
    seed)`` exists."""
    return {(a, v, s): read_json(path(a, v, s)) for a in self.arms for v in self.grid(a)
            for s in self.seeds if os.path.exists(path(a, v, s))}

  def complete(self, pieces) -> bool:
    return all(self.best(pieces, a) is not None for a in self.arms)

  def plan(self, pieces) -> list:
    """The pieces still to run, in order: the seed-0 grids (middle values first, arms
    interleaved), then the other seeds at the finalists."""
    order = []
    for rank in range(max(len(self.grid(a)) for a in self.arms)):
      for arm in self.arms:
        vals = list(self.grid(arm))
        mid = len(vals) // 2
        ranked = sorted(vals, key=lambda v: (abs(vals.index(v) - mid), vals.index(v)))
        if rank < len(ranked):
          order.append((arm, ranked[rank], 0))
    todo = [p for p in order if p not in pieces]
    if todo:
      return todo
    return [(arm, v, s) for s in self.seeds[1:] for rank in range(self.top) for arm in self.arms
            for v in self.finalists(pieces, arm)[rank:rank + 1] if (arm, v, s) not in pieces]


def federated_images(dataset: str, num_clients: int, dirichlet: float, image: int,
                     num_test: int | None = None, data_dir: str | None = None):
  """An image dataset split over ``num_clients`` by Dirichlet(``dirichlet``) labels (split
  seed 0), mean-pooled to ``image`` x ``image`` and the test set cut to ``num_test``."""
  from layerwise_converged import downsample

  import jaxfl

  data = jaxfl.data.load(dataset, num_clients, jaxfl.data.dirichlet(dirichlet), seed=0,
                         data_dir=data_dir)
  if data.example_shape[0] != image:
    data = data._replace(x=downsample(data.x, image), x_test=downsample(data.x_test, image))
  if num_test:
    data = data._replace(x_test=data.x_test[:num_test], y_test=data.y_test[:num_test])
  return data


def study_main(study, argv: Sequence[str] | None = None) -> int:
  """The command line of a resumable study module ``study`` (``pma.py``, ``hessian_lr.py``).

  ``study`` defines ``__doc__``, ``__file__``, ``PRESETS``, ``config(preset, smoke)``,
  ``run_piece(cfg, arm, value, seed, out, data_dir)``, ``piece_path(out_dir, cfg, arm, value,
  seed)``, ``load_pieces(out_dir, cfg)``, ``plan(cfg, pieces)`` and ``report(cfg, pieces,
  out_dir, argv)``. Without ``--piece`` this drives the study (:func:`drive_pieces`); with it,
  it runs that one piece (the child process).
  """
  p = argparse.ArgumentParser(description=study.__doc__.split("\n")[0])
  p.add_argument("--preset", default=next(iter(study.PRESETS)), choices=sorted(study.PRESETS))
  p.add_argument("--data-dir", default=None)
  p.add_argument("--out-dir", default=RESULTS)
  p.add_argument("--max-minutes", type=float, default=None)
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--piece", nargs=3, metavar=("ARM", "VALUE", "SEED"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  cfg = study.config(args.preset, args.smoke)
  if args.piece:
    arm, value, seed = args.piece[0], float(args.piece[1]), int(args.piece[2])
    study.run_piece(cfg, arm, value, seed,
                    study.piece_path(args.out_dir, cfg, arm, value, seed), args.data_dir)
    return 0
  child = ["--preset", args.preset, "--out-dir", args.out_dir] + (
      ["--smoke"] if args.smoke else []) + (["--data-dir", args.data_dir] if args.data_dir else [])
  recorded = without_flags(list(sys.argv[1:] if argv is None else argv), PACING_FLAGS)
  print(drive_pieces(study.__file__, child, load=lambda: study.load_pieces(args.out_dir, cfg),
                     plan=lambda pieces: study.plan(cfg, pieces),
                     report=lambda pieces: study.report(cfg, pieces, args.out_dir, recorded),
                     max_minutes=args.max_minutes, report_only=args.report_only))
  return 0


# -------------------------------------------------------------------------------------- plots


def pyplot():
  """``matplotlib.pyplot`` on the non-interactive Agg backend (ImportError without matplotlib)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_plot(path: str, draw: Callable, *, nrows: int = 1, ncols: int = 1,
              figsize: tuple[float, float] = (6, 4), dpi: int = 120) -> bool:
  """``draw(axes)`` on a new ``nrows x ncols`` figure saved to ``path``; False (with a note)
  where matplotlib is not installed."""
  try:
    plt = pyplot()
  except ImportError:
    print(f"matplotlib not installed; skipped {path}")
    return False
  fig, axes = plt.subplots(nrows, ncols, figsize=figsize)
  try:
    draw(axes)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
  finally:
    plt.close(fig)
  return True


def accuracy_curve(history: Sequence[Mapping], x: str = "round") -> tuple[list, list]:
  """(x values, test accuracies) of the evaluated rounds of one simulation history.

  ``x``: ``"round"``, or ``"uplink_bytes"`` for the cumulative uplink in MB (``history`` has
  one entry per round, from round 1).
  """
  import numpy as np

  evals = [h for h in history if "test_accuracy" in h]
  if x == "uplink_bytes":
    cum = np.cumsum([h["uplink_bytes"] for h in history])
    xs = [float(cum[h["round"] - 1]) / 1e6 for h in evals]
  elif x == "round":
    xs = [h["round"] for h in evals]
  else:
    raise ValueError(f"x must be 'round' or 'uplink_bytes', got {x!r}")
  return xs, [h["test_accuracy"] for h in evals]


def plot_accuracy(ax, runs: Mapping[str, Sequence], x: str = "round") -> None:
  """Test accuracy vs ``x`` on ``ax``, one line per run name.

  ``runs[name]`` is one history (a list of per-round dicts), or a list of histories (seeds):
  then their mean, with a +-1 std band, labelled ``name (n seeds)``.
  """
  import numpy as np

  for name, hists in runs.items():
    if not hists:
      continue
    if isinstance(hists[0], Mapping):
      xs, ys = accuracy_curve(hists, x)
      if xs:
        ax.plot(xs, ys, label=name)
      continue
    curves = [accuracy_curve(h, x) for h in hists]
    xs = np.mean([c[0] for c in curves], axis=0)
    accs = np.array([c[1] for c in curves])
    mean, std = accs.mean(0), accs.std(0)
    ax.plot(xs, mean, label=f"{name} ({len(hists)} seeds)")
    ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
  ax.set_xlabel("uplink MB" if x == "uplink_bytes" else "round")
  ax.set_ylabel("test accuracy")
  ax.grid(alpha=0.3)
  ax.legend()


def save_accuracy_plot(path: str, runs: Mapping[str, Sequence], x: str = "round") -> bool:
  """:func:`plot_accuracy` alone in a 6 x 4 in figure at ``path`` (False without matplotlib)."""
  return save_plot(path, lambda ax: plot_accuracy(ax, runs, x))
