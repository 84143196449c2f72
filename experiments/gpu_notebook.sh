#!/usr/bin/env bash
# Issue 19's GPU check: notebooks/quickstart.ipynb, unchanged, executed in a Jupyter kernel on
# the device (the same runner as tests/notebooks_test.py), its executed copy saved to $OUT.
#
# The device image has jax (CUDA), flax, optax, chex, orbax, scikit-learn, tqdm and matplotlib,
# but no Jupyter (nbclient, nbformat, ipykernel and what they need), and the device reaches no
# package index. So the Jupyter packages travel as wheels in .whl/ (git-ignored), for the
# image's Python 3.12:
#
#   bash experiments/gpu_notebook.sh download     # here, once per machine (~15 MB from PyPI)
#   device run:  command "OUT=\$OUT bash experiments/gpu_notebook.sh"  carry [".whl"]
#
# The wheel set is closed under its requirements given the image's packages (KINDS.md,
# 2026-11-17); appnope (macOS only) is the one requirement left out.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_notebook}
WHEELS=(
  asttokens==3.0.2 comm==0.2.3 debugpy==1.8.22 decorator==5.3.2 executing==2.3.0
  fastjsonschema==2.22.3 ipykernel==7.4.0 ipython==9.19.1 ipython_pygments_lexers==1.1.1
  jedi==0.20.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 jupyter_client==8.10.0
  jupyter_core==5.9.1 matplotlib-inline==0.2.2 nbclient==0.11.0 nbformat==5.11.1
  nest-asyncio2==1.7.4 parso==0.8.7 pexpect==4.9.0 platformdirs==4.14.9 prompt_toolkit==3.0.53
  ptyprocess==0.7.0 pure_eval==0.2.4 pyzmq==27.3.0 referencing==0.37.0 rpds-py==2026.9.1
  stack-data==0.6.3 tornado==6.6.1 traitlets==5.16.1 wcwidth==0.9.5
)

if [[ "${1:-}" == "download" ]]; then
  PY=${PYTHON_VERSION:-3.12}
  rm -rf .whl && mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
  echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ for Python $PY"
  exit 0
fi

export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if ! python3 -c "import nbclient, nbformat, ipykernel" 2>/dev/null; then
  [[ -d .whl ]] || { echo "no Jupyter here and no .whl/: run 'bash $0 download' and carry .whl" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/jupyter-site .whl/*.whl
  export PYTHONPATH=/tmp/jupyter-site${PYTHONPATH:+:$PYTHONPATH}
fi
# jaxfl from this working tree, unchanged (the notebook's install cell then finds it); the
# kernel inherits PYTHONPATH.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import jax, jaxfl, nbclient, ipykernel; print('jax', jax.__version__, jax.devices())"
python3 tests/notebooks_test.py --only quickstart.ipynb --out "$OUT"
# What the notebook's device cell printed (on a GPU runtime: backend gpu, one CudaDevice).
python3 - "$OUT/quickstart.ipynb" <<'EOF'
import json, sys
nb = json.load(open(sys.argv[1]))
for cell in nb["cells"]:
  for out in cell.get("outputs", []):
    text = "".join(out.get("text", ""))
    if "backend:" in text or "client mesh:" in text:
      print(text.rstrip())
EOF
