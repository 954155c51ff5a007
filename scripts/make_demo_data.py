#!/usr/bin/env python3
"""Build the small demo sample shipped in data/demo/ (used by `actwatch demo`).

Deterministically samples whole sentences (all three layers of each) from the shared
MiniLM activation files and writes them as float16 Parquet without the text column:

    data/demo/reference.parquet        <- train.parquet                (default 1500 sentences)
    data/demo/normal.parquet           <- dev_id.parquet               (default  400 sentences)
    data/demo/ood_code.parquet         <- dev_ood_code.parquet         (default  150 sentences)
    data/demo/ood_non_english.parquet  <- dev_ood_non_english.parquet  (default  150 sentences)
    data/demo/ood_base64.parquet       <- dev_ood_base64.parquet       (default  150 sentences)

Schema: id: string, label: string, layer: int32, activation: fixed_size_list<halffloat>[384];
zstd; rows sorted by (id, layer). Output is byte-for-byte reproducible for a given
source, seed and pyarrow version.

Usage:  python scripts/make_demo_data.py [--src DIR] [--out DIR] [--seed N]
                                         [--train N] [--dev-id N] [--ood N]
Needs numpy and pyarrow (the .venv-bench venv made by scripts/bench.sh has both).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# The shared MiniLM activations, next to the repository (../shared/data/minilm from its root).
DEFAULT_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "minilm")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "demo")
DIM = 384
LAYERS = (2, 4, 6)

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("activation", pa.list_(pa.field("element", pa.float16(), nullable=False), DIM), nullable=False),
    ]
)


def sub_seed(seed: int, name: str) -> int:
    """Independent, stable stream per output file (changing one count leaves the others alone)."""
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def sample_file(src_path: str, n_sentences: int, seed: int, name: str) -> pa.Table:
    t = pq.read_table(src_path, columns=["id", "label", "layer", "activation"])
    ids = np.array(sorted(set(t.column("id").to_pylist())), dtype=object)
    if n_sentences > len(ids):
        raise SystemExit(f"{src_path}: asked for {n_sentences} sentences, file has {len(ids)}")
    rng = np.random.default_rng(sub_seed(seed, name))
    chosen = set(ids[rng.choice(len(ids), size=n_sentences, replace=False)].tolist())

    mask = pa.compute.is_in(t.column("id"), value_set=pa.array(sorted(chosen)))
    t = t.filter(mask)
    t = t.sort_by([("id", "ascending"), ("layer", "ascending")])

    # Every chosen sentence must come with all three layers.
    if t.num_rows != n_sentences * len(LAYERS):
        raise SystemExit(f"{src_path}: expected {n_sentences * len(LAYERS)} rows, got {t.num_rows}")
    layers = t.column("layer").to_numpy()
    if not np.array_equal(layers.reshape(-1, len(LAYERS)), np.tile(LAYERS, (n_sentences, 1))):
        raise SystemExit(f"{src_path}: a sentence is missing a layer")

    act = t.column("activation").combine_chunks()
    vals = act.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    assert vals.size == t.num_rows * DIM
    if not np.isfinite(vals).all():
        raise SystemExit(f"{src_path}: non-finite activation")
    if np.abs(vals).max() >= 65504.0:
        raise SystemExit(f"{src_path}: activation out of float16 range")
    vals16 = vals.astype(np.float16)

    activation = pa.FixedSizeListArray.from_arrays(pa.array(vals16, type=pa.float16()), DIM)
    activation = activation.cast(SCHEMA.field("activation").type)
    return pa.Table.from_arrays(
        [
            t.column("id").combine_chunks().cast(pa.string()),
            t.column("label").combine_chunks().cast(pa.string()),
            t.column("layer").combine_chunks().cast(pa.int32()),
            activation,
        ],
        schema=SCHEMA,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=DEFAULT_SRC)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--train", type=int, default=1500, help="train sentences (x3 layers)")
    ap.add_argument("--dev-id", type=int, default=400, help="dev_id sentences (x3 layers)")
    ap.add_argument("--ood", type=int, default=150, help="sentences from each dev_ood_* file (x3 layers)")
    args = ap.parse_args()

    jobs = [
        ("reference", "train.parquet", args.train),
        ("normal", "dev_id.parquet", args.dev_id),
        ("ood_code", "dev_ood_code.parquet", args.ood),
        ("ood_non_english", "dev_ood_non_english.parquet", args.ood),
        ("ood_base64", "dev_ood_base64.parquet", args.ood),
    ]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    total = 0
    for name, src, n in jobs:
        table = sample_file(os.path.join(args.src, src), n, args.seed, name)
        table = table.replace_schema_metadata(
            {
                "actwatch.demo.source": f"all-MiniLM-L6-v2 activations, {src} (see data/minilm/README.md)",
                "actwatch.demo.seed": str(args.seed),
                "actwatch.demo.sentences": str(n),
                "actwatch.demo.note": "float16 copy of fp32 mean-pooled block outputs; text column dropped",
            }
        )
        path = os.path.join(out, f"{name}.parquet")
        tmp = path + ".tmp"
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            compression_level=19,
            use_dictionary=["id", "label", "layer"],
            row_group_size=table.num_rows,
            write_statistics=["id", "label", "layer"],
        )
        os.replace(tmp, path)
        size = os.path.getsize(path)
        total += size
        print(f"{path}: {table.num_rows} rows ({n} sentences x {len(LAYERS)} layers), {size / 1e6:.2f} MB",
              file=sys.stderr)
    print(f"total {total / 1e6:.2f} MB ({total} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
