"""Every arm's per-step rows and final record match the golden ones written before the arm-objects
refactor (tests/_golden.py; timing columns excluded, floats to _golden.FLOAT_RTOL relative)."""

from __future__ import annotations

import json

import pytest

from _golden import CONFIGS, GOLDEN_FILE, RETIRED, build_inputs, compare, run_config


@pytest.fixture(scope="module")
def golden_inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("golden_inputs"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_rows_match_golden(golden_inputs, tmp_path, name):
    want = json.loads(GOLDEN_FILE.read_text())[name]
    want["rows"] = [{k: v for k, v in r.items() if k not in RETIRED} for r in want["rows"]]
    got = run_config(name, *golden_inputs, tmp_path)
    diffs = compare(want, got)
    assert not diffs, f"{name}: {len(diffs)} differences, first: " + "; ".join(diffs[:8])
