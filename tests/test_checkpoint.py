"""Atomic writes and jsonl bookkeeping survive kills; resume state round-trips."""

import json
import os
import random

import pytest
import torch

from vgrout import checkpoint as ck
from vgrout.atomic import write_json_atomic


def test_atomic_path_keeps_old_file_when_writer_dies(tmp_path):
    dest = tmp_path / "state.json"
    write_json_atomic(dest, {"v": 1})
    with pytest.raises(RuntimeError):
        with ck.atomic_path(dest) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads(dest.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_jsonl_ignores_torn_last_line_and_truncates(tmp_path):
    p = tmp_path / "rows.jsonl"
    ck.append_jsonl(p, [{"step": 0}, {"step": 1}, {"step": 2}])
    with open(p, "a") as fh:
        fh.write('{"step": 3, "x"')  # a kill mid-line
    assert [r["step"] for r in ck.read_jsonl(p)] == [0, 1, 2]
    assert ck.truncate_jsonl(p, lambda r: r["step"] < 2) == 2
    assert [r["step"] for r in ck.read_jsonl(p)] == [0, 1]


def test_resume_state_and_rng_round_trip(tmp_path):
    torch.manual_seed(5)
    random.seed(5)
    st = ck.rng_state()
    a, b = torch.rand(3), random.random()
    ck.save_resume_state(tmp_path, {"rng": st, "x": torch.arange(4)})
    loaded = ck.load_resume_state(tmp_path)
    ck.set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), a) and random.random() == b
    assert torch.equal(loaded["x"], torch.arange(4))
    with pytest.raises(FileNotFoundError, match="never reached its first checkpoint"):
        ck.load_resume_state(tmp_path / "nope")


def test_provenance_records_command_and_versions():
    p = ck.provenance()
    assert p["packages"]["torch"] and p["command"] and p["git_commit"]
    assert os.path.isabs(p["cwd"])
    import torch

    assert p["torch_threads"] == torch.get_num_threads() >= 1


def test_resume_of_an_older_schema_is_refused_in_one_line(tmp_path):
    """A resume.pt from before the arm objects (no schema key; route2's gate at top level) is refused
    before any model loads, with one line naming both schemas; the current schema round-trips."""
    from vgrout.config import parse_cli

    run = tmp_path / "run"
    run.mkdir()
    cfg = parse_cli(["smoke", f"--resume={run}"])
    (run / ck.CONFIG_FILE).write_text(json.dumps({"config": cfg.to_dict()}))
    torch.save({"delta_S": {}, "gate": {"beta": 0.9, "ema_hack": {}, "ema_clean": {}}, "problem_rng": None,
                "train_state": {"step": 3, "span_checked": False}}, run / ck.RESUME_FILE)
    with pytest.raises(ValueError) as e:
        ck.make_run_dir(cfg)
    msg = str(e.value)
    assert "vgrout.resume/1" in msg and ck.RESUME_SCHEMA in msg and "\n" not in msg
    ck.save_resume_state(run, {"delta_S": {}})
    assert ck.make_run_dir(cfg) == run and ck.load_resume_state(run)["schema"] == ck.RESUME_SCHEMA


def test_staging_dir_is_removed_and_dest_untouched_on_failure(tmp_path):
    """A build that fails leaves no staging folder and no half-built dest; one that renames its
    staging folder into place leaves the complete folder, readable by others (0o755)."""
    import os

    from vgrout.atomic import staging_dir

    dest = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError, match="build failed"), staging_dir(dest) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("build failed")
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    with staging_dir(dest) as tmp:
        assert tmp.parent == dest.parent and tmp.name.startswith(".m.")
        assert os.stat(tmp).st_mode & 0o777 == 0o755
        (tmp / "weights").write_text("full")
        os.replace(tmp, dest)
    assert (dest / "weights").read_text() == "full" and sorted(p.name for p in dest.parent.iterdir()) == ["m"]


def test_provenance_names_the_model_weights_only_when_given():
    assert "model_weights" not in ck.provenance()
    assert ck.provenance("abcd")["model_weights"] == "abcd"
