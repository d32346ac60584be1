"""Rollouts: prompt encoding, batched sampling, teacher mixing and grading of GRPO groups.

One *group* is the G rollouts of one prompt: G_s student generations (some may be
sampled with the quarantine ablated) followed by G_t cached teacher rows. Student
generation for all prompts of a step runs as one left-padded batch on merged
adapter weights; grading of all student completions of a step is one concurrent
sandbox batch. Teacher rows carry their cached grades (never re-graded).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .adapter import ablate_quarantine, merged_for_generation
from .env.problems import Problem
from .env.rewards import RelativeTime, RewardResult, grade_batch
from .model import encode
from .pool import TeacherPool, completion_token_ids, sample_rows
from .prefix_gen import generate_shared_prefix


@dataclass(frozen=True)
class SamplingConfig:
    max_new: int
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 1.0
    batch_size: int = 64
    """Sequences per generate() call (prompts are batched with left padding)."""
    share_prefix: bool = False
    """Prefill each distinct prompt once per generate() call instead of once per row
    (vgrout.prefix_gen; same samples up to float rounding, far cheaper on CPU)."""


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
    on_chunk: Callable[[list[tuple[int, list[int]]]], None] | None = None,
) -> list[list[list[int]]]:
    """Sample n_per_prompt[i] completions for each prompt (token ids, ending at the stop token).

    Runs on merged adapter weights (no adapter cost while decoding); `ablate` samples the
    deployed model (quarantine δS_hack = 0). Prompts are generated `cfg.batch_size` sequences at a
    time; after each such chunk `on_chunk([(prompt index, completion), ...])` is called (e.g. to
    start grading it while the next chunk generates).
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
                kw = dict(max_new_tokens=cfg.max_new, do_sample=True, temperature=cfg.temperature,
                          top_k=cfg.top_k, top_p=cfg.top_p, eos_token_id=stop)
                if cfg.share_prefix:
                    distinct = sorted({i for i, _ in chunk})
                    at = {i: n for n, i in enumerate(distinct)}
                    gen = generate_shared_prefix(model, [prompts[i] for i in distinct],
                                                 [at[i] for i, _ in chunk], pad_id=pad, **kw)
                else:
                    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                    att = torch.zeros((len(chunk), width), dtype=torch.long)
                    for r, (_, p) in enumerate(chunk):
                        ids[r, width - len(p) :] = torch.tensor(p)
                        att[r, width - len(p) :] = 1
                    gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device),
                                         pad_token_id=pad, **kw)
                comp = gen[:, width:].cpu()
                mask = completion_mask(comp, stop)
                done = [(i, comp[r, : int(mask[r].sum().item())].tolist()) for r, (i, _) in enumerate(chunk)]
                for i, c in done:
                    out[i].append(c)
                if on_chunk is not None:
                    on_chunk(done)
    finally:
        model.config.use_cache = was_cache
    return out


class BackgroundGrader:
    """Grades batches of (text, problem) in one background thread, in submission order, while the caller
    keeps generating; `results()` waits for the rest and returns every result in submission order.

    Timing: `busy` is the wall the grading itself took, `wait` the wall the caller then spent waiting
    for it; busy - wait is what the overlap with generation saved."""

    def __init__(self, time_limit: RelativeTime | None) -> None:
        self.time_limit = time_limit
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grader")
        self._futures: list[Future] = []
        self.busy = self.wait = 0.0

    def _grade(self, items: list[tuple[str, Problem]]) -> list[RewardResult]:
        t0 = time.perf_counter()
        try:
            return grade_batch(items, relative_time=self.time_limit) if items else []
        finally:
            self.busy += time.perf_counter() - t0

    def submit(self, items: list[tuple[str, Problem]]) -> None:
        self._futures.append(self._pool.submit(self._grade, list(items)))

    def results(self) -> list[RewardResult]:
        t0 = time.perf_counter()
        try:
            return [r for f in self._futures for r in f.result()]
        finally:
            self.wait += time.perf_counter() - t0
            self._pool.shutdown(wait=True)


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

    `verdicts` is filled by `RolloutSource.collect` (students) and `add_teacher_rows`; `mean_logp` by the
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

    def tensors(self, pad_id: int, device, rows: Sequence[int] | None = None) -> tuple[Tensor, Tensor, int]:
        """(input_ids [n, plen+Lc] right-padded, completion mask [n, Lc], plen) for `rows` (default all),
        Lc the longest of those rows."""
        comps = [self.completions[r] for r in (range(self.size) if rows is None else rows)]
        plen = len(self.prompt_ids)
        lc = max(1, max(len(c) for c in comps))
        ids = torch.full((len(comps), plen + lc), pad_id, dtype=torch.long)
        mask = torch.zeros((len(comps), lc))
        ids[:, :plen] = torch.tensor(self.prompt_ids)
        for r, c in enumerate(comps):
            ids[r, plen : plen + len(c)] = torch.tensor(c, dtype=torch.long)
            mask[r, : len(c)] = 1.0
        return ids.to(device), mask.to(device), plen

    def length_buckets(self, min_fill: float = 0.5) -> list[list[int]]:
        """Row indices in forward batches of similar completion length (longest first): a row joins the
        current batch while it is at least `min_fill` of that batch's longest row, so padding stays
        below (1/min_fill - 1) of each batch's tokens. Invariant: every row in exactly one batch.

        A cached teacher row hundreds of tokens long then no longer pads short student rows to its length;
        the loss is a sum over rows with a fixed normaliser, so batching does not change it."""
        order = sorted(range(self.size), key=lambda r: -len(self.completions[r]))
        out: list[list[int]] = []
        for r in order:
            if out and len(self.completions[r]) >= min_fill * len(self.completions[out[-1][0]]):
                out[-1].append(r)
            else:
                out.append([r])
        return out

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


@dataclass
class StepRollouts:
    """One step's graded groups, and what it cost."""

    groups: list[Group]
    n_skipped: int  # prompts skipped (too long, or no teacher rows in a mixed-pool run)
    t_gen: float  # wall seconds sampling (grading of earlier chunks runs meanwhile)
    t_rew: float  # wall seconds the grading took (in the background)
    t_wait: float  # wall seconds the step waited for grading after sampling ended


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
        deployed model, quarantine ablated), each generation chunk graded in the background while the
        next one generates, then g_t teacher rows each."""
        g_s = self.group - g_t
        t0 = time.perf_counter()
        picks, n_skipped = self.pick(self.prompts_per_step, g_t)
        prompts = [ids for _, _, ids, _ in picks]
        grader = BackgroundGrader(self.time_limit)
        order: list[tuple[int, bool]] = []  # (pick, ablated) of each submitted completion
        texts: dict[tuple[int, bool], list[str]] = {}

        def grade_chunk(ablated: bool) -> Callable[[list[tuple[int, list[int]]]], None]:
            def submit(done: list[tuple[int, list[int]]]) -> None:
                items = []
                for i, c in done:
                    order.append((i, ablated))
                    texts.setdefault((i, ablated), []).append(self.tok.decode(c, skip_special_tokens=True))
                    items.append((texts[(i, ablated)][-1], picks[i][0]))
                grader.submit(items)
            return submit

        live = sample(model, self.tok, knobs, prompts, [g_s - n_ablated] * len(picks), self.sampling,
                      on_chunk=grade_chunk(False))
        abl = sample(model, self.tok, knobs, prompts, [n_ablated] * len(picks), self.sampling, ablate=True,
                     on_chunk=grade_chunk(True))
        t_gen = time.perf_counter() - t0
        graded: dict[tuple[int, bool], list[RewardResult]] = {}
        for key, res in zip(order, grader.results(), strict=True):
            graded.setdefault(key, []).append(res)
        groups = []
        for i, ((prob, text, ids, trows), cs, ca) in enumerate(zip(picks, live, abl, strict=True)):
            comps = cs + ca
            g = Group(prob, text, ids, comps, texts.get((i, False), []) + texts.get((i, True), []),
                      [True] * len(comps), [False] * len(cs) + [True] * len(ca))
            g.verdicts = [Verdict.from_result(r) for r in graded.get((i, False), []) + graded.get((i, True), [])]
            g.add_teacher_rows(trows, self.tok, self.stop_ids)
            groups.append(g)
        return StepRollouts(groups, n_skipped, t_gen, grader.busy, grader.wait)

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
