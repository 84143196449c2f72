"""Flax models as pure ``Model(init, apply)`` pairs, and adapters for user models."""

from jaxfl.models._layers import CONV_IMPLS as CONV_IMPLS
from jaxfl.models._layers import Conv as Conv
from jaxfl.models._layers import batched_clients as batched_clients
from jaxfl.models._layers import conv2d as conv2d
from jaxfl.models._layers import max_pool as max_pool
from jaxfl.models._model import Model as Model
from jaxfl.models._model import from_linen as from_linen
from jaxfl.models._model import from_nnx as from_nnx
from jaxfl.models._zoo import CNN as CNN
from jaxfl.models._zoo import MLP as MLP
from jaxfl.models._zoo import MODELS as MODELS
from jaxfl.models._zoo import ResNet as ResNet
from jaxfl.models._zoo import SmallCNN as SmallCNN
from jaxfl.models._zoo import cnn as cnn
from jaxfl.models._zoo import femnist_cnn as femnist_cnn
from jaxfl.models._zoo import get_model as get_model
from jaxfl.models._zoo import mlp as mlp
from jaxfl.models._zoo import resnet20 as resnet20
from jaxfl.models._zoo import small_cnn as small_cnn

__all__ = ["CNN", "CONV_IMPLS", "MLP", "MODELS", "Conv", "Model", "ResNet", "SmallCNN",
           "batched_clients", "cnn", "conv2d", "femnist_cnn", "from_linen", "from_nnx",
           "get_model", "max_pool", "mlp", "resnet20", "small_cnn"]
