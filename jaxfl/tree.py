"""Pytree helpers shared by every layer-wise method.

A *layer* is one leaf of the parameter pytree (one tensor), as in the authors' code
(ALGORITHMS.md §1.1). *Kernel* layers are leaves with ``ndim >= 2`` (conv, dense and
embedding weights); only they are candidates for relaxed aggregation, recycling or
layer budgets. ``group="module"`` groups leaves by their parent module instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def leaf_names(tree: PyTree) -> list[str]:
  """Names of the leaves in flattening order, e.g. ``"['Conv_0']['kernel']"``."""
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def layer_names(tree: PyTree, group: str = "leaf") -> PyTree:
  """A same-structure tree holding each leaf's layer name.

  Args:
    tree: parameter pytree.
    group: ``"leaf"`` (each tensor is a layer, the papers' convention) or
      ``"module"`` (kernel and bias of one module form a layer).
  """
  if group not in ("leaf", "module"):
    raise ValueError(f"`group` must be 'leaf' or 'module', got {group!r}.")

  def name(path, _):
    if group == "module" and len(path) > 1:
      path = path[:-1]
    return jax.tree_util.keystr(path)

  return jax.tree_util.tree_map_with_path(name, tree)


def module_ranks(tree: PyTree, order, arg: str = "order") -> list[int]:
  """Per leaf of ``tree`` (flattening order), its module's position in ``order``.

  ``order`` names every module (:func:`layer_names` with ``group="module"``) exactly once, as
  :func:`jaxfl.algorithms.depth_order` returns them; anything else raises naming ``arg``.
  """
  names = jax.tree.leaves(layer_names(tree, "module"))
  rank = {name: i for i, name in enumerate(order)}
  missing = sorted({name for name in names if name not in rank})
  if missing or len(rank) != len(order):
    raise ValueError(f"`{arg}` must name every module of the params once (as "
                     f"jaxfl.algorithms.depth_order returns them); missing {missing}, "
                     f"given {list(order)!r}.")
  return [rank[name] for name in names]


def is_kernel(tree: PyTree) -> PyTree:
  """A same-structure tree of Python bools: True for leaves with ``ndim >= 2``."""
  return jax.tree.map(lambda x: bool(np.ndim(x) >= 2), tree)


def leaf_flags(spec, tree: PyTree, arg: str = "candidates") -> list[bool]:
  """Per-leaf Python bools (``jax.tree.leaves`` order) from a transform's leaf selector.

  ``spec`` is None (kernel leaves, :func:`is_kernel`), a callable ``tree -> bool tree`` or a
  bool tree with the structure of ``tree``; a wrong structure raises naming ``arg``.
  """
  if spec is None:
    flags = is_kernel(tree)
  else:
    flags = spec(tree) if callable(spec) else spec
  try:
    flat = jax.tree.structure(tree).flatten_up_to(flags)
  except (ValueError, TypeError) as e:
    raise ValueError(f"`{arg}` must give a tree of bools with the structure of the params: "
                     f"{e}") from e
  return [bool(f) for f in flat]


def leaf_sizes(tree: PyTree) -> PyTree:
  """A same-structure tree of Python ints: number of elements per leaf."""
  return jax.tree.map(lambda x: int(np.size(x)), tree)


def num_params(tree: PyTree) -> int:
  """Total number of elements in a pytree."""
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def layer_norms(tree: PyTree) -> PyTree:
  """L2 norm of every leaf, as a same-structure tree of f32[] scalars."""
  return jax.tree.map(lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)))), tree)


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm over all leaves."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def weighted_sum(stacked: PyTree, weights: jax.Array) -> PyTree:
  """``sum_i w_i u_i`` over the leading (client) axis of every leaf, keeping leaf dtypes.

  Written as a contraction (``tensordot``), not ``sum(w * u, axis=0)``: XLA:CPU ran that
  leading-axis reduction of a [5, 4096, 512] stack in 2.5 s against 1.4 ms for the dot
  (BUILD.md). With the client axis sharded the dot becomes local partial sums + all-reduce.
  ``HIGHEST`` precision: on GPU/TPU a default-precision f32 dot may round through TF32/bf16,
  which a mean of model updates must not.
  """
  weights = jnp.asarray(weights)
  return jax.tree.map(lambda u: jnp.tensordot(weights.astype(u.dtype), u, axes=1,
                                              precision=jax.lax.Precision.HIGHEST), stacked)


def safe_reciprocal(total: jax.Array) -> jax.Array:
  """``1 / total``, and 0 where ``total`` is 0 (a round or aggregate with no weight)."""
  return jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)


def weighted_mean(stacked: PyTree, weights: jax.Array) -> PyTree:
  """Weighted mean over the leading (client) axis: ``sum_i w_i u_i / sum_i w_i``.

  A zero total weight gives zeros, not NaN. Keeps leaf dtypes.
  """
  weights = jnp.asarray(weights)
  total = jnp.sum(weights)
  norm = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1), 0)
  return weighted_sum(stacked, norm)


def stack(trees: list[PyTree]) -> PyTree:
  """Stacks a list of same-structure trees along a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree) -> list[PyTree]:
  """Inverse of :func:`stack`."""
  n = jax.tree.leaves(tree)[0].shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def select_tree(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """``jnp.where(pred, a, b)`` leaf by leaf, for a scalar traced ``pred``."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def all_finite(tree: PyTree) -> jax.Array:
  """True iff every element of every leaf is finite."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def map_leaves_with_names(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
  """``tree_map`` that also passes the leaf's name."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(jax.tree_util.keystr(p), x), tree)
