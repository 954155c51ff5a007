#!/usr/bin/env bash
# Per-token MiniLM activations for the issue "Detection power", captured by actwatch itself
# (`actwatch capture --pool none`, the binary's `torch` feature) from the shared MiniLM texts
# (../shared/data/minilm). Seeded and rerunnable; see docs/experiments/tokens.md for what uses it.
#
#   scripts/make_token_data.sh [OUT_DIR] [--seed S] [--spans N] [--sites 2,4,6] [--ood] [--control] [--fixture]
#
# Writes into OUT_DIR (default target/tokens), in actwatch's long format (trace_id, site, position,
# activation FixedSizeList<float32>[384]; one row per token and site, [CLS] and [SEP] included,
# position = index in input_ids):
#   train_tokens.parquet    the 6,000 train sentences (reference), sites --sites (default 2,4,6)
#   dev_id_tokens.parquet   the 1,000 dev_id sentences
#   spans_tokens.parquet    span-injected sequences: a seeded sample of N (default 1000, i.e. all) dev_id
#                           sentences, each with an out-of-distribution span of 4..16 tokens cut from a
#                           dev_ood_* text inserted at a random position after [CLS] and before [SEP]
#   spans.parquet           their sidecar: id, ood_category, span_start (its position), span_len,
#                           n_tokens, base_id, ood_id, ood_offset
#   dev_ood_<category>_tokens.parquet   with --ood: the dev_ood_* texts (code, non_english, base64)
#   spans_id_tokens.parquet, spans_id.parquet   with --control: the paired in-distribution control, the
#                           same dev_id sentences with a span of the same length at the same position cut
#                           from another dev_id sentence (ids idspan-<dev_id id>, ood_category "id")
#   work/                   minilm.pt (TorchScript) and the inputs Parquet files capture read
#
# --fixture (default OUT_DIR tests/data/tokens): the small torch-less test fixture instead: site 4 only,
# 400 train sentences and 60 dev_id sentences of at most 10 tokens (seeded samples), the 60 dev_id ones
# span-injected, vectors stored as float16; work files go to a temporary directory.
#
# Environment: CARGO_TARGET_DIR (default target), ACTWATCH_DATA (default ../shared/data/minilm),
# BATCH_SIZE (capture, default 32).
set -euo pipefail
cd "$(dirname "$0")/.."

out=""
seed=0
n_spans=1000
sites=2,4,6
ood=0
control=0
fixture=0
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seed="$2"; shift 2 ;;
    --spans) n_spans="$2"; shift 2 ;;
    --sites) sites="$2"; shift 2 ;;
    --ood) ood=1; shift ;;
    --control) control=1; shift ;;
    --fixture) fixture=1; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done
if [ "$fixture" = 1 ]; then
  out="${out:-tests/data/tokens}"
  sites=4
else
  out="${out:-target/tokens}"
fi
data="${ACTWATCH_DATA:-../shared/data/minilm}"
batch="${BATCH_SIZE:-32}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"

SECONDS=0
step() { echo "[$(printf '%4d' "$SECONDS")s] $*"; }

torch_env="$(scripts/setup_torch.sh)"   # (an assignment, so that a failed setup stops the script)
eval "$torch_env"
py="$ACTWATCH_TORCH_PYTHON"
step "cargo build --features torch (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --features torch --quiet
bin="$CARGO_TARGET_DIR/debug/actwatch"

mkdir -p "$out"
if [ "$fixture" = 1 ]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
else
  work="$out/work"
fi
mkdir -p "$work/inputs"
inp="$work/inputs"

step "export the model"
"$py" scripts/export_minilm.py model --output "$work/minilm.pt"

step "tokenize"
cats=(code non_english base64)
for name in train dev_id "${cats[@]/#/dev_ood_}"; do
  "$py" scripts/export_minilm.py tokenize --input "$data/$name.parquet" --output "$inp/$name.parquet"
done
if [ "$fixture" = 1 ]; then
  "$py" scripts/token_data.py subset --input "$inp/train.parquet" --output "$inp/train_fixture.parquet" \
    --n 400 --max-tokens 10 --seed "$seed"
  "$py" scripts/token_data.py subset --input "$inp/dev_id.parquet" --output "$inp/dev_id_fixture.parquet" \
    --n 60 --max-tokens 10 --seed "$seed"
  mv "$inp/train_fixture.parquet" "$inp/train.parquet"
  mv "$inp/dev_id_fixture.parquet" "$inp/dev_id.parquet"
  n_spans=0   # all 60
  control=0
fi

step "inject spans (seed $seed)"
ood_args=()
for c in "${cats[@]}"; do ood_args+=(--ood "$c=$inp/dev_ood_$c.parquet"); done
if [ "$control" = 1 ]; then
  ood_args+=(--control-output "$inp/spans_id.parquet" --control-spans "$out/spans_id.parquet")
fi
"$py" scripts/token_data.py inject --base "$inp/dev_id.parquet" "${ood_args[@]}" \
  --output "$inp/spans.parquet" --spans "$out/spans.parquet" --n "$n_spans" --seed "$seed"

captures=(train dev_id spans)
written=("$out/spans.parquet")
if [ "$control" = 1 ]; then
  captures+=(spans_id)
  written+=("$out/spans_id.parquet")
elif [ -e "$out/spans_id_tokens.parquet" ] || [ -e "$out/spans_id.parquet" ]; then
  # a control from an earlier run (perhaps another seed) would no longer match the spans
  echo "removing the earlier control $out/spans_id*.parquet (rerun with --control to remake it)"
  rm -f "$out/spans_id_tokens.parquet" "$out/spans_id.parquet"
fi
if [ "$ood" = 1 ] && [ "$fixture" = 0 ]; then captures+=("${cats[@]/#/dev_ood_}"); fi
for name in "${captures[@]}"; do
  step "capture $name (sites $sites)"
  "$bin" capture --model "$work/minilm.pt" --input "$inp/$name.parquet" --sites "$sites" --pool none \
    --batch-size "$batch" --output "$work/${name}_tokens.parquet" | tail -1
  if [ "$fixture" = 1 ]; then
    "$py" scripts/token_data.py half --input "$work/${name}_tokens.parquet" --output "$out/${name}_tokens.parquet"
  else
    mv "$work/${name}_tokens.parquet" "$out/${name}_tokens.parquet"
  fi
  written+=("$out/${name}_tokens.parquet")
done

step "verify positions (site ${sites##*,}, against the model run from Python)"
tolerance=1e-4
if [ "$fixture" = 1 ]; then tolerance=1e-2; fi   # float16 vectors
"$py" scripts/token_data.py verify --model "$work/minilm.pt" --inputs "$inp/spans.parquet" \
  --traces "$out/spans_tokens.parquet" --site "${sites##*,}" --spans "$out/spans.parquet" --tolerance "$tolerance"
if [ "$control" = 1 ]; then
  "$py" scripts/token_data.py verify --model "$work/minilm.pt" --inputs "$inp/spans_id.parquet" \
    --traces "$out/spans_id_tokens.parquet" --site "${sites##*,}" --spans "$out/spans_id.parquet"
fi

step "wrote $out:"
"$py" scripts/token_data.py summary "${written[@]}"
echo "  total $(du -cb "${written[@]}" | tail -1 | cut -f1) bytes"
