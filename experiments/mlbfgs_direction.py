"""Is mL-BFGS's direction a better step than the normalised gradient? (issue 17 diagnostic)

Trains a workload of ``mlbfgs_benchmark.py`` with its mL-BFGS optimizer (same settings,
schedule and data), and every ``--probe-every`` steps, once curvature pairs exist, compares
two unit-length directions from the same parameters on a fixed probe batch:

  d_mlbfgs = H g / |H g|       (the optimizer's own direction: the transform's ``update`` on
                                the probe gradient, its new state discarded)
  d_nsgd   = g / |g|           (the normalised gradient: ``nsgd``, the authors' SGD)

with ``g`` = the probe batch's gradient plus ``wd theta``. For step lengths ``eta`` it records
the loss decrease on the probe batch (the local model: a good quasi-Newton direction should
win at the larger steps) and on a second, held-out batch (what a step buys beyond the batch),
the cosine between the two directions, the slope ``g.d`` of each (first-order decrease per
unit step), and the newest pair's curvature ratio ``tau = s.y/s.s`` after damping and ``h0``.

  python experiments/mlbfgs_direction.py --workload cnn14 --opt mlbfgs --lr 0.08
  python experiments/mlbfgs_direction.py --workload cnn14 --opt mlbfgs_blocks --lr 0.08 \\
      --json experiments/results/mlbfgs_direction_cnn14.json

Writes a JSON of every probe and prints the means.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workload", default="cnn14")
  p.add_argument("--opt", default="mlbfgs", choices=("mlbfgs", "mlbfgs_blocks"))
  p.add_argument("--lr", type=float, default=0.08)
  p.add_argument("--epochs", type=float, default=3.0, help="train this many epochs")
  p.add_argument("--probe-every", type=int, default=100)
  p.add_argument("--probe-batch", type=int, default=2048)
  p.add_argument("--etas", type=float, nargs="+", default=[0.01, 0.04, 0.16, 0.64])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--beta", type=float, default=None, help="override the workload's beta")
  p.add_argument("--update-every", type=int, default=None, help="override the workload's T")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import mlbfgs_benchmark as mb
  import optax

  from jaxfl import transforms as M

  cfg = mb.config(args.workload)
  cfg["beta"] = args.beta or cfg["beta"]
  cfg["update_every"] = args.update_every or cfg["update_every"]
  xtr, ytr, _, _, _ = mb.load_data(cfg)
  model = mb.build_model(cfg, xtr.shape[1:])
  params, mstate = model.init(jax.random.key(args.seed))
  spe = len(xtr) // cfg["batch"]
  wd, sched = cfg["weight_decay"], mb.lr_schedule(args.lr, spe, cfg["epochs"])
  labels = mb.block_labels(cfg, params) if args.opt == "mlbfgs_blocks" else None
  direction = M.scale_by_mlbfgs(labels, beta_p=cfg["beta"], beta_g=cfg["beta"],
                                update_every=cfg["update_every"], weight_decay=wd,
                                reference_mode=False, **mb.MLBFGS)
  rest = optax.chain(optax.trace(mb.MOMENTUM), optax.scale_by_learning_rate(sched))

  def loss_fn(p, ms, xb, yb):
    logits, ms = model.apply(p, ms, xb, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), ms

  @jax.jit
  def step(p, ms, s1, s2, xb, yb):
    (loss, ms), g = jax.value_and_grad(loss_fn, has_aux=True)(p, ms, xb, yb)
    d, s1 = direction.update(g, s1, p)
    u, s2 = rest.update(d, s2, p)
    return optax.apply_updates(p, u), ms, s1, s2, loss

  etas = jnp.asarray(args.etas, jnp.float32)

  @jax.jit
  def probe(p, ms, s1, xa, ya, xb, yb):
    g = jax.grad(lambda q: loss_fn(q, ms, xa, ya)[0])(p)
    d, _ = direction.update(g, s1, p)  # the direction from this state; state discarded
    gt = jax.tree.map(lambda a, b: a + wd * b, g, p)  # what the direction preconditions
    unit = lambda t: optax.tree.scale(1.0 / optax.tree.norm(t), t)
    dirs = {"mlbfgs": unit(d), "nsgd": unit(gt)}
    base_a, base_b = loss_fn(p, ms, xa, ya)[0], loss_fn(p, ms, xb, yb)[0]

    def decrease(v, x, y, base):
      f = lambda eta: base - loss_fn(optax.tree.add_scale(p, -eta, v), ms, x, y)[0]
      return jax.lax.map(f, etas)

    out = {k: dict(probe=decrease(v, xa, ya, base_a), heldout=decrease(v, xb, yb, base_b),
                   slope=optax.tree.vdot(gt, v))
           for k, v in dirs.items()}
    out["cos"] = optax.tree.vdot(dirs["mlbfgs"], dirs["nsgd"])
    return out

  from jaxfl.transforms._mlbfgs_blocks import _make_layout, _to_blocks

  lay = _make_layout(None, None, params, 1, packed=True)

  @jax.jit
  def q_and_d(p, ms, s1, xa, ya):
    g = jax.grad(lambda q: loss_fn(q, ms, xa, ya)[0])(p)
    d, _ = direction.update(g, s1, p)
    gt = jax.tree.map(lambda a, b: a + wd * b, g, p)
    return _to_blocks(lay, gt, jnp.float32)[0], _to_blocks(lay, d, jnp.float32)[0]

  def f64_check(p, ms, s1, xa, ya):
    """cos between the transform's direction and the textbook two-loop recursion in float64
    on the same (float32-stored) pairs, oldest to newest from the ring buffer."""
    q, d = (np.asarray(a, np.float64) for a in q_and_d(p, ms, s1, xa, ya))
    m = mb.MLBFGS["history"]
    newest = (int(s1.num_pairs) - 1) % m
    slots = [(newest + 1 + k) % m for k in range(m)]
    slots = [j for j in slots if bool(s1.valid[0, j])]
    S = [np.asarray(s1.s_hist[0, j], np.float64) for j in slots]
    Y = [np.asarray(s1.y_hist[0, j], np.float64) for j in slots]
    rho = [float(a @ b) for a, b in zip(S, Y)]
    alpha = [0.0] * len(S)
    for k in reversed(range(len(S))):
      alpha[k] = S[k] @ q / rho[k]
      q = q - alpha[k] * Y[k]
    r = float(s1.h0[0]) * q
    for k in range(len(S)):
      r = r + (alpha[k] - Y[k] @ r / rho[k]) * S[k]
    return float(r @ d / (np.linalg.norm(r) * np.linalg.norm(d)))

  rng = np.random.default_rng(args.seed)
  perm = rng.permutation(len(xtr))
  pa, pb = perm[:args.probe_batch], perm[args.probe_batch:2 * args.probe_batch]
  xa, ya, xb, yb = (jnp.asarray(a) for a in (xtr[pa], ytr[pa], xtr[pb], ytr[pb]))
  x, y = jnp.asarray(xtr), jnp.asarray(ytr)
  s1, s2 = direction.init(params), rest.init(params)
  total = int(args.epochs * spe)
  probes, t0, order = [], time.time(), None
  for i in range(total):
    if i % spe == 0:
      order = rng.permutation(len(xtr))
    idx = order[(i % spe) * cfg["batch"]:(i % spe + 1) * cfg["batch"]]
    params, mstate, s1, s2, loss = step(params, mstate, s1, s2, x[idx], y[idx])
    if i % args.probe_every == args.probe_every - 1 and int(s1.num_pairs) > 0:
      r = jax.tree.map(lambda a: np.asarray(a).tolist(), probe(params, mstate, s1, xa, ya, xb, yb))
      newest = (int(s1.num_pairs) - 1) % mb.MLBFGS["history"]
      ss = np.asarray(jnp.sum(s1.s_hist[:, newest] ** 2))
      sy = np.asarray(s1.sy[:, newest, newest]).sum()
      yy = np.asarray(jnp.sum(s1.y_hist[:, newest] ** 2))
      r["cos_sy"] = float(sy / np.sqrt(ss * yy))  # 1/cos^2 bounds H's conditioning
      r.update(step=i + 1, train_loss=float(loss), tau=float(sy / ss), h0=np.asarray(s1.h0).tolist())
      if labels is None:  # one block: check the float32 compact form against float64 loops
        r["cos_f64_two_loop"] = f64_check(params, mstate, s1, xa, ya)
      probes.append(r)
  print(f"{args.workload} {args.opt} lr {args.lr} T {cfg['update_every']} beta {cfg['beta']}: "
        f"{total} steps, {len(probes)} probes, "
        f"{time.time() - t0:.0f} s")
  mean = lambda f: float(np.mean([f(r) for r in probes]))
  summary = {"cos": mean(lambda r: r["cos"]),
             "slope": {k: mean(lambda r: r[k]["slope"]) for k in ("mlbfgs", "nsgd")},
             "tau": mean(lambda r: r["tau"])}
  for where in ("probe", "heldout"):
    for j, eta in enumerate(args.etas):
      a, b = (mean(lambda r: r[k][where][j]) for k in ("mlbfgs", "nsgd"))
      wins = mean(lambda r: r["mlbfgs"][where][j] > r["nsgd"][where][j])
      summary[f"{where}_eta{eta:g}"] = {"mlbfgs": a, "nsgd": b, "mlbfgs_wins": wins}
      print(f"  {where:8s} eta {eta:<5g} loss decrease: mL-BFGS {a:+.4f}  nsgd {b:+.4f}  "
            f"(mL-BFGS larger in {100 * wins:.0f}% of probes)")
  if labels is None:
    summary["cos_f64_two_loop_min"] = min(r["cos_f64_two_loop"] for r in probes)
    print(f"  float32 compact form vs float64 two-loop: min cos "
          f"{summary['cos_f64_two_loop_min']:.6f} over the probes")
  print(f"  cos(d_mlbfgs, g) = {summary['cos']:.3f}; slope g.d: mL-BFGS "
        f"{summary['slope']['mlbfgs']:.4f}, nsgd {summary['slope']['nsgd']:.4f}; "
        f"tau (newest pair) {summary['tau']:.3g}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "summary": summary, "probes": probes}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
