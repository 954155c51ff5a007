#!/usr/bin/env python3
"""Time the peer tools on the data the Rust benchmark (`--example bench`) uses.

    python scripts/bench_peers.py OUT_DIR [--quick] [--threads N] [--src DIR] [--no-export]
                                  [--big-refs N] [--knn-only]

1. Writes the inputs into OUT_DIR as raw little-endian float32, row-major, each with a
   `NAME.shape` JSON sidecar {"rows": R, "cols": C}, so Rust reads the exact same bytes:
     fit.f32        layer-2 rows of train.parquet, sorted by id            (6000 x 384)
     query.f32      layer-2 rows of dev_id + dev_ood_* (2500 unique, in that
                    file order, each sorted by id), repeated to 100,000 rows (10,000 with --quick)
     big_ref.f32    synthetic Gaussian mixture, L2-normalised             (100,000 x 384; 10,000 --quick;
                                                                           --big-refs N)
     big_query.f32  fresh draws from the same mixture, L2-normalised        (2,000 x 384; 500 --quick)
     wide_fit_D.f32, wide_query_D.f32   synthetic correlated Gaussian rows, D = 1024 (16,384 and
                    4,096 rows) and 4096 (8,192 and 4,096 rows); --quick: D = 1024 only, 2,048 / 512
   plus manifest.json (how each was made, sha256 of each file).
2. Times the peers and prints one JSON object per line on stdout, e.g.
     {"task": "gaussian_score", "tool": "numpy-blas-whitening", "n": 100000, "d": 384,
      "threads": 2, "seconds": 0.41, "per_s": 243000.0, ...}
   and a human table on stderr. Timings are wall clock, median of 3 (slow jobs) or 5 (fast
   jobs) repeats after one warm-up run (HNSW build: median of 3, no warm-up); "min_seconds"
   is the fastest repeat. Other work on the machine distorts everything (2-thread BLAS worst):
   CPU idle share just before and after the run is reported in the "_meta" rows.

Tasks (the Rust bench should use the same task names):
  gaussian_fit     seconds   Ledoit-Wolf fit on fit.f32 + eigendecomposition -> whitening matrix
  gaussian_score   per_s     squared Mahalanobis distance of each query.f32 row (vectors/s)
  gaussian_fit_100k       seconds   the same fit on big_ref.f32 (100,000 x 384 with the default sizes)
  gaussian_fit_dD         seconds   the same fit on wide_fit_D.f32 (all threads)
  gaussian_score_dD[lr]_bB per_s    scoring wide_query_D.f32 in calls of B rows (B = 1: the first 256
                                    rows; 64 and 4096: all), 1 and all threads; "lr": low rank
                                    (r = 256 + isotropic residual, actwatch's default at d = 4096),
                                    otherwise full whitening; full models at B = 64 and 4096
                                    also with scikit-learn's mahalanobis (256 rows at d = 4096, B = 64)
  knn_exact_6k     per_s     exact cosine k=10, refs = fit.f32 (6000), queries = first 20,000 of query.f32
  knn_exact_10k    per_s     exact cosine k=10, refs = the first 10,000 rows of big_ref.f32, queries =
                             big_query.f32
  knn_exact_big    per_s     exact cosine k=10, refs = big_ref.f32, queries = big_query.f32
  hnsw_build       seconds   HNSW (M=16, ef_construction=200) over big_ref.f32: hnswlib, faiss
                             IndexHNSWFlat (inner product)
  hnsw_query       per_s     HNSW search at ef = 16, 32, 48, 64, 96, 128, 256 ("ef"), k=10, queries =
                             big_query.f32; "recall_at_10" against faiss's exact search
Rows carry "threads"; the kNN tasks and the HNSW build and query are also run with threads=1.
"per_thread" = per_s / threads.

Thread count: --threads (default: all cores, os.cpu_count()); OMP/MKL/OPENBLAS_NUM_THREADS are
set before numpy is imported. Run it inside the .venv-bench venv (scripts/bench.sh makes it).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time

# ---- threads must be fixed before numpy / faiss load their BLAS ------------------------------
def _early_threads(argv: list[str]) -> int:
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return os.cpu_count() or 1


THREADS = _early_threads(sys.argv[1:])
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
           "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = str(THREADS)

import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

# The shared MiniLM activations, next to the repository (../shared/data/minilm from its root).
DEFAULT_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "minilm")
D = 384
SEED = 20240611
LAYER = 2
# The HNSW search breadths of the recall/speed curve (the same lists in examples/bench.rs); beyond
# 200k references the curve goes on to 512 (at 1M references hnswlib had recall@10 0.972 at ef 256).
HNSW_EFS = (16, 32, 48, 64, 96, 128, 256)
HNSW_EFS_BIG = HNSW_EFS + (384, 512)


# ---- data export ----------------------------------------------------------------------------
def read_layer(path: str, layer: int = LAYER) -> np.ndarray:
    t = pq.read_table(path, columns=["id", "layer", "activation"])
    t = t.filter(pc.equal(t.column("layer"), layer)).sort_by([("id", "ascending")])
    vals = t.column("activation").combine_chunks().values.to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(vals.astype(np.float32, copy=False).reshape(t.num_rows, D))


def l2_normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    n[n == 0] = 1.0
    return (x / n).astype(np.float32)


def gaussian_mixture(n: int, rng_draws: np.random.Generator, params: dict) -> np.ndarray:
    """Mixture of anisotropic Gaussians with low intrinsic dimension (like real embeddings):
    x = c_k + A_k z + s e,  z ~ N(0, I_r), e ~ N(0, I_d); then L2-normalised."""
    centers, bases, comp_w, iso = params["centers"], params["bases"], params["weights"], params["iso"]
    k, r = bases.shape[0], bases.shape[2]
    comp = rng_draws.choice(k, size=n, p=comp_w)
    z = rng_draws.standard_normal((n, r)).astype(np.float32)
    out = (iso * rng_draws.standard_normal((n, D))).astype(np.float32)
    for j in range(k):
        rows = np.flatnonzero(comp == j)
        out[rows] += centers[j] + z[rows] @ bases[j].T
    return l2_normalise(out)


def mixture_params(seed: int, k: int = 64, r: int = 24, iso: float = 0.15) -> dict:
    rng = np.random.default_rng([seed, 1])
    centers = rng.standard_normal((k, D)).astype(np.float32)
    # component spread comparable to the distance between centres, so clusters overlap
    bases = (rng.standard_normal((k, D, r)) * (1.0 / np.sqrt(r)) * 1.2).astype(np.float32)
    w = rng.dirichlet(np.full(k, 2.0))
    return {"centers": centers, "bases": bases, "weights": w, "iso": np.float32(iso),
            "desc": f"{k} components, centres N(0, I_{D}), per-component rank-{r} spread "
                    f"(basis entries N(0, 1.44/{r})) + isotropic N(0, {iso}^2), Dirichlet(2) weights, "
                    f"L2-normalised; seed {seed}"}


def write_matrix(out_dir: str, name: str, x: np.ndarray, manifest: dict, how: str) -> None:
    x = np.ascontiguousarray(x, dtype="<f4")
    path = os.path.join(out_dir, f"{name}.f32")
    tmp = path + ".tmp"
    x.tofile(tmp)
    os.replace(tmp, path)
    with open(os.path.join(out_dir, f"{name}.shape"), "w") as f:
        json.dump({"rows": int(x.shape[0]), "cols": int(x.shape[1])}, f)
        f.write("\n")
    manifest[name] = {"file": f"{name}.f32", "rows": int(x.shape[0]), "cols": int(x.shape[1]),
                      "dtype": "float32 little-endian, row-major", "how": how,
                      "sha256": hashlib.sha256(x.tobytes()).hexdigest()}


def read_matrix(out_dir: str, name: str) -> np.ndarray:
    with open(os.path.join(out_dir, f"{name}.shape")) as f:
        s = json.load(f)
    x = np.fromfile(os.path.join(out_dir, f"{name}.f32"), dtype="<f4")
    return x.reshape(s["rows"], s["cols"]).astype(np.float32, copy=False)


def export(out_dir: str, src: str, quick: bool, big_refs: int | None = None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    n_query = 10_000 if quick else 100_000
    n_big = big_refs or (10_000 if quick else 100_000)
    n_big_q = 500 if quick else 2_000
    manifest: dict = {"quick": quick, "seed": SEED, "layer": LAYER, "source": src}

    fit = read_layer(os.path.join(src, "train.parquet"))
    write_matrix(out_dir, "fit", fit, manifest, f"train.parquet layer {LAYER}, sorted by id")

    parts = ["dev_id", "dev_ood_code", "dev_ood_non_english", "dev_ood_base64"]
    uniq = np.concatenate([read_layer(os.path.join(src, f"{p}.parquet")) for p in parts])
    query = np.resize(uniq, (n_query, D))  # repeats the 2500 unique rows in order
    write_matrix(out_dir, "query", query, manifest,
                 f"layer {LAYER} of {' + '.join(parts)} (each sorted by id; {len(uniq)} unique rows), "
                 f"repeated to {n_query} rows")

    params = mixture_params(SEED)
    big_ref = gaussian_mixture(n_big, np.random.default_rng([SEED, 2]), params)
    write_matrix(out_dir, "big_ref", big_ref, manifest, "synthetic: " + params["desc"])
    big_query = gaussian_mixture(n_big_q, np.random.default_rng([SEED, 3]), params)
    write_matrix(out_dir, "big_query", big_query, manifest,
                 "synthetic, fresh draws from the same mixture as big_ref")

    for d in wide_dims(quick):
        n_fit, n_q = (2_048, 512) if quick else WIDE_ROWS[d]
        rng = np.random.default_rng([SEED, 4, d])
        both = correlated_rows(n_fit + n_q, d, rng)
        write_matrix(out_dir, f"wide_fit_{d}", both[:n_fit], manifest,
                     f"synthetic correlated Gaussian, d = {d}, spectrum ~ 1/j")
        write_matrix(out_dir, f"wide_query_{d}", both[n_fit:], manifest,
                     f"fresh rows of the same distribution as wide_fit_{d}")
        del both

    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


WIDE_DIMS = (1024, 4096)
WIDE_ROWS = {1024: (16_384, 4_096), 4096: (8_192, 4_096)}
WIDE_RANK = 256
WIDE_BATCHES = (1, 64, 4096)


def wide_dims(quick: bool) -> tuple[int, ...]:
    return (1024,) if quick else WIDE_DIMS


def correlated_rows(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """n x d float32 rows of a zero-mean Gaussian with a dense covariance whose spectrum decays
    like 1/j (g @ M, M a random d x d matrix with rows scaled by (1 + j)^-1/2)."""
    m = rng.standard_normal((d, d), dtype=np.float32)
    m *= (1.0 / np.sqrt(1.0 + np.arange(d, dtype=np.float32)))[:, None] / np.sqrt(d)
    out = np.empty((n, d), dtype=np.float32)
    for i in range(0, n, 2048):
        g = rng.standard_normal((min(2048, n - i), d), dtype=np.float32)
        out[i:i + len(g)] = g @ m
    return out


# ---- timing ---------------------------------------------------------------------------------
def timed(fn, repeats: int | None = None, warmup: bool = True):
    """Median wall-clock seconds of fn(); returns (median, last_result, all_times)."""
    res = None
    first = None
    if warmup:
        t0 = time.perf_counter()
        res = fn()
        first = time.perf_counter() - t0
    if repeats is None:
        repeats = 5 if (first is not None and first < 1.0) else 3
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), res, times


def cpu_idle_pct(window: float = 2.0) -> float | None:
    """Share of all CPUs idle over `window` seconds (Linux /proc/stat); None elsewhere."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])
    try:
        i0, t0 = sample()
        time.sleep(window)
        i1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(100.0 * (i1 - i0) / max(t1 - t0, 1), 1)


ROWS: list[dict] = []


def gaussian_fit_of(x: np.ndarray, LedoitWolf):
    """The fit being timed: Ledoit-Wolf, then the eigendecomposition of the shrunk covariance."""
    def fit():
        lw = LedoitWolf().fit(x)
        evals, evecs = np.linalg.eigh(lw.covariance_)
        return lw, evals, evecs
    return fit


def emit(task: str, tool: str, *, n: int, seconds: float, times: list[float], threads: int,
         per_s: bool = True, **extra) -> dict:
    row = {"task": task, "tool": tool, "n": n, "d": D, "threads": threads, "seconds": seconds,
           "min_seconds": min(times)}
    if per_s:
        row["per_s"] = n / seconds
        row["per_thread"] = n / seconds / threads
    row["repeats"] = len(times)
    row.update(extra)
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    return row


def human_table() -> None:
    lines = [f"{'task':<16} {'tool':<34} {'thr':>3} {'n':>8} {'seconds':>9} {'per_s':>11} "
             f"{'per_thread':>11}  extra"]
    for r in ROWS:
        per_s = f"{r['per_s']:>11,.0f}" if "per_s" in r else f"{'-':>11}"
        per_t = f"{r['per_thread']:>11,.0f}" if "per_thread" in r else f"{'-':>11}"
        extra = ", ".join(f"{k}={v}" for k, v in r.items() if k in ("refs", "k", "recall_at_10", "ef"))
        lines.append(f"{r['task']:<16} {r['tool']:<34} {r['threads']:>3} {r['n']:>8} "
                     f"{r['seconds']:>9.4f} {per_s} {per_t}  {extra}")
    print("\n".join(lines), file=sys.stderr)


def sklearn_wide(lw, wq, d: int, b: int, threads: int) -> None:
    """scikit-learn's `LedoitWolf.mahalanobis` (scipy's cdist in f64, one thread whatever the
    limit) on calls of `b` rows of wq, beside the numpy rows of the same task: 256 rows for batches
    of 64 at d = 4096 (about 10 ms a row there), every row otherwise; at d = 4096 a pass over every
    row (about 45 s) is timed once. `lw` carries the precision in f64 (`f64_precision`)."""
    slow = d >= 4096
    rows = wq[:256] if slow and b < len(wq) else wq
    calls = [rows[i:i + b] for i in range(0, len(rows), b)]
    sec, _, times = timed(lambda: [lw.mahalanobis(c) for c in calls],
                          repeats=1 if slow and len(rows) > 256 else 3, warmup=False)
    emit(f"gaussian_score_d{d}_b{b}", "sklearn-ledoitwolf-mahalanobis", n=len(rows), seconds=sec,
         times=times, threads=threads, d=d, batch=b, rank=d)


def check_sklearn(lw, score, wq, d: int) -> None:
    """Warns when numpy's f32 whitening and scikit-learn's distances disagree on the first 64 rows."""
    ref, ours = lw.mahalanobis(wq[:64]), score(wq[:64])
    rel = float(np.max(np.abs(ours - ref) / np.maximum(ref, 1e-9)))
    if rel > 1e-2:
        print(f"warning: d = {d}: f32 whitening differs from sklearn by {rel:.3g} (relative)",
              file=sys.stderr)


def f64_precision(lw):
    """A copy of a fitted LedoitWolf whose precision is the inverse of its covariance in f64.
    Fitted on float32 rows, scikit-learn inverts the float32 covariance with `pinvh`, which drops
    eigenvalues below d * eps(float32) * the largest: on the wide synthetic rows (condition number
    about 6e4 at d = 1024) that cuts 155 of 1,024 directions and its distances come out 13% off
    an f64 oracle (2.6x at d = 4096), where numpy's f32 whitening is within 4e-7. With the f64
    precision they agree to 1e-14; the distance's cost (cdist in f64) is the same either way."""
    out = copy.copy(lw)
    out.precision_ = np.linalg.inv(lw.covariance_.astype(np.float64))
    return out


def bench(out_dir: str, quick: bool, threads: int, knn_only: bool = False) -> None:
    import faiss
    import hnswlib
    import sklearn
    from sklearn.covariance import LedoitWolf
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(threads)
    faiss.omp_set_num_threads(threads)
    blas = ", ".join(sorted({f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} thr)"
                             for i in threadpool_info()}))
    meta = {"task": "_meta", "tool": "env", "threads": threads, "quick": quick,
            "python": platform.python_version(), "numpy": np.__version__,
            "sklearn": sklearn.__version__, "faiss": faiss.__version__,
            "hnswlib": importlib.metadata.version("hnswlib"), "blas": blas,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "cpu_idle_pct_before": cpu_idle_pct(), "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    print(json.dumps(meta), flush=True)
    print(f"# peers: {meta}", file=sys.stderr)
    idle = meta["cpu_idle_pct_before"]
    if idle is not None and idle < 85:
        print(f"warning: CPUs only {idle}% idle before the run: other work on this machine will "
              "distort the timings", file=sys.stderr)

    # -- this CPU's FP32 peak as a large GEMM reaches it (OpenBLAS through numpy), so that kernel
    # figures can be read as a share of what the hardware does
    peak_n = 1024 if quick else 4096
    a = np.random.default_rng([SEED, 9]).standard_normal((peak_n, peak_n), dtype=np.float32)
    for thr in sorted({threads, 1}, reverse=True):
        with threadpool_limits(thr):
            sec, _, times = timed(lambda: a @ a)
        print(json.dumps({"task": "_peak", "tool": "numpy-sgemm", "threads": thr, "n": peak_n,
                          "gflops": round(2 * peak_n**3 / min(times) / 1e9, 1)}), flush=True)
    del a

    fit = read_matrix(out_dir, "fit")
    query = read_matrix(out_dir, "query")
    big_ref = read_matrix(out_dir, "big_ref")
    big_query = read_matrix(out_dir, "big_query")

    # --knn-only: the kNN and HNSW cases alone (e.g. at --big-refs 1000000)
    if not knn_only:
        # -- Gaussian fit: Ledoit-Wolf + eigendecomposition -> whitening matrix W, |(x-mu) W|^2 = d_M^2
        def gaussian_fit():
            lw = LedoitWolf().fit(fit)
            evals, evecs = np.linalg.eigh(lw.covariance_)
            w = evecs / np.sqrt(evals)[None, :]
            return lw, w

        sec, (lw, w64), times = timed(gaussian_fit)
        emit("gaussian_fit", "sklearn-ledoitwolf+numpy-eigh", n=fit.shape[0], seconds=sec, times=times,
             threads=threads, per_s=False, shrinkage=float(lw.shrinkage_))

        # -- Gaussian score
        mu32 = lw.location_.astype(np.float32)
        w32 = w64.astype(np.float32)
        mu64 = lw.location_

        def score_f32():
            z = (query - mu32) @ w32
            return np.einsum("ij,ij->i", z, z)

        q64 = query.astype(np.float64)

        def score_f64():
            z = (q64 - mu64) @ w64
            return np.einsum("ij,ij->i", z, z)

        sec, s32, times = timed(score_f32)
        emit("gaussian_score", "numpy-blas-whitening", n=query.shape[0], seconds=sec, times=times,
             threads=threads, dtype="f32")
        sec, s64, times = timed(score_f64)
        emit("gaussian_score", "numpy-blas-whitening-f64", n=query.shape[0], seconds=sec, times=times,
             threads=threads, dtype="f64")

        ref_maha = lw.mahalanobis(query[:2000])
        sec, s_sk, times = timed(lambda: lw.mahalanobis(query))
        emit("gaussian_score", "sklearn-ledoitwolf-mahalanobis", n=query.shape[0], seconds=sec, times=times,
             threads=threads, dtype="f64")
        rel = float(np.max(np.abs(s32[:2000] - ref_maha) / np.maximum(ref_maha, 1e-9)))
        if rel > 1e-2:
            print(f"warning: f32 whitening differs from sklearn by {rel:.3g} (relative)", file=sys.stderr)

        # -- Gaussian fit at n = 100k (big_ref), and fit + scoring at d = 1024 / 4096, batches 1 / 64 /
        # 4096: numpy BLAS whitening, full (W = V L^-1/2) and, at 4096, low rank (top r eigenvectors
        # plus an isotropic residual, sigma^2 = the mean of the discarded eigenvalues)
        sec, _, times = timed(gaussian_fit_of(big_ref, LedoitWolf), repeats=3, warmup=False)
        emit("gaussian_fit_100k", "sklearn-ledoitwolf+numpy-eigh", n=big_ref.shape[0], seconds=sec,
             times=times, threads=threads, per_s=False)
        for d in wide_dims(quick):
            wfit, wq = read_matrix(out_dir, f"wide_fit_{d}"), read_matrix(out_dir, f"wide_query_{d}")
            big = d >= 4096
            sec, (wlw, evals, evecs), times = timed(gaussian_fit_of(wfit, LedoitWolf),
                                                     repeats=1 if big else 3, warmup=not big)
            emit(f"gaussian_fit_d{d}", "sklearn-ledoitwolf+numpy-eigh", n=wfit.shape[0], seconds=sec,
                 times=times, threads=threads, per_s=False, d=d)
            mu = wlw.location_.astype(np.float32)
            models = [("", None, (evecs / np.sqrt(evals)[None, :]).astype(np.float32))]
            if big:
                top = np.argsort(evals)[::-1]
                keep, rest = top[:WIDE_RANK], top[WIDE_RANK:]
                sigma2 = float(np.mean(evals[rest]))
                coef = (1.0 / evals[keep] - 1.0 / sigma2).astype(np.float32)
                models.append(("lr", (coef, np.float32(1.0 / sigma2)), evecs[:, keep].astype(np.float32)))
            sk = f64_precision(wlw)
            for tag, low, w in models:
                def score(x, w=w, low=low):
                    xc = x - mu
                    z = xc @ w
                    if low is None:
                        return np.einsum("ij,ij->i", z, z)
                    coef, inv_s2 = low
                    return (z * z) @ coef + np.einsum("ij,ij->i", xc, xc) * inv_s2
                for b in WIDE_BATCHES:
                    rows = wq[:256] if b == 1 else wq
                    calls = [rows[i:i + b] for i in range(0, len(rows), b)]
                    for thr in sorted({threads, 1}, reverse=True):
                        with threadpool_limits(thr):
                            sec, _, times = timed(lambda: [score(c) for c in calls])
                        emit(f"gaussian_score_d{d}{tag}_b{b}", "numpy-blas-whitening", n=len(rows),
                             seconds=sec, times=times, threads=thr, d=d, batch=b,
                             rank=WIDE_RANK if low is not None else d)
                    if low is None and b > 1:
                        sklearn_wide(sk, wq, d, b, threads)
                if low is None:
                    check_sklearn(sk, score, wq, d)
            del wfit, wq, models, sk

    # -- exact kNN, faiss IndexFlatIP on L2-normalised vectors (queries normalised beforehand)
    k = 10
    ref6k = l2_normalise(fit)
    q20k = l2_normalise(query[:20_000])  # as the Rust bench: the first min(20000, rows) rows

    def knn_runs(task, refs, qs, note):
        exact = None
        for thr in sorted({threads, 1}, reverse=True):
            faiss.omp_set_num_threads(thr)
            with threadpool_limits(thr):
                index = faiss.IndexFlatIP(D)
                index.add(refs)
                sec, (_, labels), times = timed(lambda: index.search(qs, k))
            if exact is None:
                exact = labels
            emit(task, "faiss-flatip", n=qs.shape[0], seconds=sec, times=times, threads=thr,
                 refs=refs.shape[0], k=k, note=note)
        faiss.omp_set_num_threads(threads)
        return exact

    knn_runs("knn_exact_6k", ref6k, q20k, "fit.f32 refs, first rows of query.f32, both L2-normalised")
    knn_runs("knn_exact_10k", big_ref[:10_000], big_query, "first 10,000 rows of big_ref, big_query queries")
    exact_big = knn_runs("knn_exact_big", big_ref, big_query, "big_ref refs, big_query queries")

    # -- HNSW: hnswlib and faiss IndexHNSWFlat, inner product on L2-normalised vectors (= cosine),
    # the same M and ef_construction as actwatch's defaults; a recall/speed curve over ef.
    M, efc = 16, 200
    n_big = big_ref.shape[0]
    build_repeats = 1 if n_big > 200_000 else 3
    # one build per tool beyond 200k references (a 1M build on one thread takes 10-20 minutes); the
    # query curve still runs on 1 and all threads
    build_threads = [threads] if n_big > 200_000 else sorted({threads, 1})

    def recall_of(labels) -> float:
        return round(float(np.mean([len(set(a) & set(b)) / k for a, b in zip(labels, exact_big)])), 4)

    def hnswlib_build(thr):
        idx = hnswlib.Index(space="ip", dim=D)
        idx.init_index(max_elements=n_big, ef_construction=efc, M=M, random_seed=100)
        idx.add_items(big_ref, np.arange(n_big), num_threads=thr)
        return idx

    def faiss_build(thr):
        faiss.omp_set_num_threads(thr)
        idx = faiss.IndexHNSWFlat(D, M, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = efc
        idx.add(big_ref)
        return idx

    def hnswlib_search(index, ef, thr):
        index.set_ef(ef)
        return index.knn_query(big_query, k=k, num_threads=thr)[0]

    def faiss_search(index, ef, thr):
        faiss.omp_set_num_threads(thr)
        index.hnsw.efSearch = ef
        return index.search(big_query, k)[1]

    for tool, build, search in (("hnswlib", hnswlib_build, hnswlib_search),
                                ("faiss-hnsw", faiss_build, faiss_search)):
        # the single-thread build first, then the all-thread one, which is kept
        for thr in build_threads:
            sec, index, times = timed(lambda: build(thr), repeats=build_repeats, warmup=False)
            emit("hnsw_build", tool, n=n_big, seconds=sec, times=times, threads=thr,
                 per_s=False, inserts_per_s=n_big / sec, M=M, ef_construction=efc)
        for ef in (HNSW_EFS_BIG if n_big > 200_000 else HNSW_EFS):
            recall = recall_of(search(index, ef, threads))
            for thr in sorted({threads, 1}, reverse=True):
                sec, _, times = timed(lambda: search(index, ef, thr))
                emit("hnsw_query", tool, n=big_query.shape[0], seconds=sec, times=times, threads=thr,
                     refs=n_big, k=k, ef=ef, M=M, recall_at_10=recall)
        del index
    faiss.omp_set_num_threads(threads)

    human_table()
    end = {"task": "_meta_end", "tool": "env", "cpu_idle_pct_after": cpu_idle_pct(),
           "loadavg_1m_at_end": round(os.getloadavg()[0], 2)}
    print(json.dumps(end), flush=True)
    print(f"# CPUs idle before/after the run: {meta['cpu_idle_pct_before']}% / {end['cpu_idle_pct_after']}% "
          f"(1-min load {meta['loadavg_1m_at_start']} / {end['loadavg_1m_at_end']}; this run itself "
          f"adds up to {threads})", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="where the .f32 matrices are written (e.g. target/bench-data)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument("--threads", type=int, default=THREADS, help="threads for BLAS/faiss/hnswlib")
    ap.add_argument("--src", default=DEFAULT_SRC, help="directory with the MiniLM parquet files")
    ap.add_argument("--no-export", action="store_true", help="reuse matrices already in out_dir")
    ap.add_argument("--export-only", action="store_true", help="write the matrices, time nothing")
    ap.add_argument("--big-refs", type=int, default=None,
                    help="rows of big_ref (the large kNN and HNSW reference set; default 100,000)")
    ap.add_argument("--knn-only", action="store_true",
                    help="time the exact kNN and HNSW cases only (no Gaussian fits or scoring)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    if not args.no_export:
        export(args.out_dir, args.src, args.quick, args.big_refs)
        print(f"# wrote matrices to {args.out_dir} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if not args.export_only:
        bench(args.out_dir, args.quick, args.threads, args.knn_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
