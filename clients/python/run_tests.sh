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
#   ACTWATCH_TORCH_PYTHON   a python with torch (scripts/setup_torch.sh's venv exports it): its
#                           site-packages are appended to sys.path, after the venv's own, so the hook
#                           tests use that torch; nothing is installed into it. Same Python version.
#   ACTWATCH_REQUIRE_TORCH=1  fail instead of skipping the tests that need torch (marked `torch`;
#                           `run_tests.sh -m torch` runs just them)
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
if [ -n "${ACTWATCH_TORCH_PYTHON:-}" ]; then
  torch_site="$("$ACTWATCH_TORCH_PYTHON" -c '
import sys, sysconfig
print("%d.%d" % sys.version_info[:2], sysconfig.get_paths()["purelib"])')" || exit 1
  if [ "${torch_site%% *}" != "$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" ]; then
    echo "run_tests.sh: ACTWATCH_TORCH_PYTHON is Python ${torch_site%% *}, $venv is not: its torch cannot be used" >&2
    exit 1
  fi
  # `python -m pytest`, with the torch venv's site-packages (and its .pth files) after our own.
  "$py" -c 'import runpy, site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = "pytest"; runpy.run_module("pytest", run_name="__main__", alter_sys=True)' "${torch_site#* }" "$@"
  exit $?
fi
"$py" -m pytest "$@"
exit $?
