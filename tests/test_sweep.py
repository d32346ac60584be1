"""Sweep planning: exact training commands, pueue argv, and a SLURM array script whose
index -> command mapping is checked by running the script itself in bash."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vgrout.sweep import (
    Job,
    main,
    parse_arms,
    parse_seeds,
    plan_jobs,
    pueue_plan,
    slurm_script,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["uv", "run", "python", "-m", "vgrout.train"]


def test_parse_arms_and_seeds():
    assert parse_arms("none,erase,route,route2") == ["none", "erase", "route", "route2"]
    assert parse_arms("vanilla, routing2,route2") == ["none", "route2"]  # display names, dedup
    assert parse_seeds("41,42,43") == [41, 42, 43]
    assert parse_seeds("41-45") == [41, 42, 43, 44, 45]
    assert parse_seeds("43,41-42,42") == [43, 41, 42]
    for bad in ("routing3", ",", ""):
        with pytest.raises(ValueError, match="ARMS"):
            parse_arms(bad)
    for bad in ("45-41", "4x", "-3", "1-2-3", ""):
        with pytest.raises(ValueError, match="SEEDS"):
            parse_seeds(bad)


def test_plan_jobs_exact_commands_and_conflicts():
    jobs = plan_jobs("fast", ["none", "route2"], [41, 42], ["--lr=1e-3"])
    assert [j.argv() for j in jobs] == [
        TRAIN + ["fast", "--intervention=none", "--seed=41", "--lr=1e-3"],
        TRAIN + ["fast", "--intervention=none", "--seed=42", "--lr=1e-3"],
        TRAIN + ["fast", "--intervention=route2", "--seed=41", "--lr=1e-3"],
        TRAIN + ["fast", "--intervention=route2", "--seed=42", "--lr=1e-3"],
    ]
    assert [j.label for j in jobs] == [
        "fast_vanilla_seed41",
        "fast_vanilla_seed42",
        "fast_routing2_seed41",
        "fast_routing2_seed42",
    ]
    assert Job("full", "route2", 3, ("--random-v-seed=7",)).label == "full_routing2_seed3_haar7"
    with pytest.raises(ValueError, match="PRESET"):
        plan_jobs("huge", ["none"], [1])
    with pytest.raises(ValueError, match="--seed is set by the sweep"):
        plan_jobs("fast", ["none"], [1], ["--seed=3"])


def test_pueue_plan_is_the_exact_argv_list():
    jobs = plan_jobs("smoke", ["erase"], [1, 2], ["--out-tag=_a b"])
    wd = Path("/repo")
    cmds = pueue_plan("/bin/pueue", jobs, "vgrout", 2, wd, group_exists=False)
    assert cmds == [
        ["/bin/pueue", "group", "add", "vgrout"],
        ["/bin/pueue", "parallel", "2", "--group", "vgrout"],
        [
            "/bin/pueue",
            "add",
            "--group",
            "vgrout",
            "--label",
            "smoke_projected_seed1",
            "--working-directory",
            "/repo",
            "--",
            "uv run python -m vgrout.train smoke --intervention=erase --seed=1 '--out-tag=_a b'",
        ],
        [
            "/bin/pueue",
            "add",
            "--group",
            "vgrout",
            "--label",
            "smoke_projected_seed2",
            "--working-directory",
            "/repo",
            "--",
            "uv run python -m vgrout.train smoke --intervention=erase --seed=2 '--out-tag=_a b'",
        ],
    ]
    # pueue hands the command to a shell: it must split back into the exact argv
    assert shlex.split(cmds[2][-1]) == jobs[0].argv()
    again = pueue_plan("/bin/pueue", jobs, "vgrout", 1, wd, group_exists=True)
    assert again[0] == ["/bin/pueue", "parallel", "1", "--group", "vgrout"] and len(again) == 3
    with pytest.raises(ValueError, match="parallel"):
        pueue_plan("/bin/pueue", jobs, "vgrout", 0, wd, group_exists=True)


def test_without_pueue_prints_commands_and_install_hint(capsys, tmp_path):
    rc = main(
        ["smoke", "none,route2", "41-42", "--workdir", str(tmp_path), "--steps=3"],
        which=lambda _name: None,
    )
    assert rc == 0
    out, err = capsys.readouterr()
    cmds = [ln for ln in out.splitlines() if not ln.startswith("#")]
    assert cmds == [
        f"cd {tmp_path} && uv run python -m vgrout.train smoke --intervention={a} --seed={s} "
        "--steps=3"
        for a in ("none", "route2")
        for s in (41, 42)
    ]
    assert "nothing was queued" in err and "cargo install --locked pueue" in err
    assert "pueued -d" in err


def test_script_without_pueue_on_path(tmp_path):
    """The real script in a subprocess whose PATH holds no pueue (an empty folder)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    env = dict(os.environ, PATH=str(bindir))
    assert shutil.which("pueue", path=env["PATH"]) is None
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "sweep.py"),
            "smoke",
            "route",
            "7",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == (
        f"cd {tmp_path} && uv run python -m vgrout.train smoke --intervention=route --seed=7"
    )
    assert "pueue is not on PATH" in proc.stderr


def _fake_pueue(tmp_path: Path, groups_json: str, fail_group: bool = False) -> tuple[str, Path]:
    """A stand-in `pueue` binary that records its argv (one NUL-separated line per call)."""
    log = tmp_path / "pueue_calls.log"
    script = tmp_path / "pueue"
    script.write_text(
        "#!/bin/bash\n"
        f'printf "%s\\0" "$@" >> {shlex.quote(str(log))}; echo >> {shlex.quote(str(log))}\n'
        'if [[ "$1" == group && "$2" == --json ]]; then\n'
        + (
            "  echo 'Error: Failed to connect to the daemon' >&2; exit 1\n"
            if fail_group
            else f"  echo {shlex.quote(groups_json)}\n"
        )
        + "fi\n"
        'if [[ "$1" == add ]]; then echo "New task added (id 0)."; fi\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script), log


def _calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [ln.split("\0")[:-1] for ln in log.read_text().splitlines() if ln]


def test_main_runs_the_planned_pueue_commands(tmp_path, capsys):
    pueue, log = _fake_pueue(tmp_path, '{"default": {"status": "Running", "parallel_tasks": 1}}')
    rc = main(
        ["fast", "route2", "41,42", "--parallel", "2", "--workdir", str(tmp_path)],
        which=lambda _name: pueue,
    )
    assert rc == 0, capsys.readouterr()
    jobs = plan_jobs("fast", ["route2"], [41, 42])
    assert _calls(log) == [["group", "--json"]] + [
        c[1:] for c in pueue_plan("", jobs, "vgrout", 2, tmp_path, group_exists=False)
    ]
    assert "queued 2 runs in pueue group 'vgrout'" in capsys.readouterr().out

    # group already there -> not added again
    log.unlink()
    pueue2, log2 = _fake_pueue(tmp_path, '{"default": {}, "vgrout": {}}')
    assert main(["fast", "none", "1", "--workdir", str(tmp_path)], which=lambda _n: pueue2) == 0
    assert [c[:2] for c in _calls(log2)] == [
        ["group", "--json"],
        ["parallel", "1"],
        ["add", "--group"],
    ]


def test_dry_run_and_daemon_down_run_nothing(tmp_path, capsys):
    pueue, log = _fake_pueue(tmp_path, "{}")
    assert (
        main(
            ["smoke", "none", "1", "--dry-run", "--workdir", str(tmp_path)], which=lambda _n: pueue
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"{pueue} add --group vgrout --label smoke_vanilla_seed1" in out
    assert _calls(log) == []
    (tmp_path / "down").mkdir()
    down, log_down = _fake_pueue(tmp_path / "down", "{}", fail_group=True)
    assert main(["smoke", "none", "1", "--workdir", str(tmp_path)], which=lambda _n: down) == 1
    err = capsys.readouterr().err
    assert "pueued -d" in err and "Failed to connect" in err
    assert _calls(log_down) == [["group", "--json"]]


def test_slurm_script_maps_each_index_to_its_command(tmp_path, capsys):
    out = tmp_path / "sweep.sbatch"
    extra = ["--out-tag=_it's a test", "--steps=5"]
    rc = main(
        [
            "full",
            "none,route2",
            "41-43",
            "--slurm",
            str(out),
            "--parallel",
            "2",
            "--slurm-time=02:00:00",
            "--slurm-partition=gpu",
            "--workdir",
            str(tmp_path),
            *extra,
        ],
        which=lambda _n: None,
    )
    assert rc == 0
    assert f"sbatch {out}" in capsys.readouterr().out
    text = out.read_text()
    header = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert header == [
        "#SBATCH --job-name=vgrout-full",
        "#SBATCH --array=0-5%2",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64G",
        "#SBATCH --time=02:00:00",
        f"#SBATCH --chdir={tmp_path}",
        "#SBATCH --output=logs/slurm/%x_%A_%a.out",
        "#SBATCH --partition=gpu",
    ]
    assert os.access(out, os.X_OK) and (tmp_path / "logs" / "slurm").is_dir()
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0
    jobs = plan_jobs("full", ["none", "route2"], [41, 42, 43], extra)
    for i, job in enumerate(jobs):
        env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(i), VGROUT_SLURM_DRY="1")
        proc = subprocess.run(
            ["bash", str(out)], capture_output=True, text=True, env=env, timeout=30
        )
        assert proc.returncode == 0, proc.stderr
        assert shlex.split(proc.stdout) == job.argv()
    assert slurm_script(jobs[:1], workdir=tmp_path).count("--array=0-0\n") == 1


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(["smoke", "nonsense", "1"], which=lambda _n: None)
    assert e.value.code == 2
    assert "unknown arm 'nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["smoke", "none", "1", "--parallel", "0"], which=lambda _n: None)
    assert "--parallel must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["smoke", "none", "1", "--local", "--kept", "/nonexistent/records"], which=lambda _n: None)
    assert "--kept folder(s) not found: /nonexistent/records" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["smoke", "none", "1", "--kept", str(REPO)], which=lambda _n: None)
    assert "--kept applies to --local sweeps only" in capsys.readouterr().err


def test_slurm_cpu_runs_request_no_gpu_and_log_where_asked(tmp_path, capsys):
    out, logs = tmp_path / "cpu.sbatch", tmp_path / "task_logs"
    rc = main(["smoke", "none", "1,2", "--slurm", str(out), "--slurm-gpus=0", "--slurm-cpus=1",
               f"--slurm-log-dir={logs}", "--workdir", str(tmp_path)], which=lambda _n: None)
    assert rc == 0
    header = [ln for ln in out.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert not any("--gres" in ln for ln in header)
    assert "#SBATCH --cpus-per-task=1" in header and f"#SBATCH --output={logs}/%x_%A_%a.out" in header
    assert logs.is_dir()
    two = slurm_script(plan_jobs("fast", ["none"], [1]), workdir=tmp_path, gpus=2)
    assert "#SBATCH --gres=gpu:2" in two.splitlines()
    with pytest.raises(SystemExit):
        main(["smoke", "none", "1", "--slurm", str(out), "--slurm-gpus=-1"], which=lambda _n: None)
    assert "--slurm-gpus must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_local_sweep_skips_finished_resumes_interrupted_starts_new(tmp_path):
    """Real tiny runs: a paused run is resumed, a complete one skipped, another config started afresh."""
    from _golden import build_inputs
    from vgrout.config import parse_cli
    from vgrout.sweep import Job, local_plan, run_local
    from vgrout.train import main

    pool, pairs = build_inputs(tmp_path / "inputs")
    out = tmp_path / "out"
    common = (f"--teacher-pool-dir={pool}", f"--vhack-pairs-path={pairs}", f"--out-root={out}", "--steps=2",
              "--max-new=8", "--eval-n-prompts=1", "--eval-ablate-every=0", "--v-hack-extract-top-k=2",
              "--v-hack-k=1", "--v-hack-n-heldout=1")
    jobs = [Job("smoke", "none", 41, common), Job("smoke", "none", 42, common), Job("smoke", "none", 43, common)]
    assert main(parse_cli(["smoke", "--intervention=none", "--seed=41", *common])) == 0
    assert main(parse_cli(["smoke", "--intervention=none", "--seed=42", *common, "--stop-after-steps=1"])) == 0
    plan = local_plan(jobs, out / "runs")
    assert [a for _, a, _ in plan] == ["skip", "resume", "start"]
    paused = plan[1][2]
    # a run of another config (here: another lr) is never taken for this job's
    other = Job("smoke", "none", 41, (*common, "--lr=1e-3"))
    assert local_plan([other], out / "runs")[0][1] == "start"
    assert run_local(jobs[1:2], out / "runs", REPO) == 0
    import json

    assert json.loads((paused / "status.json").read_text())["state"] == "complete"
    assert [a for _, a, _ in local_plan(jobs[:2], out / "runs")] == ["skip", "skip"]
    # kept records (each run's config.json + status.json, as scripts/keep_runs.py copies them) count as
    # finished on a fresh checkout when this machine's build has their weights; another build's never do
    kept = tmp_path / "kept"
    for d in sorted((out / "runs").iterdir()):
        (kept / d.name).mkdir(parents=True)
        for f in ("config.json", "status.json"):
            shutil.copy(d / f, kept / d.name / f)
    fresh = tmp_path / "fresh" / "runs"
    plan = local_plan(jobs, fresh, [kept])
    assert [a for _, a, _ in plan] == ["kept", "kept", "start"] and plan[1][2] == kept / paused.name
    assert [a for _, a, _ in local_plan(jobs, fresh, [kept], digest=lambda m: "0" * 16)] == ["start"] * 3
    elsewhere = tuple(a for a in common if not a.startswith("--out-root=")) + (f"--out-root={fresh.parent}",)
    moved = [Job("smoke", "none", s, elsewhere) for s in (41, 42, 43)]  # another out root: the same runs
    assert [a for _, a, _ in local_plan(moved, fresh, [kept])] == ["kept", "kept", "start"]
    relr = [Job("smoke", "none", s, (*elsewhere, "--lr=1e-3")) for s in (41, 42)]  # another config: never
    assert [a for _, a, _ in local_plan(relr, fresh, [kept])] == ["start", "start"]
    assert [a for _, a, _ in local_plan(jobs, out / "runs", [kept])] == ["skip", "skip", "start"]
    calls = []
    local_plan(jobs, fresh, [kept, kept], digest=lambda m: calls.append(m))
    assert calls == ["tiny-qwen3"]  # the weights are hashed once per model, not once per job


def test_parallel_local_runs_share_the_cores():
    """--local --parallel N: each run gets cores // N torch threads (at least 1) through OMP_NUM_THREADS,
    unless the caller set it; one run at a time leaves the environment alone."""
    from vgrout.sweep import lane_threads, run_env

    assert [lane_threads(n, 2) for n in (1, 2, 3)] == [2, 1, 1]
    assert [lane_threads(n, 16) for n in (1, 2, 3, 5)] == [16, 8, 5, 3]
    with pytest.raises(ValueError, match="parallel must be >= 1"):
        lane_threads(0, 2)
    base = {"PATH": "/bin"}
    assert run_env(1, base, 2) == base
    assert run_env(2, base, 16) == {"PATH": "/bin", "OMP_NUM_THREADS": "8"}
    assert run_env(2, {**base, "OMP_NUM_THREADS": "3"}, 16)["OMP_NUM_THREADS"] == "3"
    assert base == {"PATH": "/bin"}  # the caller's mapping is not modified


@pytest.mark.slow
def test_local_sweep_runs_two_at_a_time_each_on_its_share(tmp_path, monkeypatch, capsys):
    """Two real tiny runs started together by --local --parallel=2: both complete, each recorded the
    thread count its lane was given, and a second invocation skips both."""
    import json

    from _golden import build_inputs
    from vgrout.sweep import main

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("vgrout.sweep._cpus", lambda: 4)
    pool, pairs = build_inputs(tmp_path / "inputs")
    out = tmp_path / "out"
    common = [f"--teacher-pool-dir={pool}", f"--vhack-pairs-path={pairs}", f"--out-root={out}", "--steps=1",
              "--max-new=8", "--eval-n-prompts=1", "--eval-ablate-every=0", "--v-hack-extract-top-k=2",
              "--v-hack-k=1", "--v-hack-n-heldout=1"]
    assert main(["smoke", "none", "41,42", "--local", "--parallel=2", f"--workdir={REPO}", *common]) == 0
    said = capsys.readouterr().out
    assert "2 to start; 2 at a time, OMP_NUM_THREADS=2" in said
    runs = sorted((out / "runs").iterdir())
    assert [json.loads((d / "status.json").read_text())["state"] for d in runs] == ["complete", "complete"]
    assert [json.loads((d / "config.json").read_text())["provenance"]["torch_threads"] for d in runs] == [2, 2]
    assert main(["smoke", "none", "41,42", "--local", "--parallel=2", f"--workdir={REPO}", *common]) == 0
    assert "2 already finished, 0 to resume, 0 to start" in capsys.readouterr().out
