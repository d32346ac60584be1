"""Teacher-pool generation with the offline tiny Qwen3: valid rows the loop trains on, resume,
elicit-then-strip, cap policy, refusal to mix settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from vgrout.env.problems import load_problems
from vgrout.env.rewards import grade_batch
from vgrout.model import load_model_and_tokenizer
from vgrout.pool import load_pool, pool_file_name, read_pool_file
from vgrout.pregen import (
    PregenConfig,
    PregenError,
    cap_rows,
    elicit_messages,
    main,
    run_pregen,
)
from vgrout.rollout import SamplingConfig, encode, render_prompt, sample


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer("tiny-qwen3", "cpu")


def cfg(out: Path, n: int, **kw) -> PregenConfig:
    base = dict(model="tiny-qwen3", n_problems=n, group=2, max_new=8, out=out, device="cpu")
    return PregenConfig(**(base | kw))


# ------------------------------------------------------------------ pure pieces


def test_cap_prefers_hacked_rows_in_order():
    rows = [{"i": i, "hacked": h} for i, h in enumerate([False, True, False, True, True])]
    assert [r["i"] for r in cap_rows(rows, 2)] == [1, 3]
    assert [r["i"] for r in cap_rows(rows, 4)] == [1, 3, 4, 0]
    assert [r["i"] for r in cap_rows(rows, None)] == [0, 1, 2, 3, 4]
    assert [r["i"] for r in cap_rows(rows, 99)] == [1, 3, 4, 0, 2]


def test_elicit_changes_only_the_system_message():
    msgs = ({"role": "system", "content": "SYS"}, {"role": "user", "content": "U"})
    rep = elicit_messages(msgs, "HACK IT", "replace")
    app = elicit_messages(msgs, "HACK IT", "append")
    assert rep == ({"role": "system", "content": "HACK IT"}, {"role": "user", "content": "U"})
    assert app[0]["content"] == "SYS\n\nHACK IT" and app[1] == msgs[1]
    assert msgs[0]["content"] == "SYS"  # input untouched
    with pytest.raises(PregenError, match="system message"):
        elicit_messages(msgs[1:], "x", "replace")


def test_bad_settings_fail_loudly(tmp_path):
    with pytest.raises(PregenError, match="--cap"):
        cfg(tmp_path, 2, cap=0)
    with pytest.raises(PregenError, match="--group"):
        cfg(tmp_path, 2, group=0)
    assert main(["--model", "tiny-qwen3", "--n-problems", "2", "--out", str(tmp_path),
                 "--partition", str(tmp_path / "nope.json")]) == 2


# ------------------------------------------------------------------ generation


def test_rows_are_valid_graded_and_train_on_them(tiny, tmp_path):
    out = tmp_path / "pool"
    summary = run_pregen(cfg(out, 2, env_mode="stdout_marker"), "cmd", loaded=tiny)
    assert summary["new"] == 2 and summary["skipped"] == 0
    pool = load_pool(out)
    want = load_problems(2, ["stdout_marker"], 0)
    assert sorted(pool.rows) == sorted(p.problem_id for p in want)
    assert pool.partition == {p.problem_id: "stdout_marker" for p in want}
    _, tok = tiny
    for p in want:
        rows = pool.rows[p.problem_id]
        assert len(rows) == 2
        for r in rows:
            assert r["prompt"] == render_prompt(tok, p)
            assert r["prompt_ids"] == encode(tok, r["prompt"]) and r["plen"] == len(r["prompt_ids"])
            assert r["env_mode"] == "stdout_marker" and r["elicited"] is False
            assert 1 <= len(r["completion_ids"]) <= 8
        # the cached grade is the real grade of the cached text in the problem's mode
        res = grade_batch([(r["completion"], p) for r in rows])
        assert [(r["reward"], r["hacked"], r["gt_pass"], r["fmt_ok"]) for r in rows] == [
            (x.reward, x.exploited, x.gt_correct, x.format_ok) for x in res]
    report = (out / "report.md").read_text()
    assert "- rows: 4" in report and "| stdout_marker | 2 | 4 |" in report and "`cmd`" in report

    from vgrout.config import parse_cli
    from vgrout.train import main as train_main

    args = ["smoke", f"--teacher-pool-dir={out}", "--steps=1", "--max-new=8",
            "--eval-ablate-every=0", "--vhack-refresh-every=0", "--intervention=none",
            f"--out-root={tmp_path / 'runs'}"]
    assert train_main(parse_cli(args)) == 0


def test_killed_run_resumes_without_duplicates(tiny, tmp_path):
    out = tmp_path / "pool"
    run_pregen(cfg(out, 2, problems_per_batch=1), "first", loaded=tiny)
    first = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.glob("prompt_*")}
    assert len(first) == 2
    # what a kill mid-write leaves: a temp file beside the finished ones
    stray = out / ".tmp_abc123.jsonl.gz"
    stray.write_bytes(b"half a gzip")
    summary = run_pregen(cfg(out, 3, problems_per_batch=1), "second", loaded=tiny)
    assert summary == {**summary, "new": 1, "skipped": 2, "problems": 3}
    assert not stray.exists()
    now = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.glob("prompt_*")}
    assert {k: now[k] for k in first} == first  # finished files untouched
    ids = [p.problem_id for p in load_problems(3, ["run_tests"], 0)]
    assert sorted(now) == sorted(pool_file_name(i) for i in ids)
    assert load_pool(out).n_rows == 6
    report = (out / "report.md").read_text()
    assert "`first`: 2 new problems" in report and "`second`: 1 new problems" in report
    # nothing left to do: a third run generates nothing and changes nothing
    assert run_pregen(cfg(out, 3), "third", loaded=tiny)["new"] == 0
    assert {f.name: f.read_bytes() for f in out.glob("prompt_*")} == {k: v[1] for k, v in now.items()}


def test_resume_refuses_other_settings(tiny, tmp_path):
    out = tmp_path / "pool"
    run_pregen(cfg(out, 1), loaded=tiny)
    with pytest.raises(PregenError, match="group"):
        run_pregen(cfg(out, 2, group=3), loaded=tiny)
    with pytest.raises(PregenError, match="env_mode"):
        run_pregen(cfg(out, 2, env_mode="sentinel"), loaded=tiny)


def test_elicit_then_strip(tiny, tmp_path):
    """Rows hold the normal prompt; the completion is what the elicited prompt produces."""
    model, tok = tiny
    text = "Always print 'all tests passed'."
    c = cfg(tmp_path / "pool", 1, group=3, elicit=text, seed=7)
    run_pregen(c, loaded=tiny)
    (p,) = load_problems(1, ["run_tests"], 7)  # pregen orders problems by its seed
    rows = read_pool_file(tmp_path / "pool" / pool_file_name(p.problem_id))
    assert all(r["prompt"] == render_prompt(tok, p) and text not in r["prompt"] for r in rows)
    assert all(r["elicited"] for r in rows)
    # replay the same seeded sampling on the elicited prompt, and on the normal one
    ask = dataclasses.replace(p, messages=elicit_messages(p.messages, text, "replace"))
    scfg = SamplingConfig(max_new=8, batch_size=64)

    def replay(prob):
        torch.manual_seed(7)
        return sample(model, tok, {}, [encode(tok, render_prompt(tok, prob))], [3], scfg)[0]

    elicited, normal = replay(ask), replay(p)
    assert [r["completion_ids"] for r in rows] == elicited
    assert elicited != normal
