"""Hyperparameters as traced inputs of the compiled round: change them without recompiling.

A learning rate closed over as a Python float is a constant of the compiled round, so a new
value means a new program. optax's :func:`optax.inject_hyperparams` keeps numeric
hyperparameters in the optimizer *state* instead; jaxfl carries the values you pass to
:func:`jaxfl.simulate` (``hyperparams=``) in :attr:`jaxfl.ServerState.hyperparams` and writes
them into those states inside the round:

- ``"client"`` values into every client optimizer's ``inject_hyperparams`` state right after
  its (per-round, fresh) ``init``, through the client ``context`` (key ``"hyperparams"``);
- ``"server"`` values into the server optimizer's state before its update, every round.

Re-running ``simulate`` with the same algorithm and model objects and other values then
reuses the compiled round (a notebook sweeping a learning rate compiles once)::

  algo = jaxfl.algorithms.fedavg(client_lr=0.05)       # client SGD is inject_hyperparams'd
  for lr in (0.02, 0.05, 0.1):
    res = jaxfl.simulate(algo, model, data, rounds=50, clients_per_round=10,
                         hyperparams={"client": {"learning_rate": lr}})

Any optimizer built with ``optax.inject_hyperparams`` works the same way (e.g.
``server_optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)`` and
``hyperparams={"server": {"learning_rate": 3e-3}}``); a name is written into every injected
state of that side that has it (a chain with two injected transforms sharing a name gets the
value in both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["SIDES", "injected_names", "set_hyperparams", "validate_hyperparams"]

SIDES = ("client", "server")


def _is_injected(node) -> bool:
  return isinstance(node, optax.InjectStatefulHyperparamsState)


def set_hyperparams(opt_state: Any, values: Mapping[str, Any] | None) -> Any:
  """``opt_state`` with ``values[name]`` written into every injected state holding ``name``.

  Works under ``jit`` with traced values (each cast to the dtype the state holds); names a
  state does not hold are left for other states. ``values`` None or empty returns
  ``opt_state`` itself.

  Args:
    opt_state: an optax state, possibly nested (``chain``, ``with_extra_args_support``, ...).
    values: ``{hyperparameter name: scalar}``.

  Returns:
    The state with the same structure.
  """
  if not values:
    return opt_state

  def write(node):
    if not _is_injected(node):
      return node
    hp = dict(node.hyperparams)
    for name, v in values.items():
      if name in hp:
        hp[name] = jnp.asarray(v, jnp.result_type(hp[name]))
    return node._replace(hyperparams=hp)

  return jax.tree.map(write, opt_state, is_leaf=_is_injected)


def injected_names(opt_state: Any) -> set[str]:
  """Names of the numeric hyperparameters held by the injected states in ``opt_state``."""
  names: set[str] = set()
  for node in jax.tree.leaves(opt_state, is_leaf=_is_injected):
    if _is_injected(node):
      names.update(node.hyperparams)
  return names


def validate_hyperparams(hyperparams: Any, algorithm, params: Any) -> dict | None:
  """Checks ``hyperparams`` against the algorithm's optimizers, before anything compiles.

  Args:
    hyperparams: None, or ``{"client": {name: number}, "server": {name: number}}`` (either
      side optional).
    algorithm: the :class:`jaxfl.algorithms.Algorithm`.
    params: the model's params (or their shapes) to initialise the optimizers abstractly.

  Returns:
    ``{"client": {name: f32[]}, "server": {name: f32[]}}`` (both sides present), or None.

  Raises:
    ValueError / TypeError: naming the side and the hyperparameter, and listing the names
      the optimizer's ``inject_hyperparams`` states do hold.
  """
  if hyperparams is None:
    return None
  if not isinstance(hyperparams, Mapping) or set(hyperparams) - set(SIDES):
    raise ValueError("`hyperparams` must be a dict with keys among "
                     f"{list(SIDES)} (each a dict of name -> number), got {hyperparams!r}.")
  optimizers = {"client": algorithm.local.optimizer, "server": algorithm.server_optimizer}
  out = {}
  for side in SIDES:
    given = hyperparams.get(side) or {}
    if not isinstance(given, Mapping):
      raise TypeError(f"`hyperparams[{side!r}]` must be a dict of name -> number, got "
                      f"{type(given).__name__}.")
    names = injected_names(jax.eval_shape(optimizers[side].init, params)) if given else set()
    vals = {}
    for name, v in given.items():
      if name not in names:
        where = (f"it holds {sorted(names)}" if names else
                 "it has no optax.inject_hyperparams state")
        raise ValueError(
            f"`hyperparams[{side!r}][{name!r}]`: the {side} optimizer has no injected "
            f"hyperparameter {name!r} ({where}). Build it with "
            f"optax.inject_hyperparams(...)(..., {name}=...) to change it without recompiling.")
      if isinstance(v, bool) or not isinstance(v, int | float | np.number) \
          or not math.isfinite(float(v)):
        raise ValueError(f"`hyperparams[{side!r}][{name!r}]` must be a finite number, got "
                         f"{v!r}.")
      vals[name] = np.float32(v)
    out[side] = vals
  return out
