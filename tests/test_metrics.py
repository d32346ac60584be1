"""The per-step row's pure pieces: rates, per-mode counts, detector and half-A/B splits."""

from __future__ import annotations

import math

import pytest

from vgrout.env.problems import load_problems
from vgrout.metrics import half_split, mode_counts, rollout_metrics, row_json
from vgrout.rollout import Group, Verdict


def _group(mode: str, verdicts: list[Verdict], students: int, ablated: int = 0) -> Group:
    prob = load_problems(1, [mode], 0)[0]
    n = len(verdicts)
    g = Group(prob, "p", [1, 2], [[3]] * n, ["t"] * n, [i < students for i in range(n)],
              [students - ablated <= i < students for i in range(n)])
    g.verdicts = verdicts
    g.mean_logp = [-1.0 - i for i in range(n)]
    return g


def V(reward=0.5, correct=False, exploited=False, s=False, d=False, e=False) -> Verdict:
    return Verdict(reward, correct, exploited, True, hacked_S=s, hacked_D=d, hacked_E=e)


def test_rollout_metrics_on_known_groups():
    g1 = _group("run_tests", [V(3.5, exploited=True, e=True, s=True), V(3.5, correct=True, e=True), V(0.5),
                              V(3.5, exploited=True)], students=3, ablated=1)
    g2 = _group("sentinel", [V(3.5, exploited=True), V(0.0, d=True), V(3.5, correct=True)], students=2)
    m = rollout_metrics([g1, g2], ["run_tests", "sentinel"], frozenset({"E"}))
    assert m["N"] == 7 and m["rew"] == pytest.approx((3.5 * 5 + 0.5) / 7)
    assert m["rew_s"] == pytest.approx((3.5 + 3.5 + 0.5 + 3.5 + 0.0) / 5)
    assert m["hack_s"] == (2, 5) and m["hack_t"] == (1, 2) and m["gt_s"] == (1, 5) and m["gt_t"] == (1, 2)
    assert m["hk_rt"] == 1 and m["hk_se"] == 1
    assert m["hack_s_E"] == (2, 5) and m["hack_s_S"] == (1, 5) and m["hack_s_D"] == (1, 5)
    # half A = E fires (2 student rows); half B = only another code fires: C (exploited) on the
    # sentinel student row, D on the other sentinel student row
    assert m["hack_s_A"] == (2, 5) and m["hack_s_B"] == (2, 5)
    assert m["hack_abl"] == (0, 1) and m["solve_abl"] == (0, 1)
    assert m["lp_s"] == pytest.approx((-1 - 2 - 3 - 1 - 2) / 5) and m["lp_t"] == pytest.approx((-4 - 3) / 2)
    assert mode_counts([g1, g2]) == {"run_tests": (1, 3), "sentinel": (1, 2)}


def test_half_code_c_is_exploited():
    det = {"C": [True, False, False], "E": [False, True, False], "D": [False, False, False]}
    assert half_split(det, frozenset({"C"})) == ([True, False, False], [False, True, False])
    assert half_split(det, frozenset({"C", "E"})) == ([True, True, False], [False, False, False])
    assert half_split(det, frozenset()) == ([False] * 3, [False] * 3)


def test_row_json_writes_pairs_as_lists_and_nan_as_null():
    assert row_json({"a": (1, 2), "b": math.nan, "c": math.inf, "d": 0.5, "e": "x"}) == \
        {"a": [1, 2], "b": None, "c": None, "d": 0.5, "e": "x"}
