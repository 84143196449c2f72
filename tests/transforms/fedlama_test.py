"""FedLAMA: the reassignment rule, the discrepancy, the transform and the stateful-cohort round
against plain Python/NumPy references of ALGORITHMS.md §2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_data

import jaxfl
from jaxfl.client import make_client_update
from jaxfl.data import device_data
from jaxfl.round import build_round
from jaxfl.transforms import fedlama, fedlama_intervals, layer_discrepancy


def reference_intervals(d, d_unit, n, kernel, phi):
  """§2.2 steps 1-4, literally: a Python loop over layers sorted by unit discrepancy."""
  intervals = [1] * len(d)
  total = float(sum(d))
  n_kernel = sum(ni for ni, k in zip(n, kernel) if k)
  acc_d = acc_n = 0.0
  for l in sorted(range(len(d)), key=lambda i: (d_unit[i], i)):
    if not kernel[l]:
      continue
    acc_d += d[l]
    acc_n += n[l]
    intervals[l] = phi
    delta = acc_d / total if total > 0 else 0.0
    if (1.0 - acc_n / n_kernel) < delta:
      break
  return intervals


def _intervals(d, d_unit, n, kernel, phi=2):
  return np.asarray(jax.jit(fedlama_intervals, static_argnums=4)(
      jnp.asarray(d, jnp.float32), jnp.asarray(d_unit, jnp.float32), jnp.asarray(n),
      jnp.asarray(kernel), phi)).tolist()


def test_reassignment_hand_checked_cases():
  n = [10, 10, 10, 10]
  kern = [True, True, True, False]
  # Z = 6.5; after layer 0: delta = .15 < 1 - 1/3; after layer 1: delta = .46 > 1/3 -> stop.
  assert _intervals([1, 2, 3, 0.5], [.1, .2, .3, .05], n, kern) == [2, 2, 1, 1]
  # The least divergent layer already owns most of the discrepancy: it crosses alone.
  assert _intervals([9, 0.1, 0.1, 0], [.01, .02, .03, 0], n, kern) == [2, 1, 1, 1]
  # All discrepancies zero: the curves never cross, so every kernel layer is relaxed.
  assert _intervals([0, 0, 0, 0], [0, 0, 0, 0], n, kern, phi=3) == [3, 3, 3, 1]
  # Ties in unit discrepancy are visited in leaf order: layer 1 before layer 2.
  assert _intervals([1, 1, 1, 0], [.3, .1, .1, 0], [10, 10, 10, 1], kern) == [1, 2, 2, 1]
  # A non-kernel layer with the smallest discrepancy is never relaxed, but counts in Z.
  assert _intervals([1, 1, 1, 100], [.5, .6, .7, 0], n, kern) == [2, 2, 2, 1]
  # Sizes matter: a large least-divergent kernel pushes lambda past the crossing at once.
  assert _intervals([1, 1, 1, 0], [.01, .5, .6, 0], [1000, 10, 10, 1], kern) == [2, 1, 1, 1]


@pytest.mark.parametrize("seed", range(6))
def test_reassignment_matches_python_loop_on_random_inputs(seed):
  rng = np.random.default_rng(seed)
  n_l = int(rng.integers(2, 12))
  n = rng.integers(1, 500, n_l).tolist()
  kern = (rng.random(n_l) < 0.7).tolist()
  kern[0] = True
  d = rng.exponential(size=n_l) * (rng.random(n_l) < 0.9)
  d_unit = d / np.asarray(n)
  d32 = np.float32(d).tolist()
  want = reference_intervals(d32, np.float32(d_unit).tolist(), n, kern, 2)
  assert _intervals(d, d_unit, n, kern) == want


def test_layer_discrepancy_equals_model_space_definition():
  rng = np.random.default_rng(0)
  x = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
  locals_ = [{k: v + rng.normal(size=v.shape) for k, v in x.items()} for _ in range(4)]
  deltas = {k: np.stack([x[k] - lc[k] for lc in locals_]).astype(np.float32) for k in x}
  got = np.asarray(layer_discrepancy(deltas, jnp.ones(4)))
  for i, k in enumerate(sorted(x)):
    u = np.mean([lc[k] for lc in locals_], axis=0)
    want = np.mean([np.sum((u - lc[k]) ** 2) for lc in locals_])
    np.testing.assert_allclose(got[i], want, rtol=1e-5)
  # A zero-weight client does not count.
  w = jnp.array([1.0, 1.0, 1.0, 0.0])
  got3 = np.asarray(layer_discrepancy(jax.tree.map(lambda a: a[:3], deltas), jnp.ones(3)))
  np.testing.assert_allclose(np.asarray(layer_discrepancy(deltas, w)), got3, rtol=1e-5)


class TransformReference:
  """§2.3 for the server side, in float64: intervals, d, d_unit, c, and the applied update."""

  def __init__(self, names, sizes, kernel, tau, phi, warmup):
    self.names, self.sizes, self.kernel = names, sizes, kernel
    self.tau, self.phi, self.warmup = tau, phi, warmup
    self.intervals = [1] * len(names)
    self.d = [0.0] * len(names)
    self.d_unit = [0.0] * len(names)
    self.syncs = [0] * len(names)

  def step(self, r, client_updates):
    out = {}
    for l, k in enumerate(self.names):
      u = np.asarray(client_updates[k], np.float64)
      if (r + 1) % self.intervals[l] == 0:
        mean = u.mean(0)
        big_d = np.mean([np.sum((ui - mean) ** 2) for ui in u])
        self.d[l] = big_d / (self.intervals[l] * self.tau)
        self.d_unit[l] = self.d[l] / self.sizes[l]
        self.syncs[l] += 1
        out[k] = mean
      else:
        out[k] = np.zeros_like(u[0])
    if (r + 1) % self.phi == 0 and r >= self.warmup:
      self.intervals = reference_intervals(self.d, self.d_unit, self.sizes, self.kernel,
                                           self.phi)
    return out


@pytest.mark.parametrize("phi,warmup", [(2, 2), (3, 0)])
def test_transform_matches_reference_over_rounds(phi, warmup):
  rng = np.random.default_rng(phi)
  shapes = {"k1": (6, 5), "b1": (5,), "k2": (5, 4), "k3": (4, 3), "b3": (3,)}
  params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
  names = sorted(shapes)
  sizes = [int(np.prod(shapes[k])) for k in names]
  kernel = [len(shapes[k]) >= 2 for k in names]
  tx = fedlama(3, phi, warmup_rounds=warmup)
  state = tx.init(params)
  step = jax.jit(tx.update)
  ref = TransformReference(names, sizes, kernel, 3, phi, warmup)
  n_relaxed_seen = 0
  for r in range(12):
    # Layer-dependent spreads so that the ordering changes between reassignments.
    scale = {k: rng.uniform(0.1, 2.0) for k in names}
    cu = {k: (rng.normal(size=(4,) + shapes[k]) * scale[k]).astype(np.float32) for k in names}
    mean = {k: jnp.asarray(cu[k].mean(0)) for k in names}
    due_mask = [bool(state.uplink_mask[k]) for k in names]
    assert due_mask == [(r + 1) % i == 0 for i in ref.intervals]
    out, state = step(mean, state, params, client_updates=cu, client_weights=jnp.ones(4))
    want = ref.step(r, cu)
    for k in names:
      np.testing.assert_allclose(out[k], want[k], rtol=1e-5, atol=1e-6, err_msg=f"{r} {k}")
    assert np.asarray(state.intervals).tolist() == ref.intervals, r
    np.testing.assert_allclose(state.discrepancy, ref.d, rtol=1e-4)
    np.testing.assert_allclose(state.unit_discrepancy, ref.d_unit, rtol=1e-4)
    assert np.asarray(state.syncs).tolist() == ref.syncs
    next_due = [(r + 2) % i == 0 for i in ref.intervals]
    assert [bool(state.uplink_mask[k]) for k in names] == next_due
    n_relaxed_seen += sum(i > 1 for i in ref.intervals)
    for l in range(len(names)):
      if not kernel[l]:
        assert ref.intervals[l] == 1
  assert n_relaxed_seen > 0  # the schedule actually relaxed some layers


def test_first_reassignment_ends_round_seven_with_repo_defaults():
  params = {"big": jnp.zeros((64, 64)), "small": jnp.zeros((4, 4))}
  tx = fedlama(10, 2)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  first = None
  for r in range(10):
    cu = {"big": rng.normal(size=(3, 64, 64)).astype(np.float32) * 0.1,
          "small": rng.normal(size=(3, 4, 4)).astype(np.float32)}
    _, state = tx.update(jax.tree.map(lambda a: a.mean(0), cu), state, params,
                         client_updates=cu, client_weights=jnp.ones(3))
    if first is None and np.any(np.asarray(state.intervals) > 1):
      first = r
  assert first == 7
  # The large layer with low per-element discrepancy already crosses (1 - lambda = 0.004):
  # it is relaxed, the small divergent one is not.
  assert np.asarray(state.intervals).tolist() == [2, 1]


def test_bad_arguments_and_missing_client_updates():
  for kw in ({"tau_prime": 0}, {"tau_prime": 2, "phi": 0},
             {"tau_prime": 2, "warmup_rounds": -1}):
    with pytest.raises(ValueError, match=list(kw)[-1]):
      fedlama(**kw)
  tx = fedlama(2)
  p = {"k": jnp.zeros((2, 2))}
  with pytest.raises(ValueError, match="client_updates"):
    tx.update(p, tx.init(p), p)
  with pytest.raises(ValueError, match="kernels"):
    fedlama(2, kernels={"x": True, "y": False}).update(
        p, tx.init(p), p, client_updates={"k": jnp.zeros((1, 2, 2))})


# --- the stateful-cohort round ----------------------------------------------------------------


def _lama_setup(phi=2, warmup=2, cohort=3, num_clients=7, **round_kw):
  data = tiny_data(num_clients=num_clients, dim=5, num_classes=3, seed=phi + 10)
  model = jaxfl.models.mlp((5,), 3, hidden=(8, 6))
  algo = jaxfl.algorithms.fedlama(phi, local_steps=3, warmup_rounds=warmup, client_lr=0.1,
                                  batch_size=3)
  rnd = build_round(algo, model, num_clients=data.num_clients,
                    max_client_size=data.max_client_size, clients_per_round=cohort,
                    donate=False, **round_kw)
  return data, model, algo, rnd


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v, np.float64)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("phi", [2, 3])
def test_round_equals_client_loop_reference_with_persistent_cohort(phi):
  """Python loop over clients with un-vmapped local training and a NumPy server (§2.3)."""
  data, model, algo, rnd = _lama_setup(phi=phi)
  dd = device_data(data)
  state = rnd.init(jax.random.key(0))
  # Un-vmapped, one client at a time (jit only to keep the loop fast).
  client_update = jax.jit(make_client_update(model, algo.local, data.max_client_size))
  names = list(_flat(state.params))
  sizes = [v.size for v in _flat(state.params).values()]
  kernel = [v.ndim >= 2 for v in _flat(state.params).values()]
  ref = TransformReference(names, sizes, kernel, 3, phi, 2)
  x = _flat(state.params)
  local = None
  cohorts, relaxed_rounds = [], 0
  for r in range(9):
    key = jax.random.key(100 + r)
    new, metrics = rnd.step(state, dd, key)
    cohort = np.asarray(new.cohort)
    cohorts.append(cohort.tolist())
    if r % phi == 0:
      local = [dict(x) for _ in cohort]
    _, _, k_clients, _, _ = jax.random.split(key, 5)
    deltas = {k: [] for k in names}
    for slot, cid in enumerate(cohort):
      start = jax.tree.unflatten(jax.tree.structure(state.params),
                                 [jnp.asarray(local[slot][k], jnp.float32) for k in names])
      k_train = jax.random.split(jax.random.fold_in(k_clients, slot))[0]
      out = client_update(start, {}, jnp.asarray(data.x), jnp.asarray(data.y),
                          jnp.asarray(data.client_indices[cid]),
                          jnp.asarray(data.client_sizes[cid]), k_train)
      for k, dv in _flat(out.delta).items():
        local[slot][k] = local[slot][k] - dv
        deltas[k].append(x[k] - local[slot][k])
    due = [(r + 1) % i == 0 for i in ref.intervals]
    agg = ref.step(r, {k: np.stack(deltas[k]) for k in names})
    for l, k in enumerate(names):
      if due[l]:
        x[k] = x[k] - agg[k]
        for lc in local:
          lc[k] = x[k].copy()
    got = _flat(new.params)
    for k in names:
      np.testing.assert_allclose(got[k], x[k], rtol=2e-5, atol=2e-6, err_msg=f"round {r} {k}")
    for slot in range(len(cohort)):
      got_local = {k: np.asarray(v[slot]) for k, v in _flat(new.memory).items()}
      for k in names:
        np.testing.assert_allclose(got_local[k], local[slot][k], rtol=2e-5, atol=2e-6)
    fl = new.opt_state[0]
    assert np.asarray(fl.intervals).tolist() == ref.intervals
    # Ledger: only synchronised layers are uploaded, by every cohort member.
    want_rel = sum(s for s, dl in zip(sizes, due) if dl) / sum(sizes)
    np.testing.assert_allclose(float(metrics["rel_uplink"]), want_rel, rtol=1e-6)
    relaxed_rounds += want_rel < 1.0
    state = new
  for start in range(0, 9, phi):  # one cohort per phi-round period
    assert all(c == cohorts[start] for c in cohorts[start:start + phi])
  assert len({tuple(c) for c in cohorts}) > 1
  assert relaxed_rounds > 0


def test_chunked_and_streamed_persistent_round_equal_vmapped():
  data, _, _, rnd_v = _lama_setup(clients_per_chunk=None, cohort=4)
  _, _, _, rnd_c = _lama_setup(clients_per_chunk=1, cohort=4)
  dd = device_data(data)
  sv = rnd_v.init(jax.random.key(0))
  sc = rnd_c.init(jax.random.key(0))
  for r in range(6):
    sv, _ = rnd_v.step(sv, dd, jax.random.key(r))
    sc, _ = rnd_c.step(sc, dd, jax.random.key(r))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               (sv.params, sv.memory), (sc.params, sc.memory))
  with pytest.raises(ValueError, match="server_inputs"):  # refused at build, before tracing
    _lama_setup(clients_per_chunk=2, stream_aggregate=True)


def test_one_compilation_while_intervals_change():
  data, _, _, rnd = _lama_setup(phi=2, warmup=0)
  dd = device_data(data)
  state = rnd.init(jax.random.key(0))
  seen = set()
  with jax.log_compiles():
    state, _ = rnd.step(state, dd, jax.random.key(0))
    n0 = rnd.step._cache_size()
    for r in range(1, 10):
      state, _ = rnd.step(state, dd, jax.random.key(r))
      seen.add(tuple(np.asarray(state.opt_state[0].intervals).tolist()))
  assert rnd.step._cache_size() == n0 == 1
  assert len(seen) > 1  # the intervals did change, without retracing


def test_nonfinite_client_restarts_from_global_model():
  data, model, algo, rnd = _lama_setup(phi=2, warmup=0, cohort=3, num_clients=3)
  x = data.x.copy()
  x[data.client_indices[1, 0]] = np.inf  # client 1 diverges
  data = data._replace(x=x)
  dd = device_data(data)
  state = rnd.init(jax.random.key(0))
  for r in range(4):
    state, metrics = rnd.step(state, dd, jax.random.key(r))
    assert float(metrics["nonfinite_clients"]) == 1
    assert jaxfl.tree.all_finite(state.params) and jaxfl.tree.all_finite(state.memory)
    slot = int(np.flatnonzero(np.asarray(state.cohort) == 1)[0])
    jax.tree.map(lambda c, g: np.testing.assert_array_equal(c[slot], g), state.memory,
                 state.params)
    kept = sum(not bool(m) for m in jax.tree.leaves(state.opt_state[0].uplink_mask))
    if r == 2 and kept:  # a healthy client keeps its unsynchronised layers
      other = (slot + 1) % 3
      assert any(np.any(np.asarray(c[other]) != np.asarray(g)) for c, g in
                 zip(jax.tree.leaves(state.memory), jax.tree.leaves(state.params)))


def test_simulate_fedlama_checkpoint_resume_is_exact(tmp_path):
  data, model, algo, _ = _lama_setup(phi=2, warmup=0)
  kw = dict(rounds=6, clients_per_round=3, seed=3, progress=False, eval_every=0)
  full = jaxfl.simulate(algo, model, data, **kw)
  jaxfl.simulate(algo, model, data, **{**kw, "rounds": 3}, checkpoint_dir=str(tmp_path),
                 checkpoint_every=3)
  resumed = jaxfl.simulate(algo, model, data, **kw, checkpoint_dir=str(tmp_path),
                           checkpoint_every=3)
  jax.tree.map(np.testing.assert_array_equal, (full.state.params, full.state.memory),
               (resumed.state.params, resumed.state.memory))
  assert full.summary["rel_uplink_cost"] < 1.0


def test_fedavg_state_has_no_memory_and_period_one_resamples():
  algo = jaxfl.algorithms.fedavg(local_steps=1)
  assert algo.memory is None
  with pytest.raises(ValueError, match="period"):
    jaxfl.sampling.periodic(0)
  res = jaxfl.simulate(algo._replace(sampler=jaxfl.sampling.periodic(1)), jaxfl.models.mlp(
      (5,), 3), tiny_data(), rounds=1, clients_per_round=2, progress=False)
  assert res.state.memory is None
