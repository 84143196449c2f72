"""Strict, atomic JSON files: NaN/Inf become ``null``, a file is replaced whole or not at all."""

from __future__ import annotations

import json
import math
import os
from typing import Any


def json_safe(obj: Any) -> Any:
  """``obj`` with every non-finite float replaced by None (strict JSON has no NaN)."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return [json_safe(v) for v in obj]
  return obj


def write_json(path: str, obj: Any, indent: int | None = 1) -> None:
  """Writes strict JSON to ``path`` through a temporary file and ``os.replace``, so a reader
  (or a resume after a kill) never sees a truncated file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(json_safe(obj), f, indent=indent, allow_nan=False)
  os.replace(tmp, path)
