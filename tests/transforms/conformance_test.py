"""Conformance battery over every public transform, generated from ``jaxfl.transforms.__all__``.

Every factory in ``__all__`` (a function annotated to return an
``optax.GradientTransformation``/``GradientTransformationExtraArgs``) is built with its
defaults, or with the arguments in ``REGISTRY``, and checked for: jit equals no-jit,
``jax.eval_shape`` of ``init`` and ``update``, stable state types (and one compilation) over
three steps, dtype preservation (f32 and bf16), use inside ``optax.chain(tx, optax.sgd(0.1))``,
``optax.inject_hyperparams`` over its float hyperparameters, and a docstring with the math,
Args, Returns and References. A new factory with required arguments and no ``REGISTRY`` entry
fails (naming the entry to add), so nothing is skipped silently. Each transform's own test
file checks it against a NumPy reference of its paper.
"""

import functools
import inspect
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfl import transforms


def _params(dtype=jnp.float32, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"dense": {"kernel": jax.random.normal(k[0], (4, 3)).astype(dtype),
                    "bias": jax.random.normal(k[1], (3,)).astype(dtype)},
          "conv": {"kernel": jax.random.normal(k[2], (3, 3, 2, 4)).astype(dtype)}}


_MASK = jax.tree.map(lambda x: (jnp.arange(x.size).reshape(x.shape) % 3) == 0, _params())


class Case(NamedTuple):
  """How to build and drive one factory.

  Attributes:
    kwargs: required (or test-sized) factory arguments.
    extra: names of the extra ``update`` inputs it needs (keys of :func:`_extra`).
    static_floats: float arguments that ``inject_hyperparams`` must keep static, with why.
    bf16: whether bf16 params/updates are supported (else the reason, as a string).
  """

  kwargs: dict[str, Any] = {}
  extra: tuple[str, ...] = ()
  static_floats: dict[str, str] = {}
  bf16: bool | str = True


_SERVER = ("client_updates", "client_weights", "client_grad_sums", "key", "round")

REGISTRY = {
    "add_proximal_term": Case(dict(mu=0.1)),
    "fedlama": Case(dict(tau_prime=2, phi=2, warmup_rounds=0), extra=_SERVER),
    "fedluar": Case(dict(num_recycle=1), extra=_SERVER),
    "hessian_aware_lr": Case(dict(peak_lr=0.1, warmup_steps=2, min_lr=0.01)),
    "fedluar_bypass": Case(dict(luar=transforms.fedluar(1), inner=optax.sgd(1.0)),
                           extra=_SERVER),
    "gem_mask": Case(dict(mask=_MASK)),
    "layerwise_sam": Case(dict(optimizer=optax.sgd(0.1, momentum=0.9), rho=0.1),
                          extra=("grad_fn",)),
    "lbgm": Case(dict(threshold=0.5)),
    "masked_uplink": Case(dict(mask=_MASK), extra=("key",)),
    "mlbfgs": Case(dict(learning_rate=0.1, update_every=2, history=3),
                   bf16="checked in mlbfgs_test (f32 statistics, bf16 outputs)"),
    "partial_averaging": Case(dict(num_groups=2)),
    "plain_stochastic_lbfgs": Case(dict(learning_rate=0.1, update_every=1, history=3),
                                   bf16="checked in mlbfgs_test (f32 statistics, bf16 outputs)"),
    "prunefl": Case(dict(keep=0.5, reconfig_every=2), extra=_SERVER,
                    static_floats={"keep": "sets the number of kept entries (a static shape)"}),
    "qsgd_quantize": Case(dict(levels=4), extra=("key",)),
    "random_dropout": Case(dict(rate=0.5), extra=("key",)),
    "scaffold_client_control": Case(dict(local_steps=2, client_lr=0.1)),
    "scaffold_correction": Case(extra=("control",)),
    "scaffold_server_control": Case(dict(num_clients=4, local_steps=2, client_lr=0.1),
                                    extra=("client_weights",)),
    "scale_by_round_schedule": Case(dict(schedule=lambda r: 0.5 ** r), extra=("round",)),
    "scale_by_mlbfgs": Case(dict(update_every=2, history=3),
                            bf16="checked in mlbfgs_test (f32 statistics, bf16 outputs)"),
}


def _is_factory(obj) -> bool:
  if not inspect.isfunction(obj):
    return False
  return "GradientTransformation" in str(inspect.signature(obj).return_annotation)


FACTORIES = sorted(n for n in transforms.__all__ if _is_factory(getattr(transforms, n)))


def _case(name) -> Case:
  fn = getattr(transforms, name)
  required = [p.name for p in inspect.signature(fn).parameters.values()
              if p.default is inspect.Parameter.empty
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
  case = REGISTRY.get(name)
  if case is None and required:
    pytest.fail(f"jaxfl.transforms.{name} needs arguments {required}: add a Case for it to "
                f"REGISTRY in {__file__}.")
  return case or Case()


def _build(name):
  case = _case(name)
  tx = getattr(transforms, name)(**case.kwargs)
  assert isinstance(tx, optax.GradientTransformation), (name, type(tx))
  return tx, case


def _extra(names, params, step):
  everything = dict(
      client_updates=jax.tree.map(lambda p: jnp.stack([p, 2 * p]), params),
      client_grad_sums=jax.tree.map(lambda p: jnp.stack([p, -3 * p]), params),
      client_weights=jnp.array([1.0, 2.0]),
      key=jax.random.key(step),
      round=jnp.asarray(step, jnp.int32),
      control=jax.tree.map(lambda p: 0.01 * p, params),
      grad_fn=lambda p, _: jax.tree.map(lambda x: jnp.sin(2 * x) + 0.1 * x, p))
  unknown = set(names) - set(everything)
  assert not unknown, f"REGISTRY asks for unknown extra args {unknown}"
  return {k: everything[k] for k in names}


def _grads(params, step):
  return jax.tree.map(lambda p: ((0.1 * (step + 1)) * jnp.cos(p + step)).astype(p.dtype),
                      params)


def _run(name, tx, case, params, steps=3, jit=True):
  """Runs ``steps`` updates; returns the updates and the states after each."""
  tx = optax.with_extra_args_support(tx)
  # Function-valued extra args (SAM's grad_fn) are closed over, not traced.
  functions = {k: v for k, v in _extra(case.extra, params, 0).items() if callable(v)}

  def tx_update(updates, state, params, **arrays):
    return tx.update(updates, state, params, **functions, **arrays)

  init = jax.jit(tx.init) if jit else tx.init
  update = jax.jit(chex.assert_max_traces(tx_update, n=1)) if jit else tx_update
  state = init(params)
  outs, states = [], [state]
  for s in range(steps):
    arrays = {k: v for k, v in _extra(case.extra, params, s).items() if k not in functions}
    try:
      u, state = update(_grads(params, s), state, params, **arrays)
    except TypeError as err:
      pytest.fail(f"jaxfl.transforms.{name}.update failed ({err}); if it needs extra inputs, "
                  f"add them to its Case in REGISTRY in {__file__}.")
    outs.append(u)
    states.append(state)
  return outs, states


def _comparable(tree):
  """Typed PRNG keys as their key data, so that trees can be compared numerically."""
  def conv(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key_data(x)
    return x
  return jax.tree.map(conv, tree)


def _assert_close(a, b, rtol=1e-5, atol=1e-6):
  a, b = _comparable(a), _comparable(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=rtol, atol=atol)


def _shape_dtype(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


# ------------------------------------------------------------------------------------------
# The public surface.


def test_all_lists_only_transforms_and_their_states():
  assert {"mlbfgs", "scale_by_mlbfgs", "gem_mask", "masked_uplink", "qsgd_quantize",
          "random_dropout", "add_proximal_term", "fedluar", "fedlama", "lbgm", "prunefl",
          "scaffold_correction"} <= set(FACTORIES)
  for name in transforms.__all__:
    obj = getattr(transforms, name)
    if name in FACTORIES:
      continue
    assert (inspect.isclass(obj) and issubclass(obj, tuple) and hasattr(obj, "_fields")
            and name.endswith("State")), (
                f"jaxfl.transforms.__all__ may list transforms and their State NamedTuples "
                f"only; {name!r} is neither (export helpers outside __all__).")


def test_registry_has_no_stale_entries():
  stale = sorted(set(REGISTRY) - set(FACTORIES))
  assert not stale, f"REGISTRY entries {stale} are not public transform factories."


@pytest.mark.parametrize("name", FACTORIES)
def test_docstring_has_math_args_returns_references(name):
  fn = getattr(transforms, name)
  doc = inspect.getdoc(fn) or ""
  missing = [s for s in ("Returns:", "References:") if s not in doc]
  if inspect.signature(fn).parameters and "Args:" not in doc:
    missing.append("Args:")
  if "math:" not in doc:
    missing.append(".. math:: or :math:")
  assert not missing, f"jaxfl.transforms.{name} docstring lacks {missing}."


# ------------------------------------------------------------------------------------------
# The battery.


@pytest.mark.parametrize("name", FACTORIES)
def test_jit_equals_no_jit(name):
  tx, case = _build(name)
  params = _params()
  chex.clear_trace_counter()
  jitted, jit_states = _run(name, tx, case, params, jit=True)
  eager, eager_states = _run(name, tx, case, params, jit=False)
  for a, b in zip(jitted, eager):
    _assert_close(a, b)
  _assert_close(jit_states[-1], eager_states[-1])


@pytest.mark.parametrize("name", FACTORIES)
def test_eval_shape_of_init_and_update(name):
  tx, case = _build(name)
  tx = optax.with_extra_args_support(tx)
  params = _params()
  structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state_shape = jax.eval_shape(tx.init, structs)
  state = tx.init(params)
  assert _shape_dtype(state_shape) == _shape_dtype(state)
  update = functools.partial(tx.update, **_extra(case.extra, params, 0))
  out_shape = jax.eval_shape(update, structs, state_shape, structs)
  out = update(_grads(params, 0), state, params)
  assert _shape_dtype(out_shape) == _shape_dtype(out)


@pytest.mark.parametrize("name", FACTORIES)
def test_state_stable_single_compile_and_dtypes(name):
  tx, case = _build(name)
  params = _params()
  chex.clear_trace_counter()
  outs, states = _run(name, tx, case, params, jit=True)  # assert_max_traces(n=1) inside
  types0 = jax.tree.map(jax.typeof, states[0])
  for s in states[1:]:
    assert jax.tree.map(jax.typeof, s) == types0, "state shape/dtype/weak type changed"
  for u in outs:
    chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


@pytest.mark.parametrize("name", FACTORIES)
def test_bf16_updates_keep_dtype(name):
  case = _case(name)
  if case.bf16 is not True:
    pytest.skip(f"bf16: {case.bf16}")
  tx, case = _build(name)
  params = _params(jnp.bfloat16)
  chex.clear_trace_counter()
  outs, _ = _run(name, tx, case, params)
  for u in outs:
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))


@pytest.mark.parametrize("name", FACTORIES)
def test_works_inside_chain(name):
  tx, case = _build(name)
  params = _params()
  chex.clear_trace_counter()
  alone, _ = _run(name, tx, case, params)
  chex.clear_trace_counter()
  chained, states = _run(name, optax.chain(tx, optax.sgd(0.1)), case, params)
  assert len(states[-1]) == 2
  for a, c in zip(alone, chained):
    _assert_close(c, jax.tree.map(lambda x: -0.1 * x, a))


def _float_hyperparams(name, case):
  sig = inspect.signature(getattr(transforms, name))
  floats = {n for n, p in sig.parameters.items() if type(p.default) is float}
  floats |= {n for n, v in case.kwargs.items() if type(v) is float}
  return sorted(floats - set(case.static_floats)), sig


@pytest.mark.parametrize("name", FACTORIES)
def test_inject_hyperparams_gives_same_updates(name):
  tx, case = _build(name)
  floats, sig = _float_hyperparams(name, case)
  if not floats:
    why = "; ".join(f"{k}: {v}" for k, v in case.static_floats.items()) or "none"
    pytest.skip(f"no float hyperparameters to inject (static floats: {why})")
  static = tuple(n for n in sig.parameters if n not in floats)
  params = _params()
  chex.clear_trace_counter()
  direct, _ = _run(name, tx, case, params)
  injected_tx = optax.inject_hyperparams(getattr(transforms, name), static_args=static)(
      **case.kwargs)
  chex.clear_trace_counter()
  injected, states = _run(name, injected_tx, case, params)
  assert set(floats) <= set(states[-1].hyperparams)
  for a, b in zip(direct, injected):
    _assert_close(a, b)
