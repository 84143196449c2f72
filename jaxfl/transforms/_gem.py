r"""GEM's sparse fine-tuning masks applied as optax transforms (optimizer side and uplink).

Masks are built by :func:`jaxfl.masks.build_mask`; these transforms only apply one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

__all__ = ["GemMaskState", "gem_mask", "masked_uplink"]


class GemMaskState(NamedTuple):
  """State of :func:`gem_mask`.

  Attributes:
    mask: bool arrays with the shapes of params (:math:`M` in the paper's notation). Replace it
      with ``optax.tree.set(opt_state, mask=new_mask)`` to switch masks without rebuilding or
      recompiling the optimizer.
  """

  mask: PyTree


def _full_mask(mask: PyTree | None, like: PyTree) -> PyTree:
  if mask is None:
    return jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), like)
  try:
    return jax.tree.map(lambda m, x: jnp.broadcast_to(jnp.asarray(m, bool), jnp.shape(x)),
                        mask, like)
  except (ValueError, TypeError) as err:
    raise ValueError(f"`mask` does not match the structure/shapes of params: {err}") from err


def gem_mask(mask: PyTree | None = None) -> optax.GradientTransformationExtraArgs:
  r"""Zeroes the updates of frozen entries; chain it *after* the optimizer.

  .. math::
    u_j \leftarrow M_j\, u_j \qquad (\text{exactly } 0 \text{ where } M_j = 0).

  Because it acts on the final update, frozen entries receive no gradient step, no momentum and
  no weight decay: with ``optax.chain(optax.adamw(lr), gem_mask(mask))`` they stay bit-identical
  to the pre-trained values. (Moment buffers of frozen entries still evolve inside ``adamw`` but
  never reach the parameters.) The mask lives in the state as bool arrays, so a new mask of the
  same shapes re-uses the compiled step: ``optax.tree.set(opt_state, mask=new_mask)``.

  Args:
    mask: tree of bools (arrays or Python/NumPy scalars, broadcast to the leaf shape) with the
      structure of params, e.g. from :func:`jaxfl.masks.build_mask`; ``None`` means all True.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`GemMaskState`.

  References:
    Kang, Kim, Avestimehr and Lee, `GEM: Gradient-to-weight ratio and Entropy-guided Masking
    for parameter-efficient fine-tuning <https://arxiv.org/abs/2508.16191>`_, AAAI 2026.
  """

  def init_fn(params):
    return GemMaskState(mask=_full_mask(mask, params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    new = jax.tree.map(jnp.where, state.mask, updates, optax.tree.zeros_like(updates))
    return new, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def masked_uplink(mask: PyTree) -> optax.GradientTransformationExtraArgs:
  r"""Uplink transform: a client sends only the masked entries of its delta.

  .. math::
    \Delta^{\text{sent}}_j = M_j\, \Delta_j .

  The round runs it per client inside ``jax.vmap`` as ``uplink.update(delta,
  uplink.init(delta), global_params, key=uplink_key)``; the key and params are ignored. The
  mask is shared by all clients and captured as constant arrays; unmasked entries are exactly
  zero, so a ledger that counts non-zero entries counts at most
  ``jaxfl.masks.mask_count(mask)`` floats per client.

  Args:
    mask: tree of bools with the structure of params (see :func:`jaxfl.masks.build_mask`).

  Returns:
    A stateless ``optax.GradientTransformationExtraArgs`` (state ``optax.EmptyState``).

  Raises:
    ValueError: if ``mask`` is None, or (in ``init``/``update``) does not match the delta.

  References:
    Kang, Kim, Avestimehr and Lee, `GEM: Gradient-to-weight ratio and Entropy-guided Masking
    for parameter-efficient fine-tuning <https://arxiv.org/abs/2508.16191>`_, AAAI 2026.
  """
  if mask is None:
    raise ValueError("`mask` is required for masked_uplink.")
  const = jax.tree.map(lambda m: np.asarray(m, bool), mask)

  def init_fn(delta):
    _full_mask(const, delta)  # structure/shape check only
    return optax.EmptyState()

  def update_fn(delta, state, params=None, **extra_args):
    del params, extra_args
    full = _full_mask(const, delta)
    sent = jax.tree.map(jnp.where, full, delta, optax.tree.zeros_like(delta))
    return sent, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
