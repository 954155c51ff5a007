#!/usr/bin/env bash
# Side-by-side benchmark: actwatch against its peers (numpy/scikit-learn, faiss, hnswlib) on the
# same bytes.
#
#   scripts/bench.sh [--quick] [--threads N] [--skip-peers] [--skip-rust]
#
# 1. creates or reuses the venv .venv-bench (gitignored) with the peer packages;
# 2. scripts/bench_peers.py writes the input matrices to target/bench-data/ and times the peers
#    -> target/bench-results/peers.jsonl (human table on stderr);
# 3. cargo run --release -p actwatch --example bench -- target/bench-data
#    -> target/bench-results/actwatch.jsonl;
# 4. scripts/bench_table.py joins both into target/bench-results/table.md (also printed).
#
# Run it on a quiet machine: builds or other jobs running alongside distort every figure.
# --skip-peers reuses the matrices and peers.jsonl already there (e.g. while iterating on Rust).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv-bench
DATA=target/bench-data
RESULTS=target/bench-results
QUICK=()
SKIP_PEERS=0
SKIP_RUST=0
THREADS=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)

while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=(--quick) ;;
    --threads) THREADS="$2"; shift ;;
    --threads=*) THREADS="${1#*=}" ;;
    --skip-peers) SKIP_PEERS=1 ;;
    --skip-rust) SKIP_RUST=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS
export RAYON_NUM_THREADS=$THREADS
mkdir -p "$DATA" "$RESULTS"

# 1. venv
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "== creating $VENV" >&2
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import numpy, pyarrow, sklearn, faiss, hnswlib" 2>/dev/null; then
  echo "== installing peer packages into $VENV" >&2
  "$VENV/bin/pip" install -q numpy pyarrow scikit-learn faiss-cpu hnswlib
fi

# Build the Rust side first, so a compile error shows before minutes of peer timings and the
# compiler does not run alongside them.
RUST_OK=0
if [[ $SKIP_RUST -eq 0 ]]; then
  echo "== building actwatch bench example (release)" >&2
  if cargo build --release -p actwatch --example bench; then
    RUST_OK=1
  else
    echo "bench.sh: warning: cargo build of the bench example failed; table will have peers only" >&2
  fi
fi

# 2. matrices + peers
if [[ $SKIP_PEERS -eq 0 ]]; then
  echo "== peers (threads=$THREADS) -> $RESULTS/peers.jsonl" >&2
  "$VENV/bin/python" scripts/bench_peers.py "$DATA" "${QUICK[@]}" --threads "$THREADS" \
    > "$RESULTS/peers.jsonl"
elif [[ ! -f "$DATA/fit.shape" ]]; then
  echo "== --skip-peers but no matrices in $DATA: writing them" >&2
  "$VENV/bin/python" scripts/bench_peers.py "$DATA" "${QUICK[@]}" --export-only
fi

# 3. actwatch
if [[ $RUST_OK -eq 1 ]]; then
  echo "== actwatch -> $RESULTS/actwatch.jsonl" >&2
  if ! cargo run -q --release -p actwatch --example bench -- "$DATA" > "$RESULTS/actwatch.jsonl"; then
    echo "bench.sh: warning: the actwatch bench example failed; its rows may be missing" >&2
  fi
elif [[ $SKIP_RUST -eq 0 || ! -f "$RESULTS/actwatch.jsonl" ]]; then
  : > "$RESULTS/actwatch.jsonl"   # --skip-rust keeps the rows of an earlier run
fi

# 4. table
"$VENV/bin/python" scripts/bench_table.py "$RESULTS/peers.jsonl" "$RESULTS/actwatch.jsonl" \
  | tee "$RESULTS/table.md"
