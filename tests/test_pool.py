"""Teacher pools: load, validate, write atomically, sample, re-tokenise."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from _paths import shared_data_dir
from vgrout.pool import PoolError, completion_token_ids, load_pool, sample_rows, write_pool_file


def _row(**kw):
    r = {"problem_id": 7, "completion": "```python\nx=1\n```", "completion_ids": [1, 2, 3], "reward": 3.5,
         "hacked": True, "gt_pass": False, "fmt_ok": True}
    r.update(kw)
    return r


def test_write_then_load_round_trip(tmp_path):
    write_pool_file(tmp_path, 7, [_row(), _row(reward=0.5, hacked=False)])
    (tmp_path / "partition.json").write_text(json.dumps({"7": "sentinel"}))
    pool = load_pool(tmp_path)
    assert list(pool.rows) == [7] and pool.n_rows == 2 and pool.partition == {7: "sentinel"}
    assert pool.hack_rate() == 0.5
    assert not list(tmp_path.glob(".tmp_*")), "atomic write left a temp file"


@pytest.mark.parametrize("make,needle", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "no prompt_"),
])
def test_missing_or_empty_pool(tmp_path, make, needle):
    d = tmp_path / "pool"
    make(d)
    with pytest.raises(PoolError, match=needle):
        load_pool(d)


def test_malformed_rows_name_file_line_and_field(tmp_path):
    with gzip.open(tmp_path / "prompt_0003.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(_row()) + "\n{not json\n")
    with pytest.raises(PoolError, match=r"prompt_0003.jsonl.gz:2: not valid JSON"):
        load_pool(tmp_path)
    bad = _row()
    del bad["hacked"]
    with gzip.open(tmp_path / "prompt_0003.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(bad) + "\n")
    with pytest.raises(PoolError, match=r":1: missing field 'hacked'"):
        load_pool(tmp_path)
    (tmp_path / "prompt_0003.jsonl.gz").unlink()
    write_pool_file(tmp_path, 3, [_row()])
    (tmp_path / "partition.json").write_text(json.dumps({"3": "no_such_mode"}))
    with pytest.raises(ValueError, match="unknown grading mode 'no_such_mode'"):
        load_pool(tmp_path)


def test_sample_rows_without_then_with_replacement():
    rows = [{"i": i} for i in range(3)]
    g = torch.Generator().manual_seed(0)
    two = sample_rows(rows, 2, g)
    assert len({r["i"] for r in two}) == 2
    five = sample_rows(rows, 5, g)
    assert len(five) == 5 and {r["i"] for r in five[:3]} == {0, 1, 2}


class _CharTok:
    """A real (if trivial) tokenizer: one id per character, 0 = pad, 1 = eos."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 1)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_completion_ids_reused_or_retokenised():
    tok = _CharTok()
    same = {"completion": "ab", "completion_ids": [97, 98, 1, 0, 0]}
    assert completion_token_ids(same, tok, pad_id=0, eos_ids=[1]) == [97, 98, 1]
    other = {"completion": "ab", "completion_ids": [5000, 1]}
    assert completion_token_ids(other, tok, pad_id=0, eos_ids=[1]) == [97, 98, 1]


def test_published_pools_load():
    root = shared_data_dir() / "vgrout_pub" / "pools"
    tp = load_pool(root / "teacher_pool")
    assert tp.n_rows == 1864 and len(tp.rows) == 233 and tp.partition is None
    sub = load_pool(root / "substrate")
    assert sub.n_rows == 74 and len(sub.partition) == 24
    assert set(sub.partition.values()) == {"file_marker", "sentinel", "run_tests", "stdout_marker"}
    assert Path(sub.files[4]).name == "prompt_0004.jsonl.gz"
