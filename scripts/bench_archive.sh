#!/usr/bin/env bash
# Batch scoring of a large archive in bounded memory:
#   scripts/bench_archive.sh [ROWS] [DIM]      (defaults: 1,000,000 traces x 384 floats)
# Generates (once, seeded) a long-format archive of ROWS traces at 3 sites (ROWS/3 computations)
# and a 60,000-trace reference archive, fits the default monitor, then scores the archive at
# computation level and at trace level, printing wall time, traces/s and peak RSS of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-1000000}
DIM=${2:-384}
DIR=target/bench-archive
mkdir -p "$DIR"
cargo build -q --release -p actwatch --bin actwatch --example gen_archive
BIN=target/release/actwatch
GEN=target/release/examples/gen_archive
[[ -f $DIR/archive-$ROWS-$DIM.parquet ]] || $GEN "$DIR/archive-$ROWS-$DIM.parquet" "$ROWS" "$DIM" 3 7
[[ -f $DIR/reference-$DIM.parquet ]] || $GEN "$DIR/reference-$DIM.parquet" 60000 "$DIM" 3 11
ls -l "$DIR"/*.parquet

# Peak RSS via getrusage of the child (no dependency on GNU time).
measure() {
  python3 - "$@" <<'PY'
import resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "")
print(f"  wall {wall:.1f} s, peak RSS {peak:.0f} MiB, exit {r.returncode}")
sys.exit(r.returncode)
PY
}
echo "== fit on 60,000 reference traces"
measure $BIN fit --input "$DIR/reference-$DIM.parquet" --out "$DIR/monitor" --calibration-fraction 0.25
echo "== score $ROWS traces, computation level"
measure $BIN score --monitor "$DIR/monitor" --input "$DIR/archive-$ROWS-$DIM.parquet" --output "$DIR/scores-computation.parquet"
echo "== score $ROWS traces, trace level"
measure $BIN score --monitor "$DIR/monitor" --input "$DIR/archive-$ROWS-$DIM.parquet" --output "$DIR/scores-trace.parquet" --level trace
