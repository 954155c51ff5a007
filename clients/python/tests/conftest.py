"""Shared fixtures: ``torch`` (the module) for the tests that need PyTorch.

A test that takes the ``torch`` fixture is marked ``torch`` (``pytest -m torch`` runs just those). It
skips without torch, or fails when ACTWATCH_REQUIRE_TORCH=1 (as in CI, where run_tests.sh gets torch
from ACTWATCH_TORCH_PYTHON's venv).
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "torch" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.torch)


@pytest.fixture(scope="session")
def torch() -> ModuleType:
    """The torch module; the tests that use it skip without it (unless ACTWATCH_REQUIRE_TORCH=1)."""
    try:
        import torch
    except ImportError as e:
        reason = f"torch not installed (pip install .[torch], or set ACTWATCH_TORCH_PYTHON for run_tests.sh): {e}"
        if os.environ.get("ACTWATCH_REQUIRE_TORCH") == "1":
            pytest.fail(reason + " (ACTWATCH_REQUIRE_TORCH=1)")
        pytest.skip(reason)
    return torch
