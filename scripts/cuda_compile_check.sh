#!/usr/bin/env bash
# CI step: compile and link the CUDA kernels (csrc/cuda/*.cu) on a machine without a GPU, against a
# pinned CUDA build of torch, and check that the built extension imports with its CUDA kernels
# registered. Exits non-zero when a source does not compile or link, or the module does not load.
#
#   - The CUDA torch lives in a virtual environment outside the clone, created once and reused:
#     ${GLMIX_CUDA_VENV:-$HOME/.cache/glmix-kernels/cuda-venv} (torch==2.15.0 from PyPI is the CUDA
#     build: ~2.8 GB, about a minute; reused while it holds that torch).
#   - The build is setup.py's build_ext into a temporary directory (nothing is written into the
#     clone), with GLMIX_FORCE_CUDA=1, sm_80 and sm_90 and the toolkit workaround of docs/building.md#cuda-toolkit:
#     the local CUDA 13.0 toolkit lacks headers torch includes (cuBLAS, cuSPARSE), so the pip
#     wheel's nvidia/cu13/include is searched after the compilers' own (GLMIX_EXTRA_INCLUDE).
#   - Calling a CUDA op needs a driver, so nothing runs the kernels here: the GPU tests do that.
#   - Resource report: every kernel of the built extension and of the tensor-core test kernels
#     (csrc/tests/mma_test.cu), per architecture: registers, spills (ptxas -v), stack, static
#     shared memory, blocks per SM, tensor-core instructions counted in the SASS (cuobjdump from
#     the toolkit, else the copy Triton bundles). Printed as a table; fails on any spill and on a
#     tensor-core kernel without HMMA (scripts/cuda_resource_report.py says which kernels).
#     `--report FILE` also writes it as JSON.
#   - Two architectures, sm_80 and sm_90, compile each kernel twice: measured 3.6 minutes of CPU
#     time for the whole check with MAX_JOBS=1 (11 minutes wall on a busy shared 2-core machine);
#     GLMIX_CUDA_ARCH=9.0 halves the device-code part.
#
# Usage: cuda_compile_check.sh [--report FILE]
# Knobs: GLMIX_CUDA_VENV, CUDA_HOME (default /usr/local/cuda), GLMIX_CUDA_ARCH (default "8.0;9.0"),
#        MAX_JOBS (default 2), GLMIX_KEEP_BUILD=1 (keep the temporary build directory).
set -euo pipefail
REPORT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --report) REPORT=$(realpath -m "$2"); shift 2 ;;
    *) echo "usage: $0 [--report FILE]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
ROOT=$(pwd)

TORCH_PIN=2.15.0
VENV=${GLMIX_CUDA_VENV:-$HOME/.cache/glmix-kernels/cuda-venv}
PY_BASE=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
ARCH=${GLMIX_CUDA_ARCH:-8.0;9.0}
start=$(date +%s)

say() { echo "cuda_compile_check: $*"; }
"$PY_BASE" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { say "Python 3.10 or newer needed" >&2; exit 1; }

if ! [ -x "$CUDA_HOME/bin/nvcc" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_HOME
  else
    say "no nvcc found (CUDA_HOME=$CUDA_HOME): cannot compile the CUDA sources" >&2
    exit 1
  fi
fi

# (a) the cached virtual environment with the pinned CUDA torch
venv_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH_PIN" <<'EOF' >/dev/null 2>&1
import sys, torch, ninja, setuptools, pybind11, numpy  # noqa: F401
assert torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda, torch.__version__
EOF
}
if venv_ok; then
  say "reusing $VENV"
else
  say "creating $VENV with torch==$TORCH_PIN (CUDA build; ~2.8 GB, a minute or two)"
  mkdir -p "$(dirname "$VENV")"
  [ -x "$VENV/bin/python" ] || "$PY_BASE" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_PIN" ninja setuptools wheel pybind11 numpy
  venv_ok || { say "the venv at $VENV does not hold a CUDA torch $TORCH_PIN" >&2; exit 1; }
fi
PY="$VENV/bin/python"
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
EXTRA_INC="$SITE/nvidia/cu13/include"
[ -d "$EXTRA_INC" ] || { say "missing $EXTRA_INC (the CUDA wheels' headers)" >&2; exit 1; }
say "torch $("$PY" -c 'import torch; print(torch.__version__)'), nvcc $("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), arch $ARCH, MAX_JOBS=$MAX_JOBS"

# (b) compile and link through setup.py, into a temporary directory
BUILD=$(mktemp -d "${TMPDIR:-/tmp}/glmix-cuda-build.XXXXXX")
if [ "${GLMIX_KEEP_BUILD:-0}" = 1 ]; then say "build directory kept: $BUILD"; else trap 'rm -rf "$BUILD"' EXIT; fi
ls csrc/cuda/*.cu >/dev/null 2>&1 || { say "no csrc/cuda/*.cu sources" >&2; exit 1; }

say "building glmix_kernels._C with the CUDA kernels ($(ls csrc/cuda/*.cu | tr '\n' ' '))"
# -Xptxas -v: the per-kernel spill figures of the resource report, from the build log
if ! env GLMIX_FORCE_CUDA=1 GLMIX_CUDA_ARCH="$ARCH" TORCH_CUDA_ARCH_LIST="$ARCH" \
    GLMIX_EXTRA_INCLUDE="$EXTRA_INC" PYTHONDONTWRITEBYTECODE=1 NVCC_APPEND_FLAGS="-Xptxas -v" \
    "$PY" setup.py -q build_ext --build-temp "$BUILD/temp" --build-lib "$BUILD/lib" \
    >"$BUILD/build.log" 2>&1; then
  # the compiler errors, without the flood of warnings from torch's headers
  grep -E "error|Error|FAILED|fatal" "$BUILD/build.log" | head -n 60 >&2 || true
  tail -n 40 "$BUILD/build.log" >&2
  say "FAILED: the CUDA build did not compile or link" >&2
  exit 1
fi

# the built module loads into the CUDA torch and registers CUDA kernels for the four ops
SO=$(ls "$BUILD"/lib/glmix_kernels/_C*.so 2>/dev/null | head -n 1)
[ -n "$SO" ] || { say "FAILED: no glmix_kernels/_C*.so was built" >&2; exit 1; }
cd "$BUILD/lib"  # glmix_kernels here holds only _C: import it as a namespace package, not the clone
if ! env -u PYTHONPATH "$PY" - <<'EOF'; then
import torch
import glmix_kernels._C  # noqa: F401  (registers torch.ops.glmix_kernels.*)
missing = [op for op in ("cluster_fwd", "cluster_bwd", "dispatch_fwd", "dispatch_bwd")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"glmix_kernels::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print("cuda_compile_check: glmix_kernels._C imports; CUDA kernels registered for the four ops")
EOF
  say "FAILED: the built extension does not import" >&2
  exit 1
fi
cd "$ROOT"

# (c) the resource report: the extension's kernels and the tensor-core test kernels
GENCODE=()
for a in ${ARCH//;/ }; do
  a=${a%+PTX}
  GENCODE+=(-gencode "arch=compute_${a/./},code=sm_${a/./}")
done
if ! "$CUDA_HOME/bin/nvcc" -std=c++17 -O3 -fatbin "${GENCODE[@]}" -Xptxas -v -o "$BUILD/mma_test.fatbin" \
    csrc/tests/mma_test.cu >>"$BUILD/build.log" 2>&1; then
  tail -n 40 "$BUILD/build.log" >&2
  say "FAILED: csrc/tests/mma_test.cu did not compile" >&2
  exit 1
fi
CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
[ -x "$CUOBJDUMP" ] || CUOBJDUMP="$SITE/triton/backends/nvidia/bin/cuobjdump"
[ -x "$CUOBJDUMP" ] || { say "FAILED: no cuobjdump (neither the toolkit's nor Triton's)" >&2; exit 1; }
say "resource report (static shared memory only: the dynamic part is chosen per launch)"
"$PY" scripts/cuda_resource_report.py --cuobjdump "$CUOBJDUMP" --ptxas-log "$BUILD/build.log" \
  ${REPORT:+--json "$REPORT"} "$SO" "$BUILD/mma_test.fatbin" || { say "FAILED: resource report" >&2; exit 1; }
say "OK in $(( $(date +%s) - start )) s"
