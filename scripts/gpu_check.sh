#!/usr/bin/env bash
# One command for a fresh GPU machine: install (CUDA extension for the local GPU only), record the
# machine, test on CUDA tensors, compute-sanitizer over the CUDA kernels, benchmark the ops at
# glnet_4g stages 1 and 3 against the HBM floor, and time a glnet_4g training step per backend.
#
#   bash scripts/gpu_check.sh OUT_DIR                 # on the GPU machine: about 8 minutes at most
#   bash scripts/gpu_check.sh --dry-run OUT_DIR       # the same steps on CPU tensors, tiny sizes
#   options: --time-limit SECONDS, --steps install,env,tests,sanitizer,bench,train, --full-tests
#
# Writes OUT_DIR/summary.json (each step's status), report.md, bench.json and logs.tar.gz, all
# rewritten after every step. A failing step is recorded and the next one runs. The steps and their
# time budgets are in glmix_kernels/bench/gpu_check.py; this script holds the total limit: past it
# (plus a grace period for the report) the run is stopped. Exit status 0 when no step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

usage() {
  echo "usage: bash scripts/gpu_check.sh [--dry-run] [--time-limit S] [--steps a,b] [--full-tests] OUT_DIR" >&2
  exit 2
}

args=() out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run|--full-tests) args+=("$1") ;;
    --time-limit|--steps) [ $# -ge 2 ] || usage; args+=("$1" "$2"); shift ;;
    -h|--help) usage ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage ;;
    *) [ -z "$out" ] || usage; out=$1 ;;
  esac
  shift
done
[ -n "$out" ] || usage
# The total limit these options give (the steps' budgets unless --time-limit says otherwise).
limit=$("$PY" -m glmix_kernels.bench.gpu_check limit ${args[@]+"${args[@]}"}) || exit 2
mkdir -p "$out" || exit 2
grace=30
echo "gpu_check: into $out, at most $limit s (+$grace s to stop)"

PYTHONUNBUFFERED=1 timeout --kill-after=10 $(( limit + grace )) \
  "$PY" -m glmix_kernels.bench.gpu_check run "$out" ${args[@]+"${args[@]}"} --time-limit "$limit"
rc=$?
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
  # The driver itself overran: say so in the summary it may not have finished.
  "$PY" - "$out/summary.json" "$rc" <<'PYEOF'
import json, sys
path, rc = sys.argv[1], int(sys.argv[2])
try:
    summary = json.load(open(path))
except (OSError, ValueError):
    summary = {"steps": {}}
summary.update(status="interrupted", reason=f"stopped by the total time limit (timeout exit {rc})")
json.dump(summary, open(path, "w"), indent=1)
PYEOF
fi
exit $rc
