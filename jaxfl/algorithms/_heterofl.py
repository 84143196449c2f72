r"""HeteroFL and FjORD: clients train the first :math:`\lceil r C\rceil` channels of every layer.

Diao, Ding and Tarokh, "HeteroFL: Computation and Communication Efficient Federated Learning
for Heterogeneous Clients", ICLR 2021 (ALGORITHMS.md §7 baselines table: "width-scaled
sub-models (first ⌈κC⌉ channels per layer), element-wise averaging over holders"; the width
baseline EmbracingFL and PriSM compare with).

Client :math:`i` has a width ratio :math:`r_i \in (0, 1]`. Its sub-model keeps, in every
hidden layer, the first :math:`\lceil r_i C\rceil` of the layer's :math:`C` output channels
and the first :math:`\lceil r_i C'\rceil` of its :math:`C'` input channels; the model's input
(the data's channels) and output (the classes) keep their full size. The server averages
every entry over the clients whose sub-model holds it.

How it maps onto jaxfl's contracts (no engine code knows it):

* **Width masks** (:func:`width_mask`): a params-shaped 0/1 tree from the leaves' shapes and
  the model's depth order (:func:`jaxfl.algorithms.depth_order`), Flax's layout assumed:
  a kernel's last axis is its output features, the one before it its input features (conv
  ``(kh, kw, in, out)``, dense ``(in, out)``), a 1-D leaf (bias, norm scale) is per output
  feature. A dense layer whose input is a flattened ``(H, W, C)`` map (its input size a
  multiple of the previous module's features) keeps the entries of the first channels at
  every position (NHWC flattening: channel fastest).
* **ClientView** (:func:`heterofl_view`): the client starts from the global params with every
  entry outside its sub-model zeroed, so its forward pass is the sub-model's (a zeroed
  channel stays zero through a batch-statistics norm, ReLU and pooling), and trains and
  uploads the sub-model only (``train_mask`` = ``upload_mask`` = ``context["grad_mask"]``).
* **Aggregator**: :func:`jaxfl.aggregation.masked_mean` (each entry over its holders; an entry
  no client held keeps its value).
* **Ledger**: a client uploads its sub-model's entries only.

Simulated clients run the full-size network with zeros, so results equal the sliced
sub-model's (tested) but the compute saving is not realised in simulation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfl import views
from jaxfl.algorithms._base import Algorithm, preset
from jaxfl.algorithms._embracing import submodel_algorithm
from jaxfl.algorithms._prism import _client
from jaxfl.models import Model
from jaxfl.models._factorised import keep_count
from jaxfl.tree import module_ranks

__all__ = ["fjord", "heterofl", "heterofl_view", "width_mask", "width_model"]


def _feature_plan(params: Any, order: Sequence[str]) -> list[tuple]:
  """Per leaf ``(out, in, ndim)``: ``out`` / ``in`` is None where that axis keeps its full
  size, else ``(channel, size)``: the channel of every entry along the axis and the channel
  count the width ratio applies to (for a flattened map, entry ``j`` is channel ``j % C``)."""
  leaves = jax.tree.leaves(params)
  ranks = module_ranks(params, order)
  last = len(order) - 1
  # a module's output features: the last-axis size of its leaves (kernel, bias, norm scale)
  features = {}
  for leaf, rank in zip(leaves, ranks):
    if np.ndim(leaf) >= 1:
      features.setdefault(rank, np.shape(leaf)[-1])
  plan = []
  for leaf, rank in zip(leaves, ranks):
    shape = np.shape(leaf)
    out = inp = None
    if len(shape) >= 1 and rank != last:
      out = (np.arange(shape[-1]), shape[-1])
    if len(shape) >= 2 and rank != 0:
      c_in = shape[-2]
      prev = [features[r] for r in range(rank - 1, -1, -1) if r in features][:1]
      if len(shape) == 2 and prev and c_in != prev[0] and c_in % prev[0] == 0:
        inp = (np.arange(c_in) % prev[0], prev[0])  # flattened (H, W, C) input
      else:
        inp = (np.arange(c_in), c_in)
    plan.append((out, inp, len(shape)))
  return plan


def _leaf_mask(entry, counts) -> jax.Array:
  """One leaf's 0/1 mask, shaped to broadcast against it: ``counts`` is the pair (output,
  input) of kept channel counts (ints or traced i32[]; None where the axis is whole)."""
  out, inp, ndim = entry
  axes = []
  for axis, count in ((out, counts[0]), (inp, counts[1])):
    axes.append(None if axis is None else (jnp.asarray(axis[0]) < count).astype(jnp.float32))
  o, i = axes
  if ndim >= 2:
    o = jnp.ones((1,), jnp.float32) if o is None else o
    i = jnp.ones((1,), jnp.float32) if i is None else i
    return jnp.reshape(i[:, None] * o[None, :], (1,) * (ndim - 2) + (i.size, o.size))
  if ndim == 1 and o is not None:
    return o
  return jnp.ones((1,) * ndim, jnp.float32)


def _counts(entry, keep: float) -> tuple:
  """The kept channel counts (output, input) of one leaf at width ratio ``keep``."""
  return tuple(None if axis is None else keep_count(keep, axis[1]) for axis in entry[:2])


def _check_keep(keep, name: str = "keep") -> np.ndarray:
  k = np.asarray(keep)
  if k.ndim > 1 or k.size == 0 or not np.issubdtype(k.dtype, np.number):
    raise ValueError(f"`{name}` must be a float or a 1-D float array (one per client), got "
                     f"{keep!r}.")
  if np.any(~(k > 0)) or np.any(k > 1):
    raise ValueError(f"`{name}` must be in (0, 1], got values {np.unique(k).tolist()}.")
  return k.astype(np.float64)


def width_mask(params: Any, order: Sequence[str], keep: float) -> Any:
  r"""HeteroFL's sub-model of width ratio ``keep`` as a params-shaped tree of f32 0/1 arrays.

  In every hidden layer the first :math:`\lceil r C\rceil` output channels and the first
  :math:`\lceil r C'\rceil` input channels are kept; the first module's input and the last
  module's output keep their full size (module docstring for the layout assumed).

  Args:
    params: the model's params.
    order: its modules in depth order (:func:`jaxfl.algorithms.depth_order`).
    keep: the width ratio :math:`r \in (0, 1]`.

  Returns:
    A tree like ``params`` of f32 arrays of each leaf's shape.
  """
  k = _check_keep(keep)
  if k.ndim:
    raise ValueError(f"`keep` must be one float here, got {keep!r}.")
  keep = float(k)
  plan = _feature_plan(params, order)
  treedef = jax.tree.structure(params)
  return jax.tree.unflatten(treedef, [
      np.broadcast_to(np.asarray(_leaf_mask(entry, _counts(entry, keep))),
                      np.shape(leaf)).astype(np.float32)
      for entry, leaf in zip(plan, jax.tree.leaves(params))])


def width_model(model: Model, order: Sequence[str], keep: float) -> Model:
  r"""``model`` restricted to its width-``keep`` sub-model: ``apply`` multiplies the params by
  :func:`width_mask` first.

  HeteroFL's global model when no client trains the full width: entries beyond the widest
  client's sub-model are never trained (they keep their initial values), and the paper's
  global model is the sub-model of the largest level. Run the algorithm on
  ``width_model(model, order, max(keep))`` to train as before (every client's sub-model lies
  inside it, so its training is unchanged) and evaluate that sub-model.

  Args:
    model: a :class:`jaxfl.models.Model`.
    order: its modules in depth order (:func:`jaxfl.algorithms.depth_order`).
    keep: the width ratio in (0, 1].

  Returns:
    A :class:`jaxfl.models.Model` with the same params and state.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0))[0]
  mask = width_mask(shapes, order, keep)

  def apply(params, model_state, x, **kwargs):
    return model.apply(jax.tree.map(lambda p, m: p * m.astype(p.dtype), params, mask),
                       model_state, x, **kwargs)

  return model._replace(apply=apply, name=f"{model.name}_w{keep:g}")


def _level_table(keep, levels):
  """(the width ratios a client can get, each client's fixed choice or None, each client's
  number of allowed choices or None)."""
  table = _check_keep(keep)
  if levels is None:
    choices, level_of = np.unique(table, return_inverse=True)
    return choices, level_of.reshape(table.shape).astype(np.int32), None
  choices = np.unique(_check_keep(levels, "levels"))
  allowed = np.sum(choices[None, :] <= np.reshape(table, (-1, 1)) * (1 + 1e-9), axis=1)
  if np.any(allowed == 0):
    raise ValueError(f"every client's `keep` must be at least the smallest of `levels` "
                     f"({choices[0]}), got {np.min(table)}.")
  return choices, None, allowed.reshape(table.shape).astype(np.int32)


def heterofl_view(keep: float | Sequence[float] | np.ndarray, order: Sequence[str],
                  levels: Sequence[float] | None = None) -> views.ClientView:
  r"""HeteroFL's (or, with ``levels``, FjORD's) downlink: client :math:`i` gets, trains and
  uploads a width-:math:`r` sub-model.

  ``keep`` is the width ratio for every client or one per client (f[N], static). Without
  ``levels`` client :math:`i` always trains width :math:`r_i` (HeteroFL); with ``levels``
  it draws, every round, a width uniformly among the ``levels`` up to :math:`r_i` (FjORD's
  ordered dropout :math:`p \sim U_{\mathcal D}(0, r_i]`, drawn per round from
  ``slot.key``). The client starts from the global params zeroed outside its sub-model (so it
  computes the sub-model's function), and its train, upload and gradient masks are the
  sub-model's.

  Returns:
    A :class:`jaxfl.views.ClientView`.
  """
  choices, level_of, allowed = _level_table(keep, levels)
  order = tuple(order)

  def apply(server, slot, row):
    del row
    if allowed is not None:
      n = jnp.asarray(allowed)[slot.client_id] if allowed.ndim else int(allowed)
      level = jax.random.randint(slot.key, (), 0, n)
    else:
      level = jnp.asarray(level_of)[slot.client_id] if level_of.ndim else 0
    plan = _feature_plan(server.params, order)
    masks = []
    for entry in plan:
      # this leaf's channel counts at every width, looked up by the client's choice
      per_level = [_counts(entry, float(v)) for v in choices]
      counts = tuple(None if per_level[0][a] is None else
                     jnp.asarray([c[a] for c in per_level], jnp.int32)[level] for a in (0, 1))
      masks.append(_leaf_mask(entry, counts))
    treedef = jax.tree.structure(server.params)
    mask = jax.tree.unflatten(treedef, [jnp.broadcast_to(m, jnp.shape(p)).astype(p.dtype)
                                        for m, p in zip(masks, jax.tree.leaves(server.params))])
    start = jax.tree.map(jnp.multiply, server.params, mask)
    return views.ClientStart(params=start, train_mask=mask, upload_mask=mask,
                             context={"grad_mask": mask})

  return views.ClientView(apply)


@preset
def heterofl(keep: float | Sequence[float] | np.ndarray, order: Sequence[str], *,
             client_lr: float = 0.05, client_momentum: float = 0.9, weight_decay: float = 2e-4,
             clip_norm: float | None = 5.0, rounds: int | None = None, final_lr: float = 1e-4,
             batch_size: int = 32, local_steps: int | None = None,
             local_epochs: float | None = 1.0,
             server_optimizer: optax.GradientTransformation | None = None,
             server_lr: float = 1.0, weighting: str = "uniform",
             levels: Sequence[float] | None = None, name: str = "heterofl") -> Algorithm:
  r"""HeteroFL: every client trains the width-:math:`r_i` sub-model its resources allow.

  With :math:`m_i` client :math:`i`'s 0/1 sub-model mask (:func:`width_mask` at
  :math:`r_i`), a round is

  .. math::
    x^i_0 = m_i \odot x_t, \qquad \Delta_i = m_i \odot (x_t - x^i_{\text{local}}), \qquad
    \bar\Delta = \frac{\sum_i w_i m_i \odot \Delta_i}{\sum_i w_i m_i}
    \ (0 \text{ where no client holds the entry}), \qquad x_{t+1} = x_t - \eta_s \bar\Delta,

  where local training runs from :math:`x^i_0` with the gradient masked to the sub-model
  (before clipping, weight decay and momentum). Clients with :math:`r_i = 1` are FedAvg
  clients. The paper's per-layer ``Scaler`` (activations divided by :math:`r_i` in training)
  is left out: after a conv followed by a batch-statistics norm it cancels. Its label
  masking of the output layer for non-IID clients and its per-level evaluation are not
  included either; evaluation runs the full global model.

  Use it with a model whose norms use batch statistics (``prism_cnn``'s ``BatchStatNorm``,
  HeteroFL's "static BN"); running statistics would be averaged with the zeros of the
  channels a client does not hold.

  Args:
    keep: :math:`r` for all clients or one per client (f[N] in (0, 1]); static.
    order: the modules in depth order (:func:`jaxfl.algorithms.depth_order`).
    client_lr, client_momentum, weight_decay, clip_norm, rounds, final_lr, batch_size,
      local_steps, local_epochs: the client recipe shared with
      :func:`jaxfl.algorithms.prism_fedavg` and :func:`jaxfl.algorithms.embracingfl`.
    server_optimizer: the server step on the masked mean (default ``optax.sgd(server_lr)``).
    server_lr: the default server step size.
    weighting: ``"uniform"`` (the paper's count of holders) or ``"examples"``.
    levels: None (HeteroFL: a fixed width per client), or the widths a client draws from
      each round (:func:`fjord`).
    name: label.

  Returns:
    An :class:`Algorithm`.

  References:
    Diao, Ding and Tarokh, `HeteroFL: Computation and Communication Efficient Federated
    Learning for Heterogeneous Clients <https://arxiv.org/abs/2010.01264>`_, ICLR 2021.
  """
  _level_table(keep, levels)
  if len(set(order)) != len(order):
    raise ValueError(f"`order` must name each module once, got {list(order)!r}.")
  local = _client(client_lr, client_momentum, weight_decay, clip_norm, rounds, final_lr,
                  batch_size, local_steps, local_epochs, True)
  return submodel_algorithm(name, local, heterofl_view(keep, tuple(order), levels), weighting,
                            server_optimizer, server_lr)


@preset
def fjord(keep: float | Sequence[float] | np.ndarray, order: Sequence[str], *,
          levels: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0), name: str = "fjord",
          **kwargs) -> Algorithm:
  r"""FjORD's ordered dropout, drawn per round: client :math:`i` trains a width
  :math:`p \sim U_{\mathcal D}(0, r_i]` sub-model, a new :math:`p` every round.

  :math:`\mathcal D` is ``levels`` (the paper's uniform discrete set, default
  :math:`\{0.2, 0.4, \dots, 1\}`); the sub-model of width :math:`p` is HeteroFL's
  (:func:`width_mask`), nested in every wider one, and the server averages each entry over
  the clients that trained it (:func:`heterofl`, whose keyword arguments ``kwargs`` takes).

  **Deviation:** the paper draws :math:`p` for every local batch; a client view fixes the
  client's start once per round, so here it is drawn once per round per client. The paper's
  optional self-distillation is not included.

  References:
    Horváth, Laskaridis, Almeida, Leontiadis, Venieris and Lane, `FjORD: Fair and Accurate
    Federated Learning under heterogeneous targets with Ordered Dropout
    <https://arxiv.org/abs/2102.13451>`_, NeurIPS 2021.
  """
  return heterofl(keep, order, levels=levels, name=name, **kwargs)
