"""Test-set evaluation of the global model: one compilation for every round."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxfl.models import Model


def make_evaluate(model: Model, batch_size: int = 500) -> Callable:
  """A jitted ``evaluate(params, model_state, x, y) -> {"accuracy", "loss"}`` over a test set.

  The test set is padded to a multiple of ``batch_size`` and scanned in batches, so one
  compilation serves every round.

  Args:
    model: the :class:`jaxfl.models.Model` (applied with ``train=False``).
    batch_size: examples per scanned batch (memory vs. loop length).

  Returns:
    The jitted evaluation function; its outputs are f32[] mean accuracy and cross-entropy.
  """

  def evaluate(params, model_state, x, y):
    n = x.shape[0]
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]).reshape(
        (nb, batch_size) + x.shape[1:])
    yp = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)]).reshape(nb, batch_size)
    wp = (jnp.arange(nb * batch_size) < n).reshape(nb, batch_size).astype(jnp.float32)

    def one(batch):
      xb, yb, wb = batch
      logits, _ = model.apply(params, model_state, xb, train=False)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      return jnp.sum((jnp.argmax(logits, -1) == yb) * wb), jnp.sum(ce * wb)

    correct, loss = jax.lax.map(one, (xp, yp, wp))
    return {"accuracy": jnp.sum(correct) / n, "loss": jnp.sum(loss) / n}

  return jax.jit(evaluate)


__all__ = ["make_evaluate"]
