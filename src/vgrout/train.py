"""Dr.GRPO with gradient interventions on an SVD adapter: the training loop.

    uv run python -m vgrout.train smoke                       # offline gate (tiny Qwen3, CPU)
    uv run python -m vgrout.train fast --intervention=route2  # an experiment on one GPU
    uv run python -m vgrout.train smoke --resume out/runs/<dir>

One optimizer step:
    sample P problems -> generate G_s student rollouts (+ G_t cached teacher rows) -> grade in the sandbox
    -> Dr.GRPO loss per group -> backward (accumulate over P) -> the arm turns the gradient into
    δS.grad / δS_hack.grad -> clip -> AdamW -> schedule -> every N: refresh directions; every M: deploy
    eval; log a row; checkpoint.

The arm (`arms.py`) is chosen once at setup; the loop below never asks which arm it runs.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# idle OpenMP threads sleep instead of spinning: on a shared CPU a spinning pool starves the other
# process's threads (a small matmul took 15 ms spinning against 0.7 ms passive; docs/organism.md)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from loguru import logger
from tqdm import tqdm

from . import blocks, grpo, proj
from . import checkpoint as ck
from .adapter import (
    deployed_params,
    quarantine_norm,
    quarantine_params,
    save_adapter,
    snapshot,
    update_mass,
    wrap_model,
)
from .arms import StepGrads, Vanilla
from .atomic import write_json_atomic
from .config import Config, parse_cli
from .directions import RunDirections, run_pairs
from .env.modes import MODE_CODE
from .eval import RunEvals, deploy_record
from .inputs import Inputs, load_inputs
from .logprobs import completion_logprobs, reference_logprobs
from .metrics import REF_GENS_PER_STEP, classifier_metrics, eval_metrics, mode_counts, rollout_metrics, row_json, timed
from .model import load_model_and_tokenizer
from .rollout import Group, RolloutSource, SamplingConfig, rollout_records
from .runstate import TrainingDiverged, TrainState
from .tablelog import StepTable, print_bluf, setup_logging, step_columns
from .tracking import Tracker, make_tracker


class Terminated(Exception):
    """SIGTERM arrived (a queue or scheduler stopped the run)."""


@dataclass
class Run:
    """What one training run holds: built by `setup`, driven by `train_step`."""

    cfg: Config
    inp: Inputs
    run_dir: Path
    device: torch.device
    model: torch.nn.Module
    tok: object
    knobs: dict
    arm: Vanilla
    dirs: RunDirections
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    source: RolloutSource
    evals: RunEvals
    state: TrainState

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return deployed_params(self.knobs) + quarantine_params(self.knobs)

    def parts(self) -> dict:
        """Everything with its own state_dict(), by its key in resume.pt."""
        return {"optimizer": self.opt, "scheduler": self.sched, "arm": self.arm, "directions": self.dirs,
                "rollouts": self.source, "train_state": self.state}


# ─────────────────────────────────────────────── setup ──


def make_optimizer(cfg: Config, params: list) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over δS and δS_hack; linear warmup over warmup_frac of the steps, then cosine to 0."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup_frac * cfg.steps))
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, end_factor=1.0, total_iters=warm),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps - warm)),
    ], milestones=[warm])
    return opt, sched


def setup(cfg: Config, inp: Inputs, run_dir: Path, device: torch.device) -> Run:
    """Model, adapter, arm and its directions, optimizer, rollout source and evals (resumed if asked)."""
    g_s, g_t = cfg.teacher_split
    logger.info(f"{len(inp.problems)} training problems; modes: {sorted({p.env_mode for p in inp.problems})}; "
                f"G_s={g_s} student + G_t={g_t} teacher per prompt")
    if inp.pool is not None:
        logger.info(f"teacher pool {inp.pool.root}: {len(inp.pool.rows)} prompts, {inp.pool.n_rows} rows, "
                    f"cached hack rate {inp.pool.hack_rate():.2%}")
    model, tok = load_model_and_tokenizer(cfg.model, device)
    arm_cls = cfg.arm_type
    knobs = wrap_adapter(cfg, model, tok, arm_cls.family, device)
    arm = arm_cls(cfg, RunDirections.for_run(cfg, model, tok, knobs, device, arm_cls.directions_to_load(cfg)))
    arm.attach(model, tok, knobs, run_pairs(cfg, tok)[0] if arm_cls.family == "block" else [])
    opt, sched = make_optimizer(cfg, deployed_params(knobs) + quarantine_params(knobs))
    sampling = SamplingConfig(max_new=cfg.max_new, temperature=cfg.temperature, top_k=cfg.top_k,
                              share_prefix=cfg.gen_share_prefix)
    source = RolloutSource(inp.problems, inp.pool, tok, sampling, cfg)
    run = Run(cfg, inp, run_dir, device, model, tok, knobs, arm, arm.dirs, opt, sched, source,
              RunEvals(cfg, inp.eval_train, inp.eval_heldout, sampling), TrainState())
    if cfg.resume is not None:
        load_checkpoint(run)
    return run


def wrap_adapter(cfg: Config, model, tok, family: str, device: torch.device) -> dict:
    """The run's adapter on `model`: the SVD knob, or a block-split adapter (its corda / scorda calibration
    from the run's pairs, taken on the plain model and cached)."""
    if family == "svd":
        return wrap_model(model, cfg.model, top_layers=cfg.adapt_top_layers)
    calib = None
    if cfg.adapter in blocks.NEEDS_PAIRS:
        calib = blocks.resolve_calibration(model, tok, run_pairs(cfg, tok)[0], model_id=cfg.model,
                                           out_dir=cfg.out_root / "vhack", top_layers=cfg.adapt_top_layers,
                                           device=device)
    knobs = blocks.wrap_blocks(model, cfg.model, init=cfg.adapter, r=cfg.block_r, seed=cfg.seed, calibration=calib,
                               n_heldout=cfg.v_hack_n_heldout, top_layers=cfg.adapt_top_layers)
    logger.info(f"adapter: {cfg.adapter}, {len(knobs)} modules, rank 2 x {cfg.block_r}")
    return knobs


def save_checkpoint(run: Run, tag: str | None) -> None:
    """resume.pt (full state) + optionally a tagged deploy adapter (δS only)."""
    ck.save_run_state(run.run_dir, run.knobs, run.parts())
    if tag is not None:
        save = blocks.save_blocks if run.arm.family == "block" else save_adapter
        save(run.run_dir / f"adapter_{tag}.safetensors", run.knobs, model_id=run.cfg.model, metadata={
            "step": str(run.state.step), "run_id": run.cfg.run_id, "arm": run.cfg.arm})


def load_checkpoint(run: Run) -> None:
    """Everything from resume.pt; rows.jsonl / rollouts.jsonl cut back to the steps before it."""
    ck.load_run_state(run.run_dir, run.knobs, run.parts())
    kept = ck.truncate_jsonl(run.run_dir / "rows.jsonl", lambda r: r["step"] < run.state.step)
    ck.truncate_jsonl(run.run_dir / "rollouts.jsonl", lambda r: r["step"] < run.state.step)
    logger.info(f"resumed {run.run_dir} at step {run.state.step} ({kept} rows kept)")


# ─────────────────────────────────────────────── the step's pieces ──


def group_backward(run: Run, g: Group, acc: StepGrads) -> float:
    """Dr.GRPO loss of one group and its backward, in forward batches of similar length (each in the arm's
    context: per-rollout gradient recording, or routeA's masks). For an arm that edits the gradient, the
    group's gradient goes into `acc` (and, per rollout, to the arm) and .grad is cleared again; otherwise it
    accumulates in .grad. Sets g.mean_logp; returns the loss."""
    knobs, per_rollout = run.knobs, run.arm.needs_rollout_grads(acc.split)
    adv = grpo.group_advantages(torch.tensor(g.rewards, dtype=torch.float32, device=run.device),
                                unbiased=run.cfg.unbiased)
    run.arm.prepare_group(run.model, g, run.tok.pad_token_id)
    loss, g.mean_logp, g_b = 0.0, [math.nan] * g.size, {}
    for rows in g.length_buckets():
        with run.arm.batch_context(rows, per_rollout):
            loss += batch_backward(run, g, rows, adv[rows])
        for name, k in knobs.items():
            if per_rollout and k.per_rollout_grad is not None:
                g_b.setdefault(name, torch.zeros(g.size, k.rank, device=k.per_rollout_grad.device))[rows] = \
                    k.per_rollout_grad
    if not run.arm.edits_gradient:  # the gradient stays in .grad; the arm only reports its per-rollout choice
        acc.add_group(g, {}, None, run.arm.observe_group(g, None, {}))
        return loss
    totals = {n: k.delta_S.grad.detach() for n, k in knobs.items() if k.delta_S.grad is not None}
    acc.add_group(g, totals, g_b or None, run.arm.observe_group(g, g_b, totals) if per_rollout else None)
    for p in run.params:
        p.grad = None
    return loss


def batch_backward(run: Run, g: Group, rows: list[int], adv: torch.Tensor) -> float:
    """Forward and backward of some rows of a group (their share of the Dr.GRPO loss); sets their mean_logp."""
    cfg = run.cfg
    ids, mask, plen = g.tensors(run.tok.pad_token_id, run.device, rows)
    ref = reference_logprobs(run.model, run.knobs, ids, plen) if cfg.beta > 0 else None
    logp = completion_logprobs(run.model, ids, plen)
    # one inner step: the old policy is this forward's values (ratio == 1; clip form kept)
    tok_loss = grpo.token_losses(logp, logp.detach(), adv, clip=cfg.clip, beta=cfg.beta, ref_logp=ref)
    loss = grpo.reduce_loss(tok_loss, mask, unbiased=cfg.unbiased, max_new=cfg.max_new, group=cfg.group,
                            prompts_per_step=cfg.prompts_per_step)
    loss.backward()
    for r, x in zip(rows, grpo.masked_mean_per_row(logp.detach(), mask).cpu().tolist(), strict=True):
        g.mean_logp[r] = x
    return float(loss.detach())


def apply_update(run: Run, acc: StepGrads) -> dict:
    """The arm's δS / δS_hack gradients, global clip, AdamW step, schedule (and, for arms that edit the
    update, the split of AdamW's change of δS); returns the update metrics, including what the
    parameters actually did (cos_upd, quar_resid)."""
    arm = run.arm
    upd = arm.intervene(acc)
    for name, k in run.knobs.items() if arm.edits_gradient else ():
        if name in upd.kept:
            k.delta_S.grad = upd.kept[name].to(k.delta_S.dtype)
        k.delta_S_hack.grad = upd.routed[name].to(k.delta_S_hack.dtype) if name in upd.routed else None
    gn = float(torch.nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip))
    lr = run.sched.get_last_lr()[0]  # the rate this step's update used
    snap = snapshot(run.knobs)
    before = {n: k.deployed()[0].detach().clone() for n, k in run.knobs.items()}
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    diag = dict(upd.diag)
    if arm.edits_update:
        edit = arm.edit_update({n: k.delta_S.detach() - before[n] for n, k in run.knobs.items()})
        with torch.no_grad():
            for name, k in run.knobs.items():
                k.delta_S.copy_(before[name] + edit.kept[name])
                if name in edit.routed:
                    k.delta_S_hack.add_(edit.routed[name])
        diag.update(edit.diag)
    diag["q_mass"] = update_mass(run.knobs, snap)
    V = arm.basis_matrices()
    if V is not None:
        quarantine = {n: k.delta_S_hack.detach() for n, k in run.knobs.items()} if arm.has_quarantine else None
        change = {n: k.delta_S.detach() - before[n] for n, k in run.knobs.items()}
        diag.update(proj.update_diagnostics(V, change, quarantine))
    return {"gn": gn, "lr": lr, **diag, **classifier_metrics(acc.routed_votes, acc.exploited)}


def train_step(run: Run, step: int) -> tuple[dict, list[Group]]:
    """One optimizer step, phase by phase; returns the step's row and its graded groups."""
    cfg, state, times = run.cfg, run.state, {}
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    with timed(times, "sec"):
        # ── 1. rollouts: pick P problems, generate students, grade, mix in teacher rows ──
        if cfg.teacher_off_step is not None and step >= cfg.teacher_off_step and state.g_t_active:
            state.g_t_active = False
            logger.info(f"step {step}: teacher off (teacher_off_step={cfg.teacher_off_step}); pure on-policy")
        g_t = cfg.teacher_split[1] if (run.inp.pool is not None and state.g_t_active) else 0
        n_abl = round((cfg.group - g_t) * cfg.rollout_ablate_frac) if run.arm.has_quarantine else 0
        ro = run.source.collect(run.model, run.knobs, g_t, n_abl)
        times.update(gen=ro.t_gen, t_rew=ro.t_rew, rew_wait=ro.t_wait)

        # ── 2. Dr.GRPO loss and backward, group by group (gradients accumulate) ──
        acc = StepGrads(split=run.arm.uses_directions and step % cfg.cos_pre_split_every == 0)
        run.arm.begin_step()
        run.opt.zero_grad(set_to_none=True)
        loss, n_zerovar = 0.0, 0
        with timed(times, "fb"):
            for g in ro.groups:
                if not grpo.has_reward_variance(torch.tensor(g.rewards)):
                    n_zerovar += 1
                    g.mean_logp = [math.nan] * g.size
                    continue
                loss += group_backward(run, g, acc)

        # ── 3. the arm turns the gradient into δS / δS_hack gradients; clip; AdamW ──
        update = apply_update(run, acc)

        # ── 4. refresh directions, deploy eval ──
        refr = "-"
        refresh_due = cfg.vhack_refresh_every > 0 and (step + 1) % cfg.vhack_refresh_every == 0
        if refresh_due and run.arm.uses_directions and run.dirs.refreshable:
            refr = run.dirs.refresh(run.model, run.tok, run.knobs, step)
        ev = None
        if run.evals.due(step):
            which, ev = run.evals.periodic(run.model, run.tok, run.knobs)
            logger.debug(f"step {step} deploy eval [{which}]: hack={ev.hack:.3f} solve={ev.solve:.3f} n={ev.n}")

    # ── 5. the row ──
    metrics = rollout_metrics(ro.groups, sorted({p.env_mode for p in run.inp.problems}), cfg.half_a_codes)
    n_prev = sum(r["N"] for r in state.rows)
    return {"step": step, "ref_eq": (n_prev + metrics["N"]) / REF_GENS_PER_STEP, **metrics, "loss": loss, **update,
            "refr": refr, **eval_metrics(ev), "zv": n_zerovar, "skipped": ro.n_skipped, "split": acc.split,
            **times, "gpu_mem": torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda"
            else math.nan}, ro.groups


def record_step(run: Run, step: int, row: dict, groups: list[Group]) -> None:
    """Row and rollouts to disk, run tallies, tripwire, status."""
    state = run.state
    state.rows.append(row)
    ck.append_jsonl(run.run_dir / "rows.jsonl", [row_json(row)])
    recs = rollout_records(step, groups)
    ck.append_jsonl(run.run_dir / "rollouts.jsonl", recs)
    state.track_modes(step, mode_counts(groups))
    if recs:  # the newest student generation, shown if the run diverges and at the end
        state.last_sample = {"step": step, "reward": recs[0]["reward"], "text": recs[0]["text"]}
    state.check_divergence(row, step)
    state.step = step + 1
    ck.write_status(run.run_dir, "running", step, run.cfg.steps)


def checkpoints_after(run: Run, step: int, row: dict) -> None:
    """The step's checkpoints: every ckpt_every steps, at deploy evals, at the first student hack."""
    cfg, state = run.cfg, run.state
    if (step + 1) % cfg.ckpt_every == 0:
        save_checkpoint(run, f"step{step:04d}")
    elif run.evals.due(step) and cfg.save_eval_ckpts:
        save_checkpoint(run, f"eval_step{step:04d}")
    if row["hack_s"][0] > 0 and not state.first_hack_saved:
        state.first_hack_saved = True
        save_checkpoint(run, "first_hack")
        logger.info(f"first student hack at step {step}: saved adapter_first_hack.safetensors")


# ─────────────────────────────────────────────── the run ──


def _train(cfg: Config, inp: Inputs, run_dir: Path, device: torch.device, t_start: float,
           tracker: Tracker) -> int:
    run = setup(cfg, inp, run_dir, device)
    modes = sorted({p.env_mode for p in inp.problems})
    table = StepTable(step_columns(run.arm.columns, run.arm.uses_directions),
                      [MODE_CODE[m] for m in modes] if len(modes) > 1 else ())
    logger.info("per-step columns:\n" + table.legend())
    gens = cfg.prompts_per_step * cfg.group
    logger.info(f"{gens} generations/step = {gens / REF_GENS_PER_STEP:.2f}x the benchmark's {REF_GENS_PER_STEP}")
    run.model.train()
    bar = tqdm(range(run.state.step, cfg.steps), initial=run.state.step, total=cfg.steps,
               desc=f"{cfg.arm} {cfg.preset_name}", disable=not sys.stdout.isatty(), mininterval=30)
    for n_done, step in enumerate(bar, start=1):
        row, groups = train_step(run, step)
        record_step(run, step, row, groups)
        table.emit(row)
        tracker.log_row(step, row)
        checkpoints_after(run, step, row)
        if cfg.stop_after_steps is not None and n_done >= cfg.stop_after_steps and run.state.step < cfg.steps:
            save_checkpoint(run, None)
            ck.write_status(run_dir, "paused", step, cfg.steps)
            logger.info(f"stopping after {n_done} steps (--stop-after-steps); continue with --resume {run_dir}")
            return 0

    return finish(run, t_start, tracker)


def finish(run: Run, t_start: float, tracker: Tracker) -> int:
    """The end: ‖δS_hack‖ rule, train-vs-deploy eval, artifacts, BLUF, the one-line summary."""
    cfg, run_dir = run.cfg, run.run_dir
    save_checkpoint(run, "final")
    hack_norm = quarantine_norm(run.knobs)
    run.arm.check_quarantine(hack_norm)
    if run.state.last_sample:
        logger.info(f"last training generation (step {run.state.last_sample['step']}):\n"
                    f"{str(run.state.last_sample['text'])[:800]}")
    sets = run.evals.final(run.model, run.tok, run.knobs, run.arm.has_quarantine)
    for key, s in sets.items():
        logger.info(f"FINAL [{key}] n={s['n']}: train hack={s['hack_train']:.3f} solve={s['solve_train']:.3f} | "
                    f"deploy hack={s['hack_deploy']:.3f} solve={s['solve_deploy']:.3f}")
    record = deploy_record(cfg, sets, run.state.step, hack_norm)
    write_json_atomic(run_dir / "per_mode_deploy.json", record)
    ck.write_status(run_dir, "complete", cfg.steps - 1, cfg.steps)
    tracker.log_final(record)
    tracker.log_plots(run_dir)
    print_bluf(cfg, run.state, record, run_dir, ck.provenance()["command"])
    first, last = student_hacks(run.state.rows[:3]), student_hacks(run.state.rows[-3:])
    print(f"{cfg.preset_name} ok: {run_dir} arm={cfg.arm} hack_s_start={first} hack_s_end={last} "
          f"hack_deploy={record['hack_deploy']:.3f} solve_deploy={record['solve_deploy']:.3f} "
          f"wall={time.time() - t_start:.0f}s")
    return 0


def student_hacks(rows: list[dict]) -> str:
    """Student rollouts exploited over some rows, as 'n/N' (the run's one-line summary)."""
    return f"{sum(r['hack_s'][0] for r in rows)}/{sum(r['hack_s'][1] for r in rows)}"


def prepare(cfg: Config) -> tuple[Inputs, Path]:
    """Cheap checks first: a bad knob, pool, data path or resume fails before any folder or model."""
    cfg.validate()
    inp = load_inputs(cfg)
    return inp, ck.make_run_dir(cfg)


def main(cfg: Config) -> int:
    return run(cfg, *prepare(cfg))


def run(cfg: Config, inp: Inputs, run_dir: Path) -> int:
    """Log set-up, config and status files, then `_train`; an abnormal end is recorded in status.json."""
    t_start = time.time()
    setup_logging(run_dir / "train.log", use_tqdm=sys.stdout.isatty())
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    torch.manual_seed(cfg.seed)
    logger.info(f"run folder: {run_dir}")
    logger.info(f"preset={cfg.preset_name} arm={cfg.arm} model={cfg.model} steps={cfg.steps} G={cfg.group} "
                f"P={cfg.prompts_per_step} max_new={cfg.max_new} beta={cfg.beta} seed={cfg.seed} device={device}")
    ck.write_start(run_dir, cfg)

    def on_sigterm(signum, frame):  # pueue kill / scancel / timeout: record it, then stop
        raise Terminated(f"signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with make_tracker(cfg, run_dir) as tracker:
            tracker.start(cfg.to_dict(), ck.provenance())
            return _train(cfg, inp, run_dir, device, t_start, tracker)
    except TrainingDiverged as e:
        ck.mark_ended(run_dir, "diverged", cfg.steps, str(e))
        logger.error(str(e))
        return 3
    except (Terminated, KeyboardInterrupt) as e:
        ck.mark_ended(run_dir, "killed", cfg.steps, f"{type(e).__name__}: {e}")
        logger.error(f"stopped by {type(e).__name__}; resume with --resume {run_dir}")
        return 143
    except BaseException as e:
        ck.mark_ended(run_dir, "failed", cfg.steps, f"{type(e).__name__}: {e}")
        raise
    finally:
        signal.signal(signal.SIGTERM, old_handler)


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
