"""mL-BFGS block layouts: which leaves form a block, and the block-stacked ``[B, n]`` matrix.

Each block keeps its own L-BFGS history. The momenta, snapshots and histories of
:func:`jaxfl.transforms.scale_by_mlbfgs` are stacked on a leading block axis of length ``B``
(padded to a multiple of the device count) with every block zero-padded to ``n``, the size of
the largest one, so that a ``NamedSharding`` on the block axis (:func:`block_sharding`) lays
blocks and their histories across devices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
BlockLabels = PyTree | Callable[[PyTree], PyTree] | None

__all__ = ["BlockLabels", "block_sharding", "resnet_block_labels", "top_level_block_labels"]


class _Layout(NamedTuple):
  """Static description of how leaves map into the block-stacked ``[B, n]`` matrix."""

  treedef: Any
  leaf_block: tuple[int, ...]  # block index per leaf, -1 = pass-through
  leaf_offset: tuple[int, ...]  # offset of the leaf inside its block
  leaf_shape: tuple[tuple[int, ...], ...]
  block_ids: tuple[Hashable, ...]  # real blocks only
  num_blocks: int  # including padding blocks
  block_size: int  # n = largest block size (>= 1)


def _is_none(x) -> bool:
  return x is None


def _shape(x) -> tuple[int, ...]:
  """Shape of an array, ``ShapeDtypeStruct`` or scalar."""
  return tuple(int(d) for d in (x.shape if hasattr(x, "shape") else np.shape(x)))


def _resolve_labels(block_labels: BlockLabels, params: PyTree) -> list[Hashable | None]:
  treedef = jax.tree.structure(params)
  if block_labels is None:
    return [0] * treedef.num_leaves
  labels = block_labels(params) if callable(block_labels) else block_labels
  label_def = jax.tree.structure(labels, is_leaf=_is_none)
  if label_def != treedef:
    raise ValueError(
        f"`block_labels` must have the structure of params; got {label_def}, params have "
        f"{treedef}.")
  leaves = jax.tree.leaves(labels, is_leaf=_is_none)
  for leaf in leaves:
    if leaf is not None and not isinstance(leaf, Hashable):
      raise ValueError(f"`block_labels` leaves must be hashable block ids or None; got {leaf!r}.")
  return leaves


def _make_layout(block_labels: BlockLabels, block_order: Sequence[Hashable] | None,
                 params: PyTree, device_count: int) -> _Layout:
  leaves, treedef = jax.tree.flatten(params)
  labels = _resolve_labels(block_labels, params)
  if block_order is None:
    order: list[Hashable] = []
    for label in labels:
      if label is not None and label not in order:
        order.append(label)
  else:
    order = list(block_order)
    unknown = sorted({repr(lb) for lb in labels if lb is not None and lb not in order})
    if unknown:
      raise ValueError(
          f"`block_labels` contains unknown block label(s) {', '.join(unknown)}; "
          f"`block_order` is {order!r}.")
  index = {label: i for i, label in enumerate(order)}
  sizes = [0] * len(order)
  leaf_block, leaf_offset, leaf_shape = [], [], []
  for leaf, label in zip(leaves, labels):
    shape = _shape(leaf)
    leaf_shape.append(shape)
    if label is None:
      leaf_block.append(-1)
      leaf_offset.append(0)
      continue
    b = index[label]
    leaf_block.append(b)
    leaf_offset.append(sizes[b])
    sizes[b] += math.prod(shape)
  num_blocks = max(len(order), 1)
  num_blocks = -(-num_blocks // device_count) * device_count
  return _Layout(treedef, tuple(leaf_block), tuple(leaf_offset), tuple(leaf_shape),
                 tuple(order), num_blocks, max(sizes + [1]))


def _to_blocks(layout: _Layout, tree: PyTree, dtype) -> jax.Array:
  """Packs the blocked leaves of ``tree`` into a zero-padded ``[B, n]`` matrix."""
  leaves = jax.tree.leaves(tree)
  parts: list[list[jax.Array]] = [[] for _ in range(layout.num_blocks)]
  for leaf, b in zip(leaves, layout.leaf_block):
    if b >= 0:
      parts[b].append(jnp.ravel(leaf).astype(dtype))
  rows = []
  for p in parts:
    used = sum(int(x.size) for x in p)
    if used < layout.block_size:
      p = p + [jnp.zeros((layout.block_size - used,), dtype)]
    rows.append(jnp.concatenate(p) if len(p) > 1 else p[0])
  return jnp.stack(rows)


def _from_blocks(layout: _Layout, mat: jax.Array, leaf: int) -> jax.Array:
  """The slice of ``mat`` belonging to blocked leaf number ``leaf``, reshaped."""
  shape = layout.leaf_shape[leaf]
  off = layout.leaf_offset[leaf]
  return mat[layout.leaf_block[leaf], off:off + math.prod(shape)].reshape(shape)


def top_level_block_labels(params: PyTree) -> PyTree:
  """One block per top-level key of a params dict (e.g. per Flax submodule)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: str(path[0].key), params)


def resnet_block_labels(params: PyTree, layout: str = "one") -> PyTree:
  """Block labels in the authors' layouts (ALGORITHMS.md §4.4) for ResNet-style params.

  Residual blocks are the top-level entries whose name contains ``"block"`` (Flax names them
  ``_BasicBlock_<i>``, ``BottleneckBlock_<i>``, ...); everything else (stem conv and BN, head)
  is the "outside".

  Args:
    params: A params dict as returned by ``Model.init``.
    layout: ``"one"`` -- one block with every residual-block parameter; stem and head are
      not preconditioned (label ``None``), as ``get_pblocks`` for ResNet-18/CIFAR.
      ``"stage"`` -- one block per stage (consecutive residual blocks with the same number of
      output channels, keyed ``"stage<C>"``), stem and head ``None``, as
      ``get_pblocks_resnet50``. ``"single"`` -- every parameter in one block (as DeiT).

  Returns:
    A label tree with the structure of ``params`` for ``scale_by_mlbfgs(block_labels=...)``.

  Raises:
    ValueError: For an unknown ``layout`` or params without residual blocks.
  """
  if layout not in ("one", "stage", "single"):
    raise ValueError(f"`layout` must be 'one', 'stage' or 'single', got {layout!r}.")
  if layout == "single":
    return jax.tree.map(lambda _: "all", params)
  if not isinstance(params, dict):
    raise ValueError(f"`params` must be a dict of submodules, got {type(params).__name__}.")
  body = [k for k in params if re.search("block", str(k), re.IGNORECASE)]
  if not body:
    raise ValueError(f"No residual blocks (keys containing 'block') in params keys "
                     f"{sorted(map(str, params))}.")

  def stage_of(key):
    kernels = [x for x in jax.tree.leaves(params[key]) if len(_shape(x)) >= 2]
    return f"stage{_shape(kernels[-1])[-1]}" if kernels else "stage0"

  labels = {}
  for key, sub in params.items():
    if key in body:
      label = "body" if layout == "one" else stage_of(key)
      labels[key] = jax.tree.map(lambda _, lb=label: lb, sub)
    else:
      labels[key] = jax.tree.map(lambda _: None, sub)
  return labels


def block_sharding(devices: Sequence[jax.Device] | None = None,
                   axis_name: str = "blocks") -> jax.sharding.NamedSharding:
  """A sharding that splits block-stacked arrays over a 1-D mesh of ``devices``.

  Pass it as ``scale_by_mlbfgs(..., sharding=block_sharding())``: the block axis of every
  block-stacked state array (histories included) is split over the devices, so each device
  stores and runs the two-loop recursion for ``B / D`` blocks. Blocks are padded with empty
  blocks up to a multiple of ``D``.

  Args:
    devices: Devices of the mesh; default ``jax.devices()``.
    axis_name: Name of the mesh axis.
  """
  devices = list(jax.devices() if devices is None else devices)
  mesh = jax.sharding.Mesh(np.array(devices), (axis_name,),
                           axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))
