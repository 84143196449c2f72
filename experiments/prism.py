"""PriSM (principal sub-model training) against full FedAvg and width-reduction baselines.

Niu et al., TMLR 2023 (ALGORITHMS.md §7, NEXT_METHODS.md §B; docs/prism.md). Every arm uses the
same client recipe (SGD momentum 0.9, clip 5, cosine LR per round to 1e-4, weight decay as
Frobenius decay on the factors, unweighted mean) and differs in what a client trains:

  full            FedAvg on the dense model (the upper bound)
  prism_power     PriSM kappa=0.2, p ~ sigma^gamma (the paper)
  prism_uniform   PriSM kappa=0.2, uniform components (the reference's published conv runs)
  prism_top       PriSM kappa=0.2, deterministic top-kappa components (no sampling)
  static_width    dense model, first ceil(kappa C) channels of every eligible conv (HeteroFL-like,
                  the reference's --drop-original)
  fjord_dropout   dense model, channel dropout 1-kappa in training (FjORD-like, --random-mask)
  prism_hetero    PriSM with kappa_i drawn once from {0.2, 0.4, 0.6} x {0.5, 0.3, 0.2}
  (extra arms, not run by default: prism_softmax, prism_power_norowcut (rep_keep=1),
  prism_power_refclip (the reference's clip over masked rows too), heterofl_hetero (HeteroFL,
  jaxfl.algorithms.heterofl, with width kappa_i from prism_hetero's draw: the paper's
  heterogeneous width baseline; it trains and evaluates the widest client's sub-model, the
  width 0.6 model, since no client trains the channels beyond it))

Resumable: one arm x one seed per child process, each writing its own JSON under
``<out-dir>/prism/<tag>/``; the driver skips pieces already done and rewrites the report
(``prism.{json,md,png}``, or ``prism_<tag>.*``) after each.

  python experiments/prism.py                       # Fashion-MNIST, alpha 0.1, 7 arms x 3 seeds
  python experiments/prism.py --preset fashion_mnist_iid
  python experiments/prism.py --smoke --arms full prism_power --seeds 0   # 2 rounds, a check
  python experiments/prism.py --report-only
  python experiments/prism.py --preset cifar10_resnet18 --data-npz cifar10.npz   # GPU
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
from _common import (
  RESULTS,
  command_line,
  md_table,
  plot_accuracy,
  save_plot,
  timed,
  write_json,
  write_results,
)

PRESETS = {
    # NEXT_METHODS.md §B.3: N=100, m=20, equal-size Dirichlet(0.1), batch 32, one local epoch
    # (19 steps), LR 0.05 cosine to 1e-4, clip 5, Frobenius decay 2e-4, 200 rounds. Convs
    # 16/32/32 (not 32/64/64) so that one arm x one seed fits ~20 minutes on 2 CPU cores:
    # measured 4-5 s per PriSM round here against 10-15 s at 32/64/64 (under load).
    "fashion_mnist": dict(dataset="fashion_mnist", model="cnn", features=[16, 32, 32],
                          num_clients=100, cohort=20, alpha=0.1, rounds=200, local_epochs=1.0,
                          batch=32, lr=0.05, final_lr=1e-4, weight_decay=2e-4, clip=5.0,
                          kappa=0.2, gamma=3.0, rep_keep=0.4, eval_every=5,
                          client_compute="gathered"),
    "fashion_mnist_iid": dict(dataset="fashion_mnist", model="cnn", features=[16, 32, 32],
                              num_clients=100, cohort=20, alpha=None, rounds=200,
                              local_epochs=1.0, batch=32, lr=0.05, final_lr=1e-4,
                              weight_decay=2e-4, clip=5.0, kappa=0.2, gamma=3.0, rep_keep=0.4,
                              eval_every=5, client_compute="gathered"),
    # The paper's heterogeneous CIFAR-10 / ResNet-18 run (NEXT_METHODS.md §B.2.10: wd 5e-4,
    # gamma 3, E = 2, 1000 rounds, alpha 0.1), for a GPU. CIFAR-10 from TFDS, or an .npz with
    # x_train, y_train, x_test, y_test (--data-npz; the GPU image has no TFDS). No augmentation.
    "cifar10_resnet18": dict(dataset="tfds:cifar10", model="resnet18", features=None,
                             num_clients=100, cohort=20, alpha=0.1, rounds=1000,
                             local_epochs=2.0, batch=32, lr=0.1, final_lr=1e-4,
                             weight_decay=5e-4, clip=5.0, kappa=0.2, gamma=3.0, rep_keep=0.4,
                             eval_every=10, client_compute="gathered"),
}

ARMS = ("full", "prism_power", "prism_uniform", "prism_top", "static_width", "fjord_dropout",
        "prism_hetero")
EXTRA_ARMS = ("prism_softmax", "prism_power_norowcut", "prism_power_refclip", "heterofl_hetero")
OVERRIDES = ("dataset", "model", "features", "num_clients", "cohort", "alpha", "rounds", "local_epochs",
             "batch", "lr", "weight_decay", "kappa", "gamma", "rep_keep", "eval_every",
             "client_compute")
CAPACITIES, RATIOS = (0.2, 0.4, 0.6), (0.5, 0.3, 0.2)
# How a PriSM client computes its sub-model (same results up to float summation order,
# tests/algorithms/prism_sliced_test.py): "masked" runs the full-size factorised model with the
# other components zeroed (1.2x the dense model's FLOPs here), "sliced" gathers each layer's
# components inside the model (0.40x), "gathered" also trains a gathered parameter tree
# (0.39x; experiments/results/prism_memory.md). The default is the cheapest.
CLIENT_COMPUTE = ("masked", "sliced", "gathered")


# ------------------------------------------------------------------------------------ data


def equal_dirichlet(alpha: float):
  """Equal-size clients with Dirichlet(alpha) class mixtures: Flower's
  ``create_lda_partitions(accept_imbalanced=False)`` that the reference uses. Each client
  draws its class proportions, then takes ``n // N`` examples one class draw at a time from
  the classes it still can (proportions renormalised over the non-empty classes)."""

  def part(labels, num_clients, rng):
    classes = np.unique(labels)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    left = np.array([len(q) for q in pools], np.float64)
    per = len(labels) // num_clients
    props = rng.dirichlet(alpha * np.ones(len(classes)), size=num_clients)
    out = []
    for i in range(num_clients):
      idx = []
      for _ in range(per):
        p = props[i] * (left > 0)
        if p.sum() <= 0:  # every class this client wants is used up
          p = (left > 0).astype(np.float64)
        c = min(int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right")),
                len(classes) - 1)
        while left[c] == 0:  # rounding at the top of the cumsum
          c -= 1
        idx.append(pools[c].pop())
        left[c] -= 1
      out.append(np.sort(np.asarray(idx, np.int64)))
    return out

  part.__name__ = f"equal_dirichlet({alpha})"
  return part


def load_data(cfg: dict, data_dir=None, data_npz=None):
  import jaxfl

  if data_npz:
    z = np.load(data_npz)
    x_tr, x_te = z["x_train"].astype(np.float32), z["x_test"].astype(np.float32)
    if x_tr.max() > 1.5:
      x_tr, x_te = x_tr / 255.0, x_te / 255.0
    ds = jaxfl.data.ArrayDataset(os.path.basename(data_npz), x_tr, z["y_train"].astype(np.int32),
                                 x_te, z["y_test"].astype(np.int32),
                                 int(z["y_train"].max()) + 1)
  elif cfg["dataset"] == "fashion_mnist":
    ds = jaxfl.data.load_fashion_mnist(data_dir)
  elif cfg["dataset"] == "random":
    shape = (32, 32, 3) if cfg["model"] == "resnet18" else (28, 28, 1)
    return jaxfl.data.random_images(cfg["num_clients"], 64, shape, seed=0)
  elif cfg["dataset"].startswith("tfds:"):
    from jaxfl.data._tfds import load_tfds
    ds = load_tfds(cfg["dataset"][5:], data_dir=data_dir)
  else:
    raise ValueError(f"unknown dataset {cfg['dataset']!r}")
  part = jaxfl.data.iid() if cfg["alpha"] is None else equal_dirichlet(cfg["alpha"])
  return jaxfl.data.federate(ds, cfg["num_clients"], part, seed=0)


# ----------------------------------------------------------------------------------- arms


def make_model(cfg: dict, shape, classes: int, factorise: bool, width_keep=1.0,
               width_mode="static"):
  import jaxfl

  if cfg["model"] == "resnet18":
    return jaxfl.models.prism_resnet18(shape, classes, factorise=factorise,
                                       width_keep=width_keep, width_mode=width_mode)
  return jaxfl.models.prism_cnn(shape, classes, features=cfg["features"], factorise=factorise,
                                width_keep=width_keep, width_mode=width_mode)


def build(cfg: dict, arm: str, seed: int, data):
  """(algorithm, model, kappa per client or None) of one arm."""
  import jaxfl

  A = jaxfl.algorithms
  shape, classes = data.example_shape, data.num_classes
  common = dict(client_lr=cfg["lr"], client_momentum=0.9, weight_decay=cfg["weight_decay"],
                clip_norm=cfg["clip"], rounds=cfg["rounds"], final_lr=cfg["final_lr"],
                batch_size=cfg["batch"], local_epochs=cfg["local_epochs"])
  k = cfg["kappa"]
  if arm in ("full", "static_width", "fjord_dropout"):
    keep, mode = {"full": (1.0, "static"), "static_width": (k, "static"),
                  "fjord_dropout": (k, "dropout")}[arm]
    return (A.prism_fedavg(name=arm, **common),
            make_model(cfg, shape, classes, False, keep, mode), None)
  if arm == "heterofl_hetero":  # the same capacity draw as prism_hetero, as width ratios
    import jax

    kappa = A.draw_capacities(data.num_clients, CAPACITIES, RATIOS, seed=seed)
    model = make_model(cfg, shape, classes, False)
    order = A.depth_order(model, model.init(jax.random.key(0))[0])
    # no client is at width 1: HeteroFL's global model is the widest client's sub-model
    model = A.width_model(model, order, float(np.max(kappa)))
    return A.heterofl(kappa, order, name=arm, **common), model, kappa
  compute = cfg.get("client_compute", "masked")
  base = make_model(cfg, shape, classes, True)
  prism = dict(gamma=cfg["gamma"], rep_keep=cfg["rep_keep"], name=arm, **common)

  def with_compute(algo, kappa):  # the same algorithm, the client's sub-model run smaller
    if compute == "masked":
      return algo, base
    update = functools.partial(A.prism_client_update, sliced=kappa,
                               gather_state=compute == "gathered")
    return algo._replace(client_update=update), base

  if arm == "prism_hetero":
    kappa = A.draw_capacities(data.num_clients, CAPACITIES, RATIOS, seed=seed)
    return (*with_compute(A.prism(kappa, sampling="power", **prism), kappa), kappa)
  sampling = {"prism_power": "power", "prism_uniform": "uniform", "prism_top": "top",
              "prism_softmax": "softmax", "prism_power_norowcut": "power",
              "prism_power_refclip": "power"}[arm]
  if arm == "prism_power_norowcut":
    prism["rep_keep"] = 1.0
  algo = A.prism(k, sampling=sampling, submodel_clip=arm != "prism_power_refclip", **prism)
  return (*with_compute(algo, k), None)


def _cnn_costs(cfg, shape, classes, kind, keep=1.0, rep_keep=1.0):
  """(params, forward MACs per example) of the CNN's client model: "dense", "width" (the
  HeteroFL-style slice: ceil(keep C) channels of every conv but the first) or "prism" (n =
  ceil(keep r) components, ceil(rep_keep C) output rows of U)."""
  h, w, c = shape
  params = macs = 0
  prev = c
  width = lambda f: max(1, math.ceil(keep * f - 1e-9))
  for i, f in enumerate(cfg["features"]):
    cin = prev
    if kind == "prism" and i > 0:
      r = min(f, 9 * cin)
      n, rows = max(1, math.ceil(keep * r - 1e-9)), max(1, math.ceil(rep_keep * f - 1e-9))
      p = 9 * cin * n + n * rows
    else:
      cout = width(f) if (kind == "width" and i > 0) else f
      if kind == "width" and i > 1:
        cin = width(prev)
      p = 9 * cin * cout
    params += p + 2 * f
    macs += h * w * p
    prev = f
    h, w = h // 2, w // 2
  last = width(prev) if kind == "width" else prev
  params += h * w * last * classes + classes
  macs += h * w * last * classes
  return params, macs


def submodel_fractions(cfg, arm, data, kappa) -> dict:
  """What a client trains, as fractions of the dense model (the CNN: params and forward MACs;
  ResNet-18: params of the factorised layers' sub-model via submodel_fraction)."""
  import jax

  import jaxfl

  if arm == "full":
    return {"params": 1.0, "macs": 1.0}
  caps = ([cfg["kappa"]] if kappa is None else list(CAPACITIES))
  weights = [1.0] if kappa is None else [float(np.mean(np.isclose(kappa, c))) for c in caps]
  rep = 1.0 if arm == "prism_power_norowcut" else cfg["rep_keep"]
  if arm == "heterofl_hetero":  # every hidden layer cut to ceil(kappa C) channels (width_mask)
    model = make_model(cfg, data.example_shape, data.num_classes, False)
    shapes = jax.eval_shape(model.init, jax.random.key(0))[0]
    order = jaxfl.algorithms.depth_order(model, shapes)
    n = jaxfl.tree.num_params(shapes)
    fr = [sum(float(np.sum(m)) for m in jax.tree.leaves(
        jaxfl.algorithms.width_mask(shapes, order, c))) / n for c in caps]
    return {"params": float(np.dot(weights, fr)), "macs": None}
  if cfg["model"] != "cnn":
    if arm.startswith("prism"):
      shapes = jax.eval_shape(make_model(cfg, data.example_shape, data.num_classes, True).init,
                              jax.random.key(0))[0]
      fr = [jaxfl.algorithms.submodel_fraction(shapes, c, rep)["of_dense"] for c in caps]
      return {"params": float(np.dot(weights, fr)), "macs": None}
    return {"params": None, "macs": None}
  dense = _cnn_costs(cfg, data.example_shape, data.num_classes, "dense")
  kind = "prism" if arm.startswith("prism") else "width"
  parts = [_cnn_costs(cfg, data.example_shape, data.num_classes, kind, c, rep) for c in caps]
  return {"params": float(np.dot(weights, [p[0] for p in parts]) / dense[0]),
          "macs": float(np.dot(weights, [p[1] for p in parts]) / dense[1])}


# ---------------------------------------------------------------------------------- pieces


def spectrum_summary(params, kappa: float) -> dict:
  """Per eligible conv of the final model: the share of ``sum sigma^2`` in its top
  ``ceil(kappa r)`` singular values (what a kappa sub-model of principal components can hold at
  best), and the effective rank ``exp(H(sigma^2 / sum sigma^2))`` over ``r``.

  Factorised layers are merged (``V U``) first, so the full and width arms' dense kernels and
  PriSM's factors are read alike (``eligible_conv``: k x k, ``C_in`` not 1 or 3)."""
  import jax

  import jaxfl

  F = jaxfl.models
  dense = F.merge_params(params)
  out = {}
  for path, kernel in jax.tree_util.tree_flatten_with_path(dense)[0]:
    if path[-1].key != "kernel" or not F.eligible_conv(np.shape(kernel)):
      continue
    w = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    s2 = np.linalg.svd(w, compute_uv=False) ** 2
    r = len(s2)
    n = max(1, math.ceil(kappa * r - 1e-9))
    p = s2 / s2.sum()
    out["/".join(k.key for k in path[:-1])] = {
        "r": r, "n": n, "top_energy": float(p[:n].sum()),
        "effective_rank": float(np.exp(-(p * np.log(p + 1e-300)).sum()) / r)}
  return out


def run_piece(cfg: dict, arm: str, seed: int, out: str, data_dir=None, data_npz=None) -> None:
  import jax

  import jaxfl

  jaxfl.set_cpu_devices()
  data = load_data(cfg, data_dir, data_npz)
  algo, model, kappa = build(cfg, arm, seed, data)
  res, seconds = timed(jaxfl.simulate, algo, model, data, rounds=cfg["rounds"],
                       clients_per_round=cfg["cohort"], seed=seed, eval_every=cfg["eval_every"],
                       progress=False)
  keep = ("round", "test_accuracy", "train_loss", "rel_uplink")
  hist = [{k: v for k, v in h.items() if k in keep or k.startswith("aggregator/")}
          for h in res.history]
  piece = {"arm": arm, "seed": seed, "config": cfg, "seconds": seconds,
           "s_per_round": (seconds - (res.summary.get("compile_seconds") or 0.0))
           / max(cfg["rounds"] - 1, 1),
           "summary": res.summary, "fractions": submodel_fractions(cfg, arm, data, kappa),
           "capacities": None if kappa is None else np.asarray(kappa).tolist(),
           "history": hist}
  piece["spectrum"] = spectrum_summary(res.state.params, cfg["kappa"])
  if cfg["model"] == "cnn":  # small enough to keep: the final model, for post-hoc analysis
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(res.state.params))[0]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    np.savez_compressed(out[:-len(".json")] + "_params.npz",
                        **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
  write_json(out, piece, indent=None)  # atomic: a killed piece leaves no half-written result
  print(f"{arm} seed {seed}: final {res.summary['final_acc']:.4f} "
        f"best {res.summary['best_acc']:.4f} ({seconds:.0f} s)", flush=True)


def _mean_std(xs):
  xs = [x for x in xs if x is not None]
  return (float(np.mean(xs)), float(np.std(xs))) if xs else (float("nan"), float("nan"))


def report(tag: str, cfg: dict, arms, seeds, command: str, out_dir: str) -> dict | None:
  pieces = {}
  for arm in arms:
    for s in seeds:
      p = os.path.join(out_dir, "prism", tag, f"{arm}_s{s}.json")
      if os.path.exists(p):
        with open(p) as f:
          pieces.setdefault(arm, []).append(json.load(f))
  if not pieces:
    return None
  full = _mean_std([p["summary"]["final_acc"] for p in pieces.get("full", [])])[0]
  rows = []
  for arm, ps in pieces.items():
    finals = _mean_std([p["summary"]["final_acc"] for p in ps])
    bests = _mean_std([p["summary"]["best_acc"] for p in ps])
    cover = [np.mean([h["aggregator/coverage"] for h in p["history"]
                      if "aggregator/coverage" in h]) for p in ps
             if any("aggregator/coverage" in h for h in p["history"])]
    hist = {}
    for p in ps:  # mean share of components trained by exactly k clients, over rounds
      for h in p["history"]:
        for key, v in h.items():
          if key.startswith("aggregator/component_count_") and key[-1].isdigit():
            hist.setdefault(int(key.rsplit("_", 1)[1]), []).append(v)
    rows.append({
        "arm": arm, "seeds": [p["seed"] for p in ps],
        "final_acc_mean": finals[0], "final_acc_std": finals[1],
        "best_acc_mean": bests[0], "best_acc_std": bests[1],
        "gap_to_full": full - finals[0] if not math.isnan(full) else None,
        "coverage": float(np.mean(cover)) if cover else None,
        "count_histogram": {k: float(np.mean(v)) for k, v in sorted(hist.items())},
        "params_fraction": ps[0]["fractions"]["params"],
        "macs_fraction": ps[0]["fractions"]["macs"],
        "s_per_round": float(np.mean([p["s_per_round"] for p in ps])),
        "seconds_per_piece": float(np.mean([p["seconds"] for p in ps])),
        # mean over seeds and eligible convs; pieces run before the diagnostic have none
        "top_energy": _mean_std([np.mean([v["top_energy"] for v in p["spectrum"].values()])
                                 for p in ps if p.get("spectrum")])[0],
    })
  stem = "prism" if tag == "fashion_mnist" else f"prism_{tag}"
  result = {"tag": tag, "config": cfg, "command": command, "rows": rows}
  write_results(out_dir, stem, command=command, data=result, md=_report_md(tag, cfg, rows),
                plot=lambda path: _plot(path, pieces))
  return result


def _fmt(x, spec=".4f"):
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _report_md(tag, cfg, rows):
  cols = ["arm", "seeds", "final acc", "best acc", "gap to full", "coverage",
          "client params", "client MACs", "top-κ energy", "s / round"]
  cells = [[r["arm"], len(r["seeds"]),
            f"{_fmt(r['final_acc_mean'])} ± {_fmt(r['final_acc_std'])}",
            f"{_fmt(r['best_acc_mean'])} ± {_fmt(r['best_acc_std'])}",
            _fmt(r["gap_to_full"]), _fmt(r["coverage"], ".3f"),
            _fmt(r["params_fraction"], ".3f"), _fmt(r["macs_fraction"], ".3f"),
            _fmt(r["top_energy"], ".3f"), _fmt(r["s_per_round"], ".2f")] for r in rows]
  part = "IID" if cfg["alpha"] is None else f"equal-size Dirichlet alpha={cfg['alpha']}"
  lines = [f"# PriSM: {tag}", "",
           f"{cfg['dataset']}, model {cfg['model']}, N={cfg['num_clients']}, "
           f"m={cfg['cohort']}, {part}, batch {cfg['batch']}, {cfg['local_epochs']} local "
           f"epoch(s), SGD(lr={cfg['lr']}, momentum 0.9) cosine per round to "
           f"{cfg['final_lr']}, clip {cfg['clip']}, weight/Frobenius decay "
           f"{cfg['weight_decay']}, kappa={cfg['kappa']}, gamma={cfg['gamma']}, "
           f"rep_keep={cfg['rep_keep']}, {cfg['rounds']} rounds; unweighted mean.", "",
           md_table(cols, cells), "",
           "Mean ± std over the seeds listed; accuracy with batch-statistics BatchNorm on test "
           "batches of 500. Coverage: share of components trained by >= 1 client per round "
           "(mean over rounds). Client params / MACs: the sub-model a client trains over the "
           "dense model (width arms: the HeteroFL-style channel slice; the hetero arm: mean over "
           "the capacity mix). Top-κ energy: share of sum sigma^2 in the top ceil(kappa r) "
           "singular values of the final model's eligible convs (merged V U for PriSM), mean "
           "over layers and the seeds that recorded it (pieces run before the diagnostic did not): "
           "the most a kappa principal sub-model can hold. For the width arms it reads the "
           "full-size kernels, whose masked-off channels are idle, so it says little there."]
  by = {r["arm"]: r for r in rows}
  if "prism_power" in by:  # the paper's claim: PriSM ahead of the width baselines at equal kappa
    pr = by["prism_power"]
    lines += ["", "Paper's claim (PriSM kappa above static width and FjORD-like dropout by more "
              "than the seed std):"]
    for base in ("static_width", "fjord_dropout"):
      if base in by:
        b = by[base]
        gap = pr["final_acc_mean"] - b["final_acc_mean"]
        std = max(pr["final_acc_std"], b["final_acc_std"])
        verdict = "holds" if gap > std else "does not hold"
        lines.append(f"- vs {base}: {gap:+.4f} (std {std:.4f}; {len(pr['seeds'])} vs "
                     f"{len(b['seeds'])} seeds): {verdict}")
  if "prism_hetero" in by and "heterofl_hetero" in by:  # the same capacity mix
    pr, b = by["prism_hetero"], by["heterofl_hetero"]
    gap = pr["final_acc_mean"] - b["final_acc_mean"]
    std = max(pr["final_acc_std"], b["final_acc_std"])
    lines += ["", f"Paper's claim, heterogeneous capacities (PriSM above HeteroFL with the same "
              f"kappa per client): {gap:+.4f} (std {std:.4f}; {len(pr['seeds'])} vs "
              f"{len(b['seeds'])} seeds): {'holds' if gap > std else 'does not hold'}"]
  for r in rows:
    if r["count_histogram"]:
      hist = ", ".join(f"{k}: {v:.3f}" for k, v in r["count_histogram"].items() if v > 0.0005)
      lines += ["", f"{r['arm']}: share of components trained by k clients per round: {hist}"]
  return "\n".join(lines) + "\n"


def _plot(path, pieces):
  def draw(axes):
    ax, bx = axes
    plot_accuracy(ax, {arm: [p["history"] for p in ps] for arm, ps in pieces.items()})
    for arm, ps in pieces.items():
      hist = {}
      for h in ps[0]["history"]:
        for key, v in h.items():
          if key.startswith("aggregator/component_count_") and key[-1].isdigit():
            hist.setdefault(int(key.rsplit("_", 1)[1]), []).append(v)
      if hist:
        ks = sorted(hist)
        bx.plot(ks, [np.mean(hist[k]) for k in ks], marker="o", label=arm)
    bx.set_xlabel("clients that trained a component in a round")
    bx.set_ylabel("share of components (mean over rounds, first seed)")
    bx.grid(alpha=0.3)
    if bx.lines:
      bx.legend()

  return save_plot(path, draw, ncols=2, figsize=(11, 4))


# ------------------------------------------------------------------------------------ main


def resolve(args) -> tuple[str, dict]:
  """The run's config (preset + overrides) and the tag its pieces are filed under."""
  cfg = dict(PRESETS[args.preset])
  changed = {}
  for k in OVERRIDES:
    v = getattr(args, k)
    if v is not None:
      if k == "alpha":
        v = None if v == "iid" else float(v)
      changed[k] = v
  cfg.update(changed)
  tag = args.preset
  if changed:
    tag += "_" + hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
  if args.smoke:
    cfg.update(rounds=2, eval_every=1)
    tag += "_smoke"
  return tag, cfg


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="fashion_mnist")
  p.add_argument("--arms", nargs="+", choices=ARMS + EXTRA_ARMS, default=list(ARMS))
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--piece", nargs=2, metavar=("ARM", "SEED"), help="run one piece (child)")
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--max-minutes", type=float, default=None,
                 help="start no new piece after this long (the driver resumes next time)")
  p.add_argument("--smoke", action="store_true", help="2 rounds, evaluated every round")
  p.add_argument("--out-dir", default=RESULTS, help="results folder (default experiments/results)")
  p.add_argument("--data-dir", default=None, help="raw data folder (Fashion-MNIST IDX, TFDS)")
  p.add_argument("--data-npz", default=None,
                 help=".npz with x_train, y_train, x_test, y_test (e.g. CIFAR-10 on a GPU box)")
  for k in OVERRIDES:  # preset overrides (recorded; pieces are filed under a tagged folder)
    kind = (str if k in ("dataset", "model", "alpha", "client_compute") else
            int if k in ("features", "num_clients", "cohort", "rounds", "batch", "eval_every")
            else float)
    p.add_argument("--" + k.replace("_", "-"), dest=k, default=None, type=kind,
                   nargs="+" if k == "features" else None,
                   choices=CLIENT_COMPUTE if k == "client_compute" else None,
                   help="override the preset's " + k + (" (a float or 'iid')" if k == "alpha"
                                                        else ""))
  args = p.parse_args()
  tag, cfg = resolve(args)
  piece_path = lambda arm, s: os.path.join(args.out_dir, "prism", tag, f"{arm}_s{s}.json")
  if args.piece:
    arm, seed = args.piece[0], int(args.piece[1])
    run_piece(cfg, arm, seed, piece_path(arm, seed), args.data_dir, args.data_npz)
    return
  # the driver's command, less the flags that only pace it (the report covers all pieces done)
  command = command_line(__file__, drop={"--report-only": 0, "--max-minutes": 1})
  forward = list(sys.argv[1:])
  for flag, n in (("--report-only", 0), ("--max-minutes", 1), ("--arms", None),
                  ("--seeds", None)):
    while flag in forward:
      i = forward.index(flag)
      j = i + 1
      if n is None:
        while j < len(forward) and not forward[j].startswith("--"):
          j += 1
      else:
        j += n
      del forward[i:j]
  t0 = time.time()
  if not args.report_only:
    for seed in args.seeds:  # seed-major: every arm gets a first seed before any gets three
      for arm in args.arms:
        if os.path.exists(piece_path(arm, seed)):
          continue
        if args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes:
          print("time budget reached; rerun to continue", flush=True)
          break
        subprocess.run([sys.executable, __file__, *forward, "--piece", arm, str(seed)],
                       check=True)
        report(tag, cfg, args.arms, args.seeds, command, args.out_dir)
  res = report(tag, cfg, args.arms, args.seeds, command, args.out_dir)
  if res:
    for r in res["rows"]:
      print(f"{r['arm']:22s} final {_fmt(r['final_acc_mean'])} ± {_fmt(r['final_acc_std'])} "
            f"({len(r['seeds'])} seeds), client params {_fmt(r['params_fraction'], '.3f')}")


if __name__ == "__main__":
  main()
