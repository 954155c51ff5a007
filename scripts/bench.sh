#!/usr/bin/env bash
# Side-by-side benchmark: actwatch against its peers (numpy/scikit-learn, faiss, hnswlib) on the
# same bytes.
#
#   scripts/bench.sh [--quick] [--threads N] [--big-refs N] [--knn-only] [--skip-peers]
#                    [--skip-rust] [--skip-service] [--no-docs]
#
# 1. creates or reuses the venv .venv-bench (gitignored) with the peer packages;
# 2. scripts/bench_peers.py writes the input matrices to target/bench-data/ and times the peers
#    -> target/bench-results/peers.jsonl (human table on stderr);
# 3. cargo run --release -p actwatch --example bench -- target/bench-data
#    -> target/bench-results/actwatch.jsonl;
# 4. scripts/bench_table.py joins both into target/bench-results/table.md (also printed), and
#    target/bench-results/results.json holds every row of both with the machine's description;
# 5. unless --skip-service: scripts/bench_service.sh (ingest against Arrow Flight, StreamScores
#    latency) -> target/bench-results/service.md;
# 6. unless --quick or --no-docs: docs/benchmarks.md (with --knn-only: docs/benchmarks-knn.md) is
#    rewritten (date, CPU, cores, command, tables).
#
# --big-refs N sets the size of the large kNN/HNSW reference set (default 100,000). Beyond 200,000
# each HNSW is built once, on all threads (queries still run on 1 and all).
# --knn-only times the exact kNN and HNSW cases alone, skips the service, and writes
# docs/benchmarks-knn.md instead of docs/benchmarks.md: `scripts/bench.sh --knn-only --big-refs
# 1000000` is the HNSW case at 1M references (25 to 35 minutes on 2 cores, most of it the builds).
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
SKIP_SERVICE=0
DOCS=1
BIG=()
KNN_ONLY=()
ARGS="$*"
THREADS=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)

while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=(--quick); DOCS=0 ;;
    --big-refs) BIG=(--big-refs "$2"); shift ;;
    --knn-only) KNN_ONLY=(--knn-only); SKIP_SERVICE=1 ;;
    --no-docs) DOCS=0 ;;
    --threads) THREADS="$2"; shift ;;
    --threads=*) THREADS="${1#*=}" ;;
    --skip-peers) SKIP_PEERS=1 ;;
    --skip-rust) SKIP_RUST=1 ;;
    --skip-service) SKIP_SERVICE=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
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
  "$VENV/bin/python" scripts/bench_peers.py "$DATA" "${QUICK[@]}" "${BIG[@]}" "${KNN_ONLY[@]}" \
    --threads "$THREADS" > "$RESULTS/peers.jsonl"
elif [[ ! -f "$DATA/fit.shape" ]]; then
  echo "== --skip-peers but no matrices in $DATA: writing them" >&2
  "$VENV/bin/python" scripts/bench_peers.py "$DATA" "${QUICK[@]}" "${BIG[@]}" --export-only
fi

# 3. actwatch
if [[ $RUST_OK -eq 1 ]]; then
  echo "== actwatch -> $RESULTS/actwatch.jsonl" >&2
  if ! cargo run -q --release -p actwatch --example bench -- "$DATA" "${KNN_ONLY[@]}" \
    > "$RESULTS/actwatch.jsonl"; then
    echo "bench.sh: warning: the actwatch bench example failed; its rows may be missing" >&2
  fi
elif [[ $SKIP_RUST -eq 0 || ! -f "$RESULTS/actwatch.jsonl" ]]; then
  : > "$RESULTS/actwatch.jsonl"   # --skip-rust keeps the rows of an earlier run
fi

# 4. table and JSON
"$VENV/bin/python" scripts/bench_table.py "$RESULTS/peers.jsonl" "$RESULTS/actwatch.jsonl" \
  | tee "$RESULTS/table.md"
CPU="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -1)"
FLAGS=""
if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then FLAGS="AVX-512"
elif grep -qw avx2 /proc/cpuinfo 2>/dev/null; then FLAGS="AVX2"; fi
CORES="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)"
DATE="$(date -u +%Y-%m-%d)"
"$VENV/bin/python" - "$RESULTS" "$CPU" "$CORES" "$DATE" "$ARGS" <<'PY'
import json, sys
out, cpu, cores, date, args = sys.argv[1:]
rows = {}
for who in ("peers", "actwatch"):
    try:
        with open(f"{out}/{who}.jsonl") as f:
            rows[who] = [json.loads(l) for l in f if l.startswith("{")]
    except OSError:
        rows[who] = []
doc = {"date": date, "cpu": cpu, "cores": int(cores), "command": f"scripts/bench.sh {args}".strip(),
       **rows}
with open(f"{out}/results.json", "w") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")
PY
echo "== $RESULTS/results.json" >&2

# 5. the service: ingest and StreamScores latency over gRPC on loopback, against Arrow Flight
rm -f "$RESULTS/service.md"
if [[ $SKIP_SERVICE -eq 0 ]]; then
  echo "== service (scripts/bench_service.sh) -> $RESULTS/service.md" >&2
  if ! scripts/bench_service.sh "${QUICK[@]}" | tee "$RESULTS/service.md"; then
    echo "bench.sh: warning: scripts/bench_service.sh failed; no service table" >&2
    rm -f "$RESULTS/service.md"
  fi
fi

# 6. docs/benchmarks.md (docs/benchmarks-knn.md with --knn-only)
PAGE=docs/benchmarks.md
[[ ${#KNN_ONLY[@]} -gt 0 ]] && PAGE=docs/benchmarks-knn.md
if [[ $DOCS -eq 1 ]]; then
  {
    if [[ ${#KNN_ONLY[@]} -gt 0 ]]; then
      echo "# Benchmarks: exact kNN and HNSW"
    else
      echo "# Benchmarks"
    fi
    echo
    echo "Generated by \`scripts/bench.sh${ARGS:+ $ARGS}\` on $DATE: $CPU (${FLAGS:-no AVX2}), $CORES cores,"
    echo "$THREADS threads. actwatch and its peers (numpy/scikit-learn, faiss, hnswlib) on the same bytes in"
    echo "the same run; medians of repeats. Other work on the machine distorts every figure (see the"
    echo "environment lines under the table for how idle it was). Rerun the command to regenerate this page;"
    echo "\`target/bench-results/results.json\` holds every row."
    echo
    if [[ ${#KNN_ONLY[@]} -gt 0 ]]; then
      echo "The kNN and HNSW cases alone (\`--knn-only\`); the full table is in"
      echo "[benchmarks.md](benchmarks.md). Beyond 200,000 references each HNSW is built once, on all"
      echo "threads; its queries run on 1 and all."
    else
      echo "Not in this command: batch scoring of a 1M-trace archive against the same model in pyarrow +"
      echo "numpy (\`scripts/bench_archive.sh\`, about 4 minutes more). HNSW at 1M references:"
      echo "\`scripts/bench.sh --knn-only --big-refs 1000000\`, in [benchmarks-knn.md](benchmarks-knn.md). The torch"
      echo "backend on a GPU: \`scripts/bench_torch.sh\`, in [benchmarks-gpu.md](benchmarks-gpu.md)."
    fi
    echo
    echo "## Detectors"
    echo
    cat "$RESULTS/table.md"
    if [[ -f "$RESULTS/service.md" ]]; then
      echo
      echo "## Service: ingest and StreamScores latency"
      echo
      echo "From \`scripts/bench_service.sh\` in the same run (the release server on loopback; Python"
      echo "clients on both sides)."
      cat "$RESULTS/service.md"
    fi
  } > "$PAGE"
  echo "== $PAGE" >&2
fi
