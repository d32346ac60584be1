"""The run's inputs, loaded and checked before any folder or model exists: training problems,
the teacher pool (joined to the data by problem statement) and the eval sets.

Every error here names the file or knob and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from .config import Config
from .env.problems import Problem, load_all_rows, load_problems, statement_key
from .pool import TeacherPool, align_pool, load_pool


@dataclass
class Inputs:
    problems: list[Problem]
    pool: TeacherPool | None
    eval_train: list[Problem]
    eval_heldout: list[Problem] | None


def load_inputs(cfg: Config) -> Inputs:
    """Problems, teacher pool and eval sets; every error here names the file or knob."""
    hints = {
        "data_path": "build the benchmark rows with `just data` (or point --data-path at a .jsonl; the "
                     "organism preset's: `python -m vgrout.organism`)",
        "eval_data_path": "e.g. ../shared/data/leetcode/leetcode_test_medhard.jsonl (the organism preset's: "
                          "`python -m vgrout.organism`)",
        "vhack_pairs_path": "e.g. ../shared/data/vgrout_pub/pairsets/prog_wide_clean.json, or drop the flag "
                            "for the built-in pairs",
        "v_hack_path": "drop the flag to extract (and cache) directions for this model",
    }
    has_directions = cfg.arm_type.directions_to_load(cfg) is not None
    for knob, hint in hints.items():
        if not has_directions and knob in ("vhack_pairs_path", "v_hack_path"):
            continue  # this arm has no directions
        path = getattr(cfg, knob)
        if path is not None and not Path(str(path).split("#")[0]).exists():
            raise FileNotFoundError(f"--{knob.replace('_', '-')} {path} does not exist: {hint}")
    rows = load_all_rows(cfg.data_path)
    pool = None
    if cfg.teacher_pool_dir is not None:
        pool = aligned_pool(cfg.teacher_pool_dir, rows, cfg.data_path)
    partition = pool.partition if pool is not None else None
    modes = list(cfg.env_modes) if cfg.env_modes else [cfg.env_mode]
    problems = load_problems(cfg.n_problems, modes, cfg.seed, partition=partition, data_path=cfg.data_path,
                             rows=rows, partition_source=f"the teacher pool's {cfg.teacher_pool_dir}/partition.json")
    if pool is not None and cfg.teacher_modes is not None:
        pool = pool.restrict_modes(cfg.teacher_modes)
        logger.info(f"teacher_modes={list(cfg.teacher_modes)}: pool restricted to {len(pool.rows)} prompts; "
                    "other modes train on-policy")
    elif pool is not None:
        before = len(problems)
        problems = [p for p in problems if p.problem_id in pool.rows]
        if not problems:
            raise ValueError(
                f"no overlap between the {before} training problems and the teacher pool {pool.root} "
                f"({len(pool.rows)} prompts found in the data, matched by problem statement). Raise --n-problems, "
                "build the pool for this problem set, or drop --teacher-pool-dir.")
        logger.info(f"teacher pool restriction: {len(problems)}/{before} problems have cached teacher rows")
    if pool is not None:
        check_pool_modes(pool, problems)
    eval_train = problems[: cfg.eval_n_prompts]
    eval_heldout = None
    if cfg.eval_data_path is not None:
        eval_heldout = load_problems(cfg.eval_n_prompts, sorted({p.env_mode for p in problems}), cfg.seed,
                                     data_path=cfg.eval_data_path)
        # by statement, not id: two files may number problems in different LeetCode id spaces
        seen = {statement_key(p.question) for p in problems}
        eval_heldout = [p for p in eval_heldout if statement_key(p.question) not in seen]
    return Inputs(problems, pool, eval_train, eval_heldout)


def aligned_pool(root: Path, rows: list[dict], data_path: Path | None) -> TeacherPool:
    """The pool at `root` re-keyed to the data rows' ids by problem statement (see pool.align_pool)."""
    pool, report = align_pool(load_pool(root), rows, name=f"teacher pool {root}")
    report.log()
    if not pool.rows:
        raise ValueError(
            f"no overlap between the teacher pool {root} ({report.n_prompts} prompts) and the data "
            f"{data_path or '(built-in set)'}: none of its problems is there (matched by problem statement, "
            "not by id). Point --data-path at the data the pool was made for, or drop --teacher-pool-dir.")
    return pool


def check_pool_modes(pool: TeacherPool, problems: list[Problem]) -> None:
    """A cached teacher reward is only valid in the mode it was graded in: refuse a mismatch."""
    for p in problems:
        for i, r in enumerate(pool.rows.get(p.problem_id, [])):
            m = r.get("env_mode")
            if m is not None and m != p.env_mode:
                raise ValueError(
                    f"{pool.files.get(p.problem_id, pool.root)}: row {i} was graded in mode {m!r} but problem "
                    f"{p.problem_id} trains in {p.env_mode!r}; its cached reward would be wrong. Use the pool's "
                    f"partition.json (or --env-mode={m}) or rebuild the pool for this mode.")
