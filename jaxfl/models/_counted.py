"""A model whose params carry per-entry counts for masked (sub-model) aggregation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxfl.aggregation import VALUES, counted
from jaxfl.models._model import Model


def with_counts(model: Model, counts_like: Callable[[Any], Any]) -> Model:
  """Wraps ``model`` so its params are ``{"params": params, "counts": counts}``.

  The count leaves are never used by ``apply`` (so never trained); they only carry each
  client's training mask to :func:`jaxfl.aggregation.masked_mean` inside the ordinary upload
  (see there, and :func:`jaxfl.algorithms.prism`). The server keeps them at zero.

  Args:
    model: any :class:`Model`.
    counts_like: ``params -> counts``: a tree with the structure of ``params`` whose leaves
      are zeros broadcastable to the matching params leaves, shaped like the masks the
      method's view hands out (e.g. ``f32[]`` for a leaf always trained whole).

  Returns:
    A :class:`Model` with the same ``apply`` on the ``"params"`` entry; ``name`` and
    ``input_shape`` unchanged.
  """

  def init(key):
    params, model_state = model.init(key)
    counts = counts_like(params)
    try:
      jax.tree.structure(params).flatten_up_to(counts)
    except (ValueError, TypeError) as e:
      raise ValueError(f"`counts_like` must return a tree with the structure of the params: {e}"
                       ) from e
    return counted(params, counts), model_state

  def apply(params, model_state, x, *, train: bool, rng=None):
    return model.apply(params[VALUES], model_state, x, train=train, rng=rng)

  return Model(init, apply, model.name, model.input_shape)


__all__ = ["with_counts"]
