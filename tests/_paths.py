"""Where the shared benchmark data lives for tests (skip with a reason when it is absent)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    d = Path(os.environ.get("VGROUT_DATA_DIR", REPO.parent / "shared" / "data"))
    if not d.is_dir():
        pytest.skip(f"shared data not found at {d} (set VGROUT_DATA_DIR or put ../shared beside the repo)")
    return d
