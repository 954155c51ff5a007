#!/usr/bin/env python3
"""Prototype: choosing actwatch's default *concept probe* (harmful vs benign request) from train-only
evidence, and reporting every candidate on dev beside the peers. Findings: probes.md.

Prototype only (numpy / pyarrow / scikit-learn); nothing here is used by the product.
Run:  python docs/experiments/explore_probes.py [--concepts ../shared/data/concepts]
          [--control ../shared/data/minilm/train.parquet] [--tokens target/concepts]
          [--control-tokens target/tokens/train_tokens.parquet] [--seed 0] [--pooled-only]
      (per-token files: docs/experiments/make_concept_tokens.sh and scripts/make_token_data.sh)

The grid, the protocol and the criterion were fixed before any number was computed:

Features (pooled = the shared mean-pooled vectors): L2, L4, L6 (one layer), L2+4+6 (the three layers
  concatenated, each layer standardised first: centred on the fit examples' mean and divided by one scalar,
  the root mean per-dimension std of that layer, so that no layer dominates and dimensions keep their
  relative scale within a layer).
Probe types (a score s(x) = w.x; its offset plays no role in AUROC, thresholds or aggregation):
  dom_raw        w = mu1 - mu0 on the feature vectors (the peer)
  dom_std        difference of means after per-dimension standardisation (mean / std of the fit examples)
  lr             L2 logistic regression on standardised features, sklearn lbfgs, C by 5-fold CV on the fit
                 data (stratified by group, grouped by text at token level), weighted log-loss, C in
                 10^-4..10^2 (13 log-spaced values), refitted on all fit data with the chosen C
  lda            w = Sigma_w^-1 (mu1 - mu0), Sigma_w the Ledoit-Wolf-shrunk within-group covariance
                 (each group centred on its own mean), standardised features
  dom_white_ref  w = Sigma_ref^-1 (mu1 - mu0), Sigma_ref the Ledoit-Wolf covariance of the benign control
                 traffic's fit part (../minilm/train.parquet; the monitor's trusted reference traffic),
                 standardised features
  Standardisation statistics always come from the labelled concept examples of the fit set only.
Option refneg: the control traffic's fit part is an extra negative group whose total weight equals that
  of the benign requests: mu0 = (mu_benign + mu_control) / 2; lr sample weights; lda's within-group
  covariance (three groups, the same weights). Without refneg the control traffic is used only by
  dom_white_ref (Sigma_ref) and for calibration.
Weights: pooled, one per text; token level, 1 / (text's token count), texts weighted equally. Ledoit-Wolf
  with weights: the shrinkage formula of Ledoit & Wolf (2004) with the weighted covariance and the
  variance term sum_i w_i^2 ||x_i x_i' - S||_F^2 (w normalised to sum 1; equal weights give sklearn's
  LedoitWolf, checked at start).
Control traffic split by a seeded hash of its id (explore_defaults.split_ids, seed s): 25% calibration,
  75% fit (refneg negatives, Sigma_ref).
Calibration (as the product): threshold = the 99th percentile (numpy 'higher') of the probe's score on the
  calibration control sentences (at token level, their aggregated scores); flag score > threshold.
Train-only criterion (source-held-out validation inside train.parquet): fit on AdvBench harmful +
  persistbench_cross_domain and persistbench_sycophancy benign; validate HarmBench harmful vs
  persistbench_beneficial_samples benign; threshold from the calibration control traffic; rank by
  validation AUROC (rounded to 4 decimals), ties by recall at that threshold (remaining ties: grid order,
  the sort being stable: pooled before token level, features and types in the order above, without
  refneg first). The pick is the top
  candidate over pooled and token-level candidates together.
Final models (for dev) are fitted on the whole of train.parquet (+ control fit part); dev.parquet:
  AUROC, recall at the control-calibrated threshold, achieved FPR on dev's benign rows.
Token level (per-token traces, [CLS]/[SEP] included): the 2 best pooled probe types by the criterion
  (each at its best feature / refneg configuration), dom_raw at its best configuration, and the peer
  configuration (dom_raw L6, no refneg); per-token score from (i) the probe fitted on pooled vectors,
  (ii) the same probe type fitted on tokens (each token labelled with its text's label, texts weighted
  equally); aggregated per text by mean, max, max_rolling_mean:8 (max over windows of 8 consecutive
  tokens of their mean; texts shorter than 8: the mean of all), topk_mean:8 (mean of the min(8, n)
  largest). (ii) lr fits on a seeded sample of at most LR_TOKENS_PER_TEXT tokens per text (texts still
  weighted equally): exact-token lr with 65 CV fits per configuration would not fit the time budget.
  Note: (ii) for dom_raw is (i) for dom_raw (texts weighted equally, the token means are the pooled
  means); the script checks this, and that (i) with mean aggregation reproduces the pooled score.
Reference row, not a candidate: the negated token count (train's harmful texts are short orders).
"""
import argparse
import hashlib
import os
import time

import numpy as np
import pyarrow.parquet as pq
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
LAYERS = (2, 4, 6)
FEATURES = {"L2": (2,), "L4": (4,), "L6": (6,), "L2+4+6": (2, 4, 6)}
TYPES = ["dom_raw", "dom_std", "lr", "lda", "dom_white_ref"]
AGGS = ["mean", "max", "max_rolling_mean:8", "topk_mean:8"]
CS = np.logspace(-4, 2, 13)
CAL_FRAC = 0.25
FPR = 0.01
LR_TOKENS_PER_TEXT = 8
FIT_HARM = {"advbench"}
FIT_BEN = {"persistbench_cross_domain", "persistbench_sycophancy"}
VAL_HARM = {"harmbench"}
VAL_BEN = {"persistbench_beneficial_samples"}
PEER = ("L6", "dom_raw", False)

T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def split_ids(ids, seed, cal_frac):
    """explore_defaults.split_ids: True -> calibration."""
    h = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") for i in ids],
                 dtype=np.float64) / 2.0**64
    return h < cal_frac


# ----------------------------------------------------------------------------- data
def load_pooled(path):
    t = pq.read_table(path, columns=["id", "label", "layer", "activation"] +
                      (["concept"] if "concept" in pq.read_schema(path).names else []))
    ids = np.asarray(t.column("id").to_pylist())
    layer = t.column("layer").to_numpy()
    act = t.column("activation").combine_chunks().values.to_numpy().reshape(len(ids), -1)
    order = list(dict.fromkeys(ids.tolist()))
    pos = {i: k for k, i in enumerate(order)}
    out = {"id": np.asarray(order), "X": {}}
    first = np.zeros(len(order), dtype=np.int64)
    for L in LAYERS:
        sel = np.flatnonzero(layer == L)
        X = np.empty((len(order), act.shape[1]), np.float32)
        idx = np.array([pos[i] for i in ids[sel]])
        assert len(idx) == len(order) and len(set(idx.tolist())) == len(order), (path, L)
        X[idx] = act[sel]
        out["X"][L] = X
        first[idx] = sel
    out["label"] = np.asarray(t.column("label").to_pylist())[first]
    if "concept" in t.column_names:
        out["y"] = t.column("concept").to_numpy()[first].astype(int)
    return out


def load_tokens(path, id_order):
    """Per layer: the token vectors sorted by (text in id_order, position); offsets per text."""
    pos = {i: k for k, i in enumerate(id_order)}
    out = {"X": {}}
    for L in LAYERS:
        t = pq.read_table(path, columns=["trace_id", "position", "activation"], filters=[("site", "=", str(L))])
        tid = np.array([pos[i] for i in t.column("trace_id").to_pylist()])
        p = t.column("position").to_numpy()
        order = np.lexsort((p, tid))
        X = t.column("activation").combine_chunks().values.to_numpy().reshape(len(tid), -1)[order]
        tid, p = tid[order], p[order]
        counts = np.bincount(tid, minlength=len(id_order))
        if "n" in out:
            assert np.array_equal(counts, out["n"]) and np.array_equal(p, out["pos"])
        else:
            assert (counts > 0).all(), path
            off = np.r_[0, np.cumsum(counts)]
            assert np.array_equal(p, np.arange(len(p)) - np.repeat(off[:-1], counts)), "positions 0..n-1"
            out["n"], out["off"], out["pos"], out["text"] = counts, off, p, tid
        out["X"][L] = np.ascontiguousarray(X, dtype=np.float32)
        del t
    return out


def token_subset(tok, texts):
    """Tokens of the given texts (indices into the file's id order): rows, text index per row."""
    texts = np.asarray(texts)
    rows = np.concatenate([np.arange(tok["off"][k], tok["off"][k + 1]) for k in texts])
    return rows, np.repeat(texts, tok["n"][texts])


# ----------------------------------------------------------------------------- statistics
def wmean(X, w):
    return (w[:, None] * X).sum(0) / w.sum()


def wstd(X, w, m):
    return np.sqrt((w[:, None] * (X - m) ** 2).sum(0) / w.sum())


def lw_weighted(Xc, w):
    """Ledoit-Wolf (2004) shrinkage towards mu*I of the weighted covariance of centred rows Xc."""
    w = w / w.sum()
    S = (Xc * w[:, None]).T @ Xc
    p = S.shape[0]
    mu = np.trace(S) / p
    d2 = ((S - mu * np.eye(p)) ** 2).sum()
    nx2 = (Xc ** 2).sum(1)
    xSx = ((Xc @ S) * Xc).sum(1)
    b2 = float((w ** 2 * (nx2 ** 2 - 2 * xSx + (S ** 2).sum())).sum())
    shrink = min(b2, d2) / d2
    return (1 - shrink) * S + shrink * mu * np.eye(p), shrink


def check_lw(seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((300, 40)) @ rng.standard_normal((40, 40))
    X -= X.mean(0)
    ours, s = lw_weighted(X, np.ones(len(X)))
    ref = LedoitWolf(assume_centered=True).fit(X)
    assert abs(s - ref.shrinkage_) < 1e-9 and np.allclose(ours, ref.covariance_), (s, ref.shrinkage_)


def wlogloss(y, p, w):
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return float(-(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum())


def fit_lr(Z, y, w, strata, text, seed):
    """C by 5-fold CV (stratified by group, grouped by text), weighted log-loss; warm starts along C."""
    ut, first = np.unique(text, return_index=True)
    skf = StratifiedKFold(5, shuffle=True, random_state=seed)
    loss = np.zeros(len(CS))
    for tr_t, va_t in skf.split(ut, strata[first]):
        va = np.isin(text, ut[va_t])
        m = LogisticRegression(solver="lbfgs", max_iter=5000, warm_start=True)
        for k, c in enumerate(CS):
            m.set_params(C=c)
            m.fit(Z[~va], y[~va], sample_weight=w[~va])
            loss[k] += wlogloss(y[va], m.predict_proba(Z[va])[:, 1], w[va]) * w[va].sum()
    best = int(np.argmin(loss))
    m = LogisticRegression(solver="lbfgs", max_iter=5000, C=CS[best]).fit(Z, y, sample_weight=w)
    return m.coef_[0], CS[best]


def fit_probe(kind, refneg, layers, Xs, g, w, text, seed):
    """Xs: layer -> rows (concept fit examples, groups 0 benign / 1 harmful, and control rows, group 2);
    w: base weights (1 per text pooled, 1/n at token level). Returns layer -> weight vector in the
    original coordinates, and a note (lr's C)."""
    w = w.astype(np.float64).copy()
    c = g != 2
    for grp in (0, 1):
        assert (g == grp).any()
    if refneg:
        w[g == 2] *= w[g == 0].sum() / w[g == 2].sum()
    # the feature space F and its map back: F = (x_l - a_l) / b_l per layer
    F, scale = [], []
    for L in layers:
        X = Xs[L].astype(np.float64)
        if len(layers) > 1:
            m = wmean(X[c], w[c])
            s = float(np.sqrt(np.mean(wstd(X[c], w[c], m) ** 2)))
            X = (X - m) / s
        else:
            s = 1.0
        F.append(X)
        scale.append(np.full(X.shape[1], s))
    F = np.hstack(F)
    scale = np.concatenate(scale)
    if kind != "dom_raw":
        m = wmean(F[c], w[c])
        s = wstd(F[c], w[c], m)
        F = (F - m) / s
        scale = scale * s
    neg = (g == 0) | ((g == 2) & refneg)
    mu1 = wmean(F[g == 1], w[g == 1])
    mu0 = wmean(F[g == 0], w[g == 0])
    if refneg:
        mu0 = (mu0 + wmean(F[g == 2], w[g == 2])) / 2
    note = ""
    if kind in ("dom_raw", "dom_std"):
        u = mu1 - mu0
    elif kind == "lda":
        rows = (g == 1) | neg
        Fc = F[rows].copy()
        for grp in np.unique(g[rows]):
            sel = g[rows] == grp
            Fc[sel] -= wmean(Fc[sel], w[rows][sel])
        S, sh = lw_weighted(Fc, w[rows])
        u = np.linalg.solve(S, mu1 - mu0)
        note = f"shrinkage {sh:.3f}"
    elif kind == "dom_white_ref":
        ref = g == 2
        S, sh = lw_weighted(F[ref] - wmean(F[ref], w[ref]), w[ref])
        u = np.linalg.solve(S, mu1 - mu0)
        note = f"shrinkage {sh:.3f}"
    elif kind == "lr":
        rows = (g == 1) | neg
        ww = w[rows] / w[rows].mean()
        u, C = fit_lr(F[rows], (g[rows] == 1).astype(int), ww, g[rows], text[rows], seed)
        note = f"C={C:.3g}"
    else:
        raise ValueError(kind)
    v = u / scale
    d = Xs[layers[0]].shape[1]
    return {L: v[k * d:(k + 1) * d] for k, L in enumerate(layers)}, note


def score(v, Xs, rows=None):
    s = 0.0
    for L, vl in v.items():
        X = Xs[L] if rows is None else Xs[L][rows]
        s = s + X.astype(np.float64) @ vl
    return s


# ----------------------------------------------------------------------------- aggregation
def aggregate(x, off, op):
    n = np.diff(off)
    if op == "mean":
        return np.add.reduceat(x, off[:-1]) / n
    if op == "max":
        return np.maximum.reduceat(x, off[:-1])
    out = np.empty(len(n))
    name, _, par = op.partition(":")
    k = int(par)
    for j in range(len(n)):
        s = x[off[j]:off[j + 1]]
        if name == "max_rolling_mean":
            if len(s) <= k:
                out[j] = s.mean()
            else:
                c = np.r_[0.0, np.cumsum(s)]
                out[j] = ((c[k:] - c[:-k]) / k).max()
        elif name == "topk_mean":
            out[j] = np.sort(s)[-k:].mean()
        else:
            raise ValueError(op)
    return out


def check_aggregate(seed):
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 30, 50)
    off = np.r_[0, np.cumsum(n)]
    x = rng.standard_normal(off[-1])
    for op, f in [("mean", np.mean), ("max", np.max),
                  ("max_rolling_mean:8", lambda s: s.mean() if len(s) <= 8 else
                   max(s[i:i + 8].mean() for i in range(len(s) - 7))),
                  ("topk_mean:8", lambda s: np.mean(sorted(s)[::-1][:8]))]:
        ref = np.array([f(x[off[j]:off[j + 1]]) for j in range(len(n))])
        assert np.allclose(aggregate(x, off, op), ref), op


# ----------------------------------------------------------------------------- evaluation
def threshold(cal):
    return float(np.quantile(cal, 1 - FPR, method="higher"))


def evaluate(s_pos, s_neg, thr):
    y = np.r_[np.ones(len(s_pos)), np.zeros(len(s_neg))]
    return {"auroc": roc_auc_score(y, np.r_[s_pos, s_neg]), "recall": float((s_pos > thr).mean()),
            "fpr": float((s_neg > thr).mean())}


def fmt_row(name, val, dev, note=""):
    return (f"| {name} | {val['auroc']:.4f} | {val['recall']:.3f} | {val['fpr']:.3f} | "
            f"{dev['auroc']:.4f} | {dev['recall']:.3f} | {dev['fpr']:.4f} | {note} |")


HEADER = ("| candidate | val AUROC | val recall | val FPR (beneficial) | dev AUROC | dev recall | "
          "dev FPR | note |\n|---|---|---|---|---|---|---|---|")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts", default=os.path.join(ROOT, "..", "shared", "data", "concepts"))
    ap.add_argument("--control", default=os.path.join(ROOT, "..", "shared", "data", "minilm", "train.parquet"))
    ap.add_argument("--tokens", default=os.path.join(ROOT, "target", "concepts"))
    ap.add_argument("--control-tokens", default=os.path.join(ROOT, "target", "tokens", "train_tokens.parquet"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pooled-only", action="store_true")
    args = ap.parse_args()
    seed = args.seed
    check_lw(seed)
    check_aggregate(seed)

    tr = load_pooled(os.path.join(args.concepts, "train.parquet"))
    dv = load_pooled(os.path.join(args.concepts, "dev.parquet"))
    ct = load_pooled(args.control)
    cal = split_ids(ct["id"], seed, CAL_FRAC)
    fit_idx = np.flatnonzero(np.isin(tr["label"], list(FIT_HARM | FIT_BEN)))
    vpos = np.flatnonzero(np.isin(tr["label"], list(VAL_HARM)))
    vneg = np.flatnonzero(np.isin(tr["label"], list(VAL_BEN)))
    ctf, ctc = np.flatnonzero(~cal), np.flatnonzero(cal)
    assert set(tr["y"][np.isin(tr["label"], list(FIT_HARM | VAL_HARM))]) == {1}
    assert set(tr["y"][np.isin(tr["label"], list(FIT_BEN | VAL_BEN))]) == {0}
    log(f"explore_probes.py (seed {seed}): train {len(tr['id'])} texts, dev {len(dv['id'])}, control "
        f"{len(ct['id'])} ({len(ctf)} fit / {len(ctc)} calibration); validation fit {len(fit_idx)} "
        f"(harmful {int(tr['y'][fit_idx].sum())}), validation {len(vpos)} harmful / {len(vneg)} benign")

    def stack(idx_concept, ctrl_idx):
        Xs = {L: np.vstack([tr["X"][L][idx_concept], ct["X"][L][ctrl_idx]]) for L in LAYERS}
        g = np.r_[tr["y"][idx_concept], np.full(len(ctrl_idx), 2)]
        text = np.r_[idx_concept, len(tr["id"]) + ctrl_idx]
        return Xs, g, np.ones(len(g)), text

    setups = {"val": stack(fit_idx, ctf), "final": stack(np.arange(len(tr["id"])), ctf)}
    dpos, dneg = np.flatnonzero(dv["y"] == 1), np.flatnonzero(dv["y"] == 0)

    # ---------------------------------------------------------------- pooled: train-only validation
    res = {}
    probes, vprobes = {}, {}
    for fname, layers in FEATURES.items():
        for kind in TYPES:
            for refneg in (False, True):
                key = (fname, kind, refneg)
                t0 = time.time()
                Xs, g, w, text = setups["val"]
                v, note = fit_probe(kind, refneg, layers, Xs, g, w, text, seed)
                vprobes[key] = v
                thr = threshold(score(v, ct["X"], ctc))
                val = evaluate(score(v, tr["X"], vpos), score(v, tr["X"], vneg), thr)
                res[key] = {"val": val, "val_note": note, "t_val": time.time() - t0}
    ranking = sorted(res, key=lambda k: (-round(res[k]["val"]["auroc"], 4), -res[k]["val"]["recall"]))
    log("pooled validation done")

    # ---------------------------------------------------------------- pooled: final fits, dev
    for key in res:
        fname, kind, refneg = key
        t0 = time.time()
        Xs, g, w, text = setups["final"]
        v, note = fit_probe(kind, refneg, FEATURES[fname], Xs, g, w, text, seed)
        probes[key] = v
        cal_s = score(v, ct["X"], ctc)
        thr = threshold(cal_s)
        res[key].update(dev=evaluate(score(v, dv["X"], dpos), score(v, dv["X"], dneg), thr),
                        dev_note=note, thr=thr, t_final=time.time() - t0)
    log("pooled final fits and dev done")

    def name(key, level="pooled"):
        fname, kind, refneg = key
        return f"{kind}{' +refneg' if refneg else ''}, {fname}" + ("" if level == "pooled" else f", {level}")

    print("\n### Pooled candidates (ranked by the train-only criterion)\n")
    print(HEADER)
    for k in ranking:
        r = res[k]
        note = "; ".join(x for x in (r["val_note"] and f"val {r['val_note']}", r["dev_note"] and
                                     f"final {r['dev_note']}", f"{r['t_val'] + r['t_final']:.1f}s") if x)
        print(fmt_row(name(k), r["val"], r["dev"], note + (" (peer)" if k == PEER else "")))

    from scipy.stats import spearmanr
    va = [res[k]["val"]["auroc"] for k in ranking]
    vr = [res[k]["val"]["recall"] for k in ranking]
    da = [res[k]["dev"]["auroc"] for k in ranking]
    print(f"\nOver the {len(ranking)} pooled candidates: val AUROC {min(va):.4f}-{max(va):.4f}, dev AUROC "
          f"{min(da):.4f}-{max(da):.4f}; Spearman(val AUROC, dev AUROC) {spearmanr(va, da)[0]:.2f}, "
          f"Spearman(val recall, dev AUROC) {spearmanr(vr, da)[0]:.2f}")
    for refneg in (False, True):
        sel = [k for k in ranking if k[2] == refneg]
        print(f"  refneg={refneg}: median dev AUROC {np.median([res[k]['dev']['auroc'] for k in sel]):.4f}, "
              f"median dev FPR {np.median([res[k]['dev']['fpr'] for k in sel]):.4f}, median val recall "
              f"{np.median([res[k]['val']['recall'] for k in sel]):.3f}")

    # reference: negated token count
    if not args.pooled_only:
        log("loading token files")
        ttok = load_tokens(os.path.join(args.tokens, "train_tokens.parquet"), tr["id"])
        dtok = load_tokens(os.path.join(args.tokens, "dev_tokens.parquet"), dv["id"])
        ctok = load_tokens(args.control_tokens, ct["id"])
        log(f"tokens: train {ttok['off'][-1]}, dev {dtok['off'][-1]}, control {ctok['off'][-1]} per layer")
        # negated token count
        thr = threshold(-ctok["n"][ctc])
        val = evaluate(-ttok["n"][vpos], -ttok["n"][vneg], thr)
        dev = evaluate(-dtok["n"][dpos], -dtok["n"][dneg], thr)
        print("\n### Reference: negated token count (no probe)\n")
        print(HEADER)
        print(fmt_row("-(token count)", val, dev))
        print(f"\ntoken counts (median [min-max]): train harmful {np.median(ttok['n'][tr['y'] == 1]):.0f} "
              f"[{ttok['n'][tr['y'] == 1].min()}-{ttok['n'][tr['y'] == 1].max()}], train benign "
              f"{np.median(ttok['n'][tr['y'] == 0]):.0f} [{ttok['n'][tr['y'] == 0].min()}-{ttok['n'][tr['y'] == 0].max()}], "
              f"dev harmful {np.median(dtok['n'][dpos]):.0f}, dev benign {np.median(dtok['n'][dneg]):.0f}, "
              f"control {np.median(ctok['n']):.0f}")

        # ------------------------------------------------------------ token level
        best_of = {}
        for k in ranking:
            best_of.setdefault(k[1], k)
        types_ranked = [t for t in dict.fromkeys(k[1] for k in ranking) if t != "dom_raw"]
        chosen = [best_of[t] for t in types_ranked[:2]]
        for k in (best_of["dom_raw"], PEER):
            if k not in chosen:
                chosen.append(k)
        # best two by the criterion, whatever their type (dom_raw included)
        top2 = [best_of[t] for t in list(dict.fromkeys(k[1] for k in ranking))[:2]]
        chosen = list(dict.fromkeys(top2 + chosen))
        print("\nToken-level configurations (train-only choice): " + "; ".join(name(k) for k in chosen))

        def tok_setup(concept_texts, ctrl_idx, lr_sample):
            """Rows of the token fit set: concept tokens of the texts, control tokens of the control fit
            sentences; with lr_sample, at most LR_TOKENS_PER_TEXT tokens per text (seeded)."""
            rc, tc = token_subset(ttok, concept_texts)
            rr, trr = token_subset(ctok, ctrl_idx)
            if lr_sample:
                rng = np.random.default_rng(seed)
                keep_c = sample_rows(tc, rng)
                keep_r = sample_rows(trr, rng)
                rc, tc, rr, trr = rc[keep_c], tc[keep_c], rr[keep_r], trr[keep_r]
            Xs = {L: np.vstack([ttok["X"][L][rc], ctok["X"][L][rr]]) for L in LAYERS}
            g = np.r_[tr["y"][tc], np.full(len(rr), 2)]
            text = np.r_[tc, len(tr["id"]) + trr]
            cnt = np.bincount(text)
            w = 1.0 / cnt[text]
            return Xs, g, w, text

        def sample_rows(text, rng):
            keep = np.zeros(len(text), bool)
            starts = np.r_[0, np.flatnonzero(np.diff(text)) + 1, len(text)]
            for a, b in zip(starts[:-1], starts[1:]):
                keep[a + rng.choice(b - a, min(b - a, LR_TOKENS_PER_TEXT), replace=False)] = True
            return keep

        def tok_scores(v, tok, texts):
            rows, _ = token_subset(tok, texts)
            off = np.r_[0, np.cumsum(tok["n"][texts])]
            return score(v, tok["X"], rows), off

        tres = {}
        cal_rows = None
        for key in chosen:
            fname, kind, refneg = key
            layers = FEATURES[fname]
            for variant in ("i", "ii"):
                per = {}
                for phase in ("val", "final"):
                    t0 = time.time()
                    concept = fit_idx if phase == "val" else np.arange(len(tr["id"]))
                    if variant == "i":
                        if phase == "val":
                            v, note = vprobes[key], res[key]["val_note"]
                        else:
                            v, note = probes[key], res[key]["dev_note"]
                    else:
                        Xs, g, w, text = tok_setup(concept, ctf, kind == "lr")
                        v, note = fit_probe(kind, refneg, layers, Xs, g, w, text, seed)
                        del Xs
                    sc_cal, off_cal = tok_scores(v, ctok, ctc)
                    if phase == "val":
                        sp, op = tok_scores(v, ttok, vpos)
                        sn, on = tok_scores(v, ttok, vneg)
                    else:
                        sp, op = tok_scores(v, dtok, dpos)
                        sn, on = tok_scores(v, dtok, dneg)
                    for agg in AGGS:
                        a_cal = aggregate(sc_cal, off_cal, agg)
                        thr = threshold(a_cal)
                        ev = evaluate(aggregate(sp, op, agg), aggregate(sn, on, agg), thr)
                        per.setdefault(agg, {})[phase] = ev
                        per[agg][phase + "_note"] = note
                        per[agg][phase + "_thr"] = thr
                        if variant == "i" and agg == "mean":
                            # mean of per-token scores = the pooled score (the vectors are token means)
                            ref = score(v, (ct["X"]), ctc)
                            assert np.allclose(a_cal, ref, atol=1e-3 * (1 + np.abs(ref).max())), "mean != pooled"
                    per.setdefault("_t", 0.0)
                    per["_t"] += time.time() - t0
                    per[phase + "_v"] = v
                    if variant == "ii" and kind == "dom_raw" and len(layers) == 1:
                        # (for L2+4+6 the per-layer scale differs: token-level vs pooled spread)
                        vi = probes[key] if phase == "final" else vprobes[key]
                        for L in v:
                            assert np.allclose(v[L], vi[L], rtol=1e-4, atol=1e-6), "dom_raw tokens != pooled"
                for agg in AGGS:
                    tres[(key, variant, agg)] = per[agg] | {"t": per["_t"], "v": per["final_v"]}
                log(f"token level {name(key)} ({variant}) done in {per['_t']:.1f}s")

        tranking = sorted(tres, key=lambda k: (-round(tres[k]["val"]["auroc"], 4), -tres[k]["val"]["recall"]))
        print("\n### Token-level candidates (ranked by the train-only criterion)\n")
        print(HEADER.replace("| candidate |", "| candidate (probe; token probe; aggregation) |"))
        for k in tranking:
            r = tres[k]
            key, variant, agg = k
            label = f"{name(key)}; {'(i) pooled probe' if variant == 'i' else '(ii) token-fitted'}; {agg}"
            note = "; ".join(x for x in (r["val_note"] and f"val {r['val_note']}",
                                         r["final_note"] and f"final {r['final_note']}",
                                         f"{r['t']:.1f}s per 4 aggregations") if x)
            if variant == "ii" and key[1] == "dom_raw" and len(FEATURES[key[0]]) == 1:
                note = "= (i), checked; " + note
            print(fmt_row(label, r["val"], r["final"], note))
    else:
        tres, tranking = {}, []

    # ---------------------------------------------------------------- the pick
    allc = [("pooled", k) for k in ranking] + [("token", k) for k in tranking]

    def crit(c):
        r = res[c[1]] if c[0] == "pooled" else tres[c[1]]
        return (-round(r["val"]["auroc"], 4), -r["val"]["recall"])

    pick = min(allc, key=crit)
    print(f"\n### The pick (train-only criterion over all {len(allc)} candidates)\n")
    tied = [c for c in allc if crit(c) == crit(pick)]
    if len(tied) > 1:
        devs = [(res[c[1]]["dev"] if c[0] == "pooled" else tres[c[1]]["final"])["auroc"] for c in tied]
        print(f"The criterion ties {len(tied)} candidates at the top (val AUROC {-crit(pick)[0]:.4f}, recall "
              f"{-crit(pick)[1]:.3f}); the script resolves the tie by grid order (pooled before token level; "
              f"features L2, L4, L6, L2+4+6; types {', '.join(TYPES)}; without refneg first). Tied: "
              + "; ".join(f"{c[0]} {name(c[1]) if c[0] == 'pooled' else name(c[1][0]) + ' (' + c[1][1] + ') ' + c[1][2]}"
                          for c in tied)
              + f". Their dev AUROC: {min(devs):.4f}-{max(devs):.4f}.\n")
    if pick[0] == "pooled":
        key = pick[1]
        r = res[key]
        print(f"pooled {name(key)}: val AUROC {r['val']['auroc']:.4f}, val recall {r['val']['recall']:.3f}; "
              f"dev AUROC {r['dev']['auroc']:.4f}, recall {r['dev']['recall']:.3f}, FPR {r['dev']['fpr']:.4f}")
        sdev = score(probes[key], dv["X"])
        thr = r["thr"]
    else:
        key, variant, agg = pick[1]
        r = tres[pick[1]]
        print(f"token {name(key)}, ({variant}), {agg}: val AUROC {r['val']['auroc']:.4f}, recall "
              f"{r['val']['recall']:.3f}; dev AUROC {r['final']['auroc']:.4f}, recall {r['final']['recall']:.3f}, "
              f"FPR {r['final']['fpr']:.4f}")
        # recompute the per-text dev scores of the picked token candidate
        v = r["v"]
        s_all, off_all = tok_scores(v, dtok, np.arange(len(dv["id"])))
        sdev = aggregate(s_all, off_all, agg)
        thr = r["final_thr"]
    peer_s = score(probes[PEER], dv["X"])
    print("\n| dev subset | n | AUROC vs all dev benign (pick) | flagged (pick) | AUROC (peer dom_raw L6) | "
          "flagged (peer) |\n|---|---|---|---|---|---|")
    for lab in sorted(set(dv["label"])):
        sel = dv["label"] == lab
        if dv["y"][sel][0] == 1:
            a = roc_auc_score(np.r_[np.ones(sel.sum()), np.zeros(len(dneg))], np.r_[sdev[sel], sdev[dneg]])
            ap_ = roc_auc_score(np.r_[np.ones(sel.sum()), np.zeros(len(dneg))], np.r_[peer_s[sel], peer_s[dneg]])
        else:
            a = ap_ = float("nan")
        print(f"| {lab} | {sel.sum()} | {a:.4f} | {(sdev[sel] > thr).mean():.3f} | {ap_:.4f} | "
              f"{(peer_s[sel] > res[PEER]['thr']).mean():.3f} |")
    log("done")


if __name__ == "__main__":
    main()
