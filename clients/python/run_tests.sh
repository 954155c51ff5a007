#!/usr/bin/env bash
# Runs the Python client's tests against the real server binary (see tests/test_client.py).
#
#   clients/python/run_tests.sh [pytest args...]
#
# Creates (or reuses) clients/python/.venv, installs the package with its test dependencies and
# runs pytest; the exit code is pytest's. Environment:
#   PYTHON                  interpreter for a new venv (default: python3)
#   ACTWATCH_BIN            server binary (default: target/debug/actwatch; build it with `cargo build`)
#   ACTWATCH_REQUIRE_SERVER=1  fail instead of skipping when the binary is missing or has no `serve`
#   ACTWATCH_WITH_TORCH=1   also install torch (large) so the hook tests run; otherwise they run only
#                           if torch is already in the venv
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"

if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv" || exit 1
fi
py="$venv/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

extras="test"
[ "${ACTWATCH_WITH_TORCH:-0}" = "1" ] && extras="test,torch"
"$py" -m pip install --quiet "$here[$extras]" || exit 1

cd "$here"
"$py" -m pytest "$@"
exit $?
