#!/usr/bin/env bash
# Static checks of the Python client: lint, format, types and the committed generated stubs.
#
#   clients/python/scripts/check.sh
#
# Creates (or reuses) clients/python/.venv, installs the package with its `lint` extra (exact pins,
# from PyPI) and runs, continuing past failures so that one run shows them all:
#   1. ruff check              lint (rules in pyproject.toml; the generated _proto/ is excluded)
#   2. ruff format --check     formatting (nothing is rewritten; `ruff format` fixes it)
#   3. mypy                    --strict on actwatch_client (errors in the generated _proto/ ignored)
#                              and on tests/typing_check.py (the public API as callers use it)
#   4. stubs                   scripts/gen_stubs.sh, run on a temporary copy with the pinned
#                              grpcio-tools, must reproduce actwatch_client/_proto/ byte for byte
# Exits non-zero if any check fails. Environment: PYTHON, interpreter for a new venv (default python3).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$here/.venv"

if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv" || exit 1
fi
py="$venv/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$py" -m pip install --quiet "$here[lint]" || exit 1

cd "$here"
failed=()

step() {
  local name="$1"
  shift
  echo "== $name"
  if "$@"; then
    echo "   ok"
  else
    echo "   FAILED: $name"
    failed+=("$name")
  fi
}

check_stubs() {
  local tmp status
  tmp="$(mktemp -d)" || return 1
  # gen_stubs.sh finds the proto at ../../proto from clients/python: mirror that layout.
  mkdir -p "$tmp/clients/python" &&
    cp -R "$here/actwatch_client" "$here/scripts" "$tmp/clients/python/" &&
    ln -s "$repo/proto" "$tmp/proto" &&
    PYTHON="$py" bash "$tmp/clients/python/scripts/gen_stubs.sh" &&
    diff -r -x __pycache__ "$here/actwatch_client/_proto" "$tmp/clients/python/actwatch_client/_proto"
  status=$?
  rm -rf "$tmp"
  if [ "$status" -ne 0 ]; then
    echo "   the committed stubs differ from what scripts/gen_stubs.sh generates from proto/ with"
    echo "   grpcio-tools $("$py" -c 'from importlib.metadata import version; print(version("grpcio-tools"))')"
    echo "   (the lint extra's pin): regenerate them with scripts/gen_stubs.sh and commit the result"
  fi
  return "$status"
}

step "ruff check" "$venv/bin/ruff" check .
step "ruff format --check" "$venv/bin/ruff" format --check .
step "mypy --strict" "$venv/bin/mypy"
step "generated stubs up to date" check_stubs

if [ "${#failed[@]}" -ne 0 ]; then
  echo "check.sh: ${#failed[@]} failed: ${failed[*]}"
  exit 1
fi
echo "check.sh: all checks passed"
