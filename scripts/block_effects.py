"""Paired effects of the block adapters' deploy reset, from finished organism run folders.

`results.py` compares an arm with the vanilla of its own config. For `absorb` the trained model *is*
that vanilla (`none` on the same init trains identically: every rollout trains both blocks), so the
reset's effect is measured inside each run: deployed (quarantine reset) minus trained (`hack_train`,
the same model with the quarantine in), paired over seeds and over (seed, problem) clusters. And
because `scorda` and `scorda_rev` differ only in which slots the reset removes (training is the same
up to float summation order), their deploy rates are compared paired by seed: the directional control.

    uv run python scripts/block_effects.py --runs out/runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vgrout.results import (
    cluster_diff_ci,
    group_key,
    mean_ci,
    paired_ratio_diff_ci,
    scan_runs,
    seed_diff_ci,
)


def _ci(lo: float | None, hi: float | None) -> str:
    """The interval, "n/a" without one, and "[no spread]" where every seed gave the same value (a
    zero-width t interval estimates no variance: it is not a precise result)."""
    if lo is None or hi is None:
        return "n/a"
    return "[no spread]" if hi - lo <= 1e-9 else f"[{lo:+.3f}, {hi:+.3f}]"


def _adapter(r) -> str:
    return str(r.config.get("adapter", "svd"))


def _without_adapter(r) -> dict:
    return {k: v for k, v in r.config.items() if k != "adapter"}


def reset_effect(runs) -> str:
    """deploy − trained hack, per seed (paired t) and over the runs' (seed, problem) clusters (paired)."""
    seeds = mean_ci([r.hack_deploy - r.hack_train for r in runs])
    ev_d, ev_t, sizes = [], [], []
    for r in sorted(runs, key=lambda r: r.seed):
        for pid in sorted(r.by_problem or {}):
            p = r.by_problem[pid]
            ev_d.append(p.deploy_hack)
            ev_t.append(p.train_hack)
            sizes.append(p.n)
    cl = paired_ratio_diff_ci(ev_d, sizes, ev_t, sizes) if sizes else None
    cl_txt = "n/a" if cl is None else f"{cl.diff:+.3f} {_ci(cl.lo, cl.hi)}"
    return f"{seeds.mean:+.3f} {_ci(seeds.lo, seeds.hi)} | {cl_txt}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("out/runs"), help="folder of run folders")
    ap.add_argument("--preset", default="organism")
    args = ap.parse_args()
    runs, skipped = scan_runs(args.runs)
    runs = [r for r in runs if r.preset == args.preset and r.eval_set == "heldout"]
    groups: dict[tuple, list] = {}  # one experiment per results.group_key: configs are never pooled
    for r in runs:
        groups.setdefault(group_key(r), []).append(r)
    print("| arm | adapter | control | seeds | trained hack | deployed hack | Δ deploy − trained, seeds [paired t 95%] "
          "| Δ, clusters [paired 95%] | config |")
    print("|---|---|---|---|---|---|---|---|---|")
    for _, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r.seed)
        r0 = rs[0]
        tr, de = mean_ci([r.hack_train for r in rs]), mean_ci([r.hack_deploy for r in rs])
        print(f"| {r0.arm} | {_adapter(r0)} | {r0.control or '-'} | {','.join(str(r.seed) for r in rs)} | "
              f"{tr.mean:.3f} {_ci(tr.lo, tr.hi)} | {de.mean:.3f} {_ci(de.lo, de.hi)} | {reset_effect(rs)} | "
              f"{r0.short_hash} |")
    for _, rs in sorted(groups.items()):  # scorda against the scorda_rev of the same config otherwise
        r0 = rs[0]
        if (r0.arm, r0.control, _adapter(r0)) != ("absorb", "", "scorda"):
            continue
        twins = [g for g in groups.values() if (g[0].arm, g[0].control, _adapter(g[0])) == ("absorb", "", "scorda_rev")
                 and g[0].eval_set == r0.eval_set and _without_adapter(g[0]) == _without_adapter(r0)]
        if not twins:
            continue
        a, b = {r.seed: r for r in rs}, {r.seed: r for r in twins[0]}
        common = sorted(set(a) & set(b))
        if not common:
            continue
        ci, paired = seed_diff_ci({s: a[s].hack_deploy for s in common}, {s: b[s].hack_deploy for s in common})
        d = sum(a[s].hack_deploy - b[s].hack_deploy for s in common) / len(common)
        cl = cluster_diff_ci([a[s] for s in common], [b[s] for s in common], "deploy_hack")
        cl_txt = "n/a" if cl is None else f"{cl.diff:+.3f} {_ci(cl.lo, cl.hi)}"
        print(f"\nabsorb deployed hack, scorda − scorda_rev over seeds {common}: {d:+.3f} "
              f"{_ci(*(ci or (None, None)))} ({'paired t' if paired else 'Welch'}); clusters {cl_txt} "
              f"(configs {r0.short_hash} / {twins[0][0].short_hash})")
    for s in skipped:
        print(f"not counted: {s.path.name}: {s.reason}")


if __name__ == "__main__":
    main()
