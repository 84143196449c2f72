r"""EmbracingFL: weak clients train the output-side layers only, from the round's contracts.

Lee, Zhang, Prakash, Niu and Avestimehr, "Embracing Federated Learning: Enabling Weak Client
Participation via Partial Model Training", IEEE TMC 2024 (ALGORITHMS.md §8b; no public code,
so the spec is inferred from the paper's text and marked so there).

Every client takes part. Client :math:`i` trains as many consecutive *output-side* layers as
its memory allows, :math:`\ell_i` of the model's :math:`L` layers in depth order; the
input-side prefix is frozen (it runs forward only, so its activations need not be kept for a
backward pass). The server averages every layer over the clients that trained it.

How it maps onto jaxfl's contracts (no engine code knows it):

* **Depth order** (:func:`depth_order`): the order of the model's modules in the forward pass,
  read from the traced computation (first use of each parameter on the activation path), so
  it does not depend on how the parameters are named.
* **Memory model** (:func:`suffix_training_bytes`, :func:`layers_for_budget`): XLA's
  compiled-memory estimate of one local step that trains the last :math:`\ell` modules (all
  params + the suffix's gradients and optimizer state + the activations the backward pass
  keeps), for every :math:`\ell`; a client's :math:`\ell_i` is the largest suffix that fits
  its budget.
* **ClientView** (:func:`embracing_view`): per slot, a 0/1 scalar per parameter leaf (1 on
  the client's suffix) as ``train_mask`` / ``upload_mask`` and ``context["grad_mask"]``
  (so clipping and momentum see the suffix's gradient only); the round hands the upload
  masks to the aggregator.
* **Aggregator**: :func:`jaxfl.aggregation.masked_mean` (each layer over the clients that
  trained it; a layer no client trained keeps its value).
* **Ledger**: a client uploads its suffix only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import Literal

from jaxfl import comm, views
from jaxfl.aggregation import masked_mean
from jaxfl.algorithms._base import Algorithm, preset
from jaxfl.algorithms._fedopt import _lr
from jaxfl.algorithms._prism import _client
from jaxfl.client import softmax_cross_entropy
from jaxfl.models import Model
from jaxfl.tree import layer_names, module_ranks

__all__ = ["depth_order", "embracing_view", "embracingfl", "layers_for_budget", "suffix_mask",
           "suffix_training_bytes"]


# ----------------------------------------------------------------------------- depth order


def _sub_jaxpr(eqn):
  """The inner jaxpr of a call-like equation whose inputs map one to one onto its own
  (``pjit``, ``closed_call``, ``custom_jvp_call`` / ``custom_vjp_call``), else None."""
  for value in eqn.params.values():
    inner = getattr(value, "jaxpr", value)
    if hasattr(inner, "eqns") and len(inner.invars) == len(eqn.invars):
      return inner
  return None


def _first_uses(jaxpr, param_of: dict, active: set, prefix: tuple, first: dict) -> list:
  """Walks ``jaxpr``: ``param_of`` maps a variable to the parameter leaves it is computed
  from alone, ``active`` holds the variables computed from the input. The first equation
  that combines a parameter-derived value with an input-derived one is that parameter's first
  use (``first[leaf] = position``, a tuple through nested calls). Returns, per output, a pair
  (leaves it derives from, whether it depends on the input)."""
  param_of, active = dict(param_of), set(active)
  for i, eqn in enumerate(jaxpr.eqns):
    ins = [v for v in eqn.invars if not isinstance(v, Literal)]
    leaves = set().union(*(param_of.get(v, set()) for v in ins)) if ins else set()
    hot = any(v in active for v in ins)
    inner = _sub_jaxpr(eqn) if hot and leaves else None
    if inner is not None:  # look inside: one call may hold several layers
      inner_param = {iv: param_of[ov] for iv, ov in zip(inner.invars, eqn.invars)
                     if not isinstance(ov, Literal) and ov in param_of}
      inner_active = {iv for iv, ov in zip(inner.invars, eqn.invars)
                      if not isinstance(ov, Literal) and ov in active}
      outs = _first_uses(inner, inner_param, inner_active, prefix + (i,), first)
      if len(outs) == len(eqn.outvars):
        for o, (o_leaves, o_hot) in zip(eqn.outvars, outs):
          if o_hot:
            active.add(o)
          elif o_leaves:
            param_of[o] = o_leaves
        continue
    if hot:
      for leaf in leaves:
        first.setdefault(leaf, prefix + (i,))
      active.update(eqn.outvars)
    elif leaves:
      for o in eqn.outvars:
        param_of[o] = leaves
  return [(param_of.get(v, set()), v in active) for v in jaxpr.outvars]


def depth_order(model: Model, params: Any, model_state: Any = None) -> list[str]:
  """The model's modules (kernel and bias of one module form a layer) in forward order.

  Traces ``model.apply`` on a batch of two zero inputs (``train=True``) and orders the
  modules by the first operation that combines one of their parameters with a value computed
  from the input; parameters named in any order (``bn1`` before ``conv1`` in the flattened
  tree) get their depth, not their name's rank. Calls (``jit``, custom-gradient layers) are
  looked into, so a model that jits its own layers is ordered too.

  Args:
    model: a :class:`jaxfl.models.Model`.
    params: its params.
    model_state: its non-trainable state (default: the model's own, from ``init``).

  Returns:
    Module names as :func:`jaxfl.tree.layer_names` (``group="module"``) writes them, input
    side first.

  Raises:
    ValueError: a parameter the forward pass never combines with the input (its depth is
      undefined).
  """
  if model_state is None:
    model_state = jax.eval_shape(model.init, jax.random.key(0))[1]
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [leaf for _, leaf in paths]
  x = jax.ShapeDtypeStruct((2,) + tuple(model.input_shape), jnp.float32)

  def forward(leaf_list, x, state):
    return model.apply(jax.tree.unflatten(treedef, leaf_list), state, x, train=True,
                       rng=jax.random.key(0))[0]

  spec = lambda v: jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v))
  closed = jax.make_jaxpr(forward)([spec(v) for v in leaves], x,
                                   jax.tree.map(spec, model_state))
  jaxpr = closed.jaxpr
  param_vars, x_var = jaxpr.invars[:len(leaves)], jaxpr.invars[len(leaves)]
  first: dict = {}
  _first_uses(jaxpr, {v: {i} for i, v in enumerate(param_vars)}, {x_var}, (), first)
  names = jax.tree.leaves(layer_names(params, "module"))
  depth: dict[str, tuple] = {}
  unused = []
  for i, name in enumerate(names):
    if i not in first:
      unused.append(name)
      continue
    depth[name] = min(depth.get(name, first[i]), first[i])
  if unused:
    raise ValueError(f"depth_order: parameters {sorted(set(unused))} never meet the input in "
                     "the forward pass, so they have no depth.")
  return sorted(depth, key=lambda n: depth[n])


def _suffix_mask(params: Any, order: Sequence[str], trained) -> Any:
  """:func:`suffix_mask` for an int or a traced i32[] ``trained`` (no range check)."""
  cut = len(order) - jnp.asarray(trained, jnp.int32)
  treedef = jax.tree.structure(params)
  return jax.tree.unflatten(treedef, [(cut <= r).astype(jnp.float32)
                                      for r in module_ranks(params, order)])


def suffix_mask(params: Any, order: Sequence[str], trained: int) -> Any:
  """A params-shaped tree of f32[] 0/1: 1 on the last ``trained`` modules of ``order``.

  Args:
    params: a parameter tree.
    order: :func:`depth_order`'s module names, input side first.
    trained: how many output-side modules are trained (0..len(order)).
  """
  if not 0 <= int(trained) <= len(order):
    raise ValueError(f"`trained` must be in [0, {len(order)}], got {trained!r}.")
  return _suffix_mask(params, order, int(trained))


# ----------------------------------------------------------------------------- memory model


def suffix_training_bytes(model: Model, params: Any, order: Sequence[str],
                          optimizer: optax.GradientTransformation, batch_size: int,
                          model_state: Any = None,
                          loss_fn: Callable = softmax_cross_entropy,
                          lengths: Sequence[int] | None = None) -> np.ndarray:
  r"""XLA's memory estimate of one local step training the last :math:`\ell` modules.

  For :math:`\ell = 1, \dots, L` compiles (never runs) one step that differentiates the loss
  with respect to the suffix only (the prefix is an argument, not differentiated) and
  updates the suffix with ``optimizer``, and reads ``compiled.memory_analysis()``:
  arguments + outputs + temporaries - aliased bytes. This counts every parameter (the prefix
  runs forward), the suffix's gradients and optimizer state, the batch, and the activations
  the backward pass keeps (those of the suffix and its input); it is the backend's estimate
  for this batch size, not a device measurement.

  Args:
    model: the model.
    params: its params.
    order: :func:`depth_order`'s module names.
    optimizer: the client optimizer (its state counts for the suffix).
    batch_size: examples per step.
    model_state: the model's state (default: from ``init``).
    loss_fn: ``(logits, labels, weights) -> scalar``.
    lengths: only these suffix lengths (e.g. ``[L]`` for full training alone: one compile
      instead of :math:`L`); default every :math:`\ell = 1..L`.

  Returns:
    f64[L]: bytes for :math:`\ell = 1..L` (index :math:`\ell - 1`; the last is full
    training), or f64[len(lengths)] in the order of ``lengths``.
  """
  if model_state is None:
    model_state = model.init(jax.random.key(0))[1]
  ranks = module_ranks(params, order)
  leaves, treedef = jax.tree.flatten(params)
  spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))
  x = jax.ShapeDtypeStruct((batch_size,) + tuple(model.input_shape), jnp.float32)
  y = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  todo = range(1, len(order) + 1) if lengths is None else [int(n) for n in lengths]
  if any(not 1 <= n <= len(order) for n in todo):
    raise ValueError(f"`lengths` must be in [1, {len(order)}], got {list(lengths)!r}.")
  out = []
  for trained in todo:
    cut = len(order) - trained
    idx = [i for i, r in enumerate(ranks) if r >= cut]
    rest = [i for i, r in enumerate(ranks) if r < cut]

    def merge(train, frozen, idx=idx, rest=rest):
      full = [None] * len(leaves)
      for i, v in zip(idx, train):
        full[i] = v
      for i, v in zip(rest, frozen):
        full[i] = v
      return jax.tree.unflatten(treedef, full)

    def step(train, frozen, opt_state, x, y, merge=merge):
      def loss(t):
        logits, _ = model.apply(merge(t, frozen), model_state, x, train=True,
                                rng=jax.random.key(0))
        return loss_fn(logits, y, jnp.ones(y.shape, jnp.float32))

      grads = jax.grad(loss)(train)
      updates, opt_state = optimizer.update(grads, opt_state, train)
      return optax.apply_updates(train, updates), opt_state

    train = [spec(leaves[i]) for i in idx]
    frozen = [spec(leaves[i]) for i in rest]
    opt_state = jax.eval_shape(optimizer.init, train)
    compiled = jax.jit(step, donate_argnums=(0, 2)).lower(train, frozen, opt_state, x,
                                                         y).compile()
    mem = compiled.memory_analysis()
    if mem is None:
      raise RuntimeError("suffix_training_bytes: this backend gives no memory analysis.")
    out.append(float(mem.argument_size_in_bytes + mem.output_size_in_bytes
                     + mem.temp_size_in_bytes - mem.alias_size_in_bytes))
  return np.asarray(out, np.float64)


def layers_for_budget(suffix_bytes: Sequence[float] | np.ndarray,
                      budget: float | Sequence[float] | np.ndarray) -> np.ndarray:
  r"""The most output-side modules a client can train within its memory budget.

  Args:
    suffix_bytes: :func:`suffix_training_bytes`'s f64[L] (:math:`\ell = 1..L`).
    budget: the client's memory as a fraction of full training's (``suffix_bytes[-1]``), a
      float or one per client (e.g. 0.15 weak, 0.4 moderate, 1.0 strong, as in the paper).

  Returns:
    i32 of ``budget``'s shape: the largest :math:`\ell \ge 1` with
    ``suffix_bytes[l - 1] <= budget * suffix_bytes[-1]``.

  Raises:
    ValueError: a budget too small for even the output layer.
  """
  mem = np.asarray(suffix_bytes, np.float64)
  b = np.asarray(budget, np.float64)
  if mem.ndim != 1 or mem.size < 1 or np.any(~(mem > 0)):
    raise ValueError(f"`suffix_bytes` must be positive f[L] (l = 1..L), got {suffix_bytes!r}.")
  if np.any(~(b > 0)):
    raise ValueError(f"`budget` must be > 0, got {budget!r}.")
  fits = mem[None, :] <= b.reshape(-1, 1) * mem[-1] * (1 + 1e-9)
  if not np.all(fits[:, 0]):
    small = float(np.min(b))
    raise ValueError(f"`budget` {small} is below training the output layer alone "
                     f"({mem[0] / mem[-1]:.3f} of full training).")
  ell = np.where(fits, np.arange(1, mem.size + 1), 0).max(axis=1)
  return ell.reshape(b.shape).astype(np.int32)


# ----------------------------------------------------------------------------- model and view


def _trained_table(trained, num_modules: int):
  t = np.asarray(trained)
  if t.ndim > 1 or t.size == 0 or not np.issubdtype(t.dtype, np.integer):
    raise ValueError(f"`trained` must be an int or a 1-D int array (one per client), got "
                     f"{trained!r}.")
  if np.any(t < 0) or np.any(t > num_modules):
    raise ValueError(f"`trained` must be in [0, {num_modules}] (the model has {num_modules} "
                     f"modules), got values {np.unique(t).tolist()}.")
  return t.astype(np.int32)


def embracing_view(trained: int | Sequence[int] | np.ndarray, order: Sequence[str]
                   ) -> views.ClientView:
  r"""EmbracingFL's downlink: client :math:`i` trains and uploads the last
  :math:`\ell_i` modules of ``order``.

  ``trained`` is :math:`\ell` for every client or one per client (i32[N], static: one
  compilation; e.g. from :func:`layers_for_budget`). A client with :math:`\ell_i = 0`
  uploads nothing (its masks are zero, so it does not enter the mean). The client starts
  from the global params (the frozen prefix runs forward as it is on the server).

  Returns:
    A :class:`jaxfl.views.ClientView`.
  """
  table = _trained_table(trained, len(order))

  def apply(server, slot, row):
    del row
    n = table if table.ndim == 0 else jnp.asarray(table)[slot.client_id]
    mask = _suffix_mask(server.params, order, n)
    return views.ClientStart(train_mask=mask, upload_mask=mask, context={"grad_mask": mask})

  return views.ClientView(apply)


# ----------------------------------------------------------------------------- preset


@preset
def embracingfl(trained: int | Sequence[int] | np.ndarray, order: Sequence[str], *,
                client_lr: float = 0.05, client_momentum: float = 0.9,
                weight_decay: float = 2e-4, clip_norm: float | None = 5.0,
                rounds: int | None = None, final_lr: float = 1e-4, batch_size: int = 32,
                local_steps: int | None = None, local_epochs: float | None = 1.0,
                server_optimizer: optax.GradientTransformation | None = None,
                server_lr: float = 1.0, weighting: str = "uniform",
                name: str = "embracingfl") -> Algorithm:
  r"""EmbracingFL: every client trains the output-side layers its memory allows.

  With :math:`\ell_i` the number of output-side modules client :math:`i` trains and
  :math:`m_i` its 0/1 layer mask (1 on those modules), a round is

  .. math::
    \Delta_i = m_i \odot (x_t - x^i_{\text{local}}), \qquad
    \bar\Delta_l = \frac{\sum_i w_i m_{i,l} \Delta_{i,l}}{\sum_i w_i m_{i,l}}
    \ (0 \text{ where no client trained } l), \qquad x_{t+1} = x_t - \eta_s \bar\Delta,

  where the local training runs from :math:`x_t` with the gradient masked to the suffix
  before clipping, weight decay and momentum (a weak client holds no gradient for its
  frozen prefix). Strong clients (:math:`\ell_i = L`) are FedAvg clients.

  Use it with ``order = depth_order(model, params)``; ``trained`` from :func:`layers_for_budget` turns memory
  budgets into suffix lengths.

  Args:
    trained: :math:`\ell` for all clients or one per client (i32[N]); static.
    order: the modules in depth order (:func:`depth_order`).
    client_lr, client_momentum, weight_decay, clip_norm, rounds, final_lr, batch_size,
      local_steps, local_epochs: the client recipe shared with
      :func:`jaxfl.algorithms.prism_fedavg` (SGD with momentum, clip, weight decay, cosine LR
      per round when ``rounds`` is given), so EmbracingFL and the sub-model baselines differ
      only in what a client trains.
    server_optimizer: the server step on the masked mean (default
      ``optax.sgd(server_lr)``, FedAvg's).
    server_lr: the default server step size.
    weighting: ``"uniform"`` or ``"examples"`` (the paper's choice is not known; the
      spec leaves it open).
    name: label.

  Returns:
    An :class:`Algorithm`.

  References:
    Lee, Zhang, Prakash, Niu and Avestimehr, `Embracing Federated Learning: Enabling Weak
    Client Participation via Partial Model Training <https://arxiv.org/abs/2406.15125>`_,
    IEEE TMC 2024.
  """
  table = _trained_table(trained, len(order))
  if not np.any(table > 0):
    raise ValueError("`trained` must give at least one client a layer to train.")
  if len(set(order)) != len(order):
    raise ValueError(f"`order` must name each module once, got {list(order)!r}.")
  local = _client(client_lr, client_momentum, weight_decay, clip_norm, rounds, final_lr,
                  batch_size, local_steps, local_epochs, True)
  return submodel_algorithm(name, local, embracing_view(table, tuple(order)), weighting,
                            server_optimizer, server_lr)


def submodel_algorithm(name: str, local, view: views.ClientView, weighting: str,
                       server_optimizer: optax.GradientTransformation | None,
                       server_lr: float) -> Algorithm:
  """A sub-model method's :class:`Algorithm`: its ``view`` declares each client's masks, the
  server averages each entry over the clients that sent it (``masked_mean``) and steps with
  ``server_optimizer`` (default ``optax.sgd(server_lr)``), the ledger counts the masks."""
  if weighting not in ("examples", "uniform"):
    raise ValueError(f"`weighting` must be 'examples' or 'uniform', got {weighting!r}.")
  server = optax.sgd(_lr("server_lr", server_lr)) if server_optimizer is None else server_optimizer
  if not isinstance(server, optax.GradientTransformation):
    raise TypeError("`server_optimizer` must be an optax.GradientTransformation or None.")
  return Algorithm(name, local, server, masked_mean(), None, weighting,
                   ledger=comm.upload_mask_ledger(), view=view)
