"""Partial model averaging (ALGORITHMS.md §8a): the group partition, the server transform and
the held-cohort round against a float64 NumPy loop over clients."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_data, xla_env

import jaxfl
from jaxfl.client import make_client_update
from jaxfl.data import device_data
from jaxfl.round import build_round
from jaxfl.transforms import partial_averaging, pma_group_mask, pma_group_sizes

MODULES = ["['Dense_0']", "['Dense_1']", "['Dense_2']"]


def _params(seed=0):
  model = jaxfl.models.mlp((5,), 3, hidden=(8, 6))
  return model, model.init(jax.random.key(seed))[0]


def _names(params):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def reference_groups(params, num_groups, order, granularity):
  """{leaf name: int64 group id per entry}: concatenate the leaves in depth order (modules by
  ``order``, leaves of a module in name order) and cut the vector into P pieces."""
  leaves = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(params)}
  module = lambda name: name[:name.rindex("[")]
  rank = {m: i for i, m in enumerate(order)}
  ordered = sorted(leaves, key=lambda n: (rank[module(n)], n))
  total = sum(v.size for v in leaves.values())
  out, start = {}, 0
  for name in ordered:
    n = leaves[name].size
    if granularity == "element":
      ids = np.arange(start, start + n) * num_groups // total
    else:  # the piece that holds the tensor's middle
      ids = np.full(n, min(int((start + n / 2) * num_groups / total), num_groups - 1))
    out[name] = ids.reshape(leaves[name].shape)
    start += n
  return out


@pytest.mark.parametrize("num_groups", [1, 3, 7, 122])
@pytest.mark.parametrize("order", [MODULES, MODULES[::-1]])
def test_element_groups_partition_the_depth_ordered_vector(num_groups, order):
  _, params = _params()
  ref = reference_groups(params, num_groups, order, "element")
  seen = {n: np.zeros(v.shape, int) for n, v in ref.items()}
  masks = jax.jit(lambda p, g: pma_group_mask(p, g, num_groups, order=order))  # g traced
  for g in range(num_groups):
    mask = masks(params, g)
    for name, m in zip(_names(params), jax.tree.leaves(mask)):
      np.testing.assert_array_equal(np.asarray(m), ref[name] == g, err_msg=f"{name} g={g}")
      seen[name] += np.asarray(m)
  assert all(np.all(s == 1) for s in seen.values())  # disjoint and covering
  sizes = pma_group_sizes(params, num_groups, order=order)
  assert sizes.sum() == 123 and sizes.max() - sizes.min() <= 1


def test_leaf_groups_keep_tensors_whole_and_refuse_empty_groups():
  _, params = _params()
  ref = reference_groups(params, 3, MODULES, "leaf")
  masks = [jax.tree.leaves(pma_group_mask(params, g, 3, granularity="leaf")) for g in range(3)]
  for i, name in enumerate(_names(params)):
    got = [bool(np.all(m[i])) for m in masks]
    assert sum(got) == 1 and not any(np.any(m[i]) and not np.all(m[i]) for m in masks)
    assert got.index(True) == int(ref[name].flat[0])
  np.testing.assert_array_equal(pma_group_sizes(params, 3, granularity="leaf"),
                                [sum(ref[n].size for n in ref if ref[n].flat[0] == g)
                                 for g in range(3)])
  with pytest.raises(ValueError, match="groups .* get no leaf"):
    partial_averaging(7, granularity="leaf").init(params)


def test_transform_zeroes_all_but_the_due_group_round_robin():
  _, params = _params()
  tx = partial_averaging(3, order=MODULES[::-1])
  ref = reference_groups(params, 3, MODULES[::-1], "element")
  update = jax.tree.map(lambda p: jnp.ones_like(p), params)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for r in range(7):
    out, state = step(update, state, params)
    for name, o in zip(_names(params), jax.tree.leaves(out)):
      np.testing.assert_array_equal(np.asarray(o), (ref[name] == r % 3).astype(np.float32))
  assert int(state.count) == 7


def test_bad_arguments_name_the_argument():
  _, params = _params()
  for kwargs, match in ((dict(num_groups=0), "num_groups"),
                        (dict(num_groups=2.0), "num_groups"),
                        (dict(num_groups=2, granularity="layer"), "granularity")):
    with pytest.raises(ValueError, match=match):
      partial_averaging(**kwargs)
  with pytest.raises(ValueError, match="order"):
    partial_averaging(2, order=["['Dense_0']"]).init(params)
  with pytest.raises(ValueError, match="exceeds"):
    partial_averaging(500).init(params)
  with pytest.raises(ValueError, match="resample_every"):
    jaxfl.algorithms.pma(3, resample_every=4)
  with pytest.raises(ValueError, match="period"):
    jaxfl.sampling.periodic(-1)


# --- the held-cohort round ------------------------------------------------------------------


def _setup(num_groups=3, cohort=5, num_clients=5, order=None, granularity="element",
           resample_every=None, local_steps=2, **round_kw):
  data = tiny_data(num_clients=num_clients, dim=5, num_classes=3, seed=num_groups + 20)
  model = jaxfl.models.mlp((5,), 3, hidden=(8, 6))
  algo = jaxfl.algorithms.pma(num_groups, local_steps=local_steps, order=order,
                              granularity=granularity, resample_every=resample_every,
                              client_lr=0.2, batch_size=3)
  rnd = build_round(algo, model, num_clients=data.num_clients,
                    max_client_size=data.max_client_size, clients_per_round=cohort,
                    donate=False, **round_kw)
  return data, model, algo, rnd


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v, np.float64)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("order,granularity,cohort,resample", [
    (None, "element", 5, None), (MODULES[::-1], "element", 5, None),
    (None, "leaf", 5, None), (None, "element", 3, 6)])
def test_round_equals_client_loop_reference(order, granularity, cohort, resample):
  """Clients one at a time (un-vmapped), a float64 NumPy server: after round r the mean of the
  local models replaces group r % P everywhere; the other groups stay local."""
  P = 3
  data, model, algo, rnd = _setup(P, cohort=cohort, order=order, granularity=granularity,
                                  resample_every=resample)
  dd = device_data(data)
  state = rnd.init(jax.random.key(0))
  client_update = jax.jit(make_client_update(model, algo.local, data.max_client_size))
  groups = reference_groups(state.params, P, order or MODULES, granularity)
  names = _names(state.params)  # flattening order
  total = sum(g.size for g in groups.values())
  x = _flat(state.params)
  local, cohorts = None, []
  for r in range(8):
    key = jax.random.key(100 + r)
    new, metrics = rnd.step(state, dd, key)
    cohort_ids = np.asarray(new.cohort)
    cohorts.append(cohort_ids.tolist())
    if r == 0 or (resample and r % resample == 0):
      local = [dict(x) for _ in cohort_ids]  # a new cohort starts from the global model
    _, _, k_clients, _, _ = jax.random.split(key, 5)
    for slot, cid in enumerate(cohort_ids):
      start = jax.tree.unflatten(jax.tree.structure(state.params),
                                 [jnp.asarray(local[slot][k], jnp.float32) for k in names])
      k_train = jax.random.split(jax.random.fold_in(k_clients, slot))[0]
      out = client_update(start, {}, jnp.asarray(data.x), jnp.asarray(data.y),
                          jnp.asarray(data.client_indices[cid]),
                          jnp.asarray(data.client_sizes[cid]), k_train)
      for k, dv in _flat(out.delta).items():
        local[slot][k] = local[slot][k] - dv
    for k in names:
      due = groups[k] == r % P
      mean = np.mean([lc[k] for lc in local], axis=0)
      x[k] = np.where(due, mean, x[k])
      for lc in local:
        lc[k] = np.where(due, x[k], lc[k])
    got = _flat(new.params)
    for k in names:
      np.testing.assert_allclose(got[k], x[k], rtol=2e-5, atol=2e-6, err_msg=f"round {r} {k}")
    rows = _flat(new.memory)
    for slot in range(len(cohort_ids)):
      for k in names:
        np.testing.assert_allclose(rows[k][slot], local[slot][k], rtol=2e-5, atol=2e-6)
    sent = sum(int(np.sum(groups[k] == r % P)) for k in names)
    np.testing.assert_allclose(float(metrics["rel_uplink"]), sent / total, rtol=1e-6)
    # Downlink: a cohort's first round receives the whole model, later rounds the group
    # averaged in the round before (float32 entries, one copy per worker).
    got_group = total if r == 0 or (resample and r % resample == 0) else sum(
        int(np.sum(groups[k] == (r - 1) % P)) for k in names)
    assert float(metrics["downlink_bytes"]) == 4.0 * cohort * got_group
    state = new
  if resample:
    assert all(c == cohorts[0] for c in cohorts[:resample])
    assert cohorts[resample] != cohorts[0]
  else:
    assert all(c == cohorts[0] for c in cohorts) and sorted(cohorts[0]) == list(range(5))


def test_one_group_is_fedavg_and_p_rounds_cost_one_fedavg_round():
  """P = 1 is FedAvg (uniform mean, every client); with P groups, P rounds send one model."""
  data, model, algo, _ = _setup(1, local_steps=4)
  kw = dict(rounds=3, clients_per_round=5, seed=2, progress=False, eval_every=0)
  fedavg = jaxfl.algorithms.fedavg(client_lr=0.2, batch_size=3, local_steps=4,
                                   weighting="uniform")._replace(
      sampler=jaxfl.sampling.periodic(None))  # the same client in each slot every round
  a = jaxfl.simulate(algo, model, data, **kw)
  b = jaxfl.simulate(fedavg, model, data, **kw)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7),
               a.state.params, b.state.params)
  _, _, algo4, _ = _setup(4, local_steps=1)
  c = jaxfl.simulate(algo4, model, data, **{**kw, "rounds": 8})
  ups = [h["rel_uplink"] for h in c.history]
  np.testing.assert_allclose(sum(ups[:4]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(sum(ups[4:]), 1.0, rtol=1e-6)
  assert max(ups) < 0.3


def test_local_average_is_the_mean_of_real_rows():
  _, params = _params()
  rows = jax.tree.map(lambda p: jnp.stack([p, 2 * p, 4 * p, 100 * p]), params)
  avg = jaxfl.algorithms.pma_local_average(rows, cohort_size=3)
  jax.tree.map(lambda a, p: np.testing.assert_allclose(a, 7 * np.asarray(p) / 3, rtol=1e-6),
               avg, params)
  with pytest.raises(ValueError, match="cohort_size"):
    jaxfl.algorithms.pma_local_average(rows, cohort_size=5)


def test_full_participation_is_required_without_resampling():
  data, model, algo, _ = _setup(3)
  with pytest.raises(ValueError, match="clients_per_round == num_clients"):
    jaxfl.simulate(algo, model, data, rounds=1, clients_per_round=3, progress=False)


def test_one_compilation_and_exact_checkpoint_resume(tmp_path):
  data, model, algo, rnd = _setup(3)
  dd = device_data(data)
  state = rnd.init(jax.random.key(0))
  for r in range(5):
    state, _ = rnd.step(state, dd, jax.random.key(r))
  assert rnd.step._cache_size() == 1
  kw = dict(rounds=6, clients_per_round=5, seed=3, progress=False, eval_every=0)
  full = jaxfl.simulate(algo, model, data, **kw)
  jaxfl.simulate(algo, model, data, **{**kw, "rounds": 4}, checkpoint_dir=str(tmp_path),
                 checkpoint_every=4)
  resumed = jaxfl.simulate(algo, model, data, **kw, checkpoint_dir=str(tmp_path),
                           checkpoint_every=4)
  jax.tree.map(np.testing.assert_array_equal, (full.state.params, full.state.memory),
               (resumed.state.params, resumed.state.memory))


TWO_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_data
    import jaxfl
    assert jax.device_count() == 2, jax.devices()
    data = tiny_data(num_clients=5, seed=4)
    model = jaxfl.models.mlp((5,), 3, hidden=(8, 6))
    algo = jaxfl.algorithms.pma(3, local_steps=2, client_lr=0.2, batch_size=3)
    res = [jaxfl.simulate(algo, model, data, rounds=4, clients_per_round=5, seed=1,
                          progress=False, devices=jax.devices()[:n], clients_per_chunk=c)
           for n, c in ((1, "auto"), (2, "auto"))]
    for r in res[1:]:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                   res[0].state.params, r.state.params)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                   jaxfl.algorithms.pma_local_average(res[0].state.memory, 5),
                   jaxfl.algorithms.pma_local_average(r.state.memory, 5))
    print("PMA_TWO_DEVICES_OK")
""")


def test_on_two_devices_equals_one():
  """A cohort of 5 padded to 6 over a 2-device mesh: padded slots never count."""
  env = xla_env(2)
  tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", TWO_DEVICES, tests_dir], env=env,
                        capture_output=True, text=True, timeout=900)
  assert "PMA_TWO_DEVICES_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
