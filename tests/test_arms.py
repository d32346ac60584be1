"""The arms as objects: every arm is built from its name, and what it declares is what the loop does."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from vgrout import proj
from vgrout.arms import ARMS, DIAG_KEYS, Route, Route2, StepGrads, arm_class
from vgrout.config import ARM_NAMES, Intervention, parse_cli


def test_every_intervention_has_exactly_one_arm():
    assert set(ARMS) == set(ARM_NAMES) == set(get_args(Intervention))
    for name in ARM_NAMES:
        cls = arm_class(name)
        assert cls.key == name
        arm = cls(parse_cli(["smoke", f"--intervention={name}"]))
        assert arm.display == ARM_NAMES[name]
        assert arm.uses_directions == (cls.basis is not None)
        assert set(cls.columns) <= set(DIAG_KEYS)
    with pytest.raises(ValueError, match="valid: none, erase, route, route2"):
        arm_class("projected")


def test_arm_specific_config_errors():
    with pytest.raises(ValueError, match="--random-v-seed is a control for arms with hack directions; none"):
        parse_cli(["smoke", "--intervention=none", "--random-v-seed=3"])
    for name in ("erase", "route", "route2"):
        assert parse_cli(["smoke", f"--intervention={name}", "--random-v-seed=3"]).random_v_seed == 3


def test_quarantine_rule_follows_the_trait():
    for name, cls in ARMS.items():
        arm = cls(parse_cli(["smoke", f"--intervention={name}"]))
        if cls.has_quarantine:
            arm.check_quarantine(0.5)
            with pytest.raises(RuntimeError, match="nothing was routed"):
                arm.check_quarantine(0.0)
        else:
            arm.check_quarantine(0.0)
            with pytest.raises(RuntimeError, match="must stay exactly 0"):
                arm.check_quarantine(1e-12)
    control = Route2(parse_cli(["smoke", "--intervention=route2", "--random-v-seed=1"]))
    control.check_quarantine(0.0)  # a Haar control that routed nothing is a result


def test_route_span_check_refuses_a_gradient_outside_span():
    class Dirs:
        v_hack = {"m": torch.eye(4)[:2]}

    arm = Route(parse_cli(["smoke", "--intervention=route"]), Dirs())
    arm._check_span({"m": torch.tensor([1.0, -2.0, 0.0, 0.0])})
    assert arm.span_checked
    fresh = Route(parse_cli(["smoke", "--intervention=route"]), Dirs())
    with pytest.raises(RuntimeError, match="escaped span"):
        fresh._check_span({"m": torch.tensor([1.0, 0.0, 0.1, 0.0])})
    fresh.load_state_dict(arm.state_dict())
    assert fresh.span_checked


def test_route2_state_round_trips_its_gate():
    cfg = parse_cli(["smoke", "--intervention=route2"])

    class Dirs:
        v_grad = {"m": torch.tensor([1.0, 0.0, 0.0])}

    class G:
        is_student = [True, True, False]

        @staticmethod
        def column(attr):
            return [False, True, False]

    a, b = Route2(cfg, Dirs()), Route2(cfg, Dirs())
    g_b = {"m": torch.tensor([[0.2, 1.0, 0.0], [1.0, 0.1, 0.0], [0.9, 0.0, 0.3]])}
    votes = a.observe_group(G(), g_b, {"m": g_b["m"].sum(0)})
    assert votes.tolist() == [False, True, True]  # student E-flagged row and the teacher row are anchors
    b.load_state_dict(a.state_dict())
    assert b.gate.tau("m") == a.gate.tau("m") and not math.isnan(a.gate.tau("m"))
    upd = a.intervene(StepGrads(total={"m": g_b["m"].sum(0)}))
    torch.testing.assert_close(upd.kept["m"] + upd.routed["m"], g_b["m"].sum(0))
    torch.testing.assert_close(upd.routed["m"], g_b["m"][1] + g_b["m"][2])
    a.begin_step()
    assert not a.kept and not a.routed and not a.results


def test_step_grads_split_sums_to_total():
    class G:
        is_student = [True, False, True]

        @staticmethod
        def column(attr):
            return [True, True, False]

    acc = StepGrads(split=True)
    gb = torch.arange(12.0).reshape(3, 4)
    acc.add_group(G(), {"m": gb.sum(0)}, {"m": gb}, torch.tensor([True, True, False]))
    acc.add_group(G(), {"m": gb.sum(0)}, {"m": gb}, None)
    torch.testing.assert_close(acc.student["m"] + acc.teacher["m"], acc.total["m"])
    torch.testing.assert_close(acc.teacher["m"], 2 * gb[1])
    assert acc.routed_votes == [True, False] and acc.exploited == [True, False]  # student rows only


# ── the loop with each arm: one real step on the tiny model ──


@pytest.fixture(scope="module")
def smoke_inputs(tmp_path_factory):
    from _golden import build_inputs

    return build_inputs(tmp_path_factory.mktemp("arm_inputs"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARM_NAMES))
def test_one_step_does_what_the_arm_declares(smoke_inputs, tmp_path, name):
    from vgrout import train
    from vgrout.inputs import load_inputs

    pool, pairs = smoke_inputs
    cfg = parse_cli(["smoke", f"--intervention={name}", f"--teacher-pool-dir={pool}", f"--vhack-pairs-path={pairs}",
                     f"--out-root={tmp_path}", "--steps=2", "--max-new=8", "--eval-ablate-every=0",
                     "--v-hack-extract-top-k=2", "--v-hack-k=1", "--v-hack-n-heldout=1", "--rollout-ablate-frac=0.5",
                     "--prompts-per-step=2"])
    run = train.setup(cfg, load_inputs(cfg), tmp_path, torch.device("cpu"))
    arm = run.arm
    assert type(arm) is ARMS[name] and run.dirs.active == arm.uses_directions
    row, groups = train.train_step(run, 0)
    assert row["zv"] < len(groups), "the step must have a gradient for this test to mean anything"
    moved = math.sqrt(sum(float(k.delta_S.detach().pow(2).sum()) for k in run.knobs.values()))
    assert moved > 0
    assert (train.quarantine_norm(run.knobs) > 0) == arm.has_quarantine
    # ablated sampling (the deployed model) only where there is a quarantine to ablate
    assert (row["hack_abl"][1] > 0) == arm.has_quarantine
    for key in DIAG_KEYS:
        declared = key in arm.columns
        assert math.isfinite(row[key]) or not declared, (name, key)
        if not arm.uses_directions:
            assert math.isnan(row[key]), (name, key)
    # per-rollout gradients were recorded exactly when the arm asked for them
    recorded = any(k.per_rollout_grad is not None for k in run.knobs.values())
    assert recorded == arm.needs_rollout_grads(row["split"])
    # gate-as-classifier statistics exist only for arms that vote per rollout
    assert math.isnan(row["prec"]) or arm.uses_directions


def test_route2_gate_is_what_proj_defines():
    """The arm delegates the math: same flags and split as proj.Route2Gate on the same inputs."""
    cfg = parse_cli(["smoke", "--intervention=route2"])

    class Dirs:
        v_grad = {"m": torch.nn.functional.normalize(torch.randn(6, generator=torch.Generator().manual_seed(0)), dim=0)}

    class G:
        is_student = [True, True, True, False]

        @staticmethod
        def column(attr):
            return [False] * 4

    gb = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    arm = Route2(cfg, Dirs())
    arm.observe_group(G(), {"m": gb}, {"m": gb.sum(0)})
    ref = proj.Route2Gate(beta=0.9).step("m", gb, Dirs.v_grad["m"], torch.tensor([False, False, False, True]))
    torch.testing.assert_close(arm.routed["m"], ref.routed)
    torch.testing.assert_close(arm.kept["m"], ref.kept)
