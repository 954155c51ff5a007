#!/usr/bin/env bash
# Load time of a saved kNN (HNSW) monitor with its graph kept vs rebuilt:
#   scripts/bench_hnsw_load.sh [ROWS]      (default 200,000 traces x 384 at one site)
# Fits `knn:exact_max=0` on a generated archive (three quarters of the rows become references), then
# scores 200 rows three times with the graph the monitor keeps and three times with the manifest's
# `index` entry removed (the graph rebuilt at load, as before graphs were kept).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p actwatch --bin actwatch --example gen_archive
ROWS=${1:-200000}
D=target/bench-archive
mkdir -p $D
BIN=target/release/actwatch
GEN=target/release/examples/gen_archive
[[ -f $D/hnsw-ref-$ROWS.parquet ]] || $GEN $D/hnsw-ref-$ROWS.parquet $ROWS 384 1 11
[[ -f $D/small.parquet ]] || $GEN $D/small.parquet 200 384 1 5
rm -rf $D/hnsw-monitor
/usr/bin/time -f "fit %e s, peak RSS %M KiB" $BIN fit --input $D/hnsw-ref-$ROWS.parquet --out $D/hnsw-monitor --detectors knn:exact_max=0 2>&1 | tail -2
ls -la $D/hnsw-monitor
for i in 1 2 3; do /usr/bin/time -f "score with kept graph: %e s" $BIN score --monitor $D/hnsw-monitor --input $D/small.parquet --output $D/scores-small.parquet 2>&1 | tail -1; done
cp $D/hnsw-monitor/manifest.json $D/manifest.keep
python3 - $D/hnsw-monitor/manifest.json <<'PY'
import json, sys
p = sys.argv[1]; m = json.load(open(p))
for s in m["sites"]: s.pop("index", None)
json.dump(m, open(p, "w"), indent=2)
PY
for i in 1 2 3; do /usr/bin/time -f "score with graph rebuilt: %e s" $BIN score --monitor $D/hnsw-monitor --input $D/small.parquet --output $D/scores-small.parquet 2>&1 | tail -1; done
cp $D/manifest.keep $D/hnsw-monitor/manifest.json
