"""The stages of one federated round, each a pure function (composed by ``build_round``).

    validate -> init -> sample cohort -> [client view -> local update -> uplink -> quarantine
    -> ledger] mapped over the cohort -> aggregate -> server transform -> apply -> memory and
    sampler updates -> metrics

The bracketed part runs per cohort slot (:func:`make_train_slot`), mapped over the cohort by
:func:`make_map_clients` (``shard_map`` over the ``"clients"`` mesh, ``lax.scan`` over chunks,
``vmap`` inside a chunk). Nothing here knows an algorithm by name: algorithms differ only in
the contracts they hand the stages (:mod:`jaxfl.sampling`, :mod:`jaxfl.views`,
:mod:`jaxfl.memory`, :mod:`jaxfl.aggregation`, :class:`jaxfl.comm.Ledger`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxfl import sharding as jshard
from jaxfl import tree as jtree
from jaxfl.aggregation import LinearAggregator
from jaxfl.memory import ClientResult
from jaxfl.models import Model, batched_clients
from jaxfl.sampling import ClientMetrics
from jaxfl.views import ServerSnapshot, SlotInfo

NAN_POLICIES = ("drop", "raise")


# ----------------------------------------------------------------------------- validate


class Layout(NamedTuple):
  """The static execution layout of a round (resolved once, before any trace).

  Attributes:
    cohort: clients per round C.
    padded: slots after padding to a multiple of the devices and of the chunk.
    chunk: slots trained at once over all devices.
    local_chunk: slots one device trains at once (vmapped when > 1).
    devices: devices on the client axis.
    stream: whether the aggregate is accumulated chunk by chunk.
  """

  cohort: int
  padded: int
  chunk: int
  local_chunk: int
  devices: int
  stream: bool

  @property
  def n_chunks(self) -> int:
    return self.padded // self.chunk


def _positive_int(name, v):
  if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
    raise ValueError(f"`{name}` must be a positive int, got {v!r}.")


def validate(algorithm, model, *, num_clients, max_client_size, clients_per_round,
             nan_policy, dropout_rate, clients_per_chunk, stream_aggregate,
             report_grad_norm=False) -> None:
  """Checks every build argument (and the sampler against the population) before tracing.

  Raises:
    TypeError / ValueError naming the argument and what was expected.
  """
  from jaxfl.algorithms._base import validate_algorithm

  validate_algorithm(algorithm)
  if not isinstance(model, Model):
    raise TypeError(f"`model` must be a jaxfl.models.Model, got {type(model).__name__}.")
  for name, v in (("num_clients", num_clients), ("max_client_size", max_client_size),
                  ("clients_per_round", clients_per_round)):
    _positive_int(name, v)
  if clients_per_round > num_clients:
    raise ValueError(f"`clients_per_round`={clients_per_round} exceeds the population "
                     f"num_clients={num_clients}.")
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"`nan_policy` must be one of {NAN_POLICIES}, got {nan_policy!r}.")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"`dropout_rate` must be in [0, 1), got {dropout_rate!r}.")
  if stream_aggregate not in (True, False, "auto"):
    raise ValueError(f"`stream_aggregate` must be True, False or 'auto', got {stream_aggregate!r}.")
  if not isinstance(report_grad_norm, bool):
    raise TypeError(f"`report_grad_norm` must be a bool, got {report_grad_norm!r}.")
  if clients_per_chunk not in (None, "auto"):
    _positive_int("clients_per_chunk", clients_per_chunk)
  streamable = isinstance(algorithm.aggregator, LinearAggregator) and not algorithm.server_inputs
  if stream_aggregate is True and not streamable:
    raise ValueError("`stream_aggregate=True` needs a jaxfl.aggregation.LinearAggregator and an "
                     "algorithm without `server_inputs` (robust aggregators and FedLAMA/PruneFL "
                     "need every client's update at once).")
  # Samplers check themselves against the population in init (e.g. a fixed schedule).
  jax.eval_shape(lambda: algorithm.sampler.init(num_clients, clients_per_round))


def resolve_layout(algorithm, *, clients_per_round, mesh, clients_per_chunk,
                   stream_aggregate) -> Layout:
  """Pads the cohort, picks the chunking (``"auto"``: by backend) and whether to stream."""
  d = 1 if mesh is None else mesh.devices.size
  padded = jshard.padded_cohort_size(clients_per_round, mesh)
  if clients_per_chunk == "auto":
    clients_per_chunk = 1 if jax.default_backend() == "cpu" else None
  if stream_aggregate is True:
    clients_per_chunk = clients_per_chunk or padded
  chunk = padded
  if clients_per_chunk is not None:
    chunk = -(-min(clients_per_chunk, padded) // d) * d
    padded = -(-padded // chunk) * chunk
  streamable = isinstance(algorithm.aggregator, LinearAggregator) and not algorithm.server_inputs
  stream = bool(stream_aggregate) and streamable and padded // chunk > 1
  return Layout(clients_per_round, padded, chunk, chunk // d, d, stream)


# ----------------------------------------------------------------------------- sample


class Cohort(NamedTuple):
  """The round's cohort, padded to ``Layout.padded`` slots.

  Attributes:
    ids: i32[S] client ids (padding slots hold client 0 and never count).
    slots: i32[S] slot positions.
    keys: per-slot PRNG keys (``fold_in(key, slot)``: a client's randomness does not depend
      on how far the cohort is padded).
    real: f32[S] 1 for a sampled client that did not drop out.
  """

  ids: jax.Array
  slots: jax.Array
  keys: jax.Array
  real: jax.Array


def make_client_loss(model: Model, data, params, model_state, batch_size: int):
  """``client_loss(ids, key) -> f32[len(ids)]``: the global model's mean cross-entropy on a
  random batch (with replacement) of each client's examples, for samplers that rank clients
  by their current loss (Power-of-choice). Traced only if a sampler calls it."""

  def one(cid, key):
    size = jnp.maximum(data.client_sizes[cid], 1)
    rows = data.client_indices[cid][jax.random.randint(key, (batch_size,), 0, size)]
    logits, _ = model.apply(params, model_state, data.x[rows], train=False)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, data.y[rows]))

  def client_loss(ids, key):
    keys = jax.random.split(key, ids.shape[0])
    return jax.lax.map(lambda a: one(*a), (ids, keys))

  return client_loss


def sample_cohort(sampler, sampler_state, keys, round, *, num_clients: int, layout: Layout,
                  dropout_rate: float, context: dict | None = None) -> tuple[jax.Array, Cohort]:
  """Asks the sampler for the cohort and lays it out in slots.

  Args:
    sampler: the :class:`jaxfl.sampling.ClientSampler`.
    sampler_state: its state.
    keys: ``(k_sample, k_drop, k_clients)``.
    round: i32[] round index.
    num_clients: population size N.
    layout: the :class:`Layout`.
    dropout_rate: probability that a sampled client drops out.
    context: keyword context for ``select`` (``client_sizes``, ``client_loss``).

  Returns:
    ``(selected, cohort)``: the sampler's i32[C] ids and the padded :class:`Cohort`.
  """
  k_sample, k_drop, k_clients = keys
  c, s = layout.cohort, layout.padded
  selected = sampler.select(k_sample, sampler_state, round, num_clients=num_clients,
                            cohort_size=c, **(context or {}))
  ids = jnp.concatenate([selected, jnp.zeros([s - c], jnp.int32)])
  real = (jnp.arange(s) < c).astype(jnp.float32)
  slots = jnp.arange(s)
  if dropout_rate > 0:
    drop_u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(k_drop, i)))(slots)
    real = real * (drop_u >= dropout_rate)
  keys = jax.vmap(lambda i: jax.random.fold_in(k_clients, i))(slots)
  return selected, Cohort(ids, slots, keys, real)


# ----------------------------------------------------------------------------- per slot


class SlotInputs(NamedTuple):
  """One slot's inputs (leading axis = slot when stacked)."""

  id: jax.Array
  slot: jax.Array
  key: jax.Array
  real: jax.Array
  row: Any  # the slot's client-memory row, or None


class SlotOutputs(NamedTuple):
  """One slot's outputs of the client stage."""

  metrics: dict
  model_state: Any
  delta: Any
  weight: jax.Array
  finite: jax.Array
  sent: Any
  grad_sum: Any
  local: Any
  uplink_state: Any
  upload_mask: Any = None  # f32 masks, kept only for an aggregator that reads them


def wants_client_masks(aggregator) -> bool:
  """Whether the aggregator reads the clients' upload masks: a general aggregator may (it is
  handed ``client_masks=``); a linear one only when it declares ``masked``."""
  return not isinstance(aggregator, LinearAggregator) or aggregator.masked


def _all_finite(tree):
  out = jnp.asarray(True)
  for x in jax.tree.leaves(tree):
    out = out & jnp.all(jnp.isfinite(x))
  return out


def make_slot_view(algorithm, cohort_size: int | None = None):
  """The view stage for one unbatched slot: ``slot_view(server, x) -> ClientStart``.

  Its key is folded from the slot's key apart from the keys of training and the uplink, so
  tracing it alone (for the upload masks' shapes) sees what the client stage sees.
  """
  def slot_view(server: ServerSnapshot, x: SlotInputs):
    info = SlotInfo(x.id, x.slot, jax.random.fold_in(x.key, 2), cohort_size)
    return algorithm.view.apply(server, info, x.row)

  return slot_view


def upload_mask_shapes(slot_view, server: ServerSnapshot, x: SlotInputs):
  """The f32 upload masks' shapes for one slot (``None`` if the view declares none), from an
  abstract trace of the view alone: no client update is traced."""
  as_f32 = lambda t: None if t is None else jax.tree.map(
      lambda m: jnp.asarray(m, jnp.float32), t)
  return jax.eval_shape(lambda s, a: as_f32(slot_view(s, a).upload_mask), server, x)


def make_train_slot(algorithm, client_update, keep_uplink_state: bool,
                    cohort_size: int | None = None):
  """The per-slot client stage: view -> local update -> uplink -> quarantine -> ledger.

  Args:
    algorithm: the :class:`jaxfl.algorithms.Algorithm` (its view, uplink, ledger, weighting).
    client_update: from :func:`jaxfl.client.make_client_update`.
    keep_uplink_state: return the uplink state (for a client-memory write).
    cohort_size: :math:`C`, handed to the view in :class:`jaxfl.views.SlotInfo`.

  Returns:
    ``train_slot(server: ServerSnapshot, data, x: SlotInputs) -> SlotOutputs`` for one
    unbatched slot (the caller maps it).
  """
  uplink = (None if algorithm.uplink is None
            else optax.with_extra_args_support(algorithm.uplink))
  keep_masks = wants_client_masks(algorithm.aggregator)
  slot_view = make_slot_view(algorithm, cohort_size)

  def train_slot(server: ServerSnapshot, data, x: SlotInputs) -> SlotOutputs:
    params = server.params
    train_key, uplink_key = jax.random.split(x.key)
    start = slot_view(server, x)
    p0 = params if start.params is None else start.params
    # Every client optimizer may read the round index (per-round LR schedules).
    context = {"round": server.round, **(start.context or {})}
    if server.hyperparams:  # written into the client optimizer's state after its init
      context["hyperparams"] = server.hyperparams
    out = client_update(p0, server.model_state, data.x, data.y, data.client_indices[x.id],
                        data.client_sizes[x.id], train_key, start.train_mask, context)
    delta, local = out.delta, None
    if start.params is not None:
      local = jax.tree.map(jnp.subtract, p0, out.delta)
      # The server sees x_t - x^i: for parameters kept locally since an earlier round this
      # adds the drift accumulated there; for ones that started from x_t it is exact.
      delta = jax.tree.map(lambda g, s, d: (g - s) + d, params, p0, out.delta)
    ustate = None
    if uplink is not None:
      ustate = uplink.init(delta) if start.uplink_state is None else start.uplink_state
      delta, ustate = uplink.update(delta, ustate, params, key=uplink_key)
    if start.upload_mask is not None:
      delta = jax.tree.map(lambda d, m: d * jnp.asarray(m).astype(d.dtype), delta,
                           start.upload_mask)
    # One pass per leaf answers both "finite?" and "all zeros?" (an L1 norm that overflows
    # f32 quarantines the client too).
    abs_sums = jax.tree.map(lambda d: jnp.sum(jnp.abs(d)), delta)
    finite = (_all_finite(abs_sums) & _all_finite(out.model_state)
              & jnp.isfinite(out.metrics["loss"]))
    delta = jax.tree.map(lambda d: jnp.where(finite, d, 0), delta)
    size = data.client_sizes[x.id].astype(jnp.float32)
    base = size if algorithm.weighting == "examples" else jnp.ones_like(size)
    weight = base * x.real * finite
    sent = algorithm.ledger.count(delta, jax.tree.map(lambda a: jnp.where(finite, a, 0.0),
                                                      abs_sums), start, ustate)
    sent = jax.tree.map(lambda s: s * x.real, sent)
    mask = None
    if keep_masks and start.upload_mask is not None:
      mask = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), start.upload_mask)
    return SlotOutputs(out.metrics, out.model_state, delta, weight, finite, sent, out.grad_sum,
                       local, ustate if keep_uplink_state else None, mask)

  return train_slot


def client_metrics(outs: SlotOutputs) -> dict:
  """The per-client metrics aggregators see: f32 ``loss``, ``grad_norm``, ``examples``,
  ``steps`` (leading axis = slot)."""
  return {k: outs.metrics[k].astype(jnp.float32)
          for k in ("loss", "grad_norm", "examples", "steps")}


# ----------------------------------------------------------------------------- map clients


class Streamed(NamedTuple):
  """Sums accumulated chunk by chunk (streaming), already all-reduced over devices."""

  delta: Any  # sum_i c_i u_i
  scalars: dict  # the aggregator's summed per-client scalars
  model_state: Any  # sum_i w_i ms_i
  weight: jax.Array  # sum_i w_i
  sent: Any  # per-leaf elements
  mask: Any  # sum_i c_i m_i of the upload masks (a masked aggregator), else None


def _streamed_sums(aggregator, r: SlotOutputs) -> Streamed:
  c, scalars = aggregator.coefficients(r.weight, client_metrics(r))
  mask = None if r.upload_mask is None else jtree.weighted_sum(r.upload_mask, c)
  return Streamed(jtree.weighted_sum(r.delta, c), {k: jnp.sum(v) for k, v in scalars.items()},
                  jtree.weighted_sum(r.model_state, r.weight), jnp.sum(r.weight),
                  jax.tree.map(jnp.sum, r.sent), mask)


def _zero_sums(aggregator, server: ServerSnapshot, n: int, mask_shapes) -> Streamed:
  """Zeros shaped like :class:`Streamed` (the scalars' names from the aggregator, the mask
  sums' shapes from one slot's upload masks ``mask_shapes``)."""
  f32 = jax.ShapeDtypeStruct([n], jnp.float32)
  _, scalars = jax.eval_shape(aggregator.coefficients, f32, {
      k: f32 for k in ("loss", "grad_norm", "examples", "steps")})
  zeros = lambda t: jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), t)
  scalar = jnp.zeros([], jnp.float32)
  mask = None
  if mask_shapes is not None:
    mask = jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32), mask_shapes)
  return Streamed(zeros(server.params), {k: scalar for k in scalars}, zeros(server.model_state),
                  scalar, jax.tree.map(lambda _: scalar, server.params), mask)


def make_map_clients(train_slot, aggregator, layout: Layout, mesh, slot_view=None):
  """Maps the per-slot stage over the cohort: ``shard_map`` over devices, ``lax.scan`` over a
  device's chunks, ``vmap`` inside a chunk of several slots (a chunk of one runs unbatched:
  native convs and a real branch over a ragged client's skipped steps).

  Args:
    train_slot: from :func:`make_train_slot`.
    aggregator: the algorithm's aggregator (its streamed sums, when ``layout.stream``).
    layout: from :func:`resolve_layout`.
    mesh: the client mesh.
    slot_view: from :func:`make_slot_view`; a masked aggregator that streams needs it (the
      mask sums' shapes come from the view alone).

  Returns:
    ``map_clients(server, data, xs) -> SlotOutputs`` (stacked over slots), or with
    ``layout.stream`` ``(Streamed, SlotOutputs without delta/model_state/grad_sum)``.
  """
  local_chunk, on_mesh = layout.local_chunk, layout.devices > 1

  def run_chunk(server, data, xs):
    if local_chunk == 1:
      r = train_slot(server, data, jax.tree.map(lambda a: a[0], xs))
      return jax.tree.map(lambda a: a[None], r)
    with batched_clients():
      return jax.vmap(functools.partial(train_slot, server, data))(xs)

  def per_device(server, data, xs):
    if on_mesh:  # per-client values vary over devices: grads w.r.t. them are never psummed
      server, data = jax.lax.pcast((server, data), jshard.AXIS, to="varying")
    n_local = jax.tree.leaves(xs)[0].shape[0]
    chunked = jax.tree.map(
        lambda a: a.reshape((n_local // local_chunk, local_chunk) + a.shape[1:]), xs)
    unchunk = lambda t: jax.tree.map(lambda a: a.reshape((n_local,) + a.shape[2:]), t)
    if not layout.stream:
      if n_local == local_chunk:
        return run_chunk(server, data, xs)
      _, ys = jax.lax.scan(lambda _, x: (None, run_chunk(server, data, x)), None, chunked)
      return unchunk(ys)

    def body(acc, x):
      r = run_chunk(server, data, x)
      acc = jax.tree.map(jnp.add, acc, _streamed_sums(aggregator, r))
      return acc, r._replace(delta=None, model_state=None, grad_sum=None, upload_mask=None)

    # A masked aggregator sums the upload masks, whose shapes only the view knows: trace the
    # view alone for them (no compute, and not the client update a second time).
    shapes = None
    if wants_client_masks(aggregator):
      if slot_view is None:
        raise ValueError("make_map_clients: a masked aggregator that streams needs slot_view "
                         "(from make_slot_view) for the upload masks' shapes")
      shapes = upload_mask_shapes(slot_view, server, jax.tree.map(lambda a: a[0], xs))
    acc0 = _zero_sums(aggregator, server, local_chunk, shapes)
    if on_mesh:
      acc0 = jax.lax.pcast(acc0, jshard.AXIS, to="varying")
    sums, ys = jax.lax.scan(body, acc0, chunked)
    if on_mesh:
      sums = jshard.psum_packed(sums, jshard.AXIS)  # one rendezvous, not one per leaf
    return sums, unchunk(ys)

  if not on_mesh:
    return per_device
  # Each device trains its own block of slots with plain per-device code; the server state
  # and the data are replicated, per-slot inputs and outputs lie along "clients".
  rep, per_slot = P(), P(jshard.AXIS)
  return jax.shard_map(per_device, mesh=mesh, in_specs=(rep, rep, per_slot),
                       out_specs=(rep, per_slot) if layout.stream else per_slot)


# ----------------------------------------------------------------------------- aggregate


class Aggregate(NamedTuple):
  """The aggregation stage's outputs."""

  update: Any  # the pseudo-gradient
  model_state: Any  # weighted mean of the clients' BN statistics
  aggregator_state: Any
  aux: dict  # the aggregator's auxiliary scalars
  sent: Any  # per-leaf elements uploaded by the cohort


def aggregate(aggregator, aggregator_state, params, res, key, stream: bool) -> Aggregate:
  """Combines the cohort's updates: the aggregator over stacked updates, or the linear
  aggregator's ``finalize`` over streamed sums.

  Args:
    aggregator: general or :class:`jaxfl.aggregation.LinearAggregator`.
    aggregator_state: its state.
    params: the global params.
    res: the mapped client stage's output (:func:`make_map_clients`).
    key: the aggregator's PRNG key.
    stream: whether ``res`` holds streamed sums.
  """
  if stream:
    sums, outs = res
    inv = jtree.safe_reciprocal(sums.weight)
    ms = jax.tree.map(lambda s: s * inv.astype(s.dtype), sums.model_state)
    extra = (sums.mask,) if aggregator.masked else ()
    aux = ({} if aggregator.aux is None
           else aggregator.aux(sums.scalars, sums.mask, outs.weight.shape[0]))
    return Aggregate(aggregator.finalize(sums.delta, sums.scalars, *extra), ms, aggregator_state,
                     dict(aux), sums.sent)
  # Upload masks go to the aggregator only where the view declared them (an aggregator
  # written before the mask contract need not accept the keyword).
  masks = {} if res.upload_mask is None else {"client_masks": res.upload_mask}
  out = aggregator.update(res.delta, aggregator_state, params, weights=res.weight, key=key,
                          client_metrics=client_metrics(res), **masks)
  update, state, aux = out if len(out) == 3 else (*out, {})
  return Aggregate(update, jtree.weighted_mean(res.model_state, res.weight), state, dict(aux),
                   jax.tree.map(jnp.sum, res.sent))


# ----------------------------------------------------------------------------- server


def server_step(server_tx, server_inputs, state, agg: Aggregate, outs: SlotOutputs, key,
                mesh):
  """Feeds the pseudo-gradient to the server transform and applies it; a round in which no
  client has weight leaves the params and the server state unchanged.

  Returns:
    ``(updates, opt_state, params)``.
  """
  extra = {"client_updates": outs.delta if "client_updates" in server_inputs else None,
           "client_grad_sums": (outs.grad_sum if "client_grad_sums" in server_inputs
                                else None)}
  updates, opt_state = server_tx.update(agg.update, state.opt_state, state.params,
                                        client_weights=outs.weight, key=key, round=state.round,
                                        **extra)
  # Nobody took part (all dropped or quarantined): the server step is skipped, so FedAvgM's
  # stale momentum or Adam's bias correction cannot move the model on an empty round.
  took_part = jnp.sum(outs.weight) > 0
  params = jtree.select_tree(took_part, optax.apply_updates(state.params, updates), state.params)
  params = jshard.constrain_replicated(params, mesh)
  updates = jtree.select_tree(took_part, updates, optax.tree.zeros_like(updates))
  opt_state = jtree.select_tree(took_part, opt_state, state.opt_state)
  return updates, opt_state, params


def update_memory(memory, mem_state, cohort: Cohort, outs: SlotOutputs, rows, before, after,
                  mesh):
  """Writes every slot's new memory row and commits the rows of clients that took part."""
  if memory is None:
    return None
  result = ClientResult(outs.delta, outs.local, outs.uplink_state, outs.finite,
                        outs.metrics["steps"].astype(jnp.float32), outs.metrics["loss"])
  new_rows = jax.vmap(memory.write, in_axes=(0, 0, None, None))(rows, result, before, after)
  mem_state = memory.scatter(mem_state, cohort.ids, cohort.slots, new_rows, cohort.real)
  return jshard.constrain_clients(mem_state, mesh)


def update_sampler(sampler, sampler_state, selected, cohort: Cohort, outs: SlotOutputs):
  """Feeds the selected clients' metrics (the first C slots) back to the sampler."""
  c = selected.shape[0]
  m = client_metrics(outs)
  metrics = ClientMetrics(m["loss"][:c], m["grad_norm"][:c], m["steps"][:c], m["examples"][:c],
                          (cohort.real * outs.finite)[:c])
  return sampler.update(sampler_state, selected, metrics)


# ----------------------------------------------------------------------------- metrics


def round_metrics(algorithm, params, cohort: Cohort, outs: SlotOutputs, agg: Aggregate,
                  updates, sampler_state, report_grad_norm: bool = False,
                  round_index=None) -> dict:
  """The round's scalar metrics (client means over participants, ledger, aggregator aux);
  ``grad_norm`` only if asked (otherwise XLA drops the per-step norms nobody reads)."""
  real = cohort.real
  participants = real * outs.finite
  n_part = jnp.maximum(jnp.sum(participants), 1.0)
  n_real = jnp.maximum(jnp.sum(real), 1.0)
  up_elems = sum(jax.tree.leaves(agg.sent))
  ledger = algorithm.ledger
  size = float(jtree.num_params(params) if ledger.model_size is None
               else ledger.model_size(params))
  itemsize = float(np.dtype(jax.tree.leaves(params)[0].dtype).itemsize)
  m = outs.metrics
  took = participants > 0
  # A quarantined client's loss may be NaN: select, never multiply by its zero weight.
  mean = lambda v: jnp.where(jnp.any(took), jnp.sum(jnp.where(took, v, 0.0)) / n_part, jnp.nan)
  metrics = {
      "train_loss": mean(m["loss"]),
      "examples": jnp.sum(m["examples"] * real),
      "participants": jnp.sum(participants),
      "nonfinite_clients": jnp.sum(real * (1.0 - outs.finite)),
      "server_step_skipped": (jnp.sum(outs.weight) <= 0).astype(jnp.float32),
      "update_norm": jtree.global_norm(updates),
      "uplink_elements": up_elems,
      "uplink_bytes": up_elems * itemsize * ledger.words_per_element,
      "downlink_bytes": jnp.sum(real) * itemsize * (
          size if ledger.downlink is None
          else jnp.asarray(ledger.downlink(params, round_index), jnp.float32)),
      "rel_uplink": up_elems / (n_real * size),
  }
  if report_grad_norm:
    metrics["grad_norm"] = mean(m["grad_norm"])
  metrics.update({f"aggregator/{k}": jnp.asarray(v, jnp.float32) for k, v in agg.aux.items()})
  if algorithm.sampler.metrics is not None:
    metrics.update({f"sampler/{k}": jnp.asarray(v, jnp.float32)
                    for k, v in algorithm.sampler.metrics(sampler_state).items()})
  return metrics
