#!/usr/bin/env bash
# Everything a fresh machine needs, for the main job, the tests and CI alike:
#   torch  - kept when already installed; otherwise the CUDA build where a GPU is visible and the
#            CPU wheel (torch==2.13.0) elsewhere, since a plain `pip install torch` pulls 2.8 GB of CUDA.
#   triton - with a GPU torch brings its own; on a CPU machine the kernels run under its interpreter.
#   the package itself, editable, with its C++ extension (CUDA sources only where torch has CUDA),
#            and the extras the tests use: timm (with the torchvision release made for this torch),
#            onnx, onnxruntime and onnxscript.
# Versions: docs/building.md#versions (Python >= 3.10, as in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "install.sh: Python 3.10 or newer needed" >&2; exit 1; }

have() { "$PY" -c "import $1" >/dev/null 2>&1; }
gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if ! have torch; then
  if gpu; then "$PY" -m pip install -q torch; else "$PY" -m pip install -q torch==2.13.0; fi
fi
have triton || "$PY" -m pip install -q triton==3.9.0
# numpy: the Triton interpreter needs it without declaring it. setuptools/wheel/ninja/pybind11: the
# extension is built against the installed torch, so without build isolation.
"$PY" -m pip install -q numpy setuptools wheel ninja pybind11
# timm imports torchvision. A plain `pip install timm` would take the newest torchvision, which
# requires the newest torch and would replace this one (on a CPU machine with a 2.8 GB CUDA build),
# so the torchvision made for this torch release is pinned first. PyPI's torchvision is a CUDA build:
# beside a CPU torch its compiled ops do not load, which timm does not need (see models/_timm.py).
TORCHVISION=$("$PY" -c "import torch; v = '.'.join(torch.__version__.split('.')[:2]); \
print({'2.12': '0.27.1', '2.13': '0.28.0', '2.14': '0.29.1'}.get(v, ''))")
EXTRAS=test,plot,export
if [ -n "$TORCHVISION" ]; then
  "$PY" -m pip install -q "torchvision==$TORCHVISION"
  EXTRAS=$EXTRAS,timm
else
  echo "install.sh: no torchvision release known for this torch; timm is left out (its tests skip)" >&2
fi
"$PY" -m pip install -q --no-build-isolation -e ".[$EXTRAS]"
"$PY" -c "import glmix_kernels as g; print('glmix_kernels', g.__version__, '| backends on cpu:', g.available_backends('cpu'))"
