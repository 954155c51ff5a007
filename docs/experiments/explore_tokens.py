#!/usr/bin/env python3
"""Prototype for the issue "Detection power": token-aggregation operators on per-token activations.

Prototype only (numpy / scikit-learn); nothing here is used by the product. Findings: tokens.md.
Run:  python docs/experiments/explore_tokens.py [--tokens target/tokens] [--data DIR] [--seed 0]
      (the per-token files come from scripts/make_token_data.sh; tests/data/tokens works for a smoke run)

Pipeline (seed s):
  1. train computations (sentences) split by a seeded hash of their id (explore_defaults.split_ids):
     25% calibration, 75% fit; every token of a computation goes with it;
  2. per site (layer) present and detector, fit on the fit tokens:
       gauss_l2  L2-normalise, Ledoit-Wolf Mahalanobis^2 (sklearn LedoitWolf)
       knn       cosine distance to the 10th nearest fit token, exact, against a seeded sample of at most
                 --knn-fit (50,000) fit tokens
  3. per (site, detector) slot, each token's smoothed -ln p (explore_defaults.smoothed_p: conformal p
     interpolated in the bulk, exponential tail) against the calibration tokens' scores
     (leave-one-out for calibration tokens themselves, as the product does per trace);
  4. per slot, the token values x_1..x_n of a computation, in position order ([CLS] and [SEP] included),
     aggregate into one value by an operator:
       max                   max_t x_t                                (what the product does today)
       mean                  (1/n) sum_t x_t
       ema:a                 max_t e_t, e_t = a x_t + (1-a) e_{t-1}, e_0 = 0
       max_rolling_mean:w    max_t (1/w) sum_{s=max(1,t-w+1)..t} x_s  (missing tokens before the first count 0)
       topk_mean:k           mean of the min(k, n) largest x_t
  5. slots fuse by min-p: F = max_slot(aggregate) - ln(#slots);
  6. F is calibrated conformally on the calibration computations, p = (1 + #{cal >= F}) / (1 + n_cal), flag
     at p <= 0.01; "global" uses every calibration computation, "Mondrian" only those of the same length
     bucket (quartiles of token count over the calibration computations).
  Baseline "pooled": the same pipeline on mean-pooled vectors (product default: pooled train vectors of
  the shared train.parquet; dev_id / span-injected / OOD computations mean-pooled from their captured
  tokens), one value per computation and slot.

Reports: token-level AUROC per slot (span tokens, and the tokens around them, vs dev_id tokens);
(a) span-injected vs dev_id: AUROC, recall at 1% FPR (threshold at dev_id's 99th percentile), the
conformal flag's recall and dev_id FPR, also for the token count alone; (a2) with spans_id_tokens.parquet
present (make_token_data.sh --control: the same sentences, span length and position, in-distribution
span content), the control vs dev_id and the OOD spans vs their controls; (a') AUROC by span category
and length, and how often the most anomalous token lies inside the span; (b) achieved FPR on dev_id by
length bucket, global vs Mondrian; (c) with dev_ood_*_tokens.parquet present (--ood), AUROC dev_id vs
each OOD category (whole texts).
Choices are fixed a priori (the operator grid above); nothing is tuned on the test sets.
"""
import argparse
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import explore_defaults as ed

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TOKENS = os.path.join(HERE, "..", "..", "target", "tokens")
ALPHA = 0.01
CAL_FRAC = 0.25
KNN_K = 10
DETS = ("gauss_l2", "knn")
OPS = ["max", "mean", "ema:0.1", "ema:0.25", "ema:0.5", "max_rolling_mean:4", "max_rolling_mean:8",
       "max_rolling_mean:16", "topk_mean:4", "topk_mean:8"]
OOD_CATS = ("code", "non_english", "base64")
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data
class Tokens:
    """Per-token traces of one file: computations in sorted id order, tokens in position order."""

    def __init__(self, path, sites=None):
        pf = pq.ParquetFile(path)
        all_sites = sorted(set(pq.read_table(path, columns=["site"]).column("site").to_pylist()), key=int)
        self.sites = [s for s in all_sites if sites is None or s in sites]
        self.x = {}
        for site in self.sites:
            t = pq.read_table(path, columns=["trace_id", "position", "activation"], filters=[("site", "=", site)])
            ids = np.asarray(t.column("trace_id").to_pylist())
            pos = t.column("position").to_numpy()
            act = t.column("activation").combine_chunks()
            x = act.values.to_numpy(zero_copy_only=False).reshape(len(ids), act.type.list_size)
            if not hasattr(self, "uids"):
                self.uids, comp = np.unique(ids, return_inverse=True)
                order = np.lexsort((pos, comp))
                self.comp = comp[order]
                self.pos = pos[order]
                self.n = np.bincount(self.comp, minlength=len(self.uids))
                self.off = np.r_[0, np.cumsum(self.n)]
                if not np.array_equal(self.pos, np.arange(len(self.pos)) - self.off[self.comp]):
                    raise SystemExit(f"{path}: positions are not 0..n-1 per computation")
            else:
                comp = np.searchsorted(self.uids, ids)
                order = np.lexsort((pos, comp))
                if not (np.array_equal(comp[order], self.comp) and np.array_equal(pos[order], self.pos)):
                    raise SystemExit(f"{path}: site {site} has other tokens than site {self.sites[0]}")
            self.x[site] = np.ascontiguousarray(x[order], dtype=np.float32)
        del pf

    def pooled(self, site):
        return np.add.reduceat(self.x[site].astype(np.float64), self.off[:-1], axis=0) / self.n[:, None]


# ----------------------------------------------------------------------------- detectors
class GaussL2:
    def fit(self, x):
        self.lw = LedoitWolf().fit(ed.l2n(np.asarray(x, np.float64)))
        return self

    def score(self, x):
        out = np.empty(len(x))
        for a in range(0, len(x), 65536):
            out[a:a + 65536] = self.lw.mahalanobis(ed.l2n(np.asarray(x[a:a + 65536], np.float64)))
        return out


class KnnCos:
    """Cosine distance to the k-th nearest fit vector, exact (float32 products)."""

    def __init__(self, k=KNN_K, block=50):
        self.k, self.block = k, block

    def fit(self, x):
        f = ed.l2n(np.asarray(x, np.float32))
        if len(f) < 4 * self.k * self.block:  # small fit sets: plain partition
            self.block = 1
        pad = (-len(f)) % self.block  # zero rows: similarity 0, never among the k nearest of real data
        self.f = np.r_[f, np.full((pad, f.shape[1]), 0.0, np.float32)] if pad else f
        self.pad = pad
        return self

    def score(self, x, chunk=1024):
        out = np.empty(len(x))
        k = self.k
        for a in range(0, len(x), chunk):
            q = ed.l2n(np.asarray(x[a:a + chunk], np.float32))
            s = q @ self.f.T
            if self.pad:
                s[:, -self.pad:] = -np.inf
            # exact k-th largest: the k-th largest block maximum is a lower bound tau of it, so only
            # entries >= tau can be among the k largest
            bm = s.reshape(len(q), -1, self.block).max(axis=2)
            tau = -np.partition(-bm, k - 1, axis=1)[:, k - 1]
            r, c = np.nonzero(s >= tau[:, None])
            v = s[r, c]
            o = np.lexsort((-v, r))
            r, v = r[o], v[o]
            first = np.searchsorted(r, np.arange(len(q)))
            out[a:a + chunk] = 1.0 - v[first + k - 1]
        return out


def make_detector(name):
    return GaussL2() if name == "gauss_l2" else KnnCos()


# ----------------------------------------------------------------------------- p-values
def nlp_of(cal, s):
    return -np.log(ed.smoothed_p(cal, s))


def nlp_loo(cal):
    """Leave-one-out smoothed -ln p of each calibration score (as ed.nlp_loo, vectorised)."""
    cal = np.asarray(cal, np.float64)
    n = len(cal)
    order = np.argsort(cal, kind="stable")
    c = cal[order]
    n1 = n - 1
    m = ed.tail_m(n1)
    ti = n1 - 1 - m
    pc = (1.0 + n1 - np.arange(n1)) / (n1 + 1.0)
    pt = pc[ti]
    j = np.arange(n)
    top = np.cumsum(c[::-1])  # top[k-1] = sum of the k largest
    out = np.zeros(n)
    # j in the LOO tail region (j > ti): t = c[ti]; tail = c[ti+1:] without c[j]
    hi = j > ti
    t_hi = c[ti]
    beta_hi = np.maximum((top[m] - c[hi]) / m - t_hi, 1e-12)
    out[hi] = -np.log(pt) + (c[hi] - t_hi) / beta_hi
    # j in the bulk (j <= ti): t = c[ti+1]; s = c[j] <= t, interpolated between c[j-1] and c[j+1]
    lo = np.flatnonzero(~hi & (j >= 1))
    x0, x1 = c[lo - 1], c[lo + 1]
    p0, p1 = pc[lo - 1], pc[lo]
    w = np.where(x1 > x0, (c[lo] - x0) / np.where(x1 > x0, x1 - x0, 1.0), 1.0)
    out[lo] = -np.log(p0 + w * (p1 - p0))
    res = np.empty(n)
    res[order] = out
    return res


def conformal_p(cal, s):
    return ed.conformal_p(np.asarray(cal), np.asarray(s))


# ----------------------------------------------------------------------------- operators
def padded(x, off, n):
    """Per-computation token values -> (n_comp, T) matrix, NaN beyond each length."""
    t = int(n.max())
    m = np.full((len(n), t), np.nan)
    comp = np.repeat(np.arange(len(n)), n)
    m[comp, np.arange(len(x)) - off[comp]] = x
    return m


def aggregate(m, n, op):
    valid = ~np.isnan(m)
    if op == "max":
        return np.nanmax(m, axis=1)
    if op == "mean":
        return np.nansum(m, axis=1) / n
    name, _, par = op.partition(":")
    if name == "ema":
        a = float(par)
        e = np.zeros(len(m))
        best = np.full(len(m), -np.inf)
        for t in range(m.shape[1]):
            e = a * np.nan_to_num(m[:, t]) + (1 - a) * e
            best = np.where(valid[:, t], np.maximum(best, e), best)
        return best
    if name == "max_rolling_mean":
        w = int(par)
        c = np.concatenate([np.zeros((len(m), 1)), np.cumsum(np.nan_to_num(m), axis=1)], axis=1)
        t = np.arange(1, m.shape[1] + 1)
        win = (c[:, t] - c[:, np.maximum(t - w, 0)]) / w
        return np.where(valid, win, -np.inf).max(axis=1)
    if name == "topk_mean":
        k = int(par)
        s = -np.sort(-np.where(valid, m, -np.inf), axis=1)[:, :k]
        kk = np.minimum(k, n)
        return np.where(np.isfinite(s), s, 0.0).sum(axis=1) / kk
    raise ValueError(op)


def check_operators():
    """The operators against their definitions, on random sequences (fails loudly)."""
    rng = np.random.default_rng(1)
    n = rng.integers(1, 30, size=50)
    x = rng.exponential(size=n.sum())
    off = np.r_[0, np.cumsum(n)]
    m = padded(x, off, n)
    for op in OPS:
        got = aggregate(m, n, op)
        for i in range(len(n)):
            v = x[off[i]:off[i + 1]]
            name, _, par = op.partition(":")
            if name == "max":
                want = v.max()
            elif name == "mean":
                want = v.mean()
            elif name == "ema":
                a, e, want = float(par), 0.0, -np.inf
                for xt in v:
                    e = a * xt + (1 - a) * e
                    want = max(want, e)
            elif name == "max_rolling_mean":
                w = int(par)
                want = max(v[max(0, t - w + 1):t + 1].sum() / w for t in range(len(v)))
            else:
                want = np.sort(v)[::-1][:int(par)].mean()
            assert abs(got[i] - want) < 1e-9, (op, i, got[i], want)


def check_loo():
    rng = np.random.default_rng(2)
    for n in (12, 40, 300):
        cal = rng.normal(size=n)
        assert np.allclose(nlp_loo(cal), ed.nlp_loo(cal), atol=1e-9), n


# ----------------------------------------------------------------------------- metrics
def auroc(neg, pos):
    return roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])


def recall_at_fpr(neg, pos, fpr=ALPHA):
    t = np.sort(neg)[::-1][int(np.floor(fpr * len(neg)))]
    return float(np.mean(pos > t))


def rate(flags):
    return float(np.mean(flags)) if len(flags) else float("nan")


def bucket_of(n, edges):
    return np.searchsorted(edges, n, side="left")  # n <= q25 -> 0, ..., n > q75 -> 3


def mondrian_p(cal_f, cal_b, f, b):
    p = np.ones(len(f))
    for k in np.unique(b):
        if np.any(cal_b == k):
            p[b == k] = conformal_p(cal_f[cal_b == k], f[b == k])
    return p


# ----------------------------------------------------------------------------- experiment
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default=DEFAULT_TOKENS, help="output dir of scripts/make_token_data.sh")
    ap.add_argument("--data", default=ed.DEFAULT_DATA, help="the shared MiniLM files (pooled train vectors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--knn-fit", type=int, default=50000, help="at most this many fit tokens for kNN (seeded)")
    ap.add_argument("--sites", default=None, help="comma-separated sites (default: all in the files)")
    a = ap.parse_args()
    check_operators()
    check_loo()
    sites = a.sites.split(",") if a.sites else None
    path = lambda name: os.path.join(a.tokens, f"{name}_tokens.parquet")
    sets = {"train": Tokens(path("train"), sites)}
    sites = sets["train"].sites
    sets["dev_id"] = Tokens(path("dev_id"), sites)
    sets["spans"] = Tokens(path("spans"), sites)
    cats = [c for c in OOD_CATS if os.path.exists(path(f"dev_ood_{c}"))]
    for c in cats:
        sets[c] = Tokens(path(f"dev_ood_{c}"), sites)
    control = os.path.exists(path("spans_id"))
    if control:
        sets["spans_id"] = Tokens(path("spans_id"), sites)
    log(f"loaded {', '.join(f'{k} {len(v.uids)} comps / {len(v.comp)} tokens' for k, v in sets.items())}; sites {sites}")

    tr = sets["train"]
    is_cal = ed.split_ids(tr.uids, a.seed, CAL_FRAC)
    tok_cal = is_cal[tr.comp]
    cal_ids = np.flatnonzero(is_cal)
    cal_n = tr.n[cal_ids]
    cal_off = np.r_[0, np.cumsum(cal_n)]
    test = ["dev_id", "spans"] + (["spans_id"] if control else []) + cats
    span_sets = ["spans"] + (["spans_id"] if control else [])
    # the sidecars, aligned with the computations; in-span token masks
    sp, in_span = {}, {}
    for k in span_sets:
        side = pq.read_table(os.path.join(a.tokens, f"{k}.parquet")).to_pydict()
        row = {u: i for i, u in enumerate(side["id"])}
        sp[k] = {c: np.asarray(v)[[row[u] for u in sets[k].uids]] for c, v in side.items()}
        S = sets[k]
        in_span[k] = (S.pos >= sp[k]["span_start"][S.comp]) & (S.pos < (sp[k]["span_start"] + sp[k]["span_len"])[S.comp])
    slots = [(s, d) for s in sites for d in DETS]
    rng = np.random.default_rng(a.seed)
    fit_rows = np.flatnonzero(~tok_cal)
    knn_rows = np.sort(rng.choice(fit_rows, size=min(a.knn_fit, len(fit_rows)), replace=False))

    # per-token nlp -> per-computation aggregates: agg[op][set] = (n_comp, n_slots)
    agg = {op: {k: np.empty((len(cal_ids) if k == "cal" else len(sets[k].uids), len(slots))) for k in ["cal"] + test}
           for op in OPS}
    tok_stat = {k: np.empty((len(sets[k].comp), len(slots))) for k in span_sets}  # localisation
    tok_auroc = {}
    for j, (site, det) in enumerate(slots):
        t0 = time.time()
        d = make_detector(det).fit(tr.x[site][knn_rows if det == "knn" else fit_rows])
        cs = d.score(tr.x[site][tok_cal])
        nlp = {"cal": nlp_loo(cs)}
        for k in test:
            sc = d.score(sets[k].x[site])
            nlp[k] = nlp_of(cs, sc)
        for k in span_sets:
            tok_stat[k][:, j] = nlp[k]
            tok_auroc[(k, "in", site, det)] = auroc(nlp["dev_id"], nlp[k][in_span[k]])
            tok_auroc[(k, "out", site, det)] = auroc(nlp["dev_id"], nlp[k][~in_span[k]])
        for k in ["cal"] + test:
            n, off = (cal_n, cal_off) if k == "cal" else (sets[k].n, sets[k].off)
            m = padded(nlp[k], off, n)
            for op in OPS:
                agg[op][k][:, j] = aggregate(m, n, op)
        log(f"slot L{site} {det}: fit + score {time.time() - t0:.1f}s")

    # pooled baseline: pooled train vectors from the shared file, the rest pooled from captured tokens
    t0 = time.time()
    p_ids, p_x = ed.load(os.path.join(a.data, "train.parquet"))
    pos_of = {u: i for i, u in enumerate(p_ids)}
    rows = np.array([pos_of[u] for u in tr.uids])
    p_x = p_x[rows]
    diff = max(float(np.abs(tr.pooled(s) - p_x[:, ed.LAYERS.index(int(s))]).max()) for s in sites)
    log(f"mean-pooled captured train tokens vs the shared pooled vectors: max abs difference {diff:.2g}")
    p_cal = is_cal
    pooled = {k: np.empty((len(cal_ids) if k == "cal" else len(sets[k].uids), len(slots))) for k in ["cal"] + test}
    for j, (site, det) in enumerate(slots):
        li = ed.LAYERS.index(int(site))
        d = make_detector(det).fit(p_x[~p_cal, li])
        cs = d.score(p_x[p_cal, li])
        pooled["cal"][:, j] = nlp_loo(cs)
        for k in test:
            pooled[k][:, j] = nlp_of(cs, d.score(sets[k].pooled(site)))
    agg["pooled"] = pooled
    log(f"pooled baseline {time.time() - t0:.1f}s")

    ops = OPS + ["pooled"]
    configs = {f"layer {s}": [j for j, (ss, _) in enumerate(slots) if ss == s] for s in sites}
    if len(sites) > 1:
        configs["all layers"] = list(range(len(slots)))
    fused = {c: {op: {k: agg[op][k][:, js].max(axis=1) - np.log(len(js)) for k in agg[op]} for op in ops}
             for c, js in configs.items()}

    # length buckets: quartiles of the calibration computations' token counts (integer cut points;
    # bucket k holds lengths in (edges[k-1], edges[k]]); a bucket without calibration computations
    # gives p = 1 under Mondrian
    edges = np.unique(np.floor(np.percentile(cal_n, [25, 50, 75])).astype(int))
    nb = len(edges) + 1
    cal_b = bucket_of(cal_n, edges)
    lengths = {k: sets[k].n for k in test}
    buckets = {k: bucket_of(lengths[k], edges) for k in test}
    bounds = [1] + [int(e) + 1 for e in edges]
    bnames = [f"{lo}-{int(e)}" for lo, e in zip(bounds, edges)] + [f">={bounds[-1]}"]

    print(f"# explore_tokens.py (seed {a.seed}; sites {','.join(sites)}; detectors {','.join(DETS)}; "
          f"calibration {len(cal_ids)} computations / {int(tok_cal.sum())} tokens, fit {int((~is_cal).sum())} "
          f"computations / {len(fit_rows)} tokens, kNN against {len(knn_rows)}; tokens dir {a.tokens})\n")
    print("## Token-level AUROC per slot: tokens of span-injected sequences vs every dev_id token\n")
    names = {"spans": "OOD span", "spans_id": "ID-span control"}
    print("| tokens | " + " | ".join(f"L{s} {d}" for s, d in slots) + " |")
    print("|---" * (len(slots) + 1) + "|")
    for k in span_sets:
        for where, what in (("in", "inside the span"), ("out", "outside the span")):
            print(f"| {names[k]}: {what} | " + " | ".join(f"{tok_auroc[(k, where, s, d)]:.3f}" for s, d in slots)
                  + " |")
    print()

    # (a)
    for c in configs:
        print(f"## (a) span-injected ({len(sets['spans'].uids)}) vs dev_id ({len(sets['dev_id'].uids)}), {c}\n")
        print("| operator | AUROC | recall @ 1% FPR | flagged (p <= 0.01): spans | dev_id FPR |")
        print("|---|---|---|---|---|")
        rows = [(op, fused[c][op]) for op in ops]
        rows.append(("token count (no detector)", {"cal": cal_n.astype(float), **{k: lengths[k] for k in test}}))
        for op, f in rows:
            p_id = conformal_p(f["cal"], f["dev_id"])
            p_sp = conformal_p(f["cal"], f["spans"])
            print(f"| {op} | {auroc(f['dev_id'], f['spans']):.4f} | {recall_at_fpr(f['dev_id'], f['spans']):.3f} | "
                  f"{np.mean(p_sp <= ALPHA):.3f} | {np.mean(p_id <= ALPHA):.4f} |")
        print()
        if control:
            print(f"## (a2) the paired in-distribution control (same base sentence, span length and position; "
                  f"span from another dev_id sentence), {c}\n")
            print("| operator | AUROC control vs dev_id | control flagged | AUROC OOD span vs control | "
                  "pairs with OOD span > control (ties 1/2) |")
            print("|---|---|---|---|---|")
            for op, f in rows:
                pc = conformal_p(f["cal"], f["spans_id"])
                print(f"| {op} | {auroc(f['dev_id'], f['spans_id']):.4f} | {np.mean(pc <= ALPHA):.3f} | "
                      f"{auroc(f['spans_id'], f['spans']):.4f} | {np.mean(f['spans'] > f['spans_id']) + 0.5 * np.mean(f['spans'] == f['spans_id']):.3f} |")
            print()

    # (a') breakdown by span category and length (reported, not used to choose)
    c = "all layers" if "all layers" in configs else f"layer {sites[0]}"
    lens = sp["spans"]["span_len"]
    groups = [(f"{cat}", sp["spans"]["ood_category"] == cat) for cat in OOD_CATS
              if np.any(sp["spans"]["ood_category"] == cat)]
    groups += [("L 4-7", lens <= 7), ("L 8-11", (lens >= 8) & (lens <= 11)), ("L 12-16", lens >= 12)]
    print(f"## (a') AUROC span-injected vs dev_id by span category and span length, {c}\n")
    print("| operator | " + " | ".join(f"{g} ({int(m.sum())})" for g, m in groups) + " |")
    print("|---" * (len(groups) + 1) + "|")
    for op in ops:
        f = fused[c][op]
        print(f"| {op} | " + " | ".join(f"{auroc(f['dev_id'], f['spans'][m]):.4f}" for _, m in groups) + " |")
    # localisation: does the most anomalous token (fused over the config's slots) lie inside the span?
    js = configs[c]
    for k in span_sets:
        st = tok_stat[k][:, js].max(axis=1)
        S = sets[k]
        argmax = np.array([np.argmax(st[S.off[i]:S.off[i + 1]]) for i in range(len(S.uids))])
        inside = (argmax >= sp[k]["span_start"]) & (argmax < sp[k]["span_start"] + sp[k]["span_len"])
        share = float(np.mean(sp[k]["span_len"] / sp[k]["n_tokens"]))
        print(f"\n{names[k]}: the most anomalous token (max over slots of token -ln p, {c}) lies inside the span in "
              f"{np.mean(inside):.3f} of the sequences (spans are {share:.3f} of their tokens on average).")
    print()

    # (b)
    for c in configs:
        cnt = " / ".join(str(int(np.sum(cal_b == b))) for b in range(nb))
        dcnt = " / ".join(str(int(np.sum(buckets["dev_id"] == b))) for b in range(nb))
        scnt = " / ".join(str(int(np.sum(buckets["spans"] == b))) for b in range(nb))
        print(f"## (b) achieved FPR on dev_id at alpha = 0.01, by token-count bucket, {c}\n")
        print(f"Buckets (quartiles of the calibration computations' token counts): {', '.join(bnames)}; "
              f"computations per bucket: calibration {cnt}; dev_id {dcnt}; span-injected {scnt}.\n")
        print("| operator | global: all | " + " | ".join(f"global: {b}" for b in bnames)
              + " | Mondrian: all | " + " | ".join(f"Mondrian: {b}" for b in bnames)
              + " | spans flagged: global | spans flagged: Mondrian |")
        print("|---" * (2 * nb + 5) + "|")
        for op in ops:
            f = fused[c][op]
            pg = conformal_p(f["cal"], f["dev_id"])
            pm = mondrian_p(f["cal"], cal_b, f["dev_id"], buckets["dev_id"])
            sg = conformal_p(f["cal"], f["spans"])
            sm = mondrian_p(f["cal"], cal_b, f["spans"], buckets["spans"])
            b = buckets["dev_id"]
            cells = [f"{np.mean(pg <= ALPHA):.4f}"] + [f"{rate(pg[b == k] <= ALPHA):.3f}" for k in range(nb)]
            cells += [f"{np.mean(pm <= ALPHA):.4f}"] + [f"{rate(pm[b == k] <= ALPHA):.3f}" for k in range(nb)]
            cells += [f"{np.mean(sg <= ALPHA):.3f}", f"{np.mean(sm <= ALPHA):.3f}"]
            print(f"| {op} | " + " | ".join(cells) + " |")
        print()

    # (c)
    if cats:
        for c in configs:
            print(f"## (c) AUROC dev_id vs dev_ood_* (per-token captures of the whole texts), {c}\n")
            print("| operator | " + " | ".join(f"{k} ({len(sets[k].uids)})" for k in cats)
                  + " | flagged: " + " | flagged: ".join(cats) + " |")
            print("|---" * (2 * len(cats) + 1) + "|")
            for op in ops:
                f = fused[c][op]
                print(f"| {op} | " + " | ".join(f"{auroc(f['dev_id'], f[k]):.4f}" for k in cats) + " | "
                      + " | ".join(f"{np.mean(conformal_p(f['cal'], f[k]) <= ALPHA):.3f}" for k in cats) + " |")
            print()
    log("done")


if __name__ == "__main__":
    sys.exit(main())
