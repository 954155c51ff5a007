#!/usr/bin/env python3
"""How many references exact kNN's int8 bound leaves to rank again, on the MiniLM files.

    .venv-bench/bin/python scripts/knn_bound_candidates.py [QUERIES_PER_FILE]

A numpy model of `crates/actwatch-detect/src/knn/bounds.rs` (not the Rust code): per layer, the
trusted references (train.parquet, L2-normalised, optionally centred on their mean) and each query
row are rounded to int8 with one scale per row (largest entry = 127); the bound of a pair is
`||s_q x_q|| ||e_r|| + ||e_q|| ||c_r||`; the threshold is the k-th largest lower bound (k = 10);
a reference is ranked again when its upper bound reaches it. Prints, per layer and query file, the
median / 90th percentile / largest count per query, with and without centring, and the largest
observed |error| / bound (must stay <= 1). Needs numpy and pyarrow (the .venv-bench venv of
scripts/bench.sh has both).
"""
from __future__ import annotations

import sys

import numpy as np
import pyarrow.parquet as pq

DATA = "../shared/data/minilm/"
FILES = ["dev_id", "dev_ood_code", "dev_ood_base64", "dev_ood_non_english"]
K = 10


def layer_rows(path: str, layer: int) -> np.ndarray:
    t = pq.read_table(path, columns=["layer", "activation"])
    keep = t.column("layer").to_numpy() == layer
    a = t.column("activation").combine_chunks()
    v = a.values.to_numpy().reshape(-1, a.type.list_size)[keep].astype(np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def int8(x: np.ndarray):
    s = np.abs(x).max(axis=1, keepdims=True) / 127.0
    q = np.round(x / s)
    return s * q, x - s * q


def main() -> int:
    per_file = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    layers = sorted(set(pq.read_table(DATA + "train.parquet", columns=["layer"]).column("layer").to_numpy()))
    print("| layer | queries | centred | references | ranked again: median / p90 / max | max error / bound |")
    print("|---|---|---|---:|---:|---:|")
    for layer in layers:
        refs = layer_rows(DATA + "train.parquet", layer)
        for centred in (True, False):
            mu = refs.mean(axis=0) if centred else np.zeros(refs.shape[1])
            cr = refs - mu
            sr, er = int8(cr)
            e_r, n_r = np.linalg.norm(er, axis=1), np.linalg.norm(cr, axis=1)
            for name in FILES:
                cq = layer_rows(DATA + name + ".parquet", layer)[:per_file] - mu
                sq, eq = int8(cq)
                a = sq @ sr.T
                bound = np.linalg.norm(sq, axis=1)[:, None] * e_r + np.linalg.norm(eq, axis=1)[:, None] * n_r
                thr = -np.partition(-(a - bound), K - 1, axis=1)[:, K - 1]
                n = ((a + bound) >= thr[:, None]).sum(axis=1)
                worst = (np.abs(cq @ cr.T - a) / bound).max()
                print(f"| {layer} | {name} | {'yes' if centred else 'no'} | {len(refs)} | "
                      f"{np.median(n):.0f} / {np.percentile(n, 90):.0f} / {n.max()} | {worst:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
