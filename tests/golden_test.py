"""The engine reproduces, bit for bit, the final states recorded before it became stages.

``tests/golden/*.npz`` hold, for every algorithm preset, the final global params and per-round
metrics of a short seeded digits run (``tests/golden/record.py``), recorded with the engine
of commit 87ff161 (a monolithic ``build_round`` with per-algorithm flags). The rewrite as
stages over the sampler / view / memory / aggregator contracts keeps every summation order,
so equality is exact on the recording host (``tests/golden/record.py`` explains the tolerance
on other CPUs); a deliberate numerics change must re-record the files and say why.
"""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


sys.path.insert(0, os.path.join(HERE, "golden"))
from record import TWO_DEVICE_PATHS, presets  # noqa: E402


@pytest.mark.parametrize("devices", [1, 2])
def test_every_preset_reproduces_its_golden_final_state(devices):
  """Every preset on 1 device; on 2 devices the presets with a device path of their own
  (``record.TWO_DEVICE_PATHS``: the others differ only on the replicated server side)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  only = [] if devices == 1 else ["--only", *TWO_DEVICE_PATHS]
  proc = subprocess.run([sys.executable, os.path.join(HERE, "golden", "record.py"),
                         "--devices", str(devices), *only], env=env, capture_output=True,
                        text=True, timeout=1200)
  lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  want = len(presets()) if devices == 1 else len(TWO_DEVICE_PATHS)
  assert len(presets()) >= 26 and len(TWO_DEVICE_PATHS) >= 9
  assert set(TWO_DEVICE_PATHS) <= set(presets())
  # bit-identical on the recording host; within record.CROSS_HOST_RTOL on another CPU
  assert len(lines) == want and all(ln.split()[1] in ("identical", "close:") for ln in lines), (
      proc.stdout)
