#!/usr/bin/env bash
# The `torch` feature's benchmark on the shared MiniLM files (release build):
#   1. capture throughput: `actwatch capture` of all-MiniLM-L6-v2 (TorchScript, fp32) over
#      dev_id.parquet's 1,000 sentences, layers 2, 4, 6 mean-pooled, per device;
#   2. scoring throughput, torch backend vs the default pure-Rust backend, per detector
#      (Gaussian, exact kNN against 4.5k references), 100,000 layer-2 vectors;
#   3. `actwatch score` end to end on dev_id.parquet, default vs --device.
# Devices: cpu, plus cuda when libtorch sees a GPU. Needs ../shared/data/minilm.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_env="$(scripts/setup_torch.sh)"   # (an assignment, so that a failed setup stops the script)
eval "$torch_env"
data=../shared/data/minilm
cargo build --release --features torch --quiet
cargo build --release -p actwatch-torch --features tch --example bench_backend --quiet
bin=target/release/actwatch
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$ACTWATCH_TORCH_PYTHON" scripts/export_minilm.py model --output "$work/minilm.pt" >/dev/null
"$ACTWATCH_TORCH_PYTHON" scripts/export_minilm.py tokenize --input "$data/dev_id.parquet" --output "$work/inputs.parquet" >/dev/null
devices=cpu
"$ACTWATCH_TORCH_PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && devices="cpu cuda"
echo "machine: $(nproc) cores; devices: $devices"
for dev in $devices; do
  for bs in 32 128; do
    # The first run warms the caches; the second is reported.
    "$bin" capture --model "$work/minilm.pt" --input "$work/inputs.parquet" --sites 2,4,6 \
      --output "$work/traces.parquet" --device "$dev" --batch-size "$bs" >/dev/null
    echo "capture, $dev, batch $bs: $("$bin" capture --model "$work/minilm.pt" --input "$work/inputs.parquet" \
      --sites 2,4,6 --output "$work/traces.parquet" --device "$dev" --batch-size "$bs" | tail -1)"
  done
done
"$bin" fit --input "$data/train.parquet" --out "$work/monitor" --trace-column id --site-column layer >/dev/null
for dev in $devices; do
  echo "scoring backends, $dev:"
  target/release/examples/bench_backend --device "$dev" --rows 100000
done
echo "actwatch score dev_id.parquet (3,000 traces, Parquet read and write included):"
echo "  default: $("$bin" score --monitor "$work/monitor" --input "$data/dev_id.parquet" --output "$work/s.parquet")"
for dev in $devices; do
  echo "  --device $dev: $("$bin" score --monitor "$work/monitor" --input "$data/dev_id.parquet" --output "$work/s.parquet" --device "$dev" 2>/dev/null)"
done
