"""actwatch_engine.spark against the actwatch binary, on a local[2] Spark and the MiniLM files.

    eval "$(scripts/setup_cluster.sh)"
    "$ACTWATCH_CLUSTER_PYTHON" -m pytest crates/actwatch-py/tests/test_spark.py

The engine is deterministic, so every comparison is exact (floats to the bit): a difference is a bug.
Environment: ACTWATCH_BIN (default <repo>/target/debug/actwatch; missing is a failure, not a skip),
ACTWATCH_MINILM_DIR (default <repo>/../shared/data/minilm). Skipped only when pyspark is not importable.
Spark's Python workers run PYSPARK_PYTHON (default here: this interpreter).
"""

from __future__ import annotations

import os
import sys

import pyarrow as pa
import pytest

pytest.importorskip("pyspark", reason="pyspark is not importable (scripts/setup_cluster.sh sets up a venv with it)")

import actwatch_engine
from actwatch_engine import spark as aw_spark
from support import COLUMNS, FIT_FILES, as_table, assert_same_monitor, assert_same_rows, cli_fit, cli_score, data


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
    cli = cli_fit(workdir / "cli-fit-4", FIT_FILES)
    monitor = aw_spark.fit(spark, paths, **COLUMNS)
    assert isinstance(monitor, actwatch_engine.Monitor)
    ours = workdir / "spark-fit-4"
    monitor.save(str(ours))
    assert_same_monitor(ours, cli)
