"""``jaxfl.simulate``: the driver loop around the compiled round."""

from __future__ import annotations

import contextlib
import csv
import os
import time
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxfl import checkpoint as jckpt
from jaxfl import comm
from jaxfl import sharding as jshard
from jaxfl._jsonio import write_json
from jaxfl.algorithms._base import Algorithm, validate_algorithm
from jaxfl.data import FederatedData, device_data
from jaxfl.data import validate as validate_data
from jaxfl.evaluation import make_evaluate
from jaxfl.hyperparams import validate_hyperparams
from jaxfl.models import Model
from jaxfl.round import NAN_POLICIES, ServerState, build_round
from jaxfl.xla_options import host_cores


class NonFiniteUpdateError(FloatingPointError):
  """Raised with ``nan_policy="raise"`` when a client sent a non-finite update."""


class SimulationResult(NamedTuple):
  """Outcome of :func:`simulate`.

  Attributes:
    history: one dict per round (``round``, ``train_loss``, ``uplink_bytes``, ...) with
      ``test_accuracy``/``test_loss`` on evaluated rounds.
    state: final :class:`jaxfl.round.ServerState`.
    summary: final/best accuracy, relative uplink cost, totals, timings.
  """

  history: list[dict]
  state: Any
  summary: dict

  def _repr_html_(self) -> str:
    """A one-row summary table (how a notebook displays the result)."""
    import html

    s = self.summary

    def fmt(v, spec):
      return "-" if v is None else format(v, spec)

    cells = {"method": s.get("method", ""), "dataset": s.get("dataset", ""),
             "rounds": s.get("rounds"), "final acc": fmt(s.get("final_acc"), ".4f"),
             "best acc": fmt(s.get("best_acc"), ".4f"),
             "rel. uplink": fmt(s.get("rel_uplink_cost"), ".3g"),
             "uplink MB": fmt(s.get("uplink_bytes", 0.0) / 1e6, ".3g"),
             "seconds": fmt(s.get("seconds"), ".1f"),
             "compile s": fmt(s.get("compile_seconds"), ".1f")}
    head = "".join(f"<th>{html.escape(k)}</th>" for k in cells)
    row = "".join(f"<td>{html.escape(str(v))}</td>" for v in cells.values())
    return f"<table><tr>{head}</tr><tr>{row}</tr></table>"

  def _repr_pretty_(self, p, cycle) -> None:
    """A short text form in IPython (the full state and history stay in the fields)."""
    s = self.summary
    keys = ("method", "dataset", "rounds", "final_acc", "best_acc", "rel_uplink_cost")
    p.text("SimulationResult(" + ", ".join(f"{k}={s.get(k)!r}" for k in keys)
           + f", history=[{len(self.history)} rows], state=...)")

  def plot(self, ax=None, x: str = "round", label: str | None = None):
    """Test accuracy vs ``x`` (``"round"`` or cumulative ``"uplink_bytes"``, in MB) on ``ax``
    (a new figure when None); pass the same ``ax`` to put several runs on one figure.
    Returns the matplotlib Axes."""
    if x not in ("round", "uplink_bytes"):
      raise ValueError(f"`x` must be 'round' or 'uplink_bytes', got {x!r}.")
    import matplotlib.pyplot as plt

    if ax is None:
      _, ax = plt.subplots(figsize=(6, 4))
    cum = np.cumsum([h["uplink_bytes"] for h in self.history]) / 1e6
    pts = [(cum[i] if x == "uplink_bytes" else h["round"], h["test_accuracy"])
           for i, h in enumerate(self.history) if "test_accuracy" in h]
    if pts:
      xs, ys = zip(*pts)
      ax.plot(xs, ys, label=label or self.summary.get("method") or "run")
    ax.set_xlabel("uplink MB" if x == "uplink_bytes" else "round")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def _check_inputs(algorithm, model, data, rounds, clients_per_round, eval_every, seed,
                  check_data):
  validate_algorithm(algorithm)
  if not isinstance(model, Model):
    raise TypeError(f"`model` must be a jaxfl.models.Model, got {type(model).__name__}.")
  if not isinstance(data, FederatedData):
    raise TypeError(f"`data` must be a jaxfl.data.FederatedData, got {type(data).__name__}.")
  if not isinstance(rounds, int | np.integer) or rounds < 0:
    raise ValueError(f"`rounds` must be a non-negative int, got {rounds!r}.")
  if not isinstance(clients_per_round, int | np.integer) or clients_per_round < 1:
    raise ValueError(f"`clients_per_round` must be a positive int, got {clients_per_round!r}.")
  if clients_per_round > data.num_clients:
    raise ValueError(f"`clients_per_round`={clients_per_round} exceeds the population of "
                     f"{data.num_clients} clients.")
  if not isinstance(eval_every, int | np.integer) or eval_every < 0:
    raise ValueError(f"`eval_every` must be a non-negative int (0 = only at the end), "
                     f"got {eval_every!r}.")
  if not isinstance(seed, int | np.integer):
    raise ValueError(f"`seed` must be an int, got {seed!r}.")
  validate_data(data, model, check_values=check_data)


def _check_writable_dir(name: str, path: str | None) -> None:
  """Creates ``path`` if needed and proves it writable now, not after the whole run."""
  if path is None:
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"`{name}`={path!r} is a file, expected a directory.")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".jaxfl-write-test-{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"`{name}`={path!r} is not a writable directory: {e}.") from e


def _hint_cpu_devices(devices) -> None:
  """Warns once when a multi-core host runs the whole cohort on one XLA CPU device."""
  cores = host_cores()
  if (len(devices) == 1 and devices[0].platform == "cpu" and cores > 1
      and len(jax.devices("cpu")) == 1 and not getattr(_hint_cpu_devices, "done", False)):
    _hint_cpu_devices.done = True
    warnings.warn(f"jaxfl: the cohort runs on 1 XLA CPU device of a {cores}-core host; calling "
                  "jaxfl.set_cpu_devices() right after `import jax` splits it over the cores "
                  "(1.2-2.4x faster rounds measured on 2 cores, README 'Performance').",
                  stacklevel=3)


def simulate(algorithm: Algorithm, model: Model, data: FederatedData, *, rounds: int,
             clients_per_round: int, seed: int = 0, eval_every: int = 1,
             devices=None, clients_per_chunk: int | str | None = "auto",
             stream_aggregate: bool | str = "auto", nan_policy: str = "drop",
             dropout_rate: float = 0.0, checkpoint_dir: str | None = None,
             checkpoint_every: int = 0, output_dir: str | None = None, plot: bool = False,
             progress: bool = True, init_params=None, check_data: bool = True,
             allow_config_change: bool = False, hyperparams=None,
             report_grad_norm: bool = False) -> SimulationResult:
  """Runs a federated simulation: one compiled round, a Python loop over rounds only.

  The built round is kept for the next call with the same ``algorithm`` and ``model`` objects
  and the same population shape, cohort and execution options (the 4 most recent set-ups), so
  re-running a notebook cell, or a loop over seeds, rounds or data of the same shape, compiles
  nothing again. A new algorithm object (e.g. another learning rate) builds a new round;
  to change a learning rate without that, pass it as a traced value (``hyperparams``).

  Args:
    algorithm: a :class:`jaxfl.algorithms.Algorithm` (``jaxfl.algorithms.fedavg()``, ...).
    model: a :class:`jaxfl.models.Model`.
    data: a :class:`jaxfl.data.FederatedData`.
    rounds: number of rounds R (>= 0).
    clients_per_round: cohort size, sampled uniformly without replacement every round.
    seed: seeds model init (``fold_in(key(seed), 0)``) and round keys
      (``fold_in(key(seed) + 1, r)``); same seed, same history bit for bit.
    eval_every: evaluate on the test set every k rounds (and always after the last).
    devices: devices of the client mesh (default: ``jax.devices()``, i.e. every process's
      devices after :func:`jaxfl.launch.initialize`; all processes run ``simulate`` alike).
    clients_per_chunk: clients trained at once (see :func:`jaxfl.round.build_round`;
      ``"auto"`` picks by backend, ``None`` vmaps the whole cohort).
    stream_aggregate: sum updates chunk by chunk (memory grows with the chunk, not the
      cohort); ``"auto"`` does so whenever only the summation order changes (see
      :func:`jaxfl.round.build_round`).
    nan_policy: ``"drop"`` or ``"raise"`` (see :func:`jaxfl.round.build_round`).
    dropout_rate: probability that a sampled client drops out.
    checkpoint_dir: if set, resume from the newest checkpoint there and save to it.
    checkpoint_every: save every k rounds (0 = only at the end when ``checkpoint_dir``).
    output_dir: write ``history.json``, ``history.csv``, ``summary.json`` (and
      ``accuracy.png`` with ``plot=True``); process 0 only.
    progress: show a progress bar (process 0 only).
    init_params: optional initial params (e.g. pre-trained) replacing ``model.init``'s.
    check_data: validate ``data`` (labels, indices, sizes) before the first round.
    allow_config_change: resume a checkpoint written with another configuration.
    hyperparams: ``{"client": {name: value}, "server": {name: value}}``: values written into
      the client / server optimizers' ``optax.inject_hyperparams`` states inside the round
      (:mod:`jaxfl.hyperparams`). They are inputs of the compiled round, so another call
      with other values (same algorithm and model objects) compiles nothing; the FedOpt
      presets' client SGD is injected (``{"client": {"learning_rate": 0.1}}``). Checked
      before anything compiles; part of the checkpoint's configuration.
    report_grad_norm: also record the participants' mean local gradient norm
      (``grad_norm``) in the history (see :func:`jaxfl.round.build_round`; off by default,
      which saves a norm over every parameter at every local step).
  """
  _check_inputs(algorithm, model, data, rounds, clients_per_round, eval_every, seed,
                check_data)
  if hyperparams is not None:  # traces the model's init (abstractly) only when asked
    params = (jax.eval_shape(model.init, jax.random.key(0))[0] if init_params is None
              else init_params)
    hyperparams = validate_hyperparams(hyperparams, algorithm, params)
  if jax.process_index() == 0:
    _check_writable_dir("output_dir", output_dir)
  _check_writable_dir("checkpoint_dir", checkpoint_dir)
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"`nan_policy` must be one of {NAN_POLICIES}, got {nan_policy!r}.")
  if checkpoint_every < 0:
    raise ValueError(f"`checkpoint_every` must be >= 0, got {checkpoint_every!r}.")
  with contextlib.ExitStack() as locks:
    # One run per directory: a second run writing the same place would lose one's results.
    for name, where in _directories(output_dir=output_dir, checkpoint_dir=checkpoint_dir):
      locks.enter_context(jckpt.lock(where, name))
    return _run(algorithm, model, data, rounds=rounds, clients_per_round=clients_per_round,
                seed=seed, eval_every=eval_every, devices=devices,
                clients_per_chunk=clients_per_chunk, stream_aggregate=stream_aggregate,
                nan_policy=nan_policy, dropout_rate=dropout_rate,
                checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                output_dir=output_dir, plot=plot, progress=progress, init_params=init_params,
                allow_config_change=allow_config_change, hyperparams=hyperparams,
                report_grad_norm=report_grad_norm)


def _directories(**dirs):
  """The distinct directories to lock (process 0 holds the locks for every process)."""
  seen = {}
  for name, where in dirs.items():
    if where and jax.process_index() == 0:
      seen.setdefault(os.path.realpath(where), (name, where))
  return list(seen.values())


def _resume(checkpoint_dir, state, fp, rounds, allow_config_change):
  """(state, history, start round, config changes) from the newest intact checkpoint; a
  checkpoint of another configuration, or of more rounds than asked, is refused."""
  changes = []

  def accept(saved_fp, history, start):
    if saved_fp is None:
      warnings.warn(f"jaxfl: the checkpoint in {checkpoint_dir!r} has no configuration "
                    "fingerprint (written by an older jaxfl); resuming unchecked.",
                    stacklevel=4)
    changes.extend([] if saved_fp is None else jckpt.config_changes(saved_fp, fp))
    if changes and not allow_config_change:
      raise ValueError(
          f"`checkpoint_dir`={checkpoint_dir!r} holds a run with another configuration: "
          f"{'; '.join(changes)}. Use another directory, or pass allow_config_change=True to "
          "continue it anyway (the change is recorded in the history).")
    if start > rounds:
      raise ValueError(f"`rounds`={rounds} is below the {start} rounds already in "
                       f"`checkpoint_dir`={checkpoint_dir!r}; ask for >= {start} rounds or "
                       "use another directory.")

  found = jckpt.restore_latest(checkpoint_dir, state, accept)
  if found is None:
    return state, [], 0, []
  restored, history, start, _ = found
  return restored, history, start, changes


def _run(algorithm, model, data, *, rounds, clients_per_round, seed, eval_every, devices,
         clients_per_chunk, stream_aggregate, nan_policy, dropout_rate, checkpoint_dir,
         checkpoint_every, output_dir, plot, progress, init_params, allow_config_change,
         hyperparams, report_grad_norm):
  devices = jax.devices() if devices is None else list(devices)
  _hint_cpu_devices(devices)
  rnd, evaluate = _built_round(
      algorithm, model, devices, num_clients=data.num_clients,
      max_client_size=data.max_client_size, clients_per_round=clients_per_round,
      clients_per_chunk=clients_per_chunk, stream_aggregate=stream_aggregate,
      nan_policy=nan_policy, dropout_rate=dropout_rate, report_grad_norm=report_grad_norm)
  mesh = rnd.mesh
  root = jax.random.key(seed)
  state = rnd.init(jax.random.fold_in(root, 0))
  if init_params is not None:
    state = state._replace(params=init_params)
  state = state._replace(hyperparams=hyperparams)
  state = jax.tree.map(np.asarray, state)  # fresh host buffers: the round donates its input
  fp = jckpt.fingerprint(algorithm, data, state, seed=seed,
                         clients_per_round=clients_per_round, nan_policy=nan_policy,
                         dropout_rate=dropout_rate)
  history, start, changes = [], 0, []
  if checkpoint_dir:
    state, history, start, changes = _resume(checkpoint_dir, state, fp, rounds,
                                             allow_config_change)
    if hyperparams is not None:  # an allowed change takes the values asked for now
      state = state._replace(hyperparams=jax.tree.map(np.asarray, hyperparams))
  state = rnd.place(state)  # laid out as the round returns it: one compilation
  dd = device_data(data, mesh)
  x_test, y_test = jshard.put_replicated((data.x_test, data.y_test), mesh)
  round_keys = jax.random.fold_in(root, 1)
  # Multi-process (jaxfl.launch): every process runs this loop on the same global arrays;
  # metrics are replicated so every process reads them, but only process 0 reports/writes.
  primary = jax.process_index() == 0

  bar = None
  if progress and primary:
    from tqdm.auto import tqdm
    bar = tqdm(total=rounds, initial=min(start, rounds), desc=algorithm.name, leave=False)
  t0 = time.perf_counter()
  compile_s = None

  def record(r, metrics, ev):
    """Reads round ``r``'s numbers to the host (waits for that round only)."""
    nonlocal compile_s
    row = {"round": r + 1, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
    if compile_s is None:
      compile_s = time.perf_counter() - t0
    if row["nonfinite_clients"] > 0 and nan_policy == "raise":
      raise NonFiniteUpdateError(
          f"Round {r + 1}: {int(row['nonfinite_clients'])} client(s) sent non-finite updates "
          "(they were excluded from the aggregate). Use nan_policy='drop' to continue.")
    if ev is not None:
      ev = jax.device_get(ev)
      row["test_accuracy"], row["test_loss"] = float(ev["accuracy"]), float(ev["loss"])
    if changes and r == start:
      row["config_changed"] = 1.0  # the fields are in summary["config_changes"]
    history.append(row)
    if bar is not None:
      bar.update(1)
      if "test_accuracy" in row:
        bar.set_postfix(acc=f"{row['test_accuracy']:.4f}", loss=f"{row['train_loss']:.3f}")

  # Round r + 1 is dispatched before round r's metrics are read: the devices run the next
  # round while the host converts numbers and draws the bar, instead of idling between
  # rounds (an idle multi-device CPU pays a thread wake-up at every hand-off of the next
  # round; BUILD.md "Performance notes"). The numbers are the same; a non-finite update under
  # nan_policy="raise" is reported one round's dispatch later.
  pending = None
  for r in range(start, rounds):
    state, metrics = rnd.step(state, dd, jax.random.fold_in(round_keys, r))
    ev = None
    if (eval_every and (r + 1) % eval_every == 0) or r + 1 == rounds:
      ev = evaluate(state.params, state.model_state, x_test, y_test)  # dispatched, not read
    if pending is not None:
      record(*pending)
    pending = (r, metrics, ev)
    if checkpoint_dir and ((checkpoint_every and (r + 1) % checkpoint_every == 0)
                           or r + 1 == rounds):
      record(*pending)
      pending = None
      # to_host, not device_get: client-sharded leaves span processes in multi-process runs
      jckpt.save(checkpoint_dir, jshard.to_host(state), history, r + 1, fp)
  if pending is not None:
    record(*pending)
  if bar is not None:
    bar.close()
  total_s = time.perf_counter() - t0
  summary = summarize(history, algorithm.name, data.name)
  summary.update(seconds=total_s, compile_seconds=compile_s, devices=len(devices),
                 seed=seed, clients_per_round=clients_per_round, num_clients=data.num_clients)
  if changes:
    summary["config_changes"] = [{"round": start, "fields": changes}]
  if output_dir and primary:
    write_outputs(output_dir, history, summary, plot)
  return SimulationResult(history, state, summary)


# Built rounds of recent runs, so running the same algorithm and model objects again in one
# process (a notebook re-running a cell, a seed loop) reuses the compiled round instead of
# tracing and compiling it anew. Entries hold the objects themselves, so their ids are not
# reused while cached; the oldest entry is dropped beyond _BUILT_MAX.
_BUILT: dict[tuple, tuple] = {}
_BUILT_MAX = 4


def _built_round(algorithm, model, devices, **options):
  key = (id(algorithm), id(model), tuple(devices), tuple(sorted(options.items())))
  hit = _BUILT.get(key)
  if hit is not None and hit[0] is algorithm and hit[1] is model:
    return hit[2], hit[3]
  mesh = jshard.client_mesh(devices) if len(devices) > 1 else None
  rnd = build_round(algorithm, model, mesh=mesh, **options)
  evaluate = make_evaluate(model)
  _BUILT[key] = (algorithm, model, rnd, evaluate)
  while len(_BUILT) > _BUILT_MAX:
    del _BUILT[next(iter(_BUILT))]
  return rnd, evaluate


def summarize(history: list[dict], method: str = "", dataset: str = "") -> dict:
  """Final/best accuracy, relative uplink cost and byte totals of a history."""
  accs = [h["test_accuracy"] for h in history if "test_accuracy" in h]
  return {
      "method": method, "dataset": dataset, "rounds": len(history),
      "final_acc": accs[-1] if accs else None, "best_acc": max(accs) if accs else None,
      "final_train_loss": history[-1]["train_loss"] if history else None,
      "rel_uplink_cost": comm.relative_uplink_cost(history),
      "uplink_bytes": float(sum(h["uplink_bytes"] for h in history)),
      "downlink_bytes": float(sum(h["downlink_bytes"] for h in history)),
      "nonfinite_clients": float(sum(h["nonfinite_clients"] for h in history)),
  }


def write_outputs(output_dir: str, history: list[dict], summary: dict, plot: bool = False) -> None:
  """Writes history (JSON + CSV), summary JSON and optionally an accuracy plot."""
  os.makedirs(output_dir, exist_ok=True)
  write_json(os.path.join(output_dir, "history.json"), history)
  keys = sorted({k for h in history for k in h}, key=lambda k: (k != "round", k))
  with open(os.path.join(output_dir, "history.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
  write_json(os.path.join(output_dir, "summary.json"), summary)
  if plot:
    plot_histories({summary.get("method", "run"): history},
                   os.path.join(output_dir, "accuracy.png"))


def plot_histories(histories: dict[str, list[dict]], path: str, x: str = "round") -> None:
  """Test accuracy vs ``x`` (``"round"`` or ``"uplink_bytes"`` cumulative) per method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for name, hist in histories.items():
    pts = [(h["round"], h["test_accuracy"]) for h in hist if "test_accuracy" in h]
    if x == "uplink_bytes":
      cum = np.cumsum([h["uplink_bytes"] for h in hist])
      pts = [(cum[h["round"] - 1] / 1e6, h["test_accuracy"]) for h in hist
             if "test_accuracy" in h]
    if pts:
      xs, ys = zip(*pts)
      ax.plot(xs, ys, label=name)
  ax.set_xlabel("uplink MB" if x == "uplink_bytes" else "round")
  ax.set_ylabel("test accuracy")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


__all__ = ["NonFiniteUpdateError", "ServerState", "SimulationResult", "plot_histories",
           "simulate", "summarize", "write_outputs"]
