"""Dr.GRPO math on tensors: per-token log-probs, group advantages, the clipped loss, K3 KL.

Pure functions of tensors (no modules, no state). Shapes: G rollouts of one prompt,
T completion tokens; `mask` is 1.0 on real completion tokens and 0.0 on padding.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def per_token_logps(logits: Float[Tensor, "G T V"], ids: Int[Tensor, "G T"]) -> Float[Tensor, "G T"]:
    """log softmax(logits)[ids] per position, computed in fp32.

    Invariant: equals `log_softmax(logits.float(), -1).gather(-1, ids)` but without
    materialising the full [G, T, V] log-softmax (logsumexp + gather only).
    """
    logits = logits.float()
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def group_advantages(rewards: Float[Tensor, "G"], *, unbiased: bool) -> Float[Tensor, "G"]:
    """A_b = r_b - mean(r) (Dr.GRPO); standard GRPO also divides by std(r) + 1e-4.

    Invariant: sum_b A_b = 0 (up to fp), so a group with equal rewards gets A = 0.
    """
    adv = rewards - rewards.mean()
    if not unbiased:
        adv = adv / (rewards.std() + 1e-4)
    return adv


def has_reward_variance(rewards: Float[Tensor, "G"], eps: float = 1e-4) -> bool:
    """False when every rollout got the same reward: the group carries no GRPO signal."""
    return bool((rewards.max() - rewards.min()).item() >= eps)


def k3_kl(logp: Float[Tensor, "G T"], ref_logp: Float[Tensor, "G T"]) -> Float[Tensor, "G T"]:
    """K3 estimator of KL(π || π_ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0.

    Invariant: non-negative, and exactly 0 where logp == ref_logp.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def token_losses(
    logp: Float[Tensor, "G T"],
    old_logp: Float[Tensor, "G T"],
    adv: Float[Tensor, "G"],
    *,
    clip: float,
    beta: float = 0.0,
    ref_logp: Float[Tensor, "G T"] | None = None,
) -> Float[Tensor, "G T"]:
    """PPO-clip policy-gradient loss per token (+ β·K3 KL when ref_logp is given).

    With a single inner step logp == old_logp in value, so the ratio is 1 and the
    gradient is the plain -A·∇logp; the clip form is kept for multi-step use.
    """
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(1)
    loss = -torch.min(ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a)
    if ref_logp is not None and beta > 0:
        loss = loss + beta * k3_kl(logp, ref_logp)
    return loss


def reduce_loss(
    tok_loss: Float[Tensor, "G T"],
    mask: Float[Tensor, "G T"],
    *,
    unbiased: bool,
    max_new: int,
    group: int,
    prompts_per_step: int,
    rows: Bool[Tensor, "G"] | None = None,
) -> Float[Tensor, ""]:
    """Scalar loss of one group's contribution to the step's accumulated gradient.

    Dr.GRPO (unbiased): sum of masked token losses / (G · max_new · P) — a constant
    normaliser, so no rollout is up-weighted for being short. Standard GRPO: each
    rollout's mean token loss, summed, / (G · P).
    `rows` restricts the sum to a subset of rollouts (the student/teacher split); the
    invariant reduce(rows=s) + reduce(rows=~s) == reduce(rows=None) holds exactly
    because both forms are sums over rollouts with a fixed denominator.
    """
    if unbiased:
        per_row = (tok_loss * mask).sum(1) / (group * max_new * prompts_per_step)
    else:
        per_row = (tok_loss * mask).sum(1) / mask.sum(1).clamp_min(1) / (group * prompts_per_step)
    if rows is not None:
        per_row = per_row * rows.to(per_row.dtype)
    return per_row.sum()


def masked_mean_per_row(x: Float[Tensor, "G T"], mask: Float[Tensor, "G T"]) -> Float[Tensor, "G"]:
    """Mean of x over each row's real tokens (0 for an empty row)."""
    return (x * mask).sum(1) / mask.sum(1).clamp_min(1)
