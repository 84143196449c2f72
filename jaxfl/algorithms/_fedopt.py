"""The FedAvg family as compositions of optax transformations (no engine code per method).

FedAvg (McMahan et al., 2017) is server ``sgd(1.0)`` on the averaged ``global - local``
delta; FedAvgM/FedAdam/FedYogi/FedAdagrad (Hsu et al., 2019; Reddi et al., 2021) swap the
server optimizer; FedProx (Li et al., 2020) chains a proximal term before the client
optimizer.
"""

from __future__ import annotations

import math

import optax

from jaxfl.aggregation import weighted_mean
from jaxfl.algorithms._base import Algorithm, preset
from jaxfl.client import LocalTraining
from jaxfl.transforms._fedprox import add_proximal_term


def _lr(name: str, value):
  """A learning rate: a finite number > 0 (or an optax schedule), else a ValueError naming it."""
  if callable(value):
    return value
  if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
      or value <= 0:
    raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
  return value


def _local(client_lr, client_momentum, weight_decay, batch_size, local_steps, local_epochs,
           prox_mu=0.0):
  _lr("client_lr", client_lr)
  if client_momentum is not None and not 0.0 <= client_momentum < 1.0:
    raise ValueError(f"`client_momentum` must be in [0, 1), got {client_momentum!r}.")
  if not weight_decay >= 0:
    raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}.")
  parts = []
  if prox_mu:
    parts.append(add_proximal_term(prox_mu))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  if callable(client_lr):
    parts.append(optax.sgd(client_lr, momentum=client_momentum or None))
  else:  # numbers live in the state: simulate(hyperparams={"client": {...}}) changes them
    parts.append(optax.inject_hyperparams(optax.sgd)(learning_rate=client_lr,
                                                     momentum=client_momentum or None))
  opt = parts[0] if len(parts) == 1 else optax.chain(*parts)
  if local_epochs is not None:
    local_steps = None
  return LocalTraining(opt, batch_size=batch_size, local_steps=local_steps,
                       local_epochs=local_epochs)


@preset
def fedopt(server_optimizer: optax.GradientTransformation, *, name: str = "fedopt",
           client_lr: float = 0.05, client_momentum: float = 0.0, weight_decay: float = 0.0,
           batch_size: int = 32, local_steps: int = 5, local_epochs: float | None = None,
           prox_mu: float = 0.0, weighting: str = "examples", aggregator=None,
           uplink=None) -> Algorithm:
  """Generic FedOpt: client SGD(-momentum), any server optax transformation."""
  return Algorithm(name, _local(client_lr, client_momentum, weight_decay, batch_size,
                                local_steps, local_epochs, prox_mu),
                   server_optimizer, aggregator or weighted_mean(), uplink, weighting)


@preset
def fedavg(*, server_lr: float = 1.0, **kw) -> Algorithm:
  """FedAvg: server ``sgd(server_lr)`` (1.0 = plain averaging)."""
  return fedopt(optax.sgd(_lr("server_lr", server_lr)), name=kw.pop("name", "fedavg"),
                **kw)


@preset
def fedavgm(*, server_lr: float = 1.0, server_momentum: float = 0.9, **kw) -> Algorithm:
  """FedAvgM: server SGD with heavy-ball momentum."""
  return fedopt(optax.sgd(_lr("server_lr", server_lr), momentum=server_momentum),
                name=kw.pop("name", "fedavgm"), **kw)


@preset
def fedadam(*, server_lr: float = 1e-2, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3,
            **kw) -> Algorithm:
  """FedAdam (Reddi et al., 2021), with their adaptivity eps default 1e-3."""
  return fedopt(optax.adam(_lr("server_lr", server_lr), b1=b1, b2=b2, eps=eps),
                name=kw.pop("name", "fedadam"), **kw)


@preset
def fedyogi(*, server_lr: float = 1e-2, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3,
            **kw) -> Algorithm:
  """FedYogi (Reddi et al., 2021)."""
  return fedopt(optax.yogi(_lr("server_lr", server_lr), b1=b1, b2=b2, eps=eps),
                name=kw.pop("name", "fedyogi"), **kw)


@preset
def fedadagrad(*, server_lr: float = 1e-1, eps: float = 1e-3, **kw) -> Algorithm:
  """FedAdagrad (Reddi et al., 2021)."""
  return fedopt(optax.adagrad(_lr("server_lr", server_lr), eps=eps),
                name=kw.pop("name", "fedadagrad"), **kw)


@preset
def fedprox(*, mu: float = 0.01, server_lr: float = 1.0, **kw) -> Algorithm:
  """FedProx: FedAvg with the proximal term mu/2 ||x - x_t||^2 in every client's loss."""
  if mu < 0:
    raise ValueError(f"`mu` must be >= 0, got {mu!r}.")
  return fedopt(optax.sgd(_lr("server_lr", server_lr)), name=kw.pop("name", "fedprox"),
                prox_mu=mu, **kw)


ALGORITHMS = {"fedavg": fedavg, "fedavgm": fedavgm, "fedadam": fedadam, "fedyogi": fedyogi,
              "fedadagrad": fedadagrad, "fedprox": fedprox}


def get_algorithm(name: str, **kwargs) -> Algorithm:
  """Builds a registered algorithm by name."""
  if name not in ALGORITHMS:
    raise ValueError(f"Unknown algorithm {name!r}; expected one of {sorted(ALGORITHMS)}.")
  return ALGORITHMS[name](**kwargs)
