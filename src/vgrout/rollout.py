"""Rollouts: prompt encoding, batched sampling, teacher mixing and grading of GRPO groups.

One *group* is the G rollouts of one prompt: G_s student generations (some may be
sampled with the quarantine ablated) followed by G_t cached teacher rows. Student
generation for all prompts of a step runs as one left-padded batch on merged
adapter weights; grading of all student completions of a step is one concurrent
sandbox batch. Teacher rows carry their cached grades (never re-graded).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .adapter import ablate_quarantine, merged_for_generation
from .env.problems import Problem
from .env.rewards import DEFAULT_TIME, RelativeTime, RewardResult, grade_batch
from .model import encode
from .pool import TeacherPool, completion_token_ids, sample_rows


@dataclass(frozen=True)
class SamplingConfig:
    max_new: int
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 1.0
    batch_size: int = 64
    """Sequences per generate() call (prompts are batched with left padding)."""


def render_prompt(tok, problem: Problem) -> str:
    """The chat-rendered prompt, non-thinking mode, ending with the assistant header."""
    return tok.apply_chat_template(
        list(problem.messages), tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


def eos_ids(tok) -> list[int]:
    """Token ids that end a completion: the chat end-of-turn first, then the tokenizer's eos/pad."""
    ids = []
    for t in ("<|im_end|>", tok.eos_token, "<|endoftext|>"):
        if t is None:
            continue
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0 and i != tok.unk_token_id and i not in ids:
            ids.append(i)
    return ids


def completion_mask(comp: Tensor, stop_ids: Sequence[int]) -> Tensor:
    """1.0 on completion tokens up to and including the first stop token, 0.0 after.

    Invariant: a row with no stop token is all ones (truncated at max_new).
    """
    is_stop = torch.zeros_like(comp, dtype=torch.bool)
    for s in stop_ids:
        is_stop |= comp == s
    # positions strictly after the first stop: cumulative count of stops before them > 0
    after = (is_stop.long().cumsum(1) - is_stop.long()) > 0
    return (~after).float()


@torch.no_grad()
def sample(
    model,
    tok,
    knobs,
    prompts: Sequence[list[int]],
    n_per_prompt: Sequence[int],
    cfg: SamplingConfig,
    *,
    ablate: bool = False,
) -> list[list[list[int]]]:
    """Sample n_per_prompt[i] completions for each prompt (token ids, ending at the stop token).

    Runs on merged adapter weights (no adapter cost while decoding); `ablate` samples the
    deployed model (quarantine δS_hack = 0).
    """
    stop = eos_ids(tok)
    pad = tok.pad_token_id
    jobs = [(i, p) for i, (p, n) in enumerate(zip(prompts, n_per_prompt, strict=True)) for _ in range(n)]
    out: list[list[list[int]]] = [[] for _ in prompts]
    if not jobs:
        return out
    device = next(model.parameters()).device
    was_cache = model.config.use_cache
    model.config.use_cache = True
    ctx = ablate_quarantine(knobs) if ablate else nullcontext()
    try:
        with ctx, merged_for_generation(knobs):
            for s in range(0, len(jobs), cfg.batch_size):
                chunk = jobs[s : s + cfg.batch_size]
                width = max(len(p) for _, p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                att = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, (_, p) in enumerate(chunk):
                    ids[r, width - len(p) :] = torch.tensor(p)
                    att[r, width - len(p) :] = 1
                gen = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=att.to(device),
                    max_new_tokens=cfg.max_new,
                    do_sample=True,
                    temperature=cfg.temperature,
                    top_k=cfg.top_k,
                    top_p=cfg.top_p,
                    pad_token_id=pad,
                    eos_token_id=stop,
                )
                comp = gen[:, width:].cpu()
                mask = completion_mask(comp, stop)
                for r, (i, _) in enumerate(chunk):
                    n = int(mask[r].sum().item())
                    out[i].append(comp[r, :n].tolist())
    finally:
        model.config.use_cache = was_cache
    return out


@dataclass(frozen=True)
class Verdict:
    """How one rollout was graded: the live grader's result, or a cached teacher row's labels.

    The single mapping from a grader result / pool row to what the loss and the metrics read.
    Detectors keep one name everywhere (`hacked_S`, `hacked_D`, `hacked_E`; see
    docs/environment.md): cached teacher rows carry no detector labels, so theirs are False.
    """

    reward: float
    gt_correct: bool
    exploited: bool
    format_ok: bool
    hacked_S: bool = False
    hacked_D: bool = False
    hacked_E: bool = False
    result: RewardResult | None = None  # the full grader result (student rows only)

    @classmethod
    def from_result(cls, r: RewardResult) -> Verdict:
        return cls(r.reward, r.gt_correct, r.exploited, r.format_ok, r.hacked_S, r.hacked_D, r.hacked_E, r)

    @classmethod
    def from_teacher_row(cls, row: dict) -> Verdict:
        """A cached pool row: its reward is used verbatim (never re-graded)."""
        return cls(float(row["reward"]), bool(row["gt_pass"]), bool(row["hacked"]), bool(row["fmt_ok"]))


@dataclass
class Group:
    """The G rollouts of one prompt, ready for the loss: students first, then teacher rows.

    `verdicts` is filled by `grade_groups` (students) and `add_teacher_rows`; `mean_logp` by the
    loss (NaN for a group skipped for zero reward variance).
    """

    problem: Problem
    prompt: str
    prompt_ids: list[int]
    completions: list[list[int]]
    texts: list[str]
    is_student: list[bool]
    is_ablated: list[bool]
    verdicts: list[Verdict] = field(default_factory=list)
    mean_logp: list[float] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.completions)

    def column(self, attr: str) -> list:
        """One verdict attribute per row, e.g. column("exploited")."""
        return [getattr(v, attr) for v in self.verdicts]

    @property
    def rewards(self) -> list[float]:
        return self.column("reward")

    def tensors(self, pad_id: int, device) -> tuple[Tensor, Tensor, int]:
        """(input_ids [G, plen+Lc] right-padded, completion mask [G, Lc], plen)."""
        plen = len(self.prompt_ids)
        lc = max(1, max(len(c) for c in self.completions))
        ids = torch.full((self.size, plen + lc), pad_id, dtype=torch.long)
        mask = torch.zeros((self.size, lc))
        ids[:, :plen] = torch.tensor(self.prompt_ids)
        for r, c in enumerate(self.completions):
            ids[r, plen : plen + len(c)] = torch.tensor(c, dtype=torch.long)
            mask[r, : len(c)] = 1.0
        return ids.to(device), mask.to(device), plen

    def add_teacher_rows(self, rows: Sequence[dict], tok, stop: Sequence[int]) -> None:
        """Append cached teacher rows (after grading): the live prompt + the cached completion."""
        if len(self.verdicts) != self.size:
            raise RuntimeError("grade the student rows before adding teacher rows")
        for r in rows:
            self.completions.append(completion_token_ids(r, tok, pad_id=tok.pad_token_id, eos_ids=stop))
            self.texts.append(r["completion"])
            self.is_student.append(False)
            self.is_ablated.append(False)
            self.verdicts.append(Verdict.from_teacher_row(r))


def grade_groups(
    groups: Sequence[Group],
    *,
    workers: int | None = None,
    time_limit: RelativeTime | None = DEFAULT_TIME,
) -> None:
    """Grade every (student) row of every group in one concurrent sandbox batch."""
    items = [(text, g.problem) for g in groups for text in g.texts]
    results = iter(grade_batch(items, workers=workers, relative_time=time_limit) if items else [])
    for g in groups:
        if g.verdicts:
            raise RuntimeError("grade_groups runs once, before teacher rows are added")
        g.verdicts = [Verdict.from_result(next(results)) for _ in g.texts]


@dataclass
class StepRollouts:
    """One step's graded groups, and what it cost."""

    groups: list[Group]
    n_skipped: int  # prompts skipped (too long, or no teacher rows in a mixed-pool run)
    t_gen: float  # seconds sampling
    t_rew: float  # seconds grading


class RolloutSource:
    """Picks each step's problems, samples the students, grades them and mixes in teacher rows.

    Owns the two seeded draws (problems: `seed`; teacher rows: `seed + 1`) and the per-problem
    prompt cache; `state_dict()` resumes both draws exactly.
    """

    def __init__(self, problems: Sequence[Problem], pool: TeacherPool | None, tok, sampling: SamplingConfig,
                 cfg) -> None:
        self.problems, self.pool, self.tok, self.sampling = list(problems), pool, tok, sampling
        self.prompts_per_step, self.group = cfg.prompts_per_step, cfg.group
        self.max_seq_len, self.time_limit = cfg.max_seq_len, cfg.time_limit
        # mixed-pool runs compare student vs teacher within a group: skip problems without teacher rows
        self.require_teacher = cfg.teacher_modes is None
        self.problem_rng = torch.Generator().manual_seed(cfg.seed)
        self.teacher_rng = torch.Generator().manual_seed(cfg.seed + 1)
        self.stop_ids = eos_ids(tok)
        self._encoded: dict[int, tuple[str, list[int]]] = {}

    def prompt(self, prob: Problem) -> tuple[str, list[int]]:
        """The rendered prompt and its ids (each problem is rendered and tokenised once)."""
        if prob.problem_id not in self._encoded:
            text = render_prompt(self.tok, prob)
            self._encoded[prob.problem_id] = (text, encode(self.tok, text))
        return self._encoded[prob.problem_id]

    def pick(self, n_prompts: int, g_t: int) -> tuple[list[tuple[Problem, str, list[int], list[dict]]], int]:
        """Draw `n_prompts` problems; keep those that fit and (if required) have teacher rows."""
        picks, n_skipped = [], 0
        for _ in range(n_prompts):
            prob = self.problems[int(torch.randint(0, len(self.problems), (1,), generator=self.problem_rng))]
            text, ids = self.prompt(prob)
            if len(ids) + self.sampling.max_new > self.max_seq_len:
                n_skipped += 1
                continue
            rows = self.pool.rows.get(prob.problem_id, []) if (self.pool is not None and g_t > 0) else []
            if g_t > 0 and not rows and self.require_teacher:
                n_skipped += 1
                continue
            picks.append((prob, text, ids, sample_rows(rows, g_t, self.teacher_rng) if rows else []))
        return picks, n_skipped

    def collect(self, model, knobs, g_t: int, n_ablated: int) -> StepRollouts:
        """The step's groups for P prompts: G - g_t students (n_ablated of them sampled from the
        deployed model, quarantine ablated), graded in one sandbox batch, then g_t teacher rows."""
        g_s = self.group - g_t
        t0 = time.perf_counter()
        picks, n_skipped = self.pick(self.prompts_per_step, g_t)
        prompts = [ids for _, _, ids, _ in picks]
        live = sample(model, self.tok, knobs, prompts, [g_s - n_ablated] * len(picks), self.sampling)
        abl = sample(model, self.tok, knobs, prompts, [n_ablated] * len(picks), self.sampling, ablate=True)
        groups = []
        for (prob, text, ids, _), cs, ca in zip(picks, live, abl, strict=True):
            comps = cs + ca
            groups.append(Group(prob, text, ids, comps, [self.tok.decode(c, skip_special_tokens=True) for c in comps],
                                [True] * len(comps), [False] * len(cs) + [True] * len(ca)))
        t_gen = time.perf_counter() - t0
        t1 = time.perf_counter()
        grade_groups(groups, time_limit=self.time_limit)
        t_rew = time.perf_counter() - t1
        for g, (_, _, _, trows) in zip(groups, picks, strict=True):
            g.add_teacher_rows(trows, self.tok, self.stop_ids)
        return StepRollouts(groups, n_skipped, t_gen, t_rew)

    def state_dict(self) -> dict:
        return {"problem_rng": self.problem_rng.get_state(), "teacher_rng": self.teacher_rng.get_state()}

    def load_state_dict(self, st: dict) -> None:
        self.problem_rng.set_state(st["problem_rng"])
        self.teacher_rng.set_state(st["teacher_rng"])


def rollout_records(step: int, groups: Sequence[Group]) -> list[dict]:
    """Every graded student completion of the step, with its full verdict (rollouts.jsonl)."""
    recs = []
    for p_idx, g in enumerate(groups):
        for gi, v in enumerate(g.verdicts):
            r = v.result
            if not g.is_student[gi] or r is None:
                continue
            recs.append({
                "step": step, "p_idx": p_idx, "gi": gi, "problem_id": g.problem.problem_id,
                "env_mode": g.problem.env_mode, "ablated": g.is_ablated[gi], "prompt": g.prompt,
                "reward": r.reward, "format_ok": r.format_ok, "can_compile": r.can_compile,
                "gt_pass": r.gt_pass, "gt_correct": r.gt_correct, "channel": r.channel, "passed": r.passed,
                "exploited": r.exploited, "mechanism": r.mechanism, "hacked_S": r.hacked_S,
                "hacked_D": r.hacked_D, "hacked_E": r.hacked_E, "text": g.texts[gi],
            })
    return recs
