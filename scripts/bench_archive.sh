#!/usr/bin/env bash
# Batch scoring of a large archive in bounded memory:
#   scripts/bench_archive.sh [ROWS] [DIM]      (defaults: 1,000,000 traces x 384 floats)
# Generates (once, seeded) a long-format archive of ROWS traces at 3 sites (ROWS/3 computations)
# and a 60,000-trace reference archive, fits the default monitor, then scores the archive at
# computation level and at trace level, printing wall time, traces/s and peak RSS of each run;
# then the same model in pyarrow + numpy (scripts/bench_archive_peer.py, in the .venv-bench venv
# scripts/bench.sh uses, created here if missing), fitted and scoring at computation level, and
# a summary with the ratios.
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
with open("target/bench-archive/summary.tsv", "a") as f:
    f.write(f"{wall:.3f}\t{peak:.0f}\n")
sys.exit(r.returncode)
PY
}
rm -f "$DIR/summary.tsv"
echo "== fit on 60,000 reference traces"
measure $BIN fit --input "$DIR/reference-$DIM.parquet" --out "$DIR/monitor" --calibration-fraction 0.25
echo "== score $ROWS traces, computation level"
measure $BIN score --monitor "$DIR/monitor" --input "$DIR/archive-$ROWS-$DIM.parquet" --output "$DIR/scores-computation.parquet"
echo "== score $ROWS traces, trace level"
measure $BIN score --monitor "$DIR/monitor" --input "$DIR/archive-$ROWS-$DIM.parquet" --output "$DIR/scores-trace.parquet" --level trace

VENV=.venv-bench
if [[ ! -x "$VENV/bin/python" ]]; then python3 -m venv "$VENV"; fi
"$VENV/bin/python" -c "import numpy, pyarrow, sklearn" 2>/dev/null \
  || "$VENV/bin/pip" install -q numpy pyarrow scikit-learn
echo "== peer (pyarrow + numpy): fit on the same 60,000 reference traces"
measure "$VENV/bin/python" scripts/bench_archive_peer.py fit "$DIR/reference-$DIM.parquet" "$DIR/peer-model.npz"
echo "== peer: score $ROWS traces, computation level"
measure "$VENV/bin/python" scripts/bench_archive_peer.py score "$DIR/peer-model.npz" \
  "$DIR/archive-$ROWS-$DIM.parquet" "$DIR/peer-scores.parquet"

# summary.tsv: wall and peak RSS of the five runs above, in order
python3 - "$ROWS" <<'PY'
import sys
rows = int(sys.argv[1])
runs = [l.split("\t") for l in open("target/bench-archive/summary.tsv").read().split("\n") if l]
(af, ar), (ac, acr), (at, atr), (pf, pr), (pc, pcr) = [(float(w), float(r)) for w, r in runs]
print()
print("| run | actwatch | pyarrow + numpy | speed actwatch/peer |")
print("|---|---:|---:|---:|")
print(f"| fit, 60,000 reference traces | {af:.1f} s, {ar:.0f} MiB | {pf:.1f} s, {pr:.0f} MiB | {pf / af:.2f}x |")
print(f"| score {rows:,} traces, computation level | {ac:.1f} s ({rows / ac / 1e3:.0f}k traces/s), "
      f"{acr:.0f} MiB | {pc:.1f} s ({rows / pc / 1e3:.0f}k traces/s), {pcr:.0f} MiB | {pc / ac:.2f}x |")
print(f"| score {rows:,} traces, trace level | {at:.1f} s, {atr:.0f} MiB | — | — |")
PY
