"""jaxfl: communication-efficient federated learning as jit-compiled JAX/optax functions."""

from jaxfl import data as data
from jaxfl import models as models
from jaxfl import transforms as transforms
from jaxfl import tree as tree

__version__ = "0.1.0"
