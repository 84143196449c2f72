"""Client samplers: who takes part in a round (the ``ClientSampler`` contract).

A sampler is a NamedTuple of three pure functions, like optax's ``GradientTransformation``:

* ``init(num_clients, cohort_size) -> state`` (a pytree; checkpointed with the server state);
* ``select(key, state, round, *, num_clients, cohort_size, **context) -> ids``
  (i32[cohort_size], distinct client ids, in-graph from the round's key); ``context`` holds
  ``client_sizes`` (f32[N]) and ``client_loss(ids, key) -> f32[len(ids)]``, the current global
  model's mean loss on a random batch of each given client's data (computed only if called);
* ``update(state, ids, metrics) -> state`` after the round, where ``metrics`` is a
  :class:`ClientMetrics` of the selected clients (mean training loss, mean gradient norm,
  steps, examples, and whether each one's update was used).

* optionally ``metrics(state) -> {name: f32[]}``: diagnostics the round reports as
  ``sampler/<name>``.

The round calls nothing else, so a stateful activation policy (loss- or gradient-norm-biased
sampling, Power-of-choice) or a fixed cohort schedule is a sampler, not an engine flag.
``num_clients`` and ``cohort_size`` are static Python ints.

Example, a sampler that always activates the lowest-loss clients seen so far::

    def lowest_loss():
      def init(n, m):
        return jnp.full([n], jnp.inf)
      def select(key, losses, round, *, num_clients, cohort_size, **context):
        noise = jax.random.uniform(key, [num_clients]) * 1e-6  # random tie-break
        return jnp.argsort(losses + noise)[:cohort_size].astype(jnp.int32)
      def update(losses, ids, metrics):
        new = jnp.where(metrics.participated > 0, metrics.loss, losses[ids])
        return losses.at[ids].set(new)
      return jaxfl.sampling.ClientSampler(init, select, update)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class ClientMetrics(NamedTuple):
  """What the round tells a sampler about the clients it selected (leading axis = cohort).

  Attributes:
    loss: f32[m] each client's mean training loss over its local steps.
    grad_norm: f32[m] each client's mean global gradient norm over its local steps.
    steps: f32[m] local steps taken.
    examples: f32[m] examples processed.
    participated: f32[m] 1 where the client's update reached the aggregate (not dropped,
      not quarantined), else 0; the other fields are meaningless where it is 0.
  """

  loss: jax.Array
  grad_norm: jax.Array
  steps: jax.Array
  examples: jax.Array
  participated: jax.Array


class ClientSampler(NamedTuple):
  """The sampler contract: ``init``, ``select``, ``update``, optional ``metrics`` (see the
  module docstring)."""

  init: Callable[[int, int], Any]
  select: Callable[..., jax.Array]
  update: Callable[[Any, jax.Array, ClientMetrics], Any]
  metrics: Callable[[Any], dict] | None = None


def _keep_state(state, ids, metrics):
  del ids, metrics
  return state


def uniform() -> ClientSampler:
  """Uniform sampling without replacement (McMahan et al., 2017); stateless.

  Returns:
    A :class:`ClientSampler` whose ``select`` is ``jax.random.choice(key, N, (m,),
    replace=False)``.
  """

  def init(num_clients, cohort_size):
    del num_clients, cohort_size
    return optax.EmptyState()

  def select(key, state, round, *, num_clients, cohort_size, **context):
    del state, round, context
    return jax.random.choice(key, num_clients, (cohort_size,), replace=False).astype(jnp.int32)

  return ClientSampler(init, select, _keep_state)


class PeriodicState(NamedTuple):
  """State of :func:`periodic`: the inner sampler's state and the current cohort."""

  inner: Any
  cohort: jax.Array


def periodic(period: int | None, sampler: ClientSampler | None = None) -> ClientSampler:
  """Keeps one cohort for ``period`` rounds, then draws a new one with ``sampler``.

  FedLAMA (Lee et al., AAAI 2023) resamples its cohort every :math:`\\phi` rounds, so that
  layers with the long interval :math:`\\phi\\tau'` are averaged over the clients that trained
  them. A new cohort is drawn in rounds ``r`` with ``r % period == 0``. Partial model
  averaging (:func:`jaxfl.algorithms.pma`) never has every parameter in sync, so with
  ``period=None`` it keeps the cohort drawn in round 0 for the whole run.

  Args:
    period: rounds per cohort (>= 1; 1 = a new cohort every round; None = one cohort for
      the whole run).
    sampler: the sampler that draws each new cohort (default :func:`uniform`); its ``update``
      sees every round's metrics.

  Returns:
    A :class:`ClientSampler` with :class:`PeriodicState`.
  """
  if period is not None and (not isinstance(period, int | np.integer) or period < 1):
    raise ValueError(f"`period` must be a positive int or None, got {period!r}.")
  sampler = uniform() if sampler is None else sampler

  def init(num_clients, cohort_size):
    return PeriodicState(sampler.init(num_clients, cohort_size),
                         jnp.zeros([cohort_size], jnp.int32))

  def select(key, state, round, *, num_clients, cohort_size, **context):
    fresh = sampler.select(key, state.inner, round, num_clients=num_clients,
                           cohort_size=cohort_size, **context)
    if period == 1:
      return fresh
    new = round == 0 if period is None else jnp.mod(round, period) == 0
    return jnp.where(new, fresh, state.cohort)

  def update(state, ids, metrics):
    return PeriodicState(sampler.update(state.inner, ids, metrics), ids)

  inner_metrics = None if sampler.metrics is None else (lambda st: sampler.metrics(st.inner))
  return ClientSampler(init, select, update, inner_metrics)


def fixed_schedule(cohorts) -> ClientSampler:
  """Replays a given schedule: round ``r`` trains ``cohorts[r % R]``.

  For comparisons against other simulators (the same clients every round) and for replaying
  a paper's published schedule.

  Args:
    cohorts: int array-like [R, m] of client ids, each row without repeats.

  Returns:
    A :class:`ClientSampler`; ``init`` checks the schedule against the population and the
    cohort size.
  """
  table = np.asarray(cohorts)
  if table.ndim != 2 or not np.issubdtype(table.dtype, np.integer):
    raise ValueError(f"`cohorts` must be an int array [rounds, cohort_size], got dtype "
                     f"{table.dtype} and shape {table.shape}.")
  if any(len(set(row.tolist())) != len(row) for row in table):
    raise ValueError("`cohorts`: a row repeats a client id.")
  table = table.astype(np.int32)

  def init(num_clients, cohort_size):
    if table.shape[1] != cohort_size:
      raise ValueError(f"`cohorts` has {table.shape[1]} clients per round, but the round "
                       f"trains clients_per_round={cohort_size}.")
    if table.min() < 0 or table.max() >= num_clients:
      raise ValueError(f"`cohorts` ids must lie in [0, {num_clients}), got "
                       f"[{table.min()}, {table.max()}].")
    return optax.EmptyState()

  def select(key, state, round, *, num_clients, cohort_size, **context):
    del key, state, num_clients, cohort_size, context
    return jnp.asarray(table)[jnp.mod(round, table.shape[0])]

  return ClientSampler(init, select, _keep_state)


class MultiMetricState(NamedTuple):
  """State of :func:`multi_metric`.

  Attributes:
    loss: f32[N] each client's mean training loss at its last participation (+inf before).
    grad_norm: f32[N] each client's mean gradient norm at its last participation (0 before).
    participation: i32[N] rounds each client took part in.
    count: i32[] rounds seen (drives the tie-break key).
    key: u32[2] raw key data of the tie-break permutations.
    outside_norm_set: f32[] activated clients outside S_N in the last round.
    outside_loss_set: f32[] activated clients outside S_L in the last round.
  """

  loss: jax.Array
  grad_norm: jax.Array
  participation: jax.Array
  count: jax.Array
  key: jax.Array
  outside_norm_set: jax.Array
  outside_loss_set: jax.Array


def _ordered(values, key, tie_break):
  """Indices sorting ``values`` ascending; ties in a random order or by index (stable)."""
  if tie_break == "index":
    return jnp.argsort(values, stable=True)
  perm = jax.random.permutation(key, values.shape[0])
  return perm[jnp.argsort(values[perm], stable=True)]


METRIC_MODES = ("both", "loss", "norm")


def multi_metric(extra: int = 8, ratio: float = 256.0, *, mode: str = "both",
                 tie_break: str = "random", seed: int = 0) -> ClientSampler:
  r"""Multi-metric client activation: favour high stored loss and low stored gradient norm.

  Each client keeps the loss :math:`L_i` (init :math:`+\infty`) and gradient norm
  :math:`G_i` (init 0) of its last participation (means over its local steps). Every round

  .. math::
    S_L &= \text{the } m + b \text{ clients with the largest } L_i, \\
    S_N &= \text{the } m \text{ clients of } S_L \text{ with the smallest } G_i, \\
    w_i &= r^{[i \in S_L]}\, r^{[i \in S_N]},

  and :math:`m` clients are drawn without replacement with :math:`p_i \propto w_i`. Only the
  activated clients' :math:`L_i, G_i` are overwritten. With :math:`b = 8, r = 256, m = 32,
  N = 128` the draw is nearly deterministic: about 0.13 activations per round fall outside
  :math:`S_N` (NEXT_METHODS.md §A.2); rotation comes from the staleness of stored losses.

  Args:
    extra: :math:`b`, the clients of :math:`S_L` beyond :math:`m`.
    ratio: :math:`r`.
    mode: ``"both"`` (the rule above), ``"loss"`` (ablation: :math:`w_i = r^{[i\in S_L]}`)
      or ``"norm"`` (ablation: the :math:`m` clients with the smallest :math:`G_i`).
    tie_break: ``"random"`` (default: ties, e.g. every unseen client at :math:`+\infty`,
      in a fresh random order each round) or ``"index"`` (stable index order; reproduces the
      reference's argsort order on the first round, S_N = ids N-m-b .. N-b-1).
    seed: seed of the tie-break permutations.

  Returns:
    A :class:`ClientSampler` with :class:`MultiMetricState` and diagnostics
    ``outside_norm_set``, ``outside_loss_set``, ``unseen_clients``.

  References:
    Lim, Zhang & Lee, "Multi-Metric Client Activation for Federated Learning", ACM TIST 2026
    (official code ``jjihyunh/multi-metric-fl``, ``client_sampling.multi_metric``).
  """
  if mode not in METRIC_MODES:
    raise ValueError(f"`mode` must be one of {METRIC_MODES}, got {mode!r}.")
  if tie_break not in ("random", "index"):
    raise ValueError(f"`tie_break` must be 'random' or 'index', got {tie_break!r}.")
  if not isinstance(extra, int | np.integer) or extra < 0:
    raise ValueError(f"`extra` must be a non-negative int, got {extra!r}.")
  if not ratio >= 1.0:
    raise ValueError(f"`ratio` must be >= 1, got {ratio!r}.")

  def init(num_clients, cohort_size):
    if cohort_size + extra > num_clients and mode != "norm":
      raise ValueError(f"multi_metric needs clients_per_round + extra <= num_clients, got "
                       f"{cohort_size} + {extra} > {num_clients}.")
    return MultiMetricState(
        jnp.full([num_clients], jnp.inf, jnp.float32), jnp.zeros([num_clients], jnp.float32),
        jnp.zeros([num_clients], jnp.int32), jnp.zeros([], jnp.int32),
        jax.random.key_data(jax.random.key(seed)), jnp.zeros([], jnp.float32),
        jnp.zeros([], jnp.float32))

  def sets(state, num_clients, cohort_size):
    """bool[N] membership of S_L and S_N (a function of the state alone)."""
    k_loss, k_norm = jax.random.split(
        jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count))
    if mode == "norm":
      s_l = jnp.ones([num_clients], bool)
      low = _ordered(state.grad_norm, k_norm, tie_break)[:cohort_size]
      return s_l, jnp.zeros([num_clients], bool).at[low].set(True)
    top = _ordered(state.loss, k_loss, tie_break)[num_clients - cohort_size - extra:]
    s_l = jnp.zeros([num_clients], bool).at[top].set(True)
    # The m lowest norms within S_L (ties in the same tie-break order).
    g = jnp.where(s_l, state.grad_norm, jnp.inf)
    low = _ordered(g, k_norm, tie_break)[:cohort_size]
    s_n = jnp.zeros([num_clients], bool).at[low].set(True) & s_l
    return s_l, s_n

  def select(key, state, round, *, num_clients, cohort_size, **context):
    del round, context
    s_l, s_n = sets(state, num_clients, cohort_size)
    if mode == "norm":
      return jnp.flatnonzero(s_n, size=cohort_size).astype(jnp.int32)
    w = jnp.where(s_l, ratio, 1.0)
    if mode == "both":
      w = w * jnp.where(s_n, ratio, 1.0)
    return jax.random.choice(key, num_clients, (cohort_size,), replace=False,
                             p=w / jnp.sum(w)).astype(jnp.int32)

  def update(state, ids, metrics):
    s_l, s_n = sets(state, state.loss.shape[0], ids.shape[0])
    took = metrics.participated > 0
    loss = state.loss.at[ids].set(jnp.where(took, metrics.loss, state.loss[ids]))
    norm = state.grad_norm.at[ids].set(jnp.where(took, metrics.grad_norm, state.grad_norm[ids]))
    return MultiMetricState(
        loss, norm, state.participation.at[ids].add(took.astype(jnp.int32)),
        state.count + 1, state.key, jnp.sum(~s_n[ids]).astype(jnp.float32),
        jnp.sum(~s_l[ids]).astype(jnp.float32))

  def metrics(state):
    return {"outside_norm_set": state.outside_norm_set,
            "outside_loss_set": state.outside_loss_set,
            "unseen_clients": jnp.sum(state.participation == 0).astype(jnp.float32)}

  return ClientSampler(init, select, update, metrics)


def power_of_choice(candidates: int = 48) -> ClientSampler:
  r"""Power-of-choice (Cho, Wang & Joshi, AISTATS 2022).

  Draw :math:`d` candidates without replacement with probability proportional to their data
  size, evaluate the current global model's loss on each candidate's data, activate the
  :math:`m` with the largest loss. The loss is the mean cross-entropy on a random batch of the
  client's data (``client_loss`` of the round's context: the paper's computation-efficient
  variant estimates it on a mini-batch too).

  Args:
    candidates: :math:`d` (>= the cohort size).

  Returns:
    A :class:`ClientSampler` with a participation count (diagnostic ``unseen_clients``).

  References:
    Cho, Wang & Joshi, "Towards Understanding Biased Client Selection in Federated
    Learning", AISTATS 2022.
  """
  if not isinstance(candidates, int | np.integer) or candidates < 1:
    raise ValueError(f"`candidates` must be a positive int, got {candidates!r}.")

  def init(num_clients, cohort_size):
    if not cohort_size <= candidates <= num_clients:
      raise ValueError(f"power_of_choice needs clients_per_round <= candidates <= num_clients, "
                       f"got {cohort_size}, {candidates}, {num_clients}.")
    return jnp.zeros([num_clients], jnp.int32)

  def select(key, state, round, *, num_clients, cohort_size, client_sizes=None,
             client_loss=None, **context):
    del state, round, context
    if client_loss is None or client_sizes is None:
      raise ValueError("power_of_choice needs `client_sizes` and `client_loss` (the round "
                       "passes them).")
    k_cand, k_loss = jax.random.split(key)
    sizes = jnp.asarray(client_sizes, jnp.float32)
    cand = jax.random.choice(k_cand, num_clients, (candidates,), replace=False,
                             p=sizes / jnp.sum(sizes))
    losses = client_loss(cand, k_loss)
    _, top = jax.lax.top_k(losses, cohort_size)
    return cand[top].astype(jnp.int32)

  def update(state, ids, metrics):
    return state.at[ids].add((metrics.participated > 0).astype(jnp.int32))

  def metrics(state):
    return {"unseen_clients": jnp.sum(state == 0).astype(jnp.float32)}

  return ClientSampler(init, select, update, metrics)


SAMPLERS = {"uniform": uniform, "multi_metric": multi_metric,
            "power_of_choice": power_of_choice}

__all__ = ["METRIC_MODES", "SAMPLERS", "ClientMetrics", "ClientSampler", "MultiMetricState",
           "PeriodicState", "fixed_schedule", "multi_metric", "periodic", "power_of_choice",
           "uniform"]
