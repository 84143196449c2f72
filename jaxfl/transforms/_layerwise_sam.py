"""Layer-wise SAM: sharpness-aware minimization that perturbs only a few critical layers."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxfl import tree as jtree

__all__ = ["LayerwiseSAMState", "layer_ids", "layerwise_sam"]

GradFn = Callable[[optax.Params, int], optax.Updates]


class LayerwiseSAMState(NamedTuple):
  """State of :func:`layerwise_sam`.

  Attributes:
    count: i32[] steps taken.
    selected: f32[L] 0/1, the layers perturbed at the last step (a static selection is
      stored too, so the state has one type whatever ``select`` is).
    inner_state: the wrapped optimizer's state.
  """

  count: jax.Array
  selected: jax.Array
  inner_state: optax.OptState


def layer_ids(tree: Any, layers: str | Any = "module") -> tuple[list[int], list[str]]:
  """Each leaf's layer index (``jax.tree.leaves`` order) and the layer names.

  Args:
    tree: a parameter pytree (or anything with its structure).
    layers: ``"module"`` (a module's kernel and bias form one layer), ``"leaf"`` (each
      tensor is a layer) or a tree of hashable labels with the structure of ``tree``.

  Returns:
    ``(ids, names)``: ``ids[j]`` is leaf j's layer, ``names[l]`` layer l's name (in the order
    the layers first appear among the leaves).
  """
  if isinstance(layers, str):
    labels = jax.tree.leaves(jtree.layer_names(tree, layers))
  else:
    try:
      labels = jax.tree.structure(tree).flatten_up_to(layers)
    except (ValueError, TypeError) as e:
      raise ValueError("`layers` must be 'module', 'leaf' or a tree of labels with the "
                       f"structure of the params: {e}") from e
  names: list[Hashable] = []
  for lab in labels:
    if lab not in names:
      names.append(lab)
  return [names.index(lab) for lab in labels], [str(n) for n in names]


def _static_selection(select: Sequence[str], names: list[str]) -> list[bool]:
  unknown = sorted(set(select) - set(names))
  if unknown:
    raise ValueError(f"`select` names layers {unknown} that the params do not have; their "
                     f"layers are {names}.")
  return [n in set(select) for n in names]


def layerwise_sam(
    optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    num_layers: int | None = 1,
    *,
    layers: str | Any = "module",
    select: str | Sequence[str] = "grad_norm",
    reselect_every: int = 1,
    perturbed: str = "all",
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-aware minimization with the ascent step restricted to a few layers.

  With :math:`g = \nabla L(w)` and :math:`g_l` its part in layer :math:`l`, a set :math:`S`
  of layers is perturbed along the normalised gradient of those layers only, and the wrapped
  ``optimizer`` steps with the gradient at the perturbed point:

  .. math::
    S = \operatorname{top}_k \lVert g_l \rVert_2, \qquad
    \epsilon_l = \rho \, \frac{g_l}{\lVert g_S \rVert_2}\ (l \in S),\quad
    \epsilon_l = 0\ (l \notin S), \qquad
    \lVert g_S \rVert_2^2 = \sum_{l \in S} \lVert g_l \rVert_2^2

  .. math::
    g'_l = \nabla_l L(w + \epsilon) \text{ for every } l
    \ (\texttt{perturbed="all"}),\quad\text{or}\quad
    g'_l = \nabla_l L(w + \epsilon)\ (l \in S),\ g'_l = g_l\ (l \notin S)
    \ (\texttt{perturbed="selected"})

  With every layer selected (``num_layers=None``) this is SAM (Foret et al.):
  :math:`\epsilon = \rho g / \lVert g \rVert`, the same update as ``optax.contrib.sam`` with
  the adversarial optimizer ``chain(normalize(), sgd(rho))`` in opaque mode. ``S`` is chosen
  from the gradient norms every ``reselect_every`` steps (``select="grad_norm"``, the paper's
  rule: the layers with the largest gradient norms), or fixed by name (``select=[...]``, e.g.
  the output-side layers ``depth_order(model, params)[-k:]``).

  Cost: the second gradient costs a full backward pass under ``perturbed="all"`` whatever
  ``S`` is. Under ``perturbed="selected"`` with a fixed ``S``, the other layers' gradients at
  :math:`w+\epsilon` are never used, so XLA drops their backward pass, and the forward pass
  below the lowest perturbed layer is the same as the clean one (for output-side ``S`` the
  extra cost is the top layers' forward and backward). An adaptive ``S`` is a traced value:
  XLA then computes the whole second pass.

  Like ``optax.contrib.sam(..., opaque_mode=True)``, ``update`` takes the gradient function
  as an extra argument: ``update(grads, state, params, grad_fn=fn)``, ``fn(params, i)``
  returning the gradient of the loss on the current minibatch at ``params`` (``i`` is always
  0). In a federated round set ``LocalTraining(pass_grad_fn=True)`` and the client passes it.

  Args:
    optimizer: the base optimizer, stepping with :math:`g'` (e.g. SGD with momentum).
    rho: the perturbation radius :math:`\rho \ge 0` (``rho=0`` is the base optimizer).
    num_layers: :math:`k`, the number of layers perturbed under ``select="grad_norm"``;
      ``None`` perturbs every layer (SAM). Ignored with a fixed ``select``.
    layers: what a layer is: ``"module"`` (kernel and bias together), ``"leaf"`` (each
      tensor) or a tree of labels with the structure of the params (:func:`layer_ids`).
    select: ``"grad_norm"`` (adaptive) or a sequence of layer names (fixed).
    reselect_every: the adaptive selection is made at steps 0, T, 2T, ... and kept between.
    perturbed: ``"all"`` (every layer takes the perturbed gradient, the spec's form) or
      ``"selected"`` (the others keep the clean one; see Cost).
    eps: added to :math:`\lVert g_S \rVert` before dividing.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`LayerwiseSAMState`;
    ``update`` needs ``params`` and ``grad_fn``, and passes other extra arguments on to
    ``optimizer``.

  References:
    Lee, `Layer-wise Adaptive Gradient Norm Penalizing Method for Efficient and Accurate Deep
    Learning <https://arxiv.org/abs/2503.14205>`_, KDD 2024.

    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving Generalization
    <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(f"`optimizer` must be an optax.GradientTransformation, got "
                    f"{type(optimizer).__name__}.")
  if isinstance(rho, (int, float)) and not rho >= 0:
    raise ValueError(f"`rho` must be >= 0, got {rho!r}.")
  adaptive = isinstance(select, str)
  if adaptive and select != "grad_norm":
    raise ValueError(f"`select` must be 'grad_norm' or a sequence of layer names, got "
                     f"{select!r}.")
  if not adaptive:
    select = tuple(select)
    if not select or not all(isinstance(s, str) for s in select):
      raise ValueError(f"`select` must be 'grad_norm' or a non-empty sequence of layer names, "
                       f"got {select!r}.")
  if num_layers is not None and (not isinstance(num_layers, int) or num_layers < 1):
    raise ValueError(f"`num_layers` must be a positive int or None, got {num_layers!r}.")
  if not isinstance(reselect_every, int) or reselect_every < 1:
    raise ValueError(f"`reselect_every` must be a positive int, got {reselect_every!r}.")
  if perturbed not in ("all", "selected"):
    raise ValueError(f"`perturbed` must be 'all' or 'selected', got {perturbed!r}.")
  if isinstance(layers, str) and layers not in ("module", "leaf"):
    raise ValueError(f"`layers` must be 'module', 'leaf' or a tree of labels, got {layers!r}.")
  inner = optax.with_extra_args_support(optimizer)

  def structure(tree):
    ids, names = layer_ids(tree, layers)
    fixed = None if adaptive else _static_selection(select, names)
    return ids, names, fixed

  def init_fn(params):
    _, names, fixed = structure(params)
    selected = jnp.asarray(fixed if fixed is not None else [False] * len(names), jnp.float32)
    # Built from a parameter so that, inside a round's shard_map, it varies over devices as
    # the selection made from the gradients does (the client's lax.cond needs equal types).
    # (The sum of an empty slice: a scalar zero whatever the leaf's size, empty leaves too.)
    selected = selected + jnp.sum(jnp.ravel(jax.tree.leaves(params)[0])[:0]).astype(jnp.float32)
    return LayerwiseSAMState(count=jnp.zeros([], jnp.int32), selected=selected,
                             inner_state=inner.init(params))

  def update_fn(updates, state, params=None, *, grad_fn: GradFn | None = None, **extra_args):
    if params is None:
      raise ValueError("layerwise_sam needs `params`.")
    if grad_fn is None:
      raise ValueError("layerwise_sam needs `grad_fn=fn(params, i) -> grads` (the gradient "
                       "on the current minibatch); in a round set "
                       "LocalTraining(pass_grad_fn=True).")
    ids, names, fixed = structure(updates)
    num = len(names)
    grads, treedef = jax.tree.flatten(updates)
    flat_params = treedef.flatten_up_to(params)
    sq = [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in grads]
    layer_sq = jnp.zeros([num], jnp.float32).at[jnp.asarray(ids)].add(jnp.stack(sq))
    if fixed is not None:
      selected = state.selected
    else:
      k = num if num_layers is None else min(num_layers, num)
      _, top = jax.lax.top_k(layer_sq, k)
      chosen = jnp.zeros([num], jnp.float32).at[top].set(1.0)
      selected = jnp.where(state.count % reselect_every == 0, chosen, state.selected)
    scale = rho / (jnp.sqrt(jnp.sum(selected * layer_sq)) + eps)
    perturbed_params = []
    for g, p, lid in zip(grads, flat_params, ids):
      if fixed is not None and not fixed[lid]:
        perturbed_params.append(p)  # static zero perturbation: the forward pass is shared
      else:
        step = (scale * selected[lid]) * g.astype(jnp.float32)
        perturbed_params.append((p + step.astype(p.dtype)).astype(p.dtype))
    new_grads = treedef.flatten_up_to(grad_fn(treedef.unflatten(perturbed_params), 0))
    out = []
    for g, g2, lid in zip(grads, new_grads, ids):
      if perturbed == "all":
        out.append(g2.astype(g.dtype))
      elif fixed is not None:
        out.append(g2.astype(g.dtype) if fixed[lid] else g)
      else:
        out.append(jnp.where(selected[lid] > 0, g2.astype(g.dtype), g))
    new_updates, inner_state = inner.update(treedef.unflatten(out), state.inner_state, params,
                                            **extra_args)
    return new_updates, LayerwiseSAMState(count=state.count + 1, selected=selected,
                                          inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
