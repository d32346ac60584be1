"""Sampling many completions of few prompts without re-encoding each prompt once per completion.

HF `generate` runs the prompt of every row of a batch through the model ("prefill"), so G
samples of one prompt pay G prefills of the same tokens. On a CPU with ~300-token prompts and
~100-token completions that prefill costs as much as the decoding. `generate_shared_prefix`
encodes each distinct prompt once (all but its last token, one unpadded forward per prompt),
lays the key/value cache out as the left-padded batch would hold it, and hands it to
`generate`, which then feeds only each row's last prompt token and decodes as usual.

Exact up to float rounding: each cached key/value is the one an unpadded forward of that
prompt computes (rotary positions 0..L-2, the same as a left-padded row's positions derived
from its attention mask), padded slots are masked out, and decoding is `generate` itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def prefix_cache(model, prompts: Sequence[Sequence[int]], rows: Sequence[int], width: int):
    """A DynamicCache holding, for batch row r, prompt `prompts[rows[r]]` minus its last token,
    left-padded to `width - 1` positions (padding slots zero; the attention mask hides them)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    per_prompt = []
    for p in prompts:
        if len(p) < 2:
            raise ValueError("generate_shared_prefix needs prompts of at least 2 tokens")
        out = model(input_ids=torch.tensor([list(p[:-1])], device=device), use_cache=True)
        cache = out.past_key_values
        per_prompt.append([(layer.keys, layer.values) for layer in cache.layers])
        del out
    n_layers = len(per_prompt[0])
    data = []
    for li in range(n_layers):
        ks, vs = [], []
        for i in rows:
            k, v = per_prompt[i][li]
            pad = width - 1 - k.shape[2]
            if pad:
                shape = (1, k.shape[1], pad, k.shape[3])
                k = torch.cat([k.new_zeros(shape), k], dim=2)
                v = torch.cat([v.new_zeros((1, v.shape[1], pad, v.shape[3])), v], dim=2)
            ks.append(k)
            vs.append(v)
        data.append((torch.cat(ks), torch.cat(vs)))
    return DynamicCache(ddp_cache_data=data, config=model.config)


def generate_shared_prefix(model, prompts: Sequence[Sequence[int]], rows: Sequence[int], *, pad_id: int,
                           **generate_kwargs) -> Tensor:
    """`model.generate` on the left-padded batch whose row r is `prompts[rows[r]]`, with every
    distinct prompt prefilled once. Returns generate's output ([B, width + new tokens])."""
    device = next(model.parameters()).device
    width = max(len(prompts[i]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        p = prompts[i]
        ids[r, width - len(p):] = torch.tensor(list(p))
        att[r, width - len(p):] = 1
    cache = prefix_cache(model, prompts, rows, width)
    return model.generate(input_ids=ids.to(device), attention_mask=att.to(device), past_key_values=cache,
                          pad_token_id=pad_id, **generate_kwargs)
