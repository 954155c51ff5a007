"""Batch scoring beyond one process: the engine in-process (Python bindings), on Ray Data and on Spark,
against `actwatch score` in one process and a plain pyarrow + numpy scorer of the same model.

Run by scripts/bench_cluster.sh (which builds what it needs and passes the paths); each run is a
separate child process, timed from start to finish (start-up of Ray or Spark included, reported
apart), its peak RSS read from wait4 (the whole process tree for Ray and Spark: the peak RSS of
every worker process is sampled every 50 ms). Every run scores the same archive at trace level
with the same Gaussian monitor and writes Parquet; the scores are checked equal to `actwatch
score`'s (numpy: its raw scores within 1e-3 relative; it is another implementation of the math).

    python scripts/bench_cluster.py --bin target/release/actwatch --archive DIR_OF_PARQUET \
        --monitor DIR --reference R.parquet --out target/bench-cluster [--runs ray,spark,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

RUNS = ["actwatch", "bindings", "numpy", "ray", "spark"]

# Each run is a script in a child interpreter: it prints one JSON line {rows, seconds, startup}.
BINDINGS = """
import glob, json, sys, time
import pyarrow.parquet as pq
import actwatch_engine as ae
archive, monitor, out = sys.argv[1:4]
t = time.perf_counter()
m = ae.Monitor.load(monitor)
w = None
rows = 0
for path in sorted(glob.glob(f"{archive}/*.parquet")):
    for batch in pq.ParquetFile(path).iter_batches(batch_size=65536):
        r = m.score(batch, level="trace")
        w = w or pq.ParquetWriter(out, r.schema)
        w.write_batch(r)
        rows += batch.num_rows
w.close()
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - t, "startup": 0.0}))
"""

# The same model in numpy: actwatch's seeded split of the reference by computation id (ported),
# L2-normalised rows, Ledoit-Wolf shrinkage, squared Mahalanobis distance (actwatch's raw Gaussian
# score), plain conformal p-values against the calibration part's scores. Fitted here (not timed
# apart: fitting 45k x 384 is a small share of the run).
NUMPY = """
import glob, json, sys, time
import numpy as np
import pyarrow as pa, pyarrow.parquet as pq
archive, reference, out = sys.argv[1:4]
t = time.perf_counter()
def vectors(batch):
    col = batch.column("activation")
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    x = col.values.to_numpy(zero_copy_only=False).reshape(len(batch), -1).astype(np.float32, copy=False)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1)
ref = pq.read_table(reference)
site0 = ref.filter(pa.compute.equal(ref.column("site"), ref.column("site")[0]))
x = vectors(site0).astype(np.float64)
M = (1 << 64) - 1
def split_unit(seed, id):
    h = 0xCBF29CE484222325
    for b in id.encode():
        h = ((h ^ b) * 0x100000001B3) & M
    z = h ^ ((seed * 0x9E3779B97F4A7C15) & M)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)
cal = np.array([split_unit(0, str(i)) < 0.25 for i in site0.column("trace_id").to_pylist()])
fit, calx = x[~cal], x[cal].astype(np.float32)
mu = fit.mean(0)
y = fit - mu
n, d = y.shape
s = y.T @ y / n
m = np.trace(s) / d
d2 = ((s - m * np.eye(d)) ** 2).sum()
b2 = min(d2, (((y ** 2).sum(1) ** 2).sum() / n - (s ** 2).sum()) / n)
a = b2 / d2
lam, v = np.linalg.eigh((1 - a) * s + a * m * np.eye(d))
w = (v / np.sqrt(lam)).astype(np.float32)
mu32 = mu.astype(np.float32)
def score(x):
    z = (x - mu32) @ w
    return np.einsum("ij,ij->i", z, z)
cal_scores = np.sort(score(calx))
wr = None
rows = 0
files = sorted(glob.glob(f"{archive}/*.parquet"))
batches = (b for path in files for b in pq.ParquetFile(path).iter_batches(batch_size=65536))
for batch in batches:
    sc = score(vectors(batch))
    above = len(cal_scores) - np.searchsorted(cal_scores, sc, side="left")
    p = (above + 1) / (len(cal_scores) + 1)
    r = pa.record_batch([batch.column("trace_id"), batch.column("site"), pa.array(sc.astype(np.float64)), pa.array(p)],
                        names=["trace_id", "site", "raw_gaussian", "p_value"])
    wr = wr or pq.ParquetWriter(out, r.schema)
    wr.write_batch(r)
    rows += batch.num_rows
wr.close()
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - t, "startup": 0.0}))
"""

RAY = """
import json, os, sys, time
archive, monitor, out = sys.argv[1:4]
t = time.perf_counter()
import ray
ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
from actwatch_engine.ray import score_dataset
startup = time.perf_counter() - t
ds = ray.data.read_parquet(archive)
scored = score_dataset(ds, monitor, level="trace", actors=os.cpu_count())
scored.write_parquet(out)
rows = ray.data.read_parquet(out).count()
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - t, "startup": startup}))
ray.shutdown()
"""

SPARK = """
import json, os, sys, time
archive, monitor, out = sys.argv[1:4]
t = time.perf_counter()
from pyspark.sql import SparkSession
n = os.cpu_count()
spark = (SparkSession.builder.master(f"local[{n}]").appName("actwatch-bench")
         .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1")
         .config("spark.driver.bindAddress", "127.0.0.1").config("spark.driver.memory", "2g")
         .config("spark.sql.execution.arrow.pyspark.enabled", "true").getOrCreate())
from actwatch_engine.spark import score_dataframe
startup = time.perf_counter() - t
df = spark.read.parquet(archive)
score_dataframe(df, monitor, level="trace").write.mode("overwrite").parquet(out)
rows = spark.read.parquet(out).count()
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - t, "startup": startup}))
spark.stop()
"""


def tree_peak(proc: subprocess.Popen[str], stop: threading.Event, peaks: dict[int, tuple[str, int]]) -> None:
    """Samples, every 50 ms, the RSS of `proc` and of every process descending from it (from /proc)."""
    page = os.sysconf("SC_PAGE_SIZE")
    while not stop.is_set():
        parent: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        for pid in parent:
            p, hops = pid, 0
            while p not in (proc.pid, 0, 1) and p in parent and hops < 64:
                p, hops = parent[p], hops + 1
            if p != proc.pid:
                continue
            try:
                with open(f"/proc/{pid}/statm") as f:
                    rss = int(f.read().split()[1]) * page
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    name = f.read().replace(b"\0", b" ").decode(errors="replace")[:60]
            except (OSError, IndexError, ValueError):
                continue
            if rss > peaks.get(pid, ("", 0))[1]:
                peaks[pid] = (name, rss)
        time.sleep(0.05)


def run_child(argv: list[str], env: dict[str, str]) -> dict[str, object]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks: dict[int, tuple[str, int]] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=tree_peak, args=(proc, stop, peaks), daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{argv[:3]} failed ({proc.returncode}):\n{err[-4000:]}")
    result: dict[str, object] = {}
    for line in out.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
    workers = sorted((rss for pid, (name, rss) in peaks.items() if pid != proc.pid), reverse=True)
    result["driver_peak_mib"] = peaks.get(proc.pid, ("", 0))[1] / 2**20
    result["worker_peak_mib"] = (workers[0] / 2**20) if workers else None
    result["processes"] = len(peaks)
    result["stdout"] = out
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--archive", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--monitor", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default=",".join(RUNS))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    py = sys.executable
    results: dict[str, dict[str, object]] = {}
    for name in a.runs.split(","):
        target = str(out / f"scores-{name}.parquet")
        # Ray and Spark write a directory and add to one that exists: start from nothing.
        shutil.rmtree(target, ignore_errors=True)
        Path(target).unlink(missing_ok=True)
        if name == "actwatch":
            argv = [
                a.bin,
                "score",
                "--monitor",
                a.monitor,
                "--input",
                a.archive,
                "--output",
                target,
                "--level",
                "trace",
            ]
            t = time.perf_counter()
            r = run_child(argv, env)
            r.update(seconds=time.perf_counter() - t, startup=0.0)
            r["rows"] = int(str(r["stdout"]).split("scored ")[1].split()[0])
        else:
            script = {"bindings": BINDINGS, "numpy": NUMPY, "ray": RAY, "spark": SPARK}[name]
            third = a.reference if name == "numpy" else a.monitor
            r = run_child([py, "-c", textwrap.dedent(script), a.archive, third, target], env)
        r.pop("stdout", None)
        results[name] = r
        print(
            f"{name:9s} {r['rows']} rows in {r['seconds']:.1f} s "
            f"({float(r['rows']) / float(r['seconds']):,.0f} rows/s; start-up {float(r['startup']):.1f} s); "
            f"peak RSS driver {r['driver_peak_mib']:.0f} MiB, worker {r['worker_peak_mib'] or 0:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
    check(out, results)
    report(a, results, out)


def check(out: Path, results: dict[str, dict[str, object]]) -> None:
    """Every engine run wrote the same p-values as `actwatch score` (sorted by trace id)."""
    import numpy as np
    import pyarrow.parquet as pq

    def load(name: str) -> tuple[object, object, object]:
        t = pq.read_table(out / f"scores-{name}.parquet", columns=["trace_id", "p_value", "raw_gaussian"])
        t = t.sort_by([("trace_id", "ascending")])
        return t.column("trace_id"), t.column("p_value").to_numpy(), t.column("raw_gaussian").to_numpy()

    if "actwatch" not in results:
        return
    ids, p, raw = load("actwatch")
    for name in results:
        if name == "actwatch":
            continue
        i2, p2, raw2 = load(name)
        assert i2.equals(ids), f"{name}: other trace ids"
        if name == "numpy":
            rel = float(np.max(np.abs(raw2 - raw) / np.maximum(np.abs(raw), 1e-9)))
            results[name]["max_rel_diff_raw"] = rel
        else:
            same = bool(np.array_equal(p, p2) and np.array_equal(raw, raw2))
            results[name]["identical_to_actwatch"] = same
            assert same, f"{name}: scores differ from actwatch score"


def report(a: argparse.Namespace, results: dict[str, dict[str, object]], out: Path) -> None:
    base = results.get("actwatch")
    lines = [
        f"Trace-level scoring of {a.archive} (Gaussian monitor), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}",
        "",
        "| run | rows/s | vs actwatch score | wall s (start-up) | peak RSS driver | peak RSS per worker | scores |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        rate = float(r["rows"]) / float(r["seconds"])
        ratio = rate / (float(base["rows"]) / float(base["seconds"])) if base else float("nan")
        worker = f"{r['worker_peak_mib']:.0f} MiB" if r.get("worker_peak_mib") else "-"
        if name == "actwatch":
            scores = "reference"
        elif "identical_to_actwatch" in r:
            scores = "identical" if r["identical_to_actwatch"] else "DIFFER"
        else:
            scores = f"raw max rel diff {r.get('max_rel_diff_raw', float('nan')):.1e}"
        lines.append(
            f"| {name} | {rate:,.0f} | {ratio:.2f}x | {float(r['seconds']):.1f} ({float(r['startup']):.1f}) "
            f"| {r['driver_peak_mib']:.0f} MiB | {worker} | {scores} |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
