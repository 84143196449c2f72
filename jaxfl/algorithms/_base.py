"""A federated algorithm is a static bundle of optax transformations and round contracts."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import optax

from jaxfl import comm, sampling, views
from jaxfl import memory as jmemory
from jaxfl.aggregation import LinearAggregator, weighted_mean
from jaxfl.client import LocalTraining, validate_local_training

SERVER_INPUTS = ("client_updates", "client_grad_sums")


class Algorithm(NamedTuple):
  """Everything that defines a federated algorithm; the engine has no code per algorithm.

  Attributes:
    name: label for logs and tables.
    local: local training (client optimizer, batch size, local steps or epochs).
    server_optimizer: optax transformation on the pseudo-gradient (the aggregated
      ``global - local`` delta). It may be ``GradientTransformationExtraArgs`` and then
      receives ``client_weights`` (f32[C]), ``key`` and ``round`` as keyword arguments, plus
      what ``server_inputs`` declares. FedAvg = ``optax.sgd(1.0)``.
    aggregator: a general aggregator or a :class:`jaxfl.aggregation.LinearAggregator` (the
      kind decides whether the round may stream; see :mod:`jaxfl.aggregation`).
    uplink: optional per-client transformation of the delta before upload (compression,
      sparse masks, clipping): ``init(delta)`` every round unless the view hands it a state
      (``ClientStart.uplink_state``), ``update(delta, state, params, key=)``.
    weighting: ``"examples"`` (weights = client sizes, McMahan et al.) or ``"uniform"``
      (the LMLS-lab papers' unweighted mean).
    ledger: how uploads are counted (:func:`jaxfl.comm.dense_ledger`,
      :func:`jaxfl.comm.sparse_ledger`, or an algorithm's own :class:`jaxfl.comm.Ledger`).
    sampler: who takes part (:mod:`jaxfl.sampling`; default uniform without replacement).
    view: what each client starts from, trains and uploads (:mod:`jaxfl.views`).
    memory: per-client state across rounds (:mod:`jaxfl.memory`), or None.
    server_inputs: per-client arrays the server transform reads, a subset of
      ``("client_updates", "client_grad_sums")``: the stacked f32[C, ...] deltas (FedLAMA's
      discrepancy) and the summed local gradients (PruneFL's importance; the round then tracks
      them in local training). Declaring either keeps every client's update (no streaming).
    config: the preset's arguments, defaults included (set by :func:`preset`; None for
      hand-built algorithms). Checkpoints fingerprint it, so a resume with another learning
      rate is refused.
    client_update: how one client trains, or None for
      :func:`jaxfl.client.make_client_update`: a factory with its signature,
      ``(model, local, max_client_size) -> client_update(params, model_state, x, y, indices,
      size, key, update_mask=None, context=None) -> ClientOutput``. A method whose client
      computes on something other than the full parameter tree (PriSM's gathered sub-model,
      ``functools.partial(jaxfl.algorithms.prism_client_update, sliced=kappa)``) installs it
      here; the result must have the full tree's shapes, since the upload, the ledger and the
      aggregator see it.
  """

  name: str
  local: LocalTraining
  server_optimizer: optax.GradientTransformation
  aggregator: optax.GradientTransformationExtraArgs | LinearAggregator = weighted_mean()
  uplink: optax.GradientTransformation | None = None
  weighting: str = "examples"
  ledger: comm.Ledger = comm.dense_ledger()
  sampler: sampling.ClientSampler = sampling.uniform()
  view: views.ClientView = views.global_view()
  memory: jmemory.ClientMemory | None = None
  server_inputs: tuple[str, ...] = ()
  config: dict[str, Any] | None = None
  client_update: Callable[..., Callable[..., Any]] | None = None


def _describe(value):
  """A JSON-safe, process-independent description of a preset argument (no addresses)."""
  if value is None or isinstance(value, bool | int | float | str):
    return value
  if isinstance(value, tuple | list):
    return [_describe(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _describe(v) for k, v in value.items()}
  if hasattr(value, "item") and getattr(value, "size", 2) == 1:  # numpy / jax scalars
    return value.item()
  if hasattr(value, "shape") and hasattr(value, "dtype"):  # an array: its content's digest
    import hashlib

    import numpy as np

    data = np.ascontiguousarray(np.asarray(value))
    digest = hashlib.sha256(data.tobytes()).hexdigest()[:12]
    return f"<array {data.dtype}{list(data.shape)} {digest}>"
  return f"<{getattr(value, '__qualname__', type(value).__qualname__)}>"


def preset(factory: Callable[..., Algorithm]) -> Callable[..., Algorithm]:
  """Decorates an algorithm factory so the :class:`Algorithm` it returns records its
  arguments (defaults included) in ``config``; an outer preset's arguments extend an inner
  one's, and ``config["preset"]`` names the outermost."""
  sig = inspect.signature(factory)

  @functools.wraps(factory)
  def build(*args, **kwargs) -> Algorithm:
    algo = factory(*args, **kwargs)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    given = {}
    for name, value in bound.arguments.items():
      if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
        given.update(value)
      else:
        given[name] = value
    config = {**(algo.config or {}), **{k: _describe(v) for k, v in given.items()},
              "preset": factory.__name__}
    return algo._replace(config=config)

  return build


def _check_type(value, types, name, what):
  if not isinstance(value, types):
    raise TypeError(f"`{name}` must be {what}, got {type(value).__name__}.")


def validate_algorithm(algo: Algorithm) -> None:
  """Checks an :class:`Algorithm`'s fields (raises TypeError/ValueError naming the field)."""
  _check_type(algo, Algorithm, "algorithm", "a jaxfl.algorithms.Algorithm")
  validate_local_training(algo.local)
  _check_type(algo.server_optimizer, optax.GradientTransformation, "server_optimizer",
              "an optax.GradientTransformation")
  _check_type(algo.aggregator, (optax.GradientTransformation, LinearAggregator), "aggregator",
              "an optax.GradientTransformationExtraArgs or a jaxfl.aggregation.LinearAggregator")
  if algo.uplink is not None:
    _check_type(algo.uplink, optax.GradientTransformation, "uplink",
                "an optax.GradientTransformation or None")
  if algo.weighting not in ("examples", "uniform"):
    raise ValueError(f"`weighting` must be 'examples' or 'uniform', got {algo.weighting!r}.")
  _check_type(algo.ledger, comm.Ledger, "ledger", "a jaxfl.comm.Ledger")
  if algo.ledger.model_size is not None and not callable(algo.ledger.model_size):
    raise TypeError("`ledger.model_size` must be a callable params -> int or None, got "
                    f"{type(algo.ledger.model_size).__name__}.")
  if algo.ledger.downlink is not None and not callable(algo.ledger.downlink):
    raise TypeError("`ledger.downlink` must be a callable (params, round) -> f32[] or None, "
                    f"got {type(algo.ledger.downlink).__name__}.")
  _check_type(algo.sampler, sampling.ClientSampler, "sampler", "a jaxfl.sampling.ClientSampler")
  _check_type(algo.view, views.ClientView, "view", "a jaxfl.views.ClientView")
  if algo.memory is not None:
    _check_type(algo.memory, jmemory.ClientMemory, "memory", "a jaxfl.memory.ClientMemory or None")
  if algo.client_update is not None and not callable(algo.client_update):
    raise TypeError("`client_update` must be a factory (model, local, max_client_size) -> "
                    f"client update, or None; got {type(algo.client_update).__name__}.")
  bad = [s for s in algo.server_inputs if s not in SERVER_INPUTS]
  if not isinstance(algo.server_inputs, tuple) or bad:
    raise ValueError(f"`server_inputs` must be a tuple drawn from {SERVER_INPUTS}, got "
                     f"{algo.server_inputs!r}.")
