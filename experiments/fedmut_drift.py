"""How large FedMut's mutation is next to one client's own update, along a FedAvg run.

FedMut starts client i from ``x_t + alpha v^i (x_t - x_{t-1})``; with the server rate 1,
``x_t - x_{t-1}`` is the previous round's mean client update. Under strong label skew the
clients' updates point different ways, so their mean is much shorter than each one of them,
and the mutation may move a client's start by little next to where its own training takes it.
This measures that ratio (docs/fedmut.md reads the FedMut study with it).

Along a FedAvg run of ``fedmut.py``'s preset (seed 0, each LR given), every ``--every``
rounds, ``--clients`` clients drawn at random train from the current global model (the
study's local protocol) and give their updates u_i. Reported per measurement:

  coherence  ||mean_i u_i|| / mean_i ||u_i||   (1: all clients agree; ~1/sqrt(C): unrelated)
  mutation / client update  alpha * ||mean_i u_i|| / mean_i ||u_i||   (alpha = fedmut.py's)

and the same per parameter leaf (the mutation's unit), as the median over leaves.

  python experiments/fedmut_drift.py --preset fmnist_cnn14
  python experiments/fedmut_drift.py --preset fmnist_cnn14 --smoke --out-dir /tmp/fd
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fedmut  # noqa: E402
from _common import RESULTS, command_line, federated_images, md_table, write_results  # noqa: E402


def coherence(updates) -> tuple[float, list[float]]:
  """``||mean_i u_i|| / mean_i ||u_i||`` over a list of client updates (each a list of
  arrays), for the whole update and for each leaf."""
  def ratio(vs):
    mean = np.mean(vs, axis=0)
    return float(np.linalg.norm(mean) / np.mean([np.linalg.norm(v) for v in vs]))

  flat = [np.concatenate([np.ravel(a) for a in u]) for u in updates]
  per_leaf = [ratio([np.ravel(u[k]) for u in updates]) for k in range(len(updates[0]))]
  return ratio(flat), per_leaf


def measure(cfg, lr, rounds, every, clients, data_dir=None):
  import jax
  import jax.numpy as jnp

  import jaxfl
  from jaxfl.client import make_client_update
  from jaxfl.data import device_data
  from jaxfl.round import build_round

  data = federated_images(cfg["dataset"], cfg["num_clients"], cfg["dirichlet"], cfg["image"],
                          cfg["num_test"], data_dir)
  model = jaxfl.models.get_model(cfg["model"], data.example_shape, data.num_classes)
  algo = fedmut.build_arm(cfg, "fedavg", lr)
  rnd = build_round(algo, model, num_clients=data.num_clients,
                    max_client_size=data.max_client_size, clients_per_round=cfg["cohort"])
  client_update = make_client_update(model, algo.local, data.max_client_size)
  dd = device_data(data)
  x, y = jnp.asarray(data.x), jnp.asarray(data.y)
  indices, sizes = jnp.asarray(data.client_indices), jnp.asarray(data.client_sizes)

  @jax.jit
  def cohort_updates(params, model_state, ids, keys, r):
    def one(i, k):
      return client_update(params, model_state, x, y, indices[i], sizes[i], k,
                           context={"round": r}).delta
    return jax.vmap(one)(ids, keys)

  key = jax.random.key(0)
  state = rnd.init(jax.random.fold_in(key, 0))
  rng = np.random.default_rng(0)
  rows = []
  for r in range(rounds + 1):
    if r % every == 0 and r > 0:
      ids = jnp.asarray(rng.choice(data.num_clients, clients, replace=False))
      keys = jax.random.split(jax.random.fold_in(key, 10_000 + r), clients)
      deltas = cohort_updates(state.params, state.model_state, ids, keys, jnp.int32(r))
      leaves = [np.asarray(a, np.float64) for a in jax.tree.leaves(deltas)]
      whole, per_leaf = coherence([[a[i] for a in leaves] for i in range(clients)])
      rows.append({"round": r, "coherence": whole, "leaf_coherence_median":
                   float(np.median(per_leaf)), "mutation_over_update": cfg["alpha"] * whole,
                   "leaf_mutation_over_update_median": cfg["alpha"] * float(np.median(per_leaf))})
      print(f"lr {lr:g} round {r}: coherence {whole:.3f}", flush=True)
    if r < rounds:
      state, _ = rnd.step(state, dd, jax.random.fold_in(key, r + 1))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="fmnist_cnn14", choices=sorted(fedmut.PRESETS))
  p.add_argument("--lrs", type=float, nargs="+", default=(0.08, 0.16),
                 help="client LRs (default: the study's chosen LRs of FedAvg and FedMut)")
  p.add_argument("--every", type=int, default=25)
  p.add_argument("--clients", type=int, default=16)
  p.add_argument("--data-dir", default=None)
  p.add_argument("--out-dir", default=RESULTS)
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args(argv)
  if args.every < 1 or args.clients < 2:
    p.error("--every must be >= 1 and --clients >= 2")
  cfg = fedmut.config(args.preset, args.smoke)
  every = min(args.every, cfg["rounds"])
  runs = {lr: measure(cfg, lr, cfg["rounds"], every, min(args.clients, cfg["num_clients"]),
                      args.data_dir) for lr in args.lrs}
  stem = "fedmut_drift_" + args.preset + ("_smoke" if args.smoke else "")
  rows = [[f"{lr:g}", r["round"], f"{r['coherence']:.3f}", f"{r['leaf_coherence_median']:.3f}",
           f"{r['mutation_over_update']:.3f}", f"{r['leaf_mutation_over_update_median']:.3f}"]
          for lr, rs in runs.items() for r in rs]
  md = "\n".join([
      f"# FedMut's mutation next to a client's update ({args.preset})", "",
      f"FedAvg runs (seed 0) of the FedMut study's setting; every {every} rounds "
      f"{min(args.clients, cfg['num_clients'])} random clients train from the global model. "
      "coherence = ||mean u|| / mean ||u|| (whole update; median over leaves); mutation / "
      f"update = α × coherence with α = {cfg['alpha']}: the mutation's length over one "
      "client's own update.", "",
      md_table(["LR", "round", "coherence", "leaf coherence (median)", "mutation / update",
                "per leaf (median)"], rows), ""])
  write_results(args.out_dir, stem, command=command_line(__file__, argv),
                data={"config": cfg, "every": every, "runs": {f"{lr:g}": rs
                                                              for lr, rs in runs.items()}},
                md=md)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
