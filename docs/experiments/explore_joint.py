#!/usr/bin/env python3
"""Exploratory experiment: should the default monitor gain a joint cross-site detector?

Prototype only (numpy / scipy / scikit-learn); nothing here is used by the product.
Run:  python docs/experiments/explore_joint.py [--data DIR] [--seeds 0,1,2]
Numbers and the recommendation: docs/experiments/joint.md.

Pipeline (per seed; the seed picks the fit / calibration split and draws the synthetic sets):
  1. split train sentences by a seeded hash (sha256 of "seed:id", as explore_defaults.py) into
     fit (~75%, ~4500) and calibration (~25%, ~1500) computations;
  2. fit, on the fit computations, the slots
       g2 g4 g6   per site: L2-normalise, Ledoit-Wolf shrunk covariance, squared Mahalanobis
       k2 k4 k6   per site: cosine distance to the 10th nearest fit vector (exact; actwatch's
                  knn::DEFAULT_K = 10, DEFAULT_METRIC = Cosine)
       gJ         joint: concatenation of the three L2-normalised site vectors (width 1152),
                  Ledoit-Wolf, squared Mahalanobis, full whitening
       gJr64 gJr128 gJr256
                  the same fit, low rank + residual as actwatch's GaussianDetector with rank r:
                  top r eigenvectors of the shrunk covariance, sigma^2 = mean of the d - r discarded
                  eigenvalues, score sum_j p_j^2/lambda_j + (||y||^2 - ||p||^2)/sigma^2
       kJ         joint cosine kNN (k = 10) on the concatenation of the L2-normalised site vectors
                  (its cosine is the mean of the three per-site cosines);
  3. per slot, the smoothed conformal -ln p of actwatch's Calibration::smooth_neg_log_p (linear
     interpolation in the bulk, exponential tail beyond the (m+1)-th largest calibration score,
     m = max(10, ceil(0.05 n)), in log space); calibration computations get leave-one-out values;
  4. fuse the slots of a monitor (minp: max - ln m, fisher: 2 sum, cauchy: asinh of Liu-Xie's T with
     p shrunk by 1 - 1e-3, as actwatch_detect::fusion); calibrate the fused statistic on the
     calibration computations (conformal p) and flag at p <= 0.01;
  5. report AUROC (dev_id vs each category, and vs all dev OOD pooled), recall at the 1% target and
     the achieved FPR on dev_id; mean and standard deviation over seeds.

Synthetic held-out sets (built from dev_id, so they share nothing with the three visible categories
except swap_ood, which borrows one layer from them):
  chim_24/6  layers 2 and 4 of dev_id sentence a, layer 6 of another dev_id sentence b
  chim_2/46  layer 2 of a, layers 4 and 6 of b        (every site vector is a real in-distribution vector)
  noise<eps> one site (uniformly drawn) of a dev_id sentence gets isotropic Gaussian noise of
             per-coordinate sd = eps * sqrt(tr C_L / d), C_L the fit covariance of that (raw) site,
             eps = 0.1, 0.3, 1 (||noise|| is about eps times the RMS distance of a vector to its mean)
  swap_ood   one site (uniformly drawn) of a dev_id sentence replaced by the same site of a random
             dev OOD sentence (any of the three categories)
  swap_ood6  the same, always at layer 6 (the site where the per-site Gaussian is weak)
"""
import argparse
import hashlib
import math
import os
import sys
import time

# The machine this was written on is shared: one BLAS thread unless the caller says otherwise.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

# The shared MiniLM activations, next to the repository (../shared/data/minilm from its root).
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data", "minilm")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from sklearn.covariance import ledoit_wolf  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

LAYERS = (2, 4, 6)
CATS = ("code", "non_english", "base64")
SYNTH = ("chim_24/6", "chim_2/46", "noise0.1", "noise0.3", "noise1", "swap_ood", "swap_ood6")
NOISE_EPS = {"noise0.1": 0.1, "noise0.3": 0.3, "noise1": 1.0}
ALPHA = 0.01
K = 10
RANKS = (64, 128, 256)
EIGEN_FLOOR_REL = 1e-10  # as actwatch_detect::gaussian

SITE_G = ["g2", "g4", "g6"]
SITE_K = ["k2", "k4", "k6"]
A_SLOTS = ["g2", "k2", "g4", "k4", "g6", "k6"]
# name -> (slots, fusion, description)
MONITORS = {
    "A": (A_SLOTS, "minp", "today's default: 3 sites x {gauss, knn}, min-p"),
    "B": (["gJ"], "minp", "joint gauss alone"),
    "C": (A_SLOTS + ["gJ"], "minp", "A + joint gauss (7 slots), min-p"),
    "D": (["gJ", "kJ"], "minp", "joint gauss + joint knn, min-p"),
    "E": (A_SLOTS + ["gJ", "kJ"], "minp", "A + joint gauss + joint knn (8 slots), min-p"),
    # G was added after the first run showed min-p's multiplicity cost on C (see joint.md): the joint
    # Gaussian contains each site's Gaussian evidence (d2_joint = d2_2 + d2_{4|2} + d2_{6|2,4}), so it
    # replaces the three per-site Gaussians; per-site kNN keeps a non-parametric, per-site view.
    "G": (SITE_K + ["gJ"], "minp", "joint gauss + per-site knn (4 slots), min-p"),
    "F1": (A_SLOTS + ["gJ"], "fisher", "C's slots, Fisher"),
    "F2": (A_SLOTS + ["gJ"], "cauchy", "C's slots, Cauchy"),
    "A-fisher": (A_SLOTS, "fisher", "A's slots, Fisher (reference)"),
    "A-cauchy": (A_SLOTS, "cauchy", "A's slots, Cauchy (reference)"),
    "C-r256": (A_SLOTS + ["gJr256"], "minp", "C with the joint gauss at rank 256 (actwatch's default rank at d > 1024)"),
    "B-r64": (["gJr64"], "minp", "joint gauss, rank 64 + residual"),
    "B-r128": (["gJr128"], "minp", "joint gauss, rank 128 + residual"),
    "B-r256": (["gJr256"], "minp", "joint gauss, rank 256 + residual"),
}
SINGLES = ["g2", "k2", "g4", "k4", "g6", "k6", "gJ", "kJ"]


# ----------------------------------------------------------------------------- data
def load(path):
    t = pq.read_table(path, columns=["id", "layer", "activation"])
    ids = np.array(t.column("id").to_pylist())
    layer = t.column("layer").to_numpy()
    act = t.column("activation").combine_chunks()
    x = act.values.to_numpy(zero_copy_only=False).reshape(len(ids), -1).astype(np.float64)
    uid, inv = np.unique(ids, return_inverse=True)
    out = np.full((len(uid), len(LAYERS), x.shape[1]), np.nan)
    li = np.array([LAYERS.index(int(v)) for v in layer])
    out[inv, li] = x
    assert not np.isnan(out).any(), path
    return uid, out


def split_ids(ids, seed, cal_frac=0.25):
    h = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") for i in ids],
                 dtype=np.float64) / 2.0**64
    return h < cal_frac  # True -> calibration


def l2n(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def joint(x):
    """(n, 3, d) raw -> (n, 3d): concatenation of the L2-normalised site vectors."""
    return l2n(x).reshape(len(x), -1)


# ----------------------------------------------------------------------------- detectors
class Gauss:
    """Ledoit-Wolf shrunk covariance, eigendecomposed once (as actwatch's GaussianDetector)."""

    def fit(self, x):
        self.mu = x.mean(axis=0)
        cov, self.shrinkage = ledoit_wolf(x)
        lam, v = np.linalg.eigh(cov)
        lam = np.maximum(lam, EIGEN_FLOOR_REL * lam.mean())
        order = np.argsort(lam)[::-1]
        self.lam, self.v = lam[order], v[:, order]
        return self

    def score(self, x, rank=None):
        y = x - self.mu
        d = len(self.lam)
        r = d if rank is None else min(rank, d)
        p = y @ self.v[:, :r]
        s = (p * p / self.lam[:r]).sum(axis=1)
        if r < d:
            sigma2 = self.lam[r:].mean()
            s = s + ((y * y).sum(axis=1) - (p * p).sum(axis=1)) / sigma2
        return s


def kth_distance(sim, k=K):
    return 1.0 - (-np.partition(-sim, k - 1, axis=1)[:, k - 1])


class SiteKnn:
    """Exact cosine kNN at every site and on the joint concatenation, sharing the per-site products."""

    def fit(self, x):  # x: (n, 3, d) raw
        self.refs = [l2n(x[:, j]).astype(np.float32) for j in range(len(LAYERS))]
        return self

    def score(self, x, chunk=1500):
        q = [l2n(x[:, j]).astype(np.float32) for j in range(len(LAYERS))]
        out = {k: np.empty(len(x)) for k in SITE_K + ["kJ"]}
        for a in range(0, len(x), chunk):
            b = min(a + chunk, len(x))
            tot = None
            for j, key in enumerate(SITE_K):
                s = q[j][a:b] @ self.refs[j].T
                out[key][a:b] = kth_distance(s)
                tot = s if tot is None else tot + s
            out["kJ"][a:b] = kth_distance(tot / len(LAYERS))
        return out


# ----------------------------------------------------------------------------- p-values
def tail_m(n):
    return min(max(10, math.ceil(0.05 * n)), n - 1)


def nlp_sorted(c, s):
    """Smoothed conformal -ln p of scores s against SORTED calibration scores c (log-space tail)."""
    n = len(c)
    m = tail_m(n)
    pc = (1.0 + n - np.arange(n)) / (n + 1.0)
    ti = n - 1 - m
    t = c[ti]
    pt = pc[ti]
    beta = max(np.mean(c[ti + 1:] - t), 1e-12)
    s = np.asarray(s, dtype=np.float64)
    out = -np.log(np.interp(s, c[: ti + 1], pc[: ti + 1], left=1.0, right=pt))
    hi = s > t
    out[hi] = -np.log(pt) + (s[hi] - t) / beta
    return out


def nlp_of(cal, s):
    return nlp_sorted(np.sort(np.asarray(cal, dtype=np.float64)), s)


def nlp_loo(cal):
    cal = np.asarray(cal, dtype=np.float64)
    order = np.argsort(cal, kind="stable")
    c = cal[order]
    out = np.empty(len(c))
    for j in range(len(c)):
        out[order[j]] = nlp_sorted(np.delete(c, j), c[j:j + 1])[0]
    return out


def conformal_p(cal, s):
    c = np.sort(cal)
    ge = len(c) - np.searchsorted(c, s, side="left")
    return (1.0 + ge) / (len(c) + 1.0)


# ----------------------------------------------------------------------------- fusion
def cauchy_stat(nlp):
    """asinh(T), T = mean cot(pi p') with p' = p (1 - 1e-3); log space for tiny p (as fusion.rs)."""
    x = np.maximum(nlp, 0.0) - math.log(1.0 - 1e-3)
    p = np.exp(-x)
    small = p <= 1e-8
    direct = np.where(small, 0.0, 1.0 / np.tan(np.pi * np.where(small, 0.5, p)))
    logt = np.where(small, x - math.log(math.pi), -np.inf)
    maxlog = np.max(np.where(small, logt, np.log(np.maximum(direct, 1e-300))), axis=1)
    m = nlp.shape[1]
    out = np.empty(len(nlp))
    lo = maxlog <= 600.0
    tsum = (direct + np.where(small, np.exp(np.minimum(logt, 600.0)), 0.0)).sum(axis=1)
    out[lo] = np.arcsinh(tsum[lo] / m)
    if (~lo).any():
        ml = maxlog[~lo][:, None]
        r = (direct[~lo] * np.exp(-ml) + np.where(small[~lo], np.exp(logt[~lo] - ml), 0.0)).sum(axis=1)
        out[~lo] = math.log(2.0) + ml[:, 0] + np.log(r) - math.log(m)
    return out


def fuse(nlp, rule):
    if rule == "minp":
        return nlp.max(axis=1) - math.log(nlp.shape[1])
    if rule == "fisher":
        return 2.0 * nlp.sum(axis=1)
    if rule == "cauchy":
        return cauchy_stat(nlp)
    raise ValueError(rule)


# ----------------------------------------------------------------------------- synthetic sets
def derangement(rng, n):
    p = rng.permutation(n)
    fixed = np.nonzero(p == np.arange(n))[0]
    for i in fixed:  # swap with a neighbour: no fixed point remains
        j = (i + 1) % n
        p[i], p[j] = p[j], p[i]
    assert not (p == np.arange(n)).any()
    return p


def synthetic(dev, ood, site_sd, rng):
    n = len(dev)
    out = {}
    b = derangement(rng, n)
    x = dev.copy()
    x[:, 2] = dev[b, 2]
    out["chim_24/6"] = x
    b = derangement(rng, n)
    x = dev.copy()
    x[:, 1:] = dev[b, 1:]
    out["chim_2/46"] = x
    for name, eps in NOISE_EPS.items():
        x = dev.copy()
        site = rng.integers(0, len(LAYERS), n)
        x[np.arange(n), site] += eps * site_sd[site][:, None] * rng.standard_normal((n, dev.shape[2]))
        out[name] = x
    x = dev.copy()
    site = rng.integers(0, len(LAYERS), n)
    j = rng.integers(0, len(ood), n)
    x[np.arange(n), site] = ood[j, site]
    out["swap_ood"] = x
    x = dev.copy()
    j = rng.integers(0, len(ood), n)
    x[:, 2] = ood[j, 2]
    out["swap_ood6"] = x
    return out


# ----------------------------------------------------------------------------- one seed
def run_seed(data, seed, timing):
    tr_ids, tr = data["train"]
    is_cal = split_ids(tr_ids, seed)
    fit, cal = tr[~is_cal], tr[is_cal]
    rng = np.random.default_rng(1000 + seed)
    ood_all = np.concatenate([data[c] for c in CATS])
    site_sd = np.array([math.sqrt(np.trace(np.cov(fit[:, j], rowvar=False)) / fit.shape[2])
                        for j in range(len(LAYERS))])
    sets = {"cal": cal, "dev_id": data["dev_id"]}
    sets.update({c: data[c] for c in CATS})
    sets.update(synthetic(data["dev_id"], ood_all, site_sd, rng))

    raw = {}  # slot -> set -> raw scores
    t0 = time.perf_counter()
    for j, key in enumerate(SITE_G):
        g = Gauss().fit(l2n(fit[:, j]))
        raw[key] = {s: g.score(l2n(x[:, j])) for s, x in sets.items()}
    timing.setdefault("site gauss: fit 3 + score", []).append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    gj = Gauss().fit(joint(fit))
    t1 = time.perf_counter()
    timing.setdefault("joint gauss: fit (LW + eigh, d=1152)", []).append(t1 - t0)
    for r in (None,) + RANKS:
        key = "gJ" if r is None else f"gJr{r}"
        t1 = time.perf_counter()
        raw[key] = {s: gj.score(joint(x), rank=r) for s, x in sets.items()}
        timing.setdefault(f"joint gauss: score all sets, rank {r or 1152}", []).append(time.perf_counter() - t1)
    t0 = time.perf_counter()
    kn = SiteKnn().fit(fit)
    sc = {s: kn.score(x) for s, x in sets.items()}
    for key in SITE_K + ["kJ"]:
        raw[key] = {s: sc[s][key] for s in sets}
    timing.setdefault("knn: 3 sites + joint, score all sets", []).append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    nlp = {}
    for key, r in raw.items():
        c = np.sort(r["cal"])
        nlp[key] = {s: (nlp_loo(r["cal"]) if s == "cal" else nlp_sorted(c, v)) for s, v in r.items()}
    timing.setdefault("conformal -ln p (LOO on cal), all slots", []).append(time.perf_counter() - t0)

    mons = dict(MONITORS)
    for key in SINGLES:
        mons[key] = ([key], "minp", "single slot")
    results = {}
    n_dev = len(sets["dev_id"])
    for name, (slots, rule, _) in mons.items():
        f = {s: fuse(np.stack([nlp[k][s] for k in slots], axis=1), rule) for s in sets}
        o = {"fpr": float(np.mean(conformal_p(f["cal"], f["dev_id"]) <= ALPHA))}
        for s in list(CATS) + list(SYNTH) + ["pooled"]:
            v = np.concatenate([f[c] for c in CATS]) if s == "pooled" else f[s]
            y = np.r_[np.zeros(n_dev), np.ones(len(v))]
            o["auc_" + s] = roc_auc_score(y, np.r_[f["dev_id"], v])
            o["rec_" + s] = float(np.mean(conformal_p(f["cal"], v) <= ALPHA))
        results[name] = o
    info = {"n_fit": int((~is_cal).sum()), "n_cal": int(is_cal.sum()), "lw_joint": gj.shrinkage,
            "lam_joint": gj.lam}
    return results, info


# ----------------------------------------------------------------------------- report
def ms(vals, digits=4):
    v = np.asarray(vals)
    return f"{v.mean():.{digits}f} ±{v.std(ddof=1) if len(v) > 1 else 0.0:.{digits}f}"


def table(title, rows, cols, per_seed, digits=4):
    print(f"\n### {title}\n")
    print("| monitor | " + " | ".join(h for h, _ in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name in rows:
        vals = [ms([r[name][k] for r in per_seed], digits) for _, k in cols]
        print(f"| {name} | " + " | ".join(vals) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    t_start = time.perf_counter()
    data = {"train": load(f"{a.data}/train.parquet")}
    data["dev_id"] = load(f"{a.data}/dev_id.parquet")[1]
    for c in CATS:
        data[c] = load(f"{a.data}/dev_ood_{c}.parquet")[1]
    t_load = time.perf_counter() - t_start
    seeds = [int(s) for s in a.seeds.split(",")]
    per_seed, timing = [], {}
    for seed in seeds:
        t0 = time.perf_counter()
        res, info = run_seed(data, seed, timing)
        per_seed.append(res)
        lam = info["lam_joint"]
        print(f"seed {seed}: n_fit {info['n_fit']} n_cal {info['n_cal']}  joint LW shrinkage {info['lw_joint']:.4f}"
              f"  joint eigenvalues: top {lam[0]:.3g}, #{RANKS[0]} {lam[RANKS[0] - 1]:.3g},"
              f" #{RANKS[-1]} {lam[RANKS[-1] - 1]:.3g}, min {lam[-1]:.3g};"
              f"  {time.perf_counter() - t0:.1f}s", flush=True)

    print(f"\nmean ±sd over seeds {a.seeds} (sd with ddof 1); AUROC of the fused (calibrated) statistic;"
          f" recall and FPR at a {ALPHA:.0%} target, calibrated on the calibration computations")
    print("\nmonitors:")
    for name, (slots, rule, desc) in MONITORS.items():
        print(f"  {name:9s} {rule:6s} {'+'.join(slots):34s} {desc}")
    rows = list(MONITORS) + SINGLES
    vis = [(c, "auc_" + c) for c in CATS] + [("pooled OOD", "auc_pooled"), ("FPR dev_id", "fpr"),
                                               ("recall pooled", "rec_pooled")]
    table("Visible dev OOD categories: AUROC, achieved FPR, pooled recall", rows, vis, per_seed)
    table("Visible dev OOD categories: recall at the 1% target", rows,
          [(c, "rec_" + c) for c in CATS] + [("pooled", "rec_pooled")], per_seed, 3)
    table("SYNTHETIC held-out sets: AUROC vs dev_id", rows, [(s, "auc_" + s) for s in SYNTH], per_seed)
    table("SYNTHETIC held-out sets: recall at the 1% target", rows, [(s, "rec_" + s) for s in SYNTH], per_seed, 3)

    print("\n### Runtime (seconds per seed, this machine, 1 BLAS thread; mean over seeds)\n")
    print(f"- load parquet: {t_load:.1f}")
    for k, v in timing.items():
        print(f"- {k}: {np.mean(v):.1f}")
    print(f"- total: {time.perf_counter() - t_start:.1f}")


if __name__ == "__main__":
    sys.exit(main())
