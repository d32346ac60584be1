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

from . import blocks, grpo
from . import checkpoint as ck
from . import metrics as mx
from .adapter import deployed_params, quarantine_norm, quarantine_params, save_adapter
from .arms import StepGrads, Vanilla
from .atomic import write_json_atomic
from .build import make_optimizer, wrap_adapter
from .config import Config, parse_cli
from .directions import RunDirections, run_pairs
from .env.modes import MODE_CODE
from .eval import RunEvals, deploy_record
from .inputs import Inputs, load_inputs
from .model import load_model_and_tokenizer, resolve_model, weights_digest
from .rollout import Group, RolloutSource, SamplingConfig, rollout_records
from .runstate import TrainState
from .tablelog import StepTable, print_bluf, setup_logging, step_columns
from .tracking import Tracker, make_tracker
from .update import apply_update, group_backward


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


# ─────────────────────────────────────────────── the step ──


def train_step(run: Run, step: int) -> tuple[dict, list[Group]]:
    """One optimizer step, phase by phase; returns the step's row and its graded groups."""
    cfg, state, times = run.cfg, run.state, {}
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    with mx.timed(times, "sec"):
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
        with mx.timed(times, "fb"):
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
    metrics = mx.rollout_metrics(ro.groups, sorted({p.env_mode for p in run.inp.problems}), cfg.half_a_codes)
    n_prev = sum(r["N"] for r in state.rows)
    return {"step": step, "ref_eq": (n_prev + metrics["N"]) / mx.REF_GENS_PER_STEP, **metrics, "loss": loss, **update,
            "refr": refr, **mx.eval_metrics(ev), "zv": n_zerovar, "skipped": ro.n_skipped, "split": acc.split,
            **times, "gpu_mem": torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda"
            else math.nan}, ro.groups


def record_step(run: Run, step: int, row: dict, groups: list[Group]) -> None:
    """Row and rollouts to disk, run tallies, tripwire, status."""
    state = run.state
    state.rows.append(row)
    ck.append_jsonl(run.run_dir / "rows.jsonl", [mx.row_json(row)])
    recs = rollout_records(step, groups)
    ck.append_jsonl(run.run_dir / "rollouts.jsonl", recs)
    state.track_modes(step, mx.mode_counts(groups))
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
    logger.info(f"{gens} generations/step = {gens / mx.REF_GENS_PER_STEP:.2f}x the benchmark's {mx.REF_GENS_PER_STEP}")
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
    first, last = mx.student_hacks(run.state.rows[:3]), mx.student_hacks(run.state.rows[-3:])
    print(f"{cfg.preset_name} ok: {run_dir} arm={cfg.arm} hack_s_start={first} hack_s_end={last} "
          f"hack_deploy={record['hack_deploy']:.3f} solve_deploy={record['solve_deploy']:.3f} "
          f"wall={time.time() - t_start:.0f}s")
    return 0


def prepare(cfg: Config) -> tuple[Inputs, Path, str | None]:
    """Cheap checks first: a bad knob, pool, data path, model path or resume (other config, other
    weights) fails before any folder is made or model loaded. Returns the inputs, the run folder
    and the digest of the model folder's weights (None for a hub name)."""
    cfg.validate()
    inp = load_inputs(cfg)
    weights = weights_digest(resolve_model(cfg.model))
    return inp, ck.make_run_dir(cfg, weights), weights


def main(cfg: Config) -> int:
    return run(cfg, *prepare(cfg))


def run(cfg: Config, inp: Inputs, run_dir: Path, model_weights: str | None) -> int:
    """Log set-up, config and status files (provenance with `model_weights`, the digest `prepare`
    took; None only for a hub model), then `_train`; an abnormal end is recorded in status.json."""
    t_start = time.time()
    setup_logging(run_dir / "train.log", use_tqdm=sys.stdout.isatty())
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    torch.manual_seed(cfg.seed)
    logger.info(f"run folder: {run_dir}")
    logger.info(f"preset={cfg.preset_name} arm={cfg.arm} model={cfg.model} steps={cfg.steps} G={cfg.group} "
                f"P={cfg.prompts_per_step} max_new={cfg.max_new} beta={cfg.beta} seed={cfg.seed} device={device}")
    prov = ck.provenance(model_weights)
    ck.write_start(run_dir, cfg, prov)

    def body() -> int:
        with make_tracker(cfg, run_dir) as tracker:
            tracker.start(cfg.to_dict(), prov)
            return _train(cfg, inp, run_dir, device, t_start, tracker)

    return ck.run_recorded(run_dir, cfg.steps, body)


def cli() -> None:
    """Command-line entry: input errors print one line (exit 2), not a traceback."""
    try:
        cfg = parse_cli()
        prepared = prepare(cfg)
    except (ValueError, OSError) as e:
        print(f"vgrout.train: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(cfg, *prepared))


if __name__ == "__main__":
    cli()
