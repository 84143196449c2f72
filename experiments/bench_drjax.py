"""jaxfl's mapped client stage against the same round written with DrJAX primitives.

DrJAX (``pip install drjax``; Rush et al., "DrJAX: Scalable and Differentiable MapReduce
Primitives in JAX", 2024) expresses a round as ``broadcast`` the server model to a
``clients`` placement, ``map_fn`` the local update over it, ``reduce_mean`` the deltas. Here
both rounds run the *same* jaxfl client update (``jaxfl.make_client_update``, same model, data,
keys; the conv lowered for batched clients inside DrJAX's map, jaxfl's best vmapped
lowering), so only the mapping and the reduction differ. Timed interleaved in one process,
medians; the final params of both are compared.

  python experiments/bench_drjax.py --cohort 10 100 --devices 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from _common import command_line, interleaved_times, timed, write_json


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cohort", type=int, nargs="+", default=[10, 100])
  p.add_argument("--devices", type=int, default=2)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--json", default=None)
  args = p.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  import drjax
  import jax
  import jax.numpy as jnp

  import jaxfl
  from jaxfl.data import device_data

  data = jaxfl.data.load("digits", num_clients=100, partition=jaxfl.data.dirichlet(0.5))
  model = jaxfl.models.small_cnn(data.example_shape, data.num_classes)
  algo = jaxfl.algorithms.fedavg(client_lr=0.05, local_steps=5, batch_size=32,
                                 weighting="uniform")
  client_update = jaxfl.make_client_update(model, algo.local, data.max_client_size)
  mesh = jaxfl.sharding.client_mesh(jax.devices()) if args.devices > 1 else None
  dd = device_data(data, mesh)
  rows = []
  for cohort in args.cohort:
    rnd = jaxfl.build_round(algo, model, num_clients=data.num_clients,
                            max_client_size=data.max_client_size, clients_per_round=cohort,
                            mesh=mesh, donate=False)
    state = rnd.init(jax.random.key(0))

    @drjax.program(placements={"clients": cohort})
    def drjax_round(params, ids, keys, d):
      placed = drjax.broadcast(params)

      def local(p, cid, k):
        return client_update(p, {}, d.x, d.y, d.client_indices[cid], d.client_sizes[cid],
                             k).delta

      deltas = drjax.map_fn(local, (placed, ids, keys))
      return jax.tree.map(jnp.subtract, params, drjax.reduce_mean(deltas))

    def drjax_step(params, d, key):
      # the same cohort and per-client keys as jaxfl's round (uniform sampler, fold_in)
      k_sample, _, k_clients, _, _ = jax.random.split(key, 5)
      ids = jax.random.choice(k_sample, data.num_clients, (cohort,), replace=False)
      keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(k_clients, i))[0])(
          jnp.arange(cohort))
      with jaxfl.models.batched_clients():
        return drjax_round(params, ids.astype(jnp.int32), keys, d)

    drjax_jit = jax.jit(drjax_step)

    def run_drjax(params, key):
      if mesh is None:
        return drjax_jit(params, dd, key)
      with jax.set_mesh(mesh):  # DrJAX shards the placement over "clients"
        return drjax_jit(params, dd, key)

    _, jaxfl_compile = timed(lambda: rnd.step(state, dd, jax.random.key(0)))
    _, drjax_compile = timed(lambda: run_drjax(state.params, jax.random.key(0)))
    keys = [jax.random.key(r + 1) for r in range(args.rounds)]
    # alternating order: drjax first in even rounds, jaxfl first in odd ones
    times = interleaved_times({"drjax": lambda r: run_drjax(state.params, keys[r]),
                               "jaxfl": lambda r: rnd.step(state, dd, keys[r])[0].params},
                              args.rounds, rotate=True)
    same_key = jax.random.key(99)
    a = rnd.step(state, dd, same_key)[0].params
    b = run_drjax(state.params, same_key)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                              jax.tree.leaves(b)))
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"cohort": cohort, "devices": args.devices, "jaxfl_s_per_round": med["jaxfl"],
           "drjax_s_per_round": med["drjax"], "drjax_over_jaxfl": med["drjax"] / med["jaxfl"],
           "jaxfl_compile_s": jaxfl_compile, "drjax_compile_s": drjax_compile,
           "max_abs_param_diff": diff, "jaxfl_clients_per_chunk": rnd.clients_per_chunk,
           "jaxfl_stream": rnd.stream_aggregate}
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.json:
    write_json(args.json, {"command": command_line(__file__), "jax": jax.__version__,
                           "drjax": getattr(drjax, "__version__", "0.2.1"), "rows": rows})


if __name__ == "__main__":
  main()
