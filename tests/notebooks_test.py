"""The notebooks run top to bottom in a fresh kernel of this interpreter, without a cell error.

Re-execute and save them with their outputs (for committing)::

    python tests/notebooks_test.py --write

Execute one without touching notebooks/ (the GPU check, experiments/gpu_notebook.sh)::

    python tests/notebooks_test.py --only quickstart.ipynb --out DIR
"""

import json
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "notebooks")
NAMES = ("quickstart.ipynb", "custom_method.ipynb")
TIMEOUT_S = 600  # per cell


def _kernel_manager(kernel_dir):
  """A ``python3`` kernel of this very interpreter (not whatever ``python3`` is on PATH or in
  a user's Jupyter kernels), with this interpreter's bin/ first on PATH."""
  from jupyter_client import KernelManager
  from jupyter_client.kernelspec import KernelSpecManager

  spec = os.path.join(kernel_dir, "python3")
  os.makedirs(spec, exist_ok=True)
  with open(os.path.join(spec, "kernel.json"), "w") as f:
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "Python 3", "language": "python",
               "env": {"PATH": os.path.dirname(sys.executable) + os.pathsep
                       + os.environ.get("PATH", "")}}, f)
  ksm = KernelSpecManager(kernel_dirs=[kernel_dir], ensure_native_kernel=False)
  return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def execute(name: str, kernel_dir: str):
  """Runs notebooks/<name> in a fresh kernel (cwd notebooks/); returns (notebook, seconds)."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  client = nbclient.NotebookClient(nb, km=_kernel_manager(kernel_dir), timeout=TIMEOUT_S,
                                   kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOKS}})
  t0 = time.perf_counter()
  client.execute()  # raises CellExecutionError on the first failing cell
  return nb, time.perf_counter() - t0


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_without_errors(name, tmp_path):
  nb, _ = execute(name, str(tmp_path))
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no inline plot"


if __name__ == "__main__":
  import argparse
  import tempfile

  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument("--write", action="store_true",
                     help="save the executed notebooks over notebooks/ (for committing)")
  where.add_argument("--out", metavar="DIR",
                     help="save the executed notebooks in DIR instead (e.g. a device's $OUT)")
  parser.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES),
                      help="the notebooks to run (default: all)")
  args = parser.parse_args()
  folder = NOTEBOOKS if args.write else args.out
  os.makedirs(folder, exist_ok=True)
  with tempfile.TemporaryDirectory() as kernels:
    for name in args.only:
      nb, seconds = execute(name, kernels)
      nbformat.write(nb, os.path.join(folder, name))
      size = os.path.getsize(os.path.join(folder, name)) / 1e3
      print(f"{name}: executed in {seconds:.0f} s, {size:.0f} KB written to {folder}")
