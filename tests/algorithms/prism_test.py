"""PriSM built from the public contracts, against NumPy float64 / plain-loop references."""

import itertools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import count_step_compiles, xla_env

import jaxfl
from jaxfl.client import make_client_update
from jaxfl.data import device_data
from jaxfl.models import factor_layers, merge_factors
from jaxfl.transforms import frobenius_decay, prism_server, sample_components
from jaxfl.views import ServerSnapshot, SlotInfo

f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)


def _data(num_clients=6, seed=0, hw=8):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(6, 12, num_clients)
  m = int(sizes.sum())
  ds = jaxfl.data.ArrayDataset(
      "img", rng.normal(size=(m, hw, hw, 1)).astype(np.float32),
      rng.integers(0, 3, m).astype(np.int32), rng.normal(size=(16, hw, hw, 1)).astype(np.float32),
      rng.integers(0, 3, 16).astype(np.int32), 3)
  parts = np.split(rng.permutation(m), np.cumsum(sizes)[:-1])
  return jaxfl.data.from_client_indices(ds, parts, "img")


def _model():
  return jaxfl.models.prism_cnn((8, 8, 1), 3, features=(4, 8, 8))


# ----------------------------------------------------------------------------- sampling


def _inclusion(p, n):
  """Exact P(j drawn) for n draws without replacement in successive-sampling order."""
  pi = np.zeros(len(p))
  for seq in itertools.permutations(range(len(p)), n):
    prob, left = 1.0, 1.0
    for j in seq:
      prob *= p[j] / left
      left -= p[j]
    for j in seq:
      pi[j] += prob
  return pi


@pytest.mark.parametrize("mode,gamma", [("power", 3.0), ("power", 1.0), ("softmax", 0.0),
                                        ("uniform", 0.0), ("top", 0.0)])
def test_sampling_frequencies_per_mode(mode, gamma):
  sigma = jnp.asarray([2.0, 1.5, 1.2, 1.0, 0.6, 0.3])
  n, draws = 3, 20000
  keys = jax.random.split(jax.random.key(7), draws)
  masks = np.asarray(jax.jit(jax.vmap(
      lambda k: sample_components(k, sigma, n, mode, gamma)))(keys))
  assert np.all(masks.sum(axis=1) == n)  # exactly n, without replacement
  s = np.asarray(sigma, np.float64)
  if mode == "top":
    np.testing.assert_array_equal(masks, np.tile([1, 1, 1, 0, 0, 0], (draws, 1)))
    return
  w = {"power": s ** gamma, "softmax": np.exp(s), "uniform": np.ones_like(s)}[mode]
  pi = _inclusion(w / w.sum(), n)
  tol = 5 * np.sqrt(pi * (1 - pi) / draws)  # 5 binomial standard deviations
  assert np.all(np.abs(masks.mean(axis=0) - pi) <= tol), (masks.mean(axis=0), pi)


def test_traced_n_and_zero_singular_values():
  sigma = jnp.asarray([1.0, 0.0, 2.0, 0.0])
  f = jax.jit(lambda k, n: sample_components(k, sigma, n, "power", 2.0))
  for i, n in enumerate((1, 2)):
    m = np.asarray(f(jax.random.key(i), jnp.int32(n)))
    assert m.sum() == n and m[1] == 0 and m[3] == 0  # sigma = 0 is never drawn while others
  assert np.asarray(f(jax.random.key(3), jnp.int32(3))).sum() == 3  # ... remain


def test_draw_capacities_is_seeded_and_follows_the_ratios():
  a = jaxfl.algorithms.draw_capacities(3000, seed=1)
  np.testing.assert_array_equal(a, jaxfl.algorithms.draw_capacities(3000, seed=1))
  for cap, ratio in ((0.2, 0.5), (0.4, 0.3), (0.6, 0.2)):
    assert abs(np.mean(np.isclose(a, cap)) - ratio) < 5 * np.sqrt(ratio * (1 - ratio) / 3000)
  with pytest.raises(ValueError, match="ratios"):
    jaxfl.algorithms.draw_capacities(10, ratios=(0.5, 0.3, 0.3))


# ----------------------------------------------------------------------------- view & client


def _snapshot(algo, model, seed=0):
  params, ms = model.init(jax.random.key(seed))
  opt = optax.with_extra_args_support(algo.server_optimizer).init(params)
  return ServerSnapshot(params, ms, opt, jnp.zeros([], jnp.int32))


def test_view_hands_out_the_principal_sub_model():
  """Per client kappa_i (a static table): ceil(kappa_i r) components per layer, the first
  ceil(0.4 C_out) output columns of U, masked entries zeroed; the mask is the train and the
  upload mask (the masked mean reads it) and the clipping's gradient mask."""
  kappa = np.array([0.2, 0.4, 0.6, 1.0, 0.5, 0.3], np.float32)
  algo = jaxfl.algorithms.prism(kappa, sampling="uniform")
  model = _model()
  snap = _snapshot(algo, model)
  apply = jax.jit(algo.view.apply)
  for cid in range(6):
    st = apply(snap, SlotInfo(jnp.int32(cid), jnp.int32(0), jax.random.key(cid)), None)
    values = snap.params
    for path in factor_layers(values):
      name = path[0]
      r, c_out = values[name]["U"].shape
      comp = np.asarray(st.train_mask[name]["V"]).reshape(-1)
      assert comp.sum() == np.ceil(kappa[cid] * r - 1e-9)
      rows = np.arange(c_out) < np.ceil(0.4 * c_out)
      np.testing.assert_array_equal(st.train_mask[name]["U"], np.outer(comp, rows))
      np.testing.assert_array_equal(st.params[name]["U"],
                                    np.asarray(values[name]["U"]) * np.outer(comp, rows))
    np.testing.assert_array_equal(st.params["fc"]["kernel"], values["fc"]["kernel"])
    assert float(st.train_mask["fc"]["kernel"]) == 1.0  # trained whole
    for m in (st.upload_mask, st.context["grad_mask"]):
      jax.tree.map(np.testing.assert_array_equal, m, st.train_mask)


@pytest.mark.parametrize("rep_select,submodel_clip", [("first", True), ("random", False)])
def test_out_of_mask_entries_never_move_in_local_training(rep_select, submodel_clip):
  data = _data()
  model = _model()
  algo = jaxfl.algorithms.prism(0.4, rep_select=rep_select, submodel_clip=submodel_clip,
                                rounds=5, weight_decay=1e-2, batch_size=4, local_steps=4)
  snap = _snapshot(algo, model)
  dd = device_data(data)
  update = jax.jit(make_client_update(model, algo.local, data.max_client_size))
  for cid in (0, 3):
    st = algo.view.apply(snap, SlotInfo(jnp.int32(cid), jnp.int32(1), jax.random.key(9 + cid)),
                         None)
    out = update(st.params, snap.model_state, dd.x, dd.y, dd.client_indices[cid],
                 dd.client_sizes[cid], jax.random.key(cid), st.train_mask,
                 {"round": snap.round, **(st.context or {})})
    local = jax.tree.map(jnp.subtract, st.params, out.delta)
    moved = []
    for p0, p1, m in zip(jax.tree.leaves(st.params), jax.tree.leaves(local),
                         jax.tree.leaves(st.train_mask)):
      off = np.broadcast_to(np.asarray(m), p0.shape) == 0
      np.testing.assert_array_equal(np.asarray(p1)[off], np.asarray(p0)[off])  # bit-equal
      moved.append(np.any(np.asarray(p1)[~off] != np.asarray(p0)[~off]))
    assert sum(moved) >= 8  # the sub-model did train
    if rep_select == "random":
      rows = np.asarray(st.train_mask["conv2"]["U"]).max(axis=0)
      assert rows.sum() == np.ceil(0.4 * 8)


def test_frobenius_decay_is_the_gradient_of_half_the_squared_frobenius_norm():
  rng = np.random.default_rng(2)
  params = {"c": {"V": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                  "U": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
                  "bias": jnp.ones(5)}, "w": jnp.ones((2, 2))}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
  lam = 0.3
  out, _ = jax.jit(frobenius_decay(lam).update)(grads, optax.EmptyState(), params)
  ref = jax.grad(lambda vu: 0.5 * lam * jnp.sum(merge_factors(*vu) ** 2))(
      (params["c"]["V"], params["c"]["U"]))
  np.testing.assert_allclose(out["c"]["V"], 0.5 + ref[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["c"]["U"], 0.5 + ref[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["c"]["bias"], grads["c"]["bias"])
  np.testing.assert_array_equal(out["w"], grads["w"])


def test_server_re_svd_keeps_the_product_and_stores_sigma():
  model = _model()
  params, _ = model.init(jax.random.key(0))
  tx = prism_server()
  state = tx.init(params)
  rng = np.random.default_rng(0)
  delta = jax.tree.map(lambda p: jnp.asarray(0.1 * rng.normal(size=p.shape), p.dtype), params)
  upd, new_state = jax.jit(tx.update)(delta, state, params)
  new = optax.apply_updates(params, upd)
  for path in factor_layers(params):
    name = path[0]
    want = merge_factors(params[name]["V"] - delta[name]["V"],
                         params[name]["U"] - delta[name]["U"])
    got = merge_factors(new[name]["V"], new[name]["U"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    w = np.asarray(want, np.float64).reshape(-1, want.shape[-1])
    sig = new_state.sigma[factor_layers(params).index(path)]
    np.testing.assert_allclose(sig, np.linalg.svd(w, compute_uv=False)[:sig.shape[0]],
                               rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["fc"]["kernel"], params["fc"]["kernel"] - delta["fc"]["kernel"],
                             rtol=1e-6)


# ----------------------------------------------------------------------------- the round


def test_round_equals_a_loop_over_clients_with_numpy_aggregation():
  """Two rounds of the compiled round against: every slot's view and local update run one at
  a time, the masked mean and the re-SVD in NumPy float64."""
  data = _data(seed=1)
  model = _model()
  schedule = np.array([[4, 0, 2], [1, 5, 2]])
  kappa = np.array([0.2, 0.4, 0.6, 0.2, 0.4, 0.6], np.float32)
  algo = jaxfl.algorithms.prism(kappa, sampling="power", gamma=2.0, rounds=3, batch_size=4,
                                local_steps=3, weight_decay=1e-3)
  algo = algo._replace(sampler=jaxfl.sampling.fixed_schedule(schedule))
  rnd = jaxfl.build_round(algo, model, num_clients=6, max_client_size=data.max_client_size,
                          clients_per_round=3, donate=False)
  state = rnd.init(jax.random.key(0))
  dd = device_data(data)
  update = jax.jit(make_client_update(model, algo.local, data.max_client_size))
  for r in range(2):
    key = jax.random.key(100 + r)
    k_clients = jax.random.split(key, 5)[2]
    snap = ServerSnapshot(state.params, state.model_state, state.opt_state, state.round)
    g = f64(state.params)
    num = jax.tree.map(np.zeros_like, g)
    cnt = jax.tree.map(np.zeros_like, g)
    for slot, cid in enumerate(schedule[r]):
      sk = jax.random.fold_in(k_clients, slot)
      st = algo.view.apply(snap, SlotInfo(jnp.int32(cid), jnp.int32(slot),
                                          jax.random.fold_in(sk, 2)), None)
      out = update(st.params, state.model_state, dd.x, dd.y, dd.client_indices[cid],
                   dd.client_sizes[cid], jax.random.split(sk)[0], st.train_mask,
                   {"round": state.round, **st.context})
      local = f64(jax.tree.map(jnp.subtract, st.params, out.delta))
      m = jax.tree.map(lambda mm, p: np.broadcast_to(np.asarray(mm, np.float64), p.shape),
                       st.train_mask, g)
      num = jax.tree.map(lambda a, mm, gg, ll: a + mm * (gg - ll), num, m, g, local)
      cnt = jax.tree.map(lambda a, mm: a + mm, cnt, m)
    mean = jax.tree.map(lambda a, c: np.where(c > 0, a / np.where(c > 0, c, 1), 0), num, cnt)
    ref = jax.tree.map(np.subtract, g, mean)
    state, metrics = rnd.step(state, dd, key)
    got = state.params
    layers = factor_layers(ref)
    for i, path in enumerate(layers):
      name = path[0]
      w = ref[name]["V"].reshape(-1, ref[name]["U"].shape[0]) @ ref[name]["U"]
      np.testing.assert_allclose(
          np.asarray(merge_factors(got[name]["V"], got[name]["U"])).reshape(w.shape), w,
          rtol=1e-4, atol=2e-5)
      np.testing.assert_allclose(state.opt_state.sigma[i],
                                 np.linalg.svd(w, compute_uv=False)[:w.shape[1]], rtol=1e-4,
                                 atol=1e-5)
    for name in ("conv1", "bn1", "bn2", "bn3", "fc"):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                   f64(got[name]), ref[name])
    comps = np.concatenate([cnt[p[0]]["V"][0, 0, 0] for p in layers])
    assert float(metrics["aggregator/coverage"]) == pytest.approx(np.mean(comps > 0))
    assert float(metrics["aggregator/component_count_1"]) == pytest.approx(np.mean(comps == 1))
    # uplink: the sub-model's entries
    sub = sum(float(np.sum(c)) for c in jax.tree.leaves(cnt))
    assert float(metrics["uplink_elements"]) == pytest.approx(sub)


def _simulate(algo, rounds, **kw):
  return jaxfl.simulate(algo, _model(), _data(), rounds=rounds, clients_per_round=3, seed=3,
                        progress=False, eval_every=rounds, **kw)


def test_one_compilation_and_exact_resume(tmp_path):
  algo = jaxfl.algorithms.prism(jaxfl.algorithms.draw_capacities(6, seed=0), rounds=4,
                                batch_size=4, local_steps=2)
  with count_step_compiles() as h:
    full = _simulate(algo, 4)
  assert h.n == 1, h.n
  assert all(np.isfinite(x["train_loss"]) for x in full.history)
  assert 0 < full.history[-1]["rel_uplink"] < 0.6
  _simulate(algo, 2, checkpoint_dir=str(tmp_path))
  resumed = _simulate(algo, 4, checkpoint_dir=str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, full.state.params, resumed.state.params)
  jax.tree.map(np.testing.assert_array_equal, full.state.opt_state, resumed.state.opt_state)
  assert [x["train_loss"] for x in full.history] == [x["train_loss"] for x in resumed.history]


def test_presets_refuse_bad_arguments():
  for kw, match in ((dict(kappa=0.0), "kappa"), (dict(kappa=[0.2, 1.5]), "kappa"),
                    (dict(sampling="gumbel"), "sampling"), (dict(rep_keep=0.0), "rep_keep"),
                    (dict(rep_select="last"), "rep_select"), (dict(gamma=-1.0), "gamma"),
                    (dict(clip_norm=0.0), "clip_norm"), (dict(rounds=0), "rounds")):
    with pytest.raises(ValueError, match=match):
      jaxfl.algorithms.prism(**kw)
  with pytest.raises(ValueError, match="client_lr"):
    jaxfl.algorithms.prism_fedavg(client_lr=-1.0)
  algo = jaxfl.algorithms.prism(0.2, sampling="top", gamma=2.5)
  assert algo.config["preset"] == "prism" and algo.config["sampling"] == "top"


def test_submodel_fraction_counts_the_kept_entries():
  params, _ = _model().init(jax.random.key(0))
  frac = jaxfl.algorithms.submodel_fraction(params, 0.25, rep_keep=0.5)
  v = params
  total = sum(np.size(x) for x in jax.tree.leaves(v))
  # conv2: V 36x8, U 8x8 -> n = 2, rows = 4: 36*2 + 2*4; conv3: V 72x8 -> 72*2 + 2*4
  sub = total - (36 * 8 + 64) - (72 * 8 + 64) + (36 * 2 + 8) + (72 * 2 + 8)
  assert frac["of_factorised"] == pytest.approx(sub / total)
  assert frac["of_dense"] == pytest.approx(sub / (total - 64 - 64))


TWO_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    sys.path[:0] = [sys.argv[1], sys.argv[1] + '/..']  # the module and its conftest
    from prism_test import _data, _model
    import jaxfl
    assert jax.device_count() == 2, jax.devices()
    algo = jaxfl.algorithms.prism(jaxfl.algorithms.draw_capacities(6, seed=0), rounds=3,
                                  batch_size=4, local_steps=2)
    merged = jaxfl.models.merge_params
    res = [jaxfl.simulate(algo, _model(), _data(), rounds=3, clients_per_round=3, seed=3,
                          progress=False, eval_every=3, devices=jax.devices()[:n],
                          clients_per_chunk=c)
           for n, c in ((1, "auto"), (2, "auto"))]
    for r in res[1:]:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                   merged(res[0].state.params), merged(r.state.params))
      for a, b in zip(res[0].history, r.history):
        assert a["aggregator/coverage"] == b["aggregator/coverage"]
        np.testing.assert_allclose(a["uplink_elements"], b["uplink_elements"])
    print("PRISM_TWO_DEVICES_OK")
""")


def test_two_devices_equal_one():
  """Padded cohort (3 -> 4 slots), one client per device per step (EmbracingFL's test runs the
  same masked mean with the vmapped cohort)."""
  env = xla_env(2)
  here = os.path.dirname(__file__)
  proc = subprocess.run([sys.executable, "-c", TWO_DEVICES, here], env=env, capture_output=True,
                        text=True, timeout=900)
  assert "PRISM_TWO_DEVICES_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_width_baselines_run_with_the_prism_client_recipe():
  """FedAvg with PriSM's client optimizer on a dense model with channel dropout (FjORD-like);
  the static width's masking is checked in tests/models/factorised_test.py."""
  algo = jaxfl.algorithms.prism_fedavg(rounds=2, batch_size=4, local_steps=2)
  model = jaxfl.models.prism_cnn((8, 8, 1), 3, features=(4, 8, 8), factorise=False,
                                 width_keep=0.25, width_mode="dropout")
  res = jaxfl.simulate(algo, model, _data(), rounds=2, clients_per_round=3, progress=False,
                       eval_every=2)
  assert np.isfinite(res.history[-1]["train_loss"])
  assert res.history[-1]["rel_uplink"] == pytest.approx(1.0)
