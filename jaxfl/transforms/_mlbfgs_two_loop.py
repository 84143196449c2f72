"""mL-BFGS numerics batched over blocks: pair damping and the two-loop recursion.

The per-block inner products (reductions over each block's part of the ``[R, n]`` rows, see
``_mlbfgs_blocks._Segments``) are not tree reductions, so they stay hand-written; the global
norm of the direction is ``optax.tree.norm`` in ``_mlbfgs``. The two-loop recursion is carried
out in its compact form: a ``2M x 2M`` matrix (:func:`two_loop_matrix`, recomputed when a pair
is written) applied to the products of the history with the gradient
(:func:`apply_two_loop`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxfl.transforms._mlbfgs_blocks import _Segments

__all__ = ["damp_pair", "two_loop"]

_STACKED = _Segments(None)


def damp_pair(s: jax.Array, y: jax.Array, damping, sigma_lo, sigma_hi, eps) -> jax.Array:
  r"""Powell-style damping of a curvature pair towards the identity, batched over blocks.

  .. math::
    \tau = \frac{s^\top y}{s^\top s + \epsilon},\quad
    \phi = \begin{cases} \frac{1-\sigma_L}{1-\tau} & \tau < \sigma_L\\
                         \frac{\sigma_H-1}{\tau-1} & \tau > \sigma_H\\ 1 & \text{else}
           \end{cases},\quad \phi \leftarrow \min(\phi, 1-\epsilon_d),\quad
    \hat y = \phi y + (1-\phi) s.

  For :math:`\sigma_L \le 1 \le \sigma_H` this gives :math:`s^\top\hat y / s^\top s \in
  [\sigma_L, \sigma_H]`.

  Args:
    s: f[..., n].
    y: f[..., n].
    damping: :math:`\epsilon_d`, the minimum mix-in of ``s``.
    sigma_lo: :math:`\sigma_L`.
    sigma_hi: :math:`\sigma_H`.
    eps: :math:`\epsilon` of the denominator.

  Returns:
    :math:`\hat y`, same shape as ``y``.
  """
  return _damp(_STACKED, s, y, damping, sigma_lo, sigma_hi, eps)


def _damp(seg: _Segments, s, y, damping, sigma_lo, sigma_hi, eps):
  """:func:`damp_pair` with the per-block reductions of ``seg`` (packed rows)."""
  dt = s.dtype
  tau = seg.dot(s, y) / (seg.dot(s, s) + jnp.asarray(eps, dt))
  one = jnp.ones_like(tau)
  lo, hi = jnp.asarray(sigma_lo, dt), jnp.asarray(sigma_hi, dt)
  phi_lo = (1 - lo) / jnp.where(tau < lo, 1 - tau, one)
  phi_hi = (hi - 1) / jnp.where(tau > hi, tau - 1, one)
  phi = jnp.where(tau < lo, phi_lo, jnp.where(tau > hi, phi_hi, one))
  phi = jnp.minimum(phi, 1 - jnp.asarray(damping, dt))
  return seg.expand(phi[..., None]) * y + seg.expand((1 - phi)[..., None]) * s


def two_loop_matrix(sy: jax.Array, yy: jax.Array, valid: jax.Array, h0: jax.Array,
                    newest: jax.Array) -> jax.Array:
  r"""The matrix :math:`W` of the two-loop recursion in compact form, batched over blocks.

  The two-loop recursion (newest to oldest :math:`\alpha_i = s_i^\top q_i / \rho_i`,
  :math:`q_{i-1} = q_i - \alpha_i y_i`; :math:`r = h_0 q`; oldest to newest :math:`\beta_i =
  y_i^\top r / \rho_i`, :math:`r \mathrel{+}= (\alpha_i - \beta_i) s_i`) returns
  :math:`H q = h_0 q + S^\top c_s + Y^\top c_y` with coefficients that are linear in
  :math:`S q` and :math:`Y q` (Byrd, Nocedal and Schnabel's compact form). With slots in
  chronological order, :math:`R` the upper triangle of :math:`S Y^\top` (diagonal
  :math:`\rho`), :math:`A = R^{-1}` and :math:`D = \mathrm{diag}(\rho)`, the two loops are the
  triangular solves :math:`\alpha = A\,Sq` and :math:`R^\top c_s = D\alpha + h_0 YY^\top\alpha
  - h_0 Yq`, :math:`c_y = -h_0\alpha`, i.e.

  .. math::
    \begin{pmatrix} c_s \\ c_y \end{pmatrix} = W \begin{pmatrix} Sq \\ Yq \end{pmatrix},\qquad
    W = \begin{pmatrix} A^\top (D + h_0 YY^\top) A & -h_0 A^\top \\ -h_0 A & 0 \end{pmatrix}.

  :math:`W` depends only on the Gram matrices and :math:`h_0`, which change when a pair is
  written, so :func:`jaxfl.transforms.scale_by_mlbfgs` computes it then and each step costs
  two matrix-vector products with the history in, a :math:`2M \times 2M` one, and two out.
  Slots with ``valid == False`` get zero rows and columns (zero coefficients).

  Args:
    sy: f[B, M, M] with ``sy[b, i, k]`` = :math:`s_i^\top y_k` (physical slots).
    yy: f[B, M, M] with ``yy[b, i, k]`` = :math:`y_i^\top y_k`.
    valid: bool[B, M].
    h0: f[B] initial scale :math:`H_0 = h_0 I`.
    newest: i32[] slot holding the newest pair (slots are ordered by age starting after it).

  Returns:
    f[B, 2M, 2M], :math:`W` in physical slot order: rows and columns ``[0, M)`` belong to
    :math:`S` (slot ``j`` at ``j``), ``[M, 2M)`` to :math:`Y` (slot ``j`` at ``M + j``).
  """
  m = sy.shape[-1]
  dt = sy.dtype
  perm = (newest + 1 + jnp.arange(m)) % m  # chronological position -> physical slot
  ok = jnp.take(valid, perm, axis=1)
  both = ok[:, :, None] & ok[:, None, :]
  sy = jnp.where(both, jnp.take(jnp.take(sy, perm, axis=1), perm, axis=2), 0)
  yy = jnp.where(both, jnp.take(jnp.take(yy, perm, axis=1), perm, axis=2), 0)
  rho = jnp.diagonal(sy, axis1=1, axis2=2)
  eye = jnp.eye(m, dtype=dt)
  # Invalid slots: a unit row and column, so R stays invertible and A is zero there (below).
  r = jnp.triu(sy) + eye[None] * jnp.where(ok, 0, 1).astype(dt)[:, None, :]
  a = jax.lax.linalg.triangular_solve(r, jnp.broadcast_to(eye[None], r.shape), left_side=True,
                                      lower=False)
  a = jnp.where(both, a, 0)
  at = jnp.swapaxes(a, 1, 2)
  h = h0.astype(dt)[:, None, None]
  w_ss = at @ (rho[:, :, None] * a + h * (yy @ a))
  w = jnp.concatenate([jnp.concatenate([w_ss, -h * at], axis=2),
                       jnp.concatenate([-h * a, jnp.zeros_like(a)], axis=2)], axis=1)
  pos = (jnp.arange(m) - newest - 1) % m  # physical slot -> chronological position
  idx = jnp.concatenate([pos, m + pos])
  return jnp.take(jnp.take(w, idx, axis=1), idx, axis=2)


def apply_two_loop(q: jax.Array, s_hist: jax.Array, y_hist: jax.Array, valid: jax.Array,
                   h0: jax.Array, w: jax.Array, seg: _Segments = _STACKED) -> jax.Array:
  r""":math:`H q = h_0 q + S^\top c_s + Y^\top c_y` with :math:`c = W (Sq, Yq)`.

  Args:
    q: f[B, n].
    s_hist: f[B, M, n].
    y_hist: f[B, M, n].
    valid: bool[B, M]; the products of invalid slots are zeroed before :math:`W` (so a
      slot's content only has to be finite).
    h0: f[B].
    w: f[B, 2M, 2M] from :func:`two_loop_matrix`.
    seg: How blocks sit in the rows (``q`` and the buffers are then ``[R, ...]`` rows, the
      other arguments per block); default one block per row.

  Returns:
    f[B, n] (f[R, n]).
  """
  m = s_hist.shape[1]
  sq = jnp.where(valid, seg.hist_dot(s_hist, q), 0)
  yq = jnp.where(valid, seg.hist_dot(y_hist, q), 0)
  c = jnp.einsum("bij,bj->bi", w, jnp.concatenate([sq, yq], axis=1))
  return (seg.expand(h0.astype(q.dtype)[:, None]) * q + seg.hist_combine(c[:, :m], s_hist)
          + seg.hist_combine(c[:, m:], y_hist))


def two_loop(q: jax.Array, s_hist: jax.Array, y_hist: jax.Array, valid: jax.Array,
             h0: jax.Array, newest: jax.Array, sy: jax.Array | None = None,
             yy: jax.Array | None = None) -> jax.Array:
  r"""L-BFGS two-loop recursion :math:`H q` over ring buffers, batched over blocks.

  The textbook recursion (newest to oldest :math:`\alpha_i = s_i^\top q_i / \rho_i`,
  :math:`q_{i-1} = q_i - \alpha_i y_i`; :math:`r = h_0 q`; oldest to newest :math:`\beta_i =
  y_i^\top r / \rho_i`, :math:`r \mathrel{+}= (\alpha_i - \beta_i) s_i`), carried out in its
  compact form (:func:`two_loop_matrix`, then :func:`apply_two_loop`): every inner product it
  needs is an entry of :math:`S q`, :math:`Y q`, :math:`S^\top Y` or :math:`Y^\top Y`, and
  the result is :math:`h_0 q + S^\top c_s + Y^\top c_y`. A step reads each history buffer
  twice, as two matrix-vector products. Slots are ordered by age starting after ``newest``
  and wrapping around; slots with ``valid == False`` get zero coefficients (they must hold
  finite values, which the transform guarantees).

  Args:
    q: f[B, n] vectors to precondition.
    s_hist: f[B, M, n] parameter differences.
    y_hist: f[B, M, n] (damped) gradient differences.
    valid: bool[B, M].
    h0: f[B] initial scale :math:`H_0 = h_0 I`.
    newest: i32[] slot holding the newest pair.
    sy: Optional f[B, M, M] with ``sy[b, i, k]`` = :math:`s_i^\top y_k`; computed if absent.
    yy: Optional f[B, M, M] with ``yy[b, i, k]`` = :math:`y_i^\top y_k`; computed if absent.

  Returns:
    f[B, n], :math:`H q` per block.
  """
  if sy is None:
    sy = jnp.einsum("bin,bkn->bik", s_hist, y_hist)
  if yy is None:
    yy = jnp.einsum("bin,bkn->bik", y_hist, y_hist)
  w = two_loop_matrix(sy, yy, valid, h0.astype(sy.dtype), newest)
  return apply_two_loop(q, s_hist, y_hist, valid, h0, w)
