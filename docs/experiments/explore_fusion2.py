#!/usr/bin/env python3
"""Follow-up prototype: cross-conformal (K-fold) calibration and correlation-aware (meta-Gaussian) fusion.

Prototype only; nothing here is used by the product. Reuses explore_defaults.py (loading, detectors,
smoothed conformal p-values).
Run:  python docs/experiments/explore_fusion2.py [--data DIR] [--seeds 0,1,2] [--k 4]

Detectors: gauss_l2 and knn (cosine, k=10) at layers 2, 4, 6 (6 slots), fixed a priori.

Calibration pipelines (per seed):
  holdout  fit on 75% of train (seeded hash), per-slot calibration on the other 25% (LOO nlp for cal rows);
           fused statistic calibrated on those 25%.
  cv_full  K-fold cross-conformal (folds = floor(K * seeded hash)): out-of-fold raw scores for all train rows
           are the per-slot calibration sets (LOO nlp for train rows); final detectors fit on ALL train score
           the test points; fused statistic calibrated on the out-of-fold fused statistics of all train rows.
  cv_avg   as cv_full, but test points are scored by the K fold models and the raw scores averaged
           (keeps test scores on the scale of the out-of-fold scores: every model saw (K-1)/K of train).

Fusion rules over the 6 slots (nlp = -ln p, smoothed):
  minp     max nlp
  fisher   2 sum nlp
  stouffer sum z / sqrt(1' R 1)         z = Phi^-1(1 - p); R = corr(z) over calibration rows
  gls      (R^-1 1)' z / sqrt(1' R^-1 1)  (best linear unbiased estimate of a common shift in z)
  mg_quad  z+' R^-1 z+, z+ = max(z, 0)
Every fused statistic is then calibrated empirically on the calibration rows, so constant rescalings
(Brown's correction for Fisher, the sqrt(1'R1) for Stouffer) change nothing; only the ranking matters.
"""
import argparse
import os
import sys
import time

# The shared MiniLM activations, next to the repository (../shared/data/minilm from its root).
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data", "minilm")

import numpy as np
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import explore_defaults as ed  # noqa: E402

LAYERS = ed.LAYERS
CATS = ed.CATS
BAR = ed.BAR
ALPHA = ed.ALPHA
DETS = ("gauss_l2", "knn")
KEYS = [(L, D) for L in LAYERS for D in DETS]
RULES = ("minp", "fisher", "stouffer", "gls", "mg_quad")
TEST = ["dev_id"] + list(CATS)


# ----------------------------------------------------------------------------- fast LOO nlp
def nlp_loo_fast(cal):
    """Same values as ed.nlp_loo but vectorised: the LOO set of point j is the sorted array without it."""
    cal = np.asarray(cal, dtype=np.float64)
    n = len(cal)
    order = np.argsort(cal, kind="stable")
    c = cal[order]
    out_sorted = np.empty(n)
    # for the LOO set (n-1 points) tail threshold index and tail mean depend on whether j is in the tail
    nn = n - 1
    m = ed.tail_m(nn)
    ti = nn - 1 - m
    pc = (1.0 + nn - np.arange(nn)) / (nn + 1.0)
    pt = pc[ti]
    for j in range(n):  # cheap per-j work: only index arithmetic on the shared sorted array
        # LOO sorted array = c[:j] ++ c[j+1:]; its element at index i is c[i] if i<j else c[i+1]
        t = c[ti] if ti < j else c[ti + 1]
        tail = np.r_[c[ti + 1:j], c[j + 1:]] if ti + 1 < j else c[max(ti + 2, j + 1):]
        beta = max(np.mean(tail) - t, 1e-12)
        s = c[j]
        if s > t:
            out_sorted[j] = -(np.log(pt) - (s - t) / beta)
        else:
            # interpolate over LOO bulk [0..ti]
            xs = np.r_[c[:j], c[j + 1:ti + 2]] if j <= ti + 1 else c[:ti + 1]
            out_sorted[j] = -np.log(np.interp(s, xs, pc[:ti + 1], left=1.0, right=pt))
    out = np.empty(n)
    out[order] = out_sorted
    return out


# ----------------------------------------------------------------------------- z scores / fusion
def z_of_nlp(nlp, n_cal):
    """z = Phi^-1(1 - p) with p = exp(-nlp), stable for huge nlp; p clipped below 1 - 0.5/(n_cal+1)."""
    nlp = np.asarray(nlp, dtype=np.float64)
    p = np.exp(-nlp)
    p = np.minimum(p, 1.0 - 0.5 / (n_cal + 1.0))
    z = np.empty_like(nlp)
    ok = nlp < 600.0
    z[ok] = norm.isf(p[ok])
    if (~ok).any():  # asymptotic: ln Q(z) ~ -z^2/2 - ln z - ln sqrt(2 pi); solve by fixed point
        a = nlp[~ok]
        zz = np.sqrt(2.0 * a)
        for _ in range(5):
            zz = np.sqrt(np.maximum(2.0 * a - np.log(2.0 * np.pi) - 2.0 * np.log(zz), 1e-12))
        z[~ok] = zz
    return z


class Fuser:
    def __init__(self, rule, cal_nlp, n_cal):
        self.rule = rule
        self.n_cal = n_cal
        if rule in ("stouffer", "gls", "mg_quad"):
            z = z_of_nlp(cal_nlp, n_cal)
            self.R = np.corrcoef(z, rowvar=False)
            self.Ri = np.linalg.inv(self.R)
            one = np.ones(len(self.R))
            self.w = self.Ri @ one / np.sqrt(one @ self.Ri @ one)
            self.s1 = np.sqrt(one @ self.R @ one)

    def __call__(self, nlp):
        r = self.rule
        if r == "minp":
            return nlp.max(axis=1)
        if r == "fisher":
            return 2.0 * nlp.sum(axis=1)
        z = z_of_nlp(nlp, self.n_cal)
        if r == "stouffer":
            return z.sum(axis=1) / self.s1
        if r == "gls":
            return z @ self.w
        if r == "mg_quad":
            zp = np.maximum(z, 0.0)
            return np.einsum("ij,jk,ik->i", zp, self.Ri, zp)
        raise ValueError(r)


def evaluate(nlp, rule):
    """nlp: dict name -> (n, n_slots) array incl. 'cal' (LOO)."""
    n_cal = len(nlp["cal"])
    fu = Fuser(rule, nlp["cal"], n_cal)
    f = {k: fu(v) for k, v in nlp.items()}
    out = {"fpr": float(np.mean(ed.conformal_p(f["cal"], f["dev_id"]) <= ALPHA))}
    for c in CATS:
        y = np.r_[np.zeros(len(f["dev_id"])), np.ones(len(f[c]))]
        out[c] = roc_auc_score(y, np.r_[f["dev_id"], f[c]])
        out["tpr_" + c] = float(np.mean(ed.conformal_p(f["cal"], f[c]) <= ALPHA))
    return out, fu


# ----------------------------------------------------------------------------- pipelines
def hash_u(ids, seed):
    import hashlib
    return np.array([int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") for i in ids],
                    dtype=np.float64) / 2.0**64


def pipelines(data, seed, K):
    """Return {pipeline: {'cal': (n_cal, 6) loo nlp, test_name: (n, 6) nlp}} and full-model raw AUROCs."""
    tr_ids, tr = data["train"]
    u = hash_u(tr_ids, seed)
    fold = np.minimum((u * K).astype(int), K - 1)
    hold = {"cal": [], **{n: [] for n in TEST}}
    cvf = {"cal": [], **{n: [] for n in TEST}}
    cva = {"cal": [], **{n: [] for n in TEST}}
    single = {}
    for L, D in KEYS:
        li = LAYERS.index(L)
        x = tr[:, li]
        oof = np.empty(len(x))
        tavg = {n: np.zeros(len(data[n][1])) for n in TEST}
        hold_raw = None
        for k in range(K):
            m = fold == k
            det = ed.make_detector(D).fit(x[~m])
            oof[m] = det.score(x[m])
            for n in TEST:
                sc = det.score(data[n][1][:, li])
                tavg[n] += sc / K
                if k == 0:  # fold 0 == the 25% holdout calibration part (u < 0.25 for K=4)
                    hold_raw = hold_raw or {}
                    hold_raw[n] = sc
        # holdout pipeline (fold 0 is cal; identical to ed.split_ids(seed, 1/K))
        cal0 = oof[fold == 0]
        hold["cal"].append(nlp_loo_fast(cal0))
        for n in TEST:
            hold[n].append(ed.nlp_of(cal0, hold_raw[n]))
        # cross-conformal pipelines
        loo = nlp_loo_fast(oof)
        cvf["cal"].append(loo)
        cva["cal"].append(loo)
        full = ed.make_detector(D).fit(x)
        for n in TEST:
            sf = full.score(data[n][1][:, li])
            cvf[n].append(ed.nlp_of(oof, sf))
            cva[n].append(ed.nlp_of(oof, tavg[n]))
            if n != "dev_id":
                y = np.r_[np.zeros(len(data["dev_id"][1])), np.ones(len(sf))]
                single.setdefault((L, D), {})[n] = roc_auc_score(
                    y, np.r_[full.score(data["dev_id"][1][:, li]), sf])
    st = lambda d: {k: np.stack(v, axis=1) for k, v in d.items()}
    return {"holdout": st(hold), "cv_full": st(cvf), "cv_avg": st(cva)}, single, int((fold == 0).sum())


def fmt(o):
    s = " ".join(f"{o[c]:.4f}" for c in CATS) + f" | fpr {o['fpr']:.4f} | tpr " + " ".join(
        f"{o['tpr_' + c]:.3f}" for c in CATS)
    miss = [f"{c}{o[c] - BAR[c]:+.4f}" for c in CATS if o[c] < BAR[c]]
    return s + (" | BAR" if not miss else " | miss " + ",".join(miss))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--check-loo", action="store_true", help="check nlp_loo_fast against ed.nlp_loo")
    a = ap.parse_args()
    if a.check_loo:
        rng = np.random.default_rng(0)
        for n in (50, 211, 1500):
            c = rng.gamma(2.0, size=n)
            d = np.abs(nlp_loo_fast(c) - ed.nlp_loo(c)).max()
            print(f"loo check n={n}: max abs diff {d:.2e}")
            assert d < 1e-9
    t0 = time.time()
    data = {"train": ed.load(f"{a.data}/train.parquet"), "dev_id": ed.load(f"{a.data}/dev_id.parquet")}
    for c in CATS:
        data[c] = ed.load(f"{a.data}/dev_ood_{c}.parquet")
    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        P, single, n0 = pipelines(data, seed, a.k)
        print(f"\n=== seed {seed} (K={a.k}, holdout n_cal {n0}; {time.time() - t0:.0f}s) ===", flush=True)
        if seed == 0:
            print("single slot AUROC, detector fit on ALL train:  code non_english base64")
            for key, s in single.items():
                print(f"  L{key[0]} {key[1]:9s} " + " ".join(f"{s[c]:.4f}" for c in CATS))
        for pname, nlp in P.items():
            for rule in RULES:
                o, fu = evaluate(nlp, rule)
                results.append((pname, rule, seed, o))
                print(f"  {pname:8s} {rule:9s} {fmt(o)}", flush=True)
                if rule == "gls" and seed == 0:
                    print("      R (slots " + ",".join(f"L{l}{d[0]}" for l, d in KEYS) + "):\n"
                          + "\n".join("        " + " ".join(f"{v:5.2f}" for v in row) for row in fu.R)
                          + "\n      gls weights " + " ".join(f"{v:+.2f}" for v in fu.w))
    print("\n=== summary over seeds: mean AUROC | min AUROC | fpr per seed ===")
    groups = {}
    for pname, rule, seed, o in results:
        groups.setdefault((pname, rule), []).append(o)
    for (pname, rule), os_ in groups.items():
        mean = {c: np.mean([o[c] for o in os_]) for c in CATS}
        mn = {c: np.min([o[c] for o in os_]) for c in CATS}
        ok_fpr = all(0.005 <= o["fpr"] <= 0.015 for o in os_)
        bar = all(all(o[c] >= BAR[c] for c in CATS) for o in os_)
        perc = ",".join(c[:4] for c in CATS if all(o[c] >= BAR[c] for o in os_))
        print(f"  {pname:8s} {rule:9s} mean " + " ".join(f"{mean[c]:.4f}" for c in CATS)
              + " | min " + " ".join(f"{mn[c]:.4f}" for c in CATS)
              + " | fpr " + ",".join(f"{o['fpr']:.3f}" for o in os_) + ("" if ok_fpr else " FPR-OUT")
              + (" | BAR(all seeds)" if bar else f" | bar met all seeds: {perc or '-'}"))
    print(f"\ntotal {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
