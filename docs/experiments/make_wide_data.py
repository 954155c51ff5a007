#!/usr/bin/env python3
"""Synthetic wide activations for the joint detector's cost and power at 4 sites x 4096.

Writes, into OUT (default target/wide):
- train.parquet: 4,000 computations, one trace at each of the sites layer0..layer3 (width 4096):
  64 latent factors per computation, mixed into each site by its own fixed random matrix, plus
  isotropic noise (0.3); so the sites are strongly correlated, as a model's layers are;
- test.parquet: 1,000 fresh computations of the same kind;
- mixed.parquet: test.parquet with layer3's vectors shuffled among its computations (ids prefixed
  "mixed-"): every site alone is exactly as in test.parquet, only their combination is wrong.

    python docs/experiments/make_wide_data.py [OUT]
    actwatch fit --input OUT/train.parquet --out OUT/m [--joint none]
    actwatch score --monitor OUT/m --input OUT/test.parquet --output OUT/s.parquet
    actwatch eval --monitor OUT/m --normal OUT/test.parquet --anomalous OUT/mixed.parquet

Seeded (numpy default_rng); needs numpy and pyarrow. The data is easy on purpose (64 strong shared
factors): it measures what the joint detector costs and that the reduction to principal
coordinates keeps cross-site structure, not how hard real mixtures are to catch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

D, SITES, FACTORS, NOISE = 4096, 4, 64, 0.3


def write(path: Path, n: int, seed: int, mix: list[np.ndarray]) -> None:
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, n, 500):
        m = min(500, n - start)
        z = rng.normal(size=(m, FACTORS)).astype(np.float32)
        ids = [f"c{seed}-{start + i}" for i in range(m)]
        for s in range(SITES):
            x = z @ mix[s] + NOISE * rng.normal(size=(m, D)).astype(np.float32)
            t = pa.table(
                {
                    "trace_id": pa.array(ids),
                    "site": pa.array([f"layer{s}"] * m),
                    "activation": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D),
                }
            )
            if writer is None:
                writer = pq.ParquetWriter(path, t.schema, compression="none")
            writer.write_table(t)
    assert writer is not None
    writer.close()


def mixed(test: Path, out: Path) -> None:
    t = pq.read_table(test)
    rng = np.random.default_rng(5)
    parts = []
    for s in range(SITES):
        p = t.filter(pc.equal(t["site"], f"layer{s}"))
        if s == SITES - 1:
            ids = np.array(p["trace_id"].to_pylist())
            p = p.set_column(0, "trace_id", pa.array(ids[rng.permutation(len(ids))]))
        parts.append(p)
    m = pa.concat_tables(parts)
    m = m.set_column(0, "trace_id", pc.binary_join_element_wise(pa.scalar("mixed-"), m["trace_id"], ""))
    pq.write_table(m, out, compression="none")


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "target/wide")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    mix = [rng.normal(size=(FACTORS, D)).astype(np.float32) / np.sqrt(FACTORS) for _ in range(SITES)]
    write(out / "train.parquet", 4000, 1, mix)
    write(out / "test.parquet", 1000, 2, mix)
    mixed(out / "test.parquet", out / "mixed.parquet")
    print(f"wrote {out}/train.parquet, test.parquet, mixed.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
