"""Student hack counts over the first and last k steps of finished runs, per experiment.

The organism's target is stated on them (student hack <= 10% at the start, >= 50% at the end).
Experiments are `results.py`'s rows (arm, control, eval set and config hash, so runs of two configs
or two model builds never pool); counts are summed over the experiment's seeds from each run's
rows.jsonl `hack_s` = [hacked, student rollouts] of a step.

    uv run python scripts/student_hack.py --runs docs/results/organism_records
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vgrout.results import ROWS_FILE, group_key, scan_runs


def window_counts(rows: list[dict], k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """([hacked, n] over the first k steps, [hacked, n] over the last k steps), by step number.
    Invariant: with fewer than 2k steps the two windows overlap rather than shrink."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows = sorted(rows, key=lambda r: r["step"])
    if not rows:
        raise ValueError("no rows")

    def tot(rs: list[dict]) -> tuple[int, int]:
        return sum(int(r["hack_s"][0]) for r in rs), sum(int(r["hack_s"][1]) for r in rs)

    return tot(rows[:k]), tot(rows[-k:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("out/runs"), help="folder of run folders")
    ap.add_argument("--k", type=int, default=3, help="steps in each window")
    args = ap.parse_args()
    records, _ = scan_runs(args.runs)
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault(group_key(r), []).append(r)
    print(f"| experiment | config | seeds | student hack, first {args.k} steps | last {args.k} steps |")
    print("|---|---|---|---|---|")
    for key in sorted(groups):
        runs = sorted(groups[key], key=lambda r: r.seed)
        first, last = [0, 0], [0, 0]
        for r in runs:
            rows = [json.loads(x) for x in (r.path / ROWS_FILE).read_text().splitlines() if x.strip()]
            (fh, fn), (lh, ln) = window_counts(rows, args.k)
            first[0] += fh
            first[1] += fn
            last[0] += lh
            last[1] += ln
        r0 = runs[0]
        name = r0.arm + (", Haar" if r0.random_v_seed is not None else "")
        print(f"| {name} | {r0.short_hash} adapter={r0.config.get('adapter', 'svd')} lr={r0.config.get('lr')} "
              f"| {','.join(str(r.seed) for r in runs)} | {first[0]}/{first[1]} | {last[0]}/{last[1]} |")


if __name__ == "__main__":
    main()
