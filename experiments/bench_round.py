"""Benchmark: jaxfl's vectorized round vs a sequential per-client simulator, and the FLOP bound.

Side by side, in one process, on the same data and model:
  (a) jaxfl's round: one jit-compiled function over the whole cohort (on a CPU: the cohort
      split over the XLA devices, each training one client at a time; on an accelerator: all
      clients vmapped);
  (b) a lean sequential simulator, as FedJAX's for_each_client / pfl-research / Flower run on
      one device: a Python loop over the cohort, each client calling one jitted local-SGD
      step per minibatch (data on device, no per-client recompiles), then a jitted average.
      It is timed twice, compiled with the XLA options jaxfl picks for one device running
      alone (``jaxfl.xla_options``) and with XLA's defaults (what users of those simulators
      run); ``sequential_s_per_round`` and ``speedup`` use the faster of the two.
FLOPs per round come from XLA's cost analysis of the compiled round; the machine's sustained
rate is measured here (a large f32 matmul), so ``x_of_bound`` = vectorized time / (FLOPs /
rate).

  python experiments/bench_round.py --workload digits --cohort 10 --rounds 10 --json out.json
  python experiments/bench_round.py --workload pfl_cifar10 --rounds 5 --json out.json
  python experiments/bench_round.py --workload fashion_mnist --rounds 5 --devices 2
  python experiments/bench_round.py --workload digits10 --model mlp --cohort 10 --devices 1

``digits10`` is issue 20's small-round workload: the digits training set repeated 10 times
(14,370 examples), 100 clients, Dirichlet 0.5, 5 local steps of batch 32, plain FedAvg
(``--model mlp`` or ``small_cnn``). The two simulators' rounds are timed interleaved (one
round of each in turn), so a change in the host's load hits both alike.

``--devices N`` splits one CPU into N XLA devices (set before JAX starts).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys

from _common import command_line, interleaved_times, md_table, repeat_times, timed, write_json

WORKLOADS = {
    # name: (dataset, clients, cohort, model, batch, local_steps, local_epochs)
    "digits": ("digits", 100, 10, "small_cnn", 32, 5, None),
    "pfl_cifar10": ("random", 1000, 50, "cnn", 10, None, 1.0),
    "fashion_mnist": ("fashion_mnist", 128, 32, "cnn", 32, 10, None),
    "digits10": ("digits10", 100, 10, "mlp", 32, 5, None),
}


def parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workload", choices=sorted(WORKLOADS), default="digits")
  p.add_argument("--cohort", type=int, default=None, help="clients per round (default: workload's)")
  p.add_argument("--model", default=None, help="model name (default: the workload's)")
  p.add_argument("--rounds", type=int, default=5, help="measured rounds (after compile)")
  p.add_argument("--devices", default="auto",
                 help="devices of the client axis: 'auto' = one XLA CPU device per core on a "
                      "CPU (jaxfl.set_cpu_devices), 1 device on an accelerator; or a number")
  p.add_argument("--mode", choices=["auto", "vmap", "map"], default="auto",
                 help="auto: jaxfl's default for the backend; vmap: whole cohort vmapped; "
                      "map: lax.map over one client per device")
  p.add_argument("--clients-per-chunk", type=int, default=None, help="overrides --mode")
  p.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                 help="stream_aggregate (sum updates chunk by chunk); auto = jaxfl's default")
  p.add_argument("--unroll", type=int, default=1, help="lax.scan unroll of local steps")
  p.add_argument("--block", type=int, default=1,
                 help="rounds per timed block: 1 times round by round, interleaved; K > 1 "
                      "times K rounds back to back per simulator (jaxfl's dispatched as "
                      "simulate does, round r + 1 before round r's metrics are read), blocks "
                      "interleaved; --rounds is then rounded down to whole blocks")
  p.add_argument("--skip-sequential", action="store_true")
  p.add_argument("--conv-impl", choices=["auto", "xla", "patches", "lax"], default="auto",
                 help="conv lowering of the model (both simulators run the same model)")
  p.add_argument("--json", default=None, help="write the result row here")
  return p.parse_args()


def layer_flops(model, example_shape):
  """Per-example forward FLOPs of every Conv/Dense call (2 x MACs), and the conv shapes."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jaxfl

  flops, convs = [], []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod, x = context.module, args[0] if args else None
    if context.method_name == "__call__" and isinstance(mod, nn.Dense):
      flops.append(2 * int(np.prod(out.shape[1:])) * x.shape[-1])
    elif context.method_name == "__call__" and isinstance(mod, jaxfl.models.Conv):
      kh, kw = mod.kernel_size
      flops.append(2 * int(np.prod(out.shape[1:])) * kh * kw * x.shape[-1])
      convs.append((tuple(x.shape[1:]), (kh, kw, x.shape[-1], mod.features), mod.strides,
                    mod.padding, flops[-1]))
    return out

  params, state = jax.eval_shape(model.init, jax.random.key(0))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda p, s: model.apply(p, s, jnp.zeros((1,) + tuple(example_shape)),
                                            train=True, rng=jax.random.key(0)), params, state)
  return flops, convs


def sustained_rates(convs):
  """GFLOP/s of a 2048^3 f32 matmul and of the model's costliest conv (batch 256, forward)."""
  import jax

  from jaxfl.models import conv2d

  def best(f, *a):
    return min(repeat_times(lambda _: f(*a), 5, warmup=1))

  a = jax.random.normal(jax.random.key(0), (2048, 2048))
  matmul = 2 * 2048 ** 3 / best(jax.jit(lambda a: a @ a), a)
  conv = None
  if convs:
    xs, ks, strides, padding, fl = max(convs, key=lambda c: c[-1])
    x = jax.random.normal(jax.random.key(1), (256,) + xs)
    k = jax.random.normal(jax.random.key(2), ks)
    conv = 256 * fl / best(jax.jit(lambda x, k: conv2d(x, k, strides, padding, "xla")), x, k)
  return matmul, conv


def main():
  args = parse()
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import jaxfl
  from jaxfl.data import device_data
  from jaxfl.round import build_round
  from jaxfl.xla_options import compiler_options

  # before any JAX computation
  n_cpu = jaxfl.set_cpu_devices(None if args.devices == "auto" else int(args.devices))

  name, n_clients, cohort, model_name, batch, steps, epochs = WORKLOADS[args.workload]
  cohort = args.cohort or cohort
  model_name = args.model or model_name
  if name == "digits10":
    ds = jaxfl.data.load_digits()
    ds = ds._replace(x_train=np.tile(ds.x_train, (10, 1, 1, 1)), y_train=np.tile(ds.y_train, 10))
    data = jaxfl.data.federate(ds, n_clients, jaxfl.data.dirichlet(0.5), seed=0)
  elif name == "random":
    data = jaxfl.data.random_images(n_clients, 50, (32, 32, 3), 10, seed=0)
  else:
    alpha = 0.1 if args.workload == "fashion_mnist" else 0.5
    data = jaxfl.data.load(name, n_clients, jaxfl.data.dirichlet(alpha), seed=0)
  conv_kw = lambda impl: {} if model_name in ("mlp", "logreg") else {"conv_impl": impl}
  mk = lambda impl: jaxfl.models.get_model(model_name, data.example_shape, data.num_classes,
                                           **conv_kw(impl))
  model_vec = model_seq = mk(args.conv_impl)
  algo = jaxfl.algorithms.fedavg(client_lr=0.05, batch_size=batch, local_steps=steps,
                                 local_epochs=epochs)
  algo = algo._replace(local=algo.local._replace(unroll=args.unroll))
  n_dev = (n_cpu if jax.default_backend() == "cpu" else 1) if args.devices == "auto" else n_cpu
  devices = jax.devices()[:n_dev]
  mesh = jaxfl.sharding.client_mesh(devices) if len(devices) > 1 else None

  # (a) vectorized round
  chunk = args.clients_per_chunk or {"auto": "auto", "vmap": None, "map": 1}[args.mode]
  rnd = build_round(algo, model_vec, num_clients=data.num_clients,
                    max_client_size=data.max_client_size, clients_per_round=cohort, mesh=mesh,
                    clients_per_chunk=chunk,
                    stream_aggregate={"auto": "auto", "on": True, "off": False}[args.stream])
  dd = device_data(data, mesh)
  state = jaxfl.sharding.put_replicated(jax.tree.map(np.asarray, rnd.init(jax.random.key(0))), mesh)
  key = jax.random.key(1)
  _, compile_s = timed(lambda: rnd.step.lower(state, dd, key).compile())
  # XLA's cost analysis counts a loop body once, so FLOPs come from the fully vmapped,
  # fully unrolled lowering of the same round (compiled, never run).
  flop_algo = algo._replace(local=algo.local._replace(unroll=True))
  flop_rnd = build_round(flop_algo, model_vec, num_clients=data.num_clients,
                         max_client_size=data.max_client_size, clients_per_round=cohort,
                         clients_per_chunk=None, donate=False)
  cost = flop_rnd.step.lower(flop_rnd.init(jax.random.key(0)), device_data(data),
                             key).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", float("nan")))
  state, m = rnd.step(state, dd, key)  # warm-up
  jax.block_until_ready(m)
  holder, examples = {"state": state}, []

  def vec_round(r):
    holder["state"], m = rnd.step(holder["state"], dd, jax.random.fold_in(key, r))
    examples.append(m["examples"])
    return m

  def vec_block(b):
    # simulate's loop: the next round is in flight while this one's metrics are read
    pending = None
    for i in range(args.block):
      holder["state"], m = rnd.step(holder["state"], dd,
                                    jax.random.fold_in(key, b * args.block + i))
      if pending is not None:
        examples.append(float(pending["examples"]))
      pending = m
    examples.append(float(pending["examples"]))
    return pending

  # (b) sequential per-client simulator (same sampling rule: per-epoch shuffles, short last
  # batch); see the module docstring for its two builds.
  def make_sequential(options):
    x_all, y_all = jnp.asarray(data.x), jnp.asarray(data.y)
    opt = algo.local.optimizer
    params0, _ = model_seq.init(jax.random.key(0))
    seq_jit = functools.partial(jax.jit, compiler_options=options)

    @seq_jit
    def local_step(p, s, rows, w):
      def loss(p):
        logits, _ = model_seq.apply(p, {}, x_all[rows], train=True)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_all[rows])
        return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
      g = jax.grad(loss)(p)
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s

    @seq_jit
    def average(global_p, locals_, weights):
      w = weights / jnp.sum(weights)
      return jax.tree.map(lambda g, *ls: sum(wi * l for wi, l in zip(w, ls)), global_p, *locals_)

    rng = np.random.default_rng(0)

    def client_batches(cid):
      idx = data.client_indices[cid, : data.client_sizes[cid]]
      n = len(idx)
      nb = -(-n // batch)
      total = steps if steps else int(np.ceil(epochs * nb))
      out = []
      for s in range(total):
        if s % nb == 0:
          perm = rng.permutation(idx)
        pos = (s % nb) * batch + np.arange(batch)
        out.append((perm[pos % n], (pos < n).astype(np.float32)))
      return out

    def seq_round(p):
      ids = rng.choice(data.num_clients, cohort, replace=False)
      locals_, ws = [], []
      for cid in ids:
        lp, ls = p, opt.init(p)
        for rows, w in client_batches(cid):
          lp, ls = local_step(lp, ls, rows, w)
        locals_.append(lp)
        ws.append(float(data.client_sizes[cid]))
      return average(p, locals_, jnp.asarray(ws))

    carry = {"p": params0}

    def run(_):
      carry["p"] = seq_round(carry["p"])
      return carry["p"]

    _, first_s = timed(run, 0)  # compiles its two functions
    return run, first_s

  if args.block < 1:
    raise ValueError(f"--block must be >= 1, got {args.block}")
  blocked = lambda run: (lambda b: [run(b * args.block + i) for i in range(args.block)][-1])
  fns = {"jaxfl": vec_round if args.block == 1 else vec_block}
  seq_options = compiler_options(jax.default_backend())
  seq_first = {}
  if not args.skip_sequential:
    fns["seq_tuned"], seq_first["tuned"] = make_sequential(seq_options)
    if seq_options:
      fns["seq_default"], seq_first["default"] = make_sequential(None)
    if args.block > 1:
      fns = {k: (v if k == "jaxfl" else blocked(v)) for k, v in fns.items()}
  # one round (or block) of each simulator in turn, so load changes hit both alike
  n_blocks = max(1, args.rounds // args.block)
  times = {k: [t / args.block for t in v]
           for k, v in interleaved_times(fns, n_blocks).items()}
  examples = [float(e) for e in examples]
  vec = statistics.median(times["jaxfl"])
  seq = seq_tuned = seq_default = None
  if not args.skip_sequential:
    seq_tuned = statistics.median(times["seq_tuned"])
    seq_default = (statistics.median(times["seq_default"]) if "seq_default" in times
                   else seq_tuned)
    seq = min(seq_tuned, seq_default)

  # Cross-check XLA's count: conv/dense FLOPs by formula; training = forward + weight grads
  # + input grads except the first layer's (3 x forward - first layer).
  fwd, convs = layer_flops(model_vec, data.example_shape)
  n_steps = jaxfl.client.num_steps(algo.local, data.max_client_size)
  formula_flops = float(cohort * n_steps * batch * (3 * sum(fwd) - fwd[0]))
  rate, conv_rate = sustained_rates(convs)
  bound = flops / rate if flops == flops else float("nan")
  row = {
      "workload": args.workload, "cohort": cohort, "clients": data.num_clients,
      "model": model_name, "batch_size": batch, "local_steps": steps, "local_epochs": epochs,
      "vectorized_s_per_round": vec, "sequential_s_per_round": seq,
      "rounds": n_blocks * args.block, "block": args.block,
      "vectorized_total_s": sum(times["jaxfl"]) * args.block,
      "round_times_s": times, "sequential_first_round_s": seq_first,
      "speedup": (seq / vec) if seq else None,
      "sequential_jaxfl_xla_s_per_round": seq_tuned,
      "sequential_default_xla_s_per_round": seq_default,
      "speedup_vs_default_xla": (seq_default / vec) if seq_default else None,
      "sequential_compiler_options": seq_options,
      "vectorized_compiler_options": compiler_options(
          jax.default_backend(), len(devices) if jax.default_backend() == "cpu" else 1),
      "flops_per_round": flops, "formula_flops_per_round": formula_flops,
      "matmul_gflops": rate / 1e9, "conv_gflops": conv_rate / 1e9 if conv_rate else None,
      "conv_bound_s_per_round": flops / conv_rate if conv_rate else None,
      "flop_bound_s_per_round": bound, "x_of_bound": vec / bound if bound == bound else None,
      "compile_s": compile_s, "client_updates_per_s": cohort / vec,
      "examples_per_s": statistics.median(examples) / vec, "devices": len(devices),
      "mode": args.mode, "clients_per_chunk": args.clients_per_chunk,
      "stream_aggregate": args.stream, "unroll": args.unroll, "conv_impl": args.conv_impl,
      "jax_version": jax.__version__, "backend": jax.default_backend(),
      "machine": f"{platform.machine()} {os.cpu_count()} cores",
      "command": command_line(__file__),
  }
  cols = ["workload", "cohort", "devices", "mode", "vectorized_s_per_round", "sequential_s_per_round",
          "speedup", "sequential_default_xla_s_per_round", "speedup_vs_default_xla", "x_of_bound",
          "compile_s", "client_updates_per_s"]
  print(md_table(cols, [row], fmt=lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)))
  if args.json:
    write_json(args.json, row)
  return row


if __name__ == "__main__":
  main()
