#!/usr/bin/env bash
# Benchmarks the actwatch gRPC service (release build) against Arrow Flight on loopback; prints one
# table (see scripts/bench_service.py for what is measured).
#
#   scripts/bench_service.sh [bench_service.py args...]     e.g. --quick, --reps 5
#   scripts/bench_service.sh --linger-ab [ROUNDS]            scripts/bench_linger.py instead: the
#                                                            compute linger's A/B on latency
#   scripts/bench_service.sh --ingest-ab A_BIN B_BIN [ROUNDS]
#                                                            scripts/bench_ingest_ab.py instead: two
#                                                            server binaries' ingest, interleaved
#
# Builds target/release/actwatch, then creates (or reuses) the Python client's venv
# clients/python/.venv with the client and its test extra (grpcio, protobuf, numpy, pyarrow), the
# same venv clients/python/run_tests.sh uses. Environment:
#   PYTHON        interpreter for a new venv (default: python3)
#   ACTWATCH_BIN  use this server binary instead of building target/release/actwatch
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bin="${ACTWATCH_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release --bin actwatch
  bin="$root/target/release/actwatch"
fi

venv="$root/clients/python/.venv"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$venv/bin/python" -c 'import grpc, google.protobuf, numpy, pyarrow.flight, actwatch_client' 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet "$root/clients/python[test]"
fi

if [ "${1:-}" = "--ingest-ab" ]; then
  shift
  exec "$venv/bin/python" "$root/scripts/bench_ingest_ab.py" "$@"
fi
if [ "${1:-}" = "--linger-ab" ]; then
  shift
  ACTWATCH_BIN="$bin" exec "$venv/bin/python" "$root/scripts/bench_linger.py" "$@"
fi
exec "$venv/bin/python" "$root/scripts/bench_service.py" --bin "$bin" "$@"
