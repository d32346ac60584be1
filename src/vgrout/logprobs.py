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

from collections.abc import Iterator
from contextlib import contextmanager

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
            t = targets[s : s + rows].unsqueeze(-1)
            at_t = logits.gather(-1, t)
            m = logits.amax(-1, keepdim=True)
            e = logits.sub_(m).exp_()  # exp(logit - max), in place: one exp pass serves lse and softmax
            z = e.sum(-1, keepdim=True)
            out[s : s + rows] = (at_t - m - z.log()).squeeze(-1)
            if jac is not None:
                p = e.div_(z)  # softmax
                p.scatter_add_(-1, t, torch.full_like(at_t, -1.0))  # softmax - onehot
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


def frozen_depth(model: nn.Module) -> int:
    """How many leading decoder blocks compute a function of the token ids alone: the blocks below the
    lowest one that holds a parameter with requires_grad (0 when the embeddings train; all of them when
    nothing trains). With `--adapt-top-layers N` that is every block but the top N."""
    dec = model.get_decoder()
    if any(p.requires_grad for p in dec.embed_tokens.parameters()):
        return 0
    return next((i for i, blk in enumerate(dec.layers) if any(p.requires_grad for p in blk.parameters())),
                len(dec.layers))


# Decoders whose forward treats `inputs_embeds` as the first block's input unchanged and gives every block
# the same mask (no per-index attention types), so a slice of their blocks can run on its own.
_SLICEABLE = frozenset({"llama", "qwen2", "qwen3"})


def _sliceable(model: nn.Module) -> bool:
    cfg = model.config
    return cfg.model_type in _SLICEABLE and len(set(getattr(cfg, "layer_types", None) or ["one"])) == 1


@contextmanager
def _only_blocks(dec: nn.Module, lo: int, hi: int, *, final_norm: bool) -> Iterator[None]:
    """Inside: `dec` runs decoder blocks [lo, hi) only, and its final norm only if `final_norm`
    (the modules themselves are untouched; the block list and norm are restored on exit)."""
    blocks, norm = dec.layers, dec.norm
    dec.layers = nn.ModuleList(list(blocks)[lo:hi])
    if not final_norm:
        dec.norm = nn.Identity()
    try:
        yield
    finally:
        dec.layers, dec.norm = blocks, norm


def _shared_prompt_hidden(model: nn.Module, ids: Tensor, plen: int, depth: int) -> Tensor:
    """Final hidden states of right-padded rows that share one prompt, with the `depth` frozen lower
    blocks run on the prompt once instead of once per row.

    The lower blocks hold no trainable parameter, so their output is a function of the ids alone:
    they run without grad, first on the prompt (one row, keeping its keys/values), then on every row's
    completion against that cache; the upper blocks then run with grad on the whole [B, L] sequence as
    usual. Invariant: equals the plain forward `model.get_decoder()(input_ids=ids)` to fp rounding,
    values and gradients (positions, causal attention and the blocks' inputs are the same)."""
    from transformers import DynamicCache

    dec, B = model.get_decoder(), ids.shape[0]
    with torch.no_grad(), _only_blocks(dec, 0, depth, final_norm=False):
        out = dec(input_ids=ids[:1, :plen], use_cache=True)
        kv = [(layer.keys.expand(B, -1, -1, -1), layer.values.expand(B, -1, -1, -1))
              for layer in out.past_key_values.layers[:depth]]
        cache = DynamicCache(ddp_cache_data=kv, config=model.config)
        h_comp = dec(input_ids=ids[:, plen:], past_key_values=cache, use_cache=True).last_hidden_state
        h = torch.cat([out.last_hidden_state.expand(B, -1, -1), h_comp], dim=1)
    with _only_blocks(dec, depth, len(dec.layers), final_norm=True):
        return dec(inputs_embeds=h, use_cache=False).last_hidden_state


def completion_logprobs(model: nn.Module, ids: Tensor, plen: int, *, chunk_bytes: int = CHUNK_BYTES,
                        share_prompt: bool = True) -> Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t >= plen: [B, L - plen] fp32 (differentiable).

    When several rows share one prompt and the lower blocks are frozen (`--adapt-top-layers`), those
    blocks see the prompt once (`_shared_prompt_hidden`, unless `share_prompt` is False); otherwise one
    plain forward. Both give the same values and gradients to fp rounding."""
    n_comp = ids.shape[1] - plen
    if plen < 1 or n_comp < 1:
        raise ValueError(f"completion start {plen} must lie in [1, {ids.shape[1]})")
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        raise NotImplementedError(f"logit soft-capping ({cap}) is not supported by the chunked log-probs")
    # one row shares nothing (the split would run three forwards for the work of one)
    depth = frozen_depth(model) if share_prompt and ids.shape[0] > 1 else 0
    if depth > 0 and _sliceable(model) and bool((ids[:, :plen] == ids[:1, :plen]).all()):
        hidden = _shared_prompt_hidden(model, ids, plen, depth)
    else:
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
