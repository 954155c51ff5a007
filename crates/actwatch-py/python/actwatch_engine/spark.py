"""The actwatch engine on Spark (PySpark).

Importing :mod:`actwatch_engine` does not need PySpark; this module imports it only when a function
runs. Spark's Python workers must run an interpreter with ``actwatch_engine`` and ``pyarrow``
installed (set ``PYSPARK_PYTHON``), and the paths given to :func:`score_files` and :func:`fit` are
read by the workers with :mod:`pyarrow.parquet`, so they must be readable from every executor.

What is exact, and why:

* :func:`score_dataframe` scores at trace level only. Trace-level scoring is a map: each trace is
  scored alone against the monitor, so whatever the partitions and Arrow batches, the rows equal
  ``actwatch score --level trace`` over the same data, to the bit. Spark hands the vector column to
  the workers as ``list<float>`` (the engine accepts it as well as ``fixed_size_list``).
* Computation-level scoring aggregates every trace of a computation, so a call must see whole
  computations, which a DataFrame's partitions do not promise. :func:`score_files` reads and scores
  each file whole, in one task: each file's rows equal ``actwatch score`` on that file.
* :func:`fit` runs :func:`actwatch_engine.fit_parts` with the parts = the files, in the order given,
  one Spark task per file, the results sorted back into part order: the monitor is the same, to the
  bit, as ``actwatch fit`` over the same files in the same order (as long as no computation spans two
  files). Only the manifest's ``summary`` and ``reference`` differ.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import ActwatchError, Monitor, fit_parts
from ._recipes import _check_columns, _check_files_level, _fit_columns, _paths, _read_columns, _refuse_level

__all__ = ["fit", "score_dataframe", "score_files"]


def _listify_type(t: pa.DataType) -> pa.DataType:
    """``t`` with every fixed_size_list made a list (Spark cannot take fixed_size_list back)."""
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        value = t.value_field.with_type(_listify_type(t.value_type))
        return pa.large_list(value) if pa.types.is_large_list(t) else pa.list_(value)
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_listify_type(f.type)) for f in t])
    return t


def _listify_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_type(_listify_type(f.type)) for f in schema], metadata=schema.metadata)


def _score_partition(
    batches: Iterator[pa.RecordBatch],
    monitor_dir: str,
    provenance_policy: str,
    columns: dict[str, Any],
    schema: pa.Schema,
) -> Iterator[pa.RecordBatch]:
    monitor = None
    for batch in batches:
        if batch.num_rows == 0:
            continue
        if monitor is None:  # once per partition, and only for a partition with rows
            monitor = Monitor.load(monitor_dir, provenance_policy=provenance_policy)
        yield monitor.score(batch, level="trace", **columns).cast(schema)


def score_dataframe(
    df: Any,
    monitor_dir: str,
    *,
    level: str = "trace",
    provenance_policy: str = "refuse",
    **columns: Any,
) -> Any:
    """Scores a Spark ``DataFrame`` of traces (long format) at trace level; returns a ``DataFrame``.

    ``df.mapInArrow`` scores each Arrow batch in the workers (the monitor in ``monitor_dir`` is loaded
    once per partition). Each output row is one trace of the monitor's sites: the input's columns
    but the vector, then ``score``, ``p_value``, ``flagged`` and the per-detector ``raw_*``/``p_*``
    columns, equal to the bit to ``actwatch score --level trace`` on the same rows. The output schema
    comes from scoring one row on the driver (a row of a monitored site if the first row is not);
    fixed_size_list columns are returned as lists. ``columns``: ``trace_column``, ``site_column``,
    ``vector_column`` (default: those the monitor was fitted with).

    ``level="computation"`` is refused: use :func:`score_files`, which scores each file whole.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    _refuse_level(level, "score_dataframe", "spark", "a DataFrame's partitions and Arrow batches")
    cols = _check_columns(columns)
    monitor_dir = str(monitor_dir)
    monitor = Monitor.load(monitor_dir, provenance_policy=provenance_policy)
    try:
        sample = monitor.score(df.limit(1).toArrow(), level="trace", **cols)
    except ActwatchError:
        # The first row may be a trace of a site the monitor does not watch (or df may be empty).
        site = cols.get("site_column") or monitor.columns[1]
        rows = df.where(F.col(site).cast("string").isin(monitor.sites)).limit(1).toArrow()
        if rows.num_rows == 0:
            raise ValueError(
                f"no traces of the monitor's sites {monitor.sites} (column {site!r}) in the DataFrame"
            ) from None
        sample = monitor.score(rows, level="trace", **cols)
    schema = _listify_schema(sample.schema)
    fn = functools.partial(
        _score_partition,
        monitor_dir=monitor_dir,
        provenance_policy=provenance_policy,
        columns=cols,
        schema=schema,
    )
    return df.mapInArrow(fn, from_arrow_schema(schema))


def _score_file(
    path: str, monitor_dir: str, level: str, provenance_policy: str, columns: dict[str, Any]
) -> pa.RecordBatch:
    monitor = Monitor.load(monitor_dir, provenance_policy=provenance_policy)
    return monitor.score(pq.read_table(path), level=level, **columns)


def score_files(
    spark: Any,
    paths: Sequence[str],
    monitor_dir: str,
    *,
    level: str = "computation",
    provenance_policy: str = "refuse",
    **columns: Any,
) -> list[pa.RecordBatch]:
    """Scores Parquet files, each read whole (every column) and scored in one Spark task; returns a
    list of ``pyarrow.RecordBatch``, one per file, in the order of ``paths`` (collected to the driver).

    At ``level="computation"`` (the default) each file must hold its computations whole: its batch
    equals ``actwatch score`` on that file, to the bit (including the ``uint64`` ``traces`` column,
    which Spark SQL has no type for: hence batches, not a DataFrame). ``level="trace"`` also works.
    """
    _check_files_level(level)
    paths = _paths(paths, "score_files")
    fn = functools.partial(
        _score_file,
        monitor_dir=str(monitor_dir),
        level=level,
        provenance_policy=provenance_policy,
        columns=_check_columns(columns),
    )
    return spark.sparkContext.parallelize(paths, len(paths)).map(fn).collect()


def _indexed(fn: Any, item: tuple[int, Any]) -> tuple[int, Any]:
    return item[0], fn(item[1])


def fit(spark: Any, paths: Sequence[str], **options: Any) -> Monitor:
    """Fits a monitor on Parquet files with Spark tasks; returns the :class:`Monitor` (``.save(dir)``
    writes it as ``actwatch fit`` does).

    Runs :func:`actwatch_engine.fit_parts` with parts = ``paths`` in order, one Spark task per file
    and pass (``sc.parallelize(list(enumerate(parts)), len(parts))``), the results sorted back into
    part order. Each part is read whole with ``pyarrow.parquet.read_table``, only the trace, site and
    vector columns (``options``' ``trace_column``/``site_column``/``vector_column``, default
    ``trace_id``/``site``/``activation``). The monitor equals ``actwatch fit`` over the same files in
    the same order, to the bit (its manifest's ``summary`` and ``reference`` aside), provided no
    computation spans two files. ``options`` are :class:`actwatch_engine.FitState`'s.
    """
    paths = _paths(paths, "fit")
    sc = spark.sparkContext
    read = functools.partial(_read_columns, wanted=_fit_columns(options))

    def map_parts(fn: Any, parts: Sequence[Any]) -> list[Any]:
        parts = list(parts)
        # PySpark broadcasts a large pickled task function (fn carries the merged fit state) itself.
        got = sc.parallelize(list(enumerate(parts)), len(parts)).map(functools.partial(_indexed, fn)).collect()
        return [r for _, r in sorted(got, key=lambda x: x[0])]

    return fit_parts(paths, read, map_parts=map_parts, files=paths, **options)
