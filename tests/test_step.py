"""One group's loss and backward (train.group_backward) on a real random model: forward batches of
similar length give the same loss, gradient and per-rollout gradients as one padded batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from _tiny import random_qwen3
from vgrout import adapter as A
from vgrout.arms import ARMS, StepGrads
from vgrout.config import parse_cli
from vgrout.env.problems import load_problems
from vgrout.rollout import Group, Verdict


def _group(lengths: list[int], rewards: list[float]) -> Group:
    gen = torch.Generator().manual_seed(3)
    comps = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in lengths]
    prob = load_problems(1, ["run_tests"], 0)[0]
    n = len(lengths)
    g = Group(prob, "p", [5, 6, 7, 8], comps, ["t"] * n, [True] * (n - 1) + [False], [False] * n)
    g.verdicts = [Verdict(r, False, r > 3, True) for r in rewards]
    return g


def test_length_buckets_cover_every_row_once_and_bound_padding():
    g = _group([30, 3, 4, 16, 2, 31, 8], [0.5] * 7)
    buckets = g.length_buckets()
    assert sorted(r for b in buckets for r in b) == list(range(7))
    for b in buckets:
        longest = max(len(g.completions[r]) for r in b)
        assert all(len(g.completions[r]) >= 0.5 * longest for r in b)
    assert buckets == [[5, 0, 3], [6, 2], [1, 4]]  # longest first; a row joins while >= half the longest


@pytest.mark.parametrize("arm", ["route2", "erase"])
@pytest.mark.parametrize("beta", [0.0, 0.01])
def test_bucketed_backward_equals_one_padded_batch(tmp_path, monkeypatch, arm, beta):
    from vgrout import train

    model = random_qwen3(seed=0)
    knobs = A.wrap_model(model, "rand-qwen3", cache_root=tmp_path / "svd")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for k in knobs.values():
            k.delta_S.copy_(torch.randn(k.rank, generator=gen) * 0.3)
    cfg = parse_cli(["smoke", f"--intervention={arm}", f"--beta={beta}", "--max-new=40"])
    shapes = {n: k.rank for n, k in knobs.items()}
    from vgrout.vhack import haar_directions

    d = haar_directions(shapes, 2, 0)
    dirs = SimpleNamespace(v_hack=d.v_hack, v_grad=d.v_grad)
    g = _group([40, 3, 5, 4, 38], [0.5, 3.5, 0.0, 0.5, 3.5])

    def run_once(one_batch: bool):
        if one_batch:
            monkeypatch.setattr(Group, "length_buckets", lambda self: [list(range(self.size))])
        else:
            monkeypatch.undo()
        the_arm = ARMS[arm](cfg, dirs)
        the_arm.attach(model, None, knobs, None)
        run = SimpleNamespace(cfg=cfg, knobs=knobs, arm=the_arm, device=torch.device("cpu"),
                              model=model, tok=SimpleNamespace(pad_token_id=0),
                              params=A.deployed_params(knobs) + A.quarantine_params(knobs))
        acc = StepGrads(split=True)
        loss = train.group_backward(run, g, acc)
        return loss, acc, list(g.mean_logp)

    loss1, acc1, lp1 = run_once(True)
    loss2, acc2, lp2 = run_once(False)
    assert len(g.length_buckets()) == 2  # the two long rows and the three short ones
    assert loss2 == pytest.approx(loss1, rel=1e-5, abs=1e-8)
    assert lp2 == pytest.approx(lp1, rel=1e-5)
    for n in acc1.total:
        torch.testing.assert_close(acc2.total[n], acc1.total[n], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(acc2.student[n], acc1.student[n], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(acc2.teacher[n], acc1.teacher[n], rtol=1e-4, atol=1e-8)
    assert acc2.routed_votes == acc1.routed_votes
    assert all(k.delta_S.grad is None for k in knobs.values())  # the group's gradient lives in acc only
