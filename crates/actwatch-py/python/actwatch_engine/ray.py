"""The actwatch engine on Ray (Ray Data and Ray tasks).

Importing :mod:`actwatch_engine` does not need Ray; this module imports it only when a function runs
(and expects ``ray.init()`` to have been called, or lets Ray start a local instance as it does by
default).

What is exact, and why:

* :func:`score_dataset` scores at trace level only. Trace-level scoring is a map: each trace is
  scored alone against the monitor, so any split of the dataset into blocks and batches gives the
  same rows, with the same values to the bit, as ``actwatch score --level trace`` over the same data
  (the rows come back in Ray's block order, not necessarily the input's).
* Computation-level scoring aggregates every trace of a computation, so a call must see whole
  computations. A dataset's blocks give no such guarantee (a computation's traces can sit anywhere
  in a file), so :func:`score_files` reads and scores each file whole, in one call: each file's rows
  equal ``actwatch score`` on that file.
* :func:`fit` runs :func:`actwatch_engine.fit_parts` with the parts = the files, in the order given,
  each read whole by one task and the tasks' results gathered back in part order: the monitor is
  the same, to the bit, as ``actwatch fit`` over the same files in the same order (as long as no
  computation spans two files). Only the manifest's ``summary`` and ``reference`` differ (a fit in
  parts does not count computations or hash the inputs).

Paths are read by the workers with :mod:`pyarrow.parquet`, so on a real cluster they must be
readable from every node (shared file system or a URI pyarrow understands).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import Monitor, fit_parts
from ._recipes import _check_columns, _check_files_level, _fit_columns, _paths, _read_columns, _refuse_level

__all__ = ["fit", "score_dataset", "score_files"]


def _as_table(batch: pa.RecordBatch) -> pa.Table:
    return pa.Table.from_batches([batch])


class _TraceScorer:
    """Ray Data callable class: one per actor, loads the monitor once, scores batches at trace level."""

    def __init__(self, monitor_dir: str, columns: dict[str, Any], provenance_policy: str = "refuse"):
        self.monitor = Monitor.load(monitor_dir, provenance_policy=provenance_policy)
        self.columns = columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _as_table(self.monitor.score(batch, level="trace", **self.columns))


class _FileScorer:
    """Ray Data callable class: one per actor, loads the monitor once, reads and scores whole files
    (the ``path`` column of each batch)."""

    def __init__(self, monitor_dir: str, level: str, columns: dict[str, Any], provenance_policy: str = "refuse"):
        self.monitor = Monitor.load(monitor_dir, provenance_policy=provenance_policy)
        self.level = level
        self.columns = columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = [
            _as_table(self.monitor.score(pq.read_table(path), level=self.level, **self.columns))
            for path in batch.column("path").to_pylist()
        ]
        return pa.concat_tables(tables)


def score_dataset(
    ds: Any,
    monitor_dir: str,
    *,
    level: str = "trace",
    actors: int = 2,
    actor_cpus: float = 0.5,
    batch_size: int = 4096,
    provenance_policy: str = "refuse",
    **columns: Any,
) -> Any:
    """Scores a Ray ``Dataset`` of traces (long format) at trace level; returns a ``Dataset``.

    Runs ``ds.map_batches`` on a pool of ``actors`` actors (``actor_cpus`` CPUs each), each loading
    the monitor in ``monitor_dir`` once. Each output row is one trace of the monitor's sites: the
    input's columns but the vector, then ``score``, ``p_value``, ``flagged`` and the per-detector
    ``raw_*``/``p_*`` columns, equal to the bit to ``actwatch score --level trace`` on the same
    rows whatever the blocks and batches (trace level is map-only). ``columns``: ``trace_column``,
    ``site_column``, ``vector_column`` (default: those the monitor was fitted with).

    ``level="computation"`` is refused: a computation's traces may be split across batches; use
    :func:`score_files`, which scores each file whole.
    """
    import ray

    _refuse_level(level, "score_dataset", "ray", "a Dataset's blocks and batches")
    return ds.map_batches(
        _TraceScorer,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus,
        batch_size=batch_size,
        fn_constructor_kwargs={
            "monitor_dir": str(monitor_dir),
            "columns": _check_columns(columns),
            "provenance_policy": provenance_policy,
        },
    )


def score_files(
    paths: Sequence[str],
    monitor_dir: str,
    *,
    level: str = "computation",
    actors: int = 2,
    actor_cpus: float = 0.5,
    provenance_policy: str = "refuse",
    **columns: Any,
) -> Any:
    """Scores Parquet files, each read whole (every column) and scored in one call; returns a
    ``Dataset`` of the scored rows.

    One dataset item (and one block) per file, mapped by a pool of ``actors`` actors that load the
    monitor once. At ``level="computation"`` (the default) each file must hold its computations
    whole: its rows equal ``actwatch score`` on that file, to the bit. ``level="trace"`` also works
    (equal to ``actwatch score --level trace``). Rows come back grouped by file, files in no
    guaranteed order (set ``DataContext.execution_options.preserve_order`` for path order).
    """
    import ray

    _check_files_level(level)
    paths = _paths(paths, "score_files")
    items = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    return items.map_batches(
        _FileScorer,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus,
        batch_size=1,
        fn_constructor_kwargs={
            "monitor_dir": str(monitor_dir),
            "level": level,
            "columns": _check_columns(columns),
            "provenance_policy": provenance_policy,
        },
    )


def _run_group(fn: Any, group: list[Any]) -> list[Any]:
    return [fn(part) for part in group]


def fit(paths: Sequence[str], *, files_per_task: int = 1, **options: Any) -> Monitor:
    """Fits a monitor on Parquet files with Ray tasks; returns the :class:`Monitor` (``.save(dir)``
    writes it as ``actwatch fit`` does).

    Runs :func:`actwatch_engine.fit_parts` with parts = ``paths`` in order; each part is read whole
    with ``pyarrow.parquet.read_table``, only the trace, site and vector columns (``options``'
    ``trace_column``/``site_column``/``vector_column``, default ``trace_id``/``site``/
    ``activation``). Each pass runs Ray tasks of ``files_per_task`` consecutive files (the parts
    stay single files, so the grouping changes only scheduling) and gathers the results with
    ``ray.get`` in part order. The monitor equals ``actwatch fit`` over the same files in the same
    order, to the bit (its manifest's ``summary`` and ``reference`` aside), provided no computation
    spans two files. ``options`` are :class:`actwatch_engine.FitState`'s (``actwatch fit``'s).

    Each pass's function (which carries the merged fit state) is put in the object store once and
    shared by that pass's tasks.
    """
    import ray

    if files_per_task < 1:
        raise ValueError(f"files_per_task must be at least 1, got {files_per_task}")
    paths = _paths(paths, "fit")
    read = functools.partial(_read_columns, wanted=_fit_columns(options))

    run_group = ray.remote(_run_group)

    def map_parts(fn: Any, parts: Sequence[Any]) -> list[Any]:
        parts = list(parts)
        fn_ref = ray.put(fn)
        refs = [run_group.remote(fn_ref, parts[i : i + files_per_task]) for i in range(0, len(parts), files_per_task)]
        return [r for group in ray.get(refs) for r in group]

    return fit_parts(paths, read, map_parts=map_parts, files=paths, **options)
