"""Presets, overrides, validation and the resume config diff."""

import dataclasses
import math
import typing

import pytest

from vgrout.config import (
    NUMERIC_RANGES,
    Config,
    FastConfig,
    FullConfig,
    SmokeConfig,
    config_diff,
    config_from_dict,
    parse_cli,
)


def test_presets_follow_the_design_table():
    s, f, u = SmokeConfig(), FastConfig(), FullConfig()
    assert (s.model, s.steps, s.group, s.max_new, s.n_problems, s.prompts_per_step) == ("tiny-qwen3", 30, 4, 32, 100, 1)
    assert (f.steps, f.group, f.max_new, f.n_problems, f.prompts_per_step, f.lr) == (60, 8, 512, 200, 4, 3e-3)
    assert (f.adam_beta1, f.adam_beta2, f.mix_ratio) == (0.5, 0.9, 0.125)
    assert (u.steps, u.group, u.max_new, u.n_problems, u.prompts_per_step, u.beta) == (200, 6, 1024, 992, 43, 1e-3)
    assert f.teacher_split == (7, 1)


def test_organism_preset_reads_what_vgrout_organism_builds():
    from vgrout import organism as O
    from vgrout.config import OrganismConfig

    o = OrganismConfig()
    assert (o.model, o.intervention, o.env_mode, o.device) == (O.ORGANISM, "none", O.MODE, "cpu")
    assert o.data_path == O.DATA_DIR / O.TRAIN_FILE and o.eval_data_path == O.DATA_DIR / O.HELDOUT_FILE
    assert o.teacher_pool_dir == O.POOL_DIR
    assert o.n_problems == len(O.split_rows()[0]) and o.eval_n_prompts == len(O.HELDOUT_IDS)
    assert parse_cli(["organism", "--intervention=route2"]).run_id == "organism_routing2_seed41"
    with pytest.raises(ValueError, match="--adapt-top-layers"):
        parse_cli(["organism", "--adapt-top-layers=-1"])


def test_cli_overrides_and_run_id():
    c = parse_cli(["fast", "--intervention=route2", "--lr=1e-2", "--seed=7", "--out-tag=_x"])
    assert (c.intervention, c.lr, c.seed) == ("route2", 1e-2, 7)
    assert c.run_id == "fast_routing2_seed7_x"
    c = parse_cli(["smoke", "--intervention=erase", "--route2-random-v-seed=3"])
    assert c.random_v_seed == 3 and c.run_id == "smoke_projected_seed41_haar3"


@pytest.mark.parametrize("args,needle", [
    (["--mix-ratio=1.0"], "--mix-ratio must be in [0, 1)"),
    (["--mix-ratio=-0.1"], "--mix-ratio must be in [0, 1)"),
    (["--group=2", "--mix-ratio=0.75"], "G_s=0"),
    (["--half-a=E,X"], "unknown detector codes ['X']"),
    (["--v-hack-k=99"], "--v-hack-k"),
    (["--steps=0"], "--steps"),
])
def test_bad_config_is_one_clear_error(args, needle):
    with pytest.raises(ValueError) as e:
        parse_cli(["smoke", *args])
    assert needle in str(e.value)


def test_round_trip_and_diff():
    c = parse_cli(["smoke", "--lr=0.5", "--teacher-modes", "run_tests", "sentinel"])
    d = c.to_dict()
    assert config_from_dict(d).to_dict() == d
    d2 = dict(d, lr=0.25, resume="x", stop_after_steps=3)
    assert config_diff(d, d2) == ["lr: 0.5 -> 0.25"]


def test_grade_time_limit_knob_picks_the_graders_time_policy():
    from vgrout.env.rewards import DEFAULT_TIME, RelativeTime

    assert parse_cli(["smoke"]).time_limit == DEFAULT_TIME == RelativeTime()
    assert parse_cli(["fast", "--grade-time-limit", "fixed"]).time_limit is None
    with pytest.raises(SystemExit):
        parse_cli(["smoke", "--grade-time-limit", "sometimes"])


def _numeric_knobs() -> list[str]:
    hints = typing.get_type_hints(Config)
    numeric = {int, float, int | None, float | None}
    return [f.name for f in dataclasses.fields(Config) if hints[f.name] in numeric]


def test_every_numeric_knob_has_a_range():
    knobs = _numeric_knobs()
    assert len(knobs) > 25 and "lr" in knobs and "teacher_off_step" in knobs
    assert set(knobs) == set(NUMERIC_RANGES), set(knobs) ^ set(NUMERIC_RANGES)


def _out_of_range(name: str) -> list:
    """Values just outside the knob's range, plus NaN and inf for every knob."""
    r = NUMERIC_RANGES[name]
    is_int = typing.get_type_hints(Config)[name] in (int, int | None)
    step = 1 if is_int else 1e-9
    bad = [math.nan, math.inf, -math.inf]
    if r.lo is not None:
        bad.append(r.lo if r.lo_open else r.lo - step)
    if r.hi is not None:
        bad.append(r.hi if r.hi_open else r.hi + step)
    return bad


@pytest.mark.parametrize("name", sorted(NUMERIC_RANGES))
def test_each_numeric_knob_refuses_values_outside_its_range(name):
    flag = "--" + name.replace("_", "-")
    base = {"intervention": "erase"} if name == "random_v_seed" else {}
    if name == "teacher_off_step":
        base["teacher_pool_dir"] = None
    for bad in _out_of_range(name):
        cfg = dataclasses.replace(FastConfig(**base), **{name: bad})
        with pytest.raises(ValueError) as e:
            cfg.validate()
        lines = str(e.value).splitlines()[1:]
        assert len(lines) == 1 and lines[0].strip().startswith(f"{flag} must be"), (name, bad, str(e.value))
    # the bounds themselves (where closed) are accepted
    r = NUMERIC_RANGES[name]
    for ok in [b for b, open_ in ((r.lo, r.lo_open), (r.hi, r.hi_open)) if b is not None and not open_]:
        cfg = dataclasses.replace(FastConfig(**base), **{name: type(getattr(FastConfig(), name) or 0)(ok)})
        try:
            cfg.validate()
        except ValueError as e:
            assert flag + " must be" not in str(e), (name, ok, str(e))


@pytest.mark.parametrize("args,needle", [
    (["--lr=-1"], "--lr must be > 0 (got -1.0)"),
    (["--lr=nan"], "--lr must be > 0 (got nan)"),
    (["--temperature=0"], "--temperature must be > 0"),
    (["--group=1"], "--group must be >= 2"),
    (["--adam-beta2=1.0"], "--adam-beta2 must be in [0, 1)"),
    (["--seed=-3"], "--seed must be in [0, 4.29497e+09]"),
    (["--max-new=4096"], "leaves no room for a prompt in --max-seq-len=2048"),
    (["--eval-n-prompts=0"], "--eval-n-prompts must be >= 1"),
])
def test_numeric_cli_errors_name_the_flag(args, needle):
    with pytest.raises(ValueError) as e:
        parse_cli(["smoke", *args])
    assert needle in str(e.value)


def test_report_to_is_a_choice_and_resume_mutable():
    assert parse_cli(["smoke"]).report_to == "none"
    assert parse_cli(["smoke", "--report-to", "tensorboard"]).report_to == "tensorboard"
    with pytest.raises(SystemExit):
        parse_cli(["smoke", "--report-to", "mlflow"])
    a, b = parse_cli(["smoke"]).to_dict(), parse_cli(["smoke", "--report-to=wandb"]).to_dict()
    assert config_diff(a, b) == []


def test_report_to_without_its_package_fails_at_parse(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(ValueError, match=r"--report-to wandb needs the `wandb` package: uv sync --extra wandb"):
        parse_cli(["smoke", "--report-to=wandb"])
