"""Dr.GRPO with gradient interventions on an SVD adapter: the training loop.

    uv run python -m vgrout.train smoke                       # offline gate (tiny Qwen3, CPU)
    uv run python -m vgrout.train fast --intervention=route2  # an experiment on one GPU
    uv run python -m vgrout.train smoke --resume out/runs/<dir>

One optimizer step:
    sample P problems -> generate G_s student rollouts (+ G_t cached teacher rows)
    -> grade in the sandbox -> Dr.GRPO loss per group -> backward (accumulate over P)
    -> intervene on δS.grad (none / erase / route / route2) -> clip -> AdamW -> schedule
    -> every N: refresh directions; every M: deploy eval; log a row; checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# OpenMP threads that spin while waiting collapse when another process shares the cores (a small
# matmul took 15 ms instead of 0.7 ms on this 2-core machine); sleeping waiters cost ~nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from loguru import logger  # noqa: E402
from tqdm import tqdm  # noqa: E402

from . import checkpoint as ck  # noqa: E402
from . import grpo, proj  # noqa: E402
from .adapter import (  # noqa: E402
    hack_params,
    knob_params,
    ref_logprobs_via_zero_delta,
    rollout_grads,
    save_adapter,
    wrap_model,
)
from .atomic import write_json_atomic  # noqa: E402
from .config import Config, config_diff, parse_cli  # noqa: E402
from .directions import RunDirections as Directions  # noqa: E402
from .env.modes import MODE_CODE  # noqa: E402
from .env.problems import Problem, load_all_rows, load_problems, statement_key  # noqa: E402
from .eval import EvalResult, evaluate  # noqa: E402
from .model import load_model_and_tokenizer  # noqa: E402
from .pool import TeacherPool, align_pool, load_pool, sample_rows  # noqa: E402
from .rollout import (  # noqa: E402
    Group,
    SamplingConfig,
    add_teacher_rows,
    encode,
    eos_ids,
    grade_students,
    render_prompt,
    sample,
)
from .tablelog import StepTable, markdown_table, setup_logging  # noqa: E402

REF_GENS_PER_STEP = 16 * 16  # the benchmark's generations per step (16 prompts x 16)
WARN_DROP, DIVERGE_DROP = 3.0, 5.0  # nats below the best teacher log-prob seen


class TrainingDiverged(RuntimeError):
    """The teacher log-prob tripwire fired: the policy collapsed."""


class Terminated(Exception):
    """SIGTERM arrived (a queue or scheduler stopped the run)."""


# ─────────────────────────────── inputs (cheap, validated before the model loads) ──


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
    for knob, hint in hints.items():
        if cfg.intervention == "none" and knob in ("vhack_pairs_path", "v_hack_path"):
            continue  # vanilla has no directions
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
                             rows=rows)
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


# ─────────────────────────────────────────────── run folder and resume ──


def make_run_dir(cfg: Config) -> Path:
    if cfg.resume is not None:
        run_dir = Path(cfg.resume)
        cfg_path = run_dir / ck.CONFIG_FILE
        if not cfg_path.exists():
            raise FileNotFoundError(f"--resume {run_dir}: {cfg_path} not found (not a vgrout run folder?)")
        old = json.loads(cfg_path.read_text())["config"]
        diff = config_diff(old, cfg.to_dict())
        if diff:
            raise ValueError(
                f"--resume {run_dir}: the config differs from the run's saved config; resume with the same "
                f"preset and flags. Differences (saved -> now):\n  " + "\n  ".join(diff))
        return run_dir
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    run_dir = cfg.out_root / "runs" / f"{stamp}_{cfg.run_id}"
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = cfg.out_root / "runs" / f"{stamp}_{cfg.run_id}_{n}"
    run_dir.mkdir(parents=True)
    return run_dir


def write_status(run_dir: Path, state: str, step: int, steps: int, error: str | None = None) -> None:
    """status.json: running / paused / complete / failed / diverged / killed, and the last finished step."""
    write_json_atomic(run_dir / "status.json", {
        "state": state, "step": step, "steps": steps,
        "updated": datetime.now().isoformat(timespec="seconds"), "error": error})


def mark_ended(run_dir: Path, state: str, steps: int, error: str) -> None:
    """Record an abnormal end, keeping the last finished step from the running status."""
    try:
        step = json.loads((run_dir / "status.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        step = -1
    write_status(run_dir, state, step, steps, error)


# ─────────────────────────────────────────────── per-step state ──


@dataclass
class TrainState:
    """Everything that evolves across steps and must survive a resume."""

    step: int = 0
    rows: list[dict] = field(default_factory=list)
    g_t_active: bool = True
    mode_rollouts: dict[str, int] = field(default_factory=dict)
    mode_hacks: dict[str, int] = field(default_factory=dict)
    mode_first_step: dict[str, int] = field(default_factory=dict)
    first_hack_saved: bool = False
    lp_t_best: float = -math.inf
    diverged_steps: int = 0
    span_checked: bool = False
    last_sample: dict | None = None


@dataclass
class StepGrads:
    """Gradients accumulated over the P groups of a step, per module."""

    total: dict[str, torch.Tensor] = field(default_factory=dict)
    student: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # route2
    routed: dict[str, torch.Tensor] = field(default_factory=dict)  # route2
    r2: list = field(default_factory=list)  # route2 per-(group, module) results
    routed_rollouts: list[bool] = field(default_factory=list)  # gate-as-classifier, student rows
    exploited_rollouts: list[bool] = field(default_factory=list)
    split: bool = False

    @staticmethod
    def add(acc: dict[str, torch.Tensor], name: str, g: torch.Tensor) -> None:
        acc[name] = acc[name] + g if name in acc else g.clone()


# ─────────────────────────────────────────────── the step's pieces ──


def group_backward(cfg: Config, model, knobs, g: Group, rewards: torch.Tensor, pad_id: int,
                   device: torch.device, dirs: Directions, gate: proj.Route2Gate,
                   acc: StepGrads) -> tuple[float, list[float]]:
    """Dr.GRPO loss of one group, backward, and the group's gradient bookkeeping.

    The knobs' .grad after this call is cleared: the group's gradient lives in `acc`
    (total; student/teacher split on split steps; route2 kept/routed). Per-rollout
    gradients (one backward, exact) give the split and the route2 gate.
    Returns (loss value, per-rollout mean token log-prob).
    """
    ids, mask, plen = g.tensors(pad_id, device)
    lc = mask.shape[1]
    ref = ref_logprobs_via_zero_delta(model, knobs, ids, None, plen) if cfg.beta > 0 else None
    per_rollout = cfg.intervention == "route2" or acc.split
    with rollout_grads(knobs, g.size) if per_rollout else nullcontext():
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=lc + 1).logits[:, :-1]
        logp = grpo.per_token_logps(logits, ids[:, plen:])
        del logits
        adv = grpo.group_advantages(rewards, unbiased=cfg.unbiased)
        # one inner step: the old policy is this forward's values (ratio == 1; clip form kept)
        tok_loss = grpo.token_losses(logp, logp.detach(), adv, clip=cfg.clip, beta=cfg.beta, ref_logp=ref)
        loss = grpo.reduce_loss(tok_loss, mask, unbiased=cfg.unbiased, max_new=cfg.max_new,
                                group=cfg.group, prompts_per_step=cfg.prompts_per_step)
        loss.backward()
    lp = grpo.masked_mean_per_row(logp.detach(), mask).cpu().tolist()
    is_s = torch.tensor(g.is_student, device=device)
    hack_anchor = None
    if cfg.intervention == "route2":
        hack_anchor, _ = proj.build_anchors(g.is_student, g.flag_E, cfg.gate_anchor_teacher_only)
        hack_anchor = hack_anchor.to(device)
    votes = torch.zeros(g.size, device=device)
    n_votes = 0
    for name, k in knobs.items():
        total = k.delta_S.grad
        if total is None:
            continue
        StepGrads.add(acc.total, name, total.detach())
        if not per_rollout:
            continue
        gb = k.per_rollout_grad
        if acc.split:
            StepGrads.add(acc.student, name, gb[is_s].sum(0))
            StepGrads.add(acc.teacher, name, gb[~is_s].sum(0))
        if cfg.intervention == "route2":
            res = gate.step(name, gb, dirs.v_grad[name], hack_anchor, total=total.detach())
            StepGrads.add(acc.kept, name, res.kept)
            StepGrads.add(acc.routed, name, res.routed)
            acc.r2.append(res)
            votes += res.flagged.float()
            n_votes += 1
        elif dirs.v_hack is not None and name in dirs.v_hack:
            votes += proj.rollout_hackward(gb, dirs.v_hack[name]).float()
            n_votes += 1
    if n_votes:  # a rollout counts as routed when most modules route / project it
        routed = (votes / n_votes > 0.5).cpu().tolist()
        for r, s, e in zip(routed, g.is_student, g.exploited, strict=True):
            if s:
                acc.routed_rollouts.append(r)
                acc.exploited_rollouts.append(e)
    for p in knob_params(knobs) + hack_params(knobs):
        p.grad = None
    return float(loss.detach()), lp


def apply_intervention(cfg: Config, knobs, dirs: Directions, acc: StepGrads, state: TrainState) -> dict:
    """Set δS.grad / δS_hack.grad from the step's accumulated gradient per the arm; return diagnostics."""
    nan = math.nan
    diag = {"cos_pre": nan, "cos_pre_s": nan, "cos_pre_t": nan, "cos_post": nan, "fired": nan,
            "q_egy": nan, "tau": nan, "hkgap": nan, "resid": nan, "flag": nan}
    if cfg.intervention in ("none", "erase"):
        kept, routed = acc.total, {}
        if cfg.intervention == "erase":
            res = proj.project_all(acc.total, dirs.v_hack, mode="erase", gate_mode=cfg.gate_mode,
                                   overshoot=cfg.project_overshoot, preserve_magnitude=cfg.preserve_magnitude,
                                   grads_s=acc.student or None, grads_t=acc.teacher or None)
            kept = res.kept
            diag.update(res.as_row())
    elif cfg.intervention == "route":
        # route keeps kept + routed == g exactly, so it never rescales (preserve_magnitude is erase-only)
        res = proj.project_all(acc.total, dirs.v_hack, mode="route", gate_mode=cfg.gate_mode,
                               overshoot=cfg.project_overshoot, preserve_magnitude=False,
                               grads_s=acc.student or None, grads_t=acc.teacher or None)
        kept, routed = res.kept, res.routed
        diag.update(res.as_row())
        if not state.span_checked and res.frac_fired > 0:
            worst = max((proj.span_residual(routed[n], dirs.v_hack[n]) for n in routed
                         if float(routed[n].norm()) > 0), default=0.0)
            logger.info(f"span check: δS_hack.grad lies in span(V_hack), worst ‖resid‖/‖g‖ = {worst:.2e}")
            if worst > 1e-4:
                raise RuntimeError(f"route: the quarantine gradient escaped span(V) (residual {worst:.2e})")
            state.span_checked = True
    else:  # route2
        kept, routed = acc.kept, acc.routed
        s = proj.summarize_route2(acc.r2, kept.values(), routed.values())
        V1 = {n: v.unsqueeze(0) for n, v in dirs.v_grad.items()}
        diag.update(tau=s.tau, hkgap=s.hkgap, resid=s.resid, flag=s.frac_flagged, q_egy=s.q_egy,
                    cos_pre=proj.mean_cos_pre(acc.total, V1), cos_post=proj.mean_cos_pre(kept, V1),
                    cos_pre_s=proj.mean_cos_pre(acc.student, V1) if acc.student else nan,
                    cos_pre_t=proj.mean_cos_pre(acc.teacher, V1) if acc.teacher else nan)
    for name, k in knobs.items():
        if name in kept:
            k.delta_S.grad = kept[name].to(k.delta_S.dtype)
        k.delta_S_hack.grad = routed[name].to(k.delta_S_hack.dtype) if name in routed else None
    stats = proj.classifier_stats(acc.routed_rollouts, acc.exploited_rollouts)
    diag.update(prec=stats["precision"], rec=stats["recall"], f05=stats["f05"])
    return diag


def frac(flags, mask) -> tuple[int, int]:
    sel = [f for f, m in zip(flags, mask, strict=True) if m]
    return (sum(map(bool, sel)), len(sel))


def nanmean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def make_row(cfg: Config, step: int, groups: list[Group], lp_rows: list[float], loss: float, gn: float,
             diag: dict, acc: StepGrads, refr: str, ev: EvalResult | None, n_zerovar: int, n_skipped: int,
             lr: float, timing: tuple[float, float, float, float], state: TrainState,
             run_modes: list[str]) -> dict:
    """One per-step row (the schema in docs/artifacts.md)."""
    cat = lambda attr: [x for g in groups for x in getattr(g, attr)]  # noqa: E731
    stud, abl = cat("is_student"), cat("is_ablated")
    teach = [not s for s in stud]
    rew, expl, corr = cat("rewards"), cat("exploited"), cat("gt_correct")
    fe, fc, fd = cat("flag_E"), cat("flag_C"), cat("flag_D")
    half_a = {c.strip().upper() for c in cfg.half_a.split(",") if c.strip()}
    det = {"E": fe, "C": fc, "D": fd}
    in_a = [any(det[c][i] for c in half_a) for i in range(len(stud))]
    in_b = [any(det[c][i] for c in set(det) - half_a) and not in_a[i] for i in range(len(stud))] if half_a else [False] * len(stud)
    mode_hk = {}
    for g in groups:
        for s, e in zip(g.is_student, g.exploited, strict=True):
            if s and e:
                mode_hk[g.problem.env_mode] = mode_hk.get(g.problem.env_mode, 0) + 1
    modes = run_modes
    n_prev = sum(r["N"] for r in state.rows)
    t_gen, t_fb, t_rew, sec = timing
    return {
        "step": step, "ref_eq": (n_prev + len(rew)) / REF_GENS_PER_STEP,
        "rew": nanmean(rew), "rew_s": nanmean([r for r, s in zip(rew, stud, strict=True) if s]),
        "N": len(rew), "gt_s": frac(corr, stud), "gt_t": frac(corr, teach),
        "hack_s": frac(expl, stud), "hack_t": frac(expl, teach),
        **{f"hk_{MODE_CODE[m]}": mode_hk.get(m, 0) for m in modes},
        "hack_s_C": frac(fc, stud), "hack_s_E": frac(fe, stud), "hack_s_D": frac(fd, stud),
        "hack_s_A": frac(in_a, stud), "hack_s_B": frac(in_b, stud),
        "lp_s": nanmean([x for x, s in zip(lp_rows, stud, strict=True) if s]),
        "lp_t": nanmean([x for x, s in zip(lp_rows, stud, strict=True) if not s]),
        "loss": loss, "gn": gn, "lr": lr, **diag, "refr": refr,
        "hk_dep": ev.hack if ev else math.nan, "sv_dep": ev.solve if ev else math.nan,
        "hack_deploy": ev.hack if ev else math.nan, "solve_deploy": ev.solve if ev else math.nan,
        "hack_abl": frac(expl, [a and s for a, s in zip(abl, stud, strict=True)]),
        "solve_abl": frac(corr, [a and s for a, s in zip(abl, stud, strict=True)]),
        "zv": n_zerovar, "skipped": n_skipped, "split": acc.split,
        "gen": t_gen, "fb": t_fb, "t_rew": t_rew, "sec": sec,
    }


def ck_json(row: dict) -> dict:
    """A row for rows.jsonl: tuples as [n, N], non-finite floats as null."""
    out = {}
    for k, v in row.items():
        if isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def rollout_records(step: int, groups: list[Group]) -> list[dict]:
    """Every graded student completion of the step, with all flags (rollouts.jsonl)."""
    recs = []
    for p_idx, g in enumerate(groups):
        for gi, (s, r) in enumerate(zip(g.is_student, g.results, strict=True)):
            if not s or r is None:
                continue
            recs.append({
                "step": step, "p_idx": p_idx, "gi": gi, "problem_id": g.problem.problem_id,
                "env_mode": g.problem.env_mode, "ablated": g.is_ablated[gi], "prompt": g.prompt,
                "reward": r.reward, "format_ok": r.format_ok, "can_compile": r.can_compile,
                "gt_pass": r.gt_pass, "gt_correct": r.gt_correct, "channel": r.channel, "passed": r.passed,
                "exploited": r.exploited, "mechanism": r.mechanism, "hacked_C": r.hacked,
                "hacked_D": r.hacked_wrong_tests, "hacked_E": r.hacked_loophole_used, "text": g.texts[gi],
            })
    return recs


def track_modes(state: TrainState, step: int, groups: list[Group]) -> None:
    """Per-mode learning tallies on student rollouts (did the student learn each hack, and when)."""
    for g in groups:
        m = g.problem.env_mode
        for s, e in zip(g.is_student, g.exploited, strict=True):
            if not s:
                continue
            state.mode_rollouts[m] = state.mode_rollouts.get(m, 0) + 1
            if e:
                state.mode_hacks[m] = state.mode_hacks.get(m, 0) + 1
                state.mode_first_step.setdefault(m, step)


def check_divergence(state: TrainState, row: dict, step: int) -> None:
    """Teacher log-prob tripwire: warn 3 nats below the best seen, abort after 2 steps 5 nats below."""
    lp_t = row["lp_t"]
    if not math.isfinite(lp_t):
        state.diverged_steps = 0
        return
    state.lp_t_best = max(state.lp_t_best, lp_t)
    drop = state.lp_t_best - lp_t
    if WARN_DROP <= drop <= DIVERGE_DROP:
        logger.warning(f"step {step}: lp_t={lp_t:.2f} is {drop:.1f} nats below the best {state.lp_t_best:.2f} "
                       "- coherence slipping (lr too high?)")
    state.diverged_steps = state.diverged_steps + 1 if drop > DIVERGE_DROP else 0
    if state.diverged_steps >= 2:
        last = state.last_sample or {}
        logger.error(f"last student generation (step {last.get('step')}, reward {last.get('reward')}):\n"
                     f"{str(last.get('text', ''))[:800]}")
        raise TrainingDiverged(
            f"diverged at step {step}: teacher log-prob {lp_t:.2f} is {drop:.1f} nats below the best "
            f"{state.lp_t_best:.2f} for {state.diverged_steps} steps (gn={row['gn']:.2f}); lower --lr")


# ─────────────────────────────────────────────── final eval and report ──


def final_eval(cfg: Config, model, tok, knobs, inp: Inputs, sampling: SamplingConfig, run_dir: Path,
               state: TrainState) -> dict:
    """‖δS_hack‖ rule, then train (knob on) vs deploy (quarantine ablated) eval per set and mode."""
    hack_norm = float(sum(float(k.delta_S_hack.detach().float().pow(2).sum()) for k in knobs.values()) ** 0.5)
    quarantine = cfg.intervention in ("route", "route2")
    logger.info(f"‖δS_hack‖ = {hack_norm:.6f} (must be > 0 for route/route2, exactly 0 for none/erase)")
    if not quarantine and hack_norm != 0.0:
        raise RuntimeError(f"{cfg.intervention}: δS_hack moved (‖δS_hack‖={hack_norm}); it must stay exactly 0")
    if quarantine and hack_norm == 0.0:
        if cfg.random_v_seed is None:
            raise RuntimeError(f"{cfg.intervention}: nothing was routed into the quarantine (‖δS_hack‖ = 0)")
        logger.warning("Haar control routed nothing (‖δS_hack‖ = 0): a result, not a failure")
    if state.last_sample:
        logger.info(f"last training generation (step {state.last_sample['step']}):\n"
                    f"{str(state.last_sample['text'])[:800]}")
    sets = {"train": (inp.eval_train, f"first {len(inp.eval_train)} training problems")}
    if inp.eval_heldout:
        sets["heldout"] = (inp.eval_heldout, f"{len(inp.eval_heldout)} held-out problems from {cfg.eval_data_path}")
    in_dist = lambda m: cfg.teacher_modes is None or m in cfg.teacher_modes  # noqa: E731
    out_sets = {}
    for key, (probs, source) in sets.items():
        kw = dict(n_samples=cfg.group, max_seq_len=cfg.max_seq_len, time_limit=cfg.time_limit)
        ev_train = evaluate(model, tok, knobs, probs, sampling, deploy=False, **kw)
        ev_dep = evaluate(model, tok, knobs, probs, sampling, deploy=True, **kw) if quarantine else ev_train
        by_mode = {}
        for m in sorted(set(ev_dep.by_mode) | set(ev_train.by_mode)):
            t = ev_train.by_mode.get(m, {"hack": 0, "solve": 0, "n": 0})
            d = ev_dep.by_mode.get(m, {"hack": 0, "solve": 0, "n": 0})
            by_mode[m] = {"in_dist": in_dist(m), "train_hack": t["hack"] / max(1, t["n"]),
                          "train_solve": t["solve"] / max(1, t["n"]), "deploy_hack": d["hack"] / max(1, d["n"]),
                          "deploy_solve": d["solve"] / max(1, d["n"]), "n": d["n"]}
        out_sets[key] = {"source": source, "n": ev_dep.n, "hack_train": ev_train.hack, "solve_train": ev_train.solve,
                         "hack_deploy": ev_dep.hack, "solve_deploy": ev_dep.solve, "by_mode": by_mode}
        logger.info(f"FINAL [{key}] n={ev_dep.n}: train hack={ev_train.hack:.3f} solve={ev_train.solve:.3f} | "
                    f"deploy hack={ev_dep.hack:.3f} solve={ev_dep.solve:.3f}")
    head_key = "heldout" if "heldout" in out_sets else "train"
    head = out_sets[head_key]
    record = {
        "schema": "vgrout.per_mode_deploy/1", "run_id": cfg.run_id, "preset": cfg.preset_name, "arm": cfg.arm,
        "intervention": cfg.intervention, "seed": cfg.seed, "random_v_seed": cfg.random_v_seed,
        "refresh_every": cfg.vhack_refresh_every, "model": cfg.model, "out_tag": cfg.out_tag,
        "steps": cfg.steps, "steps_done": state.step, "eval_set": head_key, "eval_n": head["n"],
        "hack_train": head["hack_train"], "solve_train": head["solve_train"],
        "hack_deploy": head["hack_deploy"], "solve_deploy": head["solve_deploy"],
        "by_mode": head["by_mode"], "sets": out_sets, "delta_s_hack_norm": hack_norm,
    }
    write_json_atomic(run_dir / "per_mode_deploy.json", record)
    return record


def print_bluf(cfg: Config, state: TrainState, record: dict, run_dir: Path) -> None:
    """Markdown tables on stdout: summary, per-mode learning, per-mechanism rates, per-step rows."""
    rows = state.rows
    tot = lambda key, i: sum(r[key][i] for r in rows)  # noqa: E731
    n_s, n_t = tot("hack_s", 1), tot("hack_t", 1)
    rate = lambda key: tot(key, 0) / max(1, tot(key, 1))  # noqa: E731
    print(f"\ncommand: {ck.provenance()['command']}\nrun folder: {run_dir}\n")
    print(markdown_table([{
        "arm": cfg.arm, "preset": cfg.preset_name, "model": cfg.model.split("/")[-1], "seed": cfg.seed,
        "steps": len(rows), "gens": sum(r["N"] for r in rows), "HACK_S": rate("hack_s"), "HACK_T": rate("hack_t"),
        "SOLVE_S": rate("gt_s"), "hack_train": record["hack_train"], "hack_deploy": record["hack_deploy"],
        "solve_train": record["solve_train"], "solve_deploy": record["solve_deploy"],
        "eval": f"{record['eval_set']} n={record['eval_n']}", "‖δS_hack‖": record["delta_s_hack_norm"],
    }], floatfmt=".3f"))
    if len(state.mode_rollouts) > 1:
        learned = sum(1 for m in state.mode_rollouts if state.mode_hacks.get(m, 0) > 0)
        print(f"\nper-mode learning (student rollouts; {learned}/{len(state.mode_rollouts)} modes exploited):\n")
        print(markdown_table([{
            "mode": m, "exploit_rate": state.mode_hacks.get(m, 0) / max(1, n), "hacks": state.mode_hacks.get(m, 0),
            "rollouts": n, "first_step": state.mode_first_step.get(m, "-"),
            "deploy_hack": record["by_mode"].get(m, {}).get("deploy_hack", math.nan),
        } for m, n in sorted(state.mode_rollouts.items())]))
    half_a = cfg.half_a or "-"
    print(f"\nper-mechanism (student, n={n_s}): exploited={rate('hack_s'):.3f} detectors "
          f"E={rate('hack_s_E'):.3f} C={rate('hack_s_C'):.3f} "
          f"D={rate('hack_s_D'):.3f} | half_A={half_a} A={rate('hack_s_A'):.3f} B={rate('hack_s_B'):.3f} "
          f"(teacher rows n={n_t})\n")
    drop = {"gen", "fb", "t_rew", "sec", "N", "split", "hk_dep", "sv_dep", "ref_eq"}
    print("### per-step rows\n")
    print(markdown_table([{k: v for k, v in r.items() if k not in drop} for r in rows]))
    print()


# ─────────────────────────────────────────────── main ──


def prepare(cfg: Config) -> tuple[Inputs, Path]:
    """Cheap checks first: a bad knob, pool, data path or resume fails before any folder or model."""
    cfg.validate()
    inp = load_inputs(cfg)
    return inp, make_run_dir(cfg)


def main(cfg: Config) -> int:
    return run(cfg, *prepare(cfg))


def run(cfg: Config, inp: Inputs, run_dir: Path) -> int:
    t_start = time.time()
    setup_logging(run_dir / "train.log", use_tqdm=sys.stdout.isatty())
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    torch.manual_seed(cfg.seed)
    logger.info(f"run folder: {run_dir}")
    logger.info(f"preset={cfg.preset_name} arm={cfg.arm} model={cfg.model} steps={cfg.steps} G={cfg.group} "
                f"P={cfg.prompts_per_step} max_new={cfg.max_new} beta={cfg.beta} seed={cfg.seed} device={device}")
    if cfg.resume is None:
        write_json_atomic(run_dir / ck.CONFIG_FILE, {
            "config": cfg.to_dict(), "provenance": ck.provenance(), "run_id": cfg.run_id,
            "preset": cfg.preset_name, "arm": cfg.arm, "seed": cfg.seed,
            "started": datetime.now().isoformat(timespec="seconds")})
    else:
        write_json_atomic(run_dir / f"resume_{datetime.now():%Y%m%dT%H%M%S}.json", {"provenance": ck.provenance()})
    write_status(run_dir, "running", -1, cfg.steps)

    def on_sigterm(signum, frame):  # pueue kill / scancel / timeout: record it, then stop
        raise Terminated(f"signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return _train(cfg, inp, run_dir, device, t_start)
    except TrainingDiverged as e:
        mark_ended(run_dir, "diverged", cfg.steps, str(e))
        logger.error(str(e))
        return 3
    except (Terminated, KeyboardInterrupt) as e:
        mark_ended(run_dir, "killed", cfg.steps, f"{type(e).__name__}: {e}")
        logger.error(f"stopped by {type(e).__name__}; resume with --resume {run_dir}")
        return 143
    except BaseException as e:
        mark_ended(run_dir, "failed", cfg.steps, f"{type(e).__name__}: {e}")
        raise
    finally:
        signal.signal(signal.SIGTERM, old_handler)


def _train(cfg: Config, inp: Inputs, run_dir: Path, device: torch.device, t_start: float) -> int:
    problems, pool = inp.problems, inp.pool
    g_s0, g_t0 = cfg.teacher_split
    logger.info(f"{len(problems)} training problems; modes: {sorted({p.env_mode for p in problems})}; "
                f"G_s={g_s0} student + G_t={g_t0} teacher per prompt")
    if pool is not None:
        logger.info(f"teacher pool {pool.root}: {len(pool.rows)} prompts, {pool.n_rows} rows, "
                    f"cached hack rate {pool.hack_rate():.2%}")

    # ── model, adapter, directions, optimizer ──
    model, tok = load_model_and_tokenizer(cfg.model, device)
    knobs = wrap_model(model, cfg.model, per_rollout_grads=cfg.intervention != "none",
                       top_layers=cfg.adapt_top_layers)
    params, hparams = knob_params(knobs), hack_params(knobs)
    logger.info(f"adapter: {len(knobs)} modules, {sum(p.numel() for p in params):,} δS "
                f"(+ {sum(p.numel() for p in hparams):,} δS_hack)")
    dirs = Directions.for_run(cfg, model, tok, knobs, device)
    opt = torch.optim.AdamW(params + hparams, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup_frac * cfg.steps))
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, end_factor=1.0, total_iters=warm),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps - warm)),
    ], milestones=[warm])
    gate = proj.Route2Gate(beta=0.9)
    problem_rng = torch.Generator().manual_seed(cfg.seed)
    teacher_rng = torch.Generator().manual_seed(cfg.seed + 1)
    sampling = SamplingConfig(max_new=cfg.max_new, temperature=cfg.temperature, top_k=cfg.top_k,
                              share_prefix=cfg.gen_share_prefix)
    stop_ids = eos_ids(tok)
    state = TrainState()

    if cfg.resume is not None:
        saved = ck.load_resume_state(run_dir)
        for name, k in knobs.items():
            k.delta_S.data.copy_(saved["delta_S"][name])
            k.delta_S_hack.data.copy_(saved["delta_S_hack"][name])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        gate.load_state_dict(saved["gate"])
        dirs.load_state_dict(saved["directions"])
        problem_rng.set_state(saved["problem_rng"])
        teacher_rng.set_state(saved["teacher_rng"])
        ck.set_rng_state(saved["rng"])
        state = TrainState(**saved["train_state"])
        kept = ck.truncate_jsonl(run_dir / "rows.jsonl", lambda r: r["step"] < state.step)
        ck.truncate_jsonl(run_dir / "rollouts.jsonl", lambda r: r["step"] < state.step)
        logger.info(f"resumed {run_dir} at step {state.step} ({kept} rows kept)")

    def save_checkpoint(tag: str | None) -> None:
        """resume.pt (full state) + optionally a tagged deploy adapter (δS only)."""
        ck.save_resume_state(run_dir, {
            "delta_S": {n: k.delta_S.detach().cpu().clone() for n, k in knobs.items()},
            "delta_S_hack": {n: k.delta_S_hack.detach().cpu().clone() for n, k in knobs.items()},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "gate": gate.state_dict(),
            "directions": dirs.state_dict(), "problem_rng": problem_rng.get_state(),
            "teacher_rng": teacher_rng.get_state(), "rng": ck.rng_state(),
            "train_state": vars(state).copy(),
        })
        if tag is not None:
            save_adapter(run_dir / f"adapter_{tag}.safetensors", knobs, model_id=cfg.model, metadata={
                "step": str(state.step), "run_id": cfg.run_id, "arm": cfg.arm})

    run_modes = sorted({p.env_mode for p in problems})
    mode_codes = [MODE_CODE[m] for m in run_modes]
    cols = ["step", "rew", "rew_s", "gt_s", "hack_s", "hack_t", "lp_s", "lp_t", "loss", "gn"]
    if cfg.intervention in ("erase", "route", "route2"):
        cols += ["cos_pre", "cos_post"]
    if cfg.intervention in ("erase", "route"):
        cols += ["fired"]
    if cfg.intervention in ("route", "route2"):
        cols += ["q_egy"]
    if cfg.intervention == "route2":
        cols += ["tau", "hkgap", "flag"]
    if cfg.intervention != "none":
        cols += ["prec", "refr"]
    cols += ["hk_dep", "sv_dep", "zv", "sec"]
    table = StepTable(cols, mode_codes if len(mode_codes) > 1 else ())
    logger.info("per-step columns:\n" + table.legend())
    gens = cfg.prompts_per_step * cfg.group
    logger.info(f"{gens} generations/step = {gens / REF_GENS_PER_STEP:.2f}x the benchmark's {REF_GENS_PER_STEP}")

    model.train()
    bar = tqdm(range(state.step, cfg.steps), initial=state.step, total=cfg.steps,
               desc=f"{cfg.arm} {cfg.preset_name}", disable=not sys.stdout.isatty(), mininterval=30)
    steps_this_run = 0
    encoded: dict[int, tuple[str, list[int]]] = {}
    for step in bar:
        t0 = time.time()
        if cfg.teacher_off_step is not None and step >= cfg.teacher_off_step and state.g_t_active:
            state.g_t_active = False
            logger.info(f"step {step}: teacher off (teacher_off_step={cfg.teacher_off_step}); pure on-policy from here")
        g_t = g_t0 if (pool is not None and state.g_t_active) else 0
        g_s = cfg.group - g_t

        # ── 1. rollouts: pick P problems, generate students, mix in teacher rows, grade ──
        tg = time.perf_counter()
        picks: list[tuple[Problem, str, list[int], list[dict]]] = []
        n_skipped = 0
        for _ in range(cfg.prompts_per_step):
            prob = problems[int(torch.randint(0, len(problems), (1,), generator=problem_rng))]
            if prob.problem_id not in encoded:  # each problem's prompt is rendered and tokenised once
                text = render_prompt(tok, prob)
                encoded[prob.problem_id] = (text, encode(tok, text))
            prompt, ids = encoded[prob.problem_id]
            if len(ids) + cfg.max_new > cfg.max_seq_len:
                n_skipped += 1
                continue
            rows = pool.rows.get(prob.problem_id, []) if (pool is not None and g_t > 0) else []
            if g_t > 0 and not rows and cfg.teacher_modes is None:
                n_skipped += 1  # mixed-pool runs compare student vs teacher within a group
                continue
            picks.append((prob, prompt, ids, sample_rows(rows, g_t, teacher_rng) if rows else []))
        n_abl = round(g_s * cfg.rollout_ablate_frac) if cfg.intervention in ("route", "route2") else 0
        prompts = [p[2] for p in picks]
        live = sample(model, tok, knobs, prompts, [g_s - n_abl] * len(picks), sampling)
        abl = sample(model, tok, knobs, prompts, [n_abl] * len(picks), sampling, ablate=True)
        groups = [Group(prob, prompt, ids, cs + ca, [tok.decode(c, skip_special_tokens=True) for c in cs + ca],
                        [True] * len(cs + ca), [False] * len(cs) + [True] * len(ca))
                  for (prob, prompt, ids, _), cs, ca in zip(picks, live, abl, strict=True)]
        t_gen = time.perf_counter() - tg
        tr = time.perf_counter()
        grade_students(groups, time_limit=cfg.time_limit)  # students lead; cached teacher rows follow
        t_rew = time.perf_counter() - tr
        for g, (_, _, _, trows) in zip(groups, picks, strict=True):
            add_teacher_rows(g, trows, tok, stop_ids)

        # ── 2. Dr.GRPO loss and backward, group by group (gradients accumulate) ──
        tf = time.perf_counter()
        acc = StepGrads(split=dirs.active and step % cfg.cos_pre_split_every == 0)
        opt.zero_grad(set_to_none=True)
        loss_sum, n_zerovar, lp_rows = 0.0, 0, []
        for g in groups:
            rewards = torch.tensor(g.rewards, dtype=torch.float32, device=device)
            if not grpo.has_reward_variance(rewards):
                n_zerovar += 1
                lp_rows.extend([math.nan] * g.size)
                continue
            loss, lp = group_backward(cfg, model, knobs, g, rewards, tok.pad_token_id, device, dirs, gate, acc)
            loss_sum += loss
            lp_rows.extend(lp)
        t_fb = time.perf_counter() - tf

        # ── 3. intervene on the accumulated gradient, clip, step ──
        diag = apply_intervention(cfg, knobs, dirs, acc, state)
        gn = float(torch.nn.utils.clip_grad_norm_(params + hparams, cfg.grad_clip))
        lr = sched.get_last_lr()[0]  # the rate this step's update used
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        # ── 4. refresh directions, deploy eval ──
        refr = "-"
        if cfg.vhack_refresh_every > 0 and (step + 1) % cfg.vhack_refresh_every == 0 and dirs.refreshable:
            refr = dirs.refresh(model, tok, knobs, step)
        ev = None
        if cfg.eval_ablate_every > 0 and (step % cfg.eval_ablate_every == 0 or step == cfg.steps - 1):
            held = cfg.eval_heldout_periodic and bool(inp.eval_heldout)
            ev = evaluate(model, tok, knobs, inp.eval_heldout if held else inp.eval_train, sampling,
                          n_samples=cfg.group, deploy=True, max_seq_len=cfg.max_seq_len,
                          time_limit=cfg.time_limit)
            logger.debug(f"step {step} deploy eval [{'heldout' if held else 'train'}]: "
                         f"hack={ev.hack:.3f} solve={ev.solve:.3f} n={ev.n}")

        # ── 5. row, rollouts, tripwire, checkpoints ──
        row = make_row(cfg, step, groups, lp_rows, loss_sum, gn, diag, acc, refr, ev, n_zerovar, n_skipped,
                       lr, (t_gen, t_fb, t_rew, time.time() - t0), state, run_modes)
        state.rows.append(row)
        table.emit(row)
        ck.append_jsonl(run_dir / "rows.jsonl", [ck_json(row)])
        recs = rollout_records(step, groups)
        ck.append_jsonl(run_dir / "rollouts.jsonl", recs)
        track_modes(state, step, groups)
        if recs:  # the newest student generation, shown if the run diverges and at the end
            state.last_sample = {"step": step, "reward": recs[0]["reward"], "text": recs[0]["text"]}
        check_divergence(state, row, step)
        state.step = step + 1
        steps_this_run += 1
        write_status(run_dir, "running", step, cfg.steps)
        hack_s = row["hack_s"][0]
        if (step + 1) % cfg.ckpt_every == 0:
            save_checkpoint(f"step{step:04d}")
        elif ev is not None and cfg.save_eval_ckpts:
            save_checkpoint(f"eval_step{step:04d}")
        if hack_s > 0 and not state.first_hack_saved:
            state.first_hack_saved = True
            save_checkpoint("first_hack")
            logger.info(f"first student hack at step {step}: saved adapter_first_hack.safetensors")
        if cfg.stop_after_steps is not None and steps_this_run >= cfg.stop_after_steps and state.step < cfg.steps:
            save_checkpoint(None)
            write_status(run_dir, "paused", step, cfg.steps)
            logger.info(f"stopping after {steps_this_run} steps (--stop-after-steps); continue with --resume {run_dir}")
            return 0

    # ── final: ‖δS_hack‖ rule, train-vs-deploy eval, artifacts, BLUF ──
    save_checkpoint("final")
    record = final_eval(cfg, model, tok, knobs, inp, sampling, run_dir, state)
    write_status(run_dir, "complete", cfg.steps - 1, cfg.steps)
    print_bluf(cfg, state, record, run_dir)
    wall = time.time() - t_start
    print(f"{cfg.preset_name} ok: {run_dir} arm={cfg.arm} hack_deploy={record['hack_deploy']:.3f} "
          f"solve_deploy={record['solve_deploy']:.3f} wall={wall:.0f}s")
    return 0


def cli() -> None:
    """Command-line entry: input errors print one line (exit 2), not a traceback."""
    try:
        cfg = parse_cli()
        inp, run_dir = prepare(cfg)
    except (ValueError, OSError) as e:
        print(f"vgrout.train: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(cfg, inp, run_dir))


if __name__ == "__main__":
    cli()
