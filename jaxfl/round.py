"""One federated round as one jit-compiled, pure function.

``round_fn(state, data, key) -> (state, metrics)``:

1. sample the cohort in-graph (uniform without replacement, from ``key``);
2. train the cohort: its slots are split over the ``"clients"`` mesh (padded to a multiple
   of the device count with zero-weight clients; ``shard_map``), and each device runs its
   slots one chunk at a time (``lax.scan``), a chunk vmapped when it holds several clients;
3. quarantine clients with non-finite updates (weight 0, update zeroed);
4. aggregate (``Algorithm.aggregator``), average BN statistics with the same weights;
5. feed the pseudo-gradient to the server optax chain and apply it;
6. account communication per leaf.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxfl import comm
from jaxfl import sharding as jshard
from jaxfl import tree as jtree
from jaxfl.algorithms._base import Algorithm, validate_algorithm
from jaxfl.client import make_client_update
from jaxfl.data._device import DeviceData, device_data  # noqa: F401  (re-exported)
from jaxfl.models import Model, batched_clients
from jaxfl.xla_options import compiler_options

NAN_POLICIES = ("drop", "raise")


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
    cohort_params: with ``Algorithm.persistent_cohort``, the cohort's local parameters
      (leading axis = padded cohort slot), else None.
    client_states: with ``Algorithm.stateful_uplink``, every client's uplink-transform state
      (leading axis = client id, N), e.g. LBGM's look-back update; else None.
  """

  params: Any
  model_state: Any
  opt_state: Any
  aggregator_state: Any
  round: jax.Array
  uplink_elements: Any
  cohort: jax.Array
  cohort_params: Any = None
  client_states: Any = None


class _SlotInputs(NamedTuple):
  """Per-slot inputs of the client step (leading axis = cohort slot)."""

  ids: jax.Array
  keys: jax.Array
  real: jax.Array
  start: Any  # persistent cohort: the slot's starting params; else None
  cstate: Any  # stateful uplink: the client's uplink state; else None


class _SlotOutputs(NamedTuple):
  out: Any  # ClientOutput
  delta: Any
  weights: jax.Array
  finite: jax.Array
  sent: Any
  local: Any
  cstate: Any


class Round(NamedTuple):
  """A built round: ``init(key) -> ServerState``, ``step(state, data, key)``.

  ``clients_per_chunk`` and ``stream_aggregate`` are the resolved execution choices (after
  ``"auto"``): slots trained at once over all devices, and whether updates are summed chunk
  by chunk.
  """

  init: Any
  step: Any
  mesh: Any
  cohort_size: int
  padded_cohort_size: int
  clients_per_chunk: int = 0
  stream_aggregate: bool = False


def _all_finite(tree):
  """bool[]: True where every entry of every leaf is finite."""
  out = jnp.asarray(True)
  for x in jax.tree.leaves(tree):
    out = out & jnp.all(jnp.isfinite(x))
  return out


def _sample_uniform(key, num_clients, cohort):
  return jax.random.choice(key, num_clients, (cohort,), replace=False).astype(jnp.int32)


def _reads_client_updates(server_tx, model: Model, cohort: int) -> bool:
  """Whether the server transform's outputs depend on ``client_updates`` (traced, abstract).

  Conservative: any use of the stacked updates in the traced update counts.
  """
  params = jax.eval_shape(lambda k: model.init(k)[0], jax.random.key(0))
  stacked = jax.tree.map(lambda p: jax.ShapeDtypeStruct((cohort,) + p.shape, p.dtype), params)

  def update(client_updates, params):
    return server_tx.update(params, server_tx.init(params), params,
                            client_updates=client_updates, client_weights=jnp.ones([cohort]),
                            key=jax.random.key(0), round=jnp.zeros([], jnp.int32),
                            client_grad_sums=None)

  try:
    jaxpr = jax.make_jaxpr(update)(stacked, params).jaxpr
  except Exception:  # noqa: BLE001 - a transform that cannot be traced this way: keep stacking
    return True
  inputs = jaxpr.invars[: len(jax.tree.leaves(stacked))]
  read = [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars)
  return any(v is u for v in read for u in inputs)


def build_round(algorithm: Algorithm, model: Model, *, num_clients: int, max_client_size: int,
                clients_per_round: int, mesh=None,
                clients_per_chunk: int | str | None = "auto",
                stream_aggregate: bool | str = "auto",
                nan_policy: str = "drop", dropout_rate: float = 0.0,
                donate: bool = True) -> Round:
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
    stream_aggregate: with chunks, sum the weighted updates chunk by chunk instead of keeping
      every client's update, so memory grows with the chunk, not the cohort (cohorts of
      thousands). Requires the weighted-mean aggregator; the server transform then gets
      ``client_updates=None``. ``"auto"`` (default) streams whenever the cohort runs in
      chunks, the aggregator is the weighted mean, clients track no gradient sums and the
      traced server transform does not read ``client_updates`` (FedLAMA does), i.e. whenever
      only the floating-point summation order can change.
    nan_policy: ``"drop"`` quarantines clients whose update is not finite (weight 0; counted
      in ``metrics["nonfinite_clients"]``); ``"raise"`` does the same in-graph and the driver
      raises after the round.
    dropout_rate: probability that a sampled client drops out (uploads nothing).
    donate: donate the state buffers to the round (in-place update).
  """
  validate_algorithm(algorithm)
  if not isinstance(model, Model):
    raise TypeError(f"`model` must be a jaxfl.models.Model, got {type(model).__name__}.")
  for name, v in (("num_clients", num_clients), ("max_client_size", max_client_size),
                  ("clients_per_round", clients_per_round)):
    if not isinstance(v, int | np.integer) or v < 1:
      raise ValueError(f"`{name}` must be a positive int, got {v!r}.")
  if clients_per_round > num_clients:
    raise ValueError(f"`clients_per_round`={clients_per_round} exceeds the population "
                     f"num_clients={num_clients}.")
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"`nan_policy` must be one of {NAN_POLICIES}, got {nan_policy!r}.")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"`dropout_rate` must be in [0, 1), got {dropout_rate!r}.")
  c_pad = jshard.padded_cohort_size(clients_per_round, mesh)
  chunk = c_pad
  if clients_per_chunk == "auto":
    clients_per_chunk = 1 if jax.default_backend() == "cpu" else None
  if stream_aggregate not in (True, False, "auto"):
    raise ValueError(f"`stream_aggregate` must be True, False or 'auto', got {stream_aggregate!r}.")
  mean_aggregator = algorithm.aggregator.update.__qualname__.split(".")[0] == "weighted_mean"
  if stream_aggregate is True:
    if not mean_aggregator:
      raise ValueError("`stream_aggregate` needs the weighted-mean aggregator (robust "
                       "aggregators need every client update at once).")
    clients_per_chunk = clients_per_chunk or c_pad
  d = 1 if mesh is None else mesh.devices.size
  if clients_per_chunk is not None:
    if not isinstance(clients_per_chunk, int) or clients_per_chunk < 1:
      raise ValueError("`clients_per_chunk` must be a positive int, None or 'auto', got "
                       f"{clients_per_chunk!r}.")
    chunk = -(-min(clients_per_chunk, c_pad) // d) * d
    c_pad = -(-c_pad // chunk) * chunk
  n_chunks = c_pad // chunk
  local_chunk = chunk // d  # slots one device trains at once
  on_mesh = d > 1

  client_update = make_client_update(model, algorithm.local, max_client_size)
  server_tx = optax.with_extra_args_support(algorithm.server_optimizer)
  aggregator = algorithm.aggregator
  uplink = (None if algorithm.uplink is None
            else optax.with_extra_args_support(algorithm.uplink))

  persistent = algorithm.persistent_cohort
  period = algorithm.cohort_period
  stateful_uplink = algorithm.stateful_uplink
  track_grads = algorithm.local.track_grad_sum
  if stream_aggregate == "auto":
    stream_aggregate = (n_chunks > 1 and mean_aggregator and not track_grads
                        and not _reads_client_updates(server_tx, model, c_pad))
  stream = stream_aggregate and n_chunks > 1

  def init(key) -> ServerState:
    params, model_state = model.init(key)
    per_slot = lambda t, n: jax.tree.map(lambda p: jnp.broadcast_to(p[None], (n,) + p.shape), t)
    return ServerState(
        params=params, model_state=model_state, opt_state=server_tx.init(params),
        aggregator_state=aggregator.init(params), round=jnp.zeros([], jnp.int32),
        uplink_elements=jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params),
        cohort=jnp.zeros([clients_per_round], jnp.int32),
        cohort_params=per_slot(params, c_pad) if persistent else None,
        client_states=per_slot(uplink.init(params), num_clients) if stateful_uplink else None)

  def one_slot(server, data, masks, x: _SlotInputs) -> _SlotOutputs:
    """Trains and post-processes one cohort slot (unbatched; vmapped or mapped by the caller)."""
    params, model_state = server
    upload_mask, train_mask = masks
    train_key, uplink_key = jax.random.split(x.keys)
    start = params if x.start is None else x.start
    out = client_update(start, model_state, data.x, data.y, data.client_indices[x.ids],
                        data.client_sizes[x.ids], train_key, train_mask)
    delta, local = out.delta, None
    if x.start is not None:
      local = jax.tree.map(jnp.subtract, start, out.delta)
      # The server sees x_t - x^i: for layers kept locally since the last sync this adds the
      # drift accumulated in earlier rounds; for layers that started from x_t it is exact.
      delta = jax.tree.map(lambda g, s, d: (g - s) + d, params, start, out.delta)
    cstate = None
    if uplink is not None:
      if stateful_uplink:
        delta, cstate = uplink.update(delta, x.cstate, params, key=uplink_key)
      else:
        delta = uplink.update(delta, uplink.init(delta), params, key=uplink_key)[0]
    if upload_mask is not None:
      delta = jax.tree.map(lambda d, m: d * m.astype(d.dtype), delta, upload_mask)
    # One pass per leaf answers both "finite?" and "all zeros?" (an L1 norm that overflows
    # f32 quarantines the client too).
    abs_sums = jax.tree.map(lambda d: jnp.sum(jnp.abs(d)), delta)
    finite = (_all_finite(abs_sums) & _all_finite(out.model_state)
              & jnp.isfinite(out.metrics["loss"]))
    delta = jax.tree.map(lambda d: jnp.where(finite, d, 0), delta)
    size = data.client_sizes[x.ids].astype(jnp.float32)
    base = size if algorithm.weighting == "examples" else jnp.ones_like(size)
    weights = base * x.real * finite
    sent = comm.uplink_elements(delta, algorithm.sparse_uplink, train_mask,
                                jax.tree.map(lambda a: jnp.where(finite, a, 0.0), abs_sums))
    if getattr(cstate, "uplink_elements", None) is not None:  # the uplink counts itself
      sent = jax.tree.map(lambda s, c: jnp.where(s > 0, c, 0.0), sent, cstate.uplink_elements)
    sent = jax.tree.map(lambda s: s * x.real, sent)
    return _SlotOutputs(out, delta, weights, finite, sent, local, cstate)

  def run_chunk(server, data, masks, xs: _SlotInputs) -> _SlotOutputs:
    """The slots one device trains at once (leading axis ``local_chunk``)."""
    if local_chunk == 1:  # no vmap: plain per-client ops, a real cond over ragged steps
      r = one_slot(server, data, masks, jax.tree.map(lambda a: a[0], xs))
      return jax.tree.map(lambda a: a[None], r)
    with batched_clients():
      return jax.vmap(functools.partial(one_slot, server, data, masks))(xs)

  def run_cohort(server, data, masks, xs: _SlotInputs):
    """One device's slots (all of them without a mesh): stacked outputs, or with
    ``stream_aggregate`` the weighted sums and the per-slot small outputs."""
    if on_mesh:  # per-client values vary over devices: grads w.r.t. them are never psummed
      server, data, masks = jax.lax.pcast((server, data, masks), jshard.AXIS, to="varying")
    n_local = jax.tree.leaves(xs)[0].shape[0]
    chunked = jax.tree.map(lambda a: a.reshape((n_local // local_chunk, local_chunk)
                                               + a.shape[1:]), xs)
    unchunk = lambda t: jax.tree.map(lambda a: a.reshape((n_local,) + a.shape[2:]), t)
    if not stream:
      if n_chunks == 1:
        return run_chunk(server, data, masks, xs)
      _, ys = jax.lax.scan(lambda _, x: (None, run_chunk(server, data, masks, x)), None,
                           chunked)
      return unchunk(ys)

    def body(acc, x):
      r = run_chunk(server, data, masks, x)
      wsum = lambda t: jtree.weighted_sum(t, r.weights)
      acc = jax.tree.map(jnp.add, acc, (wsum(r.delta), wsum(r.out.model_state),
                                        jnp.sum(r.weights), jax.tree.map(jnp.sum, r.sent)))
      return acc, (r.out.metrics, r.weights, r.finite, r.local, r.cstate)

    params, model_state = server
    zeros = lambda t: jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), t)
    acc0 = (zeros(params), zeros(model_state), jnp.zeros([], jnp.float32),
            jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params))
    if on_mesh:
      acc0 = jax.lax.pcast(acc0, jshard.AXIS, to="varying")
    sums, ys = jax.lax.scan(body, acc0, chunked)
    if on_mesh:
      sums = jax.lax.psum(sums, jshard.AXIS)
    return sums, unchunk(ys)

  if on_mesh:
    # Each device trains its own block of slots with plain per-device code; the server state
    # and the data are replicated, per-slot inputs and outputs lie along "clients".
    rep, per_slot = P(), P(jshard.AXIS)
    run_cohort = jax.shard_map(run_cohort, mesh=mesh, in_specs=(rep, rep, rep, per_slot),
                               out_specs=(rep, per_slot) if stream else per_slot)

  def step(state: ServerState, data: DeviceData, key) -> tuple[ServerState, dict]:
    k_sample, k_drop, k_clients, k_agg, k_server = jax.random.split(key, 5)
    cohort = _sample_uniform(k_sample, num_clients, clients_per_round)
    new_cohort = jnp.mod(state.round, period) == 0
    if period > 1:
      cohort = jnp.where(new_cohort, cohort, state.cohort)
    ids = jnp.concatenate([cohort, jnp.zeros([c_pad - clients_per_round], jnp.int32)])
    real = (jnp.arange(c_pad) < clients_per_round).astype(jnp.float32)
    # Per-slot keys by fold_in, so a client's randomness does not depend on how far the
    # cohort is padded (device count, chunking).
    slots = jnp.arange(c_pad)
    if dropout_rate > 0:
      drop_u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(k_drop, i)))(slots)
      real = real * (drop_u >= dropout_rate)
    keys = jax.vmap(lambda i: jax.random.fold_in(k_clients, i))(slots)
    masks = (comm.find_uplink_mask(state.opt_state),
             comm.find_uplink_mask(state.opt_state, "train_mask"))
    upload_mask = masks[0]
    start = cstate = None
    if persistent:
      start = jax.tree.map(
          lambda g, c: jnp.where(new_cohort, jnp.broadcast_to(g[None], c.shape), c),
          state.params, state.cohort_params)
    if stateful_uplink:
      cstate = jax.tree.map(lambda c: c[ids], state.client_states)
    xs = _SlotInputs(ids, keys, real, start, cstate)
    server = (state.params, state.model_state)
    res = run_cohort(server, data, masks, xs)
    grad_sums = None
    if not stream:
      out, deltas, weights, finite, sent, local, cstate = res
      aggregate, agg_state = aggregator.update(deltas, state.aggregator_state, state.params,
                                               weights=weights, key=k_agg)
      client_ms = jtree.weighted_mean(out.model_state, weights)
      metrics_c = out.metrics
      sent_total = jax.tree.map(lambda s: jnp.sum(s), sent)
      client_updates = deltas
      grad_sums = out.grad_sum
    else:
      (dsum, msum, wtot, sent_total), (metrics_c, weights, finite, local, cstate) = res
      inv = jtree.safe_reciprocal(wtot)
      aggregate = jax.tree.map(lambda s: s * inv.astype(s.dtype), dsum)
      client_ms = jax.tree.map(lambda s: s * inv.astype(s.dtype), msum)
      agg_state = state.aggregator_state
      client_updates = None

    total_w = jnp.sum(weights)
    model_state = jtree.select_tree(total_w > 0, client_ms, state.model_state)
    updates, opt_state = server_tx.update(
        aggregate, state.opt_state, state.params, client_updates=client_updates,
        client_weights=weights, key=k_server, round=state.round,
        client_grad_sums=grad_sums if track_grads else None)
    params = optax.apply_updates(state.params, updates)
    params = jshard.constrain_replicated(params, mesh)
    cohort_params = None
    if persistent:
      # Synchronised layers (and quarantined clients) restart from the new global model;
      # the rest stay local on the client that holds the slot.
      sync = (jax.tree.map(lambda _: True, params) if upload_mask is None else upload_mask)
      fin = finite.astype(bool)
      cohort_params = jax.tree.map(
          lambda g, l, s: jnp.where(
              s | ~fin.reshape((-1,) + (1,) * g.ndim), jnp.broadcast_to(g[None], l.shape), l),
          params, local, sync)
      cohort_params = jshard.constrain_clients(cohort_params, mesh)
    client_states = state.client_states
    if stateful_uplink:
      # Commit the per-client uplink state of clients that took part (not padding, dropped
      # or quarantined slots: their index points past the end and the write is dropped).
      commit = jnp.where((real * finite) > 0, ids, num_clients)
      client_states = jax.tree.map(lambda s, c: s.at[commit].set(c, mode="drop"),
                                   state.client_states, cstate)

    participants = real * finite
    n_part = jnp.maximum(jnp.sum(participants), 1.0)
    n_real = jnp.maximum(jnp.sum(real), 1.0)
    up_elems = sum(jax.tree.leaves(sent_total))
    size = float(jtree.num_params(state.params))
    itemsize = float(np.dtype(jax.tree.leaves(state.params)[0].dtype).itemsize)
    metrics = {
        "train_loss": jnp.sum(metrics_c["loss"] * participants) / n_part,
        "grad_norm": jnp.sum(metrics_c["grad_norm"] * participants) / n_part,
        "examples": jnp.sum(metrics_c["examples"] * real),
        "participants": jnp.sum(participants),
        "nonfinite_clients": jnp.sum(real * (1.0 - finite)),
        "update_norm": jtree.global_norm(updates),
        "uplink_elements": up_elems,
        "uplink_bytes": up_elems * itemsize * (2.0 if algorithm.sparse_uplink else 1.0),
        "downlink_bytes": jnp.sum(real) * size * itemsize,
        "rel_uplink": up_elems / (n_real * size),
    }
    new_state = ServerState(
        params=params, model_state=model_state, opt_state=opt_state, aggregator_state=agg_state,
        round=optax.safe_increment(state.round),
        uplink_elements=jax.tree.map(jnp.add, state.uplink_elements, sent_total), cohort=cohort,
        cohort_params=cohort_params, client_states=client_states)
    return new_state, metrics

  if mesh is None:
    platform, local_devices = jax.default_backend(), 1
  else:
    platform = mesh.devices.flat[0].platform
    local_devices = sum(dv.process_index == jax.process_index() for dv in mesh.devices.flat)
  jit_step = jax.jit(step, donate_argnums=(0,) if donate else (),
                     compiler_options=compiler_options(platform, local_devices))
  return Round(init, jit_step, mesh, clients_per_round, c_pad, chunk, bool(stream))
