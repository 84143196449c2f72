"""Is the λmax series of the Hessian-aware LR study noisy, or does λmax really move?

The study's ``large_hessian`` arm starts its decay when 3 measurements in a row (one every 2
epochs, 10 power iterations) stay within 5% of the previous one. This trains the study's
large-batch CNN (``fmnist_cnn14``: batch 2048, ``large_step`` at LR 0.2, seed 0) for 8 epochs
and, after epochs 4, 6 and 8, measures λmax 6 times at the same parameters with different
power-iteration start keys, at 10 and at 30 iterations. The spread at fixed parameters is
the estimate's noise; the change between epochs is the landscape's.

  python experiments/hessian_lr_noise.py        # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import sys

import numpy as np
from _common import RESULTS, command_line, md_table, write_results

EPOCHS = (4, 6, 8)
ITERS = (10, 30)
KEYS = 6
LR = 0.2


def main() -> int:
  import jax
  import jax.numpy as jnp
  import optax
  from hessian_lr import batch_grad, build_model, config, load_split, optimizer_of

  import jaxfl

  cfg = config("fmnist_cnn14")
  xtr, ytr, *_ = load_split(cfg)
  model = build_model(cfg, xtr.shape[1:], cfg["conv_train"])
  probe = build_model(cfg, xtr.shape[1:], cfg["conv_measure"])
  params, ms = model.init(jax.random.key(0))
  batch = cfg["large_batch"]
  spe = len(xtr) // batch
  tx = optimizer_of(cfg, "large_step", LR, spe * cfg["epochs"], spe)
  opt_state = tx.init(params)
  x, y = jnp.asarray(xtr), jnp.asarray(ytr)

  def train_loss(p, ms, xb, yb):
    logits, ms = model.apply(p, ms, xb, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), ms

  grad_fn = batch_grad(train_loss, cfg["micro_batch"])

  @jax.jit
  def step(p, s, ms, idx):
    (_, ms), g = grad_fn(p, ms, x[idx], y[idx])
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, ms

  px, py = x[:cfg["probe"]], y[:cfg["probe"]]

  def probe_loss(p):
    logits = probe.apply(p, ms, px, train=False)[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, py).mean()

  measure = {it: jax.jit(lambda p, k, it=it: jaxfl.transforms.hessian_top_eigenvalue(
      probe_loss, p, k, num_iters=it)[0]) for it in ITERS}
  rows = []
  for epoch in range(max(EPOCHS)):
    perm = np.random.default_rng([0, epoch]).permutation(len(xtr))[:spe * batch]
    for idx in perm.reshape(spe, batch):
      params, opt_state, ms = step(params, opt_state, ms, jnp.asarray(idx, jnp.int32))
    if epoch + 1 in EPOCHS:
      for it in ITERS:
        lams = [float(measure[it](params, jax.random.key(k))) for k in range(KEYS)]
        rows.append({"epoch": epoch + 1, "iters": it, "lambdas": lams,
                     "mean": float(np.mean(lams)), "max": float(np.max(lams)),
                     "rel_spread": float(np.std(lams) / np.mean(lams))})
        print(epoch + 1, it, np.round(lams, 2), flush=True)
  best = {r["epoch"]: r["max"] for r in rows if r["iters"] == max(ITERS)}
  steps = [abs(best[b] / best[a] - 1) for a, b in zip(EPOCHS, EPOCHS[1:])]
  md = "\n".join([
      "# λmax estimate noise vs λmax change (Hessian-aware LR study, fmnist_cnn14)", "",
      f"large_step, LR {LR}, batch {batch}, seed 0; after each epoch below, λmax measured "
      f"{KEYS} times at the same parameters with different start keys.", "",
      md_table(["epoch", "power iterations", "λmax estimates", "std / mean"],
               [[r["epoch"], r["iters"], ", ".join(f"{v:.2f}" for v in r["lambdas"]),
                 f"{100 * r['rel_spread']:.1f}%"] for r in rows]), "",
      "Change of the 30-iteration maximum between the measured epochs: "
      + ", ".join(f"{100 * v:.0f}%" for v in steps) + "."]) + "\n"
  write_results(RESULTS, "hessian_lr_lambda_noise",
                command=command_line(__file__, None), data={"rows": rows, "changes": steps},
                md=md)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
