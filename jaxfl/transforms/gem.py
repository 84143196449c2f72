"""Compatibility path: use ``jaxfl.masks`` (mask building) and ``jaxfl.transforms`` (transforms).

Kept only while ``experiments/gem_finetune.py`` and ``experiments/gem_glue.py`` use
``gem.<name>`` for names that now live in two packages; remove once they import
``jaxfl.masks`` and ``jaxfl.transforms.gem_mask`` directly.
"""

from jaxfl.masks import ALLOCATIONS as ALLOCATIONS
from jaxfl.masks import METHODS as METHODS
from jaxfl.masks import allocate_budget as allocate_budget
from jaxfl.masks import build_mask as build_mask
from jaxfl.masks import calibration_gradients as calibration_gradients
from jaxfl.masks import eligible_leaves as eligible_leaves
from jaxfl.masks import gradient_weight_ratio as gradient_weight_ratio
from jaxfl.masks import layer_entropy as layer_entropy
from jaxfl.masks import mask_count as mask_count
from jaxfl.masks import mask_density as mask_density
from jaxfl.masks import resolve_budget as resolve_budget
from jaxfl.masks import topk_mask as topk_mask
from jaxfl.transforms._gem import GemMaskState as GemMaskState
from jaxfl.transforms._gem import gem_mask as gem_mask
from jaxfl.transforms._gem import masked_uplink as masked_uplink

__all__ = ["ALLOCATIONS", "METHODS", "GemMaskState", "allocate_budget", "build_mask",
           "calibration_gradients", "eligible_leaves", "gem_mask", "gradient_weight_ratio",
           "layer_entropy", "mask_count", "mask_density", "masked_uplink", "resolve_budget",
           "topk_mask"]
