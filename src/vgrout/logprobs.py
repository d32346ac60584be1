"""Per-token log-probs of completions under the model: the policy (with grad) and the KL
reference (the same model with the adapter zeroed, no grad).

Both run the decoder on right-padded [B, plen + Lc] ids (padding sits after each row's
completion, so causal attention keeps it from real tokens; the caller masks padded positions out
of the loss) and take the hidden states at the completion positions. The LM head and the log
softmax then run in chunks of positions: each chunk's logits are formed, reduced to
log p(target) = logit[target] - logsumexp(logits) in fp32, and dropped; in backward a chunk's
logits are recomputed (activation checkpointing), so no [B, Lc, V] tensor lives across the
backward. Values equal the full log-softmax's (`grpo.per_token_logps`) to fp rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .adapter import zero_delta

CHUNK_BYTES = 256 * 2**20  # fp32 logits formed at once: positions per chunk = CHUNK_BYTES // (4 V)


def _head_logps(h: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """log softmax(h Wᵀ + b)[target] per row, in fp32: h [N, H], targets [N] -> [N]."""
    logits = F.linear(h, weight, bias).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def head_logprobs(hidden: Tensor, targets: Tensor, head: nn.Linear, *, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """log p(targets) under the LM head for hidden states [B, T, H] -> [B, T] fp32, chunk by chunk.

    Invariant: equals `grpo.per_token_logps(head(hidden), targets)` (to fp rounding), values and
    gradients, while at most one chunk of fp32 logits exists at a time, forward or backward.
    """
    B, T, H = hidden.shape
    flat_h, flat_t = hidden.reshape(B * T, H), targets.reshape(B * T)
    rows = max(1, chunk_bytes // (4 * head.weight.shape[0]))
    grad = torch.is_grad_enabled() and hidden.requires_grad
    out = []
    for s in range(0, B * T, rows):
        args = (flat_h[s : s + rows], flat_t[s : s + rows], head.weight, head.bias)
        out.append(checkpoint(_head_logps, *args, use_reentrant=False) if grad else _head_logps(*args))
    return torch.cat(out).reshape(B, T)


def completion_logprobs(model: nn.Module, ids: Tensor, plen: int, *, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t >= plen: [B, L - plen] fp32 (differentiable)."""
    n_comp = ids.shape[1] - plen
    if plen < 1 or n_comp < 1:
        raise ValueError(f"completion start {plen} must lie in [1, {ids.shape[1]})")
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        raise NotImplementedError(f"logit soft-capping ({cap}) is not supported by the chunked log-probs")
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    return head_logprobs(hidden[:, plen - 1 : -1], ids[:, plen:], model.get_output_embeddings(),
                         chunk_bytes=chunk_bytes)


@torch.no_grad()
def reference_logprobs(model: nn.Module, knobs, ids: Tensor, plen: int) -> Tensor:
    """`completion_logprobs` under the base model (δS = δS_hack = 0, adapter bypassed), no grad.

    Invariant: with both knobs at zero it equals `completion_logprobs` of the adapted model.
    """
    with zero_delta(knobs):
        return completion_logprobs(model, ids, plen)
