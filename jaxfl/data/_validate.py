"""Checks a :class:`FederatedData` (and a model against it) before anything is compiled.

Every failure is a ``ValueError`` naming the array, the offending index and what was
expected; a bad dataset would otherwise train silently on clamped gathers (indices past the
end), garbage labels (one-hot of an out-of-range class is all zeros) or NaN test logits.
"""

from __future__ import annotations

import numpy as np

from jaxfl.data._federated import FederatedData


def _first(mask: np.ndarray) -> int:
  return int(np.flatnonzero(mask.reshape(-1))[0])


def _check_labels(name: str, y: np.ndarray, num_classes: int) -> None:
  if y.ndim != 1:
    raise ValueError(f"`data.{name}` must be 1-D class ids, got shape {y.shape}.")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"`data.{name}` must hold integer class ids, got dtype {y.dtype} "
                     "(cast with .astype(np.int32) if the values are whole numbers).")
  bad = (y < 0) | (y >= num_classes)
  if bad.any():
    i = _first(bad)
    raise ValueError(f"`data.{name}`[{i}] = {int(y[i])} is outside [0, {num_classes}) "
                     f"({int(bad.sum())} labels out of range).")


def _check_finite(name: str, x: np.ndarray, rows: np.ndarray | None = None) -> None:
  if not np.issubdtype(x.dtype, np.floating):
    return
  flat = x.reshape(len(x), -1) if rows is None else x[rows].reshape(len(rows), -1)
  bad = ~np.isfinite(flat).all(axis=1)
  if bad.any():
    i = _first(bad)
    row = i if rows is None else int(rows[i])
    raise ValueError(f"`data.{name}`[{row}] has non-finite features ({int(bad.sum())} rows); "
                     "clean the data, or pass check_data=False to inject faults on purpose.")


def validate(data: FederatedData, model=None, *, check_values: bool = True) -> None:
  """Raises a ``ValueError`` naming the culprit if ``data`` (or ``model`` on it) is malformed.

  Checks shapes and dtypes always; with ``check_values`` also every value (labels in
  ``[0, num_classes)``, finite features, client indices inside ``x``), which reads the arrays
  once, O(M) on the host.

  Args:
    data: the federated dataset.
    model: optional :class:`jaxfl.models.Model`; its input shape must equal the examples' and
      its output width ``num_classes`` (checked with ``jax.eval_shape``: traced, not compiled).
    check_values: also scan the values.
  """
  if not isinstance(data.num_classes, int | np.integer) or data.num_classes < 1:
    raise ValueError(f"`data.num_classes` must be a positive int, got {data.num_classes!r}.")
  for xs, ys in (("x", "y"), ("x_test", "y_test")):
    x, y = getattr(data, xs), getattr(data, ys)
    if len(x) != len(y):
      raise ValueError(f"`data.{xs}` has {len(x)} rows but `data.{ys}` has {len(y)}.")
  if len(data.x_test) == 0:
    raise ValueError("`data.x_test` is empty: the test set needs at least one example.")
  if tuple(data.x_test.shape[1:]) != tuple(data.x.shape[1:]):
    raise ValueError(f"`data.x_test` examples have shape {tuple(data.x_test.shape[1:])} but "
                     f"`data.x` examples have {tuple(data.x.shape[1:])}.")
  idx, sizes = np.asarray(data.client_indices), np.asarray(data.client_sizes)
  if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"`data.client_indices` must be an int array [clients, max size], got "
                     f"{idx.dtype}{list(idx.shape)}.")
  if sizes.shape != (idx.shape[0],):
    raise ValueError(f"`data.client_sizes` must have one entry per client ({idx.shape[0]}), "
                     f"got shape {sizes.shape}.")
  if np.any(sizes < 1):
    raise ValueError(f"`data` has empty clients: {np.flatnonzero(sizes < 1)[:10].tolist()}.")
  if np.any(sizes > idx.shape[1]):
    c = _first(sizes > idx.shape[1])
    raise ValueError(f"`data.client_sizes`[{c}] = {int(sizes[c])} exceeds the "
                     f"{idx.shape[1]} columns of `data.client_indices`.")
  if check_values:
    real = np.arange(idx.shape[1])[None, :] < sizes[:, None]
    bad = real & ((idx < 0) | (idx >= len(data.x)))
    if bad.any():
      c, j = np.argwhere(bad)[0]
      raise ValueError(f"`data.client_indices`[{c}, {j}] = {int(idx[c, j])} is outside "
                       f"`data.x` ({len(data.x)} rows).")
    _check_labels("y", np.asarray(data.y), int(data.num_classes))
    _check_labels("y_test", np.asarray(data.y_test), int(data.num_classes))
    _check_finite("x", np.asarray(data.x), np.unique(idx[real]))
    _check_finite("x_test", np.asarray(data.x_test))
  if model is not None:
    _check_model(data, model)


def _check_model(data: FederatedData, model) -> None:
  import jax
  import jax.numpy as jnp

  shape = tuple(data.x.shape[1:])
  if model.input_shape and tuple(model.input_shape) != shape:
    raise ValueError(f"`model` expects examples of shape {tuple(model.input_shape)} but `data` "
                     f"has {shape}.")

  def logits(key):
    params, model_state = model.init(key)
    return model.apply(params, model_state, jnp.zeros((1,) + shape, jnp.float32), train=False,
                       rng=None)[0]

  out = jax.eval_shape(logits, jax.random.key(0))
  if out.shape[-1] != data.num_classes:
    raise ValueError(f"`model` {model.name!r} outputs {out.shape[-1]} logits but `data` has "
                     f"{data.num_classes} classes.")
