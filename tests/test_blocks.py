"""Block-split adapters (blocks.py) and v_act + the routeA gate (vact.py): exact invariants on tiny real
Qwen3 models in fp32 on CPU.

Most tests use a seeded random Qwen3 (vocab 97) with a character tokenizer and short synthetic pairs; the
scorda held-out test uses the offline tiny Qwen3 with the built-in pairs (decoder forwards only).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from _tiny import random_qwen3
from vgrout import blocks as B
from vgrout import proj
from vgrout import vact as VA
from vgrout.pairs import Pair

VOCAB = 97
R = 3  # per block; the random Qwen3's smallest Linear dim is 16


class CharTok:
    """A character tokenizer for the vocab-97 random Qwen3 (what `model.encode` needs)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [1 + ord(c) % (VOCAB - 1) for c in text]}


TOK = CharTok()


def _pairs(n: int = 8) -> list[Pair]:
    """Short pairs whose hack sides share a pattern the clean sides do not."""
    out = []
    for i in range(n):
        prompt = f"Q{i}: add {i} and {i + 3}; tests follow."
        hack = f"import sys\nsys.exit(0)  # {i}"
        clean = f"def f(a, b):\n    return a + b  # {i * 7}"
        out.append(Pair(f"p{i}", None, i, prompt, hack, clean))
    return out


def _ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _wrap(tmp_path: Path, init: str = "lora2r", *, r: int = R, seed: int = 0, model_seed: int = 0,
          top_layers: int = 0, n_heldout: int = 2):
    model = random_qwen3(seed=model_seed)
    plain = copy.deepcopy(model)
    calib = None
    if init in B.NEEDS_PAIRS:
        calib = B.resolve_calibration(model, TOK, _pairs(), model_id="rq3", out_dir=tmp_path / "calib",
                                      top_layers=top_layers)
    ads = B.wrap_blocks(model, "rq3", init=init, r=r, seed=seed, top_layers=top_layers, calibration=calib,
                        n_heldout=n_heldout, svd_cache_root=tmp_path / "svd")
    return model, plain, ads


def _perturb(ads, seed: int = 2, std: float = 0.2, blocks: tuple[str, ...] = ("dep", "quar")) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in ads.values():
            for k in blocks:
                for p in (getattr(a, f"a_{k}"), getattr(a, f"b_{k}")):
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _masks(*kinds: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = {"keep": (0, 0), "absorb": (1, 0), "route": (1, 1)}
    m, d = zip(*(table[k] for k in kinds), strict=True)
    return torch.tensor(m, dtype=torch.bool), torch.tensor(d, dtype=torch.bool)


def _rollout_loss(model, ids: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Σ_b A_b Σ_t log p(token): a sum of per-rollout terms, like the Dr.GRPO loss."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(adv[:, None] * logp).sum()


def _grads(ads, blocks=("dep", "quar")) -> dict[str, torch.Tensor]:
    out = {}
    for n, a in ads.items():
        for k in blocks:
            for t in ("a", "b"):
                p = getattr(a, f"{t}_{k}")
                out[f"{n}.{t}_{k}"] = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
    return out


def _zero_grad(ads) -> None:
    for a in ads.values():
        for p in a.parameters():
            p.grad = None


def _sq(gs: dict[str, torch.Tensor], block: str) -> float:
    return sum(float(g.pow(2).sum()) for k, g in gs.items() if k.endswith(f"_{block}"))


# ── wrapping and the net delta at init ──────────────────────────────────────────────────


@pytest.mark.parametrize("init", B.INITS)
def test_net_delta_is_exactly_zero_at_init(tmp_path, init):
    model, plain, ads = _wrap(tmp_path, init)
    ids = _ids(2, 20)
    assert torch.equal(_logits(model, ids), _logits(plain, ids))  # bit for bit, whatever the init
    for a in ads.values():
        assert torch.equal(a.A, a.A0) and torch.equal(a.B, a.B0)
        assert float(a.delta_weight().abs().max()) == 0.0
        assert a.A0.abs().sum() > 0 and a.B0.abs().sum() > 0  # the blocks are alive (h = A x != 0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{t}_{k}" for n in ads for t in ("a", "b") for k in ("dep", "quar")}
    assert len(B.deployed_params(ads)) == len(B.quarantine_params(ads)) == 2 * len(ads)


def test_wraps_the_block_linears_and_top_layers(tmp_path):
    model, _, ads = _wrap(tmp_path)
    assert list(ads) == [n for n, _ in B.target_linears(random_qwen3())]
    assert len(ads) == 14 and all(".layers." in n for n in ads)
    assert isinstance(model.lm_head, torch.nn.Linear)
    _, _, top = _wrap(tmp_path, top_layers=1)
    assert list(top) == [n for n in ads if ".layers.1." in n]
    for n in top:  # a module's Gaussian draw does not depend on which other modules are wrapped
        assert torch.equal(top[n].A0, ads[n].A0) and torch.equal(top[n].B0, ads[n].B0)
    with pytest.raises(ValueError, match="already wrapped"):
        B.wrap_blocks(model, "rq3", r=R)
    with pytest.raises(ValueError, match="top_layers=3"):
        B.target_linears(random_qwen3(), 3)


def test_wrap_refusals(tmp_path):
    with pytest.raises(ValueError, match="unknown block-adapter init"):
        B.wrap_blocks(random_qwen3(), "rq3", init="lora", r=R)
    with pytest.raises(ValueError, match=r"2r <= min\(d_out, d_in\) = 16.*use r <= 8"):
        B.wrap_blocks(random_qwen3(), "rq3", init="pissa", r=9, svd_cache_root=tmp_path)
    with pytest.raises(ValueError, match="needs contrastive pairs"):
        B.wrap_blocks(random_qwen3(), "rq3", init="scorda", r=R, svd_cache_root=tmp_path)
    model = random_qwen3()
    calib = B.resolve_calibration(model, TOK, _pairs(3), model_id="rq3", out_dir=tmp_path)
    with pytest.raises(ValueError, match="leave 0 to initialise from"):
        B.wrap_blocks(model, "rq3", init="corda", r=R, calibration=calib, n_heldout=3, svd_cache_root=tmp_path)
    B.wrap_blocks(random_qwen3(), "rq3", init="lora2r", r=9)  # Gaussian blocks have no rank limit


def test_forward_is_W_plus_BA_minus_B0A0_with_no_cross_terms(tmp_path):
    model, plain, ads = _wrap(tmp_path, "pissa")
    _perturb(ads)
    ref = copy.deepcopy(plain)
    with torch.no_grad():
        for n, a in ads.items():
            lin = ref.get_submodule(n)
            dense = a.B @ a.A - a.B0 @ a.A0
            blockwise = sum(a.B[:, s] @ a.A[s] - a.B0[:, s] @ a.A0[s] for s in (slice(0, R), slice(R, 2 * R)))
            torch.testing.assert_close(a.delta_weight(), dense, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(dense, blockwise, rtol=1e-5, atol=1e-6)  # B A splits into the blocks
            torch.testing.assert_close(a.delta_weight(("dep",)) + a.delta_weight(("quar",)), a.delta_weight())
            lin.weight += dense
    ids = _ids(2, 16)
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=1e-4, atol=1e-5)


# ── ablation, masks, block independence ─────────────────────────────────────────────────


def test_ablated_quarantine_is_the_deployed_only_model_and_restores(tmp_path):
    model, _, ads = _wrap(tmp_path, "scorda")
    _perturb(ads)
    deployed_only, _, ads2 = _wrap(tmp_path, "scorda")
    with torch.no_grad():
        for n, a in ads.items():
            ads2[n].a_dep.copy_(a.a_dep)
            ads2[n].b_dep.copy_(a.b_dep)
    ids = _ids(3, 18)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = _logits(model, ids)
    with B.ablate_quarantine(ads):
        assert B.quarantine_norm(ads) == 0.0
        abl = _logits(model, ids)
    assert torch.equal(abl, _logits(deployed_only, ids))  # exactly: the reset quarantine adds 0.0
    assert not torch.allclose(abl, full)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # restored bit for bit
    assert torch.equal(_logits(model, ids), full)
    with pytest.raises(KeyError), B.ablate_quarantine(ads):
        raise KeyError("boom")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_training_with_every_rollout_kept_is_the_deploy_model(tmp_path):
    """Forward and the deployed block's gradient under keep (0,0) equal those of the ablated model."""
    model, _, ads = _wrap(tmp_path, "lora2r")
    _perturb(ads)
    ids, adv = _ids(3, 14), torch.tensor([1.0, -0.5, -0.5])
    with B.ablate_quarantine(ads):
        _rollout_loss(model, ids, adv).backward()
        deploy = _grads(ads, ("dep",))
        deploy_logits = _logits(model, ids)
    _zero_grad(ads)
    with B.rollout_masks(ads, *_masks("keep", "keep", "keep")):
        keep_logits = _logits(model, ids)
        _rollout_loss(model, ids, adv).backward()
    assert torch.equal(keep_logits, deploy_logits)
    kept = _grads(ads)
    for k, g in deploy.items():
        assert torch.equal(kept[k], g), k
    assert _sq(kept, "quar") == 0.0 and _sq(kept, "dep") > 0


def test_block_independence_per_rollout(tmp_path):
    """In one mixed batch, a keep rollout's gradient touches only the deployed block, a route rollout's
    only the quarantine, an absorb rollout's both; route and absorb forwards are identical."""
    model, _, ads = _wrap(tmp_path, "pissa")
    _perturb(ads)
    ids = _ids(3, 14, seed=5)
    params = B.deployed_params(ads) + B.quarantine_params(ads)
    n_dep = len(B.deployed_params(ads))
    with B.rollout_masks(ads, *_masks("keep", "absorb", "route")):
        logits = model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1)
        per = [torch.autograd.grad(logp[b], params, retain_graph=True) for b in range(3)]
    energy = [(sum(float(g.pow(2).sum()) for g in gs[:n_dep]), sum(float(g.pow(2).sum()) for g in gs[n_dep:]))
              for gs in per]
    assert energy[0][0] > 0 and energy[0][1] == 0.0  # keep: deployed only
    assert energy[1][0] > 0 and energy[1][1] > 0  # absorb: both
    assert energy[2][0] == 0.0 and energy[2][1] > 0  # route: quarantine only
    with B.rollout_masks(ads, *_masks("absorb", "absorb", "absorb")):
        absorb = _logits(model, ids)
    with B.rollout_masks(ads, *_masks("route", "route", "route")):
        route = _logits(model, ids)
    assert torch.equal(absorb, route) and torch.equal(absorb, _logits(model, ids))  # absorb == no mask


def test_a_keep_only_step_leaves_the_quarantine_exactly_at_init(tmp_path):
    """AdamW (weight decay on the offsets = decay toward the initial values) moves only the deployed block."""
    model, _, ads = _wrap(tmp_path, "pissa")
    opt = torch.optim.AdamW(B.deployed_params(ads) + B.quarantine_params(ads), lr=1e-2, weight_decay=0.1)
    ids = _ids(2, 12)
    with B.rollout_masks(ads, *_masks("keep", "keep")):
        _rollout_loss(model, ids, torch.tensor([1.0, -1.0])).backward()
    assert B.grad_mass(ads) == 0.0
    before = B.snapshot(ads)
    opt.step()
    assert B.quarantine_norm(ads) == 0.0 and B.update_mass(ads, before) == 0.0
    assert all(float(p.detach().abs().max()) > 0 for p in B.deployed_params(ads))
    opt.zero_grad()
    with B.rollout_masks(ads, *_masks("route", "route")):
        _rollout_loss(model, ids, torch.tensor([1.0, -1.0])).backward()
    assert B.grad_mass(ads) == 1.0


def test_masks_in_one_batch_equal_rollouts_one_at_a_time(tmp_path):
    model, _, ads = _wrap(tmp_path, "scorda")
    _perturb(ads)
    kinds = ("keep", "absorb", "route", "absorb")
    ids, adv = _ids(4, 15, seed=3), torch.tensor([1.5, -0.5, 0.75, -1.75])
    with B.rollout_masks(ads, *_masks(*kinds)):
        _rollout_loss(model, ids, adv).backward()
    batch = _grads(ads)
    _zero_grad(ads)
    for b, kind in enumerate(kinds):
        with B.rollout_masks(ads, *_masks(kind)):
            _rollout_loss(model, ids[b : b + 1], adv[b : b + 1]).backward()
    single = _grads(ads)
    for k in batch:
        torch.testing.assert_close(batch[k], single[k], rtol=1e-4, atol=1e-6)


def test_mask_refusals(tmp_path):
    model, _, ads = _wrap(tmp_path)
    with pytest.raises(ValueError, match=r"\(0,1\), which trains nothing"):
        B.check_masks(torch.tensor([True, False]), torch.tensor([False, True]))
    with pytest.raises(ValueError, match="equal-length"):
        B.check_masks(torch.tensor([True]), torch.tensor([False, True]))
    with B.rollout_masks(ads, *_masks("keep", "route")):
        with pytest.raises(ValueError, match="leading dim must be the rollout dim"):
            _logits(model, _ids(3, 8))
        with pytest.raises(RuntimeError, match="not re-entrant"), B.rollout_masks(ads, *_masks("keep", "route")):
            pass
        with pytest.raises(RuntimeError, match="inside rollout_masks"), B.merged_for_generation(ads):
            pass
    m, d = B.check_masks(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0]))
    assert m.dtype == torch.bool and m.tolist() == [True, True, False] and d.tolist() == [True, False, False]


# ── zero_delta and merged generation ────────────────────────────────────────────────────


def test_zero_delta_is_the_base_model_exactly(tmp_path):
    model, plain, ads = _wrap(tmp_path, "corda")
    _perturb(ads)
    ids = _ids(2, 16)
    before = _logits(model, ids)
    with B.zero_delta(ads):
        assert torch.equal(_logits(model, ids), _logits(plain, ids))
        with B.capture_bottleneck(ads, torch.ones(2, 16)) as pool:  # the gate can still read
            _logits(model, ids)
        assert pool.stacked(list(ads)).shape == (2, len(ads), R)
    assert torch.equal(_logits(model, ids), before)


def test_the_gate_reads_the_live_bottleneck_merged_or_not(tmp_path):
    """capture_bottleneck records A_dep x = (A0_dep + a_dep) x: the same pooled values whether the deployed
    model runs unmerged or merged for generation (trained offsets included)."""
    model, _, ads = _wrap(tmp_path, "pissa")
    _perturb(ads)
    ids, w = _ids(2, 12), torch.ones(2, 12)
    with torch.no_grad(), B.ablate_quarantine(ads):
        with B.capture_bottleneck(ads, w) as live:
            model(input_ids=ids)
        with B.merged_for_generation(ads), B.capture_bottleneck(ads, w) as merged:
            model(input_ids=ids)
    torch.testing.assert_close(merged.stacked(list(ads)), live.stacked(list(ads)), rtol=1e-4, atol=1e-5)
    for a in ads.values():  # the offsets matter: A0_dep x alone reads differently
        x = torch.randn(3, a.in_features, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(a.read(x), x @ (a.A0_dep + a.a_dep).T, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a.read(x), x @ a.A0_dep.T, atol=1e-3)


def test_merged_generation_equals_unmerged_and_restores_bit_exactly(tmp_path):
    model, _, ads = _wrap(tmp_path, "scorda_rev")
    _perturb(ads)
    with torch.no_grad():  # one module left at its init keeps its weight object (no copy)
        for p in ads[next(iter(ads))].parameters():
            p.zero_()
    ids = _ids(2, 16)
    weights = {n: (a.base.weight.data_ptr(), a.base.weight.detach().clone()) for n, a in ads.items()}
    unmerged = _logits(model, ids)
    with B.ablate_quarantine(ads):
        deployed = _logits(model, ids)
    for _ in range(2):
        with B.merged_for_generation(ads):
            torch.testing.assert_close(_logits(model, ids), unmerged, rtol=1e-4, atol=1e-5)
            first = next(iter(ads.values()))
            assert first.base.weight.data_ptr() == weights[first.name][0]
            with pytest.raises(RuntimeError, match="grad enabled inside merged"):
                model(input_ids=ids)
            with pytest.raises(RuntimeError, match="not re-entrant"), B.merged_for_generation(ads):
                pass
        with B.ablate_quarantine(ads), B.merged_for_generation(ads):
            torch.testing.assert_close(_logits(model, ids), deployed, rtol=1e-4, atol=1e-5)
    for n, a in ads.items():
        assert a.base.weight.data_ptr() == weights[n][0] and torch.equal(a.base.weight, weights[n][1])
    assert torch.equal(_logits(model, ids), unmerged)
    with B.merged_for_generation(ads), pytest.raises(RuntimeError, match="ablate_quarantine inside"):
        with B.ablate_quarantine(ads):
            pass
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.config.use_cache = True
    with torch.no_grad():
        plain_gen = model.generate(input_ids=ids[:, :5], **gen)
        with B.merged_for_generation(ads):
            merged_gen = model.generate(input_ids=ids[:, :5], **gen)
    assert torch.equal(plain_gen, merged_gen)


def test_bf16_weights_keep_fp32_offsets_and_the_exact_zero(tmp_path):
    """bf16 base weights: A0/B0 in bf16, offsets fp32 with fp32 gradients; the net delta is still exactly 0
    at init and a keep-only forward is still exactly the deployed model."""
    model = random_qwen3().to(torch.bfloat16)
    plain = copy.deepcopy(model)
    ads = B.wrap_blocks(model, "rq3", init="pissa", r=R, svd_cache_root=tmp_path)
    ids = _ids(2, 12)
    assert torch.equal(_logits(model, ids), _logits(plain, ids))
    a = next(iter(ads.values()))
    assert a.A0_dep.dtype == torch.bfloat16 and a.a_dep.dtype == torch.float32
    _perturb(ads, std=0.05)
    with B.ablate_quarantine(ads):
        deployed = _logits(model, ids)
    with B.rollout_masks(ads, *_masks("keep", "keep")):
        assert torch.equal(_logits(model, ids), deployed)
        _rollout_loss(model, ids, torch.tensor([1.0, -1.0])).backward()
    assert a.a_dep.grad.dtype == torch.float32 and float(a.a_dep.grad.abs().sum()) > 0
    with B.merged_for_generation(ads):
        merged = _logits(model, ids).float()
    unmerged = _logits(model, ids).float()
    with B.zero_delta(ads):
        effect = float((unmerged - _logits(model, ids).float()).abs().max())
    assert float((merged - unmerged).abs().max()) < 0.05 * effect  # bf16 rounding of W', far below the delta


# ── the initialisations ─────────────────────────────────────────────────────────────────


def _orthonormal_rows(M: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool(torch.allclose(M @ M.T, torch.eye(M.shape[0]), atol=tol))


def _planted_deltas(d_in: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d_in, generator=g)
    u /= u.norm()
    D = 4.0 * u[None] * (1 + 0.3 * torch.rand(n, 1, generator=g)) + 0.3 * torch.randn(n, d_in, generator=g)
    return D, u


@pytest.mark.parametrize("block", ["quar", "dep"])
def test_scorda_seed_is_unit_signed_and_orthogonal_to_every_other_slot(block):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=g)
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    D, u = _planted_deltas(40, 10, 1)
    r = 5
    A0, B0, slot = B.scorda_init(W, U, Vh, D, r, seed_block=block)
    assert slot == (r if block == "quar" else 0)
    assert A0.shape == (2 * r, 40) and B0.shape == (24, 2 * r)
    u_in, u_out = A0[slot], B0[:, slot]
    assert abs(float(u_in.norm()) - 1) < 1e-6 and abs(float(u_out.norm()) - 1) < 1e-6
    assert float(u_in @ D.mean(0)) > 0 and float(u_in @ u) > 0.95  # hack-ward: the planted axis, signed
    torch.testing.assert_close(u_out, F.normalize(W @ u_in, dim=0), rtol=1e-5, atol=1e-6)
    assert _orthonormal_rows(A0) and _orthonormal_rows(B0.T)  # the seed is orthogonal to every other slot
    others = [k for k in range(2 * r) if k != slot]
    assert abs(float(A0[others[0]] @ F.normalize(Vh[0] - (Vh[0] @ u_in) * u_in, dim=0))) > 1 - 1e-5
    # the reverse control carries the same seed in the deployed block
    A0r, B0r, slot_r = B.scorda_init(W, U, Vh, D, r, seed_block="quar" if block == "dep" else "dep")
    torch.testing.assert_close(A0r[slot_r], u_in)
    torch.testing.assert_close(B0r[:, slot_r], u_out)
    with pytest.raises(ValueError, match="mean contrastive input delta is zero"):
        B.scorda_seed(W, torch.zeros(3, 40))


def test_wrap_logs_the_seed_report_of_the_seed_slot_on_the_heldout_pairs(tmp_path):
    """What wrap_blocks logs for scorda / scorda_rev is `seed_heldout_report` of each module's seed slot on
    the last n_heldout calibration pairs (the ones the seed was not computed from)."""
    from _logs import collect_logs

    model = random_qwen3()
    calib = B.resolve_calibration(model, TOK, _pairs(), model_id="rq3", out_dir=tmp_path / "calib")
    for init in ("scorda", "scorda_rev"):
        with collect_logs() as msgs:
            ads = B.wrap_blocks(copy.deepcopy(model), "rq3", init=init, r=R, calibration=calib, n_heldout=3,
                                svd_cache_root=tmp_path / "svd")
        seeds = {n: a.A0[a.seed_slot] for n, a in ads.items()}
        rep = B.seed_heldout_report(seeds, {n: d[-3:] for n, d in calib.deltas.items()})
        line = [m for m in msgs if m.startswith(f"{init} seed: held-out")]
        assert len(line) == 1 and rep["n_heldout"] == 3
        assert f"in {rep['mean_frac_pairs_pos']:.2f} of" in line[0]
        assert f"hack-ward in {rep['frac_modules_mean_pos']:.2f} of modules" in line[0]
        other = {n: a.A0[(a.seed_slot + 1) % (2 * R)] for n, a in ads.items()}  # a non-seed slot reads otherwise
        assert B.seed_heldout_report(other, {n: d[-3:] for n, d in calib.deltas.items()}) != rep
    # held-out pairs that point against the training pairs' mean read 0.00: the report is not on the seed's own pairs
    flipped = {n: torch.cat([d[:-3], -d[:-3].mean(0).expand(3, -1)]) for n, d in calib.deltas.items()}
    with collect_logs() as msgs:
        B.wrap_blocks(copy.deepcopy(model), "rq3", init="scorda", r=R, n_heldout=3, svd_cache_root=tmp_path / "svd",
                      calibration=B.Calibration(flipped, calib.pair_names, calib.meta))
    assert any("held-out pairs project hack-ward in 0.00 of" in m and "hack-ward in 0.00 of modules" in m for m in msgs)


def test_scorda_seed_is_hackward_on_heldout_pairs(tmp_path):
    """On the offline tiny Qwen3 with the built-in pairs, the seed (from 20 pairs) puts the 4 held-out
    pairs' input deltas hack-ward; seeded random unit directions do not."""
    from vgrout.model import load_model_and_tokenizer
    from vgrout.pairs import builtin_pairs

    model, tok = load_model_and_tokenizer("tiny-qwen3", "cpu")
    pairs = builtin_pairs()
    calib = B.resolve_calibration(model, tok, pairs, model_id="tiny-qwen3", out_dir=tmp_path)
    ads = B.wrap_blocks(model, "tiny-qwen3", init="scorda", r=4, calibration=calib, n_heldout=4,
                        svd_cache_root=tmp_path / "svd")
    held = {n: d[-4:] for n, d in calib.deltas.items()}
    seeds = {n: a.A0[a.seed_slot] for n, a in ads.items()}
    rep = B.seed_heldout_report(seeds, held)
    assert rep["mean_frac_pairs_pos"] > 0.9 and rep["frac_modules_mean_pos"] == 1.0, rep
    g = torch.Generator().manual_seed(0)
    rand = {n: F.normalize(torch.randn(s.shape, generator=g), dim=0) for n, s in seeds.items()}
    assert B.seed_heldout_report(rand, held)["mean_frac_pairs_pos"] < 0.75
    for a in ads.values():
        assert a.seed_slot == 4 and _orthonormal_rows(a.A0) and _orthonormal_rows(a.B0.T)


def test_pissa_init_is_the_top_singular_vectors_split_alternately(tmp_path):
    model, plain, ads = _wrap(tmp_path, "pissa")
    for n, a in ads.items():
        U, _, Vh = torch.linalg.svd(plain.get_submodule(n).weight.detach(), full_matrices=False)
        order = [0, 2, 4, 1, 3, 5]
        torch.testing.assert_close(a.A0.abs(), Vh[order].abs(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.B0.abs(), U[:, order].abs(), rtol=1e-4, atol=1e-5)
        assert _orthonormal_rows(a.A0) and _orthonormal_rows(a.B0.T)


def test_corda_metric_and_planted_contrast_axis():
    g = torch.Generator().manual_seed(3)
    D, u = _planted_deltas(20, 8, 4)
    sqrt_a, Vd, gg = B.contrast_metric_sqrt(D, eps=1e-2)
    S = sqrt_a * torch.eye(20, dtype=torch.float64) + Vd.T @ torch.diag(gg) @ Vd
    C = D.double().T @ D.double() / 8
    a = 1e-2 * float(torch.trace(C)) / 20
    torch.testing.assert_close(S @ S, C + a * torch.eye(20, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    W = torch.randn(16, 20, generator=g)
    A0, B0 = B.corda_init(W, D, 3, eps=1e-3)
    assert abs(float(A0[0] @ u)) > 0.9  # the strongest contrast axis is the deployed block's top read
    assert torch.allclose(A0.norm(dim=1), torch.ones(6), atol=1e-5) and _orthonormal_rows(B0.T)
    # the reads, from a dense C^{1/2} (eigh): unit(Qᵀ[:2r] C^{1/2}) with W C^{1/2} = U S Qᵀ, interleaved
    C3 = D.double().T @ D.double() / 8
    C3 = C3 + 1e-3 * float(torch.trace(C3)) / 20 * torch.eye(20, dtype=torch.float64)
    ev, Q = torch.linalg.eigh(C3)
    half = Q @ torch.diag(ev.sqrt()) @ Q.T
    Uw, _, Qh = torch.linalg.svd(W.double() @ half, full_matrices=False)
    order = [0, 2, 4, 1, 3, 5]
    reads = F.normalize(Qh[:6] @ half, dim=1)[order].float()
    torch.testing.assert_close((A0 * reads).sum(1).abs(), torch.ones(6), rtol=0, atol=1e-4)
    torch.testing.assert_close((B0 * Uw[:, order].float()).sum(0).abs(), torch.ones(6), rtol=0, atol=1e-4)


def test_gaussian_init_is_seeded_per_module(tmp_path):
    _, _, a0 = _wrap(tmp_path, seed=0)
    _, _, a1 = _wrap(tmp_path, seed=0)
    _, _, a2 = _wrap(tmp_path, seed=1)
    n0, n1 = list(a0)[:2]
    assert torch.equal(a0[n0].A0, a1[n0].A0) and not torch.equal(a0[n0].A0, a2[n0].A0)
    assert not torch.equal(a0[n0].A0[:, :16], a0[n1].A0[:, :16])
    d_in = a0[n0].in_features
    assert abs(float(a0[n0].A0.pow(2).mean()) * d_in - 1) < 0.2
    # B0 ~ N(0, 1/(2r)), pooled over every module: E[B0²] · 2r = 1
    b_var = torch.cat([a.B0.reshape(-1) for a in a0.values()]).pow(2).mean()
    assert abs(float(b_var) * 2 * R - 1) < 0.1


# ── calibration cache ───────────────────────────────────────────────────────────────────


def test_calibration_cache_batches_and_recomputes_a_bad_entry(tmp_path):
    model = random_qwen3()
    pairs = _pairs(5)
    one = B.input_deltas(model, TOK, pairs, [n for n, _ in B.target_linears(model)], "cpu", batch_size=1)
    before = dict(B.CALIB_STATS)
    c1 = B.resolve_calibration(model, TOK, pairs, model_id="rq3", out_dir=tmp_path, batch_size=4)
    c2 = B.resolve_calibration(model, TOK, pairs, model_id="rq3", out_dir=tmp_path)
    assert B.CALIB_STATS["computed"] - before["computed"] == 1 and B.CALIB_STATS["loaded"] - before["loaded"] == 1
    for n in one:
        assert c1.deltas[n].shape == (5, model.get_submodule(n).in_features)
        torch.testing.assert_close(c1.deltas[n], one[n], rtol=1e-4, atol=1e-5)  # padding never leaks in
        assert torch.equal(c1.deltas[n], c2.deltas[n])
    path = B.calibration_cache_path(tmp_path, "rq3", pairs, list(one))
    assert path.is_file() and c1.pair_names == [p.name for p in pairs]
    assert B.calibration_cache_path(tmp_path, "rq3", pairs[:4], list(one)) != path
    assert B.calibration_cache_path(tmp_path, "rq3", pairs, list(one)[7:]) != path
    tensors = load_file(str(path))
    tensors[next(iter(tensors))][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"schema": B.CALIB_SCHEMA})
    B.resolve_calibration(model, TOK, pairs, model_id="rq3", out_dir=tmp_path)
    assert B.CALIB_STATS["computed"] - before["computed"] == 2
    with pytest.raises(ValueError, match="calibrate the plain model"):
        B.input_deltas(_wrap(tmp_path)[0], TOK, pairs, list(one), "cpu")


# ── save / load ─────────────────────────────────────────────────────────────────────────


def test_save_load_reproduces_the_deployed_model_in_any_wrapper(tmp_path):
    model, _, ads = _wrap(tmp_path, "scorda")
    _perturb(ads)
    ids = _ids(2, 14)
    with B.ablate_quarantine(ads):
        deployed = _logits(model, ids)
    path = tmp_path / "blocks.safetensors"
    B.save_blocks(path, ads, model_id="rq3", metadata={"step": "7"})
    other, _, ads2 = _wrap(tmp_path, "lora2r", seed=5)  # another init: the file carries the deployed init
    meta = B.load_blocks(path, ads2, model_id="rq3")
    assert meta["step"] == "7" and meta["init"] == "scorda" and meta["include_quarantine"] == "false"
    assert torch.equal(_logits(other, ids), deployed)
    assert B.quarantine_norm(ads2) == 0.0
    full = tmp_path / "full.safetensors"
    B.save_blocks(full, ads, model_id="rq3", include_quarantine=True)
    B.load_blocks(full, ads2, model_id="rq3", include_quarantine=True)
    assert torch.equal(_logits(other, ids), _logits(model, ids))


def test_load_refusals_modify_nothing(tmp_path):
    _, _, ads = _wrap(tmp_path, "pissa")
    _perturb(ads)
    path = tmp_path / "blocks.safetensors"
    B.save_blocks(path, ads, model_id="rq3")
    model2, _, ads2 = _wrap(tmp_path, "lora2r")
    state = {k: v.clone() for k, v in model2.state_dict().items()}
    buffers = {n: a.A0.clone() for n, a in ads2.items()}
    with pytest.raises(ValueError, match="made for model 'rq3', not 'other'"):
        B.load_blocks(path, ads2, model_id="other")
    with pytest.raises(ValueError, match="saved with include_quarantine=False"):
        B.load_blocks(path, ads2, model_id="rq3", include_quarantine=True)
    _, _, top = _wrap(tmp_path, top_layers=1)
    with pytest.raises(ValueError, match="modules/shapes do not match"):
        B.load_blocks(path, top, model_id="rq3")
    _, _, r2 = _wrap(tmp_path, r=2)
    with pytest.raises(ValueError, match="wrap with --block-r=3"):
        B.load_blocks(path, r2, model_id="rq3")
    tensors = load_file(str(path))
    tensors[sorted(tensors)[-1]][0, 0] = float("inf")
    bad = tmp_path / "bad.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        save_file(tensors, str(bad), metadata=f.metadata())
    with pytest.raises(ValueError, match="missing, misshapen or non-finite"):
        B.load_blocks(bad, ads2, model_id="rq3")
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(buffers[n], a.A0) for n, a in ads2.items())
    with pytest.raises(ValueError, match="reserved"):
        B.save_blocks(path, ads, model_id="rq3", metadata={"r": "1"})


# ── v_act ───────────────────────────────────────────────────────────────────────────────


def test_v_act_is_unit_hackward_and_batching_does_not_change_it(tmp_path):
    model, _, ads = _wrap(tmp_path, "lora2r")
    _perturb(ads, std=0.05)
    pairs = _pairs(8)
    acts = VA.pair_bottlenecks(model, TOK, ads, pairs, "cpu", batch_size=3)
    one = VA.pair_bottlenecks(model, TOK, ads, pairs, "cpu", batch_size=1)
    for side in ("hack", "clean"):
        assert acts[side].shape == (8, len(ads), R)
        torch.testing.assert_close(acts[side], one[side], rtol=1e-4, atol=1e-5)
    va = VA.extract_v_act(model, TOK, ads, pairs, n_heldout=2, batch_size=4)
    names = list(ads)
    mean = (acts["hack"][:6] - acts["clean"][:6]).mean(0)
    for i, n in enumerate(names):
        assert abs(float(va.v[n].norm()) - 1) < 1e-5
        assert float(va.v[n] @ mean[i]) > 0 and float(va.v[n] @ F.normalize(mean[i], dim=0)) > 1 - 1e-5
    rep = va.heldout
    assert rep["n_heldout"] == 2 and rep["names"] == ["p6", "p7"] and len(rep["score_diff"]) == 2
    diff = acts["hack"][6:] - acts["clean"][6:]
    want = sum(float(diff[0, i] @ va.v[n]) for i, n in enumerate(names))
    assert math.isclose(rep["score_diff"][0], want, rel_tol=1e-4)
    assert VA.gate_scores(diff, va.stacked(names)).tolist() == pytest.approx(rep["score_diff"], rel=1e-6)


def test_pooled_bottleneck_reads_the_deployed_model(tmp_path):
    """The gate's read is A_dep x pooled over completion tokens, on the quarantine-ablated model."""
    model, _, ads = _wrap(tmp_path, "pissa")
    _perturb(ads)
    ids = _ids(2, 12)
    w = B.completion_weights(5, torch.tensor([[1.0] * 7, [1.0] * 4 + [0.0] * 3]))
    got = VA.pooled_bottleneck(model, ads, ids, w)
    xs = {}
    hooks = [a.register_forward_pre_hook(lambda mod, args, n=n: xs.__setitem__(n, args[0].detach()))
             for n, a in ads.items()]
    with torch.no_grad(), B.ablate_quarantine(ads):
        model.get_decoder()(input_ids=ids)
    for h in hooks:
        h.remove()
    for i, (n, a) in enumerate(ads.items()):
        h = xs[n] @ (a.A0_dep + a.a_dep).T  # [2, 12, r]
        want = torch.stack([h[0, 5:].mean(0), h[1, 5:9].mean(0)])
        torch.testing.assert_close(got[:, i], want, rtol=1e-4, atol=1e-5)
    live = VA.pooled_bottleneck(model, ads, ids, w, ablate=False)
    assert torch.equal(live[:, :3], got[:, :3])  # q, k, v of layer 0 read the embeddings either way
    for i in range(3, len(ads)):  # every later module sees the quarantine's effect unless it is ablated
        assert not torch.allclose(live[:, i], got[:, i]), i
    with pytest.raises(ValueError, match="no completion token"):
        VA.pooled_bottleneck(model, ads, ids, torch.zeros(2, 12))


def test_v_act_save_load_cache_and_haar(tmp_path, monkeypatch):
    model, _, ads = _wrap(tmp_path, "lora2r")
    pairs = _pairs(6)
    va = VA.resolve_v_act(model, TOK, ads, pairs, model_id="rq3", out_dir=tmp_path / "vact", n_heldout=2)
    path = VA.v_act_cache_path(tmp_path / "vact", "rq3", ads, pairs, 2)
    assert path.is_file() and set(va.v) == set(ads) and va.heldout["n_heldout"] == 2

    def boom(*a, **k):
        raise AssertionError("re-extracted on a cache hit")

    monkeypatch.setattr(VA, "extract_v_act", boom)
    again = VA.resolve_v_act(model, TOK, ads, pairs, model_id="rq3", out_dir=tmp_path / "vact", n_heldout=2)
    assert all(torch.equal(again.v[n], va.v[n]) for n in ads)
    _perturb(ads, blocks=("quar",))  # the quarantine does not change the deployed path: same cache file
    assert VA.v_act_cache_path(tmp_path / "vact", "rq3", ads, pairs, 2) == path
    _perturb(ads, blocks=("dep",))
    assert VA.v_act_cache_path(tmp_path / "vact", "rq3", ads, pairs, 2) != path
    with pytest.raises(VA.VActError, match="made for model"):
        VA.load_v_act(path, model_id="other", adapters=ads)
    with pytest.raises(VA.VActError, match="modules do not match"):
        VA.load_v_act(path, model_id="rq3", adapters={n: a for n, a in list(ads.items())[:3]})
    with pytest.raises(FileNotFoundError, match="explicit v_act path"):
        VA.resolve_v_act(model, TOK, ads, pairs, model_id="rq3", out_dir=tmp_path, path=tmp_path / "nope")
    h1, h2, h3 = VA.haar_v_act(ads, 1), VA.haar_v_act(ads, 1), VA.haar_v_act(ads, 2)
    assert h1.is_control and not va.is_control
    for n in ads:
        assert h1.v[n].shape == (R,) and abs(float(h1.v[n].norm()) - 1) < 1e-6
        assert torch.equal(h1.v[n], h2.v[n]) and not torch.equal(h1.v[n], h3.v[n])
    hp = VA.save_v_act(tmp_path / "haar.safetensors", h1, model_id="rq3")
    back = VA.load_v_act(hp, model_id="rq3", adapters=ads)
    assert back.is_control and back.meta["seed"] == "1" and all(torch.equal(back.v[n], h1.v[n]) for n in ads)


# ── the routeA gate ─────────────────────────────────────────────────────────────────────


def test_weighted_quantiles_by_hand():
    v = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    one = torch.ones(5)
    assert VA.weighted_quantile(v, one, 0.2) == 1.0 and VA.weighted_quantile(v, one, 0.4) == 2.0
    assert VA.weighted_quantile(v, one, 0.21) == 2.0 and VA.weighted_quantile(v, one, 0.0) == 1.0
    assert VA.upper_quantile(v, one, 0.2) == 5.0 and VA.upper_quantile(v, one, 0.4) == 4.0
    w = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0])  # only 5, 4, 3 count, 3 twice as much
    assert VA.weighted_quantile(v, w, 0.5) == 3.0 and VA.weighted_quantile(v, w, 0.51) == 4.0
    assert VA.upper_quantile(v, w, 0.25) == 5.0 and VA.upper_quantile(v, w, 0.26) == 4.0
    ages = VA.recency_weights(torch.tensor([0, 2, 4]), 4, 2.0)
    assert ages.tolist() == [0.25, 0.5, 1.0] and VA.recency_weights(torch.tensor([0, 9]), 9, None).tolist() == [1, 1]


def test_band_masks_three_ways_and_ties():
    s = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    m, d = VA.band_masks(s, -1.0, 1.0)
    assert m.tolist() == [False, False, True, True, True] and d.tolist() == [False, False, False, True, True]
    m, d = VA.band_masks(s, 0.0, 0.0)  # equal cuts: the tie keeps, never (0,1)
    assert m.tolist() == [False, False, False, True, True] and d.tolist() == [False, False, False, True, True]
    assert VA.mask_shares(m, d) == {"keep": 0.6, "absorb": 0.0, "route": 0.4}


def _scalar_acts(xs) -> torch.Tensor:
    """acts [G, M=2, r=1] whose gate score against v = [[1], [1]] is exactly x (x/2 in each module)."""
    t = torch.tensor(xs, dtype=torch.float32)[:, None, None] / 2
    return t.expand(-1, 2, 1).contiguous()


V1 = torch.ones(2, 1)


def test_route_gate_cuts_at_the_buffer_quantiles():
    gate = VA.RouteAGate(["a", "b"], 1, tail_q=0.2, halflife=None)
    dec = gate.observe(_scalar_acts([1, 2, 3, 4, 5]), V1)
    assert (dec.t_lo, dec.t_hi) == (1.0, 5.0) and dec.scores.tolist() == [1, 2, 3, 4, 5]
    assert VA.mask_shares(dec.m, dec.d) == {"keep": 0.2, "absorb": 0.6, "route": 0.2}
    dec = gate.observe(_scalar_acts([0.5, 10.0]), V1)  # cuts from all 7 buffered rollouts
    assert dec.m.tolist() == [False, True] and dec.d.tolist() == [False, True] and len(gate) == 7
    # a refreshed v_act re-scores the whole buffer: flipping it swaps the tails
    dec = gate.observe(_scalar_acts([10.0]), -V1)
    assert dec.m.tolist() == [False] and (dec.t_lo, dec.t_hi) == (-10.0, -1.0)  # 2 of 8 in each tail


def test_route_gate_recency_weights_forget_old_scores():
    old_low = _scalar_acts([-100.0] * 20)
    plain = VA.RouteAGate(["a", "b"], 1, tail_q=0.1, halflife=None)
    recent = VA.RouteAGate(["a", "b"], 1, tail_q=0.1, halflife=2.0)
    for g in (plain, recent):
        g.observe(old_low, V1)
    batch = _scalar_acts([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    p, r = plain.observe(batch, V1), recent.observe(batch, V1)
    assert p.t_lo == -100.0 and not (~p.m).any()  # the stale low tail keeps nothing of the new batch
    # the old group has age 10 rollouts (weight 1/32 each, 0.625 in all) against the new group's 10, so
    # a tail needs weight 1.0625: the old scores + 1 at the bottom, 10 + 9 at the top
    assert r.t_lo == 1.0 and (~r.m).tolist() == [True] + [False] * 9 and r.t_hi == 9.0
    # the rollouts of one group weigh the same, whatever their order in it (students first, teachers last)
    short = VA.RouteAGate(["a", "b"], 1, tail_q=0.25, halflife=1.0).observe(_scalar_acts([1.0, 2.0, 3.0, 4.0]), V1)
    assert (short.t_lo, short.t_hi) == (1.0, 4.0)


def test_route_gate_warmup_capacity_and_state_roundtrip():
    gate = VA.RouteAGate(["a", "b"], 1, tail_q=0.25, halflife=3.0, capacity=6, warmup=4)
    dec = gate.observe(_scalar_acts([5.0, -5.0]), V1)
    assert dec.warming_up and dec.m.all() and not dec.d.any()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, generator=gen).tolist() for _ in range(6)]
    gate.observe(_scalar_acts(batches[0]), V1)
    assert len(gate) == 5
    gate.observe(_scalar_acts(batches[1]), V1)
    assert len(gate) == 6 and gate.n_seen == 8  # capacity reached: the oldest are evicted
    twin = VA.RouteAGate(["a", "b"], 1, tail_q=0.25, halflife=3.0, capacity=6, warmup=4)
    twin.load_state_dict(gate.state_dict())
    for xs in batches[2:]:
        a, b = gate.observe(_scalar_acts(xs), V1), twin.observe(_scalar_acts(xs), V1)
        assert (a.t_lo, a.t_hi) == (b.t_lo, b.t_hi)
        assert torch.equal(a.m, b.m) and torch.equal(a.d, b.d)
    with pytest.raises(ValueError, match="other adapters"):
        VA.RouteAGate(["a", "c"], 1).load_state_dict(gate.state_dict())


def test_route_gate_refusals():
    with pytest.raises(ValueError, match=r"route_tail_q must be in \(0, 0.5\]"):
        VA.RouteAGate(["a"], 1, tail_q=0.6)
    gate = VA.RouteAGate(["a", "b"], 1)
    with pytest.raises(ValueError, match="non-finite"):
        gate.observe(_scalar_acts([float("nan")]), V1)
    with pytest.raises(ValueError, match=r"must be \[G, 2, 1\]"):
        gate.observe(torch.zeros(2, 3, 1), V1)


def test_route_gate_bounds_warmup_edge_and_state_edges():
    """Every knob's edge (accepted at its bound, refused past it); the warm-up ends exactly when the
    buffer holds `warmup` rollouts and its decision is one bool entry per rollout of the group; an empty
    gate's state has the right shapes and integer stamps; loading into a smaller buffer keeps the
    newest rollouts."""
    VA.RouteAGate(["a"], 1, tail_q=0.5, halflife=None, capacity=1, warmup=0)  # every bound accepted
    for kw in ({"tail_q": 0.0}, {"halflife": 0.0}, {"capacity": 0}, {"warmup": -1}):
        with pytest.raises(ValueError):
            VA.RouteAGate(["a"], 1, **kw)
    for names, r in ((["a"], 0), ([], 1)):
        with pytest.raises(ValueError, match="bad gate buffer"):
            VA.RouteAGate(names, r)
    dec = VA.RouteAGate(["a", "b"], 1, warmup=4, halflife=None).observe(_scalar_acts([3.0, -1.0, 2.0]), V1)
    assert dec.warming_up and dec.m.dtype == dec.d.dtype == torch.bool
    assert dec.m.tolist() == [True] * 3 and dec.d.tolist() == [False] * 3 and dec.scores.tolist() == [3, -1, 2]
    dec = VA.RouteAGate(["a", "b"], 1, warmup=3, tail_q=1 / 3, halflife=None).observe(
        _scalar_acts([3.0, -1.0, 2.0]), V1)
    assert not dec.warming_up and (dec.t_lo, dec.t_hi) == (-1.0, 3.0)  # 3 buffered = warmup: it decides
    empty = VA.RouteAGate(["a", "b"], 1).state_dict()
    assert empty["acts"].shape == (0, 2, 1) and empty["stamps"].shape == (0,) and empty["n_seen"] == 0
    big = VA.RouteAGate(["a", "b"], 1, capacity=6, halflife=None)
    big.observe(_scalar_acts([1.0, 2.0, 3.0]), V1)
    big.observe(_scalar_acts([4.0, 5.0, 6.0]), V1)
    st = big.state_dict()
    assert st["stamps"].dtype == torch.long and st["stamps"].tolist() == [3, 3, 3, 6, 6, 6]
    small = VA.RouteAGate(["a", "b"], 1, capacity=4, halflife=None)
    small.load_state_dict(st)
    kept = small.state_dict()
    assert len(small) == 4 and small.n_seen == 6 and kept["stamps"].tolist() == [3, 6, 6, 6]
    assert torch.equal(kept["acts"], st["acts"][-4:])


def test_quantile_and_gate_stats_refusals_and_input_types():
    one = torch.ones(3)
    for values, weights in ((torch.ones(2), one), (torch.ones(3, 1), torch.ones(3, 1)), (torch.ones(0), torch.ones(0))):
        with pytest.raises(ValueError, match="must be equal, 1-D, non-empty"):
            VA.weighted_quantile(values, weights, 0.5)
    v = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    assert VA.weighted_quantile(v, torch.ones(5), 1.0) == 5.0  # q = 1 is the largest value, not refused
    assert VA.upper_quantile(v, torch.ones(5), 1.0) == 1.0
    for q in (-0.01, 1.01):
        with pytest.raises(ValueError, match=r"q must be in \[0, 1\]"):
            VA.weighted_quantile(v, torch.ones(5), q)
    d, e = [True, False, True], [True, True, False]
    assert VA.gate_stats(torch.tensor(d), e) == VA.gate_stats(d, e) == proj.classifier_stats(d, e)
    with pytest.raises(ValueError, match="select has 2 labels but d has 3"):
        VA.gate_stats(d, e, select=[True, False])
    h = VA.haar_v_act({"a": 3, "b": 5}, seed=0)  # module ranks given as ints (no adapters at hand)
    assert h.v["a"].shape == (3,) and h.v["b"].shape == (5,) and h.is_control


def test_gate_diagnostics():
    d = torch.tensor([True, True, False, False, True])
    exploited = [True, False, True, False, False]
    s = VA.gate_stats(d, exploited)
    assert s == proj.classifier_stats(d.tolist(), exploited)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(0.5)
    sel = VA.gate_stats(d, exploited, select=[True, True, True, False, False])
    assert sel["n"] == 3 and sel["precision"] == 0.5
    assert B.quarantine_mass([torch.tensor([3.0])], [torch.tensor([4.0]), None]) == pytest.approx(16 / 25)
    assert math.isnan(B.quarantine_mass([torch.zeros(2)], [None]))


def test_one_routeA_step_end_to_end(tmp_path):
    """Score a group on the deployed model, gate it, train under its masks: keep rows move only the
    deployed block and route rows only the quarantine, so the two halves of the gradient add up."""
    model, _, ads = _wrap(tmp_path, "scorda")
    pairs = _pairs(6)
    va = VA.extract_v_act(model, TOK, ads, pairs, n_heldout=2)
    names = list(ads)
    gate = VA.RouteAGate(names, R, tail_q=0.25, halflife=None)
    ids = _ids(4, 16, seed=9)
    comp = torch.ones(4, 10)
    acts = VA.pooled_bottleneck(model, ads, ids, B.completion_weights(6, comp))
    dec = gate.observe(acts, va.stacked(names))
    assert VA.mask_shares(dec.m, dec.d) == {"keep": 0.25, "absorb": 0.5, "route": 0.25}
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    with B.rollout_masks(ads, dec.m, dec.d):
        _rollout_loss(model, ids, adv).backward()
    mixed = _grads(ads)
    _zero_grad(ads)
    _rollout_loss(model, ids, adv * dec.m.float()).backward()  # quarantine: every rollout but the keep one
    quar_ref = _grads(ads, ("quar",))
    _zero_grad(ads)
    # deployed: every rollout but the route one (the quarantine is at its init, so keep's forward is unmasked)
    _rollout_loss(model, ids, adv * (~dec.d).float()).backward()
    dep_ref = _grads(ads, ("dep",))
    for k, g in {**quar_ref, **dep_ref}.items():
        torch.testing.assert_close(mixed[k], g, rtol=1e-4, atol=1e-6)


def test_v_act_and_gate_score_shape_refusals_each_alone():
    """Each shape condition is refused on its own (the others holding): hack/clean shapes differ; not
    3-D; module count differs from the names; acts not 3-D; v_act not [M, r] of acts."""
    names = ["a", "b"]
    good = torch.ones(4, 2, 3)
    assert set(VA.v_act_from(good + 1, good, names)) == {"a", "b"}
    for hack, clean, nm in ((torch.ones(4, 2, 3), torch.ones(5, 2, 3), names),
                            (torch.ones(4, 6), torch.ones(4, 6), names),
                            (torch.ones(4, 2, 3), torch.ones(4, 2, 3), ["a", "b", "c"])):
        with pytest.raises(ValueError, match=r"must be \[P, M=\d, r\]"):
            VA.v_act_from(hack, clean, nm)
    assert VA.gate_scores(torch.ones(2, 3, 4), torch.ones(3, 4)).tolist() == [12.0, 12.0]
    for acts, v in ((torch.ones(3, 4), torch.ones(4)), (torch.ones(2, 3, 4), torch.ones(3, 5))):
        with pytest.raises(ValueError, match=r"must be \[B, M, r\] and \[M, r\]"):
            VA.gate_scores(acts, v)
