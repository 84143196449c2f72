"""mL-BFGS against SGD, AdamW and K-FAC, fairly tuned, in steps and in wall-clock (issue 17).

Resumable study: one (workload, optimizer, learning rate, seed) per child process, each writing
its own JSON under ``experiments/results/mlbfgs/<workload>/``; the driver skips pieces already
written, starts no new piece after ``--max-minutes``, and rewrites the report after every
piece. ``--report-only`` writes ``experiments/results/mlbfgs.{json,md,png}`` from the pieces
done.

Optimizers (the reference's baselines, ALGORITHMS.md §4.8 and §11; weight decay ``wd`` of the
workload, the same value for every optimizer):

  adamw          ``optax.adamw`` (betas 0.9/0.999, decoupled weight decay ``wd``, as the
                 reference's ``torch.optim.AdamW(weight_decay=wd)``);
  sgd            SGD + momentum 0.9 with coupled weight decay (``add_decayed_weights(wd)``);
  kfac           K-FAC by kfac-jax (``kfac_jax.Optimizer``), the reference's settings mapped
                 as below, kfac-jax's own step (momentum on the KL-clipped direction);
  kfac_nsgd      the same K-FAC preconditioner with the reference's step: the authors'
                 ``train.py`` hands kfac-pytorch's preconditioned gradient to their
                 ``SGDOptimizer`` (``opt/sgd.py``), which divides it by its global norm before
                 the momentum (which makes the KL clip moot); here kfac-jax's direction is
                 divided by its global norm, no norm constraint (``NormalizedKfac``);
  mlbfgs         ``jaxfl.transforms.mlbfgs``, one block with every parameter ("full", the
                 authors' single-block SLIM variant);
  mlbfgs_blocks  the same with a block-diagonal Hessian (the authors' SLIMBLOCK): one block per
                 layer for the CNN (``top_level_block_labels``), one per stage for ResNet-20
                 with the stem and head not preconditioned (``resnet_block_labels(...,
                 "stage")``, the ResNet-50 layout of ``get_pblocks_resnet50``);
  nsgd           the authors' own SGD baseline (``opt/sgd.py``): SGD + momentum on the
                 gradient (+ ``wd`` theta) divided by its global norm, i.e. mL-BFGS without the
                 curvature (same step-length scale);
  mlbfgs_ref     ``mlbfgs`` with the reference's T = 50, beta = 0.999 (``run-SLIM.sh``) on the
                 workloads that run other values (the CNNs'); not run where they are the
                 workload's own (ResNet-20), where it would repeat ``mlbfgs``.

mL-BFGS settings: M = 10, gamma = 0.9, damping 0.01, sigma 0.01/1.5, heavy ball 0.9, the
paper's (not ``reference_mode``) momenta; T and beta per workload: T = 20, beta = 0.99 for the
Fashion-MNIST CNN (10 epochs = 4,690 steps: the reference's beta = 0.999 averages over ~1,000
steps, a fifth of the run), the reference's T = 50, beta = 0.999 for ResNet-20.

K-FAC mapping (reference: kfac-pytorch with damping 1e-3, factor decay 0.95, covariance update
every 10 steps, inverse every 100, KL clip 1e-3, then the SGD optimizer with momentum 0.9):
``damping_schedule`` = constant 1e-3 (``use_adaptive_damping=False``; kfac-jax adds it as
pi-adjusted factored Tikhonov damping, kfac-pytorch to the factors' eigenvalues);
``curvature_ema=0.95`` (kfac-jax keeps a weight-normalised EMA, the same average up to the
bias correction of the first steps); ``curvature_update_period=10``;
``inverse_update_period=100``; ``norm_constraint=1e-3`` (kfac-jax scales the preconditioned
gradient ``v`` so that ``lr^2 v.g <= 1e-3``: kfac-pytorch's KL clip, the same formula);
``estimation_mode="fisher_empirical"`` (the factors use the true labels, as kfac-pytorch's
backward hooks on the training loss); ``learning_rate_schedule`` = the workload's schedule
and ``momentum_schedule`` = 0.9 (``use_adaptive_learning_rate`` / ``_momentum=False``:
``delta = 0.9 delta - lr v``); ``num_burnin_steps=0`` (kfac-pytorch has no burn-in); weight
decay as an L2 term ``wd/2 |theta|^2`` in the loss with ``l2_reg=wd`` (the reference adds
``wd theta`` to the preconditioned gradient). The reference's SGD step after K-FAC also divides
by the global norm (which makes its KL clip moot); kfac-jax's step does not: a known
difference. Layers are registered by kfac-jax's graph matcher (convs and dense layers as
K-FAC blocks; BatchNorm scale/offset and anything unmatched as diagonal blocks); the models
use the plain ``lax`` conv (``conv_impl="lax"``) for every optimizer so that the matcher sees
the convs (jaxfl's faster conv carries a custom VJP). kfac-jax 0.0.8, the newest release,
needs two run-time patches on jax 0.10 (``kfac_jax_compat``: its jaxpr evaluator predates jax
0.9.2's ``get_bind_params``, and its conv factor statistics take ~50 s per update on XLA:CPU).

Schedule (every optimizer): the reference's ``CosineAnnealingLR(max_epoch)`` stepped per
epoch, from ``lr`` to ``lr / 1000`` (the reference: 0.1 to 1e-4). Learning-rate grids: six
log-spaced points (factor 2) per optimizer, the same size for every optimizer; seed 0 runs the
grid, seeds 1 and 2 run at each optimizer's best point. Best = lowest mean of the last two
evaluations of the training loss (seed 0); the report flags a best point at an edge of its grid
(then move the grid with ``--lrs`` or widen it: the claim needs an interior optimum).

Workloads (``PRESETS``):

  cnn        Fashion-MNIST, ``jaxfl.models.cnn(dense=128)`` (454,922 parameters), batch 128,
             10 epochs (4,690 steps), wd 5e-4, 20 evaluations.
  cnn14      the ``cnn`` workload on Fashion-MNIST downsampled to 14x14 (2x2 mean; the same
             CNN, 127,242 parameters: a quarter of the conv FLOPs), batch 128, 10 epochs
             (4,690 steps), T = 20, beta = 0.99: the CPU-scale CNN (the 28x28 ``cnn`` takes
             ~10 min per piece here, ~8 h for its 48 pieces; not yet run either).
  resnet20   Fashion-MNIST downsampled to 14x14 (2x2 mean, a quarter of the 28x28 FLOPs) on
             ``jaxfl.models.resnet20`` (272k parameters, BatchNorm), batch 128, 3 epochs
             (1,404 steps), wd 2e-4, T = 50, beta = 0.999: scaled to fit <= 30 min per
             optimizer (6 LRs + 2 seeds at ~3.4 min) on 2 CPU cores (a quiet probe: ~97 ms
             per step for every optimizer, 2.6 s per evaluation). Optimizers
             ``CPU_SCALE_OPTIMIZERS``: K-FAC with the reference's step (``kfac_nsgd``) only.
  dp_cnn     the distributed large-batch setting: the CNN data-parallel over every device of
             a 1-D mesh (the batch split over the devices, parameters and optimizer state
             replicated, gradients all-reduced by XLA; mL-BFGS's block-wise variant
             additionally splits its blocks over the devices with ``block_sharding``),
             global batch 1024, 10 epochs (580 steps), T = 10, beta = 0.99. On the CPU
             host the child process gets 2 XLA devices
             (``XLA_FLAGS=--xla_force_host_platform_device_count=2``); on a GPU, the devices
             it has.
  dp_cnn14   the ``dp_cnn`` workload on Fashion-MNIST at 14x14 (as ``cnn14``): the CPU-scale
             large-batch setting, with ``CPU_SCALE_OPTIMIZERS``.
  cifar10_resnet20  GPU only (paper scale): CIFAR-10 from TFDS (``--data-dir``), ResNet-20
             at 32x32, batch 128, 100 epochs, wd 2e-4, T = 50, beta = 0.999.

Measurements per piece: the per-step minibatch loss and the step's wall-clock (jitted step,
waited for; evaluations and the first call's compilation excluded), and every ~1/20 of the
run the loss/accuracy on a fixed 5,000-image training subset and on the test set. A
``cost`` piece per workload times every optimizer side by side in one process (interleaved
rounds of 10 steps, 100 steps each: one K-FAC inverse, 2-10 mL-BFGS extractions) for the
per-step cost ratio to AdamW. The report gives, per optimizer at its best LR (mean over
seeds): final train loss and test accuracy, steps and seconds to a target train loss (1.05 x
SGD's final: the paper's claim is a speed-up over SGD; the worst optimizer's final without an
SGD row) and to a target test accuracy (SGD's final - 0.5 points),
the seconds measured in the pieces and the cost-normalised seconds (steps x side-by-side
step time, robust to the host's load), and the grids.

Usage (each command resumes; ``--max-minutes`` paces a session)::

  python experiments/mlbfgs_benchmark.py --workloads cnn --max-minutes 300
  python experiments/mlbfgs_benchmark.py --workloads resnet20 dp_cnn --max-minutes 300
  python experiments/mlbfgs_benchmark.py --report-only
  python experiments/mlbfgs_benchmark.py --probe --workloads resnet20 dp_cnn  # min/piece
  python experiments/mlbfgs_benchmark.py --smoke --out-dir /tmp/mlbfgs_smoke  # < 2 min
  # GPU (one command; paper scale, see experiments/bench_gpu.sh):
  python experiments/mlbfgs_benchmark.py --workloads cifar10_resnet20 dp_cnn \\
      --data-dir ~/tensorflow_datasets --out-dir "$OUT" --max-minutes 8
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
  write_json,
  write_results,
)

OPTIMIZERS = ("adamw", "sgd", "kfac", "mlbfgs", "mlbfgs_blocks", "nsgd", "kfac_nsgd",
              "mlbfgs_ref")
# The CPU-scale ResNet-20 and data-parallel workloads: K-FAC with the reference's step only
# (``kfac_nsgd``, kfac-jax's preconditioner; kfac-jax's own KL-clipped step moved its grid four
# times on cnn14, 13 pieces), and no ``mlbfgs_ref`` (cnn14 showed it equal to ``nsgd``).
CPU_SCALE_OPTIMIZERS = ("adamw", "sgd", "mlbfgs", "mlbfgs_blocks", "nsgd", "kfac_nsgd")
MLBFGS_VARIANTS = ("mlbfgs", "mlbfgs_blocks", "mlbfgs_ref")
# The reference's curvature-pair settings (run-SLIM.sh: --period 50, --beta 0.999); the
# ``mlbfgs_ref`` arm runs them on workloads whose own T, beta differ (the CNNs').
REFERENCE_CURVATURE = dict(update_every=50, beta=0.999)
MLBFGS = dict(history=10, pair_momentum=0.9, damping=0.01, sigma_lo=0.01, sigma_hi=1.5)
KFAC = dict(damping=1e-3, curvature_ema=0.95, curvature_update_period=10,
            inverse_update_period=100, norm_constraint=1e-3, estimation_mode="fisher_empirical")
MOMENTUM = 0.9
LR_FLOOR = 1e-3  # cosine from lr to lr * LR_FLOOR (reference: 0.1 -> 1e-4)


def _grid(center: float, n: int = 6, factor: float = 2.0) -> tuple[float, ...]:
  """``n`` log-spaced points, factor ``factor`` apart, ``center`` the (n//2)-th."""
  return tuple(float(f"{center * factor ** (i - n // 2):.4g}") for i in range(n))


# The normalised steps (mlbfgs*, nsgd, kfac_nsgd) take lr as a step length: the reference runs
# them at 0.1-0.2 (run-SLIM.sh), so their grids reach 0.16 (small batch) and 0.32 or 0.64 (large).
# AdamW's grid reaches 8e-3: on cnn14 its loss still fell from 2e-3 to 4e-3. K-FAC with
# kfac-jax's step reaches down to 4.9e-5: on cnn14 its KL clip binds at large lr and the loss kept
# falling with lr down to 2e-4 (the grid moved four times from 0.05; every piece is kept).
GRIDS_SMALL_BATCH = {"adamw": _grid(2e-3), "sgd": _grid(0.05), "kfac": _grid(0.000390625),
                     "mlbfgs": _grid(0.04), "mlbfgs_blocks": _grid(0.04), "nsgd": _grid(0.04),
                     "kfac_nsgd": _grid(0.04), "mlbfgs_ref": _grid(0.04)}
# dp_cnn14 moved the grids of AdamW, nsgd and kfac_nsgd up one point (their seed-0 best was the
# top point: 0.016, 0.32, 0.32); the pieces of the first grid are kept.
GRIDS_LARGE_BATCH = {"adamw": _grid(8e-3), "sgd": _grid(0.2), "kfac": _grid(0.0015625),
                     "mlbfgs": _grid(0.08), "mlbfgs_blocks": _grid(0.08), "nsgd": _grid(0.16),
                     "kfac_nsgd": _grid(0.16), "mlbfgs_ref": _grid(0.08)}

PRESETS = {
    "cnn": dict(dataset="fashion_mnist", model="cnn", image=28, batch=128, epochs=10, devices=1,
                update_every=20, beta=0.99, weight_decay=5e-4, evals=20, blocks="layer",
                grids=GRIDS_SMALL_BATCH),
    "cnn14": dict(dataset="fashion_mnist", model="cnn", image=14, batch=128, epochs=10,
                  devices=1, update_every=20, beta=0.99, weight_decay=5e-4, evals=20,
                  blocks="layer", grids=GRIDS_SMALL_BATCH),
    "resnet20": dict(dataset="fashion_mnist", model="resnet20", image=14, batch=128, epochs=3,
                     devices=1, update_every=50, beta=0.999, weight_decay=2e-4, evals=20,
                     blocks="stage", grids=GRIDS_SMALL_BATCH, optimizers=CPU_SCALE_OPTIMIZERS),
    "dp_cnn": dict(dataset="fashion_mnist", model="cnn", image=28, batch=1024, epochs=10,
                   devices="all", update_every=10, beta=0.99, weight_decay=5e-4, evals=20,
                   blocks="layer", grids=GRIDS_LARGE_BATCH),
    "dp_cnn14": dict(dataset="fashion_mnist", model="cnn", image=14, batch=1024, epochs=10,
                     devices="all", update_every=10, beta=0.99, weight_decay=5e-4, evals=20,
                     blocks="layer", grids=GRIDS_LARGE_BATCH, optimizers=CPU_SCALE_OPTIMIZERS),
    "cifar10_resnet20": dict(dataset="tfds:cifar10", model="resnet20", image=32, batch=128,
                             epochs=100, devices=1, update_every=50, beta=0.999,
                             weight_decay=2e-4, evals=25, blocks="stage",
                             grids=GRIDS_SMALL_BATCH),
}
# --smoke: the preset's model and batch on a small slice of the data (tests, estimates)
SMOKE = dict(num_train=None, num_test=512, num_train_eval=512, epochs=1, evals=2,
             update_every=2, cost_steps=10, cost_chunk=5)
SMOKE_OPTIMIZERS = ("adamw", "kfac", "mlbfgs_blocks")  # the three code paths, < 2 minutes
NUM_TRAIN_EVAL = 5_000  # fixed training subset for the train-loss evaluations
TRAIN_SIZE = {"fashion_mnist": 60_000, "tfds:cifar10": 50_000}
CPU_DEVICES = 2  # devices="all" on a CPU host: one XLA device per core of the dev box
COST_STEPS, COST_CHUNK = 100, 10
TARGET_ANCHOR = "sgd"  # the targets are 1.05 x its final train loss and its final acc - 0.5


# ----------------------------------------------------------------------------- configuration


def config(workload: str, smoke: bool = False, lrs=None, reference_mode: bool = False) -> dict:
  cfg = dict(PRESETS[workload], workload=workload, smoke=smoke, num_train=None, num_test=None,
             num_train_eval=NUM_TRAIN_EVAL, reference_mode=reference_mode)
  cfg["grids"] = {k: tuple(v) for k, v in cfg["grids"].items()}
  if smoke:
    cfg.update(SMOKE, num_train=8 * cfg["batch"])  # 8 steps
    cfg["grids"] = {k: (v[len(v) // 2],) for k, v in cfg["grids"].items()}
  if lrs:
    cfg["grids"] = {k: tuple(float(x) for x in lrs) for k in cfg["grids"]}
  return cfg


def curvature_settings(cfg: dict, opt: str) -> tuple[int, float]:
  """(T, beta) of an mL-BFGS arm: the workload's, or the reference's for ``mlbfgs_ref``."""
  if opt == "mlbfgs_ref":
    return REFERENCE_CURVATURE["update_every"], REFERENCE_CURVATURE["beta"]
  return cfg["update_every"], cfg["beta"]


def workload_optimizers(cfg: dict, optimizers=None) -> list[str]:
  """The optimizers run on a workload: ``optimizers`` (default: the preset's ``optimizers``,
  else all) less ``mlbfgs_ref`` where the workload already runs the reference's T and beta
  (there it would repeat ``mlbfgs``)."""
  if optimizers is None:
    optimizers = cfg.get("optimizers", OPTIMIZERS)
  same = (cfg["update_every"], cfg["beta"]) == curvature_settings(cfg, "mlbfgs_ref")
  return [o for o in optimizers if not (same and o == "mlbfgs_ref")]


def tag(cfg: dict) -> str:
  return (cfg["workload"] + ("_smoke" if cfg["smoke"] else "")
          + ("_refmode" if cfg["reference_mode"] else ""))


def run_config(cfg: dict, opt: str, lr: float, seed: int) -> dict:
  """Everything that determines a piece's numbers (pieces of another configuration are
  ignored by the report)."""
  keys = ("dataset", "model", "image", "batch", "epochs", "weight_decay", "evals", "num_train",
          "num_test", "num_train_eval")
  out = {k: cfg[k] for k in keys}
  out.update(optimizer=opt, lr=float(lr), seed=int(seed), momentum=MOMENTUM,
             lr_floor=LR_FLOOR)
  if opt in MLBFGS_VARIANTS:
    t, beta = curvature_settings(cfg, opt)
    out.update(MLBFGS, update_every=t, beta=beta,
               reference_mode=cfg["reference_mode"],
               blocks=cfg["blocks"] if opt == "mlbfgs_blocks" else "full")
  if opt == "kfac":
    out.update(KFAC)
  if opt == "kfac_nsgd":
    out.update(KFAC, norm_constraint=None, direction="global-norm normalised")
  return out


# ------------------------------------------------------------------------------------ set-up


def _downsample(x: np.ndarray, size: int) -> np.ndarray:
  f = x.shape[1] // size
  if f == 1:
    return x
  n, _, _, c = x.shape
  return x.reshape(n, size, f, size, f, c).mean(axis=(2, 4)).astype(np.float32)


def load_data(cfg: dict, data_dir: str | None = None):
  """(x_train, y_train, x_test, y_test, train-eval indices) as NumPy arrays."""
  import jaxfl.data

  if cfg["dataset"] == "fashion_mnist":
    ds = jaxfl.data.load_fashion_mnist()
  else:
    ds = jaxfl.data.load_tfds(cfg["dataset"].split(":", 1)[1], data_dir)
  xtr, ytr = _downsample(ds.x_train, cfg["image"]), ds.y_train.astype(np.int32)
  xte, yte = _downsample(ds.x_test, cfg["image"]), ds.y_test.astype(np.int32)
  if cfg["num_train"]:
    xtr, ytr = xtr[:cfg["num_train"]], ytr[:cfg["num_train"]]
  if cfg["num_test"]:
    xte, yte = xte[:cfg["num_test"]], yte[:cfg["num_test"]]
  sub = np.random.default_rng(1234).permutation(len(xtr))[:cfg["num_train_eval"]]
  return xtr, ytr, xte, yte, np.sort(sub)


def build_model(cfg: dict, input_shape):
  import jaxfl.models

  if cfg["model"] == "cnn":
    return jaxfl.models.cnn(tuple(input_shape), 10, dense=128, conv_impl="lax")
  return jaxfl.models.resnet20(tuple(input_shape), 10, conv_impl="lax")


def lr_schedule(lr: float, steps_per_epoch: int, epochs: int):
  """The reference's per-epoch cosine annealing, from ``lr`` to ``lr * LR_FLOOR``."""
  import jax.numpy as jnp

  lo = lr * LR_FLOOR

  def sched(step):
    epoch = jnp.minimum(step // steps_per_epoch, epochs - 1)
    return lo + (lr - lo) * 0.5 * (1 + jnp.cos(jnp.pi * epoch / epochs))
  return sched


def block_labels(cfg: dict, params):
  from jaxfl import transforms as M

  if cfg["blocks"] == "layer":
    return M.top_level_block_labels(params)
  return M.resnet_block_labels(params, cfg["blocks"])


def normalized_sgd_direction():
  """``u / |u|_2`` over all leaves (the reference's ``SGDOptimizer``)."""
  import jax
  import jax.numpy as jnp
  import optax

  def update(updates, state, params=None):
    del params
    nrm = optax.tree.norm(updates)
    scale = jnp.where(nrm > 0, 1 / jnp.where(nrm > 0, nrm, 1), 1)
    return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optax(cfg: dict, opt: str, lr: float, params, steps_per_epoch: int, sharding=None):
  import optax

  from jaxfl import transforms as M

  sched = lr_schedule(lr, steps_per_epoch, cfg["epochs"])
  wd = cfg["weight_decay"]
  if opt == "adamw":
    return optax.adamw(sched, b1=0.9, b2=0.999, weight_decay=wd)
  if opt == "sgd":
    return optax.chain(optax.add_decayed_weights(wd), optax.sgd(sched, momentum=MOMENTUM))
  if opt == "nsgd":
    return optax.chain(optax.add_decayed_weights(wd), normalized_sgd_direction(),
                       optax.trace(MOMENTUM), optax.scale_by_learning_rate(sched))
  if opt in MLBFGS_VARIANTS:
    labels = block_labels(cfg, params) if opt == "mlbfgs_blocks" else None
    t, beta = curvature_settings(cfg, opt)
    return M.mlbfgs(sched, labels, momentum=MOMENTUM, beta_p=beta, beta_g=beta,
                    update_every=t, weight_decay=wd,
                    reference_mode=cfg["reference_mode"],
                    sharding=sharding if opt == "mlbfgs_blocks" else None, **MLBFGS)
  raise ValueError(opt)


def kfac_jax_compat() -> None:
  """Two patches that make kfac-jax 0.0.8 (the newest on PyPI) usable on jax 0.10.

  1. kfac-jax 0.0.8's ``tag_graph_matcher.eval_jaxpr_eqn`` unpacks
     ``primitive.get_bind_params(params)`` as ``(subfuns, params)``; since jax 0.9.2 it
     returns the params alone, so every curvature update raised ``ValueError: too many values
     to unpack``. kfac-jax fixed this on its main branch after 0.0.8 (``[JAX] Require all
     positional arguments passed to bind to be JAX values``); the replacement here binds the
     params as jax >= 0.9.2 expects.
  2. The input factor of a conv block (second moment of the input patches) is computed by
     kfac-jax with convolutions inside a ``fori_loop``, where XLA:CPU falls back to a naive
     conv kernel: ~50 s per curvature update for the Fashion-MNIST CNN here. The replacement
     extracts the patches (NHWC, explicit padding, no weighting: the case of these models;
     anything else goes to kfac-jax's own function) and takes one matmul: ~1 s. The two agree
     to float rounding; checked below on a random input at every install.
  """
  import types

  import jax
  import jax.extend as jex
  import jax.numpy as jnp
  import kfac_jax._src.curvature_blocks.kronecker_factored as kf
  import kfac_jax._src.tag_graph_matcher as tgm

  if getattr(kf.psm, "_jaxfl_patched", False):
    return

  def eval_jaxpr_eqn(eqn, in_values):
    params = eqn.primitive.get_bind_params(eqn.params)
    with jex.source_info_util.user_context(eqn.source_info.traceback):
      out = eqn.primitive.bind(*in_values, **params)
    return out if isinstance(out, list) else [out]

  psm = kf.psm

  def patches_moments(inputs, kernel_spatial_shape, strides=1, padding="VALID",
                      data_format="NHWC", dim_numbers=None, precision=None,
                      weighting_array=None, **kwargs):
    lhs = None if dim_numbers is None else tuple(dim_numbers.lhs_spec)
    if weighting_array is not None or kwargs or lhs != (0, 3, 1, 2) or isinstance(padding, str):
      return psm.patches_moments(inputs, kernel_spatial_shape, strides=strides, padding=padding,
                                 data_format=data_format, dim_numbers=dim_numbers,
                                 precision=precision, weighting_array=weighting_array, **kwargs)
    (kh, kw), (sh, sw) = kernel_spatial_shape, strides
    x = jnp.pad(inputs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    oh, ow, c = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1, x.shape[3]
    cols = [x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
            for i in range(kh) for j in range(kw)]
    patches = jnp.stack(cols, axis=3).reshape(-1, kh * kw * c)  # rows: (kh, kw, c) order
    m = jnp.matmul(patches.T, patches, precision=precision)
    return m.reshape(kh, kw, c, kh, kw, c), jnp.sum(patches, axis=0).reshape(kh, kw, c)

  x = jax.random.normal(jax.random.key(0), (3, 7, 7, 2))
  dn = jax.lax.conv_dimension_numbers(x.shape, (3, 3, 2, 4), ("NHWC", "HWIO", "NHWC"))
  for st, pad in (((1, 1), ((1, 1), (1, 1))), ((2, 2), ((1, 0), (0, 1)))):
    want = psm.patches_moments(x, (3, 3), strides=st, padding=pad, data_format=None,
                               dim_numbers=dn)
    got = patches_moments(x, (3, 3), strides=st, padding=pad, data_format=None, dim_numbers=dn)
    for a, b in zip(want, got):
      if a.shape != b.shape or not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                               atol=1e-4):
        raise RuntimeError("im2col patch moments disagree with kfac-jax's; not patching")
  tgm.eval_jaxpr_eqn = eval_jaxpr_eqn
  kf.psm = types.SimpleNamespace(**{**vars(psm), "patches_moments": patches_moments,
                                    "_jaxfl_patched": True})


def normalized_kfac_class():
  """``kfac_jax.Optimizer`` whose preconditioned gradient ``v`` is divided by its global norm
  (the reference's K-FAC step, ``kfac_nsgd``); kfac-jax then applies ``delta = 0.9 delta -
  lr v / |v|``, the authors' ``SGDOptimizer`` update (``buf = 0.9 buf + d; p -= lr buf``) up to
  when the learning rate multiplies."""
  import kfac_jax
  import optax

  class NormalizedKfac(kfac_jax.Optimizer):
    # kfac-jax calls this hook between the preconditioning and the step: the one place where
    # the direction can be rescaled with the optimizer's own momentum and schedules intact.
    def _maybe_apply_norm_constraint(self, grads, preconditioned_grads, coefficient):
      del grads, coefficient
      unit, _ = normalized_sgd_direction().update(preconditioned_grads, optax.EmptyState())
      return unit, None

  return NormalizedKfac


class Trainer:
  """One optimizer's jitted training step, the same interface for optax and kfac-jax.

  ``step(params, opt_state, model_state, x, y, idx, i) -> (params, opt_state, model_state,
  loss)`` with ``idx`` the minibatch's indices into the device-resident training arrays.
  """

  def __init__(self, cfg, opt, lr, model, params, model_state, steps_per_epoch, mesh=None):
    import jax
    import jax.numpy as jnp
    import optax

    self.opt, self.kfac = opt, opt in ("kfac", "kfac_nsgd")
    wd = cfg["weight_decay"]
    self.mesh = mesh
    data = None if mesh is None else jax.NamedSharding(mesh, jax.P(mesh.axis_names[0]))

    def xent(p, ms, xb, yb, register=False):
      logits, new_ms = model.apply(p, ms, xb, train=True)
      if register:
        import kfac_jax

        kfac_jax.register_softmax_cross_entropy_loss(logits, yb)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb)), new_ms

    def gather(x, y, idx):
      xb, yb = x[idx], y[idx]
      if data is not None:
        xb, yb = jax.lax.with_sharding_constraint((xb, yb), data)
      return xb, yb

    if not self.kfac:
      tx = make_optax(cfg, opt, lr, params, steps_per_epoch, sharding=data)

      def step(p, s, ms, x, y, idx):
        xb, yb = gather(x, y, idx)
        (loss, ms), g = jax.value_and_grad(xent, has_aux=True)(p, ms, xb, yb)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, ms, loss

      self._step = jax.jit(step, donate_argnums=(0, 1))
      self.init = lambda p, ms, x, y, idx: jax.jit(tx.init)(p)  # on p's devices
      self.variant = lambda i: 0  # one compiled step
      return

    import kfac_jax

    kfac_jax_compat()

    def value(p, ms, batch):
      xb, yb = batch
      loss, ms = xent(p, ms, xb, yb, register=True)
      l2 = 0.5 * wd * sum(jnp.sum(v ** 2) for v in jax.tree.leaves(p))
      return loss + l2, ms

    const = lambda v: (lambda step: jnp.asarray(v, jnp.float32))
    normalised = opt == "kfac_nsgd"
    self.optimizer = (normalized_kfac_class() if normalised else kfac_jax.Optimizer)(
        value_and_grad_func=jax.value_and_grad(value, has_aux=True), l2_reg=wd,
        value_func_has_state=True, use_adaptive_learning_rate=False,
        learning_rate_schedule=lr_schedule(lr, steps_per_epoch, cfg["epochs"]),
        use_adaptive_momentum=False, momentum_schedule=const(MOMENTUM),
        use_adaptive_damping=False, damping_schedule=const(KFAC["damping"]),
        norm_constraint=None if normalised else KFAC["norm_constraint"], num_burnin_steps=0,
        estimation_mode=KFAC["estimation_mode"], curvature_ema=KFAC["curvature_ema"],
        curvature_update_period=KFAC["curvature_update_period"],
        inverse_update_period=KFAC["inverse_update_period"], multi_device=False)
    self._gather = jax.jit(gather) if data is None else jax.jit(gather, out_shardings=data)
    # kfac-jax compiles its step once per value of the static curvature-update flag
    self.variant = lambda i: i % KFAC["curvature_update_period"] == 0

    def init(p, ms, x, y, idx):
      return self.optimizer.init(p, jax.random.key(0), self._gather(x, y, idx), ms)

    self.init = init

  def step(self, p, s, ms, x, y, idx, i):
    import jax

    if not self.kfac:
      return self._step(p, s, ms, x, y, idx)
    p, s, ms, stats = self.optimizer.step(p, s, jax.random.key(i), batch=self._gather(x, y, idx),
                                          func_state=ms, global_step_int=i)
    return p, s, ms, stats["loss"]


def _mesh(cfg: dict):
  import jax

  if cfg["devices"] == 1 or len(jax.devices()) == 1:
    return None
  return jax.sharding.Mesh(np.array(jax.devices()), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))


def setup(cfg: dict, opt: str, lr: float, seed: int, data_dir=None):
  """Data on the devices, model, initial params and a Trainer."""
  import jax

  xtr, ytr, xte, yte, sub = load_data(cfg, data_dir)
  mesh = _mesh(cfg)
  put = (lambda a: jax.device_put(a)) if mesh is None else (
      lambda a: jax.device_put(a, jax.NamedSharding(mesh, jax.P())))
  model = build_model(cfg, xtr.shape[1:])
  params, mstate = model.init(jax.random.key(seed))
  params, mstate = put(params), put(mstate)
  steps_per_epoch = len(xtr) // cfg["batch"]
  trainer = Trainer(cfg, opt, lr, model, params, mstate, steps_per_epoch, mesh)
  put_chunks = (lambda a: jax.device_put(a)) if mesh is None else (
      lambda a: jax.device_put(a, jax.NamedSharding(mesh, jax.P(None, mesh.axis_names[0]))))
  arrays = dict(x=put(xtr), y=put(ytr), test=eval_chunks(xte, yte, put_chunks),
                train_sub=eval_chunks(xtr[sub], ytr[sub], put_chunks))
  return model, params, mstate, trainer, arrays, steps_per_epoch, mesh


EVAL_CHUNK = 1000


def eval_chunks(x: np.ndarray, y: np.ndarray, put_chunks):
  """``(x, y)`` as ``[k, chunk, ...]`` arrays on the devices (chunks split over the mesh)."""
  chunk = EVAL_CHUNK if len(x) % EVAL_CHUNK == 0 else len(x)
  k = len(x) // chunk
  return (put_chunks(x.reshape((k, chunk) + x.shape[1:])), put_chunks(y.reshape(k, chunk)))


def make_evaluate(model):
  """``evaluate(params, model_state, (x, y) chunks) -> (mean loss, accuracy)``: one jitted
  ``lax.map`` over the chunks (each chunk split over the devices of a mesh)."""
  import jax
  import jax.numpy as jnp
  import optax

  @jax.jit
  def evaluate_(p, ms, xs, ys):
    def part(xy):
      logits = model.apply(p, ms, xy[0], train=False)[0]
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, xy[1])
      return jnp.sum(loss), jnp.sum(jnp.argmax(logits, -1) == xy[1])
    losses, hits = jax.lax.map(part, (xs, ys))
    n = ys.size
    return jnp.sum(losses) / n, jnp.sum(hits) / n

  def evaluate(p, ms, data):
    loss, acc = evaluate_(p, ms, *data)
    return float(loss), float(acc)
  return evaluate


def _epoch_indices(n: int, batch: int, epoch: int, seed: int) -> np.ndarray:
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  steps = n // batch
  return perm[:steps * batch].reshape(steps, batch).astype(np.int32)


def _put_idx(idx, mesh):
  import jax

  if mesh is None:
    return jax.device_put(idx)
  return jax.device_put(idx, jax.NamedSharding(mesh, jax.P(mesh.axis_names[0])))


# ------------------------------------------------------------------------------------ pieces


def run_piece(cfg: dict, opt: str, lr: float, seed: int, out: str, data_dir=None) -> dict:
  """Trains one (optimizer, LR, seed) and writes its JSON atomically at ``out``."""
  import jax

  load0 = os.getloadavg()[0]
  t_setup = time.perf_counter()
  model, params, mstate, trainer, a, spe, mesh = setup(cfg, opt, lr, seed, data_dir)
  evaluate = make_evaluate(model)
  total = spe * cfg["epochs"]
  every = max(1, total // cfg["evals"])
  idx0 = _put_idx(_epoch_indices(a["x"].shape[0], cfg["batch"], 0, seed)[0], mesh)
  state = trainer.init(params, mstate, a["x"], a["y"], idx0)
  setup_s = time.perf_counter() - t_setup

  def do_eval(step, window):
    tl, ta = evaluate(params, mstate, a["train_sub"])
    vl, va = evaluate(params, mstate, a["test"])
    return {"step": step, "epoch": step / spe, "train_loss": tl,
            "train_acc": ta, "test_loss": vl, "test_acc": va,
            "minibatch_loss": float(np.mean(window)) if window else None}

  t_eval = time.perf_counter()
  history = [do_eval(0, [])]
  eval_s = time.perf_counter() - t_eval
  window, times, diverged, i = [], [], False, 0
  for epoch in range(cfg["epochs"]):
    for idx in _epoch_indices(a["x"].shape[0], cfg["batch"], epoch, seed):
      t0 = time.perf_counter()
      params, state, mstate, loss = trainer.step(params, state, mstate, a["x"], a["y"],
                                                 _put_idx(idx, mesh), i)
      loss = float(jax.block_until_ready(loss))
      times.append(time.perf_counter() - t0)
      i += 1
      window.append(loss)
      if not np.isfinite(loss):
        diverged = True
        break
      if i % every == 0 or i == total:
        t_eval = time.perf_counter()
        history.append(do_eval(i, window))
        eval_s += time.perf_counter() - t_eval
        window = []
    if diverged:
      break
  if diverged:
    history.append({"step": i, "epoch": i / spe, "train_loss": None, "train_acc": None,
                    "test_loss": None, "test_acc": None, "minibatch_loss": None})
  # The training clock: every step's wall time, except the calls that compiled (the first
  # call of each compiled variant of the step: one for optax, kfac-jax one per value of its
  # static "update the curvature now" flag), which count as the variant's median instead.
  variant = trainer.variant
  first = {}
  for k in range(len(times)):
    first.setdefault(variant(k), k)
  compile_s = 0.0
  for v, k in first.items():
    rest = [t for j, t in enumerate(times) if variant(j) == v and j != k]
    typical = float(np.median(rest)) if rest else 0.0
    compile_s += times[k] - typical
    times[k] = typical
  clock = np.concatenate([[0.0], np.cumsum(times)])
  for h in history:
    h["time"] = float(clock[h["step"]])
  steady = [t for k, t in enumerate(times) if k not in first.values()]
  last = history[-1]
  piece = {
      "workload": cfg["workload"], "optimizer": opt, "lr": float(lr), "seed": int(seed),
      "run": run_config(cfg, opt, lr, seed),
      "config": {k: v for k, v in cfg.items() if k != "grids"},
      "steps": i, "total_steps": total, "steps_per_epoch": spe, "diverged": diverged,
      "train_seconds": float(clock[-1]), "compile_seconds": compile_s,
      "setup_seconds": setup_s, "eval_seconds": eval_s,
      "step_seconds_median": float(np.median(steady)) if steady else None,
      "step_seconds_mean": float(np.mean(steady)) if steady else None,
      "final_train_loss": last["train_loss"], "final_test_acc": last["test_acc"],
      "history": history,
      "host": {"load_avg_start": load0, "load_avg_end": os.getloadavg()[0],
               "cpu_count": os.cpu_count(), "devices": len(jax.devices()),
               "platform": jax.devices()[0].platform, "jax": jax.__version__},
  }
  write_json(out, piece, indent=None)
  fmt = lambda v: "nan" if v is None else f"{v:.4f}"
  print(f"{cfg['workload']} {opt} lr {lr:g} seed {seed}: train loss {fmt(last['train_loss'])} "
        f"test acc {fmt(last['test_acc'])} ({clock[-1]:.0f} s training, {i} steps, "
        f"{1e3 * (piece['step_seconds_median'] or 0):.1f} ms/step, compile "
        f"{compile_s or 0:.1f} s, load {load0:.1f})", flush=True)
  return piece


def run_cost(cfg: dict, out: str, optimizers, data_dir=None) -> dict:
  """Per-step time of every optimizer, side by side: interleaved rounds of ``COST_CHUNK``
  steps until each has run ``COST_STEPS`` timed steps (after ``2 T`` + 2 warm-up steps)."""
  import jax

  runs = {}
  for opt in optimizers:
    lr = cfg["grids"][opt][len(cfg["grids"][opt]) // 2]
    model, params, mstate, trainer, a, spe, mesh = setup(cfg, opt, lr, 0, data_dir)
    idx = _epoch_indices(a["x"].shape[0], cfg["batch"], 0, 0)
    state = trainer.init(params, mstate, a["x"], a["y"], _put_idx(idx[0], mesh))
    runs[opt] = dict(trainer=trainer, carry=(params, state, mstate), a=a, idx=idx, i=0,
                     mesh=mesh, times=[])
    for _ in range(2 * curvature_settings(cfg, opt)[0] + 2):
      _cost_step(runs[opt], timed=False)
  chunk = cfg.get("cost_chunk", COST_CHUNK)
  rounds = max(1, cfg.get("cost_steps", COST_STEPS) // chunk)
  for r in range(rounds):
    order = optimizers[r % len(optimizers):] + optimizers[:r % len(optimizers)]
    for opt in order:
      for _ in range(chunk):
        _cost_step(runs[opt], timed=True)
  res = {opt: {"mean_s": float(np.mean(v["times"])), "median_s": float(np.median(v["times"])),
               "steps": len(v["times"])} for opt, v in runs.items()}
  base = res.get("adamw")
  for v in res.values():
    if base:
      v["mean_ratio_adamw"] = v["mean_s"] / base["mean_s"]
      v["median_ratio_adamw"] = v["median_s"] / base["median_s"]
  piece = {"workload": cfg["workload"], "config": {k: v for k, v in cfg.items() if k != "grids"},
           "steps": rounds * chunk, "chunk": chunk, "optimizers": res,
           "host": {"load_avg": os.getloadavg()[0], "devices": len(jax.devices()),
                    "platform": jax.devices()[0].platform}}
  write_json(out, piece)
  for opt, v in res.items():
    print(f"cost {cfg['workload']} {opt}: {1e3 * v['mean_s']:.1f} ms/step (mean), x"
          f"{v.get('mean_ratio_adamw', float('nan')):.2f} AdamW", flush=True)
  return piece


def _cost_step(run, timed: bool):
  import jax

  n = len(run["idx"])
  p, s, ms = run["carry"]
  t0 = time.perf_counter()
  p, s, ms, loss = run["trainer"].step(p, s, ms, run["a"]["x"], run["a"]["y"],
                                       _put_idx(run["idx"][run["i"] % n], run["mesh"]),
                                       run["i"])
  jax.block_until_ready(loss)
  if timed:
    run["times"].append(time.perf_counter() - t0)
  run["carry"], run["i"] = (p, s, ms), run["i"] + 1


def probe(cfg: dict, optimizers, data_dir=None, steps: int = 6) -> dict:
  """Minutes per piece: compile + ``steps`` timed steps + one evaluation, extrapolated."""
  import jax

  out = {"workload": cfg["workload"], "load_avg_start": os.getloadavg()[0], "optimizers": {}}
  for opt in optimizers:
    lr = cfg["grids"][opt][len(cfg["grids"][opt]) // 2]
    t0 = time.perf_counter()
    model, params, mstate, trainer, a, spe, mesh = setup(cfg, opt, lr, 0, data_dir)
    idx = _epoch_indices(a["x"].shape[0], cfg["batch"], 0, 0)
    state = trainer.init(params, mstate, a["x"], a["y"], _put_idx(idx[0], mesh))
    setup_s = time.perf_counter() - t0
    times = []
    for i in range(steps + 1):
      t0 = time.perf_counter()
      params, state, mstate, loss = trainer.step(params, state, mstate, a["x"], a["y"],
                                                 _put_idx(idx[i], mesh), i)
      jax.block_until_ready(loss)
      times.append(time.perf_counter() - t0)
    evaluate = make_evaluate(model)
    t0 = time.perf_counter()
    evaluate(params, mstate, a["train_sub"])
    evaluate(params, mstate, a["test"])
    eval_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate(params, mstate, a["train_sub"])
    evaluate(params, mstate, a["test"])
    eval_s = time.perf_counter() - t0
    total = spe * cfg["epochs"]
    step_s = float(np.median(times[1:]))
    piece_s = setup_s + times[0] + total * step_s + (cfg["evals"] + 1) * eval_s + eval_first
    out["optimizers"][opt] = {"setup_s": setup_s, "compile_s": times[0], "step_s": step_s,
                              "eval_s": eval_s, "steps": total,
                              "piece_minutes": piece_s / 60}
    print(f"probe {cfg['workload']} {opt}: compile {times[0]:.1f} s, {1e3 * step_s:.0f} ms/step "
          f"x {total} steps, eval {eval_s:.1f} s x {cfg['evals'] + 1} -> {piece_s / 60:.1f} "
          f"min/piece (load {os.getloadavg()[0]:.1f})", flush=True)
  return out


# ----------------------------------------------------------------------------------- planning


def piece_path(root: str, opt: str, lr: float, seed: int) -> str:
  return os.path.join(root, f"{opt}_lr{lr:g}_s{seed}.json")


def _score(piece: dict) -> float:
  """Selection score of a grid point: mean of the last two train-loss evaluations."""
  if piece["diverged"]:
    return math.inf
  vals = [h["train_loss"] for h in piece["history"][-2:] if h["train_loss"] is not None]
  return float(np.mean(vals)) if vals and np.all(np.isfinite(vals)) else math.inf


def collect(cfg: dict, root: str, optimizers, seeds):
  """Pieces of the current configuration ``{(opt, lr, seed): piece}`` and stale names."""
  done, stale = {}, []
  if not os.path.isdir(root):
    return done, stale
  for name in sorted(os.listdir(root)):
    if not name.endswith(".json") or name == "cost.json":
      continue
    piece = read_json(os.path.join(root, name))
    key = (piece["optimizer"], piece["lr"], piece["seed"])
    if key[0] not in optimizers:
      continue
    if piece["run"] != json.loads(json.dumps(run_config(cfg, *key))):
      stale.append(name)
      continue
    done[key] = piece
  return done, stale


def best_lrs(cfg: dict, done: dict, optimizers, seed0: int) -> dict[str, float]:
  """Best grid point per optimizer whose seed-``seed0`` grid is complete."""
  best = {}
  for opt in optimizers:
    grid = cfg["grids"][opt]
    pieces = [done.get((opt, lr, seed0)) for lr in grid]
    if all(p is not None for p in pieces):
      best[opt] = grid[int(np.argmin([_score(p) for p in pieces]))]
  return best


def plan(cfg: dict, optimizers, seeds, best: dict) -> list[tuple[str, float, int]]:
  """Seed 0: the middle LR of every optimizer, then outwards (below, above, ...); then the
  other seeds at each optimizer's best LR (once its grid is complete)."""
  out = []
  n = max(len(cfg["grids"][o]) for o in optimizers)
  mid = n // 2
  order = [mid] + [j for d in range(1, n) for j in (mid - d, mid + d) if 0 <= j < n]
  for j in order:
    for opt in optimizers:
      grid = cfg["grids"][opt]
      if j < len(grid):
        out.append((opt, grid[j], seeds[0]))
  for seed in seeds[1:]:
    for opt in optimizers:
      if opt in best:
        out.append((opt, best[opt], seed))
  return out


# ------------------------------------------------------------------------------------- report


def _first(piece: dict, key: str, ok) -> tuple[float | None, float | None]:
  """(steps, seconds) at the first evaluation where ``ok(history[key])``."""
  for h in piece["history"]:
    if h[key] is not None and ok(h[key]):
      return h["step"], h["time"]
  return None, None


def _mean(xs):
  xs = [x for x in xs if x is not None and np.isfinite(x)]
  return float(np.mean(xs)) if xs else None


def _std(xs):
  xs = [x for x in xs if x is not None and np.isfinite(x)]
  return float(np.std(xs)) if len(xs) > 1 else None


def summarize(cfg: dict, done: dict, cost: dict | None, optimizers, seeds) -> dict:
  best = best_lrs(cfg, done, optimizers, seeds[0])
  grid_rows, rows = [], []
  for opt in optimizers:
    grid = cfg["grids"][opt]
    for lr in grid:
      p = done.get((opt, lr, seeds[0]))
      grid_rows.append({"optimizer": opt, "lr": lr, "done": p is not None,
                        "final_train_loss": None if p is None else p["final_train_loss"],
                        "final_test_acc": None if p is None else p["final_test_acc"],
                        "diverged": None if p is None else p["diverged"],
                        "best": best.get(opt) == lr})
  for opt, lr in best.items():
    pieces = [done[(opt, lr, s)] for s in seeds if (opt, lr, s) in done]
    grid = cfg["grids"][opt]
    rows.append({"optimizer": opt, "lr": lr, "seeds": [p["seed"] for p in pieces],
                 "edge": lr in (grid[0], grid[-1]) and len(grid) > 1,
                 "final_train_loss": _mean([p["final_train_loss"] for p in pieces]),
                 "final_train_loss_std": _std([p["final_train_loss"] for p in pieces]),
                 "final_test_acc": _mean([p["final_test_acc"] for p in pieces]),
                 "final_test_acc_std": _std([p["final_test_acc"] for p in pieces]),
                 "step_ms_pieces": 1e3 * (_mean([p["step_seconds_mean"] for p in pieces]) or 0),
                 "pieces": pieces})
  # Targets: what SGD (the paper's baseline) reaches at the end; the worst row without SGD.
  anchor = [r for r in rows if r["optimizer"] == TARGET_ANCHOR] or rows
  finite = [r for r in anchor if r["final_train_loss"] is not None]
  target_loss = 1.05 * max(r["final_train_loss"] for r in finite) if finite else None
  accs = [r["final_test_acc"] for r in anchor if r["final_test_acc"] is not None]
  target_acc = min(accs) - 0.005 if accs else None
  cost_opt = (cost or {}).get("optimizers", {})
  for r in rows:
    c = cost_opt.get(r["optimizer"])
    r["step_ms_side_by_side"] = None if c is None else 1e3 * c["mean_s"]
    r["step_ratio_adamw"] = None if c is None else c.get("mean_ratio_adamw")
    for name, key, target, ok in (
        ("loss", "train_loss", target_loss, lambda v, t=target_loss: v <= t),
        ("acc", "test_acc", target_acc, lambda v, t=target_acc: v >= t)):
      hits = [_first(p, key, ok) if target is not None else (None, None) for p in r["pieces"]]
      reached = [h for h in hits if h[0] is not None]
      r[f"steps_to_{name}"] = _mean([h[0] for h in hits]) if len(reached) == len(hits) else None
      r[f"seconds_to_{name}"] = (_mean([h[1] for h in hits]) if len(reached) == len(hits)
                                 else None)
      r[f"cost_seconds_to_{name}"] = (None if r[f"steps_to_{name}"] is None or c is None
                                      else r[f"steps_to_{name}"] * c["mean_s"])
  for r in rows:
    r["curves"] = _mean_curves(r.pop("pieces"))
  return {"workload": cfg["workload"], "tag": tag(cfg), "target_train_loss": target_loss,
          "target_test_acc": target_acc, "best_lr": best, "rows": rows, "grid": grid_rows,
          "cost": cost, "pieces_done": len(done),
          # the plan at the current best LRs, and pieces of earlier grids (moved since)
          "pieces_planned": len(set(plan(cfg, optimizers, seeds,
                                         {o: best.get(o, cfg["grids"][o][0])
                                          for o in optimizers})) | set(done))}


def _mean_curves(pieces: list[dict]) -> dict:
  """Mean over seeds of the evaluations (aligned on the evaluation index)."""
  n = min(len(p["history"]) for p in pieces)
  out = {}
  for key in ("step", "time", "train_loss", "test_acc"):
    out[key] = [_mean([p["history"][i][key] for p in pieces]) for i in range(n)]
  return out


def claims(res: dict) -> list[str]:
  by = {r["optimizer"]: r for r in res["rows"]}
  out = []
  for var in MLBFGS_VARIANTS:
    if var not in by:
      continue
    for what in ("loss", "acc"):
      mine = by[var][f"steps_to_{what}"]
      for base in ("sgd", "adamw", "kfac", "kfac_nsgd"):
        if base not in by:
          continue
        other = by[base][f"steps_to_{what}"]
        if mine is None:
          verdict = "does not reach the target" if other is not None else "neither reaches it"
        elif other is None:
          verdict = "reaches it; the baseline does not"
        else:
          verdict = (f"{'fewer' if mine < other else 'not fewer'} steps ({mine:.0f} vs "
                     f"{other:.0f})")
        secs = by[var][f"cost_seconds_to_{what}"], by[base][f"cost_seconds_to_{what}"]
        if None not in secs:
          verdict += (f"; {'less' if secs[0] < secs[1] else 'not less'} cost-normalised "
                      f"wall-clock ({secs[0]:.0f} s vs {secs[1]:.0f} s)")
        out.append(f"{res['workload']}: {var} vs {base}, target "
                   f"{'train loss' if what == 'loss' else 'test accuracy'}: {verdict}")
  return out


def report_md(results: list[dict], command: str, stale: dict) -> str:
  fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
  lines = ["# mL-BFGS vs SGD, AdamW and K-FAC (issue 17)", "",
           "Protocol and settings: the docstring of `experiments/mlbfgs_benchmark.py` and "
           "`docs/mlbfgs.md`. Best LR per optimizer = lowest final train loss at seed 0 "
           "(**EDGE** = at the edge of its grid: the grid must be moved before the "
           "comparison counts); rows are means over the seeds done at that LR. Targets: "
           "train loss = 1.05 x SGD's final (the worst optimizer's without SGD), test "
           "accuracy = SGD's final (the worst) - 0.5 points. `s` = training seconds measured in the pieces (their own "
           "processes, noisy under load); `cost s` = steps x the side-by-side per-step "
           "time of the `cost` piece.", ""]
  for res in results:
    lines += [f"## {res['workload']}", "",
              f"Pieces done: {res['pieces_done']} of {res['pieces_planned']}. Target train "
              f"loss {fmt(res['target_train_loss'])}, target test accuracy "
              f"{fmt(res['target_test_acc'])}.", ""]
    cols = ["optimizer", "best lr", "seeds", "final train loss", "final test acc",
            "steps to loss", "s to loss", "cost s to loss", "steps to acc", "s to acc",
            "cost s to acc", "ms/step (side by side)", "step / AdamW"]
    cells = []
    for r in res["rows"]:
      lr = f"{r['lr']:g}" + (" **EDGE**" if r["edge"] else "")
      loss = fmt(r["final_train_loss"]) + ("" if r["final_train_loss_std"] is None else
                                           f" ± {r['final_train_loss_std']:.3g}")
      acc = fmt(r["final_test_acc"]) + ("" if r["final_test_acc_std"] is None else
                                        f" ± {r['final_test_acc_std']:.3g}")
      cells.append([r["optimizer"], lr, len(r["seeds"]), loss, acc, r["steps_to_loss"],
                    r["seconds_to_loss"], r["cost_seconds_to_loss"], r["steps_to_acc"],
                    r["seconds_to_acc"], r["cost_seconds_to_acc"], r["step_ms_side_by_side"],
                    r["step_ratio_adamw"]])
    lines += [md_table(cols, cells, fmt), ""]
    for c in claims(res):
      lines.append(f"* {c}")
    lines += ["", "Seed-0 grids (final train loss / test accuracy; `*` = best, `div` = "
              "diverged, `-` = not run yet):", ""]
    by_opt = {}
    for g in res["grid"]:
      cell = "-" if not g["done"] else ("div" if g["diverged"] else
                                        f"{fmt(g['final_train_loss'])} / "
                                        f"{fmt(g['final_test_acc'])}")
      by_opt.setdefault(g["optimizer"], []).append(
          f"{g['lr']:g}: {cell}{' *' if g['best'] else ''}")
    for opt, cells_ in by_opt.items():
      lines.append(f"* {opt}: " + "; ".join(cells_))
    if stale.get(res["workload"]):
      lines.append(f"\nIgnored (another configuration): {', '.join(stale[res['workload']])}")
    lines.append("")
  lines.append(f"Command: `{command}`")
  return "\n".join(lines)


def _plot(path: str, results: list[dict]) -> bool:
  panels = (("step", "train_loss", "step", "train loss"),
            ("time", "train_loss", "training wall-clock [s]", "train loss"),
            ("step", "test_acc", "step", "test accuracy"),
            ("time", "test_acc", "training wall-clock [s]", "test accuracy"))

  def draw(axes):
    axes = np.atleast_2d(axes)
    for row, res in enumerate(results):
      for col, (xk, yk, xl, yl) in enumerate(panels):
        ax = axes[row, col]
        for r in res["rows"]:
          c = r["curves"]
          pts = [(x, y) for x, y in zip(c[xk], c[yk]) if x is not None and y is not None]
          if pts:
            # one colour per optimizer across workloads (tab10 has a slot for each)
            ax.plot(*zip(*pts), label=f"{r['optimizer']} ({r['lr']:g})",
                    color=f"C{OPTIMIZERS.index(r['optimizer']) % 10}")
        if yk == "train_loss":
          ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(res["workload"])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no rows until a grid has a best LR
          ax.legend(fontsize=7)

  return save_plot(path, draw, nrows=len(results), ncols=4,
                   figsize=(18, 3.6 * len(results)), dpi=100)


def report(cfgs: list[dict], out_dir: str, optimizers, seeds, command: str) -> list[dict]:
  """The report of every workload with pieces under ``out_dir`` (not only ``cfgs``: one
  driver per workload must not drop the others' results), in ``PRESETS`` order."""
  results, stale = [], {}
  c0 = cfgs[0]
  named = {c["workload"] for c in cfgs}
  others = [config(w, c0["smoke"], None, c0["reference_mode"]) for w in PRESETS
            if w not in named]
  cfgs = list(cfgs) + [c for c in others
                       if os.path.isdir(os.path.join(out_dir, "mlbfgs", tag(c)))]
  cfgs.sort(key=lambda c: list(PRESETS).index(c["workload"]))
  for cfg in cfgs:
    root = os.path.join(out_dir, "mlbfgs", tag(cfg))
    opts = workload_optimizers(cfg, optimizers)
    done, st = collect(cfg, root, opts, seeds)
    stale[cfg["workload"]] = st
    if not done:
      continue
    results.append(summarize(cfg, done, read_json(os.path.join(root, "cost.json")), opts,
                             seeds))
  if not results:
    print("no pieces yet; nothing to report")
    return results
  stem = "mlbfgs_smoke" if cfgs[0]["smoke"] else "mlbfgs"
  write_results(out_dir, stem, command=command,
                data={"workloads": results, "claims": [c for r in results for c in claims(r)]},
                md=report_md(results, command, stale),
                plot=lambda path: _plot(path, results))
  print(f"wrote {os.path.join(out_dir, stem)}.{{json,md,png}}")
  return results


# --------------------------------------------------------------------------------------- main


def smoke_estimates(cfgs: list[dict], out_dir: str, optimizers) -> list[dict]:
  """Minutes per full piece of each smoke workload, from the smoke pieces (setup, compile,
  evaluation scaled to the full evaluation sets) and the smoke cost piece's per-step mean
  (which includes a K-FAC curvature update; falls back to the piece's steady steps)."""
  rows = []
  for cfg in cfgs:
    full = config(cfg["workload"], reference_mode=cfg["reference_mode"])
    root = os.path.join(out_dir, "mlbfgs", tag(cfg))
    cost = (read_json(os.path.join(root, "cost.json")) or {}).get("optimizers", {})
    done, _ = collect(cfg, root, workload_optimizers(cfg, optimizers), [0])
    for (opt, _lr, seed), piece in sorted(done.items()):
      if seed != 0:
        continue
      step_s = cost.get(opt, {}).get("mean_s") or piece["step_seconds_mean"]
      steps = TRAIN_SIZE[full["dataset"]] // full["batch"] * full["epochs"]
      scale = (full["num_train_eval"] + 10_000) / (cfg["num_train_eval"] + cfg["num_test"])
      evals = len(piece["history"])
      eval_s = piece["eval_seconds"] / evals * scale * (full["evals"] + 1)
      minutes = (piece["setup_seconds"] + piece["compile_seconds"] + steps * step_s
                 + eval_s) / 60
      rows.append({"workload": cfg["workload"], "optimizer": opt, "step_ms": 1e3 * step_s,
                   "steps": steps, "eval_minutes": eval_s / 60, "piece_minutes": minutes,
                   "load_avg": piece["host"]["load_avg_start"]})
      print(f"estimate {cfg['workload']} {opt}: {1e3 * step_s:.0f} ms/step x {steps} steps + "
            f"evaluations {eval_s / 60:.1f} min -> {minutes:.0f} min per full piece (load "
            f"{piece['host']['load_avg_start']:.1f})", flush=True)
  if rows:
    write_json(os.path.join(out_dir, "mlbfgs", "smoke_estimates.json"), rows)
  return rows


def _child_env(cfg: dict) -> dict:
  env = dict(os.environ)
  if cfg["devices"] == "all" and not env.get("JAX_PLATFORMS", "cpu").startswith(("cuda", "gpu")):
    flag = f"--xla_force_host_platform_device_count={CPU_DEVICES}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
  return env


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workloads", nargs="+", choices=sorted(PRESETS), default=["cnn"])
  p.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=None,
                 help="default: the workload's (all; resnet20 and dp_cnn14: "
                 f"{', '.join(CPU_SCALE_OPTIMIZERS)}); {', '.join(SMOKE_OPTIMIZERS)} with --smoke")
  p.add_argument("--seeds", nargs="+", type=int, default=None,
                 help="the first is the LR-grid seed (default 0 1 2; 0 with --smoke)")
  p.add_argument("--lrs", nargs="+", type=float, default=None,
                 help="one LR grid for every optimizer (overrides the presets')")
  p.add_argument("--reference-mode", action="store_true",
                 help="mL-BFGS with the authors' code quirks (own results folder)")
  p.add_argument("--piece", nargs=4, metavar=("WORKLOAD", "OPT", "LR", "SEED"),
                 help="run one piece (the driver's child)")
  p.add_argument("--cost", metavar="WORKLOAD", help="run the side-by-side cost piece (child)")
  p.add_argument("--no-cost", action="store_true", help="skip the cost pieces")
  p.add_argument("--probe", action="store_true", help="estimate minutes per piece")
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--max-minutes", type=float, default=None,
                 help="start no new piece after this long (the driver resumes next time)")
  p.add_argument("--smoke", action="store_true",
                 help="8 steps on 8 batches, one LR per optimizer, seed 0 (tests)")
  p.add_argument("--data-dir", default=None, help="TFDS data_dir (cifar10_resnet20)")
  p.add_argument("--out-dir", default=RESULTS)
  args = p.parse_args(argv)
  mk = lambda w: config(w, args.smoke, args.lrs, args.reference_mode)
  # None: each workload's own list (``workload_optimizers``)
  optimizers = args.optimizers or (list(SMOKE_OPTIMIZERS) if args.smoke else None)
  opt_args = ["--optimizers", *optimizers] if optimizers else []
  args.seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])

  if args.piece:
    w, opt, lr, seed = args.piece[0], args.piece[1], float(args.piece[2]), int(args.piece[3])
    cfg = mk(w)
    run_piece(cfg, opt, lr, seed, piece_path(os.path.join(args.out_dir, "mlbfgs", tag(cfg)),
                                             opt, lr, seed), args.data_dir)
    return
  if args.cost:
    cfg = mk(args.cost)
    run_cost(cfg, os.path.join(args.out_dir, "mlbfgs", tag(cfg), "cost.json"),
             workload_optimizers(cfg, optimizers), args.data_dir)
    return
  if args.probe and os.environ.get("_MLBFGS_PROBE_CHILD") != "1":
    for w in args.workloads:  # one child per workload (its own device count)
      env = dict(_child_env(mk(w)), _MLBFGS_PROBE_CHILD="1")
      subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", "--workloads", w,
                      "--out-dir", args.out_dir] + opt_args
                     + (["--smoke"] if args.smoke else [])
                     + (["--data-dir", args.data_dir] if args.data_dir else []),
                     env=env, check=True)
    return
  if args.probe:
    cfg = mk(args.workloads[0])
    out = probe(cfg, workload_optimizers(cfg, optimizers), args.data_dir)
    write_json(os.path.join(args.out_dir, "mlbfgs", f"probe_{tag(cfg)}.json"), out)
    return

  command = command_line(__file__, argv, drop={"--report-only": 0, "--max-minutes": 1})
  cfgs = [mk(w) for w in args.workloads]
  t0 = time.time()

  def child(cfg, extra):
    cmd = [sys.executable, os.path.abspath(__file__), "--out-dir", args.out_dir, *opt_args,
           *extra]
    if args.smoke:
      cmd.append("--smoke")
    if args.reference_mode:
      cmd.append("--reference-mode")
    if args.lrs:
      cmd += ["--lrs", *[str(v) for v in args.lrs]]
    if args.data_dir:
      cmd += ["--data-dir", args.data_dir]
    subprocess.run(cmd, env=_child_env(cfg), check=True)

  def out_of_time():
    if args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes:
      print("time budget reached; rerun to continue", flush=True)
      return True
    return False

  if not args.report_only:
    for cfg in cfgs:
      root = os.path.join(args.out_dir, "mlbfgs", tag(cfg))
      opts = workload_optimizers(cfg, optimizers)
      _, stale = collect(cfg, root, opts, args.seeds)
      if stale:
        p.error(f"{root} holds pieces of another configuration ({', '.join(stale)}); move "
                "them away")
      cost = read_json(os.path.join(root, "cost.json")) or {}
      if not args.no_cost and not set(opts) <= set(cost.get("optimizers", {})):
        # (re)run when an optimizer is missing: the ratios need every one in the same process
        if out_of_time():
          break
        child(cfg, ["--cost", cfg["workload"]])
      while True:  # the plan grows as the seed-0 grids complete
        done, _ = collect(cfg, root, opts, args.seeds)
        best = best_lrs(cfg, done, opts, args.seeds[0])
        todo = [x for x in plan(cfg, opts, args.seeds, best) if x not in done]
        if not todo or out_of_time():
          break
        opt, lr, seed = todo[0]
        t_piece = time.time()
        child(cfg, ["--piece", cfg["workload"], opt, str(lr), str(seed)])
        print(f"  ({len(done) + 1} of {len(done) + len(todo)} pieces of {tag(cfg)}; "
              f"{(time.time() - t_piece) / 60:.1f} min for this piece)", flush=True)
        report(cfgs, args.out_dir, optimizers, args.seeds, command)
  report(cfgs, args.out_dir, optimizers, args.seeds, command)
  if args.smoke:
    smoke_estimates(cfgs, args.out_dir, optimizers)


if __name__ == "__main__":
  main()
