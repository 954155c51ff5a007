"""Throwaway smoke check (not a test yet): can the scripts/setup_cluster.sh venv run a batch job over the
MiniLM activation Parquet files in a local Ray Data and a local Spark, and how long does each phase take?

    eval "$(scripts/setup_cluster.sh)"
    "$ACTWATCH_CLUSTER_PYTHON" clients/python/tests_cluster/smoke_check.py [PARQUET ...]

Default input: the in-distribution files of ../shared/data/minilm (train.parquet, the trusted reference,
and dev_id.parquet). Everything listens on 127.0.0.1 only. Prints one `timing` line per phase and what type
the vector column (`activation`) has on the way in and out of each engine.
"""

from __future__ import annotations

import glob
import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get(
    "ACTWATCH_MINILM_DIR", os.path.join(HERE, "..", "..", "..", "..", "shared", "data", "minilm")
)
FILES = sys.argv[1:] or [os.path.join(DATA, "train.parquet"), os.path.join(DATA, "dev_id.parquet")]
FILES = [os.path.abspath(f) for f in FILES]

# Spark's Python workers run PYSPARK_PYTHON (default: `python3` from PATH), not this interpreter.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report
# Without this, Ray on Linux resolves 127.0.0.1 to the "remotely reachable" eth0 address and binds its
# runtime-env agent there; with it (Ray's own macOS/Windows behaviour) the node address is 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

timings: list[tuple[str, float]] = []


class phase:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        timings.append((self.name, dt))
        print(f"timing {self.name:<16} {dt:7.2f} s", flush=True)


def expected_rows() -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in FILES)


class CountRows:
    """Stateful map_batches callable (one per Ray actor): returns one row per batch."""

    def __init__(self):
        self.pid = os.getpid()
        self.calls = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        return pa.table(
            {
                "rows": pa.array([batch.num_rows], pa.int64()),
                "pid": pa.array([self.pid], pa.int64()),
                "vec_type": [str(batch.schema.field("activation").type)],
            }
        )


def run_ray() -> None:
    import ray

    with phase("ray startup"):
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=512 * 1024 * 1024,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            logging_level="WARNING",
            configure_logging=True,
        )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # Small blocks, so that a 32 MB input is split among both actors (default target: 128 MiB).
        ctx.target_max_block_size = 4 * 1024 * 1024
    with phase("ray job"):
        ds = ray.data.read_parquet(FILES, override_num_blocks=4)
        out = ds.map_batches(
            CountRows,
            batch_format="pyarrow",
            batch_size=4096,
            compute=ray.data.ActorPoolStrategy(size=2),
            # 2 actors x 0.5 CPU leaves CPU for the read tasks under num_cpus=2
            num_cpus=0.5,
        ).to_arrow_refs()
        table = pa.concat_tables(ray.get(out))
        print("ray  input schema:", ds.schema().base_schema.field("activation").type)
    with phase("ray shutdown"):
        ray.shutdown()
    total = sum(table.column("rows").to_pylist())
    print(
        f"ray  batches={table.num_rows} rows={total} (expected {expected_rows()}) "
        f"actors={len(set(table.column('pid').to_pylist()))} "
        f"activation in UDF: {set(table.column('vec_type').to_pylist())}"
    )
    assert total == expected_rows()


def run_spark() -> None:
    from pyspark.sql import SparkSession

    with phase("spark startup"):
        spark = (
            SparkSession.builder.master("local[2]")
            .appName("actwatch-smoke")
            .config("spark.driver.memory", "1g")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", "2")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .getOrCreate()
        )
        spark.sparkContext.setLogLevel("ERROR")

    with phase("spark job"):
        df = spark.read.parquet(*FILES)
        print("spark input schema:", df.schema["activation"].dataType)

        def count_rows(batches):
            for b in batches:
                yield pa.RecordBatch.from_pydict(
                    {
                        "rows": pa.array([b.num_rows], pa.int64()),
                        "pid": pa.array([os.getpid()], pa.int64()),
                        "vec_type": [str(b.schema.field("activation").type)],
                    }
                )

        rows = df.mapInArrow(count_rows, "rows long, pid long, vec_type string").collect()
    total = sum(r.rows for r in rows)
    print(
        f"spark batches={len(rows)} rows={total} (expected {expected_rows()}) "
        f"workers={len(set(r.pid for r in rows))} activation in UDF: {set(r.vec_type for r in rows)}"
    )
    assert total == expected_rows()

    # Spark hands the vector column to a UDF as list<float>; can a UDF hand fixed_size_list back?
    def echo(cast_back: bool):
        def fn(batches):
            for b in batches:
                vec = b.column(b.schema.get_field_index("activation"))
                # what an engine wanting fixed_size_list<float32>[384] would do (no copy of the values)
                fixed = pa.FixedSizeListArray.from_arrays(vec.flatten(), 384)
                out = fixed.cast(pa.list_(pa.float32())) if cast_back else fixed
                yield pa.RecordBatch.from_arrays([b.column(0), out], names=["id", "activation"])

        return fn

    sel = df.select("id", "activation")
    with phase("spark fixed out"):
        try:
            sel.mapInArrow(echo(False), "id string, activation array<float>").count()
            print("spark: mapInArrow yielding fixed_size_list: ok")
        except Exception as e:  # noqa: BLE001 - report what Spark says
            print(f"spark: mapInArrow yielding fixed_size_list fails: {str(e).splitlines()[0][:200]}")
    with phase("spark list out"):
        got = sel.mapInArrow(echo(True), "id string, activation array<float>").limit(1).collect()
        n = sel.mapInArrow(echo(True), "id string, activation array<float>").count()
        same = got[0].activation == sel.limit(1).collect()[0].activation
        print(f"spark: cast back to list<float32>: ok ({n} rows, values round-trip: {same})")

    with phase("spark shutdown"):
        spark.stop()


def main() -> None:
    print("files:", *(os.path.basename(f) for f in FILES), "rows:", expected_rows())
    print("file schema activation:", pq.read_schema(FILES[0]).field("activation").type)
    which = os.environ.get("SMOKE", "ray,spark").split(",")
    if "ray" in which:
        run_ray()
    if "spark" in which:
        run_spark()
    print("summary:", ", ".join(f"{n} {t:.2f}s" for n, t in timings))


if __name__ == "__main__":
    main()
