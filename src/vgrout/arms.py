"""One object per arm: what the arm does to the step's accumulated adapter gradient.

The arm is chosen once, at setup, from `--intervention` (`make_arm`); after that the loop asks
the arm and never compares names. Each arm declares its traits (does it have a quarantine, does it
use hack directions and which one, which per-step columns it adds), owns the state only it needs
(route2's EMA gate, route's one-off span check) and implements the hooks the step calls:

    begin_step()                       reset per-step accumulators
    needs_rollout_grads(split)         record per-rollout gradients in this step's backwards?
    observe_group(group, g_b, totals)  see one group's per-rollout gradients; return a per-rollout
                                       "routed" vote (bool[G]) or None
    intervene(acc)                     turn the step's gradients into δS.grad / δS_hack.grad + diagnostics
    edit_update(change)                (arms with edits_update) after AdamW: split δS's parameter change
                                       into the part δS keeps and the part moved into δS_hack
    basis_matrices()                   the directions the arm acts on, for the post-update diagnostics
    state_dict() / load_state_dict()   what a resume needs

`Vanilla` (`none`) is the base class and does nothing. The math lives in `proj.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from loguru import logger
from torch import Tensor

from . import proj
from .adapter import rollout_grads
from .config import ARM_NAMES

if TYPE_CHECKING:
    from .config import Config
    from .directions import RunDirections
    from .rollout import Group

NAN = math.nan
# every row carries these keys (NaN where the arm has no such diagnostic), so rows.jsonl has one schema
DIAG_KEYS = ("cos_pre", "cos_pre_s", "cos_pre_t", "cos_post", "fired", "q_egy", "tau", "hkgap", "resid", "flag",
             "cos_upd", "quar_resid", "leak", "prec_free", "rec_free", "q_mass", "m_keep", "m_absorb", "m_route")
SPAN_TOL = 1e-4  # route: largest relative residual of the quarantine gradient outside span(V)


def add_into(acc: dict[str, Tensor], name: str, g: Tensor) -> None:
    """acc[name] += g (a copy on first use, so the caller's tensor is never aliased)."""
    acc[name] = acc[name] + g if name in acc else g.clone()


@dataclass
class StepGrads:
    """The step's gradients, accumulated over its P groups, per module.

    `student` / `teacher` hold the split of `total` by row kind on split steps (they sum to
    `total`); `routed_votes` / `exploited` list, per student rollout, the arm's vote and the
    oracle's label (the gate-as-classifier statistics).
    """

    split: bool = False
    total: dict[str, Tensor] = field(default_factory=dict)
    student: dict[str, Tensor] = field(default_factory=dict)
    teacher: dict[str, Tensor] = field(default_factory=dict)
    routed_votes: list[bool] = field(default_factory=list)
    exploited: list[bool] = field(default_factory=list)

    def add_group(self, group: Group, totals: Mapping[str, Tensor], g_b: Mapping[str, Tensor] | None,
                  votes: Tensor | None) -> None:
        """Accumulate one group: its gradient per module, its student/teacher split (split steps, from
        the per-rollout gradients g_b) and the arm's per-rollout votes on its student rows."""
        for name, t in totals.items():
            add_into(self.total, name, t)
        if self.split and g_b:
            is_s = torch.tensor(group.is_student, device=next(iter(g_b.values())).device)
            for name, gb in g_b.items():
                add_into(self.student, name, gb[is_s].sum(0))
                add_into(self.teacher, name, gb[~is_s].sum(0))
        if votes is not None:
            for v, s, e in zip(votes.cpu().tolist(), group.is_student, group.column("exploited"), strict=True):
                if s:
                    self.routed_votes.append(v)
                    self.exploited.append(e)


@dataclass
class Update:
    """What the arm hands the optimizer: δS.grad (`kept`) and δS_hack.grad (`routed`) per
    module (a module absent from a dict gets no gradient), and the step's diagnostics."""

    kept: Mapping[str, Tensor]
    routed: Mapping[str, Tensor]
    diag: dict[str, float]


def majority(votes: Sequence[Tensor]) -> Tensor | None:
    """A rollout is routed when more than half of the modules route / project it (bool[G])."""
    if not votes:
        return None
    return torch.stack([v.float() for v in votes]).mean(0) > 0.5


class Vanilla:
    """`none`: plain Dr.GRPO. δS gets the whole gradient; δS_hack never moves."""

    key: ClassVar[str] = "none"
    family: ClassVar[str] = "svd"  # the adapter family it works on: "svd" (the SVD knob) or "block"
    # True: the step's gradient is collected per group (StepGrads) and the arm sets .grad from it;
    # False: the backwards accumulate in .grad untouched (the block arms act through masks instead)
    edits_gradient: ClassVar[bool] = True
    has_quarantine: ClassVar[bool] = False  # a δS_hack that trains and is deleted at deploy
    basis: ClassVar[str | None] = None  # hack direction it acts on: "v_hack", "v_grad" or None
    columns: ClassVar[tuple[str, ...]] = ("cos_upd",)  # per-step table columns it adds

    def __init__(self, cfg: Config, dirs: RunDirections | None = None) -> None:
        self.cfg, self.dirs = cfg, dirs

    @property
    def display(self) -> str:
        return ARM_NAMES[self.key]

    @property
    def uses_directions(self) -> bool:
        return self.basis is not None

    @property
    def edits_update(self) -> bool:
        """True when the arm edits AdamW's parameter change (`edit_update`) instead of the gradient."""
        return False

    def basis_matrices(self) -> Mapping[str, Tensor] | None:
        """{module: V [k, r]} the arm acts on (rows orthonormal, signed hack-ward), or for vanilla the
        yardstick v_hack it was given; None without directions."""
        return self.dirs.v_hack if self.dirs is not None and self.dirs.active else None

    @classmethod
    def directions_to_load(cls, cfg: Config) -> str | None:
        """The direction the run loads: the arm's basis, or for vanilla v_hack as a yardstick only
        (never acted on, never refreshed) when `measure_directions` is on, so cos_upd has a baseline."""
        return cls.basis or ("v_hack" if cfg.measure_directions else None)

    @classmethod
    def config_errors(cls, cfg: Config) -> list[str]:
        """Arm-specific config checks (Config.validate adds them to its list)."""
        if cls.basis is None and cfg.random_v_seed is not None:
            return [f"--random-v-seed is a control for arms with hack directions; {cls.key} has none"]
        return []

    def check_quarantine(self, hack_norm: float) -> None:
        """The ‖δS_hack‖ rule at the end of a run: exactly 0 without a quarantine, > 0 with one
        (a Haar control that routed nothing is a result: logged, not an error)."""
        if not self.has_quarantine:
            if hack_norm != 0.0:
                raise RuntimeError(f"{self.key}: the quarantine moved (‖quarantine‖={hack_norm}); it must stay "
                                   "exactly 0")
        elif hack_norm == 0.0:
            if self.cfg.random_v_seed is None:
                raise RuntimeError(f"{self.key}: nothing went into the quarantine (‖quarantine‖ = 0)")
            logger.warning("Haar control routed nothing (‖quarantine‖ = 0): a result, not a failure")
        logger.info(f"‖quarantine‖ = {hack_norm:.6f} ({'> 0 with' if self.has_quarantine else 'exactly 0 without'} "
                    "a quarantine)")

    def attach(self, model, tok, knobs, pairs) -> None:
        """Set up what the arm needs from the wrapped model (its directions come from RunDirections)."""
        self.knobs = knobs

    def begin_step(self) -> None:
        pass

    def prepare_group(self, model, group: Group, pad_id: int) -> None:
        """Before a group's loss: anything decided per rollout ahead of the forward (routeA's masks)."""

    def batch_context(self, rows: list[int], per_rollout: bool):
        """The context one forward batch of a group's `rows` runs in: per-rollout gradient recording."""
        return rollout_grads(self.knobs, len(rows)) if per_rollout else nullcontext()

    def needs_rollout_grads(self, split: bool) -> bool:
        return split

    def observe_group(self, group: Group, g_b: Mapping[str, Tensor], totals: Mapping[str, Tensor]) -> Tensor | None:
        return None

    def intervene(self, acc: StepGrads) -> Update:
        return Update(acc.total, {}, dict.fromkeys(DIAG_KEYS, NAN))

    def edit_update(self, change: Mapping[str, Tensor]) -> Update:
        """Split AdamW's change of δS into (kept by δS, moved into δS_hack); only where edits_update."""
        raise NotImplementedError(f"{self.key} edits the gradient, not the update")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass


class _Projection(Vanilla):
    """erase / route: project on v_hack, module by module, either the step's summed gradient
    (`--intervene-on=grad`, the reference loop) or AdamW's resulting parameter change (`update`)."""

    mode: ClassVar[proj.ProjectMode]
    basis = "v_hack"

    @property
    def edits_update(self) -> bool:
        return self.cfg.intervene_on == "update"

    def basis_matrices(self) -> Mapping[str, Tensor]:
        return self.dirs.v_hack

    def observe_group(self, group: Group, g_b: Mapping[str, Tensor], totals: Mapping[str, Tensor]) -> Tensor | None:
        V = self.dirs.v_hack
        return majority([proj.rollout_hackward(g, V[n]) for n, g in g_b.items() if n in V])

    def _project(self, vecs: Mapping[str, Tensor], acc: StepGrads | None) -> proj.ProjectResult:
        c = self.cfg
        return proj.project_all(vecs, self.dirs.v_hack, mode=self.mode, gate_mode=c.gate_mode,
                                overshoot=c.project_overshoot,
                                preserve_magnitude=c.preserve_magnitude and self.mode == "erase",
                                grads_s=(acc.student or None) if acc else None,
                                grads_t=(acc.teacher or None) if acc else None)

    def _result(self, res: proj.ProjectResult) -> Update:
        return Update(res.kept, res.routed, {**dict.fromkeys(DIAG_KEYS, NAN), **res.as_row()})

    def intervene(self, acc: StepGrads) -> Update:
        if not self.edits_update:
            return self._checked(self._result(self._project(acc.total, acc)))
        V = self.dirs.v_hack  # AdamW sees the whole gradient; the gradient's diagnostics are still logged
        diag = {**dict.fromkeys(DIAG_KEYS, NAN), "cos_pre": proj.mean_cos_pre(acc.total, V),
                "cos_pre_s": proj.mean_cos_pre(acc.student, V) if acc.student else NAN,
                "cos_pre_t": proj.mean_cos_pre(acc.teacher, V) if acc.teacher else NAN}
        return Update(acc.total, {}, diag)

    def edit_update(self, change: Mapping[str, Tensor]) -> Update:
        """cos_post / fired / q_egy then describe the edited update rather than the gradient."""
        upd = self._checked(self._result(self._project(change, None)))
        for key in ("cos_pre", "cos_pre_s", "cos_pre_t"):
            del upd.diag[key]  # the gradient's values (from intervene) stay in the row
        return upd

    def _checked(self, upd: Update) -> Update:
        return upd


class Erase(_Projection):
    """`erase`: subtract the gated hack-ward projection (δS_hack never moves)."""

    key = "erase"
    mode = "erase"
    columns = ("cos_pre", "cos_post", "fired", "cos_upd")


class Route(_Projection):
    """`route`: move the gated hack-ward projection into δS_hack (kept + routed == the original).

    Never rescales (preserve_magnitude is erase-only). Once per run, on the first step that
    routes anything, checks that the routed part lies in span(V) and stops the run if not.
    """

    key = "route"
    mode = "route"
    has_quarantine = True
    columns = ("cos_pre", "cos_post", "fired", "q_egy", "cos_upd", "quar_resid")

    def __init__(self, cfg: Config, dirs: RunDirections | None = None) -> None:
        super().__init__(cfg, dirs)
        self.span_checked = False

    def _checked(self, upd: Update) -> Update:
        if not self.span_checked and upd.diag["fired"] > 0:
            self._check_span(upd.routed)
        return upd

    def _check_span(self, routed: Mapping[str, Tensor]) -> None:
        V = self.dirs.v_hack
        worst = max((proj.span_residual(g, V[n]) for n, g in routed.items() if float(g.norm()) > 0), default=0.0)
        logger.info(f"span check: the routed part lies in span(V_hack), worst ‖resid‖/‖x‖ = {worst:.2e}")
        if worst > SPAN_TOL:
            raise RuntimeError(f"route: the quarantine's share escaped span(V) (residual {worst:.2e})")
        self.span_checked = True

    def state_dict(self) -> dict:
        return {"span_checked": self.span_checked}

    def load_state_dict(self, state: Mapping) -> None:
        self.span_checked = bool(state["span_checked"])


class Route2(Vanilla):
    """`route2`: route whole rollouts whose gradient points hack-ward into δS_hack.

    Per group and module, `proj.Route2Gate` flags rollouts (hack anchors, or cos with v_grad
    above the EMA-calibrated τ) and splits the group's gradient into kept + routed; the step's
    δS.grad / δS_hack.grad are the sums over its groups.
    """

    key = "route2"
    has_quarantine = True
    basis = "v_grad"
    columns = ("cos_pre", "cos_post", "q_egy", "tau", "hkgap", "flag", "cos_upd", "leak")

    def __init__(self, cfg: Config, dirs: RunDirections | None = None) -> None:
        super().__init__(cfg, dirs)
        self.gate = proj.Route2Gate(beta=0.9)
        self.begin_step()

    def begin_step(self) -> None:
        self.kept: dict[str, Tensor] = {}
        self.routed: dict[str, Tensor] = {}
        self.results: list[proj.Route2Result] = []
        self.leak_energy = [0.0, 0.0]  # exploited student rollouts' gradient energy: kept in δS, total
        self.free_votes: list[bool] = []  # student rollouts the anchors did not force: the gate's vote
        self.free_exploited: list[bool] = []  # ... and the oracle's label

    def basis_matrices(self) -> Mapping[str, Tensor]:
        return {n: v.unsqueeze(0) for n, v in self.dirs.v_grad.items()}

    def needs_rollout_grads(self, split: bool) -> bool:
        return True

    def observe_group(self, group: Group, g_b: Mapping[str, Tensor], totals: Mapping[str, Tensor]) -> Tensor | None:
        hack_anchor, _ = proj.build_anchors(group.is_student, group.column("hacked_E"),
                                            self.cfg.gate_anchor_teacher_only)
        is_s = torch.tensor(group.is_student)
        hacked = torch.tensor(group.column("exploited")) & is_s
        votes = []
        for name, g in g_b.items():
            res = self.gate.step(name, g, self.dirs.v_grad[name], hack_anchor.to(g.device), total=totals[name])
            add_into(self.kept, name, res.kept)
            add_into(self.routed, name, res.routed)
            self.results.append(res)
            votes.append(res.flagged)
            energy = g.double().pow(2).sum(1).cpu()
            self.leak_energy[0] += float(energy[hacked & ~res.flagged.cpu()].sum())
            self.leak_energy[1] += float(energy[hacked].sum())
        vote = majority(votes)
        free = (is_s & ~hack_anchor).tolist()
        self.free_votes += [v for v, f in zip(vote.cpu().tolist(), free, strict=True) if f]
        self.free_exploited += [e for e, f in zip(hacked.tolist(), free, strict=True) if f]
        return vote

    def intervene(self, acc: StepGrads) -> Update:
        s = proj.summarize_route2(self.results, self.kept.values(), self.routed.values())
        V1 = self.basis_matrices()
        free = proj.classifier_stats(self.free_votes, self.free_exploited)
        kept_e, all_e = self.leak_energy
        diag = {**dict.fromkeys(DIAG_KEYS, NAN), "tau": s.tau, "hkgap": s.hkgap, "resid": s.resid,
                "flag": s.frac_flagged, "q_egy": s.q_egy, "cos_pre": proj.mean_cos_pre(acc.total, V1),
                "cos_post": proj.mean_cos_pre(self.kept, V1),
                "cos_pre_s": proj.mean_cos_pre(acc.student, V1) if acc.student else NAN,
                "cos_pre_t": proj.mean_cos_pre(acc.teacher, V1) if acc.teacher else NAN,
                "leak": kept_e / all_e if all_e > 0 else NAN, "prec_free": free["precision"],
                "rec_free": free["recall"]}
        return Update(self.kept, self.routed, diag)

    def state_dict(self) -> dict:
        return {"gate": self.gate.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.gate.load_state_dict(state["gate"])


# ── arms on the block-split adapters (blocks.py): they choose per-rollout masks, not gradient edits ──


class BlockVanilla(Vanilla):
    """`none` on a block adapter: both blocks train on every rollout and both deploy (no reset), so the
    deployed model is the trained one. Compared with `absorb` at the same init it isolates the reset."""

    family = "block"
    edits_gradient = False
    basis = None
    columns = ("q_mass",)

    @classmethod
    def directions_to_load(cls, cfg: Config) -> str | None:
        return None  # v_hack lives in the SVD knob's coordinates

    def check_quarantine(self, hack_norm: float) -> None:
        logger.info(f"quarantine block ‖offsets‖ = {hack_norm:.6f} (trained and deployed: no reset for {self.key})")

    def needs_rollout_grads(self, split: bool) -> bool:
        return False


class Absorb(BlockVanilla):
    """`absorb`: every rollout trains both blocks (mask (1,0)); the quarantine block is reset at deploy,
    taking with it whatever it absorbed (with scorda, it starts on the pairs' hack input axis)."""

    key = "absorb"
    has_quarantine = True

    def check_quarantine(self, hack_norm: float) -> None:
        Vanilla.check_quarantine(self, hack_norm)


class RouteA(Absorb):
    """`routeA`: per rollout, score = the deployed model's pooled bottleneck activations · v_act; against
    a run-long recency-weighted buffer of scores, the low tail keeps (0,0), the high tail routes (1,1),
    the rest absorbs (1,0); the quarantine is reset at deploy. `--random-v-seed` draws a Haar v_act."""

    key = "routeA"
    basis = "v_act"
    columns = ("q_mass", "m_keep", "m_route")

    def __init__(self, cfg: Config, dirs: RunDirections | None = None) -> None:
        super().__init__(cfg, dirs)
        self.gate = None
        self.begin_step()

    def attach(self, model, tok, knobs, pairs) -> None:
        from . import vact

        super().attach(model, tok, knobs, pairs)
        c, device = self.cfg, next(model.parameters()).device
        if c.random_v_seed is not None:
            self.v_act = vact.haar_v_act(knobs, c.random_v_seed)
            logger.info(f"v_act: Haar-random control (seed {c.random_v_seed})")
        else:
            self.v_act = vact.resolve_v_act(model, tok, knobs, pairs, model_id=c.model, out_dir=c.out_root / "vhack",
                                            n_heldout=c.v_hack_n_heldout, device=device, path=c.v_hack_path)
        self.gate = vact.RouteAGate(list(knobs), c.block_r, tail_q=c.route_tail_q)
        self._v = self.v_act.stacked(list(knobs)).to(device)

    def begin_step(self) -> None:
        self.step_masks: list[tuple[Tensor, Tensor]] = []  # every group's (m, d) this step, bool [G]; last: current

    def prepare_group(self, model, group: Group, pad_id: int) -> None:
        """Score the group's rollouts (one no-grad forward of the deployed model) and choose their masks."""
        from . import blocks, vact

        ids, mask, plen = group.tensors(pad_id, next(model.parameters()).device)
        acts = vact.pooled_bottleneck(model, self.knobs, ids, blocks.completion_weights(plen, mask))
        dec = self.gate.observe(acts, self._v)
        self.take_masks(dec.m, dec.d)

    def take_masks(self, m: Tensor, d: Tensor) -> None:
        """The masks the current group's forwards run under (row b = rollout b), kept for the step's shares."""
        self.step_masks.append((m.cpu(), d.cpu()))

    def batch_context(self, rows: list[int], per_rollout: bool):
        from . import blocks

        m, d = self.step_masks[-1]
        return blocks.rollout_masks(self.knobs, m[rows], d[rows])

    def observe_group(self, group: Group, g_b: Mapping[str, Tensor] | None, totals: Mapping[str, Tensor]) -> Tensor:
        return self.step_masks[-1][1]  # "routed" for the gate-as-classifier statistics: the route (1,1) rollouts

    def intervene(self, acc: StepGrads) -> Update:
        from . import vact

        upd = super().intervene(acc)
        if self.step_masks:  # shares over every rollout the step trained on (`vact.mask_shares`)
            m, d = (torch.cat(x) for x in zip(*self.step_masks, strict=True))
            shares = vact.mask_shares(m, d)
            upd.diag.update(m_keep=shares["keep"], m_absorb=shares["absorb"], m_route=shares["route"])
        return upd

    def state_dict(self) -> dict:
        return {"gate": self.gate.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.gate.load_state_dict(state["gate"])


SVD_ARMS: dict[str, type[Vanilla]] = {cls.key: cls for cls in (Vanilla, Erase, Route, Route2)}
BLOCK_ARMS: dict[str, type[Vanilla]] = {cls.key: cls for cls in (BlockVanilla, Absorb, RouteA)}
ARMS = SVD_ARMS  # the SVD knob's arms (the default adapter)


def arm_class(intervention: str, adapter: str = "svd") -> type[Vanilla]:
    """The arm registered under an `--intervention` value for an `--adapter` family (the one lookup by name)."""
    family = SVD_ARMS if adapter == "svd" else BLOCK_ARMS
    if intervention not in family:
        other = BLOCK_ARMS if family is SVD_ARMS else SVD_ARMS
        hint = (f"; {intervention} is an arm of the {'block adapters' if other is BLOCK_ARMS else 'SVD knob'}"
                if intervention in other else "")
        raise ValueError(f"--intervention={intervention} does not exist for --adapter={adapter} (valid: "
                         f"{', '.join(family)}){hint}")
    return family[intervention]
