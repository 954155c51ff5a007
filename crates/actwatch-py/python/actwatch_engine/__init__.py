"""The actwatch engine in-process: score and fit activation monitors on Arrow data.

The same engine as the ``actwatch`` binary, loaded as a Python extension: inputs are Arrow
objects (``pyarrow.Table``, ``RecordBatch``, ``RecordBatchReader``, or anything exporting the Arrow
C stream/array interface), imported without copying; outputs are ``pyarrow.RecordBatch`` with the
columns ``actwatch score`` writes. The GIL is released while Rust works.

Scoring::

    m = Monitor.load("monitor/")
    out = m.score(traces(ids, "layer.6", hidden_states))   # from numpy
    out = m.score(table)                    # one row per computation
    out = m.score(table, level="trace")     # one row per trace

A fit in parts (what :mod:`actwatch_engine.ray` and :mod:`actwatch_engine.spark` run on a cluster)
gives the same monitor as ``actwatch fit`` over the same files, to the bit, when the parts are the
files in order and no computation spans two parts; see :func:`fit_parts`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Callable, Optional

import pyarrow as pa

from ._engine import ActwatchError, Calibrator, FitState
from ._engine import MonitorHandle as Monitor

__all__ = ["ActwatchError", "Calibrator", "FitState", "Monitor", "fit_parts", "traces"]


def traces(
    ids: Sequence[object],
    sites: object,
    vectors: object,
    *,
    trace_column: str = "trace_id",
    site_column: str = "site",
    vector_column: str = "activation",
) -> pa.RecordBatch:
    """Traces from numpy: a ``RecordBatch`` in the long format that :meth:`Monitor.score` and
    :meth:`FitState.fold` take. ``vectors`` is a 2-D array (rows x width; float32 is wrapped
    without a copy when C-contiguous, float16/float64 are kept as they are and decoded by the
    engine), ``ids`` one computation id per row (strings or integers), ``sites`` one site name for
    every row or one per row.
    """
    import numpy as np

    v = np.asarray(vectors)
    if v.ndim != 2:
        raise ValueError(f"vectors must be 2-D (rows x width), got shape {v.shape}")
    if v.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"vectors must be float16, float32 or float64, got {v.dtype}")
    n, d = v.shape
    flat = pa.array(np.ascontiguousarray(v).reshape(-1))
    ids_array = pa.array(ids)
    if len(ids_array) != n:
        raise ValueError(f"{len(ids_array)} ids for {n} vectors")
    if isinstance(sites, str):
        site_array = pa.array([sites] * n, pa.string()).dictionary_encode()
    else:
        site_array = pa.array(sites)
        if len(site_array) != n:
            raise ValueError(f"{len(site_array)} sites for {n} vectors")
    return pa.record_batch(
        [ids_array, site_array, pa.FixedSizeListArray.from_arrays(flat, d)],
        names=[trace_column, site_column, vector_column],
    )


def fit_parts(
    parts: Sequence[object],
    read: Callable[[object], object],
    *,
    map_parts: Optional[Callable[[Callable[[object], object], Sequence[object]], Iterable[object]]] = None,
    files: Optional[Sequence[str]] = None,
    **options: object,
) -> Monitor:
    """Fits a monitor from ``parts`` (e.g. file paths), each read by ``read(part)`` into Arrow
    data holding whole computations, in three (or, with a joint detector, four) passes.

    ``map_parts(fn, parts)`` runs ``fn`` on every part and returns the results in part order:
    the builtin ``map`` by default (one process), a Ray or Spark map on a cluster. Only bytes
    travel between the driver and the workers. ``options`` are :class:`FitState`'s (``actwatch
    fit``'s options: ``detectors``, ``fpr``, ``seed``, column names, ...).
    """
    run = map_parts or (lambda fn, xs: list(map(fn, xs)))
    parts = list(parts)

    def fold(part: object) -> bytes:
        state = FitState(**options)  # type: ignore[arg-type]
        state.fold(read(part))
        return state.to_bytes()

    merged = FitState(**options)  # type: ignore[arg-type]
    for b in run(fold, parts):
        merged.merge(b)
    merged_bytes = merged.to_bytes()

    def calibrate(part: object) -> bytes:
        cal = Calibrator(merged_bytes)
        cal.calibrate(read(part))
        return cal.take_part()

    driver = Calibrator(merged_bytes)
    for b in run(calibrate, parts):
        driver.absorb(b)
    if driver.joint_wanted:
        joint_fit = driver.joint_fit_part()
        if driver.finish_joint_fit():

            def calibrate_joint(part: object) -> bytes:
                cal = Calibrator(merged_bytes)
                cal.absorb(joint_fit)
                cal.finish_joint_fit()
                cal.calibrate_joint(read(part))
                return cal.take_part()

            for b in run(calibrate_joint, parts):
                driver.absorb(b)
    return driver.finish(files=[str(f) for f in files] if files is not None else None)
