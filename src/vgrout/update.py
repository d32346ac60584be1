"""The step's gradient and update, for any arm: the Dr.GRPO backward of each group (forward batches of
similar length, per-rollout gradients handed to the arm), then the arm's edit, the global clip and AdamW.
`train.train_step` calls `group_backward` per group and `apply_update` once."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from . import grpo, proj
from .adapter import snapshot, update_mass
from .arms import StepGrads
from .logprobs import completion_logprobs, reference_logprobs
from .metrics import classifier_metrics
from .rollout import Group

if TYPE_CHECKING:
    from .train import Run


def group_backward(run: Run, g: Group, acc: StepGrads) -> float:
    """Dr.GRPO loss of one group and its backward, in forward batches of similar length (each in the arm's
    context: per-rollout gradient recording, or routeA's masks). For an arm that edits the gradient, the
    group's gradient goes into `acc` (and, per rollout, to the arm) and .grad is cleared again; otherwise it
    accumulates in .grad. Sets g.mean_logp; returns the loss."""
    knobs, per_rollout = run.knobs, run.arm.needs_rollout_grads(acc.split)
    adv = grpo.group_advantages(torch.tensor(g.rewards, dtype=torch.float32, device=run.device),
                                unbiased=run.cfg.unbiased)
    run.arm.prepare_group(run.model, g, run.tok.pad_token_id)
    loss, g.mean_logp, g_b = 0.0, [math.nan] * g.size, {}
    for rows in g.length_buckets():
        with run.arm.batch_context(rows, per_rollout):
            loss += batch_backward(run, g, rows, adv[rows])
        for name, k in knobs.items():
            if per_rollout and k.per_rollout_grad is not None:
                g_b.setdefault(name, torch.zeros(g.size, k.rank, device=k.per_rollout_grad.device))[rows] = \
                    k.per_rollout_grad
    if not run.arm.edits_gradient:  # the gradient stays in .grad; the arm only reports its per-rollout choice
        acc.add_group(g, {}, None, run.arm.observe_group(g, None, {}))
        return loss
    totals = {n: k.delta_S.grad.detach() for n, k in knobs.items() if k.delta_S.grad is not None}
    acc.add_group(g, totals, g_b or None, run.arm.observe_group(g, g_b, totals) if per_rollout else None)
    for p in run.params:
        p.grad = None
    return loss


def batch_backward(run: Run, g: Group, rows: list[int], adv: torch.Tensor) -> float:
    """Forward and backward of some rows of a group (their share of the Dr.GRPO loss); sets their mean_logp."""
    cfg = run.cfg
    ids, mask, plen = g.tensors(run.tok.pad_token_id, run.device, rows)
    ref = reference_logprobs(run.model, run.knobs, ids, plen) if cfg.beta > 0 else None
    logp = completion_logprobs(run.model, ids, plen)
    # one inner step: the old policy is this forward's values (ratio == 1; clip form kept)
    tok_loss = grpo.token_losses(logp, logp.detach(), adv, clip=cfg.clip, beta=cfg.beta, ref_logp=ref)
    loss = grpo.reduce_loss(tok_loss, mask, unbiased=cfg.unbiased, max_new=cfg.max_new, group=cfg.group,
                            prompts_per_step=cfg.prompts_per_step)
    loss.backward()
    for r, x in zip(rows, grpo.masked_mean_per_row(logp.detach(), mask).cpu().tolist(), strict=True):
        g.mean_logp[r] = x
    return float(loss.detach())


def apply_update(run: Run, acc: StepGrads) -> dict:
    """The arm's δS / δS_hack gradients, global clip, AdamW step, schedule (and, for arms that edit the
    update, the split of AdamW's change of δS); returns the update metrics, including what the
    parameters actually did (cos_upd, quar_resid)."""
    arm = run.arm
    upd = arm.intervene(acc)
    for name, k in run.knobs.items() if arm.edits_gradient else ():
        if name in upd.kept:
            k.delta_S.grad = upd.kept[name].to(k.delta_S.dtype)
        k.delta_S_hack.grad = upd.routed[name].to(k.delta_S_hack.dtype) if name in upd.routed else None
    gn = float(torch.nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip))
    lr = run.sched.get_last_lr()[0]  # the rate this step's update used
    snap = snapshot(run.knobs)
    dep = iter(snap["dep"])  # deployed_params order: each module's deployed() tensors in turn; δS comes first
    before = {n: [next(dep) for _ in k.deployed()][0] for n, k in run.knobs.items()}
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    diag = dict(upd.diag)
    if arm.edits_update:
        edit = arm.edit_update({n: k.delta_S.detach() - before[n] for n, k in run.knobs.items()})
        with torch.no_grad():
            for name, k in run.knobs.items():
                k.delta_S.copy_(before[name] + edit.kept[name])
                if name in edit.routed:
                    k.delta_S_hack.add_(edit.routed[name])
        diag.update(edit.diag)
    diag["q_mass"] = update_mass(run.knobs, snap)
    V = arm.basis_matrices()
    if V is not None:
        quarantine = {n: k.delta_S_hack.detach() for n, k in run.knobs.items()} if arm.has_quarantine else None
        change = {n: k.delta_S.detach() - before[n] for n, k in run.knobs.items()}
        diag.update(proj.update_diagnostics(V, change, quarantine))
    return {"gn": gn, "lr": lr, **diag, **classifier_metrics(acc.routed_votes, acc.exploited)}
