"""Algorithms built only from the round's public contracts: SCAFFOLD and FedNova.

They are the worked examples of BUILD.md "How to add a method": no engine code knows them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxfl import comm, views
from jaxfl import memory as jmemory
from jaxfl.aggregation import fednova as fednova_aggregator
from jaxfl.aggregation import weighted_mean
from jaxfl.algorithms._base import Algorithm, preset
from jaxfl.algorithms._fedopt import _local, _lr
from jaxfl.client import LocalTraining
from jaxfl.transforms import _scaffold

__all__ = ["fednova", "scaffold"]


def _scaffold_contracts():
  """View, memory and ledger of SCAFFOLD (server state = ``chain(control, sgd)``)."""
  server_control = lambda opt_state: opt_state[0].control

  def view(server, slot, row):
    c = server_control(server.opt_state)
    correction = jax.tree.map(jnp.subtract, c, row)  # c - c_i
    return views.ClientStart(context={"control": correction},
                             uplink_state=_scaffold.ScaffoldClientState(row, c))

  def write(row, result, before, after):
    del before, after
    keep = result.finite > 0
    return jax.tree.map(lambda new, old: jnp.where(keep, new, old),
                        result.uplink_state.client_control, row)

  dense = comm.dense_ledger()

  def count(delta, abs_sums, start, uplink_state):
    # Delta y_i and Delta c_i: two dense model-sized uploads per participating client.
    return jax.tree.map(lambda s: 2.0 * s, dense.count(delta, abs_sums, start, uplink_state))

  memory = jmemory.per_client(lambda params: jax.tree.map(jnp.zeros_like, params), write)
  return views.ClientView(view), memory, comm.Ledger(count, 1.0)


@preset
def scaffold(num_clients: int, *, server_lr: float = 1.0, client_lr: float = 0.05,
             batch_size: int = 32, local_steps: int = 5, name: str = "scaffold") -> Algorithm:
  r"""SCAFFOLD (Karimireddy et al., ICML 2020), option II control variates.

  Clients correct every local gradient by :math:`c - c_i` and run plain SGD for a fixed
  :math:`K` steps; :math:`c_i` lives in a per-client :mod:`jaxfl.memory` row, :math:`c` in
  the server transform's state; the server averages the deltas unweighted and applies
  ``sgd(server_lr)`` (:math:`\eta_g`). Uplink is counted as two model-sized tensors per
  client (:math:`\Delta y_i` and :math:`\Delta c_i`), as in the paper.

  Args:
    num_clients: :math:`N` (the server's control update divides by it).
    server_lr: :math:`\eta_g`.
    client_lr: :math:`\eta_l`.
    batch_size: local minibatch size.
    local_steps: :math:`K` (fixed for every client: option II's :math:`1/(K\eta_l)`).
    name: label.

  Returns:
    An :class:`Algorithm` (see :mod:`jaxfl.transforms` ``scaffold_*``).
  """
  local = LocalTraining(optax.chain(_scaffold.scaffold_correction(),
                                    optax.sgd(_lr("client_lr", client_lr))),
                        batch_size=batch_size, local_steps=local_steps)
  server = optax.chain(_scaffold.scaffold_server_control(num_clients, local_steps, client_lr),
                       optax.sgd(_lr("server_lr", server_lr)))
  view, memory, ledger = _scaffold_contracts()
  return Algorithm(name, local, server, weighted_mean(),
                   _scaffold.scaffold_client_control(local_steps, client_lr), "uniform",
                   ledger=ledger, view=view, memory=memory)


@preset
def fednova(*, server_lr: float = 1.0, client_lr: float = 0.05, client_momentum: float = 0.0,
            weight_decay: float = 0.0, batch_size: int = 32, local_steps: int | None = None,
            local_epochs: float | None = 1.0, name: str = "fednova") -> Algorithm:
  r"""FedNova (Wang et al., NeurIPS 2020): FedAvg whose aggregate normalises each client's
  update by its local work :math:`a_i` and rescales by :math:`\tau_{\mathrm{eff}}`
  (:func:`jaxfl.aggregation.fednova`).

  The default runs one local epoch per client, so clients of different sizes take different
  numbers of steps, the setting FedNova was made for.

  Args:
    server_lr: server SGD learning rate.
    client_lr, client_momentum, weight_decay, batch_size: client SGD.
    local_steps, local_epochs: local work (exactly one set).
    name: label.

  Returns:
    An :class:`Algorithm` with example-weighted :math:`p_i`.
  """
  if local_steps is not None:
    local_epochs = None
  return Algorithm(name, _local(client_lr, client_momentum, weight_decay, batch_size,
                                local_steps, local_epochs),
                   optax.sgd(_lr("server_lr", server_lr)), fednova_aggregator(client_momentum),
                   None, "examples")
