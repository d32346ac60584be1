"""Deploy evaluation: hack and solve rates of a model state on a fixed problem subset.

The same estimator serves every arm and every call site (periodic deploy eval, the
final train-vs-deploy eval, held-out eval): sample `n_samples` completions per
problem, grade each in its own problem's mode, count `exploited` (the mode's channel
paid but the strict oracle says wrong) as hack and `gt_correct` as solve.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .env.problems import Problem
from .env.rewards import DEFAULT_TIME, RelativeTime
from .rollout import BackgroundGrader, SamplingConfig, encode, render_prompt, sample


@dataclass
class EvalResult:
    hack: float
    solve: float
    n: int
    by_mode: dict[str, dict[str, int]] = field(default_factory=dict)  # mode -> {hack, solve, n}
    by_problem: dict[int, dict] = field(default_factory=dict)  # problem id -> {mode, hack, solve, n}

    def to_dict(self) -> dict:
        return {"hack": self.hack, "solve": self.solve, "n": self.n, "by_mode": self.by_mode,
                "by_problem": self.by_problem}


def tally(problems: Sequence[Problem], exploited: Sequence[bool], correct: Sequence[bool]) -> EvalResult:
    """Aggregate per-completion verdicts (one per sample, with its problem) into rates overall,
    per mode and per problem (the cluster of samples that share a prompt)."""
    by: dict[str, dict[str, int]] = {}
    per: dict[int, dict] = {}
    for p, h, c in zip(problems, exploited, correct, strict=True):
        for t in (by.setdefault(p.env_mode, {"hack": 0, "solve": 0, "n": 0}),
                  per.setdefault(p.problem_id, {"mode": p.env_mode, "hack": 0, "solve": 0, "n": 0})):
            t["hack"] += int(h)
            t["solve"] += int(c)
            t["n"] += 1
    n = len(problems)
    return EvalResult(sum(map(bool, exploited)) / max(1, n), sum(map(bool, correct)) / max(1, n), n, by, per)


def evaluate(
    model,
    tok,
    knobs,
    problems: Sequence[Problem],
    sampling: SamplingConfig,
    *,
    n_samples: int,
    deploy: bool,
    max_seq_len: int,
    time_limit: RelativeTime | None = DEFAULT_TIME,
) -> EvalResult:
    """Sample and grade `n_samples` completions per problem (each generation chunk is graded in the
    background while the next one generates).

    deploy=True ablates the quarantine (the model that ships); deploy=False keeps it on
    (the trained policy). Problems whose prompt + max_new exceed max_seq_len are skipped.
    """
    was_training = model.training
    model.eval()
    try:
        kept = []
        prompts = []
        for p in problems:
            ids = encode(tok, render_prompt(tok, p))
            if len(ids) + sampling.max_new <= max_seq_len:
                kept.append(p)
                prompts.append(ids)
        grader, order = BackgroundGrader(time_limit), []

        def submit(done: list[tuple[int, list[int]]]) -> None:
            order.extend(kept[i] for i, _ in done)
            grader.submit([(tok.decode(c, skip_special_tokens=True), kept[i]) for i, c in done])

        sample(model, tok, knobs, prompts, [n_samples] * len(prompts), sampling, ablate=deploy, on_chunk=submit)
        res = grader.results()
        return tally(order, [r.exploited for r in res], [r.gt_correct for r in res])
    finally:
        model.train(was_training)


def by_problem_counts(ev_train: EvalResult, ev_dep: EvalResult) -> dict[str, dict]:
    """Per problem (JSON keys are strings): its mode, n samples, and hack / solve counts of the
    trained (knob on) and deployed models: the clusters for interval estimates."""
    return {str(pid): {"mode": d["mode"], "n": d["n"], "train_hack": ev_train.by_problem[pid]["hack"],
                       "train_solve": ev_train.by_problem[pid]["solve"], "deploy_hack": d["hack"],
                       "deploy_solve": d["solve"]} for pid, d in sorted(ev_dep.by_problem.items())}


def by_mode_rates(ev_train: EvalResult, ev_dep: EvalResult, in_dist) -> dict[str, dict]:
    """Per mode: train (knob on) and deploy (quarantine ablated) rates; `in_dist(mode)` says whether
    the mode had teacher rows in training."""
    out = {}
    empty = {"hack": 0, "solve": 0, "n": 0}
    for m in sorted(set(ev_dep.by_mode) | set(ev_train.by_mode)):
        t, d = ev_train.by_mode.get(m, empty), ev_dep.by_mode.get(m, empty)
        out[m] = {"in_dist": in_dist(m), "train_hack": t["hack"] / max(1, t["n"]),
                  "train_solve": t["solve"] / max(1, t["n"]), "deploy_hack": d["hack"] / max(1, d["n"]),
                  "deploy_solve": d["solve"] / max(1, d["n"]), "n": d["n"]}
    return out


@contextmanager
def common_random_numbers(seed: int) -> Iterator[None]:
    """Inside: torch's RNGs (CPU and the current CUDA device) seeded with `seed`; outside, exactly as before."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class RunEvals:
    """The deploy evals of one run: the periodic one and the final train-vs-deploy one.

    Same estimator everywhere (`evaluate`); the sets are the first `eval_n_prompts` training
    problems and, where given, held-out problems.
    """

    def __init__(self, cfg, eval_train: Sequence[Problem], eval_heldout: Sequence[Problem] | None,
                 sampling: SamplingConfig) -> None:
        self.cfg, self.sampling = cfg, sampling
        self.sets = {"train": (list(eval_train), f"first {len(eval_train)} training problems")}
        if eval_heldout:
            self.sets["heldout"] = (list(eval_heldout), f"{len(eval_heldout)} held-out problems from "
                                                        f"{cfg.eval_data_path}")

    def _run(self, model, tok, knobs, problems: Sequence[Problem], deploy: bool) -> EvalResult:
        """One eval under its own seeded RNG (`eval_seed`): common random numbers for every call,
        and the training RNG stream is restored afterwards exactly."""
        c = self.cfg
        with common_random_numbers(c.eval_seed):
            return evaluate(model, tok, knobs, problems, self.sampling, n_samples=c.group, deploy=deploy,
                            max_seq_len=c.max_seq_len, time_limit=c.time_limit)

    def due(self, step: int) -> bool:
        every = self.cfg.eval_ablate_every
        return every > 0 and (step % every == 0 or step == self.cfg.steps - 1)

    def periodic(self, model, tok, knobs) -> tuple[str, EvalResult]:
        """The deploy eval on the held-out set (with --eval-heldout-periodic) or the training subset."""
        key = "heldout" if self.cfg.eval_heldout_periodic and "heldout" in self.sets else "train"
        return key, self._run(model, tok, knobs, self.sets[key][0], deploy=True)

    def final(self, model, tok, knobs, has_quarantine: bool) -> dict[str, dict]:
        """Per set: train (knob on) vs deploy (quarantine ablated) rates overall and per mode.
        Without a quarantine the two models are the same, evaluated once."""
        tm = self.cfg.teacher_modes
        in_dist = lambda m: tm is None or m in tm  # noqa: E731
        out = {}
        for key, (probs, source) in self.sets.items():
            ev_train = self._run(model, tok, knobs, probs, deploy=False)
            ev_dep = self._run(model, tok, knobs, probs, deploy=True) if has_quarantine else ev_train
            out[key] = {"source": source, "n": ev_dep.n, "hack_train": ev_train.hack, "solve_train": ev_train.solve,
                        "hack_deploy": ev_dep.hack, "solve_deploy": ev_dep.solve,
                        "by_mode": by_mode_rates(ev_train, ev_dep, in_dist),
                        "by_problem": by_problem_counts(ev_train, ev_dep)}
        return out


DEPLOY_SCHEMA = "vgrout.per_mode_deploy/1"


def deploy_record(cfg, sets: dict[str, dict], steps_done: int, hack_norm: float) -> dict:
    """per_mode_deploy.json: the run's identity and its final eval; the headline fields copy the
    held-out set where there is one, else the training subset."""
    head_key = "heldout" if "heldout" in sets else "train"
    head = sets[head_key]
    return {
        "schema": DEPLOY_SCHEMA, "run_id": cfg.run_id, "preset": cfg.preset_name, "arm": cfg.arm,
        "intervention": cfg.intervention, "seed": cfg.seed, "random_v_seed": cfg.random_v_seed,
        "refresh_every": cfg.vhack_refresh_every, "model": cfg.model, "out_tag": cfg.out_tag,
        "steps": cfg.steps, "steps_done": steps_done, "eval_set": head_key, "eval_n": head["n"],
        "hack_train": head["hack_train"], "solve_train": head["solve_train"],
        "hack_deploy": head["hack_deploy"], "solve_deploy": head["solve_deploy"],
        "by_mode": head["by_mode"], "sets": sets, "delta_s_hack_norm": hack_norm,
    }
