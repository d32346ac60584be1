"""Aggregate finished runs into the paper table: deployed hack/solve per experiment.

Reads every run folder under `out/runs/` (see `vgrout.train` for the schema). A run counts
only when `status.json` says `complete` and `config.json` and `per_mode_deploy.json` parse,
pass validation and describe the same run; every other folder is listed with the reason and
never averaged.

A group is one experiment: runs are keyed by (preset, arm, control, eval set) and a hash of
every science knob in their `config.json` (all knobs except NON_SCIENCE_KNOBS: the seed,
output paths, scheduling and logging knobs). Runs that differ in any other knob are never
averaged; the table's `config` column shows the short hash and the knobs that differ between
groups of the same preset. Haar controls (`random_v_seed` set) are their own rows
(control = haar). Within a group each seed counts once: an older folder with the same config
and seed is listed as superseded.

Numbers per group (docs/artifacts.md, "Results CSV", says the same for readers):
- the mean over seeds with a 95% Student-t interval over seeds (the headline; none at n = 1);
- the pooled rate over (seed, problem) clusters with a 95% cluster interval (`ratio_ci`):
  it exists at one seed and measures the eval's sampling and problem noise given the
  trained models, not the seed-to-seed spread;
- the difference to the vanilla group with the same config except the arm's own knobs
  (ARM_ONLY_KNOBS): a Welch interval over seeds, and a cluster interval over (seed, problem)
  clusters, paired when both groups ran the same seeds on the same eval problems;
- a verdict on solve from the Δsolve interval (`solve_verdict`): matched (inside ±margin),
  solve differs (excludes 0), or inconclusive.

This module imports no torch, so `scripts/results.py` starts in well under a second.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import sys
from collections.abc import Mapping, Sequence
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
DEFAULT_SOLVE_MARGIN = 0.05
HASH_CHARS = 8  # the short config hash shown in tables and CSVs
# config.json's provenance.model_weights (model.weights_digest of a local model folder), read as a
# science knob: runs of two builds of the organism (CPU float rounding) are different experiments.
MODEL_WEIGHTS_KNOB = "model_weights"

# ── which config knobs define an experiment ──────────────────────────────────────────────
# Every Config field is in exactly one of NON_SCIENCE_KNOBS and SCIENCE_KNOBS (a test fails
# when a new field is in neither: decide it there). A knob in a config.json that neither list
# knows (a run from a newer vgrout) is hashed as science: the safe side.

# Knobs left out of the config hash: runs that differ only in these are replicates of one
# experiment. Each can change the numbers at most the way another seed or fp rounding does.
NON_SCIENCE_KNOBS: dict[str, str] = {
    "seed": "the replicate index a group averages over",
    "out_root": "where outputs are written",
    "out_tag": "a suffix of the run folder's name",
    "resume": "scheduling: a resumed run reproduces the straight run (tests/test_train.py)",
    "stop_after_steps": "scheduling: where an invocation pauses, not what it computes",
    "device": "hardware: the same computation up to kernel rounding",
    "ckpt_every": "which checkpoints are saved",
    "save_eval_ckpts": "which checkpoints are saved",
    "cos_pre_split_every": "a diagnostic: splits the backward into student and teacher passes whose "
    "sum is the same gradient up to fp rounding",
    "half_a": "logging: splits student hacks into halves A/B in the per-step row and the BLUF; "
    "training never reads it (move it to SCIENCE_KNOBS if it ever does)",
    "eval_ablate_every": "the periodic eval's schedule; the final eval, which results reads, is the "
    "same, and evals sample under their own RNG (eval_seed), so training is unchanged (tests/test_eval.py)",
    "measure_directions": "vanilla only: loads v_hack to log cos_upd; nothing it does acts on training",
    "eval_heldout_periodic": "which set the periodic eval uses; the final eval is the same",
    "report_to": "logging: mirrors the rows to wandb / tensorboard",
    "gen_share_prefix": "speed: the group's prompt is prefilled once and its KV cache shared; the "
    "completions have the same distribution (a different draw, as another seed gives)",
}

# Science knobs that only an arm with hack directions or a quarantine reads: vanilla ignores
# them (no directions, no δS_hack), so an arm's baseline is the vanilla group whose config
# matches on every other science knob.
ARM_ONLY_KNOBS: dict[str, str] = {
    "intervention": "the arm itself",
    "gate_mode": "erase/route: which coefficients are removed",
    "project_overshoot": "erase/route: how much of the component is removed",
    "preserve_magnitude": "erase: rescale the edited gradient",
    "intervene_on": "erase/route: edit the gradient or AdamW's update",
    "gate_anchor_teacher_only": "route2: the gate's anchors",
    "rollout_ablate_frac": "route/route2: rollouts sampled with the quarantine ablated",
    "random_v_seed": "Haar control directions (vanilla refuses the flag)",
    "route_tail_q": "routeA: the quantile of the absorb score above which a rollout is routed",
    "v_hack_path": "the hack directions",
    "vhack_pairs_path": "the hack directions",
    "v_hack_extract_top_k": "the hack directions",
    "v_hack_k": "the hack directions",
    "v_hack_tau_axis": "the hack directions",
    "v_hack_drop_bottom_frac": "the hack directions",
    "v_hack_n_heldout": "the hack directions",
    "vhack_refresh_every": "the hack directions",
    "v_hack_sign": "the hack directions",
    "vhack_pair_loss": "the hack directions",
}

SCIENCE_KNOBS: frozenset[str] = frozenset(ARM_ONLY_KNOBS) | {
    "preset",  # Config.to_dict adds it: the preset's defaults are recorded knob by knob anyway
    "model", "steps", "group", "max_new", "n_problems", "beta", "prompts_per_step",
    "lr", "adam_beta1", "adam_beta2", "clip", "weight_decay", "warmup_frac", "grad_clip", "unbiased",
    "max_seq_len", "temperature", "top_k",
    "env_mode", "env_modes", "data_path", "grade_time_limit", "teacher_pool_dir", "mix_ratio",
    "teacher_off_step", "teacher_modes",
    "eval_n_prompts", "eval_data_path", "eval_seed",
    "adapter", "block_r", "adapt_top_layers",
}  # fmt: skip


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


# ── intervals with problems as clusters ──────────────────────────────────────────────────
# A run's eval draws G samples of each of a few problems: samples of one problem share its
# difficulty, so they are not independent. The rate is a ratio estimator p = Σy / Σn over
# clusters c (y_c events among n_c samples) with the linearised, cluster-robust variance
#     Var(p) = C/(C-1) · Σ_c (y_c - p·n_c)² / (Σn)²,
# and a t quantile with C - 1 degrees of freedom. With equal cluster sizes this is exactly
# the Student-t interval over the C per-problem rates.


@dataclass(frozen=True)
class ClusterCI:
    """Ratio estimate Σy/Σn over C clusters with its interval; lo/hi are None when C < 2."""

    rate: float
    lo: float | None
    hi: float | None
    n_clusters: int
    n: int  # samples


def _ratio_residuals(events: Sequence[float], sizes: Sequence[float]) -> tuple[float, list[float]]:
    """(p, [(y_c - p·n_c) / Σn]): the estimate and each cluster's linearised contribution."""
    if len(events) != len(sizes):
        raise ValueError(f"ratio: {len(events)} event counts but {len(sizes)} cluster sizes")
    total = math.fsum(sizes)
    if not sizes or total <= 0:
        raise ValueError("ratio: no samples")
    for y, n in zip(events, sizes, strict=True):
        if not 0 <= y <= n:
            raise ValueError(f"ratio: a cluster has {y} events among {n} samples; need 0 <= events <= size")
    p = math.fsum(events) / total
    return p, [(y - p * n) / total for y, n in zip(events, sizes, strict=True)]


def _t_interval(centre: float, var: float, df: float, level: float) -> tuple[float, float]:
    half = 0.0 if var == 0.0 else t_quantile(0.5 + level / 2.0, df) * math.sqrt(var)
    return centre - half, centre + half


def ratio_ci(events: Sequence[float], sizes: Sequence[float], level: float = 0.95) -> ClusterCI:
    """p = Σy/Σn ± t_{C-1} · sqrt(C/(C-1) · Σ(y_c - p·n_c)² / (Σn)²).

    Invariant: symmetric about p; None bounds for one cluster; a zero variance (every cluster
    at the same rate, e.g. no event anywhere) gives the zero-width interval [p, p].
    """
    p, res = _ratio_residuals(events, sizes)
    c = len(res)
    if c < 2:
        return ClusterCI(p, None, None, c, int(math.fsum(sizes)))
    lo, hi = _t_interval(p, c / (c - 1) * math.fsum(r * r for r in res), c - 1, level)
    return ClusterCI(p, lo, hi, c, int(math.fsum(sizes)))


@dataclass(frozen=True)
class DiffCI:
    """Difference of two ratio estimates with its interval (None bounds when undefined)."""

    diff: float
    lo: float | None
    hi: float | None
    df: float | None
    n_clusters: int  # paired: the common clusters; unpaired: both sides' clusters together
    paired: bool


def paired_ratio_diff_ci(
    a_events: Sequence[float],
    a_sizes: Sequence[float],
    b_events: Sequence[float],
    b_sizes: Sequence[float],
    level: float = 0.95,
) -> DiffCI:
    """p_a - p_b where cluster c of a and of b are the same unit (same seed, same problem):
    Var = C/(C-1) · Σ_c (r_a,c - r_b,c)² with r the linearised residuals of `_ratio_residuals`,
    t with C - 1 df. With equal cluster sizes: the paired t-interval of per-problem differences."""
    if len(a_sizes) != len(b_sizes):
        raise ValueError(f"paired: {len(a_sizes)} clusters on one side, {len(b_sizes)} on the other")
    pa, ra = _ratio_residuals(a_events, a_sizes)
    pb, rb = _ratio_residuals(b_events, b_sizes)
    c, d = len(ra), pa - pb
    if c < 2:
        return DiffCI(d, None, None, None, c, True)
    var = c / (c - 1) * math.fsum((x - y) ** 2 for x, y in zip(ra, rb, strict=True))
    lo, hi = _t_interval(d, var, c - 1, level)
    return DiffCI(d, lo, hi, c - 1, c, True)


def unpaired_ratio_diff_ci(
    a_events: Sequence[float],
    a_sizes: Sequence[float],
    b_events: Sequence[float],
    b_sizes: Sequence[float],
    level: float = 0.95,
) -> DiffCI:
    """p_a - p_b from independent cluster samples: Var = V_a + V_b (each as in `ratio_ci`),
    Welch-Satterthwaite df from C_a - 1 and C_b - 1. None bounds when either side has C < 2."""
    pa, ra = _ratio_residuals(a_events, a_sizes)
    pb, rb = _ratio_residuals(b_events, b_sizes)
    ca, cb, d = len(ra), len(rb), pa - pb
    if ca < 2 or cb < 2:
        return DiffCI(d, None, None, None, ca + cb, False)
    va = ca / (ca - 1) * math.fsum(r * r for r in ra)
    vb = cb / (cb - 1) * math.fsum(r * r for r in rb)
    if va + vb == 0.0:
        return DiffCI(d, d, d, None, ca + cb, False)
    df = (va + vb) ** 2 / (va**2 / (ca - 1) + vb**2 / (cb - 1))
    lo, hi = _t_interval(d, va + vb, df, level)
    return DiffCI(d, lo, hi, df, ca + cb, False)


VERDICTS = ("matched", "solve differs", "inconclusive")


def solve_verdict(lo: float, hi: float, margin: float) -> str:
    """The verdict on a 95% interval [lo, hi] of Δsolve (arm minus vanilla):
    'matched' when it lies inside [-margin, +margin] (an equivalence test: two one-sided tests
    at 2.5% each), else 'solve differs' when it excludes 0, else 'inconclusive'.
    A small real difference inside the margin counts as matched. A zero-width interval (every
    seed or cluster at the same value, e.g. no solve anywhere on either side) estimated no spread
    at all, so it supports no claim: inconclusive."""
    if not lo <= hi or margin < 0:
        raise ValueError(f"solve_verdict: need lo <= hi and margin >= 0, got [{lo}, {hi}], {margin}")
    if lo == hi:
        return "inconclusive"
    if -margin <= lo and hi <= margin:
        return "matched"
    if lo > 0.0 or hi < 0.0:
        return "solve differs"
    return "inconclusive"


# ── config identity ──────────────────────────────────────────────────────────────────────


def science_config(knobs: Mapping[str, object]) -> dict[str, object]:
    """The knobs that define the experiment: every key except NON_SCIENCE_KNOBS."""
    return {k: v for k, v in knobs.items() if k not in NON_SCIENCE_KNOBS}


def config_hash(science: Mapping[str, object]) -> str:
    """sha256 of the science knobs as canonical JSON (sorted keys): equal iff every value is equal."""
    text = json.dumps(science, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _without(config: Mapping[str, object], keys) -> dict[str, object]:
    return {k: v for k, v in config.items() if k not in keys}


_ABSENT = object()


def _fmt_knob(value: object) -> str:
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def config_labels(configs: Mapping[str, Mapping[str, object]]) -> dict[str, str]:
    """{hash: "knob=value ..."}: for each config, its values of the knobs that differ between
    the configs of the same preset (a knob of ARM_ONLY_KNOBS: between configs of the same arm
    and control). Empty when a config is alone in its family; "(absent)" marks a knob its
    config.json does not record (an older run)."""

    def family(c: Mapping[str, object]) -> tuple:
        return (c.get("preset"), c.get("intervention"), c.get("random_v_seed") is None)

    labels = {}
    for h, c in configs.items():
        same_preset = [o for o in configs.values() if o.get("preset") == c.get("preset")]
        same_arm = [o for o in same_preset if family(o) == family(c)]
        keys = sorted({k for o in same_preset for k in o} - {"preset", "intervention"})
        differing = []
        for k in keys:
            peers = same_arm if k in ARM_ONLY_KNOBS else same_preset
            values = {json.dumps(o[k], sort_keys=True) if k in o else None for o in peers}
            if len(values) > 1:
                differing.append(f"{k}={_fmt_knob(c.get(k, _ABSENT))}")
        labels[h] = " ".join(differing)
    return labels


# ── reading run folders ──────────────────────────────────────────────────────────────────


class RunFolderError(ValueError):
    """A run folder that cannot be counted; the message says which file/field and why."""


@dataclass(frozen=True)
class ProblemCounts:
    """One eval problem of one run: its mode, n samples and the four event counts."""

    mode: str
    n: int
    train_hack: int
    train_solve: int
    deploy_hack: int
    deploy_solve: int


@dataclass(frozen=True)
class RunRecord:
    """One complete, validated run: its config, headline numbers and per-mode deploy rates."""

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
    config: dict[str, object] = field(default_factory=dict)  # the science knobs
    config_hash: str = ""
    by_problem: dict[str, ProblemCounts] | None = None  # None: written before by_problem existed

    @property
    def short_hash(self) -> str:
        return self.config_hash[:HASH_CHARS]

    def cluster_ci(self, count: str) -> ClusterCI | None:
        """The rate of `count` (a ProblemCounts field) with problems as clusters; None for runs
        without per-problem counts."""
        if not self.by_problem:
            return None
        ps = self.by_problem.values()
        return ratio_ci([getattr(p, count) for p in ps], [p.n for p in ps])


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


PROBLEM_COUNT_FIELDS = ("train_hack", "train_solve", "deploy_hack", "deploy_solve")


def parse_by_problem(rec: dict, eval_set: str) -> dict[str, ProblemCounts] | None:
    """`sets[eval_set].by_problem` validated (counts within [0, n]) and checked against the
    headline: Σn = eval_n and Σ count / Σn = each headline rate. None when the record predates
    per-problem counts (no `sets`, or no `by_problem` in the set)."""
    sets = rec.get("sets")
    entry = sets.get(eval_set) if isinstance(sets, dict) else None
    if not isinstance(entry, dict) or "by_problem" not in entry:
        return None
    where = f"{DEPLOY_FILE} sets[{eval_set!r}].by_problem"
    raw = entry["by_problem"]
    if not isinstance(raw, dict):
        raise RunFolderError(f"{where} must be an object, got {type(raw).__name__}")
    out: dict[str, ProblemCounts] = {}
    for pid, d in raw.items():
        w = f"{where}[{pid!r}]"
        if not isinstance(d, dict):
            raise RunFolderError(f"{w} must be an object")
        n = _int(d, "n", w)
        if n < 1:  # type: ignore[operator]
            raise RunFolderError(f"{w}: field 'n' must be >= 1, got {n}")
        counts = {k: _int(d, k, w) for k in PROBLEM_COUNT_FIELDS}
        for k, v in counts.items():
            if not 0 <= v <= n:  # type: ignore[operator]
                raise RunFolderError(f"{w}: field {k!r} = {v} is not a count in [0, n={n}]")
        out[str(pid)] = ProblemCounts(mode=_str(d, "mode", w), n=n, **counts)  # type: ignore[arg-type]
    total = sum(p.n for p in out.values())
    if total != rec.get("eval_n"):
        raise RunFolderError(f"{where}: the problems' n sum to {total}, but eval_n = {rec.get('eval_n')}")
    for count, rate in zip(PROBLEM_COUNT_FIELDS, ("hack_train", "solve_train", "hack_deploy", "solve_deploy"),
                           strict=True):
        got = sum(getattr(p, count) for p in out.values()) / total if total else 0.0
        if abs(got - rec[rate]) > 1e-9:
            raise RunFolderError(f"{where}: Σ {count} / Σ n = {got} but the headline {rate} = {rec[rate]}")
    return out


def parse_deploy_record(rec: dict, path: Path, knobs: Mapping[str, object] | None = None) -> RunRecord:
    """Validate a `per_mode_deploy.json` object and turn it into a RunRecord; `knobs` is the
    run's `config.json` `config` (its science knobs are the record's config and hash)."""
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
    rates = {k: _rate(rec, k, where) for k in RATE_FIELDS}
    eval_n = _int(rec, "eval_n", where)
    science = science_config(knobs or {})
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
        eval_n=eval_n,  # type: ignore[arg-type]
        by_mode=by_mode,
        config=science,
        config_hash=config_hash(science),
        by_problem=parse_by_problem(rec, eval_set),
        **rates,
    )


# config.json `config` key -> per_mode_deploy.json key: the two files must name the same run.
_SAME_RUN_KEYS = {"preset": "preset", "seed": "seed", "intervention": "intervention",
                  "random_v_seed": "random_v_seed", "model": "model", "steps": "steps"}


def read_config_knobs(run_dir: Path) -> dict:
    """`config.json`'s `config` object (every knob of the run) plus `model_weights` where its
    provenance records the loaded weights' digest; RunFolderError names what is wrong."""
    try:
        cfg = _read_json(run_dir / CONFIG_FILE)
    except RunRecordMissing:
        raise RunFolderError(f"no {CONFIG_FILE}: the run's knobs are unknown, so it cannot be grouped") from None
    knobs = cfg.get("config")
    if not isinstance(knobs, dict):
        raise RunFolderError(f"{CONFIG_FILE}: field 'config' must be an object")
    for k in ("preset", "seed", "intervention"):
        if k not in knobs:
            raise RunFolderError(f"{CONFIG_FILE}: field 'config.{k}' is missing")
    prov = cfg.get("provenance")
    weights = prov.get("model_weights") if isinstance(prov, dict) else None
    if weights is not None:  # the loaded weights' digest: two builds of one model name never pool
        if not isinstance(weights, str):
            raise RunFolderError(f"{CONFIG_FILE}: field 'provenance.model_weights' must be a string")
        knobs = {**knobs, MODEL_WEIGHTS_KNOB: weights}
    return knobs


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
    knobs = read_config_knobs(run_dir)
    for ck, rk in _SAME_RUN_KEYS.items():
        if ck in knobs and rk in rec and knobs[ck] != rec[rk]:
            raise RunFolderError(f"{CONFIG_FILE} config.{ck} = {knobs[ck]!r} but {DEPLOY_FILE} {rk} = "
                                 f"{rec[rk]!r}: the two files describe different runs")
    return parse_deploy_record(rec, run_dir, knobs)


def scan_runs(runs_dir: Path) -> tuple[list[RunRecord], list[SkippedRun]]:
    """Every subfolder of `runs_dir` is either a counted RunRecord or a SkippedRun with a reason.

    When several complete folders have the same config (hash), eval set and seed, the newest
    (by folder name, which starts with the UTC timestamp) counts and the others are listed as
    superseded. Folders with another config never supersede each other.
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
        key = (*group_key(r), r.seed)
        if key in newest:
            skipped.append(SkippedRun(newest[key].path, f"superseded by {r.path.name} "
                                                         f"(same config {r.short_hash} and seed)"))
        newest[key] = r
    return list(newest.values()), sorted(skipped, key=lambda s: s.path.name)


# ── aggregation ──────────────────────────────────────────────────────────────────────────


def group_key(r: RunRecord) -> tuple[str, str, str, str, str]:
    return (r.preset, r.arm, r.control, r.eval_set, r.config_hash)


def _arm_rank(arm: str) -> int:
    return ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER)


@dataclass
class GroupStats:
    """Aggregate of one experiment (preset, arm, control, eval_set, config hash) over its seeds."""

    preset: str
    arm: str
    control: str
    eval_set: str
    config_hash: str
    config: dict[str, object]
    runs: list[RunRecord]  # one per seed, by seed
    seeds: list[int]
    hack_deploy: MeanCI
    solve_deploy: MeanCI
    hack_train: MeanCI
    solve_train: MeanCI
    mode_deploy_hack: dict[str, MeanCI]
    models: list[str]
    steps: list[int]
    random_v_seeds: list[int] = field(default_factory=list)
    hack_deploy_cl: ClusterCI | None = None  # pooled over (seed, problem) clusters
    solve_deploy_cl: ClusterCI | None = None
    config_label: str = ""  # the knobs that differ from other groups of the preset
    baseline: GroupStats | None = None  # the vanilla group the deltas are taken against
    d_hack: float | None = None  # deploy hack minus the baseline's (means over seeds)
    d_hack_ci: tuple[float, float] | None = None  # Welch 95% interval over seeds
    d_hack_cl: DiffCI | None = None  # over (seed, problem) clusters, paired where possible
    d_solve: float | None = None
    d_solve_ci: tuple[float, float] | None = None
    d_solve_cl: DiffCI | None = None
    solve_verdict: str | None = None  # VERDICTS, None when no Δsolve interval exists
    verdict_basis: str = ""  # "seeds", "paired clusters" or "clusters"
    control_group: GroupStats | None = None  # the Haar control of a real-direction group
    d_ctrl: float | None = None  # deploy hack minus the Haar control's (means over seeds)
    d_ctrl_ci: tuple[float, float] | None = None  # 95%: paired t over shared seeds, else Welch
    d_ctrl_paired: bool = False  # whether d_ctrl_ci is the paired interval
    d_ctrl_cl: DiffCI | None = None  # over (seed, problem) clusters, paired where possible
    ctrl_why: str = ""  # why a direction arm has no delta vs Haar ("" when it has one, or needs none)
    note: str = ""

    @property
    def short_hash(self) -> str:
        return self.config_hash[:HASH_CHARS]

    @property
    def is_baseline(self) -> bool:
        return self.arm == "vanilla" and self.control == ""


def _clusters(runs: Sequence[RunRecord], count: str) -> tuple[list[tuple[int, str]], list[int], list[int]] | None:
    """(units, events, sizes) over every (seed, problem) of the runs, sorted by unit; None when
    a run has no per-problem counts."""
    if not runs or any(r.by_problem is None for r in runs):
        return None
    units = sorted(((r.seed, pid), p) for r in runs for pid, p in r.by_problem.items())  # type: ignore[union-attr]
    if not units:
        return None
    return [u for u, _ in units], [getattr(p, count) for _, p in units], [p.n for _, p in units]


def pooled_ci(runs: Sequence[RunRecord], count: str) -> ClusterCI | None:
    """The rate of `count` pooled over the runs' (seed, problem) clusters (`ratio_ci`)."""
    c = _clusters(runs, count)
    return None if c is None else ratio_ci(c[1], c[2])


def cluster_diff_ci(a: Sequence[RunRecord], b: Sequence[RunRecord], count: str) -> DiffCI | None:
    """Pooled rate of a minus pooled rate of b over (seed, problem) clusters: paired when the two
    sides have exactly the same (seed, problem) units (same seeds, same eval problems per seed),
    else unpaired. None when either side lacks per-problem counts."""
    ca, cb = _clusters(a, count), _clusters(b, count)
    if ca is None or cb is None:
        return None
    if ca[0] == cb[0]:
        return paired_ratio_diff_ci(ca[1], ca[2], cb[1], cb[2])
    return unpaired_ratio_diff_ci(ca[1], ca[2], cb[1], cb[2])


def find_baseline(g: GroupStats, groups: Sequence[GroupStats]) -> tuple[GroupStats | None, str]:
    """The vanilla group (never a Haar control) of g's preset and eval set whose science knobs
    equal g's outside ARM_ONLY_KNOBS. Where several match, the one equal on every knob but the
    arm and the control seed; (None, why) when there is none or no single best."""
    core = _without(g.config, ARM_ONLY_KNOBS)
    cands = [b for b in groups if b.is_baseline and b.preset == g.preset and b.eval_set == g.eval_set
             and _without(b.config, ARM_ONLY_KNOBS) == core]
    if len(cands) == 1:
        return cands[0], ""
    if not cands:
        return None, "no vanilla group with this config (arm-only knobs aside): no delta"
    arm = {"intervention", "random_v_seed"}
    exact = [b for b in cands if _without(b.config, arm) == _without(g.config, arm)]
    if len(exact) == 1:
        return exact[0], ""
    return None, (f"{len(cands)} vanilla configs match outside the arm-only knobs "
                  f"({', '.join(b.short_hash for b in cands)}), none exactly: no delta")


# Arms whose effect is claimed for a direction (v_hack / v_grad / v_act): each needs its Haar control.
DIRECTION_ARMS = frozenset({"projected", "routing", "routing2", "routeA"})


def find_control(g: GroupStats, groups: Sequence[GroupStats]) -> tuple[GroupStats | None, str]:
    """The Haar control of a real-direction group: the control group of the same preset, arm and
    eval set whose science knobs equal g's except `random_v_seed`. (None, why) when g is itself a
    control, or there is no such group, or several (controls drawn with different seeds)."""
    if g.control:
        return None, ""
    core = _without(g.config, {"random_v_seed"})
    cands = [h for h in groups if h.control and h.preset == g.preset and h.arm == g.arm
             and h.eval_set == g.eval_set and _without(h.config, {"random_v_seed"}) == core]
    if len(cands) == 1:
        return cands[0], ""
    if not cands:
        return None, "no Haar control" if g.arm in DIRECTION_ARMS else ""
    return None, f"{len(cands)} Haar controls ({', '.join(h.short_hash for h in cands)}): no delta"


def seed_diff_ci(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95
                 ) -> tuple[tuple[float, float] | None, bool]:
    """Interval of mean(a) - mean(b) over seeds, and whether it is paired. When both sides ran the same
    seeds (>= 2), the t-interval of the per-seed differences: a seed's real run and its control share
    the problem and teacher draws, so the pairing removes that shared noise. Otherwise Welch's."""
    if sorted(a) == sorted(b) and len(a) >= 2:
        c = mean_ci([a[s] - b[s] for s in sorted(a)], level)
        return (c.lo, c.hi), True  # type: ignore[return-value]
    return welch_diff_ci(list(a.values()), list(b.values()), level), False


def aggregate(runs: Sequence[RunRecord], solve_margin: float = DEFAULT_SOLVE_MARGIN) -> list[GroupStats]:
    """Group runs by experiment; means and intervals per group; deltas to the matching vanilla."""
    by_key: dict[tuple[str, str, str, str, str], list[RunRecord]] = {}
    for r in runs:
        by_key.setdefault(group_key(r), []).append(r)
    labels = config_labels({k[4]: rs[0].config for k, rs in by_key.items()})
    out: list[GroupStats] = []
    for key, rs in by_key.items():
        rs = sorted(rs, key=lambda r: r.seed)
        modes = sorted({m for r in rs for m in r.by_mode}, key=mode_rank)
        g = GroupStats(
            preset=key[0],
            arm=key[1],
            control=key[2],
            eval_set=key[3],
            config_hash=key[4],
            config=rs[0].config,
            runs=rs,
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
            hack_deploy_cl=pooled_ci(rs, "deploy_hack"),
            solve_deploy_cl=pooled_ci(rs, "deploy_solve"),
            config_label=labels[key[4]],
        )
        notes = []
        old = sum(r.by_problem is None for r in rs)
        if old:
            notes.append(f"{old} of {len(rs)} runs predate per-problem counts: no cluster interval")
        if len(g.models) > 1:  # only where config.json does not record the model
            notes.append(f"mixed models {g.models}")
        if len(g.steps) > 1:
            notes.append(f"mixed step counts {g.steps}")
        g.note = "; ".join(notes)
        out.append(g)
    out.sort(key=lambda g: (g.preset, g.eval_set, _arm_rank(g.arm), g.arm, g.control, g.config_label,
                            g.config_hash))
    for g in out:
        if g.is_baseline:
            continue
        base, why = find_baseline(g, out)
        if base is None:
            g.note = "; ".join(filter(None, [g.note, why]))
            continue
        g.baseline = base
        a, b = g.runs, base.runs
        g.d_hack = g.hack_deploy.mean - base.hack_deploy.mean
        g.d_hack_ci = welch_diff_ci([r.hack_deploy for r in a], [r.hack_deploy for r in b])
        g.d_hack_cl = cluster_diff_ci(a, b, "deploy_hack")
        g.d_solve = g.solve_deploy.mean - base.solve_deploy.mean
        g.d_solve_ci = welch_diff_ci([r.solve_deploy for r in a], [r.solve_deploy for r in b])
        g.d_solve_cl = cluster_diff_ci(a, b, "deploy_solve")
        if g.d_solve_ci is not None:
            g.verdict_basis, (lo, hi) = "seeds", g.d_solve_ci
        elif g.d_solve_cl is not None and g.d_solve_cl.lo is not None:
            g.verdict_basis = "paired clusters" if g.d_solve_cl.paired else "clusters"
            lo, hi = g.d_solve_cl.lo, g.d_solve_cl.hi  # type: ignore[assignment]
        else:
            continue
        g.solve_verdict = solve_verdict(lo, hi, solve_margin)
    for g in out:
        ctrl, g.ctrl_why = find_control(g, out)
        if ctrl is None:
            continue
        g.control_group = ctrl
        g.d_ctrl = g.hack_deploy.mean - ctrl.hack_deploy.mean
        g.d_ctrl_ci, g.d_ctrl_paired = seed_diff_ci({r.seed: r.hack_deploy for r in g.runs},
                                                    {r.seed: r.hack_deploy for r in ctrl.runs})
        g.d_ctrl_cl = cluster_diff_ci(g.runs, ctrl.runs, "deploy_hack")
    return out


def mode_rank(m: str) -> tuple[int, str]:
    return (ENV_MODES.index(m) if m in ENV_MODES else len(ENV_MODES), m)


# ── rendering ────────────────────────────────────────────────────────────────────────────


def _fmt_ci(c: MeanCI) -> str:
    if c.lo is None:
        return f"{c.mean:.3f} (CI n/a)"
    return f"{c.mean:.3f} [{c.lo:.3f}, {c.hi:.3f}]"


def _fmt_cl(c: ClusterCI | None) -> str:
    if c is None:
        return ""
    if c.lo is None:
        return f"{c.rate:.3f} (CI n/a, C={c.n_clusters})"
    zero = " (zero variance)" if c.lo == c.hi else ""
    return f"{c.rate:.3f} [{c.lo:.3f}, {c.hi:.3f}] C={c.n_clusters}{zero}"


def _fmt_d(d: float | None, ci: tuple[float, float] | None) -> str:
    if d is None:
        return ""
    return f"{d:+.3f}" + ("" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]")


def _fmt_dcl(c: DiffCI | None) -> str:
    if c is None:
        return ""
    kind = "paired" if c.paired else "unpaired"
    ci = " (CI n/a)" if c.lo is None else f" [{c.lo:+.3f}, {c.hi:+.3f}]"
    zero = " (zero variance)" if c.lo is not None and c.lo == c.hi else ""
    return f"{c.diff:+.3f}{ci} {kind} C={c.n_clusters}{zero}"


def config_cell(g: GroupStats) -> str:
    return f"{g.short_hash} {g.config_label}".rstrip()


def all_modes(groups: Sequence[GroupStats]) -> list[str]:
    return sorted({m for g in groups for m in g.mode_deploy_hack}, key=mode_rank)


def table_legend(solve_margin: float = DEFAULT_SOLVE_MARGIN) -> str:
    """What the table's numbers are (printed above it)."""
    return "\n".join([
        "Rates: mean over seeds [95% Student-t CI over seeds]; deploy = quarantine ablated.",
        "config: short hash of the science knobs, and the knobs that differ between groups of the preset "
        "(runs of different configs are never averaged).",
        "'clusters': the rate pooled over (seed, problem) clusters [95% CI: ratio estimator, cluster-robust "
        "variance, t with C-1 df]; it exists at one seed and reflects eval noise given the trained models, "
        "not seed-to-seed spread.",
        "Δ: minus the vanilla group with the same config except the arm's own knobs; seeds: Welch 95% CI; "
        "clusters: paired over (seed, problem) when both ran the same seeds on the same problems, else "
        "unpaired.",
        f"solve verdict: from the 95% CI of Δsolve (over seeds when both groups have >= 2 seeds, else over "
        f"clusters): matched = inside ±{solve_margin:g} (equivalence), solve differs = excludes 0, "
        "else inconclusive (also when the interval has zero width: no spread was estimated).",
        "Δ hack vs Haar: the real direction minus its Haar control (same config, random directions); seeds: "
        "paired t over the seeds both ran ('paired'), else Welch; clusters: paired over (seed, problem) where "
        "both have the same units.",
    ])


def markdown_table(groups: Sequence[GroupStats]) -> str:
    """GitHub-markdown table, one row per group (see `table_legend`)."""
    modes = all_modes(groups)
    rows = []
    for g in groups:
        row = {
            "preset": g.preset,
            "arm": g.arm + (" (haar)" if g.control else ""),
            "eval": g.eval_set,
            "config": config_cell(g),
            "n": len(g.seeds),
            "deploy hack": _fmt_ci(g.hack_deploy),
            "deploy hack, clusters": _fmt_cl(g.hack_deploy_cl),
            "deploy solve": _fmt_ci(g.solve_deploy),
            "deploy solve, clusters": _fmt_cl(g.solve_deploy_cl),
            "train hack": f"{g.hack_train.mean:.3f}",
            "train solve": f"{g.solve_train.mean:.3f}",
        }
        for m in modes:
            c = g.mode_deploy_hack.get(m)
            row[f"deploy hack {m}"] = "" if c is None else f"{c.mean:.3f}"
        if g.is_baseline:
            delta = {"Δ hack vs vanilla": "(baseline)"}
        elif g.baseline is None:
            delta = {"Δ hack vs vanilla": "no vanilla"}
        else:
            delta = {
                "Δ hack vs vanilla": f"{_fmt_d(g.d_hack, g.d_hack_ci)} vs {g.baseline.short_hash}",
                "Δ hack, clusters": _fmt_dcl(g.d_hack_cl),
                "Δ solve": _fmt_d(g.d_solve, g.d_solve_ci),
                "Δ solve, clusters": _fmt_dcl(g.d_solve_cl),
                "solve verdict": f"{g.solve_verdict} ({g.verdict_basis})" if g.solve_verdict else "no interval",
            }
        for k in ("Δ hack vs vanilla", "Δ hack, clusters", "Δ solve", "Δ solve, clusters", "solve verdict"):
            row[k] = delta.get(k, "")
        row["Δ hack vs Haar"] = g.ctrl_why if g.control_group is None else (
            f"{_fmt_d(g.d_ctrl, g.d_ctrl_ci)}{' paired' if g.d_ctrl_paired else ''} vs {g.control_group.short_hash}")
        row["Δ hack vs Haar, clusters"] = _fmt_dcl(g.d_ctrl_cl)
        row["note"] = g.note
        rows.append(row)
    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True)


def runs_table(runs: Sequence[RunRecord]) -> str:
    """One row per counted run: deploy rates with their problem-cluster intervals."""
    rows = [{"run folder": r.path.name, "config": r.short_hash, "seed": r.seed,
             "deploy hack, clusters": _fmt_cl(r.cluster_ci("deploy_hack")) or f"{r.hack_deploy:.3f} (no by_problem)",
             "deploy solve, clusters": _fmt_cl(r.cluster_ci("deploy_solve")) or f"{r.solve_deploy:.3f} (no by_problem)"}
            for r in sorted(runs, key=lambda r: (*group_key(r), r.seed))]
    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True)


def skipped_table(skipped: Sequence[SkippedRun]) -> str:
    rows = [{"run folder": s.path.name, "why not averaged": s.reason} for s in skipped]
    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True)


CSV_BASE_COLUMNS = [
    "preset",
    "arm",
    "control",
    "eval_set",
    "config_hash",
    "config",
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
    "hack_deploy_pooled",
    "hack_deploy_cl_lo",
    "hack_deploy_cl_hi",
    "solve_deploy_pooled",
    "solve_deploy_cl_lo",
    "solve_deploy_cl_hi",
    "n_clusters",
]
CSV_DELTA_COLUMNS = [
    "baseline_hash",
    "d_hack_vs_vanilla",
    "d_hack_ci_lo",
    "d_hack_ci_hi",
    "d_hack_cl",
    "d_hack_cl_lo",
    "d_hack_cl_hi",
    "d_solve_vs_vanilla",
    "d_solve_ci_lo",
    "d_solve_ci_hi",
    "d_solve_cl",
    "d_solve_cl_lo",
    "d_solve_cl_hi",
    "d_cl_paired",
    "solve_verdict",
    "solve_verdict_basis",
    "solve_margin",
    "control_hash",
    "d_hack_vs_haar",
    "d_haar_ci_lo",
    "d_haar_ci_hi",
    "d_haar_paired",
    "d_haar_cl",
    "d_haar_cl_lo",
    "d_haar_cl_hi",
    "d_haar_cl_paired",
    "models",
    "steps",
    "note",
]


def _num(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def _csv(cols: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def csv_text(groups: Sequence[GroupStats], solve_margin: float = DEFAULT_SOLVE_MARGIN) -> str:
    """CSV with full-precision numbers; empty cells where a value does not exist (CI at n=1)."""
    modes = all_modes(groups)
    cols = CSV_BASE_COLUMNS + [f"deploy_hack_{m}" for m in modes] + CSV_DELTA_COLUMNS
    rows = []
    for g in groups:
        row = {
            "preset": g.preset,
            "arm": g.arm,
            "control": g.control,
            "eval_set": g.eval_set,
            "config_hash": g.short_hash,
            "config": g.config_label,
            "n_seeds": len(g.seeds),
            "seeds": " ".join(map(str, g.seeds)),
            "random_v_seeds": " ".join(map(str, g.random_v_seeds)),
        }
        for name in ("hack_deploy", "solve_deploy", "hack_train", "solve_train"):
            c: MeanCI = getattr(g, name)
            row[f"{name}_mean"], row[f"{name}_ci_lo"], row[f"{name}_ci_hi"] = _num(c.mean), _num(c.lo), _num(c.hi)
        for name in ("hack_deploy", "solve_deploy"):
            cl: ClusterCI | None = getattr(g, f"{name}_cl")
            row[f"{name}_pooled"] = "" if cl is None else _num(cl.rate)
            row[f"{name}_cl_lo"] = "" if cl is None else _num(cl.lo)
            row[f"{name}_cl_hi"] = "" if cl is None else _num(cl.hi)
        row["n_clusters"] = "" if g.hack_deploy_cl is None else g.hack_deploy_cl.n_clusters
        for m in modes:
            c = g.mode_deploy_hack.get(m)
            row[f"deploy_hack_{m}"] = "" if c is None else _num(c.mean)
        row["baseline_hash"] = "" if g.baseline is None else g.baseline.short_hash
        for name in ("hack", "solve"):
            d, ci, cl = getattr(g, f"d_{name}"), getattr(g, f"d_{name}_ci"), getattr(g, f"d_{name}_cl")
            lo_hi = ci or (None, None)
            row[f"d_{name}_vs_vanilla"] = _num(d)
            row[f"d_{name}_ci_lo"], row[f"d_{name}_ci_hi"] = _num(lo_hi[0]), _num(lo_hi[1])
            row[f"d_{name}_cl"] = "" if cl is None else _num(cl.diff)
            row[f"d_{name}_cl_lo"] = "" if cl is None else _num(cl.lo)
            row[f"d_{name}_cl_hi"] = "" if cl is None else _num(cl.hi)
        row["d_cl_paired"] = "" if g.d_hack_cl is None else str(g.d_hack_cl.paired).lower()
        row["solve_verdict"] = g.solve_verdict or ""
        row["solve_verdict_basis"] = g.verdict_basis
        row["solve_margin"] = "" if g.baseline is None else _num(solve_margin)
        ctrl, cci, ccl = g.control_group, g.d_ctrl_ci or (None, None), g.d_ctrl_cl
        row["control_hash"] = "" if ctrl is None else ctrl.short_hash
        row["d_hack_vs_haar"] = _num(g.d_ctrl)
        row["d_haar_ci_lo"], row["d_haar_ci_hi"] = _num(cci[0]), _num(cci[1])
        row["d_haar_paired"] = "" if ctrl is None else str(g.d_ctrl_paired).lower()
        row["d_haar_cl"] = "" if ccl is None else _num(ccl.diff)
        row["d_haar_cl_lo"] = "" if ccl is None else _num(ccl.lo)
        row["d_haar_cl_hi"] = "" if ccl is None else _num(ccl.hi)
        row["d_haar_cl_paired"] = "" if ccl is None else str(ccl.paired).lower()
        row["models"] = " ".join(g.models)
        row["steps"] = " ".join(map(str, g.steps))
        row["note"] = g.note
        rows.append(row)
    return _csv(cols, rows)


RUNS_CSV_COLUMNS = [
    "run_folder", "preset", "arm", "control", "eval_set", "config_hash", "seed", "random_v_seed",
    "hack_deploy", "hack_deploy_cl_lo", "hack_deploy_cl_hi", "solve_deploy", "solve_deploy_cl_lo",
    "solve_deploy_cl_hi", "n_problems", "eval_n", "hack_train", "solve_train",
]  # fmt: skip


def runs_csv_text(runs: Sequence[RunRecord]) -> str:
    """One row per counted run: its deploy rates with problem-cluster intervals (empty cells for
    runs without per-problem counts, or with one problem)."""
    rows = []
    for r in sorted(runs, key=lambda r: (*group_key(r), r.seed)):
        row = {"run_folder": r.path.name, "preset": r.preset, "arm": r.arm, "control": r.control,
               "eval_set": r.eval_set, "config_hash": r.short_hash, "seed": r.seed,
               "random_v_seed": "" if r.random_v_seed is None else r.random_v_seed,
               "hack_deploy": _num(r.hack_deploy), "solve_deploy": _num(r.solve_deploy),
               "hack_train": _num(r.hack_train), "solve_train": _num(r.solve_train), "eval_n": r.eval_n,
               "n_problems": "" if r.by_problem is None else len(r.by_problem)}
        for name, count in (("hack_deploy", "deploy_hack"), ("solve_deploy", "deploy_solve")):
            cl = r.cluster_ci(count)
            row[f"{name}_cl_lo"] = "" if cl is None else _num(cl.lo)
            row[f"{name}_cl_hi"] = "" if cl is None else _num(cl.hi)
        rows.append(row)
    return _csv(RUNS_CSV_COLUMNS, rows)


def write_csv(
    groups: Sequence[GroupStats],
    out_dir: Path,
    stamp: str | None = None,
    solve_margin: float = DEFAULT_SOLVE_MARGIN,
    runs: Sequence[RunRecord] = (),
) -> Path:
    """Write results_<stamp>.csv and results_latest.csv (and, given `runs`, runs_<stamp>.csv and
    runs_latest.csv), all atomically; return the first."""
    stamp = stamp or datetime.now().strftime("%Y%m%dT%H%M%S")
    text = csv_text(groups, solve_margin)
    path = Path(out_dir) / f"results_{stamp}.csv"
    write_text_atomic(path, text)
    write_text_atomic(Path(out_dir) / "results_latest.csv", text)
    if runs:
        per_run = runs_csv_text(runs)
        write_text_atomic(Path(out_dir) / f"runs_{stamp}.csv", per_run)
        write_text_atomic(Path(out_dir) / "runs_latest.csv", per_run)
    return path


# ── CLI ──────────────────────────────────────────────────────────────────────────────────


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="results.py",
        description="Aggregate complete runs into one table row per experiment (preset, arm, control, "
        "config): deployed hack/solve mean with 95% intervals over seeds and over problem clusters, "
        "delta vs the matching vanilla, a solve verdict.",
    )
    ap.add_argument("--runs", type=Path, default=Path("out/runs"), help="folder of run folders")
    ap.add_argument("--out", type=Path, default=Path("out/results"), help="where CSVs go")
    ap.add_argument(
        "--solve-margin",
        type=float,
        default=DEFAULT_SOLVE_MARGIN,
        help="equivalence margin: Δsolve vs vanilla is 'matched' when its 95%% interval lies in ±this",
    )
    ap.add_argument("--per-run", action="store_true", help="also print one row per counted run")
    ap.add_argument("--preset", default=None, help="only runs of this preset (default: every preset)")
    args = ap.parse_args(argv)
    if not (math.isfinite(args.solve_margin) and args.solve_margin >= 0):
        ap.error(f"--solve-margin must be a finite number >= 0, got {args.solve_margin}")
    try:
        runs, skipped = scan_runs(args.runs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.preset is not None:
        runs = [r for r in runs if r.preset == args.preset]
    if runs:
        groups = aggregate(runs, args.solve_margin)
        print(f"## Deployed hack / solve by experiment ({len(runs)} runs under {args.runs})\n")
        print(table_legend(args.solve_margin) + "\n")
        print(markdown_table(groups))
        if args.per_run:
            print(f"\n## Runs ({len(runs)})\n")
            print(runs_table(runs))
    if skipped:
        print(f"\n## Not averaged ({len(skipped)} run folders)\n")
        print(skipped_table(skipped))
    if not runs:
        print(f"\nerror: no complete runs with {DEPLOY_FILE} under {args.runs}", file=sys.stderr)
        return 1
    path = write_csv(groups, args.out, solve_margin=args.solve_margin, runs=runs)
    print(f"\nCSV: {path} (and {path.parent / 'results_latest.csv'}, per run: runs_latest.csv)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
