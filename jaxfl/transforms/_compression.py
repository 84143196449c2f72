"""Uplink compression baselines of the FedLUAR comparison (ALGORITHMS.md §11).

Both are per-client uplink transforms (``Algorithm.uplink``). The round runs them inside
``vmap`` on every client's ``global - local`` delta, through
``optax.with_extra_args_support``, as ``uplink.update(delta, uplink.init(delta),
global_params, key=uplink_key)`` with a fresh per-client, per-round ``uplink_key`` (split from
the client's slot key); the FedLUAR server transform passes its own ``key`` to an
``aggregate_transform`` the same way.

* :func:`qsgd_quantize`: FedPAQ's stochastic (QSGD) quantiser with ``s`` levels per tensor.
* :func:`random_dropout`: FedDropoutAvg's element dropout of kernel deltas (no rescaling).

Randomness comes from ``key`` (a typed key or raw ``uint32[2]`` key data). Called without
one (e.g. by hand), the transforms derive a key deterministically from ``seed`` and a hash of
the delta's bits (:func:`content_key`), so different deltas get (almost surely) different
draws and a rerun reproduces them bit for bit. Bit accounting of quantised uploads
(``qsgd_bits_per_element``, ``qsgd_uplink_bytes``) lives in :mod:`jaxfl.comm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfl import tree as jtree

__all__ = ["content_key", "qsgd", "qsgd_quantize", "random_dropout"]


def content_key(tree: Any, seed: int = 0) -> jax.Array:
  """A PRNG key derived from ``seed`` and a wrapping 32-bit hash of the bits of ``tree``.

  Used by the uplink transforms when the caller gives no key: deterministic, different for
  different deltas. Works under ``jit``/``vmap``.
  """
  h = jnp.uint32(0x9E3779B9)
  for x in jax.tree.leaves(tree):
    x = jnp.asarray(x)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(-1)
    mult = (2 * jnp.arange(bits.shape[0], dtype=jnp.uint32) + 1) * jnp.uint32(0x85EBCA6B)
    hl = jnp.sum(bits * mult, dtype=jnp.uint32)
    h = (h ^ hl) * jnp.uint32(0x01000193) + jnp.uint32(0x27D4EB2F)
  return jax.random.fold_in(jax.random.key(seed), h)


def _key_or_content(key, tree, seed):
  if key is None:
    return content_key(tree, seed)
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  return key


def qsgd(v: jax.Array, key: jax.Array, levels: int) -> jax.Array:
  r"""QSGD stochastic quantisation of one tensor with ``levels`` levels.

  .. math::
    Q(v)_j = \lVert v\rVert_2\,\mathrm{sign}(v_j)\,\xi_j/s,\qquad
    \xi_j = \lfloor s|v_j|/\lVert v\rVert_2 \rfloor + \mathrm{Bernoulli}(\text{frac. part})

  so :math:`\mathbb E[Q(v)] = v` and :math:`\xi_j\in\{0,\dots,s\}`. A zero tensor stays zero.

  Args:
    v: the tensor.
    key: typed PRNG key of the Bernoulli draws.
    levels: :math:`s`, a static int >= 1.

  Returns:
    :math:`Q(v)`, with the shape and dtype of ``v``.
  """
  vf = v.astype(jnp.float32)
  norm = optax.tree.norm(vf)
  safe = jnp.where(norm > 0, norm, 1.0)
  r = levels * jnp.abs(vf) / safe
  xi = jnp.floor(r + jax.random.uniform(key, v.shape, jnp.float32))
  xi = jnp.minimum(xi, float(levels))
  return (norm * jnp.sign(vf) * xi / levels).astype(v.dtype)


def qsgd_quantize(levels: int = 16, *, seed: int = 0) -> optax.GradientTransformationExtraArgs:
  r"""FedPAQ's per-tensor stochastic quantiser (Reisizadeh et al., 2020) with QSGD levels.

  Every leaf :math:`v` of the update is replaced by :math:`Q(v)` (:func:`qsgd`): unbiased,
  :math:`s` = ``levels`` magnitude levels. Upload cost per tensor: one f32 norm plus
  ``jaxfl.comm.qsgd_bits_per_element(levels)`` bits per element (see
  ``jaxfl.comm.qsgd_uplink_bytes``).

  .. math::
    Q(v) = \lVert v\rVert_2\,\mathrm{sign}(v)\,\xi/s,\quad
    \xi = \text{stochastic rounding of } s\,|v|/\lVert v\rVert_2

  Args:
    levels: :math:`s >= 1` (16 in the FedLUAR code, 10 in the multi-metric config).
    seed: seed of the content-derived key used when ``update`` gets no ``key``.

  Returns:
    A stateless ``optax.GradientTransformationExtraArgs``. ``update(updates, state,
    params=None, *, key=None)`` draws from ``key`` (the round passes a per-client key), or
    from :func:`content_key` of ``updates`` and ``seed`` when ``key`` is None.

  References:
    Reisizadeh et al., `FedPAQ: A Communication-Efficient Federated Learning Method with
    Periodic Averaging and Quantization <https://arxiv.org/abs/1909.13014>`_, AISTATS 2020.
    Alistarh et al., `QSGD <https://arxiv.org/abs/1610.02132>`_, NeurIPS 2017.
  """
  if isinstance(levels, bool) or not isinstance(levels, int | np.integer) or levels < 1:
    raise ValueError(f"`levels` must be an int >= 1, got {levels!r}.")
  levels = int(levels)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, key=None, **extra_args):
    del params, extra_args
    base = _key_or_content(key, updates, seed)
    leaves, treedef = jax.tree.flatten(updates)
    keys = jax.random.split(base, max(len(leaves), 1))
    out = [qsgd(x, keys[i], levels) for i, x in enumerate(leaves)]
    return treedef.unflatten(out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def random_dropout(rate: float = 0.75, *, candidates: Callable[[Any], Any] | Any | None = None,
                   seed: int = 0) -> optax.GradientTransformationExtraArgs:
  r"""FedDropoutAvg's uplink: zero each element of the kernel deltas with probability ``rate``.

  .. math::
    \tilde\Delta_{l,j} = m_{l,j}\,\Delta_{l,j},\quad m_{l,j}\sim\mathrm{Bernoulli}(1-r)
    \quad (l \in K),\qquad \tilde\Delta_l = \Delta_l\ (l\notin K)

  No rescaling by :math:`1/(1-r)` (as in the reference code); the server averages the masked
  deltas over all :math:`m` clients. Count the upload as non-zeros
  (``Algorithm(sparse_uplink=True)``).

  Args:
    rate: drop probability in [0, 1) (0.75 in the reference code).
    candidates: leaves to drop from: None (kernel leaves, ``ndim >= 2``), a callable
      ``params -> tree of bools`` or a tree of Python bools.
    seed: seed of the content-derived key used when ``update`` gets no ``key``.

  Returns:
    A stateless ``optax.GradientTransformationExtraArgs``. ``update(updates, state,
    params=None, *, key=None)`` draws from ``key`` (the round passes a per-client key), or
    from :func:`content_key` of ``updates`` and ``seed`` when ``key`` is None.

  References:
    Gunesli et al., `FedDropoutAvg: Generalizable federated learning for histopathology image
    classification <https://arxiv.org/abs/2111.13230>`_, 2021.
  """
  if isinstance(rate, int | float) and not 0.0 <= rate < 1.0:  # traced under inject_hyperparams
    raise ValueError(f"`rate` must be in [0, 1), got {rate!r}.")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, key=None, **extra_args):
    del params, extra_args
    flags = jtree.leaf_flags(candidates, updates)
    leaves, treedef = jax.tree.flatten(updates)
    base = _key_or_content(key, updates, seed)
    keys = jax.random.split(base, max(len(leaves), 1))
    out = []
    for i, (x, f) in enumerate(zip(leaves, flags)):
      if f:
        keep = jax.random.bernoulli(keys[i], 1.0 - rate, jnp.shape(x))
        x = jnp.where(keep, x, jnp.zeros_like(x))
      out.append(x)
    return treedef.unflatten(out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
