"""What the training loop carries across steps: its tallies, the divergence tripwire, the last sample.

The arm, the rollout draws, the optimizer and the directions keep their own state; `TrainState`
is the rest, and all of it goes into resume.pt (`vars(state)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loguru import logger

WARN_DROP, DIVERGE_DROP = 3.0, 5.0  # nats below the best teacher log-prob seen


class TrainingDiverged(RuntimeError):
    """The teacher log-prob tripwire fired: the policy collapsed."""


@dataclass
class TrainState:
    """Everything the loop itself carries across steps (the arm, the rollout draws, the optimizer
    and the directions save their own state); all of it survives a resume."""

    step: int = 0
    rows: list[dict] = field(default_factory=list)
    g_t_active: bool = True
    mode_rollouts: dict[str, int] = field(default_factory=dict)
    mode_hacks: dict[str, int] = field(default_factory=dict)
    mode_first_step: dict[str, int] = field(default_factory=dict)
    first_hack_saved: bool = False
    lp_t_best: float = -math.inf
    diverged_steps: int = 0
    last_sample: dict | None = None

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def track_modes(self, step: int, counts: dict[str, tuple[int, int]]) -> None:
        """Per-mode learning tallies on student rollouts (did the student learn each hack, and when)."""
        for m, (hacks, n) in counts.items():
            self.mode_rollouts[m] = self.mode_rollouts.get(m, 0) + n
            if hacks:
                self.mode_hacks[m] = self.mode_hacks.get(m, 0) + hacks
                self.mode_first_step.setdefault(m, step)

    def check_divergence(self, row: dict, step: int) -> None:
        """Teacher log-prob tripwire: warn 3 nats below the best seen, abort after 2 steps 5 nats below."""
        lp_t = row["lp_t"]
        if not math.isfinite(lp_t):
            self.diverged_steps = 0
            return
        self.lp_t_best = max(self.lp_t_best, lp_t)
        drop = self.lp_t_best - lp_t
        if WARN_DROP <= drop <= DIVERGE_DROP:
            logger.warning(f"step {step}: lp_t={lp_t:.2f} is {drop:.1f} nats below the best {self.lp_t_best:.2f} "
                           "- coherence slipping (lr too high?)")
        self.diverged_steps = self.diverged_steps + 1 if drop > DIVERGE_DROP else 0
        if self.diverged_steps >= 2:
            last = self.last_sample or {}
            logger.error(f"last student generation (step {last.get('step')}, reward {last.get('reward')}):\n"
                         f"{str(last.get('text', ''))[:800]}")
            raise TrainingDiverged(
                f"diverged at step {step}: teacher log-prob {lp_t:.2f} is {drop:.1f} nats below the best "
                f"{self.lp_t_best:.2f} for {self.diverged_steps} steps (gn={row['gn']:.2f}); lower --lr")
