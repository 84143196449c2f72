"""FedMut's server side: keep the global model's last change and the key of the next mutation.

FedMut (Hu et al., AAAI 2024) sends each client of round :math:`t+1` its own *mutated* global
model :math:`x_{t+1} + \\alpha\\, v^i \\odot (x_{t+1} - x_t)`, with per-layer signs
:math:`v^i_l = \\pm 1` balanced over the cohort. The server transform below only records what
the client view needs (the change :math:`x_{t+1} - x_t` and a PRNG key); the mutation itself
is the view :func:`jaxfl.algorithms.fedmut_view`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["FedMutState", "balanced_signs", "fedmut_direction"]


class FedMutState(NamedTuple):
  """State of :func:`fedmut_direction`.

  Attributes:
    direction: the last server step :math:`x_{t+1} - x_t` (params-shaped; zeros before the
      first round, so round 0 is not mutated).
    key: u32[2] raw PRNG key data of the next round's signs (:func:`balanced_signs`).
  """

  direction: optax.Updates
  key: jax.Array


def balanced_signs(key: jax.Array, num_layers: int, cohort_size: int) -> jax.Array:
  """f32[L, C]: for each layer, a random arrangement of :math:`\\lfloor C/2\\rfloor` signs
  :math:`-1` and as many :math:`+1` over the :math:`C` cohort slots (one 0 when :math:`C` is
  odd), so every layer's mutations sum to zero over the cohort.

  Args:
    key: typed PRNG key or raw ``u32[2]`` key data.
    num_layers: :math:`L` (static).
    cohort_size: :math:`C` (static).
  """
  if not isinstance(num_layers, int) or num_layers < 1:
    raise ValueError(f"`num_layers` must be a positive int, got {num_layers!r}.")
  if not isinstance(cohort_size, int) or cohort_size < 1:
    raise ValueError(f"`cohort_size` must be a positive int, got {cohort_size!r}.")
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  half = cohort_size // 2
  base = jnp.concatenate([-jnp.ones(half), jnp.ones(half),
                          jnp.zeros(cohort_size - 2 * half)]).astype(jnp.float32)
  return jax.vmap(lambda k: jax.random.permutation(k, base))(jax.random.split(key, num_layers))


def fedmut_direction(seed: int = 0) -> optax.GradientTransformationExtraArgs:
  r"""Records the server step for FedMut's mutation; passes the updates through unchanged.

  Placed *last* in the server chain (after the server optimizer), its input is the step
  :math:`u_t` the round applies, :math:`x_{t+1} = x_t + u_t`. It keeps

  .. math::
    d \leftarrow u_t = x_{t+1} - x_t, \qquad k \leftarrow \text{a fresh key},

  which the view :func:`jaxfl.algorithms.fedmut_view` reads at the start of round
  :math:`t+1` to start client :math:`i` (cohort slot :math:`i`) from
  :math:`x_{t+1} + \alpha\, v^i \odot d`, the signs :math:`v^i_l` drawn by
  :func:`balanced_signs` from :math:`k`. With server SGD at rate 1 (the paper's FedAvg
  aggregation) :math:`d` is the averaged client update :math:`\bar\Delta_t`.

  Args:
    seed: seed of the internal key, used only when ``update`` is called without ``key``
      (the round always passes its server key).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`FedMutState`; ``update``
    returns its input.

  References:
    Hu, Cao, Li, Li, Liu, Li, Chen and Liu, `FedMut: Generalized Federated Learning via
    Stochastic Mutation <https://doi.org/10.1609/aaai.v38i11.29146>`_, AAAI 2024.
  """

  def init_fn(params):
    return FedMutState(optax.tree.zeros_like(params),
                       jax.random.key_data(jax.random.key(seed)))

  def update_fn(updates, state, params=None, *, key=None, **extra):
    del params, extra
    if key is None:
      key = jax.random.split(jax.random.wrap_key_data(state.key))[1]
    elif not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.wrap_key_data(key)
    direction = jax.tree.map(lambda u, d: u.astype(d.dtype), updates, state.direction)
    return updates, FedMutState(direction, jax.random.key_data(jax.random.fold_in(key, 7)))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
