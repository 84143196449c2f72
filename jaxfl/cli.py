"""Command line: ``jaxfl demo``, ``jaxfl run ...``, ``jaxfl list`` (also ``python -m jaxfl``)."""

from __future__ import annotations

import argparse
import json
import os
import sys

DEMO_DIR = os.path.join("runs", "demo")  # covered by .gitignore (/runs/)


def _table(rows: list[dict], cols: list[str]) -> str:
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
  line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
  out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  out += [line([fmt(r.get(c, "")) for c in cols]) for r in rows]
  return "\n".join(out)


def _build(args):
  """(data, model, algorithm) of ``run``: the algorithm's preset, with the local optimizer
  wrapped in (layer-wise) SAM when ``--local-sam-rho`` is set."""
  import jaxfl

  data, model, algo = _build_preset(args)
  if args.local_sam_rho is None:
    return data, model, algo
  if args.local_sam_layers is not None and args.local_sam_layers < 1:
    raise ValueError(f"--local-sam-layers must be a positive int, got {args.local_sam_layers}.")
  sam = jaxfl.transforms.layerwise_sam(algo.local.optimizer, rho=args.local_sam_rho,
                                       num_layers=args.local_sam_layers)
  return data, model, algo._replace(
      name=f"{algo.name}+{'sam' if args.local_sam_layers is None else 'lwsam'}",
      local=algo.local._replace(optimizer=sam, pass_grad_fn=True))


def _build_preset(args):
  import jax

  import jaxfl

  part = {"iid": lambda: jaxfl.data.iid(),
          "dirichlet": lambda: jaxfl.data.dirichlet(args.alpha),
          "shards": lambda: jaxfl.data.shards(2),
          "quantity_skew": lambda: jaxfl.data.quantity_skew(args.alpha)}[args.partition]()
  data = jaxfl.data.load(args.dataset, args.num_clients, part, seed=args.data_seed,
                         data_dir=args.data_dir)
  model = jaxfl.models.get_model(args.model, data.example_shape, data.num_classes)
  kw = dict(client_lr=args.client_lr, client_momentum=args.client_momentum,
            batch_size=args.batch_size, local_steps=args.local_steps,
            local_epochs=args.local_epochs, weighting=args.weighting)
  if args.server_lr is not None:
    kw["server_lr"] = args.server_lr
  if args.algorithm == "prism":
    return data, *_build_prism(args, model, kw)
  if args.algorithm == "embracingfl":
    return data, *_build_embracing(args, model, data, kw)
  if args.algorithm in ("heterofl", "fjord"):
    return data, *_build_heterofl(args, model, data, kw)
  if args.algorithm == "fedprox":
    kw["mu"] = args.mu
  if args.algorithm == "pma":  # one group per round, contiguous in the traced depth order
    kw.pop("local_epochs")
    kw.pop("weighting")
    params, state = model.init(jax.random.key(0))
    kw.update(num_groups=args.pma_groups, resample_every=args.pma_resample_every,
              order=jaxfl.algorithms.depth_order(model, params, state))
  if args.algorithm == "fedmut":
    kw["alpha"] = args.fedmut_alpha
  if args.algorithm in jaxfl.algorithms.LAYERWISE_ALGORITHMS:  # the papers' protocol: fixed tau
    kw.pop("local_epochs")
    kw.pop("weighting")
  algo = jaxfl.algorithms.get_algorithm(args.algorithm, **kw)
  if args.sampler != "uniform":
    if args.sampler == "multi_metric":
      sampler = jaxfl.sampling.multi_metric(args.sampler_extra, args.sampler_ratio,
                                            seed=args.seed)
    else:
      sampler = jaxfl.sampling.power_of_choice(args.sampler_candidates)
    algo = algo._replace(sampler=sampler)
  return data, model, algo


def _algorithm_names() -> list[str]:
  """``run --algorithm`` choices: the registry plus PriSM, EmbracingFL, HeteroFL and FjORD
  (which need facts of the model)."""
  import jaxfl

  return sorted([*jaxfl.algorithms.ALGORITHMS, "embracingfl", "fjord", "heterofl", "prism"])


def _build_prism(args, model, kw):
  """PriSM needs a factorised model; with --sliced its clients train gathered sub-models."""
  import functools

  import jax

  import jaxfl

  if not jaxfl.models.factor_layers(jax.eval_shape(model.init, jax.random.key(0))[0]):
    raise ValueError(f"--algorithm prism needs an SVD-factorised model (--model prism_cnn or "
                     f"prism_resnet18), got --model {args.model}.")
  kappa = args.kappa
  if args.kappa_mix:  # the paper's heterogeneous capacities, drawn once from --seed
    kappa = jaxfl.algorithms.draw_capacities(args.num_clients, seed=args.seed)
  kw.pop("weighting")  # PriSM averages unweighted, as the reference does
  algo = jaxfl.algorithms.prism(kappa, sampling=args.prism_sampling, rounds=args.rounds, **kw)
  if args.sliced:
    algo = algo._replace(client_update=functools.partial(
        jaxfl.algorithms.prism_client_update, sliced=kappa))
  return model, algo


def _build_embracing(args, model, data, kw):
  """EmbracingFL: each client draws a class once (from --seed); a class trains a share of the
  modules from the output side (--embracing-shares), or the longest suffix whose memory fits
  its budget (--embracing-budgets: XLA's estimate of one local step)."""
  import jax
  import numpy as np
  import optax

  import jaxfl

  A = jaxfl.algorithms
  by_memory = args.embracing_budgets is not None
  classes = list(args.embracing_budgets if by_memory else args.embracing_shares)
  ratios = list(args.embracing_ratios)
  flag = "--embracing-budgets" if by_memory else "--embracing-shares"
  if len(classes) != len(ratios) or abs(sum(ratios) - 1.0) > 1e-6 or min(ratios) < 0:
    raise ValueError(f"--embracing-ratios must give one probability per {flag} value and sum "
                     f"to 1, got {ratios} for {classes}.")
  if not all(0 < c <= 1 for c in classes):
    raise ValueError(f"{flag} must be fractions in (0, 1], got {classes}.")
  params = model.init(jax.random.key(0))[0]
  order = A.depth_order(model, params)
  if by_memory:
    opt = optax.sgd(args.client_lr, momentum=args.client_momentum or None)
    mem = A.suffix_training_bytes(model, params, order, opt, args.batch_size)
    per_class = A.layers_for_budget(mem, np.asarray(classes))
  else:
    per_class = np.array([max(1, int(np.ceil(c * len(order) - 1e-9))) for c in classes])
  draw = np.random.default_rng(args.seed).choice(len(classes), size=data.num_clients, p=ratios)
  kw.pop("weighting")  # unweighted, as the sub-model baselines
  algo = A.embracingfl(per_class[draw], order, rounds=args.rounds, **kw)
  return model, algo


def _build_heterofl(args, model, data, kw):
  """HeteroFL: each client draws a class once (from --seed); a class trains the sub-model of
  width ratio --heterofl-widths (the first ceil(r C) channels of every hidden layer). FjORD:
  that width is the class's cap, each round a width is drawn from --fjord-levels up to it."""
  import jax
  import numpy as np

  import jaxfl

  A = jaxfl.algorithms
  widths, ratios = list(args.heterofl_widths), list(args.heterofl_ratios)
  if len(widths) != len(ratios) or abs(sum(ratios) - 1.0) > 1e-6 or min(ratios) < 0:
    raise ValueError(f"--heterofl-ratios must give one probability per --heterofl-widths value "
                     f"and sum to 1, got {ratios} for {widths}.")
  if not all(0 < w <= 1 for w in widths):
    raise ValueError(f"--heterofl-widths must be ratios in (0, 1], got {widths}.")
  order = A.depth_order(model, model.init(jax.random.key(0))[0])
  draw = np.random.default_rng(args.seed).choice(len(widths), size=data.num_clients, p=ratios)
  kw.pop("weighting")  # unweighted over the holders of an entry, as the paper
  keep = np.asarray(widths, np.float64)[draw]
  if args.algorithm == "fjord":
    return model, A.fjord(keep, order, levels=tuple(args.fjord_levels), rounds=args.rounds, **kw)
  return model, A.heterofl(keep, order, rounds=args.rounds, **kw)


def _add_run_args(p):
  import jaxfl

  p.add_argument("--algorithm", default="fedavg",
                 choices=_algorithm_names())
  p.add_argument("--dataset", default="digits",
                 help=f"one of {', '.join(jaxfl.data.DATASETS)} (default digits)")
  p.add_argument("--data-dir", default=None, help="raw data folder (Fashion-MNIST IDX, TFDS)")
  p.add_argument("--model", default="small_cnn", choices=sorted(jaxfl.models.MODELS))
  p.add_argument("--num-clients", type=int, default=100)
  p.add_argument("--partition", default="dirichlet",
                 choices=["iid", "dirichlet", "shards", "quantity_skew"])
  p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet / quantity-skew alpha")
  p.add_argument("--clients-per-round", type=int, default=10)
  p.add_argument("--sampler", default="uniform", choices=sorted(jaxfl.sampling.SAMPLERS),
                 help="client activation: uniform, multi_metric (Lim et al. 2026), "
                      "power_of_choice (Cho et al. 2022)")
  p.add_argument("--sampler-extra", type=int, default=8, help="multi_metric's b")
  p.add_argument("--sampler-ratio", type=float, default=256.0, help="multi_metric's r")
  p.add_argument("--sampler-candidates", type=int, default=48, help="power_of_choice's d")
  p.add_argument("--rounds", type=int, default=100)
  p.add_argument("--client-lr", type=float, default=0.05)
  p.add_argument("--client-momentum", type=float, default=0.0)
  p.add_argument("--server-lr", type=float, default=None)
  p.add_argument("--mu", type=float, default=0.01, help="FedProx proximal coefficient")
  p.add_argument("--kappa", type=float, default=0.2,
                 help="PriSM's keep ratio (with --algorithm prism and a prism_* model)")
  p.add_argument("--kappa-mix", action="store_true",
                 help="PriSM: per-client kappa from {0.2, 0.4, 0.6} x {0.5, 0.3, 0.2}")
  p.add_argument("--prism-sampling", default="power",
                 choices=["power", "softmax", "uniform", "top"])
  p.add_argument("--sliced", action="store_true",
                 help="PriSM: clients train gathered sub-models (fewer FLOPs, less memory)")
  p.add_argument("--embracing-shares", type=float, nargs="+", default=[0.4, 0.7, 1.0],
                 help="EmbracingFL: per client class, the share of the model's modules it "
                      "trains from the output side (rounded up)")
  p.add_argument("--embracing-budgets", type=float, nargs="+", default=None,
                 help="EmbracingFL: per client class, a memory budget as a fraction of full "
                      "training instead (the longest output-side suffix that fits)")
  p.add_argument("--embracing-ratios", type=float, nargs="+", default=[0.5, 0.3, 0.2],
                 help="EmbracingFL: the share of clients in each class")
  p.add_argument("--heterofl-widths", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                 help="HeteroFL: per client class, the width ratio r of its sub-model (the "
                      "first ceil(r C) channels of every hidden layer); FjORD: its largest")
  p.add_argument("--heterofl-ratios", type=float, nargs="+", default=[0.5, 0.3, 0.2],
                 help="HeteroFL / FjORD: the share of clients in each class")
  p.add_argument("--fjord-levels", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0],
                 help="FjORD: the widths a client draws from each round, up to its class's "
                      "--heterofl-widths value")
  p.add_argument("--pma-groups", type=int, default=4,
                 help="pma: parameter groups P, one averaged per round of --local-steps steps")
  p.add_argument("--pma-resample-every", type=int, default=None,
                 help="pma: draw a new cohort every so many rounds (default: every client "
                      "trains every round, --clients-per-round = --num-clients)")
  p.add_argument("--fedmut-alpha", type=float, default=0.5,
                 help="fedmut: mutation radius alpha (each client starts from the global model "
                      "+/- alpha x its last change, per layer)")
  p.add_argument("--local-sam-rho", type=float, default=None,
                 help="wrap the local optimizer in SAM with this radius (FedSAM-style; "
                 "transforms.layerwise_sam)")
  p.add_argument("--local-sam-layers", type=int, default=None,
                 help="with --local-sam-rho: perturb only the k modules with the largest "
                 "gradient norms (layer-wise SAM); default every module (SAM)")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--local-steps", type=int, default=5)
  p.add_argument("--local-epochs", type=float, default=None)
  p.add_argument("--weighting", default="examples", choices=["examples", "uniform"])
  p.add_argument("--eval-every", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-seed", type=int, default=0)
  p.add_argument("--clients-per-chunk", type=_chunk_arg, default="auto",
                 help="clients trained at once: 'auto' (the library's default: by backend), "
                      "'all' (vmap the whole cohort) or a positive int")
  p.add_argument("--checkpoint-dir", default=None)
  p.add_argument("--checkpoint-every", type=int, default=0)
  p.add_argument("--allow-config-change", action="store_true",
                 help="resume a checkpoint written with another configuration (recorded in "
                      "the history); refused by default")
  p.add_argument("--out", default=None, help="output folder (history.json/csv, summary.json)")
  p.add_argument("--plot", action="store_true")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--report-grad-norm", action="store_true",
                 help="record the participants' mean local gradient norm (grad_norm) in the "
                      "history (off: saves a norm over every parameter at every local step)")
  _add_device_arg(p)


def _chunk_arg(value: str):
  if value == "auto":
    return "auto"
  if value == "all":
    return None
  try:
    n = int(value)
  except ValueError:
    n = 0
  if n < 1:
    raise argparse.ArgumentTypeError(f"expected 'auto', 'all' or a positive int, got {value!r}")
  return n


def _add_device_arg(p):
  p.add_argument("--cpu-devices", default="auto",
                 help="XLA CPU devices for the client axis: 'auto' (one per core, unless set "
                      "already by XLA_FLAGS or jaxfl.launch), or a number (1 = one device)")


def _compile_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache (unless the user configured one): a rerun of
  the same command loads the compiled round from disk instead of compiling it again."""
  import jax

  if not path or path == "off" or jax.config.jax_compilation_cache_dir:
    return
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _set_cpu_devices(value: str) -> None:
  from jaxfl import sharding

  if value == "auto":
    # Under jaxfl.launch each process's devices are the launcher's choice (--local-devices).
    if sharding.cpu_devices_configured() or os.environ.get("JAXFL_NUM_PROCESSES"):
      return
    try:
      sharding.set_cpu_devices()
    except RuntimeError:  # main() called after JAX started (e.g. from a notebook): keep it
      pass
    return
  try:
    n = int(value)
  except ValueError:
    raise SystemExit(f"--cpu-devices must be 'auto' or a positive int, got {value!r}") from None
  sharding.set_cpu_devices(n)


def cmd_run(args) -> int:
  import jax

  import jaxfl

  data, model, algo = _build(args)
  res = jaxfl.simulate(algo, model, data, rounds=args.rounds,
                       clients_per_round=args.clients_per_round, seed=args.seed,
                       eval_every=args.eval_every, clients_per_chunk=args.clients_per_chunk,
                       checkpoint_dir=args.checkpoint_dir,
                       checkpoint_every=args.checkpoint_every, output_dir=args.out,
                       plot=args.plot, progress=not args.no_progress,
                       allow_config_change=args.allow_config_change,
                       report_grad_norm=args.report_grad_norm)
  if jax.process_index() == 0:  # multi-process runs (jaxfl.launch): report once
    print(json.dumps(res.summary, indent=1))
  return 0


def cmd_demo(args) -> int:
  """FedAvg vs FedAvgM on digits, 100 clients, Dirichlet 0.5, 10 per round."""
  import jaxfl
  from jaxfl.simulation import plot_histories

  rounds = args.rounds or (10 if args.quick else 100)
  data = jaxfl.data.load("digits", 100, jaxfl.data.dirichlet(0.5), seed=0)
  model = jaxfl.models.small_cnn(data.example_shape, data.num_classes)
  rep = data.report()
  print(f"digits: {rep['num_clients']} clients, sizes {rep['size_min']}-{rep['size_max']} "
        f"(median {rep['size_median']:.0f}), {rep['classes_per_client_mean']:.1f} classes/client")
  algos = [jaxfl.algorithms.fedavg(client_lr=0.05, local_steps=5, batch_size=32),
           jaxfl.algorithms.fedavgm(client_lr=0.05, server_lr=0.5, server_momentum=0.9,
                                    local_steps=5, batch_size=32)]
  rows, hists = [], {}
  for algo in algos:
    res = jaxfl.simulate(algo, model, data, rounds=rounds, clients_per_round=10, seed=0,
                         eval_every=5, progress=not args.no_progress)
    s = res.summary
    rows.append({"method": algo.name, "rounds": rounds, "final_acc": s["final_acc"],
                 "best_acc": s["best_acc"], "rel_uplink": s["rel_uplink_cost"],
                 "uplink_MB": s["uplink_bytes"] / 1e6, "s/round": s["seconds"] / max(rounds, 1),
                 "compile_s": s["compile_seconds"]})
    hists[algo.name] = res.history
  print(_table(rows, list(rows[0])))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "demo.json"), "w") as f:
    json.dump({"rows": rows, "histories": hists}, f, indent=1)
  try:
    plot_histories(hists, os.path.join(args.out, "demo_accuracy.png"))
    print(f"wrote {args.out}/demo.json and {args.out}/demo_accuracy.png")
  except ImportError:
    print(f"wrote {args.out}/demo.json (install matplotlib for the plot)")
  return 0


def cmd_list(args) -> int:
  del args
  import jaxfl

  print("algorithms:", ", ".join(_algorithm_names()))
  print("datasets:  ", ", ".join(jaxfl.data.DATASETS))
  print("models:    ", ", ".join(sorted(jaxfl.models.MODELS)))
  print("partitions:", ", ".join(sorted(jaxfl.data.PARTITIONERS)), "+ from_index_files")
  return 0


def main(argv=None) -> int:
  import jaxfl

  parser = argparse.ArgumentParser(
      prog="jaxfl", description="Federated learning simulations as one jit-compiled round.",
      epilog=("algorithms: " + ", ".join(_algorithm_names()) + "; datasets: "
              + ", ".join(jaxfl.data.DATASETS) + "; models: "
              + ", ".join(sorted(jaxfl.models.MODELS))))
  sub = parser.add_subparsers(dest="command", required=True)
  p_demo = sub.add_parser("demo", help="FedAvg vs FedAvgM on digits (100 clients, 10/round)")
  p_demo.add_argument("--quick", action="store_true", help="10 rounds (smoke test)")
  p_demo.add_argument("--rounds", type=int, default=None)
  p_demo.add_argument("--out", default=DEMO_DIR)
  p_demo.add_argument("--no-progress", action="store_true")
  _add_device_arg(p_demo)
  p_demo.set_defaults(fn=cmd_demo)
  p_run = sub.add_parser("run", help="run one simulation")
  _add_run_args(p_run)
  p_run.set_defaults(fn=cmd_run)
  p_list = sub.add_parser("list", help="list algorithms, datasets and models")
  p_list.set_defaults(fn=cmd_list)
  for p in (p_demo, p_run):
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--compile-cache", default=os.environ.get(
        "JAXFL_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxfl", "xla")),
        help="persistent XLA compilation cache folder ('off' to disable; env "
             "JAXFL_COMPILE_CACHE)")
  args = parser.parse_args(argv)
  if hasattr(args, "cpu_devices"):
    _set_cpu_devices(args.cpu_devices)
  if hasattr(args, "compile_cache"):
    _compile_cache(args.compile_cache)
  try:
    return args.fn(args)
  except (ValueError, TypeError, FileNotFoundError, jaxfl.checkpoint.DirectoryInUseError) as e:
    if getattr(args, "debug", False):
      raise
    # A bad argument or input is the user's to fix: one line, not a traceback.
    print(f"jaxfl {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
