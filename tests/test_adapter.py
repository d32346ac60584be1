"""SVD adapter: exact identities on real (tiny, random) Qwen3 models in fp32 on CPU."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from _tiny import random_qwen3
from vgrout import adapter as A
from vgrout.grpo import per_token_logps
from vgrout.logprobs import completion_logprobs, reference_logprobs
from vgrout.model import model_slug

VOCAB = 97


def _ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _wrapped(tmp_path: Path, seed: int = 0, model_id: str = "rand-qwen3", **kw):
    model = random_qwen3(seed=seed, **kw)
    plain = copy.deepcopy(model)
    knobs = A.wrap_model(model, model_id, cache_root=tmp_path / "svd")
    return model, plain, knobs


def _randomise(
    knobs, seed: int = 2, std: float = 0.3, hack: bool = True, zero_frac: float = 0.0
) -> None:
    """Random nonzero δS (and δS_hack); `zero_frac` of δS axes are left exactly 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k in knobs.values():
            d = torch.randn(k.rank, generator=g) * std
            if zero_frac:
                d[torch.rand(k.rank, generator=g) < zero_frac] = 0.0
            k.delta_S.copy_(d)
            if hack:
                k.delta_S_hack.copy_(torch.randn(k.rank, generator=g) * std)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _grpo_like_loss(logits: torch.Tensor, ids: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """A loss that is a sum of per-rollout terms: -Σ_b A_b Σ_t log p(token)."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(adv[:, None] * logp).sum()


class _DenseRef(nn.Module):
    """Reference Linear with an explicitly materialised W' = W + U diag(d) Vh (d a leaf)."""

    def __init__(self, knob: A.SVDKnob) -> None:
        super().__init__()
        self.W = knob.base.weight.detach().clone()
        self.b = None if knob.base.bias is None else knob.base.bias.detach().clone()
        self.U, self.Vh = knob.U.clone(), knob.Vh.clone()
        self.d = nn.Parameter(knob.scale().detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_prime = self.W + (self.U * self.d) @ self.Vh
        return F.linear(x, w_prime, self.b)


def test_wraps_only_block_linears_and_freezes_base(tmp_path):
    model, _, knobs = _wrapped(tmp_path)
    assert len(knobs) == 2 * 7
    assert all(".layers." in n for n in knobs)
    assert {n.rsplit(".", 1)[1] for n in knobs} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, A.SVDKnob)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in A.deployed_params(knobs) + A.quarantine_params(knobs)}
    k = knobs["model.layers.0.mlp.up_proj"]  # 32 -> 48: r = 32
    assert k.U.shape == (48, 32) and k.Vh.shape == (32, 32) and k.rank == 32
    assert k.delta_S.dtype == torch.float32 and torch.all(k.delta_S == 0)
    # the cached SVD reconstructs the weight
    w = k.base.weight
    assert _rel(k.U @ torch.diag(k.S) @ k.Vh, w) < 1e-5
    with pytest.raises(ValueError, match="already wrapped"):
        A.wrap_model(model, "rand-qwen3", cache_root=tmp_path / "svd")


def test_zero_knobs_give_the_unwrapped_model(tmp_path):
    model, plain, _ = _wrapped(tmp_path)
    ids = _ids(3, 11)
    assert (_logits(model, ids) - _logits(plain, ids)).abs().max() <= 1e-5


def _dense_backward(plain, knobs: dict, ids, adv) -> dict:
    """Swap every wrapped Linear of `plain` for its materialised dense reference, run the same loss
    backward, and return the references (their `.d.grad` is the reference gradient)."""
    dense = {name: _DenseRef(k) for name, k in knobs.items()}
    for name, ref in dense.items():
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, ref)
    _grpo_like_loss(plain(input_ids=ids).logits, ids, adv).backward()
    return dense



def test_delta_grad_matches_dense_materialised_weight(tmp_path):
    model, plain, knobs = _wrapped(tmp_path)
    _randomise(knobs, hack=True)
    ids, adv = _ids(3, 9), torch.tensor([1.0, -0.5, 0.25])
    _grpo_like_loss(model(input_ids=ids).logits, ids, adv).backward()

    dense = _dense_backward(plain, knobs, ids, adv)
    for name, k in knobs.items():
        g_ref = dense[name].d.grad
        assert g_ref.norm() > 0
        assert _rel(k.delta_S.grad, g_ref) <= 1e-5, name
        # δS_hack enters W' through the same sum, so it sees the same gradient
        torch.testing.assert_close(k.delta_S_hack.grad, k.delta_S.grad, rtol=0, atol=0)


@pytest.mark.parametrize("zero_frac", [0.5, 1.0])
def test_per_rollout_grads_are_exact(tmp_path, zero_frac):
    model, _, knobs = _wrapped(tmp_path)
    _randomise(knobs, hack=False, zero_frac=zero_frac)  # δS exactly 0 on (some / all) axes
    G = 4
    ids, adv = _ids(G, 10), torch.tensor([1.0, -1.0, 0.5, -0.5])
    with A.rollout_grads(knobs, G):
        _grpo_like_loss(model(input_ids=ids).logits, ids, adv).backward()
    per = {n: k.per_rollout_grad.clone() for n, k in knobs.items()}
    total = {n: k.delta_S.grad.clone() for n, k in knobs.items()}
    for n in knobs:
        assert per[n].shape == (G, knobs[n].rank)
        torch.testing.assert_close(per[n].sum(0), total[n], rtol=1e-6, atol=1e-9)

    zero_axes_checked = 0
    for b in range(G):
        model.zero_grad(set_to_none=True)
        _grpo_like_loss(
            model(input_ids=ids[b : b + 1]).logits, ids[b : b + 1], adv[b : b + 1]
        ).backward()
        for n, k in knobs.items():
            assert _rel(per[n][b], k.delta_S.grad) <= 1e-5, (b, n)
            on_zero = k.delta_S.detach() == 0
            if on_zero.any():
                assert per[n][b][on_zero].abs().max() > 0  # a real signal where δS = 0
                zero_axes_checked += 1
    assert zero_axes_checked > 0


def test_rollout_grads_off_by_default_and_checks_batch(tmp_path):
    model, _, knobs = _wrapped(tmp_path)
    ids = _ids(2, 6)
    model(input_ids=ids).logits.sum().backward()
    assert all(k.per_rollout_grad is None for k in knobs.values())
    with A.rollout_grads(knobs, 3), pytest.raises(ValueError, match="rollout"):
        model(input_ids=ids)
    # the context is the one switch: inside it records, and a backward after it no longer does
    model.zero_grad(set_to_none=True)
    with A.rollout_grads(knobs, 2):
        model(input_ids=ids).logits.sum().backward()
    for k in knobs.values():
        assert k.per_rollout_grad.shape == (2, k.rank)
        torch.testing.assert_close(k.per_rollout_grad.sum(0), k.delta_S.grad, rtol=1e-6, atol=1e-9)
        k.per_rollout_grad = None
    model(input_ids=ids).logits.sum().backward()
    assert all(k.per_rollout_grad is None for k in knobs.values())


def test_merged_generation_matches_and_restores_bit_exactly(tmp_path):
    model, plain, knobs = _wrapped(tmp_path)
    _randomise(knobs, hack=True)
    ids = _ids(2, 8)
    before = {n: k.base.weight.detach().clone() for n, k in knobs.items()}
    unmerged = _logits(model, ids)
    with A.merged_for_generation(knobs):
        merged = _logits(model, ids)
        # the merged model is the plain model with dense W' weights: no adapter path runs
        with torch.no_grad():
            for n, k in knobs.items():
                plain.get_submodule(n).weight.copy_(k.base.weight)
        torch.testing.assert_close(merged, _logits(plain, ids), rtol=0, atol=1e-6)
        with pytest.raises(RuntimeError, match="grad enabled"):
            model(input_ids=ids)
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (2, 11)
    assert (merged - unmerged).abs().max() <= 1e-4
    assert any(not torch.equal(before[n], plain.get_submodule(n).weight) for n in knobs)
    for _ in range(100):
        with A.merged_for_generation(knobs):
            pass
    for n, k in knobs.items():
        assert torch.equal(k.base.weight, before[n]), n
    assert torch.equal(_logits(model, ids), unmerged)


def test_merged_restores_on_exception(tmp_path):
    model, _, knobs = _wrapped(tmp_path)
    _randomise(knobs)
    before = {n: k.base.weight.detach().clone() for n, k in knobs.items()}
    with pytest.raises(KeyError), A.merged_for_generation(knobs):
        raise KeyError("boom")
    assert all(torch.equal(k.base.weight, before[n]) for n, k in knobs.items())
    assert not any(k._merged for k in knobs.values())


def test_ablate_quarantine_is_the_delta_only_model_and_restores(tmp_path):
    model, _, knobs = _wrapped(tmp_path)
    _randomise(knobs, hack=False)
    ids = _ids(2, 7)
    deploy = _logits(model, ids)  # δS only
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # now add a nonzero quarantine on top of the same δS
        for k in knobs.values():
            k.delta_S_hack.copy_(torch.randn(k.rank, generator=g) * 0.3)
    snap = {n: (k.delta_S.clone(), k.delta_S_hack.clone()) for n, k in knobs.items()}
    assert (_logits(model, ids) - deploy).abs().max() > 1e-3  # the quarantine matters
    with A.ablate_quarantine(knobs):
        assert all(torch.all(k.delta_S_hack == 0) for k in knobs.values())
        assert torch.equal(_logits(model, ids), deploy)
    with pytest.raises(ValueError), A.ablate_quarantine(knobs):
        raise ValueError("body failed")
    for n, k in knobs.items():
        assert torch.equal(k.delta_S, snap[n][0]) and torch.equal(k.delta_S_hack, snap[n][1])
    with A.merged_for_generation(knobs), pytest.raises(RuntimeError, match="before merging"):
        with A.ablate_quarantine(knobs):
            pass


def test_zero_delta_and_reference_logprobs(tmp_path):
    model, plain, knobs = _wrapped(tmp_path)
    _randomise(knobs, hack=True)
    snap = {n: (k.delta_S.clone(), k.delta_S_hack.clone()) for n, k in knobs.items()}
    ids = _ids(3, 12)
    start = 5
    ref = reference_logprobs(model, knobs, ids, start)
    plain_lp = torch.log_softmax(_logits(plain, ids)[:, start - 1 : -1], -1)
    plain_lp = plain_lp.gather(-1, ids[:, start:, None]).squeeze(-1)
    assert ref.shape == (3, 12 - start) and not ref.requires_grad
    assert (ref - plain_lp).abs().max() <= 1e-5
    # the adapted model really differs, so this is not vacuous
    adapted = completion_logprobs(model, ids, start)
    torch.testing.assert_close(adapted, per_token_logps(_logits(model, ids)[:, start - 1 : -1], ids[:, start:]))
    assert (adapted - plain_lp).abs().max() > 1e-3
    with pytest.raises(RuntimeError), A.zero_delta(knobs):
        assert all(torch.all(k.delta_S == 0) for k in knobs.values())
        raise RuntimeError("body failed")
    for n, k in knobs.items():
        assert torch.equal(k.delta_S, snap[n][0]) and torch.equal(k.delta_S_hack, snap[n][1])
        assert not k._bypass


def _capture_warnings():
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    return messages, sink


def test_svd_cache_reused_and_corruption_rebuilt(tmp_path):
    first = A.SVD_STATS.computed
    _, _, knobs = _wrapped(tmp_path)
    assert A.SVD_STATS.computed - first == len(knobs)

    computed, loaded = A.SVD_STATS.computed, A.SVD_STATS.loaded
    _, _, knobs2 = _wrapped(tmp_path)
    assert A.SVD_STATS.computed == computed  # no SVD on the second wrap
    assert A.SVD_STATS.loaded - loaded == len(knobs2)
    for n in knobs:
        assert torch.equal(knobs[n].U, knobs2[n].U) and torch.equal(knobs[n].S, knobs2[n].S)

    cache_dir = tmp_path / "svd" / model_slug("rand-qwen3")
    victim = cache_dir / "model.layers.1.mlp.down_proj.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    messages, sink = _capture_warnings()
    try:
        computed = A.SVD_STATS.computed
        _, _, knobs3 = _wrapped(tmp_path)
    finally:
        logger.remove(sink)
    assert A.SVD_STATS.computed - computed == 1
    assert any("down_proj" in m and "rebuilding" in m for m in messages)
    assert victim.stat().st_size == len(data)
    assert torch.equal(
        knobs3["model.layers.1.mlp.down_proj"].S, knobs["model.layers.1.mlp.down_proj"].S
    )
    assert not list(cache_dir.glob(".*tmp"))  # atomic writes leave no temp files

    # same model id, different weights: every entry's checksum mismatches -> rebuilt
    messages, sink = _capture_warnings()
    try:
        computed = A.SVD_STATS.computed
        _wrapped(tmp_path, seed=7)
    finally:
        logger.remove(sink)
    assert A.SVD_STATS.computed - computed == len(knobs)
    assert any("checksum" in m for m in messages)


def test_save_load_round_trip_and_mismatches(tmp_path):
    _, _, knobs = _wrapped(tmp_path)
    _randomise(knobs, hack=True)
    path = tmp_path / "ckpt" / "adapter.safetensors"
    A.save_adapter(path, knobs, model_id="rand-qwen3", include_hack=True, metadata={"step": "25"})
    A.save_adapter(tmp_path / "deploy.safetensors", knobs, model_id="rand-qwen3")
    assert [p.name for p in path.parent.iterdir()] == ["adapter.safetensors"]

    _, _, fresh = _wrapped(tmp_path)
    meta = A.load_adapter(path, fresh, model_id="rand-qwen3", include_hack=True)
    assert meta["step"] == "25" and meta["model"] == "rand-qwen3" and meta["dtype"] == "float32"
    for n in knobs:
        assert torch.equal(fresh[n].delta_S, knobs[n].delta_S)
        assert torch.equal(fresh[n].delta_S_hack, knobs[n].delta_S_hack)

    _, _, deploy = _wrapped(tmp_path)
    A.load_adapter(tmp_path / "deploy.safetensors", deploy, model_id="rand-qwen3")
    assert all(torch.all(k.delta_S_hack == 0) for k in deploy.values())
    assert all(torch.equal(deploy[n].delta_S, knobs[n].delta_S) for n in knobs)

    with pytest.raises(ValueError, match="no δS_hack"):
        A.load_adapter(
            tmp_path / "deploy.safetensors", deploy, model_id="rand-qwen3", include_hack=True
        )
    with pytest.raises(ValueError, match="other-model"):
        A.load_adapter(path, fresh, model_id="other-model")
    _, _, wider = _wrapped(tmp_path, model_id="wide", hidden_size=48, num_heads=4)
    before = [p.clone() for p in A.deployed_params(wider)]
    with pytest.raises(ValueError, match="rank differs"):
        A.load_adapter(path, wider, model_id="rand-qwen3")
    assert all(torch.equal(a, b) for a, b in zip(before, A.deployed_params(wider), strict=True))
    with pytest.raises(FileNotFoundError):
        A.load_adapter(tmp_path / "missing.safetensors", fresh, model_id="rand-qwen3")
    with pytest.raises(ValueError, match="reserved"):
        A.save_adapter(path, knobs, model_id="rand-qwen3", metadata={"model": "x"})


def test_merged_generation_with_an_all_negative_knob(tmp_path):
    """A knob whose δS + δS_hack is negative on every axis is merged, not skipped as 'zero'."""
    model, _, knobs = _wrapped(tmp_path)
    name = "model.layers.0.mlp.down_proj"
    with torch.no_grad():
        knobs[name].delta_S.fill_(-0.2)
        knobs[name].delta_S_hack.fill_(-0.1)
    ids = _ids(2, 8)
    unmerged = _logits(model, ids)
    before = knobs[name].base.weight.detach().clone()
    with A.merged_for_generation(knobs):
        merged_w = knobs[name].base.weight.detach().clone()
        merged = _logits(model, ids)
    torch.testing.assert_close(merged_w, before + knobs[name].delta_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert torch.equal(knobs[name].base.weight, before)
    # and the adapter path changed the output: the test is not vacuous
    with A.zero_delta(knobs):
        assert (_logits(model, ids) - unmerged).abs().max() > 1e-3


def test_zero_delta_zeroes_the_quarantine_too(tmp_path):
    """Inside zero_delta both knobs read 0 (δS_hack included) and the model is the base model."""
    model, plain, knobs = _wrapped(tmp_path)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for k in knobs.values():
            k.delta_S_hack.copy_(torch.randn(k.rank, generator=g) * 0.3)  # δS stays 0
    snap = {n: k.delta_S_hack.detach().clone() for n, k in knobs.items()}
    ids = _ids(2, 7)
    base = _logits(plain, ids)
    assert (_logits(model, ids) - base).abs().max() > 1e-3  # the quarantine alone matters
    with A.zero_delta(knobs):
        for k in knobs.values():
            assert torch.all(k.delta_S_hack == 0) and torch.all(k.delta_S == 0)
            assert float(k.delta_weight().abs().max()) == 0.0
        assert (_logits(model, ids) - base).abs().max() <= 1e-5
        # the adapter path is skipped, not run with zeros: nothing flows back to the knobs
        assert not model(input_ids=ids).logits.requires_grad
    assert all(torch.equal(k.delta_S_hack, snap[n]) for n, k in knobs.items())


# ── one knob on its own, dtypes, and what the model's state holds ─────────────────────────


def _knob(d_in: int = 4, d_out: int = 3, seed: int = 0) -> A.SVDKnob:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g))
        lin.bias.copy_(torch.randn(d_out, generator=g))
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    return A.SVDKnob("blk", lin, U, S, Vh)


def test_a_bare_knob_is_its_linear_until_moved():
    k = _knob()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    assert (k.in_features, k.out_features, k.rank) == (4, 3, 3) and "rank=3" in repr(k)
    assert k.weight is k.base.weight and k.bias is k.base.bias
    torch.testing.assert_close(k(x), k.base(x), rtol=0, atol=1e-6)
    assert k.per_rollout_grad is None
    k(x).sum().backward()
    assert k.per_rollout_grad is None  # no recording unless asked
    with torch.no_grad():
        k.delta_S.copy_(torch.tensor([0.5, -1.0, 2.0]))
    torch.testing.assert_close(k(x), F.linear(x, k.base.weight + k.delta_weight(), k.base.bias))
    U, S, Vh = torch.linalg.svd(k.base.weight.detach(), full_matrices=False)
    for bad in ((U[:, :2], S, Vh), (U, S, Vh[:, :3])):
        with pytest.raises(ValueError, match="SVD shapes"):
            A.SVDKnob("blk", k.base, *bad)


def test_flat_token_batches_split_into_rollouts():
    """A [tokens, d] input inside rollout_grads(n): rows are n equal runs of tokens."""
    k = _knob()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        k.delta_S.copy_(torch.tensor([0.3, 0.0, -0.2]))
    w = torch.tensor([1.0, -1.0, 2.0])
    with A.rollout_grads([k], 3):
        (k(x) @ w).sum().backward()
    h = x @ k.Vh.T  # [6, r]
    g_tok = (w @ k.U) * h  # ∂L/∂s per token
    torch.testing.assert_close(k.per_rollout_grad, g_tok.reshape(3, 2, 3).sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k.delta_S.grad, g_tok.sum(0), rtol=1e-5, atol=1e-6)
    with A.rollout_grads([k], 2), pytest.raises(ValueError, match="does not split"):
        k(x[:3])
    with A.rollout_grads([k], 4), pytest.raises(ValueError, match="does not split"):
        k(x)


def test_bf16_weights_keep_bf16_factors_and_fp32_knobs(tmp_path):
    model = random_qwen3().to(torch.bfloat16)
    knobs = A.wrap_model(model, "rand-qwen3-bf16", cache_root=tmp_path / "svd")
    k = knobs["model.layers.0.mlp.up_proj"]
    assert k.U.dtype == k.Vh.dtype == torch.bfloat16
    assert k.S.dtype == k.delta_S.dtype == k.delta_S_hack.dtype == torch.float32
    _randomise(knobs)
    ids = _ids(2, 6)
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert k.delta_S.grad.dtype == torch.float32 and float(k.delta_S.grad.abs().max()) > 0


def test_svd_factors_stay_out_of_the_model_state(tmp_path):
    model, _, knobs = _wrapped(tmp_path)
    keys = set(model.state_dict())
    assert not {k for k in keys if k.rsplit(".", 1)[-1] in ("U", "Vh", "S")}
    assert {f"{n}.delta_S" for n in knobs} <= keys and {f"{n}.delta_S_hack" for n in knobs} <= keys


def test_gradient_through_a_frozen_knob_reaches_earlier_knobs(tmp_path):
    """δS of layer 1 frozen (nonzero): layer 0's δS gradient still flows through layer 1's
    adapter path, exactly as through the dense W' = W + U diag(δS) Vh."""
    model, plain, knobs = _wrapped(tmp_path)
    _randomise(knobs, hack=False)
    for n, k in knobs.items():
        if ".layers.1." in n:
            k.delta_S.requires_grad_(False)
            k.delta_S_hack.requires_grad_(False)
    ids, adv = _ids(2, 7), torch.tensor([1.0, -0.5])
    _grpo_like_loss(model(input_ids=ids).logits, ids, adv).backward()
    dense = _dense_backward(plain, knobs, ids, adv)
    for name, k in knobs.items():
        if ".layers.0." in name:
            assert _rel(k.delta_S.grad, dense[name].d.grad) <= 1e-5, name
        else:
            assert k.delta_S.grad is None


def test_output_head_inside_a_block_is_not_wrapped(tmp_path):
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

        def get_output_embeddings(self) -> nn.Module:
            return self.layers[1].proj

    toy = Toy()
    knobs = A.wrap_model(toy, "toy", cache_root=tmp_path / "svd")
    assert list(knobs) == ["layers.0.proj"] and isinstance(toy.layers[0].proj, A.SVDKnob)
    with pytest.raises(ValueError, match="no nn.Linear"):
        A.wrap_model(nn.Sequential(nn.Linear(2, 2)), "flat", cache_root=tmp_path / "svd")


# ── SVD cache: on-disk format and every way an entry can be bad ───────────────────────────


def test_svd_cache_entry_in_the_documented_format_is_reused(tmp_path):
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    cache = tmp_path / "c"
    cache.mkdir()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    meta = {"schema": A.SVD_SCHEMA, "model": "m", "module": "blk", "shape": "[5, 3]",
            "checksum": A.weight_checksum(w)}
    save_file({"U": (2 * U).contiguous(), "S": S.contiguous(), "Vh": Vh.contiguous()},
              str(cache / "blk.safetensors"), metadata=meta)
    loaded = A.SVD_STATS.loaded
    got = A.svd_cached(w, "m", "blk", cache)
    assert A.SVD_STATS.loaded == loaded + 1 and torch.equal(got[0], 2 * U)  # served from disk
    assert len(A.weight_checksum(w)) == 32  # blake2b-128
    w2 = w.clone()
    w2[0, 0] += 1e-6
    assert A.weight_checksum(w2) != A.weight_checksum(w)


@pytest.mark.parametrize("bad", ["U", "S", "Vh", "S_nan", "Vh_nan", "model"])
def test_svd_cache_rebuilds_every_bad_entry(tmp_path, bad):
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    cache = tmp_path / "c"
    A.svd_cached(w, "m", "blk", cache)  # a good entry
    path = cache / "blk.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in ("U", "S", "Vh")}
    if bad in ("U", "S", "Vh"):
        t[bad] = t[bad][:-1].contiguous()  # one row short
    elif bad == "model":
        meta["model"] = "other"
    else:
        t[bad[:-4]][0] = float("nan")
    save_file(t, str(path), metadata=meta)
    rebuilt, computed = A.SVD_STATS.rebuilt, A.SVD_STATS.computed
    messages, sink = _capture_warnings()
    try:
        U, S, Vh = A.svd_cached(w, "m", "blk", cache)
    finally:
        logger.remove(sink)
    assert (A.SVD_STATS.rebuilt, A.SVD_STATS.computed) == (rebuilt + 1, computed + 1)
    assert any("blk" in m and "rebuilding" in m for m in messages)
    assert _rel(U @ torch.diag(S) @ Vh, w) < 1e-5


# ── reference log-probs and adapter files ─────────────────────────────────────────────────


def test_reference_logprobs_boundaries(tmp_path):
    model, plain, knobs = _wrapped(tmp_path)
    _randomise(knobs)
    ids = _ids(2, 6)
    for start in (1, 5):  # the first and the last admissible completion start
        ref = reference_logprobs(model, knobs, ids, start)
        want = per_token_logps(_logits(plain, ids)[:, start - 1 : -1], ids[:, start:])
        torch.testing.assert_close(ref, want, rtol=0, atol=1e-5)
    for start in (0, 6, 7):
        with pytest.raises(ValueError, match="completion start"):
            reference_logprobs(model, knobs, ids, start)


def test_adapter_files_are_validated_before_anything_is_copied(tmp_path):
    _, _, knobs = _wrapped(tmp_path)
    _randomise(knobs)
    path = tmp_path / "a.safetensors"
    A.save_adapter(path, knobs, model_id="rand-qwen3", include_hack=True)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = next(iter(knobs))
    _, _, fresh = _wrapped(tmp_path)
    before = [p.detach().clone() for p in A.deployed_params(fresh) + A.quarantine_params(fresh)]

    def refuse(t: dict, m: dict, match: str, **kw) -> None:
        bad = tmp_path / "bad.safetensors"
        save_file(t, str(bad), metadata=m)
        with pytest.raises(ValueError, match=match):
            A.load_adapter(bad, fresh, model_id="rand-qwen3", **kw)
        after = A.deployed_params(fresh) + A.quarantine_params(fresh)
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))

    refuse({k: v for k, v in tensors.items() if k != f"delta_S.{name}"}, meta, "missing, misshapen")
    refuse({**tensors, f"delta_S.{name}": tensors[f"delta_S.{name}"][:-1]}, meta, "misshapen")
    nan = tensors[f"delta_S_hack.{name}"].clone()
    nan[0] = float("nan")
    refuse({**tensors, f"delta_S_hack.{name}": nan}, meta, "non-finite", include_hack=True)
    refuse(tensors, {k: v for k, v in meta.items() if k != "shapes"}, "do not match")
    shapes = json.loads(meta["shapes"])
    shapes["model.layers.9.extra"] = 4
    del shapes[name]
    refuse(tensors, {**meta, "shapes": json.dumps(shapes)},
           rf"missing \['{name}'\], unexpected \['model.layers.9.extra'\], rank differs \[\]")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="adapter"):
        A.load_adapter(tmp_path / "junk.safetensors", fresh, model_id="rand-qwen3")
    with pytest.raises(TypeError, match="str -> str"):
        A.save_adapter(path, knobs, model_id="rand-qwen3", metadata={"step": 25})  # type: ignore[dict-item]


@pytest.mark.parametrize("head_trains", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 5, 10_000])
def test_chunked_head_logprobs_equal_the_full_log_softmax(tmp_path, chunk_rows, head_trains):
    """Values, δS gradients and per-rollout gradients of the chunked LM-head path equal the full
    [B, L, V] log-softmax path (`logits_to_keep` + per_token_logps) to fp rounding, both with the
    frozen head (gradient formed in the forward) and with a head that trains (checkpointed chunks)."""
    model, _, knobs = _wrapped(tmp_path)
    _randomise(knobs, hack=True)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(head_trains)
    G, plen = 3, 4
    ids = _ids(G, 11)
    adv = torch.tensor([1.0, -0.5, 2.0])
    vocab = model.get_output_embeddings().weight.shape[0]

    def run(chunked: bool):
        model.zero_grad(set_to_none=True)
        with A.rollout_grads(knobs, G):
            if chunked:
                lp = completion_logprobs(model, ids, plen, chunk_bytes=4 * vocab * chunk_rows)
            else:
                logits = model(input_ids=ids, logits_to_keep=ids.shape[1] - plen + 1).logits[:, :-1]
                lp = per_token_logps(logits, ids[:, plen:])
            (-(adv[:, None] * lp).sum()).backward()
        grads = {n: (k.delta_S.grad.clone(), k.per_rollout_grad.clone()) for n, k in knobs.items()}
        if head_trains:
            grads["head"] = (head.weight.grad.clone(), head.weight.grad.clone())
        return lp.detach(), grads

    lp_full, g_full = run(False)
    lp_chunk, g_chunk = run(True)
    torch.testing.assert_close(lp_chunk, lp_full, rtol=0, atol=1e-5)
    assert set(g_chunk) == set(g_full)
    for n in g_full:
        # atol: both fp32 paths sit ~3e-7 from the float64 truth (test_frozen_head_logprobs_match_float64)
        torch.testing.assert_close(g_chunk[n][0], g_full[n][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_chunk[n][1], g_full[n][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_frozen_head_logprobs_match_float64(rows):
    """The chunked frozen-head log-prob (one exp pass for logsumexp and softmax) equals the float64
    log-softmax at the target, value and ∂/∂h, to fp32 rounding, over the real 151,936 vocabulary."""
    from vgrout.logprobs import _FrozenHeadLogProbs

    g = torch.Generator().manual_seed(3)
    N, H, V = 16, 32, 151_936
    h = torch.randn(N, H, generator=g) * 3
    W = torch.randn(V, H, generator=g) * 0.05
    t = torch.randint(0, V, (N,), generator=g)
    w_out = torch.randn(N, generator=g)
    h64 = h.double().requires_grad_(True)
    ref = torch.log_softmax(h64 @ W.double().T, -1).gather(-1, t[:, None]).squeeze(-1)
    (w_out.double() * ref).sum().backward()
    h32 = h.clone().requires_grad_(True)
    lp = _FrozenHeadLogProbs.apply(h32, t, W, None, rows)
    (w_out * lp).sum().backward()
    torch.testing.assert_close(lp.double(), ref.detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(h32.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)
    assert (lp < 0).all()


def test_quarantine_energy_shares_exact():
    """quarantine_norm, quarantine_mass, grad_mass, snapshot and update_mass on two bare knobs
    with hand-set offsets, gradients and one optimizer-like change (exact sums of squares)."""
    k1, k2 = _knob(), _knob()
    assert A.quarantine_norm([k1, k2]) == 0.0 and A.quarantine_norm({"a": k1}) == 0.0
    with torch.no_grad():
        k1.delta_S.copy_(torch.tensor([1.0, 2.0, 0.0]))
        k1.delta_S_hack.copy_(torch.tensor([0.0, 3.0, 0.0]))
        k2.delta_S_hack.copy_(torch.tensor([4.0, 0.0, 0.0]))
    assert A.quarantine_norm([k1, k2]) == 5.0  # sqrt(3² + 4²): the deployed δS do not count
    assert A._sq([torch.tensor([1.0, 2.0]), None, torch.tensor([3.0])]) == 14.0
    assert A.quarantine_mass([torch.tensor([1.0, 2.0])], [torch.tensor([2.0]), None]) == 4 / 9
    assert A.quarantine_mass([None], [torch.tensor([0.5])]) == 1.0
    assert A.quarantine_mass([torch.tensor([0.5])], []) == 0.0
    assert math.isnan(A.quarantine_mass([torch.zeros(2)], [None]))
    k1.delta_S.grad = torch.tensor([1.0, 0.0, 0.0])
    k1.delta_S_hack.grad = torch.tensor([0.0, 1.0, 1.0])
    k2.delta_S.grad, k2.delta_S_hack.grad = torch.tensor([0.0, 0.0, 1.0]), None
    assert A.grad_mass([k1, k2]) == 2 / 4
    snap = A.snapshot({"a": k1, "b": k2})
    assert [t.tolist() for t in snap["dep"]] == [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]
    assert [t.tolist() for t in snap["quar"]] == [[0.0, 3.0, 0.0], [4.0, 0.0, 0.0]]
    with torch.no_grad():
        k1.delta_S.add_(torch.tensor([0.0, 0.0, 2.0]))  # the snapshot is a copy, not a view
        k2.delta_S_hack.sub_(torch.tensor([1.0, 0.0, 0.0]))
    assert snap["dep"][0].tolist() == [1.0, 2.0, 0.0] and snap["quar"][1].tolist() == [4.0, 0.0, 0.0]
    assert A.update_mass([k1, k2], snap) == 1 / 5  # moved: 2² deployed, 1² quarantine
    assert math.isnan(A.update_mass([k1, k2], A.snapshot([k1, k2])))  # nothing moved since


def test_load_adapter_names_the_file_kind_and_at_most_three_modules(tmp_path):
    saved = {f"blk{i}": _knob(seed=i) for i in range(5)}
    for i, k in enumerate(saved.values()):
        k.name = f"blk{i}"
    path = tmp_path / "a.safetensors"
    A.save_adapter(path, saved, model_id="m")
    with pytest.raises(FileNotFoundError, match=r"^adapter file .*nope\.safetensors does not exist"):
        A.load_adapter(tmp_path / "nope.safetensors", saved, model_id="m")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"not a readable safetensors adapter file"):
        A.load_adapter(tmp_path / "junk.safetensors", saved, model_id="m")
    with pytest.raises(ValueError, match=r"this adapter was made for model 'm', not 'x'"):
        A.load_adapter(path, saved, model_id="x")
    others = {f"oth{i}": _knob(seed=i) for i in range(4)}
    for name, k in others.items():
        k.name = name
    wider = {f"blk{i}": _knob(d_in=5, d_out=4, seed=i) for i in range(4)}
    for name, k in wider.items():
        k.name = name
    with pytest.raises(ValueError) as e:
        A.load_adapter(path, others, model_id="m")
    assert str(e.value).endswith("(missing ['oth0', 'oth1', 'oth2'], unexpected ['blk0', 'blk1', 'blk2'], "
                                 "rank differs [])")
    with pytest.raises(ValueError) as e:
        A.load_adapter(path, wider, model_id="m")
    assert str(e.value).endswith("(missing [], unexpected ['blk4'], rank differs ['blk0', 'blk1', 'blk2'])")


def test_top_layers_wraps_exactly_the_highest_blocks(tmp_path):
    """top_layers = N wraps the Linears of the last N blocks and no others; 0 and the layer count
    both wrap every block; more than the layer count, or < 0, is refused before anything is wrapped."""
    per_block = 7  # q, k, v, o, gate, up, down
    for top, layers in ((0, {0, 1, 2}), (1, {2}), (2, {1, 2}), (3, {0, 1, 2})):
        knobs = A.wrap_model(random_qwen3(num_layers=3), "rand-qwen3", cache_root=tmp_path / "svd", top_layers=top)
        assert {int(n.split("layers.")[1].split(".")[0]) for n in knobs} == layers, top
        assert len(knobs) == per_block * len(layers)
    for bad, msg in ((4, "top_layers=4 but the model has 3 layers"), (-1, "top_layers must be >= 0")):
        model = random_qwen3(num_layers=3)
        with pytest.raises(ValueError, match=msg):
            A.wrap_model(model, "rand-qwen3", cache_root=tmp_path / "svd", top_layers=bad)
        assert not any(isinstance(m, A.SVDKnob) for m in model.modules())


def test_per_rollout_recording_refuses_a_batch_that_is_not_one_row_per_rollout():
    """Inside rollout_grads(n): a flat batch whose rows do not split into n rollouts, and a
    [B, L, d] batch with B != n, raise; B == n records [n, r]; no_grad forwards never check."""
    k = _knob(d_in=4, d_out=3)
    g = torch.Generator().manual_seed(5)
    with A.rollout_grads([k], 2):
        with pytest.raises(ValueError, match=r"input batch \(5, 4\) does not split into 2 rollouts"):
            k(torch.randn(5, 4, generator=g))
        with pytest.raises(ValueError, match=r"batch of 4 sequences inside rollout_grads\(n_rollouts=2\)"):
            k(torch.randn(4, 3, 4, generator=g))
        with pytest.raises(ValueError, match="does not split into 2 rollouts"):
            k(torch.randn(1, 3, 4, generator=g))  # 3 rows of r: not 2 rollouts
        with pytest.raises(ValueError, match="batch of 1 sequences"):  # 4 rows of r split in 2; 1 sequence
            k(torch.randn(1, 4, 4, generator=g))
        with torch.no_grad():
            k(torch.randn(5, 4, generator=g))  # generation-time shapes are never checked
        k(torch.randn(2, 3, 4, generator=g)).sum().backward()
        assert k.per_rollout_grad.shape == (2, 3)
        k(torch.randn(4, 4, generator=g)).sum().backward()  # flat [n * T, d]: T = 2 rows per rollout
        assert k.per_rollout_grad.shape == (2, 3)


@pytest.mark.parametrize("top", [1, 2, 3])
def test_frozen_lower_blocks_see_a_group_prompt_once(tmp_path, monkeypatch, top):
    """With only the top blocks adapted, `completion_logprobs` runs the frozen lower blocks on the group's
    shared prompt once (`_shared_prompt_hidden`): values, δS gradients and per-rollout gradients equal the
    plain full forward's to fp rounding. Rows whose prompts differ take the plain path."""
    import vgrout.logprobs as LP

    model = random_qwen3(seed=0, num_layers=4)
    knobs = A.wrap_model(model, "rand-qwen3", cache_root=tmp_path / "svd", top_layers=top)
    assert LP.frozen_depth(model) == 4 - top
    _randomise(knobs, hack=True)
    depths = []
    real = LP._shared_prompt_hidden
    monkeypatch.setattr(LP, "_shared_prompt_hidden", lambda m, i, p, d: depths.append(d) or real(m, i, p, d))
    G, plen = 3, 5
    ids = _ids(G, 13)
    ids[:, :plen] = ids[0, :plen]
    mask = torch.ones(G, ids.shape[1] - plen)
    mask[1, 5:] = 0  # right padding after a shorter completion
    mask[2, 2:] = 0
    adv = torch.tensor([1.0, -0.5, 2.0])

    def run(split: bool):
        model.zero_grad(set_to_none=True)
        with A.rollout_grads(knobs, G):
            if split:
                lp = completion_logprobs(model, ids, plen)
            else:
                logits = model(input_ids=ids, logits_to_keep=ids.shape[1] - plen + 1).logits[:, :-1]
                lp = per_token_logps(logits, ids[:, plen:])
            (-(adv[:, None] * lp * mask).sum()).backward()
        return lp.detach(), {n: (k.delta_S.grad.clone(), k.per_rollout_grad.clone()) for n, k in knobs.items()}

    lp_full, g_full = run(False)
    lp_split, g_split = run(True)
    assert depths == [4 - top]
    with torch.no_grad():  # a single row has nothing to share: the plain forward, same values
        torch.testing.assert_close(completion_logprobs(model, ids[:1], plen), lp_full[:1], rtol=0, atol=1e-5)
    assert depths == [4 - top]
    torch.testing.assert_close(lp_split, lp_full, rtol=0, atol=1e-5)
    for n in g_full:
        assert g_full[n][0].abs().max() > 0
        torch.testing.assert_close(g_split[n][0], g_full[n][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_split[n][1], g_full[n][1], rtol=1e-5, atol=1e-6)
    # one row with another prompt: the plain forward, same values as the full path
    other = ids.clone()
    other[1, 0] = (other[1, 0] + 1) % VOCAB
    with torch.no_grad():
        lp_other = completion_logprobs(model, other, plen)
        logits = model(input_ids=other, logits_to_keep=other.shape[1] - plen + 1).logits[:, :-1]
    assert depths == [4 - top]
    torch.testing.assert_close(lp_other, per_token_logps(logits, other[:, plen:]), rtol=0, atol=1e-5)


def test_frozen_depth_counts_the_blocks_below_the_lowest_trainable_one(tmp_path):
    """frozen_depth: every block but the adapted top ones; 0 when the embeddings train; all blocks when
    nothing trains."""
    from vgrout.logprobs import frozen_depth

    model = random_qwen3(seed=0, num_layers=4)
    assert frozen_depth(model) == 0  # a fresh model: everything trains
    for p in model.parameters():
        p.requires_grad_(False)
    assert frozen_depth(model) == 4
    model.get_decoder().layers[2].mlp.up_proj.weight.requires_grad_(True)
    assert frozen_depth(model) == 2
    model.get_decoder().embed_tokens.weight.requires_grad_(True)
    assert frozen_depth(model) == 0
