"""The gradient interventions (erase, route, route2) and their diagnostics: pure tensor math.

Conventions used throughout:
- `g` is one module's accumulated δS gradient, shape [r].
- `V` is that module's hack basis, shape [k, r], with orthonormal rows, each signed so that
  a positive coefficient means "hack-ward".
- `v` (route2) is a single unit vector [r], signed hack-ward.

Nothing here touches modules, optimizers or logging: every diagnostic is returned as data
and the training loop decides what to print.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

GateMode = Literal["one_sided", "no_gate", "reverse"]
GATE_MODES: tuple[GateMode, ...] = get_args(GateMode)
ProjectMode = Literal["erase", "route"]

_NAN = float("nan")


def _check_gate_mode(gate_mode: str) -> None:
    if gate_mode not in GATE_MODES:
        raise ValueError(f"gate_mode={gate_mode!r} is not one of {', '.join(GATE_MODES)}")


def _check_basis(g: Tensor, V: Tensor) -> None:
    if g.ndim != 1 or V.ndim != 2 or V.shape[1] != g.shape[0]:
        raise ValueError(
            f"shape mismatch: gradient {tuple(g.shape)} vs basis {tuple(V.shape)}; "
            "expected g [r] and V [k, r]"
        )


def _as(V: Tensor, like: Tensor) -> Tensor:
    return V.to(device=like.device, dtype=like.dtype)


# ── gate ──────────────────────────────────────────────────────────────────────────────────


def coefficients(g: Tensor, V: Tensor) -> Tensor:
    """Coordinates of `g` along each hack axis: c = V g, shape [k].

    Invariant: with orthonormal rows, cᵀV is the orthogonal projection of g onto span(V).
    """
    _check_basis(g, V)
    return _as(V, g) @ g


def gate(c: Tensor, gate_mode: GateMode) -> Tensor:
    """Which part of the coefficients an intervention removes.

    - `one_sided`: relu(c), only the hack-ward (positive) coordinates;
    - `no_gate`:   c, the whole projection onto span(V);
    - `reverse`:   min(c, 0) = -relu(-c), only the anti-hack (negative) coordinates
      (the sign-flipped control: it leaves the hack-ward part alone).

    Invariant: gate(c, one_sided) + gate(c, reverse) == gate(c, no_gate) == c.
    """
    _check_gate_mode(gate_mode)
    if gate_mode == "one_sided":
        return torch.clamp(c, min=0.0)
    if gate_mode == "reverse":
        return torch.clamp(c, max=0.0)
    return c


def cos_pre(g: Tensor, V: Tensor) -> float:
    """Hack-ward fraction of a gradient: ‖relu(V g)‖ / ‖g‖ in [0, 1] (NaN for g = 0).

    Invariant: equals 0 exactly when g has no positive coordinate along any hack axis, and 1
    when g lies in the positive cone of the rows of V.
    """
    norm = float(g.norm())
    if norm == 0.0:
        return _NAN
    return float(torch.clamp(coefficients(g, V), min=0.0).norm()) / norm


def frac_fired(g: Tensor, V: Tensor, gate_mode: GateMode = "one_sided") -> float:
    """Fraction of the k hack axes on which the gate passes a non-zero coefficient for `g`."""
    c_use = gate(coefficients(g, V), gate_mode)
    return float((c_use != 0).float().mean()) if c_use.numel() else 0.0


def span_residual(x: Tensor, V: Tensor) -> float:
    """Relative part of `x` outside span(V): ‖x - Vᵀ(V x)‖ / ‖x‖ (0.0 for x = 0).

    Invariant: 0 (to fp tolerance) iff x ∈ span(V), given orthonormal rows. The route arm
    checks this once per run on the quarantine gradient.
    """
    norm = float(x.norm())
    if norm == 0.0:
        return 0.0
    Vx = _as(V, x)
    return float((x - Vx.T @ (Vx @ x)).norm()) / norm


# ── erase / route ─────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class ProjDiag:
    """Per-module diagnostics of one erase/route application."""

    cos_pre: float  # ‖relu(V g)‖/‖g‖ before
    cos_post: float  # the same on the gradient the deployed knob receives
    frac_fired: float  # fraction of axes the gate acted on
    norm_pre: float  # ‖g‖
    norm_post: float  # ‖g'‖ (deployed knob's gradient)
    norm_removed: float  # ‖removed‖ (erased or routed part)


def _removed_part(
    g: Tensor, V: Tensor, gate_mode: GateMode, overshoot: float
) -> tuple[Tensor, Tensor]:
    if not math.isfinite(overshoot) or overshoot < 0:
        raise ValueError(f"overshoot must be a finite number >= 0, got {overshoot!r}")
    c_use = gate(coefficients(g, V), gate_mode)
    return overshoot * (c_use @ _as(V, g)), c_use


def _diag(g: Tensor, g_new: Tensor, removed: Tensor, c_use: Tensor, V: Tensor) -> ProjDiag:
    """Diagnostics of one erase/route application (g_new: what the deployed knob receives)."""
    return ProjDiag(
        cos_pre=cos_pre(g, V),
        cos_post=cos_pre(g_new, V),
        frac_fired=float((c_use != 0).float().mean()) if c_use.numel() else 0.0,
        norm_pre=float(g.norm()),
        norm_post=float(g_new.norm()),
        norm_removed=float(removed.norm()),
    )


def erase(
    g: Tensor,
    V: Tensor,
    *,
    gate_mode: GateMode = "one_sided",
    overshoot: float = 1.0,
    preserve_magnitude: bool = False,
) -> tuple[Tensor, Tensor, ProjDiag]:
    """Subtract the gated projection: g' = g - overshoot · gate(V g)ᵀ V.

    Returns (g', removed, diag) where `removed` = overshoot · gate(V g)ᵀ V lies in span(V).
    Invariants (rows of V orthonormal):
    - the component of g orthogonal to span(V) is unchanged (without preserve_magnitude);
    - one_sided, overshoot 1: relu(V g') = 0; no_gate: V g' = 0; reverse: min(V g', 0) = 0;
    - overshoot s: each gated coefficient becomes (1 - s)·c, so s = 1.1 flips 10% of it;
    - preserve_magnitude: g' is rescaled so ‖g'‖ = ‖g‖ (then g' + removed ≠ g in general;
      left as is when g' = 0).
    """
    removed, c_use = _removed_part(g, V, gate_mode, overshoot)
    g_new = g - removed
    if preserve_magnitude:
        n_new = g_new.norm()
        if float(n_new) > 0.0:
            g_new = g_new * (g.norm() / n_new)
    return g_new, removed, _diag(g, g_new, removed, c_use, V)


def route(
    g: Tensor,
    V: Tensor,
    *,
    gate_mode: GateMode = "one_sided",
    overshoot: float = 1.0,
    preserve_magnitude: bool = False,
) -> tuple[Tensor, Tensor, ProjDiag]:
    """Split g into (kept, routed): routed = overshoot · gate(V g)ᵀ V, kept = g - routed.

    `routed` becomes δS_hack.grad (the quarantine, deleted at deploy); `kept` is δS.grad.
    Invariants: kept + routed == g (to fp rounding) and routed ∈ span(V).

    preserve_magnitude is refused: rescaling `kept` (as erase does) would either break
    kept + routed == g or push `routed` out of span(V), and route's claim rests on both.
    """
    if preserve_magnitude:
        raise ValueError(
            "preserve_magnitude is an erase-only option: route must conserve the gradient "
            "(kept + routed == g, routed in span(V)); run the route arm with "
            "preserve_magnitude=False (--no-preserve-magnitude)"
        )
    routed, c_use = _removed_part(g, V, gate_mode, overshoot)
    kept = g - routed
    return kept, routed, _diag(g, kept, routed, c_use, V)


def nanmean(xs: Iterable[float | None]) -> float:
    """Mean of the values that are neither None nor NaN; NaN when none is left."""
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(vals) / len(vals) if vals else _NAN


def _global_norm(ts: Iterable[Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in ts))


def q_egy(keep: Iterable[Tensor], quar: Iterable[Tensor]) -> float:
    """Share of the update sent to the quarantine: ‖g_quar‖ / (‖g_keep‖ + ‖g_quar‖).

    Norms are global L2 norms over all modules. In [0, 1]; 0.0 when both are zero.
    """
    nk, nq = _global_norm(keep), _global_norm(quar)
    return nq / (nk + nq) if (nk + nq) > 0 else 0.0


def mean_cos_pre(grads: Mapping[str, Tensor], V: Mapping[str, Tensor]) -> float:
    """Mean over modules present in both dicts of cos_pre (NaN-skipping; NaN if none)."""
    return nanmean(cos_pre(grads[m], V[m]) for m in grads if m in V)


@dataclass
class ProjectResult:
    """Result of `project_all`: new gradients plus per-module and aggregate diagnostics.

    `kept[m]` is the δS.grad to use; `routed[m]` the δS_hack.grad (route only; empty for
    erase). Modules without a basis (dropped by postprocessing) pass through unchanged and
    are listed in `skipped`.
    """

    kept: dict[str, Tensor]
    routed: dict[str, Tensor]
    per_module: dict[str, ProjDiag]
    skipped: list[str]
    cos_pre: float
    cos_post: float
    cos_pre_s: float
    cos_pre_t: float
    frac_fired: float
    q_egy: float
    n_modules: int = field(default=0)

    def as_row(self) -> dict[str, float]:
        """The aggregate numbers as a flat dict (for the per-step table)."""
        return {
            "cos_pre": self.cos_pre, "cos_pre_s": self.cos_pre_s, "cos_pre_t": self.cos_pre_t,
            "cos_post": self.cos_post, "fired": self.frac_fired, "q_egy": self.q_egy,
        }


def project_all(
    grads: Mapping[str, Tensor],
    V: Mapping[str, Tensor],
    *,
    mode: ProjectMode,
    gate_mode: GateMode = "one_sided",
    overshoot: float = 1.0,
    preserve_magnitude: bool = False,
    grads_s: Mapping[str, Tensor] | None = None,
    grads_t: Mapping[str, Tensor] | None = None,
) -> ProjectResult:
    """Apply erase or route per module and aggregate the diagnostics.

    `grads_s` / `grads_t` (student-only / teacher-only gradients, optional) feed cos_pre_s /
    cos_pre_t; they are measured, never modified. Aggregates are means over the projected
    modules (NaN-skipping); frac_fired is the mean per-module fraction of axes fired;
    q_egy uses global norms of kept vs routed (0 for erase).
    """
    if mode not in get_args(ProjectMode):
        raise ValueError(f"mode={mode!r} is not one of {', '.join(get_args(ProjectMode))}")
    fn = erase if mode == "erase" else route
    kept: dict[str, Tensor] = {}
    routed: dict[str, Tensor] = {}
    per: dict[str, ProjDiag] = {}
    skipped: list[str] = []
    for m, g in grads.items():
        if m not in V:
            kept[m] = g
            skipped.append(m)
            continue
        new, rem, d = fn(
            g, V[m], gate_mode=gate_mode, overshoot=overshoot,
            preserve_magnitude=preserve_magnitude,
        )
        kept[m] = new
        per[m] = d
        if mode == "route":
            routed[m] = rem
    return ProjectResult(
        kept=kept,
        routed=routed,
        per_module=per,
        skipped=skipped,
        cos_pre=nanmean(d.cos_pre for d in per.values()),
        cos_post=nanmean(d.cos_post for d in per.values()),
        cos_pre_s=mean_cos_pre(grads_s, V) if grads_s else _NAN,
        cos_pre_t=mean_cos_pre(grads_t, V) if grads_t else _NAN,
        frac_fired=nanmean(d.frac_fired for d in per.values()),
        q_egy=q_egy(kept.values(), routed.values()),
        n_modules=len(per),
    )


def update_diagnostics(
    V: Mapping[str, Tensor], change: Mapping[str, Tensor], quarantine: Mapping[str, Tensor] | None
) -> dict[str, float]:
    """What the parameters did this step, read against the arm's basis V ({module: [k, r]}).

    - `cos_upd`: mean over modules of ‖relu(V Δ)‖ / ‖Δ‖ for δS's actual change Δ (after the
      optimizer): 0 exactly when no module's change has a hack-ward coordinate.
    - `quar_resid`: mean over modules with a non-zero quarantine of the relative part of δS_hack
      outside span(V) (`span_residual`); NaN without a quarantine.
    """
    resid = [span_residual(quarantine[m], V[m]) for m in V if m in quarantine and float(quarantine[m].norm()) > 0] \
        if quarantine is not None else []
    return {"cos_upd": mean_cos_pre(change, V), "quar_resid": nanmean(resid)}


def rollout_hackward(g_b: Tensor, V: Tensor) -> Tensor:
    """Per-rollout label for erase/route's gate-as-classifier: bool[G].

    A rollout counts as "routed" when its own gradient's hack-ward part outweighs its
    anti-hack part on span(V): ‖relu(V g_b)‖ > ‖relu(-V g_b)‖. (erase/route act on the
    summed gradient, so this is the per-rollout reading of what the one-sided gate removes.)
    """
    if g_b.ndim != 2 or V.ndim != 2 or g_b.shape[1] != V.shape[1]:
        raise ValueError(f"shape mismatch: g_b {tuple(g_b.shape)} vs V {tuple(V.shape)}")
    c = g_b @ _as(V, g_b).T  # [G, k]
    return torch.clamp(c, min=0).norm(dim=1) > torch.clamp(c, max=0).norm(dim=1)


# ── route2 ────────────────────────────────────────────────────────────────────────────────


def build_anchors(
    is_student: Sequence[bool], student_flags: Sequence[bool], teacher_only: bool
) -> tuple[Tensor, Tensor]:
    """τ-calibration anchors of route2: (hack_anchor, clean_anchor), bool[G] each.

    hack = teacher rows OR (unless `teacher_only`) detector-flagged student rows; clean is
    the exact complement. `student_flags` is either one flag per row (teacher entries are
    ignored) or one flag per student row, in the order student rows appear.
    """
    is_s = torch.as_tensor(list(is_student), dtype=torch.bool)
    n, n_s = is_s.numel(), int(is_s.sum())
    flags_in = torch.as_tensor(list(student_flags), dtype=torch.bool)
    if flags_in.numel() == n:
        flags = flags_in & is_s
    elif flags_in.numel() == n_s:
        flags = torch.zeros(n, dtype=torch.bool)
        flags[is_s] = flags_in
    else:
        raise ValueError(
            f"student_flags has {flags_in.numel()} entries; expected {n} (one per row) or "
            f"{n_s} (one per student row)"
        )
    hack = ~is_s
    if not teacher_only:
        hack = hack | flags
    return hack, ~hack


@dataclass(frozen=True)
class Route2Result:
    """One module's route2 split for one group of rollouts.

    kept + routed == total (δS.grad and δS_hack.grad contributions); `calibrated` is False
    while one of the two anchor EMAs has never been observed (its mean then counts as 0).
    """

    kept: Tensor  # [r]
    routed: Tensor  # [r]
    flagged: Tensor  # bool [G]
    cos_b: Tensor  # [G]
    tau: float
    hkgap: float  # ema_hack - ema_clean
    resid: float  # cos(kept, v); NaN when kept = 0
    calibrated: bool

    @property
    def frac_flagged(self) -> float:
        return float(self.flagged.float().mean()) if self.flagged.numel() else 0.0


def per_rollout_cos(g_b: Tensor, v: Tensor) -> Tensor:
    """cos_b = g_b · v / ‖g_b‖ for unit v, shape [G]; 0 for a zero rollout gradient."""
    return (g_b @ v.to(g_b)) / g_b.norm(dim=1).clamp_min(1e-30)


class Route2Gate:
    """Per-module EMA-calibrated threshold for route2.

    State per module: EMA (β) of the mean cos over hack-anchor rows and over clean-anchor
    rows; the first observation of each initialises it. τ = (ema_hack + ema_clean) / 2,
    computed after this step's update. State is plain floats, so `state_dict()` /
    `load_state_dict()` resume the EMA exactly.
    """

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"route2 EMA beta must be in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.ema_hack: dict[str, float] = {}
        self.ema_clean: dict[str, float] = {}

    def _update(self, store: dict[str, float], module: str, x: float) -> None:
        prev = store.get(module)
        store[module] = x if prev is None else self.beta * prev + (1.0 - self.beta) * x

    def tau(self, module: str) -> float:
        """Current threshold for `module` (unobserved anchor means count as 0)."""
        return 0.5 * (self.ema_hack.get(module, 0.0) + self.ema_clean.get(module, 0.0))

    def step(
        self,
        module: str,
        g_b: Tensor,
        v: Tensor,
        hack_anchor: Tensor | Sequence[bool],
        *,
        total: Tensor | None = None,
    ) -> Route2Result:
        """Update the EMAs with this group, then split the gradient.

        flagged = hack_anchor | (cos_b > τ); routed = Σ_flagged g_b; kept = total - routed,
        where total defaults to Σ_b g_b (pass the module's δS.grad if it holds terms not
        attributed to rollouts). Invariant: kept + routed == total; a hack-anchor rollout is
        always routed whole.
        """
        if g_b.ndim != 2 or v.ndim != 1 or g_b.shape[1] != v.shape[0]:
            raise ValueError(f"shape mismatch: g_b {tuple(g_b.shape)} vs v {tuple(v.shape)}")
        ha = torch.as_tensor(hack_anchor, dtype=torch.bool, device=g_b.device)
        if ha.shape != (g_b.shape[0],):
            raise ValueError(f"hack_anchor has shape {tuple(ha.shape)}, expected ({g_b.shape[0]},)")
        cos_b = per_rollout_cos(g_b, v)
        if ha.any():
            self._update(self.ema_hack, module, float(cos_b[ha].mean()))
        if (~ha).any():
            self._update(self.ema_clean, module, float(cos_b[~ha].mean()))
        tau = self.tau(module)
        flagged = ha | (cos_b > tau)
        routed = (g_b * flagged.unsqueeze(1).to(g_b.dtype)).sum(0)
        tot = g_b.sum(0) if total is None else total
        kept = tot - routed
        kn = float(kept.norm())
        resid = float(kept @ v.to(kept)) / kn if kn > 0 else _NAN
        return Route2Result(
            kept=kept,
            routed=routed,
            flagged=flagged,
            cos_b=cos_b,
            tau=tau,
            hkgap=self.ema_hack.get(module, 0.0) - self.ema_clean.get(module, 0.0),
            resid=resid,
            calibrated=module in self.ema_hack and module in self.ema_clean,
        )

    def state_dict(self) -> dict:
        """Plain-float state: {"beta", "ema_hack": {module: float}, "ema_clean": {...}}."""
        return {"beta": self.beta, "ema_hack": dict(self.ema_hack),
                "ema_clean": dict(self.ema_clean)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a `state_dict()`; a different beta is an error (it would change τ)."""
        try:
            beta, eh, ec = state["beta"], state["ema_hack"], state["ema_clean"]
        except KeyError as e:
            raise ValueError(f"route2 gate state is missing key {e}") from None
        if float(beta) != self.beta:
            raise ValueError(f"route2 gate state has beta={beta}, this gate uses {self.beta}")
        self.ema_hack = {str(k): float(x) for k, x in eh.items()}
        self.ema_clean = {str(k): float(x) for k, x in ec.items()}


@dataclass
class Route2StepDiag:
    """Aggregate route2 diagnostics over the (prompt, module) applications of one step."""

    tau: float
    hkgap: float
    resid: float
    frac_flagged: float
    q_egy: float


def summarize_route2(
    results: Sequence[Route2Result], kept: Iterable[Tensor], routed: Iterable[Tensor]
) -> Route2StepDiag:
    """Means of τ / hkgap / resid / flagged fraction over `results`; q_egy from the
    step's final per-module kept and routed gradients."""
    return Route2StepDiag(
        tau=nanmean(r.tau for r in results),
        hkgap=nanmean(r.hkgap for r in results),
        resid=nanmean(r.resid for r in results),
        frac_flagged=nanmean(r.frac_flagged for r in results),
        q_egy=q_egy(kept, routed),
    )


# ── the gate as a classifier of exploits ──────────────────────────────────────────────────


def classifier_stats(routed: Sequence[bool], exploited: Sequence[bool]) -> dict[str, float]:
    """Precision / recall / F0.5 of "routed" against the oracle's "exploited" labels.

    Pass student rollouts only. F_β with β = 0.5 weights precision:
    F = (1 + β²)·P·R / (β²·P + R). Undefined ratios are NaN (no routed rows -> precision
    NaN; no exploited rows -> recall NaN; F0.5 NaN if either is); P = R = 0 gives F0.5 = 0.
    """
    r = [bool(x) for x in routed]
    e = [bool(x) for x in exploited]
    if len(r) != len(e):
        raise ValueError(f"routed has {len(r)} labels but exploited has {len(e)}")
    tp = sum(a and b for a, b in zip(r, e, strict=True))
    fp = sum(a and not b for a, b in zip(r, e, strict=True))
    fn = sum(b and not a for a, b in zip(r, e, strict=True))
    p = tp / (tp + fp) if tp + fp else _NAN
    rc = tp / (tp + fn) if tp + fn else _NAN
    if math.isnan(p) or math.isnan(rc):
        f = _NAN
    elif p + rc == 0:
        f = 0.0
    else:
        f = 1.25 * p * rc / (0.25 * p + rc)
    return {"precision": p, "recall": rc, "f05": f, "tp": tp, "fp": fp, "fn": fn, "n": len(r)}
