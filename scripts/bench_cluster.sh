#!/usr/bin/env bash
# Batch scoring beyond one process (issue 12): the engine in-process (Python bindings), on Ray Data and
# on Spark, against `actwatch score` in one process and a pyarrow + numpy scorer of the same model.
#
#   scripts/bench_cluster.sh [ROWS] [--runs actwatch,bindings,numpy,ray,spark]
#
# Generates (once, seeded) an archive of ROWS traces (default 1,000,000) x 384 floats at one site, as
# 8 files in row groups of 65,536 rows (so that Ray and Spark have blocks to spread), and a
# 60,000-trace reference, fits a Gaussian monitor on the reference (`--detectors gaussian --joint
# none`: the model the numpy scorer reimplements), builds the release binary and a release build of
# the extension into the cluster venv (scripts/setup_cluster.sh), then runs scripts/bench_cluster.py:
# one child process per run, rows/s, start-up, peak RSS of the driver and of the largest worker, and
# the engine runs' scores checked identical to `actwatch score`'s. Writes
# target/bench-cluster/{table.md,results.json}. Run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=1000000
RUNS=actwatch,bindings,numpy,ray,spark
while [[ $# -gt 0 ]]; do
  case "$1" in
    --runs) RUNS="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) ROWS="$1" ;;
  esac
  shift
done
DIR=target/bench-cluster
mkdir -p "$DIR"
cargo build -q --release -p actwatch --bin actwatch --example gen_archive
BIN=target/release/actwatch
GEN=target/release/examples/gen_archive
ARCHIVE=$DIR/archive-$ROWS
if [[ ! -f $ARCHIVE/_done ]]; then
  rm -rf "$ARCHIVE" && mkdir -p "$ARCHIVE"
  per=$(( (ROWS + 7) / 8 ))
  for i in 0 1 2 3 4 5 6 7; do
    n=$(( ROWS - i * per < per ? ROWS - i * per : per ))
    $GEN "$ARCHIVE/part-$i.parquet" "$n" 384 1 $(( 7 + i )) $(( i * per ))
  done
  touch "$ARCHIVE/_done"
fi
[[ -f $DIR/reference.parquet ]] || $GEN "$DIR/reference.parquet" 60000 384 1 11
rm -rf "$DIR/monitor"
$BIN fit --input "$DIR/reference.parquet" --out "$DIR/monitor" --detectors gaussian --joint none >/dev/null
cluster_env="$(scripts/setup_cluster.sh)"
eval "$cluster_env"
(cd crates/actwatch-py && VIRTUAL_ENV="$(dirname "$(dirname "$ACTWATCH_CLUSTER_PYTHON")")" \
  CARGO_TARGET_DIR="$PWD/../../target" "$(dirname "$ACTWATCH_CLUSTER_PYTHON")/maturin" develop --release --quiet)
"$ACTWATCH_CLUSTER_PYTHON" scripts/bench_cluster.py --bin "$BIN" --archive "$ARCHIVE" \
  --reference "$DIR/reference.parquet" --monitor "$DIR/monitor" --out "$DIR" --runs "$RUNS"
