"""Bit accounting of QSGD-quantised uploads (:func:`jaxfl.transforms.qsgd_quantize`).

Host-side arithmetic on the round's element ledger; re-exported by :mod:`jaxfl.comm`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from jaxfl import tree as jtree

__all__ = ["qsgd_bits_per_element", "qsgd_uplink_bytes"]


def qsgd_bits_per_element(levels: int) -> int:
  """Bits per element of a QSGD-quantised tensor: 1 sign bit + ``ceil(log2(levels + 1))``.

  Args:
    levels: quantiser levels :math:`s >= 1`.

  Returns:
    The number of bits as a Python int.

  Raises:
    ValueError: if ``levels`` is not an int >= 1.
  """
  if isinstance(levels, bool) or not isinstance(levels, int | np.integer) or levels < 1:
    raise ValueError(f"`levels` must be an int >= 1, got {levels!r}.")
  return 1 + math.ceil(math.log2(levels + 1))


def qsgd_uplink_bytes(uplink_elements: Any, params: Any, levels: int,
                      norm_bits: int = 32) -> float:
  """Bytes of a quantised run from the round's per-leaf element ledger.

  Args:
    uplink_elements: params-shaped tree of uploaded element counts (e.g. the final
      ``ServerState.uplink_elements``).
    params: the params (for the leaf sizes).
    levels: quantiser levels.
    norm_bits: bits of the per-tensor norm sent with every uploaded tensor.

  Returns:
    ``sum_l e_l * bits / 8 + (e_l / n_l) * norm_bits / 8``.
  """
  bits = qsgd_bits_per_element(levels)
  sizes = jtree.leaf_sizes(params)
  total = 0.0
  for e, n in zip(jax.tree.leaves(uplink_elements), jax.tree.leaves(sizes)):
    e = float(e)
    total += e * bits / 8.0 + (e / n) * norm_bits / 8.0
  return total
