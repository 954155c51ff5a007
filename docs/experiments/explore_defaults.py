#!/usr/bin/env python3
"""Exploratory experiment: default detectors and fusion rule for the activation-anomaly monitor.

Prototype only (numpy / scikit-learn); nothing here is used by the product.
Run:  python docs/experiments/explore_defaults.py [--data DIR] [--quick]

Pipeline (per seed, calibration fraction):
  1. split train sentences by a seeded hash into fit / calibration;
  2. per layer L in {2,4,6} and detector D fit on fit rows of layer L;
     detectors: gauss_l2 (L2-normalise + Ledoit-Wolf Mahalanobis^2), knn (cosine, k-th NN distance),
     gauss_raw (Ledoit-Wolf Mahalanobis^2 on raw vectors);
  3. smoothed conformal p-value per (L, D): interpolated empirical p in the bulk, exponential tail
     beyond the (m+1)-th largest calibration score (m = max(10, ceil(0.05 n))); calibration rows get
     leave-one-out p-values; nlp = -ln p;
  4. fuse nlp across (L, D) per sentence: fisher, minp, cauchy, fisher over per-layer max;
  5. calibrate the fused statistic on calibration sentences, flag at p <= alpha (0.01);
  6. report AUROC of fused statistic dev_id vs each OOD category, achieved FPR on dev_id, TPR per category.
"""
import argparse
import os
import hashlib
import math
import sys

# The shared MiniLM activations, next to the repository (../shared/data/minilm from its root).
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data", "minilm")

import numpy as np
import pyarrow.parquet as pq
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

LAYERS = (2, 4, 6)
CATS = ("code", "non_english", "base64")
BAR = {"code": 0.994, "non_english": 0.9988, "base64": 0.9995}
ALPHA = 0.01


# ----------------------------------------------------------------------------- data
def load(path):
    t = pq.read_table(path, columns=["id", "layer", "activation"])
    ids = np.array(t.column("id").to_pylist())
    layer = t.column("layer").to_numpy()
    act = t.column("activation").combine_chunks()
    x = act.values.to_numpy(zero_copy_only=False).reshape(len(ids), -1).astype(np.float64)
    uid = np.array(sorted(set(ids.tolist())))
    pos = {u: i for i, u in enumerate(uid)}
    out = np.full((len(uid), len(LAYERS), x.shape[1]), np.nan)
    li = {L: j for j, L in enumerate(LAYERS)}
    for r in range(len(ids)):
        out[pos[ids[r]], li[int(layer[r])]] = x[r]
    assert not np.isnan(out).any(), path
    return uid, out


def split_ids(ids, seed, cal_frac):
    h = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") for i in ids],
                 dtype=np.float64) / 2.0**64
    return h < cal_frac  # True -> calibration


# ----------------------------------------------------------------------------- detectors
def l2n(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Gauss:
    def __init__(self, normalise):
        self.normalise = normalise

    def fit(self, x):
        if self.normalise:
            x = l2n(x)
        self.lw = LedoitWolf().fit(x)
        return self

    def score(self, x):
        if self.normalise:
            x = l2n(x)
        return self.lw.mahalanobis(x)  # squared distance


class KNN:
    def __init__(self, k, center=False):
        self.k = k
        self.center = center

    def fit(self, x):
        self.mu = x.mean(axis=0) if self.center else 0.0
        self.f = l2n(x - self.mu)
        return self

    def score(self, x):
        s = l2n(x - self.mu) @ self.f.T
        kth = -np.partition(-s, self.k - 1, axis=1)[:, self.k - 1]
        return 1.0 - kth


def make_detector(name):
    if name == "gauss_l2":
        return Gauss(True)
    if name == "gauss_raw":
        return Gauss(False)
    if name.startswith("knnc"):  # centred cosine: subtract fit mean before normalising
        k = int(name[4:]) if len(name) > 4 else 10
        return KNN(k, center=True)
    if name.startswith("knn"):
        k = int(name[3:]) if len(name) > 3 else 10
        return KNN(k)
    raise ValueError(name)


# ----------------------------------------------------------------------------- p-values
def tail_m(n):
    return max(10, math.ceil(0.05 * n))


def smoothed_p(cal, s):
    """Smoothed conformal p-value of scores s against calibration scores cal."""
    c = np.sort(np.asarray(cal, dtype=np.float64))
    n = len(c)
    m = tail_m(n)
    pc = (1.0 + n - np.arange(n)) / (n + 1.0)  # conformal p at each sorted calibration score (no ties)
    ti = n - 1 - m  # index of the (m+1)-th largest
    t = c[ti]
    pt = pc[ti]
    beta = max(np.mean(c[ti + 1:] - t), 1e-12)
    s = np.asarray(s, dtype=np.float64)
    p = np.interp(s, c[: ti + 1], pc[: ti + 1], left=1.0, right=pt)
    hi = s > t
    p[hi] = pt * np.exp(-(s[hi] - t) / beta)
    return p


def nlp_of(cal, s):
    return -np.log(smoothed_p(cal, s))


def nlp_loo(cal):
    cal = np.asarray(cal)
    out = np.empty(len(cal))
    for j in range(len(cal)):
        out[j] = nlp_of(np.delete(cal, j), cal[j:j + 1])[0]
    return out


# ----------------------------------------------------------------------------- fusion
def cauchy_stat(nlp):
    p = np.exp(-nlp)
    # tan((0.5-p)pi); for tiny p use 1/(p pi) to avoid precision loss
    small = p < 1e-15
    v = np.where(small, 1.0 / (np.pi * np.maximum(p, 1e-300)), np.tan((0.5 - np.where(small, 0.25, p)) * np.pi))
    return v.mean(axis=-1)


def fuse(nlp, keys, rule):
    """nlp: (n_sent, n_keys) array; keys: list of (layer, detector)."""
    if rule == "fisher":
        return 2.0 * nlp.sum(axis=1)
    if rule == "minp":
        return nlp.max(axis=1)
    if rule == "cauchy":
        return cauchy_stat(nlp)
    if rule == "fisher_layermax":
        cols = []
        for L in dict.fromkeys(l for l, _ in keys):  # layer groups ("cat" is its own group)
            idx = [i for i, (l, _) in enumerate(keys) if l == L]
            cols.append(nlp[:, idx].max(axis=1))
        return 2.0 * np.stack(cols, axis=1).sum(axis=1)
    raise ValueError(rule)


def conformal_p(cal, s):
    c = np.sort(cal)
    ge = len(c) - np.searchsorted(c, s, side="left")
    return (1.0 + ge) / (len(c) + 1.0)


# ----------------------------------------------------------------------------- experiment
def run_split(data, seed, cal_frac, detectors, layers=LAYERS, cat_detectors=()):
    """Fit all (L, D), return dict key -> {'cal': loo nlp, set: nlp} and raw scores for reference."""
    tr_ids, tr = data["train"]
    is_cal = split_ids(tr_ids, seed, cal_frac)
    fit, cal = tr[~is_cal], tr[is_cal]
    res, raw = {}, {}
    for L in layers:
        li = LAYERS.index(L)
        for D in detectors:
            det = make_detector(D).fit(fit[:, li])
            cs = det.score(cal[:, li])
            r = {"cal": nlp_loo(cs)}
            rr = {}
            for name in ["dev_id"] + list(CATS):
                sc = det.score(data[name][1][:, li])
                rr[name] = sc
                r[name] = nlp_of(cs, sc)
            res[(L, D)] = r
            raw[(L, D)] = rr
    for D in cat_detectors:  # one detector on the concatenation of the L2-normalised layers
        cat = lambda a: np.concatenate([l2n(a[:, LAYERS.index(L)]) for L in layers], axis=1)
        det = make_detector(D).fit(cat(fit))
        cs = det.score(cat(cal))
        r, rr = {"cal": nlp_loo(cs)}, {}
        for name in ["dev_id"] + list(CATS):
            rr[name] = det.score(cat(data[name][1]))
            r[name] = nlp_of(cs, rr[name])
        res[("cat", D)] = r
        raw[("cat", D)] = rr
    return res, raw, int(is_cal.sum())


def evaluate(res, keys, rule):
    stack = lambda name: np.stack([res[k][name] for k in keys], axis=1)
    f = {name: fuse(stack(name), keys, rule) for name in ["cal", "dev_id"] + list(CATS)}
    out = {}
    pid = conformal_p(f["cal"], f["dev_id"])
    out["fpr"] = float(np.mean(pid <= ALPHA))
    for c in CATS:
        y = np.r_[np.zeros(len(f["dev_id"])), np.ones(len(f[c]))]
        out[c] = roc_auc_score(y, np.r_[f["dev_id"], f[c]])
        out["tpr_" + c] = float(np.mean(conformal_p(f["cal"], f[c]) <= ALPHA))
    return out


def auroc_single(raw, key):
    d = raw[key]
    return {c: roc_auc_score(np.r_[np.zeros(len(d["dev_id"])), np.ones(len(d[c]))], np.r_[d["dev_id"], d[c]])
            for c in CATS}


def meets(o):
    return all(o[c] >= BAR[c] for c in CATS)


def fmt(o):
    s = " ".join(f"{o[c]:.4f}" for c in CATS)
    s += f" | fpr {o['fpr']:.4f} | tpr " + " ".join(f"{o['tpr_' + c]:.3f}" for c in CATS)
    return s + (" | BAR" if meets(o) else " | miss " + ",".join(
        f"{c}{o[c] - BAR[c]:+.4f}" for c in CATS if o[c] < BAR[c]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--extra", action="store_true", help="also sweep k and other variants")
    a = ap.parse_args()
    data = {"train": load(f"{a.data}/train.parquet"), "dev_id": load(f"{a.data}/dev_id.parquet")}
    for c in CATS:
        data[c] = load(f"{a.data}/dev_ood_{c}.parquet")
    seeds = [int(s) for s in a.seeds.split(",")]
    rules = ["fisher", "minp", "cauchy", "fisher_layermax"]
    dets_all = ["gauss_l2", "knn", "gauss_raw"]
    cat_dets = []
    if a.extra:
        dets_all += ["knn1", "knn5", "knn20", "knn50", "knnc"]
        cat_dets = ["gauss_l2", "knnc"]
    configs = {
        "l2+knn": [(L, D) for L in LAYERS for D in ("gauss_l2", "knn")],
        "l2+knn+raw": [(L, D) for L in LAYERS for D in ("gauss_l2", "knn", "gauss_raw")],
        "knn": [(L, "knn") for L in LAYERS],
        "gauss_l2": [(L, "gauss_l2") for L in LAYERS],
    }
    if a.extra:
        for k in (1, 5, 20, 50):
            configs[f"l2+knn{k}"] = [(L, D) for L in LAYERS for D in ("gauss_l2", f"knn{k}")]
        configs["l2+knn@L2,4"] = [(L, D) for L in (2, 4) for D in ("gauss_l2", "knn")]
        configs["l2@L2+knn@L2"] = [(2, "gauss_l2"), (2, "knn")]
        configs["l2+knnc"] = [(L, D) for L in LAYERS for D in ("gauss_l2", "knnc")]
        configs["knnc"] = [(L, "knnc") for L in LAYERS]
        configs["cat:l2+knnc"] = [("cat", "gauss_l2"), ("cat", "knnc")]
        configs["cat:l2"] = [("cat", "gauss_l2")]
    results = []  # (cal_frac, seed, config, rule, out)
    for frac in (0.25, 0.2, 0.3):
        for seed in seeds:
            res, raw, ncal = run_split(data, seed, frac, dets_all, cat_detectors=cat_dets)
            print(f"\n=== cal_frac {frac} seed {seed} (n_cal {ncal}) ===", flush=True)
            if frac == 0.25:
                print("single (L,D) AUROC (raw score, fit on fit part):  code non_english base64")
                for key in sorted(raw, key=str):
                    s = auroc_single(raw, key)
                    print(f"  L{key[0]!s:3s} {key[1]:10s} " + " ".join(f"{s[c]:.4f}" for c in CATS))
            for cname, keys in configs.items():
                if frac != 0.25 and cname not in ("l2+knn", "l2+knn+raw"):
                    continue
                for rule in rules:
                    o = evaluate(res, keys, rule)
                    results.append((frac, seed, cname, rule, o))
                    print(f"  {cname:14s} {rule:16s} {fmt(o)}", flush=True)
    # summary: mean / min over seeds
    print("\n=== summary over seeds (mean AUROC; min AUROC; FPR per seed) ===")
    groups = {}
    for frac, seed, cname, rule, o in results:
        groups.setdefault((frac, cname, rule), []).append(o)
    for (frac, cname, rule), os_ in groups.items():
        mean = {c: np.mean([o[c] for o in os_]) for c in CATS}
        mn = {c: np.min([o[c] for o in os_]) for c in CATS}
        fprs = ",".join(f"{o['fpr']:.3f}" for o in os_)
        print(f"  {frac:.2f} {cname:14s} {rule:16s} mean " + " ".join(f"{mean[c]:.4f}" for c in CATS)
              + " | min " + " ".join(f"{mn[c]:.4f}" for c in CATS) + f" | fpr {fprs}"
              + (" | BAR(all seeds)" if all(meets(o) for o in os_) else ""))


if __name__ == "__main__":
    sys.exit(main())
