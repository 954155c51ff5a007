#!/usr/bin/env bash
# Per-token MiniLM activations of the concept texts (../shared/data/concepts/{train,dev}.parquet),
# captured by actwatch itself (`actwatch capture --pool none`, the binary's `torch` feature), for
# docs/experiments/explore_probes.py (see docs/experiments/probes.md). Follows scripts/make_token_data.sh
# but does not build: it uses an existing binary and an existing TorchScript export.
#
#   docs/experiments/make_concept_tokens.sh [OUT_DIR]      # default target/concepts
#
# Writes into OUT_DIR, in actwatch's long format (trace_id, site, position, activation
# FixedSizeList<float32>[384]; one row per token and site, [CLS] and [SEP] included, position = index in
# input_ids):
#   train_tokens.parquet   the 1,220 train texts (one per id), sites 2,4,6
#   dev_tokens.parquet     the 1,116 dev texts
#   work/inputs/{train,dev}.parquet   the tokenized inputs capture read
# and checks that each text's mean over its captured tokens equals the shared pooled vector (all ids,
# layers 2, 4, 6; tolerance 1e-4), printing the max abs difference.
#
# Truncation at 128 word pieces ([CLS] and [SEP] included), not export_minilm.py's default 256: the
# shared pooled vectors were made that way (the package tokenizer.json's 128). One text is affected,
# train-persistbench_sycophancy-47ce9ba289 (145 word pieces): with 256 its mean differs from the shared
# vector by 0.17, with 128 by 2e-7.
#
# Environment: CARGO_TARGET_DIR (default target; the binary is $CARGO_TARGET_DIR/debug/actwatch, built
# with `cargo build --features torch`), ACTWATCH_BIN (overrides the binary), MINILM_PT (the TorchScript
# file; default $CARGO_TARGET_DIR/tokens/work/minilm.pt as scripts/make_token_data.sh leaves it, made by
# `scripts/export_minilm.py model` if absent), CONCEPTS_DATA (default ../shared/data/concepts),
# BATCH_SIZE (capture, default 32).
set -euo pipefail
cd "$(dirname "$0")/../.."

target="${CARGO_TARGET_DIR:-target}"
out="${1:-$target/concepts}"
data="${CONCEPTS_DATA:-../shared/data/concepts}"
bin="${ACTWATCH_BIN:-$target/debug/actwatch}"
model="${MINILM_PT:-$target/tokens/work/minilm.pt}"
batch="${BATCH_SIZE:-32}"

SECONDS=0
step() { echo "[$(printf '%4d' "$SECONDS")s] $*"; }

torch_env="$(scripts/setup_torch.sh)"   # (an assignment, so that a failed setup stops the script)
eval "$torch_env"
py="$ACTWATCH_TORCH_PYTHON"
test -x "$bin" || { echo "error: $bin missing (cargo build --features torch)" >&2; exit 1; }

mkdir -p "$out/work/inputs"
inp="$out/work/inputs"
if [ ! -f "$model" ]; then
  model="$out/work/minilm.pt"
  step "export the model -> $model"
  "$py" scripts/export_minilm.py model --output "$model"
fi

for name in train dev; do
  step "tokenize $name"
  "$py" scripts/export_minilm.py tokenize --input "$data/$name.parquet" --output "$inp/$name.parquet" \
    --max-length 128
done
for name in train dev; do
  step "capture $name (sites 2,4,6)"
  "$bin" capture --model "$model" --input "$inp/$name.parquet" --sites 2,4,6 --pool none \
    --batch-size "$batch" --output "$out/${name}_tokens.parquet" | tail -1
done

step "verify: mean over a text's tokens = the shared pooled vector"
"$py" - "$data" "$out" <<'EOF'
import sys
import numpy as np
import pyarrow.parquet as pq

data, out = sys.argv[1], sys.argv[2]
for name in ("train", "dev"):
    shared = pq.read_table(f"{data}/{name}.parquet", columns=["id", "layer", "activation"])
    sid = np.asarray(shared.column("id").to_pylist())
    slayer = shared.column("layer").to_numpy()
    sact = shared.column("activation").combine_chunks().values.to_numpy().reshape(len(sid), -1)
    worst, n = 0.0, 0
    n_tok = 0
    for layer in (2, 4, 6):
        t = pq.read_table(f"{out}/{name}_tokens.parquet", filters=[("site", "=", str(layer))])
        tid = np.asarray(t.column("trace_id").to_pylist())
        x = t.column("activation").combine_chunks().values.to_numpy().reshape(len(tid), -1).astype(np.float64)
        uniq, inv = np.unique(tid, return_inverse=True)
        sums = np.zeros((len(uniq), x.shape[1]))
        np.add.at(sums, inv, x)
        counts = np.bincount(inv, minlength=len(uniq))
        means = sums / counts[:, None]
        pos = {u: k for k, u in enumerate(uniq)}
        sel = slayer == layer
        ids_l = sid[sel]
        if set(ids_l) != set(uniq):
            raise SystemExit(f"{name} layer {layer}: captured ids differ from the shared file's")
        idx = np.array([pos[i] for i in ids_l])
        worst = max(worst, float(np.abs(means[idx] - sact[sel]).max()))
        n += int(sel.sum())
        n_tok = len(tid)
    print(f"  {name}: {n} pooled vectors ({len(uniq)} texts x 3 layers, {n_tok} tokens per layer), "
          f"max abs difference {worst:.3g}")
    if worst > 1e-4:
        raise SystemExit(f"{name}: max abs difference {worst:.3g} exceeds 1e-4")
EOF

step "wrote $out:"
"$py" scripts/token_data.py summary "$out/train_tokens.parquet" "$out/dev_tokens.parquet"
