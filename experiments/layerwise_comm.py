"""Layer-wise communication-efficient FL: FedLUAR vs FedAvg and uplink-compression baselines.

The LMLS-lab protocol shape (ALGORITHMS.md §1.2): 128 clients, 32 active per round, Dirichlet
alpha = 0.1 label skew, unweighted mean, client SGD momentum 0.9 (fresh each round), tau local
steps of batch 32. Methods: FedAvg(tau), FedAvg(2 tau) for half the rounds (same local-step
budget), FedLUAR(delta), FedPAQ(s), FedDropoutAvg(0.75), FedLUAR+FedPAQ, FedOpt+FedLUAR
(eta_g = 0.9), and with ``--ablations`` the Table 4/5 ablations (uniform selection, drop
instead of recycle).

Relative uplink cost (§1.3) is total uploaded elements divided by FedAvg(tau)'s total, with
quantised elements weighted by bits/32 (QSGD: 1 sign bit + ceil(log2(s+1)) bits); FedDropoutAvg
counts non-zeros. ``uplink_bytes``: dense f32 = 4 B/element, sparse = 8 B per non-zero (index +
value), QSGD = bits/8 per element + one f32 norm per uploaded tensor.

FedLAMA(tau'=tau, phi=2) runs the same rounds as FedAvg(tau); LBGM uses threshold 0.95 and one
look-back update per client; PruneFL keeps 70% of every kernel, reconfigured every R/4 rounds
(the reference: every 50 of 200).

Usage::

  python experiments/layerwise_comm.py                       # Fashion-MNIST (the committed run)
  python experiments/layerwise_comm.py --dataset digits      # fast mode
  python experiments/layerwise_comm.py --quick               # a few rounds, CI-sized
  python experiments/layerwise_comm.py --config cifar10_resnet20 --data-dir ~/tensorflow_datasets
  python experiments/layerwise_comm.py --config cifar10_resnet20 --smoke   # random data, 2 rounds
  python experiments/layerwise_comm.py --bench-only          # FedLUAR vs FedAvg round time
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
  RESULTS,
  command_line,
  interleaved_times,
  md_table,
  median_time,
  save_accuracy_plot,
  timed,
  write_json,
  write_results,
)

import jaxfl
from jaxfl import comm as compression  # QSGD bit accounting
from jaxfl import tree as jtree
from jaxfl.algorithms import fedavg
from jaxfl.algorithms import layerwise as lw
from jaxfl.data import device_data
from jaxfl.round import build_round

# Presets. Fashion-MNIST: rounds/tau chosen so that the whole comparison fits a small shared
# CPU (see docs/layerwise.md); the CIFAR-10 preset is the authors' configuration.
PRESETS = {
    "fashion_mnist": dict(dataset="fashion_mnist", model="cnn", num_clients=128, cohort=32,
                          alpha=0.1, rounds=30, tau=5, lr=0.02, batch=32, num_recycle=2,
                          levels=16, server_lr_fedopt=0.9, weight_decay=0.0, eval_every=3),
    "digits": dict(dataset="digits", model="small_cnn", num_clients=128, cohort=32, alpha=0.1,
                   rounds=40, tau=5, lr=0.02, batch=32, num_recycle=2, levels=16,
                   server_lr_fedopt=0.9, weight_decay=0.0, eval_every=2),
    # ResNet-20 / CIFAR-10 (FedLUAR config.py): tau=20, LR 0.2, 200 rounds, delta=12, Keras
    # l2(1e-4) => decayed weights 2e-4 (applied to every leaf here; the authors skip BN).
    "cifar10_resnet20": dict(dataset="tfds:cifar10", model="resnet20", num_clients=128,
                             cohort=32, alpha=None, rounds=200, tau=20, lr=0.2, batch=32,
                             num_recycle=12, levels=16, server_lr_fedopt=0.9,
                             weight_decay=2e-4, eval_every=10),
}

METHODS = ("fedavg", "fedavg_2tau", "fedlama", "fedluar", "fedpaq", "fedluar+fedpaq",
           "feddropoutavg", "fedopt+fedluar", "lbgm", "prunefl")
ABLATIONS = ("fedluar_uniform", "fedluar_drop")
EXTRA = ("fedacg", "fedacg+fedluar", "fedprox+fedluar")  # via --methods


def build_algorithm(method: str, cfg: dict, seed: int):
  common = dict(client_lr=cfg["lr"], client_momentum=0.9, weight_decay=cfg["weight_decay"],
                batch_size=cfg["batch"], local_steps=cfg["tau"])
  d, s = cfg["num_recycle"], cfg["levels"]
  arms = {
      "fedavg": lambda: fedavg(weighting="uniform", name="fedavg", **common),
      "fedavg_2tau": lambda: fedavg(weighting="uniform", name="fedavg_2tau",
                                    **{**common, "local_steps": 2 * cfg["tau"]}),
      "fedluar": lambda: lw.fedluar(d, seed=seed, **common),
      # tau' = tau, phi = 2, reassignment after round 5 (repo defaults)
      "fedlama": lambda: lw.fedlama(2, **common),
      "lbgm": lambda: lw.lbgm(0.95, **common),
      # the reference reconfigures every 50 of 200 rounds: R/4 here
      "prunefl": lambda: lw.prunefl(0.7, max(1, cfg["rounds"] // 4), **common),
      "fedluar_uniform": lambda: lw.fedluar(d, selection="uniform", seed=seed, name=method,
                                            **common),
      "fedluar_drop": lambda: lw.fedluar(d, recycle=False, seed=seed, name=method, **common),
      "fedpaq": lambda: lw.fedpaq(s, seed=seed, **common),
      "feddropoutavg": lambda: lw.feddropoutavg(0.75, seed=seed, **common),
      "fedluar+fedpaq": lambda: lw.fedluar(d, quantize_levels=s, seed=seed, **common),
      "fedopt+fedluar": lambda: lw.fedluar(d, server_lr=cfg["server_lr_fedopt"], seed=seed,
                                           **common),
      "fedacg": lambda: lw.fedacg(seed=seed, **common),
      "fedacg+fedluar": lambda: lw.fedacg(num_recycle=d, seed=seed, **common),
      "fedprox+fedluar": lambda: lw.fedluar(d, prox_mu=0.001, seed=seed, **common),
  }
  if method not in arms:
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS + ABLATIONS + EXTRA}.")
  return arms[method]()


def load_setup(cfg: dict, seed: int, data_dir: str | None, smoke: bool):
  if cfg["model"] == "resnet20":
    if smoke:
      data = jaxfl.data.random_images(cfg["num_clients"], 8, (32, 32, 3), 10, num_test=64,
                                      seed=seed)
    else:
      part = jaxfl.data.from_index_files("/work/shared/data/lmls_partitions", "cifar10")
      data = jaxfl.data.load("tfds:cifar10", cfg["num_clients"], part, seed=seed,
                             data_dir=data_dir)
    return data, jaxfl.models.resnet20(data.example_shape, data.num_classes)
  data = jaxfl.data.load(cfg["dataset"], cfg["num_clients"], jaxfl.data.dirichlet(cfg["alpha"]),
                         seed=seed, data_dir=data_dir)
  if cfg["model"] == "cnn":
    model = jaxfl.models.cnn(data.example_shape, data.num_classes, dense=128)
  else:
    model = jaxfl.models.small_cnn(data.example_shape, data.num_classes)
  return data, model


def _uplink(method: str, cfg: dict, res) -> tuple[float, float, float]:
  """(element-equivalent uploads, bytes, bits factor) of a finished run."""
  elems = float(sum(h["uplink_elements"] for h in res.history))
  if method in ("fedpaq", "fedluar+fedpaq"):
    bits = compression.qsgd_bits_per_element(cfg["levels"])
    nbytes = compression.qsgd_uplink_bytes(jax.device_get(res.state.uplink_elements),
                                           res.state.params, cfg["levels"])
    return elems * bits / 32.0, nbytes, bits / 32.0
  return elems, float(res.summary["uplink_bytes"]), 1.0


def run_comparison(cfg: dict, methods, seed: int, data, model, tag: str, on_row=None):
  rows, histories = [], {}
  base_elems = None
  for method in methods:
    rounds = cfg["rounds"] // 2 if method == "fedavg_2tau" else cfg["rounds"]
    algo = build_algorithm(method, cfg, seed)
    res, secs = timed(jaxfl.simulate, algo, model, data, rounds=rounds,
                      clients_per_round=cfg["cohort"], seed=seed, eval_every=cfg["eval_every"],
                      progress=False)
    elems, nbytes, factor = _uplink(method, cfg, res)
    if method == "fedavg":
      base_elems = elems
    if base_elems is None:  # FedAvg not run: per-round dense model upload of the cohort
      base_elems = cfg["rounds"] * cfg["cohort"] * jtree.num_params(res.state.params)
    row = {"method": method, "dataset": tag, "rounds": rounds,
           "tau": cfg["tau"] * (2 if method == "fedavg_2tau" else 1),
           "final_acc": res.summary["final_acc"], "best_acc": res.summary["best_acc"],
           "rel_uplink_cost": elems / base_elems, "uplink_bytes": nbytes, "seed": seed,
           "seconds": secs, "compile_seconds": res.summary["compile_seconds"]}
    rows.append(row)
    hist = [dict(h, uplink_bytes=h["uplink_bytes"] * factor) for h in res.history]
    histories[method] = hist
    print(f"{method:16s} R={rounds:3d} final={row['final_acc']:.4f} best={row['best_acc']:.4f} "
          f"rel_uplink={row['rel_uplink_cost']:.3f} MB={nbytes / 1e6:.1f} ({secs:.0f}s)",
          flush=True)
    if on_row is not None:
      on_row(rows, histories)  # write partial results after every method
  return rows, histories


def bench(cfg: dict, data, model, seed: int, rounds: int = 6) -> dict:
  """Median s/round (after compile) of FedAvg, FedLUAR and FedLAMA, interleaved in one
  process (rotating order)."""
  algos = {m: build_algorithm(m, cfg, seed) for m in ("fedavg", "fedluar", "fedlama")}
  dd = device_data(data)
  built, states = {}, {}
  for name, algo in algos.items():
    built[name] = build_round(algo, model, num_clients=data.num_clients,
                              max_client_size=data.max_client_size,
                              clients_per_round=cfg["cohort"])
    states[name] = jax.tree.map(np.asarray, built[name].init(jax.random.key(seed)))
    states[name], m = built[name].step(states[name], dd, jax.random.key(0))  # compile
    jax.block_until_ready(m)

  def round_of(name):
    def run(r):
      states[name], m = built[name].step(states[name], dd, jax.random.key(r + 1))
      return m
    return run

  # rotating order: round r starts with the (r % 3)-th method
  times = interleaved_times({name: round_of(name) for name in algos}, rounds, rotate=True)
  med = {k: statistics.median(v) for k, v in times.items()}

  # Server-side transform alone (the only extra work of FedLUAR besides skipped uploads).
  import optax

  params = states["fedavg"].params
  g = jax.tree.map(lambda x: x * 1e-3, params)
  out = {}
  for name in algos:
    tx = optax.with_extra_args_support(algos[name].server_optimizer)
    cu = jax.tree.map(lambda x: jnp.stack([x] * cfg["cohort"]), g)
    w = jnp.ones([cfg["cohort"]])
    upd = jax.jit(lambda g, s, p, k, cu, tx=tx: tx.update(g, s, p, key=k, client_updates=cu,
                                                          client_weights=w))
    s = tx.init(params)
    out[name] = median_time(lambda i: upd(g, s, params, jax.random.key(i), cu), 50, warmup=1)
  return {"dataset": cfg["dataset"], "cohort": cfg["cohort"], "tau": cfg["tau"],
          "rounds_timed": rounds, "round_s": med, "round_times": times,
          "overhead_ratio": med["fedluar"] / med["fedavg"],
          "overhead_ratio_min": min(times["fedluar"]) / min(times["fedavg"]),
          "overhead_ratio_paired_median": statistics.median(
              a / b for a, b in zip(times["fedluar"], times["fedavg"])),
          "fedlama_overhead_ratio": med["fedlama"] / med["fedavg"],
          "fedlama_overhead_ratio_min": min(times["fedlama"]) / min(times["fedavg"]),
          "server_update_s": out, "device": str(jax.devices()[0].platform),
          "cpu_count": os.cpu_count()}


def table_md(rows, cmd, cfg):
  cols = ["method", "rounds", "tau", "final acc", "best acc", "rel. uplink", "uplink MB", "s"]
  cells = [[r["method"], r["rounds"], r["tau"], f"{r['final_acc']:.4f}", f"{r['best_acc']:.4f}",
            f"{r['rel_uplink_cost']:.3f}", f"{r['uplink_bytes'] / 1e6:.1f}", f"{r['seconds']:.0f}"]
           for r in rows]
  return "\n".join([
      f"# Layer-wise communication: {rows[0]['dataset']}", "",
      f"Command: `{cmd}`", "",
      f"{cfg['num_clients']} clients, {cfg['cohort']} active/round, Dirichlet "
      f"alpha={cfg['alpha']}, unweighted mean, client SGD(lr={cfg['lr']}, momentum 0.9), "
      f"batch {cfg['batch']}, tau={cfg['tau']}, delta={cfg['num_recycle']}, "
      f"QSGD s={cfg['levels']}.", "",
      md_table(cols, cells)]) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "digits"])
  p.add_argument("--config", default=None, choices=["cifar10_resnet20"])
  p.add_argument("--smoke", action="store_true", help="cifar10_resnet20 on random images, 2 rounds")
  p.add_argument("--quick", action="store_true", help="4 rounds (CI)")
  p.add_argument("--ablations", action="store_true", help="add the Table 4/5 ablations")
  p.add_argument("--methods", default=None, help="comma-separated subset")
  p.add_argument("--rounds", type=int, default=None)
  p.add_argument("--tau", type=int, default=None)
  p.add_argument("--model", default=None, choices=["cnn", "small_cnn"])
  p.add_argument("--lr", type=float, default=None)
  p.add_argument("--num-recycle", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-dir", default=None)
  p.add_argument("--out-dir", default=RESULTS)
  p.add_argument("--bench-rounds", type=int, default=6)
  p.add_argument("--no-bench", action="store_true")
  p.add_argument("--bench-only", action="store_true")
  args = p.parse_args(argv)

  name = args.config or args.dataset
  cfg = dict(PRESETS[name])
  if args.smoke:
    if args.config != "cifar10_resnet20":
      p.error("--smoke is for --config cifar10_resnet20")
    cfg.update(rounds=2, tau=1, cohort=4, batch=8, eval_every=1)
  if args.quick:
    cfg.update(rounds=4, eval_every=2)
  for k in ("rounds", "tau", "lr", "num_recycle", "model"):
    v = getattr(args, k)
    if v is not None:
      cfg[k] = v
  methods = list(METHODS) + (list(ABLATIONS) if args.ablations else [])
  if args.smoke:
    methods = ["fedavg", "fedluar"]
  if args.methods:
    methods = args.methods.split(",")
  tag = name + ("_smoke" if args.smoke else "") + ("_quick" if args.quick else "")
  os.makedirs(args.out_dir, exist_ok=True)
  cmd = command_line(__file__, argv)

  data, model = load_setup(cfg, args.seed, args.data_dir, args.smoke)
  print(f"{tag}: {data.num_clients} clients, {jtree.num_params(model.init(jax.random.key(0))[0])} "
        f"params, methods {methods}", flush=True)
  stem = "layerwise_comm" if tag == "fashion_mnist" else f"layerwise_comm_{tag}"
  def save(rows, histories):
    write_json(os.path.join(args.out_dir, stem + "_histories.json"), histories, indent=None)
    write_results(args.out_dir, stem, command=cmd, data=rows, md=table_md(rows, cmd, cfg),
                  plot=lambda path: save_accuracy_plot(path, histories, x="uplink_bytes"))

  if not args.bench_only:
    run_comparison(cfg, methods, args.seed, data, model, tag, on_row=save)
  if not args.no_bench and not args.smoke:
    b = bench(cfg, data, model, args.seed, args.bench_rounds)
    bstem = "bench_layerwise" if tag == "fashion_mnist" else f"bench_layerwise_{tag}"
    write_results(args.out_dir, bstem, command=cmd, data=b)
    print(f"bench: fedavg {b['round_s']['fedavg']:.3f}s/round, fedluar "
          f"{b['round_s']['fedluar']:.3f}s/round, fedlama {b['round_s']['fedlama']:.3f}s/round "
          f"(x{b['fedlama_overhead_ratio']:.3f}), fedluar overhead x{b['overhead_ratio']:.3f} (min "
          f"x{b['overhead_ratio_min']:.3f}, paired x{b['overhead_ratio_paired_median']:.3f}); server "
          f"update {b['server_update_s']}", flush=True)


if __name__ == "__main__":
  main()
