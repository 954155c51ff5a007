#!/usr/bin/env python3
"""Prototype: does an attention-pooled (softmax-pooled) token-level concept probe measurably help over the
difference of class means? (issue "Concept probes": "an attention- or softmax-pooled probe if it measurably
helps"). Findings: attention_probe.md. Prototype only (numpy / pyarrow / scikit-learn / torch, CPU);
nothing here is used by the product.

Run:  OMP_NUM_THREADS=1 nice -n 10 python docs/experiments/explore_attention_probe.py \
          [--concepts ../shared/data/concepts] [--tokens target/concepts] \
          [--control-tokens target/tokens/train_tokens.parquet] [--seed 0] [--features L6,L4,L2,L2+4+6]
      (per-token files: docs/experiments/make_concept_tokens.sh and scripts/make_token_data.sh)

Everything below was fixed before any number was computed (nothing tuned on dev; one seed, 0):

Data: per-token hidden states of MiniLM layers 2, 4, 6 ([CLS]/[SEP] included) of the concept texts
  (train 1,220: AdvBench + HarmBench harmful orders vs PersistBench benign requests; dev 1,116: Do-Not-Answer
  harmful questions vs FreshQA questions + Mind2Web web tasks). Labels from *_tokens_labelled.parquet
  (columns concept, label) when present, otherwise joined by id with ../shared/data/concepts/{split}.parquet.
  Mean-pooled vectors = the mean over a text's tokens (equal to the shared pooled vectors, probes.md).
Feature sets: L6, L4, L2 (one layer) and L2+4+6 (the three concatenated), in that order.
Methods (a score per text; higher = more harmful):
  dom_mean   w = mu1 - mu0, the difference of the class means of the mean-pooled raw vectors (each text
             weighs 1 within its class); score w.mean_t(x_t). The product's default (probes.md dom_raw).
             For L2+4+6 each layer is first centred and divided by one scalar (its root mean per-dimension
             std on the fit texts' pooled vectors), as in explore_probes.py.
  dom_max    the same w applied to each token, score max_t w.x_t.
  lr_mean    L2 logistic regression on the mean-pooled *standardised* token vectors (below), sklearn lbfgs,
             class-balanced sample weights (mean 1), C = 1 / (2 * LAMBDA * n_fit): the same objective as
             attn with q fixed at 0 (mean pooling), solved to convergence.
  mean_adam  the attn trainer below with q frozen at 0 (uniform attention = mean pooling): isolates what
             attention adds from what the optimiser / epoch budget does (ablation).
  attn       attention-pooled linear probe. x_t standardised per dimension with the mean / std over all
             tokens of the fit texts (per fit, per fold); a_t = q.x_t; alpha = softmax of a over the text's
             tokens; s = sum_t alpha_t (w.x_t) + b. Loss: class-balanced weighted mean binary cross-entropy
             (weights n / (2 n_class), mean 1) + LAMBDA (|w|^2 + |q|^2). Full batch (all fit texts each
             step), Adam lr 1e-2, EPOCHS = 400 steps, w = q = 0, b = 0 at start (so it starts as mean
             pooling), float32, torch.manual_seed(seed), deterministic algorithms, 1 thread.
  LAMBDA = 1e-3, EPOCHS = 400, LR = 1e-2 (chosen a priori; not tuned on anything).
Evaluation (the same for every method and feature set):
  train CV   5-fold StratifiedKFold over train texts (by concept; shuffle, random_state = seed; a text's
             tokens never straddle folds); AUROC per fold; reported mean (sd); each fold refits everything
             (standardisation included).
  val        source-held-out inside train: fit AdvBench harmful + persistbench_cross_domain/sycophancy
             benign; validate HarmBench (200) vs persistbench_beneficial_samples (100): AUROC, recall and
             FPR at the control-calibrated threshold.
  dev        fit on all of train; dev AUROC, recall at the control-calibrated threshold, achieved FPR on
             dev's 450 benign texts.
  Calibration: the control traffic's per-token traces (6,000 prose sentences); its ids split by
             sha256(f"{seed}:{id}") (first 8 bytes / 2^64 < 0.25 -> calibration; explore_probes.split_ids);
             threshold = the 99th percentile (numpy 'higher') of the probe's score on the calibration
             sentences (scored exactly as a text: the same pooling); flag score > threshold. The control
             traffic is used for nothing else (no extra negatives).
  Paired comparison on dev (reporting only, not a choice): bootstrap (1,000 resamples of dev's harmful
             and benign texts separately, numpy default_rng(seed)) of the AUROC difference attn - dom_mean
             and attn - mean_adam per feature set: the 95% percentile interval.
  Diagnostics of the attention (fits on all of train): the mean share of attention mass on [CLS] and
             [SEP] (first and last position) and the mean effective number of attended tokens
             exp(entropy) relative to the text's length, on train and dev texts; final training loss.
Decision rule (stated in advance): attention pooling "measurably helps" if attn beats dom_mean on the
  train-only evidence (CV and val AUROC, beyond the fold-to-fold sd) and on dev (bootstrap interval of the
  AUROC difference above 0) with recall at the calibrated threshold not lower and dev FPR still ~1%.
"""
import argparse
import hashlib
import os
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
LAYERS = (2, 4, 6)
FEATURES = {"L6": (6,), "L4": (4,), "L2": (2,), "L2+4+6": (2, 4, 6)}
METHODS = ["dom_mean", "dom_max", "lr_mean", "mean_adam", "attn"]
LAMBDA, EPOCHS, LR = 1e-3, 400, 1e-2
CAL_FRAC, FPR, NBOOT = 0.25, 0.01, 1000
FIT_HARM = {"advbench"}
FIT_BEN = {"persistbench_cross_domain", "persistbench_sycophancy"}
VAL_HARM = {"harmbench"}
VAL_BEN = {"persistbench_beneficial_samples"}

T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def split_ids(ids, seed, cal_frac):
    """explore_defaults.split_ids: True -> calibration."""
    h = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") for i in ids],
                 dtype=np.float64) / 2.0**64
    return h < cal_frac


# ----------------------------------------------------------------------------- data
def load_tokens(path, keep_ids=None, concepts=None):
    """Per layer: token vectors sorted by (text, position); texts in first-seen order (restricted to keep_ids
    when given); offsets; y / label per text when the file (or the concepts parquet) has them."""
    lab_cols = [c for c in ("concept", "label") if c in pq.read_schema(path).names]
    out = {"X": {}}
    for L in LAYERS:
        t = pq.read_table(path, columns=["trace_id", "position", "activation"] + lab_cols,
                          filters=[("site", "=", str(L))])
        ids = np.asarray(t.column("trace_id").to_pylist())
        keep = np.ones(len(ids), bool) if keep_ids is None else np.isin(ids, list(keep_ids))
        if "id" not in out:
            order = list(dict.fromkeys(ids[keep].tolist()))
            out["id"] = np.asarray(order)
            pos = {i: k for k, i in enumerate(order)}
        tid = np.array([pos[i] for i in ids[keep]])
        p = t.column("position").to_numpy()[keep]
        o = np.lexsort((p, tid))
        X = t.column("activation").combine_chunks().values.to_numpy().reshape(len(ids), -1)[keep][o]
        tid, p = tid[o], p[o]
        counts = np.bincount(tid, minlength=len(out["id"]))
        if "n" in out:
            assert np.array_equal(counts, out["n"]) and np.array_equal(p, out["pos"])
        else:
            assert (counts > 0).all(), path
            off = np.r_[0, np.cumsum(counts)]
            assert np.array_equal(p, np.arange(len(p)) - np.repeat(off[:-1], counts)), "positions 0..n-1"
            out["n"], out["off"], out["pos"], out["text"] = counts, off, p, tid
            first = keep.nonzero()[0][o][off[:-1]]
            if lab_cols:
                out["y"] = t.column("concept").to_numpy()[first].astype(int)
                out["label"] = np.asarray(t.column("label").to_pylist())[first]
        out["X"][L] = np.ascontiguousarray(X, dtype=np.float32)
        del t, X
    if "y" not in out and concepts is not None:
        c = pq.read_table(concepts, columns=["id", "concept", "label"]).to_pydict()
        m = {i: (y, l) for i, y, l in zip(c["id"], c["concept"], c["label"])}
        out["y"] = np.array([m[i][0] for i in out["id"]], int)
        out["label"] = np.array([m[i][1] for i in out["id"]])
    return out


def subset(tok, texts, layers):
    """Token matrix (layers concatenated) of the given texts, the text index (0..len(texts)-1) per token,
    offsets."""
    texts = np.asarray(texts)
    rows = np.concatenate([np.arange(tok["off"][k], tok["off"][k + 1]) for k in texts])
    n = tok["n"][texts]
    X = np.hstack([tok["X"][L][rows] for L in layers])
    return X, np.repeat(np.arange(len(texts)), n), np.r_[0, np.cumsum(n)]


def seg_mean(X, off):
    return np.add.reduceat(X.astype(np.float64), off[:-1], axis=0) / np.diff(off)[:, None]


# ----------------------------------------------------------------------------- probes
def layer_scale(P, layers, d):
    """explore_probes.py's L2+4+6 convention on pooled vectors P: per layer a centre and one scalar."""
    a, s = np.zeros(P.shape[1]), np.ones(P.shape[1])
    if len(layers) > 1:
        for k in range(len(layers)):
            sl = slice(k * d, (k + 1) * d)
            a[sl] = P[:, sl].mean(0)
            s[sl] = np.sqrt(np.mean(P[:, sl].std(0) ** 2))
    return a, s


def fit_dom(X, seg, off, y, layers):
    P = seg_mean(X, off)
    a, s = layer_scale(P, layers, X.shape[1] // len(layers))
    F = (P - a) / s
    return (F[y == 1].mean(0) - F[y == 0].mean(0)) / s  # in raw coordinates (offset irrelevant)


def balanced_weights(y):
    n = len(y)
    return np.where(y == 1, n / (2 * (y == 1).sum()), n / (2 * (y == 0).sum()))


def standardiser(X):
    m = X.mean(0, dtype=np.float64)
    s = X.std(0, dtype=np.float64)
    return m, np.where(s > 0, s, 1.0)


def seg_softmax(a, seg, n):
    m = torch.full((n,), -torch.inf, dtype=a.dtype).scatter_reduce(0, seg, a.detach(), "amax")
    e = torch.exp(a - m[seg])
    z = torch.zeros(n, dtype=a.dtype).index_add(0, seg, e)
    return e / z[seg]


def train_torch(Z, seg, off, y, attention, seed):
    """Z standardised tokens (float32). attention=False: q frozen at 0 and the pooled means are used
    directly (identical to uniform softmax)."""
    torch.manual_seed(seed)
    n, d = len(off) - 1, Z.shape[1]
    yt = torch.tensor(y, dtype=torch.float32)
    wt = torch.tensor(balanced_weights(y), dtype=torch.float32)
    w = torch.zeros(d, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    params = [w, b]
    if attention:
        Zt, st = torch.from_numpy(Z), torch.from_numpy(seg.astype(np.int64))
        q = torch.zeros(d, requires_grad=True)
        params.append(q)
    else:
        Pt = torch.from_numpy(seg_mean(Z, off).astype(np.float32))
    opt = torch.optim.Adam(params, lr=LR)
    for _ in range(EPOCHS):
        opt.zero_grad()
        if attention:
            alpha = seg_softmax(Zt @ q, st, n)
            s = torch.zeros(n).index_add(0, st, alpha * (Zt @ w)) + b
            reg = LAMBDA * ((w * w).sum() + (q * q).sum())
        else:
            s = Pt @ w + b
            reg = LAMBDA * (w * w).sum()
        bce = (wt * torch.nn.functional.binary_cross_entropy_with_logits(s, yt, reduction="none")).mean()
        loss = bce + reg
        loss.backward()
        opt.step()
    out = {"w": w.detach().numpy().astype(np.float64), "b": float(b.item()), "loss": float(loss.item()),
           "bce": float(bce.item())}
    out["q"] = q.detach().numpy().astype(np.float64) if attention else None
    return out


def attn_weights(Zs, off, q):
    a = Zs @ q
    alpha = np.empty_like(a)
    for j in range(len(off) - 1):
        x = a[off[j]:off[j + 1]]
        e = np.exp(x - x.max())
        alpha[off[j]:off[j + 1]] = e / e.sum()
    return alpha


def fit(method, X, seg, off, y, layers, seed):
    """Returns a scorer f(X, seg, off) -> scores, and info."""
    if method in ("dom_mean", "dom_max"):
        v = fit_dom(X, seg, off, y, layers)
        if method == "dom_mean":
            return (lambda X2, s2, o2: seg_mean(X2, o2) @ v), {}
        return (lambda X2, s2, o2: np.maximum.reduceat(X2.astype(np.float64) @ v, o2[:-1])), {}
    m, sd = standardiser(X)
    Z = ((X - m) / sd).astype(np.float32)
    if method == "lr_mean":
        P = seg_mean(Z, off)
        C = 1.0 / (2 * LAMBDA * len(y))
        lr = LogisticRegression(C=C, solver="lbfgs", max_iter=10000, tol=1e-8)
        lr.fit(P, y, sample_weight=balanced_weights(y))
        v = lr.coef_[0]
        return (lambda X2, s2, o2: seg_mean((X2 - m) / sd, o2) @ v), {"C": C}
    r = train_torch(Z, seg, off, y, method == "attn", seed)
    w = r["w"]
    if method == "mean_adam":
        return (lambda X2, s2, o2: seg_mean((X2 - m) / sd, o2) @ w + r["b"]), r
    q = r["q"]

    def score(X2, s2, o2):
        Z2 = (X2 - m) / sd
        return np.add.reduceat(attn_weights(Z2, o2, q) * (Z2 @ w), o2[:-1]) + r["b"]

    r["m"], r["sd"] = m, sd
    return score, r


# ----------------------------------------------------------------------------- evaluation
def threshold(cal):
    return float(np.quantile(cal, 1 - FPR, method="higher"))


def evaluate(s_pos, s_neg, thr):
    y = np.r_[np.ones(len(s_pos)), np.zeros(len(s_neg))]
    return {"auroc": roc_auc_score(y, np.r_[s_pos, s_neg]), "recall": float((s_pos > thr).mean()),
            "fpr": float((s_neg > thr).mean())}


def auroc_fast(pos, neg):
    """Mann-Whitney AUROC (ties count half), = roc_auc_score."""
    r = rankdata(np.r_[pos, neg])
    return (r[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts", default=os.path.join(ROOT, "..", "shared", "data", "concepts"))
    ap.add_argument("--tokens", default=os.path.join(ROOT, "target", "concepts"))
    ap.add_argument("--control-tokens", default=os.path.join(ROOT, "target", "tokens", "train_tokens.parquet"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--features", default=",".join(FEATURES))
    args = ap.parse_args()
    seed = args.seed
    feats = args.features.split(",")

    def tokfile(split):
        lab = os.path.join(args.tokens, f"{split}_tokens_labelled.parquet")
        return lab if os.path.exists(lab) else os.path.join(args.tokens, f"{split}_tokens.parquet")

    tr = load_tokens(tokfile("train"), concepts=os.path.join(args.concepts, "train.parquet"))
    dv = load_tokens(tokfile("dev"), concepts=os.path.join(args.concepts, "dev.parquet"))
    cids = pq.read_table(args.control_tokens, columns=["trace_id"], filters=[("site", "=", "2")])
    cids = list(dict.fromkeys(cids.column("trace_id").to_pylist()))
    cal_ids = set(np.asarray(cids)[split_ids(cids, seed, CAL_FRAC)].tolist())
    ct = load_tokens(args.control_tokens, keep_ids=cal_ids)
    log(f"loaded ({tokfile('train')}): train {len(tr['id'])} texts / {tr['n'].sum()} tokens, dev "
        f"{len(dv['id'])} / {dv['n'].sum()}, control calibration {len(ct['id'])} of {len(cids)} sentences / "
        f"{ct['n'].sum()} tokens")
    assert set(tr["y"][np.isin(tr["label"], list(FIT_HARM | VAL_HARM))]) == {1}
    assert set(tr["y"][np.isin(tr["label"], list(FIT_BEN | VAL_BEN))]) == {0}
    fit_idx = np.flatnonzero(np.isin(tr["label"], list(FIT_HARM | FIT_BEN)))
    vpos = np.flatnonzero(np.isin(tr["label"], list(VAL_HARM)))
    vneg = np.flatnonzero(np.isin(tr["label"], list(VAL_BEN)))
    dpos, dneg = np.flatnonzero(dv["y"] == 1), np.flatnonzero(dv["y"] == 0)
    log(f"val fit {len(fit_idx)} texts (harmful {tr['y'][fit_idx].sum()}), val {len(vpos)} / {len(vneg)}; "
        f"dev {len(dpos)} harmful / {len(dneg)} benign")

    res, dev_scores, diag = {}, {}, {}
    for fname in feats:
        layers = FEATURES[fname]
        ctX, ctseg, ctoff = subset(ct, np.arange(len(ct["id"])), layers)
        for method in METHODS:
            t0 = time.time()
            r = {}
            # train CV
            skf = StratifiedKFold(5, shuffle=True, random_state=seed)
            folds = []
            for a, bidx in skf.split(np.zeros(len(tr["y"])), tr["y"]):
                X, sg, of = subset(tr, a, layers)
                f, _ = fit(method, X, sg, of, tr["y"][a], layers, seed)
                s = f(*subset(tr, bidx, layers))
                folds.append(roc_auc_score(tr["y"][bidx], s))
            r["cv"] = np.array(folds)
            # source-held-out validation
            X, sg, of = subset(tr, fit_idx, layers)
            f, _ = fit(method, X, sg, of, tr["y"][fit_idx], layers, seed)
            thr = threshold(f(ctX, ctseg, ctoff))
            r["val"] = evaluate(f(*subset(tr, vpos, layers)), f(*subset(tr, vneg, layers)), thr)
            # final fit, dev
            X, sg, of = subset(tr, np.arange(len(tr["id"])), layers)
            f, info = fit(method, X, sg, of, tr["y"], layers, seed)
            thr = threshold(f(ctX, ctseg, ctoff))
            sp, sn = f(*subset(dv, dpos, layers)), f(*subset(dv, dneg, layers))
            r["dev"] = evaluate(sp, sn, thr)
            dev_scores[(fname, method)] = (sp, sn)
            r["info"] = {k: v for k, v in info.items() if k in ("C", "loss", "bce")}
            if method == "attn":
                d = {"train_bce": info["bce"], "loss": info["loss"], "|q|": float(np.linalg.norm(info["q"])),
                     "|w|": float(np.linalg.norm(info["w"]))}
                for nm, tok, idx in (("train harmful", tr, np.flatnonzero(tr["y"] == 1)),
                                     ("train benign", tr, np.flatnonzero(tr["y"] == 0)),
                                     ("dev harmful", dv, dpos), ("dev benign", dv, dneg),
                                     ("control cal", ct, np.arange(len(ct["id"])))):
                    X2, s2, o2 = subset(tok, idx, layers)
                    al = attn_weights((X2 - info["m"]) / info["sd"], o2, info["q"])
                    n2 = np.diff(o2)
                    special = al[o2[:-1]] + al[o2[1:] - 1]
                    ent = -np.add.reduceat(al * np.log(np.maximum(al, 1e-300)), o2[:-1])
                    d[nm] = (float(special.mean()), float((np.exp(ent) / n2).mean()),
                             float((1.0 / n2).mean() * 2))
                diag[fname] = d
            r["t"] = time.time() - t0
            res[(fname, method)] = r
            log(f"{fname} {method}: cv {r['cv'].mean():.4f} ({r['cv'].std():.4f}), val "
                f"{r['val']['auroc']:.4f}/{r['val']['recall']:.3f}/{r['val']['fpr']:.3f}, dev "
                f"{r['dev']['auroc']:.4f}/{r['dev']['recall']:.3f}/{r['dev']['fpr']:.4f} {r['info']} "
                f"[{r['t']:.1f}s]")

    print("\n### Results (seed 0)\n")
    print("| features | method | train CV AUROC mean (sd) | val AUROC | val recall | val FPR | dev AUROC | "
          "dev recall | dev FPR | time |\n|---|---|---|---|---|---|---|---|---|---|")
    for (fname, method), r in res.items():
        print(f"| {fname} | {method} | {r['cv'].mean():.4f} ({r['cv'].std():.4f}) | {r['val']['auroc']:.4f} | "
              f"{r['val']['recall']:.3f} | {r['val']['fpr']:.3f} | {r['dev']['auroc']:.4f} | "
              f"{r['dev']['recall']:.3f} | {r['dev']['fpr']:.4f} | {r['t']:.1f}s |")

    print("\n### Paired bootstrap of the dev AUROC difference (95% percentile interval, "
          f"{NBOOT} resamples)\n")
    print("| features | attn - dom_mean | attn - mean_adam | attn - dom_max | per-fold CV attn - dom_mean "
          "(min..max) |\n|---|---|---|---|---|")
    for fname in feats:
        rng = np.random.default_rng(seed)
        ap_, an_ = dev_scores[(fname, "attn")]
        row = []
        for other in ("dom_mean", "mean_adam", "dom_max"):
            bp, bn = dev_scores[(fname, other)]
            diffs = []
            for _ in range(NBOOT):
                ip = rng.integers(0, len(ap_), len(ap_))
                i_n = rng.integers(0, len(an_), len(an_))
                diffs.append(auroc_fast(ap_[ip], an_[i_n]) - auroc_fast(bp[ip], bn[i_n]))
            diffs = np.array(diffs)
            pt = res[(fname, 'attn')]['dev']['auroc'] - res[(fname, other)]['dev']['auroc']
            row.append(f"{pt:+.4f} [{np.quantile(diffs, 0.025):+.4f}, {np.quantile(diffs, 0.975):+.4f}]")
        dcv = res[(fname, "attn")]["cv"] - res[(fname, "dom_mean")]["cv"]
        print(f"| {fname} | " + " | ".join(row) + f" | {dcv.min():+.4f}..{dcv.max():+.4f} |")

    print("\n### Attention diagnostics (attn fitted on all of train)\n")
    print("| features | final loss (bce) | abs q | abs w | group | attention mass on [CLS]+[SEP] | "
          "uniform would be | effective tokens / length |\n|---|---|---|---|---|---|---|---|")
    for fname, d in diag.items():
        for nm in ("train harmful", "train benign", "dev harmful", "dev benign", "control cal"):
            sp_, eff, uni = d[nm]
            print(f"| {fname} | {d['loss']:.4f} ({d['train_bce']:.4f}) | {d['|q|']:.2f} | {d['|w|']:.2f} | {nm} | "
                  f"{sp_:.3f} | {uni:.3f} | {eff:.3f} |")
    log("done")


if __name__ == "__main__":
    main()
