#!/usr/bin/env bash
# Long fuzzing runs with cargo-fuzz (libFuzzer, nightly): each target of fuzz/ for SECONDS seconds,
# starting from the seed corpus (small valid inputs written with the project's own writers, the
# same the seeded suites mutate: `cargo test -p actwatch-io --test fuzz write_corpus`). Installs
# cargo-fuzz when it is missing. See docs/fuzzing.md.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     (default: 60 seconds, every target)
#
# Prints, per target, the inputs executed and whether it crashed; a crash leaves its input in
# fuzz/artifacts/TARGET/ (replay: cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...)
# and makes the script exit 1. Logs: fuzz/logs/TARGET.log. The corpus grows in fuzz/corpus/TARGET
# across runs. Extra libFuzzer flags: FUZZ_FLAGS="-jobs=2 ..." scripts/fuzz.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(proto_requests proto_batch trace_reader monitor_artifact fit_frames)
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "cargo-fuzz needs the nightly toolchain: rustup toolchain install nightly" >&2
  exit 1
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# The seed corpus (rewritten every run: it is derived from the writers, and libFuzzer keeps what
# it found next to it).
ACTWATCH_FUZZ_CORPUS="$PWD/fuzz/corpus" cargo test -q -p actwatch-io --test fuzz write_corpus \
  -- --nocapture 2>&1 | grep -E '^wrote|error' || true
mkdir -p fuzz/corpus/proto_batch fuzz/logs

failed=0
summary=()
for t in "${targets[@]}"; do
  log="fuzz/logs/$t.log"
  # -malloc_limit_mb: one allocation over 1 GiB is a finding (no seed needs more than a few MB);
  # the harnesses also check a linear budget per input (actwatch_testkit::alloc).
  if cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -timeout=60 -rss_limit_mb=4096 -malloc_limit_mb=1024 \
      -print_final_stats=1 ${FUZZ_FLAGS:-} >"$log" 2>&1; then
    status="no crash"
  else
    status="CRASH (see $log and fuzz/artifacts/$t/)"
    failed=1
  fi
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  summary+=("$(printf '%-18s %12s executions in %ss: %s' "$t" "${execs:-?}" "$secs" "$status")")
done
printf '%s\n' "${summary[@]}"
exit "$failed"
