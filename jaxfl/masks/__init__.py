"""Sparsity masks: scores, per-layer budgets, mask construction and sparse deltas.

* scores: :func:`calibration_gradients`, :func:`gradient_weight_ratio` (GEM's
  :math:`|G| / (|w^0| + \\epsilon)`), :func:`layer_entropy`;
* budgets: :func:`eligible_leaves`, :func:`resolve_budget`, :func:`allocate_budget`
  (:data:`ALLOCATIONS`);
* masks: :func:`build_mask` (:data:`METHODS`), :func:`topk_mask`, :func:`keep_top_fraction`
  (PruneFL's rule), :func:`mask_count`, :func:`mask_density`;
* storage: :class:`SparseDelta`, :func:`sparse_delta`, :func:`apply_sparse_delta`,
  :func:`save_sparse_delta`, :func:`load_sparse_delta`.

The transforms that apply a mask (:func:`jaxfl.transforms.gem_mask`,
:func:`jaxfl.transforms.masked_uplink`) are in :mod:`jaxfl.transforms`.
"""

from jaxfl.masks._budget import ALLOCATIONS as ALLOCATIONS
from jaxfl.masks._budget import allocate_budget as allocate_budget
from jaxfl.masks._budget import eligible_leaves as eligible_leaves
from jaxfl.masks._budget import resolve_budget as resolve_budget
from jaxfl.masks._build import METHODS as METHODS
from jaxfl.masks._build import build_mask as build_mask
from jaxfl.masks._build import mask_count as mask_count
from jaxfl.masks._build import mask_density as mask_density
from jaxfl.masks._build import topk_mask as topk_mask
from jaxfl.masks._scores import calibration_gradients as calibration_gradients
from jaxfl.masks._scores import gradient_weight_ratio as gradient_weight_ratio
from jaxfl.masks._scores import layer_entropy as layer_entropy
from jaxfl.masks._sparse_delta import SparseDelta as SparseDelta
from jaxfl.masks._sparse_delta import apply_sparse_delta as apply_sparse_delta
from jaxfl.masks._sparse_delta import load_sparse_delta as load_sparse_delta
from jaxfl.masks._sparse_delta import save_sparse_delta as save_sparse_delta
from jaxfl.masks._sparse_delta import sparse_delta as sparse_delta
from jaxfl.transforms._prunefl import keep_top_fraction as keep_top_fraction

__all__ = ["ALLOCATIONS", "METHODS", "SparseDelta", "allocate_budget", "apply_sparse_delta",
           "build_mask", "calibration_gradients", "eligible_leaves", "gradient_weight_ratio",
           "keep_top_fraction", "layer_entropy", "load_sparse_delta", "mask_count",
           "mask_density", "resolve_budget", "save_sparse_delta", "sparse_delta", "topk_mask"]
