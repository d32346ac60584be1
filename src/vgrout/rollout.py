"""Rollouts: prompt encoding, batched sampling, teacher mixing and grading of GRPO groups.

One *group* is the G rollouts of one prompt: G_s student generations (some may be
sampled with the quarantine ablated) followed by G_t cached teacher rows. Student
generation for all prompts of a step runs as one left-padded batch on merged
adapter weights; grading of all student completions of a step is one concurrent
sandbox batch. Teacher rows carry their cached grades (never re-graded).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .adapter import ablate_quarantine, merged_for_generation
from .env.problems import Problem
from .env.rewards import DEFAULT_TIME, RelativeTime, RewardResult, grade_batch
from .pool import completion_token_ids
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


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


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
                for r, (i, _) in enumerate(chunk):
                    n = int(mask[r].sum().item())
                    out[i].append(comp[r, :n].tolist())
    finally:
        model.config.use_cache = was_cache
    return out


@dataclass
class Group:
    """The G rollouts of one prompt, ready for the loss: students first, then teacher rows."""

    problem: Problem
    prompt: str
    prompt_ids: list[int]
    completions: list[list[int]]
    texts: list[str]
    is_student: list[bool]
    is_ablated: list[bool]
    rewards: list[float] = field(default_factory=list)
    gt_correct: list[bool] = field(default_factory=list)
    exploited: list[bool] = field(default_factory=list)
    format_ok: list[bool] = field(default_factory=list)
    flag_C: list[bool] = field(default_factory=list)
    flag_D: list[bool] = field(default_factory=list)
    flag_E: list[bool] = field(default_factory=list)
    results: list[RewardResult | None] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.completions)

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


def add_teacher_rows(group: Group, rows: Sequence[dict], tok, stop: Sequence[int]) -> None:
    """Append cached teacher rows: live prompt ids + the cached completion, cached grades."""
    for r in rows:
        ids = completion_token_ids(r, tok, pad_id=tok.pad_token_id, eos_ids=stop)
        group.completions.append(ids)
        group.texts.append(r["completion"])
        group.is_student.append(False)
        group.is_ablated.append(False)
        group.rewards.append(float(r["reward"]))
        group.gt_correct.append(bool(r["gt_pass"]))
        group.exploited.append(bool(r["hacked"]))
        group.format_ok.append(bool(r["fmt_ok"]))
        group.flag_C.append(False)
        group.flag_D.append(False)
        group.flag_E.append(False)
        group.results.append(None)


def grade_students(
    groups: Sequence[Group],
    *,
    workers: int | None = None,
    time_limit: RelativeTime | None = DEFAULT_TIME,
) -> None:
    """Grade every student completion of every group in one concurrent sandbox batch.

    Call before `add_teacher_rows`: the per-row verdict lists are filled in row order.
    """
    items, where = [], []
    for gi, g in enumerate(groups):
        for ri, s in enumerate(g.is_student):
            if s:
                items.append((g.texts[ri], g.problem))
                where.append((gi, ri))
    results = grade_batch(items, workers=workers, relative_time=time_limit) if items else []
    per_group: dict[int, list[RewardResult]] = {}
    for (gi, _), res in zip(where, results, strict=True):
        per_group.setdefault(gi, []).append(res)
    for gi, g in enumerate(groups):
        if g.results:
            raise RuntimeError("grade_students must run before teacher rows are added")
        rs = per_group.get(gi, [])
        g.rewards += [r.reward for r in rs]
        g.gt_correct += [r.gt_correct for r in rs]
        g.exploited += [r.exploited for r in rs]
        g.format_ok += [r.format_ok for r in rs]
        g.flag_C += [r.hacked for r in rs]
        g.flag_D += [r.hacked_wrong_tests for r in rs]
        g.flag_E += [r.hacked_loophole_used for r in rs]
        g.results += list(rs)
