"""The hack directions of one training run: resolve at start, refresh, save for resume.

Thin lifecycle around `vhack` (which does the extraction math): the vanilla arm has
none; erase/route project on `v_hack`, route2 gates on `v_grad`; a Haar control
(`--random-v-seed`) replaces both with seeded random directions that a refresh never
replaces.
"""

from __future__ import annotations

import math

import torch
from loguru import logger

from . import vhack
from .config import Config
from .pairs import Pair, builtin_pairs, for_chat_template, load_pairs


def run_pairs(cfg: Config, tok) -> tuple[list[Pair], str]:
    """The run's contrastive pairs (`--vhack-pairs-path`, else the built-in set), their prompts rendered
    with this model's chat template (as its rollouts see a prompt), and their source name."""
    if cfg.vhack_pairs_path is not None:
        return for_chat_template(load_pairs(cfg.vhack_pairs_path), tok), str(cfg.vhack_pairs_path)
    return for_chat_template(builtin_pairs(), tok), "builtin"


class RunDirections:
    """`basis` ("v_hack" or "v_grad", the arm's) names the direction whose refresh overlap is reported."""

    def __init__(self, cfg: Config, d: vhack.Directions | None, pairs: list[Pair], device: torch.device,
                 basis: str | None = None):
        self.cfg, self.d, self.pairs, self.device, self.basis = cfg, d, pairs, device, basis
        self.overlaps: list[float] = []
        self._to_device()

    # ── construction ──
    @classmethod
    def for_run(cls, cfg: Config, model, tok, knobs, device: torch.device, basis: str | None) -> RunDirections:
        """The run's directions for an arm acting on `basis`; none at all when `basis` is None."""
        if basis is None:
            return cls(cfg, None, [], device)
        pairs, source = run_pairs(cfg, tok)
        d = vhack.resolve_directions(
            model, tok, knobs, pairs, model_id=cfg.model, pairs_source=source,
            out_dir=cfg.out_root / "vhack", path=cfg.v_hack_path, top_k=cfg.v_hack_extract_top_k,
            tau_axis=cfg.v_hack_tau_axis, n_heldout=cfg.v_hack_n_heldout, k_use=cfg.v_hack_k,
            drop_bottom_frac=cfg.v_hack_drop_bottom_frac, device=device, sign=cfg.v_hack_sign,
            pair_norm=cfg.vhack_pair_loss)
        logger.info(f"directions from {len(pairs)} {source} pairs: v_hack on {len(d.v_hack)} modules / "
                    f"{d.n_axes()} axes ({len(d.dropped)} dropped), v_grad on {len(d.v_grad)} modules")
        if cfg.random_v_seed is not None:
            d = vhack.haar_like(d, {n: k.rank for n, k in knobs.items()}, cfg.random_v_seed)
            logger.info(f"directions: Haar-random control (seed {cfg.random_v_seed}) matched to that basis: "
                        f"{len(d.v_hack)} modules / {d.n_axes()} axes; v_grad on every module; never refreshed")
        return cls(cfg, d, pairs, device, basis)

    def _to_device(self) -> None:
        if self.d is not None:
            self.d.v_hack = {n: v.to(self.device) for n, v in self.d.v_hack.items()}
            self.d.v_grad = {n: v.to(self.device) for n, v in self.d.v_grad.items()}

    # ── what the loop reads ──
    @property
    def active(self) -> bool:
        return self.d is not None

    @property
    def refreshable(self) -> bool:
        return self.d is not None and not self.d.is_control

    @property
    def v_hack(self) -> dict[str, torch.Tensor] | None:
        return self.d.v_hack if self.d is not None else None

    @property
    def v_grad(self) -> dict[str, torch.Tensor] | None:
        return self.d.v_grad if self.d is not None else None

    def refresh(self, model, tok, knobs, step: int) -> str:
        """Re-extract against the current model (quarantine ablated); returns the table marker."""
        c = self.cfg
        res = vhack.refresh(model, tok, knobs, self.pairs, self.d, top_k=c.v_hack_extract_top_k,
                            tau_axis=c.v_hack_tau_axis, n_heldout=c.v_hack_n_heldout, k_use=c.v_hack_k,
                            drop_bottom_frac=c.v_hack_drop_bottom_frac, device=self.device,
                            sign=c.v_hack_sign, pair_norm=c.vhack_pair_loss)
        if not res.refreshed:
            return "-"
        self.d = res.directions
        self._to_device()
        ovl = res.overlap_v_grad if self.basis == "v_grad" else res.overlap_v_hack
        self.overlaps.append(ovl)
        logger.info(f"refresh@step{step}: {len(self.d.v_hack)} modules / {self.d.n_axes()} axes, basis overlap "
                    f"with previous v_hack={res.overlap_v_hack:.3f} v_grad={res.overlap_v_grad:.3f} "
                    "(near 1 = a stable hack subspace; < 0.2 = the refresh rotated it)")
        return f"{ovl:.2f}" if not math.isnan(ovl) else "rfr"

    # ── resume ──
    def state_dict(self) -> dict:
        if self.d is None:
            return {}
        cpu = lambda m: {n: t.detach().cpu() for n, t in m.items()}  # noqa: E731
        return {"v_hack": cpu(self.d.v_hack), "sv": cpu(self.d.sv), "v_grad": cpu(self.d.v_grad),
                "meta": dict(self.d.meta), "dropped": list(self.d.dropped), "overlaps": list(self.overlaps)}

    def load_state_dict(self, st: dict) -> None:
        if not st:
            self.d = None
            return
        self.d = vhack.Directions(st["v_hack"], st["sv"], st["v_grad"], meta=st["meta"], dropped=st["dropped"])
        self.overlaps = list(st.get("overlaps", []))
        self._to_device()
