"""Writes the nearly separable probe examples of tests/cli.rs's
`a_logistic_probe_fits_nearly_separable_examples` (the Python client's probe test data, on which
cross-validated logistic regression once failed to converge at C = 1e-3):

    python tests/data/probe_separable/make.py tests/data/probe_separable

ref.parquet: 400 reference computations, sites "a" and "b", width 8, N(0, 1); pos.parquet: 60
computations moved by 3 along the first axis, label true; mix.parquet: 80, every other one moved,
labelled so. numpy default_rng seeds 1, 2, 3.
"""

import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def batches(prefix, n, seed, shift, sites=("a", "b"), width=8):
    rng = np.random.default_rng(seed)
    ids = [f"{prefix}-{i}" for i in range(n)]
    moved = np.zeros((n, width), np.float32)
    moved[:, 0] = np.broadcast_to(np.asarray(shift, np.float32), (n,))
    return [(s, (rng.normal(size=(n, width)) + moved).astype(np.float32), ids) for s in sites]


def write(path, bs, labels=None):
    cols = {"trace_id": [], "site": [], "activation": [], "label": []}
    for site, a, ids in bs:
        for i, (v, t) in enumerate(zip(a, ids)):
            cols["trace_id"].append(t)
            cols["site"].append(site)
            cols["activation"].append(v.tolist())
            cols["label"].append(bool(labels[i]) if labels is not None else False)
    table = pa.table(
        {
            "trace_id": cols["trace_id"],
            "site": cols["site"],
            "activation": pa.array(cols["activation"], pa.list_(pa.float32(), 8)),
            "label": cols["label"],
        }
    )
    pq.write_table(table, path)


def main():
    out = sys.argv[1]
    write(f"{out}/ref.parquet", batches("ref", 400, 1, 0.0))
    present = np.arange(80) % 2 == 0
    write(f"{out}/pos.parquet", batches("pos", 60, 2, 3.0), [True] * 60)
    write(f"{out}/mix.parquet", batches("mix", 80, 3, np.where(present, 3.0, 0.0)), present)


if __name__ == "__main__":
    main()
