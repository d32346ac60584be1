"""Shared test fixtures. `shared_data`: the read-only reference data (../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_path() -> Path:
    """`VGROUT_DATA_DIR` if set, else `<repo>/../shared/data` (may not exist)."""
    env = os.environ.get("VGROUT_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The reference data dir; skips the test with the reason when it is absent."""
    path = shared_data_path()
    if not path.is_dir():
        pytest.skip(
            f"reference data not found at {path}: set VGROUT_DATA_DIR or put ../shared/data "
            "beside the repo (CI always has it)"
        )
    return path
