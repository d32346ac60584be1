"""Dr.GRPO math: exact identities on small tensors."""

import math

import pytest
import torch

from vgrout import grpo


def test_per_token_logps_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(grpo.per_token_logps(logits, ids), ref, rtol=0, atol=1e-6)


def test_advantages_sum_to_zero_and_std_variant():
    r = torch.tensor([0.0, 3.5, 0.5, 3.5])
    a = grpo.group_advantages(r, unbiased=True)
    assert abs(float(a.sum())) < 1e-6
    torch.testing.assert_close(a, r - r.mean())
    b = grpo.group_advantages(r, unbiased=False)
    torch.testing.assert_close(b, (r - r.mean()) / (r.std() + 1e-4))
    assert not grpo.has_reward_variance(torch.tensor([3.5, 3.5, 3.5]))
    assert grpo.has_reward_variance(r)


def test_k3_kl_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(1)
    lp, ref = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    kl = grpo.k3_kl(lp, ref)
    assert bool((kl >= 0).all())
    assert float(grpo.k3_kl(lp, lp).abs().max()) == 0.0


def test_single_step_gradient_is_advantage_weighted_logp():
    """With ratio == 1 the clipped loss's gradient is exactly -A * d logp."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 7, generator=g, requires_grad=True)
    ids = torch.randint(0, 7, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    adv = torch.tensor([1.0, -2.0, 0.5])
    lp = grpo.per_token_logps(logits, ids)
    loss = grpo.reduce_loss(grpo.token_losses(lp, lp.detach(), adv, clip=0.2), mask,
                            unbiased=True, max_new=4, group=3, prompts_per_step=1)
    (g1,) = torch.autograd.grad(loss, logits)
    lp2 = grpo.per_token_logps(logits, ids)
    direct = -(adv.unsqueeze(1) * lp2 * mask).sum() / (3 * 4 * 1)
    (g2,) = torch.autograd.grad(direct, logits)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-7)


def test_split_reduction_sums_to_total():
    g = torch.Generator().manual_seed(3)
    tl, mask = torch.randn(5, 6, generator=g), (torch.rand(5, 6, generator=g) > 0.3).float()
    rows = torch.tensor([True, True, False, True, False])
    for unbiased in (True, False):
        kw = dict(unbiased=unbiased, max_new=6, group=5, prompts_per_step=2)
        tot = grpo.reduce_loss(tl, mask, **kw)
        parts = grpo.reduce_loss(tl, mask, rows=rows, **kw) + grpo.reduce_loss(tl, mask, rows=~rows, **kw)
        torch.testing.assert_close(parts, tot)


def test_unbiased_loss_does_not_normalise_by_length():
    """Dr.GRPO: a rollout's weight does not depend on its length (constant denominator)."""
    tl = torch.ones(2, 4)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    per_row = [grpo.reduce_loss(tl, mask, rows=torch.tensor(r), unbiased=True, max_new=4, group=2,
                                prompts_per_step=1) for r in ([True, False], [False, True])]
    assert float(per_row[1]) == 4 * float(per_row[0])
    std = [grpo.reduce_loss(tl, mask, rows=torch.tensor(r), unbiased=False, max_new=4, group=2,
                            prompts_per_step=1) for r in ([True, False], [False, True])]
    assert float(std[0]) == float(std[1])


def test_k3_kl_pins_the_direction_exactly():
    """k3 = exp(Δ) - Δ - 1 with Δ = ref - logp: e - 2 at Δ = 1, 1/e at Δ = -1 (not symmetric)."""
    zero, one = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    assert float(grpo.k3_kl(zero, one)) == pytest.approx(math.e - 2.0, rel=1e-15)
    assert float(grpo.k3_kl(one, zero)) == pytest.approx(math.exp(-1.0), rel=1e-15)


def _pg_losses(ratios: list[float], adv: list[float], clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token losses (and d loss / d logp) of one token per rollout at the given ratios."""
    logp = torch.log(torch.tensor(ratios, dtype=torch.float64)).unsqueeze(1).requires_grad_()
    old = torch.zeros_like(logp)
    loss = grpo.token_losses(logp, old, torch.tensor(adv, dtype=torch.float64), clip=clip)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    return loss.detach().squeeze(1), grad.squeeze(1)


def test_ppo_clip_is_pessimistic_and_symmetric_around_one():
    """-min(r·A, clip(r, 1-ε, 1+ε)·A): the clipped side binds only where it lowers the objective."""
    ratios = [1.5, 1.5, 0.5, 0.5, 1.1, 1.1]
    adv = [2.0, -2.0, 2.0, -2.0, 2.0, -2.0]
    loss, grad = _pg_losses(ratios, adv, clip=0.2)
    # r = 1.5: A > 0 is capped at 1.2·A; A < 0 keeps r·A.  r = 0.5: A > 0 keeps r·A; A < 0 is 0.8·A.
    want = torch.tensor([-2.4, 3.0, -1.0, 1.6, -2.2, 2.2], dtype=torch.float64)
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-12)
    # where the clip binds the token gives no gradient; elsewhere d(-r·A)/d logp = -r·A
    want_grad = torch.tensor([0.0, 3.0, -1.0, 0.0, -2.2, 2.2], dtype=torch.float64)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-12)


def test_kl_term_is_beta_times_k3_and_only_when_asked():
    lp = torch.zeros(2, 3)
    ref = torch.ones(2, 3)  # Δ = ref - logp = 1 everywhere
    adv = torch.zeros(2)  # no policy-gradient term: the loss is the KL term alone
    kl = grpo.token_losses(lp, lp, adv, clip=0.2, beta=0.1, ref_logp=ref)
    torch.testing.assert_close(kl, torch.full((2, 3), 0.1 * (math.e - 2.0)))
    adv = torch.tensor([1.0, -2.0])
    pg = grpo.token_losses(lp, lp, adv, clip=0.2)
    torch.testing.assert_close(grpo.token_losses(lp, lp, adv, clip=0.2, beta=0.1, ref_logp=ref),
                               pg + 0.1 * (math.e - 2.0))
    # no reference, or beta = 0 (the default): no KL, and a far-off reference cannot poison the loss
    far = torch.full((2, 3), 1000.0)  # exp(1000) = inf: 0 · inf would be nan
    for kw in ({"beta": 0.1}, {"ref_logp": far}, {"beta": 0.0, "ref_logp": far}):
        torch.testing.assert_close(grpo.token_losses(lp, lp, adv, clip=0.2, **kw), pg, rtol=0, atol=0)


def test_reduce_loss_exact_normalisers():
    f64 = torch.float64
    tl = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=f64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=f64)
    kw = dict(mask=mask, max_new=4, group=2, prompts_per_step=3)
    exact = lambda v: pytest.approx(v, rel=1e-15)  # noqa: E731
    # Dr.GRPO: (1 + 2 + 3 + 5) / (G · max_new · P) = 11 / 24
    assert float(grpo.reduce_loss(tl, unbiased=True, **kw)) == exact(11 / 24)
    # GRPO: (mean(1, 2, 3) + mean(5)) / (G · P) = (2 + 5) / 6
    assert float(grpo.reduce_loss(tl, unbiased=False, **kw)) == exact(7 / 6)
    rows = torch.tensor([False, True])
    assert float(grpo.reduce_loss(tl, rows=rows, unbiased=False, **kw)) == exact(5 / 6)


def test_masked_mean_per_row_is_the_mean_over_real_tokens():
    x = torch.tensor([[1.0, 2.0, 6.0, 100.0], [3.0, -7.0, 5.0, 5.0], [9.0, 9.0, 9.0, 9.0],
                      [-4.0, 8.0, 8.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0],
                         [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(grpo.masked_mean_per_row(x, mask), torch.tensor([3.0, 1.5, 0.0, -4.0]),
                               rtol=0, atol=0)


def test_reward_variance_threshold_is_inclusive():
    assert grpo.has_reward_variance(torch.tensor([0.0, 0.5]), eps=0.5)
    assert not grpo.has_reward_variance(torch.tensor([0.0, 0.25]), eps=0.5)
    # default eps: compiling (0.5) vs not (0.0) is a signal; equal rewards are not
    assert grpo.has_reward_variance(torch.tensor([0.0, 0.5, 0.5]))
    assert not grpo.has_reward_variance(torch.tensor([0.5, 0.5, 0.5]))
