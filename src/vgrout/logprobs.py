"""Per-token log-probs of completions under the model: the policy (with grad) and the KL
reference (the same model with the adapter zeroed, no grad).

Both run the decoder on right-padded [B, plen + Lc] ids (padding sits after each row's
completion, so causal attention keeps it from real tokens; the caller masks padded positions out
of the loss) and take the hidden states at the completion positions. The LM head and the log
softmax then run in chunks of positions: each chunk's logits are formed, reduced to
log p(target) = logit[target] - logsumexp(logits) in fp32, and dropped. The head is frozen, so the
only gradient needed is the one for the hidden state, ∂ log p(t)/∂h = (onehot(t) - softmax) W: it is
formed per chunk in the forward and kept ([N, H], the size of the hidden states), so no [B, Lc, V]
tensor lives across the backward and no logits are recomputed. Values and gradients equal the full
log-softmax's (`grpo.per_token_logps`) to fp rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .adapter import zero_delta

CHUNK_BYTES = 64 * 2**20  # fp32 logits formed at once: positions per chunk = CHUNK_BYTES // (4 V)


def _head_logps(h: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """log softmax(h Wᵀ + b)[target] per row, in fp32: h [N, H], targets [N] -> [N]."""
    logits = F.linear(h, weight, bias).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class _FrozenHeadLogProbs(torch.autograd.Function):
    """log p(target) through a frozen LM head, chunk by chunk, with ∂/∂h formed in the forward.

    Invariant: backward returns exactly g ⊙ (onehot(t) − softmax(h Wᵀ + b)) W per row, the gradient
    of the log-softmax at the target, while forward never holds more than one chunk of logits.
    """

    @staticmethod
    def forward(ctx, h: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None, rows: int) -> Tensor:
        n = h.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        jac = torch.empty(n, h.shape[1], dtype=torch.float32, device=h.device) if ctx.needs_input_grad[0] else None
        w32 = weight.float()
        for s in range(0, n, rows):
            logits = F.linear(h[s : s + rows], weight, bias).float()
            t = targets[s : s + rows]
            lse = torch.logsumexp(logits, dim=-1)
            out[s : s + rows] = logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - lse
            if jac is not None:
                p = logits.sub_(lse.unsqueeze(-1)).exp_()  # softmax, in place of the logits
                p[torch.arange(p.shape[0], device=p.device), t] -= 1.0  # softmax - onehot
                jac[s : s + rows] = -(p @ w32)
        ctx.save_for_backward(jac)
        ctx.h_dtype = h.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (jac,) = ctx.saved_tensors
        return (grad_out.unsqueeze(-1) * jac).to(ctx.h_dtype), None, None, None, None


def head_logprobs(hidden: Tensor, targets: Tensor, head: nn.Linear, *, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """log p(targets) under the LM head for hidden states [B, T, H] -> [B, T] fp32, chunk by chunk.

    Invariant: equals `grpo.per_token_logps(head(hidden), targets)` (to fp rounding), values and
    gradients, while at most one chunk of fp32 logits exists at a time, forward or backward. A head
    that trains itself (not the case here: only the adapter trains) is handled by recomputing each
    chunk in backward (activation checkpointing) instead.
    """
    B, T, H = hidden.shape
    flat_h, flat_t = hidden.reshape(B * T, H), targets.reshape(B * T)
    rows = max(1, chunk_bytes // (4 * head.weight.shape[0]))
    head_trains = torch.is_grad_enabled() and (head.weight.requires_grad or
                                               (head.bias is not None and head.bias.requires_grad))
    if not head_trains:
        return _FrozenHeadLogProbs.apply(flat_h, flat_t, head.weight, head.bias, rows).reshape(B, T)
    out = [checkpoint(_head_logps, flat_h[s : s + rows], flat_t[s : s + rows], head.weight, head.bias,
                      use_reentrant=False) for s in range(0, B * T, rows)]
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
