"""HeteroFL built from the public contracts, against sliced sub-models and NumPy float64."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_step_compiles
from embracing_test import CNN_ORDER, _cnn
from prism_test import _data  # 6 ragged clients of 8x8 images, 3 classes

import jaxfl
from jaxfl.client import make_client_update
from jaxfl.data import device_data

A = jaxfl.algorithms
f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
FEATURES = (4, 8, 8)  # _cnn()'s channels; the 8x8 input is pooled to 1x1 before fc


def _slices(keep):
  """Hand-written sub-model of the 8x8 CNN: the kept channels of each layer."""
  c = [max(1, int(np.ceil(keep * f - 1e-9))) for f in FEATURES]
  return {"conv1": (1, c[0]), "conv2": (c[0], c[1]), "conv3": (c[1], c[2]), "bn1": c[0],
          "bn2": c[1], "bn3": c[2], "fc": c[2]}


def _cut(params, keep):
  """The sub-model's params, sliced out of the full CNN's (fc's input is 1x1x8, flattened)."""
  s = _slices(keep)
  out = {}
  for name, leaf in params.items():
    if name.startswith("conv"):
      ci, co = s[name]
      out[name] = {"kernel": leaf["kernel"][:, :, :ci, :co]}
    elif name.startswith("bn"):
      out[name] = {k: v[:s[name]] for k, v in leaf.items()}
    else:
      out[name] = {"kernel": leaf["kernel"][:s["fc"]], "bias": leaf["bias"]}
  return out


def _paste(full_like, sub):
  """Sub-model leaves written into zero arrays of the full shapes."""
  def put(z, v):
    z = np.zeros(np.shape(z), np.float64)
    z[tuple(slice(0, n) for n in np.shape(v))] = np.asarray(v, np.float64)
    return z
  return jax.tree.map(put, full_like, sub)


def test_width_mask_keeps_the_first_channels_and_the_model_edges():
  params = _cnn().init(jax.random.key(0))[0]
  m = A.width_mask(params, CNN_ORDER, 0.5)
  ones = jax.tree.map(np.ones_like, params)
  want = _paste(params, _cut(ones, 0.5))
  jax.tree.map(np.testing.assert_array_equal, m, want)
  # the image's channel and the classes are never cut
  assert m["conv1"]["kernel"][..., 0, :2].all() and m["fc"]["bias"].all()
  full = A.width_mask(params, CNN_ORDER, 1.0)
  assert all(np.all(x == 1) for x in jax.tree.leaves(full))


def test_width_mask_of_a_flattened_map_keeps_every_position_of_the_first_channels():
  """A 4x4x6 map flattened into a dense layer: rows ``p * 6 + c`` with ``c < 3`` are kept."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.relu(nn.Conv(6, (3, 3), name="a")(x))
      x = x.reshape((x.shape[0], -1))
      x = nn.relu(nn.Dense(5, name="b")(x))
      return nn.Dense(2, name="c")(x)

  model = jaxfl.models.from_linen(Net(), (4, 4, 1))
  params = model.init(jax.random.key(0))[0]
  order = A.depth_order(model, params)
  m = A.width_mask(params, order, 0.5)
  rows = np.arange(96)
  want = ((rows % 6) < 3)[:, None] & (np.arange(5) < 3)[None, :]
  np.testing.assert_array_equal(m["b"]["kernel"], want.astype(np.float32))
  np.testing.assert_array_equal(m["c"]["kernel"], np.repeat((np.arange(5) < 3)[:, None], 2, 1))


def test_a_sub_model_is_closed_under_the_gradient_in_a_residual_net():
  """A small ResNet-18 (1x1 shortcuts, global pooling) zeroed outside a width-0.5 sub-model:
  the loss gradient is zero outside it (no kept entry reads a dropped channel) and non-zero
  on most kept entries."""
  model = jaxfl.models.prism_resnet18((8, 8, 3), 4, factorise=False, widths=(4, 8, 12),
                                      blocks=1)
  params, state = model.init(jax.random.key(1))
  order = A.depth_order(model, params)
  mask = A.width_mask(params, order, 0.5)
  sub = jax.tree.map(lambda p, m: p * m, params, mask)
  x = jax.random.normal(jax.random.key(2), (16, 8, 8, 3))
  y = jnp.arange(16) % 4

  def loss(p):
    logits = model.apply(p, state, x, train=True, rng=jax.random.key(0))[0]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])

  g = jax.grad(loss)(sub)
  outside = [np.abs(np.asarray(gg)[np.asarray(m) == 0]).max(initial=0.0)
             for gg, m in zip(jax.tree.leaves(g), jax.tree.leaves(mask))]
  assert max(outside) == 0.0
  inside = np.mean(np.concatenate([np.asarray(gg)[np.asarray(m) == 1] != 0
                                   for gg, m in zip(jax.tree.leaves(g), jax.tree.leaves(mask))]))
  assert inside > 0.9, inside
  kept = sum(float(np.sum(m)) for m in jax.tree.leaves(mask))
  assert 0.2 < kept / jaxfl.tree.num_params(params) < 0.4  # ~ a quarter of a conv net


def test_round_equals_a_loop_of_sliced_sub_models_with_numpy_aggregation():
  """Two rounds of the compiled round against: each client's local update run on its
  sub-model as a genuinely narrower CNN (sliced params), pasted back, then the per-entry
  mean over holders and the server step in NumPy float64."""
  data = _data(seed=1)
  model = _cnn()
  keep = np.array([0.25, 0.5, 1.0, 0.5, 0.75, 0.25])
  schedule = np.array([[4, 0, 2], [1, 5, 3]])
  kw = dict(client_lr=0.1, rounds=3, batch_size=4, local_steps=3, weight_decay=1e-3)
  algo = A.heterofl(keep, CNN_ORDER, **kw)
  algo = algo._replace(sampler=jaxfl.sampling.fixed_schedule(schedule))
  rnd = jaxfl.build_round(algo, model, num_clients=6, max_client_size=data.max_client_size,
                          clients_per_round=3, donate=False)
  state = rnd.init(jax.random.key(0))
  dd = device_data(data)
  local = A.prism_fedavg(**kw).local  # the same client recipe, on the narrow model
  for r in range(2):
    key = jax.random.key(100 + r)
    k_clients = jax.random.split(key, 5)[2]
    g = f64(state.params)
    num = jax.tree.map(np.zeros_like, g)
    cnt = jax.tree.map(np.zeros_like, g)
    sent = 0.0
    for slot, cid in enumerate(schedule[r]):
      sk = jax.random.fold_in(k_clients, slot)
      c = [max(1, int(np.ceil(keep[cid] * f - 1e-9))) for f in FEATURES]
      narrow = jaxfl.models.prism_cnn((8, 8, 1), 3, features=tuple(c), factorise=False)
      sub = _cut(state.params, keep[cid])
      ones = jax.tree.map(jnp.ones_like, sub)
      update = make_client_update(narrow, local, data.max_client_size)
      out = update(sub, narrow.init(jax.random.key(0))[1], dd.x, dd.y, dd.client_indices[cid],
                   dd.client_sizes[cid], jax.random.split(sk)[0], ones,
                   {"round": state.round, "grad_mask": ones})
      held = _paste(g, jax.tree.map(np.ones_like, sub))
      num = jax.tree.map(lambda a, d: a + d, num, _paste(g, out.delta))
      cnt = jax.tree.map(lambda a, h: a + h, cnt, held)
      sent += sum(float(np.sum(h)) for h in jax.tree.leaves(held))
    ref = jax.tree.map(lambda gg, a, n: gg - np.where(n > 0, a / np.maximum(n, 1), 0.0),
                       g, num, cnt)
    state, metrics = rnd.step(state, dd, key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                 f64(state.params), ref)
    assert float(metrics["uplink_elements"]) == pytest.approx(sent)


def test_full_width_clients_are_fedavg_with_the_same_recipe():
  data = _data(seed=2)
  kw = dict(client_lr=0.1, rounds=3, batch_size=4, local_steps=3)
  het = jaxfl.simulate(A.heterofl(1.0, CNN_ORDER, **kw), _cnn(), data, rounds=3,
                       clients_per_round=3, seed=4, progress=False, eval_every=3)
  avg = jaxfl.simulate(A.prism_fedavg(**kw), _cnn(), data, rounds=3, clients_per_round=3,
                       seed=4, progress=False, eval_every=3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               het.state.params, avg.state.params)
  assert het.history[-1]["rel_uplink"] == pytest.approx(1.0)


def test_one_compilation_exact_resume_and_the_sub_model_uplink(tmp_path):
  keep = np.array([0.25, 0.5, 1.0, 0.5, 0.75, 0.25])
  algo = A.heterofl(keep, CNN_ORDER, rounds=4, batch_size=4, local_steps=2)
  run = lambda rounds, **kw: jaxfl.simulate(algo, _cnn(), _data(), rounds=rounds,
                                            clients_per_round=3, seed=3, progress=False,
                                            eval_every=rounds, **kw)
  with count_step_compiles() as h:
    full = run(4)
  assert h.n == 1, h.n
  assert all(np.isfinite(x["train_loss"]) for x in full.history)
  assert 0 < full.history[-1]["rel_uplink"] < 1
  run(2, checkpoint_dir=str(tmp_path))
  resumed = run(4, checkpoint_dir=str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, full.state.params, resumed.state.params)
  assert [x["train_loss"] for x in full.history] == [x["train_loss"] for x in resumed.history]


def test_bad_arguments_are_refused_before_any_compile():
  params = _cnn().init(jax.random.key(0))[0]
  for keep in (0.0, 1.5, -0.1, np.array([0.5, 0.0]), np.zeros((2, 2)) + 0.5, "half"):
    with pytest.raises(ValueError, match="keep"):
      A.heterofl(keep, CNN_ORDER)
  with pytest.raises(ValueError, match="keep"):
    A.width_mask(params, CNN_ORDER, np.array([0.5, 0.5]))
  with pytest.raises(ValueError, match="order"):
    A.heterofl(0.5, CNN_ORDER + CNN_ORDER[:1])
  with pytest.raises(ValueError, match="order"):
    A.width_mask(params, CNN_ORDER[:-1], 0.5)
  with pytest.raises(ValueError, match="weighting"):
    A.heterofl(0.5, CNN_ORDER, weighting="size")
  algo = A.heterofl(0.5, CNN_ORDER)
  assert algo.config["preset"] == "heterofl"


def test_fjord_view_draws_a_nested_width_uniformly_up_to_each_clients_cap():
  """Each round a client gets the width mask of one of the levels up to its cap, each about
  equally often; a client capped at the smallest level always gets it."""
  params = _cnn().init(jax.random.key(0))[0]
  levels = (0.25, 0.5, 0.75, 1.0)
  view = A.heterofl_view(np.array([0.5, 1.0, 0.25]), CNN_ORDER, levels=levels)
  want = {lv: A.width_mask(params, CNN_ORDER, lv) for lv in levels}
  server = jaxfl.views.ServerSnapshot(params, None, None, jnp.int32(0))
  apply = jax.jit(lambda cid, key: view.apply(
      server, jaxfl.views.SlotInfo(cid, jnp.int32(0), key), None).upload_mask)
  for cid, allowed in ((0, (0.25, 0.5)), (1, levels), (2, (0.25,))):
    seen = []
    for i in range(200):
      got = apply(jnp.int32(cid), jax.random.key(i))
      match = [lv for lv in levels if all(np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(got), jax.tree.leaves(want[lv])))]
      assert len(match) == 1, (cid, i)
      seen.append(match[0])
    counts = np.array([seen.count(lv) for lv in allowed])
    assert set(seen) == set(allowed)
    # binomial(200, 1/k) per level: within 5 standard deviations of 200/k
    k = len(allowed)
    assert np.all(np.abs(counts - 200 / k) <= 5 * np.sqrt(200 * (1 / k) * (1 - 1 / k)) + 1e-9)


def test_fjord_runs_in_one_compiled_round_and_refuses_a_cap_below_every_level():
  keep = np.array([0.25, 0.5, 1.0, 0.5, 0.75, 0.25])
  algo = A.fjord(keep, CNN_ORDER, levels=(0.25, 0.5, 1.0), rounds=3, batch_size=4,
                 local_steps=2)
  assert algo.config["preset"] == "fjord" and algo.config["levels"] is not None
  res = jaxfl.simulate(algo, _cnn(), _data(), rounds=3, clients_per_round=3, seed=1,
                       progress=False, eval_every=3)
  assert all(np.isfinite(h["train_loss"]) for h in res.history)
  assert 0 < res.history[-1]["rel_uplink"] < 1
  with pytest.raises(ValueError, match="levels"):
    A.fjord(np.array([0.1, 1.0]), CNN_ORDER, levels=(0.2, 1.0))
  with pytest.raises(ValueError, match="levels"):
    A.fjord(0.5, CNN_ORDER, levels=(0.0, 1.0))


def test_width_model_is_the_narrow_network_and_leaves_training_unchanged():
  """``width_model`` evaluates like the genuinely narrower CNN on the sliced params, and a
  HeteroFL run on it (no client wider than its width) trains exactly as on the full model."""
  model = _cnn()
  params, state = model.init(jax.random.key(3))
  x = jax.random.normal(jax.random.key(4), (5, 8, 8, 1))
  narrow = jaxfl.models.prism_cnn((8, 8, 1), 3, features=(2, 4, 4), factorise=False)
  wide = A.width_model(model, CNN_ORDER, 0.5)
  got = wide.apply(params, state, x, train=False, rng=None)[0]
  want = narrow.apply(_cut(params, 0.5), state, x, train=False, rng=None)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  keep = np.array([0.25, 0.5, 0.5, 0.25, 0.5, 0.25])
  algo = A.heterofl(keep, CNN_ORDER, rounds=2, batch_size=4, local_steps=2)
  runs = [jaxfl.simulate(algo, m, _data(), rounds=2, clients_per_round=3, seed=5,
                         progress=False, eval_every=2) for m in (model, wide)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               runs[0].state.params, runs[1].state.params)
