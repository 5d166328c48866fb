#!/usr/bin/env bash
# Lint: ruff (lint and format check, configured in pyproject.toml) over the Python files and
# clang-format (configured in .clang-format) over csrc/. Exits non-zero on any finding; nothing
# is rewritten. Installs the pinned tools from PyPI when they are missing or another version.
#   bash scripts/lint.sh           check
#   FIX=1 bash scripts/lint.sh     apply ruff's safe fixes and both formatters instead
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUFF_VERSION=0.17.5
CLANG_FORMAT_VERSION=23.1.3

version_of() { "$1" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n 1; }
if [ "$(version_of ruff)" != "$RUFF_VERSION" ] || [ "$(version_of clang-format)" != "$CLANG_FORMAT_VERSION" ]; then
  "$PY" -m pip install -q "ruff==$RUFF_VERSION" "clang-format==$CLANG_FORMAT_VERSION" || exit 1
fi

mapfile -t cxx < <(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh')
if [ "${FIX:-0}" = 1 ]; then
  ruff check --fix . && ruff format . && clang-format -i "${cxx[@]}"
  exit
fi
status=0
ruff check . || status=1
ruff format --check . || status=1
clang-format --dry-run -Werror "${cxx[@]}" || status=1
# The repository stands alone: no pointers to files outside it or to tracker issue numbers.
if git grep -nIiE "share[d]/|GLMI[X]\.md|ENVIRONMEN[T]\.md|issue[ -]?#?[0-9]"; then
  echo "lint: the lines above point outside the repository (write it in docs/ instead)" >&2
  status=1
fi
[ "$status" = 0 ] && echo "lint: clean" || echo "lint: findings above" >&2
exit "$status"
