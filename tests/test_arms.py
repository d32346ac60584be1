"""The arms as objects: every arm is built from its name, and what it declares is what the loop does."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from vgrout import proj
from vgrout.adapter import AdapterModule
from vgrout.arms import ARMS, BLOCK_ARMS, DIAG_KEYS, Route, Route2, StepGrads, arm_class
from vgrout.config import ARM_NAMES, AdapterKind, Intervention, parse_cli


def test_every_intervention_has_exactly_one_arm_per_adapter_family():
    assert set(ARMS) | set(BLOCK_ARMS) == set(ARM_NAMES) == set(get_args(Intervention))
    for adapter in get_args(AdapterKind):
        family = ARMS if adapter == "svd" else BLOCK_ARMS
        for name in ARM_NAMES:
            if name in family:
                assert arm_class(name, adapter) is family[name]
                assert family[name].family == ("svd" if adapter == "svd" else "block")
            else:
                with pytest.raises(ValueError, match=f"--intervention={name} does not exist for --adapter={adapter}"):
                    arm_class(name, adapter)
    for name in ARMS:
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
            with pytest.raises(RuntimeError, match="nothing went into the quarantine"):
                arm.check_quarantine(0.0)
        else:
            arm.check_quarantine(0.0)
            with pytest.raises(RuntimeError, match="must stay exactly 0"):
                arm.check_quarantine(1e-12)
    control = Route2(parse_cli(["smoke", "--intervention=route2", "--random-v-seed=1"]))
    control.check_quarantine(0.0)  # a Haar control that routed nothing is a result
    for name, cls in BLOCK_ARMS.items():  # `none` trains and deploys both blocks: any norm is fine
        arm = cls(parse_cli(["smoke", "--adapter=lora2r", f"--intervention={name}"]))
        arm.check_quarantine(0.5)
        if cls.has_quarantine:
            with pytest.raises(RuntimeError, match="nothing went into the quarantine"):
                arm.check_quarantine(0.0)
        else:
            arm.check_quarantine(0.0)
    BLOCK_ARMS["routeA"](parse_cli(["smoke", "--adapter=lora2r", "--intervention=routeA",
                                    "--random-v-seed=1"])).check_quarantine(0.0)


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
@pytest.mark.parametrize("name", list(ARMS))
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
    assert type(arm) is ARMS[name] and run.dirs.active == (arm.directions_to_load(cfg) is not None)
    assert run.dirs.basis == arm.directions_to_load(cfg)
    row, groups = train.train_step(run, 0)
    assert row["zv"] < len(groups), "the step must have a gradient for this test to mean anything"
    moved = math.sqrt(sum(float(k.delta_S.detach().pow(2).sum()) for k in run.knobs.values()))
    assert moved > 0
    assert (train.quarantine_norm(run.knobs) > 0) == arm.has_quarantine
    # ablated sampling (the deployed model) only where there is a quarantine to ablate
    assert (row["hack_abl"][1] > 0) == arm.has_quarantine
    for key in DIAG_KEYS:
        declared = key in arm.columns
        may_be_nan = key in ("quar_resid", "leak")  # NaN when nothing was routed / nothing was exploited
        assert math.isfinite(row[key]) or not declared or may_be_nan, (name, key)
        if not arm.uses_directions and key not in ("cos_upd", "q_mass"):
            assert math.isnan(row[key]), (name, key)
    # the quarantine's share of what the optimizer moved: exactly 0 without one
    assert (row["q_mass"] > 0) == arm.has_quarantine and row["q_mass"] < 1
    # every arm is read against a hack direction after the update (vanilla's v_hack is a yardstick only)
    assert 0.0 <= row["cos_upd"] <= 1.0
    if name in ("erase", "route"):  # the default --intervene-on=update: nothing hack-ward moves in δS
        assert row["cos_upd"] <= 1e-6
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


# ── --intervene-on: the projection acts on AdamW's update, or (the reference) on the gradient ──


class _Knob(AdapterModule):
    """δS / δS_hack without a model: all apply_update touches."""

    def __init__(self, r: int) -> None:
        super().__init__()
        self.delta_S = torch.nn.Parameter(torch.zeros(r))
        self.delta_S_hack = torch.nn.Parameter(torch.zeros(r))

    def deployed(self) -> list[torch.nn.Parameter]:
        return [self.delta_S]

    def quarantine(self) -> list[torch.nn.Parameter]:
        return [self.delta_S_hack]


def _bases(shapes: dict[str, int], k: int, seed: int) -> dict[str, torch.Tensor]:
    from vgrout.vhack import haar_v_hack

    return haar_v_hack(shapes, k, seed)


def _toy_run(arm_name: str, *flags: str, r: int = 24, seed: int = 0):
    """A run-shaped object over plain knobs (no model): what update.apply_update touches."""
    from types import SimpleNamespace

    from vgrout.build import make_optimizer

    cfg = parse_cli(["smoke", f"--intervention={arm_name}", "--lr=0.05", "--adam-beta1=0.5", "--adam-beta2=0.9",
                     "--steps=40", *flags])
    knobs = {"a": _Knob(r), "b": _Knob(r + 8)}
    V = _bases({n: k.delta_S.numel() for n, k in knobs.items()}, 3, seed)

    class Dirs:
        v_hack = V

    arm = ARMS[arm_name](cfg, Dirs())
    params = [k.delta_S for k in knobs.values()] + [k.delta_S_hack for k in knobs.values()]
    opt, sched = make_optimizer(cfg, params)
    return SimpleNamespace(cfg=cfg, knobs=knobs, arm=arm, opt=opt, sched=sched, params=params), V


def _uneven_grads(run, step: int) -> dict[str, torch.Tensor]:
    """Gradients whose per-coordinate noise scales differ by 100x, so Adam's scaling matters."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = {}
    for n, k in run.knobs.items():
        r = k.delta_S.numel()
        scale = torch.logspace(-1, 1, r)
        out[n] = torch.randn(r, generator=gen) * scale + 0.3
    return out


def _plain_adamw_change(run, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The change AdamW would make to δS from the full gradient (on copies; `run` is untouched)."""
    import copy

    knobs = copy.deepcopy(run.knobs)
    params = [k.delta_S for k in knobs.values()] + [k.delta_S_hack for k in knobs.values()]
    opt = torch.optim.AdamW(params, lr=run.opt.param_groups[0]["lr"], betas=run.opt.param_groups[0]["betas"],
                            weight_decay=run.opt.param_groups[0]["weight_decay"])
    state = copy.deepcopy(run.opt.state_dict())
    opt.load_state_dict(state)
    for n, k in knobs.items():
        k.delta_S.grad = grads[n].clone()
    torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip)
    before = {n: k.delta_S.detach().clone() for n, k in knobs.items()}
    opt.step()
    return {n: k.delta_S.detach() - before[n] for n, k in knobs.items()}


@pytest.mark.parametrize("preserve", [False, True])
def test_erase_on_the_update_never_moves_hackward(preserve):
    from vgrout.update import apply_update

    flags = ["--intervene-on=update"] + ([] if preserve else ["--no-preserve-magnitude"])
    run, V = _toy_run("erase", *flags)
    for step in range(30):
        grads = _uneven_grads(run, step)
        plain = _plain_adamw_change(run, grads)
        before = {n: k.delta_S.detach().clone() for n, k in run.knobs.items()}
        row = apply_update(run, StepGrads(total=grads))
        for n, k in run.knobs.items():
            d = k.delta_S.detach() - before[n]
            assert float(torch.clamp(V[n] @ d, min=0).max()) <= 1e-7, (step, n)  # relu(V Δδs) = 0
            if not preserve:  # the orthogonal part of the plain AdamW update is untouched
                ortho = lambda x, Vn=V[n]: x - Vn.T @ (Vn @ x)  # noqa: E731
                torch.testing.assert_close(ortho(d), ortho(plain[n]), rtol=1e-5, atol=1e-7)
            assert torch.count_nonzero(k.delta_S_hack) == 0
        assert row["cos_upd"] <= 1e-6


def test_erase_on_the_gradient_lets_adam_move_hackward():
    """The reference behaviour, measured: edit the gradient and AdamW's update still drifts hack-ward."""
    from vgrout.update import apply_update

    run, V = _toy_run("erase", "--intervene-on=grad", "--no-preserve-magnitude")
    worst = 0.0
    for step in range(30):
        row = apply_update(run, StepGrads(total=_uneven_grads(run, step)))
        assert row["cos_post"] <= 1e-6  # the gradient δS received has no hack-ward part ...
        worst = max(worst, row["cos_upd"])
    assert worst > 0.05  # ... but the parameter change has one


def test_route_on_the_update_conserves_it_and_quarantines_only_span():
    from vgrout.update import apply_update

    run, V = _toy_run("route", "--intervene-on=update")
    for step in range(30):
        grads = _uneven_grads(run, step)
        plain = _plain_adamw_change(run, grads)
        before = {n: (k.delta_S.detach().clone(), k.delta_S_hack.detach().clone()) for n, k in run.knobs.items()}
        row = apply_update(run, StepGrads(total=grads))
        for n, k in run.knobs.items():
            d_s = k.delta_S.detach() - before[n][0]
            d_h = k.delta_S_hack.detach() - before[n][1]
            torch.testing.assert_close(d_s + d_h, plain[n], rtol=1e-5, atol=1e-7)  # Δδs + Δδs_hack = AdamW's
            assert proj.span_residual(k.delta_S_hack.detach(), V[n]) <= 1e-5  # δS_hack ∈ span(V)
            assert float(torch.clamp(V[n] @ d_s, min=0).max()) <= 1e-7
        assert row["quar_resid"] <= 1e-5 and row["cos_upd"] <= 1e-6
    assert run.arm.span_checked


def test_route_on_the_gradient_leaves_the_quarantine_outside_span():
    """The reference behaviour: the routed *gradient* is in span(V), AdamW's δS_hack is not."""
    from vgrout.update import apply_update

    run, V = _toy_run("route", "--intervene-on=grad")
    rows = [apply_update(run, StepGrads(total=_uneven_grads(run, step))) for step in range(5)]
    assert rows[-1]["quar_resid"] > 0.1


@pytest.mark.parametrize("name", ["erase", "route"])
def test_grad_mode_is_the_gradient_edit_bit_for_bit(name):
    """--intervene-on=grad: δS.grad / δS_hack.grad are proj's erase / route of the gradient, and the
    parameters are exactly what AdamW makes of them."""
    from vgrout.update import apply_update

    run, V = _toy_run(name, "--intervene-on=grad")
    twin, _ = _toy_run(name, "--intervene-on=grad")
    for step in range(6):
        grads = _uneven_grads(run, step)
        apply_update(run, StepGrads(total=grads))
        res = proj.project_all(grads, V, mode=name, gate_mode="one_sided", overshoot=1.0,
                               preserve_magnitude=name == "erase")
        for n, k in twin.knobs.items():
            k.delta_S.grad = res.kept[n].clone()
            k.delta_S_hack.grad = res.routed[n].clone() if n in res.routed else None
        torch.nn.utils.clip_grad_norm_(twin.params, twin.cfg.grad_clip)
        twin.opt.step()
        twin.sched.step()
        twin.opt.zero_grad(set_to_none=True)
        for n in run.knobs:
            assert torch.equal(run.knobs[n].delta_S, twin.knobs[n].delta_S)
            assert torch.equal(run.knobs[n].delta_S_hack, twin.knobs[n].delta_S_hack)


# ── the block-adapter arms: one real step each on the tiny model ──


@pytest.mark.slow
@pytest.mark.parametrize("adapter,name", [("lora2r", "none"), ("scorda", "absorb"), ("scorda", "routeA"),
                                          ("pissa", "routeA")])
def test_one_block_step_does_what_the_arm_declares(smoke_inputs, tmp_path, adapter, name):
    from vgrout import train
    from vgrout.adapter import quarantine_norm
    from vgrout.blocks import BlockLoRA
    from vgrout.inputs import load_inputs

    pool, pairs = smoke_inputs
    cfg = parse_cli(["smoke", f"--adapter={adapter}", f"--intervention={name}", f"--teacher-pool-dir={pool}",
                     f"--vhack-pairs-path={pairs}", f"--out-root={tmp_path}", "--steps=2", "--max-new=8",
                     "--eval-ablate-every=0", "--block-r=4", "--v-hack-n-heldout=1", "--prompts-per-step=2",
                     "--route-tail-q=0.25", "--rollout-ablate-frac=0.5"])
    run = train.setup(cfg, load_inputs(cfg), tmp_path, torch.device("cpu"))
    arm = run.arm
    assert type(arm) is BLOCK_ARMS[name] and all(isinstance(k, BlockLoRA) for k in run.knobs.values())
    assert not run.dirs.active  # v_hack lives in the SVD knob's coordinates
    row, groups = train.train_step(run, 0)
    assert row["zv"] < len(groups)
    dep = math.sqrt(sum(float(p.detach().pow(2).sum()) for k in run.knobs.values() for p in k.deployed()))
    assert dep > 0 and quarantine_norm(run.knobs) > 0  # both blocks trained (no rollout was all kept)
    assert 0.0 < row["q_mass"] < 1.0
    # the quarantine is ablated when sampling the deployed model exactly where the arm has one
    assert (row["hack_abl"][1] > 0) == arm.has_quarantine
    if name == "routeA":
        shares = row["m_keep"] + row["m_absorb"] + row["m_route"]
        assert shares == pytest.approx(1.0) and row["m_route"] > 0
        from vgrout.grpo import has_reward_variance

        scored = sum(g.size for g in groups if has_reward_variance(torch.tensor(g.rewards)))
        assert len(arm.gate) == scored  # every rollout of every group with a gradient was scored once
    else:
        assert math.isnan(row["m_keep"]) and math.isnan(row["m_route"])
    assert all(math.isnan(row[k]) for k in ("cos_pre", "cos_upd", "tau", "leak"))  # SVD-only diagnostics


def test_routeA_trains_each_batch_under_its_rows_masks_and_reports_the_step_shares(tmp_path):
    """The masks a group's forwards run under are the gate's, row for row (also for a sub-batch of the
    group); the step's shares count every rollout of every group once (`vact.mask_shares`); the votes
    handed to the gate-as-classifier statistics are the route cut d."""
    from _tiny import random_qwen3
    from vgrout import blocks, vact
    from vgrout.arms import RouteA

    arm = RouteA(parse_cli(["smoke", "--adapter=lora2r", "--intervention=routeA", "--block-r=2",
                            "--route-tail-q=0.2", "--random-v-seed=1"]))
    model = random_qwen3()
    knobs = blocks.wrap_blocks(model, "rq3", init="lora2r", r=2, svd_cache_root=tmp_path)
    arm.attach(model, None, knobs, None)  # the Haar control needs no pairs
    assert arm.knobs is knobs and arm.gate.names == list(knobs) and arm.gate.r == 2 and arm.gate.tail_q == 0.2
    assert arm.v_act.stacked(list(knobs)).shape == (len(knobs), 2)
    t, f = True, False
    groups = [([t, t, f, t, t], [t, f, f, f, f]),  # keep 1, absorb 3, route 1
              ([t, t, t, f], [t, t, t, f])]        # keep 1, route 3
    for m, d in groups:
        m, d = torch.tensor(m), torch.tensor(d)
        arm.take_masks(m, d)
        assert torch.equal(arm.observe_group(None, None, {}), d)
        with arm.batch_context([1, 3], per_rollout=False):
            for k in arm.knobs.values():
                assert torch.equal(k._mask[0], m[[1, 3]]) and torch.equal(k._mask[1], d[[1, 3]])
        assert all(k._mask is None for k in arm.knobs.values())
    diag = arm.intervene(StepGrads()).diag
    assert (diag["m_keep"], diag["m_absorb"], diag["m_route"]) == pytest.approx((2 / 9, 3 / 9, 4 / 9))
    want = vact.mask_shares(torch.tensor([t, t, f, t, t, t, t, t, f]), torch.tensor([t, f, f, f, f, t, t, t, f]))
    assert diag["m_keep"] == want["keep"] and diag["m_route"] == want["route"]
    arm.begin_step()  # a new step counts afresh; a step with no scored group reports no shares
    diag = arm.intervene(StepGrads()).diag
    assert all(math.isnan(diag[k]) for k in ("m_keep", "m_absorb", "m_route"))
    arm.take_masks(torch.tensor([f, t]), torch.tensor([f, t]))
    assert arm.intervene(StepGrads()).diag["m_route"] == 0.5
