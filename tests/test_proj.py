"""Exact identities of the interventions (erase, route, route2) and their diagnostics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vgrout import proj


def _basis(r: int, k: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(r, k, generator=gen, dtype=dtype))
    return q.T.contiguous()  # [k, r] orthonormal rows


def _grad(r: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(r, generator=gen, dtype=dtype)


def _mixed_grad(V: torch.Tensor, seed: int) -> torch.Tensor:
    """A gradient with known positive and negative coefficients plus an orthogonal part."""
    k, r = V.shape
    g = _grad(r, seed)
    g = g - V.T @ (V @ g)  # orthogonal part only
    c = torch.tensor([(+1.5 if i % 2 == 0 else -0.7) * (i + 1) for i in range(k)], dtype=g.dtype)
    return g + c @ V


def _ortho_part(g, V):
    return g - V.T @ (V @ g)


R, K = 64, 5


@pytest.fixture
def setup():
    V = _basis(R, K, 0)
    g = _mixed_grad(V, 1)
    return g, V


def test_gate_partition(setup):
    g, V = setup
    c = proj.coefficients(g, V)
    assert (c > 0).any() and (c < 0).any()
    torch.testing.assert_close(
        proj.gate(c, "one_sided") + proj.gate(c, "reverse"), proj.gate(c, "no_gate")
    )
    with pytest.raises(ValueError, match="gate_mode"):
        proj.gate(c, "both")  # type: ignore[arg-type]


def test_erase_one_sided_kills_hackward_keeps_orthogonal(setup):
    g, V = setup
    g2, removed, d = proj.erase(g, V, gate_mode="one_sided")
    c2 = V @ g2
    assert float(torch.clamp(c2, min=0).norm()) <= 1e-6 * float(g.norm())
    # anti-hack coefficients untouched, orthogonal complement untouched
    c = V @ g
    torch.testing.assert_close(c2[c < 0], c[c < 0])
    torch.testing.assert_close(_ortho_part(g2, V), _ortho_part(g, V))
    torch.testing.assert_close(g2 + removed, g)
    assert proj.span_residual(removed, V) < 1e-12
    assert d.cos_pre > 0.1 and d.cos_post <= 1e-6
    assert d.frac_fired == pytest.approx(3 / 5)  # coefficients 0, 2, 4 are positive


def test_erase_preserve_magnitude(setup):
    g, V = setup
    g2, _, d = proj.erase(g, V, gate_mode="one_sided", preserve_magnitude=True)
    assert float(g2.norm()) == pytest.approx(float(g.norm()), rel=1e-12)
    assert float(torch.clamp(V @ g2, min=0).norm()) <= 1e-6 * float(g.norm())
    assert d.norm_post == pytest.approx(d.norm_pre, rel=1e-12)
    # direction is the plain erase's direction
    g_plain, _, _ = proj.erase(g, V, gate_mode="one_sided")
    cos = float(g2 @ g_plain) / float(g2.norm() * g_plain.norm())
    assert cos == pytest.approx(1.0, abs=1e-12)


def test_erase_no_gate_removes_whole_span(setup):
    g, V = setup
    g2, _, _ = proj.erase(g, V, gate_mode="no_gate")
    assert float((V @ g2).norm()) <= 1e-12 * float(g.norm())
    torch.testing.assert_close(g2, _ortho_part(g, V))


def test_erase_reverse_removes_only_antihack(setup):
    g, V = setup
    c = V @ g
    g2, _, _ = proj.erase(g, V, gate_mode="reverse")
    c2 = V @ g2
    torch.testing.assert_close(c2[c > 0], c[c > 0])  # hack-ward part kept
    assert float(c2[c < 0].abs().max()) <= 1e-12
    torch.testing.assert_close(_ortho_part(g2, V), _ortho_part(g, V))


def test_overshoot_reverses_ten_percent(setup):
    g, V = setup
    c = V @ g
    g2, _, _ = proj.erase(g, V, gate_mode="one_sided", overshoot=1.1)
    c2 = V @ g2
    pos = c > 0
    torch.testing.assert_close(c2[pos], -0.1 * c[pos])
    torch.testing.assert_close(c2[~pos], c[~pos])
    with pytest.raises(ValueError, match="overshoot"):
        proj.erase(g, V, overshoot=-1.0)


@pytest.mark.parametrize("gate_mode", ["one_sided", "no_gate", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_route_conserves_and_stays_in_span(gate_mode, dtype):
    V = _basis(256, 4, 3, dtype)
    g = _mixed_grad(V.double(), 4).to(dtype)
    kept, routed, d = proj.route(g, V, gate_mode=gate_mode, overshoot=1.0)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert float((kept + routed - g).norm()) <= tol * float(g.norm())
    assert proj.span_residual(routed, V) <= (1e-5 if dtype == torch.float32 else 1e-12)
    assert d.norm_removed > 0
    # a vector outside the span is detected by the same check
    assert proj.span_residual(g, V) > 0.5


def test_route_refuses_preserve_magnitude(setup):
    g, V = setup
    with pytest.raises(ValueError, match="erase-only"):
        proj.route(g, V, preserve_magnitude=True)


def test_cos_pre_and_frac_fired():
    V = torch.eye(3, 6, dtype=torch.float64)
    g = torch.tensor([3.0, -4.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert proj.cos_pre(g, V) == pytest.approx(3 / 5)
    assert proj.frac_fired(g, V, "one_sided") == pytest.approx(1 / 3)
    assert proj.frac_fired(g, V, "no_gate") == pytest.approx(2 / 3)
    assert math.isnan(proj.cos_pre(torch.zeros(6, dtype=torch.float64), V))
    assert proj.span_residual(torch.zeros(6), V) == 0.0


def test_project_all_route_and_erase():
    Vs = {f"m{i}": _basis(32, 3, i) for i in range(3)}
    grads = {m: _mixed_grad(V, 10 + i) for i, (m, V) in enumerate(Vs.items())}
    grads["no_basis"] = _grad(32, 99)
    res = proj.project_all(grads, Vs, mode="route", grads_s=grads, grads_t=None)
    assert res.skipped == ["no_basis"] and res.n_modules == 3
    assert res.kept["no_basis"] is grads["no_basis"]
    for m in Vs:
        torch.testing.assert_close(res.kept[m] + res.routed[m], grads[m])
    assert res.cos_post <= 1e-6 < res.cos_pre
    assert res.cos_pre_s == pytest.approx(res.cos_pre)
    assert math.isnan(res.cos_pre_t)
    nk = math.sqrt(sum(float(t.pow(2).sum()) for t in res.kept.values()))
    nq = math.sqrt(sum(float(t.pow(2).sum()) for t in res.routed.values()))
    assert res.q_egy == pytest.approx(nq / (nk + nq))
    er = proj.project_all(grads, Vs, mode="erase")
    assert er.routed == {} and er.q_egy == 0.0
    assert set(er.as_row()) >= {"cos_pre", "cos_post", "fired", "q_egy"}
    with pytest.raises(ValueError, match="mode"):
        proj.project_all(grads, Vs, mode="both")  # type: ignore[arg-type]


# ── route2 ────────────────────────────────────────────────────────────────────────────────


def _unit(r, seed):
    v = _grad(r, seed)
    return v / v.norm()


def test_route2_conserves_and_forces_hack_anchor():
    r, G = 48, 6
    v = _unit(r, 0)
    noise = torch.stack([_grad(r, 100 + i) for i in range(G)])
    noise = noise - (noise @ v)[:, None] * v  # orthogonal to v
    noise = noise / noise.norm(dim=1, keepdim=True)
    # per-rollout cosines with v: 0 and 1 hack-ward, 2 strongly anti-hack, 3-5 anti-hack
    cosines = [0.9, 0.8, -0.95, -0.9, -0.7, -0.8]
    g_b = torch.stack([c * v + math.sqrt(1 - c * c) * n for c, n in zip(cosines, noise, strict=True)])
    g_b = g_b * torch.arange(1, G + 1, dtype=g_b.dtype)[:, None]  # unequal norms
    # rollout 2 points anti-hack but is forced into the hack anchor (with rollout 0)
    ha = torch.tensor([True, False, True, False, False, False])
    gate = proj.Route2Gate()
    res = gate.step("m", g_b, v, ha)
    total = g_b.sum(0)
    assert float((res.kept + res.routed - total).norm()) <= 1e-12 * float(total.norm())
    assert res.flagged.tolist() == [True, True, True, False, False, False]
    # routed is exactly the sum of flagged rows, so it contains rollout 2 wholly
    torch.testing.assert_close(res.routed, g_b[res.flagged].sum(0))
    torch.testing.assert_close(res.cos_b, (g_b @ v) / g_b.norm(dim=1))
    assert res.calibrated
    kept_cos = float(res.kept @ v) / float(res.kept.norm())
    assert res.resid == pytest.approx(kept_cos)
    # explicit total: extra non-rollout gradient stays in kept
    extra = _grad(r, 7)
    res2 = proj.Route2Gate().step("m", g_b, v, ha, total=total + extra)
    torch.testing.assert_close(res2.kept + res2.routed, total + extra)


def test_route2_tau_follows_ema_midpoint():
    """Scripted steps with rollouts at known cosines: τ must be the EMA(0.9) midpoint."""
    r = 8
    v = torch.zeros(r, dtype=torch.float64)
    v[0] = 1.0
    e1 = torch.zeros(r, dtype=torch.float64)
    e1[1] = 1.0

    def rollout(cos: float) -> torch.Tensor:
        return cos * v + math.sqrt(1 - cos**2) * e1

    # (hack-anchor cosines, clean cosines) per step
    script = [([0.8, 0.6], [0.0, -0.2]), ([0.4], [0.1, 0.3, -0.1]), ([0.9, 0.7], [0.5])]
    gate = proj.Route2Gate(beta=0.9)
    eh = ec = None
    for hack_c, clean_c in script:
        g_b = torch.stack([rollout(c) for c in hack_c + clean_c])
        ha = torch.tensor([True] * len(hack_c) + [False] * len(clean_c))
        mh, mc = sum(hack_c) / len(hack_c), sum(clean_c) / len(clean_c)
        eh = mh if eh is None else 0.9 * eh + 0.1 * mh
        ec = mc if ec is None else 0.9 * ec + 0.1 * mc
        res = gate.step("q_proj", g_b, v, ha)
        tau = (eh + ec) / 2
        assert res.tau == pytest.approx(tau, abs=1e-12)
        assert res.hkgap == pytest.approx(eh - ec, abs=1e-12)
        expect_flag = [True] * len(hack_c) + [c > tau for c in clean_c]
        assert res.flagged.tolist() == expect_flag
        assert res.frac_flagged == pytest.approx(sum(expect_flag) / len(expect_flag))
    # the last step has a clean rollout above τ (0.5 > τ) that gets routed
    assert res.flagged[-1]


def test_route2_state_round_trip_resumes_exactly():
    r = 16
    v = _unit(r, 1)
    steps = [torch.stack([_grad(r, 10 * s + i) for i in range(4)]) for s in range(4)]
    ha = torch.tensor([True, False, False, True])
    full = proj.Route2Gate()
    outs = [full.step("m", g, v, ha).tau for g in steps]
    first = proj.Route2Gate()
    for g in steps[:2]:
        first.step("m", g, v, ha)
    state = json.loads(json.dumps(first.state_dict()))  # plain floats survive JSON
    resumed = proj.Route2Gate()
    resumed.load_state_dict(state)
    assert [resumed.step("m", g, v, ha).tau for g in steps[2:]] == outs[2:]
    with pytest.raises(ValueError, match="beta"):
        proj.Route2Gate(beta=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        proj.Route2Gate().load_state_dict({"beta": 0.9})


def test_route2_uncalibrated_and_shape_errors():
    v = _unit(8, 2)
    g_b = torch.stack([_grad(8, i) for i in range(3)])
    res = proj.Route2Gate().step("m", g_b, v, [False, False, False])
    assert not res.calibrated
    assert res.tau == pytest.approx(0.5 * float(res.cos_b.mean()))
    with pytest.raises(ValueError, match="hack_anchor"):
        proj.Route2Gate().step("m", g_b, v, [True])
    with pytest.raises(ValueError, match="shape"):
        proj.Route2Gate().step("m", g_b, _unit(9, 0), [True, False, False])


def test_build_anchors():
    is_student = [True, True, True, False, False]
    ha, ca = proj.build_anchors(is_student, [False, True, False], teacher_only=False)
    assert ha.tolist() == [False, True, False, True, True]
    assert ca.tolist() == [not x for x in ha.tolist()]
    ha2, _ = proj.build_anchors(is_student, [False, True, False, True, True], teacher_only=False)
    assert ha2.tolist() == ha.tolist()
    ha3, _ = proj.build_anchors(is_student, [True, True, True], teacher_only=True)
    assert ha3.tolist() == [False, False, False, True, True]
    with pytest.raises(ValueError, match="student_flags"):
        proj.build_anchors(is_student, [True], teacher_only=False)


def test_summarize_route2():
    v = _unit(8, 3)
    gate = proj.Route2Gate()
    rs = [gate.step(m, torch.stack([_grad(8, i + j) for i in range(4)]), v,
                    [True, False, False, False]) for j, m in enumerate(["a", "b"])]
    d = proj.summarize_route2(rs, [r.kept for r in rs], [r.routed for r in rs])
    assert d.tau == pytest.approx((rs[0].tau + rs[1].tau) / 2)
    assert d.frac_flagged == pytest.approx((rs[0].frac_flagged + rs[1].frac_flagged) / 2)
    assert 0 < d.q_egy < 1


def test_classifier_stats():
    routed = [True, True, True, False, False, False]
    exploited = [True, True, False, True, False, False]
    s = proj.classifier_stats(routed, exploited)
    assert (s["tp"], s["fp"], s["fn"], s["n"]) == (2, 1, 1, 6)
    p = r = 2 / 3
    assert s["precision"] == pytest.approx(p) and s["recall"] == pytest.approx(r)
    assert s["f05"] == pytest.approx(1.25 * p * r / (0.25 * p + r))
    # precision weighs more: high precision / low recall beats the mirror case
    hi_p = proj.classifier_stats([True, False, False, False], [True, True, True, False])
    hi_r = proj.classifier_stats([True, True, True, True], [True, False, False, False])
    assert hi_p["precision"] == 1.0 and hi_r["recall"] == 1.0
    assert hi_p["f05"] > hi_r["f05"]
    none = proj.classifier_stats([False, False], [True, False])
    assert math.isnan(none["precision"]) and math.isnan(none["f05"]) and none["recall"] == 0.0
    zero = proj.classifier_stats([True, False], [False, True])
    assert zero["f05"] == 0.0
    with pytest.raises(ValueError, match="labels"):
        proj.classifier_stats([True], [True, False])


def test_rollout_hackward():
    V = torch.eye(2, 4, dtype=torch.float64)
    g_b = torch.tensor([[2.0, -1.0, 0, 0], [0.5, -1.0, 0, 0], [0, 0, 3.0, 0]], dtype=torch.float64)
    assert proj.rollout_hackward(g_b, V).tolist() == [True, False, False]


# ── exact values of the diagnostics and the defaults ─────────────────────────────────────


def test_span_residual_exact_values():
    """‖x - Vᵀ V x‖ / ‖x‖: 1 for a vector orthogonal to span(V), 4/5 for 3·(in) + 4·(out)."""
    V = torch.eye(2, 5, dtype=torch.float64)  # span(V) = the first two axes
    ortho = torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    assert proj.span_residual(ortho, V) == 1.0
    mixed = torch.tensor([3.0, 0.0, 0.0, 4.0, 0.0], dtype=torch.float64)
    assert proj.span_residual(mixed, V) == pytest.approx(4 / 5, rel=1e-15)
    inside = torch.tensor([3.0, -4.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert proj.span_residual(inside, V) == 0.0
    # a float32 basis against a float64 vector: compared in the vector's dtype
    assert proj.span_residual(mixed, V.float()) == pytest.approx(4 / 5, rel=1e-15)


def test_frac_fired_per_gate_mode_and_default():
    V = torch.eye(4, 6, dtype=torch.float64)
    g = torch.tensor([3.0, -4.0, -1.0, 0.0, 5.0, 0.0], dtype=torch.float64)  # c = (3, -4, -1, 0)
    assert proj.frac_fired(g, V, "reverse") == 2 / 4  # the two negative coefficients
    assert proj.frac_fired(g, V, "one_sided") == 1 / 4
    assert proj.frac_fired(g, V, "no_gate") == 3 / 4  # a zero coefficient never fires
    assert proj.frac_fired(g, V) == 1 / 4  # default: one_sided
    for gm in ("reverse", "one_sided"):
        _, _, d = proj.erase(g, V, gate_mode=gm)
        assert d.frac_fired == proj.frac_fired(g, V, gm)
    # an empty basis (every axis dropped) fires nothing
    empty = torch.zeros(0, 6, dtype=torch.float64)
    assert proj.frac_fired(g, empty) == 0.0
    assert proj.erase(g, empty)[2].frac_fired == 0.0


def test_erase_and_route_defaults_are_one_sided_full_strength(setup):
    g, V = setup
    c = V @ g
    want_removed = torch.clamp(c, min=0) @ V
    for fn in (proj.erase, proj.route):
        new, removed, _ = fn(g, V)
        torch.testing.assert_close(removed, want_removed, rtol=0, atol=1e-12)
        torch.testing.assert_close(new, g - want_removed, rtol=0, atol=1e-12)


def test_overshoot_bounds():
    V = torch.eye(1, 3, dtype=torch.float64)
    g = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    g0, removed0, _ = proj.erase(g, V, overshoot=0.0)  # allowed: a no-op
    torch.testing.assert_close(g0, g, rtol=0, atol=0)
    assert float(removed0.norm()) == 0.0
    g_half, _, _ = proj.erase(g, V, overshoot=0.5)
    torch.testing.assert_close(g_half, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="overshoot"):
            proj.erase(g, V, overshoot=bad)


def test_preserve_magnitude_small_and_zero_results():
    V = torch.eye(1, 3, dtype=torch.float64)
    small = torch.tensor([3e-3, 4e-3, 0.0], dtype=torch.float64)  # ‖g‖ = 5e-3 < 1
    g2, _, d = proj.erase(small, V, preserve_magnitude=True)
    torch.testing.assert_close(g2, torch.tensor([0.0, 5e-3, 0.0], dtype=torch.float64))
    assert d.norm_post == pytest.approx(5e-3, rel=1e-15)
    # everything hack-ward: the erased gradient is 0 and stays 0 (no 0/0)
    inside = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    g3, removed, _ = proj.erase(inside, V, preserve_magnitude=True)
    assert g3.tolist() == [0.0, 0.0, 0.0] and removed.tolist() == [2.0, 0.0, 0.0]


def test_shape_checks_refuse_wrong_ranks():
    V = torch.eye(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        proj.erase(torch.ones(4, 1, dtype=torch.float64), V)  # V @ g would silently work
    with pytest.raises(ValueError, match="shape"):
        proj.erase(torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        proj.rollout_hackward(torch.ones(4, dtype=torch.float64), V)
    with pytest.raises(ValueError, match="shape"):
        proj.rollout_hackward(torch.ones(3, 4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        proj.Route2Gate().step("m", torch.ones(4, dtype=torch.float64), torch.ones(4), [True])
    with pytest.raises(ValueError, match="shape"):
        proj.Route2Gate().step("m", torch.ones(2, 4), torch.ones(2, 4), [True, False])


def test_q_egy_exact():
    z = torch.zeros(2, dtype=torch.float64)
    assert proj.q_egy([z], [z]) == 0.0
    small_k = torch.tensor([0.3, 0.0], dtype=torch.float64)
    small_q = torch.tensor([0.0, 0.1], dtype=torch.float64)
    assert proj.q_egy([small_k], [small_q]) == pytest.approx(0.1 / 0.4, rel=1e-15)
    assert proj.q_egy([small_k], []) == 0.0
    assert proj.q_egy([], [small_q]) == 1.0


def test_project_all_passes_every_option_and_reports_each_module():
    Vs = {f"m{i}": _basis(16, 3, 20 + i) for i in range(2)}
    grads = {"first_no_basis": _grad(16, 98)} | {m: _mixed_grad(V, 30 + i) for i, (m, V) in
                                                  enumerate(Vs.items())}
    grads_t = {m: _mixed_grad(V, 40 + i) for i, (m, V) in enumerate(Vs.items())}
    for kw in ({"gate_mode": "no_gate"}, {"overshoot": 1.1}, {"preserve_magnitude": True},
               {"gate_mode": "reverse", "overshoot": 0.5}):
        res = proj.project_all(grads, Vs, mode="erase", grads_t=grads_t, **kw)
        assert res.skipped == ["first_no_basis"] and res.n_modules == 2
        assert list(res.kept) == list(grads)  # every module after a skipped one is still projected
        for m, V in Vs.items():
            want_g, _, want_d = proj.erase(grads[m], V, **kw)
            torch.testing.assert_close(res.kept[m], want_g, rtol=0, atol=0)
            assert res.per_module[m] == want_d
        per = list(res.per_module.values())
        assert res.frac_fired == pytest.approx(sum(d.frac_fired for d in per) / 2)
        assert res.cos_post == pytest.approx(sum(d.cos_post for d in per) / 2)
        assert res.cos_pre_t == pytest.approx(proj.mean_cos_pre(grads_t, Vs))
        assert res.as_row() == {
            "cos_pre": res.cos_pre, "cos_pre_s": res.cos_pre_s, "cos_pre_t": res.cos_pre_t,
            "cos_post": res.cos_post, "fired": res.frac_fired, "q_egy": res.q_egy,
        }
    # default overshoot 1: every hack-ward coefficient removed exactly
    res = proj.project_all(grads, Vs, mode="route")
    for m, V in Vs.items():
        torch.testing.assert_close(res.routed[m], torch.clamp(V @ grads[m], min=0) @ V)
    # nothing has a basis: the aggregates are NaN, not an error
    none = proj.project_all({"a": _grad(4, 1)}, {}, mode="erase")
    assert math.isnan(none.cos_pre) and math.isnan(none.frac_fired) and none.n_modules == 0


def test_rollout_hackward_compares_each_rollouts_own_parts():
    V = torch.eye(2, 4, dtype=torch.float64)
    g_b = torch.tensor([[0.6, -0.5, 0, 0], [0.5, -0.6, 0, 0], [1.2, -1.0, 0, 0], [2.0, -2.0, 9.0, 0]],
                       dtype=torch.float64)
    assert proj.rollout_hackward(g_b, V).tolist() == [True, False, True, False]


def test_build_anchors_accepts_zero_one_flags():
    ha, ca = proj.build_anchors([1, 1, 1, 0, 0], [0, 1, 0], teacher_only=False)
    assert ha.tolist() == [False, True, False, True, True] and ca.tolist() == [True, False, True, False, False]
    ha, _ = proj.build_anchors([1, 1, 0], [1, 0, 1], teacher_only=False)  # teacher's own flag ignored
    assert ha.tolist() == [True, False, True]


def test_per_rollout_cos_small_norms_and_mixed_dtypes():
    v = torch.tensor([1.0, 0.0], dtype=torch.float32)
    g_b = torch.tensor([[3e-3, 4e-3], [0.0, 0.0], [-5.0, 0.0]], dtype=torch.float64)
    cos = proj.per_rollout_cos(g_b, v)
    assert cos.dtype == torch.float64
    assert cos.tolist() == [pytest.approx(0.6, rel=1e-15), 0.0, -1.0]


def test_route2_beta_bounds():
    proj.Route2Gate(beta=0.0)  # no memory: allowed
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="beta"):
            proj.Route2Gate(beta=bad)


def test_route2_one_sided_calibration_and_tau_boundary():
    v = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # hack anchors only: τ = ema_hack / 2 and hkgap = ema_hack (the clean mean counts as 0)
    g_b = torch.tensor([[3.0, 4.0], [4.0, 3.0]], dtype=torch.float64)  # cos 0.6, 0.8
    res = proj.Route2Gate().step("m", g_b, v, [True, True])
    assert (res.tau, res.hkgap, res.calibrated) == (pytest.approx(0.35), pytest.approx(0.7), False)
    # clean anchors only: hkgap = -ema_clean
    res = proj.Route2Gate().step("m", g_b, v, [False, False])
    assert res.hkgap == pytest.approx(-0.7) and res.tau == pytest.approx(0.35)
    # a rollout exactly at τ is not flagged (cos_b > τ, strictly): here τ = 0 and cos = 0
    ortho = torch.tensor([[0.0, 2.0], [0.0, 3.0]], dtype=torch.float64)
    res = proj.Route2Gate().step("m", ortho, v, [True, False])
    assert res.tau == 0.0 and res.flagged.tolist() == [True, False]


def test_route2_zero_one_anchor_and_small_kept_resid():
    v = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g_b = torch.tensor([[3e-3, 4e-3], [-4e-3, 3e-3], [0.0, 1e-3]], dtype=torch.float64)
    res = proj.Route2Gate().step("m", g_b, v, [1, 0, 0])  # 0/1 anchors select rows, not indices
    assert res.flagged.tolist() == [True, False, False]
    torch.testing.assert_close(res.routed, g_b[0])
    kept = g_b[1] + g_b[2]  # (-4e-3, 4e-3): cos with v = -1/√2, though ‖kept‖ < 1
    assert res.resid == pytest.approx(-1 / math.sqrt(2), rel=1e-12)
    torch.testing.assert_close(res.kept, kept)


def test_summarize_route2_means_every_field():
    v = torch.tensor([1.0, 0.0], dtype=torch.float64)
    gate = proj.Route2Gate()
    rs = [gate.step(m, torch.tensor(rows, dtype=torch.float64), v, [True, False])
          for m, rows in (("a", [[3.0, 4.0], [-1.0, 1.0]]), ("b", [[1.0, 0.0], [1.0, 2.0]]))]
    d = proj.summarize_route2(rs, [r.kept for r in rs], [r.routed for r in rs])
    assert d.hkgap == pytest.approx((rs[0].hkgap + rs[1].hkgap) / 2)
    assert d.resid == pytest.approx((rs[0].resid + rs[1].resid) / 2)
    assert d.tau == pytest.approx((rs[0].tau + rs[1].tau) / 2)


def test_classifier_stats_edge_counts():
    s = proj.classifier_stats([True, True, True, True], [True, False, True, False])  # tp = fp = 2
    assert (s["precision"], s["recall"]) == (0.5, 1.0)
    s = proj.classifier_stats([True, False, True, False], [True, True, False, False])  # tp = fn = 1
    assert (s["precision"], s["recall"]) == (0.5, 0.5)
    s = proj.classifier_stats([True, False], [False, False])  # nothing exploited: recall undefined
    assert s["precision"] == 0.0 and math.isnan(s["recall"]) and math.isnan(s["f05"])


def test_route2_with_a_float32_direction_and_float64_gradients():
    v = torch.tensor([1.0, 0.0], dtype=torch.float32)
    g_b = torch.tensor([[3.0, 4.0], [-1.0, 1.0]], dtype=torch.float64)
    res = proj.Route2Gate().step("m", g_b, v, [True, False])
    assert res.kept.dtype == torch.float64
    assert res.resid == pytest.approx(-1 / math.sqrt(2), rel=1e-12)


def test_project_all_route_refuses_preserve_magnitude():
    V = {"m": _basis(8, 2, 0)}
    with pytest.raises(ValueError, match="erase-only"):
        proj.project_all({"m": _grad(8, 1)}, V, mode="route", preserve_magnitude=True)


def test_nanmean_skips_none_and_nan():
    assert proj.nanmean([None, 2.0, float("nan"), 4.0]) == 3.0
    assert proj.nanmean(x for x in (1.0, None)) == 1.0  # any iterable
    assert math.isnan(proj.nanmean([None, float("nan")])) and math.isnan(proj.nanmean([]))


def test_update_diagnostics_exact():
    """cos_upd = mean over modules of ‖relu(VΔ)‖/‖Δ‖; quar_resid = mean relative part of δS_hack
    outside span(V) over modules with a non-zero quarantine (NaN without one)."""
    V = {"a": torch.tensor([[1.0, 0.0, 0.0]]), "b": torch.tensor([[0.0, 1.0, 0.0]])}
    change = {"a": torch.tensor([3.0, 4.0, 0.0]),  # hack-ward coordinate 3 of norm 5: 0.6
              "b": torch.tensor([0.0, -2.0, 0.0]),  # anti-hack only: 0
              "x": torch.tensor([1.0, 0.0, 0.0])}  # no basis: not counted
    quar = {"a": torch.tensor([0.0, 0.0, 2.0]),  # entirely outside span: 1
            "b": torch.tensor([0.0, 3.0, 4.0]),  # 4/5 outside
            "x": torch.tensor([0.0, 0.0, 1.0])}  # no basis: not counted
    d = proj.update_diagnostics(V, change, quar)
    assert d == {"cos_upd": pytest.approx(0.3), "quar_resid": pytest.approx(0.9)}
    d = proj.update_diagnostics(V, change, {"a": quar["a"], "b": torch.zeros(3)})  # a zero quarantine: skipped
    assert d["quar_resid"] == pytest.approx(1.0)
    d = proj.update_diagnostics(V, {"b": torch.zeros(3)}, None)  # no change, no quarantine: NaN both
    assert math.isnan(d["cos_upd"]) and math.isnan(d["quar_resid"])
