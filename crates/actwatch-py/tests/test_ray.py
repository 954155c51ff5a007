"""actwatch_engine.ray against the actwatch binary, on a local 2-CPU Ray and the MiniLM files.

    eval "$(scripts/setup_cluster.sh)"
    "$ACTWATCH_CLUSTER_PYTHON" -m pytest crates/actwatch-py/tests/test_ray.py

The engine is deterministic, so every comparison is exact (floats to the bit): a difference is a bug.
Environment: ACTWATCH_BIN (default <repo>/target/debug/actwatch; missing is a failure, not a skip),
ACTWATCH_MINILM_DIR (default <repo>/../shared/data/minilm). Skipped only when ray is not importable.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip(
    "ray", reason="ray is not importable (scripts/setup_cluster.sh sets up a venv with ray[data])"
)

import actwatch_engine  # noqa: E402
from actwatch_engine import ray as aw_ray  # noqa: E402

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
    return tmp_path_factory.mktemp("actwatch-ray")


@pytest.fixture(scope="module")
def cli_monitor(workdir) -> Path:
    """`actwatch fit` on train.parquet."""
    out = workdir / "cli-monitor"
    actwatch("fit", "--input", data("train"), "--out", str(out), *COLUMN_ARGS)
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray on 2 CPUs, loopback only, for this module."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Otherwise Ray on Linux binds its runtime-env agent to the eth0 address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=512 * 1024 * 1024,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        logging_level="WARNING",
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.target_max_block_size = 4 * 1024 * 1024  # several blocks even for these small files
    yield
    ray.shutdown()


def collect(ds) -> pa.Table:
    return pa.concat_tables([as_table(t) for t in ray.get(ds.to_arrow_refs())])


def test_trace_level_matches_cli(ray_cluster, cli_monitor, workdir):
    names = ["dev_id", "dev_ood_code"]
    ds = ray.data.read_parquet([data(n) for n in names], override_num_blocks=4)
    # Small batches: the traces of a computation land in different batches and actors.
    got = collect(aw_ray.score_dataset(ds, str(cli_monitor), batch_size=700))
    want = pa.concat_tables([cli_score(cli_monitor, n, workdir, "trace") for n in names])
    assert want.num_rows == 4500
    assert_same_rows(got, want, keys=["id", "layer"])


def test_score_dataset_refuses_computation_level(ray_cluster, cli_monitor):
    ds = ray.data.read_parquet(data("dev_ood_code"))
    with pytest.raises(ValueError, match="score_files"):
        aw_ray.score_dataset(ds, str(cli_monitor), level="computation")


def test_computation_level_files_match_cli(ray_cluster, cli_monitor, workdir):
    names = ["dev_id", "dev_ood_code"]
    got = collect(aw_ray.score_files([data(n) for n in names], str(cli_monitor)))
    want = pa.concat_tables([cli_score(cli_monitor, n, workdir, "computation") for n in names])
    assert want.num_rows == 1500
    assert_same_rows(got, want, keys=["id"])


def test_fit_matches_cli_fit(ray_cluster, workdir):
    paths = [data(n) for n in FIT_FILES]
    cli = workdir / "cli-fit-4"
    actwatch("fit", "--input", *paths, "--out", str(cli), *COLUMN_ARGS)
    monitor = aw_ray.fit(paths, **COLUMNS)
    assert isinstance(monitor, actwatch_engine.Monitor)
    ours = workdir / "ray-fit-4"
    monitor.save(str(ours))
    got, want = monitor_keys(ours), monitor_keys(cli)
    for key in MONITOR_KEYS:
        assert got[key] == want[key], f"manifest {key!r} differs from actwatch fit's"
