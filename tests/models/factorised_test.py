"""SVD-factorised layers, batch-statistics BatchNorm and the PriSM models (float64 references)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfl
from jaxfl.models import (
  BatchStatNorm,
  Conv,
  FactorisedConv,
  FactorisedDense,
  conv2d,
  eligible_conv,
  factor_layers,
  factorise_kernel,
  factorise_params,
  merge_factors,
  merge_params,
  refactorise,
)


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("cin,cout,k,stride", [(4, 6, 3, 1), (8, 5, 3, 2), (2, 20, 3, 1),
                                               (5, 7, 1, 1)])
@pytest.mark.parametrize("impl", ["xla", "patches", "lax"])
def test_factorised_conv_reproduces_the_dense_conv_in_float64(x64, cin, cout, k, stride, impl):
  """kappa = 1: conv(x, V) @ U equals conv(x, W) for W's SVD factors, to float64 rounding;
  r = min(C_out, C_in k^2) (k^2 C_in < C_out in the third case)."""
  rng = np.random.default_rng(cin * 10 + cout)
  w = rng.normal(size=(k, k, cin, cout))
  x = rng.normal(size=(3, 9, 8, cin))
  v, u, s = factorise_kernel(jnp.asarray(w))
  r = min(cout, k * k * cin)
  assert v.shape == (k, k, cin, r) and u.shape == (r, cout) and s.shape == (r,)
  assert v.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(s), np.linalg.svd(w.reshape(-1, cout),
                                                          compute_uv=False)[:r], rtol=1e-12)
  np.testing.assert_allclose(merge_factors(v, u), w, rtol=1e-12, atol=1e-12)
  dense = Conv(cout, (k, k), (stride, stride), use_bias=True, impl=impl)
  fact = FactorisedConv(cout, (k, k), (stride, stride), use_bias=True, impl=impl)
  bias = rng.normal(size=(cout,))
  y_dense = dense.apply({"params": {"kernel": w, "bias": bias}}, x)
  y_fact = fact.apply({"params": {"V": v, "U": u, "bias": bias}}, x)
  np.testing.assert_allclose(y_fact, y_dense, rtol=1e-11, atol=1e-11)
  # the reference: a plain NumPy im2col of the SVD product
  ref = np.asarray(conv2d(jnp.asarray(x), jnp.asarray(w), (stride, stride), "SAME", "lax"))
  np.testing.assert_allclose(y_fact, ref + bias, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("din,dout", [(7, 3), (3, 7), (6, 6)])
def test_factorised_dense_reproduces_the_dense_layer_in_float64(x64, din, dout):
  rng = np.random.default_rng(din + 10 * dout)
  w, b, x = rng.normal(size=(din, dout)), rng.normal(size=(dout,)), rng.normal(size=(5, din))
  v, u, _ = factorise_kernel(jnp.asarray(w))
  assert v.shape == (din, min(din, dout)) and u.shape == (min(din, dout), dout)
  y = FactorisedDense(dout).apply({"params": {"V": v, "U": u, "bias": b}}, x)
  np.testing.assert_allclose(y, x @ w + b, rtol=1e-12, atol=1e-12)


def test_refactorise_keeps_the_product_and_orthogonalises():
  """Re-SVD of arbitrary (trained) factors: same V U, columns of V and rows of U orthogonal
  with squared norms sigma, sigma descending and equal to the component norms."""
  rng = np.random.default_rng(0)
  v = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
  u = jnp.asarray(rng.normal(size=(6, 6)), jnp.float32)
  v2, u2, s = jax.jit(refactorise)(v, u)
  np.testing.assert_allclose(merge_factors(v2, u2), merge_factors(v, u), rtol=2e-5, atol=2e-5)
  vf = np.asarray(v2, np.float64).reshape(-1, 6)
  np.testing.assert_allclose(vf.T @ vf, np.diag(s), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(u2) @ np.asarray(u2).T, np.diag(s), rtol=1e-4,
                             atol=1e-4)
  assert np.all(np.diff(np.asarray(s)) <= 0)
  np.testing.assert_allclose(jaxfl.models.component_norms(v2, u2), s, rtol=1e-4)


def test_eligible_convs_follow_the_reference_rule():
  assert eligible_conv((3, 3, 32, 64))
  assert not eligible_conv((3, 3, 3, 64))  # image input
  assert not eligible_conv((5, 5, 1, 32))  # grey image input
  assert not eligible_conv((1, 1, 64, 128))  # 1x1 shortcut
  assert not eligible_conv((64, 10))  # dense


def test_factorise_params_gives_the_factorised_twin_and_merges_back():
  dense = jaxfl.models.prism_cnn((12, 12, 1), 4, features=(4, 8, 8), factorise=False)
  fact = jaxfl.models.prism_cnn((12, 12, 1), 4, features=(4, 8, 8))
  pd, _ = dense.init(jax.random.key(0))
  pf = factorise_params(pd, ["conv2", ("conv3",)])
  ref, _ = fact.init(jax.random.key(0))
  assert jax.tree.structure(pf) == jax.tree.structure(ref)
  assert factor_layers(pf) == [("conv2",), ("conv3",)]
  x = jax.random.normal(jax.random.key(1), (5, 12, 12, 1))
  np.testing.assert_allclose(fact.apply(pf, {}, x, train=False)[0],
                             dense.apply(pd, {}, x, train=False)[0], rtol=1e-4, atol=1e-4)
  back = merge_params(pf)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), back, pd)
  with pytest.raises(ValueError, match="kernel"):
    factorise_params(pd, ["bn1"])


def test_factorised_init_is_the_svd_of_a_dense_init():
  p = FactorisedConv(6, (3, 3)).init(jax.random.key(0), jnp.zeros((1, 5, 5, 4)))["params"]
  s = jaxfl.models.component_norms(p["V"], p["U"])
  w = np.asarray(merge_factors(p["V"], p["U"]), np.float64).reshape(-1, 6)
  np.testing.assert_allclose(s, np.linalg.svd(w, compute_uv=False), rtol=1e-4)


def test_batch_stat_norm_uses_batch_statistics_in_train_and_eval(x64):
  rng = np.random.default_rng(1)
  x = rng.normal(2.0, 3.0, size=(4, 5, 5, 3))
  g, b = rng.normal(size=3), rng.normal(size=3)
  y = BatchStatNorm().apply({"params": {"scale": g, "bias": b}}, x)
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * g + b, rtol=1e-10)
  model = jaxfl.models.prism_cnn((8, 8, 1), 3, features=(4, 8))
  params, state = model.init(jax.random.key(0))
  assert state == {}  # no running statistics to average


def test_width_baselines():
  """static: channels past ceil(kappa C) carry nothing (their conv kernel columns get zero
  gradients); dropout: random channel dropout in training only."""
  x = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
  y = jnp.arange(6) % 3
  model = jaxfl.models.prism_cnn((8, 8, 1), 3, features=(4, 10), factorise=False,
                                 width_keep=0.2)
  params, _ = model.init(jax.random.key(0))

  def loss(p):
    logits, _ = model.apply(p, {}, x, train=True)
    return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(6), y])

  g = jax.grad(loss)(params)["conv2"]["kernel"]
  assert np.all(np.asarray(g[..., 2:]) == 0) and np.any(np.asarray(g[..., :2]) != 0)
  drop = jaxfl.models.prism_cnn((8, 8, 1), 3, features=(4, 10), factorise=False,
                                width_keep=0.5, width_mode="dropout")
  a = drop.apply(params, {}, x, train=True, rng=jax.random.key(2))[0]
  b = drop.apply(params, {}, x, train=True, rng=jax.random.key(3))[0]
  e1, e2 = (drop.apply(params, {}, x, train=False)[0] for _ in range(2))
  assert not np.allclose(a, b) and np.array_equal(e1, e2)
  with pytest.raises(ValueError, match="width_keep"):
    jaxfl.models.prism_cnn(width_keep=0.0)


def test_prism_resnet18_layout():
  model = jaxfl.models.prism_resnet18((8, 8, 3), 10, widths=(4, 8), blocks=1)
  params, state = model.init(jax.random.key(0))
  assert state == {}
  assert factor_layers(params) == [("stage1_block1", "conv1"), ("stage1_block1", "conv2"),
                                   ("stage2_block1", "conv1"), ("stage2_block1", "conv2")]
  assert "kernel" in params["stem"] and "kernel" in params["stage2_block1"]["short"]
  logits, _ = model.apply(params, state, jnp.ones((2, 8, 8, 3)), train=True)
  assert logits.shape == (2, 10)
  full = jaxfl.models.prism_resnet18()
  shapes = jax.eval_shape(full.init, jax.random.key(0))[0]
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert 11_000_000 < n < 13_500_000  # ResNet-18 + factor U's
