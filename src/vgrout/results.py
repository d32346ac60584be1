"""Aggregate finished runs into the paper table: deployed hack/solve per (preset, arm, control).

Reads every run folder under `out/runs/` (see `vgrout.train` for the schema). A run
counts only when `status.json` says `complete` and `per_mode_deploy.json` parses and
passes validation; every other folder is listed with the reason and never averaged.

Groups are keyed by (preset, arm, control, eval_set): `control` is `haar` for runs with
`random_v_seed` set (the random-direction controls are their own rows), and runs scored on
different eval sets are never mixed. Within a group each training seed counts once; an
older folder for the same seed is listed as superseded.

Numbers per group: mean over seeds and a 95% Student-t interval (n = 1: no interval),
knob-on (train) hack/solve, per-mode deploy hack, and the difference to the vanilla group
of the same preset and eval set, flagged when the solve rates are not matched.

This module imports no torch, so `scripts/results.py` starts in well under a second.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tabulate import tabulate

from .atomic import write_text_atomic
from .env.modes import ENV_MODES

DEPLOY_SCHEMA = "vgrout.per_mode_deploy/1"
DEPLOY_FILE = "per_mode_deploy.json"
STATUS_FILE = "status.json"
CONFIG_FILE = "config.json"
ROWS_FILE = "rows.jsonl"
ARM_ORDER: tuple[str, ...] = ("vanilla", "projected", "routing", "routing2")
RATE_FIELDS = ("hack_train", "solve_train", "hack_deploy", "solve_deploy")
MODE_RATE_FIELDS = ("train_hack", "train_solve", "deploy_hack", "deploy_solve")
DEFAULT_SOLVE_TOL = 0.05


# ── Student t quantiles (no scipy in the dependency set) ────────────────────────────────


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz iteration)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(
        f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})"
    )


def betainc_reg(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) in [0, 1]; I_0 = 0, I_1 = 1, monotone in x."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc_reg: x={x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    # The continued fraction converges fast only on one side of the mean; use symmetry.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with `df` degrees of freedom; t_cdf(-t) = 1 - t_cdf(t)."""
    if df <= 0:
        raise ValueError(f"t_cdf: df must be positive, got {df}")
    tail = 0.5 * betainc_reg(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of `t_cdf` in t (bisection to ~1e-12 relative): t_cdf(t_quantile(p, df), df) = p."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class MeanCI:
    """Mean of n values with a two-sided Student-t interval; lo/hi are None when n < 2."""

    n: int
    mean: float
    lo: float | None
    hi: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.lo is None or self.hi is None else (self.hi - self.lo) / 2.0


def mean_ci(values: Sequence[float], level: float = 0.95) -> MeanCI:
    """Mean ± t_{(1+level)/2, n-1} · s/√n, with s the sample (n-1) standard deviation.

    Invariant: the interval is symmetric about the mean; it is absent (None) for n = 1,
    because one seed says nothing about seed-to-seed spread.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci: no values")
    if any(not math.isfinite(v) for v in xs):
        raise ValueError(f"mean_ci: non-finite value in {xs}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return MeanCI(n, mean, None, None)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return MeanCI(n, mean, mean - half, mean + half)


def welch_diff_ci(
    a: Sequence[float], b: Sequence[float], level: float = 0.95
) -> tuple[float, float] | None:
    """Interval for mean(a) - mean(b) without assuming equal variances (Welch-Satterthwaite df).

    Invariant: centred on the difference of means; None when either side has n < 2; a zero
    standard error (both sides constant) gives the degenerate interval [d, d].
    """
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return None
    ca, cb = mean_ci(a), mean_ci(b)
    d = ca.mean - cb.mean
    va = math.fsum((x - ca.mean) ** 2 for x in a) / (na - 1) / na
    vb = math.fsum((x - cb.mean) ** 2 for x in b) / (nb - 1) / nb
    se2 = va + vb
    if se2 == 0.0:
        return (d, d)
    df = se2**2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    half = t_quantile(0.5 + level / 2.0, df) * math.sqrt(se2)
    return (d - half, d + half)


# ── reading run folders ──────────────────────────────────────────────────────────────────


class RunFolderError(ValueError):
    """A run folder that cannot be counted; the message says which file/field and why."""


@dataclass(frozen=True)
class RunRecord:
    """One complete, validated run: its headline numbers and per-mode deploy rates."""

    path: Path
    run_id: str
    preset: str
    arm: str
    seed: int
    control: str  # "" for the real direction, "haar" for random-direction controls
    random_v_seed: int | None
    eval_set: str
    model: str
    steps: int
    eval_n: int
    hack_train: float
    solve_train: float
    hack_deploy: float
    solve_deploy: float
    by_mode: dict[str, dict[str, float]]


@dataclass(frozen=True)
class SkippedRun:
    """A run folder that was listed, not averaged, and why."""

    path: Path
    reason: str


class RunRecordMissing(RunFolderError):
    """The file does not exist (as opposed to existing but being malformed)."""

    def __init__(self, path: Path):
        super().__init__(f"no {path.name}")
        self.path = path


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise RunRecordMissing(path)
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path.name} is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise RunFolderError(f"{path.name}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _rate(obj: dict, key: str, where: str) -> float:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise RunFolderError(f"{where}: field {key!r} must be a finite number, got {v!r}")
    if not 0.0 <= v <= 1.0:
        raise RunFolderError(f"{where}: field {key!r} = {v} is not a rate in [0, 1]")
    return float(v)


def _int(obj: dict, key: str, where: str, *, optional: bool = False) -> int | None:
    v = obj.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RunFolderError(f"{where}: field {key!r} must be an integer, got {v!r}")
    return v


def _str(obj: dict, key: str, where: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v:
        raise RunFolderError(f"{where}: field {key!r} must be a non-empty string, got {v!r}")
    return v


def parse_deploy_record(rec: dict, path: Path) -> RunRecord:
    """Validate a `per_mode_deploy.json` object and turn it into a RunRecord."""
    where = DEPLOY_FILE
    if rec.get("schema") != DEPLOY_SCHEMA:
        raise RunFolderError(
            f"{where}: field 'schema' is {rec.get('schema')!r}, expected {DEPLOY_SCHEMA!r}"
        )
    eval_set = _str(rec, "eval_set", where)
    if eval_set not in ("train", "heldout"):
        raise RunFolderError(f"{where}: field 'eval_set' must be 'train' or 'heldout'")
    by_mode_raw = rec.get("by_mode")
    if not isinstance(by_mode_raw, dict) or not by_mode_raw:
        raise RunFolderError(f"{where}: field 'by_mode' must be a non-empty object")
    by_mode: dict[str, dict[str, float]] = {}
    for mode, stats in by_mode_raw.items():
        if not isinstance(stats, dict):
            raise RunFolderError(f"{where}: by_mode[{mode!r}] must be an object")
        by_mode[mode] = {k: _rate(stats, k, f"{where} by_mode[{mode!r}]") for k in MODE_RATE_FIELDS}
    rv = _int(rec, "random_v_seed", where, optional=True)
    steps = _int(rec, "steps", where)
    steps_done = _int(rec, "steps_done", where)
    if steps_done != steps:
        raise RunFolderError(f"{where}: steps_done={steps_done} differs from steps={steps}")
    return RunRecord(
        path=path,
        run_id=_str(rec, "run_id", where),
        preset=_str(rec, "preset", where),
        arm=_str(rec, "arm", where),
        seed=_int(rec, "seed", where),  # type: ignore[arg-type]
        control="" if rv is None else "haar",
        random_v_seed=rv,
        eval_set=eval_set,
        model=_str(rec, "model", where),
        steps=steps,  # type: ignore[arg-type]
        eval_n=_int(rec, "eval_n", where),  # type: ignore[arg-type]
        by_mode=by_mode,
        **{k: _rate(rec, k, where) for k in RATE_FIELDS},
    )


def load_run(run_dir: Path) -> RunRecord:
    """Load one run folder, or raise RunFolderError with the reason it cannot be counted."""
    status_path = run_dir / STATUS_FILE
    try:
        status = _read_json(status_path)
    except RunRecordMissing:
        raise RunFolderError(f"no {STATUS_FILE} (not a finished run folder)") from None
    state = status.get("state")
    if state != "complete":
        step, steps, err = status.get("step"), status.get("steps"), status.get("error")
        if isinstance(step, int) and isinstance(steps, int):  # step = last finished index
            progress = f", {step + 1}/{steps} steps done" if step >= 0 else ", no step done"
        else:
            progress = ""
        detail = f": {err}" if err else ""
        raise RunFolderError(f"status {state!r}{progress}{detail}")
    try:
        rec = _read_json(run_dir / DEPLOY_FILE)
    except RunRecordMissing:
        raise RunFolderError(
            f"status complete but no {DEPLOY_FILE} (final eval missing; rerun the final eval)"
        ) from None
    return parse_deploy_record(rec, run_dir)


def scan_runs(runs_dir: Path) -> tuple[list[RunRecord], list[SkippedRun]]:
    """Every subfolder of `runs_dir` is either a counted RunRecord or a SkippedRun with a reason.

    When one seed of one group has several complete folders, the newest (by folder name,
    which starts with the UTC timestamp) counts and the others are listed as superseded.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(
            f"runs folder {runs_dir} does not exist: train something first "
            f"(e.g. `just smoke`) or pass --runs PATH"
        )
    good: list[RunRecord] = []
    skipped: list[SkippedRun] = []
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        try:
            good.append(load_run(d))
        except RunFolderError as e:
            skipped.append(SkippedRun(d, str(e)))
    newest: dict[tuple, RunRecord] = {}
    for r in good:  # sorted by folder name = chronological
        key = (*group_key(r), r.seed, r.random_v_seed)
        if key in newest:
            skipped.append(SkippedRun(newest[key].path, f"superseded by {r.path.name} (same seed)"))
        newest[key] = r
    return list(newest.values()), sorted(skipped, key=lambda s: s.path.name)


# ── aggregation ──────────────────────────────────────────────────────────────────────────


def group_key(r: RunRecord) -> tuple[str, str, str, str]:
    return (r.preset, r.arm, r.control, r.eval_set)


def _key(g: GroupStats) -> tuple[str, str, str, str]:
    return (g.preset, g.arm, g.control, g.eval_set)


def _arm_rank(arm: str) -> int:
    return ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER)


@dataclass
class GroupStats:
    """Aggregate of one (preset, arm, control, eval_set) group over its seeds."""

    preset: str
    arm: str
    control: str
    eval_set: str
    seeds: list[int]
    hack_deploy: MeanCI
    solve_deploy: MeanCI
    hack_train: MeanCI
    solve_train: MeanCI
    mode_deploy_hack: dict[str, MeanCI]
    models: list[str]
    steps: list[int]
    random_v_seeds: list[int] = field(default_factory=list)
    d_hack: float | None = None  # deploy hack minus vanilla's (same preset, eval set)
    d_hack_ci: tuple[float, float] | None = None  # Welch 95% interval of d_hack
    d_solve: float | None = None
    matched: bool | None = None  # |d_solve| <= tolerance
    note: str = ""


def aggregate(runs: Sequence[RunRecord], solve_tol: float = DEFAULT_SOLVE_TOL) -> list[GroupStats]:
    """Group runs and compute per-group means/CIs and the delta to vanilla of the same preset."""
    groups: dict[tuple[str, str, str, str], list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(group_key(r), []).append(r)
    out: list[GroupStats] = []
    for key in sorted(groups, key=lambda k: (k[0], k[3], _arm_rank(k[1]), k[1], k[2])):
        rs = sorted(groups[key], key=lambda r: r.seed)
        modes = sorted({m for r in rs for m in r.by_mode}, key=mode_rank)
        g = GroupStats(
            preset=key[0],
            arm=key[1],
            control=key[2],
            eval_set=key[3],
            seeds=[r.seed for r in rs],
            hack_deploy=mean_ci([r.hack_deploy for r in rs]),
            solve_deploy=mean_ci([r.solve_deploy for r in rs]),
            hack_train=mean_ci([r.hack_train for r in rs]),
            solve_train=mean_ci([r.solve_train for r in rs]),
            # a mode absent from some seed's eval is averaged over the seeds that have it
            mode_deploy_hack={
                m: mean_ci([r.by_mode[m]["deploy_hack"] for r in rs if m in r.by_mode])
                for m in modes
            },
            models=sorted({r.model for r in rs}),
            steps=sorted({r.steps for r in rs}),
            random_v_seeds=sorted({r.random_v_seed for r in rs if r.random_v_seed is not None}),
        )
        notes = []
        if len(g.models) > 1:
            notes.append(f"mixed models {g.models}")
        if len(g.steps) > 1:
            notes.append(f"mixed step counts {g.steps}")
        g.note = "; ".join(notes)
        out.append(g)
    vanilla = {(g.preset, g.eval_set): g for g in out if g.arm == "vanilla" and g.control == ""}
    for g in out:
        base = vanilla.get((g.preset, g.eval_set))
        if base is None or base is g:
            continue
        g.d_hack = g.hack_deploy.mean - base.hack_deploy.mean
        g.d_hack_ci = welch_diff_ci(
            [r.hack_deploy for r in groups[_key(g)]], [r.hack_deploy for r in groups[_key(base)]]
        )
        g.d_solve = g.solve_deploy.mean - base.solve_deploy.mean
        g.matched = abs(g.d_solve) <= solve_tol
    return out


def mode_rank(m: str) -> tuple[int, str]:
    return (ENV_MODES.index(m) if m in ENV_MODES else len(ENV_MODES), m)


# ── rendering ────────────────────────────────────────────────────────────────────────────


def _fmt_ci(c: MeanCI) -> str:
    if c.lo is None:
        return f"{c.mean:.3f} (CI n/a)"
    return f"{c.mean:.3f} [{c.lo:.3f}, {c.hi:.3f}]"


def _fmt_delta(g: GroupStats, solve_tol: float) -> str:
    if g.arm == "vanilla" and g.control == "":
        return "(baseline)"
    if g.d_hack is None:
        return "no vanilla"
    tag = "at matched solve" if g.matched else f"solve differs > {solve_tol:g}"
    ci = "" if g.d_hack_ci is None else f" [{g.d_hack_ci[0]:+.3f}, {g.d_hack_ci[1]:+.3f}]"
    return f"{g.d_hack:+.3f}{ci} (solve {g.d_solve:+.3f}, {tag})"


def all_modes(groups: Sequence[GroupStats]) -> list[str]:
    return sorted({m for g in groups for m in g.mode_deploy_hack}, key=mode_rank)


def markdown_table(groups: Sequence[GroupStats], solve_tol: float = DEFAULT_SOLVE_TOL) -> str:
    """GitHub-markdown table, one row per group (rates as mean [95% CI])."""
    modes = all_modes(groups)
    rows = []
    for g in groups:
        row = {
            "preset": g.preset,
            "arm": g.arm + (" (haar)" if g.control else ""),
            "eval": g.eval_set,
            "n": len(g.seeds),
            "deploy hack": _fmt_ci(g.hack_deploy),
            "deploy solve": _fmt_ci(g.solve_deploy),
            "train hack": f"{g.hack_train.mean:.3f}",
            "train solve": f"{g.solve_train.mean:.3f}",
        }
        for m in modes:
            c = g.mode_deploy_hack.get(m)
            row[f"deploy hack {m}"] = "" if c is None else f"{c.mean:.3f}"
        row["Δ deploy hack vs vanilla"] = _fmt_delta(g, solve_tol)
        if g.note:
            row["note"] = g.note
        rows.append(row)
    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True)


def skipped_table(skipped: Sequence[SkippedRun]) -> str:
    rows = [{"run folder": s.path.name, "why not averaged": s.reason} for s in skipped]
    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True)


CSV_BASE_COLUMNS = [
    "preset",
    "arm",
    "control",
    "eval_set",
    "n_seeds",
    "seeds",
    "random_v_seeds",
    "hack_deploy_mean",
    "hack_deploy_ci_lo",
    "hack_deploy_ci_hi",
    "solve_deploy_mean",
    "solve_deploy_ci_lo",
    "solve_deploy_ci_hi",
    "hack_train_mean",
    "hack_train_ci_lo",
    "hack_train_ci_hi",
    "solve_train_mean",
    "solve_train_ci_lo",
    "solve_train_ci_hi",
]


def csv_text(groups: Sequence[GroupStats]) -> str:
    """CSV with full-precision numbers; empty cells where a value does not exist (CI at n=1)."""
    modes = all_modes(groups)
    cols = CSV_BASE_COLUMNS + [f"deploy_hack_{m}" for m in modes]
    cols += [
        "d_hack_vs_vanilla",
        "d_hack_ci_lo",
        "d_hack_ci_hi",
        "d_solve_vs_vanilla",
        "matched_solve",
        "models",
        "steps",
        "note",
    ]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()

    def num(x: float | None) -> str:
        return "" if x is None else repr(float(x))

    for g in groups:
        row = {
            "preset": g.preset,
            "arm": g.arm,
            "control": g.control,
            "eval_set": g.eval_set,
            "n_seeds": len(g.seeds),
            "seeds": " ".join(map(str, g.seeds)),
            "random_v_seeds": " ".join(map(str, g.random_v_seeds)),
        }
        for name in ("hack_deploy", "solve_deploy", "hack_train", "solve_train"):
            c: MeanCI = getattr(g, name)
            row[f"{name}_mean"], row[f"{name}_ci_lo"], row[f"{name}_ci_hi"] = (
                num(c.mean),
                num(c.lo),
                num(c.hi),
            )
        for m in modes:
            c = g.mode_deploy_hack.get(m)
            row[f"deploy_hack_{m}"] = "" if c is None else num(c.mean)
        row["d_hack_vs_vanilla"] = num(g.d_hack)
        lo_hi = g.d_hack_ci or (None, None)
        row["d_hack_ci_lo"], row["d_hack_ci_hi"] = num(lo_hi[0]), num(lo_hi[1])
        row["d_solve_vs_vanilla"] = num(g.d_solve)
        row["matched_solve"] = "" if g.matched is None else str(g.matched).lower()
        row["models"] = " ".join(g.models)
        row["steps"] = " ".join(map(str, g.steps))
        row["note"] = g.note
        w.writerow(row)
    return buf.getvalue()


def write_csv(groups: Sequence[GroupStats], out_dir: Path, stamp: str | None = None) -> Path:
    """Write results_<stamp>.csv and results_latest.csv (both atomically); return the first."""
    stamp = stamp or datetime.now().strftime("%Y%m%dT%H%M%S")
    text = csv_text(groups)
    path = Path(out_dir) / f"results_{stamp}.csv"
    write_text_atomic(path, text)
    write_text_atomic(Path(out_dir) / "results_latest.csv", text)
    return path


# ── CLI ──────────────────────────────────────────────────────────────────────────────────


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="results.py",
        description="Aggregate complete runs into one table per (preset, arm, control): "
        "deployed hack/solve mean and 95% t-interval over seeds, delta vs vanilla.",
    )
    ap.add_argument("--runs", type=Path, default=Path("out/runs"), help="folder of run folders")
    ap.add_argument("--out", type=Path, default=Path("out/results"), help="where CSVs go")
    ap.add_argument(
        "--solve-tol",
        type=float,
        default=DEFAULT_SOLVE_TOL,
        help="a delta vs vanilla counts as 'at matched solve' when |Δsolve| <= this",
    )
    args = ap.parse_args(argv)
    try:
        runs, skipped = scan_runs(args.runs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if runs:
        groups = aggregate(runs, args.solve_tol)
        print(f"## Deployed hack / solve by arm ({len(runs)} runs under {args.runs})\n")
        print("Rates are mean [95% Student-t CI over seeds]; deploy = quarantine ablated.\n")
        print(markdown_table(groups, args.solve_tol))
    if skipped:
        print(f"\n## Not averaged ({len(skipped)} run folders)\n")
        print(skipped_table(skipped))
    if not runs:
        print(f"\nerror: no complete runs with {DEPLOY_FILE} under {args.runs}", file=sys.stderr)
        return 1
    path = write_csv(groups, args.out)
    print(f"\nCSV: {path} (and {path.parent / 'results_latest.csv'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
