"""One federated round as one jit-compiled, pure function: a composition of named stages.

``round_fn(state, data, key) -> (state, metrics)``::

    sample cohort (ClientSampler)
      -> per slot, mapped over the cohort (shard_map / lax.scan / vmap):
         client view (ClientView, ClientMemory rows) -> local update -> uplink transform
         -> quarantine -> ledger
      -> aggregate (general, or linear and streamed) -> server transform -> apply
      -> client memory write / scatter -> sampler update -> metrics

The stages live in :mod:`jaxfl._stages`; the contracts in :mod:`jaxfl.sampling`,
:mod:`jaxfl.views`, :mod:`jaxfl.memory`, :mod:`jaxfl.aggregation` and :mod:`jaxfl.comm`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxfl import _stages
from jaxfl import sharding as jshard
from jaxfl import tree as jtree
from jaxfl._stages import NAN_POLICIES, Layout
from jaxfl.algorithms._base import Algorithm
from jaxfl.client import make_client_update
from jaxfl.data._device import DeviceData
from jaxfl.hyperparams import set_hyperparams
from jaxfl.models import Model
from jaxfl.views import ServerSnapshot
from jaxfl.xla_options import compiler_options

__all__ = ["NAN_POLICIES", "Round", "ServerState", "build_round"]


class ServerState(NamedTuple):
  """Everything a run needs to continue exactly (checkpointed as a whole).

  Attributes:
    params: global model parameters x_t.
    model_state: non-trainable collections (BN statistics), averaged every round.
    opt_state: server optimizer state (includes layer-wise transform states).
    aggregator_state: aggregator state.
    round: i32[] rounds completed.
    uplink_elements: per-leaf f32[] cumulative uploaded elements (the ledger).
    cohort: i32[C] the last cohort's client ids.
    sampler_state: the :class:`jaxfl.sampling.ClientSampler`'s state.
    memory: the :class:`jaxfl.memory.ClientMemory` rows (leading axis = client or slot), or
      None.
    hyperparams: ``{"client": {name: f32[]}, "server": {name: f32[]}}`` written into the
      optimizers' ``optax.inject_hyperparams`` states every round (:mod:`jaxfl.hyperparams`),
      or None. Inputs of the compiled round: new values do not recompile.
  """

  params: Any
  model_state: Any
  opt_state: Any
  aggregator_state: Any
  round: jax.Array
  uplink_elements: Any
  cohort: jax.Array
  sampler_state: Any = None
  memory: Any = None
  hyperparams: Any = None


class Round(NamedTuple):
  """A built round: ``init(key) -> ServerState``, ``step(state, data, key)``.

  ``clients_per_chunk`` and ``stream_aggregate`` are the resolved execution choices (after
  ``"auto"``): slots trained at once over all devices, and whether updates are summed chunk
  by chunk. ``step`` donates ``state`` (pass ``donate=False`` to ``build_round`` to reuse it).
  ``place(state)`` puts a (host) state on the mesh laid out exactly as ``step`` returns it
  (client memory along ``"clients"``, the rest replicated), so the first round's input has
  the same shardings as every later round's and ``step`` compiles once.
  """

  init: Any
  step: Any
  mesh: Any
  cohort_size: int
  padded_cohort_size: int
  clients_per_chunk: int = 0
  stream_aggregate: bool = False
  place: Any = None


def build_round(algorithm: Algorithm, model: Model, *, num_clients: int, max_client_size: int,
                clients_per_round: int, mesh=None,
                clients_per_chunk: int | str | None = "auto",
                stream_aggregate: bool | str = "auto",
                nan_policy: str = "drop", dropout_rate: float = 0.0,
                donate: bool = True, report_grad_norm: bool = False) -> Round:
  """Builds the jitted round for an algorithm, a model and a population shape.

  Args:
    algorithm: the :class:`Algorithm`.
    model: the :class:`jaxfl.models.Model`.
    num_clients: population size N.
    max_client_size: padded examples per client (``FederatedData.max_client_size``).
    clients_per_round: cohort size C (<= N).
    mesh: a ``("clients",)`` mesh (:func:`jaxfl.sharding.client_mesh`) or None (1 device).
    clients_per_chunk: clients trained at once over all devices: each device runs
      ``lax.scan`` over chunks of ``clients_per_chunk / devices`` of its slots (rounded up),
      vmapped only when that is more than one. ``None`` vmaps the whole cohort. ``"auto"``
      (default) picks by backend from measurements (experiments/results/bench_round_*.json,
      BUILD.md): on CPU one client per device at a time, unbatched (native convs, a real
      branch for a ragged client's skipped steps; vmapped per-client weights turn matmuls
      into slow batched ones and convs into grouped ones); on GPU/TPU the whole cohort is
      vmapped.
    stream_aggregate: with chunks, accumulate the aggregate chunk by chunk instead of keeping
      every client's update, so memory grows with the chunk, not the cohort (cohorts of
      thousands). Needs a :class:`jaxfl.aggregation.LinearAggregator` and no declared
      ``server_inputs``; the server transform then gets ``client_updates=None`` and a client
      memory's ``write`` gets ``result.delta=None``. ``"auto"`` (default) streams whenever
      the cohort runs in chunks and those hold, i.e. whenever only the floating-point
      summation order can change.
    nan_policy: ``"drop"`` quarantines clients whose update is not finite (weight 0; counted
      in ``metrics["nonfinite_clients"]``); ``"raise"`` does the same in-graph and the driver
      raises after the round.
    dropout_rate: probability that a sampled client drops out (uploads nothing).
    donate: donate the state buffers to the round (in-place update).
    report_grad_norm: also report ``metrics["grad_norm"]``, the participants' mean local
      gradient norm (each client's mean over its steps of the minibatch gradient's global
      norm). Off by default: a norm over every parameter at every local step cost up to a
      quarter of a small MLP round on a CPU. Samplers and aggregators see each client's
      ``grad_norm`` either way (:class:`jaxfl.sampling.ClientMetrics`); when nothing reads
      it, XLA drops its computation from the compiled round.

  Returns:
    A :class:`Round`.
  """
  _stages.validate(algorithm, model, num_clients=num_clients, max_client_size=max_client_size,
                   clients_per_round=clients_per_round, nan_policy=nan_policy,
                   dropout_rate=dropout_rate, clients_per_chunk=clients_per_chunk,
                   stream_aggregate=stream_aggregate, report_grad_norm=report_grad_norm)
  layout = _stages.resolve_layout(algorithm, clients_per_round=clients_per_round, mesh=mesh,
                                  clients_per_chunk=clients_per_chunk,
                                  stream_aggregate=stream_aggregate)
  local = algorithm.local
  if "client_grad_sums" in algorithm.server_inputs:
    local = local._replace(track_grad_sum=True)
  client_update = (algorithm.client_update or make_client_update)(model, local, max_client_size)
  memory = algorithm.memory
  train_slot = _stages.make_train_slot(algorithm, client_update, memory is not None,
                                       layout.cohort)
  map_clients = _stages.make_map_clients(train_slot, algorithm.aggregator, layout, mesh,
                                         _stages.make_slot_view(algorithm, layout.cohort))
  server_tx = optax.with_extra_args_support(algorithm.server_optimizer)
  init = _make_init(algorithm, model, server_tx, num_clients, layout)

  def step(state: ServerState, data: DeviceData, key) -> tuple[ServerState, dict]:
    k_sample, k_drop, k_clients, k_agg, k_server = jax.random.split(key, 5)
    context = {"client_sizes": data.client_sizes.astype(jnp.float32),
               "client_loss": _stages.make_client_loss(model, data, state.params,
                                                       state.model_state, local.batch_size)}
    selected, cohort = _stages.sample_cohort(
        algorithm.sampler, state.sampler_state, (k_sample, k_drop, k_clients), state.round,
        num_clients=num_clients, layout=layout, dropout_rate=dropout_rate, context=context)
    # Every device computes the cohort and takes its own slots by a local slice; left to
    # itself the compiler lays the cohort along the clients and gathers it back (two more
    # device synchronisations per round).
    selected, cohort = jshard.constrain_replicated((selected, cohort), mesh)
    rows = None if memory is None else memory.gather(state.memory, cohort.ids, cohort.slots)
    hp = state.hyperparams or {}
    if hp.get("server"):  # traced values into the server optimizer's injected state
      state = state._replace(opt_state=set_hyperparams(state.opt_state, hp["server"]))
    before = ServerSnapshot(state.params, state.model_state, state.opt_state, state.round,
                            hp.get("client") or None)
    xs = _stages.SlotInputs(cohort.ids, cohort.slots, cohort.keys, cohort.real, rows)
    res = map_clients(before, data, xs)
    outs = res[1] if layout.stream else res
    agg = _stages.aggregate(algorithm.aggregator, state.aggregator_state, state.params, res,
                            k_agg, layout.stream)
    updates, opt_state, params = _stages.server_step(
        server_tx, algorithm.server_inputs, state, agg, outs, k_server, mesh)
    model_state = jtree.select_tree(jnp.sum(outs.weight) > 0, agg.model_state,
                                    state.model_state)
    after = ServerSnapshot(params, model_state, opt_state, state.round + 1,
                           hp.get("client") or None)
    sampler_state = _stages.update_sampler(algorithm.sampler, state.sampler_state, selected,
                                           cohort, outs)
    new_state = ServerState(
        params=params, model_state=model_state, opt_state=opt_state,
        aggregator_state=agg.aggregator_state, round=optax.safe_increment(state.round),
        uplink_elements=jax.tree.map(jnp.add, state.uplink_elements, agg.sent),
        cohort=selected,
        sampler_state=sampler_state,
        memory=_stages.update_memory(memory, state.memory, cohort, outs, rows, before, after,
                                     mesh),
        hyperparams=state.hyperparams)
    # Pin the output layout (the compiler would otherwise lay e.g. the cohort along the
    # clients): round r + 1 then gets inputs sharded as round r's and reuses its program.
    new_state = _state_layout(new_state, mesh)
    return new_state, _stages.round_metrics(algorithm, state.params, cohort, outs, agg, updates,
                                            sampler_state, report_grad_norm, state.round)

  jit_step = jax.jit(step, donate_argnums=(0,) if donate else (),
                     compiler_options=_compiler_options(mesh))
  return Round(init, jit_step, mesh, clients_per_round, layout.padded, layout.chunk,
               layout.stream, functools.partial(_place, mesh=mesh))


def _state_layout(state: ServerState, mesh) -> ServerState:
  """Inside ``jit``: every leaf replicated but the client memory, laid along the clients."""
  memory = state.memory
  state = jshard.constrain_replicated(state._replace(memory=None), mesh)
  return state._replace(memory=jshard.constrain_clients(memory, mesh))


def _place(state: ServerState, mesh) -> ServerState:
  """Outside ``jit``: the layout of :func:`_state_layout` for a host (or device) state."""
  memory = state.memory
  state = jshard.put_replicated(state._replace(memory=None), mesh)
  if memory is not None and mesh is not None:
    memory = jax.device_put(memory, jshard.client_sharded(mesh))
  elif memory is not None:
    memory = jax.device_put(memory)
  return state._replace(memory=memory)


def _make_init(algorithm: Algorithm, model: Model, server_tx, num_clients: int, layout: Layout):
  """``init(key) -> ServerState``: model init, every contract's initial state."""

  def init(key) -> ServerState:
    params, model_state = model.init(key)
    memory = None
    if algorithm.memory is not None:
      # Per-client rows are padded to a multiple of the devices so they can lie along the
      # client axis; padded rows are never gathered.
      rows = -(-num_clients // layout.devices) * layout.devices
      memory = algorithm.memory.init(params, rows, layout.padded)
    return ServerState(
        params=params, model_state=model_state, opt_state=server_tx.init(params),
        aggregator_state=algorithm.aggregator.init(params), round=jnp.zeros([], jnp.int32),
        uplink_elements=jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params),
        cohort=jnp.zeros([layout.cohort], jnp.int32),
        sampler_state=algorithm.sampler.init(num_clients, layout.cohort), memory=memory)

  return init


def _compiler_options(mesh) -> dict:
  if mesh is None:
    return compiler_options(jax.default_backend(), 1)
  platform = mesh.devices.flat[0].platform
  local = sum(dv.process_index == jax.process_index() for dv in mesh.devices.flat)
  return compiler_options(platform, local)
