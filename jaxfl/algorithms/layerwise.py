"""Layer-wise communication-efficient FL: FedLUAR and its baselines (ALGORITHMS.md §3, §11).

Every factory returns an :class:`~jaxfl.algorithms.Algorithm` with the LMLS-lab reference
settings: unweighted mean over the cohort (``weighting="uniform"``), client SGD with momentum
0.9 (fresh every round), ``local_steps`` = tau mini-batch steps, batch 32.

* :func:`fedlama`: layer-wise aggregation intervals in {tau', phi tau'} with a persistent
  cohort resampled every phi rounds.
* :func:`fedluar`: FedAvg/FedOpt + LUAR (``server_lr`` = eta_g; FedOpt+LUAR uses 0.9), with
  ``prox_mu`` FedProx+LUAR and ``quantize_levels`` FedPAQ+LUAR.
* :func:`fedpaq`: clients upload QSGD-quantised deltas.
* :func:`feddropoutavg`: clients drop 75% of their kernel-delta entries.
* :func:`lbgm`: clients send one scalar when their update is close to their look-back update.
* :func:`prunefl`: every 50 rounds keep the top 70% of each kernel by gradient importance.
* :func:`fedacg`: server momentum + local proximal term; ``num_recycle > 0`` = FedACG+LUAR
  with recycled layers bypassing the momentum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxfl import comm, sampling, views
from jaxfl import memory as jmemory
from jaxfl.aggregation import weighted_mean
from jaxfl.algorithms._base import Algorithm, preset
from jaxfl.algorithms._fedopt import _local, _lr
from jaxfl.transforms import _compression as compression
from jaxfl.transforms import _fedlama as lama_lib
from jaxfl.transforms import _fedluar as luar_lib
from jaxfl.transforms import _lbgm, _prunefl

__all__ = ["LAYERWISE_ALGORITHMS", "feddropoutavg", "fedacg", "fedlama", "fedluar", "fedpaq",
           "lbgm", "prunefl"]


def _lab_local(client_lr, client_momentum, weight_decay, batch_size, local_steps, prox_mu=0.0):
  return _local(client_lr, client_momentum, weight_decay, batch_size, local_steps, None, prox_mu)


@preset
def fedluar(num_recycle: int = 2, *, server_lr: float = 1.0, selection: str = "inverse_score",
            recycle: bool = True, quantize_levels: int | None = None, prox_mu: float = 0.0,
            client_lr: float = 0.01, client_momentum: float = 0.9, weight_decay: float = 0.0,
            batch_size: int = 32, local_steps: int = 20, seed: int = 0,
            name: str | None = None) -> Algorithm:
  """FedLUAR (Kim, Kang & Lee, NeurIPS 2025) on top of FedAvg / FedOpt / FedProx / FedPAQ.

  Server: ``chain(fedluar(num_recycle), sgd(server_lr))`` on the unweighted mean delta.

  Args:
    num_recycle: delta, kernel layers recycled per round (12 for ResNet-20 at the authors'
      HEAD, 30 for AG News, 2 of 4 for the FEMNIST CNN).
    server_lr: eta_g (1.0 = FedAvg+LUAR; 0.9 = FedOpt+LUAR on CIFAR-10, 1.2 on FEMNIST).
    selection: ``"inverse_score"`` or ``"uniform"`` (Table 4 ablation).
    recycle: False drops the selected layers' update instead (Table 5 ablation).
    quantize_levels: if set, FedPAQ+LUAR: clients upload QSGD(levels) deltas and the server
      quantises the fresh aggregate before storing it (the score uses the un-quantised mean).
    prox_mu: FedProx+LUAR proximal coefficient (0.001 in the reference code; 0 = off).
    client_lr, client_momentum, weight_decay, batch_size, local_steps: local training.
    seed: seed of the transforms' internal keys (only used without an engine key).
    name: label (default derived from the options).
  """
  agg_tx = None if quantize_levels is None else compression.qsgd_quantize(quantize_levels,
                                                                          seed=seed)
  tx = luar_lib.fedluar(num_recycle, selection=selection, recycle=recycle,
                        aggregate_transform=agg_tx, seed=seed)
  uplink = None if quantize_levels is None else compression.qsgd_quantize(quantize_levels,
                                                                          seed=seed + 1)
  if name is None:
    name = "fedluar"
    if server_lr != 1.0:
      name = "fedopt+fedluar"
    if prox_mu:
      name = "fedprox+fedluar"
    if quantize_levels is not None:
      name = "fedluar+fedpaq"
  # chain(fedluar, sgd): the recycled layers chosen last round are not uploaded this round
  view = views.server_masks(upload=lambda opt_state: opt_state[0].uplink_mask)
  return Algorithm(name, _lab_local(client_lr, client_momentum, weight_decay, batch_size,
                                    local_steps, prox_mu),
                   optax.chain(tx, optax.sgd(_lr("server_lr", server_lr))), weighted_mean(),
                   uplink, "uniform",
                   view=view)


def _fedlama_contracts(phi: int):
  """FedLAMA's cohort, view and memory: the cohort persists for ``phi`` rounds and keeps the
  layers that were not synchronised locally, one memory row per cohort slot."""
  sync_mask = lambda opt_state: opt_state[0].uplink_mask  # chain(fedlama, sgd)

  def view(server, slot, row):
    # A new cohort restarts every layer from the global model.
    new_cohort = jnp.mod(server.round, phi) == 0
    start = jax.tree.map(lambda g, c: jnp.where(new_cohort, g, c), server.params, row)
    return views.ClientStart(params=start, upload_mask=sync_mask(server.opt_state))

  def write(row, result, before, after):
    del row
    # Synchronised layers (and quarantined clients) restart from the new global model; the
    # rest stay local on the client that holds the slot.
    quarantined = result.finite == 0
    return jax.tree.map(lambda g, l, s: jnp.where(s | quarantined, g, l), after.params,
                        result.local, sync_mask(before.opt_state))

  return (sampling.periodic(phi), views.ClientView(view),
          jmemory.per_slot(lambda params: params, write))


@preset
def fedlama(phi: int = 2, *, local_steps: int = 10, warmup_rounds: int = 6,
            server_lr: float = 1.0, client_lr: float = 0.01, client_momentum: float = 0.9,
            weight_decay: float = 0.0, batch_size: int = 32, name: str = "fedlama"
            ) -> Algorithm:
  """FedLAMA (Lee et al., AAAI 2023): layer-wise aggregation intervals (ALGORITHMS.md §2).

  Clients take ``local_steps`` = tau' local steps per round; a layer is averaged every round
  (interval tau') or every ``phi`` rounds (phi tau'), reassigned by
  :func:`jaxfl.transforms.fedlama` every ``phi`` rounds after ``warmup_rounds``. The cohort
  is resampled every ``phi`` rounds and keeps un-synchronised layers locally in between
  (:func:`jaxfl.sampling.periodic`, a per-slot :mod:`jaxfl.memory` and a view that starts
  each slot from its kept layers). The paper compares FedAvg at tau' and at phi tau' local
  steps.
  """
  tx = lama_lib.fedlama(local_steps, phi, warmup_rounds=warmup_rounds)
  sampler, view, memory = _fedlama_contracts(phi)
  return Algorithm(name, _lab_local(client_lr, client_momentum, weight_decay, batch_size,
                                    local_steps),
                   optax.chain(tx, optax.sgd(_lr("server_lr", server_lr))), weighted_mean(),
                   None, "uniform",
                   sampler=sampler, view=view, memory=memory,
                   server_inputs=("client_updates",))


@preset
def fedpaq(levels: int = 16, *, server_lr: float = 1.0, client_lr: float = 0.01,
           client_momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 32,
           local_steps: int = 20, seed: int = 0, name: str = "fedpaq") -> Algorithm:
  """FedPAQ (Reisizadeh et al., 2020): clients upload QSGD-quantised deltas, server averages.

  The element ledger counts every uploaded leaf in full; convert to bytes with
  :func:`jaxfl.comm.qsgd_uplink_bytes`.
  """
  return Algorithm(name, _lab_local(client_lr, client_momentum, weight_decay, batch_size,
                                    local_steps),
                   optax.sgd(_lr("server_lr", server_lr)), weighted_mean(),
                   compression.qsgd_quantize(levels, seed=seed), "uniform")


@preset
def feddropoutavg(rate: float = 0.75, *, server_lr: float = 1.0, client_lr: float = 0.01,
                  client_momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 32,
                  local_steps: int = 20, seed: int = 0, name: str = "feddropoutavg") -> Algorithm:
  """FedDropoutAvg: each client zeroes each kernel-delta entry w.p. ``rate`` (no rescale).

  Uploads are counted as non-zeros (:func:`jaxfl.comm.sparse_ledger`; bytes = index + value).
  """
  return Algorithm(name, _lab_local(client_lr, client_momentum, weight_decay, batch_size,
                                    local_steps),
                   optax.sgd(_lr("server_lr", server_lr)), weighted_mean(),
                   compression.random_dropout(rate, seed=seed), "uniform",
                   ledger=comm.sparse_ledger())


@preset
def fedacg(*, server_momentum: float = 0.7, beta: float = 0.01, num_recycle: int = 0,
           selection: str = "inverse_score", client_lr: float = 0.01,
           client_momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 32,
           local_steps: int = 20, seed: int = 0, name: str | None = None) -> Algorithm:
  """FedACG as in the FedLUAR reference code (ALGORITHMS.md §11), optionally + LUAR.

  Server momentum :math:`m \\leftarrow \\lambda m + \\bar\\Delta,\\ x \\leftarrow x + m`
  (``sgd(1.0, momentum=lambda)`` on the pseudo-gradient); local loss plus
  :math:`(\\beta/2)\\lVert w - x_t\\rVert^2` towards the current global model (the original
  FedACG broadcasts the look-ahead :math:`x + \\lambda m`; the reference code does not).
  With ``num_recycle > 0`` recycled layers get :math:`x \\leftarrow x + \\hat\\Delta` and their
  momentum buffer is left unchanged (:func:`jaxfl.transforms.fedluar_bypass`).
  """
  if not 0.0 <= server_momentum < 1.0:
    raise ValueError(f"`server_momentum` must be in [0, 1), got {server_momentum!r}.")
  if beta < 0:
    raise ValueError(f"`beta` must be >= 0, got {beta!r}.")
  server = optax.sgd(1.0, momentum=server_momentum or None)
  if num_recycle:
    server = luar_lib.fedluar_bypass(
        luar_lib.fedluar(num_recycle, selection=selection, seed=seed), server)
  view = (views.server_masks(upload=lambda opt_state: opt_state.luar.uplink_mask)
          if num_recycle else views.global_view())
  if name is None:
    name = "fedacg+fedluar" if num_recycle else "fedacg"
  return Algorithm(name, _lab_local(client_lr, client_momentum, weight_decay, batch_size,
                                    local_steps, beta),
                   server, weighted_mean(), None, "uniform", view=view)


@preset
def lbgm(threshold: float = 0.95, *, server_lr: float = 1.0, client_lr: float = 0.01,
         client_momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 32,
         local_steps: int = 20, name: str = "lbgm") -> Algorithm:
  """LBGM (Azam et al., ICLR 2022) with one look-back update per client (ALGORITHMS.md §11).

  Each client's look-back update lives in a per-client :mod:`jaxfl.memory` row, handed to
  the uplink transform as its state by the view; the ledger counts one element for a
  look-back (scalar) upload.
  """
  uplink = _lbgm.lbgm(threshold)
  return Algorithm(name, _lab_local(client_lr, client_momentum, weight_decay, batch_size,
                                    local_steps),
                   optax.sgd(_lr("server_lr", server_lr)), weighted_mean(), uplink, "uniform",
                   ledger=_lbgm.lbgm_ledger(),
                   view=views.ClientView(lambda server, slot, row: views.ClientStart(
                       uplink_state=row)),
                   memory=jmemory.per_client(uplink.init, _lbgm.lbgm_memory_write))


@preset
def prunefl(keep: float = 0.7, reconfig_every: int = 50, *, server_lr: float = 1.0,
            client_lr: float = 0.01, client_momentum: float = 0.9, weight_decay: float = 0.0,
            batch_size: int = 32, local_steps: int = 20, name: str = "prunefl") -> Algorithm:
  """PruneFL as in the FedLUAR reference code (ALGORITHMS.md §11): masked local training of
  kernels, masks re-chosen every ``reconfig_every`` rounds from summed-gradient importance.

  The ledger counts the mask's ones of every uploaded kernel (the mask is shared, so no
  indices); the importance statistics are not counted (as in the reference code).
  """
  local = _lab_local(client_lr, client_momentum, weight_decay, batch_size, local_steps)
  return Algorithm(name, local,
                   optax.chain(_prunefl.prunefl(keep, reconfig_every),
                               optax.sgd(_lr("server_lr", server_lr))),
                   weighted_mean(), None, "uniform",
                   view=views.server_masks(train=lambda opt_state: opt_state[0].train_mask),
                   server_inputs=("client_grad_sums",))


LAYERWISE_ALGORITHMS = {"lbgm": lbgm, "prunefl": prunefl, "fedlama": fedlama, "fedluar": fedluar,
                        "fedpaq": fedpaq, "feddropoutavg": feddropoutavg, "fedacg": fedacg}
