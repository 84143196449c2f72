r"""Momentum L-BFGS (mL-BFGS) with a block-diagonal Hessian, as optax transformations.

Stochastic L-BFGS is unstable because consecutive curvature pairs :math:`(s, y)` are dominated
by minibatch noise. mL-BFGS (Niu et al., 2023) takes the pairs from *momentum-averaged*
parameters and gradients every :math:`T` steps, smooths consecutive pairs with a second
momentum, damps them Powell-style so that :math:`s^\top\hat y / s^\top s \in [\sigma_L,
\sigma_H]`, keeps one L-BFGS history per *block* of parameters (so blocks can live on different
devices), and feeds the globally normalised two-loop direction to heavy-ball SGD.

This module holds the momentum wrapper and the transforms:

* :func:`scale_by_mlbfgs` -- the direction only (a ``GradientTransformation``).
* :func:`mlbfgs` -- ``chain(scale_by_mlbfgs, trace(momentum), scale_by_learning_rate(lr))``.
* :func:`plain_stochastic_lbfgs` -- the same machinery with no momentum on the pairs and no
  damping (the unstable baseline of the paper).
* :class:`MLBFGSState` -- the state.

Block layouts (``resnet_block_labels``, ``top_level_block_labels``, ``block_sharding``) are in
``_mlbfgs_blocks``, pair damping and the two-loop recursion in ``_mlbfgs_two_loop``; all are
importable from :mod:`jaxfl.transforms`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfl.transforms._mlbfgs_blocks import (
    BlockLabels,
    _from_blocks,
    _make_layout,
    _Segments,
    _to_blocks,
)
from jaxfl.transforms._mlbfgs_two_loop import _damp, apply_two_loop, two_loop_matrix

__all__ = ["MLBFGSState", "mlbfgs", "plain_stochastic_lbfgs", "scale_by_mlbfgs"]


class MLBFGSState(NamedTuple):
  """State of :func:`scale_by_mlbfgs`.

  Parameter-sized arrays are ``R`` rows of length ``n`` (``_mlbfgs_blocks``): with a
  ``sharding`` one row per block (``R = B`` blocks, padded up to a multiple of the device
  count, each row zero-padded to the largest block, ``n``); without one, every block back to
  back in a single row (``R = 1``, ``n`` = all preconditioned parameters, no padding).
  Per-block arrays have a leading axis of ``B`` (the real blocks, or the padded count with a
  sharding). The dtype is the *state dtype* (float32 unless params are float64 or
  ``state_dtype`` says otherwise).

  Attributes:
    count: Updates applied so far, i32[]. Step :math:`t` of the paper is ``count + 1``.
    param_avg: Parameter momentum :math:`P_t`, f[R, n].
    grad_avg: Gradient momentum :math:`G_t`, f[R, n].
    param_snap: :math:`P` at the previous pair extraction, f[R, n].
    grad_snap: :math:`G` at the previous pair extraction, f[R, n].
    s_hist: Ring buffer of :math:`s_k`, f[R, M, n]; slot of pair ``k`` is ``k % M``.
    y_hist: Ring buffer of damped :math:`\\hat y_k`, f[R, M, n].
    sy: Gram matrix ``sy[b, i, k]`` = :math:`s_i^\\top \\hat y_k` between slots, f[B, M, M];
      its diagonal is :math:`\\rho_k`. Updated only when a pair is written.
    yy: Gram matrix ``yy[b, i, k]`` = :math:`\\hat y_i^\\top \\hat y_k`, f[B, M, M].
    w: The two-loop recursion as a matrix (compact form, :func:`two_loop_matrix`): the
      coefficients of the direction on the buffers are ``w @ [S q; Y q]``, f[B, 2M, 2M].
      Recomputed from ``sy``, ``yy``, ``valid``, ``h0`` when a pair is written; zero before.
    valid: Slot holds a usable pair (written and :math:`\\rho > 0`), bool[B, M].
    h0: Initial inverse-Hessian scale :math:`s^\\top\\hat y / \\hat y^\\top \\hat y` from the
      newest valid pair, f[B].
    num_pairs: Pairs extracted so far, i32[]; the next write slot is ``num_pairs % M`` and
      L-BFGS directions are used once it is > 0 (before that: SGD with weight decay).
  """

  count: jax.Array
  param_avg: jax.Array
  grad_avg: jax.Array
  param_snap: jax.Array
  grad_snap: jax.Array
  s_hist: jax.Array
  y_hist: jax.Array
  sy: jax.Array
  yy: jax.Array
  w: jax.Array
  valid: jax.Array
  h0: jax.Array
  num_pairs: jax.Array


def _check_static(name: str, value: Any, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False, hi_open: bool = False) -> None:
  """Range check for numeric hyperparameters given as Python numbers (skipped if traced)."""
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    return
  if lo is not None and (value < lo or (lo_open and value == lo)):
    raise ValueError(f"`{name}` must be {'>' if lo_open else '>='} {lo}, got {value}.")
  if hi is not None and (value > hi or (hi_open and value == hi)):
    raise ValueError(f"`{name}` must be {'<' if hi_open else '<='} {hi}, got {value}.")


def scale_by_mlbfgs(
    block_labels: BlockLabels = None,
    *,
    beta_p: jax.typing.ArrayLike = 0.999,
    beta_g: jax.typing.ArrayLike = 0.999,
    pair_momentum: jax.typing.ArrayLike = 0.9,
    update_every: int = 50,
    history: int = 10,
    damping: jax.typing.ArrayLike = 0.01,
    sigma_lo: jax.typing.ArrayLike = 0.01,
    sigma_hi: jax.typing.ArrayLike = 1.5,
    eps: jax.typing.ArrayLike = 1e-12,
    weight_decay: jax.typing.ArrayLike = 0.0,
    use_damping: bool = True,
    normalize: bool = True,
    reference_mode: bool = False,
    block_order: Sequence[Hashable] | None = None,
    state_dtype: Any = None,
    sharding: jax.sharding.NamedSharding | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions gradients with block-wise momentum L-BFGS (the direction only).

  Per block :math:`b` and step :math:`t` (``count + 1``), with :math:`\tilde g_t = g_t +
  \lambda\theta_t` (:math:`\lambda` = ``weight_decay``):

  .. math::
    \begin{align*}
    P_t &= \beta_p P_{t-1} + (1-\beta_p)\theta_t, \qquad
    G_t = \beta_g G_{t-1} + (1-\beta_g)\tilde g_t \qquad (P_1=\theta_1,\ G_1=\tilde g_1)\\
    \text{if } t = kT,\ k\ge2:\quad s_k &= P_{kT}-P_{(k-1)T},\quad y_k = G_{kT}-G_{(k-1)T}\\
    s_k &\leftarrow (1-\gamma)s_k + \gamma s_{k-1},\quad
    y_k \leftarrow (1-\gamma)y_k + \gamma\hat y_{k-1}\quad (k > 2)\\
    \hat y_k &= \mathrm{damp}(s_k, y_k),\quad \rho_k = s_k^\top\hat y_k,\quad
    h_0 = \rho_k / (\hat y_k^\top\hat y_k + \epsilon)\\
    d_b &= H_b\,(g_b + \lambda\theta_b)\ \text{(two-loop over the last } M
      \text{ pairs)},\qquad u = d / \lVert d\rVert_2 \ \text{(norm over all blocks)}
    \end{align*}

  (:func:`damp_pair` gives :math:`\mathrm{damp}`.) Before the first pair exists (:math:`t <
  2T`) the output is :math:`g + \lambda\theta` for every leaf, so that with
  :func:`optax.trace` it is SGD-momentum with weight decay. Leaves labelled ``None`` are not
  preconditioned: they always get :math:`g + \lambda\theta` (not normalised). Pairs with
  :math:`\rho_k \le 0` (only possible without damping, or when :math:`s_k = 0`) are stored
  but marked invalid and skipped.

  ``reference_mode=True`` reproduces the authors' ``slimblock.py`` (ALGORITHMS.md §4.3):
  unnormalised momenta :math:`P \leftarrow \beta_p P + \theta`, :math:`G \leftarrow \beta_g
  G + \tilde g` with :math:`\tilde g = (1+\lambda)g`; :math:`G` is reset to :math:`\tilde
  g_t` after every extraction (the snapshot keeps the pre-reset value); ``None`` leaves get
  :math:`g / \lVert d\rVert` (no weight decay) once L-BFGS has started.

  State dtype: float32, or the widest float dtype of params if wider (float64 under x64), or
  ``state_dtype``. Outputs are cast back to each update leaf's dtype, so bf16 params get bf16
  updates from float32 statistics.

  Under :func:`optax.inject_hyperparams`, ``update_every``, ``history``, ``state_dtype`` (a
  callable type), a callable ``block_labels`` and ``block_order`` must be in ``static_args``;
  booleans are static automatically; all float hyperparameters may be injected or scheduled.

  Args:
    block_labels: Label tree with the structure of params (or a function of params returning
      one) mapping each leaf to a hashable block id, or ``None`` to leave the leaf
      unpreconditioned. ``None`` (the default) puts all leaves in one block.
    beta_p: Parameter momentum :math:`\beta_p`.
    beta_g: Gradient momentum :math:`\beta_g`.
    pair_momentum: Second momentum :math:`\gamma` over consecutive pairs.
    update_every: Pair-extraction period :math:`T` (static, >= 1).
    history: Memory :math:`M`, pairs kept per block (static, >= 1).
    damping: :math:`\epsilon_d` in [0, 1): minimum weight of :math:`s` in :math:`\hat y`.
    sigma_lo: Lower curvature bound :math:`\sigma_L` (<= 1).
    sigma_hi: Upper curvature bound :math:`\sigma_H` (>= 1).
    eps: :math:`\epsilon` in the damping and :math:`h_0` denominators.
    weight_decay: :math:`\lambda`, added to the gradient (coupled, as in SGD).
    use_damping: ``False`` stores raw :math:`y_k` (plain stochastic L-BFGS).
    normalize: Divide the direction by its global norm (authors' default ``True``).
    reference_mode: Reproduce the code quirks of the authors' implementation (see above).
    block_order: Optional explicit list of block ids; fixes their order on the block axis and
      makes any other label an error.
    state_dtype: dtype of the statistics and histories (see above).
    sharding: A ``NamedSharding`` whose spec splits the leading (block) axis, e.g.
      :func:`block_sharding`; one row per block, the rows and their histories laid across
      its devices. Without it several blocks share one unpadded row.

  Returns:
    A ``GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Raises:
    ValueError: For ``update_every < 1``, ``history < 1``, out-of-range constant
      hyperparameters, label trees that do not match params, or labels not in
      ``block_order``.

  References:
    Niu, Fabian, Lee, Soltanolkotabi, Avestimehr, `mL-BFGS: A Momentum-based L-BFGS for
    Distributed Large-Scale Neural Network Optimization
    <https://openreview.net/forum?id=9jnsPp8DP3>`_, TMLR 2023.
  """
  if not isinstance(update_every, (int, np.integer)) or update_every < 1:
    raise ValueError(f"`update_every` must be an int >= 1, got {update_every!r}.")
  if not isinstance(history, (int, np.integer)) or history < 1:
    raise ValueError(f"`history` must be an int >= 1, got {history!r}.")
  _check_static("beta_p", beta_p, 0.0, 1.0, hi_open=True)
  _check_static("beta_g", beta_g, 0.0, 1.0, hi_open=True)
  _check_static("pair_momentum", pair_momentum, 0.0, 1.0, hi_open=True)
  _check_static("damping", damping, 0.0, 1.0, hi_open=True)
  _check_static("sigma_lo", sigma_lo, 0.0, 1.0)
  _check_static("sigma_hi", sigma_hi, 1.0)
  _check_static("eps", eps, 0.0)
  _check_static("weight_decay", weight_decay, 0.0)
  if sharding is not None and not isinstance(sharding, jax.sharding.NamedSharding):
    raise ValueError(f"`sharding` must be a NamedSharding, got {type(sharding).__name__}.")
  if sharding is not None and (not sharding.spec or sharding.spec[0] is None):
    raise ValueError(f"`sharding` must split the leading (block) axis, got spec "
                     f"{sharding.spec}.")
  t_period, mem = int(update_every), int(history)
  if sharding is not None:
    axes = sharding.spec[0]
    axes = axes if isinstance(axes, tuple) else (axes,)
    device_count = math.prod(sharding.mesh.shape[a] for a in axes)
  else:
    device_count = 1

  def dtype_of(params):
    if state_dtype is not None:
      return jnp.dtype(state_dtype)
    dts = [jnp.dtype(x.dtype) if hasattr(x, "dtype") else jnp.asarray(x).dtype
           for x in jax.tree.leaves(params)]
    return jnp.result_type(jnp.float32, *[d for d in dts if jnp.issubdtype(d, jnp.floating)])

  def constrain(x):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

  def layout_of(params):
    return _make_layout(block_labels, block_order, params, device_count,
                        packed=sharding is None)

  def init_fn(params):
    lay = layout_of(params)
    dt = dtype_of(params)
    b, r, n = lay.num_blocks, lay.num_rows, lay.block_size
    vec = lambda: constrain(jnp.zeros((r, n), dt))
    return MLBFGSState(
        count=jnp.zeros([], jnp.int32),
        param_avg=vec(), grad_avg=vec(), param_snap=vec(), grad_snap=vec(),
        s_hist=constrain(jnp.zeros((r, mem, n), dt)),
        y_hist=constrain(jnp.zeros((r, mem, n), dt)),
        sy=constrain(jnp.zeros((b, mem, mem), dt)),
        yy=constrain(jnp.zeros((b, mem, mem), dt)),
        w=constrain(jnp.zeros((b, 2 * mem, 2 * mem), dt)),
        valid=constrain(jnp.zeros((b, mem), jnp.bool_)),
        h0=constrain(jnp.ones((b,), dt)),
        num_pairs=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("scale_by_mlbfgs needs `params` in update (weight decay and momenta).")
    lay = layout_of(params)
    seg = _Segments(lay.spans)
    dt = state.param_avg.dtype
    cast = lambda v: jnp.asarray(v, dt)
    wd = cast(weight_decay)
    g = constrain(_to_blocks(lay, updates, dt))
    p = constrain(_to_blocks(lay, params, dt))
    t = state.count + 1
    first = state.count == 0

    # Momenta on params and gradients.
    bp, bg = cast(beta_p), cast(beta_g)
    if reference_mode:
      g_mom = g * (1 + wd)
      new_p = bp * state.param_avg + p
      new_g = bg * state.grad_avg + g_mom
    else:
      g_mom = g + wd * p
      new_p = bp * state.param_avg + (1 - bp) * p
      new_g = bg * state.grad_avg + (1 - bg) * g_mom
    param_avg = jnp.where(first, p, new_p)
    grad_avg = jnp.where(first, g_mom, new_g)

    # Pair extraction every T steps. The branch returns the content of the ring-buffer slot
    # (the new pair, or the old content) and the small per-block state (Gram matrices,
    # validity, h0 and the two-loop matrix W, all O(M^2)). Nothing of size n or larger passes
    # through a branch (XLA copies what a branch passes through): the [B, M, n] buffers are
    # written below with a one-slot dynamic_update_slice, and the snapshots (and the
    # reference-mode reset of G) are selects that fuse with the momentum updates.
    extract_now = t % t_period == 0
    ptr = state.num_pairs % mem
    newest = (state.num_pairs - 1) % mem
    s_hist, y_hist = state.s_hist, state.y_hist
    take = lambda buf: jax.lax.dynamic_index_in_dim(buf, ptr, axis=1, keepdims=False)
    small = (state.valid, state.sy, state.yy, state.h0, state.w, state.num_pairs)

    def extract(_):
      make_pair = t >= 2 * t_period
      s = param_avg - state.param_snap
      y = grad_avg - state.grad_snap
      gam = cast(pair_momentum)
      s_prev = jax.lax.dynamic_index_in_dim(s_hist, newest, axis=1, keepdims=False)
      y_prev = jax.lax.dynamic_index_in_dim(y_hist, newest, axis=1, keepdims=False)
      has_prev = state.num_pairs > 0
      s = jnp.where(has_prev, (1 - gam) * s + gam * s_prev, s)
      y = jnp.where(has_prev, (1 - gam) * y + gam * y_prev, y)
      y_hat = _damp(seg, s, y, damping, sigma_lo, sigma_hi, eps) if use_damping else y
      r = seg.dot(s, y_hat)
      finite = jnp.isfinite(r)
      keep_finite = seg.expand(finite[:, None])  # keep the buffers finite
      s, y_hat = jnp.where(keep_finite, s, 0), jnp.where(keep_finite, y_hat, 0)
      r = jnp.where(finite, r, 0)
      ok = r > 0
      yy_new = seg.dot(y_hat, y_hat)
      # Gram rows/columns of the new slot against the buffers (the slot itself patched).
      onehot = jnp.arange(mem) == ptr
      s_row = jnp.where(onehot, r[:, None], seg.hist_dot(y_hist, s))
      s_col = jnp.where(onehot, r[:, None], seg.hist_dot(s_hist, y_hat))
      y_row = jnp.where(onehot, yy_new[:, None], seg.hist_dot(y_hist, y_hat))
      sy = jnp.where(onehot[None, :, None], s_row[:, None, :], state.sy)
      sy = jnp.where(onehot[None, None, :], s_col[:, :, None], sy)
      yy = jnp.where(onehot[None, :, None], y_row[:, None, :], state.yy)
      yy = jnp.where(onehot[None, None, :], y_row[:, :, None], yy)
      valid = jnp.where(onehot[None, :], ok[:, None], state.valid)
      h0 = jnp.where(ok, r / (yy_new + cast(eps)), state.h0)
      w = two_loop_matrix(sy, yy, valid, h0, ptr)
      new_small = (valid, sy, yy, h0, w, state.num_pairs + 1)
      small_out = jax.tree.map(lambda new, old: jnp.where(make_pair, new, old), new_small,
                               small)
      return (jnp.asarray(True), jnp.where(make_pair, s, take(s_hist)),
              jnp.where(make_pair, y_hat, take(y_hist)), small_out)

    def keep(_):
      return jnp.asarray(False), take(s_hist), take(y_hist), small

    # `done` (= extract_now, returned by the branch) orders the in-place snapshot writes
    # after the branch's reads of the old snapshots, so XLA does not copy them every step.
    done, s_new, y_new, (valid, sy, yy, h0, w, num_pairs) = jax.lax.cond(
        extract_now, extract, keep, None)
    param_snap = jnp.where(done, param_avg, state.param_snap)
    grad_snap = jnp.where(done, grad_avg, state.grad_snap)
    if reference_mode:  # G restarts from the current gradient after every extraction
      grad_avg = jnp.where(done, g_mom, grad_avg)
    s_hist = jax.lax.dynamic_update_index_in_dim(s_hist, s_new, ptr, axis=1)
    y_hist = jax.lax.dynamic_update_index_in_dim(y_hist, y_new, ptr, axis=1)
    started = num_pairs > 0

    # Direction. The two-loop reads the buffers after the slot write; inside a conditional,
    # so that XLA cannot fuse (and therefore duplicate) the in-place slot writes into the
    # matrix-vector products, which would copy the whole buffers every step.
    q = g + wd * p

    def lbfgs_dir(q):
      d = apply_two_loop(q, s_hist, y_hist, valid, h0, w, seg)
      nrm = optax.tree.norm(d)
      scale = jnp.where(nrm > 0, 1 / jnp.where(nrm > 0, nrm, 1), 1) if normalize else cast(1)
      return d * scale, scale

    d, scale = jax.lax.cond(started, lbfgs_dir, lambda q: (q, cast(1)), q)
    d = constrain(d)

    leaves = jax.tree.leaves(updates)
    p_leaves = jax.tree.leaves(params)
    out = []
    for i, (u, pw) in enumerate(zip(leaves, p_leaves)):
      if lay.leaf_block[i] >= 0:
        out.append(_from_blocks(lay, d, i).astype(u.dtype))
      else:
        u32, w32 = u.astype(dt), pw.astype(dt)
        sgd = u32 + wd * w32
        if reference_mode:
          v = jnp.where(started, u32 * scale, sgd)
        else:
          v = sgd
        out.append(v.astype(u.dtype))
    new_state = MLBFGSState(
        count=optax.safe_increment(state.count),
        param_avg=constrain(param_avg), grad_avg=constrain(grad_avg),
        param_snap=constrain(param_snap), grad_snap=constrain(grad_snap),
        s_hist=constrain(s_hist), y_hist=constrain(y_hist), sy=constrain(sy), yy=constrain(yy),
        w=constrain(w), valid=constrain(valid), h0=constrain(h0), num_pairs=num_pairs)
    return jax.tree.unflatten(lay.treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mlbfgs(
    learning_rate: optax.ScalarOrSchedule,
    block_labels: BlockLabels = None,
    *,
    momentum: jax.typing.ArrayLike = 0.9,
    beta_p: jax.typing.ArrayLike = 0.999,
    beta_g: jax.typing.ArrayLike = 0.999,
    pair_momentum: jax.typing.ArrayLike = 0.9,
    update_every: int = 50,
    history: int = 10,
    damping: jax.typing.ArrayLike = 0.01,
    sigma_lo: jax.typing.ArrayLike = 0.01,
    sigma_hi: jax.typing.ArrayLike = 1.5,
    eps: jax.typing.ArrayLike = 1e-12,
    weight_decay: jax.typing.ArrayLike = 0.0,
    use_damping: bool = True,
    normalize: bool = True,
    reference_mode: bool = False,
    block_order: Sequence[Hashable] | None = None,
    state_dtype: Any = None,
    sharding: jax.sharding.NamedSharding | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""mL-BFGS: :func:`scale_by_mlbfgs` followed by heavy-ball momentum and the learning rate.

  .. math::
    v_t = \mu v_{t-1} + u_t,\qquad \theta_{t+1} = \theta_t - \eta_t v_t,

  with :math:`u_t` the output of :func:`scale_by_mlbfgs` (SGD direction :math:`g +
  \lambda\theta` before the first curvature pair, normalised L-BFGS direction after).
  Defaults are the paper runs' (``run-SLIM.sh``: lr 0.1 with cosine decay, momentum 0.9,
  :math:`\beta_p = \beta_g = 0.999`, :math:`\gamma = 0.9`, :math:`T = 50`, :math:`M = 10`,
  :math:`\epsilon_d = 0.01`, :math:`\sigma_L = 0.01`, :math:`\sigma_H = 1.5`,
  :math:`\epsilon = 10^{-12}`; weight decay 2e-4 or 5e-4 there, 0 here).

  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    block_labels: See :func:`scale_by_mlbfgs`.
    momentum: Heavy-ball momentum :math:`\mu` on the direction.
    beta_p: See :func:`scale_by_mlbfgs` (and likewise for the remaining arguments).
    beta_g: Gradient momentum.
    pair_momentum: Second momentum over pairs.
    update_every: Pair-extraction period (static).
    history: Pairs per block (static).
    damping: Minimum mix-in of ``s``.
    sigma_lo: Lower curvature bound.
    sigma_hi: Upper curvature bound.
    eps: Denominator epsilon.
    weight_decay: Coupled weight decay.
    use_damping: Damp pairs.
    normalize: Globally normalise the direction.
    reference_mode: Authors' code quirks.
    block_order: Explicit block order.
    state_dtype: Statistics dtype.
    sharding: Block sharding.

  Returns:
    A ``GradientTransformationExtraArgs``; ``update`` requires ``params``. Under
    :func:`optax.inject_hyperparams` pass
    ``static_args=("update_every", "history", "state_dtype", "block_order")`` (and
    ``"block_labels"`` if it is a function).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jaxfl.transforms import mlbfgs
    >>> params = {"w": jnp.ones(3)}
    >>> tx = mlbfgs(0.1, update_every=2, history=3)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w"].shape
    (3,)

  References:
    Niu et al., `mL-BFGS: A Momentum-based L-BFGS for Distributed Large-Scale Neural
    Network Optimization <https://openreview.net/forum?id=9jnsPp8DP3>`_, TMLR 2023.
  """
  _check_static("momentum", momentum, 0.0, 1.0, hi_open=True)
  return optax.chain(
      scale_by_mlbfgs(
          block_labels, beta_p=beta_p, beta_g=beta_g, pair_momentum=pair_momentum,
          update_every=update_every, history=history, damping=damping, sigma_lo=sigma_lo,
          sigma_hi=sigma_hi, eps=eps, weight_decay=weight_decay, use_damping=use_damping,
          normalize=normalize, reference_mode=reference_mode, block_order=block_order,
          state_dtype=state_dtype, sharding=sharding),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(learning_rate),
  )


def plain_stochastic_lbfgs(
    learning_rate: optax.ScalarOrSchedule,
    block_labels: BlockLabels = None,
    *,
    momentum: jax.typing.ArrayLike = 0.0,
    update_every: int = 1,
    history: int = 10,
    weight_decay: jax.typing.ArrayLike = 0.0,
    normalize: bool = True,
    eps: jax.typing.ArrayLike = 1e-12,
    state_dtype: Any = None,
    sharding: jax.sharding.NamedSharding | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Plain stochastic L-BFGS: raw minibatch pairs, no momentum on pairs, no damping.

  The baseline mL-BFGS fixes: pairs from *different* minibatches, stored as they are,

  .. math::
    s_k = \theta_{kT} - \theta_{(k-1)T},\qquad y_k = g_{kT} - g_{(k-1)T},\qquad
    \theta_{t+1} = \theta_t - \eta_t\, \frac{H_t (g_t + \lambda\theta_t)}
      {\lVert H_t (g_t + \lambda\theta_t)\rVert_2}

  (pairs with :math:`s^\top y \le 0` are skipped, the usual safeguard; :math:`H_t` is the
  two-loop L-BFGS inverse Hessian of the last ``history`` pairs; before the first pair the step
  is :math:`\eta_t (g_t + \lambda\theta_t)`). It is :func:`mlbfgs` with
  ``beta_p = beta_g = pair_momentum = 0``, ``use_damping=False`` and (by default) no
  heavy-ball momentum.

  Args:
    learning_rate: Scalar or schedule.
    block_labels: See :func:`scale_by_mlbfgs`.
    momentum: Heavy-ball momentum (default 0).
    update_every: Pair period :math:`T` (default 1: a pair every step).
    history: Pairs kept.
    weight_decay: Coupled weight decay.
    normalize: Globally normalise the direction.
    eps: Denominator epsilon of :math:`h_0`.
    state_dtype: Statistics dtype.
    sharding: Block sharding.

  Returns:
    A ``GradientTransformationExtraArgs`` needing ``params`` in ``update``.

  References:
    Niu et al., `mL-BFGS: A Momentum-based L-BFGS for Distributed Large-Scale Neural
    Network Optimization <https://openreview.net/forum?id=9jnsPp8DP3>`_, TMLR 2023 (the
    stochastic L-BFGS baseline).
  """
  return mlbfgs(learning_rate, block_labels, momentum=momentum, beta_p=0.0, beta_g=0.0,
                pair_momentum=0.0, update_every=update_every, history=history, damping=0.0,
                eps=eps, weight_decay=weight_decay, use_damping=False, normalize=normalize,
                state_dtype=state_dtype, sharding=sharding)
