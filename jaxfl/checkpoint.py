"""Exact, fingerprinted, locked checkpoint/resume of a run.

A checkpoint is ``{directory}/round_{N:06d}`` (the server state, written by orbax, which
itself writes to a temporary directory and renames) plus ``round_{N:06d}.history.json``
(the history so far and the run's configuration fingerprint), written atomically *after*
the state. The JSON file is the commit mark: a state directory without it (a save killed
half-way) is not a checkpoint. Round keys are derived from (seed, round), so a restored run
continues bit for bit like an uninterrupted one.

:func:`restore_latest` falls back from a corrupt newest checkpoint (truncated or zeroed
files, a stray empty ``round_*`` directory, an unreadable history) to the newest intact one,
with a warning naming what it skipped. :func:`fingerprint` and :func:`check_fingerprint`
refuse to resume a run with another configuration; :func:`lock` keeps two runs out of one
directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxfl._jsonio import json_safe, write_json


class DirectoryInUseError(RuntimeError):
  """Another live run holds the directory's lock."""


_NAME = re.compile(r"round_(\d+)")
LOCK_FILE = ".jaxfl.lock"


def _checkpointer():
  import orbax.checkpoint as ocp

  return ocp.StandardCheckpointer()


def save(directory: str, state, history: list[dict], round_index: int,
         fingerprint: dict | None = None) -> str:
  """Writes ``{directory}/round_{round_index:06d}`` (state), then its history JSON."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"round_{round_index:06d}")
  ckpt = _checkpointer()
  ckpt.save(path, jax.tree.map(np.asarray, state), force=True)
  ckpt.wait_until_finished()
  if jax.process_index() == 0:  # multi-process: orbax coordinates the save, one writes history
    write_json(path + ".history.json", {"fingerprint": fingerprint, "history": history},
               indent=None)
  return path


def _candidates(directory: str) -> tuple[list[tuple[int, str]], list[str]]:
  """Committed-looking checkpoints, newest first, and the ``round_*`` entries that are not."""
  found, odd = [], []
  for name in os.listdir(directory):
    if not name.startswith("round_") or "." in name:  # history files, orbax temporaries
      continue
    m = _NAME.fullmatch(name)
    path = os.path.join(directory, name)
    if m is None:
      odd.append(f"{name} (not a round number)")
    elif not os.path.exists(path + ".history.json"):
      odd.append(f"{name} (uncommitted: no history file)")
    else:
      found.append((int(m.group(1)), path))
  return sorted(found, reverse=True), odd


def latest(directory: str) -> tuple[str, int] | None:
  """The newest committed checkpoint in ``directory`` as (path, round), or None (not
  checked for corruption; :func:`restore_latest` does that)."""
  if not os.path.isdir(directory):
    return None
  found, _ = _candidates(os.path.abspath(directory))
  return (found[0][1], found[0][0]) if found else None


def _read_history(path: str) -> tuple[list[dict], dict | None]:
  with open(path + ".history.json") as f:
    saved = json.load(f)
  if isinstance(saved, list):  # written before fingerprints existed
    return saved, None
  if not isinstance(saved, dict) or not isinstance(saved.get("history"), list):
    raise ValueError("history file has no 'history' list")
  return saved["history"], saved.get("fingerprint")


def restore(path: str, like) -> tuple[object, list[dict]]:
  """Restores a state with the structure/dtypes of ``like`` and its history."""
  history, _ = _read_history(path)
  return _restore_state(path, like), history


def _restore_state(path: str, like):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)
  state = _checkpointer().restore(path, abstract)
  state = jax.tree.map(lambda a, b: np.asarray(a, dtype=np.asarray(b).dtype), state, like)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(like), strict=True):
    if got.shape != np.shape(want):  # orbax restores what is on disk
      raise ValueError(f"stored shape {got.shape} != expected {np.shape(want)}")
  return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(state))


def restore_latest(directory: str, like, accept: Callable | None = None
                   ) -> tuple[Any, list[dict], int, dict | None] | None:
  """Restores the newest intact checkpoint in ``directory``.

  Tries committed checkpoints newest first; one whose history or state cannot be read is
  skipped, and a single warning names every skipped entry and why.

  Args:
    directory: the checkpoint directory.
    like: a state with the expected structure, shapes and dtypes.
    accept: optional ``accept(fingerprint, history, round)`` called before the state is read;
      what it raises (a configuration mismatch) propagates: it is not corruption.

  Returns:
    ``(state, history, round, fingerprint)`` or None when there is no intact checkpoint.
  """
  if not os.path.isdir(directory):
    return None
  directory = os.path.abspath(directory)
  found, skipped = _candidates(directory)
  result = None
  for r, path in found:
    try:
      history, fp = _read_history(path)
      if len(history) != r:
        raise ValueError(f"history has {len(history)} rounds, expected {r}")
    except (OSError, ValueError) as e:
      skipped.append(f"{os.path.basename(path)} ({type(e).__name__}: {str(e)[:120]})")
      continue
    if accept is not None:
      accept(fp, history, r)
    try:
      result = (_restore_state(path, like), history, r, fp)
      break
    except Exception as e:  # noqa: BLE001 -- orbax raises many kinds on damaged files
      skipped.append(f"{os.path.basename(path)} ({type(e).__name__}: {str(e)[:120]})")
  if skipped:
    where = f"resuming from round {result[2]}" if result else "starting from scratch"
    warnings.warn(f"jaxfl: checkpoint_dir {directory!r}: skipped {'; '.join(sorted(skipped))}; "
                  f"{where}.", stacklevel=2)
  return result


# ----------------------------------------------------------------------------- fingerprint


def _digest(*parts) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(p if isinstance(p, bytes) else repr(p).encode())
  return h.hexdigest()[:16]


def _shapes(tree) -> str:
  leaves, treedef = jax.tree.flatten(tree)
  return _digest(str(treedef), [(np.shape(x), str(np.asarray(x).dtype)) for x in leaves])


def fingerprint(algorithm, data, state, *, seed: int, clients_per_round: int,
                nan_policy: str, dropout_rate: float) -> dict:
  """What must not change when a run resumes: the algorithm (name, the preset's
  hyperparameters, local training, contracts), the traced hyperparameter values
  (``state.hyperparams``), the model and server-state shapes, the data and its partition
  (hashes), the seed and the cohort. JSON-safe; compared field by field.
  """
  local = algorithm.local
  idx = np.ascontiguousarray(data.client_indices)
  traced = {}
  if getattr(state, "hyperparams", None) is not None:  # absent otherwise: old fingerprints match
    traced["traced_hyperparameters"] = {side: {k: float(v) for k, v in vals.items()}
                                        for side, vals in state.hyperparams.items()}
  return json_safe({
      "algorithm": algorithm.name,
      "hyperparameters": dict(algorithm.config) if algorithm.config is not None else None,
      "local": {"batch_size": local.batch_size, "local_steps": local.local_steps,
                "local_epochs": local.local_epochs},
      "weighting": algorithm.weighting,
      "sampler": getattr(algorithm.sampler.select, "__qualname__", "?"),
      "model": {"params": int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
                "shapes": _shapes(state.params)},
      "server_state": _shapes(state),
      "data": {"name": data.name, "num_clients": data.num_clients,
               "partition": _digest(idx.tobytes(), np.asarray(data.client_sizes).tobytes()),
               "labels": _digest(np.asarray(data.y).tobytes(), np.shape(data.x))},
      "seed": int(seed), "clients_per_round": int(clients_per_round),
      "nan_policy": nan_policy, "dropout_rate": float(dropout_rate),
      **traced,
  })


def _flat(d, prefix=""):
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(saved: dict | None, now: dict) -> list[str]:
  """``"field: saved -> now"`` for every field that differs (empty when equal)."""
  a, b = _flat(saved), _flat(now)
  return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


# ----------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


@contextlib.contextmanager
def lock(directory: str, name: str = "directory"):
  """Holds ``{directory}/.jaxfl.lock`` (owner pid, host, time) for the block.

  A lock held by a live process refuses with a :class:`DirectoryInUseError` naming the owner; a lock
  left by a dead process on this host is taken over with a warning. Locks from other hosts
  cannot be checked and are refused (delete the file if that run is gone).
  """
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(os.path.abspath(directory), LOCK_FILE)
  me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        with open(path) as f:
          owner = json.load(f)
      except (OSError, ValueError):
        owner = {}
      pid, host = owner.get("pid"), owner.get("host")
      if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
        warnings.warn(f"jaxfl: removing the stale lock of dead process {pid} in {directory!r}.",
                      stacklevel=3)
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        continue
      raise DirectoryInUseError(
          f"`{name}`={directory!r} is in use by another run (pid {pid} on host {host}, lock "
          f"{path}). Wait for it, use another directory, or delete the lock file if that run "
          "is gone.") from None
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    break
  else:
    raise RuntimeError(f"`{name}`={directory!r}: could not take the lock {path}.")
  try:
    yield path
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
