"""Pieces shared by :mod:`actwatch_engine.ray` and :mod:`actwatch_engine.spark` (private)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_COLUMN_KEYS = ("trace_column", "site_column", "vector_column")
# The columns a fit reads when ``options`` name none: ``actwatch fit``'s defaults.
_DEFAULT_COLUMNS = ("trace_id", "site", "activation")


def _check_columns(columns: dict[str, Any]) -> dict[str, Any]:
    bad = sorted(set(columns) - set(_COLUMN_KEYS))
    if bad:
        raise TypeError(f"unexpected keyword argument(s) {bad}; column options are {list(_COLUMN_KEYS)}")
    return {k: v for k, v in columns.items() if v is not None}


def _fit_columns(options: Mapping[str, Any]) -> list[str]:
    """The trace, site and vector columns a fit with ``options`` reads."""
    return [options.get(key) or default for key, default in zip(_COLUMN_KEYS, _DEFAULT_COLUMNS)]


def _read_columns(path: str, wanted: list[str]) -> pa.Table:
    return pq.read_table(path, columns=wanted)


def _refuse_level(level: str, function: str, module: str, splits: str) -> None:
    """Refuses any ``level`` but ``"trace"`` for ``function`` of ``actwatch_engine.<module>``, whose
    input's ``splits`` (e.g. "a Dataset's blocks and batches") can split a computation."""
    if level == "computation":
        raise ValueError(
            f"{function} scores at trace level only: computation-level scores need every trace "
            f"of a computation in one call, and {splits} can split "
            f"a computation; use actwatch_engine.{module}.score_files, which scores each file whole"
        )
    if level != "trace":
        raise ValueError(f'level must be "trace" (or "computation" via score_files), got {level!r}')


def _check_files_level(level: str) -> None:
    if level not in ("computation", "trace"):
        raise ValueError(f'level must be "computation" or "trace", got {level!r}')


def _paths(paths: Sequence[Any], function: str) -> list[str]:
    """``paths`` as strings; refuses none at all."""
    out = [str(p) for p in paths]
    if not out:
        raise ValueError(f"{function} needs at least one path")
    return out
