"""Optax transformations in the four roles of a federated round.

* client optimizers: :func:`mlbfgs`, :func:`scale_by_mlbfgs`, :func:`plain_stochastic_lbfgs`,
  :func:`layerwise_sam` (with ``LocalTraining(pass_grad_fn=True)``), :func:`add_proximal_term`,
  :func:`scaffold_correction`, :func:`scale_by_round_schedule`, :func:`frobenius_decay`,
  :func:`mask_gradients`, :func:`hessian_aware_lr` (large-batch training, fed measured
  sharpness) (+ any optax optimizer);
* uplink transforms (per client, inside vmap, called with ``key=``): :func:`masked_uplink`,
  :func:`qsgd_quantize`, :func:`random_dropout`, :func:`lbgm` (per-client state),
  :func:`scaffold_client_control`;
* server transforms on the pseudo-gradient: :func:`fedluar`, :func:`fedluar_bypass`,
  :func:`fedlama`, :func:`partial_averaging`, :func:`prunefl`, :func:`scaffold_server_control`,
  :func:`prism_server` (+ any optax optimizer); after the server optimizer, on its step:
  :func:`fedmut_direction`;
* parameter masks for sparse fine-tuning: :func:`gem_mask` (masks are built by
  :mod:`jaxfl.masks`).

``__all__`` lists exactly the transforms (factories returning an
``optax.GradientTransformation(ExtraArgs)``) and their state NamedTuples;
``tests/transforms/conformance_test.py`` runs its battery over every factory in it. Helpers
that go with one transform are importable from here but are not transforms and are not in
``__all__``: mL-BFGS's ``block_sharding``, ``resnet_block_labels``, ``top_level_block_labels``,
``damp_pair``, ``two_loop``; FedLAMA's ``fedlama_intervals``, ``layer_discrepancy``; FedLUAR's
``recycle_mask``; layer-wise SAM's ``layer_ids``; partial averaging's ``pma_group_mask``,
``pma_group_sizes``; the Hessian-aware rate's ``hessian_top_eigenvalue``; FedMut's
``balanced_signs``; PruneFL's ``keep_top_fraction`` (also in :mod:`jaxfl.masks`); PriSM's
``sample_components``, ``sampling_logits``, ``top_n_mask``; the one-tensor
quantiser ``qsgd`` and ``content_key``. QSGD bit accounting is in :mod:`jaxfl.comm`.
"""

from jaxfl.transforms._compression import content_key as content_key
from jaxfl.transforms._compression import qsgd as qsgd
from jaxfl.transforms._compression import qsgd_quantize as qsgd_quantize
from jaxfl.transforms._compression import random_dropout as random_dropout
from jaxfl.transforms._fedlama import FedLAMAState as FedLAMAState
from jaxfl.transforms._fedlama import fedlama as fedlama
from jaxfl.transforms._fedlama import fedlama_intervals as fedlama_intervals
from jaxfl.transforms._fedlama import layer_discrepancy as layer_discrepancy
from jaxfl.transforms._fedluar import FedLUARBypassState as FedLUARBypassState
from jaxfl.transforms._fedluar import FedLUARState as FedLUARState
from jaxfl.transforms._fedluar import fedluar as fedluar
from jaxfl.transforms._fedluar import fedluar_bypass as fedluar_bypass
from jaxfl.transforms._fedluar import recycle_mask as recycle_mask
from jaxfl.transforms._fedmut import FedMutState as FedMutState
from jaxfl.transforms._fedmut import balanced_signs as balanced_signs
from jaxfl.transforms._fedmut import fedmut_direction as fedmut_direction
from jaxfl.transforms._fedprox import ProximalState as ProximalState
from jaxfl.transforms._fedprox import add_proximal_term as add_proximal_term
from jaxfl.transforms._gem import GemMaskState as GemMaskState
from jaxfl.transforms._gem import gem_mask as gem_mask
from jaxfl.transforms._gem import masked_uplink as masked_uplink
from jaxfl.transforms._hessian_lr import HessianAwareLRState as HessianAwareLRState
from jaxfl.transforms._hessian_lr import hessian_aware_lr as hessian_aware_lr
from jaxfl.transforms._hessian_lr import hessian_top_eigenvalue as hessian_top_eigenvalue
from jaxfl.transforms._layerwise_sam import LayerwiseSAMState as LayerwiseSAMState
from jaxfl.transforms._layerwise_sam import layer_ids as layer_ids
from jaxfl.transforms._layerwise_sam import layerwise_sam as layerwise_sam
from jaxfl.transforms._lbgm import LBGMState as LBGMState
from jaxfl.transforms._lbgm import lbgm as lbgm
from jaxfl.transforms._mlbfgs import MLBFGSState as MLBFGSState
from jaxfl.transforms._mlbfgs import mlbfgs as mlbfgs
from jaxfl.transforms._mlbfgs import plain_stochastic_lbfgs as plain_stochastic_lbfgs
from jaxfl.transforms._mlbfgs import scale_by_mlbfgs as scale_by_mlbfgs
from jaxfl.transforms._mlbfgs_blocks import block_sharding as block_sharding
from jaxfl.transforms._mlbfgs_blocks import resnet_block_labels as resnet_block_labels
from jaxfl.transforms._mlbfgs_blocks import top_level_block_labels as top_level_block_labels
from jaxfl.transforms._mlbfgs_two_loop import damp_pair as damp_pair
from jaxfl.transforms._mlbfgs_two_loop import two_loop as two_loop
from jaxfl.transforms._partial_averaging import PartialAveragingState as PartialAveragingState
from jaxfl.transforms._partial_averaging import partial_averaging as partial_averaging
from jaxfl.transforms._partial_averaging import pma_group_mask as pma_group_mask
from jaxfl.transforms._partial_averaging import pma_group_sizes as pma_group_sizes
from jaxfl.transforms._prism import PrismState as PrismState
from jaxfl.transforms._prism import frobenius_decay as frobenius_decay
from jaxfl.transforms._prism import mask_gradients as mask_gradients
from jaxfl.transforms._prism import prism_server as prism_server
from jaxfl.transforms._prism import sample_components as sample_components
from jaxfl.transforms._prism import sampling_logits as sampling_logits
from jaxfl.transforms._prism import top_n_mask as top_n_mask
from jaxfl.transforms._prunefl import PruneFLState as PruneFLState
from jaxfl.transforms._prunefl import keep_top_fraction as keep_top_fraction
from jaxfl.transforms._prunefl import prunefl as prunefl
from jaxfl.transforms._round_schedule import scale_by_round_schedule as scale_by_round_schedule
from jaxfl.transforms._scaffold import ScaffoldClientState as ScaffoldClientState
from jaxfl.transforms._scaffold import ScaffoldState as ScaffoldState
from jaxfl.transforms._scaffold import scaffold_client_control as scaffold_client_control
from jaxfl.transforms._scaffold import scaffold_correction as scaffold_correction
from jaxfl.transforms._scaffold import scaffold_server_control as scaffold_server_control

__all__ = [
    "FedLAMAState", "FedLUARBypassState", "FedLUARState", "FedMutState", "GemMaskState",
    "HessianAwareLRState", "LBGMState", "LayerwiseSAMState", "MLBFGSState",
    "PartialAveragingState", "PrismState", "ProximalState", "PruneFLState",
    "ScaffoldClientState", "ScaffoldState", "add_proximal_term", "fedlama", "fedluar",
    "fedluar_bypass", "fedmut_direction", "frobenius_decay", "gem_mask", "hessian_aware_lr",
    "layerwise_sam", "lbgm", "mask_gradients", "masked_uplink", "mlbfgs",
    "partial_averaging", "plain_stochastic_lbfgs", "prism_server", "prunefl", "qsgd_quantize",
    "random_dropout", "scaffold_client_control", "scaffold_correction",
    "scaffold_server_control", "scale_by_mlbfgs", "scale_by_round_schedule",
]
