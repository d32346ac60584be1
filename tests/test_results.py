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
INTERVENTION = {"vanilla": "none", "projected": "erase", "routing": "route", "routing2": "route2"}


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
) -> Path:
    """One run folder: config.json, status.json, rows.jsonl, and (if `deploy`) the final
    per_mode_deploy.json. `by_mode` maps mode -> (deploy_hack, deploy_solve)."""
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
            "eval_n": 16,
            "eval_set": eval_set,
            "by_mode": bm,
            "sets": {"train": {"source": "builtin", "n": 16, "by_mode": bm}},
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
    groups = {(g.arm, g.control): g for g in aggregate(runs, solve_tol=0.05)}
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
    assert v.d_hack is None and v.matched is None

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
    assert r.matched is True

    haar = groups[("routing2", "haar")]
    assert haar.random_v_seeds == [7] and haar.hack_deploy.lo is None  # n = 1: no CI
    assert haar.d_hack == pytest.approx(-0.05) and haar.d_hack_ci is None

    proj = groups[("projected", "")]
    assert proj.d_solve == pytest.approx(-0.22) and proj.matched is False


def test_group_notes_mixed_step_counts(tmp_path):
    write_run(tmp_path, seed=41, steps=10)
    write_run(tmp_path, seed=42, steps=20)
    (g,) = aggregate(scan_runs(tmp_path)[0])
    assert g.steps == [10, 20] and g.note == "mixed step counts [10, 20]"


def test_same_seed_twice_counts_once_newest_wins(tmp_path):
    old = write_run(tmp_path, seed=41, hack_deploy=0.9, stamp="20260101T000000")
    new = write_run(tmp_path, seed=41, hack_deploy=0.1, stamp="20260102T000000")
    runs, skipped = scan_runs(tmp_path)
    assert [r.path for r in runs] == [new]
    assert [(s.path, s.reason) for s in skipped] == [(old, f"superseded by {new.name} (same seed)")]


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
    assert "| smoke    | vanilla         | train  | 3   | 0.600 [0.352, 0.848]" in text
    assert "| routing2 (haar)" in text and "(CI n/a)" in text
    assert "-0.450 [-0.699, -0.201] (solve -0.010, at matched solve)" in text
    assert "-0.200 (solve -0.220, solve differs > 0.05)" in text
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
    assert rows[("routing2", "")]["matched_solve"] == "true"
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
    r2 = groups[("smoke", "routing2", "")]
    assert r2.d_hack == pytest.approx(0.2 - 0.6) and r2.d_solve == pytest.approx(0.02)
    vh = groups[("smoke", "vanilla", "haar")]
    assert vh.d_hack == pytest.approx(0.9 - 0.6) and vh.matched is False  # compared, not the base
    assert groups[("smoke", "vanilla", "")].d_hack is None
    assert groups[("fast", "routing2", "")].d_hack is None  # only a haar vanilla: no baseline
    assert groups[("fast", "vanilla", "haar")].d_hack is None
    table = markdown_table(list(groups.values()))
    assert table.count("(baseline)") == 1 and table.count("no vanilla") == 2


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
        "seed": [(True, "'seed' must be an integer"), (4.0, "'seed' must be an integer")],
        "random_v_seed": [("3", "'random_v_seed' must be an integer")],
        "model": [("", "'model' must be a non-empty string"), (3, "'model' must be a non-empty")],
        "by_mode": [({"run_tests": 0.5}, "by_mode['run_tests'] must be an object"),
                    ({"run_tests": {"train_hack": 0.1}}, "by_mode['run_tests']: field 'train_solve'"),
                    ([1], "'by_mode' must be a non-empty object")],
    }
    for field, values in cases.items():
        for value, msg in values:
            (d / "per_mode_deploy.json").write_text(json.dumps(dict(rec, **{field: value})))
            runs, skipped = scan_runs(tmp_path)
            assert not runs and msg in skipped[0].reason, (field, value, skipped)
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


def test_group_order_mixed_models_and_exact_tolerance(tmp_path):
    # solve rates are exact binary fractions, so |Δsolve| can equal the tolerance exactly
    write_run(tmp_path, arm="routing", seed=41, hack_deploy=0.3, solve_deploy=0.5)
    write_run(tmp_path, arm="vanilla", seed=41, hack_deploy=0.5, solve_deploy=0.25)
    write_run(tmp_path, arm="routing2", seed=41, hack_deploy=0.3, solve_deploy=0.25)
    write_run(tmp_path, arm="projected", seed=41, hack_deploy=0.3, solve_deploy=0.375)
    d = write_run(tmp_path, arm="routing2", seed=42, hack_deploy=0.3, solve_deploy=0.25, steps=12)
    rec = json.loads((d / "per_mode_deploy.json").read_text())
    (d / "per_mode_deploy.json").write_text(json.dumps(dict(rec, model="other-model")))
    groups = aggregate(scan_runs(tmp_path)[0], solve_tol=0.125)
    assert [g.arm for g in groups] == ["vanilla", "projected", "routing", "routing2"]
    r2 = groups[-1]
    assert r2.models == ["other-model", "tiny-qwen3"]
    assert r2.note == "mixed models ['other-model', 'tiny-qwen3']; mixed step counts [10, 12]"
    proj, routing = groups[1], groups[2]
    assert proj.d_solve == 0.125 and proj.matched is True  # |Δ| = tol counts as matched
    assert routing.d_solve == 0.25 and routing.matched is False
    csv_rows = list(csv.DictReader(io.StringIO(csv_text(groups))))
    assert csv_rows[-1]["models"] == "other-model tiny-qwen3" and csv_rows[-1]["note"] == r2.note
    assert csv_rows[-1]["steps"] == "10 12" and csv_rows[0]["steps"] == "10"
    assert csv_rows[0]["matched_solve"] == "" and csv_rows[0]["note"] == ""
    assert csv_rows[1]["d_solve_vs_vanilla"] == "0.125" and csv_rows[1]["matched_solve"] == "true"
    assert csv_rows[2]["matched_solve"] == "false"
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
    assert header[:19] == CSV_BASE_COLUMNS
    assert header[19:22] == ["deploy_hack_run_tests", "deploy_hack_gt_only", "deploy_hack_zz_new"]
    assert header[22:] == ["d_hack_vs_vanilla", "d_hack_ci_lo", "d_hack_ci_hi", "d_solve_vs_vanilla",
                           "matched_solve", "models", "steps", "note"]
    table = markdown_table(groups)
    assert "deploy hack zz_new" in table and table.index("deploy hack run_tests") < table.index("zz_new")


def test_write_csv_names_and_solve_tol_flag(tmp_path, capsys):
    write_run(tmp_path / "runs", arm="vanilla", seed=41, solve_deploy=0.30)
    write_run(tmp_path / "runs", arm="routing2", seed=41, solve_deploy=0.20)
    groups = aggregate(scan_runs(tmp_path / "runs")[0])
    path = write_csv(groups, tmp_path / "o", stamp="STAMP")
    assert path == tmp_path / "o" / "results_STAMP.csv"
    assert (tmp_path / "o" / "results_latest.csv").read_text() == path.read_text() == csv_text(groups)
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o"), "--solve-tol", "0.2"]) == 0
    assert "(solve -0.100, at matched solve)" in capsys.readouterr().out
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o")]) == 0
    assert "solve differs > 0.05" in capsys.readouterr().out



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
    rows = _cells(markdown_table(groups))
    assert list(rows[0]) == ["preset", "arm", "eval", "n", "deploy hack", "deploy solve", "train hack",
                             "train solve", "deploy hack run_tests", "deploy hack sentinel",
                             "Δ deploy hack vs vanilla"]
    assert rows[0] == {
        "preset": "smoke", "arm": "vanilla", "eval": "train", "n": "1",
        "deploy hack": "0.500 (CI n/a)", "deploy solve": "0.250 (CI n/a)", "train hack": "0.500",
        "train solve": "0.250", "deploy hack run_tests": "0.500", "deploy hack sentinel": "0.250",
        "Δ deploy hack vs vanilla": "(baseline)"}
    assert rows[1]["arm"] == "routing2" and rows[1]["deploy hack sentinel"] == ""  # no such mode
    assert rows[1]["Δ deploy hack vs vanilla"] == "-0.375 (solve +0.000, at matched solve)"
    assert rows[2]["arm"] == "routing2 (haar)"
    assert rows[2]["Δ deploy hack vs vanilla"] == "-0.250 (solve +0.250, solve differs > 0.05)"
    lone = aggregate([r for r in runs if r.arm != "vanilla"])
    assert {r["Δ deploy hack vs vanilla"] for r in _cells(markdown_table(lone))} == {"no vanilla"}
    assert _cells(skipped_table(skipped)) == [
        {"run folder": skipped[0].path.name, "why not averaged": "status 'failed', 5/10 steps done: boom"}]
    assert skipped_table(skipped).splitlines()[1].startswith("|--")  # github format
    van = next(r for r in runs if r.arm == "vanilla")
    note = aggregate([*runs, dataclasses.replace(van, model="m2", seed=42)])
    assert _cells(markdown_table(note))[0]["note"] == "mixed models ['m2', 'tiny-qwen3']"
    csv_rows = list(csv.DictReader(io.StringIO(csv_text(groups))))
    assert csv_rows[1]["deploy_hack_sentinel"] == "" and "\r" not in csv_text(groups)


def test_main_output_defaults_and_help(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "out" / "runs", arm="vanilla", seed=41, hack_deploy=0.5, solve_deploy=0.25)
    write_run(tmp_path / "out" / "runs", arm="routing2", seed=41, hack_deploy=0.25, solve_deploy=0.5)
    assert main([]) == 0  # --runs out/runs, --out out/results
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "## Deployed hack / solve by arm (2 runs under out/runs)"
    assert out[2] == "Rates are mean [95% Student-t CI over seeds]; deploy = quarantine ablated."
    assert out[4].startswith("| preset ")
    (latest,) = (tmp_path / "out" / "results").glob("results_latest.csv")
    (stamped,) = [p for p in (tmp_path / "out" / "results").glob("results_*.csv") if p != latest]
    assert re.fullmatch(r"results_\d{8}T\d{6}\.csv", stamped.name)
    assert out[-1] == f"CSV: {Path('out/results') / stamped.name} (and out/results/results_latest.csv)"
    assert main(["--solve-tol", "0.2"]) == 0
    assert "(solve +0.250, solve differs > 0.2)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for part in ("usage: results.py", "[--runs RUNS]", "[--out OUT]", "[--solve-tol SOLVE_TOL]",
                 "Aggregate complete runs into one table per (preset, arm, control): deployed "
                 "hack/solve mean and 95% t-interval over seeds, delta vs vanilla.",
                 "folder of run folders", "where CSVs go",
                 "a delta vs vanilla counts as 'at matched solve' when |Δsolve| <= this"):
        assert part in text, part


def test_record_fields_and_messages_are_exact(tmp_path):
    d = write_run(tmp_path, seed=41)
    (r,), _ = scan_runs(tmp_path)
    assert (r.run_id, r.preset, r.arm, r.seed, r.model, r.steps, r.eval_n, r.eval_set) == (
        "smoke_vanilla_seed41", "smoke", "vanilla", 41, "tiny-qwen3", 10, 16, "train")
    assert (r.control, r.random_v_seed) == ("", None)
    rec = json.loads((d / "per_mode_deploy.json").read_text())
    bad = {
        "hack_deploy": (1.5, "per_mode_deploy.json: field 'hack_deploy' = 1.5 is not a rate in [0, 1]"),
        "seed": (None, "per_mode_deploy.json: field 'seed' must be an integer, got None"),
        "steps": ("10", "per_mode_deploy.json: field 'steps' must be an integer, got '10'"),
        "steps_done": (None, "per_mode_deploy.json: field 'steps_done' must be an integer, got None"),
        "eval_n": (None, "per_mode_deploy.json: field 'eval_n' must be an integer, got None"),
        "random_v_seed": (1.5, "per_mode_deploy.json: field 'random_v_seed' must be an integer, got 1.5"),
        "eval_set": (None, "per_mode_deploy.json: field 'eval_set' must be a non-empty string, got None"),
        "run_id": ("", "per_mode_deploy.json: field 'run_id' must be a non-empty string, got ''"),
        "preset": (None, "per_mode_deploy.json: field 'preset' must be a non-empty string, got None"),
        "arm": (None, "per_mode_deploy.json: field 'arm' must be a non-empty string, got None"),
        "by_mode": ({"run_tests": {"train_hack": 2}},
                    "per_mode_deploy.json by_mode['run_tests']: field 'train_hack' = 2 is not a rate in [0, 1]"),
    }
    for field, (value, msg) in bad.items():
        (d / "per_mode_deploy.json").write_text(json.dumps(dict(rec, **{field: value})))
        assert [s.reason for s in scan_runs(tmp_path)[1]] == [msg], field


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
    write_run(tmp_path / "h", arm="routing2", seed=42, random_v_seed=4)
    (g,) = aggregate(scan_runs(tmp_path / "h")[0])
    row = next(csv.DictReader(io.StringIO(csv_text([g]))))
    assert row["random_v_seeds"] == "3 4" and row["seeds"] == "41 42"
    assert float(row["hack_deploy_ci_hi"]) == pytest.approx(g.hack_deploy.hi)
