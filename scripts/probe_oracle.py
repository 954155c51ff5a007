"""Writes the scikit-learn oracle that crates/actwatch-detect/tests/probe.rs checks actwatch's
logistic-regression probe against.

    python scripts/probe_oracle.py crates/actwatch-detect/tests/data/logistic_sklearn.json

Needs numpy and scikit-learn (any recent version; the file records which). The data are seeded
(numpy default_rng(7)): features with different means and scales (so standardisation matters),
correlated, labels from a noisy logistic model (not separable), sample weights in {0.5, 1, 2}.
scikit-learn fits LogisticRegression (lbfgs, tol 1e-12, max_iter 1e6: converged far beyond its
default) on StandardScaler-standardised features (weighted), for several C.
"""

import json
import sys

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


def main() -> None:
    out = sys.argv[1]
    rng = np.random.default_rng(7)
    n, d = 400, 12
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(n, d)) @ mix
    x = x * rng.uniform(0.1, 10.0, size=d) + rng.uniform(-5.0, 5.0, size=d)
    x = x.astype(np.float32)
    true_w = rng.normal(size=d)
    z = StandardScaler().fit_transform(x.astype(np.float64)) @ true_w * 0.7 - 0.8
    y = rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-z))
    w = rng.choice([0.5, 1.0, 2.0], size=n)
    xd = x.astype(np.float64)
    scaler = StandardScaler().fit(xd, sample_weight=w)
    xs = scaler.transform(xd)
    cases = []
    for c in [0.001, 0.1, 1.0, 100.0]:
        lr = LogisticRegression(C=c, tol=1e-12, max_iter=1_000_000).fit(xs, y, sample_weight=w)
        cases.append({"c": c, "beta": lr.coef_[0].tolist(), "intercept": float(lr.intercept_[0])})
    json.dump(
        {
            "sklearn": sklearn.__version__,
            "n": n,
            "dim": d,
            "rows": x.ravel().astype(float).tolist(),
            "labels": y.astype(int).tolist(),
            "weights": w.tolist(),
            "mean": scaler.mean_.tolist(),
            "scale": scaler.scale_.tolist(),
            "cases": cases,
        },
        open(out, "w"),
        indent=None,
    )
    print(f"wrote {out}: {n} x {d}, {int(y.sum())} positive, C in {[c['c'] for c in cases]}")


if __name__ == "__main__":
    main()
