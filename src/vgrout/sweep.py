"""Seed sweeps: one `vgrout.train` run per (arm, seed), handed to a real scheduler.

Three outputs, no home-made scheduling:
- pueue (when `pueue` is on PATH): every run becomes a task in a named group whose
  parallelism is set once (default 1 = one run at a time on a one-GPU box);
- a SLURM array script (`--slurm FILE`): one array task per (arm, seed), the task index
  mapped to its command through a bash array;
- otherwise the exact commands are printed with how to install pueue.

The planning functions return argv lists and text and never execute anything, so tests
check them exactly; only `main` runs pueue.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_text_atomic
from .config import ARM_NAMES, PRESETS, RESUME_MUTABLE

DEFAULT_GROUP = "vgrout"
PUEUE_INSTALL_HINT = (
    "pueue is not on PATH. Install it, start the daemon, and rerun this command:\n"
    "  cargo install --locked pueue           # any OS with a Rust toolchain\n"
    "  sudo apt install pueue | brew install pueue | pacman -S pueue   # distro packages\n"
    "  or a static binary from https://github.com/Nukesor/pueue/releases (pueue + pueued)\n"
    "  then: pueued -d    # start the daemon in the background"
)
_DISPLAY_TO_INTERVENTION = {v: k for k, v in ARM_NAMES.items()}


@dataclass(frozen=True)
class Job:
    """One training run of the sweep."""

    preset: str
    intervention: str
    seed: int
    extra: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The run_id stem the training loop will use (plus `_haar<k>` for controls)."""
        ctrl = adapter = ""
        for a in self.extra:
            flag, _, val = a.partition("=")
            if flag in ("--random-v-seed", "--route2-random-v-seed") and val:
                ctrl = f"_haar{val}"
            if flag == "--adapter" and val and val != "svd":
                adapter = f"-{val}"
        return f"{self.preset}_{ARM_NAMES[self.intervention]}{adapter}_seed{self.seed}{ctrl}"

    def argv(self) -> list[str]:
        """The training command, exactly as it is run."""
        return [
            "uv",
            "run",
            "python",
            "-m",
            "vgrout.train",
            self.preset,
            f"--intervention={self.intervention}",
            f"--seed={self.seed}",
            *self.extra,
        ]

    def shell(self) -> str:
        return shlex.join(self.argv())


def parse_arms(spec: str) -> list[str]:
    """'none,erase,route,route2' (or display names vanilla/projected/...) -> interventions.

    Order is kept, duplicates dropped; an unknown name raises ValueError listing valid ones.
    """
    out: list[str] = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        arm = _DISPLAY_TO_INTERVENTION.get(name, name)
        if arm not in ARM_NAMES:
            valid = ", ".join(f"{k} ({v})" for k, v in ARM_NAMES.items())
            raise ValueError(f"ARMS: unknown arm {name!r}; valid: {valid}")
        if arm not in out:
            out.append(arm)
    if not out:
        raise ValueError(f"ARMS: no arm in {spec!r}; e.g. none,erase,route,route2")
    return out


def parse_seeds(spec: str) -> list[int]:
    """'41,42,43' or '41-45' or '41-43,50' -> unique non-negative ints in the order given
    (ranges inclusive)."""
    out: list[int] = []
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
            raise ValueError(
                f"SEEDS: cannot read {part!r}; use e.g. 41,42,43 or 41-45 (inclusive range)"
            )
        lo = int(m[1])
        hi = lo if m[2] is None else int(m[2])
        out.extend(s for s in range(lo, hi + 1) if s not in out)
    if not out:
        raise ValueError(f"SEEDS: no seed in {spec!r}")
    return out


def plan_jobs(
    preset: str, arms: Sequence[str], seeds: Sequence[int], extra: Sequence[str] = ()
) -> list[Job]:
    """Arm-major list of runs (all seeds of the first arm, then the next arm, ...)."""
    if preset not in PRESETS:
        raise ValueError(f"PRESET: unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    for a in extra:
        flag = a.split("=", 1)[0]
        if flag in ("--intervention", "--seed"):
            raise ValueError(f"extra args: {flag} is set by the sweep itself (ARMS / SEEDS)")
    return [Job(preset, arm, seed, tuple(extra)) for arm in arms for seed in seeds]


# ── pueue ────────────────────────────────────────────────────────────────────────────────


def pueue_setup_argv(pueue: str, group: str, parallel: int, group_exists: bool) -> list[list[str]]:
    """Commands that make `group` exist with `parallel` slots (idempotent)."""
    cmds = [] if group_exists else [[pueue, "group", "add", group]]
    cmds.append([pueue, "parallel", str(parallel), "--group", group])
    return cmds


def pueue_add_argv(pueue: str, job: Job, group: str, workdir: Path) -> list[str]:
    """`pueue add` for one run. pueue runs the command through a shell, so it gets one
    shell-quoted string (extra args with spaces survive)."""
    return [
        pueue,
        "add",
        "--group",
        group,
        "--label",
        job.label,
        "--working-directory",
        str(workdir),
        "--",
        job.shell(),
    ]


def pueue_plan(
    pueue: str, jobs: Sequence[Job], group: str, parallel: int, workdir: Path, group_exists: bool
) -> list[list[str]]:
    """Every pueue argv the sweep would run, in order."""
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    return pueue_setup_argv(pueue, group, parallel, group_exists) + [
        pueue_add_argv(pueue, j, group, workdir) for j in jobs
    ]


def pueue_groups(pueue: str) -> set[str]:
    """Names of pueue's groups; RuntimeError (with how to start it) when pueued is not running."""
    proc = subprocess.run([pueue, "group", "--json"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{pueue} group --json` failed (is the daemon running?): "
            f"{(proc.stderr or proc.stdout).strip()}\nstart it with `pueued -d` and rerun."
        )
    try:
        return set(json.loads(proc.stdout))
    except (json.JSONDecodeError, TypeError) as e:
        raise RuntimeError(f"could not read `pueue group --json` output: {e}") from e


# ── SLURM ────────────────────────────────────────────────────────────────────────────────


def slurm_script(
    jobs: Sequence[Job],
    *,
    workdir: Path,
    time: str = "24:00:00",
    mem: str = "64G",
    cpus: int = 8,
    gpus: int = 1,
    parallel: int | None = None,
    partition: str | None = None,
    account: str | None = None,
    job_name: str | None = None,
    log_dir: str = "logs/slurm",
) -> str:
    """A bash SLURM array script: task i runs the i-th command of the CMDS bash array.

    With VGROUT_SLURM_DRY=1 in the environment the script prints task i's command and exits
    instead of running it (check the mapping on a login node: no GPU, no training).
    `gpus=0` requests no GPU (CPU runs, e.g. the smoke preset); `log_dir` is relative to
    `workdir` unless absolute.
    """
    if not jobs:
        raise ValueError("slurm_script: no jobs")
    if gpus < 0 or cpus < 1:
        raise ValueError(f"slurm_script: need gpus >= 0 and cpus >= 1 (got gpus={gpus}, cpus={cpus})")
    name = job_name or f"vgrout-{jobs[0].preset}"
    throttle = f"%{parallel}" if parallel else ""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --array=0-{len(jobs) - 1}{throttle}",
        *([f"#SBATCH --gres=gpu:{gpus}"] if gpus else []),
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --mem={mem}",
        f"#SBATCH --time={time}",
        f"#SBATCH --chdir={workdir}",
        f"#SBATCH --output={log_dir}/%x_%A_%a.out",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    lines += [
        "# Written by scripts/sweep.py; submit with: sbatch THIS_FILE",
        f"# {len(jobs)} runs: one array task per (arm, seed).",
        "set -euo pipefail",
        "",
        "CMDS=(",
        *(f"  {shlex.quote(j.shell())}  # {i}: {j.label}" for i, j in enumerate(jobs)),
        ")",
        "",
        'CMD="${CMDS[$SLURM_ARRAY_TASK_ID]}"',
        'if [[ "${VGROUT_SLURM_DRY:-0}" == 1 ]]; then echo "$CMD"; exit 0; fi',
        'echo "[$(date -Is)] task $SLURM_ARRAY_TASK_ID on $(hostname): $CMD"',
        f"cd {shlex.quote(str(workdir))}",
        'eval "$CMD"',
        "",
    ]
    return "\n".join(lines)


# ── local: one run after another on this machine, resumable ──────────────────────────────


def job_config(job: Job) -> dict:
    """The full config the job's training run will save (config.json's `config`)."""
    from .config import parse_cli

    return parse_cli([job.preset, f"--intervention={job.intervention}", f"--seed={job.seed}", *job.extra]).to_dict()


def find_run(runs_dir: Path, job: Job, ignore: frozenset[str] = RESUME_MUTABLE) -> tuple[Path | None, str]:
    """The newest run folder made for exactly this job's config (config.json equal up to `ignore`, by
    default the resume-mutable knobs) and its status state; (None, "") when there is none."""
    from .config import config_diff

    want = job_config(job)
    for d in sorted(runs_dir.glob(f"*_{job.label}*"), reverse=True):
        try:
            saved = json.loads((d / "config.json").read_text())["config"]
        except (OSError, ValueError, KeyError):
            continue
        if not config_diff(saved, want, ignore=ignore):
            try:
                state = json.loads((d / "status.json").read_text())["state"]
            except (OSError, ValueError, KeyError):
                state = "unknown"
            return d, state
    return None, ""


def model_digest(model: str) -> str | None:
    """model.weights_digest of the folder a config's `model` resolves to now (None for a hub name)."""
    from .model import resolve_model, weights_digest

    return weights_digest(resolve_model(model))


def kept_run(kept_dir: Path, job: Job, digest: Callable[[str], str | None] = model_digest) -> Path | None:
    """The job's finished run among kept records (`scripts/keep_runs.py`: config.json and status.json of
    each run), if it was trained on the weights the job would load now (provenance.model_weights equal
    to `digest(model)`); None otherwise. Records of another build are never taken for this one's runs.
    The config must match but for the resume-mutable knobs and `out_root` (where the run was written)."""
    from .results import MODEL_WEIGHTS_KNOB, read_config_knobs

    d, state = find_run(kept_dir, job, RESUME_MUTABLE | {"out_root"})
    if d is None or state not in ("complete", "diverged"):
        return None
    had = read_config_knobs(d).get(MODEL_WEIGHTS_KNOB)
    return d if had == digest(job_config(job)["model"]) else None


def local_plan(jobs: Sequence[Job], runs_dir: Path, kept: Sequence[Path] = (),
               digest: Callable[[str], str | None] = model_digest) -> list[tuple[Job, str, Path | None]]:
    """Per job: ("skip", its complete run) / ("kept", its finished run in one of the `kept` record folders,
    same weights) / ("resume", an unfinished run with a checkpoint) / ("start", None). A diverged run is a
    result: it is not run again."""
    out = []
    cached = functools.cache(digest)  # the weights are hashed once per model, not once per job
    for job in jobs:
        d, state = find_run(runs_dir, job)
        if d is not None and state in ("complete", "diverged"):
            out.append((job, "skip", d))
            continue
        k = next((r for r in (kept_run(kd, job, cached) for kd in kept) if r is not None), None)
        if k is not None:
            out.append((job, "kept", k))
        elif d is not None and (d / "resume.pt").exists():
            out.append((job, "resume", d))
        else:
            out.append((job, "start", None))
    return out


def lane_threads(parallel: int, cpus: int) -> int:
    """Torch threads for each of `parallel` runs sharing `cpus` cores: an equal share, at least 1.

    Invariant: parallel * lane_threads(parallel, cpus) <= max(cpus, parallel)."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    return max(1, cpus // parallel)


def run_env(parallel: int, environ: Mapping[str, str], cpus: int) -> dict[str, str]:
    """The environment of each local run: with `parallel` > 1 runs at once, OMP_NUM_THREADS (torch's
    thread count) is the run's share of the cores, unless the caller set it; otherwise unchanged."""
    env = dict(environ)
    if parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(lane_threads(parallel, cpus))
    return env


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_local(jobs: Sequence[Job], runs_dir: Path, workdir: Path, parallel: int = 1, kept: Sequence[Path] = ()) -> int:
    """Run the sweep here, `parallel` runs at a time (each with its share of the cores as torch threads):
    finished runs are skipped, interrupted ones resumed, so a stopped or killed sweep continues where it
    stopped. Returns the number of runs that failed.

    On a small CPU box this raises throughput: decoding a few rows barely uses a second thread (two
    1-thread processes sampled ~1.8x the tokens/s of one 2-thread one), the backward gains less; on the
    2-core machine the organism sweep finished a run every 4.6-6.2 min this way, against 7.2 min for one
    run alone (docs/organism.md, "CPU speed"; docs/results/organism.md)."""
    plan = local_plan(jobs, runs_dir, kept)
    n_skip = sum(a in ("skip", "kept") for _, a, _ in plan)
    env = run_env(parallel, os.environ, _cpus())
    lanes = f"; {parallel} at a time, OMP_NUM_THREADS={env.get('OMP_NUM_THREADS')}" if parallel > 1 else ""
    print(f"# {len(plan)} runs: {n_skip} already finished, {sum(a == 'resume' for _, a, _ in plan)} to resume, "
          f"{sum(a == 'start' for _, a, _ in plan)} to start{lanes}", flush=True)
    failed: list[str] = []
    lock = threading.Lock()

    def one(i: int, job: Job, action: str, d: Path | None) -> None:
        argv = job.argv() + ([f"--resume={d}"] if action == "resume" else [])
        with lock:
            print(f"[{i}/{len(plan)}] {job.label}: {action} ({shlex.join(argv)})", flush=True)
        proc = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, env=env)
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        with lock:
            if proc.returncode == 0:
                print(f"    [{i}] {last}", flush=True)
            else:
                failed.append(job.label)
                tail = (proc.stderr.strip().splitlines() or [""])[-1]
                print(f"    [{i}] exit {proc.returncode}: {tail or last}", flush=True)

    todo = []
    for i, (job, action, d) in enumerate(plan, 1):
        if action in ("skip", "kept"):
            print(f"[{i}/{len(plan)}] {job.label}: finished in {d}", flush=True)
        else:
            todo.append((i, job, action, d))
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for f in [pool.submit(one, *t) for t in todo]:
            f.result()
    if failed:
        print(f"# {len(failed)} runs did not finish: {', '.join(sorted(failed))} (rerun the same command to retry)")
    return len(failed)


# ── CLI ──────────────────────────────────────────────────────────────────────────────────


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sweep.py",
        allow_abbrev=False,  # never let a sweep flag swallow an abbreviated training flag
        description="Queue one `vgrout.train` run per (arm, seed): pueue when installed, "
        "a SLURM array script with --slurm, else print the commands.",
        epilog="Anything after SEEDS that the sweep does not know goes to every training run, "
        "e.g. `sweep.py fast route2 41-43 --random-v-seed=7`. Sweep options are named so "
        "that they cannot clash with training knobs (--pueue-group, --slurm-*).",
    )
    ap.add_argument("preset", help=f"one of {', '.join(PRESETS)}")
    ap.add_argument("arms", help="comma list, e.g. none,erase,route,route2")
    ap.add_argument("seeds", help="e.g. 41,42,43 or 41-45")
    ap.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="runs at once (pueue group slots / SLURM array throttle / --local runs, each with its share "
        "of the cores as OMP_NUM_THREADS); 1 = one GPU",
    )
    ap.add_argument("--pueue-group", default=DEFAULT_GROUP, help="pueue group name")
    ap.add_argument(
        "--dry-run", action="store_true", help="print what would be queued, run nothing"
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="repository root the runs start in (default: current directory)",
    )
    ap.add_argument(
        "--slurm",
        type=Path,
        default=None,
        metavar="FILE.sbatch",
        help="write a SLURM array script here instead of using pueue",
    )
    ap.add_argument("--slurm-time", default="24:00:00", help="SLURM --time per run")
    ap.add_argument("--slurm-mem", default="64G", help="SLURM --mem per run")
    ap.add_argument("--slurm-cpus", type=int, default=8, help="SLURM --cpus-per-task")
    ap.add_argument(
        "--slurm-gpus", type=int, default=1, help="GPUs per run (--gres=gpu:N); 0 = CPU-only runs"
    )
    ap.add_argument(
        "--slurm-log-dir",
        default="logs/slurm",
        help="where each task's stdout/stderr goes (relative to --workdir unless absolute)",
    )
    ap.add_argument(
        "--local",
        action="store_true",
        help="run here, --parallel runs at a time (default one after another); finished runs are skipped "
        "and interrupted ones resumed",
    )
    ap.add_argument(
        "--kept",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="with --local: also skip a job whose finished run is kept in DIR (scripts/keep_runs.py records) "
        "and was trained on the same model weights as this machine's build (repeatable); how a sweep longer "
        "than one session continues on a fresh checkout",
    )
    ap.add_argument("--slurm-partition", default=None, help="SLURM --partition")
    ap.add_argument("--slurm-account", default=None, help="SLURM --account")
    return ap


def main(
    argv: Sequence[str] | None = None, *, which: Callable[[str], str | None] = shutil.which
) -> int:
    """CLI entry. `which` finds the pueue binary (tests pass one that finds none)."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]  # `sweep.py ... -- --lr=1e-3` also works
    try:
        jobs = plan_jobs(args.preset, parse_arms(args.arms), parse_seeds(args.seeds), extra)
        if args.parallel < 1:
            raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
        if args.slurm_gpus < 0 or args.slurm_cpus < 1:
            raise ValueError(
                f"--slurm-gpus must be >= 0 and --slurm-cpus >= 1 "
                f"(got {args.slurm_gpus}, {args.slurm_cpus})"
            )
    except ValueError as e:
        ap.error(str(e))
    workdir = (args.workdir or Path.cwd()).resolve()

    missing = [str(k) for k in args.kept if not k.is_dir()]
    if args.kept and not args.local:
        ap.error("--kept applies to --local sweeps only")
    if missing:
        ap.error(f"--kept folder(s) not found: {', '.join(missing)}")
    if args.local:
        out_root = next((Path(a.split("=", 1)[1]) for a in extra if a.startswith("--out-root=")), Path("out"))
        runs_dir = out_root if out_root.is_absolute() else workdir / out_root
        if args.dry_run:
            for job, action, d in local_plan(jobs, runs_dir / "runs", args.kept):
                print(f"{action:6s} {job.label} {d or ''}")
            return 0
        return 1 if run_local(jobs, runs_dir / "runs", workdir, args.parallel, args.kept) else 0

    if args.slurm is not None:
        text = slurm_script(
            jobs,
            workdir=workdir,
            time=args.slurm_time,
            mem=args.slurm_mem,
            cpus=args.slurm_cpus,
            gpus=args.slurm_gpus,
            parallel=args.parallel if args.parallel > 1 else None,
            partition=args.slurm_partition,
            account=args.slurm_account,
            log_dir=args.slurm_log_dir,
        )
        if args.dry_run:
            print(text)
            return 0
        write_text_atomic(args.slurm, text)
        args.slurm.chmod(0o755)
        (workdir / args.slurm_log_dir).mkdir(parents=True, exist_ok=True)  # absolute stays absolute
        print(f"wrote {args.slurm}: {len(jobs)} array tasks. Submit with: sbatch {args.slurm}")
        return 0

    pueue = which("pueue")
    if pueue is None:
        print(f"# {len(jobs)} runs; run them one at a time per GPU:")
        for j in jobs:
            print(f"cd {shlex.quote(str(workdir))} && {j.shell()}")
        print("\nnothing was queued. " + PUEUE_INSTALL_HINT, file=sys.stderr)
        return 0

    if args.dry_run:
        cmds = pueue_plan(pueue, jobs, args.pueue_group, args.parallel, workdir, group_exists=False)
        print(f"# dry run: would run ({len(jobs)} runs; `group add` skipped if it exists):")
        for c in cmds:
            print(shlex.join(c))
        return 0
    try:
        exists = args.pueue_group in pueue_groups(pueue)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for cmd in pueue_plan(pueue, jobs, args.pueue_group, args.parallel, workdir, exists):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(
                f"error: `{shlex.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()}",
                file=sys.stderr,
            )
            return 1
        print(proc.stdout.strip() or shlex.join(cmd))
    print(
        f"queued {len(jobs)} runs in pueue group {args.pueue_group!r} "
        f"(parallel {args.parallel}); watch with `pueue status --group {args.pueue_group}`"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
