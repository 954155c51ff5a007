#!/usr/bin/env python3
"""The peer of `actwatch fit` + `actwatch score` on a long-format archive, in pyarrow + numpy.

    python scripts/bench_archive_peer.py fit REFERENCE.parquet MODEL.npz
    python scripts/bench_archive_peer.py score MODEL.npz ARCHIVE.parquet OUT.parquet

The same model as actwatch's default monitor, written the way a careful numpy user would:
per site, vectors L2-normalised; a Ledoit-Wolf Gaussian (squared Mahalanobis distance by f32 BLAS
whitening) and exact cosine kNN (k = 10, the distance to the 10th nearest reference by an f32 BLAS
product and a partition); a quarter of the reference computations (a hash of the id) held out to
calibrate each detector (conformal p-values) and the computation statistic (the smallest p-value of
its traces' detectors), and a computation flagged when its calibrated p-value is at most 1%.
Scoring streams the archive a record batch at a time (pyarrow.parquet iter_batches) and writes one
row per computation with pyarrow's ParquetWriter, so memory stays bounded; kNN goes in blocks of
4096 queries. Expects rows grouped by computation (as scripts/bench_archive.sh's generator writes
them and as a capture does). Not a test: scripts/bench_archive.sh times it next to actwatch.
"""
from __future__ import annotations

import hashlib
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

K = 10
FPR = 0.01
CAL_FRACTION = 0.25
QUERY_BLOCK = 4096


def batches(path: str):
    """(trace_id, site, vectors) per record batch, vectors an (n, d) float32 view."""
    f = pq.ParquetFile(path)
    for b in f.iter_batches(batch_size=65_536, columns=["trace_id", "site", "activation"]):
        act = b.column("activation")
        d = act.type.list_size
        vec = act.values.to_numpy(zero_copy_only=False).reshape(-1, d)
        yield (b.column("trace_id").to_numpy(zero_copy_only=False),
               b.column("site").to_numpy(zero_copy_only=False), vec)


def normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def is_calibration(ids: np.ndarray) -> np.ndarray:
    return np.array([hashlib.blake2b(i.encode(), digest_size=8).digest()[0] < 256 * CAL_FRACTION
                     for i in ids])


class Site:
    def __init__(self, mu, w, refs, cal_g, cal_k):
        self.mu, self.w, self.refs = mu, w, refs
        self.cal = (np.sort(cal_g), np.sort(cal_k))

    def scores(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = normalise(x)
        z = (x - self.mu) @ self.w
        g = np.einsum("ij,ij->i", z, z)
        kn = np.empty(len(x), dtype=np.float32)
        for i in range(0, len(x), QUERY_BLOCK):
            sims = x[i:i + QUERY_BLOCK] @ self.refs.T
            kth = np.partition(sims, sims.shape[1] - K, axis=1)[:, sims.shape[1] - K]
            kn[i:i + QUERY_BLOCK] = 1.0 - kth
        return g, kn

    def p_values(self, x: np.ndarray) -> np.ndarray:
        """Smallest of the two detectors' conformal p-values, per row."""
        g, kn = self.scores(x)
        return np.minimum(conformal(self.cal[0], g), conformal(self.cal[1], kn))


def conformal(sorted_cal: np.ndarray, s: np.ndarray) -> np.ndarray:
    above = len(sorted_cal) - np.searchsorted(sorted_cal, s, side="left")
    return (1.0 + above) / (len(sorted_cal) + 1.0)


def fit(reference: str, model: str) -> None:
    from sklearn.covariance import LedoitWolf

    ids, sites, vecs = [], [], []
    for i, s, v in batches(reference):
        ids.append(i)
        sites.append(s)
        vecs.append(v.copy())
    ids, sites, vecs = np.concatenate(ids), np.concatenate(sites), np.concatenate(vecs)
    cal = is_calibration(ids)
    out = {}
    models = {}
    for name in sorted(set(sites)):
        rows = sites == name
        x = normalise(vecs[rows & ~cal])
        lw = LedoitWolf().fit(x)
        evals, evecs = np.linalg.eigh(lw.covariance_)
        w = (evecs / np.sqrt(evals)[None, :]).astype(np.float32)
        mu = lw.location_.astype(np.float32)
        site = Site(mu, w, x.astype(np.float32), np.zeros(1), np.zeros(1))
        g, kn = site.scores(vecs[rows & cal])
        models[name] = Site(mu, w, site.refs, g, kn)
        out.update({f"{name}/mu": mu, f"{name}/w": w, f"{name}/refs": site.refs,
                    f"{name}/cal_g": models[name].cal[0], f"{name}/cal_k": models[name].cal[1]})
    # computation statistic on the calibration computations: the smallest p-value over its traces
    cal_rows = np.flatnonzero(cal)
    p = np.ones(len(ids))
    for name, site in models.items():
        r = cal_rows[sites[cal_rows] == name]
        p[r] = site.p_values(vecs[r])
    _, first = np.unique(ids[cal_rows], return_index=True)
    order = np.sort(first)
    minp = np.minimum.reduceat(p[cal_rows], order)
    out["computation_cal"] = np.sort(-minp)  # higher = more anomalous
    out["sites"] = np.array(sorted(models))
    np.savez(model, **out)
    print(f"fitted {len(models)} sites on {len(ids)} traces ({int(cal.sum())} for calibration)")


def score(model: str, archive: str, out_path: str) -> None:
    m = np.load(model)
    sites = {str(s): Site(m[f"{s}/mu"], m[f"{s}/w"], m[f"{s}/refs"], m[f"{s}/cal_g"], m[f"{s}/cal_k"])
             for s in m["sites"]}
    comp_cal = m["computation_cal"]
    schema = pa.schema([("trace_id", pa.string()), ("p_value", pa.float64()), ("flagged", pa.bool_())])
    writer = pq.ParquetWriter(out_path, schema, compression="zstd")
    carry_ids = np.array([], dtype=object)
    carry_p = np.array([])
    n_rows = n_comp = n_flag = 0
    for ids, site, vecs in batches(archive):
        p = np.ones(len(ids))
        for name, s in sites.items():
            rows = np.flatnonzero(site == name)
            if len(rows):
                p[rows] = s.p_values(vecs[rows])
        n_rows += len(ids)
        ids = np.concatenate([carry_ids, ids])
        p = np.concatenate([carry_p, p])
        # the last computation may go on in the next batch
        last = ids[-1]
        tail = np.flatnonzero(ids != last)
        cut = tail[-1] + 1 if len(tail) else 0
        carry_ids, carry_p = ids[cut:], p[cut:]
        ids, p = ids[:cut], p[:cut]
        if len(ids):
            change = np.flatnonzero(ids[1:] != ids[:-1]) + 1
            starts = np.concatenate([[0], change])
            minp = np.minimum.reduceat(p, starts)
            pv = conformal(comp_cal, -minp)
            flagged = pv <= FPR
            n_comp += len(starts)
            n_flag += int(flagged.sum())
            writer.write_table(pa.table({"trace_id": ids[starts], "p_value": pv, "flagged": flagged},
                                        schema=schema))
    if len(carry_ids):
        minp = np.array([carry_p.min()])
        pv = conformal(comp_cal, -minp)
        n_comp += 1
        n_flag += int(pv[0] <= FPR)
        writer.write_table(pa.table({"trace_id": carry_ids[:1], "p_value": pv, "flagged": pv <= FPR},
                                    schema=schema))
    writer.close()
    print(f"scored {n_rows} traces, {n_comp} computations, {n_flag} flagged "
          f"({100.0 * n_flag / max(n_comp, 1):.2f}%)")


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "fit":
        fit(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "score":
        score(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
