"""One battery over every public transform: jit, extra args, state type stability, dtype
preservation, one compilation over several steps, and inject_hyperparams equivalence.
(Each transform's own test file checks it against a NumPy reference of its paper.)"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfl.transforms import _fedlama as fedlama
from jaxfl.transforms import _fedluar as fedluar
from jaxfl.transforms import _lbgm as lbgm
from jaxfl.transforms import _mlbfgs as mlbfgs
from jaxfl.transforms import _prunefl as prunefl
from jaxfl.transforms import compression, fedprox, gem


def _params(dtype=jnp.float32, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4)).astype(dtype)},
          "dense": {"kernel": jax.random.normal(k[1], (4, 3)).astype(dtype),
                    "bias": jax.random.normal(k[2], (3,)).astype(dtype)}}


_MASK = jax.tree.map(lambda x: (jnp.arange(x.size).reshape(x.shape) % 3) == 0, _params())

# name -> (factory, kwargs, static_args for inject_hyperparams, numeric kwarg to inject, bf16 ok)
CASES = {
    "add_proximal_term": (fedprox.add_proximal_term, dict(mu=0.1), (), "mu", True),
    "fedluar": (fedluar.fedluar, dict(num_recycle=1), ("num_recycle", "selection", "recycle",
                                                       "candidates", "aggregate_transform",
                                                       "seed"), "eps", True),
    "fedlama": (fedlama.fedlama, dict(tau_prime=2, phi=2, warmup_rounds=0),
                ("tau_prime", "phi", "warmup_rounds", "kernels"), None, True),
    "lbgm": (lbgm.lbgm, dict(threshold=0.5), (), "threshold", True),
    "prunefl": (prunefl.prunefl, dict(keep=0.5, reconfig_every=2),
                ("keep", "reconfig_every", "kernels"), None, True),
    "gem_mask": (gem.gem_mask, dict(mask=_MASK), ("mask",), None, True),
    "masked_uplink": (gem.masked_uplink, dict(mask=_MASK), ("mask",), None, True),
    "qsgd_quantize": (compression.qsgd_quantize, dict(levels=4), ("levels", "seed"), None, True),
    "random_dropout": (compression.random_dropout, dict(rate=0.5),
                       ("candidates", "seed"), "rate", True),
    "scale_by_mlbfgs": (mlbfgs.scale_by_mlbfgs, dict(update_every=2, history=3),
                        ("block_labels", "update_every", "history", "reference_mode",
                         "state_dtype", "sharding", "normalize"), "damping", False),
    "mlbfgs": (mlbfgs.mlbfgs, dict(learning_rate=0.1, update_every=2, history=3),
               ("block_labels", "update_every", "history", "reference_mode", "state_dtype",
                "sharding", "normalize"), "learning_rate", False),
}


def _extra(params, step):
  return dict(client_updates=jax.tree.map(lambda p: jnp.stack([p, 2 * p]), params),
              client_grad_sums=jax.tree.map(lambda p: jnp.stack([p, -3 * p]), params),
              client_weights=jnp.ones(2), key=jax.random.key(step),
              round=jnp.asarray(step, jnp.int32))


def _run(tx, params, steps=3, jit=True):
  tx = optax.with_extra_args_support(tx)
  init = jax.jit(tx.init) if jit else tx.init
  update = jax.jit(chex.assert_max_traces(tx.update, n=1)) if jit else tx.update
  state = init(params)
  types0 = jax.tree.map(jax.typeof, state)
  outs = []
  for s in range(steps):
    grads = jax.tree.map(lambda p: (0.1 * (s + 1)) * p, params)
    u, state = update(grads, state, params, **_extra(params, s))
    outs.append(u)
    assert jax.tree.map(jax.typeof, state) == types0, "state type changed by update"
  return outs, state


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_stable_state_single_compile(name):
  chex.clear_trace_counter()
  factory, kw, _, _, _ = CASES[name]
  params = _params()
  outs, _ = _run(factory(**kw), params)
  for u in outs:
    chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


@pytest.mark.parametrize("name", sorted(n for n in CASES if CASES[n][4]))
def test_bf16_updates_keep_dtype(name):
  chex.clear_trace_counter()
  factory, kw, _, _, _ = CASES[name]
  params = _params(jnp.bfloat16)
  if "mask" in kw:
    kw = dict(kw, mask=_MASK)
  outs, _ = _run(factory(**kw), params)
  for u in outs:
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))


@pytest.mark.parametrize("name", sorted(n for n in CASES if CASES[n][3]))
def test_inject_hyperparams_gives_same_updates(name):
  chex.clear_trace_counter()
  factory, kw, static, numeric, _ = CASES[name]
  params = _params()
  direct, _ = _run(factory(**kw), params)
  chex.clear_trace_counter()
  injected_tx = optax.inject_hyperparams(factory, static_args=static)(**kw)
  injected, state = _run(injected_tx, params)
  for a, b in zip(direct, injected):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
  assert numeric in state.hyperparams or numeric in kw
