"""Results aggregation on synthetic run folders written in the training loop's schema."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vgrout import results as res
from vgrout.results import (
    CSV_BASE_COLUMNS,
    DEPLOY_SCHEMA,
    aggregate,
    betainc_reg,
    csv_text,
    main,
    markdown_table,
    mean_ci,
    scan_runs,
    skipped_table,
    t_cdf,
    t_quantile,
    welch_diff_ci,
    write_csv,
)

REPO = Path(__file__).resolve().parents[1]
INTERVENTION = {"vanilla": "none", "projected": "erase", "routing": "route", "routing2": "route2",
                "absorb": "absorb", "routeA": "routeA"}


# ── helpers that write run folders the way `python -m vgrout.train` does ─────────────────


def write_run(
    root: Path,
    *,
    preset: str = "smoke",
    arm: str = "vanilla",
    seed: int = 41,
    hack_deploy: float = 0.5,
    solve_deploy: float = 0.3,
    hack_train: float | None = None,
    solve_train: float | None = None,
    by_mode: dict[str, tuple[float, float]] | None = None,
    random_v_seed: int | None = None,
    state: str = "complete",
    error: str | None = None,
    deploy: bool = True,
    stamp: str = "20260101T000000",
    steps: int = 10,
    eval_every: int = 5,
    eval_set: str = "train",
    slope: float = 0.05,
    knobs: dict | None = None,
    by_problem: dict[str, tuple[int, int, int]] | None = None,
) -> Path:
    """One run folder: config.json, status.json, rows.jsonl, and (if `deploy`) the final
    per_mode_deploy.json. `by_mode` maps mode -> (deploy_hack, deploy_solve); `knobs` adds or
    overrides config.json knobs; `by_problem` maps problem id -> (n, hack, solve) counts (train =
    deploy) and then sets the headline rates and eval_n (without it the record predates
    per-problem counts)."""
    ctrl = f"_haar{random_v_seed}" if random_v_seed is not None else ""
    run_id = f"{preset}_{arm}_seed{seed}{ctrl}"
    d = root / f"{stamp}_{run_id}"
    d.mkdir(parents=True)
    knobs = {
        "preset": preset,
        "intervention": INTERVENTION[arm],
        "seed": seed,
        "steps": steps,
        "model": "tiny-qwen3",
        "out_tag": "",
        "random_v_seed": random_v_seed,
        **(knobs or {}),
    }
    (d / "config.json").write_text(
        json.dumps(
            {
                "config": knobs,
                "provenance": {"command": "python -m vgrout.train", "git_commit": "x"},
                "run_id": run_id,
                "preset": preset,
                "arm": arm,
                "seed": seed,
                "started": stamp,
            }
        )
    )
    done = steps if state == "complete" else steps // 2
    (d / "status.json").write_text(
        json.dumps(
            {
                "state": state,
                "step": done - 1,
                "steps": steps,
                "updated": "2026-01-01T00:00:00",
                "error": error,
            }
        )
    )
    rows = []
    for s in range(done):
        n = 8
        hk = min(n, round(n * slope * s + seed % 3))  # seeds differ a little
        is_eval = eval_every and (s + 1) % eval_every == 0
        rows.append(
            {
                "step": s,
                "rew": 1.0,
                "rew_s": 1.0,
                "gt_s": [max(0, n - hk - 1), n],
                "gt_t": [1, 1],
                "hack_s": [hk, n],
                "hack_t": [1, 1],
                "hk_rt": hk,
                "loss": 0.1,
                "gn": 1.0,
                "tau": 0.1 + 0.01 * s + 0.005 * (seed % 3) if arm == "routing2" else None,
                "flag": (0.25 if random_v_seed is None else 0.1) if arm == "routing2" else None,
                "prec": (0.5 + 0.04 * s) / (1 + (random_v_seed or 0))
                if arm == "routing2"
                else None,
                "hack_deploy": (hack_deploy * (s + 1) / steps) if is_eval else None,
                "solve_deploy": solve_deploy if is_eval else None,
                "N": n,
                "sec": 1.0,
            }
        )
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if deploy:
        by_mode = by_mode or {"run_tests": (hack_deploy, solve_deploy)}
        bm = {
            m: {
                "in_dist": m == "run_tests",
                # knob-on rates differ from the deployed ones, so a mix-up shows
                "train_hack": h / 2 + 0.4,
                "train_solve": s / 2 + 0.4,
                "deploy_hack": h,
                "deploy_solve": s,
                "n": 8,
            }
            for m, (h, s) in by_mode.items()
        }
        eval_n, the_set = 16, {"source": "builtin", "n": 16, "by_mode": bm}
        if by_problem is not None:
            eval_n = sum(n for n, _, _ in by_problem.values())
            hack_deploy = sum(h for _, h, _ in by_problem.values()) / eval_n
            solve_deploy = sum(s for _, _, s in by_problem.values()) / eval_n
            hack_train = solve_train = None
            the_set = dict(the_set, n=eval_n, by_problem={
                pid: {"mode": "run_tests", "n": n, "train_hack": h, "train_solve": s, "deploy_hack": h,
                      "deploy_solve": s} for pid, (n, h, s) in by_problem.items()})
        rec = {
            "schema": DEPLOY_SCHEMA,
            "run_id": run_id,
            "preset": preset,
            "arm": arm,
            "intervention": INTERVENTION[arm],
            "seed": seed,
            "random_v_seed": random_v_seed,
            "model": "tiny-qwen3",
            "out_tag": "",
            "steps": steps,
            "steps_done": steps,
            "hack_train": hack_deploy if hack_train is None else hack_train,
            "solve_train": solve_deploy if solve_train is None else solve_train,
            "hack_deploy": hack_deploy,
            "solve_deploy": solve_deploy,
            "eval_n": eval_n,
            "eval_set": eval_set,
            "by_mode": bm,
            "sets": {eval_set: the_set},
            "delta_s_hack_norm": 0.0,
        }
        (d / "per_mode_deploy.json").write_text(json.dumps(rec))
    return d


def write_fleet(root: Path) -> dict[str, Path]:
    """3 vanilla seeds, 2 routing2 seeds, 1 routing2 Haar control, 1 projected seed, plus
    one folder for every way a run can fail to count."""
    p = {}
    for seed, h, s in ((41, 0.50, 0.30), (42, 0.60, 0.30), (43, 0.70, 0.36)):
        p[f"v{seed}"] = write_run(
            root,
            arm="vanilla",
            seed=seed,
            hack_deploy=h,
            solve_deploy=s,
            slope=0.08,
            by_mode={"run_tests": (h, s), "sentinel": (h / 2, s)},
        )
    for seed, h, s, ht in ((41, 0.10, 0.32, 0.55), (42, 0.20, 0.30, 0.65)):
        p[f"r{seed}"] = write_run(
            root,
            arm="routing2",
            seed=seed,
            hack_deploy=h,
            solve_deploy=s,
            hack_train=ht,
            slope=0.04,
            by_mode={"run_tests": (h, s), "sentinel": (0.0, s)},
        )
    p["haar"] = write_run(
        root, arm="routing2", seed=41, random_v_seed=7, hack_deploy=0.55, solve_deploy=0.31
    )
    p["proj"] = write_run(
        root, arm="projected", seed=41, hack_deploy=0.40, solve_deploy=0.10, slope=0.02
    )
    p["running"] = write_run(root, arm="routing", seed=41, state="running", deploy=False)
    p["failed"] = write_run(
        root, arm="routing", seed=42, state="failed", error="CUDA out of memory", deploy=False
    )
    p["broken"] = write_run(root, arm="routing", seed=43)
    (p["broken"] / "per_mode_deploy.json").write_text('{"schema": "vgrout.per_mode_dep')
    p["nodeploy"] = write_run(root, arm="routing", seed=44, deploy=False)
    p["badrate"] = write_run(
        root,
        arm="routing",
        seed=45,
        hack_deploy=1.5,
        hack_train=0.5,
        by_mode={"run_tests": (0.5, 0.3)},
    )
    p["nostatus"] = write_run(root, arm="routing", seed=46)
    (p["nostatus"] / "status.json").unlink()
    return p


def md_rows(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header starts with `first_header`, as dicts."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} "))
    header = [c.strip() for c in lines[start].split("|")[1:-1]]
    out = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        out.append(dict(zip(header, (c.strip() for c in ln.split("|")[1:-1]), strict=True)))
    return out


# ── Student t ─────────────────────────────────────────────────────────────────────────────


def test_t_quantile_matches_closed_forms_and_tables():
    for p in (0.6, 0.9, 0.975, 0.995):
        # df = 1 is the Cauchy distribution; df = 2 has an algebraic inverse
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    # printed t tables (two-sided 95%)
    for df, t in ((4, 2.776445105), (9, 2.262157163), (29, 2.045229642)):
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-8)
    assert t_quantile(0.975, 10**6) == pytest.approx(1.959966, abs=1e-5)  # -> normal
    for df in (1, 3, 7.5, 40):
        for t in (-3.0, -0.4, 0.0, 1.1, 5.0):
            assert t_cdf(t, df) + t_cdf(-t, df) == pytest.approx(1.0, abs=1e-13)
        assert t_cdf(t_quantile(0.83, df), df) == pytest.approx(0.83, abs=1e-11)


def test_mean_ci_is_the_hand_computed_t_interval():
    ci = mean_ci([0.2, 0.4, 0.6])
    # mean 0.4, sample sd 0.2, t_{0.975, 2} = 4.302652729749752
    half = 4.302652729749752 * 0.2 / math.sqrt(3)
    assert ci.n == 3 and ci.mean == pytest.approx(0.4, abs=1e-15)
    assert ci.lo == pytest.approx(0.4 - half, abs=1e-12)
    assert ci.hi == pytest.approx(0.4 + half, abs=1e-12)
    one = mean_ci([0.25])
    assert (one.mean, one.lo, one.hi, one.half_width) == (0.25, None, None, None)
    same = mean_ci([0.3, 0.3])
    assert same.lo == pytest.approx(0.3) and same.hi == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no values"):
        mean_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([0.1, float("nan")])


def test_welch_difference_interval():
    # equal n and variances: Welch df = 2n - 2 = 2, se = sqrt(0.02/2 + 0.02/2)
    lo, hi = welch_diff_ci([0.0, 0.2], [1.0, 1.2])
    half = 4.302652729749752 * math.sqrt(0.02)
    assert lo == pytest.approx(-1.0 - half, abs=1e-12) and hi == pytest.approx(-1.0 + half)
    # unequal case: the half-width is the t quantile at the Welch df times the standard error
    a, b = [0.1, 0.2], [0.5, 0.6, 0.7]
    va, vb = 0.005 / 2, 0.01 / 3
    df = (va + vb) ** 2 / (va**2 / 1 + vb**2 / 2)
    lo, hi = welch_diff_ci(a, b)
    assert (lo + hi) / 2 == pytest.approx(0.15 - 0.6)
    assert t_cdf((hi - lo) / 2 / math.sqrt(va + vb), df) == pytest.approx(0.975, abs=1e-10)
    assert welch_diff_ci([0.1], [0.2, 0.3]) is None
    assert welch_diff_ci([0.3, 0.3], [0.1, 0.1]) == pytest.approx((0.2, 0.2))


# ── aggregation ───────────────────────────────────────────────────────────────────────────


def test_scan_lists_every_run_that_cannot_count_with_its_reason(tmp_path):
    p = write_fleet(tmp_path)
    runs, skipped = scan_runs(tmp_path)
    assert sorted(r.path.name for r in runs) == sorted(
        p[k].name for k in ("v41", "v42", "v43", "r41", "r42", "haar", "proj")
    )
    why = {s.path: s.reason for s in skipped}
    assert set(why) == {
        p[k] for k in ("running", "failed", "broken", "nodeploy", "badrate", "nostatus")
    }
    assert why[p["running"]] == "status 'running', 5/10 steps done"
    assert why[p["failed"]] == "status 'failed', 5/10 steps done: CUDA out of memory"
    assert why[p["broken"]].startswith("per_mode_deploy.json is not valid JSON")
    assert "no per_mode_deploy.json" in why[p["nodeploy"]]
    assert "'hack_deploy' = 1.5 is not a rate" in why[p["badrate"]]
    assert "no status.json" in why[p["nostatus"]]


def test_aggregate_means_cis_and_delta_vs_vanilla(tmp_path):
    write_fleet(tmp_path)
    runs, _ = scan_runs(tmp_path)
    groups = {(g.arm, g.control): g for g in aggregate(runs, solve_margin=0.05)}
    assert list(groups) == [
        ("vanilla", ""),
        ("projected", ""),
        ("routing2", ""),
        ("routing2", "haar"),
    ]
    v = groups[("vanilla", "")]
    assert v.seeds == [41, 42, 43]
    t2 = 4.302652729749752
    assert v.hack_deploy.mean == pytest.approx(0.6)
    assert v.hack_deploy.half_width == pytest.approx(t2 * 0.1 / math.sqrt(3), abs=1e-12)
    sd_solve = math.sqrt(((0.3 - 0.32) ** 2 * 2 + (0.36 - 0.32) ** 2) / 2)
    assert v.solve_deploy.mean == pytest.approx(0.32)
    assert v.solve_deploy.half_width == pytest.approx(t2 * sd_solve / math.sqrt(3), abs=1e-12)
    assert v.mode_deploy_hack["sentinel"].mean == pytest.approx(0.3)
    assert v.d_hack is None and v.solve_verdict is None and v.baseline is None

    r = groups[("routing2", "")]
    t1 = 12.706204736174696  # t_{0.975, 1}
    assert r.hack_deploy.mean == pytest.approx(0.15)
    sd = 0.1 / math.sqrt(2)  # sample sd of {0.1, 0.2}
    assert r.hack_deploy.half_width == pytest.approx(t1 * sd / math.sqrt(2), abs=1e-12)
    assert r.hack_train.mean == pytest.approx(0.6)
    assert r.mode_deploy_hack["sentinel"].mean == 0.0
    assert r.d_hack == pytest.approx(0.15 - 0.6)
    assert r.d_hack_ci == welch_diff_ci([0.1, 0.2], [0.5, 0.6, 0.7])
    assert r.d_solve == pytest.approx(0.31 - 0.32)
    assert r.baseline is v and r.d_solve_ci == welch_diff_ci([0.32, 0.30], [0.30, 0.30, 0.36])
    # the Welch interval of Δsolve, about [-0.084, +0.064], straddles 0 and leaves ±0.05
    assert r.solve_verdict == "inconclusive" and r.verdict_basis == "seeds"

    haar = groups[("routing2", "haar")]
    assert r.control_group is haar and r.d_ctrl == pytest.approx(0.15 - 0.55)
    assert r.d_ctrl_ci is None and not r.d_ctrl_paired  # seeds {41, 42} vs {41}: Welch needs 2 a side
    assert haar.control_group is None and v.control_group is None and (v.ctrl_why, haar.ctrl_why) == ("", "")
    assert haar.random_v_seeds == [7] and haar.hack_deploy.lo is None  # n = 1: no CI
    assert haar.d_hack == pytest.approx(-0.05) and haar.d_hack_ci is None

    proj = groups[("projected", "")]
    assert proj.d_solve == pytest.approx(-0.22)
    # one seed and no per-problem counts: no interval of Δsolve, so no verdict
    assert proj.solve_verdict is None and proj.d_solve_ci is None and proj.d_solve_cl is None
    assert proj.note == "1 of 1 runs predate per-problem counts: no cluster interval"
    assert proj.control_group is None and proj.ctrl_why == "no Haar control"


def test_runs_of_different_step_counts_are_different_experiments(tmp_path):
    write_run(tmp_path, seed=41, steps=10)
    write_run(tmp_path, seed=42, steps=20)
    g10, g20 = aggregate(scan_runs(tmp_path)[0])
    assert (g10.seeds, g10.steps, g10.config_label) == ([41], [10], "steps=10")
    assert (g20.seeds, g20.steps, g20.config_label) == ([42], [20], "steps=20")
    assert g10.config_hash != g20.config_hash


def test_same_seed_twice_counts_once_newest_wins(tmp_path):
    old = write_run(tmp_path, seed=41, hack_deploy=0.9, stamp="20260101T000000")
    new = write_run(tmp_path, seed=41, hack_deploy=0.1, stamp="20260102T000000")
    runs, skipped = scan_runs(tmp_path)
    assert [r.path for r in runs] == [new]
    h = runs[0].short_hash
    assert [(s.path, s.reason) for s in skipped] == [(old, f"superseded by {new.name} (same config {h} and seed)")]


def test_eval_sets_and_presets_are_never_mixed(tmp_path):
    write_run(tmp_path, seed=41, hack_deploy=0.2, eval_set="heldout")
    write_run(tmp_path, seed=42, hack_deploy=0.8, eval_set="train")
    write_run(tmp_path, preset="fast", seed=41, hack_deploy=0.5)
    groups = aggregate(scan_runs(tmp_path)[0])
    got = {(g.preset, g.eval_set): (g.seeds, g.hack_deploy.mean) for g in groups}
    assert got == {
        ("fast", "train"): ([41], 0.5),
        ("smoke", "heldout"): ([41], 0.2),
        ("smoke", "train"): ([42], 0.8),
    }


def test_deploy_record_validation_names_the_field(tmp_path):
    d = write_run(tmp_path, seed=41)
    rec = json.loads((d / "per_mode_deploy.json").read_text())
    cases = {
        "schema": ("vgrout.per_mode_deploy/0", "field 'schema'"),
        "steps_done": (7, "steps_done=7 differs from steps=10"),
        "eval_set": ("dev", "'eval_set' must be 'train' or 'heldout'"),
        "by_mode": ({}, "'by_mode' must be a non-empty object"),
        "solve_train": (None, "'solve_train' must be a finite number"),
    }
    for field, (value, msg) in cases.items():
        bad = dict(rec, **{field: value})
        (d / "per_mode_deploy.json").write_text(json.dumps(bad))
        runs, skipped = scan_runs(tmp_path)
        assert not runs and msg in skipped[0].reason, (field, skipped)


# ── CLI ───────────────────────────────────────────────────────────────────────────────────


def test_main_prints_markdown_lists_failures_and_writes_csv(tmp_path, capsys):
    runs_dir, out = tmp_path / "runs", tmp_path / "results"
    p = write_fleet(runs_dir)
    assert main(["--runs", str(runs_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    row = {r["arm"]: r for r in md_rows(text, "preset")}
    vh = row["vanilla"]["config"]  # the short hash alone: no other vanilla config to tell apart
    assert len(vh) == 8 and row["vanilla"]["n"] == "3"
    assert row["vanilla"]["deploy hack"] == "0.600 [0.352, 0.848]"
    assert row["routing2 (haar)"]["deploy hack"] == "0.550 (CI n/a)"
    assert row["routing2"]["Δ hack vs vanilla"] == f"-0.450 [-0.699, -0.201] vs {vh}"
    assert row["routing2"]["Δ solve"] == "-0.010 [-0.084, +0.064]"
    assert row["routing2"]["solve verdict"] == "inconclusive (seeds)"
    assert row["projected"]["Δ hack vs vanilla"] == f"-0.200 vs {vh}"
    assert row["projected"]["solve verdict"] == "no interval"
    assert "matched = inside ±0.05 (equivalence), solve differs = excludes 0, else inconclusive" in text
    assert "## Not averaged (6 run folders)" in text
    for k in ("running", "failed", "broken", "nodeploy", "badrate", "nostatus"):
        assert p[k].name in text
    csvs = sorted(out.glob("results_*.csv"))
    assert [c.name for c in csvs][-1] == "results_latest.csv" and len(csvs) == 2
    assert csvs[0].read_text() == csvs[1].read_text()
    assert not list(out.glob(".tmp*"))
    rows = {(r["arm"], r["control"]): r for r in csv.DictReader(csvs[1].open())}
    v = rows[("vanilla", "")]
    assert float(v["hack_deploy_mean"]) == pytest.approx(0.6)
    assert float(v["hack_deploy_ci_lo"]) == pytest.approx(
        0.6 - 4.302652729749752 * 0.1 / math.sqrt(3), abs=1e-12
    )
    assert v["n_seeds"] == "3" and v["seeds"] == "41 42 43" and v["d_hack_vs_vanilla"] == ""
    assert rows[("routing2", "haar")]["hack_deploy_ci_lo"] == ""
    assert rows[("routing2", "")]["solve_verdict"] == "inconclusive"
    assert rows[("routing2", "")]["solve_verdict_basis"] == "seeds"
    assert rows[("routing2", "")]["baseline_hash"] == v["config_hash"] == vh
    lo, hi = welch_diff_ci([0.1, 0.2], [0.5, 0.6, 0.7])
    assert float(rows[("routing2", "")]["d_hack_ci_lo"]) == pytest.approx(lo, abs=1e-12)
    assert float(rows[("routing2", "")]["d_hack_ci_hi"]) == pytest.approx(hi, abs=1e-12)
    assert float(rows[("routing2", "")]["deploy_hack_sentinel"]) == 0.0


def test_main_fails_loudly_without_runs(tmp_path, capsys):
    assert main(["--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    write_run(tmp_path / "runs", state="failed", error="boom", deploy=False)
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o")]) == 1
    cap = capsys.readouterr()
    assert "status 'failed', 5/10 steps done: boom" in cap.out
    assert "no complete runs" in cap.err
    assert not (tmp_path / "o").exists()


def test_script_wrapper_runs(tmp_path):
    write_run(tmp_path / "runs", seed=41)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "results.py"),
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "0.500 (CI n/a)" in proc.stdout
    assert (tmp_path / "o" / "results_latest.csv").is_file()


def test_haar_vanilla_is_never_the_baseline(tmp_path):
    """A random-direction vanilla control sorts after the real vanilla; it must not replace it
    as the baseline, and alone it is no baseline at all."""
    write_run(tmp_path, arm="vanilla", seed=41, hack_deploy=0.6, solve_deploy=0.3)
    write_run(tmp_path, arm="vanilla", seed=41, random_v_seed=3, hack_deploy=0.9, solve_deploy=0.5)
    write_run(tmp_path, arm="routing2", seed=41, hack_deploy=0.2, solve_deploy=0.32)
    write_run(tmp_path, preset="fast", arm="vanilla", seed=41, random_v_seed=3, hack_deploy=0.9)
    write_run(tmp_path, preset="fast", arm="routing2", seed=41, hack_deploy=0.1)
    groups = {(g.preset, g.arm, g.control): g for g in aggregate(scan_runs(tmp_path)[0])}
    van = groups[("smoke", "vanilla", "")]
    r2 = groups[("smoke", "routing2", "")]
    assert r2.baseline is van and r2.d_hack == pytest.approx(0.2 - 0.6) and r2.d_solve == pytest.approx(0.02)
    vh = groups[("smoke", "vanilla", "haar")]
    assert vh.baseline is van and vh.d_hack == pytest.approx(0.9 - 0.6)  # compared, not the base
    assert van.baseline is None and van.d_hack is None and van.is_baseline and not vh.is_baseline
    for key in (("fast", "routing2", ""), ("fast", "vanilla", "haar")):  # only a haar vanilla: no baseline
        assert groups[key].baseline is None and groups[key].d_hack is None, key
    deltas = [r["Δ hack vs vanilla"] for r in _cells(markdown_table(list(groups.values())))]
    assert deltas.count("(baseline)") == 1 and deltas.count("no vanilla") == 2


def test_per_mode_columns_are_deploy_rates(tmp_path):
    write_run(tmp_path, seed=41, by_mode={"run_tests": (0.2, 0.3), "sentinel": (0.0, 0.5)})
    write_run(tmp_path, seed=42, by_mode={"run_tests": (0.4, 0.3)})
    (g,) = aggregate(scan_runs(tmp_path)[0])
    assert g.mode_deploy_hack["run_tests"].mean == pytest.approx(0.3)  # train rates: 0.5, 0.6
    assert g.mode_deploy_hack["sentinel"].mean == 0.0 and g.mode_deploy_hack["sentinel"].n == 1
    rows = list(csv.DictReader(io.StringIO(csv_text([g]))))
    assert float(rows[0]["deploy_hack_run_tests"]) == pytest.approx(0.3)
    assert float(rows[0]["deploy_hack_sentinel"]) == 0.0


# ── edges of the statistics and of the run-folder schema ──────────────────────────────────


def test_student_t_edges():
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776445105, abs=1e-8)  # p < 1/2 by symmetry
    assert t_quantile(0.9999, 1) == pytest.approx(math.tan(math.pi * 0.4999), rel=1e-9)  # hi doubles
    for p in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="t_quantile"):
            t_quantile(p, 3)
    for df in (0, -1):
        with pytest.raises(ValueError, match="t_cdf"):
            t_cdf(1.0, df)
    assert t_cdf(0.0, 5) == 0.5
    assert (betainc_reg(2.0, 3.0, 0.0), betainc_reg(2.0, 3.0, 1.0)) == (0.0, 1.0)
    # I_x(1, 1) = x, I_x(a, 1) = x^a, I_x(1, b) = 1 - (1 - x)^b, both sides of the switch point
    for x in (0.1, 0.3, 0.7, 0.95):
        assert betainc_reg(1.0, 1.0, x) == pytest.approx(x, abs=1e-13)
        assert betainc_reg(3.0, 1.0, x) == pytest.approx(x**3, abs=1e-13)
        assert betainc_reg(1.0, 4.0, x) == pytest.approx(1 - (1 - x) ** 4, abs=1e-13)
    for x in (-0.1, 1.1):
        with pytest.raises(ValueError, match="betainc_reg"):
            betainc_reg(1.0, 1.0, x)


def test_interval_levels_other_than_95():
    ci = mean_ci([0.2, 0.4, 0.6], level=0.9)
    assert ci.half_width == pytest.approx(t_quantile(0.95, 2) * 0.2 / math.sqrt(3), abs=1e-12)
    lo, hi = welch_diff_ci([0.0, 0.2], [1.0, 1.2], level=0.5)
    assert (hi - lo) / 2 == pytest.approx(t_quantile(0.75, 2) * math.sqrt(0.02), abs=1e-12)
    assert welch_diff_ci([0.1, 0.2], [0.3]) is None


def test_field_validation_edges(tmp_path):
    d = write_run(tmp_path, seed=41)
    rec = json.loads((d / "per_mode_deploy.json").read_text())
    cases = {
        "hack_deploy": [(True, "must be a finite number"), (float("inf"), "finite"), (-0.1, "not a rate")],
        "by_mode": [({"run_tests": 0.5}, "by_mode['run_tests'] must be an object"),
                    ({"run_tests": {"train_hack": 0.1}}, "by_mode['run_tests']: field 'train_solve'"),
                    ([1], "'by_mode' must be a non-empty object")],
    }
    for field, values in cases.items():
        for value, msg in values:
            (d / "per_mode_deploy.json").write_text(json.dumps(dict(rec, **{field: value})))
            runs, skipped = scan_runs(tmp_path)
            assert not runs and msg in skipped[0].reason, (field, value, skipped)
    # fields config.json also names are refused as a mismatch there; the record's own check stands
    # behind it (a config.json without them, or with the same bad value)
    own = {
        "seed": [(True, "'seed' must be an integer"), (4.0, "'seed' must be an integer")],
        "random_v_seed": [("3", "'random_v_seed' must be an integer")],
        "model": [("", "'model' must be a non-empty string"), (3, "'model' must be a non-empty")],
    }
    for field, values in own.items():
        for value, msg in values:
            with pytest.raises(res.RunFolderError, match=re.escape(msg)):
                res.parse_deploy_record(dict(rec, **{field: value}), d)
    for edge in (0, 1):  # integer rates at the ends are rates
        (d / "per_mode_deploy.json").write_text(json.dumps(dict(rec, hack_deploy=edge)))
        (r,), _ = scan_runs(tmp_path)
        assert r.hack_deploy == float(edge)
    (d / "per_mode_deploy.json").write_text("[1, 2]")
    assert "expected a JSON object, got list" in scan_runs(tmp_path)[1][0].reason
    (d / "per_mode_deploy.json").write_bytes(b"\xff\xfe{")
    assert "not valid JSON" in scan_runs(tmp_path)[1][0].reason


def test_status_reasons(tmp_path):
    d = write_run(tmp_path, seed=41, state="running", deploy=False)
    cases = [
        ({"state": "running", "step": -1, "steps": 10}, "status 'running', no step done"),
        ({"state": "running", "step": 0, "steps": 10}, "status 'running', 1/10 steps done"),
        ({"state": "failed", "step": "x", "steps": 10, "error": "boom"}, "status 'failed': boom"),
        ({"state": "queued"}, "status 'queued'"),
        ({"steps": 3}, "status None"),
    ]
    for status, reason in cases:
        (d / "status.json").write_text(json.dumps(status))
        assert [s.reason for s in scan_runs(tmp_path)[1]] == [reason]
    (tmp_path / "stray.txt").write_text("not a run folder")  # files beside the folders are ignored
    assert len(scan_runs(tmp_path)[1]) == 1


def test_group_order_and_mixed_models(tmp_path):
    write_run(tmp_path, arm="routing", seed=41, hack_deploy=0.3, solve_deploy=0.5)
    write_run(tmp_path, arm="vanilla", seed=41, hack_deploy=0.5, solve_deploy=0.25)
    a = write_run(tmp_path, arm="routing2", seed=41, hack_deploy=0.3, solve_deploy=0.25)
    write_run(tmp_path, arm="projected", seed=41, hack_deploy=0.3, solve_deploy=0.375)
    b = write_run(tmp_path, arm="routing2", seed=42, hack_deploy=0.3, solve_deploy=0.25, steps=12)
    for d, model in ((a, "tiny-qwen3"), (b, "other-model")):  # config.json without model and steps
        cfg = json.loads((d / "config.json").read_text())
        cfg["config"] = {k: v for k, v in cfg["config"].items() if k not in ("model", "steps")}
        (d / "config.json").write_text(json.dumps(cfg))
        rec = json.loads((d / "per_mode_deploy.json").read_text())
        (d / "per_mode_deploy.json").write_text(json.dumps(dict(rec, model=model)))
    groups = aggregate(scan_runs(tmp_path)[0])
    assert [g.arm for g in groups] == ["vanilla", "projected", "routing", "routing2"]
    r2 = groups[-1]
    assert r2.models == ["other-model", "tiny-qwen3"] and r2.steps == [10, 12] and r2.seeds == [41, 42]
    assert r2.note == ("2 of 2 runs predate per-problem counts: no cluster interval; "
                       "mixed models ['other-model', 'tiny-qwen3']; mixed step counts [10, 12]; "
                       "no vanilla group with this config (arm-only knobs aside): no delta")
    proj, routing = groups[1], groups[2]
    assert proj.d_solve == 0.125 and routing.d_solve == 0.25 and proj.baseline is groups[0]
    csv_rows = list(csv.DictReader(io.StringIO(csv_text(groups))))
    assert csv_rows[-1]["models"] == "other-model tiny-qwen3" and csv_rows[-1]["note"] == r2.note
    assert csv_rows[-1]["steps"] == "10 12" and csv_rows[0]["steps"] == "10"
    assert csv_rows[0]["solve_verdict"] == "" and csv_rows[0]["baseline_hash"] == ""
    assert csv_rows[1]["d_solve_vs_vanilla"] == "0.125" and csv_rows[1]["baseline_hash"] == groups[0].short_hash
    assert float(csv_rows[1]["d_hack_vs_vanilla"]) == pytest.approx(-0.2)


def test_unknown_arms_and_modes_sort_last(tmp_path):
    write_run(tmp_path, arm="vanilla", seed=41, by_mode={"zz_new": (0.1, 0.2), "run_tests": (0.3, 0.4),
                                                          "gt_only": (0.0, 0.5)})
    INTERVENTION["lora"] = "lora"
    try:
        write_run(tmp_path, arm="lora", seed=41)
        groups = aggregate(scan_runs(tmp_path)[0])
    finally:
        del INTERVENTION["lora"]
    assert [g.arm for g in groups] == ["vanilla", "lora"]
    assert list(groups[0].mode_deploy_hack) == ["run_tests", "gt_only", "zz_new"]
    header = csv_text(groups).splitlines()[0].split(",")
    nb = len(CSV_BASE_COLUMNS)
    assert header[:nb] == CSV_BASE_COLUMNS and nb == 28
    assert header[nb : nb + 3] == ["deploy_hack_run_tests", "deploy_hack_gt_only", "deploy_hack_zz_new"]
    assert header[nb + 3 :] == [
        "baseline_hash", "d_hack_vs_vanilla", "d_hack_ci_lo", "d_hack_ci_hi", "d_hack_cl", "d_hack_cl_lo",
        "d_hack_cl_hi", "d_solve_vs_vanilla", "d_solve_ci_lo", "d_solve_ci_hi", "d_solve_cl", "d_solve_cl_lo",
        "d_solve_cl_hi", "d_cl_paired", "solve_verdict", "solve_verdict_basis", "solve_margin", "control_hash",
        "d_hack_vs_haar", "d_haar_ci_lo", "d_haar_ci_hi", "d_haar_paired", "d_haar_cl", "d_haar_cl_lo",
        "d_haar_cl_hi", "d_haar_cl_paired", "models", "steps", "note"]  # fmt: skip
    table = markdown_table(groups)
    assert "deploy hack zz_new" in table and table.index("deploy hack run_tests") < table.index("zz_new")


def test_write_csv_names_and_solve_margin_flag(tmp_path, capsys):
    write_run(tmp_path / "runs", arm="vanilla", seed=41, solve_deploy=0.30)
    write_run(tmp_path / "runs", arm="routing2", seed=41, solve_deploy=0.20)
    runs = scan_runs(tmp_path / "runs")[0]
    groups = aggregate(runs)
    path = write_csv(groups, tmp_path / "o", stamp="STAMP")
    assert path == tmp_path / "o" / "results_STAMP.csv"
    assert (tmp_path / "o" / "results_latest.csv").read_text() == path.read_text() == csv_text(groups)
    assert not list((tmp_path / "o").glob("runs_*"))  # per-run CSVs only when given the runs
    write_csv(groups, tmp_path / "o", stamp="S2", solve_margin=0.2, runs=runs)
    assert (tmp_path / "o" / "runs_S2.csv").read_text() == (tmp_path / "o" / "runs_latest.csv").read_text() \
        == res.runs_csv_text(runs)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "o" / "results_S2.csv").read_text())))
    assert [r["solve_margin"] for r in rows] == ["", "0.2"]  # only where there is a baseline
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o"), "--solve-margin", "0.2"]) == 0
    assert "matched = inside ±0.2 (equivalence)" in capsys.readouterr().out
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o")]) == 0
    assert "matched = inside ±0.05 (equivalence)" in capsys.readouterr().out
    for bad in ("-0.01", "nan", "inf"):
        with pytest.raises(SystemExit) as e:
            main(["--runs", str(tmp_path / "runs"), "--solve-margin", bad])
        assert e.value.code == 2 and "--solve-margin must be a finite number >= 0" in capsys.readouterr().err
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o"), "--solve-margin", "0"]) == 0


def _cells(table: str) -> list[dict[str, str]]:
    """A github-markdown table as rows of {header: cell}."""
    lines = [ln.strip().strip("|") for ln in table.strip().splitlines()]
    header = [c.strip() for c in lines[0].split("|")]
    return [dict(zip(header, (c.strip() for c in ln.split("|")), strict=True)) for ln in lines[2:]]


def test_markdown_and_skipped_tables_exactly(tmp_path):
    write_run(tmp_path / "runs", arm="vanilla", seed=41, hack_deploy=0.5, solve_deploy=0.25,
              by_mode={"run_tests": (0.5, 0.25), "sentinel": (0.25, 0.25)})
    write_run(tmp_path / "runs", arm="routing2", seed=41, random_v_seed=4, hack_deploy=0.25,
              solve_deploy=0.5, stamp="20250101T000000")  # the haar folder sorts (and is read) first
    write_run(tmp_path / "runs", arm="routing2", seed=41, hack_deploy=0.125, solve_deploy=0.25)
    write_run(tmp_path / "runs", arm="routing", seed=41, state="failed", error="boom", deploy=False)
    runs, skipped = scan_runs(tmp_path / "runs")
    groups = aggregate(runs)
    assert [(g.arm, g.control) for g in groups] == [("vanilla", ""), ("routing2", ""), ("routing2", "haar")]
    hv = groups[0].short_hash
    rows = _cells(markdown_table(groups))
    assert list(rows[0]) == ["preset", "arm", "eval", "config", "n", "deploy hack", "deploy hack, clusters",
                             "deploy solve", "deploy solve, clusters", "train hack", "train solve",
                             "deploy hack run_tests", "deploy hack sentinel", "Δ hack vs vanilla",
                             "Δ hack, clusters", "Δ solve", "Δ solve, clusters", "solve verdict", "Δ hack vs Haar",
                             "Δ hack vs Haar, clusters", "note"]
    old = "1 of 1 runs predate per-problem counts: no cluster interval"
    assert rows[0] == {
        "preset": "smoke", "arm": "vanilla", "eval": "train", "config": hv, "n": "1",
        "deploy hack": "0.500 (CI n/a)", "deploy hack, clusters": "", "deploy solve": "0.250 (CI n/a)",
        "deploy solve, clusters": "", "train hack": "0.500", "train solve": "0.250",
        "deploy hack run_tests": "0.500", "deploy hack sentinel": "0.250", "Δ hack vs vanilla": "(baseline)",
        "Δ hack, clusters": "", "Δ solve": "", "Δ solve, clusters": "", "solve verdict": "", "Δ hack vs Haar": "",
        "Δ hack vs Haar, clusters": "", "note": old}
    assert rows[1] == {
        "preset": "smoke", "arm": "routing2", "eval": "train", "config": groups[1].short_hash, "n": "1",
        "deploy hack": "0.125 (CI n/a)", "deploy hack, clusters": "", "deploy solve": "0.250 (CI n/a)",
        "deploy solve, clusters": "", "train hack": "0.125", "train solve": "0.250",
        "deploy hack run_tests": "0.125", "deploy hack sentinel": "",  # no such mode
        "Δ hack vs vanilla": f"-0.375 vs {hv}", "Δ hack, clusters": "", "Δ solve": "+0.000",
        "Δ solve, clusters": "", "solve verdict": "no interval",
        "Δ hack vs Haar": f"-0.125 vs {groups[2].short_hash}",  # one seed each: no interval
        "Δ hack vs Haar, clusters": "", "note": old}
    assert rows[2]["arm"] == "routing2 (haar)" and rows[2]["config"] == groups[2].short_hash
    assert rows[2]["Δ hack vs Haar"] == ""  # a control has no control
    assert (rows[2]["Δ hack vs vanilla"], rows[2]["Δ solve"]) == (f"-0.250 vs {hv}", "+0.250")
    lone = aggregate([r for r in runs if r.arm != "vanilla"])
    assert {r["Δ hack vs vanilla"] for r in _cells(markdown_table(lone))} == {"no vanilla"}
    assert _cells(skipped_table(skipped)) == [
        {"run folder": skipped[0].path.name, "why not averaged": "status 'failed', 5/10 steps done: boom"}]
    assert skipped_table(skipped).splitlines()[1].startswith("|--")  # github format
    csv_rows = list(csv.DictReader(io.StringIO(csv_text(groups))))
    assert csv_rows[1]["deploy_hack_sentinel"] == "" and "\r" not in csv_text(groups)


def test_main_output_defaults_and_help(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "out" / "runs", arm="vanilla", seed=41, hack_deploy=0.5, solve_deploy=0.25)
    write_run(tmp_path / "out" / "runs", arm="routing2", seed=41, hack_deploy=0.25, solve_deploy=0.5)
    write_run(tmp_path / "out" / "runs", preset="fast", arm="vanilla", seed=41)
    assert main([]) == 0  # --runs out/runs, --out out/results
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "## Deployed hack / solve by experiment (3 runs under out/runs)"
    assert out[2] == "Rates: mean over seeds [95% Student-t CI over seeds]; deploy = quarantine ablated."
    table = out[out.index(next(ln for ln in out if ln.startswith("| preset "))):]
    assert "## Runs" not in "\n".join(out)
    (latest,) = (tmp_path / "out" / "results").glob("results_latest.csv")
    (stamped,) = [p for p in (tmp_path / "out" / "results").glob("results_*.csv") if p != latest]
    assert re.fullmatch(r"results_\d{8}T\d{6}\.csv", stamped.name)
    assert out[-1] == (f"CSV: {Path('out/results') / stamped.name} (and out/results/results_latest.csv, "
                       "per run: runs_latest.csv)")
    assert sum(ln.startswith("| fast ") for ln in table) == 1
    assert main(["--preset", "smoke", "--per-run"]) == 0
    out = capsys.readouterr().out
    assert "(2 runs under out/runs)" in out and "| fast " not in out and "## Runs (2)" in out
    assert out.count("_smoke_") == 2  # the per-run table names each run folder
    capsys.readouterr()
    assert main(["--preset", "nosuch"]) == 1
    assert "error: no complete runs with per_mode_deploy.json under out/runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for part in ("usage: results.py", "[--runs RUNS]", "[--out OUT]", "[--solve-margin SOLVE_MARGIN]",
                 "[--per-run]", "[--preset PRESET]",
                 "Aggregate complete runs into one table row per experiment (preset, arm, control, config): "
                 "deployed hack/solve mean with 95% intervals over seeds and over problem clusters, delta vs "
                 "the matching vanilla, a solve verdict.",
                 "folder of run folders", "where CSVs go",
                 "equivalence margin: Δsolve vs vanilla is 'matched' when its 95% interval lies in ±this",
                 "also print one row per counted run", "only runs of this preset (default: every preset)"):
        assert part in text, part


def test_record_fields_and_messages_are_exact(tmp_path):
    d = write_run(tmp_path, seed=41)
    (r,), _ = scan_runs(tmp_path)
    assert (r.run_id, r.preset, r.arm, r.seed, r.model, r.steps, r.eval_n, r.eval_set) == (
        "smoke_vanilla_seed41", "smoke", "vanilla", 41, "tiny-qwen3", 10, 16, "train")
    assert (r.control, r.random_v_seed) == ("", None)
    rec = json.loads((d / "per_mode_deploy.json").read_text())
    mismatch = "per_mode_deploy.json {k} = {v!r}: the two files describe different runs"
    bad = {
        "hack_deploy": (1.5, "per_mode_deploy.json: field 'hack_deploy' = 1.5 is not a rate in [0, 1]"),
        "seed": (None, "config.json config.seed = 41 but " + mismatch.format(k="seed", v=None)),
        "steps": ("10", "config.json config.steps = 10 but " + mismatch.format(k="steps", v="10")),
        "steps_done": (None, "per_mode_deploy.json: field 'steps_done' must be an integer, got None"),
        "eval_n": (None, "per_mode_deploy.json: field 'eval_n' must be an integer, got None"),
        "random_v_seed": (1.5, "config.json config.random_v_seed = None but "
                          + mismatch.format(k="random_v_seed", v=1.5)),
        "eval_set": (None, "per_mode_deploy.json: field 'eval_set' must be a non-empty string, got None"),
        "run_id": ("", "per_mode_deploy.json: field 'run_id' must be a non-empty string, got ''"),
        "preset": (None, "config.json config.preset = 'smoke' but " + mismatch.format(k="preset", v=None)),
        "arm": (None, "per_mode_deploy.json: field 'arm' must be a non-empty string, got None"),
        "by_mode": ({"run_tests": {"train_hack": 2}},
                    "per_mode_deploy.json by_mode['run_tests']: field 'train_hack' = 2 is not a rate in [0, 1]"),
    }
    for field, (value, msg) in bad.items():
        (d / "per_mode_deploy.json").write_text(json.dumps(dict(rec, **{field: value})))
        assert [s.reason for s in scan_runs(tmp_path)[1]] == [msg], field
    # behind the same-run check, the record's own field checks (a record read on its own)
    own = {
        "seed": (None, "per_mode_deploy.json: field 'seed' must be an integer, got None"),
        "steps": ("10", "per_mode_deploy.json: field 'steps' must be an integer, got '10'"),
        "random_v_seed": (1.5, "per_mode_deploy.json: field 'random_v_seed' must be an integer, got 1.5"),
        "preset": (None, "per_mode_deploy.json: field 'preset' must be a non-empty string, got None"),
    }
    for field, (value, msg) in own.items():
        with pytest.raises(res.RunFolderError) as e:
            res.parse_deploy_record(dict(rec, **{field: value}), d)
        assert str(e.value) == msg, field


def test_mean_ci_of_one_and_welch_with_three_on_the_left():
    assert mean_ci([0.25]).n == 1
    a, b = [0.1, 0.2, 0.6], [0.5, 0.7]
    va = sum((x - 0.3) ** 2 for x in a) / 2 / 3
    vb = sum((x - 0.6) ** 2 for x in b) / 1 / 2
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 1)
    lo, hi = welch_diff_ci(a, b)
    assert (hi - lo) / 2 == pytest.approx(t_quantile(0.975, df) * math.sqrt(va + vb), rel=1e-12)


def test_unknown_arms_sort_by_name_and_controls_after_the_real_direction(tmp_path):
    for arm in ("zeta", "alpha"):
        INTERVENTION[arm] = arm
    try:
        write_run(tmp_path, arm="zeta", seed=41, stamp="20260101T000001")
        write_run(tmp_path, arm="alpha", seed=41, random_v_seed=2, stamp="20260101T000002")
        write_run(tmp_path, arm="alpha", seed=41, stamp="20260101T000003")
        groups = aggregate(scan_runs(tmp_path)[0])
    finally:
        for arm in ("zeta", "alpha"):
            del INTERVENTION[arm]
    assert [(g.arm, g.control) for g in groups] == [("alpha", ""), ("alpha", "haar"), ("zeta", "")]
    write_run(tmp_path / "h", arm="routing2", seed=41, random_v_seed=3)
    write_run(tmp_path / "h", arm="routing2", seed=42, random_v_seed=3)
    (g,) = aggregate(scan_runs(tmp_path / "h")[0])
    row = next(csv.DictReader(io.StringIO(csv_text([g]))))
    assert row["random_v_seeds"] == "3" and row["seeds"] == "41 42" and row["control"] == "haar"
    assert float(row["hack_deploy_ci_hi"]) == pytest.approx(g.hack_deploy.hi)
    write_run(tmp_path / "h", arm="routing2", seed=43, random_v_seed=4)  # another Haar draw: its own row
    assert [x.random_v_seeds for x in aggregate(scan_runs(tmp_path / "h")[0])] == [[3], [4]]


# ── experiments are configs: grouping, superseding, baselines (issue 15 §2) ───────────────


def test_every_config_knob_is_decided_science_or_not():
    """A new Config field must be put in NON_SCIENCE_KNOBS or SCIENCE_KNOBS (results.py): this
    fails until someone decides whether runs that differ in it are one experiment."""

    from vgrout.config import Config

    knobs = {f.name for f in dataclasses.fields(Config)} | {"preset"}  # to_dict adds `preset`
    assert set(Config().to_dict()) == knobs
    non, sci = set(res.NON_SCIENCE_KNOBS), set(res.SCIENCE_KNOBS)
    assert not non & sci, f"in both lists: {sorted(non & sci)}"
    assert knobs - non - sci == set(), f"decide these knobs in results.py: {sorted(knobs - non - sci)}"
    assert (non | sci) - knobs == set(), f"no such Config field: {sorted((non | sci) - knobs)}"
    assert set(res.ARM_ONLY_KNOBS) <= sci
    assert {"seed", "out_root", "out_tag", "resume", "stop_after_steps", "device"} <= non
    assert {"random_v_seed", "lr", "intervention", "eval_n_prompts", "model", "steps"} <= sci


def test_config_hash_ignores_exactly_the_non_science_knobs():
    from vgrout.config import SmokeConfig

    base = SmokeConfig().to_dict()
    h = res.config_hash(res.science_config(base))
    for k, v in {"seed": 7, "out_tag": "_x", "out_root": "/elsewhere", "device": "cuda", "half_a": "E",
                 "eval_ablate_every": 3, "ckpt_every": 2}.items():
        assert res.config_hash(res.science_config(dict(base, **{k: v}))) == h, k
    for k, v in {"lr": 1e-3, "random_v_seed": 7, "gate_mode": "no_gate", "eval_n_prompts": 32,
                 "env_modes": ["run_tests"], "new_knob_from_a_newer_vgrout": 1}.items():
        assert res.config_hash(res.science_config(dict(base, **{k: v}))) != h, k
    assert len(h) == 64 and res.HASH_CHARS == 8


def test_config_labels_show_only_the_knobs_that_differ():
    def cfg(preset="smoke", arm="none", **kw):
        return {"preset": preset, "intervention": arm, "random_v_seed": None, "lr": 3e-3,
                "gate_mode": "one_sided", **kw}

    labels = res.config_labels({
        "v1": cfg(lr=1e-3), "v3": cfg(),
        "e_nogate": cfg(arm="erase", gate_mode="no_gate"), "e": cfg(arm="erase"),
        "fast": cfg(preset="fast", lr=1e-3),
        "haar": cfg(arm="erase", random_v_seed=7),
    })  # fmt: skip
    assert labels == {
        "v1": "lr=0.001",
        "v3": "lr=0.003",  # vanilla's gate_mode is the same in both vanilla configs: not shown
        "e_nogate": "gate_mode=no_gate lr=0.003",
        "e": "gate_mode=one_sided lr=0.003",
        "fast": "",  # alone in its preset
        "haar": "lr=0.003",  # arm-only knobs compare within (arm, control): one erase Haar config
    }
    old = {"preset": "smoke", "intervention": "none", "lr": 3e-3}  # config.json of an older vgrout
    assert res.config_labels({"new": cfg(), "old": old})["old"] == "gate_mode=(absent) random_v_seed=(absent)"


def test_baseline_is_the_vanilla_with_the_same_config_outside_the_arm_knobs(tmp_path):
    write_run(tmp_path, arm="vanilla", hack_deploy=0.6)
    write_run(tmp_path, arm="vanilla", hack_deploy=0.7, knobs={"lr": 1e-3}, stamp="20260102T000000")
    write_run(tmp_path, arm="projected", hack_deploy=0.2, knobs={"lr": 1e-3, "gate_mode": "no_gate"})
    write_run(tmp_path, arm="routing", hack_deploy=0.3, knobs={"lr": 5e-4})
    groups = aggregate(scan_runs(tmp_path)[0])
    by = {(g.arm, g.config_label): g for g in groups}
    assert sorted(by) == [("projected", "lr=0.001"), ("routing", "lr=0.0005"), ("vanilla", "lr=(absent)"),
                          ("vanilla", "lr=0.001")]
    proj = by[("projected", "lr=0.001")]
    assert proj.baseline is by[("vanilla", "lr=0.001")] and proj.d_hack == pytest.approx(0.2 - 0.7)
    rout = by[("routing", "lr=0.0005")]
    assert rout.baseline is None and rout.d_hack is None
    assert rout.note.endswith("no vanilla group with this config (arm-only knobs aside): no delta")


def test_baseline_prefers_the_exact_vanilla_and_refuses_to_guess(tmp_path):
    write_run(tmp_path, arm="vanilla", hack_deploy=0.6)
    write_run(tmp_path, arm="vanilla", hack_deploy=0.8, knobs={"gate_mode": "no_gate"},  # inert for vanilla
              stamp="20260102T000000")
    write_run(tmp_path, arm="projected", hack_deploy=0.2, knobs={"gate_mode": "no_gate"})
    write_run(tmp_path, arm="routing", hack_deploy=0.1, knobs={"gate_mode": "reverse"})
    by = {(g.arm, g.config_label): g for g in aggregate(scan_runs(tmp_path)[0])}
    van = by[("vanilla", "gate_mode=no_gate")]
    assert by[("projected", "")].baseline is van and by[("projected", "")].d_hack == pytest.approx(-0.6)
    rout = by[("routing", "")]
    assert rout.baseline is None
    hashes = ", ".join(g.short_hash for g in (by[("vanilla", "gate_mode=(absent)")], van))
    assert rout.note.endswith(f"2 vanilla configs match outside the arm-only knobs ({hashes}), none exactly: "
                              "no delta")


def test_a_haar_control_never_becomes_the_baseline(tmp_path):
    write_run(tmp_path, arm="vanilla", random_v_seed=7, hack_deploy=0.6)  # forged: vanilla refuses the flag
    write_run(tmp_path, arm="routing2", hack_deploy=0.1)
    groups = aggregate(scan_runs(tmp_path)[0])
    assert [(g.arm, g.control, g.baseline) for g in groups] == [("vanilla", "haar", None), ("routing2", "", None)]
    assert "no vanilla group with this config" in groups[0].note and "no vanilla" in groups[1].note


def test_superseding_needs_the_same_config_and_seed(tmp_path):
    a = write_run(tmp_path, seed=41, hack_deploy=0.9, stamp="20260101T000000")
    b = write_run(tmp_path, seed=41, hack_deploy=0.1, stamp="20260102T000000", knobs={"lr": 1e-3})
    c = write_run(tmp_path, seed=41, hack_deploy=0.2, stamp="20260103T000000", knobs={"out_tag": "_again"})
    runs, skipped = scan_runs(tmp_path)
    assert sorted(r.path for r in runs) == sorted([b, c])  # b has another lr: it supersedes nothing
    hc = next(r for r in runs if r.path == c).short_hash  # out_tag is no science knob: same config as a
    assert [(s.path, s.reason) for s in skipped] == [(a, f"superseded by {c.name} (same config {hc} and seed)")]


def test_config_json_must_exist_and_name_the_same_run(tmp_path):
    d = write_run(tmp_path, seed=41)
    good = json.loads((d / "config.json").read_text())
    cases = [
        (None, "no config.json: the run's knobs are unknown, so it cannot be grouped"),
        ({**good, "config": "x"}, "config.json: field 'config' must be an object"),
        ({**good, "config": {k: v for k, v in good["config"].items() if k != "intervention"}},
         "config.json: field 'config.intervention' is missing"),
        ({**good, "config": {**good["config"], "seed": 42}},
         "config.json config.seed = 42 but per_mode_deploy.json seed = 41: the two files describe different runs"),
        ({**good, "config": {**good["config"], "intervention": "erase"}},
         "config.json config.intervention = 'erase' but per_mode_deploy.json intervention = 'none'"),
    ]
    for cfg, msg in cases:
        (d / "config.json").unlink(missing_ok=True)
        if cfg is not None:
            (d / "config.json").write_text(json.dumps(cfg))
        runs, skipped = scan_runs(tmp_path)
        assert not runs and skipped[0].reason.startswith(msg), (msg, skipped[0].reason)


# ── intervals with problems as clusters (issue 15 §4) ─────────────────────────────────────

T2 = 4.302652729749752  # t_{0.975, 2}
T1 = 12.706204736174696  # t_{0.975, 1}


def test_ratio_ci_with_equal_clusters_is_the_t_interval_of_problem_rates():
    ci = res.ratio_ci([0, 2, 4], [4, 4, 4])  # per-problem rates 0, 0.5, 1: mean 0.5, sd 0.5
    half = T2 * 0.5 / math.sqrt(3)
    assert (ci.rate, ci.n_clusters, ci.n) == (0.5, 3, 12)
    assert ci.lo == pytest.approx(0.5 - half, abs=1e-12) and ci.hi == pytest.approx(0.5 + half, abs=1e-12)
    rates = [0.5, 0.75, 1.0, 0.0, 0.25, 0.5]
    m = mean_ci(rates)
    got = res.ratio_ci([round(4 * r) for r in rates], [4] * 6)
    assert (got.rate, got.lo, got.hi) == pytest.approx((m.mean, m.lo, m.hi), abs=1e-12)


def test_ratio_ci_with_unequal_clusters_hand_computed():
    # y = 2, 1, 3 of n = 2, 4, 6: p = 6/12; residuals y - p n = 1, -1, 0 (over 12);
    # var = 3/2 · 2/144 = 1/48
    ci = res.ratio_ci([2, 1, 3], [2, 4, 6])
    assert ci.rate == 0.5
    assert ci.hi - 0.5 == pytest.approx(T2 / math.sqrt(48), abs=1e-12)
    assert 0.5 - ci.lo == pytest.approx(T2 / math.sqrt(48), abs=1e-12)
    # the per-problem t-interval would weight the 2-sample problem like the 6-sample one
    assert mean_ci([1.0, 0.25, 0.5]).mean != pytest.approx(0.5)
    one = res.ratio_ci([3], [4])
    assert (one.rate, one.lo, one.hi, one.n_clusters) == (0.75, None, None, 1)
    zero = res.ratio_ci([0, 0, 0], [4, 4, 4])  # no event anywhere: no variance to estimate
    assert (zero.rate, zero.lo, zero.hi) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="a cluster has 5 events among 4 samples"):
        res.ratio_ci([5, 0], [4, 4])
    with pytest.raises(ValueError, match="no samples"):
        res.ratio_ci([], [])


def test_paired_and_unpaired_cluster_differences_hand_computed():
    # equal sizes: the paired t-interval of per-problem differences (-0.25, 0, -0.5)
    d = res.paired_ratio_diff_ci([1, 3, 2], [4, 4, 4], [2, 3, 4], [4, 4, 4])
    half = T2 * 0.25 / math.sqrt(3)
    assert d.paired and d.df == 2 and d.n_clusters == 3 and d.diff == -0.25
    assert (d.lo, d.hi) == pytest.approx((-0.25 - half, -0.25 + half), abs=1e-12)
    # unequal sizes: a = (2, 1) of (2, 4), b = (0, 3) of (2, 4); both p = 1/2;
    # residuals a (1/6, -1/6), b (-1/6, 1/6); var = 2/1 · ((2/6)² + (2/6)²) = 4/9; df 1
    d = res.paired_ratio_diff_ci([2, 1], [2, 4], [0, 3], [2, 4])
    assert d.diff == 0.0 and d.df == 1
    assert (d.lo, d.hi) == pytest.approx((-T1 * 2 / 3, T1 * 2 / 3), rel=1e-10)
    # unpaired: V_a = 2 · 2/36 = 1/9 (a as above), V_b = 3/2 · 2/144 = 1/48 (y 1, 3, 2 of 4 each)
    u = res.unpaired_ratio_diff_ci([2, 1], [2, 4], [1, 3, 2], [4, 4, 4])
    va, vb = 1 / 9, 1 / 48
    df = (va + vb) ** 2 / (va**2 / 1 + vb**2 / 2)
    assert not u.paired and u.n_clusters == 5 and u.diff == 0.0 and u.df == pytest.approx(df, rel=1e-12)
    assert u.hi == pytest.approx(t_quantile(0.975, df) * math.sqrt(va + vb), abs=1e-12)
    assert res.unpaired_ratio_diff_ci([1], [4], [1, 2], [4, 4]).lo is None
    with pytest.raises(ValueError, match="2 clusters on one side, 3 on the other"):
        res.paired_ratio_diff_ci([1, 1], [4, 4], [1, 1, 1], [4, 4, 4])


def test_solve_verdict_is_an_equivalence_test_on_the_interval():
    v = res.solve_verdict
    assert v(-0.04, 0.03, 0.05) == "matched"
    assert v(-0.05, 0.05, 0.05) == "matched"  # the margin is inclusive
    assert v(0.01, 0.04, 0.05) == "matched"  # a real difference smaller than the margin
    assert v(0.01, 0.20, 0.05) == "solve differs"
    assert v(-0.30, -0.06, 0.05) == "solve differs"
    assert v(-0.10, 0.02, 0.05) == "inconclusive"
    assert v(-0.051, 0.0, 0.05) == "inconclusive"
    # zero width: every seed / cluster at one value (0 solves everywhere) estimates no spread
    assert v(0.0, 0.0, 0.05) == "inconclusive" and v(0.3, 0.3, 0.05) == "inconclusive"
    with pytest.raises(ValueError):
        v(0.1, -0.1, 0.05)


VAN41 = {"1": (4, 2, 2), "2": (4, 3, 1), "3": (4, 4, 0)}  # problem -> (n, hack, solve)
ARM41 = {"1": (4, 1, 2), "2": (4, 3, 1), "3": (4, 2, 1)}
VAN42 = {"1": (4, 0, 4), "2": (4, 1, 3), "3": (4, 2, 2)}
ARM42 = {"1": (4, 0, 4), "2": (4, 1, 3), "3": (4, 1, 2)}


def test_group_intervals_pool_seed_problem_clusters_and_pair_with_vanilla(tmp_path):
    write_run(tmp_path, arm="vanilla", seed=41, by_problem=VAN41)
    write_run(tmp_path, arm="projected", seed=41, by_problem=ARM41)
    v, a = aggregate(scan_runs(tmp_path)[0])
    # one seed: the pooled interval exists, the seed interval does not
    assert v.hack_deploy.lo is None and v.hack_deploy_cl.rate == 0.75
    assert v.hack_deploy_cl.hi == pytest.approx(0.75 + T2 * 0.25 / math.sqrt(3), abs=1e-12)
    # paired per-problem differences: hack (-0.25, 0, -0.5), solve (0, 0, +0.25)
    assert a.d_hack_cl.paired and a.d_hack_cl.diff == -0.25
    assert a.d_hack_cl.lo == pytest.approx(-0.25 - T2 * 0.25 / math.sqrt(3), abs=1e-12)
    assert a.d_solve_cl.diff == pytest.approx(1 / 12) and a.d_solve_ci is None
    assert (a.d_solve_cl.lo, a.d_solve_cl.hi) == pytest.approx((1 / 12 - T2 / 12, 1 / 12 + T2 / 12), abs=1e-12)
    assert (a.solve_verdict, a.verdict_basis) == ("inconclusive", "paired clusters")
    a_wide = aggregate(scan_runs(tmp_path)[0], solve_margin=0.5)[1]  # [-0.275, +0.442] inside ±0.5
    assert a_wide.solve_verdict == "matched"

    write_run(tmp_path, arm="vanilla", seed=42, by_problem=VAN42)
    write_run(tmp_path, arm="projected", seed=42, by_problem=ARM42)
    v, a = aggregate(scan_runs(tmp_path)[0])
    van_rates = [h / 4 for b in (VAN41, VAN42) for _, h, _ in b.values()]
    assert (v.hack_deploy_cl.rate, v.hack_deploy_cl.lo, v.hack_deploy_cl.hi) == pytest.approx(
        (mean_ci(van_rates).mean, mean_ci(van_rates).lo, mean_ci(van_rates).hi), abs=1e-12)
    assert v.hack_deploy_cl.n_clusters == 6 and v.hack_deploy.n == 2
    diffs = [(x[1] - y[1]) / 4 for b, c in ((ARM41, VAN41), (ARM42, VAN42)) for x, y in
             zip(b.values(), c.values(), strict=True)]
    assert a.d_hack_cl.paired and a.d_hack_cl.n_clusters == 6
    assert (a.d_hack_cl.lo, a.d_hack_cl.hi) == pytest.approx((mean_ci(diffs).lo, mean_ci(diffs).hi), abs=1e-12)
    # two seeds a side: the verdict rests on the Welch interval over seeds
    assert a.verdict_basis == "seeds" and a.d_solve_ci == welch_diff_ci(
        [4 / 12, 9 / 12], [3 / 12, 9 / 12])
    assert a.solve_verdict == "inconclusive"


def test_cluster_delta_is_unpaired_when_the_eval_problems_or_seeds_differ(tmp_path):
    write_run(tmp_path, arm="vanilla", seed=41, by_problem=VAN41)
    other = {"1": (4, 1, 2), "2": (4, 3, 1), "4": (4, 2, 1)}  # problem 4 instead of 3
    write_run(tmp_path, arm="projected", seed=41, by_problem=other)
    _, a = aggregate(scan_runs(tmp_path)[0])
    want = res.unpaired_ratio_diff_ci([1, 3, 2], [4, 4, 4], [2, 3, 4], [4, 4, 4])
    assert a.d_hack_cl == want and not a.d_hack_cl.paired
    assert a.verdict_basis == "clusters"
    write_run(tmp_path, arm="projected", seed=42, by_problem=ARM42)  # seeds {41, 42} vs {41}
    _, a = aggregate(scan_runs(tmp_path)[0])
    assert not a.d_hack_cl.paired and a.d_hack_cl.n_clusters == 9


def test_runs_without_per_problem_counts_still_load(tmp_path):
    write_run(tmp_path, arm="vanilla", seed=41, by_problem=VAN41)
    old = write_run(tmp_path, arm="vanilla", seed=42, hack_deploy=0.5)  # written before by_problem existed
    runs, skipped = scan_runs(tmp_path)
    assert len(runs) == 2 and not skipped
    assert {r.path: r.by_problem is None for r in runs}[old]
    (g,) = aggregate(runs)
    assert g.hack_deploy.mean == pytest.approx((0.75 + 0.5) / 2) and g.hack_deploy_cl is None
    assert g.note == "1 of 2 runs predate per-problem counts: no cluster interval"


def test_by_problem_is_validated_against_the_headline(tmp_path):
    d = write_run(tmp_path, seed=41, by_problem=VAN41)
    rec = json.loads((d / "per_mode_deploy.json").read_text())
    where = "per_mode_deploy.json sets['train'].by_problem"

    def bad(edit) -> str:
        r = json.loads(json.dumps(rec))
        edit(r)
        (d / "per_mode_deploy.json").write_text(json.dumps(r))
        runs, skipped = scan_runs(tmp_path)
        assert not runs
        return skipped[0].reason

    assert bad(lambda r: r["sets"]["train"]["by_problem"]["1"].update(deploy_hack=5)) == (
        f"{where}['1']: field 'deploy_hack' = 5 is not a count in [0, n=4]")
    assert bad(lambda r: r["sets"]["train"]["by_problem"]["2"].pop("train_solve")) == (
        f"{where}['2']: field 'train_solve' must be an integer, got None")
    assert bad(lambda r: r["sets"]["train"]["by_problem"]["1"].update(n=0)).startswith(
        f"{where}['1']: field 'n' must be >= 1")
    assert bad(lambda r: r.update(eval_n=16)) == f"{where}: the problems' n sum to 12, but eval_n = 16"
    assert bad(lambda r: r.update(hack_deploy=0.5)) == (
        f"{where}: Σ deploy_hack / Σ n = 0.75 but the headline hack_deploy = 0.5")
    assert bad(lambda r: r["sets"]["train"].update(by_problem=[1])) == f"{where} must be an object, got list"


def test_csv_and_table_carry_the_config_cluster_and_verdict_columns(tmp_path, capsys):
    runs_dir, out = tmp_path / "runs", tmp_path / "o"
    write_run(runs_dir, arm="vanilla", seed=41, by_problem=VAN41)
    write_run(runs_dir, arm="vanilla", seed=41, by_problem=VAN42, knobs={"lr": 1e-3}, stamp="20260102T000000")
    write_run(runs_dir, arm="projected", seed=41, by_problem=ARM41)
    assert main(["--runs", str(runs_dir), "--out", str(out), "--solve-margin", "0.5", "--per-run"]) == 0
    text = capsys.readouterr().out
    rows = {(r["arm"], r["config"]): r for r in csv.DictReader((out / "results_latest.csv").open())}
    # lr differs within the preset, so every row names its lr ("(absent)": not in that config.json)
    v, v_lr, a = rows[("vanilla", "lr=(absent)")], rows[("vanilla", "lr=0.001")], rows[("projected", "lr=(absent)")]
    assert v["config_hash"] != v_lr["config_hash"] and a["baseline_hash"] == v["config_hash"]
    assert float(v["hack_deploy_pooled"]) == 0.75 and v["n_clusters"] == "3"
    assert float(v["hack_deploy_cl_hi"]) == pytest.approx(0.75 + T2 * 0.25 / math.sqrt(3), abs=1e-12)
    assert float(a["d_hack_cl"]) == -0.25 and a["d_cl_paired"] == "true"
    assert float(a["d_solve_cl_lo"]) == pytest.approx(1 / 12 - T2 / 12, abs=1e-12)
    assert (a["solve_verdict"], a["solve_verdict_basis"], a["solve_margin"]) == ("matched", "paired clusters", "0.5")
    assert a["d_solve_ci_lo"] == "" and v["solve_verdict"] == "" and v["baseline_hash"] == ""
    md = {(r["arm"], r["config"]): r for r in md_rows(text, "preset")}
    md_a = md[("projected", f"{a['config_hash']} lr=(absent)")]
    assert md_a["solve verdict"] == "matched (paired clusters)"
    assert md_a["Δ hack, clusters"] == "-0.250 [-0.871, +0.371] paired C=3"
    assert md[("vanilla", f"{v_lr['config_hash']} lr=0.001")]["deploy hack, clusters"] == "0.250 [-0.371, 0.871] C=3"
    assert "matched = inside ±0.5 (equivalence)" in text
    per_run = list(csv.DictReader((out / "runs_latest.csv").open()))
    assert len(per_run) == 3 and {r["n_problems"] for r in per_run} == {"3"}
    run_md = md_rows(text, "run folder")
    assert len(run_md) == 3 and "0.750 [0.129, 1.371] C=3" in {r["deploy hack, clusters"] for r in run_md}
    with pytest.raises(SystemExit):
        main(["--runs", str(runs_dir), "--out", str(out), "--solve-margin", "-1"])
    assert "--solve-margin must be a finite number >= 0, got -1.0" in capsys.readouterr().err


def test_results_module_imports_no_torch():
    code = ("import sys, vgrout.results, vgrout.results as r; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ── real run folders from tiny training runs ──────────────────────────────────────────────


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """Four 2-step smoke runs of the offline tiny model, in order: vanilla (preset lr 3e-3),
    vanilla --lr=1e-3, erase --lr=1e-3 with its own direction knobs and --gate-mode=no_gate
    (arm-only knobs), and vanilla again with only a non-science knob changed (--out-tag)."""
    from vgrout.config import parse_cli
    from vgrout.pairs import builtin_pairs, save_pairs_json
    from vgrout.smoke_pool import build_smoke_pool
    from vgrout.train import main as train_main

    root = tmp_path_factory.mktemp("real_runs")
    pool = build_smoke_pool(root / "pool")
    bp = builtin_pairs()
    pairs = save_pairs_json(root / "pairs.json", [bp[0], bp[5], bp[10], bp[15]])
    base = ["smoke", "--steps=2", "--max-new=8", "--eval-n-prompts=2", f"--teacher-pool-dir={pool}",
            f"--out-root={root / 'out'}"]
    runs_dir = root / "out" / "runs"
    made = {}
    for name, extra in (
        ("vanilla", ["--intervention=none"]),
        ("vanilla_lr", ["--intervention=none", "--lr=1e-3"]),
        ("erase_lr", ["--intervention=erase", "--lr=1e-3", "--gate-mode=no_gate", f"--vhack-pairs-path={pairs}",
                      "--v-hack-extract-top-k=2", "--v-hack-k=1", "--v-hack-n-heldout=1"]),
        ("vanilla_again", ["--intervention=none", "--out-tag=_again"]),
    ):
        before = set(runs_dir.iterdir()) if runs_dir.is_dir() else set()
        assert train_main(parse_cli(base + extra)) == 0, name
        (made[name],) = set(runs_dir.iterdir()) - before
    return runs_dir, made


@pytest.mark.slow
def test_real_runs_group_by_config_supersede_and_pair(real_runs, tmp_path, capsys):
    runs_dir, made = real_runs
    knobs = {k: json.loads((d / "config.json").read_text())["config"] for k, d in made.items()}
    # the rerun differs only in non-science knobs (out_tag), the lr run in lr
    differ = {k for k in knobs["vanilla"] if knobs["vanilla"][k] != knobs["vanilla_again"][k]}
    assert differ == {"out_tag"}
    assert {k for k in knobs["vanilla"] if knobs["vanilla"][k] != knobs["vanilla_lr"][k]} == {"lr"}

    runs, skipped = scan_runs(runs_dir)
    by = {r.path: r for r in runs}
    assert set(by) == {made["vanilla_lr"], made["erase_lr"], made["vanilla_again"]}
    again = by[made["vanilla_again"]]
    assert [(s.path, s.reason) for s in skipped] == [
        (made["vanilla"], f"superseded by {made['vanilla_again'].name} (same config {again.short_hash} and seed)")]
    for r in runs:  # the real eval records per-problem counts: 2 problems x G = 4 samples
        assert r.by_problem is not None and len(r.by_problem) == 2 and r.eval_n == 8
        assert r.cluster_ci("deploy_hack").n_clusters == 2

    groups = aggregate(runs)
    got = {(g.arm, g.config_label): g for g in groups}
    assert sorted(got) == [("projected", "lr=0.001"), ("vanilla", "lr=0.001"), ("vanilla", "lr=0.003")]
    assert all(g.seeds == [41] for g in groups)  # one seed each: the two vanilla configs are not pooled
    erase, van_lr = got[("projected", "lr=0.001")], got[("vanilla", "lr=0.001")]
    assert erase.baseline is van_lr and erase.runs[0].path == made["erase_lr"]
    # same seed, same eval problems (the first 2 training problems): the cluster delta is paired
    assert erase.d_hack_cl.paired and erase.d_hack_cl.n_clusters == 2
    assert erase.verdict_basis == "paired clusters" and erase.solve_verdict in res.VERDICTS
    if erase.d_solve_cl.lo == erase.d_solve_cl.hi:  # the untrained tiny model solves nothing
        assert erase.solve_verdict == "inconclusive"

    assert main(["--runs", str(runs_dir), "--out", str(tmp_path / "o")]) == 0
    rows = list(csv.DictReader((tmp_path / "o" / "results_latest.csv").open()))
    assert sorted((r["arm"], r["config"], r["n_seeds"]) for r in rows) == [
        ("projected", "lr=0.001", "1"), ("vanilla", "lr=0.001", "1"), ("vanilla", "lr=0.003", "1")]
    assert next(r for r in rows if r["arm"] == "projected")["baseline_hash"] == van_lr.short_hash
    assert "superseded by" in capsys.readouterr().out

    # the plots group the same way: two vanilla lines, in two shades of the arm's colour
    from vgrout.plots import collect_series, group_series

    series, _, _ = collect_series(runs_dir)
    lines, styles = group_series(series)
    assert sorted((k[0], len(v)) for k, v in lines.items()) == [("projected", 1), ("vanilla", 1), ("vanilla", 1)]
    assert sorted(styles[k].colour for k in lines if k[0] == "vanilla") == ["#000000", "#808080"]
    assert {styles[k].label for k in lines} == {
        f"vanilla lr=0.003 [{again.short_hash}]", f"vanilla lr=0.001 [{van_lr.short_hash}]",
        f"projected lr=0.001 [{erase.short_hash}]"}


# ---------------------------------------------------------------- exact edges (mutation survivors)


def test_cluster_intervals_at_two_clusters_and_their_exact_none_results():
    two = res.ratio_ci([1, 3], [4, 4])
    assert two.lo is not None and two.n_clusters == 2 and two.n == 8  # C = 2 is enough for an interval
    assert res.ratio_ci([1], [4]) == res.ClusterCI(0.25, None, None, 1, 4)
    assert res.paired_ratio_diff_ci([1], [4], [0], [4]) == res.DiffCI(0.25, None, None, None, 1, True)
    assert res.unpaired_ratio_diff_ci([1, 2], [4, 4], [0], [4]) == res.DiffCI(0.375, None, None, None, 3, False)
    assert res.unpaired_ratio_diff_ci([1], [4], [0, 1], [4, 4]) == res.DiffCI(0.125, None, None, None, 3, False)
    same = res.unpaired_ratio_diff_ci([1, 1], [4, 4], [0, 0], [4, 4])  # zero variance on both sides
    assert same == res.DiffCI(0.25, 0.25, 0.25, None, 4, False)
    both = res.unpaired_ratio_diff_ci([1, 3], [4, 4], [0, 2], [4, 4])
    assert both.lo is not None and both.df is not None and both.paired is False and both.n_clusters == 4
    p2 = res.paired_ratio_diff_ci([1, 3], [4, 4], [0, 1], [4, 4])
    assert p2.lo is not None and (p2.df, p2.n_clusters, p2.paired) == (1, 2, True)
    with pytest.raises(ValueError, match="no samples"):
        res.ratio_ci([0], [0])
    assert res.ratio_ci([1, 0], [1, 0]).rate == 1.0  # a total of one sample is enough


def test_welch_variance_and_df_exact():
    a_e, a_n, b_e, b_n = [1, 3, 2], [4, 4, 4], [0, 2], [4, 4]
    pa, pb = 6 / 12, 2 / 8
    ra = [(y - pa * n) / 12 for y, n in zip(a_e, a_n, strict=True)]
    rb = [(y - pb * n) / 8 for y, n in zip(b_e, b_n, strict=True)]
    va, vb = 3 / 2 * sum(r * r for r in ra), 2 / 1 * sum(r * r for r in rb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 1)
    got = res.unpaired_ratio_diff_ci(a_e, a_n, b_e, b_n)
    half = res.t_quantile(0.975, df) * math.sqrt(va + vb)
    assert got.df == pytest.approx(df, rel=1e-12)
    assert (got.lo, got.hi) == pytest.approx((pa - pb - half, pa - pb + half), rel=1e-12)


def test_solve_verdict_boundaries():
    assert res.solve_verdict(0.0, 0.1, 0.0) == "inconclusive"  # margin 0 is allowed; lo = 0 does not exclude 0
    assert res.solve_verdict(-0.1, 0.0, 0.0) == "inconclusive"
    assert res.solve_verdict(0.01, 0.1, 0.05) == "solve differs"


def test_t_functions_edges():
    assert res.t_cdf(0.0, 5.0) == 0.5 and res.t_cdf(-1.0, 5.0) == pytest.approx(1 - res.t_cdf(1.0, 5.0))
    assert res.t_quantile(0.5, 3.0) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        res.t_quantile(0.0, 3.0)
    # closed forms (df 1: tan(π(p - 1/2)); df 2: (2p-1)·sqrt(2 / (1 - (2p-1)²))), far past the first bracket
    assert res.t_quantile(0.975, 1.0) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)
    a = 2 * 0.9995 - 1
    assert res.t_quantile(0.9995, 2.0) == pytest.approx(a * math.sqrt(2 / (1 - a * a)), rel=1e-9)
    assert res.t_quantile(0.75, 1.0) == pytest.approx(1.0, rel=1e-9)


def test_config_hash_is_sha256_of_compact_sorted_json():
    import hashlib

    want = hashlib.sha256(b'{"a":[1,2],"b":{"c":1,"d":2}}').hexdigest()
    assert res.config_hash({"b": {"d": 2, "c": 1}, "a": [1, 2]}) == want


def test_formatters_exact():
    assert res._fmt_knob([1, 2]) == "1,2" and res._fmt_knob(res._ABSENT) == "(absent)" and res._fmt_knob(3) == "3"
    assert res._fmt_cl(res.ClusterCI(0.25, 0.25, 0.25, 3, 12)) == "0.250 [0.250, 0.250] C=3 (zero variance)"
    assert res._fmt_cl(res.ClusterCI(0.25, 0.1, 0.4, 3, 12)) == "0.250 [0.100, 0.400] C=3"
    assert res._fmt_cl(res.ClusterCI(0.25, None, None, 1, 4)) == "0.250 (CI n/a, C=1)" and res._fmt_cl(None) == ""
    assert res._fmt_d(None, None) == "" and res._fmt_d(0.5, (0.25, 0.75)) == "+0.500 [+0.250, +0.750]"
    assert res._fmt_dcl(res.DiffCI(0.1, None, None, None, 3, False)) == "+0.100 (CI n/a) unpaired C=3"
    zero = res.DiffCI(0.1, 0.1, 0.1, None, 3, True)
    assert res._fmt_dcl(zero) == "+0.100 [+0.100, +0.100] paired C=3 (zero variance)"
    assert res._fmt_dcl(res.DiffCI(-0.1, -0.2, 0.05, 4.0, 5, False)) == "-0.100 [-0.200, +0.050] unpaired C=5"
    assert res._fmt_dcl(None) == ""


def test_table_legend_text():
    """The legend names the solve margin it is given and each statistic the table prints."""
    lines = res.table_legend(0.05).split("\n")
    assert len(lines) == 6 and all(line.strip() for line in lines)
    assert "matched = inside ±0.05 (equivalence)" in lines[4] and "excludes 0" in lines[4]
    assert lines[5].startswith("Δ hack vs Haar: the real direction minus its Haar control") and "paired t" in lines[5]
    assert "inside ±0.1 (" in res.table_legend(0.1) and "±0.05" not in res.table_legend(0.1)
    assert lines[0].startswith("Rates: mean over seeds [95% Student-t CI over seeds]; deploy = quarantine ablated")
    assert "never averaged" in lines[1] and "t with C-1 df" in lines[2]
    assert "Welch 95% CI" in lines[3] and "paired over (seed, problem)" in lines[3]


def test_delta_vs_haar_is_paired_over_shared_seeds_else_welch(tmp_path):
    """A real direction minus its Haar control (same config, random_v_seed set): the t-interval of the
    per-seed differences when both ran the same seeds, Welch's otherwise, and over (seed, problem)
    clusters paired; controls drawn with two different seeds are never picked between."""
    real = {41: 0.10, 42: 0.20, 43: 0.30}
    haar = {41: 0.20, 42: 0.25, 43: 0.45}
    for seed, h in real.items():
        write_run(tmp_path / "a", arm="routing2", seed=seed, hack_deploy=h, solve_deploy=0.0)
        write_run(tmp_path / "a", arm="routing2", seed=seed, random_v_seed=7, hack_deploy=haar[seed],
                  solve_deploy=0.0)
        write_run(tmp_path / "a", arm="projected", seed=seed, hack_deploy=h, solve_deploy=0.0)
    groups = {(g.arm, g.control): g for g in aggregate(scan_runs(tmp_path / "a")[0])}
    g, ctrl = groups[("routing2", "")], groups[("routing2", "haar")]
    assert g.control_group is ctrl and g.d_ctrl_paired
    assert g.d_ctrl == pytest.approx(-0.1, abs=1e-12)
    half = 4.302652729749752 * 0.05 / math.sqrt(3)  # per-seed diffs -0.1, -0.05, -0.15: sd 0.05
    assert g.d_ctrl_ci == pytest.approx((-0.1 - half, -0.1 + half), abs=1e-12)
    assert groups[("projected", "")].ctrl_why == "no Haar control"
    cells = {(r["arm"]): r for r in _cells(markdown_table(list(groups.values())))}
    assert cells["routing2"]["Δ hack vs Haar"] == f"-0.100 [-0.224, +0.024] paired vs {ctrl.short_hash}"
    assert cells["projected"]["Δ hack vs Haar"] == "no Haar control"
    row = next(r for r in csv.DictReader(io.StringIO(csv_text(list(groups.values()))))
               if (r["arm"], r["control"]) == ("routing2", ""))
    assert (row["control_hash"], row["d_haar_paired"]) == (ctrl.short_hash, "true")
    assert float(row["d_haar_ci_lo"]) == pytest.approx(-0.1 - half, abs=1e-12)

    # the control misses seed 43: Welch over the two sets of seeds, not paired
    for seed, h in real.items():
        write_run(tmp_path / "b", arm="routing2", seed=seed, hack_deploy=h, solve_deploy=0.0)
    for seed in (41, 42):
        write_run(tmp_path / "b", arm="routing2", seed=seed, random_v_seed=7, hack_deploy=haar[seed],
                  solve_deploy=0.0)
    g = next(x for x in aggregate(scan_runs(tmp_path / "b")[0]) if not x.control)
    assert not g.d_ctrl_paired and g.d_ctrl == pytest.approx(0.2 - 0.225)
    assert g.d_ctrl_ci == welch_diff_ci([0.1, 0.2, 0.3], [0.2, 0.25])

    # per-problem counts: the cluster difference is paired over the shared (seed, problem) units
    write_run(tmp_path / "c", arm="routing2", seed=41, by_problem={"1": (8, 2, 0), "2": (8, 4, 0)})
    write_run(tmp_path / "c", arm="routing2", seed=41, random_v_seed=7,
              by_problem={"1": (8, 4, 0), "2": (8, 6, 0)})
    g = next(x for x in aggregate(scan_runs(tmp_path / "c")[0]) if not x.control)
    assert g.d_ctrl_cl is not None and g.d_ctrl_cl.paired and g.d_ctrl_cl.diff == pytest.approx(-0.25)

    # two controls of the same config drawn with different seeds: no delta, and the cell says why
    for rv in (7, 8):
        write_run(tmp_path / "d", arm="routing2", seed=41, random_v_seed=rv, hack_deploy=0.3, solve_deploy=0.0)
    write_run(tmp_path / "d", arm="routing2", seed=41, hack_deploy=0.1, solve_deploy=0.0)
    g = next(x for x in aggregate(scan_runs(tmp_path / "d")[0]) if not x.control)
    assert g.control_group is None and g.ctrl_why.startswith("2 Haar controls (")
    assert g.ctrl_why.endswith("): no delta")


def _set_weights(run: Path, digest) -> None:
    cfg = json.loads((run / "config.json").read_text())
    cfg["provenance"]["model_weights"] = digest
    (run / "config.json").write_text(json.dumps(cfg))


def test_two_builds_of_one_model_name_are_different_experiments(tmp_path):
    """provenance.model_weights (the loaded folder's digest) is a science knob: runs of two organism
    builds never pool, each arm pairs with the vanilla of its own weights, and the label names them."""
    runs = {}
    for w, hacks in (("aaaa", (0.5, 0.25)), ("bbbb", (0.75, 0.75))):
        for seed in (41, 42):
            runs[w, "vanilla", seed] = write_run(tmp_path, arm="vanilla", seed=seed, hack_deploy=hacks[0],
                                                 stamp=f"2026010{seed - 40}T00000{len(runs)}")
            runs[w, "routing2", seed] = write_run(tmp_path, arm="routing2", seed=seed, hack_deploy=hacks[1],
                                                  stamp=f"2026010{seed - 40}T00000{len(runs)}")
    for (w, _, _), d in runs.items():
        _set_weights(d, w)
    legacy = write_run(tmp_path, arm="vanilla", seed=43, hack_deploy=0.0, stamp="20260109T000000")
    records, skipped = scan_runs(tmp_path)
    assert skipped == [] and len(records) == 9  # nothing superseded across builds
    groups = aggregate(records)
    by = {(g.arm, g.config_label): g for g in groups}
    assert set(by) == {("vanilla", "model_weights=aaaa"), ("vanilla", "model_weights=bbbb"),
                       ("vanilla", "model_weights=(absent)"), ("routing2", "model_weights=aaaa"),
                       ("routing2", "model_weights=bbbb")}
    for w, d_hack in (("aaaa", -0.25), ("bbbb", 0.0)):
        g = by["routing2", f"model_weights={w}"]
        assert g.baseline is by["vanilla", f"model_weights={w}"] and g.seeds == [41, 42]
        assert g.d_hack == pytest.approx(d_hack)
    assert by["vanilla", "model_weights=(absent)"].seeds == [43]
    assert legacy.name in {r.path.name for r in records}


def test_model_weights_must_be_a_string(tmp_path):
    d = write_run(tmp_path)
    _set_weights(d, 123)
    _, skipped = scan_runs(tmp_path)
    assert [s.reason for s in skipped] == ["config.json: field 'provenance.model_weights' must be a string"]


def test_block_effects_script_pairs_the_reset_within_runs_and_scorda_against_its_reverse(tmp_path):
    """scripts/block_effects.py: deploy − trained per seed (paired t), and absorb's scorda − scorda_rev
    deployed hack paired by seed; hand-computed (t_{0.975,1} = 12.706)."""
    for adapter, runs in (("scorda", ((41, 0.6, 0.3), (42, 0.8, 0.4))),
                          ("scorda_rev", ((41, 0.6, 0.5), (42, 0.8, 0.5)))):
        for seed, trained, deployed in runs:
            write_run(tmp_path, preset="organism", arm="absorb", seed=seed, eval_set="heldout",
                      hack_train=trained, hack_deploy=deployed, knobs={"adapter": adapter},
                      stamp=f"2026010{len(adapter) % 9}T0000{seed}")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "block_effects.py"), "--runs", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(" | ")[1]: line for line in proc.stdout.splitlines() if line.startswith("| absorb")}
    half = 12.706204736174707 * math.sqrt(0.005) / math.sqrt(2)
    assert f"| -0.350 [{-0.35 - half:+.3f}, {-0.35 + half:+.3f}] | n/a |" in rows["scorda"]
    assert "| 0.700 [" in rows["scorda"] and "| 0.350 [" in rows["scorda"]
    half_rev = 12.706204736174707 * math.sqrt(0.02) / math.sqrt(2)  # diffs -0.1, -0.3
    assert f"| -0.200 [{-0.2 - half_rev:+.3f}, {-0.2 + half_rev:+.3f}] | n/a |" in rows["scorda_rev"]
    assert (f"scorda − scorda_rev over seeds [41, 42]: -0.150 [{-0.15 - half:+.3f}, {-0.15 + half:+.3f}] "
            "(paired t); clusters n/a") in proc.stdout
    for d in tmp_path.iterdir():  # scorda_rev's deployed hack 0.4 and 0.5: scorda − scorda_rev -0.1 at both seeds
        if "scorda_rev" in json.loads((d / "config.json").read_text())["config"]["adapter"]:
            rec = json.loads((d / "per_mode_deploy.json").read_text())
            seed_rate = {41: 0.4, 42: 0.5}[rec["seed"]]
            rec["hack_deploy"] = seed_rate
            rec["by_mode"] = {m: dict(v, deploy_hack=seed_rate) for m, v in rec["by_mode"].items()}
            (d / "per_mode_deploy.json").write_text(json.dumps(rec))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "block_effects.py"), "--runs", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert "scorda − scorda_rev over seeds [41, 42]: -0.100 [no spread] (paired t)" in proc.stdout, proc.stdout


def test_block_effects_never_pools_configs_and_pairs_scorda_with_its_own_reverse(tmp_path):
    """Runs that differ in a science knob (here lr) are separate rows, and each scorda group is paired
    with the scorda_rev group of the same other knobs: pooled, both would read 0.5 / 0.45."""
    for lr, base in ((1e-3, 0.2), (2e-2, 0.8)):
        for adapter, shift in (("scorda", 0.0), ("scorda_rev", 0.1)):
            for seed in (41, 42):
                write_run(tmp_path, preset="organism", arm="absorb", seed=seed, eval_set="heldout",
                          hack_train=0.9, hack_deploy=base + shift, knobs={"adapter": adapter, "lr": lr},
                          stamp=f"2026010{int(lr * 1000) % 9}T{len(adapter)}{seed}")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "block_effects.py"), "--runs", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| absorb | scorda |")]
    assert sorted(line.split(" | ")[5].split()[0] for line in rows) == ["0.200", "0.800"]
    pairs = [line for line in proc.stdout.splitlines() if "scorda − scorda_rev" in line]
    assert len(pairs) == 2 and all(": -0.100 [no spread] (paired t)" in line for line in pairs), pairs


def test_keep_runs_copies_only_the_records_of_complete_runs_and_rereads_the_same(tmp_path):
    """scripts/keep_runs.py: per complete run, exactly the four record files (no checkpoints); a run
    that is not complete is skipped with its reason; the kept folder scans to the same records as
    the source; a second pass keeps nothing new; a kept folder with other bytes is refused before
    anything is copied."""
    src, dest = tmp_path / "runs", tmp_path / "kept"
    a = write_run(src, seed=41, stamp="20260101T000001")
    write_run(src, seed=42, stamp="20260101T000002")
    write_run(src, seed=43, stamp="20260101T000003", state="running", deploy=False)
    (a / "checkpoint").mkdir()
    (a / "checkpoint" / "adapter.safetensors").write_bytes(b"weights")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "keep_runs.py"), str(src), str(dest)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "kept 2 run(s)" in proc.stdout and "(0 already there)" in proc.stdout
    assert "skipped 20260101T000003_smoke_vanilla_seed43: " in proc.stdout
    assert sorted(p.name for p in dest.iterdir()) == [a.name, "20260101T000002_smoke_vanilla_seed42"]
    assert sorted(p.name for p in (dest / a.name).iterdir()) == sorted(
        ["config.json", "status.json", "per_mode_deploy.json", "rows.jsonl"])
    src_recs, _ = scan_runs(src)
    kept_recs, kept_skipped = scan_runs(dest)
    assert not kept_skipped
    assert [(r.seed, r.config_hash, r.hack_deploy) for r in kept_recs] == [
        (r.seed, r.config_hash, r.hack_deploy) for r in src_recs]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "keep_runs.py"), str(src), str(dest)],
                          capture_output=True, text=True, timeout=60)
    assert "kept 0 run(s)" in proc.stdout and "(2 already there)" in proc.stdout
    (dest / a.name / "rows.jsonl").write_text("{}\n")
    write_run(src, seed=44, stamp="20260101T000004")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "keep_runs.py"), str(src), str(dest)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and f"{dest / a.name} is already kept with other content" in proc.stderr
    assert not (dest / "20260101T000004_smoke_vanilla_seed44").exists()


def test_student_hack_script_sums_first_and_last_steps_per_experiment(tmp_path):
    """scripts/student_hack.py: hack_s summed over the first and last k steps of each run, then over an
    experiment's seeds; a Haar control is its own row. write_run's hack counts are
    min(8, round(0.4 s + seed % 3)) at step s (hand-computed below)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from student_hack import window_counts
    finally:
        sys.path.remove(str(REPO / "scripts"))
    rows = [{"step": s, "hack_s": [h, 6]} for s, h in ((2, 3), (0, 1), (3, 4), (1, 2))]
    assert window_counts(rows, 1) == ((1, 6), (4, 6))
    assert window_counts(rows, 3) == ((6, 18), (9, 18))  # steps 0-2 and 1-3
    assert window_counts(rows, 9) == ((10, 24), (10, 24))  # overlapping windows, not shrunk
    with pytest.raises(ValueError, match="k must be >= 1"):
        window_counts(rows, 0)
    write_run(tmp_path, seed=41, stamp="20260101T000001")
    write_run(tmp_path, seed=42, stamp="20260101T000002")
    write_run(tmp_path, arm="routing2", seed=41, random_v_seed=7, stamp="20260101T000003")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "student_hack.py"), "--runs", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| vanilla") or ln.startswith("| routing2")]
    # seed 41: first 2+2+3, last 5+5+6; seed 42: first 0+0+1, last 3+3+4
    assert len(lines) == 2 and any(ln.endswith("| 41,42 | 8/48 | 26/48 |") for ln in lines)
    assert any(ln.startswith("| routing2, Haar |") and ln.endswith("| 41 | 7/24 | 16/24 |") for ln in lines)
