"""Layer-wise SAM against a float64 NumPy loop, against optax's SAM, and inside a client."""

import logging
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_data, tiny_model, xla_env

import jaxfl
from jaxfl.client import LocalTraining, make_client_update, softmax_cross_entropy
from jaxfl.transforms import layer_ids, layerwise_sam

LAYERS = {"a": ("kernel", "bias"), "b": ("kernel",), "c": ("kernel", "bias")}
SHAPES = {"kernel": (3, 4), "bias": (4,)}


def _problem(seed):
  """Params and the coefficients of a loss that couples every layer:
  ``f(w) = sum c cos(w) + (sum a w)^2 / 2``."""
  rng = np.random.default_rng(seed)
  def tree(scale):
    return {m: {n: rng.normal(size=SHAPES[n]) * scale for n in names}
            for m, names in LAYERS.items()}
  # distinct layer scales so the top-k choice is not a near tie
  params = tree(1.0)
  c = {m: {n: rng.normal(size=SHAPES[n]) * s for n in names}
       for (m, names), s in zip(LAYERS.items(), (0.3, 3.0, 1.0))}
  a = tree(0.2)
  return params, c, a


def _grad_np(w, c, a):
  s = sum(np.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(w)))
  return jax.tree.map(lambda wi, ci, ai: -ci * np.sin(wi) + s * ai, w, c, a)


def _grad_jax(c, a):
  def f(w):
    cos = sum(jnp.sum(ci * jnp.cos(wi)) for wi, ci in zip(jax.tree.leaves(w), jax.tree.leaves(c)))
    s = sum(jnp.sum(ai * wi) for wi, ai in zip(jax.tree.leaves(w), jax.tree.leaves(a)))
    return cos + 0.5 * s ** 2
  return jax.grad(f)


def _reference(params, c, a, *, rho, k, every, perturbed, steps, lr=0.1, momentum=0.9,
               fixed=None):
  """Plain float64 loop: per-module norms, top-k (or the ``fixed`` set of module names),
  ascent, SGD with heavy-ball momentum."""
  w = {m: dict(d) for m, d in params.items()}
  mom = jax.tree.map(np.zeros_like, w)
  selected = fixed
  for t in range(steps):
    g = _grad_np(w, c, a)
    sq = {m: sum(np.sum(g[m][n] ** 2) for n in g[m]) for m in g}
    if fixed is None and t % every == 0:
      selected = set(sorted(sq, key=lambda m: -sq[m])[:k])
    norm = np.sqrt(sum(sq[m] for m in selected))
    w_adv = {m: {n: w[m][n] + (rho * g[m][n] / norm if m in selected else 0.0) for n in w[m]}
             for m in w}
    g_adv = _grad_np(w_adv, c, a)
    g2 = {m: {n: g_adv[m][n] if (perturbed == "all" or m in selected) else g[m][n]
              for n in w[m]} for m in w}
    mom = jax.tree.map(lambda m_, x: momentum * m_ + x, mom, g2)
    w = jax.tree.map(lambda wi, mi: wi - lr * mi, w, mom)
  return w, selected


def _run(tx, params, c, a, steps):
  grad = _grad_jax(c, a)
  chex.clear_trace_counter()
  p = jax.tree.map(jnp.float32, params)
  state = tx.init(p)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, state):
    u, state = tx.update(grad(p), state, p, grad_fn=lambda q, _: grad(q))
    return optax.apply_updates(p, u), state

  for _ in range(steps):
    p, state = step(p, state)
  return p, state


@pytest.mark.parametrize("perturbed", ["all", "selected"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_loop(perturbed, seed):
  params, c, a = _problem(seed + 100 * (perturbed == "all"))
  kw = dict(rho=0.2, every=2, perturbed=perturbed, steps=5)
  want, want_sel = _reference(params, c, a, k=2, **kw)
  tx = layerwise_sam(optax.sgd(0.1, momentum=0.9), rho=0.2, num_layers=2, reselect_every=2,
                     perturbed=perturbed)
  got, state = _run(tx, params, c, a, 5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), got, want)
  _, names = layer_ids(params)
  assert {names[i] for i in np.flatnonzero(np.asarray(state.selected))} == {
      f"['{m}']" for m in want_sel}
  # the selection is a real choice here: perturbing every layer gives another result
  sam, _ = _reference(params, c, a, k=3, **kw)
  assert max(np.max(np.abs(x - y)) for x, y in zip(jax.tree.leaves(sam),
                                                   jax.tree.leaves(want))) > 1e-3


def test_all_layers_is_optax_sam():
  params, c, a = _problem(7)
  base = optax.sgd(0.05, momentum=0.9)
  ours, _ = _run(layerwise_sam(base, rho=0.1, num_layers=None), params, c, a, 4)
  sam = optax.contrib.sam(base, optax.chain(optax.contrib.normalize(), optax.sgd(0.1)),
                          sync_period=2, opaque_mode=True)
  theirs, _ = _run(sam, params, c, a, 4)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), ours,
               theirs)


def test_fixed_selection_and_rho_zero():
  params, c, a = _problem(3)
  base = optax.sgd(0.1, momentum=0.9)
  fixed, state = _run(layerwise_sam(base, rho=0.2, select=["['c']"], perturbed="selected"),
                      params, c, a, 4)
  np.testing.assert_array_equal(state.selected, [0.0, 0.0, 1.0])
  # the reference with a fixed set: 'c' perturbed, every step (k is ignored)
  want, _ = _reference(params, c, a, rho=0.2, k=None, every=None, perturbed="selected",
                       steps=4, fixed={"c"})
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), fixed, want)
  plain, _ = _run(layerwise_sam(base, rho=0.0, num_layers=2), params, c, a, 4)
  sgd, _ = _run(optax.with_extra_args_support(base), params, c, a, 4)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), plain, sgd)


def test_leaf_layers_and_label_trees():
  params, _, _ = _problem(0)
  ids, names = layer_ids(params, "leaf")
  assert len(names) == 5 and ids == list(range(5))
  labels = {"a": {"kernel": "x", "bias": "y"}, "b": {"kernel": "x"},
            "c": {"kernel": "y", "bias": "y"}}
  ids, names = layer_ids(params, labels)
  # leaves in order a.bias, a.kernel, b.kernel, c.bias, c.kernel; names by first appearance
  assert names == ["y", "x"] and ids == [0, 1, 1, 0, 0]
  with pytest.raises(ValueError, match="`layers`"):
    layer_ids(params, {"a": 1})


def _cnn_step_flops(tx, model, params, ms, x, y, pass_grad_fn=True):
  def loss(p, xb, yb):
    logits, _ = model.apply(p, ms, xb, train=True)
    return softmax_cross_entropy(logits, yb, jnp.ones(yb.shape))

  grad = jax.grad(loss)

  def step(p, s, xb, yb):
    extra = {"grad_fn": lambda q, _: grad(q, xb, yb)} if pass_grad_fn else {}
    u, s = tx.update(grad(p, xb, yb), s, p, **extra)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  compiled = jax.jit(step).lower(params, state, x, y).compile()
  return float(compiled.cost_analysis()["flops"])


def test_output_side_selection_costs_less_than_sam():
  """With a fixed output-side set and ``perturbed="selected"`` XLA drops the unused part of
  the second pass; adaptive selection and SAM pay for all of it."""
  model = jaxfl.models.cnn((14, 14, 1), 10, dense=128, conv_impl="lax")
  params, ms = model.init(jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 14, 14, 1)), jnp.float32)
  y = jnp.asarray(np.arange(64) % 10, jnp.int32)
  order = jaxfl.algorithms.depth_order(model, params)
  base = optax.sgd(0.1, momentum=0.9)
  flops = {
      "sgd": _cnn_step_flops(optax.with_extra_args_support(base), model, params, ms, x, y,
                             pass_grad_fn=False),
      "sam": _cnn_step_flops(layerwise_sam(base, num_layers=None), model, params, ms, x, y),
      "adaptive": _cnn_step_flops(layerwise_sam(base, num_layers=1), model, params, ms, x, y),
      "output": _cnn_step_flops(layerwise_sam(base, select=order[-2:], perturbed="selected"),
                                model, params, ms, x, y),
  }
  assert flops["sam"] > 1.8 * flops["sgd"]
  assert flops["adaptive"] > 1.8 * flops["sgd"]
  assert flops["output"] < 1.25 * flops["sgd"], flops


def test_in_client_matches_hand_written_local_sgd():
  """Three full-batch local steps of layer-wise SAM inside ``make_client_update`` equal the
  same steps written out with ``model.apply`` (no vmap, no engine)."""
  data, model = tiny_data(num_clients=3, seed=5), tiny_model()
  params, ms = model.init(jax.random.key(1))
  n_max = int(data.client_indices.shape[1])
  tx = layerwise_sam(optax.sgd(0.3), rho=0.5, num_layers=1)
  lt = LocalTraining(tx, batch_size=n_max, local_steps=3, pass_grad_fn=True)
  client = jax.jit(make_client_update(model, lt, n_max))
  i = 1
  out = client(params, ms, data.x, data.y, data.client_indices[i], data.client_sizes[i],
               jax.random.key(2))
  rows = np.asarray(data.client_indices[i][:int(data.client_sizes[i])])
  xb, yb = jnp.asarray(data.x[rows]), jnp.asarray(data.y[rows])

  def loss(p):
    logits, _ = model.apply(p, ms, xb, train=True)
    return softmax_cross_entropy(logits, yb, jnp.ones(yb.shape))

  w = params
  for _ in range(3):
    g = jax.grad(loss)(w)
    norms = {k: float(optax.tree.norm(v)) for k, v in g.items()}
    top = max(norms, key=norms.get)
    adv = {k: jax.tree.map(lambda p, gi: p + 0.5 * gi / norms[top], v, g[k]) if k == top else v
           for k, v in w.items()}
    w = jax.tree.map(lambda p, gi: p - 0.3 * gi, w, jax.grad(loss)(adv))
  want = jax.tree.map(lambda a, b: a - b, params, w)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6), out.delta,
               want)


def test_in_a_round_compiles_once_and_needs_the_flag():
  data, model = tiny_data(num_clients=5, seed=2), tiny_model()
  tx = layerwise_sam(optax.sgd(0.1, momentum=0.9), rho=0.05, num_layers=1)
  algo = jaxfl.Algorithm("lwsam", LocalTraining(tx, batch_size=4, local_steps=3,
                                                pass_grad_fn=True), optax.sgd(1.0))
  compiles = []
  handler = logging.Handler()
  handler.emit = lambda r: compiles.append(r.getMessage()) if (
      "Finished XLA compilation of jit(step)" in r.getMessage()) else None
  logging.getLogger("jax").addHandler(handler)
  try:
    with jax.log_compiles(True):
      res = jaxfl.simulate(algo, model, data, rounds=3, clients_per_round=3, progress=False)
  finally:
    logging.getLogger("jax").removeHandler(handler)
  assert len(compiles) == 1, compiles
  assert jaxfl.tree.all_finite(res.state.params) and res.history[-1]["update_norm"] > 0
  without = algo._replace(local=algo.local._replace(pass_grad_fn=False))
  with pytest.raises(ValueError, match="pass_grad_fn=True"):
    jaxfl.simulate(without, model, data, rounds=1, clients_per_round=3, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rho=-0.1), "`rho`"),
    (dict(num_layers=0), "`num_layers`"),
    (dict(select="random"), "`select`"),
    (dict(select=[]), "`select`"),
    (dict(reselect_every=0), "`reselect_every`"),
    (dict(perturbed="some"), "`perturbed`"),
    (dict(layers="block"), "`layers`"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    layerwise_sam(optax.sgd(0.1), **kwargs)


def test_an_empty_first_leaf_keeps_one_selection_entry_per_layer():
  params = {"a": jnp.zeros((0,)), "b": {"kernel": jnp.ones((2, 3))}}
  state = layerwise_sam(optax.sgd(0.1), layers="leaf").init(params)
  assert state.selected.shape == (2,) and state.selected.dtype == jnp.float32
  grads = {"a": jnp.zeros((0,)), "b": {"kernel": jnp.full((2, 3), 2.0)}}
  _, state = jax.jit(lambda g, s, p: layerwise_sam(optax.sgd(0.1), layers="leaf").update(
      g, s, p, grad_fn=lambda q, i: g))(grads, state, params)
  np.testing.assert_array_equal(state.selected, [0.0, 1.0])  # the non-empty leaf's norm wins


def test_unknown_layer_name_is_refused_at_init():
  params, _, _ = _problem(0)
  with pytest.raises(ValueError, match="`select` names layers"):
    layerwise_sam(optax.sgd(0.1), select=["['z']"]).init(params)
  with pytest.raises(TypeError, match="`optimizer`"):
    layerwise_sam("sgd")


TWO_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np, optax
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_data, tiny_model
    import jaxfl
    from jaxfl.client import LocalTraining
    assert jax.device_count() == 2, jax.devices()
    data, model = tiny_data(num_clients=6, seed=3), tiny_model()
    # the adaptive selection (a lax.cond) in every layout; the fixed one sharded by chunks
    for kw, layouts in ((dict(num_layers=1), ((1, "auto"), (2, "auto"), (2, None))),
                        (dict(select=["['Dense_1']"], perturbed="selected"),
                         ((1, "auto"), (2, "auto")))):
      tx = jaxfl.transforms.layerwise_sam(optax.sgd(0.1, momentum=0.9), rho=0.1, **kw)
      algo = jaxfl.Algorithm("lwsam", LocalTraining(tx, batch_size=4, local_steps=3,
                                                    pass_grad_fn=True), optax.sgd(1.0))
      res = [jaxfl.simulate(algo, model, data, rounds=2, clients_per_round=3, seed=1,
                            progress=False, devices=jax.devices()[:n], clients_per_chunk=c)
             for n, c in layouts]
      for r in res[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     res[0].state.params, r.state.params)
    print("LWSAM_TWO_DEVICES_OK")
""")


def test_in_a_round_on_two_devices_equals_one():
  """The client axis over a 2-device mesh (padded cohort 3 -> 4, chunked and vmapped)."""
  env = xla_env(2)
  tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", TWO_DEVICES, tests_dir], env=env,
                        capture_output=True, text=True, timeout=900)
  assert "LWSAM_TWO_DEVICES_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
