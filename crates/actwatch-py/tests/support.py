"""Helpers shared by the tests (conftest.py puts this folder on sys.path): where the repository,
the actwatch binary and the MiniLM files are, running the binary, and exact comparisons.

Environment: ACTWATCH_BIN (default <repo>/target/debug/actwatch; missing is a failure, not a skip),
ACTWATCH_MINILM_DIR (default <repo>/../shared/data/minilm).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("ACTWATCH_BIN") or REPO / "target" / "debug" / "actwatch")
DATA = Path(os.environ.get("ACTWATCH_MINILM_DIR") or REPO.parent / "shared" / "data" / "minilm")
COLUMN_ARGS = ["--trace-column", "id", "--site-column", "layer", "--vector-column", "activation"]
COLUMNS = {"trace_column": "id", "site_column": "layer", "vector_column": "activation"}
FIT_FILES = ["train", "dev_ood_non_english", "dev_ood_code", "dev_id"]
# The manifest keys that hold the monitor (options, sites with their blobs' SHA-256, joint detector,
# calibration); "summary" and "reference" may differ.
MONITOR_KEYS = ["sites", "joint", "calibration", "options"]


def data(name: str) -> str:
    path = DATA / f"{name}.parquet"
    assert path.is_file(), f"missing data file {path} (set ACTWATCH_MINILM_DIR)"
    return str(path)


def actwatch(*args: object) -> None:
    assert BIN.is_file() and os.access(BIN, os.X_OK), (
        f"actwatch binary not found at {BIN}: build it (cargo build) or set ACTWATCH_BIN"
    )
    argv = [str(a) for a in args]
    done = subprocess.run([str(BIN), *argv], capture_output=True, text=True)
    assert done.returncode == 0, f"actwatch {' '.join(argv)} failed:\n{done.stderr}"


def cli_fit(out: Path, names: list[str]) -> Path:
    """`actwatch fit` on the MiniLM files ``names`` (in order) into ``out``."""
    actwatch("fit", "--input", *(data(n) for n in names), "--out", out, *COLUMN_ARGS)
    return out


def cli_score(monitor: Path, name: str, out_dir: Path, level: str) -> pa.Table:
    out = out_dir / f"{name}-{level}.parquet"
    actwatch("score", "--monitor", monitor, "--input", data(name), "--output", out, "--level", level)
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


def assert_same_monitor(got: Path, want: Path) -> None:
    """The monitors saved in ``got`` and ``want`` have the same manifest model (blob checksums)."""
    got_keys, want_keys = monitor_keys(got), monitor_keys(want)
    for key in MONITOR_KEYS:
        assert got_keys[key] == want_keys[key], f"manifest {key!r} differs from actwatch fit's"
