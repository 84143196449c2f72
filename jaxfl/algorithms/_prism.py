r"""PriSM (principal sub-model training) and its width baselines, from the round's contracts.

Niu, Prakash, Kundu, Lee and Avestimehr, "Overcoming Resource Constraints in Federated
Learning: Large Models Can Be Trained with only Weak Clients", TMLR 2023 (ALGORITHMS.md §7,
with the corrections of NEXT_METHODS.md §B read from the authors' ``yuehniu/modeldecomp-fl``).

How PriSM maps onto jaxfl's contracts (no engine code knows it):

* **Model**: eligible layers are SVD factors (:class:`jaxfl.models.FactorisedConv`, built by
  :func:`jaxfl.models.prism_cnn` / :func:`jaxfl.models.prism_resnet18` or converted with
  :func:`jaxfl.models.factorise_params`), BatchNorm in batch-statistics mode; the params are
  the plain model's.
* **ClientView** (:func:`prism_view`): per slot and factorised layer, draws
  :math:`n_i = \lceil\kappa_i r\rceil` components from the server's singular values
  (``slot.key``), keeps the first ``rep_keep`` of ``U``'s output columns, and returns the
  sub-model (masked entries zeroed) as ``ClientStart.params`` and the mask as ``train_mask``
  and ``upload_mask`` (the round hands the upload masks to the aggregator).
* **Client optimizer**: sub-model gradients (:func:`jaxfl.transforms.mask_gradients`),
  Frobenius decay on the factors, gradient clipping, weight decay elsewhere, SGD with
  momentum, cosine learning rate per round.
* **Client update** (optional, :func:`prism_client_update`): trains the gathered smaller
  layers (activations, gradients and optimizer state scale with the sub-model).
* **Aggregator**: :func:`jaxfl.aggregation.masked_mean` (per-entry counts, fallback to the
  old value), plus the component-coverage histogram as aux metrics.
* **Server**: :func:`jaxfl.transforms.prism_server` (apply, re-SVD, keep :math:`\sigma`).
* **Ledger**: a client uploads its sub-model's entries only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfl import comm, views
from jaxfl.aggregation import masked_mean, weighted_mean
from jaxfl.algorithms._base import Algorithm, preset
from jaxfl.algorithms._fedopt import _lr
from jaxfl.client import LocalTraining, make_client_update
from jaxfl.models import Model
from jaxfl.models._factorised import (
  factor_layers,
  gather_components,
  get_path,
  keep_count,
  scatter_components,
  set_path,
)
from jaxfl.transforms._prism import (
  SAMPLING,
  frobenius_decay,
  mask_gradients,
  prism_server,
  sample_components,
  top_n_mask,
)
from jaxfl.transforms._round_schedule import scale_by_round_schedule

__all__ = ["draw_capacities", "prism", "prism_client_update", "prism_fedavg", "prism_view",
           "submodel_fraction"]

REP_SELECT = ("first", "random")


# ----------------------------------------------------------------------------- model


def draw_capacities(num_clients: int, capacities: Sequence[float] = (0.2, 0.4, 0.6),
                    ratios: Sequence[float] = (0.5, 0.3, 0.2), seed: int = 0) -> np.ndarray:
  """Per-client keep ratios :math:`\\kappa_i`, drawn once (the paper's heterogeneous setting).

  Each client independently draws a capacity with the given probabilities, as the reference's
  ``np.random.choice(client_capacities, p=client_ratios)`` per client, from a seeded NumPy
  generator (the reference does not seed it).

  Returns:
    f32[num_clients]: pass it as ``kappa`` to :func:`prism` (static: one compilation).
  """
  caps, p = np.asarray(capacities, np.float64), np.asarray(ratios, np.float64)
  if caps.shape != p.shape or caps.ndim != 1 or not np.all((caps > 0) & (caps <= 1)):
    raise ValueError(f"`capacities` must be values in (0, 1] with one ratio each, got "
                     f"{capacities!r} and {ratios!r}.")
  if np.any(p < 0) or not math.isclose(float(p.sum()), 1.0, rel_tol=1e-6):
    raise ValueError(f"`ratios` must be >= 0 and sum to 1, got {ratios!r}.")
  rng = np.random.default_rng(seed)
  return rng.choice(caps, size=int(num_clients), p=p).astype(np.float32)


def submodel_fraction(params: Any, kappa: float, rep_keep: float = 0.4,
                      rep_keep_dense: float = 1.0) -> dict:
  """Parameters a client at ``kappa`` trains, as fractions (host-side, static shapes).

  Args:
    params: the factorised model's params.
    kappa, rep_keep, rep_keep_dense: as in :func:`prism`.

  Returns:
    ``{"of_factorised": f, "of_dense": g, "factorised_layers": h}``: the sub-model's
    parameters over the factorised model's, over the dense model's (each factorised layer
    counted as its ``K x C_out`` kernel), and over the factorised layers' dense kernels only.
  """
  total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  sub = dense = total
  fac_sub = fac_dense = 0
  for path in factor_layers(params):
    layer = get_path(params, path)
    v, u = layer["V"], layer["U"]
    r, c_out = u.shape
    k = int(np.size(v)) // r
    n = keep_count(kappa, r)
    rows = keep_count(rep_keep if v.ndim == 4 else rep_keep_dense, c_out)
    full = k * r + r * c_out
    part = k * n + n * rows
    if "bias" in layer:
      full += c_out
      part += rows
    sub += part - full
    dense += k * c_out - (k * r + r * c_out)
    fac_sub += part
    fac_dense += k * c_out + (c_out if "bias" in layer else 0)
  return {"of_factorised": sub / total, "of_dense": sub / dense,
          "factorised_layers": fac_sub / max(fac_dense, 1)}


# ----------------------------------------------------------------------------- sliced


def _levels(sliced) -> np.ndarray:
  lv = np.unique(np.asarray(sliced, np.float64).reshape(-1))
  if lv.size == 0 or not np.all((lv > 0) & (lv <= 1)):
    raise ValueError(f"`sliced` must be a keep ratio in (0, 1] or an array of them, got "
                     f"{sliced!r}.")
  return lv


def _submodel_index(values, mask, levels) -> dict:
  """``{path: (index i32[n], weight f32[n])}`` per factorised layer: the client's components
  (read from its train mask) in ascending order, padded to the static ``n`` with
  components outside its mask at weight 0; NaN weights when the mask does not fit. A layer
  whose ``n`` is its rank ``r`` (kappa = 1) is left out: it runs full-size, as masked."""
  out = {}
  for path in factor_layers(values):
    r = get_path(values, path)["V"].shape[-1]
    n = max(keep_count(float(k), r) for k in levels)
    if n >= r:
      continue
    comp = (jnp.asarray(get_path(mask, path)["V"]).reshape(-1) > 0.5).astype(jnp.float32)
    index = jnp.argsort(-comp, stable=True)[:n]
    total = jnp.sum(comp)
    weight = jnp.where((total > n) | (total < 1), jnp.nan, comp[index])
    out[path] = (index, weight)
  return out


def _gather_submodel(values, index):
  """Every factorised layer of ``values`` restricted to its indexed (weighted) components."""
  for path, (idx, w) in index.items():
    layer = dict(get_path(values, path))
    layer["V"], layer["U"] = gather_components(layer["V"], layer["U"], idx, w)
    values = set_path(values, path, layer)
  return values


def _gather_masks(mask, index):
  """A mask tree (leaves broadcastable to the params) restricted to the gathered components:
  ``V``'s masks along their last axis, ``U``'s along the first (size-1 axes stay)."""
  for path, (idx, _) in index.items():
    layer = dict(get_path(mask, path))
    v, u = jnp.asarray(layer["V"]), jnp.asarray(layer["U"])
    if v.ndim and v.shape[-1] > 1:
      layer["V"] = jnp.take(v, idx, axis=-1)
    if u.ndim == 2 and u.shape[0] > 1:
      layer["U"] = jnp.take(u, idx, axis=0)
    mask = set_path(mask, path, layer)
  return mask


def _scatter_submodel(full, small, index):
  """``full`` with the gathered entries of ``small`` written back (other leaves from
  ``small``)."""
  for path, (idx, _) in index.items():
    layer = dict(get_path(small, path))
    f = get_path(full, path)
    layer["V"], layer["U"] = scatter_components(f["V"], f["U"], layer["V"], layer["U"], idx)
    small = set_path(small, path, layer)
  return small


def prism_client_update(model: Model, local: LocalTraining, max_client_size: int,
                        sliced: float | Sequence[float] | np.ndarray, *,
                        gather_state: bool = True):
  r"""One client's local update on its gathered sub-model.

  A drop-in for ``jaxfl.client.make_client_update(model, local, max_client_size)``, with the
  same signature and result up to float summation order; install it through the algorithm's
  ``client_update`` contract: ``prism(kappa)._replace(client_update=functools.partial(
  prism_client_update, sliced=kappa))``. It reads the client's components from its train
  mask (``update_mask``, handed out by :func:`prism_view`) and gathers every factorised layer
  to ``V`` ``f[..., n]`` / ``U`` ``f[n, C_out]`` with the static :math:`n = \max_\kappa
  \lceil\kappa r\rceil` over the distinct ``sliced`` values (a client below the largest level
  pads with zero-weight components; a layer with :math:`n = r` runs full-size), so the
  forward and backward passes run the smaller layers and their activations and FLOPs scale
  with :math:`n`.

  * ``gather_state=True``: the params, ``update_mask`` and ``context["grad_mask"]`` are
    gathered before local training, so the gradients and the optimizer state (momentum) are
    sub-model sized too, and the delta is scattered back into full-size positions (0
    outside the sub-model), so the upload, the ledger and the masked mean are unchanged.
  * ``gather_state=False``: only the forward pass gathers (the model's ``apply`` in
    training); params, gradients and optimizer state stay full-size (the gradient reaches
    the full-size factors through the gather). Evaluation runs the full model either way.

  The gathered ``U`` rows keep all ``C_out`` columns (those beyond ``rep_keep`` are zero and
  frozen by the mask). A client whose mask holds more than :math:`n` components of a layer,
  or none, gets NaN params in training, so its loss is NaN and the round quarantines it.

  Args:
    model: the factorised model (:func:`jaxfl.models.prism_cnn`, ...).
    local: the algorithm's :class:`jaxfl.client.LocalTraining` (``prism(...).local``).
    max_client_size: as for ``make_client_update``.
    sliced: the clients' keep ratios (the ``kappa`` given to :func:`prism`: a float or the
      per-client array).
    gather_state: whether gradients and optimizer state are gathered too (above).

  Returns:
    ``client_update(params, model_state, x, y, indices, size, key, update_mask=None,
    context=None) -> ClientOutput``; ``update_mask`` is required.
  """
  levels = _levels(sliced)
  inner = make_client_update(model, local, max_client_size)

  def forward_only(params, model_state, x, y, indices, size, key, update_mask, context, index):
    def apply(p, ms, xb, *, train: bool, rng=None):
      return model.apply(_gather_submodel(p, index) if train else p, ms, xb, train=train,
                         rng=rng)

    update = make_client_update(model._replace(apply=apply), local, max_client_size)
    return update(params, model_state, x, y, indices, size, key, update_mask, context)

  def client_update(params, model_state, x, y, indices, size, key, update_mask=None,
                    context=None):
    if update_mask is None:
      raise ValueError("prism_client_update needs the client's train mask (`update_mask`), "
                       "which PriSM's view hands out (jaxfl.algorithms.prism).")
    index = _submodel_index(params, update_mask, levels)
    if not gather_state:
      return forward_only(params, model_state, x, y, indices, size, key, update_mask,
                          context, index)
    small = _gather_submodel(params, index)
    mask = _gather_masks(update_mask, index)
    if context is not None and context.get("grad_mask") is not None:
      context = {**context, "grad_mask": _gather_masks(context["grad_mask"], index)}
    out = inner(small, model_state, x, y, indices, size, key, mask, context)
    scatter = lambda t: _scatter_submodel(jax.tree.map(jnp.zeros_like, params), t, index)
    return out._replace(delta=scatter(out.delta),
                        grad_sum=None if out.grad_sum is None else scatter(out.grad_sum))

  return client_update


# ----------------------------------------------------------------------------- view


def _n_table(kappa, r: int):
  """Components per client for a layer of rank r: a Python int, or an i32[N] table."""
  if np.ndim(kappa) == 0:
    return keep_count(float(kappa), r)
  return np.array([keep_count(float(k), r) for k in np.asarray(kappa)], np.int32)


def prism_view(kappa: float | np.ndarray, sampling: str = "power", gamma: float = 3.0,
               rep_keep: float = 0.4, rep_select: str = "first", rep_keep_dense: float = 1.0,
               submodel_clip: bool = True,
               sigma_of: Callable[[Any], Sequence[jax.Array]] = lambda s: s.sigma
               ) -> views.ClientView:
  """PriSM's downlink: each client's principal sub-model and its masks.

  Per slot and factorised layer :math:`l` (rank :math:`r`, :math:`C_{out}` outputs), with
  :math:`\\sigma` read from the server state by ``sigma_of`` and the key
  ``fold_in(slot.key, l)``:

  * components: :func:`jaxfl.transforms.sample_components` draws
    :math:`n = \\lceil\\kappa_i r\\rceil` of them (``kappa[client_id]`` for a per-client
    array; static, so one compilation);
  * output rows of ``U`` (convs): the first :math:`\\lceil` ``rep_keep`` :math:`\\cdot
    C_{out}\\rceil` (``rep_select="first"``, the reference) or as many drawn uniformly
    (``"random"``); dense layers keep ``rep_keep_dense`` (1.0: the reference's Linear path
    has no row cut);
  * masks: ``V`` by component, ``U`` by component x row, the layer's ``bias`` by row;
    every other leaf is trained whole.

  The client starts from the server params with masked entries zeroed and trains and uploads
  the masked entries only; the mask is its ``train_mask`` and ``upload_mask`` (which the
  round hands to :func:`jaxfl.aggregation.masked_mean`). With ``submodel_clip`` the mask is
  also passed as ``context["grad_mask"]`` for :func:`jaxfl.transforms.mask_gradients`.

  Returns:
    A :class:`jaxfl.views.ClientView` for a factorised model's params.
  """
  kappa_np = np.asarray(kappa, np.float32)

  def apply(server, slot, row):
    del row
    values = server.params
    sigma = sigma_of(server.opt_state)
    mask = jax.tree.map(lambda _: jnp.ones((), jnp.float32), values)  # other leaves: whole
    for l, path in enumerate(factor_layers(values)):
      layer = get_path(values, path)
      v, u = layer["V"], layer["U"]
      r, c_out = u.shape
      n = _n_table(kappa_np, r)
      if not isinstance(n, int):
        n = jnp.asarray(n)[slot.client_id]
      k_comp, k_rows = jax.random.split(jax.random.fold_in(slot.key, l))
      comp = sample_components(k_comp, sigma[l], n, sampling, gamma)
      n_rows = keep_count(rep_keep if v.ndim == 4 else rep_keep_dense, c_out)
      if rep_select == "first" or n_rows == c_out:
        rows = (jnp.arange(c_out) < n_rows).astype(jnp.float32)
      else:
        rows = top_n_mask(jax.random.uniform(k_rows, (c_out,)), n_rows)
      node = dict(get_path(mask, path))
      node["V"] = comp.reshape((1,) * (v.ndim - 1) + (r,))
      node["U"] = comp[:, None] * rows[None, :]
      if "bias" in layer:
        node["bias"] = rows
      mask = set_path(mask, path, node)
    start = jax.tree.map(lambda p, m: p * m.astype(p.dtype), values, mask)
    context = {"grad_mask": mask} if submodel_clip else None
    return views.ClientStart(params=start, train_mask=mask, upload_mask=mask, context=context)

  return views.ClientView(apply)


def _coverage(counts, num_slots: int) -> dict:  # counts: masked_mean's sum_i w_i m_i
  """Aux metrics of the aggregate's counts: the share of components trained by >= 1 client
  and, for k = 0..S (the cohort's slots), by exactly k clients (uniform weighting: integer
  counts)."""
  comps = [get_path(counts, p)["V"].reshape(-1) for p in factor_layers(counts)]
  if not comps:
    return {}
  c = jnp.round(jnp.concatenate(comps))
  out = {"coverage": jnp.mean(c > 0), "component_count_mean": jnp.mean(c)}
  for k in range(num_slots + 1):
    out[f"component_count_{k}"] = jnp.mean(c == k)
  return out


# ----------------------------------------------------------------------------- presets


def _plain_leaves(params):
  """True for leaves under normal weight decay: not a factor layer's."""
  flags = jax.tree.map(lambda _: True, params)
  for path in factor_layers(params):
    flags = set_path(flags, path, jax.tree.map(lambda _: False, get_path(params, path)))
  return flags


def _client(client_lr, client_momentum, weight_decay, clip_norm, rounds, final_lr, batch_size,
            local_steps, local_epochs, submodel_clip) -> LocalTraining:
  """PriSM's client recipe (the reference's ``fl/clients.py``)."""
  _lr("client_lr", client_lr)
  if not 0.0 <= client_momentum < 1.0:
    raise ValueError(f"`client_momentum` must be in [0, 1), got {client_momentum!r}.")
  if not weight_decay >= 0:
    raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}.")
  if clip_norm is not None and not clip_norm > 0:
    raise ValueError(f"`clip_norm` must be > 0 or None, got {clip_norm!r}.")
  if rounds is not None and (not isinstance(rounds, int) or rounds < 1):
    raise ValueError(f"`rounds` must be a positive int or None, got {rounds!r}.")
  if not 0 < final_lr <= client_lr:
    raise ValueError(f"`final_lr` must be in (0, client_lr], got {final_lr!r}.")
  parts = [mask_gradients()] if submodel_clip else []
  if weight_decay:
    parts.append(frobenius_decay(weight_decay))
  if clip_norm is not None:
    parts.append(optax.clip_by_global_norm(clip_norm))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask=_plain_leaves))
  parts.append(optax.sgd(client_lr, momentum=client_momentum or None))
  if rounds is not None:  # torch's CosineAnnealingLR(T_max=rounds, eta_min=final_lr)
    cosine = optax.cosine_decay_schedule(1.0, rounds, alpha=final_lr / client_lr)
    parts.append(scale_by_round_schedule(cosine))
  if local_steps is not None:
    local_epochs = None
  return LocalTraining(optax.chain(*parts), batch_size=batch_size, local_steps=local_steps,
                       local_epochs=local_epochs)


@preset
def prism(kappa: float | Sequence[float] | np.ndarray = 0.2, *, sampling: str = "power",
          gamma: float = 3.0, rep_keep: float = 0.4, rep_select: str = "first",
          rep_keep_dense: float = 1.0, client_lr: float = 0.05, client_momentum: float = 0.9,
          weight_decay: float = 2e-4, clip_norm: float | None = 5.0, rounds: int | None = None,
          final_lr: float = 1e-4, batch_size: int = 32, local_steps: int | None = None,
          local_epochs: float | None = 1.0, server_lr: float = 1.0, submodel_clip: bool = True,
          diagnostics: bool = True, name: str = "prism") -> Algorithm:
  r"""PriSM: every client trains a sampled principal sub-model of the SVD-factorised model.

  Per round and factorised layer, client :math:`i` gets :math:`n_i = \lceil\kappa_i r\rceil`
  of the :math:`r` components, drawn without replacement with

  .. math::
    p_j \propto \sigma_j^\gamma\ (\text{"power"}), \quad e^{\sigma_j}\ (\text{"softmax"}),
    \quad 1\ (\text{"uniform"}), \quad \text{or the top } n_i\ (\text{"top"}),

  trains those entries (and the first ``rep_keep`` of each conv's ``U`` output columns) for
  its local epochs, and the server averages every entry over the clients that trained it,
  keeps the old value where none did, and re-factorises every layer by SVD. See
  :mod:`jaxfl.algorithms._prism` for the contract mapping and ``docs/prism.md`` for the
  reference's quirks.

  Use it with a factorised model (e.g. ``jaxfl.models.prism_cnn(...)``);
  ``algo._replace(client_update=functools.partial(prism_client_update, sliced=kappa))``
  trains each client's factorised layers at the sub-model's size (same results up to float
  summation order, fewer FLOPs and less memory).

  Args:
    kappa: keep ratio :math:`\kappa` in (0, 1], or one per client (f32[N], e.g. from
      :func:`draw_capacities`); static, one compilation.
    sampling: ``"power"`` (the paper), ``"softmax"``, ``"uniform"`` (the reference's conv path
      as published: every command sets ``--random-mask``), or ``"top"`` (deterministic).
    gamma: :math:`\gamma` of ``"power"`` (0 = uniform).
    rep_keep: fraction of each factorised conv's output columns of ``U`` a client trains
      (the reference's fixed 40%, its memory trick; 1.0 switches it off).
    rep_select: ``"first"`` (the reference) or ``"random"`` output columns per client/round.
    rep_keep_dense: the same for factorised dense layers (the reference: no cut).
    client_lr, client_momentum: client SGD (momentum restarts every round; the reference's
      server-aggregated momentum is not reproduced).
    weight_decay: Frobenius decay strength on the factors and weight decay elsewhere (the
      factor layers' biases get neither, as in the reference's parameter groups).
    clip_norm: global-norm gradient clipping (5.0 in the reference), None for none.
    rounds: total rounds :math:`T` for the cosine learning rate (per round, to ``final_lr``
      at :math:`T`); None keeps ``client_lr``.
    final_lr: the cosine schedule's floor (``eta_min`` = 1e-4).
    batch_size, local_steps, local_epochs: local work (one of the last two).
    server_lr: step on the masked mean (1.0 = the reference).
    submodel_clip: clip (and decay) the sub-model's gradient only
      (:func:`jaxfl.transforms.mask_gradients`); False reproduces the reference, whose clip
      norm also counts the gradients of ``U`` rows beyond ``rep_keep`` that never move.
    diagnostics: report the component-coverage histogram per round
      (``aggregator/coverage``, ``aggregator/component_count_k``), from the aggregate's
      per-entry counts (streamed rounds too).
    name: label.

  Returns:
    An :class:`Algorithm` with unweighted (1/m) averaging.

  References:
    Niu, Prakash, Kundu, Lee and Avestimehr, `Overcoming Resource Constraints in Federated
    Learning: Large Models Can Be Trained with only Weak Clients
    <https://openreview.net/forum?id=lx1WnkL9fk>`_, TMLR 2023.
  """
  kap = np.asarray(kappa, np.float64)
  if kap.ndim > 1 or kap.size == 0 or not np.all((kap > 0) & (kap <= 1)):
    raise ValueError(f"`kappa` must be a keep ratio in (0, 1] or a vector of them, got {kappa!r}.")
  if sampling not in SAMPLING:
    raise ValueError(f"`sampling` must be one of {SAMPLING}, got {sampling!r}.")
  if not gamma >= 0:
    raise ValueError(f"`gamma` must be >= 0, got {gamma!r}.")
  for nm, v in (("rep_keep", rep_keep), ("rep_keep_dense", rep_keep_dense)):
    if not 0 < v <= 1:
      raise ValueError(f"`{nm}` must be in (0, 1], got {v!r}.")
  if rep_select not in REP_SELECT:
    raise ValueError(f"`rep_select` must be one of {REP_SELECT}, got {rep_select!r}.")
  local = _client(client_lr, client_momentum, weight_decay, clip_norm, rounds, final_lr,
                  batch_size, local_steps, local_epochs, submodel_clip)
  view = prism_view(kap, sampling, float(gamma), float(rep_keep), rep_select,
                    float(rep_keep_dense), submodel_clip)
  aggregator = masked_mean(_coverage if diagnostics else None)
  return Algorithm(name, local, prism_server(_lr("server_lr", server_lr)), aggregator, None,
                   "uniform", ledger=comm.upload_mask_ledger(), view=view)


@preset
def prism_fedavg(*, client_lr: float = 0.05, client_momentum: float = 0.9,
                 weight_decay: float = 2e-4, clip_norm: float | None = 5.0,
                 rounds: int | None = None, final_lr: float = 1e-4, batch_size: int = 32,
                 local_steps: int | None = None, local_epochs: float | None = 1.0,
                 server_lr: float = 1.0, name: str = "prism_fedavg") -> Algorithm:
  """FedAvg with PriSM's client recipe: the full-model upper bound and the width baselines.

  The same client optimizer as :func:`prism` (clip, weight decay, SGD with momentum, cosine
  LR per round) and unweighted averaging. On a dense model
  (``jaxfl.models.prism_cnn(factorise=False)``) it is the reference's full-model run; with
  ``width_keep=kappa`` it is the reference's static first-:math:`\\kappa` channel width
  (``width_mode="static"``, HeteroFL-like) or channel dropout at :math:`1-\\kappa`
  (``"dropout"``, FjORD-like); a factorised model without PriSM's masks is PriSM at
  :math:`\\kappa = 1` without the row cut.

  Returns:
    An :class:`Algorithm` (arguments as in :func:`prism`).
  """
  local = _client(client_lr, client_momentum, weight_decay, clip_norm, rounds, final_lr,
                  batch_size, local_steps, local_epochs, False)
  return Algorithm(name, local, optax.sgd(_lr("server_lr", server_lr)), weighted_mean(), None,
                   "uniform")
