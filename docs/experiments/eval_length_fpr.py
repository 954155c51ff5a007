#!/usr/bin/env python3
"""Achieved false-positive rate by token count on exchangeable data, measured by cross-fitting.

The train sentences are exchangeable among themselves, so a monitor fitted on some of them must flag
the others at its conformal rate, overall and (with Mondrian length strata) within every length
stratum. For each seed s: the per-token train sentences are split into two folds by a seeded hash of
the sentence id (blake2b, independent of actwatch's own fit/calibration hash); `actwatch fit --seed s`
on fold A, `actwatch score` of fold B (computation level), and the other way round. Each sentence is
thus held out once per seed, by monitors with different fits and calibrations.

Configurations (layer 4, the Gaussian detector, no joint detector, target FPR 1%):
max_rolling_mean:8 with 4 length strata (the default) and with 1; max with 1 and with 4. With
`--full`, also the full default monitor (no detector flags: gaussian + knn at layers 2, 4, 6 and the
joint detector) for the first seed only (about 4 minutes on 2 cores).

Reported per configuration, pooled over folds and seeds: flagged / evaluated overall and per length
bucket, the buckets being the quartiles of the token counts of all train sentences (fixed bounds,
printed); two standard errors (by sentence: clustered on the sentence, since every seed evaluates
each sentence again; by run: the spread of the per-run rates, which also carries the calibration
draw); the conformal expectation (the mean over the evaluated computations of floor(a (n+1)) / (n+1),
n the calibration computations of the monitor's stratum the computation falls in, read from the
monitor's manifest: the exact rate conformal theory predicts for these calibration sizes); and the
per-seed overall rates.

    scripts/make_token_data.sh                      # per-token data into target/tokens (torch)
    python docs/experiments/eval_length_fpr.py [--data target/tokens] [--bin target/debug/actwatch] \
        [--seeds 0,1,2] [--full]

Needs numpy and pyarrow. Findings: docs/experiments/tokens.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SITE = "4"
FPR = 0.01
# (label, extra `actwatch fit` arguments); the site-4 Gaussian configurations
CONFIGS: list[tuple[str, list[str]]] = [
    ("max_rolling_mean:8, strata 4 (default)", ["--aggregation", "max_rolling_mean:8", "--length-strata", "4"]),
    ("max_rolling_mean:8, strata 1", ["--aggregation", "max_rolling_mean:8", "--length-strata", "1"]),
    ("max, strata 1", ["--aggregation", "max", "--length-strata", "1"]),
    ("max, strata 4", ["--aggregation", "max", "--length-strata", "4"]),
]
FULL_LABEL = "full default monitor (layers 2, 4, 6; gaussian + knn; joint), strata 4"


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def fold_of(seed: int, ids: np.ndarray) -> np.ndarray:
    """Fold 0 or 1 of every sentence id: the top bit of a seeded blake2b hash of the id."""
    return np.array(
        [hashlib.blake2b(f"fold:{seed}:{i}".encode(), digest_size=8).digest()[0] >> 7 for i in ids.tolist()],
        dtype=np.int64,
    )


def conformal_rate(n: int, fpr: float) -> float:
    """P(p <= fpr) for an exchangeable computation among n calibration computations: k / (n + 1),
    k the largest count with k / (n + 1) <= fpr (p = (1 + #{c >= s}) / (n + 1))."""
    k = math.floor(fpr * (n + 1))
    while (k + 1) / (n + 1) <= fpr:
        k += 1
    while k > 0 and k / (n + 1) > fpr:
        k -= 1
    return k / (n + 1)


def expected_rates(monitor: Path, lengths: np.ndarray) -> tuple[np.ndarray, list[tuple[int | None, int]]]:
    """Conformal expectation per computation from the monitor's length strata (manifest summary)."""
    strata = json.loads((monitor / "manifest.json").read_text())["summary"]["length_strata"]
    bounds = [s["max_length"] for s in strata]
    rates = np.array([conformal_rate(s["computations"], FPR) for s in strata])
    upper = np.array([b for b in bounds if b is not None], dtype=np.int64)
    idx = np.searchsorted(upper, lengths, side="left")  # first stratum with max_length >= length
    return rates[idx], [(b, s["computations"]) for b, s in zip(bounds, strata, strict=True)]


@dataclass
class Result:
    """Evaluations of one configuration, one entry per (run, held-out computation)."""

    sentence: list[np.ndarray] = field(default_factory=list)  # index into the train sentences
    flagged: list[np.ndarray] = field(default_factory=list)
    expected: list[np.ndarray] = field(default_factory=list)
    run: list[np.ndarray] = field(default_factory=list)
    runs: list[tuple[int, int]] = field(default_factory=list)  # (seed, fitted fold)
    strata: list[list[tuple[int | None, int]]] = field(default_factory=list)

    def add(
        self,
        seed: int,
        fold: int,
        sentence: np.ndarray,
        flagged: np.ndarray,
        expected: np.ndarray,
        strata: list[tuple[int | None, int]],
    ) -> None:
        self.sentence.append(sentence)
        self.flagged.append(flagged)
        self.expected.append(expected)
        self.run.append(np.full(len(sentence), len(self.runs)))
        self.runs.append((seed, fold))
        self.strata.append(strata)


def cross_fit(
    bin_: str,
    d: Path,
    name: str,
    fit_args: list[str],
    seed: int,
    folds: list[Path],
    index: dict[str, int],
    lengths: np.ndarray,
    res: Result,
) -> None:
    for a in (0, 1):
        m = d / f"m_{name}"
        run([bin_, "fit", "--input", str(folds[a]), "--out", str(m), "--seed", str(seed), *fit_args])
        out = d / f"s_{name}.parquet"
        run([bin_, "score", "--monitor", str(m), "--input", str(folds[1 - a]), "--output", str(out)])
        t = pq.read_table(out, columns=["trace_id", "flagged"])
        sent = np.array([index[i] for i in t["trace_id"].to_pylist()], dtype=np.int64)
        exp, strata = expected_rates(m, lengths[sent])
        res.add(seed, a, sent, t["flagged"].to_numpy(zero_copy_only=False).astype(np.int64), exp, strata)


def write_folds(t: pa.Table, inv: np.ndarray, fold: np.ndarray, d: Path, tag: str) -> list[Path]:
    paths = []
    for f in (0, 1):
        p = d / f"{tag}_fold{f}.parquet"
        pq.write_table(t.filter(pa.array(fold[inv] == f)), p, compression="none")
        paths.append(p)
    return paths


def clustered_se(flag: np.ndarray, sent: np.ndarray) -> float:
    """Standard error of sum(flag) / len(flag) clustered on the sentence (ratio estimator)."""
    if len(flag) == 0:
        return float("nan")
    r = flag.mean()
    uniq, inv = np.unique(sent, return_inverse=True)
    y = np.bincount(inv, weights=flag)
    m = np.bincount(inv).astype(float)
    g = len(uniq)
    if g < 2:
        return float("nan")
    return float(math.sqrt(g / (g - 1) * np.sum((y - r * m) ** 2)) / m.sum())


def run_se(flag: np.ndarray, run_: np.ndarray, runs: int) -> tuple[float, float, float]:
    """(standard error of the mean of the per-run rates, min, max of the per-run rates)."""
    rates = np.array([flag[run_ == j].mean() for j in range(runs) if np.any(run_ == j)])
    if len(rates) < 2:
        return float("nan"), float(rates.min()), float(rates.max())
    return float(rates.std(ddof=1) / math.sqrt(len(rates))), float(rates.min()), float(rates.max())


def report(results: dict[str, Result], names: list[str], bucket_of: np.ndarray) -> None:
    print("### Pooled over folds and seeds\n")
    print(
        "Rate = flagged / evaluated; SE by sentence: clustered on the sentence; SE by run: standard deviation "
        "of the per-run rates / sqrt(runs); expected: conformal expectation for the monitors' calibration "
        "sizes.\n"
    )
    print(
        "| configuration | runs | bucket | evaluated | flagged | rate | SE by sentence | SE by run | "
        "runs min-max | expected |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---|---:|")
    for name in names:
        r = results[name]
        sent, flag = np.concatenate(r.sentence), np.concatenate(r.flagged)
        exp, run_ = np.concatenate(r.expected), np.concatenate(r.run)
        bucket = bucket_of[sent]
        for b in [-1, 0, 1, 2, 3]:
            sel = np.ones(len(sent), bool) if b < 0 else bucket == b
            f = flag[sel]
            se_r, lo, hi = run_se(f, run_[sel], len(r.runs))
            label = "all" if b < 0 else f"Q{b + 1}"
            print(
                f"| {name if b < 0 else ''} | {len(r.runs) if b < 0 else ''} | {label} | {len(f)} | "
                f"{int(f.sum())} | {f.mean():.4f} | {clustered_se(f, sent[sel]):.4f} | {se_r:.4f} | "
                f"{lo:.4f}-{hi:.4f} | {exp[sel].mean():.4f} |"
            )
    print()
    print("### Overall rate per seed (both folds)\n")
    seeds = sorted({s for name in names for s, _ in results[name].runs})
    print("| configuration | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---:|" * len(seeds))
    for name in names:
        r = results[name]
        flag, run_ = np.concatenate(r.flagged), np.concatenate(r.run)
        cells = []
        for s in seeds:
            js = [j for j, (rs, _) in enumerate(r.runs) if rs == s]
            if not js:
                cells.append("-")
                continue
            f = flag[np.isin(run_, js)]
            cells.append(f"{f.mean():.4f} ({int(f.sum())}/{len(f)})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("### The monitors' length strata\n")
    print(
        "Upper token-count bound of each stratum (the last is open) and its calibration computations, "
        "min-max over the runs with these bounds.\n"
    )
    print("| configuration | runs | strata bounds | calibration computations per stratum |")
    print("|---|---:|---|---|")
    for name in names:
        groups: dict[tuple[int | None, ...], list[list[int]]] = {}
        for st in results[name].strata:
            groups.setdefault(tuple(b for b, _ in st), []).append([n for _, n in st])
        for bounds, sizes in groups.items():
            by_stratum = np.array(sizes)
            print(
                f"| {name} | {len(sizes)} | "
                + " / ".join(f"<={b}" if b is not None else "rest" for b in bounds)
                + " | "
                + " / ".join(f"{lo}-{hi}" for lo, hi in zip(by_stratum.min(0), by_stratum.max(0), strict=True))
                + " |"
            )
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="target/tokens")
    ap.add_argument("--bin", default="target/debug/actwatch")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated fold/monitor seeds")
    ap.add_argument("--full", action="store_true", help="also the full default monitor on all layers, first seed only")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    start = time.monotonic()
    t_all = pq.read_table(Path(a.data) / "train_tokens.parquet")
    t_site = t_all.filter(pc.equal(t_all["site"], SITE))
    if not a.full:
        del t_all
    ids_site = t_site["trace_id"].to_numpy(zero_copy_only=False)
    sentences, inv_site, lengths = np.unique(ids_site, return_inverse=True, return_counts=True)
    index = {s: i for i, s in enumerate(sentences.tolist())}
    qs = np.quantile(lengths, [0.25, 0.5, 0.75])
    bucket_of = np.searchsorted(qs, lengths, side="left")  # Q1: length <= qs[0], ...
    edges = [int(lengths.min())] + [math.floor(q) + 1 for q in qs]
    ranges = [f"{edges[b]}-{edges[b + 1] - 1}" for b in range(3)] + [f">={edges[3]}"]
    results: dict[str, Result] = {name: Result() for name, _ in CONFIGS}
    timings = []
    with tempfile.TemporaryDirectory(prefix="eval_length_fpr-") as tmp:
        d = Path(tmp)
        for seed in seeds:
            t0 = time.monotonic()
            folds = write_folds(t_site, inv_site, fold_of(seed, sentences), d, f"site{SITE}")
            for i, (name, extra) in enumerate(CONFIGS):
                cross_fit(
                    a.bin,
                    d,
                    f"c{i}",
                    ["--sites", SITE, "--detectors", "gaussian", "--joint", "none", *extra],
                    seed,
                    folds,
                    index,
                    lengths,
                    results[name],
                )
            timings.append(f"seed {seed}: {time.monotonic() - t0:.0f} s")
        names = [name for name, _ in CONFIGS]
        if a.full:
            t0 = time.monotonic()
            results[FULL_LABEL] = Result()
            ids_all = t_all["trace_id"].to_numpy(zero_copy_only=False)
            uniq_all, inv_all = np.unique(ids_all, return_inverse=True)
            assert np.array_equal(uniq_all, sentences), "every sentence needs traces at layer 4"
            folds = write_folds(t_all, inv_all, fold_of(seeds[0], sentences), d, "all")
            del t_all
            cross_fit(a.bin, d, "full", [], seeds[0], folds, index, lengths, results[FULL_LABEL])
            names.append(FULL_LABEL)
            timings.append(f"full seed {seeds[0]}: {time.monotonic() - t0:.0f} s")
    n_b = np.bincount(bucket_of, minlength=4)
    print(
        f"## eval_length_fpr.py (seeds {a.seeds}; 2 folds; layer {SITE}, gaussian, joint none unless "
        f"stated; target FPR {FPR})\n"
    )
    print(
        f"train sentences: {len(sentences)}, tokens at layer {SITE}: {int(lengths.sum())}; token-count quartiles "
        f"of all train sentences {qs.tolist()}: buckets Q1 {ranges[0]}, Q2 {ranges[1]}, Q3 {ranges[2]}, "
        f"Q4 {ranges[3]} tokens, with {' / '.join(str(x) for x in n_b)} sentences\n"
    )
    report(results, names, bucket_of)
    print(f"run time {time.monotonic() - start:.0f} s ({'; '.join(timings)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
