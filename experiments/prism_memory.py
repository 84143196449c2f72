"""What one PriSM client holds: parameters, training FLOPs and peak memory of its local update.

Issue 15, item 7. Compiles (never runs) the engine's per-slot client stage
(``jaxfl._stages.make_train_slot``: the view, the local update, the upload mask) for one client
and reads XLA's ``memory_analysis()`` and ``cost_analysis()``, for:

  fedavg     the dense model (no factorisation), PriSM's client recipe (``prism_fedavg``)
  masked     PriSM as simulated by default: the full-size factorised model, out-of-sub-model
             entries zero and frozen
  sliced     ``prism_client_update(..., gather_state=False)``: each factorised layer runs on its
             gathered n = ceil(kappa r) components in training (activations and FLOPs shrink;
             the trained params, gradients and momentum stay full-size)
  gathered   ``prism_client_update(...)``: the sub-model's params, gradients and momentum are
             gathered too and the delta is scattered back
  (both installed in the round through ``Algorithm.client_update``)

at kappa in {0.2, 0.4, 0.6, 1.0} (at kappa = 1 every layer keeps n = r components, and sliced
and gathered are the masked program, so they are not compiled again), for the experiment's CNN (16/32/32 and 32/64/64, Fashion-MNIST
shapes, 600 examples per client, batch 32, one local epoch) and the ResNet-18 preset (32x32x3,
500 examples per client, batch 32, two local epochs). The masked program is the same for every
kappa (only a constant in the view changes); it is compiled at every kappa for the CNNs and
once, at the first kappa, for ResNet-18 (``--all-masked`` compiles all).

Peak = arguments + outputs + temporaries - aliased bytes (XLA's buffer assignment; nothing is
donated here, so aliased = 0). Arguments are the server params, the singular values and the
client's own examples; outputs are the upload (delta) and metrics.
FLOPs: XLA's count for the compiled stage, which counts the local-step loop body once, i.e.
about one local step (forward + backward + optimizer) plus the once-per-round view and upload.

  python experiments/prism_memory.py                       # all three models, a few minutes
  python experiments/prism_memory.py --models cnn16 --kappas 0.2 1.0
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, command_line, md_table, write_results  # noqa: E402

MODELS = {
    # experiments/prism.py's fashion_mnist preset (and its 32/64/64 width)
    "cnn16": dict(kind="cnn", features=(16, 32, 32), shape=(28, 28, 1), examples=600,
                  epochs=1.0, lr=0.05, wd=2e-4),
    "cnn32": dict(kind="cnn", features=(32, 64, 64), shape=(28, 28, 1), examples=600,
                  epochs=1.0, lr=0.05, wd=2e-4),
    # experiments/prism.py's cifar10_resnet18 preset (random images: shapes only)
    "resnet18": dict(kind="resnet18", features=None, shape=(32, 32, 3), examples=500,
                     epochs=2.0, lr=0.1, wd=5e-4),
}
KAPPAS = (0.2, 0.4, 0.6, 1.0)
MiB = 2 ** 20


def build_model(cfg, factorise: bool):
  import jaxfl

  if cfg["kind"] == "resnet18":
    return jaxfl.models.prism_resnet18(cfg["shape"], 10, factorise=factorise)
  return jaxfl.models.prism_cnn(cfg["shape"], 10, features=cfg["features"], factorise=factorise)


def measure(algo, model, cfg, client_update=None) -> dict:
  """Compiles one client's per-slot stage; XLA's memory and cost analyses."""
  import jax
  import jax.numpy as jnp
  import optax

  from jaxfl import _stages
  from jaxfl.client import make_client_update
  from jaxfl.data._device import DeviceData
  from jaxfl.views import ServerSnapshot
  from jaxfl.xla_options import compiler_options

  n = cfg["examples"]
  params, ms = jax.eval_shape(model.init, jax.random.key(0))
  opt = jax.eval_shape(optax.with_extra_args_support(algo.server_optimizer).init, params)
  snap = ServerSnapshot(params, ms, opt, jax.ShapeDtypeStruct((), jnp.int32))
  sds = jax.ShapeDtypeStruct
  data = DeviceData(sds((n,) + cfg["shape"], jnp.float32), sds((n,), jnp.int32),
                    sds((1, n), jnp.int32), sds((1,), jnp.int32))
  xs = _stages.SlotInputs(sds((), jnp.int32), sds((), jnp.int32),
                          jax.eval_shape(lambda: jax.random.key(0)), sds((), jnp.float32), None)
  if client_update is None:
    client_update = make_client_update(model, algo.local, n)
  slot = _stages.make_train_slot(algo, client_update, False)
  fn = lambda s, d, x: (lambda o: (o.delta, o.metrics))(slot(s, d, x))
  t0 = time.perf_counter()
  # jaxfl's CPU options (as build_round), LLVM codegen unoptimised: compiles ~2x faster, the
  # same HLO passes, buffer assignment and analyses (checked on cnn16: identical bytes, FLOPs)
  options = {**(compiler_options("cpu", 1) or {}), "xla_backend_optimization_level": 0}
  compiled = jax.jit(fn, compiler_options=options).lower(snap, data, xs).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  out = {"argument_bytes": int(mem.argument_size_in_bytes),
         "output_bytes": int(mem.output_size_in_bytes),
         "temp_bytes": int(mem.temp_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
         "flops": float(cost.get("flops", float("nan"))), "compile_seconds": seconds}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                       - out["alias_bytes"])
  return out


def held_entries(params, kappa) -> int:
  """Entries of the trainable tree a gathered client holds: n = ceil(kappa r) whole
  components (``V`` columns, ``U`` rows at full width) per factorised layer, the rest whole."""
  import jax
  import numpy as np

  from jaxfl.models import factor_layers
  from jaxfl.models._factorised import get_path, keep_count

  total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  for path in factor_layers(params):
    layer = get_path(params, path)
    r, c_out = layer["U"].shape
    k = int(np.size(layer["V"])) // r
    total -= (r - keep_count(kappa, r)) * (k + c_out)
  return total


def run_model(name: str, kappas, all_masked: bool) -> list[dict]:
  import jax
  import numpy as np

  import jaxfl

  A = jaxfl.algorithms
  cfg = MODELS[name]
  common = dict(client_lr=cfg["lr"], weight_decay=cfg["wd"], rounds=200, batch_size=32,
                local_epochs=cfg["epochs"])
  dense, base = build_model(cfg, False), build_model(cfg, True)
  dense_params = jax.eval_shape(dense.init, jax.random.key(0))[0]
  fac_params = jax.eval_shape(base.init, jax.random.key(0))[0]
  n_dense = sum(int(np.size(x)) for x in jax.tree.leaves(dense_params))
  rows = []

  def add(arm, kappa, res, params_fraction, held):
    row = {"model": name, "arm": arm, "kappa": kappa, "params_fraction": params_fraction,
           "held_fraction": held, **res}
    rows.append(row)
    print(f"{name:9s} {arm:9s} kappa={kappa!s:5s} temp {res['temp_bytes'] / MiB:8.2f} MiB "
          f"peak {res['peak_bytes'] / MiB:8.2f} MiB flops {res['flops'] / 1e9:8.3f} G "
          f"({res['compile_seconds']:.0f} s compile)", flush=True)

  add("fedavg", None, measure(A.prism_fedavg(**common), dense, cfg), 1.0, 1.0)
  for i, k in enumerate(kappas):
    algo = A.prism(k, **common)
    frac = A.submodel_fraction(fac_params, k, 0.4)["of_dense"]
    full_held = sum(int(np.size(x)) for x in jax.tree.leaves(fac_params)) / n_dense
    if all_masked or cfg["kind"] == "cnn" or i == 0:
      add("masked", k, measure(algo, base, cfg), frac, full_held)
    if k >= 1.0:  # n = r in every layer: sliced and gathered run the masked program
      continue
    sliced = A.prism_client_update(base, algo.local, cfg["examples"], k, gather_state=False)
    add("sliced", k, measure(algo, base, cfg, sliced), frac, full_held)
    update = A.prism_client_update(base, algo.local, cfg["examples"], k)
    add("gathered", k, measure(algo, base, cfg, update), frac,
        held_entries(fac_params, k) / n_dense)
  return rows


def report(rows) -> str:
  by_model = {}
  for r in rows:
    by_model.setdefault(r["model"], []).append(r)
  lines = ["# PriSM: what one client holds (issue 15, item 7)", "",
           "One client's per-slot stage (view + local update + upload), compiled with jaxfl's "
           "CPU XLA options and never run; XLA's `memory_analysis()` and `cost_analysis()`. "
           "Peak = arguments + outputs + temporaries (nothing aliased). Ratios are to FedAvg on "
           "the dense model with the same client recipe. *trains*: the sub-model's entries over "
           "the dense model's (`submodel_fraction`, with the 40% output-row cut); *holds*: the "
           "trainable tree the client's program carries (masked / sliced: the whole factorised "
           "model; gathered: n whole components per layer). FLOPs: the compiled stage with the "
           "local-step loop body counted once (about one step's forward + backward + update). "
           "The masked program is the same at every kappa (ResNet-18: compiled once); at "
           "kappa = 1 sliced and gathered are the masked program (n = r) and are not listed. "
           "Arguments (server params with count leaves, the client's examples) and outputs (the "
           "full-size upload) are the simulation's; `temp` is what training adds.",
           ""]
  cols = ["arm", "kappa", "trains", "holds", "GFLOP", "FLOPs / full", "temp MiB", "peak MiB",
          "peak / full", "temp / full"]
  for model, rs in by_model.items():
    full = next(r for r in rs if r["arm"] == "fedavg")
    cells = []
    for r in rs:
      cells.append([r["arm"], "-" if r["kappa"] is None else f"{r['kappa']:.1f}",
                    f"{r['params_fraction']:.3f}", f"{r['held_fraction']:.3f}",
                    f"{r['flops'] / 1e9:.3f}", f"{r['flops'] / full['flops']:.2f}",
                    f"{r['temp_bytes'] / MiB:.1f}", f"{r['peak_bytes'] / MiB:.1f}",
                    f"{r['peak_bytes'] / full['peak_bytes']:.2f}",
                    f"{r['temp_bytes'] / full['temp_bytes']:.2f}"])
    cfg = MODELS[model]
    what = (f"CNN {'/'.join(map(str, cfg['features']))}" if cfg["kind"] == "cnn"
            else "ResNet-18")
    lines += [f"## {model}: {what}, input {cfg['shape']}, {cfg['examples']} examples, batch 32, "
              f"{cfg['epochs']:g} local epoch(s)", "", md_table(cols, cells), ""]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
  p.add_argument("--kappas", nargs="+", type=float, default=list(KAPPAS))
  p.add_argument("--all-masked", action="store_true",
                 help="compile the masked program at every kappa for ResNet-18 too")
  p.add_argument("--out-dir", default=RESULTS)
  p.add_argument("--stem", default="prism_memory")
  args = p.parse_args(argv)
  import jax

  import jaxfl

  jax.config.update("jax_platforms", "cpu")
  command = command_line(__file__, argv)
  rows = []
  t0 = time.perf_counter()
  for name in args.models:
    rows += run_model(name, args.kappas, args.all_masked)
    data = {"rows": rows, "jax": jax.__version__, "jaxfl": jaxfl.__version__,
            "seconds": time.perf_counter() - t0}
    write_results(args.out_dir, args.stem, command=command, data=data, md=report(rows))
  print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
  assert all(math.isfinite(r["peak_bytes"]) for r in rows)


if __name__ == "__main__":
  main()
