"""A federated algorithm is a static bundle of optax transformations."""

from __future__ import annotations

from typing import NamedTuple

import optax

from jaxfl.aggregation import weighted_mean
from jaxfl.client import LocalTraining, validate_local_training


class Algorithm(NamedTuple):
  """Everything that defines a federated algorithm; no state, no code paths per algorithm.

  Attributes:
    name: label for logs and tables.
    local: local training (client optimizer, batch size, local steps or epochs).
    server_optimizer: optax transformation on the pseudo-gradient (the aggregated
      ``global - local`` delta). It may be ``GradientTransformationExtraArgs`` and then
      receives ``client_updates`` (f32[C, *s], None when chunked), ``client_weights``
      (f32[C]), ``key`` and ``round`` as keyword arguments. FedAvg = ``optax.sgd(1.0)``.
    aggregator: maps stacked client updates and weights to one update (see
      :mod:`jaxfl.aggregation`).
    uplink: optional per-client transformation of the delta before upload (compression,
      sparse masks, clipping); ``init(delta)`` every round, ``update(delta, state, params)``;
      an ``ExtraArgs`` transformation also receives ``key=`` (a per-client PRNG key).
    weighting: ``"examples"`` (weights = client sizes, McMahan et al.) or ``"uniform"``
      (the LMLS-lab papers' unweighted mean).
    sparse_uplink: count only non-zero uploaded entries in the ledger.
    cohort_period: resample the cohort every this many rounds (FedLAMA's phi); in between
      the same clients train again.
    persistent_cohort: the cohort's clients keep their local parameters between rounds for
      every layer the server transform's ``uplink_mask`` did not synchronise (FedLAMA);
      synchronised layers, and every layer when a new cohort is drawn, restart from the
      global model. Local optimizer state is still fresh every round.
    stateful_uplink: the ``uplink`` transform's state persists per client across rounds
      (N copies in ``ServerState.client_states``, read and written by client id; LBGM). A
      state field ``uplink_elements`` (per-leaf f32[]) then overrides the ledger's count.
  """

  name: str
  local: LocalTraining
  server_optimizer: optax.GradientTransformation
  aggregator: optax.GradientTransformationExtraArgs = weighted_mean()
  uplink: optax.GradientTransformation | None = None
  weighting: str = "examples"
  sparse_uplink: bool = False
  cohort_period: int = 1
  persistent_cohort: bool = False
  stateful_uplink: bool = False


def validate_algorithm(algo: Algorithm) -> None:
  if not isinstance(algo, Algorithm):
    raise TypeError(f"`algorithm` must be a jaxfl.algorithms.Algorithm, got {type(algo).__name__}.")
  validate_local_training(algo.local)
  if algo.weighting not in ("examples", "uniform"):
    raise ValueError(f"`weighting` must be 'examples' or 'uniform', got {algo.weighting!r}.")
  if algo.stateful_uplink and algo.uplink is None:
    raise ValueError("`stateful_uplink=True` needs an `uplink` transform.")
  if not isinstance(algo.cohort_period, int) or algo.cohort_period < 1:
    raise ValueError(f"`cohort_period` must be a positive int, got {algo.cohort_period!r}.")
