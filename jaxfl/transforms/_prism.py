r"""PriSM's optax transforms: Frobenius decay and sub-model gradients (client), re-SVD (server).

Niu, Prakash, Kundu, Lee and Avestimehr, "Overcoming Resource Constraints in Federated
Learning: Large Models Can Be Trained with only Weak Clients", TMLR 2023 (ALGORITHMS.md §7,
corrected by NEXT_METHODS.md §B from the authors' ``yuehniu/modeldecomp-fl``).

Every eligible layer is kept as SVD factors :math:`\bar W = V U` (:mod:`jaxfl.models`'s
factorised layers: ``V`` ``f[K, r]`` read from its conv layout, ``U`` ``f[r, C_out]``).
Each round the server hands client :math:`i` a sub-model of :math:`n_i = \lceil\kappa_i
r\rceil` components per layer (and the first 40% of ``U``'s output columns), the client
trains only those entries, the server averages every entry over the clients that trained it
(:func:`jaxfl.aggregation.masked_mean`) and re-factorises every layer by SVD
(:func:`prism_server`). :func:`sample_components` draws the components;
:func:`jaxfl.algorithms.prism` composes everything through the round's contracts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxfl.models._factorised import (
  component_norms,
  factor_layers,
  get_path,
  refactorise,
  set_path,
)

__all__ = ["PrismState", "frobenius_decay", "mask_gradients", "prism_server"]

SAMPLING = ("power", "softmax", "uniform", "top")


# ----------------------------------------------------------------------------- sampling


def sampling_logits(sigma: jax.Array, sampling: str, gamma: float = 1.0) -> jax.Array:
  r"""Log-weights :math:`\log p_j` (up to a constant) of the component distributions.

  ``"power"``: :math:`p_j \propto \sigma_j^\gamma` (the paper; :math:`\gamma = 0` is
  uniform, a zero :math:`\sigma_j` is never drawn while others remain); ``"softmax"``:
  :math:`p_j \propto e^{\sigma_j}` (the reference's conv path without ``--random-mask``);
  ``"uniform"`` (the reference's conv path with ``--random-mask``, i.e. every published
  command); ``"top"``: deterministic, the logits are :math:`\sigma` itself and no noise is
  added (:func:`sample_components`).
  """
  s = sigma.astype(jnp.float32)
  if sampling == "power":
    if gamma == 0:
      return jnp.zeros_like(s)
    return jnp.where(s > 0, gamma * jnp.log(jnp.where(s > 0, s, 1.0)), -jnp.inf)
  if sampling in ("softmax", "top"):
    return s
  if sampling == "uniform":
    return jnp.zeros_like(s)
  raise ValueError(f"`sampling` must be one of {SAMPLING}, got {sampling!r}.")


def top_n_mask(priority: jax.Array, n: jax.Array | int) -> jax.Array:
  """f32 0/1 mask of the ``n`` largest entries of ``priority`` (``n`` may be traced; ties go
  to the lower index)."""
  order = jnp.argsort(-priority, stable=True)
  rank = jnp.zeros(priority.shape, jnp.int32).at[order].set(
      jnp.arange(priority.shape[0], dtype=jnp.int32))
  return (rank < n).astype(jnp.float32)


def sample_components(key: jax.Array, sigma: jax.Array, n: jax.Array | int, sampling: str,
                      gamma: float = 1.0) -> jax.Array:
  r"""Draws ``n`` of the ``r`` components without replacement; returns an f32[r] 0/1 mask.

  Gumbel-top-k: the ``n`` largest :math:`\log p_j + G_j` (:math:`G_j` i.i.d. Gumbel) are a
  draw without replacement from :math:`p` in successive-sampling order, the distribution of
  ``numpy.random.choice(r, n, replace=False, p=p)`` that the reference calls. ``"top"`` keeps
  the ``n`` largest :math:`\sigma_j` (no randomness). In-graph, so ``n`` may be traced (a
  per-client capacity).
  """
  logits = sampling_logits(sigma, sampling, gamma)
  if sampling != "top":
    logits = logits + jax.random.gumbel(key, logits.shape, jnp.float32)
  return top_n_mask(logits, n)


# ----------------------------------------------------------------------------- client


def frobenius_decay(strength: float = 2e-4) -> optax.GradientTransformation:
  r"""Adds the gradient of :math:`\tfrac{\lambda}{2}\lVert V U\rVert_F^2` to every factor pair.

  For each factorised layer (a dict with ``"V"``, ``"U"``; ``V`` read as :math:`K\times r`):

  .. math::
    \nabla_V \mathrel{+}= \lambda\,(V U)\,U^\top, \qquad
    \nabla_U \mathrel{+}= \lambda\,V^\top (V U),

  the reference's Frobenius decay (``utils/frob.py``: :math:`\nabla_A \mathrel{+}= \lambda
  A B B^\top`, :math:`\nabla_B \mathrel{+}= \lambda A^\top A B` for :math:`\bar W = AB`, in
  PyTorch's transposed layout), which replaces weight decay on the factors. Other leaves pass
  unchanged (chain ``optax.add_decayed_weights`` with a mask for them). Applied to the
  client's sub-model params (masked entries are zero), as the reference does.

  Args:
    strength: :math:`\lambda` (the reference uses the run's weight decay).

  Returns:
    A stateless ``optax.GradientTransformation``; ``update`` needs ``params``.

  References:
    Niu et al., `Overcoming Resource Constraints in Federated Learning
    <https://openreview.net/forum?id=lx1WnkL9fk>`_, TMLR 2023; Khodak, Tenenholtz, Mackey and
    Fusi, `Initialization and Regularization of Factorized Neural Layers
    <https://arxiv.org/abs/2105.01029>`_, ICLR 2021 (Frobenius decay).
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("frobenius_decay needs `params`.")
    for path in factor_layers(params):
      layer, g = get_path(params, path), get_path(updates, path)
      v, u = layer["V"], layer["U"]
      r = v.shape[-1]
      dtype = jnp.promote_types(v.dtype, jnp.float32)  # at least float32
      vf = v.reshape(-1, r).astype(dtype)
      uf = u.astype(dtype)
      w = vf @ uf
      gv = (strength * (w @ uf.T)).reshape(v.shape)
      gu = strength * (vf.T @ w)
      new = dict(g)
      new["V"] = g["V"] + gv.astype(g["V"].dtype)
      new["U"] = g["U"] + gu.astype(g["U"].dtype)
      updates = set_path(updates, path, new)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def mask_gradients() -> optax.GradientTransformationExtraArgs:
  r"""Multiplies updates by a per-client mask passed as ``grad_mask``: :math:`g \leftarrow
  m \odot g`.

  Chained first in a client optimizer, it makes everything after it (clipping, decay,
  momentum) see only the sub-model's gradient, as a client that holds only its sub-model
  would. The round applies ``ClientStart.train_mask`` to the *final* updates only, so
  without this the clipping norm also counts gradients of entries that never move (in
  PriSM, the ``U`` rows beyond the 40% output cut, whose gradients through batch-statistics
  BatchNorm of an all-zero channel are large). The mask comes from the client view's
  ``ClientStart.context={"grad_mask": ...}``; without it the updates pass unchanged.

  Returns:
    A stateless ``optax.GradientTransformationExtraArgs``.

  References:
    Niu et al., `Overcoming Resource Constraints in Federated Learning
    <https://openreview.net/forum?id=lx1WnkL9fk>`_, TMLR 2023 (clients train only their
    sub-model; NEXT_METHODS.md §B.2.5).
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, grad_mask=None, **extra):
    del params, extra
    if grad_mask is None:
      return updates, state
    return jax.tree.map(lambda g, m: g * jnp.asarray(m).astype(g.dtype), updates,
                        grad_mask), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- server


class PrismState(NamedTuple):
  """State of :func:`prism_server`.

  Attributes:
    sigma: one f32[r] per factorised layer (in :func:`jaxfl.models.factor_layers` order),
      the singular values :math:`\\sigma` of the current factors, descending; the next
      round's component distribution.
  """

  sigma: tuple


def prism_server(server_lr: float = 1.0) -> optax.GradientTransformationExtraArgs:
  r"""Server step of PriSM: apply the masked-mean delta, then re-factorise every layer by SVD.

  With the aggregate :math:`\bar\Delta` of :func:`jaxfl.aggregation.masked_mean` (0 where no
  client trained an entry, so those entries keep the old value),

  .. math::
    x' = x - \eta\,\bar\Delta, \qquad
    V'U' = \mathrm{SVD}(V_{x'} U_{x'})\ \text{per factorised layer}, \qquad
    \sigma \leftarrow \text{its singular values},

  where :math:`V' = A\sqrt\sigma`, :math:`U' = \sqrt\sigma B^\top`
  (:func:`jaxfl.models.refactorise`). The product :math:`V U` of every layer is unchanged by
  the re-SVD; the components are re-ordered by singular value, so the next round samples
  from fresh :math:`\sigma` (kept in :class:`PrismState`). Non-factorised leaves get the
  plain step :math:`-\eta\bar\Delta`.

  Args:
    server_lr: :math:`\eta` (1 = the reference's replacement of each trained entry by the
      mean of its clients' values).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`PrismState`; ``update`` needs
    ``params`` and ignores the round's extra arguments.

  References:
    Niu et al., `Overcoming Resource Constraints in Federated Learning
    <https://openreview.net/forum?id=lx1WnkL9fk>`_, TMLR 2023 (re-factorisation every round,
    ALGORITHMS.md §7.2; ``update_orth_channel`` in the reference).
  """

  def init_fn(params):
    sigma = tuple(component_norms(get_path(params, p)["V"], get_path(params, p)["U"])
                  for p in factor_layers(params))
    return PrismState(sigma)

  def update_fn(updates, state, params=None, **extra):
    del extra
    if params is None:
      raise ValueError("prism_server needs `params`.")
    values = params
    step = jax.tree.map(lambda d: (-server_lr * d).astype(d.dtype), updates)
    sigmas = []
    for path in factor_layers(values):
      old = get_path(values, path)
      v = old["V"] + get_path(step, path)["V"]
      u = old["U"] + get_path(step, path)["U"]
      v2, u2, s = refactorise(v, u)
      sigmas.append(s.astype(jnp.float32))
      layer = dict(get_path(step, path))
      layer["V"], layer["U"] = v2 - old["V"], u2 - old["U"]
      step = set_path(step, path, layer)
    return step, PrismState(tuple(sigmas))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
