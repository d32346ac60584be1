"""SVD adapter: exact identities on real (tiny, random) Qwen3 models in fp32 on CPU."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn

from _tiny import random_qwen3
from vgrout import adapter as A
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
    assert trainable == {id(p) for p in A.knob_params(knobs) + A.hack_params(knobs)}
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


def test_delta_grad_matches_dense_materialised_weight(tmp_path):
    model, plain, knobs = _wrapped(tmp_path)
    _randomise(knobs, hack=True)
    ids, adv = _ids(3, 9), torch.tensor([1.0, -0.5, 0.25])
    _grpo_like_loss(model(input_ids=ids).logits, ids, adv).backward()

    dense = {name: _DenseRef(k) for name, k in knobs.items()}
    for name, ref in dense.items():
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, ref)
    _grpo_like_loss(plain(input_ids=ids).logits, ids, adv).backward()
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
    # wrap-time switch: every grad-enabled forward records, rollout dim = batch dim
    always = random_qwen3()
    knobs2 = A.wrap_model(always, "rand-qwen3", cache_root=tmp_path / "svd", per_rollout_grads=True)
    always(input_ids=ids).logits.sum().backward()
    for k in knobs2.values():
        assert k.per_rollout_grad.shape == (2, k.rank)
        torch.testing.assert_close(k.per_rollout_grad.sum(0), k.delta_S.grad, rtol=1e-6, atol=1e-9)


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
    mask = torch.ones_like(ids)
    start = 5
    ref = A.ref_logprobs_via_zero_delta(model, knobs, ids, mask, start)
    plain_lp = torch.log_softmax(_logits(plain, ids)[:, start - 1 : -1], -1)
    plain_lp = plain_lp.gather(-1, ids[:, start:, None]).squeeze(-1)
    assert ref.shape == (3, 12 - start) and not ref.requires_grad
    assert (ref - plain_lp).abs().max() <= 1e-5
    # the adapted model really differs, so this is not vacuous
    adapted = A.token_logprobs(_logits(model, ids)[:, start - 1 : -1], ids[:, start:])
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
    before = [p.clone() for p in A.knob_params(wider)]
    with pytest.raises(ValueError, match="rank differs"):
        A.load_adapter(path, wider, model_id="rand-qwen3")
    assert all(torch.equal(a, b) for a, b in zip(before, A.knob_params(wider), strict=True))
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
