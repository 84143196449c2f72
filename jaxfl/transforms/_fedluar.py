"""FedLUAR: layer-wise update aggregation with recycling, as an optax server transform.

The transform works in the pseudo-gradient domain of :func:`jaxfl.round.build_round`: its input
is the aggregated ``global - local`` delta :math:`g_t = -\\bar\\Delta_t`. It is placed *first* in
the server chain (``optax.chain(fedluar(...), optax.sgd(eta_g))``) so that it stores the raw
averaged update (ALGORITHMS.md §3.6).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfl import tree as jtree

__all__ = ["FedLUARBypassState", "FedLUARState", "fedluar", "fedluar_bypass", "recycle_mask"]

SELECTIONS = ("inverse_score", "uniform")
_TINY = 1e-30


class FedLUARState(NamedTuple):
  """State of :func:`fedluar`.

  Attributes:
    count: i32[] rounds seen.
    stored: the last fresh (aggregated, post-processed) pseudo-gradient of each candidate
      layer, :math:`\\hat g_l = -\\hat\\Delta_l` (init 0); non-candidate leaves hold an f32[]
      zero placeholder.
    score: f32[K] per-candidate score :math:`s_l=\\lVert\\bar\\Delta_l\\rVert/(\\lVert x_l
      \\rVert+\\epsilon)` of the last round in which the layer was fresh (init 0).
    recycle: bool[K] the recycle set :math:`R_t` that the *next* ``update`` applies (all False
      before the first round).
    uplink_mask: params-shaped tree of bool[] scalars, ``~recycle`` per leaf (True = clients
      upload the leaf); read by the algorithm's client view
      (:func:`jaxfl.views.server_masks`) to skip the upload of recycled layers.
    key: u32[2] raw PRNG key data, used only when ``update`` gets no ``key``.
    inner_state: state of the optional ``aggregate_transform``.
  """

  count: jax.Array
  stored: optax.Updates
  score: jax.Array
  recycle: jax.Array
  uplink_mask: Any
  key: jax.Array
  inner_state: optax.OptState


def _as_key(k):
  """A typed PRNG key from a typed key or raw ``u32[2]`` key data."""
  if jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key):
    return k
  return jax.random.wrap_key_data(k)


def _sample_recycle(key, score, num_recycle: int, selection: str):
  """bool[K]: ``num_recycle`` distinct layers, drawn with p ∝ 1/score (Gumbel-top-k)."""
  k = score.shape[0]
  if num_recycle == 0:
    return jnp.zeros([k], bool)
  if selection == "uniform":
    logits = jnp.zeros([k], jnp.float32)
  else:
    logits = -jnp.log(jnp.maximum(score, _TINY))
  z = logits + jax.random.gumbel(key, (k,), jnp.float32)
  _, idx = jax.lax.top_k(z, num_recycle)
  return jnp.zeros([k], bool).at[idx].set(True)


def _mask_tree(treedef, cand_idx, n_leaves, recycle):
  flat = [jnp.ones([], bool) for _ in range(n_leaves)]  # distinct buffers (donation-safe)
  for k, i in enumerate(cand_idx):
    flat[i] = jnp.logical_not(recycle[k])
  return treedef.unflatten(flat)


def recycle_mask(state: FedLUARState) -> Any:
  """Params-shaped bool tree, True where ``state`` recycles the leaf in its next update."""
  return jax.tree.map(jnp.logical_not, state.uplink_mask)


def fedluar(num_recycle: int, *, selection: str = "inverse_score", recycle: bool = True,
            eps: float = 1e-6, candidates: Callable[[Any], Any] | Any | None = None,
            aggregate_transform: optax.GradientTransformation | None = None,
            seed: int = 0) -> optax.GradientTransformationExtraArgs:
  r"""FedLUAR's layer-wise recycling of the aggregated update (Kim, Kang & Lee, 2025).

  Candidates are the kernel leaves :math:`K` (``ndim >= 2``). With :math:`g_t` the aggregated
  pseudo-gradient (``global - local``) and :math:`R_t` the recycle set drawn in the previous
  round (:math:`R_0=\emptyset`):

  .. math::

    u_{t,l} &= \begin{cases} \hat g_l & l\in R_t \\ g_{t,l} & \text{otherwise}\end{cases}\\
    \hat g_l &\leftarrow g_{t,l},\quad
      s_l \leftarrow \frac{\lVert g_{t,l}\rVert_2}{\lVert x_{t,l}\rVert_2+\epsilon}
      \qquad (l\in K\setminus R_t)\\
    R_{t+1} &\sim \text{$\delta$ distinct draws from $K$ with } p_l \propto 1/s_l .

  Recycled layers re-apply their stored (possibly stale) update and keep their old score.
  The draw without replacement is successive sampling (numpy ``choice(replace=False, p)``),
  implemented as Gumbel-top-:math:`\delta` on :math:`-\log s_l`. The state exposes
  ``uplink_mask`` (True = upload); a client view that reads it
  (``jaxfl.views.server_masks(upload=lambda s: s[0].uplink_mask)``, as
  :func:`jaxfl.algorithms.fedluar` composes it) zeroes the recycled layers of every client
  delta before aggregation, and the ledger does not count them.

  Compose by chaining (FedLUAR first): FedAvg+LUAR = ``chain(fedluar(d), sgd(1.0))``,
  FedOpt+LUAR = ``chain(fedluar(d), sgd(eta_g))``; FedACG+LUAR (recycled layers bypass the
  server momentum) = :func:`fedluar_bypass`.

  Args:
    num_recycle: :math:`\delta`, layers recycled per round (``0 <= num_recycle <= |K|``;
      0 = FedAvg).
    selection: ``"inverse_score"`` (the paper, :math:`p\propto 1/s`) or ``"uniform"``
      (Table 4 ablation: uniform random layers).
    recycle: True re-applies the stored update of the selected layers; False drops their
      update (zero update, Table 5 ablation). Either way they are not uploaded.
    eps: :math:`\epsilon` in the score denominator.
    candidates: which leaves may be recycled: None (kernel leaves, ``ndim >= 2``), a callable
      ``params -> tree of bools`` or a tree of Python bools.
    aggregate_transform: optional stateful transform applied to the fresh aggregate before it
      is output and stored (FedPAQ+LUAR: the server quantises the aggregate; the score still
      uses the un-processed :math:`g_t`). Receives ``key=`` when the caller passes one.
    seed: seed of the internal key, used only when ``update`` is called without ``key``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update(updates, state, params, *,
    key=None, **extra)`` requires ``params``.

  References:
    Kim, Kang & Lee, `Communication-Efficient Federated Learning via Layer-wise Update
    Aggregation with Recycling <https://arxiv.org/abs/2503.11146>`_, NeurIPS 2025.
  """
  if isinstance(num_recycle, bool) or not isinstance(num_recycle, int | np.integer):
    raise ValueError(f"`num_recycle` must be an int, got {num_recycle!r}.")
  if num_recycle < 0:
    raise ValueError(f"`num_recycle` must be >= 0, got {num_recycle}.")
  if selection not in SELECTIONS:
    raise ValueError(f"`selection` must be one of {SELECTIONS}, got {selection!r}.")
  if isinstance(eps, int | float) and not eps >= 0:  # traced under inject_hyperparams
    raise ValueError(f"`eps` must be >= 0, got {eps!r}.")
  num_recycle = int(num_recycle)
  inner = None if aggregate_transform is None else optax.with_extra_args_support(
      aggregate_transform)

  def layout(params):
    leaves, treedef = jax.tree.flatten(params)
    flags = jtree.leaf_flags(candidates, params)
    cand_idx = [i for i, f in enumerate(flags) if f]
    if num_recycle > len(cand_idx):
      raise ValueError(f"`num_recycle`={num_recycle} exceeds the {len(cand_idx)} candidate "
                       "(kernel) layers of the params.")
    return leaves, treedef, cand_idx

  def init_fn(params):
    leaves, treedef, cand_idx = layout(params)
    stored = [jnp.zeros([], jnp.float32) for _ in leaves]
    for i in cand_idx:
      stored[i] = jnp.zeros(jnp.shape(leaves[i]), jnp.asarray(leaves[i]).dtype)
    recycle0 = jnp.zeros([len(cand_idx)], bool)
    return FedLUARState(
        count=jnp.zeros([], jnp.int32), stored=treedef.unflatten(stored),
        score=jnp.zeros([len(cand_idx)], jnp.float32), recycle=recycle0,
        uplink_mask=_mask_tree(treedef, cand_idx, len(leaves), recycle0),
        key=jax.random.key_data(jax.random.key(seed)),
        inner_state=optax.EmptyState() if inner is None else inner.init(params))

  def update_fn(updates, state, params=None, *, key=None, **extra_args):
    if params is None:
      raise ValueError("fedluar needs `params` (the score divides by the layer's norm).")
    p_leaves, treedef, cand_idx = layout(params)
    g_leaves = treedef.flatten_up_to(updates)
    st_leaves = treedef.flatten_up_to(state.stored)
    next_key, own_key = jax.random.split(jax.random.wrap_key_data(state.key))
    base = own_key if key is None else _as_key(key)
    k_sample, k_inner = jax.random.split(base)

    if inner is None:
      fresh_leaves, inner_state = g_leaves, state.inner_state
    else:
      fresh_tree, inner_state = inner.update(updates, state.inner_state, params, key=k_inner,
                                             **extra_args)
      fresh_leaves = treedef.flatten_up_to(fresh_tree)

    out = list(fresh_leaves)
    stored = list(st_leaves)
    scores = []
    for k, i in enumerate(cand_idx):
      rec = state.recycle[k]
      g = g_leaves[i]
      gn = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      pn = jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(p_leaves[i]).astype(jnp.float32))))
      scores.append(jnp.where(rec, state.score[k], gn / (pn + eps)))
      fresh = fresh_leaves[i]
      stale = st_leaves[i].astype(fresh.dtype)
      out[i] = jnp.where(rec, stale if recycle else jnp.zeros_like(fresh), fresh)
      stored[i] = jnp.where(rec, st_leaves[i], fresh.astype(st_leaves[i].dtype))
    score = (jnp.stack(scores) if scores else state.score).astype(jnp.float32)
    new_recycle = _sample_recycle(k_sample, score, num_recycle, selection)
    new_state = FedLUARState(
        count=optax.safe_increment(state.count), stored=treedef.unflatten(stored), score=score,
        recycle=new_recycle,
        uplink_mask=_mask_tree(treedef, cand_idx, len(p_leaves), new_recycle),
        key=jax.random.key_data(next_key), inner_state=inner_state)
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class FedLUARBypassState(NamedTuple):
  """State of :func:`fedluar_bypass`.

  Attributes:
    luar: the :class:`FedLUARState` (its ``uplink_mask`` drives the round's upload skipping).
    inner: the state of the server optimizer that fresh layers go through.
  """

  luar: FedLUARState
  inner: optax.OptState


def fedluar_bypass(luar: optax.GradientTransformationExtraArgs,
                   inner: optax.GradientTransformation, *,
                   bypass_scale: float = 1.0) -> optax.GradientTransformationExtraArgs:
  r"""FedLUAR in front of a stateful server optimizer whose state recycled layers bypass.

  For FedACG+LUAR (ALGORITHMS.md §3.6): fresh layers go through ``inner`` (FedACG's server
  momentum :math:`m\leftarrow\lambda m+\bar\Delta,\ x\leftarrow x+m` =
  ``optax.sgd(1.0, momentum=lambda)``); a layer recycled this round is updated directly,
  :math:`x_l \leftarrow x_l + c\,\hat\Delta_l` with :math:`c` = ``bypass_scale``, and the
  parameter-shaped parts of ``inner``'s state (momentum buffers) keep their old value for that
  layer:

  .. math::

    x_{t+1,l} = \begin{cases} x_{t,l} - c\,\hat g_l & l\in R_t \\
      x_{t,l} + \mathrm{inner}(g_t)_l & \text{otherwise.}\end{cases}

  Non-parameter-shaped parts of ``inner``'s state (step counters) advance every round. The
  parameter-shaped parts are found with ``optax.tree_utils.tree_map_params``.

  Args:
    luar: a :func:`fedluar` transform.
    inner: the server optimizer for fresh layers.
    bypass_scale: :math:`c`, step applied to the recycled update (1.0 in the authors' code).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`FedLUARBypassState`.

  References:
    Kim, Kang & Lee, NeurIPS 2025 (``fedacg_luar`` solver of the authors' code).
  """
  inner_x = optax.with_extra_args_support(inner)

  def init_fn(params):
    return FedLUARBypassState(luar=luar.init(params), inner=inner_x.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    fresh_mask = state.luar.uplink_mask  # True = fresh this round
    u, luar_state = luar.update(updates, state.luar, params, **extra_args)
    v, inner_state = inner_x.update(u, state.inner, params, **extra_args)
    out = jax.tree.map(lambda f, vi, ui: jnp.where(f, vi, -bypass_scale * ui).astype(vi.dtype),
                       fresh_mask, v, u)
    leaves, treedef = jax.tree.flatten(fresh_mask)
    index_tree = treedef.unflatten(list(range(len(leaves))))
    where_params = optax.tree_utils.tree_map_params(
        inner_x, lambda _, i: i, inner_state, index_tree, transform_non_params=lambda _: -1)
    kept = jax.tree.map(
        lambda i, new, old: new if i < 0 else jnp.where(leaves[i], new, old),
        where_params, inner_state, state.inner)
    return out, FedLUARBypassState(luar=luar_state, inner=kept)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
