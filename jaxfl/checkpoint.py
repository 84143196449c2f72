"""Exact checkpoint/resume of a run with orbax: server state (every transform's state) plus
the history so far. Round keys are derived from (seed, round), so a restored run continues
bit-for-bit like an uninterrupted one."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxfl._jsonio import write_json


def _checkpointer():
  import orbax.checkpoint as ocp

  return ocp.StandardCheckpointer()


def save(directory: str, state, history: list[dict], round_index: int) -> str:
  """Writes ``{directory}/round_{round_index:06d}`` (state) and its history JSON."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"round_{round_index:06d}")
  ckpt = _checkpointer()
  ckpt.save(path, jax.tree.map(np.asarray, state), force=True)
  ckpt.wait_until_finished()
  if jax.process_index() == 0:  # multi-process: orbax coordinates the save, one writes history
    write_json(path + ".history.json", history, indent=None)
  return path


def latest(directory: str) -> tuple[str, int] | None:
  """The newest complete checkpoint in ``directory`` as (path, round), or None."""
  if not os.path.isdir(directory):
    return None
  found = []
  for name in os.listdir(directory):
    if name.startswith("round_") and "." not in name:
      path = os.path.join(os.path.abspath(directory), name)
      if os.path.exists(path + ".history.json"):
        found.append((int(name[len("round_"):]), path))
  if not found:
    return None
  r, path = max(found)
  return path, r


def restore(path: str, like) -> tuple[object, list[dict]]:
  """Restores a state with the structure/dtypes of ``like`` and its history."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)
  state = _checkpointer().restore(path, abstract)
  state = jax.tree.map(lambda a, b: np.asarray(a, dtype=np.asarray(b).dtype), state, like)
  with open(path + ".history.json") as f:
    history = json.load(f)
  return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(state)), history
