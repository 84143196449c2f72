"""jaxfl: communication-efficient federated learning as jit-compiled JAX/optax functions.

A federated round is one pure, jit-compiled function; clients are ``jax.vmap`` ped and laid
across devices; every method is an optax transformation. ``import jaxfl`` never imports
TensorFlow or tensorflow-datasets.
"""

from jaxfl import aggregation as aggregation
from jaxfl import algorithms as algorithms
from jaxfl import comm as comm
from jaxfl import data as data
from jaxfl import evaluation as evaluation
from jaxfl import hyperparams as hyperparams
from jaxfl import masks as masks
from jaxfl import memory as memory
from jaxfl import models as models
from jaxfl import sampling as sampling
from jaxfl import sharding as sharding
from jaxfl import transforms as transforms
from jaxfl import tree as tree
from jaxfl import views as views
from jaxfl import xla_options as xla_options
from jaxfl.algorithms import Algorithm as Algorithm
from jaxfl.client import LocalTraining as LocalTraining
from jaxfl.client import make_client_update as make_client_update
from jaxfl.round import Round as Round
from jaxfl.round import ServerState as ServerState
from jaxfl.round import build_round as build_round
from jaxfl.sharding import set_cpu_devices as set_cpu_devices
from jaxfl.simulation import NonFiniteUpdateError as NonFiniteUpdateError
from jaxfl.simulation import SimulationResult as SimulationResult
from jaxfl.simulation import simulate as simulate

__version__ = "0.1.0"

__all__ = ["Algorithm", "LocalTraining", "NonFiniteUpdateError", "Round", "ServerState",
           "SimulationResult", "aggregation", "algorithms", "build_round", "comm", "data",
           "evaluation", "hyperparams", "make_client_update", "masks", "memory", "models",
           "sampling", "set_cpu_devices", "sharding", "simulate", "transforms", "tree", "views",
           "xla_options", "__version__"]
