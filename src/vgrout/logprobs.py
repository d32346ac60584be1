"""Per-token log-probs of completions under the model: the policy (with grad) and the KL
reference (the same model with the adapter zeroed, no grad).

Both run the model on right-padded [B, plen + Lc] ids and keep logits only for the completion
positions (`logits_to_keep`), then take log softmax at the targets with `grpo.per_token_logps`
(the one log-prob helper). Padding sits after each row's completion, so causal attention keeps it
from touching real tokens; the caller masks padded positions out of the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .adapter import zero_delta
from .grpo import per_token_logps


def completion_logprobs(model: nn.Module, ids: Tensor, plen: int) -> Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t >= plen: [B, L - plen] fp32 (differentiable)."""
    n_comp = ids.shape[1] - plen
    if plen < 1 or n_comp < 1:
        raise ValueError(f"completion start {plen} must lie in [1, {ids.shape[1]})")
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=n_comp + 1).logits[:, :-1]
    return per_token_logps(logits, ids[:, plen:])


@torch.no_grad()
def reference_logprobs(model: nn.Module, knobs, ids: Tensor, plen: int) -> Tensor:
    """`completion_logprobs` under the base model (δS = δS_hack = 0, adapter bypassed), no grad.

    Invariant: with both knobs at zero it equals `completion_logprobs` of the adapted model.
    """
    with zero_delta(knobs):
        return completion_logprobs(model, ids, plen)
