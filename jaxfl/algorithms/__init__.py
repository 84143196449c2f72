"""Ready-made federated algorithms: compositions of client, aggregator and server transforms."""

from jaxfl.algorithms._base import Algorithm as Algorithm
from jaxfl.algorithms._embracing import depth_order as depth_order
from jaxfl.algorithms._embracing import embracing_view as embracing_view
from jaxfl.algorithms._embracing import embracingfl as embracingfl
from jaxfl.algorithms._embracing import layers_for_budget as layers_for_budget
from jaxfl.algorithms._embracing import suffix_mask as suffix_mask
from jaxfl.algorithms._embracing import suffix_training_bytes as suffix_training_bytes
from jaxfl.algorithms._fedmut import fedmut as fedmut
from jaxfl.algorithms._fedmut import fedmut_view as fedmut_view
from jaxfl.algorithms._fedopt import ALGORITHMS as ALGORITHMS
from jaxfl.algorithms._fedopt import fedadagrad as fedadagrad
from jaxfl.algorithms._fedopt import fedadam as fedadam
from jaxfl.algorithms._fedopt import fedavg as fedavg
from jaxfl.algorithms._fedopt import fedavgm as fedavgm
from jaxfl.algorithms._fedopt import fedopt as fedopt
from jaxfl.algorithms._fedopt import fedprox as fedprox
from jaxfl.algorithms._fedopt import fedyogi as fedyogi
from jaxfl.algorithms._fedopt import get_algorithm as get_algorithm
from jaxfl.algorithms._heterofl import fjord as fjord
from jaxfl.algorithms._heterofl import heterofl as heterofl
from jaxfl.algorithms._heterofl import heterofl_view as heterofl_view
from jaxfl.algorithms._heterofl import width_mask as width_mask
from jaxfl.algorithms._heterofl import width_model as width_model
from jaxfl.algorithms._pma import pma as pma
from jaxfl.algorithms._pma import pma_local_average as pma_local_average
from jaxfl.algorithms._prism import draw_capacities as draw_capacities
from jaxfl.algorithms._prism import prism as prism
from jaxfl.algorithms._prism import prism_client_update as prism_client_update
from jaxfl.algorithms._prism import prism_fedavg as prism_fedavg
from jaxfl.algorithms._prism import prism_view as prism_view
from jaxfl.algorithms._prism import submodel_fraction as submodel_fraction
from jaxfl.algorithms._scaffold_fednova import fednova as fednova
from jaxfl.algorithms._scaffold_fednova import scaffold as scaffold
from jaxfl.algorithms.layerwise import LAYERWISE_ALGORITHMS as LAYERWISE_ALGORITHMS
from jaxfl.algorithms.layerwise import fedacg as fedacg
from jaxfl.algorithms.layerwise import feddropoutavg as feddropoutavg
from jaxfl.algorithms.layerwise import fedlama as fedlama
from jaxfl.algorithms.layerwise import fedluar as fedluar
from jaxfl.algorithms.layerwise import fedpaq as fedpaq
from jaxfl.algorithms.layerwise import lbgm as lbgm
from jaxfl.algorithms.layerwise import prunefl as prunefl

LAYERWISE_ALGORITHMS["fedmut"] = fedmut  # a FedLUAR baseline, with the lab's local protocol
ALGORITHMS.update(LAYERWISE_ALGORITHMS)  # one registry for get_algorithm and the CLI
ALGORITHMS["pma"] = pma

# PriSM, EmbracingFL, HeteroFL and FjORD are not in ALGORITHMS (get_algorithm's registry): they
# need facts of the model (PriSM: factorised layers; the others: its depth order), which the CLI
# supplies.

__all__ = ["ALGORITHMS", "Algorithm", "LAYERWISE_ALGORITHMS", "depth_order", "draw_capacities",
           "embracing_view", "embracingfl", "fedacg", "fedadagrad", "fedadam", "fedavg", "fedavgm",
           "feddropoutavg", "fedlama", "fedluar", "fedmut", "fedmut_view", "fednova", "fedopt",
           "fedpaq", "fedprox", "fedyogi", "fjord", "get_algorithm", "heterofl", "heterofl_view",
           "layers_for_budget", "lbgm", "pma", "pma_local_average", "prism", "prism_client_update",
           "prism_fedavg", "prism_view", "prunefl", "scaffold", "submodel_fraction", "suffix_mask",
           "suffix_training_bytes", "width_mask", "width_model"]
