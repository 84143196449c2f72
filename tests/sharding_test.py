"""Sharded over 2 and 4 forced CPU devices equals 1 device (in a subprocess, since the device
count is fixed when JAX starts)."""

import os
import subprocess
import sys
import textwrap

from conftest import xla_env

SCRIPT = textwrap.dedent("""
    import jax, numpy as np, sys
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_data, tiny_model
    import jaxfl
    assert jax.device_count() == 4, jax.devices()
    data, model = tiny_data(num_clients=9, seed=2), tiny_model()
    algo = jaxfl.algorithms.fedavgm(client_lr=0.1, local_steps=3, batch_size=3, server_lr=0.5)
    out = {}
    for n in (1, 2, 4):
      for cohort in (5, 8):  # 5 does not divide 2 or 4
        res = jaxfl.simulate(algo, model, data, rounds=3, clients_per_round=cohort, seed=0,
                             devices=jax.devices()[:n], progress=False, eval_every=3)
        out[(n, cohort)] = res
    for cohort in (5, 8):
      ref = out[(1, cohort)]
      for n in (2, 4):
        res = out[(n, cohort)]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     ref.state.params, res.state.params)
        assert [h["participants"] for h in res.history] == [float(cohort)] * 3
        np.testing.assert_allclose([h["train_loss"] for h in res.history],
                                   [h["train_loss"] for h in ref.history], rtol=1e-5)
    # the client axis really is split over the devices inside the round
    from jaxfl.data import device_data
    from jaxfl.round import build_round
    mesh = jaxfl.sharding.client_mesh(jax.devices())
    # the aggregate is one all-reduce of partial sums, never an all-gather of client updates
    for chunk, stream in ((None, False), ("auto", True), (1, False)):
      rnd = build_round(algo, model, num_clients=9, max_client_size=data.max_client_size,
                        clients_per_round=5, mesh=mesh, donate=False, clients_per_chunk=chunk,
                        stream_aggregate="auto" if stream else False)
      assert rnd.padded_cohort_size == 8 and rnd.stream_aggregate == stream
      hlo = rnd.step.lower(rnd.init(jax.random.key(0)), device_data(data, mesh),
                           jax.random.key(1)).compile().as_text()
      assert "all-reduce" in hlo, chunk
      assert not any("all-gather" in line and "f32[8," in line
                     for line in hlo.splitlines()), chunk
    # full vmap and one-client-per-device lax.map agree, sharded
    res = [jaxfl.simulate(algo, model, data, rounds=2, clients_per_round=5, seed=0,
                          progress=False, clients_per_chunk=c) for c in (None, "auto", 3)]
    for r in res[1:]:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                   res[0].state.params, r.state.params)
    print("SHARDED_OK")
""")


def test_sharded_equals_single_device():
  env = xla_env(4)
  here = os.path.dirname(__file__)
  proc = subprocess.run([sys.executable, "-c", SCRIPT, here], env=env, capture_output=True,
                        text=True, timeout=900)
  assert "SHARDED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


LAYERWISE_PREAMBLE = textwrap.dedent("""
    import jax, numpy as np, sys
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_data
    import jaxfl
    assert jax.device_count() == 2, jax.devices()
    data = tiny_data(num_clients=9, seed=5)
    model = jaxfl.models.mlp((5,), 3, hidden=(8, 6))
    algos = [jaxfl.algorithms.fedlama(2, local_steps=3, warmup_rounds=0, client_lr=0.1,
                                      batch_size=3),
             jaxfl.algorithms.fedluar(2, local_steps=3, client_lr=0.1, batch_size=3)]
""")

LAYERWISE_SCRIPT = LAYERWISE_PREAMBLE + textwrap.dedent("""
    # per-slot memory through lax.map (one client per device at a time), recycling vmapped
    for algo, chunk in zip(algos, (1, None)):
      res = [jaxfl.simulate(algo, model, data, rounds=6, clients_per_round=5, seed=1,
                            devices=jax.devices()[:n], progress=False, eval_every=6,
                            clients_per_chunk=chunk) for n in (1, 2)]
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                   res[0].state.params, res[1].state.params)
      assert res[0].summary["rel_uplink_cost"] < 1.0
      np.testing.assert_allclose(res[0].summary["rel_uplink_cost"],
                                 res[1].summary["rel_uplink_cost"], rtol=1e-6)
      if algo.memory is not None:  # padded to 6 slots on 2 devices; the real 5 agree
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[:5], b[:5], rtol=1e-5,
                                                             atol=1e-6),
                     res[0].state.memory, res[1].state.memory)
    # FedMut's per-slot mutations: an odd cohort (5) padded to 6 slots over 2 devices, vmapped
    fedmut = jaxfl.algorithms.fedmut(1.0, local_steps=3, client_lr=0.1, batch_size=3)
    res = [jaxfl.simulate(fedmut, model, data, rounds=4, clients_per_round=5, seed=1,
                          devices=jax.devices()[:n], progress=False, eval_every=4,
                          clients_per_chunk=None) for n in (1, 2)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 res[0].state.params, res[1].state.params)
    print("LAYERWISE_SHARDED_OK")
""")

# Its own process: the xdist workers balance two halves better than one 3-minute script.
COMPILES_SCRIPT = LAYERWISE_PREAMBLE + textwrap.dedent("""
    # One compilation per run on 2 devices, client memory or not: the first round's input is
    # laid out as the round returns its state (memory along the clients, the rest replicated).
    from jaxfl.data import device_data
    from jaxfl.round import build_round
    mesh = jaxfl.sharding.client_mesh(jax.devices())
    dd = device_data(data, mesh)
    for algo in algos + [jaxfl.algorithms.fedavgm(client_lr=0.1, local_steps=2, batch_size=3)]:
      rnd = build_round(algo, model, num_clients=9, max_client_size=data.max_client_size,
                        clients_per_round=5, mesh=mesh)
      state = rnd.place(jax.tree.map(np.asarray, rnd.init(jax.random.key(0))))
      for r in range(3):
        state, _ = rnd.step(state, dd, jax.random.key(r))
      assert rnd.step._cache_size() == 1, (algo.name, rnd.step._cache_size())
    # ... and simulate places its state the same way: 3 rounds compile what 1 round does.
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: compiles.append(1) if "backend_compile" in event else None)
    counts = []
    for rounds in (1, 3):
      jaxfl.simulation._BUILT.clear()  # build (and compile) the round anew each time
      del compiles[:]
      jaxfl.simulate(algos[0], model, data, rounds=rounds, clients_per_round=5, seed=1,
                     progress=False, eval_every=0)
      counts.append(len(compiles))
    assert counts[0] == counts[1] and counts[0] > 0, counts
    # traced hyperparameters reach the clients on every device: a client rate passed as a
    # value equals the algorithm built with it, and a new value compiles nothing
    fedavg = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=3)
    runs = {}
    for lr in (0.2, 0.05):
      del compiles[:]
      runs[lr] = jaxfl.simulate(fedavg, model, data, rounds=2, clients_per_round=5, seed=1,
                                progress=False, eval_every=0,
                                hyperparams={"client": {"learning_rate": lr}})
    assert not compiles, len(compiles)
    # one fresh build suffices on 2 devices (tests/hyperparams_test.py checks both values on 1)
    ref = jaxfl.simulate(jaxfl.algorithms.fedavg(client_lr=0.05, local_steps=2, batch_size=3),
                         model, data, rounds=2, clients_per_round=5, seed=1, progress=False,
                         eval_every=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 runs[0.05].state.params, ref.state.params)
    assert not np.allclose(jax.tree.leaves(runs[0.2].state.params)[0],
                           jax.tree.leaves(ref.state.params)[0])
    print("TWO_DEVICE_COMPILES_OK")
""")


def _run_two_devices(script, marker):
  env = xla_env(2)
  here = os.path.dirname(__file__)
  proc = subprocess.run([sys.executable, "-c", script, here], env=env, capture_output=True,
                        text=True, timeout=900)
  assert marker in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_layerwise_algorithms_sharded_equal_single_device():
  """FedLAMA's stateful cohort, FedLUAR's recycling and FedMut's per-slot starts on 2 devices
  equal 1 device."""
  _run_two_devices(LAYERWISE_SCRIPT, "LAYERWISE_SHARDED_OK")


def test_one_compilation_per_run_and_traced_hyperparams_on_two_devices():
  """Client memory or not, a 2-device run compiles once; a traced client rate reaches every
  device and a new value compiles nothing."""
  _run_two_devices(COMPILES_SCRIPT, "TWO_DEVICE_COMPILES_OK")


CPU_DEVICES_SCRIPT = textwrap.dedent("""
    import jax, jaxfl
    assert jaxfl.set_cpu_devices(3) == 3
    assert jax.device_count() == 3, jax.devices()
    try:
      jaxfl.set_cpu_devices(2)
    except RuntimeError as e:
      assert "before any JAX computation" in str(e), e
    else:
      raise AssertionError("no error after JAX started")
    try:
      jaxfl.set_cpu_devices(0)
    except ValueError as e:
      assert "`n`" in str(e)
    print("CPU_DEVICES_OK")
""")


def test_set_cpu_devices_before_jax_starts_and_clear_error_after():
  env = xla_env()  # no device count: the script chooses it
  proc = subprocess.run([sys.executable, "-c", CPU_DEVICES_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300)
  assert "CPU_DEVICES_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


PSUM_PACKED_SCRIPT = textwrap.dedent("""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    import jaxfl
    mesh = jaxfl.sharding.client_mesh(jax.devices()[:2])
    rng = np.random.default_rng(0)
    # per-device values of a mixed-dtype tree, stacked along the client axis
    tree = {"w": rng.normal(size=(2, 3, 5)).astype(np.float32),
            "b": rng.normal(size=(2, 7)).astype(np.float32),
            "s": rng.normal(size=(2,)).astype(np.float32),
            "n": rng.integers(-9, 9, size=(2, 4)).astype(np.int32),
            "lone": rng.normal(size=(2, 2)).astype(np.float64 if jax.config.x64_enabled
                                                    else np.float16)}
    def run(fn):
      body = lambda t: fn(jax.tree.map(lambda a: a[0], t), "clients")
      f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("clients"), out_specs=P()))
      return f(tree), f.lower(tree).compile().as_text()
    packed, hlo = run(jaxfl.sharding.psum_packed)
    ref, _ = run(jax.lax.psum)
    for k in tree:  # the same element-wise sums, bit for bit, shapes and dtypes kept
      assert packed[k].dtype == tree[k].dtype and packed[k].shape == tree[k].shape[1:], k
      np.testing.assert_array_equal(np.asarray(packed[k]), np.asarray(ref[k]))
      np.testing.assert_array_equal(np.asarray(packed[k]), tree[k][0] + tree[k][1])
    # one all-reduce operand per dtype (XLA:CPU synchronises the devices once per operand)
    operands = 0
    for line in hlo.splitlines():
      if re.search(r"\\ball-reduce(-start)?\\(", line):
        out_type = line.split("=", 1)[1].split("all-reduce", 1)[0]
        operands += max(1, out_type.count("["))
    assert operands == 3, hlo
    print("PSUM_PACKED_OK")
""")


def test_psum_packed_equals_psum_with_one_all_reduce_operand_per_dtype():
  env = xla_env(2)
  proc = subprocess.run([sys.executable, "-c", PSUM_PACKED_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300)
  assert "PSUM_PACKED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
