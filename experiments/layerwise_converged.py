"""Converged layer-wise comparison (issue 16): FedLAMA, FedLUAR vs FedAvg at tau' and phi tau'.

The committed ``layerwise_comm`` run stops after 30 rounds on a CNN whose one dense layer holds
88% of the parameters; this experiment runs to a plateau (client LR x0.1 at 50% and 75% of the
rounds, the LMLS-lab schedule), on models whose parameters are spread over many kernel layers,
with the same learning-rate treatment for every arm and three seeds.

Protocol (ALGORITHMS.md §1.2; every arm): N = 128 clients, m = 32 sampled per round, Dirichlet
alpha = 0.1 (split seed 0 for every run seed), unweighted mean, client SGD with momentum 0.9
(fresh every round), batch 32, client LR x0.1 at 50% and 75% of each run's rounds
(``jaxfl.transforms.scale_by_round_schedule``). Every arm gets the same budget of local SGD
steps per client (``steps``): an arm with averaging interval ``k tau'`` runs ``steps / (k tau')``
rounds, so FedAvg(2 tau') runs half the rounds of FedAvg(tau') (the FedLAMA paper's comparison).

Arms (``tau'`` = the preset's ``tau``; delta = ``num_recycle``; QSGD s = 16):

  fedavg_tau       FedAvg, interval tau'                          (the reference: uplink 1.0)
  fedavg_2tau      FedAvg, interval 2 tau' (half the rounds)      (uplink 0.5)
  fedavg_4tau      FedAvg, interval 4 tau' (a quarter)            (uplink 0.25)
  fedlama_phi2     FedLAMA(tau', phi = 2)
  fedlama_phi4     FedLAMA(tau', phi = 4)
  fedluar          FedLUAR(delta), p ~ 1/score, recycle           (the paper's method)
  fedluar_half     FedLUAR(delta // 2): the delta sweep's second point (more uplink, closer
                   to FedAvg: where the accuracy/uplink trade-off of recycling sits)
  fedluar_3q       FedLUAR(3 delta // 4): the delta sweep's third point, between the two
                   (on ResNet-20 delta = 9, the point near 0.5 relative uplink)
  fedluar_5of6     FedLUAR(5 delta // 6), and
  fedluar_11of12   FedLUAR(11 delta // 12): the sweep between 3 delta / 4 and delta (on
                   ResNet-20 delta = 10 and 11, where the uplink crosses 0.5)
  fedluar_drop     Table 5 ablation: drop the same layers' update instead of recycling it
  fedluar_uniform  Table 4 ablation: uniform layer choice instead of p ~ 1/score
  fedpaq           FedPAQ: clients upload QSGD(16) deltas
  fedluar+fedpaq   FedLUAR(delta) + FedPAQ (server quantises the stored aggregate)

Presets:

* ``fmnist_cnn``: Fashion-MNIST 28x28 and ``CNN6`` below: conv3x3-32, pool, conv3x3-64, pool,
  conv3x3-64, conv3x3-128, pool, dense 64, dense 10; 204,042 parameters (362 of them biases) in
  6 kernel layers, the two largest (conv 64->128 and dense 1152->64) 36% each, then 18%, 9%, and
  two small ones. It replaces ``layerwise_comm``'s CNN (one dense layer = 88%, so a layer-wise
  method had nothing to choose) at fewer FLOPs (19 vs 21 MFLOP forward per image). delta = 3 of
  6 kernel layers: the reference ratio (12 of 23 for ResNet-20, 2 of 4 for the FEMNIST CNN, both
  ~0.5). No weight decay (the reference FEMNIST CNN has no regularizer). tau' = 10 (FedLAMA's
  default), 800 local steps (FedAvg(tau') = 80 rounds), LR grid 0.01 / 0.02 / 0.05.
* ``fmnist_resnet20``: ``jaxfl.models.resnet20`` unchanged (23 kernel tensors, 272k params, the
  paper's layer structure, so relative uplink costs compare with the paper's) on Fashion-MNIST
  **downsampled to 14x14** (2x2 mean) to fit 2 CPU cores: a quarter of the 28x28 FLOPs
  (``ResNet`` only widens by integer factors, so reducing the input was the way to scale it
  without changing the model). delta = 12 (the reference), Keras l2(1e-4) as decayed weights
  2e-4, tau' = 10, 800 local steps (80 rounds), LR grid 0.05 / 0.1 / 0.2 / 0.4 / 0.8 (0.4, then
  0.8, added when FedAvg(tau')'s seed-0 best came out at the grid's upper edge; every arm runs
  the whole grid).
* ``cifar10_resnet20``: the FedLUAR paper's setting for a GPU: CIFAR-10 via TFDS
  (``--data-dir``; ``jaxfl.data.load("tfds:cifar10")``, no augmentation/normalisation: a known
  gap to the reference pipeline), full ResNet-20, tau' = 20, 4,000 local steps (FedAvg(tau') =
  200 rounds, LR x0.1 at 100/150 as the reference), delta = 12, wd 2e-4, LR grid 0.1 / 0.2 / 0.4
  (0.2 = the reference). The GPU command is in ``experiments/bench_gpu.sh``.

Pieces and resumption (the ``client_activation`` pattern): one (arm, LR, seed) per child process
writes ``experiments/results/layerwise_converged/<preset>/<arm>_lr<lr>_s<seed>.json`` (config,
per-round history: train loss, uplink bytes and their running sum every round, test accuracy
every ~1/20 of the run (1/40 for CIFAR-10); relative uplink, per-layer upload fractions,
FedLAMA's final intervals, seconds, host load). The driver skips pieces already written,
starts no new piece after ``--max-minutes``, and rewrites the report after every piece;
``--report-only`` writes ``experiments/results/layerwise_converged_<preset>.{json,md,png}``
from what is done (the regime sweep: ``layerwise_converged_<preset>_regime.*``).
Overriding ``--tau`` or ``--steps`` writes to ``<preset>_tau<T>`` / ``<preset>_steps<S>``
folders, so pieces of different configurations never mix (the report also ignores, and lists,
pieces whose recorded configuration differs from the current one).

Piece order of the main study (partial results are useful at every stage):

  A. seed 0, middle LR of the grid, every arm in the order of ``ARMS`` (FedAvg(tau'),
     FedAvg(2 tau'), FedLUAR, FedLAMA phi=2, FedLAMA phi=4, FedAvg(4 tau'), FedLUAR(delta/2),
     the two FedLUAR ablations, FedPAQ, FedLUAR+FedPAQ): one comparison at one LR;
  B. seed 0, the other grid LRs (low, then high), every arm: the tuned seed-0 comparison;
  C. seed 1 at each arm's best LR (an arm waits until its seed-0 grid is complete);
  D. seed 2 likewise.

Best LR of an arm = the grid LR with the highest seed-0 accuracy averaged over its last 3
evaluations (on the test set: there is no validation split, as in the papers; the same rule
for every arm). FedAvg pieces of seed 0 that the regime sweep already ran with the same
configuration are copied, not re-run.

Regime sweep (``--regime-sweep``): FedAvg at every interval in ``regime_intervals`` (5/10/20/40
local steps for the Fashion-MNIST presets) x every grid LR, seed 0, same step budget; a pair
(tau', 2 tau') of neighbouring intervals is a regime where infrequent averaging hurts when
FedAvg(2 tau') ends >= 1 point below FedAvg(tau'). Run it first and set the preset's ``tau``
(or pass ``--tau``) from ``layerwise_converged_<preset>_regime.md``. Order: the middle LR at
tau' and 2 tau' first, then the other intervals, then the other LRs. Pieces go to
``<preset>/regime/fedavg_i<interval>_lr<lr>_s0.json``.

Report: per arm at its best LR, final / best accuracy (mean ± std over seeds), relative uplink
(bytes / FedAvg(tau')'s bytes; QSGD at 6 bits per element + one f32 norm per tensor), total
uplink, the uplink needed to first reach FedAvg(tau')'s mean final accuracy minus 1 point,
the slope over the last 20% of the rounds (plateau evidence); the seed-0 LR grid; plots of
accuracy against local steps and against cumulative uplink bytes (mean ± std band).

Time budget (``--probe``: per arm, the compile round + 2 timed rounds + one timed evaluation,
extrapolated to a piece; the excess of the slower timed round is a second compile that every
arm's round pays once, jit cache 1 -> 2). Measured on the 2-core dev box **under contention**
(another experiment and test suites running, load average 3-7); "idle" = the probe's CPU
seconds / 2 cores, the estimate for an otherwise idle 2-core host. Probe files:
``experiments/results/layerwise_converged/probe_<preset>.json``.

  preset            arm (probed)      s/round  CPU s/round  eval s  min/piece here  idle est.
  fmnist_cnn        fedavg_tau        7.4-8.0  5.9-7.9      6-9     12-13.5         5-6.5
  (80 rounds,       fedlama_phi2      7.7-8.4  6.2-7.6      6       12.7-14.1       5.6-6.3
   20 evals)        fedluar+fedpaq    13.0     8.8          9       21 (load spike) 7.3
  fmnist_resnet20   fedavg_tau        10.5-15.6 10.2-10.4   6-9     16-24.5         8
  (80 rounds,       fedlama_phi2      9.4-9.6  9.2          5-8     16              8
   20 evals)        fedluar+fedpaq    9.9      9.8          6       16              8
  cifar10_resnet20  GPU only: ~2-5 min per piece estimated from bench_round's achieved FLOP rate

  Pieces per preset: regime sweep 4 intervals x 3 LRs = 12; main study 10 arms x 3 LRs (seed 0)
  + 10 arms x 2 seeds = 50, of which the 9 seed-0 FedAvg pieces (tau', 2 tau', 4 tau' x 3 LRs)
  are copies of regime pieces when tau' is the preset's, so 53 runs per preset with the sweep.
  Totals: fmnist_cnn ~53 x 13 min = ~12 h here (~5 h idle); fmnist_resnet20 ~53 x 17 min =
  ~15 h here (~7 h idle; without its optional regime sweep 50 runs).

Usage (each command resumes where the last stopped; --max-minutes paces a session)::

  # 1. regime sweep (12 pieces), then read layerwise_converged_fmnist_cnn_regime.md
  python experiments/layerwise_converged.py --preset fmnist_cnn --regime-sweep --max-minutes 300
  # 2. main study at the preset's tau' (or --tau T if the sweep suggests another)
  python experiments/layerwise_converged.py --preset fmnist_cnn --max-minutes 300
  python experiments/layerwise_converged.py --preset fmnist_resnet20 --max-minutes 300
  python experiments/layerwise_converged.py --preset fmnist_cnn --report-only
  python experiments/layerwise_converged.py --preset fmnist_cnn --probe   # timing, 3 rounds/arm
  python experiments/layerwise_converged.py --preset fmnist_cnn --smoke --out-dir /tmp/lwc
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
  read_json,
  save_plot,
  timed,
  write_json,
  write_results,
)

PRESETS = {
    "fmnist_cnn": dict(dataset="fashion_mnist", model="cnn6", image=28, num_clients=128,
                       cohort=32, alpha=0.1, tau=10, steps=800, lrs=(0.01, 0.02, 0.05),
                       batch=32, weight_decay=0.0, num_recycle=3, levels=16, evals=20,
                       regime_intervals=(5, 10, 20, 40)),
    "fmnist_resnet20": dict(dataset="fashion_mnist", model="resnet20", image=14,
                            num_clients=128, cohort=32, alpha=0.1, tau=10, steps=800,
                            lrs=(0.05, 0.1, 0.2, 0.4, 0.8), batch=32, weight_decay=2e-4,
                            num_recycle=12, levels=16, evals=20, regime_intervals=(5, 10, 20, 40)),
    "cifar10_resnet20": dict(dataset="tfds:cifar10", model="resnet20", image=32,
                             num_clients=128, cohort=32, alpha=0.1, tau=20, steps=4000,
                             lrs=(0.1, 0.2, 0.4), batch=32, weight_decay=2e-4, num_recycle=12,
                             levels=16, evals=40, regime_intervals=(10, 20, 40, 80)),
}
# --smoke: seconds on a CPU, for tests (the preset's model and data, tiny federation)
SMOKE = dict(num_clients=16, cohort=4, tau=1, steps=4, batch=8, evals=2, num_test=256,
             regime_intervals=(1, 2), lrs=(0.02,))

# arm -> averaging interval in units of tau'; the order is the piece order within a phase
ARMS = {"fedavg_tau": 1, "fedavg_2tau": 2, "fedluar": 1, "fedlama_phi2": 1, "fedlama_phi4": 1,
        "fedavg_4tau": 4, "fedluar_half": 1, "fedluar_3q": 1, "fedluar_drop": 1,
        "fedluar_uniform": 1, "fedpaq": 1, "fedluar+fedpaq": 1, "fedluar_5of6": 1,
        "fedluar_11of12": 1}
QSGD_ARMS = ("fedpaq", "fedluar+fedpaq")
BASE = "fedavg_tau"
MARGIN = 0.01  # "within 1 point", "below by a clear margin"
TAIL = 3  # evaluations averaged for the LR choice


# ----------------------------------------------------------------------------- configuration


def config(preset: str, tau: int | None = None, steps: int | None = None,
           lrs=None, smoke: bool = False) -> dict:
  """The preset's settings (``SMOKE``'s with ``smoke``) with the command line's overrides;
  ``default_tau`` / ``default_steps`` keep the preset's values (for the folder name)."""
  cfg = dict(PRESETS[preset], preset=preset, num_test=None, smoke=smoke)
  if smoke:
    cfg.update(SMOKE)
  cfg.update(default_tau=cfg["tau"], default_steps=cfg["steps"])
  for k, v in (("tau", tau), ("steps", steps)):
    if v is not None:
      cfg[k] = v
  if lrs:
    cfg["lrs"] = tuple(lrs)
  cfg["lrs"] = tuple(float(v) for v in cfg["lrs"])
  return cfg


def tag(cfg: dict, *, regime: bool = False) -> str:
  """Folder / report name: the preset, plus every override that changes the runs (tau' does
  not change the regime sweep's runs)."""
  t = cfg["preset"] + ("_smoke" if cfg["smoke"] else "")
  if cfg["steps"] != cfg["default_steps"]:
    t += f"_steps{cfg['steps']}"
  if not regime and cfg["tau"] != cfg["default_tau"]:
    t += f"_tau{cfg['tau']}"
  return t


def interval_of(cfg: dict, arm: str) -> int:
  """Local steps between two averagings of ``arm`` (``fedavg_i<N>`` = FedAvg at N)."""
  if arm.startswith("fedavg_i"):
    return int(arm[len("fedavg_i"):])
  return ARMS[arm] * cfg["tau"]


# FedLUAR arms of the delta sweep: arm -> fraction (numerator, denominator) of the preset's delta
DELTA_SWEEP = {"fedluar_half": (1, 2), "fedluar_3q": (3, 4), "fedluar_5of6": (5, 6),
               "fedluar_11of12": (11, 12)}


def recycle_of(cfg: dict, arm: str) -> int:
  """FedLUAR's delta (layers recycled per round) for ``arm``."""
  if arm in DELTA_SWEEP:
    num, den = DELTA_SWEEP[arm]
    return max(1, num * cfg["num_recycle"] // den)
  return cfg["num_recycle"]


def rounds_of(cfg: dict, arm: str) -> int:
  k = interval_of(cfg, arm)
  if cfg["steps"] % k:
    raise ValueError(f"steps={cfg['steps']} is not a multiple of {arm}'s interval {k}")
  return cfg["steps"] // k


def run_config(cfg: dict, arm: str, lr: float, seed: int) -> dict:
  """Everything that determines a piece's numbers (compared before a piece is reused)."""
  keys = ("dataset", "model", "image", "num_clients", "cohort", "alpha", "batch", "weight_decay",
          "steps", "num_test")
  out = {k: cfg[k] for k in keys}
  rounds = rounds_of(cfg, arm)
  out.update(interval=interval_of(cfg, arm), rounds=rounds, lr=float(lr), seed=int(seed),
             eval_every=max(1, rounds // cfg["evals"]), decay_rounds=_decay_rounds(rounds))
  if not arm.startswith("fedavg"):
    out.update(tau=cfg["tau"], num_recycle=recycle_of(cfg, arm), levels=cfg["levels"])
  return out


def _decay_rounds(rounds: int) -> list[int]:
  """Client LR x0.1 at 50% and 75% of the rounds (100 and 150 of 200 in the reference)."""
  return [int(0.5 * rounds), int(0.75 * rounds)]


# ------------------------------------------------------------------------------------ models


def cnn6(input_shape, num_classes: int = 10):
  """conv3x3-32, pool, conv3x3-64, pool, conv3x3-64, conv3x3-128, pool, dense 64, dense."""
  import flax.linen as nn

  from jaxfl.models import Conv, from_linen, max_pool

  class CNN6(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = max_pool(nn.relu(Conv(32, (3, 3))(x)), (2, 2))
      x = max_pool(nn.relu(Conv(64, (3, 3))(x)), (2, 2))
      x = nn.relu(Conv(64, (3, 3))(x))
      x = max_pool(nn.relu(Conv(128, (3, 3))(x)), (2, 2))
      x = x.reshape((x.shape[0], -1))
      x = nn.relu(nn.Dense(64)(x))
      return nn.Dense(num_classes)(x)

  return from_linen(CNN6(), tuple(input_shape), "cnn6")


def downsample(x: np.ndarray, size: int) -> np.ndarray:
  """NHWC images mean-pooled by an integer factor to ``size`` x ``size``."""
  f = x.shape[1] // size
  if f == 1:
    return x
  if x.shape[1] != size * f or x.shape[2] != size * f:
    raise ValueError(f"cannot pool {x.shape[1:3]} to {size}x{size} by an integer factor")
  n, _, _, c = x.shape
  return x.reshape(n, size, f, size, f, c).mean(axis=(2, 4)).astype(np.float32)


def load_setup(cfg: dict, data_dir: str | None = None):
  import jaxfl

  data = jaxfl.data.load(cfg["dataset"], cfg["num_clients"], jaxfl.data.dirichlet(cfg["alpha"]),
                         seed=0, data_dir=data_dir)
  if data.example_shape[0] != cfg["image"]:
    data = data._replace(x=downsample(data.x, cfg["image"]),
                         x_test=downsample(data.x_test, cfg["image"]))
  if cfg["num_test"]:
    data = data._replace(x_test=data.x_test[:cfg["num_test"]],
                         y_test=data.y_test[:cfg["num_test"]])
  if cfg["model"] == "cnn6":
    model = cnn6(data.example_shape, data.num_classes)
  else:
    model = jaxfl.models.resnet20(data.example_shape, data.num_classes)
  return data, model


def build_arm(cfg: dict, arm: str, lr: float, seed: int):
  """(algorithm, rounds) of one arm: the preset's local training + the LR decay schedule."""
  import optax

  import jaxfl
  from jaxfl.algorithms import layerwise as lw

  rounds = rounds_of(cfg, arm)
  common = dict(client_lr=lr, client_momentum=0.9, weight_decay=cfg["weight_decay"],
                batch_size=cfg["batch"], local_steps=interval_of(cfg, arm))
  d, s = recycle_of(cfg, arm), cfg["levels"]
  if arm.startswith("fedavg"):
    algo = jaxfl.algorithms.fedavg(weighting="uniform", name=arm, **common)
  elif arm.startswith("fedlama_phi"):
    algo = lw.fedlama(int(arm[len("fedlama_phi"):]), name=arm, **common)
  else:
    algo = {
        **{a: lambda: lw.fedluar(d, seed=seed, name=arm, **common)
           for a in ("fedluar", *DELTA_SWEEP)},
        "fedluar_drop": lambda: lw.fedluar(d, recycle=False, seed=seed, name=arm, **common),
        "fedluar_uniform": lambda: lw.fedluar(d, selection="uniform", seed=seed, name=arm,
                                              **common),
        "fedpaq": lambda: lw.fedpaq(s, seed=seed, name=arm, **common),
        "fedluar+fedpaq": lambda: lw.fedluar(d, quantize_levels=s, seed=seed, name=arm,
                                             **common),
    }[arm]()
  decay = optax.piecewise_constant_schedule(1.0, {r: 0.1 for r in _decay_rounds(rounds)})
  client = optax.chain(algo.local.optimizer, jaxfl.transforms.scale_by_round_schedule(decay))
  return algo._replace(local=algo.local._replace(optimizer=client)), rounds


# ------------------------------------------------------------------------------------ pieces


def _cpu_devices():
  import jaxfl

  try:
    jaxfl.set_cpu_devices()  # one XLA device per core (no effect on GPU backends)
  except RuntimeError:
    pass  # JAX already running in this process (tests): keep its devices


def _layer_table(state, cohort: int, rounds: int) -> list[dict]:
  """Per kernel/bias leaf: name, size, kernel flag, fraction of (rounds x cohort) uploads."""
  import jax

  from jaxfl import tree as jtree

  names = [n.replace("']['", "/").strip("[']") for n in jtree.leaf_names(state.params)]
  sizes = [int(np.size(p)) for p in jax.tree.leaves(state.params)]
  kern = [bool(k) for k in jax.tree.leaves(jtree.is_kernel(state.params))]
  sent = [float(e) for e in jax.tree.leaves(jax.device_get(state.uplink_elements))]
  return [{"name": n, "size": z, "kernel": k, "upload_fraction": e / (rounds * cohort * z)}
          for n, z, k, e in zip(names, sizes, kern, sent)]


def run_piece(cfg: dict, arm: str, lr: float, seed: int, out: str,
              data_dir: str | None = None) -> dict:
  """Runs one (arm, LR, seed) and writes its JSON atomically at ``out``."""
  _cpu_devices()
  import jax

  import jaxfl
  from jaxfl import comm
  from jaxfl import tree as jtree

  load0 = os.getloadavg()[0]
  data, model = load_setup(cfg, data_dir)
  algo, rounds = build_arm(cfg, arm, lr, seed)
  run = run_config(cfg, arm, lr, seed)
  res, seconds = timed(jaxfl.simulate, algo, model, data, rounds=rounds,
                       clients_per_round=cfg["cohort"], seed=seed, eval_every=run["eval_every"],
                       progress=False)
  dense = float(sum(h["uplink_bytes"] for h in res.history))
  total = dense
  if arm in QSGD_ARMS:  # 6-bit elements + one f32 norm per uploaded tensor
    total = comm.qsgd_uplink_bytes(jax.device_get(res.state.uplink_elements), res.state.params,
                                   cfg["levels"])
  factor = total / dense if dense else 1.0
  n_params = jtree.num_params(res.state.params)
  base_bytes = rounds_of(cfg, BASE) * cfg["cohort"] * 4.0 * n_params  # FedAvg(tau'), f32
  history, cum = [], 0.0
  for h in res.history:
    cum += h["uplink_bytes"] * factor
    row = {"round": h["round"], "steps": h["round"] * run["interval"],
           "train_loss": h["train_loss"], "uplink_bytes": h["uplink_bytes"] * factor,
           "cum_uplink_bytes": cum}
    if "test_accuracy" in h:
      row["test_accuracy"] = h["test_accuracy"]
    history.append(row)
  piece = {
      "preset": cfg["preset"], "arm": arm, "lr": float(lr), "seed": int(seed), "run": run,
      "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
      "seconds": seconds, "compile_seconds": res.summary["compile_seconds"],
      "final_acc": res.summary["final_acc"], "best_acc": res.summary["best_acc"],
      "uplink_bytes": total, "rel_uplink": total / base_bytes, "num_params": n_params,
      "nonfinite_clients": res.summary["nonfinite_clients"],
      "layers": _layer_table(res.state, cfg["cohort"], rounds), "history": history,
      "host": {"load_avg_start": load0, "load_avg_end": os.getloadavg()[0],
               "cpu_count": os.cpu_count(), "devices": len(jax.devices()),
               "platform": jax.devices()[0].platform, "jax": jax.__version__},
  }
  if arm.startswith("fedlama"):
    lama = res.state.opt_state[0]
    piece["fedlama"] = {"final_intervals": np.asarray(lama.intervals).tolist(),
                        "syncs": np.asarray(lama.syncs).tolist()}
  write_json(out, piece, indent=None)  # atomic: a killed piece leaves no half-written result
  print(f"{arm} lr {lr:g} seed {seed}: final {piece['final_acc']:.4f} best "
        f"{piece['best_acc']:.4f} rel. uplink {piece['rel_uplink']:.3f} ({seconds:.0f} s, "
        f"load {load0:.1f})", flush=True)
  return piece


def probe(cfg: dict, arms, data_dir: str | None = None, timed_rounds: int = 2) -> dict:
  """Minutes per piece, extrapolated from a compile, ``timed_rounds`` rounds and one evaluation
  per arm (at most 3 rounds per configuration)."""
  _cpu_devices()
  import jax

  from jaxfl import sharding as jshard
  from jaxfl.data import device_data
  from jaxfl.evaluation import make_evaluate
  from jaxfl.round import build_round

  data, model = load_setup(cfg, data_dir)
  devices = jax.devices()
  mesh = jshard.client_mesh(devices) if len(devices) > 1 else None
  dd = device_data(data, mesh)
  evaluate = make_evaluate(model)
  x_test, y_test = jshard.put_replicated((data.x_test, data.y_test), mesh)
  cores = len(devices) if devices[0].platform == "cpu" else 1
  out = {"preset": cfg["preset"], "tag": tag(cfg), "load_avg_start": os.getloadavg()[0],
         "cpu_count": os.cpu_count(), "arms": {}}
  for arm in arms:
    algo, rounds = build_arm(cfg, arm, cfg["lrs"][len(cfg["lrs"]) // 2], 0)
    rnd = build_round(algo, model, num_clients=data.num_clients,
                      max_client_size=data.max_client_size, clients_per_round=cfg["cohort"],
                      mesh=mesh)
    state = jshard.put_replicated(jax.tree.map(np.asarray, rnd.init(jax.random.key(0))), mesh)
    (state, _), compile_s = timed(rnd.step, state, dd, jax.random.key(0))
    times, cpu = [], time.process_time()
    for r in range(timed_rounds):
      (state, _), t = timed(rnd.step, state, dd, jax.random.key(r + 1))
      times.append(t)
    cpu_round = (time.process_time() - cpu) / timed_rounds
    _, eval_compile = timed(evaluate, state.params, state.model_state, x_test, y_test)
    cpu = time.process_time()
    _, eval_s = timed(evaluate, state.params, state.model_state, x_test, y_test)
    cpu_eval = time.process_time() - cpu
    n_evals = rounds // max(1, rounds // cfg["evals"])
    # the round compiles a second time on its own output state (jit cache 1 -> 2, every arm):
    # the slowest timed round's excess over the fastest is that, paid once per piece
    round_s = float(min(times))
    compile_s += sum(times) - timed_rounds * round_s
    cpu_round = cpu_round * timed_rounds * round_s / sum(times)
    piece_s = compile_s + eval_compile + (rounds - 1) * round_s + n_evals * eval_s
    # CPU seconds / cores: the wall time on an otherwise idle host (sharded over the cores)
    idle_s = (compile_s + eval_compile) / 2 + (rounds * cpu_round + n_evals * cpu_eval) / cores
    out["arms"][arm] = {"rounds": rounds, "compile_s": compile_s, "round_s": times,
                        "round_cpu_s": cpu_round, "eval_s": eval_s, "eval_cpu_s": cpu_eval,
                        "evals": n_evals, "piece_minutes": piece_s / 60,
                        "piece_minutes_idle_host": idle_s / 60}
    print(f"{arm}: {rounds} rounds, compiles {compile_s:.1f} s, {round_s:.2f} s/round "
          f"({cpu_round:.2f} CPU s), eval {eval_s:.2f} s x {n_evals} -> {piece_s / 60:.1f} "
          f"min/piece here, ~{idle_s / 60:.1f} on an idle {cores}-core host", flush=True)
  out["load_avg_end"] = os.getloadavg()[0]
  return out


# ----------------------------------------------------------------------------------- planning


def _lr_name(lr: float) -> str:
  return f"{lr:g}"


def piece_path(root: str, arm: str, lr: float, seed: int) -> str:
  return os.path.join(root, f"{arm}_lr{_lr_name(lr)}_s{seed}.json")


def _tail_acc(piece: dict, k: int = TAIL) -> float:
  accs = [h["test_accuracy"] for h in piece["history"] if "test_accuracy" in h]
  return float(np.mean(accs[-k:]))


def best_lrs(grid: dict[tuple[str, float], dict], arms, lrs) -> dict[str, float]:
  """Each arm's grid LR with the best seed-0 tail accuracy, for arms whose grid is complete."""
  out = {}
  for arm in arms:
    scores = {lr: _tail_acc(grid[(arm, lr)]) for lr in lrs if (arm, lr) in grid}
    if len(scores) == len(lrs):
      out[arm] = max(scores, key=lambda lr: (scores[lr], -abs(lr - lrs[len(lrs) // 2])))
  return out


def main_plan(arms, lrs, seeds, best: dict[str, float]) -> list[tuple[str, float, int]]:
  """The piece order (module docstring, phases A-D); arms without a best LR yet are left out
  of the later phases."""
  lrs = list(lrs)
  mid = lrs[len(lrs) // 2]
  others = [lr for lr in lrs if lr != mid]
  s0, rest = seeds[0], seeds[1:]
  plan = [(a, mid, s0) for a in arms] + [(a, lr, s0) for lr in others for a in arms]
  plan += [(a, best[a], s) for s in rest for a in arms if a in best]
  return plan


def regime_plan(cfg: dict) -> list[tuple[str, float, int]]:
  ivs, lrs = list(cfg["regime_intervals"]), list(cfg["lrs"])
  mid = lrs[len(lrs) // 2]
  first = [cfg["tau"], 2 * cfg["tau"]]
  ivs = [i for i in first if i in ivs] + [i for i in ivs if i not in first]
  lrs = [mid] + [lr for lr in lrs if lr != mid]
  return [(f"fedavg_i{i}", lr, 0) for lr in lrs for i in ivs]


def _same_run(a: dict, b: dict) -> bool:
  return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _reuse_regime_piece(cfg: dict, roots: dict, arm: str, lr: float, seed: int) -> bool:
  """Copies a regime-sweep FedAvg piece that is this FedAvg piece; True if it did."""
  if not arm.startswith("fedavg_") or arm.startswith("fedavg_i"):
    return False
  src = read_json(piece_path(roots["regime"], f"fedavg_i{interval_of(cfg, arm)}", lr, seed))
  if src is None or not _same_run(src["run"], run_config(cfg, arm, lr, seed)):
    return False
  src = dict(src, arm=arm, copied_from=f"regime/fedavg_i{interval_of(cfg, arm)}")
  write_json(piece_path(roots["main"], arm, lr, seed), src, indent=None)
  print(f"{arm} lr {lr:g} seed {seed}: copied from the regime sweep", flush=True)
  return True


# ------------------------------------------------------------------------------------- report


def _collect(cfg: dict, root: str, plan_arms, lrs, seeds):
  """{(arm, lr, seed): piece} for the pieces done with the current configuration, and the
  paths of pieces left out because their configuration differs."""
  done, stale = {}, []
  for arm in plan_arms:
    for lr in lrs:
      for seed in seeds:
        p = piece_path(root, arm, lr, seed)
        piece = read_json(p)
        if piece is None:
          continue
        if _same_run(piece["run"], run_config(cfg, arm, lr, seed)):
          done[(arm, lr, seed)] = piece
        else:
          stale.append(os.path.relpath(p, root))
  return done, stale


def _curve(piece: dict, x: str):
  """(x, accuracy) at the evaluated rounds; x = local steps or cumulative uplink MB."""
  cum = np.cumsum([h["uplink_bytes"] for h in piece["history"]]) / 1e6
  xs, ys = [], []
  for i, h in enumerate(piece["history"]):
    if "test_accuracy" in h:
      xs.append(h["steps"] if x == "steps" else float(cum[i]))
      ys.append(h["test_accuracy"])
  return np.asarray(xs, float), np.asarray(ys, float)


def bytes_to_reach(piece: dict, target: float) -> float | None:
  """Cumulative uplink bytes at the first evaluation with accuracy >= target (None: never)."""
  cum = 0.0
  for h in piece["history"]:
    cum += h["uplink_bytes"]
    if h.get("test_accuracy", -1.0) >= target:
      return cum
  return None


def tail_slope(piece: dict, frac: float = 0.2) -> float:
  """Least-squares slope of accuracy over the last ``frac`` of the rounds, in accuracy per
  10% of the run (0 = flat)."""
  rounds = piece["run"]["rounds"]
  pts = [(h["round"] / rounds, h["test_accuracy"]) for h in piece["history"]
         if "test_accuracy" in h and h["round"] >= (1 - frac) * rounds]
  if len(pts) < 2:
    return float("nan")
  xs, ys = np.asarray(pts).T
  return float(np.polyfit(xs, ys, 1)[0] * 0.1)


def _nanmean(xs) -> float | None:
  xs = [x for x in xs if x == x]
  return float(np.mean(xs)) if xs else None


def _ms(xs):
  xs = [x for x in xs if x is not None]
  if not xs:
    return None, None
  return float(np.mean(xs)), float(np.std(xs))


def summarize(cfg: dict, done: dict, arms, seeds) -> dict:
  """LR choice, per-arm rows at the chosen LR, and the reached-target bytes."""
  lrs = list(cfg["lrs"])
  s0 = seeds[0]
  grid = {(a, lr): p for (a, lr, s), p in done.items() if s == s0}
  best = best_lrs(grid, arms, lrs)
  mid = lrs[len(lrs) // 2]
  chosen = {a: best.get(a, mid) for a in arms}
  by_arm = {a: [done[(a, chosen[a], s)] for s in seeds if (a, chosen[a], s) in done]
            for a in arms}
  by_arm = {a: ps for a, ps in by_arm.items() if ps}
  base = by_arm.get(BASE, [])
  base_final = _ms([p["final_acc"] for p in base])[0]
  target = None if base_final is None else base_final - MARGIN
  # FedAvg(tau')'s f32 uplink over the same step budget (recomputed: a piece copied from the
  # regime sweep recorded its own)
  n_params = next(iter(done.values()))["num_params"]
  base_bytes = rounds_of(cfg, BASE) * cfg["cohort"] * 4.0 * n_params
  rows = []
  for arm, ps in by_arm.items():
    fm, fs = _ms([p["final_acc"] for p in ps])
    bm, bs = _ms([p["best_acc"] for p in ps])
    reach = [bytes_to_reach(p, target) for p in ps] if target is not None else []
    rm, _ = _ms(reach)
    rows.append({
        "arm": arm, "interval": ps[0]["run"]["interval"], "rounds": ps[0]["run"]["rounds"],
        "lr": chosen[arm], "lr_tuned": arm in best, "seeds": [p["seed"] for p in ps],
        "final_acc_mean": fm, "final_acc_std": fs, "best_acc_mean": bm, "best_acc_std": bs,
        "rel_uplink": float(np.mean([p["uplink_bytes"] for p in ps])) / base_bytes,
        "uplink_mb": float(np.mean([p["uplink_bytes"] for p in ps])) / 1e6,
        "reach_target_mb": None if rm is None else rm / 1e6,
        "reached": sum(r is not None for r in reach),
        "tail_slope_per_10pct": _nanmean([tail_slope(p) for p in ps]),
        "final_minus_base": None if base_final is None else fm - base_final,
        "seconds_per_piece": float(np.mean([p["seconds"] for p in ps])),
    })
  layer_arms = [a for a in by_arm if a.startswith(("fedluar", "fedlama"))]
  layers = []
  if layer_arms:
    ref = by_arm[layer_arms[0]][0]["layers"]
    total = sum(q["size"] for q in ref)
    for i, q in enumerate(ref):
      if q["kernel"]:
        layers.append({"name": q["name"], "share": q["size"] / total, **{
            a: float(np.mean([p["layers"][i]["upload_fraction"] for p in by_arm[a]]))
            for a in layer_arms}})
  grid_rows = [{"arm": a, **{_lr_name(lr): (None if (a, lr) not in grid
                                             else _tail_acc(grid[(a, lr)])) for lr in lrs}}
               for a in arms]
  return {"chosen_lr": chosen, "tuned": sorted(best), "target_acc": target, "rows": rows,
          "claims": claims(rows),
          "grid": grid_rows, "layers": layers, "layer_arms": layer_arms,
          "pieces_done": len(done)}


def claims(rows) -> list[dict]:
  """The issue's 'done when' checks and the papers' ablation claims, on the table's means."""
  by = {r["arm"]: r for r in rows}
  out = []

  def add(text, arms, ok):
    # an arm whose seed-0 grid is incomplete has no tuned LR yet: no verdict on it
    if all(a in by and by[a].get("lr_tuned", True) for a in arms):
      r, b = by[arms[0]], by[arms[1]]
      # A verdict on means alone hides how far apart the arms are; the difference and its
      # standard error (each arm's seed std / sqrt(seeds)) say whether seed noise could flip it.
      se = math.sqrt(sum(x["final_acc_std"] ** 2 / len(x["seeds"]) for x in (r, b)))
      out.append({"claim": text, "arms": arms, "holds": bool(ok(r, b)),
                  "seeds": min(len(by[a]["seeds"]) for a in arms),
                  "difference": r["final_acc_mean"] - b["final_acc_mean"],
                  "difference_se": se})

  near = lambda r, b: r["final_acc_mean"] >= b["final_acc_mean"] - MARGIN
  add("FedLUAR within 1 point of FedAvg(tau') at <= 0.5 relative uplink",
      ["fedluar", BASE], lambda r, b: near(r, b) and r["rel_uplink"] <= 0.5)
  for phi in (2, 4):
    add(f"FedLAMA(phi={phi}) within 1 point of FedAvg(tau') at <= 0.5 relative uplink",
        [f"fedlama_phi{phi}", BASE], lambda r, b: near(r, b) and r["rel_uplink"] <= 0.5)
    add(f"FedLAMA(phi={phi}) above FedAvg({phi} tau')",
        [f"fedlama_phi{phi}", f"fedavg_{phi}tau"],
        lambda r, b: r["final_acc_mean"] > b["final_acc_mean"])
  add("FedAvg(2 tau') below FedAvg(tau') by >= 1 point (a regime where averaging less hurts)",
      ["fedavg_2tau", BASE], lambda r, b: r["final_acc_mean"] <= b["final_acc_mean"] - MARGIN)
  for arm, (num, den) in DELTA_SWEEP.items():
    frac = "delta/2" if num == 1 else f"{num} delta/{den}"
    add(f"FedLUAR({frac}) within 1 point of FedAvg(tau') at <= 0.5 relative uplink",
        [arm, BASE], lambda r, b: near(r, b) and r["rel_uplink"] <= 0.5)
  add("recycling beats dropping the same layers (FedLUAR Table 5)",
      ["fedluar", "fedluar_drop"], lambda r, b: r["final_acc_mean"] > b["final_acc_mean"])
  add("p ~ 1/score beats uniform layer choice (FedLUAR Table 4)",
      ["fedluar", "fedluar_uniform"], lambda r, b: r["final_acc_mean"] > b["final_acc_mean"])
  add("FedLUAR+FedPAQ within 1 point of FedAvg(tau')", ["fedluar+fedpaq", BASE], near)
  return out


def _fmt(v, spec=".4f"):
  return "—" if v is None else format(v, spec)


def _report_md(cfg: dict, res: dict, stale, total_pieces: int) -> str:
  rows = res["rows"]
  cols = ["arm", "interval", "rounds", "LR", "seeds", "final acc", "best acc", "rel. uplink",
          "uplink MB", "MB to reach target", "last-20% slope / 10%", "min / piece"]
  cells = []
  for r in rows:
    reach = (f"{r['reach_target_mb']:.1f} ({r['reached']}/{len(r['seeds'])})"
             if r["reach_target_mb"] is not None else f"never (0/{len(r['seeds'])})")
    cells.append([r["arm"], r["interval"], r["rounds"],
                  f"{r['lr']:g}" + ("" if r["lr_tuned"] else " (grid incomplete)"),
                  len(r["seeds"]),
                  f"{r['final_acc_mean']:.4f} ± {r['final_acc_std']:.4f}",
                  f"{r['best_acc_mean']:.4f} ± {r['best_acc_std']:.4f}",
                  f"{r['rel_uplink']:.3f}", f"{r['uplink_mb']:.1f}", reach,
                  _fmt(r["tail_slope_per_10pct"], "+.4f"), f"{r['seconds_per_piece'] / 60:.1f}"])
  lrs = list(cfg["lrs"])
  grid = md_table(["arm", *[f"LR {_lr_name(lr)}" for lr in lrs], "chosen"],
                  [[g["arm"], *[_fmt(g[_lr_name(lr)]) for lr in lrs],
                    f"{res['chosen_lr'][g['arm']]:g}" if g["arm"] in res["tuned"] else "—"]
                   for g in res["grid"]])
  lines = [
      f"# Layer-wise communication, converged: {tag(cfg)}", "",
      f"{res['pieces_done']} of {total_pieces} pieces done.", "",
      f"N={cfg['num_clients']}, m={cfg['cohort']}, Dirichlet alpha={cfg['alpha']}, model "
      f"{cfg['model']} on {cfg['dataset']} {cfg['image']}x{cfg['image']}, unweighted mean, client "
      f"SGD momentum 0.9 + decayed weights {cfg['weight_decay']}, batch {cfg['batch']}, "
      f"{cfg['steps']} local steps per client for every arm (FedAvg(tau') = "
      f"{cfg['steps'] // cfg['tau']} rounds of tau'={cfg['tau']}), client LR x0.1 at 50% and 75% "
      f"of each arm's rounds, FedLUAR delta={cfg['num_recycle']} ("
      + ", ".join(f"{a}: {recycle_of(cfg, a)}" for a in DELTA_SWEEP) + "), "
      f"QSGD s={cfg['levels']}.", "",
      md_table(cols, cells), "",
      md_table(["claim (means over seeds)", "holds", "seeds", "difference ± SE (points)"],
               [[c["claim"], "yes" if c["holds"] else "no", c["seeds"],
                 f"{100 * c['difference']:+.2f} ± {100 * c['difference_se']:.2f}"]
                for c in res["claims"]]),
      "",
      f"Target = FedAvg(tau')'s mean final accuracy - {MARGIN:g} = {_fmt(res['target_acc'])}; "
      "'MB to reach target' = mean cumulative uplink at the first evaluation at or above it, "
      "over the seeds that reached it. Relative uplink = uplink bytes / FedAvg(tau')'s (f32; "
      "QSGD 6 bits per element + one f32 norm per tensor). Last-20% slope: least-squares "
      "slope of the accuracy over the last 20% of the rounds, in accuracy per 10% of the run "
      "(plateau: |slope| << the gaps in the table; the LR decay at 75% makes the tail flat by "
      "construction, so the curves in the plot are the evidence for the rest of the run).", "",
      f"## Seed-{res.get('grid_seed', 0)} LR grid (mean of the last {TAIL} evaluations)", "",
      "Every arm runs the same grid; its best LR is used for the other seeds.", "",
      grid]
  if res["layers"]:
    arms = res["layer_arms"]
    lines += ["", "## Kernel layers: share of the parameters and fraction of uploads", "",
              "Fraction = uploaded elements / (rounds x cohort x layer size), mean over seeds "
              "at the chosen LR (non-kernel tensors are uploaded every round).", "",
              md_table(["layer", "params", *arms],
                       [[q["name"], f"{q['share']:.3f}", *[f"{q[a]:.2f}" for a in arms]]
                        for q in res["layers"]])]
  if stale:
    lines += ["", "Ignored pieces of another configuration: " + ", ".join(stale)]
  return "\n".join(lines) + "\n"


def _band(ax, curves, label, index=0):
  n = min(len(c[0]) for c in curves)
  xs = np.mean([c[0][:n] for c in curves], axis=0)
  ys = np.array([c[1][:n] for c in curves])
  m, s = ys.mean(0), ys.std(0)
  # The colour cycle has 10 entries and the study has 12 arms: past the tenth, the line style
  # changes so that no two arms share a colour and a style.
  color, style = f"C{index % 10}", ("-", "--", ":")[(index // 10) % 3]
  ax.plot(xs, m, label=f"{label} ({len(curves)})", marker="o" if n < 5 else None, ms=3,
          color=color, ls=style)
  if len(curves) > 1:
    ax.fill_between(xs, m - s, m + s, alpha=0.2, color=color)


def _plot(path, groups: dict[str, list[dict]], target=None, title=""):
  def draw(axes):
    for ax, x in zip(axes, ("steps", "uplink")):
      for i, (label, ps) in enumerate(groups.items()):
        _band(ax, [_curve(p, x) for p in ps], label, i)
      if target is not None:
        ax.axhline(target, color="grey", lw=0.8, ls="--")
      ax.set_xlabel("local SGD steps per client" if x == "steps" else "cumulative uplink MB")
      ax.set_ylabel("test accuracy")
      ax.grid(alpha=0.3)
      ax.set_title(title)
    axes[1].set_xscale("log")
    axes[1].legend(fontsize=7)

  return save_plot(path, draw, ncols=2, figsize=(12, 4.5))


def report(cfg: dict, roots: dict, arms, seeds, command: str, out_dir: str) -> dict | None:
  lrs = list(cfg["lrs"])
  done, stale = _collect(cfg, roots["main"], arms, lrs, seeds)
  if not done:
    return None
  res = summarize(cfg, done, arms, seeds)
  res["grid_seed"] = seeds[0]
  total = len(arms) * len(lrs) + len(arms) * (len(seeds) - 1)
  groups = {}
  for r in res["rows"]:
    groups[f"{r['arm']} lr{r['lr']:g}"] = [done[(r["arm"], r["lr"], s)] for s in r["seeds"]]
  result = {"preset": cfg["preset"], "tag": tag(cfg),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "arms": list(arms), "seeds": list(seeds), "pieces_total": total,
            "ignored_pieces": stale, **res}
  write_results(out_dir, f"layerwise_converged_{tag(cfg)}", command=command, data=result,
                md=_report_md(cfg, res, stale, total),
                plot=lambda path: _plot(path, groups, res["target_acc"]))
  return result


def report_regime(cfg: dict, roots: dict, command: str, out_dir: str) -> dict | None:
  plan = regime_plan(cfg)
  arms = sorted({a for a, _, _ in plan}, key=lambda a: interval_of(cfg, a))
  lrs = list(cfg["lrs"])
  done, stale = _collect(cfg, roots["regime"], arms, lrs, [0])
  if not done:
    return None
  ivs = [interval_of(cfg, a) for a in arms]
  table, pairs = [], []
  for lr in lrs:
    accs = {i: (done[(a, lr, 0)]["final_acc"] if (a, lr, 0) in done else None)
            for a, i in zip(arms, ivs)}
    tails = {i: (_tail_acc(done[(a, lr, 0)]) if (a, lr, 0) in done else None)
             for a, i in zip(arms, ivs)}
    table.append([f"{lr:g}", *[_fmt(accs[i]) for i in ivs]])
    for i in ivs:
      if 2 * i in ivs and tails[i] is not None and tails[2 * i] is not None:
        pairs.append({"tau": i, "lr": lr, "fedavg_tau": tails[i], "fedavg_2tau": tails[2 * i],
                      "gap": tails[i] - tails[2 * i]})
  best_acc = max(_tail_acc(q) for q in done.values())
  for p in pairs:  # a regime worth studying: FedAvg(tau') itself near the best of the sweep
    p["hurts"] = p["gap"] >= MARGIN
    p["near_best"] = p["fedavg_tau"] >= best_acc - 2 * MARGIN
  cands = [p for p in pairs if p["hurts"] and p["near_best"]]
  pick = max(cands, key=lambda p: p["gap"], default=None)
  pair_cells = [[p["tau"], f"{p['lr']:g}", f"{p['fedavg_tau']:.4f}", f"{p['fedavg_2tau']:.4f}",
                 f"{p['gap']:+.4f}", "yes" if p["hurts"] else "no",
                 "yes" if p["near_best"] else "no"] for p in pairs]
  verdict = ("No (tau', LR) in the sweep has FedAvg(2 tau') >= 1 point below FedAvg(tau') "
             "with FedAvg(tau') within 2 points of the sweep's best run." if pick is None else
             f"Suggested: tau' = {pick['tau']}, LR {pick['lr']:g} (gap {pick['gap']:+.4f}; "
             "the largest gap among pairs whose FedAvg(tau') is within 2 points of the best).")
  md = "\n".join([
      f"# Regime sweep (FedAvg at several intervals, seed 0): {tag(cfg, regime=True)}", "",
      f"{len(done)} of {len(plan)} pieces done. Same budget of {cfg['steps']} local steps per "
      "client for every interval (rounds = steps / interval), client LR x0.1 at 50% and 75% "
      "of the rounds; protocol as the main study.", "",
      "## Final accuracy", "",
      md_table(["LR", *[f"interval {i}" for i in ivs]], table), "",
      f"## FedAvg(tau') vs FedAvg(2 tau') (mean of the last {TAIL} evaluations)", "",
      md_table(["tau'", "LR", "FedAvg(tau')", "FedAvg(2 tau')", "gap", "gap >= 1 pt",
                "FedAvg(tau') within 2 pt of best"], pair_cells), "",
      verdict, "",
      "Single seed: the main study's seeds give the noise level; a gap of 1-2 points is "
      "only a regime if it survives them."]
      + (["", "Ignored pieces of another configuration: " + ", ".join(stale)] if stale else []))
  groups = {f"interval {interval_of(cfg, a)} lr{lr:g}": [p] for (a, lr, _), p in
            sorted(done.items(), key=lambda kv: (kv[0][1], interval_of(cfg, kv[0][0])))}
  result = {"preset": cfg["preset"], "tag": tag(cfg, regime=True), "pairs": pairs,
            "suggested": pick, "pieces_done": len(done), "pieces_total": len(plan),
            "ignored_pieces": stale}
  write_results(out_dir, f"layerwise_converged_{tag(cfg, regime=True)}_regime", command=command,
                data=result, md=md, plot=lambda path: _plot(path, groups))
  return result


# --------------------------------------------------------------------------------------- main


def _roots(cfg: dict, out_dir: str) -> dict:
  base = os.path.join(out_dir, "layerwise_converged")
  return {"main": os.path.join(base, tag(cfg)),
          "regime": os.path.join(base, tag(cfg, regime=True), "regime")}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="fmnist_cnn")
  p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                 help="the first is the LR-grid seed")
  p.add_argument("--lrs", nargs="+", type=float, default=None, help="override the LR grid")
  p.add_argument("--tau", type=int, default=None, help="override tau' (own results folder)")
  p.add_argument("--steps", type=int, default=None,
                 help="override the local-step budget (own results folder)")
  p.add_argument("--regime-sweep", action="store_true",
                 help="FedAvg at every regime interval x grid LR, seed 0")
  p.add_argument("--piece", nargs=3, metavar=("ARM", "LR", "SEED"),
                 help="run one piece (the driver's child)")
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--max-minutes", type=float, default=None,
                 help="start no new piece after this long (the driver resumes next time)")
  p.add_argument("--probe", action="store_true",
                 help="time compile + 2 rounds + 1 evaluation per arm (default FedAvg(tau') and "
                      "FedLAMA phi=2) and extrapolate minutes per piece")
  p.add_argument("--smoke", action="store_true", help="tiny federation, 4 local steps (tests)")
  p.add_argument("--data-dir", default=None, help="TFDS data_dir (cifar10_resnet20)")
  p.add_argument("--out-dir", default=RESULTS)
  args = p.parse_args(argv)
  cfg = config(args.preset, args.tau, args.steps, args.lrs, args.smoke)
  roots = _roots(cfg, args.out_dir)

  if args.piece:
    arm, lr, seed = args.piece[0], float(args.piece[1]), int(args.piece[2])
    root = roots["regime"] if args.regime_sweep else roots["main"]
    run_piece(cfg, arm, lr, seed, piece_path(root, arm, lr, seed), args.data_dir)
    return
  if args.probe:
    arms = args.arms if args.arms != list(ARMS) else ["fedavg_tau", "fedlama_phi2"]
    out = probe(cfg, arms, args.data_dir)
    write_json(os.path.join(os.path.dirname(roots["main"]), f"probe_{tag(cfg)}.json"), out)
    return

  # the driver's command, less the flags that only pace it (the report covers all pieces done)
  command = command_line(__file__, argv, drop={"--report-only": 0, "--max-minutes": 1})
  child = [sys.executable, os.path.abspath(__file__), "--preset", args.preset,
           "--out-dir", args.out_dir]
  for flag, v in (("--tau", args.tau), ("--steps", args.steps), ("--data-dir", args.data_dir)):
    if v is not None:
      child += [flag, str(v)]
  if args.lrs:
    child += ["--lrs", *[str(v) for v in args.lrs]]
  if args.smoke:
    child.append("--smoke")
  t0 = time.time()

  def out_of_time():
    if args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes:
      print("time budget reached; rerun to continue", flush=True)
      return True
    return False

  if args.regime_sweep:
    if not args.report_only:
      _, stale = _collect(cfg, roots["regime"], sorted({a for a, _, _ in regime_plan(cfg)}),
                          cfg["lrs"], [0])
      if stale:
        p.error(f"{roots['regime']} holds pieces of another configuration ({', '.join(stale)})")
      for arm, lr, seed in regime_plan(cfg):
        if os.path.exists(piece_path(roots["regime"], arm, lr, seed)):
          continue
        if out_of_time():
          break
        subprocess.run(child + ["--regime-sweep", "--piece", arm, str(lr), str(seed)],
                       check=True)
        report_regime(cfg, roots, command, args.out_dir)
    res = report_regime(cfg, roots, command, args.out_dir)
    if res:
      for q in res["pairs"]:
        print(f"tau' {q['tau']:3d} lr {q['lr']:g}: FedAvg(tau') {q['fedavg_tau']:.4f} "
              f"FedAvg(2tau') {q['fedavg_2tau']:.4f} gap {q['gap']:+.4f}")
    return

  if not args.report_only:
    _, stale = _collect(cfg, roots["main"], args.arms, cfg["lrs"], args.seeds)
    if stale:
      p.error(f"{roots['main']} holds pieces of another configuration ({', '.join(stale)}); "
              "move them away or choose another --tau/--steps")
    while True:  # the plan grows as arms' grids complete (phases C, D)
      done, _ = _collect(cfg, roots["main"], args.arms, cfg["lrs"], args.seeds)
      grid = {(a, lr): q for (a, lr, s), q in done.items() if s == args.seeds[0]}
      best = best_lrs(grid, args.arms, list(cfg["lrs"]))
      todo = [x for x in main_plan(args.arms, cfg["lrs"], args.seeds, best)
              if not os.path.exists(piece_path(roots["main"], *x))]
      if not todo or out_of_time():
        break
      arm, lr, seed = todo[0]
      if not _reuse_regime_piece(cfg, roots, arm, lr, seed):
        subprocess.run(child + ["--piece", arm, str(lr), str(seed)], check=True)
      report(cfg, roots, args.arms, args.seeds, command, args.out_dir)
  res = report(cfg, roots, args.arms, args.seeds, command, args.out_dir)
  if res:
    for r in res["rows"]:
      print(f"{r['arm']:16s} lr {r['lr']:<5g} final {r['final_acc_mean']:.4f} ± "
            f"{r['final_acc_std']:.4f} rel. uplink {r['rel_uplink']:.3f} "
            f"({len(r['seeds'])} seeds)")


if __name__ == "__main__":
  main()
