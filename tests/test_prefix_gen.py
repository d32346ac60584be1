"""Shared-prefix sampling: each distinct prompt prefilled once, the same decoding as HF generate."""

from __future__ import annotations

import pytest
import torch

from vgrout import model as M
from vgrout.adapter import wrap_model
from vgrout.prefix_gen import generate_shared_prefix, prefix_cache
from vgrout.rollout import SamplingConfig, sample


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok = M.load_model_and_tokenizer(str(M.build_tiny_qwen3()), "cpu")
    knobs = wrap_model(model, M.TINY_QWEN3, cache_root=tmp_path_factory.mktemp("svd"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k in knobs.values():
            k.delta_S.copy_(torch.randn(k.rank, generator=g) * 0.1)
    return model, tok, knobs


def _prompts(tok) -> list[list[int]]:
    texts = ["<|im_start|>user\nwrite a sort<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nsum two numbers, then print the result twice<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_greedy_decoding_and_scores_match_plain_generate(tiny):
    model, tok, _ = tiny
    prompts = _prompts(tok)
    rows = [0, 1, 1, 2, 0]  # prompts of different lengths, repeated, in any order
    width = max(len(prompts[i]) for i in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    att = torch.zeros_like(ids)
    for r, i in enumerate(rows):
        ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
        att[r, width - len(prompts[i]):] = 1
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    model.config.use_cache = True
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=att, pad_token_id=tok.pad_token_id, **kw)
        shared = generate_shared_prefix(model, prompts, rows, pad_id=tok.pad_token_id, **kw)
    model.config.use_cache = False
    assert torch.equal(plain.sequences, shared.sequences)
    for a, b in zip(plain.scores, shared.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_cache_holds_each_prompt_left_padded(tiny):
    model, tok, _ = tiny
    prompts = _prompts(tok)
    rows = [2, 1]
    width = max(len(p) for p in prompts)
    model.config.use_cache = True
    cache = prefix_cache(model, prompts, rows, width)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([prompts[2][:-1]]), use_cache=True).past_key_values
    model.config.use_cache = False
    k = cache.layers[0].keys
    n = len(prompts[2]) - 1
    assert k.shape[0] == 2 and k.shape[2] == width - 1
    assert torch.equal(k[0, :, -n:], alone.layers[0].keys[0]) and not k[0, :, :-n].any()
    with pytest.raises(ValueError, match="at least 2 tokens"):
        prefix_cache(model, [[5]], [0], 2)


def test_sample_with_shared_prefix_equals_plain_sampling(tiny):
    """top_k=1 makes sampling deterministic, so both paths must return the very same completions
    (on merged adapter weights, several prompts, several samples each, one chunk and several)."""
    model, tok, knobs = tiny
    prompts = _prompts(tok)
    for batch in (64, 4):
        cfg = SamplingConfig(max_new=5, top_k=1, batch_size=batch)
        plain = sample(model, tok, knobs, prompts, [3, 2, 1], cfg)
        shared = sample(model, tok, knobs, prompts, [3, 2, 1], SamplingConfig(**{**vars(cfg), "share_prefix": True}))
        assert shared == plain and [len(x) for x in shared] == [3, 2, 1]
