"""actwatch_engine.ray against the actwatch binary, on a local 2-CPU Ray and the MiniLM files.

    eval "$(scripts/setup_cluster.sh)"
    "$ACTWATCH_CLUSTER_PYTHON" -m pytest crates/actwatch-py/tests/test_ray.py

The engine is deterministic, so every comparison is exact (floats to the bit): a difference is a bug.
Environment: ACTWATCH_BIN (default <repo>/target/debug/actwatch; missing is a failure, not a skip),
ACTWATCH_MINILM_DIR (default <repo>/../shared/data/minilm). Skipped only when ray is not importable.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

ray = pytest.importorskip(
    "ray", reason="ray is not importable (scripts/setup_cluster.sh sets up a venv with ray[data])"
)

import actwatch_engine  # noqa: E402
from actwatch_engine import ray as aw_ray  # noqa: E402
from support import COLUMNS, FIT_FILES, as_table, assert_same_monitor, assert_same_rows, cli_fit, cli_score, data  # noqa: E402


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
    cli = cli_fit(workdir / "cli-fit-4", FIT_FILES)
    monitor = aw_ray.fit(paths, **COLUMNS)
    assert isinstance(monitor, actwatch_engine.Monitor)
    ours = workdir / "ray-fit-4"
    monitor.save(str(ours))
    assert_same_monitor(ours, cli)
