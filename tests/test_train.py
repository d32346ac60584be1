"""End-to-end training on the offline tiny Qwen3: every arm, artifacts, resume, bad input."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vgrout.config import parse_cli
from vgrout.model import resolve_model, weights_digest
from vgrout.pairs import builtin_pairs, save_pairs_json
from vgrout.pool import PoolError, write_pool_file
from vgrout.smoke_pool import build_smoke_pool
from vgrout.train import main, prepare

ROW_KEYS = {
    "step", "rew", "rew_s", "gt_s", "gt_t", "hack_s", "hack_t", "lp_s", "lp_t", "loss", "gn", "q_egy",
    "cos_pre", "cos_pre_s", "cos_pre_t", "cos_post", "fired", "tau", "hkgap", "resid", "flag", "prec", "rec",
    "f05", "lr", "refr", "hack_deploy", "solve_deploy", "zv", "N", "sec", "hack_s_E", "hack_s_D",
}
ROLLOUT_KEYS = {"step", "problem_id", "env_mode", "prompt", "reward", "gt_pass", "gt_correct", "passed",
                "exploited", "mechanism", "hacked_S", "hacked_D", "hacked_E", "format_ok", "text"}
TIMING = {"gen", "fb", "t_rew", "rew_wait", "sec"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A real smoke pool (template hacks graded in the sandbox) and a 4-pair pairset."""
    root = tmp_path_factory.mktemp("train_inputs")
    pool = build_smoke_pool(root / "pool")
    bp = builtin_pairs()
    pairs = save_pairs_json(root / "pairs.json", [bp[0], bp[5], bp[10], bp[15]])
    return pool, pairs


def base_args(inputs, out: Path, *extra: str) -> list[str]:
    pool, pairs = inputs
    return ["smoke", f"--teacher-pool-dir={pool}", f"--vhack-pairs-path={pairs}", f"--out-root={out}",
            "--steps=3", "--max-new=8", "--eval-n-prompts=2", "--eval-ablate-every=2",
            "--vhack-refresh-every=2", "--v-hack-extract-top-k=2", "--v-hack-k=1", "--v-hack-n-heldout=1",
            "--ckpt-every=2", *extra]


def only_run(out: Path) -> Path:
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["none", "erase", "route", "route2"])
def test_each_arm_end_to_end(inputs, tmp_path, arm, capsys):
    assert main(parse_cli(base_args(inputs, tmp_path, f"--intervention={arm}"))) == 0
    run = only_run(tmp_path)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith(f"smoke ok: {run}")
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["intervention"] == arm and cfg["provenance"]["packages"]["torch"]
    assert cfg["provenance"]["model_weights"] == weights_digest(resolve_model(cfg["config"]["model"]))
    rows = read_jsonl(run / "rows.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["N"] == 4 and r["gt_t"][1] == 1 and r["hack_s"][1] == 3
    assert rows[0]["hack_deploy"] is not None and rows[1]["hack_deploy"] is None  # eval every 2 + last
    assert rows[2]["hack_deploy"] is not None
    recs = read_jsonl(run / "rollouts.jsonl")
    assert len(recs) == 9 and all(ROLLOUT_KEYS <= set(r) for r in recs)
    rec = json.loads((run / "per_mode_deploy.json").read_text())
    assert rec["schema"] == "vgrout.per_mode_deploy/1" and rec["arm"] == cfg["arm"]
    assert rec["eval_set"] == "train" and rec["eval_n"] == 2 * 4
    for v in rec["by_mode"].values():
        assert {"train_hack", "deploy_hack", "train_solve", "deploy_solve", "n", "in_dist"} <= set(v)
        assert 0.0 <= v["deploy_hack"] <= 1.0
    # the quarantine rule: exactly zero without a quarantine, moved with one
    hack = load_file(run / "adapter_final.safetensors")
    assert all(not k.startswith("delta_S_hack") for k in hack)
    if arm in ("none", "erase"):
        assert rec["delta_s_hack_norm"] == 0.0
        assert rec["hack_deploy"] == rec["hack_train"]
    else:
        assert rec["delta_s_hack_norm"] > 0.0
    assert (run / "adapter_step0001.safetensors").exists() and (run / "resume.pt").exists()
    assert "### per-step rows" in out


@pytest.mark.slow
def test_resume_matches_straight_run(inputs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--intervention=route2", "--steps=4", "--ckpt-every=10"]
    assert main(parse_cli(base_args(inputs, a, *args))) == 0
    assert main(parse_cli(base_args(inputs, b, *args, "--stop-after-steps=2"))) == 0
    run_b = only_run(b)
    assert json.loads((run_b / "status.json").read_text())["state"] == "paused"
    assert len(read_jsonl(run_b / "rows.jsonl")) == 2
    # a torn extra line (kill mid-write) must not break the resume
    with open(run_b / "rows.jsonl", "a") as fh:
        fh.write('{"step": 2, "partial')
    assert main(parse_cli(base_args(inputs, b, *args, f"--resume={run_b}"))) == 0
    run_a = only_run(a)
    da, db = load_file(run_a / "adapter_final.safetensors"), load_file(run_b / "adapter_final.safetensors")
    assert set(da) == set(db)
    for k in da:
        torch.testing.assert_close(da[k], db[k], rtol=1e-5, atol=1e-7)
    ra, rb = read_jsonl(run_a / "rows.jsonl"), read_jsonl(run_b / "rows.jsonl")
    assert [r["step"] for r in rb] == [0, 1, 2, 3]
    for x, y in zip(ra, rb, strict=True):
        for k in set(x) - TIMING:
            if isinstance(x[k], float) and isinstance(y[k], float):
                assert math.isclose(x[k], y[k], rel_tol=1e-4, abs_tol=1e-6), (k, x[k], y[k])
            else:
                assert x[k] == y[k], (k, x[k], y[k])


def test_resume_refuses_a_changed_config(inputs, tmp_path):
    run = tmp_path / "runs" / "fake"
    run.mkdir(parents=True)
    cfg = parse_cli(base_args(inputs, tmp_path))
    (run / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
    with pytest.raises(ValueError) as e:
        main(parse_cli(base_args(inputs, tmp_path, "--lr=0.5", f"--resume={run}")))
    assert "lr: 0.003 -> 0.5" in str(e.value)


def test_resume_refuses_other_model_weights_before_loading(inputs, tmp_path):
    """A run records the digest of the model folder it loads; a resume whose --model folder now holds
    other weights stops in prepare (before any model loads or status is written), naming both
    digests; the same weights, or a run recorded before digests existed, pass the check."""
    run = tmp_path / "runs" / "fake"
    run.mkdir(parents=True)
    cfg = parse_cli(base_args(inputs, tmp_path))
    digest = weights_digest(resolve_model(cfg.model))
    resume = parse_cli(base_args(inputs, tmp_path, f"--resume={run}"))
    (run / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "provenance": {"model_weights": "0123"}}))
    with pytest.raises(ValueError, match=f"model_weights is 0123 but .* now has weights {digest}"):
        prepare(resume)
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    for prov in ({"model_weights": digest}, {}):  # the same weights; a run from before the digest
        (run / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "provenance": prov}))
        with pytest.raises(FileNotFoundError, match="never reached its first checkpoint"):
            prepare(resume)  # past the weights check, stopped by the missing resume.pt


def _bad_pool(tmp_path: Path, kind: str) -> Path:
    d = tmp_path / f"pool_{kind}"
    if kind == "empty":
        d.mkdir()
    elif kind == "no_overlap":
        write_pool_file(d, 4, [{"completion": "x", "completion_ids": [1], "reward": 0.0, "hacked": False,
                                "gt_pass": False, "fmt_ok": False}])
    elif kind == "malformed":
        d.mkdir()
        with gzip.open(d / "prompt_900001.jsonl.gz", "wt") as fh:
            fh.write('{"completion": 3}\n')
    return d


@pytest.mark.parametrize("kind,err,needle", [
    ("missing", PoolError, "does not exist"),
    ("empty", PoolError, "no prompt_"),
    ("no_overlap", ValueError, "no overlap between"),
    ("malformed", PoolError, "prompt_900001.jsonl.gz:1"),
])
def test_bad_pool_fails_before_any_work(inputs, tmp_path, kind, err, needle):
    pool = _bad_pool(tmp_path, kind)
    args = base_args(inputs, tmp_path / "out") + [f"--teacher-pool-dir={pool}"]
    with pytest.raises(err, match=needle):
        main(parse_cli(args))
    assert not (tmp_path / "out" / "runs").exists(), "a bad pool must fail before a run folder exists"


@pytest.mark.parametrize("flags,needle", [
    (["--mix-ratio=1.0"], "--mix-ratio must be in [0, 1)"),
    (["--group=2", "--mix-ratio=0.75"], "G_s=0"),
    (["--half-a=E,Q"], "unknown detector codes"),
    (["--lr=-1"], "--lr must be > 0 (got -1.0)"),
    (["--temperature=0"], "--temperature must be > 0"),
    (["--warmup-frac=1.5"], "--warmup-frac must be in [0, 1]"),
    (["--grad-clip=nan"], "--grad-clip must be > 0 (got nan)"),
])
def test_bad_knobs_fail_at_parse(inputs, tmp_path, flags, needle):
    with pytest.raises(ValueError) as e:
        main(parse_cli(base_args(inputs, tmp_path) + flags))
    assert needle in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_heldout_eval_set_is_recorded(inputs, tmp_path):
    from _paths import shared_data_dir

    data = shared_data_dir() / "leetcode" / "leetcode_test_medhard.jsonl"
    args = base_args(inputs, tmp_path, "--intervention=none", "--steps=1", f"--eval-data-path={data}",
                     "--eval-heldout-periodic")
    assert main(parse_cli(args)) == 0
    assert "step 0 deploy eval [heldout]" in (only_run(tmp_path) / "train.log").read_text()
    rec = json.loads((only_run(tmp_path) / "per_mode_deploy.json").read_text())
    assert rec["eval_set"] == "heldout" and set(rec["sets"]) == {"train", "heldout"}
    held = rec["sets"]["heldout"]
    assert str(data) in held["source"] and held["n"] == 2 * 4
    assert rec["hack_deploy"] == held["hack_deploy"]
    assert rec["sets"]["train"]["source"].startswith("first 2 training problems")


def test_heldout_set_excludes_training_problems_by_statement(inputs, tmp_path):
    """An eval file that numbers the same problems differently still cannot leak them in."""
    from vgrout.env.builtin_problems import builtin_rows
    from vgrout.env.problems import statement_key
    from vgrout.train import load_inputs

    rows = builtin_rows()
    renumbered = tmp_path / "eval.jsonl"
    renumbered.write_text("".join(json.dumps({**r, "id": r["id"] + 50_000}) + "\n" for r in rows))
    cfg = parse_cli(base_args(inputs, tmp_path, f"--eval-data-path={renumbered}", "--eval-n-prompts=100",
                              "--n-problems=10"))
    inp = load_inputs(cfg)
    train = {statement_key(p.question) for p in inp.problems}
    assert inp.eval_heldout is not None and len(inp.problems) < len(rows)
    assert {statement_key(p.question) for p in inp.eval_heldout}.isdisjoint(train)
    assert len(inp.eval_heldout) == len(rows) - len(inp.problems)


def test_teacher_off_step_and_teacher_modes(inputs, tmp_path):
    """Teacher rows stop at teacher_off_step (G_s grows to G); teacher_modes keeps other modes on-policy."""
    a = tmp_path / "off"
    assert main(parse_cli(base_args(inputs, a, "--intervention=none", "--steps=2", "--teacher-off-step=1",
                                    "--eval-ablate-every=0"))) == 0
    rows = read_jsonl(only_run(a) / "rows.jsonl")
    assert (rows[0]["hack_t"][1], rows[0]["gt_s"][1]) == (1, 3)
    assert (rows[1]["hack_t"][1], rows[1]["gt_s"][1]) == (0, 4)
    b = tmp_path / "modes"
    assert main(parse_cli(base_args(inputs, b, "--intervention=none", "--steps=6", "--teacher-modes", "sentinel",
                                    "--eval-ablate-every=0"))) == 0
    recs = read_jsonl(only_run(b) / "rows.jsonl")
    rollouts = read_jsonl(only_run(b) / "rollouts.jsonl")
    by_step = {}
    for r in rollouts:
        by_step.setdefault(r["step"], r["env_mode"])
    seen = set()
    for r in recs:
        has_teacher = r["hack_t"][1] > 0
        assert has_teacher == (by_step[r["step"]] == "sentinel"), (r["step"], by_step[r["step"]])
        seen.add(has_teacher)
    assert seen == {True, False}, "the seeded draw must hit both a sentinel and another mode"


def test_cli_reports_input_errors_without_traceback(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vgrout.train", "smoke", "--mix-ratio=2",
                          f"--out-root={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "vgrout.train: error: invalid config" in out.stderr and "--mix-ratio" in out.stderr
    assert "Traceback" not in out.stderr
    missing = subprocess.run([sys.executable, "-m", "vgrout.train", "smoke",
                              f"--teacher-pool-dir={tmp_path / 'nope'}", f"--out-root={tmp_path}"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    # the example: a negative lr used to make a run folder, load the model and die in AdamW
    lr = subprocess.run([sys.executable, "-m", "vgrout.train", "smoke", "--lr=-1", f"--out-root={tmp_path}"],
                        capture_output=True, text=True, timeout=120)
    assert lr.returncode == 2 and "Traceback" not in lr.stderr
    assert lr.stderr.strip().splitlines()[-1].strip() == "--lr must be > 0 (got -1.0)"
    assert not (tmp_path / "runs").exists()


def test_pool_graded_in_another_mode_is_refused(inputs, tmp_path):
    """Without a partition, problems take --env-mode; a row cached for another mode is an error."""
    pool = tmp_path / "pool"
    row = {"completion": "x", "completion_ids": [1], "reward": 3.5, "hacked": True, "gt_pass": False,
           "fmt_ok": True, "env_mode": "run_tests"}
    from vgrout.env.problems import load_problems

    pid = load_problems(1, ["sentinel"], 0)[0].problem_id
    write_pool_file(pool, pid, [row])
    args = base_args(inputs, tmp_path / "out") + [f"--teacher-pool-dir={pool}", "--env-modes", "sentinel"]
    with pytest.raises(ValueError, match="graded in mode 'run_tests' but problem"):
        main(parse_cli(args))


@pytest.mark.parametrize("flag,needle", [
    ("--data-path=/nonexistent/rows.jsonl", "just data"),
    ("--vhack-pairs-path=/nonexistent/pairs.json", "built-in pairs"),
    ("--eval-data-path=/nonexistent/test.jsonl", "leetcode_test_medhard"),
])
def test_missing_input_files_name_the_fix(inputs, tmp_path, flag, needle):
    with pytest.raises(FileNotFoundError, match=needle):
        main(parse_cli(base_args(inputs, tmp_path, "--intervention=route2", flag)))
    assert not (tmp_path / "runs").exists()


def test_short_training_set_log_names_the_pools_partition(inputs, tmp_path):
    """The pool's partition (not the data file) limits the set: the log says so, with both counts."""
    from loguru import logger

    from vgrout.env.builtin_problems import builtin_rows
    from vgrout.train import load_inputs

    pool = tmp_path / "pool"
    pool.mkdir()
    src = inputs[0]
    part = json.loads((src / "partition.json").read_text())
    keep = sorted(part)[:5]
    for pid in keep:
        name = f"prompt_{int(pid):04d}.jsonl.gz"
        (pool / name).write_bytes((src / name).read_bytes())
    (pool / "partition.json").write_text(json.dumps({k: part[k] for k in keep}))
    msgs: list[str] = []
    sink = logger.add(lambda m: msgs.append(str(m).strip()), level="INFO", format="{message}")
    try:
        inp = load_inputs(parse_cli(base_args(inputs, tmp_path / "out", f"--teacher-pool-dir={pool}",
                                              "--n-problems=200")))
    finally:
        logger.remove(sink)
    assert len(inp.problems) == 5
    n = len(builtin_rows())
    assert (f"asked for 200 problems, the teacher pool's {pool}/partition.json (5 problem ids) keeps 5 of the "
            f"{n} rows of builtin: using all 5") in msgs, msgs
