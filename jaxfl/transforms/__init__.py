"""Optax transformations in the four roles of a round.

* client optimizers: :func:`mlbfgs`, :func:`add_proximal_term` (+ any optax optimizer);
* uplink transforms (per client, inside vmap): :func:`masked_uplink`, ``compression``,
  :func:`lbgm` (per-client state);
* server transforms on the pseudo-gradient: ``fedluar``, ``fedlama``, ``prunefl`` (+ any optax optimizer);
* parameter masks for sparse fine-tuning: :func:`gem_mask`, :func:`build_mask`.
"""

from jaxfl.transforms._fedlama import FedLAMAState as FedLAMAState
from jaxfl.transforms._fedlama import fedlama as fedlama
from jaxfl.transforms._fedlama import fedlama_intervals as fedlama_intervals
from jaxfl.transforms._fedlama import layer_discrepancy as layer_discrepancy
from jaxfl.transforms._fedluar import FedLUARBypassState as FedLUARBypassState
from jaxfl.transforms._fedluar import FedLUARState as FedLUARState
from jaxfl.transforms._fedluar import fedluar as fedluar
from jaxfl.transforms._fedluar import fedluar_bypass as fedluar_bypass
from jaxfl.transforms._fedluar import recycle_mask as recycle_mask
from jaxfl.transforms._lbgm import LBGMState as LBGMState
from jaxfl.transforms._lbgm import lbgm as lbgm
from jaxfl.transforms._mlbfgs import MLBFGSState as MLBFGSState
from jaxfl.transforms._mlbfgs import block_sharding as block_sharding
from jaxfl.transforms._mlbfgs import damp_pair as damp_pair
from jaxfl.transforms._mlbfgs import mlbfgs as mlbfgs
from jaxfl.transforms._mlbfgs import plain_stochastic_lbfgs as plain_stochastic_lbfgs
from jaxfl.transforms._mlbfgs import resnet_block_labels as resnet_block_labels
from jaxfl.transforms._mlbfgs import scale_by_mlbfgs as scale_by_mlbfgs
from jaxfl.transforms._mlbfgs import top_level_block_labels as top_level_block_labels
from jaxfl.transforms._mlbfgs import two_loop as two_loop
from jaxfl.transforms._prunefl import PruneFLState as PruneFLState
from jaxfl.transforms._prunefl import keep_top_fraction as keep_top_fraction
from jaxfl.transforms._prunefl import prunefl as prunefl
from jaxfl.transforms._sparse_delta import SparseDelta as SparseDelta
from jaxfl.transforms._sparse_delta import apply_sparse_delta as apply_sparse_delta
from jaxfl.transforms._sparse_delta import load_sparse_delta as load_sparse_delta
from jaxfl.transforms._sparse_delta import save_sparse_delta as save_sparse_delta
from jaxfl.transforms._sparse_delta import sparse_delta as sparse_delta
from jaxfl.transforms.compression import content_key as content_key
from jaxfl.transforms.compression import qsgd as qsgd
from jaxfl.transforms.compression import qsgd_bits_per_element as qsgd_bits_per_element
from jaxfl.transforms.compression import qsgd_quantize as qsgd_quantize
from jaxfl.transforms.compression import qsgd_uplink_bytes as qsgd_uplink_bytes
from jaxfl.transforms.compression import random_dropout as random_dropout
from jaxfl.transforms.fedprox import ProximalState as ProximalState
from jaxfl.transforms.fedprox import add_proximal_term as add_proximal_term
from jaxfl.transforms.gem import ALLOCATIONS as ALLOCATIONS
from jaxfl.transforms.gem import METHODS as METHODS
from jaxfl.transforms.gem import GemMaskState as GemMaskState
from jaxfl.transforms.gem import allocate_budget as allocate_budget
from jaxfl.transforms.gem import build_mask as build_mask
from jaxfl.transforms.gem import calibration_gradients as calibration_gradients
from jaxfl.transforms.gem import eligible_leaves as eligible_leaves
from jaxfl.transforms.gem import gem_mask as gem_mask
from jaxfl.transforms.gem import gradient_weight_ratio as gradient_weight_ratio
from jaxfl.transforms.gem import layer_entropy as layer_entropy
from jaxfl.transforms.gem import mask_count as mask_count
from jaxfl.transforms.gem import mask_density as mask_density
from jaxfl.transforms.gem import masked_uplink as masked_uplink
from jaxfl.transforms.gem import resolve_budget as resolve_budget
from jaxfl.transforms.gem import topk_mask as topk_mask

__all__ = ["ALLOCATIONS", "METHODS", "LBGMState", "PruneFLState", "keep_top_fraction", "lbgm",
           "prunefl", "FedLAMAState", "fedlama", "fedlama_intervals",
           "layer_discrepancy", "FedLUARBypassState", "FedLUARState", "GemMaskState",
           "MLBFGSState", "ProximalState", "content_key", "fedluar", "fedluar_bypass", "qsgd",
           "qsgd_bits_per_element", "qsgd_quantize", "qsgd_uplink_bytes", "random_dropout",
           "recycle_mask",
           "SparseDelta", "add_proximal_term", "allocate_budget", "apply_sparse_delta",
           "block_sharding", "build_mask", "calibration_gradients", "damp_pair",
           "eligible_leaves", "gem_mask", "gradient_weight_ratio", "layer_entropy",
           "load_sparse_delta", "mask_count", "mask_density", "masked_uplink", "mlbfgs",
           "plain_stochastic_lbfgs", "resnet_block_labels", "resolve_budget", "save_sparse_delta",
           "scale_by_mlbfgs", "sparse_delta", "top_level_block_labels", "topk_mask", "two_loop"]
