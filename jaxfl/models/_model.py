"""The model contract used by the engine: pure ``init`` and ``apply`` over plain dicts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = Any
ModelState = Any  # non-trainable collections, e.g. {"batch_stats": ...}; {} if none


class Model(NamedTuple):
  """A Flax model as two pure functions.

  Attributes:
    init: ``init(key) -> (params, model_state)``; ``model_state`` holds non-trainable
      collections (BatchNorm statistics) and is ``{}`` for stateless models.
    apply: ``apply(params, model_state, x, *, train, rng) -> (logits, new_model_state)``.
    name: short name used in logs.
    input_shape: shape of one example (no batch axis).
  """

  init: Callable[[jax.Array], tuple[Params, ModelState]]
  apply: Callable[..., tuple[jax.Array, ModelState]]
  name: str
  input_shape: tuple[int, ...]


def from_linen(module, input_shape: tuple[int, ...], name: str | None = None,
               fast_layers: bool = True) -> Model:
  """Wraps any ``flax.linen`` module whose ``__call__(x, train)`` returns logits.

  The module may take ``train`` as a keyword (BatchNorm/Dropout) or not. Collections other
  than ``params`` become ``model_state``; ``batch_stats`` is updated in training mode and
  averaged by the server like the papers' FedAvg does.

  Args:
    module: the Flax module.
    input_shape: shape of one example (no batch axis).
    name: short name for logs (default: the module's class name).
    fast_layers: apply stock ``nn.Conv`` / ``nn.max_pool`` calls with jaxfl's lowerings
      (same parameters, values and gradients; several times faster inside the round, see
      :mod:`jaxfl.models._intercept`). A conv whose configuration has no fast lowering is
      named in a warning when the model is wrapped. The conv's custom VJP has no
      forward-mode rule: pass False for a method that needs ``jax.jvp`` through the model.
  """
  import inspect
  import warnings

  from jaxfl.models import _intercept

  takes_train = "train" in inspect.signature(module.__call__).parameters
  input_shape = tuple(int(d) for d in input_shape)
  name = name or type(module).__name__

  def call_kwargs(train):
    return {"train": train} if takes_train else {}

  def init(key):
    pkey, dkey = jax.random.split(key)
    variables = module.init({"params": pkey, "dropout": dkey},
                            jnp.zeros((1,) + input_shape, jnp.float32), **call_kwargs(False))
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables

  def plain_apply(params, model_state, x, *, train: bool, rng=None):
    variables = {"params": params, **model_state}
    rngs = {"dropout": rng} if rng is not None else {}
    if train and model_state:
      logits, new_state = module.apply(variables, x, mutable=list(model_state), rngs=rngs,
                                       **call_kwargs(True))
      return logits, dict(new_state)
    logits = module.apply(variables, x, rngs=rngs, **call_kwargs(train))
    return logits, model_state

  if not fast_layers:
    return Model(init, plain_apply, name, input_shape)

  def apply(params, model_state, x, *, train: bool, rng=None):
    with _intercept.fast_layers():
      return plain_apply(params, model_state, x, train=train, rng=rng)

  if input_shape:  # trace once (no compile) to name the convs left on Flax's lowering
    slow: list[str] = []

    def probe(key):
      params, model_state = init(key)
      with _intercept.fast_layers(slow):
        return plain_apply(params, model_state, jnp.zeros((2,) + input_shape, jnp.float32),
                           train=True, rng=key)

    jax.eval_shape(probe, jax.random.key(0))
    if slow:
      warnings.warn(f"jaxfl: {name}: {len(slow)} nn.Conv call(s) keep Flax's lowering, which "
                    f"is several times slower inside the round: {'; '.join(sorted(set(slow)))}. "
                    "Use jaxfl.models.Conv or a configuration it supports (2-D, SAME/VALID, "
                    "no dilation/groups/mask).", stacklevel=2)
  return Model(init, apply, name, input_shape)


def from_nnx(module, name: str | None = None, input_shape: tuple[int, ...] = ()) -> Model:
  """Wraps a ``flax.nnx`` module: split once into pure dicts, merged inside ``apply``.

  ``nnx.Param`` variables become ``params``; every other variable (e.g. BatchStat) becomes
  ``model_state``. The module's ``__call__(x)`` must return logits; train/eval mode is set
  with ``module.train()``/``module.eval()`` semantics via ``nnx.Module.set_attributes``.
  """
  from flax import nnx

  graphdef, param_state, rest_state = nnx.split(module, nnx.Param, ...)
  params0 = nnx.to_pure_dict(param_state)
  rest0 = nnx.to_pure_dict(rest_state)

  def init(key):
    del key  # nnx modules are initialised eagerly by the user
    return jax.tree.map(jnp.asarray, params0), jax.tree.map(jnp.asarray, rest0)

  def apply(params, model_state, x, *, train: bool, rng=None):
    del rng
    p_state = nnx.State(param_state)
    r_state = nnx.State(rest_state)
    nnx.replace_by_pure_dict(p_state, params)
    nnx.replace_by_pure_dict(r_state, model_state)
    m = nnx.merge(graphdef, p_state, r_state)
    m.set_attributes(deterministic=not train, use_running_average=not train, raise_if_not_found=False)
    logits = m(x)
    _, _, new_rest = nnx.split(m, nnx.Param, ...)
    return logits, nnx.to_pure_dict(new_rest) if train else model_state

  return Model(init, apply, name or type(module).__name__, tuple(input_shape))
