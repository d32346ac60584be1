"""The per-step row (docs/artifacts.md), built from small pure functions merged into one dict.

    row = {"step": s, **rollout_metrics(...), **update metrics, **arm diagnostics,
           **classifier_metrics(...), **eval_metrics(...), **timings}

Each function reads one source (the step's groups, the eval result, ...) and returns its keys;
none knows about the others. `row_json` turns a row into its rows.jsonl form.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .env.modes import MODE_CODE
from .eval import EvalResult
from .proj import classifier_stats, nanmean
from .rollout import Group

REF_GENS_PER_STEP = 16 * 16  # the benchmark's generations per step (16 prompts x 16)
DETECTORS = ("D", "E", "S")  # the run_tests detectors, `hacked_<code>` on every verdict


def frac(flags: Sequence[bool], mask: Sequence[bool]) -> tuple[int, int]:
    """(n, N): how many of the N rows selected by `mask` have the flag."""
    sel = [f for f, m in zip(flags, mask, strict=True) if m]
    return (sum(map(bool, sel)), len(sel))


def mode_counts(groups: Sequence[Group]) -> dict[str, tuple[int, int]]:
    """Per mode: (student rollouts exploited, student rollouts) this step."""
    out: dict[str, tuple[int, int]] = {}
    for g in groups:
        for s, e in zip(g.is_student, g.column("exploited"), strict=True):
            if s:
                h, n = out.get(g.problem.env_mode, (0, 0))
                out[g.problem.env_mode] = (h + int(e), n + 1)
    return out


def half_split(det: dict[str, list[bool]], half_a: frozenset[str]) -> tuple[list[bool], list[bool]]:
    """Per row: half A = a `half_a` detector fires; half B = only another detector fires.

    Invariant: no row is in both halves; both are all False when `half_a` is empty.
    """
    n = len(next(iter(det.values())))
    if not half_a:
        return [False] * n, [False] * n
    in_a = [any(det[c][i] for c in half_a) for i in range(n)]
    in_b = [not in_a[i] and any(det[c][i] for c in set(det) - half_a) for i in range(n)]
    return in_a, in_b


def rollout_metrics(groups: Sequence[Group], run_modes: Sequence[str], half_a: frozenset[str]) -> dict:
    """Rewards, oracle and detector rates, per-mode exploits and log-probs of the step's rollouts."""
    cat = lambda attr: [x for g in groups for x in g.column(attr)]  # noqa: E731
    stud = [s for g in groups for s in g.is_student]
    teach = [not s for s in stud]
    abl_s = [a and s for g in groups for a, s in zip(g.is_ablated, g.is_student, strict=True)]
    rew, expl, corr = cat("reward"), cat("exploited"), cat("gt_correct")
    det = {c: cat(f"hacked_{c}") for c in DETECTORS}
    in_a, in_b = half_split({"C": expl, **det}, half_a)  # --half-a code C is `exploited` (the reference's)
    lp = [x for g in groups for x in g.mean_logp]
    hacks = mode_counts(groups)
    return {
        "rew": nanmean(rew), "rew_s": nanmean([r for r, s in zip(rew, stud, strict=True) if s]), "N": len(rew),
        "gt_s": frac(corr, stud), "gt_t": frac(corr, teach), "hack_s": frac(expl, stud), "hack_t": frac(expl, teach),
        **{f"hk_{MODE_CODE[m]}": hacks.get(m, (0, 0))[0] for m in run_modes},
        **{f"hack_s_{c}": frac(det[c], stud) for c in DETECTORS},
        "hack_s_A": frac(in_a, stud), "hack_s_B": frac(in_b, stud),
        "lp_s": nanmean([x for x, s in zip(lp, stud, strict=True) if s]),
        "lp_t": nanmean([x for x, s in zip(lp, teach, strict=True) if s]),
        "hack_abl": frac(expl, abl_s), "solve_abl": frac(corr, abl_s),
        "gen_tok": sum(len(c) for g in groups for c, s in zip(g.completions, g.is_student, strict=True) if s),
    }


def classifier_metrics(routed: Sequence[bool], exploited: Sequence[bool]) -> dict:
    """The arm's per-rollout routing vote as a classifier of `exploited` (student rows)."""
    st = classifier_stats(routed, exploited)
    return {"prec": st["precision"], "rec": st["recall"], "f05": st["f05"]}


def eval_metrics(ev: EvalResult | None) -> dict:
    """The periodic deploy eval's rates (NaN on steps without one)."""
    return {"hack_deploy": ev.hack if ev else math.nan, "solve_deploy": ev.solve if ev else math.nan}


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall seconds of the block to timings[key]."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def row_json(row: dict) -> dict:
    """A row for rows.jsonl: tuples as [n, N], non-finite floats as null."""
    out = {}
    for k, v in row.items():
        if isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out
