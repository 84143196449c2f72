"""GEM sparse fine-tuning vs full fine-tuning and mask baselines on a real offline task pair.

Task: a CNN (``jaxfl.models.cnn((28, 28, 1), 10, dense=128)``) is pre-trained on Fashion-MNIST
classes 0-4 and fine-tuned on classes 5-9 relabelled 0-4, from a small labelled subset. The
classification head (``Dense_1``, 10-way) is **re-initialised** for fine-tuning and always
trained fully (it is not counted in the budget: ``always=``); the budget is a fraction of the
eligible *body* kernels (Conv_0, Conv_1, Dense_0 kernels; 453,408 entries). ``head_only``
(budget 0) is the linear-probe reference; ``full`` trains every parameter.

Every run of every method uses the same optimizer (AdamW, same learning rate and weight decay),
the same data order per seed and the same new head per seed; sparse runs are
``optax.chain(optax.adamw(...), gem_mask(mask))`` with the mask in the optimizer state, so all
sparse runs share one compiled step. Calibration gradients for the masks use 4 batches of the
fine-tuning training subset at the pre-trained weights (with the new head).

Also measures the mask overhead: median jitted train-step time of ``adamw`` vs
``chain(adamw, gem_mask)`` (interleaved, same process).

Usage::

  python experiments/gem_finetune.py                  # full run -> experiments/results/gem.*
  python experiments/gem_finetune.py --quick --out-dir /tmp/gem   # < 1 min smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import command_line, interleaved_times, md_table, save_plot, timed, write_results

import jaxfl
from jaxfl.transforms import gem

METHODS = ("gem", "gem_uniform_budget", "grad_magnitude", "weight_magnitude", "random")
HEAD = "['Dense_1']"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 min)")
  p.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--budgets", default="0.001,0.005,0.01,0.05")
  p.add_argument("--pretrain-examples", type=int, default=12000)
  p.add_argument("--pretrain-steps", type=int, default=300)
  p.add_argument("--ft-examples", type=int, default=1000, help="fine-tuning training subset")
  p.add_argument("--ft-steps", type=int, default=60)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--test-examples", type=int, default=2000)
  p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr of full fine-tuning")
  p.add_argument("--lr-sparse", type=float, default=1e-2,
                 help="AdamW lr of the sparse runs (masked entries and the head)")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--eval-split", choices=("test", "val"), default="test",
                 help="'val' evaluates on held-out fine-tuning *training* images (for tuning)")
  p.add_argument("--weight-decay", type=float, default=1e-4)
  p.add_argument("--calib-batches", type=int, default=4)
  p.add_argument("--allocation", default=None,
                 choices=["entropy", "entropy_size", "uniform", "equal", "global"],
                 help="per-layer budget rule of gem and the baselines (default: the library's, "
                      "k ∝ H·n; gem_uniform_budget always uses uniform)")
  p.add_argument("--bench-steps", type=int, default=30)
  args = p.parse_args(argv)
  if args.quick:
    args.seeds, args.budgets = 1, "0.001,0.01"
    args.pretrain_examples, args.pretrain_steps = 2000, 40
    args.ft_examples, args.ft_steps, args.test_examples = 300, 15, 500
    args.bench_steps = 5
  args.budgets = [float(b) for b in args.budgets.split(",")]
  args.methods = [m for m in args.methods.split(",") if m]
  return args


def split_tasks(ds, args):
  """Task A = classes 0-4, task B = classes 5-9 relabelled 0-4; fixed subsets (seed 0)."""
  rng = np.random.default_rng(0)
  a_tr = rng.permutation(np.flatnonzero(ds.y_train < 5))[:args.pretrain_examples]
  a_te = np.flatnonzero(ds.y_test < 5)[:args.test_examples]
  b_all = rng.permutation(np.flatnonzero(ds.y_train >= 5))
  b_tr = b_all[:args.ft_examples]
  b_te = rng.permutation(np.flatnonzero(ds.y_test >= 5))[:args.test_examples]
  if args.eval_split == "val":
    b_val = b_all[args.ft_examples:args.ft_examples + args.test_examples]
    return ((ds.x_train[a_tr], ds.y_train[a_tr]), (ds.x_test[a_te], ds.y_test[a_te]),
            (ds.x_train[b_tr], ds.y_train[b_tr] - 5), (ds.x_train[b_val], ds.y_train[b_val] - 5))
  return ((ds.x_train[a_tr], ds.y_train[a_tr]), (ds.x_test[a_te], ds.y_test[a_te]),
          (ds.x_train[b_tr], ds.y_train[b_tr] - 5), (ds.x_test[b_te], ds.y_test[b_te] - 5))


def main(argv=None):
  args = parse_args(argv)
  command = command_line(__file__, argv)
  os.makedirs(args.out_dir, exist_ok=True)
  t_start = time.time()
  cpu0 = time.process_time()
  ds = jaxfl.data.load_fashion_mnist()
  (xa, ya), (xa_te, ya_te), (xb, yb), (xb_te, yb_te) = split_tasks(ds, args)
  # conv_impl="xla": same parameters as the default "patches" lowering, faster unbatched on CPU.
  model = jaxfl.models.cnn((28, 28, 1), 10, dense=128, conv_impl="xla")

  def loss_fn(params, batch):
    x, y = batch
    logits, _ = model.apply(params, {}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  predict = jax.jit(lambda p, x: jnp.argmax(model.apply(p, {}, x, train=False)[0], -1))

  def accuracy(params, x, y):
    preds = np.concatenate([np.asarray(predict(params, x[i:i + 1000]))
                            for i in range(0, len(x), 1000)])
    return float(np.mean(preds == y))

  def make_step(tx):
    @jax.jit
    def step(params, opt_state, x, y):
      loss, g = jax.value_and_grad(loss_fn)(params, (x, y))
      updates, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
    return step

  def batches(n, steps, seed):
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n) for _ in range(steps * args.batch // n + 1)])
    return order[:steps * args.batch].reshape(steps, args.batch)

  def train(step, params, opt_state, x, y, steps, seed):
    for idx in batches(len(x), steps, seed):
      params, opt_state, _ = step(params, opt_state, x[idx], y[idx])
    return params

  # ---- pre-training on task A (once, cached for the whole run) ----
  params0, _ = model.init(jax.random.key(1234))
  pre_tx = optax.adam(1e-3)
  pre_step = make_step(pre_tx)
  t0 = time.time()
  pretrained = train(pre_step, params0, pre_tx.init(params0), xa, ya, args.pretrain_steps, 1234)
  pre_acc = accuracy(pretrained, xa_te, ya_te)
  print(f"pre-trained on A in {time.time() - t0:.1f}s: test acc {pre_acc:.4f}", flush=True)

  n_body = sum(int(np.size(x)) for n, x in zip(jaxfl.tree.leaf_names(pretrained),
                                                jax.tree.leaves(pretrained))
               if np.ndim(x) >= 2 and not n.startswith(HEAD))
  n_total = jaxfl.tree.num_params(pretrained)
  eligible = lambda name, x: np.ndim(x) >= 2 and not name.startswith(HEAD)
  always = lambda name, x: name.startswith(HEAD)

  ft_tx = optax.adamw(args.lr, weight_decay=args.weight_decay)
  full_step = make_step(ft_tx)
  full_lr_sparse_tx = optax.adamw(args.lr_sparse, weight_decay=args.weight_decay)
  full_lr_sparse_step = make_step(full_lr_sparse_tx)
  sparse_tx = optax.chain(optax.adamw(args.lr_sparse, weight_decay=args.weight_decay),
                          gem.gem_mask())
  sparse_step = make_step(sparse_tx)  # one compile for every mask: the mask is in the state

  results: dict[tuple[str, float], list[float]] = {}
  counts: dict[tuple[str, float], int] = {}
  mask_seconds = []
  for seed in range(args.seeds):
    # New head for task B (seed-dependent), rest from pre-training.
    fresh, _ = model.init(jax.random.key(seed))
    start = {**pretrained, "Dense_1": fresh["Dense_1"]}
    data_seed = 100 + seed

    p = train(full_step, start, ft_tx.init(start), xb, yb, args.ft_steps, data_seed)
    results.setdefault(("full", 1.0), []).append(accuracy(p, xb_te, yb_te))
    counts[("full", 1.0)] = n_total
    # Control: full fine-tuning at the sparse runs' learning rate.
    p = train(full_lr_sparse_step, start, full_lr_sparse_tx.init(start), xb, yb, args.ft_steps,
              data_seed)
    results.setdefault(("full_lr_sparse", 1.0), []).append(accuracy(p, xb_te, yb_te))
    counts[("full_lr_sparse", 1.0)] = n_total

    head_mask = gem.build_mask("random", start, 0.0, key=jax.random.key(0), eligible=eligible,
                               always=always)
    state = optax.tree.set(sparse_tx.init(start), mask=head_mask)
    p = train(sparse_step, start, state, xb, yb, args.ft_steps, data_seed)
    results.setdefault(("head_only", 0.0), []).append(accuracy(p, xb_te, yb_te))
    counts[("head_only", 0.0)] = 0

    t0 = time.time()
    calib_idx = batches(len(xb), args.calib_batches, 999 + seed)
    calib = (jnp.asarray(xb[calib_idx]), jnp.asarray(yb[calib_idx]))  # stacked [B, batch, ...]
    grads = gem.calibration_gradients(loss_fn, start, calib)
    mask_seconds.append(time.time() - t0)
    for budget in args.budgets:
      for method in args.methods:
        t0 = time.time()
        alloc = None if method == "gem_uniform_budget" else args.allocation
        mask = gem.build_mask(method, start, budget, grads=grads, key=jax.random.key(seed),
                              eligible=eligible, always=always, allocation=alloc)
        mask_seconds.append(time.time() - t0)
        state = optax.tree.set(sparse_tx.init(start), mask=mask)
        p = train(sparse_step, start, state, xb, yb, args.ft_steps, data_seed)
        frozen_ok = all(
            bool(jnp.all(jnp.where(m, True, a == b)))
            for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(p), jax.tree.leaves(start)))
        if not frozen_ok:
          raise RuntimeError(f"{method}@{budget}: a frozen entry changed")
        results.setdefault((method, budget), []).append(accuracy(p, xb_te, yb_te))
        counts[(method, budget)] = gem.mask_count(mask) - gem.mask_count(head_mask)
    print(f"seed {seed} done at {time.time() - t_start:.0f}s", flush=True)

  # ---- mask overhead benchmark (interleaved, median of per-step times) ----
  bench = benchmark(full_step, sparse_step, ft_tx, sparse_tx, start, head_mask, xb, yb, args)
  bench.update(optimizer_only_benchmark(ft_tx, sparse_tx, start, args))

  task = (f"fashion_mnist classes 0-4 -> 5-9 (relabelled); cnn dense=128; new head trained "
          f"fully; {args.ft_examples} fine-tune examples, {args.ft_steps} steps x {args.batch}")
  rows = []
  for (method, budget), accs in results.items():
    rows.append({
        "kind": "accuracy", "method": method, "budget": budget,
        "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)),
        "seeds": list(range(args.seeds)), "accs": accs, "task": task,
        "tuned_body_params": counts[(method, budget)], "body_params": n_body,
        "total_params": n_total, "head_params_always_trained": 1290 if method != "full" else None,
    })
  rows.append({
      "kind": "benchmark", "method": "gem_mask_overhead", "budget": None, "acc_mean": None,
      "acc_std": None, "seeds": None, "task": task, **bench,
      "pretrain_acc_task_a": pre_acc, "mask_build_seconds_median": float(np.median(mask_seconds)),
      "config": {k: v for k, v in vars(args).items()},
      "jax": jax.__version__, "optax": optax.__version__, "machine": platform.machine(),
      "wall_seconds": time.time() - t_start, "process_cpu_seconds": time.process_time() - cpu0,
  })
  md = markdown(rows, args, command)
  write_results(args.out_dir, "gem", command=command, data=rows, md=md,
                plot=lambda path: write_plot(path, rows, args))
  print(md)


def _step_times(step, params, state, x, y, n):
  """Seconds of ``n`` jitted train steps (waiting for the loss), each on its own batch."""
  times = []
  for i in range(n):
    idx = np.arange(i * 7, i * 7 + x.shape[0] // 8)[:32] % len(x)
    xi, yi = x[idx], y[idx]
    (params, state, _), t = timed(step, params, state, xi, yi, ready=lambda out: out[2])
    times.append(t)
  return times


def benchmark(full_step, sparse_step, ft_tx, sparse_tx, params, mask, x, y, args):
  """Median jitted train-step time, adamw vs chain(adamw, gem_mask), interleaved rounds."""
  s_full = ft_tx.init(params)
  s_mask = optax.tree.set(sparse_tx.init(params), mask=mask)
  full_step(params, s_full, x[:32], y[:32])
  sparse_step(params, s_mask, x[:32], y[:32])
  tf, tm = [], []
  for _ in range(5):
    tf += _step_times(full_step, params, s_full, x, y, args.bench_steps)
    tm += _step_times(sparse_step, params, s_mask, x, y, args.bench_steps)
  mf, mm = float(np.median(tf)), float(np.median(tm))
  return {"step_ms_adamw": 1e3 * mf, "step_ms_adamw_gem_mask": 1e3 * mm,
          "step_overhead_ratio": mm / mf, "bench_steps_each": len(tf)}


def optimizer_only_benchmark(ft_tx, sparse_tx, params, args):
  """Median time of the optimizer update alone (no forward/backward): the worst case."""
  grads = jax.tree.map(jnp.ones_like, params)
  upd_f = jax.jit(lambda g, s, p: ft_tx.update(g, s, p))
  upd_m = jax.jit(lambda g, s, p: sparse_tx.update(g, s, p))
  sf, sm = ft_tx.init(params), sparse_tx.init(params)
  jax.block_until_ready(upd_f(grads, sf, params))
  jax.block_until_ready(upd_m(grads, sm, params))
  times = interleaved_times({"adamw": lambda _: upd_f(grads, sf, params),
                             "gem_mask": lambda _: upd_m(grads, sm, params)},
                            5 * args.bench_steps)
  mf, mm = float(np.median(times["adamw"])), float(np.median(times["gem_mask"]))
  return {"update_ms_adamw": 1e3 * mf, "update_ms_adamw_gem_mask": 1e3 * mm,
          "update_overhead_ratio": mm / mf}


def markdown(rows, args, command):
  acc = [r for r in rows if r["kind"] == "accuracy"]
  bench = next(r for r in rows if r["kind"] == "benchmark")
  full = next(r for r in acc if r["method"] == "full")
  head = next(r for r in acc if r["method"] == "head_only")
  fls = next(r for r in acc if r["method"] == "full_lr_sparse")

  def cell(method, budget):
    r = next(r for r in acc if r["method"] == method and r["budget"] == budget)
    return f"{r['acc_mean']:.4f} ± {r['acc_std']:.4f}"

  lines = [
      "# GEM sparse fine-tuning: ablation",
      "",
      f"Task: {full['task']}.",
      f"Pre-trained accuracy on task A (classes 0-4): {bench['pretrain_acc_task_a']:.4f}. "
      f"Seeds: {args.seeds}; test examples: {args.test_examples}. Accuracy on task B test, "
      "mean ± std over seeds. Budget = fraction of the 453,408 body-kernel entries; the new "
      "10-way head (1,290 params) is trained fully in every sparse run. Same AdamW "
      f"(weight decay {args.weight_decay:g}) for all; lr {args.lr:g} for full fine-tuning, "
      f"{args.lr_sparse:g} for the sparse runs. Per-layer budgets: "
      f"{args.allocation or 'the library default (entropy_size, k ∝ H·n)'} for every method "
      "but gem_uniform_budget (uniform).",
      "",
      f"* full fine-tuning (lr {args.lr:g}): **{full['acc_mean']:.4f} ± {full['acc_std']:.4f}**",
      f"* full fine-tuning at the sparse lr ({args.lr_sparse:g}, control): "
      f"{fls['acc_mean']:.4f} ± {fls['acc_std']:.4f}",
      f"* head only (budget 0, linear probe): {head['acc_mean']:.4f} ± {head['acc_std']:.4f}",
      "",
      md_table(["method"] + [f"{100 * b:g}%" for b in args.budgets],
               [[m] + [cell(m, b) for b in args.budgets] for m in args.methods]),
      "",
      "Mask overhead (median jitted step, same run, batch 32): "
      f"adamw {bench['step_ms_adamw']:.2f} ms, adamw+gem_mask "
      f"{bench['step_ms_adamw_gem_mask']:.2f} ms, ratio **{bench['step_overhead_ratio']:.3f}**. "
      f"Optimizer update alone (no forward/backward): {bench['update_ms_adamw']:.3f} ms vs "
      f"{bench['update_ms_adamw_gem_mask']:.3f} ms, ratio {bench['update_overhead_ratio']:.3f}.",
      "",
      f"Wall time {bench['wall_seconds']:.0f} s, process CPU time "
      f"{bench['process_cpu_seconds']:.0f} s; jax {bench['jax']}, optax {bench['optax']}.",
      "",
      f"Command: `{command}` (defaults; see `--help`).",
      "",
  ]
  return "\n".join(lines)


def write_plot(path, rows, args):
  acc = [r for r in rows if r["kind"] == "accuracy"]

  def draw(ax):
    for m in args.methods:
      rs = sorted((r for r in acc if r["method"] == m), key=lambda r: r["budget"])
      ax.errorbar([100 * r["budget"] for r in rs], [r["acc_mean"] for r in rs],
                  yerr=[r["acc_std"] for r in rs], marker="o", capsize=3, label=m)
    for m, style in (("full", "k--"), ("head_only", "k:")):
      r = next(r for r in acc if r["method"] == m)
      ax.axhline(r["acc_mean"], color=style[0], linestyle=style[1:], label=m)
    ax.set_xscale("log")
    ax.set_xlabel("budget (% of body kernel parameters)")
    ax.set_ylabel("test accuracy, task B")
    ax.set_title("Sparse fine-tuning, Fashion-MNIST 0-4 -> 5-9")
    ax.legend(fontsize=8)

  return save_plot(path, draw, figsize=(6.5, 4.2))


if __name__ == "__main__":
  main()
