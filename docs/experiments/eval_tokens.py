#!/usr/bin/env python3
"""Token aggregation and length strata, measured with actwatch itself on per-token MiniLM traces.

For each (aggregation, length strata) configuration: `actwatch fit` on the per-token train traces
(one site, Gaussian detector), `actwatch score` of the per-token dev_id sentences (in-distribution)
and of the span-injected sentences (dev_id sentences with a 4-16 token out-of-distribution span),
then computation-level AUROC (span-injected vs dev_id), recall at the monitor's 1% target, and the
achieved false-positive rate on dev_id overall and per length quartile (token count). Mean-pooled
scoring of the same sentences (a pooled Gaussian fitted on mean-pooled train vectors) is the
baseline the token operators must beat.

    scripts/make_token_data.sh                      # per-token data into target/tokens (torch)
    python docs/experiments/eval_tokens.py [--data target/tokens] [--site 4] [--bin target/debug/actwatch]

Needs numpy and pyarrow. Findings: docs/experiments/tokens.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    scores = np.concatenate([normal, anomalous])
    ranks = scores.argsort().argsort().astype(float) + 1.0
    # average ranks of ties
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        if j > i:
            ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    r = ranks[len(normal) :].sum()
    n1, n0 = len(anomalous), len(normal)
    return float((r - n1 * (n1 + 1) / 2.0) / (n0 * n1))


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def score(bin_: str, monitor: Path, inp: Path, out: Path) -> pa.Table:
    run([bin_, "score", "--monitor", str(monitor), "--input", str(inp), "--output", str(out)])
    return pq.read_table(out)


def pooled(path: Path, site: str, out: Path) -> None:
    """Mean-pools a per-token file into one trace per computation (long format, no positions)."""
    t = pq.read_table(path)
    t = t.filter(pc.equal(t["site"], site))
    ids = t["trace_id"].to_numpy(zero_copy_only=False)
    vec = np.stack(t["activation"].to_numpy(zero_copy_only=False)).astype(np.float32)
    uniq, inv = np.unique(ids, return_inverse=True)
    sums = np.zeros((len(uniq), vec.shape[1]))
    np.add.at(sums, inv, vec)
    counts = np.bincount(inv)
    means = (sums / counts[:, None]).astype(np.float32)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(means.ravel()), vec.shape[1])
    pq.write_table(
        pa.table({"trace_id": pa.array(uniq), "site": pa.array([site] * len(uniq)), "activation": arr}),
        out,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="target/tokens")
    ap.add_argument("--site", default="4")
    ap.add_argument("--bin", default="target/debug/actwatch")
    ap.add_argument("--detectors", default="gaussian")
    a = ap.parse_args()
    data = Path(a.data)
    train, dev, spans = (data / f"{n}_tokens.parquet" for n in ("train", "dev_id", "spans"))
    configs = [
        ("max", 1),
        ("max", 4),
        ("mean", 1),
        ("mean", 4),
        ("ema:0.25", 4),
        ("ema:0.5", 4),
        ("max_rolling_mean:4", 4),
        ("max_rolling_mean:8", 4),
        ("topk_mean:4", 4),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rows = []
        # the baseline: mean-pooled traces, pooled Gaussian
        for name, src in (("train", train), ("dev", dev), ("spans", spans)):
            pooled(src, a.site, d / f"pooled_{name}.parquet")
        run([a.bin, "fit", "--input", str(d / "pooled_train.parquet"), "--out", str(d / "m_pooled"),
             "--detectors", a.detectors, "--length-strata", "1"])
        configs_all = [("mean-pooled vectors", None)] + configs
        for agg, strata in configs_all:
            if strata is None:
                m = d / "m_pooled"
                sd = score(a.bin, m, d / "pooled_dev.parquet", d / "s_dev.parquet")
                ss = score(a.bin, m, d / "pooled_spans.parquet", d / "s_spans.parquet")
                # lengths from the per-token files
                lens_t = pq.read_table(dev).filter(pc.equal(pq.read_table(dev)["site"], a.site))
                ids, counts = np.unique(lens_t["trace_id"].to_numpy(zero_copy_only=False), return_counts=True)
                lmap = dict(zip(ids, counts))
                dev_len = np.array([lmap[i] for i in sd["trace_id"].to_pylist()])
            else:
                m = d / f"m_{agg}_{strata}"
                run([a.bin, "fit", "--input", str(train), "--out", str(m), "--sites", a.site,
                     "--detectors", a.detectors, "--aggregation", agg, "--length-strata", str(strata)])
                sd = score(a.bin, m, dev, d / "s_dev.parquet")
                ss = score(a.bin, m, spans, d / "s_spans.parquet")
                dev_len = sd["traces"].to_numpy()
            dev_p = sd["p_value"].to_numpy()
            span_p = ss["p_value"].to_numpy()
            dev_s, span_s = sd["score"].to_numpy(), ss["score"].to_numpy()
            flags = sd["flagged"].to_numpy()
            qs = np.quantile(dev_len, [0.25, 0.5, 0.75])
            bucket = np.searchsorted(qs, dev_len, side="left")
            per = [flags[bucket == b].mean() for b in range(4)]
            rows.append((f"{agg}" + ("" if strata is None else f", strata {strata}"),
                         auroc(dev_s, span_s), (span_p <= 0.01).mean(), flags.mean(), per))
            del dev_p
        print(f"site {a.site}, detectors {a.detectors}; dev_id n = {len(dev_len)}, "
              f"length quartile bounds {qs.tolist()}")
        print("| configuration | AUROC spans vs dev_id | recall @1% | FPR dev_id | FPR per length quartile |")
        print("|---|---:|---:|---:|---|")
        for name, au, rec, fpr, per in rows:
            print(f"| {name} | {au:.4f} | {rec:.3f} | {fpr:.4f} | {' / '.join(f'{x:.3f}' for x in per)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
