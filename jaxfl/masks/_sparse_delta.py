"""Sparse fine-tuning deltas: store only the changed entries relative to the pre-trained params.

A sparse fine-tuned model is saved as, per leaf, the flat ``indices`` of the tuned entries and
their fine-tuned ``values`` (not differences, so loading is bit-exact), in one ``.npz`` file.
Loading needs the same pre-trained params.
"""

from __future__ import annotations

import io
import os
from typing import Any

import jax
import numpy as np

PyTree = Any

__all__ = ["SparseDelta", "apply_sparse_delta", "load_sparse_delta", "save_sparse_delta",
           "sparse_delta"]


class SparseDelta(dict):
  """``{leaf_name: (indices, values)}`` for the leaves with at least one tuned entry.

  ``indices`` are flat positions (uint16/uint32/uint64, the smallest that fits the leaf) and
  ``values`` the fine-tuned entries in the leaf's dtype.
  """


def _index_dtype(size: int):
  if size <= np.iinfo(np.uint16).max + 1:
    return np.uint16
  if size <= np.iinfo(np.uint32).max + 1:
    return np.uint32
  return np.uint64


def sparse_delta(finetuned: PyTree, pretrained: PyTree, mask: PyTree | None = None) -> SparseDelta:
  """Extracts the sparse difference between two parameter trees.

  Args:
    finetuned: fine-tuned params.
    pretrained: pre-trained params (same structure, shapes and dtypes).
    mask: optional tree of bools; if given, exactly its True entries are stored (even when the
      value did not change), otherwise every entry whose bits differ (``!=``, NaN-aware).

  Returns:
    A :class:`SparseDelta`.
  """
  ft_paths = jax.tree_util.tree_flatten_with_path(finetuned)[0]
  pre_leaves, pre_def = jax.tree.flatten(pretrained)
  if len(ft_paths) != len(pre_leaves) or jax.tree.structure(finetuned) != pre_def:
    raise ValueError("`finetuned` and `pretrained` must have the same tree structure.")
  mask_leaves = None if mask is None else pre_def.flatten_up_to(mask)
  out = SparseDelta()
  for i, ((path, ft), pre) in enumerate(zip(ft_paths, pre_leaves)):
    ft, pre = np.asarray(ft), np.asarray(pre)
    name = jax.tree_util.keystr(path)
    if ft.shape != pre.shape or ft.dtype != pre.dtype:
      raise ValueError(f"Leaf {name}: fine-tuned {ft.dtype}{list(ft.shape)} does not match "
                       f"pre-trained {pre.dtype}{list(pre.shape)}.")
    if mask_leaves is None:
      changed = (ft != pre) & ~(np.isnan(ft) & np.isnan(pre)) if ft.dtype.kind == "f" else ft != pre
    else:
      changed = np.broadcast_to(np.asarray(mask_leaves[i], bool), ft.shape)
    idx = np.flatnonzero(changed)
    if idx.size:
      out[name] = (idx.astype(_index_dtype(ft.size)), ft.ravel()[idx])
  return out


def apply_sparse_delta(pretrained: PyTree, delta: SparseDelta) -> PyTree:
  """Writes the stored values into a copy of ``pretrained``."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(pretrained)
  names = {jax.tree_util.keystr(p) for p, _ in paths}
  unknown = sorted(set(delta) - names)
  if unknown:
    raise ValueError(f"The delta has leaves {unknown} that are not in the pre-trained params.")
  leaves = []
  for path, x in paths:
    name = jax.tree_util.keystr(path)
    x = np.array(x, copy=True)
    if name in delta:
      idx, vals = delta[name]
      flat = x.reshape(-1)
      flat[np.asarray(idx, np.int64)] = np.asarray(vals, x.dtype)
      x = flat.reshape(x.shape)
    leaves.append(x)
  return jax.tree.unflatten(treedef, leaves)


def save_sparse_delta(path: str | os.PathLike, finetuned: PyTree, pretrained: PyTree,
                      mask: PyTree | None = None, compress: bool = True) -> int:
  """Saves the sparse delta of ``finetuned`` w.r.t. ``pretrained`` to ``path`` (``.npz``).

  Args:
    path: output file; written exactly there (no ``.npz`` suffix is appended).
    finetuned, pretrained, mask: as in :func:`sparse_delta`.
    compress: use ``np.savez_compressed``.

  Returns:
    The size of the file on disk in bytes.
  """
  delta = sparse_delta(finetuned, pretrained, mask)
  arrays = {"names": np.array(list(delta), dtype=np.str_)}
  for j, (idx, vals) in enumerate(delta.values()):
    arrays[f"indices_{j}"] = idx
    arrays[f"values_{j}"] = vals
  buf = io.BytesIO()
  (np.savez_compressed if compress else np.savez)(buf, **arrays)
  with open(path, "wb") as f:
    f.write(buf.getvalue())
  return os.path.getsize(path)


def load_sparse_delta(path: str | os.PathLike, pretrained: PyTree) -> PyTree:
  """Loads a delta saved by :func:`save_sparse_delta` on top of ``pretrained``."""
  with np.load(path, allow_pickle=False) as z:
    names = [str(n) for n in z["names"]]
    delta = SparseDelta({n: (z[f"indices_{j}"], z[f"values_{j}"]) for j, n in enumerate(names)})
  return apply_sparse_delta(pretrained, delta)
