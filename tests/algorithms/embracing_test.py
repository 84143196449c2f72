"""EmbracingFL built from the public contracts, against NumPy float64 / plain-loop references."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import count_step_compiles, xla_env
from prism_test import _data  # 6 ragged clients of 8x8 images, 3 classes

import jaxfl
from jaxfl.client import make_client_update
from jaxfl.data import device_data

A = jaxfl.algorithms
f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
# the small CNN's modules in depth order, written by hand (not by depth_order)
CNN_ORDER = ["['conv1']", "['bn1']", "['conv2']", "['bn2']", "['conv3']", "['bn3']", "['fc']"]


def _cnn():
  return jaxfl.models.prism_cnn((8, 8, 1), 3, features=(4, 8, 8), factorise=False)


class _Scrambled(nn.Module):
  """Three dense layers named so that alphabetical order is the reverse of depth."""

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(5, name="z_in")(x))
    x = jax.jit(lambda h: nn.relu(h))(nn.Dense(4, name="m_mid")(x))
    return nn.Dense(3, name="a_out")(x)


class _Jitted(nn.Module):
  """Two layers inside one jitted function: the order is read inside the call."""

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape((x.shape[0], -1))
    w1 = self.param("w_second", nn.initializers.normal(), (x.shape[-1], 4))
    w0 = self.param("w_first", nn.initializers.normal(), (3, 3))
    return jax.jit(lambda h, a, b: jnp.tanh(h @ a)[:, :3] @ b)(x, w1, w0)


# ----------------------------------------------------------------------------- depth order


def test_depth_order_follows_the_forward_pass_not_the_names():
  m = jaxfl.models.from_linen(_Scrambled(), (2, 3))
  params, _ = m.init(jax.random.key(0))
  assert [n for n in jax.tree.leaves(jaxfl.tree.layer_names(params, "module"))][0] == "['a_out']"
  assert A.depth_order(m, params) == ["['z_in']", "['m_mid']", "['a_out']"]
  cnn = _cnn()
  assert A.depth_order(cnn, cnn.init(jax.random.key(0))[0]) == CNN_ORDER
  j = jaxfl.models.from_linen(_Jitted(), (2, 3))
  assert A.depth_order(j, j.init(jax.random.key(0))[0]) == ["['w_second']", "['w_first']"]


def test_depth_order_of_a_residual_net_with_batchnorm_statistics():
  """ResNet-20 (running BN statistics in model_state, shapes only): stem first, blocks in
  their order, the classifier last."""
  m = jaxfl.models.get_model("resnet20", (28, 28, 1), 10)
  params = jax.eval_shape(m.init, jax.random.key(0))[0]
  order = A.depth_order(m, params)
  assert order[0] == "['Conv_0']" and order[-1] == "['Dense_0']"
  blocks = [int(n.split("_")[2].split("'")[0]) for n in order if "_BasicBlock_" in n]
  assert blocks == sorted(blocks) and set(blocks) == set(range(9))


def test_depth_order_refuses_a_parameter_the_input_never_meets():
  cnn = _cnn()
  params, state = cnn.init(jax.random.key(0))
  bad = jaxfl.models.Model(cnn.init, lambda p, s, x, **kw: cnn.apply(p["net"], s, x, **kw),
                           "bad", cnn.input_shape)
  with pytest.raises(ValueError, match="unused.*never meet the input"):
    A.depth_order(bad, {"net": params, "unused": {"w": jnp.ones(3)}}, state)


def test_suffix_mask_marks_the_output_side_modules():
  params, _ = _cnn().init(jax.random.key(0))
  for trained in range(len(CNN_ORDER) + 1):
    mask = A.suffix_mask(params, CNN_ORDER, trained)
    on = {name for name in CNN_ORDER[len(CNN_ORDER) - trained:]}
    for (path, m) in jax.tree_util.tree_flatten_with_path(mask)[0]:
      assert float(m) == float(jax.tree_util.keystr(path[:1]) in on), (trained, path)
  with pytest.raises(ValueError, match="trained"):
    A.suffix_mask(params, CNN_ORDER, 8)
  with pytest.raises(ValueError, match="order"):
    A.suffix_mask(params, CNN_ORDER[1:], 2)


# ----------------------------------------------------------------------------- memory model


def test_layers_for_budget_picks_the_longest_suffix_that_fits():
  mem = np.array([10.0, 12.0, 30.0, 31.0, 100.0])
  got = A.layers_for_budget(mem, np.array([0.1, 0.15, 0.3, 0.305, 0.31, 0.99, 1.0]))
  np.testing.assert_array_equal(got, [1, 2, 3, 3, 4, 4, 5])
  assert A.layers_for_budget(mem, 0.5).shape == ()
  with pytest.raises(ValueError, match="budget.*output layer"):
    A.layers_for_budget(mem, 0.05)
  with pytest.raises(ValueError, match="suffix_bytes"):
    A.layers_for_budget(np.array([0.0, 1.0]), 0.5)


def test_suffix_training_bytes_grows_with_the_trained_suffix():
  """A longer suffix keeps more gradients, optimizer state and activations; the difference
  between training the first conv block or not is at least its momentum and gradient."""
  cnn = _cnn()
  params, _ = cnn.init(jax.random.key(0))
  mem = A.suffix_training_bytes(cnn, params, CNN_ORDER, optax.sgd(0.1, momentum=0.9), 16)
  assert mem.shape == (len(CNN_ORDER),)
  assert np.all(np.diff(mem) >= 0) and mem[-1] > mem[0]
  conv1 = 4 * np.size(params["conv1"]["kernel"])
  assert mem[-1] - mem[-2] >= 2 * conv1  # the gradient and momentum of conv1 at least
  some = A.suffix_training_bytes(cnn, params, CNN_ORDER, optax.sgd(0.1, momentum=0.9), 16,
                                 lengths=[7, 2])
  np.testing.assert_array_equal(some, mem[[6, 1]])
  with pytest.raises(ValueError, match="lengths"):
    A.suffix_training_bytes(cnn, params, CNN_ORDER, optax.sgd(0.1), 16, lengths=[0])


# ----------------------------------------------------------------------------- the round


def test_round_equals_a_loop_over_clients_with_numpy_aggregation():
  """Two rounds of the compiled round against: every client's local update run alone with
  its hand-built suffix mask, the masked mean and the server step in NumPy float64."""
  data = _data(seed=1)
  model = _cnn()
  trained = np.array([1, 3, 7, 0, 5, 2], np.int32)
  schedule = np.array([[4, 0, 2], [1, 5, 3]])
  algo = A.embracingfl(trained, CNN_ORDER, client_lr=0.1, rounds=3, batch_size=4,
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
    g = f64(state.params)
    num = jax.tree.map(np.zeros_like, g)
    cnt = jax.tree.map(lambda _: 0.0, g)
    sent = 0.0
    for slot, cid in enumerate(schedule[r]):
      sk = jax.random.fold_in(k_clients, slot)
      on = set(CNN_ORDER[len(CNN_ORDER) - trained[cid]:])
      m = jax.tree_util.tree_map_with_path(
          lambda p, _: np.float32(jax.tree_util.keystr(p[:1]) in on), state.params)
      out = update(state.params, state.model_state, dd.x, dd.y, dd.client_indices[cid],
                   dd.client_sizes[cid], jax.random.split(sk)[0], m,
                   {"round": state.round, "grad_mask": m})
      local = f64(jax.tree.map(jnp.subtract, state.params, out.delta))
      # the frozen prefix never moves
      jax.tree.map(lambda mm, a, b: np.testing.assert_array_equal(a, b) if mm == 0 else None,
                   m, local, g)
      num = jax.tree.map(lambda a, mm, gg, ll: a + mm * (gg - ll), num, m, g, local)
      cnt = jax.tree.map(lambda a, mm: a + float(mm), cnt, m)
      sent += sum(float(mm) * np.size(p) for mm, p in zip(jax.tree.leaves(m),
                                                           jax.tree.leaves(g)))
    ref = jax.tree.map(lambda gg, a, c: gg - (a / c if c > 0 else 0.0), g, num, cnt)
    state, metrics = rnd.step(state, dd, key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                 f64(state.params), ref)
    assert float(metrics["uplink_elements"]) == pytest.approx(sent)


def test_all_strong_clients_are_fedavg_with_the_same_recipe():
  """Every client training every module: the round is prism_fedavg's (same client recipe,
  unweighted mean), so the states agree to float rounding after 3 rounds."""
  data = _data(seed=2)
  kw = dict(client_lr=0.1, rounds=3, batch_size=4, local_steps=3)
  emb = jaxfl.simulate(A.embracingfl(len(CNN_ORDER), CNN_ORDER, **kw),
                       _cnn(), data, rounds=3, clients_per_round=3, seed=4,
                       progress=False, eval_every=3)
  avg = jaxfl.simulate(A.prism_fedavg(**kw), _cnn(), data, rounds=3, clients_per_round=3,
                       seed=4, progress=False, eval_every=3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               emb.state.params, avg.state.params)
  assert emb.history[-1]["rel_uplink"] == pytest.approx(1.0)


def test_one_compilation_exact_resume_and_the_suffix_uplink(tmp_path):
  trained = np.array([1, 3, 7, 0, 5, 2], np.int32)
  algo = A.embracingfl(trained, CNN_ORDER, rounds=4, batch_size=4, local_steps=2)
  run = lambda rounds, **kw: jaxfl.simulate(algo, _cnn(), _data(),
                                            rounds=rounds, clients_per_round=3, seed=3,
                                            progress=False, eval_every=rounds, **kw)
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
  for trained, match in ((8, "trained"), (-1, "trained"), (np.array([0.5]), "trained"),
                         (np.zeros(4, np.int32), "at least one client")):
    with pytest.raises(ValueError, match=match):
      A.embracingfl(trained, CNN_ORDER)
  with pytest.raises(ValueError, match="order"):
    A.embracingfl(2, CNN_ORDER + CNN_ORDER[:1])
  with pytest.raises(ValueError, match="weighting"):
    A.embracingfl(2, CNN_ORDER, weighting="size")
  with pytest.raises(ValueError, match="client_lr"):
    A.embracingfl(2, CNN_ORDER, client_lr=0.0)
  algo = A.embracingfl(3, CNN_ORDER)
  assert algo.config["preset"] == "embracingfl" and algo.config["trained"] == 3


TWO_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    sys.path[:0] = [sys.argv[1], sys.argv[1] + '/..']  # the module and its conftest
    from embracing_test import CNN_ORDER, _cnn, _data
    import jaxfl
    assert jax.device_count() == 2, jax.devices()
    A = jaxfl.algorithms
    algo = A.embracingfl(np.array([1, 3, 7, 0, 5, 2], np.int32), CNN_ORDER, rounds=3,
                         batch_size=4, local_steps=2)
    res = [jaxfl.simulate(algo, _cnn(), _data(), rounds=3,
                          clients_per_round=3, seed=3, progress=False, eval_every=3,
                          devices=jax.devices()[:n], clients_per_chunk=c)
           for n, c in ((1, "auto"), (2, None))]
    for r in res[1:]:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                   res[0].state.params, r.state.params)
      for a, b in zip(res[0].history, r.history):
        np.testing.assert_allclose(a["uplink_elements"], b["uplink_elements"])
    print("EMBRACING_TWO_DEVICES_OK")
""")


def test_two_devices_equal_one():
  """Padded cohort (3 -> 4 slots), the vmapped cohort over 2 devices (PriSM's test runs the
  same masked mean one client per device per step)."""
  env = xla_env(2)
  here = os.path.dirname(__file__)
  proc = subprocess.run([sys.executable, "-c", TWO_DEVICES, here], env=env, capture_output=True,
                        text=True, timeout=900)
  assert "EMBRACING_TWO_DEVICES_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
