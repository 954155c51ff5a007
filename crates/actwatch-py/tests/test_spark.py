"""actwatch_engine.spark against the actwatch binary, on a local[2] Spark and the MiniLM files.

    eval "$(scripts/setup_cluster.sh)"
    "$ACTWATCH_CLUSTER_PYTHON" -m pytest crates/actwatch-py/tests/test_spark.py

The engine is deterministic, so every comparison is exact (floats to the bit): a difference is a bug.
Environment: ACTWATCH_BIN (default <repo>/target/debug/actwatch; missing is a failure, not a skip),
ACTWATCH_MINILM_DIR (default <repo>/../shared/data/minilm). Skipped only when pyspark is not importable.
Spark's Python workers run PYSPARK_PYTHON (default here: this interpreter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip(
    "pyspark", reason="pyspark is not importable (scripts/setup_cluster.sh sets up a venv with it)"
)

import actwatch_engine  # noqa: E402
from actwatch_engine import spark as aw_spark  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("ACTWATCH_BIN") or REPO / "target" / "debug" / "actwatch")
DATA = Path(os.environ.get("ACTWATCH_MINILM_DIR") or REPO.parent / "shared" / "data" / "minilm")
COLUMN_ARGS = ["--trace-column", "id", "--site-column", "layer", "--vector-column", "activation"]
COLUMNS = {"trace_column": "id", "site_column": "layer", "vector_column": "activation"}
FIT_FILES = ["train", "dev_ood_non_english", "dev_ood_code", "dev_id"]
# The manifest keys that hold the monitor (blob checksums); "summary" and "reference" may differ.
MONITOR_KEYS = ["sites", "joint", "calibration", "options"]


def data(name: str) -> str:
    path = DATA / f"{name}.parquet"
    assert path.is_file(), f"missing data file {path} (set ACTWATCH_MINILM_DIR)"
    return str(path)


def actwatch(*args: str) -> None:
    assert BIN.is_file() and os.access(BIN, os.X_OK), (
        f"actwatch binary not found at {BIN}: build it (cargo build) or set ACTWATCH_BIN"
    )
    done = subprocess.run([str(BIN), *args], capture_output=True, text=True)
    assert done.returncode == 0, f"actwatch {' '.join(args)} failed:\n{done.stderr}"


def cli_score(monitor: Path, name: str, out_dir: Path, level: str) -> pa.Table:
    out = out_dir / f"{name}-{level}.parquet"
    actwatch("score", "--monitor", str(monitor), "--input", data(name), "--output", str(out),
             *(["--level", "trace"] if level == "trace" else []))
    return pq.read_table(out)


def as_table(x) -> pa.Table:
    return x if isinstance(x, pa.Table) else pa.Table.from_batches([x])


def assert_same_rows(got: pa.Table, want: pa.Table, keys: list[str]) -> None:
    """Same columns, same rows (after sorting on keys); floats compared bit for bit."""
    assert got.column_names == want.column_names
    assert got.num_rows == want.num_rows
    order = [(k, "ascending") for k in keys]
    got, want = got.sort_by(order), want.sort_by(order)
    key_rows = list(zip(*(want.column(k).to_pylist() for k in keys)))
    assert len(set(key_rows)) == len(key_rows), f"keys {keys} are not unique"
    for name in want.column_names:
        g, w = got.column(name).combine_chunks(), want.column(name).combine_chunks()
        if pa.types.is_floating(w.type):
            assert pa.types.is_floating(g.type), f"{name}: {g.type} vs {w.type}"
            g_null = g.is_null().to_numpy(zero_copy_only=False)
            w_null = w.is_null().to_numpy(zero_copy_only=False)
            g_bits = g.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False).view(np.uint64)
            w_bits = w.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False).view(np.uint64)
            bad = np.flatnonzero((g_null != w_null) | (g_bits != w_bits))
            assert bad.size == 0, (
                f"column {name}: {bad.size} of {len(w)} rows differ, first at {key_rows[bad[0]]}: "
                f"got {g[int(bad[0])].as_py()!r} want {w[int(bad[0])].as_py()!r}"
            )
        else:
            gl, wl = g.to_pylist(), w.to_pylist()
            bad = [i for i, (a, b) in enumerate(zip(gl, wl)) if a != b]
            assert not bad, (
                f"column {name}: {len(bad)} rows differ, first at {key_rows[bad[0]]}: "
                f"got {gl[bad[0]]!r} want {wl[bad[0]]!r}"
            )


def monitor_keys(path: Path) -> dict:
    manifest = json.loads((path / "manifest.json").read_text())
    return {k: manifest[k] for k in MONITOR_KEYS}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("actwatch-spark")


@pytest.fixture(scope="module")
def cli_monitor(workdir) -> Path:
    """`actwatch fit` on train.parquet."""
    out = workdir / "cli-monitor"
    actwatch("fit", "--input", data("train"), "--out", str(out), *COLUMN_ARGS)
    return out


@pytest.fixture(scope="module")
def spark():
    """A local[2] Spark session, loopback only, no UI, small memory, for this module."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("actwatch-engine-tests")
        .config("spark.driver.memory", "1g")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        # Small Arrow batches: the traces of a computation land in different mapInArrow batches.
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "700")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_trace_level_matches_cli(spark, cli_monitor, workdir):
    names = ["dev_id", "dev_ood_code"]
    df = spark.read.parquet(*(data(n) for n in names)).repartition(3)
    out = aw_spark.score_dataframe(df, str(cli_monitor))
    got = out.toArrow()
    want = pa.concat_tables([cli_score(cli_monitor, n, workdir, "trace") for n in names])
    assert want.num_rows == 4500
    assert_same_rows(got, want, keys=["id", "layer"])


def test_score_dataframe_refuses_computation_level(spark, cli_monitor):
    df = spark.read.parquet(data("dev_ood_code"))
    with pytest.raises(ValueError, match="score_files"):
        aw_spark.score_dataframe(df, str(cli_monitor), level="computation")


def test_computation_level_files_match_cli(spark, cli_monitor, workdir):
    names = ["dev_id", "dev_ood_code"]
    batches = aw_spark.score_files(spark, [data(n) for n in names], str(cli_monitor))
    assert len(batches) == len(names)
    for name, batch in zip(names, batches):
        want = cli_score(cli_monitor, name, workdir, "computation")
        assert_same_rows(as_table(batch), want, keys=["id"])


def test_fit_matches_cli_fit(spark, workdir):
    paths = [data(n) for n in FIT_FILES]
    cli = workdir / "cli-fit-4"
    actwatch("fit", "--input", *paths, "--out", str(cli), *COLUMN_ARGS)
    monitor = aw_spark.fit(spark, paths, **COLUMNS)
    assert isinstance(monitor, actwatch_engine.Monitor)
    ours = workdir / "spark-fit-4"
    monitor.save(str(ours))
    got, want = monitor_keys(ours), monitor_keys(cli)
    for key in MONITOR_KEYS:
        assert got[key] == want[key], f"manifest {key!r} differs from actwatch fit's"
