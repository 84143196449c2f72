"""Local training as a pure function: (global params, one client's data, rng) -> update.

The function is written for a single client and knows nothing about devices; the round
``jax.vmap`` s it over the cohort. Data sampling follows the papers' Keras pipeline: a
client's examples are reshuffled every local epoch, batches do not span epochs (so the last
batch of an epoch can be short), and steps past a client's step budget are masked out, so
ragged clients share one static shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxfl import tree as jtree
from jaxfl.hyperparams import set_hyperparams
from jaxfl.models import Model

LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted mean cross-entropy from logits; zero-weight (padded) examples are ignored."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  total = jnp.sum(weights)
  return jnp.sum(per_example * weights) / jnp.maximum(total, 1.0)


class ClientOutput(NamedTuple):
  """What one client returns.

  Attributes:
    delta: ``global_params - local_params`` (fedjax sign: FedAvg is server SGD with lr 1).
    model_state: the client's non-trainable collections after training (BN statistics).
    metrics: dict of scalars: ``loss`` (mean over the client's steps), ``grad_norm`` (mean
      global gradient norm), ``examples`` (examples processed), ``steps`` (steps taken).
    grad_sum: with ``LocalTraining.track_grad_sum``, the sum of the (unmasked) minibatch
      gradients over the local steps (PruneFL's importance); else None.
  """

  delta: Any
  model_state: Any
  metrics: dict
  grad_sum: Any = None


class LocalTraining(NamedTuple):
  """Static description of local training.

  Attributes:
    optimizer: the client optax transformation (fresh state every round).
    batch_size: minibatch size B.
    local_steps: fixed number of local steps tau (the papers' ``average_interval``).
    local_epochs: alternatively, epochs over the client's own data; a client with n
      examples then takes ``ceil(local_epochs * ceil(n / B))`` steps. Exactly one of
      ``local_steps`` / ``local_epochs`` is set.
    max_steps: cap on the number of steps in epoch mode (static scan length). Default: the
      step count of the largest client.
    unroll: ``lax.scan`` unroll factor over local steps.
    loss_fn: ``loss_fn(logits, labels, weights) -> scalar``.
    track_grad_sum: also return the summed gradients (:attr:`ClientOutput.grad_sum`).
    pass_grad_fn: call the optimizer's ``update`` with ``grad_fn=fn(params, i)``, the
      gradient on the current minibatch (same batch, dropout key and model state) at other
      params: the convention of ``optax.contrib.sam(..., opaque_mode=True)`` and
      :func:`jaxfl.transforms.layerwise_sam` (FedSAM-style local SAM). The model state the
      second pass computes is discarded, so BatchNorm statistics see each batch once. The
      ``grad_norm`` metric and ``grad_sum`` use the clean gradient.
  """

  optimizer: optax.GradientTransformation
  batch_size: int = 32
  local_steps: int | None = 5
  local_epochs: float | None = None
  max_steps: int | None = None
  unroll: int | bool = 1
  loss_fn: LossFn = softmax_cross_entropy
  track_grad_sum: bool = False
  pass_grad_fn: bool = False


def validate_local_training(lt: LocalTraining) -> None:
  if not isinstance(lt.batch_size, int) or lt.batch_size < 1:
    raise ValueError(f"`batch_size` must be a positive int, got {lt.batch_size!r}.")
  if (lt.local_steps is None) == (lt.local_epochs is None):
    raise ValueError("Set exactly one of `local_steps` and `local_epochs`, got "
                     f"local_steps={lt.local_steps!r}, local_epochs={lt.local_epochs!r}.")
  if lt.local_steps is not None and (not isinstance(lt.local_steps, int) or lt.local_steps < 1):
    raise ValueError(f"`local_steps` must be a positive int, got {lt.local_steps!r}.")
  if lt.local_epochs is not None and not lt.local_epochs > 0:
    raise ValueError(f"`local_epochs` must be > 0, got {lt.local_epochs!r}.")
  if not isinstance(lt.pass_grad_fn, bool):
    raise ValueError(f"`pass_grad_fn` must be a bool, got {lt.pass_grad_fn!r}.")
  if lt.max_steps is not None and lt.max_steps < 1:
    raise ValueError(f"`max_steps` must be >= 1, got {lt.max_steps!r}.")


def num_steps(lt: LocalTraining, max_client_size: int) -> int:
  """Static scan length for clients of at most ``max_client_size`` examples."""
  if lt.local_steps is not None:
    return lt.local_steps
  batches = -(-max_client_size // lt.batch_size)
  steps = int(-(-(lt.local_epochs * batches) // 1))
  return min(steps, lt.max_steps) if lt.max_steps else steps


def make_client_update(model: Model, lt: LocalTraining, max_client_size: int):
  """Builds ``client_update(params, model_state, x, y, indices, size, key[, update_mask,
  context])``.

  ``x``/``y`` are the whole training set (shared, not per client); ``indices`` (i32[n_max])
  and ``size`` (i32[]) describe one client, as stored in :class:`jaxfl.data.FederatedData`.
  ``update_mask`` (optional, a params-shaped tree of 0/1 arrays broadcastable to each leaf)
  multiplies every optimizer update, so masked entries never move (PruneFL's pruned weights;
  for SGD with momentum this equals masking the gradients). ``context`` (optional dict) is
  passed to the optimizer's ``update`` as keyword arguments every step (SCAFFOLD's
  correction; :attr:`jaxfl.views.ClientStart.context`), except its ``"hyperparams"`` entry
  (``{name: f32[]}``, see :mod:`jaxfl.hyperparams`), which is written into the optimizer's
  ``optax.inject_hyperparams`` states right after ``init``. Returns a :class:`ClientOutput`.
  """
  validate_local_training(lt)
  steps = num_steps(lt, max_client_size)
  bsz = lt.batch_size
  n_max = max_client_size

  def client_update(params, model_state, x, y, indices, size, key, update_mask=None,
                    context=None):
    size = jnp.maximum(size, 1)
    batches_per_epoch = (size + bsz - 1) // bsz
    if lt.local_steps is not None:
      active_steps = jnp.asarray(lt.local_steps, jnp.int32)
    else:
      active_steps = jnp.ceil(lt.local_epochs * batches_per_epoch).astype(jnp.int32)
    valid_slot = jnp.arange(n_max) < size
    shuffle_key, dropout_key = jax.random.split(key)

    def loss_fn(p, ms, xb, yb, wb, rng):
      logits, new_ms = model.apply(p, ms, xb, train=True, rng=rng)
      return lt.loss_fn(logits, yb, wb), new_ms

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    optimizer = lt.optimizer
    hyperparams = None
    if context is not None or lt.pass_grad_fn:
      optimizer = optax.with_extra_args_support(optimizer)
    if context is not None:
      context = dict(context)
      hyperparams = context.pop("hyperparams", None)
    opt_state0 = set_hyperparams(optimizer.init(params), hyperparams)

    def epoch_order(epoch):
      # The client's real examples in a fresh random order; padding slots sort last.
      u = jax.random.uniform(jax.random.fold_in(shuffle_key, epoch), (n_max,))
      order = jnp.argsort(jnp.where(valid_slot, u, 2.0)).astype(jnp.int32)
      # jnp.argsort drops shard_map's "varies over devices" type (jax 0.10); adding a zero
      # built from `valid_slot` restores it, so the scan carry types match on a mesh.
      return order + jnp.zeros_like(valid_slot, jnp.int32)

    def train_step(carry, s):
      p, opt_state, ms, gsum, sums, order = carry
      epoch = s // batches_per_epoch
      b = s % batches_per_epoch
      # Reshuffle at the first batch of every later epoch only: XLA:CPU's sort cost as much
      # as an MLP's whole step. A real branch when the client runs alone; under vmap both
      # sides are computed (as before) and selected.
      order = jax.lax.cond((b == 0) & (s > 0), epoch_order, lambda _: order, epoch)
      pos = b * bsz + jnp.arange(bsz)
      weight = (pos < size).astype(jnp.float32)
      # Positions past the client's size wrap onto its own real examples (weight 0): padding
      # slots are never read, and BatchNorm only ever sees real data.
      rows = indices[order[pos % size]]
      xb, yb = x[rows], y[rows]
      step_key = jax.random.fold_in(dropout_key, s)
      (loss, new_ms), grads = grad_fn(p, ms, xb, yb, weight, step_key)
      extra = dict(context or {})
      if lt.pass_grad_fn:
        extra["grad_fn"] = lambda q, _: grad_fn(q, ms, xb, yb, weight, step_key)[1]
      updates, new_opt_state = optimizer.update(grads, opt_state, p, **extra)
      if update_mask is not None:
        updates = jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, update_mask)
      new_p = optax.apply_updates(p, updates)
      new_gsum = None if gsum is None else jax.tree.map(jnp.add, gsum, grads)
      step_metrics = (loss, jtree.global_norm(grads), jnp.sum(weight))
      sums = tuple(a + v.astype(a.dtype) for a, v in zip(sums, step_metrics))
      return new_p, new_opt_state, new_ms, new_gsum, sums, order

    def step(carry, s):
      # A real branch when the client runs alone (lax.map): steps past the client's budget
      # cost nothing, so ragged clients do not pay for the largest one. Under vmap JAX turns
      # the cond into a select of both branches, i.e. masking.
      return jax.lax.cond(s < active_steps, train_step, lambda c, _: c, carry, s), None

    gsum0 = jax.tree.map(jnp.zeros_like, params) if lt.track_grad_sum else None
    # loss, grad norm, examples; like `size`, so they vary over devices under shard_map
    sums0 = tuple(jnp.zeros_like(size, jnp.float32) for _ in range(3))
    order0 = epoch_order(jnp.int32(0))  # the first epoch's; later ones inside the scan
    (local, _, new_ms, gsum, (loss_sum, gnorm_sum, examples), _), _ = jax.lax.scan(
        step, (params, opt_state0, model_state, gsum0, sums0, order0), jnp.arange(steps),
        unroll=lt.unroll)
    delta = jax.tree.map(lambda g, l: g - l, params, local)
    n = jnp.maximum(jnp.minimum(active_steps, steps), 1).astype(jnp.float32)
    metrics = {"loss": loss_sum / n, "grad_norm": gnorm_sum / n, "examples": examples,
               "steps": jnp.minimum(active_steps, steps)}
    return ClientOutput(delta, new_ms, metrics, gsum)

  return client_update
