"""PriSM's sliced (gathered) sub-model computation against the masked full-size one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxfl
from jaxfl.client import make_client_update
from jaxfl.data import device_data
from jaxfl.models import FactorisedConv, gather_components, merge_factors
from jaxfl.views import ServerSnapshot, SlotInfo

A = jaxfl.algorithms
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def _data(seed, num_clients=3, hw=8):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(6, 12, num_clients)
  m = int(sizes.sum())
  ds = jaxfl.data.ArrayDataset(
      "img", rng.normal(size=(m, hw, hw, 2)).astype(np.float32),
      rng.integers(0, 3, m).astype(np.int32), rng.normal(size=(16, hw, hw, 2)).astype(np.float32),
      rng.integers(0, 3, 16).astype(np.int32), 3)
  parts = np.split(rng.permutation(m), np.cumsum(sizes)[:-1])
  return jaxfl.data.from_client_indices(ds, parts, "img")


def _base():
  # conv2/conv3 factorised: r = 10 and 8 (conv2: C_in 4 -> K = 36, C_out 10)
  return jaxfl.models.prism_cnn((8, 8, 2), 3, features=(4, 10, 8))


def test_factorised_layers_compute_with_fewer_components(x64):
  """A gathered layer (n < r components) computes the sum of those components exactly."""
  rng = np.random.default_rng(0)
  v, u = rng.normal(size=(3, 3, 5, 7)), rng.normal(size=(7, 6))
  x = rng.normal(size=(2, 6, 6, 5))
  idx, w = jnp.asarray([1, 4, 6]), jnp.asarray([1.0, 1.0, 0.0])
  vs, us = gather_components(jnp.asarray(v), jnp.asarray(u), idx, w)
  assert vs.shape == (3, 3, 5, 3) and us.shape == (3, 6)
  keep = np.zeros(7)
  keep[[1, 4]] = 1.0
  kernel = merge_factors(jnp.asarray(v * keep), jnp.asarray(u))
  layer = FactorisedConv(6, use_bias=False)
  ref = jaxfl.models.conv2d(jnp.asarray(x), kernel, (1, 1), "SAME", "lax")
  np.testing.assert_allclose(layer.apply({"params": {"V": vs, "U": us}}, x), ref, rtol=1e-12,
                             atol=1e-12)
  with pytest.raises(ValueError, match="components"):
    layer.apply({"params": {"V": jnp.zeros((3, 3, 5, 8)), "U": jnp.zeros((8, 6))}}, x)


def _local_updates(kappa, dtype, rep_select, submodel_clip, seed):
  """Masked, sliced-model and gathered-state local updates of the same clients."""
  data = _data(seed)
  base = _base()
  algo = A.prism(kappa, sampling="uniform", rep_select=rep_select, submodel_clip=submodel_clip,
                 rounds=5, weight_decay=1e-2, batch_size=4, local_steps=3, client_lr=0.1)
  params, ms = jax.jit(base.init)(jax.random.key(seed))
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  opt = jax.jit(optax.with_extra_args_support(algo.server_optimizer).init)(params)
  snap = ServerSnapshot(params, ms, opt, jnp.zeros([], jnp.int32))
  dd = device_data(data)
  x = dd.x.astype(dtype)
  n = data.max_client_size
  updates = {"masked": make_client_update(base, algo.local, n),
             "sliced": A.prism_client_update(base, algo.local, n, kappa, gather_state=False),
             "gathered": A.prism_client_update(base, algo.local, n, kappa)}
  # unoptimised XLA: these tests compare programs, and compile time dominates them
  updates = {k: jax.jit(f, compiler_options=FAST_COMPILE) for k, f in updates.items()}
  outs = []
  view = jax.jit(algo.view.apply)
  for cid in range(data.num_clients):
    st = view(snap, SlotInfo(jnp.int32(cid), jnp.int32(0),
                                        jax.random.key(seed * 10 + cid)), None)
    args = (st.params, ms, x, dd.y, dd.client_indices[cid], dd.client_sizes[cid],
            jax.random.key(cid), st.train_mask, {"round": snap.round, **(st.context or {})})
    outs.append((st, {k: f(*args) for k, f in updates.items()}))
  return outs


def test_sliced_local_update_equals_the_masked_one():
  """float32, heterogeneous capacities (clients below the largest level pad with zero-weight
  components), random output rows, the reference's clip: the delta (every leaf), loss and
  gradient norm of the sliced forward pass and of the gathered-state update equal the masked
  full-size update; out-of-mask entries stay exactly 0 in the delta."""
  kappa = np.array([0.2, 0.6, 0.3])
  for st, out in _local_updates(kappa, jnp.float32, "random", False, seed=1):
    ref = out["masked"]
    for name in ("sliced", "gathered"):
      got = out[name]
      scale = max(float(jnp.max(jnp.abs(d))) for d in jax.tree.leaves(ref.delta))
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6 * scale),
                   got.delta, ref.delta)
      for m in ("loss", "grad_norm"):
        np.testing.assert_allclose(got.metrics[m], ref.metrics[m], rtol=2e-5)
      for d, mask in zip(jax.tree.leaves(got.delta), jax.tree.leaves(st.train_mask)):
        off = np.broadcast_to(np.asarray(mask), d.shape) == 0
        np.testing.assert_array_equal(np.asarray(d)[off], 0.0)
    assert any(np.any(np.asarray(d) != 0) for d in jax.tree.leaves(out["gathered"].delta))


def test_sliced_local_update_equals_the_masked_one_in_float64(x64):
  """float64, one capacity: agreement to ~1e-10 (3 SGD steps through batch-statistics BN of
  a few examples amplify the float64 rounding of the different summation orders)."""
  for _, out in _local_updates(0.3, jnp.float64, "first", True, seed=2):
    ref = out["masked"]
    assert jax.tree.leaves(ref.delta)[0].dtype == jnp.float64
    for name in ("sliced", "gathered"):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13),
                   out[name].delta, ref.delta)
      np.testing.assert_allclose(out[name].metrics["loss"], ref.metrics["loss"], rtol=1e-12)


def test_a_mask_larger_than_the_sliced_size_is_quarantined():
  """A sliced update built for a smaller kappa than the view's gives NaN (the round then
  quarantines the client); without the view's train mask it refuses to trace."""
  data = _data(3)
  base = _base()
  algo = A.prism(0.6, rounds=2, batch_size=4, local_steps=2)
  params, ms = jax.jit(base.init)(jax.random.key(0))
  snap = ServerSnapshot(params, ms, jax.jit(algo.server_optimizer.init)(params),
                        jnp.zeros([], jnp.int32))
  st = jax.jit(algo.view.apply)(snap, SlotInfo(jnp.int32(0), jnp.int32(0), jax.random.key(0)),
                                None)
  dd = device_data(data)
  update = functools.partial(A.prism_client_update, base, algo.local, data.max_client_size, 0.2)
  args = (st.params, ms, dd.x, dd.y, dd.client_indices[0], dd.client_sizes[0],
          jax.random.key(1))
  out = jax.jit(update(), compiler_options=FAST_COMPILE)(
      *args, st.train_mask, {"round": snap.round, **st.context})
  assert np.isnan(float(out.metrics["loss"]))
  for gather_state in (True, False):
    with pytest.raises(ValueError, match="update_mask"):
      jax.eval_shape(update(gather_state=gather_state), *args)


def test_rounds_with_the_sliced_forward_pass_equal_masked_rounds():
  """The compiled round with the sliced forward pass (``gather_state=False``, heterogeneous
  capacities) ends where the masked model's does."""
  data = _data(4, num_clients=6)
  kappa = A.draw_capacities(6, seed=0)
  algo = A.prism(kappa, rounds=2, batch_size=4, local_steps=2)
  sliced = algo._replace(client_update=functools.partial(A.prism_client_update, sliced=kappa,
                                                         gather_state=False))
  dd = device_data(data)
  out = []
  for a in (algo, sliced):
    rnd = jaxfl.build_round(a, _base(), num_clients=6, max_client_size=data.max_client_size,
                            clients_per_round=3, donate=False)
    state = rnd.init(jax.random.key(0))
    for r in range(2):
      state, metrics = rnd.step(state, dd, jax.random.key(10 + r))
    out.append((jaxfl.models.merge_params(state.params), metrics))
  (a, ma), (b, mb) = out
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a, b)
  assert float(ma["aggregator/coverage"]) == float(mb["aggregator/coverage"])
  np.testing.assert_allclose(ma["train_loss"], mb["train_loss"], rtol=1e-5)


def test_the_gathered_client_update_plugs_into_the_round_through_algorithm_client_update():
  """``Algorithm.client_update`` installs PriSM's gathered sub-model update in the compiled
  round (one compilation); the rounds end where the masked ones do."""
  data = _data(5, num_clients=6)
  kappa = 0.4
  algo = A.prism(kappa, rounds=2, batch_size=4, local_steps=2)
  gathered = algo._replace(client_update=functools.partial(A.prism_client_update, sliced=kappa))
  dd = device_data(data)
  out = []
  for a in (algo, gathered):
    rnd = jaxfl.build_round(a, _base(), num_clients=6, max_client_size=data.max_client_size,
                            clients_per_round=3, donate=False)
    state = rnd.init(jax.random.key(0))
    for r in range(2):
      state, metrics = rnd.step(state, dd, jax.random.key(20 + r))
    assert rnd.step._cache_size() == 1
    out.append((jaxfl.models.merge_params(state.params), metrics))
  (a, ma), (b, mb) = out
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a, b)
  np.testing.assert_allclose(ma["train_loss"], mb["train_loss"], rtol=1e-5)
  with pytest.raises(TypeError, match="`client_update`"):
    jaxfl.build_round(algo._replace(client_update="gathered"), _base(),
                      num_clients=6, max_client_size=data.max_client_size, clients_per_round=3)
