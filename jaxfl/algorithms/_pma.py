"""Partial model averaging (PMA) as contracts: a held cohort, a per-slot memory and a view.

Lee, Sahu, He & Avestimehr, Neurocomputing 2023 (ALGORITHMS.md §8a). One round is
:math:`\\tau / P` local steps; after it the group :math:`r \\bmod P` is averaged
(:func:`jaxfl.transforms.partial_averaging`) and every other group stays on the client that
trained it. The clients' local models therefore live in a per-slot memory across rounds, and
the cohort is held: for the whole run by default (the paper's setting, every worker takes
part), or for ``resample_every`` rounds, after which a new cohort starts from the global model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from jaxfl import comm, sampling, views
from jaxfl import memory as jmemory
from jaxfl.aggregation import weighted_mean
from jaxfl.algorithms._base import Algorithm, preset
from jaxfl.algorithms._fedopt import _local, _lr
from jaxfl.transforms import _partial_averaging as pma_lib

__all__ = ["pma", "pma_local_average"]


def pma_local_average(memory, cohort_size: int | None = None):
  """The mean of the cohort's local models (the memory rows of :func:`pma`): the model a final
  full averaging would give, the "virtual" average the paper's analysis follows.

  Args:
    memory: ``ServerState.memory`` of a :func:`pma` run (leading axis = cohort slot).
    cohort_size: the real slots (``clients_per_round``); rows past it pad the cohort to a
      multiple of the devices and are left out. Default: every row.
  """
  rows = jax.tree.leaves(memory)[0].shape[0]
  n = rows if cohort_size is None else int(cohort_size)
  if not 1 <= n <= rows:
    raise ValueError(f"`cohort_size` must be in [1, {rows}] (the memory's rows), got "
                     f"{cohort_size!r}.")
  return jax.tree.map(lambda m: jnp.mean(m[:n].astype(jnp.float32), axis=0).astype(m.dtype),
                      memory)


@preset
def pma(num_groups: int = 4, *, local_steps: int = 5, order: Sequence[str] | None = None,
        granularity: str = "element", resample_every: int | None = None,
        server_lr: float = 1.0, client_lr: float = 0.01, client_momentum: float = 0.0,
        weight_decay: float = 0.0, batch_size: int = 32, name: str = "pma") -> Algorithm:
  """Partial model averaging (Lee et al., Neurocomputing 2023): one group per round.

  Each round the cohort trains ``local_steps`` steps from its local models and averages the
  group ``round % num_groups``; a parameter is thus averaged every
  ``num_groups * local_steps`` steps (= FedAvg's tau, at FedAvg's bytes). Compare against
  FedAvg with ``local_steps = num_groups * local_steps`` at the same number of local steps.

  Args:
    num_groups: :math:`P`, the groups (1 = FedAvg with a held cohort).
    local_steps: :math:`\\tau / P`, local steps per round.
    order: module names in depth order (:func:`jaxfl.algorithms.depth_order`) or None for the
      parameters' flattening order; groups are contiguous in it.
    granularity: ``"element"`` (equal pieces) or ``"leaf"`` (whole tensors), see
      :func:`jaxfl.transforms.partial_averaging`.
    resample_every: None keeps the cohort drawn in round 0 for the whole run (the paper:
      all workers, every round). An int (a multiple of ``num_groups``) draws a new cohort
      every so many rounds; the new cohort starts from the global model, so the outgoing
      cohort's un-averaged progress on the groups averaged earlier in the cycle is dropped
      (the spec's rule, ALGORITHMS.md §8a, marked "verify": the paper describes full
      participation).
    server_lr: server SGD step on the due group's mean delta (1.0 = plain averaging).
    client_lr, client_momentum, weight_decay, batch_size: local SGD. The client optimizer
      starts fresh every round, so momentum (off by default) would reset every
      ``local_steps`` steps.
    name: label.

  Returns:
    An :class:`Algorithm`; uplink counted as the due group's entries
    (:func:`jaxfl.comm.upload_mask_ledger`), downlink as the group averaged in the previous
    round (the whole model in a cohort's first round). Evaluate ``ServerState.params`` (each group as of
    its last averaging) or :func:`pma_local_average` of ``ServerState.memory``.
  """
  if resample_every is not None and (not isinstance(resample_every, int) or resample_every < 1
                                     or resample_every % num_groups):
    raise ValueError(f"`resample_every` must be None or a positive multiple of num_groups="
                     f"{num_groups}, got {resample_every!r}.")
  tx = pma_lib.partial_averaging(num_groups, order=order, granularity=granularity)

  def due(params, round):
    return pma_lib.pma_group_mask(params, jnp.mod(round, num_groups), num_groups, order=order,
                                  granularity=granularity)

  def view(server, slot, row):
    start = row
    if resample_every is not None:  # a new cohort starts from the global model
      new_cohort = jnp.mod(server.round, resample_every) == 0
      start = jax.tree.map(lambda g, c: jnp.where(new_cohort, g, c), server.params, row)
    return views.ClientStart(params=start, upload_mask=due(server.params, server.round))

  def write(row, result, before, after):
    del row
    # The averaged group (and everything of a quarantined client) restarts from the new
    # global model; the other groups stay where the client's training left them.
    quarantined = result.finite == 0
    return jax.tree.map(lambda g, l, s: jnp.where(s | quarantined, g, l), after.params,
                        result.local, due(before.params, before.round))

  def downlink(params, round):
    # A worker receives the group averaged in the previous round; a cohort's first round
    # receives the whole global model. (A quarantined worker's full restart is not counted.)
    sizes = jnp.asarray(pma_lib.pma_group_sizes(params, num_groups, order=order,
                                                granularity=granularity), jnp.float32)
    first = round == 0 if resample_every is None else jnp.mod(round, resample_every) == 0
    return jnp.where(first, jnp.sum(sizes), sizes[jnp.mod(round - 1, num_groups)])

  sampler = sampling.periodic(resample_every)
  if resample_every is None:
    def init(num_clients, cohort_size):
      if cohort_size != num_clients:
        raise ValueError(
            f"pma(resample_every=None) keeps the round-0 cohort for the whole run, so it "
            f"needs clients_per_round == num_clients ({num_clients}), got {cohort_size}; "
            "set `resample_every` for partial participation.")
      return sampling.periodic(None).init(num_clients, cohort_size)

    sampler = sampler._replace(init=init)
  local = _local(client_lr, client_momentum, weight_decay, batch_size, local_steps, None)
  return Algorithm(name, local, optax.chain(tx, optax.sgd(_lr("server_lr", server_lr))),
                   weighted_mean(), None, "uniform",
                   sampler=sampler,
                   view=views.ClientView(view),
                   memory=jmemory.per_slot(lambda params: params, write),
                   ledger=comm.upload_mask_ledger(downlink))
