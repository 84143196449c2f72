"""mL-BFGS numerics batched over the leading block axis: pair damping and the two-loop recursion.

The per-block inner products (``_dot``, reductions over the last axis of ``[B, n]`` arrays) are
not tree reductions, so they stay hand-written; the global norm of the direction is
``optax.tree.norm`` in ``_mlbfgs``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["damp_pair", "two_loop"]


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """Inner products over the last axis (one per block)."""
  return jnp.sum(a * b, axis=-1)


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
  dt = s.dtype
  tau = _dot(s, y) / (_dot(s, s) + jnp.asarray(eps, dt))
  one = jnp.ones_like(tau)
  lo, hi = jnp.asarray(sigma_lo, dt), jnp.asarray(sigma_hi, dt)
  phi_lo = (1 - lo) / jnp.where(tau < lo, 1 - tau, one)
  phi_hi = (hi - 1) / jnp.where(tau > hi, tau - 1, one)
  phi = jnp.where(tau < lo, phi_lo, jnp.where(tau > hi, phi_hi, one))
  phi = jnp.minimum(phi, 1 - jnp.asarray(damping, dt))
  return phi[..., None] * y + (1 - phi)[..., None] * s


def two_loop(q: jax.Array, s_hist: jax.Array, y_hist: jax.Array, valid: jax.Array,
             h0: jax.Array, newest: jax.Array, sy: jax.Array | None = None,
             yy: jax.Array | None = None) -> jax.Array:
  r"""L-BFGS two-loop recursion :math:`H q` over ring buffers, batched over blocks.

  The recursion is the textbook one (newest to oldest :math:`\alpha_i = s_i^\top q_i /
  \rho_i`, :math:`q_{i-1} = q_i - \alpha_i y_i`; :math:`r = h_0 q`; oldest to newest
  :math:`\beta_i = y_i^\top r / \rho_i`, :math:`r \mathrel{+}= (\alpha_i - \beta_i) s_i`),
  carried out on coefficients: every inner product it needs is an entry of :math:`S^\top q`,
  :math:`Y^\top q`, :math:`S^\top Y` or :math:`Y^\top Y`, and the result is :math:`h_0 q +
  Y c_y + S c_s`. A step therefore reads each history buffer twice as two matrix-vector
  products instead of :math:`4M` dependent vector passes (same arithmetic, about 10x faster
  on CPU for M = 10). Slots are ordered by age starting after ``newest`` and wrapping
  around; slots with ``valid == False`` get zero coefficients (they must hold finite values,
  which the transform guarantees).

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
  m = s_hist.shape[1]
  if sy is None:
    sy = jnp.einsum("bin,bkn->bik", s_hist, y_hist)
  if yy is None:
    yy = jnp.einsum("bin,bkn->bik", y_hist, y_hist)
  # Chronological order: position i holds physical slot perm[i] (oldest first).
  perm = (newest + 1 + jnp.arange(m)) % m
  ok = jnp.take(valid, perm, axis=1)
  both = ok[:, :, None] & ok[:, None, :]
  sy = jnp.where(both, jnp.take(jnp.take(sy, perm, axis=1), perm, axis=2), 0)
  yy = jnp.where(both, jnp.take(jnp.take(yy, perm, axis=1), perm, axis=2), 0)
  sq = jnp.where(ok, jnp.take(jnp.einsum("bmn,bn->bm", s_hist, q), perm, axis=1), 0)
  yq = jnp.where(ok, jnp.take(jnp.einsum("bmn,bn->bm", y_hist, q), perm, axis=1), 0)
  rho = jnp.diagonal(sy, axis1=1, axis2=2)
  inv_rho = jnp.where(ok, 1 / jnp.where(ok, rho, 1), 0)
  h0 = h0.astype(q.dtype)
  alpha = jnp.zeros_like(sq)
  for i in reversed(range(m)):  # newest -> oldest; alpha_k = 0 for k <= i so far
    a = (sq[:, i] - jnp.sum(alpha * sy[:, i, :], axis=1)) * inv_rho[:, i]
    alpha = alpha.at[:, i].set(a)
  c_y = -h0[:, None] * alpha  # r = h0 q + Y c_y + S c_s
  c_s = jnp.zeros_like(sq)
  for i in range(m):  # oldest -> newest; y_i^T s_k = sy[k, i]
    y_r = h0 * yq[:, i] + jnp.sum(c_y * yy[:, i, :], axis=1) + jnp.sum(c_s * sy[:, :, i], axis=1)
    c_s = c_s.at[:, i].set(alpha[:, i] - y_r * inv_rho[:, i])
  inv_perm = (jnp.arange(m) - newest - 1) % m  # physical slot -> chronological position
  c_y = jnp.take(c_y, inv_perm, axis=1)
  c_s = jnp.take(c_s, inv_perm, axis=1)
  return (h0[:, None] * q + jnp.einsum("bm,bmn->bn", c_y, y_hist)
          + jnp.einsum("bm,bmn->bn", c_s, s_hist))
