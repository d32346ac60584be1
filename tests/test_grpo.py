"""Dr.GRPO math: exact identities on small tensors."""

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
