"""Sandbox throughput on real completions: the fork-server vs the one-interpreter-per-job baseline.

Grades the cached teacher rollouts (run_tests mode, problems rebuilt from
LeetCodeDataset-v0.2.0-train; prompts not found there are skipped) plus the canonical
solutions of leetcode_test_medhard.jsonl, with rewards.grade_batch, once per backend at
the same concurrency. Prints gradings/s, executions/s, verdict differences between the
backends, detector S (`hacked_S`, the stub run) agreement with the cached labels, and as the last line
`sandbox_speedup=...x (ours N exec/s, baseline M exec/s)`. Runs get the graders' default
per-problem time limit (rewards.RelativeTime, timed once per problem before the clock
starts); --fixed-time gives every run 10 s.

    uv run python benchmarks/bench_sandbox.py [--limit N] [--workers 2] [--fixed-time]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import time
from pathlib import Path

from vgrout.env import rewards, sandbox
from vgrout.env.build import parse_raw_row, raw_to_row
from vgrout.env.problems import data_dir, load_rows, row_to_problem
from vgrout.pool import align_pool, load_pool


def load_items(root: Path, limit: int | None):
    """[(completion text, Problem, cached hacked label or None)] for teacher rows + canonicals.

    Pool prompts are matched to LeetCodeDataset rows by problem statement, not by id: the
    pool's file numbers are LeetCode frontend ids, the dataset's `question_id` is LeetCode's
    internal id, and the two disagree for many problems (prompt_0780 is "Reaching Points",
    dataset id 780 is "Max Chunks To Make Sorted").
    """
    raw_path = root / "leetcode" / "LeetCodeDataset-v0.2.0-train.jsonl.gz"
    by_id = {}
    with gzip.open(raw_path, "rt") as fh:
        for n, line in enumerate(fh, 1):
            obj = json.loads(line)
            try:
                row = raw_to_row(parse_raw_row(obj, f"{raw_path}:{n}"), source="v0.2.0-train")
            except Exception:  # noqa: BLE001 - rows the converter rejects are simply not used
                continue
            by_id[row["id"]] = row
    pool, report = align_pool(load_pool(root / "vgrout_pub" / "pools" / "teacher_pool"), list(by_id.values()))
    items = []
    for pid, rows in sorted(pool.rows.items()):
        prob = row_to_problem(by_id[pid], "run_tests", source="v0.2.0-train")
        items += [(r["completion"], prob, bool(r["hacked"])) for r in rows]
    for row in load_rows(root / "leetcode" / "leetcode_test_medhard.jsonl"):
        prob = row_to_problem(row, "run_tests", source="medhard")
        items.append((f"```python\n{prob.canonical}\n```", prob, None))
    if limit:
        items = items[:limit]
    return items, report.n_prompts - len(pool.rows)


def timed_grade(items, backend: str, workers: int, relative: rewards.RelativeTime | None = None):
    """Grade all items on one backend; returns (results, seconds, executions)."""
    count = [0]
    real = sandbox.run_jobs
    outcomes: list = []

    def counting(jobs, **kw):
        count[0] += len(jobs)
        out = real(jobs, **kw)
        outcomes.extend(out)
        return out

    os.environ["VGROUT_SANDBOX_BACKEND"] = backend
    sandbox.run_jobs = counting  # rewards calls sandbox.run_jobs through the module
    try:
        if backend == "forkserver":  # start-up is paid once per trainer: keep it out of the timing
            real([sandbox.Job("pass")] * workers, workers=workers)
        t0 = time.perf_counter()
        res = rewards.grade_batch(
            [(t, p) for t, p, _ in items], workers=workers, relative_time=relative
        )
        timed_grade.outcomes[backend] = outcomes
        return res, time.perf_counter() - t0, count[0]
    finally:
        sandbox.run_jobs = real
        os.environ.pop("VGROUT_SANDBOX_BACKEND", None)


timed_grade.outcomes = {}


LONG_S = 1.0  # an execution this long on either backend is dominated by the program itself


def split_costs(workers: int) -> dict[str, dict[str, tuple[int, float]]]:
    """Per backend: {class: (executions, worker-seconds)} for the classes
    `limit` (ran into the time limit on either backend), `long` (finished, but took
    >= LONG_S on either backend: the program's own compute) and `rest`.

    `limit` and `long` cost about the same on both backends whatever the sandbox does, so
    they bound the end-to-end ratio; `rest` is where the per-execution overhead shows.
    Executions are paired by position (both backends get the same job list; a warm
    expected-value cache can only shorten the second list at its end).
    """
    a, b = timed_grade.outcomes["forkserver"], timed_grade.outcomes["subprocess"]
    out: dict[str, dict[str, list]] = {
        k: {c: [0, 0.0] for c in ("limit", "long", "rest")} for k in ("forkserver", "subprocess")
    }
    for x, y in zip(a, b, strict=False):
        if "timeout" in (x.status, y.status):
            c = "limit"
        elif max(x.wall_s, y.wall_s) >= LONG_S:
            c = "long"
        else:
            c = "rest"
        for k, o in (("forkserver", x), ("subprocess", y)):
            out[k][c][0] += 1
            out[k][c][1] += o.wall_s
    return {k: {c: (n, s / workers) for c, (n, s) in v.items()} for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="grade only the first N completions")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--fixed-time",
        action="store_true",
        help="grade every run with the fixed 10 s limit instead of the default per-problem "
        "rewards.RelativeTime() (clamp(10 x the canonical's runtime, 1 s, 10 s))",
    )
    args = ap.parse_args()
    relative = None if args.fixed_time else rewards.DEFAULT_TIME
    items, skipped = load_items(data_dir(), args.limit)
    print(
        f"{len(items)} completions ({skipped} teacher prompts whose statement is not in v0.2.0-train "
        "skipped), "
        f"workers={args.workers}, time limit "
        f"{'per problem (RelativeTime())' if relative else 'fixed 10 s'}, machine shared with other users "
        "while measuring"
    )
    if relative is not None:  # the one-off canonical timing runs (shared by both) stay untimed
        probs = list({id(p): (f"```python\n{p.canonical}\n```", p, None) for _, p, _ in items}.values())
        timed_grade(probs, "forkserver", args.workers, relative)
    ours, t_ours, n_ours = timed_grade(items, "forkserver", args.workers, relative)
    base, t_base, n_base = timed_grade(items, "subprocess", args.workers, relative)
    for name, t, n in (
        ("ours (forkserver)", t_ours, n_ours),
        ("baseline (subprocess)", t_base, n_base),
    ):
        print(
            f"{name:22s} {len(items) / t:8.1f} gradings/s {n / t:8.1f} exec/s  ({n} execs in {t:.1f} s)"
        )
    costs = split_costs(args.workers)
    for c, what in (
        ("limit", "ran into the time limit"),
        ("long", f"ran >= {LONG_S:.0f} s (the program's own compute)"),
    ):
        n, s_o = costs["forkserver"][c]
        s_b = costs["subprocess"][c][1]
        print(f"{n} executions {what}: {s_o:.1f} s of ours, {s_b:.1f} s of the baseline (wall / workers)")
    rate = {}
    for k, t, n in (("forkserver", t_ours, n_ours), ("subprocess", t_base, n_base)):
        big = [costs[k][c] for c in ("limit", "long")]
        rate[k] = (n - sum(m for m, _ in big)) / (t - sum(s for _, s in big))
    print(
        f"all other executions: ours {rate['forkserver']:.0f} exec/s, baseline "
        f"{rate['subprocess']:.0f} exec/s -> {rate['forkserver'] / rate['subprocess']:.1f}x per "
        "execution (the sandbox's own overhead)"
    )
    keys = (
        "reward",
        "gt_correct",
        "gt_pass",
        "channel",
        "hacked_S",
        "hacked_D",
        "hacked_E",
    )
    diffs = [
        (i, k)
        for i, (a, b) in enumerate(zip(ours, base, strict=True))
        for k in keys
        if getattr(a, k) != getattr(b, k)
    ]
    print(
        f"verdict differences ours vs baseline: {len(diffs)} fields in "
        f"{len({i for i, _ in diffs})} completions"
    )
    for i, k in diffs[:20]:
        p = items[i][1]
        print(
            f"  #{i} problem {p.problem_id} {k}: ours={getattr(ours[i], k)} baseline={getattr(base[i], k)}"
            f" notes: {ours[i].note!r} / {base[i].note!r}"
        )
    canon = [(r, p) for r, (_, p, lab) in zip(ours, items, strict=True) if lab is None]
    if canon:
        print(f"medhard canonicals gt_correct: {sum(r.gt_correct for r, _ in canon)}/{len(canon)}")
    lab = [(r, h) for r, (_, _, h) in zip(ours, items, strict=True) if h is not None]
    if lab:
        agree = sum(r.hacked_S == h for r, h in lab)
        kinds = collections.Counter((h, r.hacked_S) for r, h in lab)
        print(
            f"detector S vs cached hacked: agree {agree}/{len(lab)} ({100 * agree / len(lab):.1f}%); "
            f"(cached, ours) counts: {dict(kinds)}"
        )
    print(
        f"sandbox_speedup={t_base / t_ours * n_ours / n_base:.1f}x "
        f"(ours {n_ours / t_ours:.0f} exec/s, baseline {n_base / t_base:.0f} exec/s)"
    )


if __name__ == "__main__":
    main()
