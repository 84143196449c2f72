"""Client samplers: who takes part in a round (the ``ClientSampler`` contract).

A sampler is a NamedTuple of three pure functions, like optax's ``GradientTransformation``:

* ``init(num_clients, cohort_size) -> state`` (a pytree; checkpointed with the server state);
* ``select(key, state, round, *, num_clients, cohort_size) -> ids`` (i32[cohort_size],
  distinct client ids, in-graph from the round's key);
* ``update(state, ids, metrics) -> state`` after the round, where ``metrics`` is a
  :class:`ClientMetrics` of the selected clients (mean training loss, mean gradient norm,
  steps, examples, and whether each one's update was used).

The round calls nothing else, so a stateful activation policy (loss- or gradient-norm-biased
sampling, Power-of-choice) or a fixed cohort schedule is a sampler, not an engine flag.
``num_clients`` and ``cohort_size`` are static Python ints.

Example, a sampler that always activates the lowest-loss clients seen so far::

    def lowest_loss():
      def init(n, m):
        return jnp.full([n], jnp.inf)
      def select(key, losses, round, *, num_clients, cohort_size):
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
  """The sampler contract: ``init``, ``select``, ``update`` (see the module docstring)."""

  init: Callable[[int, int], Any]
  select: Callable[..., jax.Array]
  update: Callable[[Any, jax.Array, ClientMetrics], Any]


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

  def select(key, state, round, *, num_clients, cohort_size):
    del state, round
    return jax.random.choice(key, num_clients, (cohort_size,), replace=False).astype(jnp.int32)

  return ClientSampler(init, select, _keep_state)


class PeriodicState(NamedTuple):
  """State of :func:`periodic`: the inner sampler's state and the current cohort."""

  inner: Any
  cohort: jax.Array


def periodic(period: int, sampler: ClientSampler | None = None) -> ClientSampler:
  """Keeps one cohort for ``period`` rounds, then draws a new one with ``sampler``.

  FedLAMA (Lee et al., AAAI 2023) resamples its cohort every :math:`\\phi` rounds, so that
  layers with the long interval :math:`\\phi\\tau'` are averaged over the clients that trained
  them. A new cohort is drawn in rounds ``r`` with ``r % period == 0``.

  Args:
    period: rounds per cohort (>= 1; 1 = a new cohort every round).
    sampler: the sampler that draws each new cohort (default :func:`uniform`); its ``update``
      sees every round's metrics.

  Returns:
    A :class:`ClientSampler` with :class:`PeriodicState`.
  """
  if not isinstance(period, int | np.integer) or period < 1:
    raise ValueError(f"`period` must be a positive int, got {period!r}.")
  sampler = uniform() if sampler is None else sampler

  def init(num_clients, cohort_size):
    return PeriodicState(sampler.init(num_clients, cohort_size),
                         jnp.zeros([cohort_size], jnp.int32))

  def select(key, state, round, *, num_clients, cohort_size):
    fresh = sampler.select(key, state.inner, round, num_clients=num_clients,
                           cohort_size=cohort_size)
    if period == 1:
      return fresh
    return jnp.where(jnp.mod(round, period) == 0, fresh, state.cohort)

  def update(state, ids, metrics):
    return PeriodicState(sampler.update(state.inner, ids, metrics), ids)

  return ClientSampler(init, select, update)


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

  def select(key, state, round, *, num_clients, cohort_size):
    del key, state, num_clients, cohort_size
    return jnp.asarray(table)[jnp.mod(round, table.shape[0])]

  return ClientSampler(init, select, _keep_state)


__all__ = ["ClientMetrics", "ClientSampler", "PeriodicState", "fixed_schedule", "periodic",
           "uniform"]
