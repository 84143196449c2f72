"""Records (or checks) the golden final states of every algorithm preset.

The golden files pin the engine's numerics: each preset runs a short seeded simulation on the
embedded digits data (4 rounds, cohort 6, 3 local steps of batch 8) on 1 and on 2 CPU devices
and stores the final global parameters and the per-round metrics. They were first recorded
with the engine *before* it was rewritten as stages and contracts (commit 87ff161), and the
rewrite changed no bit. They were re-recorded once, deliberately, when a round without
participants started skipping the server step (issue "Nothing lost, nothing silent"): the
select on the server state moved five presets (fedavgm, fedacg, fedluar, fedluar_uniform,
fedprox_luar) by at most 2.4e-7 relative (an XLA fusion change around the select, not a numeric
one); every other preset stayed bit-identical. prunefl_1dev was re-recorded when the FedOpt
presets' client SGD became ``optax.inject_hyperparams`` (learning rate in the state, so
``simulate(hyperparams=...)`` can change it without recompiling): at most 1.03e-7 relative, an
XLA fusion change of the masked update with a traced instead of a constant rate; 2 devices and
every other preset stayed bit-identical.

Bit-identity holds on the host that recorded the files: XLA:CPU compiles for the host's
instruction set and sizes its kernels by its caches, so another CPU (or another jaxlib) moves
the same computation by an ulp here and there. ``--write`` records the host (CPU model, ISA
flags, jaxlib) in ``host.json``; on that host the check is exact, elsewhere every value must be
within ``CROSS_HOST_RTOL`` (1e-5, two orders above the ~1e-7 seen between an AVX-512 recording
host and an AMD EPYC without AVX-512) and the line says so. The files from before
``host.json`` existed were recorded on an unrecorded host, so they are checked that way.

  python tests/golden/record.py --devices 1 --write   # re-record (only for deliberate changes)
  python tests/golden/record.py --devices 2           # compare, print max differences
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
HOST_FILE = os.path.join(HERE, "host.json")
CROSS_HOST_RTOL = 1e-5
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
             "amx_tile")


def host_signature() -> dict:
  """What XLA:CPU's code for these runs depends on: CPU model, ISA flags and jaxlib."""
  import platform

  import jaxlib

  model, flags = platform.processor(), set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
          break
  except OSError:
    pass
  return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags],
          "jaxlib": jaxlib.__version__}


def presets():
  """name -> (algorithm, build_round kwargs); small settings that exercise every code path."""
  import optax

  import jaxfl
  from jaxfl import aggregation
  from jaxfl.algorithms import layerwise

  kw = dict(client_lr=0.05, local_steps=3, batch_size=8)
  lab = dict(client_lr=0.02, local_steps=3, batch_size=8)
  out = {
      "fedavg": (jaxfl.algorithms.fedavg(**kw), {}),
      "fedavg_nostream": (jaxfl.algorithms.fedavg(**kw), dict(stream_aggregate=False)),
      "fedavg_vmap": (jaxfl.algorithms.fedavg(**kw), dict(clients_per_chunk=None)),
      "fedavg_chunk2": (jaxfl.algorithms.fedavg(**kw), dict(clients_per_chunk=2)),
      "fedavg_dropout": (jaxfl.algorithms.fedavg(**kw), dict(dropout_rate=0.3)),
      "fedavgm": (jaxfl.algorithms.fedavgm(server_momentum=0.9, **kw), {}),
      "fedadam": (jaxfl.algorithms.fedadam(**kw), {}),
      "fedyogi": (jaxfl.algorithms.fedyogi(**kw), {}),
      "fedadagrad": (jaxfl.algorithms.fedadagrad(**kw), {}),
      "fedprox": (jaxfl.algorithms.fedprox(mu=0.1, **kw), {}),
      "fedacg": (layerwise.fedacg(**lab), {}),
      "fedacg_luar": (layerwise.fedacg(num_recycle=2, **lab), {}),
      "fedpaq": (layerwise.fedpaq(8, **lab), {}),
      "feddropoutavg": (layerwise.feddropoutavg(**lab), {}),
      "lbgm": (layerwise.lbgm(0.95, **lab), {}),
      "prunefl": (layerwise.prunefl(0.7, 2, **lab), {}),
      "fedluar": (layerwise.fedluar(2, **lab), {}),
      "fedluar_uniform": (layerwise.fedluar(2, selection="uniform", **lab), {}),
      "fedluar_drop": (layerwise.fedluar(2, recycle=False, **lab), {}),
      "fedopt_luar": (layerwise.fedluar(2, server_lr=0.9, **lab), {}),
      "fedprox_luar": (layerwise.fedluar(2, prox_mu=0.001, **lab), {}),
      "fedluar_fedpaq": (layerwise.fedluar(2, quantize_levels=8, **lab), {}),
      "fedlama": (layerwise.fedlama(2, warmup_rounds=1, **lab), {}),
      "median": (jaxfl.algorithms.fedopt(optax.sgd(1.0), aggregator=aggregation.coordinate_median(),
                                         **kw), {}),
      "trimmed_mean": (jaxfl.algorithms.fedopt(
          optax.sgd(1.0), aggregator=aggregation.trimmed_mean(0.2), **kw), {}),
      "dp_mean": (jaxfl.algorithms.fedopt(
          optax.sgd(1.0), aggregator=aggregation.dp_mean(1.0, 0.1), **kw), {}),
  }
  return out


# The presets whose 2-device round takes a path of its own: client-axis layouts (stream,
# chunks, dropout), per-client memory, upload masks and train masks, keyed uplink transforms,
# the sparse ledger, general (gathering) aggregators. The other presets change only the server
# chain or the loss, which run the same on any mesh; the stacked and fully vmapped layouts and
# FedLAMA's / FedLUAR's 2-device rounds are checked against 1 device by tests/sharding_test.py
# (which the 1-device goldens pin). `record.py --devices 2` checks them all, the test suite these.
TWO_DEVICE_PATHS = ("fedavg", "fedavg_chunk2", "fedavg_dropout", "lbgm", "prunefl", "fedpaq",
                    "feddropoutavg", "median", "dp_mean")


def run(name, devices):
  import jax
  import numpy as np

  import jaxfl
  from jaxfl import sharding as jshard

  algo, kw = presets()[name]
  data = jaxfl.data.load("digits", num_clients=20, partition=jaxfl.data.dirichlet(0.5), seed=0)
  model = jaxfl.models.mlp(data.example_shape, data.num_classes, hidden=(32,))
  devs = jax.devices()[:devices]
  mesh = jshard.client_mesh(devs) if devices > 1 else None
  rnd = jaxfl.build_round(algo, model, num_clients=data.num_clients,
                          max_client_size=data.max_client_size, clients_per_round=6, mesh=mesh,
                          report_grad_norm=True, **kw)
  dd = jaxfl.data.device_data(data, mesh)
  state = rnd.init(jax.random.fold_in(jax.random.key(0), 0))
  state = jshard.put_replicated(jax.tree.map(np.asarray, state), mesh)
  metrics = []
  for r in range(4):
    state, m = rnd.step(state, dd, jax.random.fold_in(jax.random.key(1), r))
    metrics.append({k: np.asarray(v) for k, v in jax.device_get(m).items()})
  flat = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}
  keys = ["train_loss", "grad_norm", "participants", "uplink_elements", "update_norm"]
  for k in keys:
    flat["metric/" + k] = np.array([float(m[k]) for m in metrics], np.float32)
  return flat


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--devices", type=int, default=1)
  ap.add_argument("--write", action="store_true")
  ap.add_argument("--only", nargs="*")
  args = ap.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  import json

  import numpy as np
  here = host_signature()
  if args.write:
    with open(HOST_FILE, "w") as f:
      json.dump(here, f, indent=1)
  recorded = None
  if os.path.exists(HOST_FILE):
    with open(HOST_FILE) as f:
      recorded = json.load(f)
  tol = 0.0 if recorded == here else CROSS_HOST_RTOL
  bad = 0
  for name in args.only or presets():
    got = run(name, args.devices)
    path = os.path.join(HERE, f"{name}_{args.devices}dev.npz")
    if args.write:
      np.savez(path, **got)
      print("wrote", path)
      continue
    ref = np.load(path)
    diffs = {k: float(np.max(np.abs(ref[k].astype(np.float64) - got[k])) /
                      max(float(np.max(np.abs(ref[k]))), 1e-30)) for k in ref.files}
    worst = max(diffs.values())
    bad += worst > tol
    if worst == 0:
      print(f"{name:18s} identical")
    elif worst <= tol:
      print(f"{name:18s} close: max rel diff {worst:.2e} <= {tol:g} (recorded on another host "
            f"{recorded or '(unrecorded)'}; this one {here})")
    else:
      print(f"{name:18s} max rel diff {worst:.2e}")
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  main()
