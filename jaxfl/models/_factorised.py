r"""SVD-factorised layers (PriSM's principal components) and batch-statistics BatchNorm.

A :math:`k\times k` conv kernel :math:`W` (HWIO, ``f32[k, k, C_in, C_out]``) is read as the
matrix :math:`\bar W \in \mathbb R^{K\times C_{out}}`, :math:`K = k^2 C_{in}` (the rows of an
HWIO kernel reshaped, i.e. the im2col patch order), and kept as two factors from its thin SVD
:math:`\bar W = A\,\mathrm{diag}(\sigma)\,B^\top`:

.. math::
  V = A\,\mathrm{diag}(\sqrt\sigma) \in \mathbb R^{K\times r}, \qquad
  U = \mathrm{diag}(\sqrt\sigma)\,B^\top \in \mathbb R^{r\times C_{out}}, \qquad
  r = \min(C_{out}, K),

so :math:`\bar W = V U`. ``V`` is stored as a :math:`k\times k` conv with :math:`r` output
channels (``f32[k, k, C_in, r]``), ``U`` as a 1x1 conv written as a matrix (``f32[r,
C_out]``): the layer computes ``conv(x, V) @ U (+ bias)``. Component :math:`j` is the pair
(output channel :math:`j` of ``V``, row :math:`j` of ``U``) with singular value
:math:`\sigma_j = \lVert V_{:,j}\rVert\,\lVert U_{j,:}\rVert`. A dense kernel ``f32[d_in,
d_out]`` is the same with :math:`K = d_in` (PriSM's Linear path).

A factorised layer is recognised by its params: a dict holding ``"V"`` and ``"U"`` (and
optionally ``"bias"``), the names :class:`FactorisedConv` and :class:`FactorisedDense` use;
:func:`factor_layers` lists them, :func:`factorise_params` turns dense layers of a params tree
into that form (so a dense model's params load into its factorised twin).

This is the PyTorch reference's ``Conv2d_Orth_v2`` (``conv2d_V`` then the 1x1 ``conv2d_U``,
:math:`\sqrt\sigma` folded into both) in Flax's layouts. Eligible convs are the ones the
reference decomposes: :math:`k > 1` and :math:`C_{in} \notin \{1, 3\}` (not the stem, not
1x1 shortcuts); BatchNorm and the classifier stay dense.

References:
  Niu, Prakash, Kundu, Lee and Avestimehr, `Overcoming Resource Constraints in Federated
  Learning: Large Models Can Be Trained with only Weak Clients
  <https://openreview.net/forum?id=lx1WnkL9fk>`_, TMLR 2023 (ALGORITHMS.md §7,
  NEXT_METHODS.md §B).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfl.models._layers import Conv, conv2d, max_pool
from jaxfl.models._model import Model, from_linen

Path = tuple[str, ...]

# ----------------------------------------------------------------------------- pure functions


def factorise_kernel(kernel: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Splits a conv (HWIO) or dense (in, out) kernel into SVD factors.

  .. math:: \bar W = A\,\mathrm{diag}(\sigma)\,B^\top \;\Rightarrow\;
    V = A\sqrt\sigma,\; U = \sqrt\sigma B^\top

  Args:
    kernel: ``f[..., C_out]``; every axis but the last is flattened into :math:`K`.

  Returns:
    ``(V, U, sigma)``: ``V`` of shape ``kernel.shape[:-1] + (r,)``, ``U`` of shape
    ``(r, C_out)``, ``sigma`` ``f[r]`` in descending order; ``merge_factors(V, U)``
    reproduces ``kernel`` up to rounding. Computed in (at least) float32, returned in the
    kernel's dtype.
  """
  shape = kernel.shape
  if len(shape) < 2:
    raise ValueError(f"a kernel to factorise needs >= 2 axes (..., C_out), got shape {shape}.")
  k, c_out = int(jnp.size(kernel) // shape[-1]), shape[-1]
  dtype = kernel.dtype
  w = kernel.reshape(k, c_out).astype(jnp.promote_types(dtype, jnp.float32))
  a, s, bt = jnp.linalg.svd(w, full_matrices=False)
  root = jnp.sqrt(s)
  v = (a * root[None, :]).reshape(shape[:-1] + (s.shape[0],))
  u = root[:, None] * bt
  return v.astype(dtype), u.astype(dtype), s.astype(dtype)


def merge_factors(v: jax.Array, u: jax.Array) -> jax.Array:
  """The dense kernel ``V U`` of a factorised layer (shape ``V.shape[:-1] + (C_out,)``)."""
  r = v.shape[-1]
  if u.ndim != 2 or u.shape[0] != r:
    raise ValueError(f"factors do not match: V {v.shape} has r={r} components, U must be "
                     f"(r, C_out), got {u.shape}.")
  w = v.reshape(-1, r) @ u
  return w.reshape(v.shape[:-1] + (u.shape[-1],))


def refactorise(v: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Re-SVD of a factorised layer: the same product ``V U`` as fresh SVD factors.

  Returns:
    ``(V', U', sigma)`` with ``V' U' = V U`` (up to rounding) and the columns of ``V'`` /
    rows of ``U'`` orthogonal, ordered by descending ``sigma``.
  """
  return factorise_kernel(merge_factors(v, u))


def component_norms(v: jax.Array, u: jax.Array) -> jax.Array:
  r""":math:`\lVert V_{:,j}\rVert\,\lVert U_{j,:}\rVert` per component (the singular values
  when the factors are in SVD form), ``f32[r]``."""
  r = v.shape[-1]
  vn = jnp.sqrt(jnp.sum(jnp.square(v.reshape(-1, r).astype(jnp.float32)), axis=0))
  un = jnp.sqrt(jnp.sum(jnp.square(u.astype(jnp.float32)), axis=1))
  return vn * un


def gather_components(v: jax.Array, u: jax.Array, index: jax.Array,
                      weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  r"""The factors of components ``index`` only: a smaller factorised layer.

  .. math:: V_s = V_{:, \mathrm{idx}}\,\mathrm{diag}(w), \qquad
    U_s = \mathrm{diag}(w)\,U_{\mathrm{idx}, :}

  so ``merge_factors(V_s, U_s)`` is the sum of the selected components (weighted by ``w``,
  e.g. 0 for padding entries of a fixed-size index). :class:`FactorisedConv` and
  :class:`FactorisedDense` compute with any number of components, so the same model applied
  to gathered params runs the sub-model at its own size (PriSM's sliced client update).

  Args:
    v: ``f[..., r]`` (conv layout or ``f[d_in, r]``).
    u: ``f[r, C_out]``.
    index: ``i32[n]`` component indices (may be traced; static length).
    weight: optional ``f[n]`` multiplier per gathered component.

  Returns:
    ``(V_s, U_s)`` of shapes ``v.shape[:-1] + (n,)`` and ``(n, C_out)``.
  """
  vs, us = jnp.take(v, index, axis=-1), jnp.take(u, index, axis=0)
  if weight is not None:
    vs = vs * weight.astype(vs.dtype).reshape((1,) * (vs.ndim - 1) + (-1,))
    us = us * weight.astype(us.dtype)[:, None]
  return vs, us


def scatter_components(v: jax.Array, u: jax.Array, v_sub: jax.Array, u_sub: jax.Array,
                       index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes gathered factors back: ``V[..., index] = V_s``, ``U[index] = U_s`` (the inverse
  of :func:`gather_components` without weights; ``index`` must not repeat)."""
  return v.at[..., index].set(v_sub.astype(v.dtype)), u.at[index].set(u_sub.astype(u.dtype))


def eligible_conv(shape: Sequence[int]) -> bool:
  """PriSM's rule for a conv kernel (HWIO): spatial size > 1 and ``C_in`` not in {1, 3}."""
  return len(shape) == 4 and shape[0] * shape[1] > 1 and shape[2] not in (1, 3)


def _is_factor_layer(node) -> bool:
  return (hasattr(node, "keys") and "U" in node and "V" in node
          and not hasattr(node["U"], "keys") and not hasattr(node["V"], "keys"))


def factor_layers(params: Any) -> list[Path]:
  """Paths (tuples of dict keys, in sorted-key order) of the factorised layers in ``params``.

  A factorised layer is a dict holding array leaves ``"V"`` and ``"U"`` (module docstring).
  """
  out: list[Path] = []

  def walk(node, path):
    if _is_factor_layer(node):
      out.append(path)
    elif hasattr(node, "keys"):
      for k in sorted(node.keys()):
        walk(node[k], path + (k,))

  walk(params, ())
  return out


def get_path(tree: Any, path: Path) -> Any:
  """``tree[p0][p1]...``."""
  for k in path:
    tree = tree[k]
  return tree


def set_path(tree: Any, path: Path, value: Any) -> Any:
  """A copy of the nested dict ``tree`` with ``tree[path] = value`` (copy on write)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = set_path(tree[path[0]], path[1:], value)
  return out


def factorise_params(params: Any, layers: Sequence[Path | str]) -> Any:
  """Replaces dense layers ``{"kernel", ["bias"]}`` by ``{"V", "U", ["bias"]}`` (SVD).

  Args:
    params: a params tree of nested dicts.
    layers: the layers to factorise, as paths (tuples of keys) or top-level names.

  Returns:
    The params with those layers factorised; a :class:`FactorisedConv` /
    :class:`FactorisedDense` of the same name computes the same function.
  """
  for layer in layers:
    path = (layer,) if isinstance(layer, str) else tuple(layer)
    node = dict(get_path(params, path))
    if "kernel" not in node:
      raise ValueError(f"layer {path} has no 'kernel' to factorise (keys {sorted(node)}).")
    v, u, _ = factorise_kernel(node.pop("kernel"))
    params = set_path(params, path, {"V": v, "U": u, **node})
  return params


def merge_params(params: Any) -> Any:
  """The inverse of :func:`factorise_params`: every factorised layer back to ``kernel``."""
  for path in factor_layers(params):
    node = dict(get_path(params, path))
    kernel = merge_factors(node.pop("V"), node.pop("U"))
    params = set_path(params, path, {"kernel": kernel, **node})
  return params


# ----------------------------------------------------------------------------- modules


def _factor_params(module: nn.Module, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Declares ``V`` and ``U``, initialised together from one dense kernel's SVD.

  In ``apply`` the params may hold any ``n <= r`` of the components (``V`` ``f[..., n]``,
  ``U`` ``f[n, C_out]``): a client's gathered sub-model (:func:`gather_components`).
  """
  init = {}
  r = n = min(math.prod(shape[:-1]), shape[-1])
  if module.is_initializing():
    init["V"], init["U"], _ = factorise_kernel(module.kernel_init(module.make_rng("params"), shape))
  elif module.has_variable("params", "V"):
    n = int(jnp.shape(module.get_variable("params", "V"))[-1])
    if not 1 <= n <= r:
      raise ValueError(f"{module.name}: `V` holds {n} components, the layer has r={r}.")
  # Flax also calls the init functions in apply, under eval_shape, to check shapes.
  v = module.param("V", lambda _: init.get("V", jnp.zeros(shape[:-1] + (n,))))
  u = module.param("U", lambda _: init.get("U", jnp.zeros((n, shape[-1]))))
  return v, u


class FactorisedConv(nn.Module):
  """A k x k conv kept as SVD factors: ``conv(x, V) @ U + bias`` (module docstring).

  Initialised as the SVD of a dense kernel drawn from ``kernel_init`` (so at init it computes
  exactly what the dense conv would, and ``sigma`` are that kernel's singular values).
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: str = "SAME"
  use_bias: bool = True
  impl: str = "auto"
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    shape = (kh, kw, x.shape[-1], self.features)
    v, u = _factor_params(self, shape)
    z = conv2d(x, v.astype(x.dtype), self.strides, self.padding, self.impl)
    y = z @ u.astype(z.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y


class FactorisedDense(nn.Module):
  """A dense layer kept as SVD factors: ``x @ V @ U + bias`` (PriSM's Linear path)."""

  features: int
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    shape = (x.shape[-1], self.features)
    v, u = _factor_params(self, shape)
    y = (x @ v.astype(x.dtype)) @ u.astype(x.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y


class BatchStatNorm(nn.Module):
  """BatchNorm that always normalises with the batch's statistics (train and eval).

  PyTorch's ``BatchNorm2d(track_running_stats=False)``, as the PriSM reference uses: no
  running statistics, so nothing but ``scale`` (:math:`\\gamma`) and ``bias``
  (:math:`\\beta`) is averaged by the server, and evaluation uses each test batch's
  statistics. Statistics are taken over every axis but the last, in at least float32.
  """

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axes, keepdims=True)
    shape = (1,) * (x.ndim - 1) + (c,)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.reshape(shape) + bias.reshape(shape)
    return y.astype(x.dtype)


WIDTH_MODES = ("static", "dropout")


def keep_count(fraction: float, size: int) -> int:
  """``ceil(fraction * size)`` in [1, size], robust to rounding: a product less than 1e-6
  (relative) above an integer counts as that integer, so ``0.2 * 5`` gives 1 also when
  ``0.2`` arrives as a float32 (``np.float32(0.2) * 5 = 1.0000000149``; PriSM's capacity
  tables are float32)."""
  return max(1, min(size, math.ceil(fraction * size * (1 - 1e-6))))


def _width(x, keep: float, mode: str, train: bool, name: str):
  """The reference's width baselines after a conv: a fixed first-``keep`` channel mask
  (``--drop-original``) or ``Dropout2d(1 - keep)`` (``--random-mask``)."""
  if keep >= 1.0:
    return x
  c = x.shape[-1]
  if mode == "static":
    keep_mask = (jnp.arange(c) < keep_count(keep, c)).astype(x.dtype)
    return x * keep_mask.reshape((1,) * (x.ndim - 1) + (c,))
  return nn.Dropout(1.0 - keep, broadcast_dims=(1, 2), deterministic=not train, name=name)(x)


class PrismCNN(nn.Module):
  """A plain 3x3-conv CNN with batch-statistics BatchNorm, optionally factorised.

  ``conv{i}`` (3x3, no bias) -> ``bn{i}`` (:class:`BatchStatNorm`) -> ReLU -> 2x2 max pool
  for each entry of ``features``, then ``fc``. ``factorise[i]`` makes ``conv{i+1}`` a
  :class:`FactorisedConv` (PriSM's eligible layers: not the first, whose input is the image).
  ``width_keep < 1`` adds the reference's width baselines after every conv but the first:
  ``width_mode="static"`` zeroes all but the first ``ceil(width_keep * C)`` output channels
  (HeteroFL-like, the reference's ``--drop-original``), ``"dropout"`` is channel dropout with
  rate ``1 - width_keep`` in training (FjORD-like, ``--random-mask``).
  """

  features: Sequence[int] = (32, 64, 64)
  factorise: Sequence[bool] = (False, True, True)
  num_classes: int = 10
  width_keep: float = 1.0
  width_mode: str = "static"
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, (f, fac) in enumerate(zip(self.features, self.factorise)):
      name = f"conv{i + 1}"
      if fac:
        x = FactorisedConv(f, (3, 3), use_bias=False, impl=self.conv_impl, name=name)(x)
      else:
        x = Conv(f, (3, 3), use_bias=False, impl=self.conv_impl, name=name)(x)
      if i > 0:
        x = _width(x, self.width_keep, self.width_mode, train, f"drop{i + 1}")
      x = nn.relu(BatchStatNorm(name=f"bn{i + 1}")(x))
      x = max_pool(x, (2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, name="fc")(x)


class _PrismBlock(nn.Module):
  features: int
  strides: int
  factorise: bool
  width_keep: float
  width_mode: str
  conv_impl: str

  @nn.compact
  def __call__(self, x, train: bool):
    s = (self.strides, self.strides)

    def conv3(y, name):
      if self.factorise:
        return FactorisedConv(self.features, (3, 3), s if name == "conv1" else (1, 1),
                              use_bias=False, impl=self.conv_impl, name=name)(y)
      return Conv(self.features, (3, 3), s if name == "conv1" else (1, 1), use_bias=False,
                  impl=self.conv_impl, name=name)(y)

    y = _width(conv3(x, "conv1"), self.width_keep, self.width_mode, train, "drop1")
    y = nn.relu(BatchStatNorm(name="bn1")(y))
    y = _width(conv3(y, "conv2"), self.width_keep, self.width_mode, train, "drop2")
    y = BatchStatNorm(name="bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = Conv(self.features, (1, 1), s, use_bias=False, impl=self.conv_impl, name="short")(x)
      x = _width(x, self.width_keep, self.width_mode, train, "drop_short")
      x = BatchStatNorm(name="bn_short")(x)
    return nn.relu(x + y)


class PrismResNet(nn.Module):
  """The CIFAR ResNet-18 of the PriSM reference (``model/resnetcifar.py``), optionally
  factorised, with batch-statistics BatchNorm.

  3x3 conv64 stem (stride 1, no bias, dense: its input is the image) + BN + ReLU; stages of
  ``blocks`` basic blocks with ``widths`` channels (stride 2 entering every stage but the
  first), 1x1 conv + BN shortcuts where the shape changes (dense); global average pooling and
  a dense classifier. ``factorise=True`` makes every 3x3 conv inside the blocks a
  :class:`FactorisedConv`. ``width_keep``/``width_mode`` as in :class:`PrismCNN`, after every
  conv but the stem (the reference also masks the 1x1 shortcuts).
  """

  widths: Sequence[int] = (64, 128, 256, 512)
  blocks: int = 2
  factorise: bool = True
  num_classes: int = 10
  width_keep: float = 1.0
  width_mode: str = "static"
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(self.widths[0], (3, 3), use_bias=False, impl=self.conv_impl, name="stem")(x)
    x = nn.relu(BatchStatNorm(name="bn_stem")(x))
    for i, f in enumerate(self.widths):
      for b in range(self.blocks):
        x = _PrismBlock(f, 2 if (i > 0 and b == 0) else 1, self.factorise, self.width_keep,
                        self.width_mode, self.conv_impl, name=f"stage{i + 1}_block{b + 1}")(
                            x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


def _check_width(width_keep, width_mode):
  if not 0.0 < width_keep <= 1.0:
    raise ValueError(f"`width_keep` must be in (0, 1], got {width_keep!r}.")
  if width_mode not in WIDTH_MODES:
    raise ValueError(f"`width_mode` must be one of {WIDTH_MODES}, got {width_mode!r}.")


def prism_cnn(input_shape=(28, 28, 1), num_classes: int = 10,
              features: Sequence[int] = (32, 64, 64),
              factorise: bool | Sequence[bool] = True, width_keep: float = 1.0,
              width_mode: str = "static", conv_impl: str = "auto") -> Model:
  """:class:`PrismCNN` as a :class:`Model` (no ``model_state``: BatchNorm uses batch stats).

  Args:
    input_shape: one example's shape (NHWC without the batch).
    num_classes: logits.
    features: channels of the 3x3 convs.
    factorise: True factorises every conv but the first (PriSM's eligible ones), False none,
      or one bool per conv.
    width_keep, width_mode: the reference's width baselines (:class:`PrismCNN`).
    conv_impl: conv lowering (:func:`jaxfl.models.conv2d`).

  Returns:
    The model; ``name`` says ``prism_cnn`` or ``prism_cnn_dense``.
  """
  _check_width(width_keep, width_mode)
  features = tuple(int(f) for f in features)
  if isinstance(factorise, bool):
    factorise = (False,) + (factorise,) * (len(features) - 1)
  factorise = tuple(bool(f) for f in factorise)
  if len(factorise) != len(features):
    raise ValueError(f"`factorise` needs one bool per conv ({len(features)}), got {factorise}.")
  name = "prism_cnn" if any(factorise) else "prism_cnn_dense"
  return from_linen(PrismCNN(features, factorise, num_classes, float(width_keep), width_mode,
                             conv_impl), input_shape, name)


def prism_resnet18(input_shape=(32, 32, 3), num_classes: int = 10, factorise: bool = True,
                   widths: Sequence[int] = (64, 128, 256, 512), blocks: int = 2,
                   width_keep: float = 1.0, width_mode: str = "static",
                   conv_impl: str = "auto") -> Model:
  """:class:`PrismResNet` (ResNet-18 by default) as a :class:`Model`."""
  _check_width(width_keep, width_mode)
  module = PrismResNet(tuple(int(w) for w in widths), int(blocks), bool(factorise), num_classes,
                       float(width_keep), width_mode, conv_impl)
  return from_linen(module, input_shape, "prism_resnet18" if factorise else "resnet18_bs")


__all__ = ["BatchStatNorm", "FactorisedConv", "FactorisedDense", "PrismCNN", "PrismResNet",
           "component_norms", "eligible_conv", "factor_layers", "factorise_kernel",
           "factorise_params", "gather_components", "keep_count", "merge_factors", "merge_params",
           "prism_cnn", "prism_resnet18", "refactorise", "scatter_components"]
