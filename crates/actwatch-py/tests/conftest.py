"""Fixtures shared by the tests; puts this folder on sys.path so that they can `import support`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import cli_fit


@pytest.fixture(scope="module")
def workdir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for this test module (actwatch-<module without test_>)."""
    name = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    return tmp_path_factory.mktemp(f"actwatch-{name}")


@pytest.fixture(scope="module")
def cli_monitor(workdir: Path) -> Path:
    """`actwatch fit` on train.parquet."""
    return cli_fit(workdir / "cli-monitor", ["train"])
