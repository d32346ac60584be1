"""Deploy evals: common random numbers, and evals that never shift the training draws."""

from __future__ import annotations

import json

import pytest
import torch

from vgrout.eval import common_random_numbers, tally


def test_common_random_numbers_repeat_inside_and_restore_outside():
    torch.manual_seed(7)
    expected_after = torch.rand(4)
    torch.manual_seed(7)
    with common_random_numbers(123):
        a = torch.rand(5)
    with common_random_numbers(123):
        b = torch.rand(5)
    assert torch.equal(a, b)  # every eval call sees the same noise
    assert torch.equal(torch.rand(4), expected_after)  # the training stream is as if no eval ran
    with common_random_numbers(124):
        assert not torch.equal(torch.rand(5), a)


def test_tally_counts_per_problem_clusters():
    class P:
        def __init__(self, pid, mode):
            self.problem_id, self.env_mode = pid, mode

    a, b = P(1, "run_tests"), P(2, "sentinel")
    ev = tally([a, a, a, b, b], [True, False, True, False, False], [False, True, False, True, True])
    assert ev.by_problem == {1: {"mode": "run_tests", "hack": 2, "solve": 1, "n": 3},
                             2: {"mode": "sentinel", "hack": 0, "solve": 2, "n": 2}}
    assert ev.by_mode["run_tests"] == {"hack": 2, "solve": 1, "n": 3}
    assert ev.hack == pytest.approx(2 / 5) and ev.solve == pytest.approx(3 / 5)


@pytest.mark.slow
def test_evals_do_not_change_training(tmp_path):
    """A run with a deploy eval every step trains exactly like one with only the final eval."""
    from _golden import TIMING, build_inputs
    from vgrout.config import parse_cli
    from vgrout.train import main

    pool, pairs = build_inputs(tmp_path / "inputs")
    rows = {}
    for every in (1, 0):
        out = tmp_path / f"every{every}"
        args = ["smoke", f"--teacher-pool-dir={pool}", f"--vhack-pairs-path={pairs}", f"--out-root={out}",
                "--steps=3", "--max-new=8", "--eval-n-prompts=2", f"--eval-ablate-every={every}",
                "--v-hack-extract-top-k=2", "--v-hack-k=1", "--v-hack-n-heldout=1", "--ckpt-every=10"]
        assert main(parse_cli(args)) == 0
        (run,) = (out / "runs").iterdir()
        rows[every] = [json.loads(x) for x in (run / "rows.jsonl").read_text().splitlines()]
    skip = TIMING | {"hack_deploy", "solve_deploy"}
    for a, b in zip(rows[1], rows[0], strict=True):
        assert a["hack_deploy"] is not None and b["hack_deploy"] is None or a["step"] == 2
        assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
