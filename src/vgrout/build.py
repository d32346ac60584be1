"""What a run is built from besides the model: its adapter on the model and its optimizer."""

from __future__ import annotations

import torch
from loguru import logger

from . import blocks
from .adapter import wrap_model
from .config import Config
from .directions import run_pairs


def make_optimizer(cfg: Config, params: list) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over δS and δS_hack; linear warmup over warmup_frac of the steps, then cosine to 0."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup_frac * cfg.steps))
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, end_factor=1.0, total_iters=warm),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps - warm)),
    ], milestones=[warm])
    return opt, sched


def wrap_adapter(cfg: Config, model, tok, family: str, device: torch.device) -> dict:
    """The run's adapter on `model`: the SVD knob, or a block-split adapter (its corda / scorda calibration
    from the run's pairs, taken on the plain model and cached)."""
    if family == "svd":
        return wrap_model(model, cfg.model, top_layers=cfg.adapt_top_layers)
    calib = None
    if cfg.adapter in blocks.NEEDS_PAIRS:
        calib = blocks.resolve_calibration(model, tok, run_pairs(cfg, tok)[0], model_id=cfg.model,
                                           out_dir=cfg.out_root / "vhack", top_layers=cfg.adapt_top_layers,
                                           device=device)
    knobs = blocks.wrap_blocks(model, cfg.model, init=cfg.adapter, r=cfg.block_r, seed=cfg.seed, calibration=calib,
                               n_heldout=cfg.v_hack_n_heldout, top_layers=cfg.adapt_top_layers)
    logger.info(f"adapter: {cfg.adapter}, {len(knobs)} modules, rank 2 x {cfg.block_r}")
    return knobs
