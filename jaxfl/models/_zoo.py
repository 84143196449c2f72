"""The models used in the papers and benchmarks, as linen modules and ready ``Model`` s."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxfl.models._factorised import prism_cnn, prism_resnet18
from jaxfl.models._layers import Conv, max_pool
from jaxfl.models._model import Model, from_linen


class MLP(nn.Module):
  """Fully connected ReLU network on flattened inputs."""

  hidden: Sequence[int] = (200, 200)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """conv5x5-32, maxpool2, conv5x5-64, maxpool2, dense, dense.

  With ``dense=512`` this is the 2-layer CNN of FedAvg (McMahan et al., 2017) and of the
  pfl-research CIFAR-10 benchmark; with ``dense=2048, num_classes=62`` it is the LEAF FEMNIST
  CNN of the FedLUAR/PMA experiments (ALGORITHMS.md §1.2).
  """

  features: Sequence[int] = (32, 64)
  kernel: int = 5
  dense: int = 512
  num_classes: int = 10
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    for f in self.features:
      x = nn.relu(Conv(f, (self.kernel, self.kernel), impl=self.conv_impl)(x))
      x = max_pool(x, (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense)(x))
    return nn.Dense(self.num_classes)(x)


class SmallCNN(nn.Module):
  """conv3x3-16, conv3x3-32, maxpool2, dense 64, dense: the digits CNN of DESIGN.md."""

  num_classes: int = 10
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    x = nn.relu(Conv(16, (3, 3), impl=self.conv_impl)(x))
    x = nn.relu(Conv(32, (3, 3), impl=self.conv_impl)(x))
    x = max_pool(x, (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(self.num_classes)(x)


class _BasicBlock(nn.Module):
  features: int
  strides: int
  project: bool
  conv_impl: str
  bn_momentum: float
  bn_eps: float

  @nn.compact
  def __call__(self, x, train: bool):
    init = nn.initializers.glorot_uniform()
    bn = lambda scale_init=nn.initializers.ones: nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps,
        scale_init=scale_init)
    s = (self.strides, self.strides)
    y = Conv(self.features, (3, 3), s, use_bias=False, impl=self.conv_impl, kernel_init=init)(x)
    y = nn.relu(bn()(y))
    y = Conv(self.features, (3, 3), use_bias=False, impl=self.conv_impl, kernel_init=init)(y)
    y = bn(nn.initializers.zeros)(y)  # zero-init gamma of the block's last BN (authors' code)
    if self.project:
      x = Conv(self.features, (1, 1), s, use_bias=False, impl=self.conv_impl, kernel_init=init)(x)
      x = bn()(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR ResNet (He et al., 2016) as in the LMLS-lab code (ALGORITHMS.md §1.2).

  3x3 conv16 stem without bias + BN + ReLU; three stages of ``blocks`` basic blocks
  (16/32/64 channels x ``width``, stride 2 entering stages 2 and 3), a 1x1 conv+BN projection
  shortcut on the first block of every stage, zero-initialised gamma on each block's second
  BN, global average pooling, dense logits. Glorot-uniform init, BN momentum 0.99, eps 1e-3.
  ResNet-20 = ``blocks=3`` (23 kernel tensors).
  """

  blocks: int = 3
  width: int = 1
  num_classes: int = 10
  conv_impl: str = "auto"
  bn_momentum: float = 0.99
  bn_eps: float = 1e-3

  @nn.compact
  def __call__(self, x, train: bool = False):
    init = nn.initializers.glorot_uniform()
    x = Conv(16, (3, 3), use_bias=False, impl=self.conv_impl, kernel_init=init)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_eps)(x)
    x = nn.relu(x)
    for stage, f in enumerate((16, 32, 64)):
      for b in range(self.blocks):
        x = _BasicBlock(f * self.width, 2 if (stage > 0 and b == 0) else 1, b == 0,
                        self.conv_impl, self.bn_momentum, self.bn_eps)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=init)(x)


def mlp(input_shape, num_classes: int = 10, hidden: Sequence[int] = (200, 200)) -> Model:
  """An MLP on flattened inputs."""
  return from_linen(MLP(tuple(hidden), num_classes), input_shape, "mlp")


def cnn(input_shape, num_classes: int = 10, dense: int = 512, conv_impl: str = "auto") -> Model:
  """The FedAvg / pfl-research 2-layer CNN."""
  return from_linen(CNN(dense=dense, num_classes=num_classes, conv_impl=conv_impl), input_shape,
                    "cnn")


def small_cnn(input_shape, num_classes: int = 10, conv_impl: str = "auto") -> Model:
  """The small digits CNN (conv3x3-16, conv3x3-32, dense 64)."""
  return from_linen(SmallCNN(num_classes, conv_impl), input_shape, "small_cnn")


def femnist_cnn(input_shape=(28, 28, 1), num_classes: int = 62,
                conv_impl: str = "auto") -> Model:
  """The LEAF FEMNIST CNN (conv5x5-32, pool, conv5x5-64, pool, dense 2048, dense 62)."""
  return from_linen(CNN(dense=2048, num_classes=num_classes, conv_impl=conv_impl), input_shape,
                    "femnist_cnn")


def resnet20(input_shape=(32, 32, 3), num_classes: int = 10, conv_impl: str = "auto") -> Model:
  """ResNet-20 with BatchNorm (statistics in ``model_state['batch_stats']``)."""
  return from_linen(ResNet(3, 1, num_classes, conv_impl), input_shape, "resnet20")


# prism_cnn / prism_resnet18: PriSM's SVD-factorised models (``--algorithm prism`` needs one).
MODELS = {"mlp": mlp, "cnn": cnn, "small_cnn": small_cnn, "femnist_cnn": femnist_cnn,
          "resnet20": resnet20, "prism_cnn": prism_cnn, "prism_resnet18": prism_resnet18}


def get_model(name: str, input_shape, num_classes: int, **kwargs) -> Model:
  """Builds a model from the registry by name."""
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; expected one of {sorted(MODELS)}.")
  return MODELS[name](tuple(input_shape), num_classes=num_classes, **kwargs)
