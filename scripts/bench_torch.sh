#!/usr/bin/env bash
# The `torch` feature's benchmark on the shared MiniLM files (release build):
#   1. capture throughput: `actwatch capture` of all-MiniLM-L6-v2 (TorchScript, fp32) over
#      dev_id.parquet's 1,000 sentences, layers 2, 4, 6 mean-pooled, per device;
#   2. scoring throughput, torch backend vs the default pure-Rust backend, per detector
#      (Gaussian, exact kNN against 4.5k references), 100,000 layer-2 vectors;
#   3. `actwatch score` end to end on dev_id.parquet, default vs --device;
#   4. with a GPU only: the same at d = 4096 on synthetic data (Gaussian; exact kNN against 100k
#      and 1M references: about 20 GiB of GPU memory, 40 GiB of host memory and 4 minutes),
#      docs/benchmarks-gpu.md.
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
# Peer: the same TorchScript file from Python (torch.jit.load), batches of 32 sorted by length like
# actwatch's windows, mean pooling of layers 2, 4, 6 included.
"$ACTWATCH_TORCH_PYTHON" - "$work/minilm.pt" "$work/inputs.parquet" <<'PY'
import sys, time
import pyarrow.parquet as pq
import torch
torch.set_grad_enabled(False)
model = torch.jit.load(sys.argv[1]).eval()
seqs = pq.read_table(sys.argv[2], columns=["input_ids"]).column("input_ids").to_pylist()
def run():
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = []
    for s in range(0, len(order), 32):
        batch = [seqs[i] for i in order[s:s + 32]]
        t = max(map(len, batch))
        ids = torch.zeros(len(batch), t, dtype=torch.int64)
        mask = torch.zeros(len(batch), t, dtype=torch.int64)
        for r, x in enumerate(batch):
            ids[r, :len(x)] = torch.tensor(x)
            mask[r, :len(x)] = 1
        h = model(ids, mask)
        m = mask.unsqueeze(-1).float()
        out.append([((h[l] * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy() for l in (2, 4, 6)])
    return out
# A fresh process's first pass (what one `actwatch capture` run is: TorchScript's profiling
# executor optimises during the first calls), then a warm pass.
times = []
for _ in range(2):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
print(f"peer: the same TorchScript module from Python (torch {torch.__version__}), batch 32, cpu: "
      f"first pass {len(seqs) / times[0]:.1f} sequences/s, warm {len(seqs) / times[1]:.1f} sequences/s")
PY
"$bin" fit --input "$data/train.parquet" --out "$work/monitor" --trace-column id --site-column layer >/dev/null
for dev in $devices; do
  echo "scoring backends, $dev:"
  target/release/examples/bench_backend --device "$dev" --rows 100000
done
if [[ $devices == *cuda* ]]; then
  echo "scoring backends at d = 4096, synthetic, cuda:"
  target/release/examples/bench_backend --dim 4096 --fit-rows 16384 --device cuda
fi
echo "actwatch score dev_id.parquet (3,000 traces, Parquet read and write included):"
echo "  default: $("$bin" score --monitor "$work/monitor" --input "$data/dev_id.parquet" --output "$work/s.parquet")"
for dev in $devices; do
  echo "  --device $dev: $("$bin" score --monitor "$work/monitor" --input "$data/dev_id.parquet" --output "$work/s.parquet" --device "$dev" 2>/dev/null)"
done
