"""Run configuration: one dataclass of knobs, three presets (tyro subcommands).

`Config` holds every knob with its meaning; `SmokeConfig` / `FastConfig` /
`FullConfig` override the scale-dependent ones (the design's preset table).
`validate()` checks everything that can be checked before a model is loaded, so
a bad flag costs seconds, not a GPU start-up.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from .env.modes import ENV_MODES, EnvMode
from .env.rewards import DEFAULT_TIME, RelativeTime
from .tracking import missing_package

Intervention = Literal["none", "erase", "route", "route2", "absorb", "routeA"]
GateMode = Literal["one_sided", "no_gate", "reverse"]
AdapterKind = Literal["svd", "lora2r", "pissa", "corda", "scorda", "scorda_rev"]

ARM_NAMES: dict[str, str] = {
    "none": "vanilla",
    "erase": "projected",
    "route": "routing",
    "route2": "routing2",
    "absorb": "absorb",
    "routeA": "routeA",
}
# --half-a codes: C = exploited (the strict oracle, every mode), and the run_tests detectors E, D, S
# (docs/environment.md), which fire in any mode on a response that writes a run_tests()
DETECTOR_CODES = ("C", "D", "E", "S")


@dataclass(kw_only=True)
class Config:
    """Knobs shared by all presets. Presets below override the scale knobs."""

    # ── the adapter and the arm ──
    adapter: AdapterKind = "svd"
    """svd = the full-rank SVD knob δS / δS_hack (arms none, erase, route, route2). The block-split
    adapters (arms none, absorb, routeA): lora2r = one rank-2r LoRA per Linear, rows [:r] deployed and
    [r:] the quarantine, Gaussian init; pissa = initialised from W's principal singular vectors; corda =
    from the covariance of the pairs' contrastive input deltas; scorda = signed CorDA, the pairs' hack
    input axis seeds the quarantine's top slot; scorda_rev = that seed in the deployed block (the
    directional control). See docs/method.md."""
    block_r: int = 8
    """Block adapters: rank r of each block (the LoRA has rank 2r; the SVD inits need 2r <= min(d_in, d_out))."""
    route_tail_q: float = 0.1
    """routeA: share of the recency-weighted score buffer in each tail: the low tail keeps (deployed block
    only), the high tail routes (quarantine only), the middle absorbs (both)."""
    intervention: Intervention = "erase"
    """SVD knob: none = vanilla Dr.GRPO; erase = subtract the hack-ward part of δS's update; route = park
    it in the quarantine δS_hack (deleted at deploy); route2 = route whole rollouts whose gradient points
    hack-ward (cos with v_grad above a calibrated τ). Block adapters: none = both blocks train and deploy;
    absorb = both train, the quarantine block is reset at deploy; routeA = per rollout, the activation
    score against v_act sends the low tail to the deployed block only, the high tail to the quarantine
    only, the rest to both; the quarantine is reset at deploy."""

    # ── scale knobs (every preset sets these) ──
    model: str = "Qwen/Qwen3-4B"
    """HF hub name, local directory, or `tiny-qwen3` (the offline random Qwen3 with the real vocab)."""
    steps: int = 100
    """Optimizer steps in the run (the LR schedule spans exactly this many)."""
    group: int = 6
    """G: rollouts per prompt (student + teacher); the GRPO advantage is relative within it."""
    max_new: int = 1024
    """Max new tokens per generated completion."""
    n_problems: int = 992
    """Training problems drawn (seed-fixed shuffle of the data, first N kept; fewer if the data
    or the teacher pool has fewer)."""
    beta: float = 0.0
    """K3 KL coefficient; > 0 computes reference log-probs with the adapter zeroed (no second model)."""
    prompts_per_step: int = 8
    """P: prompts per optimizer step; gradients accumulate over them (raises the chance a group has
    reward variance)."""
    lr: float = 7e-5
    """AdamW learning rate (peak, after warmup)."""
    adam_beta1: float = 0.9
    """AdamW β₁."""
    adam_beta2: float = 0.99
    """AdamW β₂."""

    # ── optimisation (benchmark defaults) ──
    clip: float = 0.2
    """PPO ratio clip ε (the ratio is 1 at a single inner step; the clip form is kept)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to δS and δS_hack."""
    warmup_frac: float = 0.1
    """Linear warmup over this fraction of the steps, then cosine decay to 0."""
    grad_clip: float = 10.0
    """Global L2 clip over both knobs (δS and δS_hack)."""
    unbiased: bool = True
    """Dr.GRPO: no 1/|o| length normalisation and no /σ_R; --no-unbiased gives standard GRPO."""
    seed: int = 41
    """Seeds torch, the problem draw (seed) and the teacher-row draw (seed + 1); part of the run id."""
    adapt_top_layers: int = 0
    """Wrap only the Linears of the last N transformer blocks with SVD knobs (0 = every block). The
    blocks below stay frozen and plain, so a backward stops at the lowest adapted block (a CPU cost knob)."""
    max_seq_len: int = 2048
    """Prompts with prompt_len + max_new above this are skipped (counted)."""
    temperature: float = 0.7
    """Sampling temperature for student rollouts and every eval."""
    top_k: int = 20
    """Top-k sampling cut-off for student rollouts and every eval."""
    gen_share_prefix: bool = False
    """Sampling: prefill each distinct prompt once per generate() call instead of once per sample
    (same samples up to float rounding; a large saving where prompts are long next to completions)."""

    # ── interventions ──
    intervene_on: Literal["grad", "update"] = "update"
    """erase / route: what the projection edits. update = the optimizer's parameter change: AdamW steps
    on the full gradient, then the hack-ward part of the step is removed from δS (erase) or moved into
    δS_hack (route), so the deployed knob never moves hack-ward and δS_hack moves only inside span(V).
    grad = the step's gradient before AdamW (the reference loop's behaviour; AdamW's per-coordinate
    scaling then lets the update drift hack-ward: see cos_upd)."""
    preserve_magnitude: bool = True
    """erase: rescale the edited gradient (or update, with --intervene-on=update) back to its original
    norm. (route never rescales: its kept + routed parts must sum to the original exactly, and the routed
    part must stay in span(V); the reference loop's route rescale broke both.)"""
    gate_mode: GateMode = "one_sided"
    """one_sided removes only hack-ward coefficients (relu(V g)); no_gate removes the whole span;
    reverse removes only the anti-hack part."""
    project_overshoot: float = 1.0
    """Remove overshoot·c·V: 1.0 removes the component, 1.1 also reverses 10% of it."""
    gate_anchor_teacher_only: bool = False
    """route2: anchor τ on teacher rows only (never on detector-flagged student rows), so held-out
    modes get provably zero detector labels (the strict no-cheat control)."""
    rollout_ablate_frac: float = 0.0
    """route/route2: fraction of student rollouts sampled with the quarantine ablated (an
    exploration floor and a free deploy proxy). Off by default: it makes the deployed model's
    reward an optimisation target."""
    random_v_seed: Annotated[int | None, tyro.conf.arg(aliases=("--route2-random-v-seed",))] = None
    """Directionality control for every arm: replace v_hack / v_grad with seeded Haar-random
    directions (never refreshed). 'Nothing routed' is then a valid result, not an error."""

    # ── hack directions ──
    v_hack_path: Path | None = None
    """Explicit directions file (overrides the cache derived from model + pairs + knobs)."""
    vhack_pairs_path: Path | None = None
    """Pairs for extraction and refresh (`.json` pairset or `.md[#section]`); None = built-in pairs."""
    v_hack_extract_top_k: int = 12
    """Singular vectors extracted per module (the cache file holds this many;
    v_hack_k slices it at load)."""
    v_hack_k: int = 5
    """Load-time slice of the extracted top-k (k=1 keeps only the top singular direction of the
    per-pair differences)."""
    v_hack_tau_axis: float = 0.0
    """Extract-time: drop axes with S_i/S_0 below this."""
    v_hack_drop_bottom_frac: float = 0.25
    """Global noise floor: drop this bottom quantile of singular values over all modules."""
    v_hack_sign: Literal["vote", "mean"] = "vote"
    """How each extracted axis is signed hack-ward: vote = the majority of the pairs' projections
    (ties positive; the reference extractor's rule); mean = the mean difference's projection."""
    vhack_pair_loss: Literal["mean", "sum"] = "mean"
    """Per-pair "reinforce this completion" loss for the directions: mean = mean NLL per completion
    (the reference); sum = token sum, the weighting of the live Dr.GRPO loss (constant normaliser)."""
    v_hack_n_heldout: int = 2
    """The last N pairs are kept out of the extraction; the log reports whether they
    project hack-ward."""
    measure_directions: bool = True
    """vanilla: load v_hack (the same cache as erase / route; never acted on, never refreshed) only to
    log cos_upd, the hack-ward fraction of vanilla's own updates: the baseline the arms' cos_upd is
    read against. --no-measure-directions skips the extraction."""
    vhack_refresh_every: int = 5
    """Re-extract the directions against the current model (quarantine ablated) every N steps; 0 = never."""

    # ── problems, modes and the teacher pool ──
    env_mode: EnvMode = "run_tests"
    """Grading mode for every problem (ignored where a partition or env_modes assigns modes)."""
    env_modes: tuple[EnvMode, ...] | None = None
    """Cycle these modes over the problems (e.g. all seven for the smoke run)."""
    data_path: Path | None = None
    """Benchmark rows (.jsonl/.jsonl.gz); None = the built-in offline problem set."""
    grade_time_limit: Literal["relative", "fixed"] = "relative"
    """Time limit of each sandboxed grading run. relative: clamp(10 x the problem's canonical
    solution runtime, 1 s, 10 s), timed once per problem (a judge-style limit that scales with
    the machine; loops cost 1 s, not 10); fixed: 10 s for every problem."""
    teacher_pool_dir: Path | None = None
    """Directory of prompt_NNNN.jsonl.gz cached teacher rollouts (+ optional partition.json)."""
    mix_ratio: float = 0.125
    """Teacher share of each group: G_t = round(G·mix_ratio), G_s = G - G_t; must be in [0, 1)."""
    teacher_off_step: int | None = None
    """From this step on, no teacher rows (pure on-policy)."""
    teacher_modes: tuple[EnvMode, ...] | None = None
    """Only these modes get teacher rows (and seed the route2 hack anchor); other modes train
    on-policy (held-out generalisation test)."""
    half_a: str = ""
    """Detector codes that labelled the pairs' hack side (C = exploited by the strict oracle, E / D / S
    = the run_tests detectors, as in the reference); splits student hacks into half A (a code here
    fires) and half B (only another code fires) in the rows and the BLUF. Empty = no split."""

    # ── evaluation ──
    eval_ablate_every: int = 5
    """Deploy eval (quarantine ablated for route/route2) every N steps, for every arm; 0 = off."""
    eval_n_prompts: int = 8
    """Problems in the deploy eval (the first N training problems; also the size of the
    held-out eval set); each gets G samples."""
    eval_seed: int = 20261130
    """Seed of every eval call's sampling (the training RNG is set aside and restored around it): every
    arm, seed and step sees the same sampling noise (common random numbers), and evals never shift the
    training draws."""
    eval_data_path: Path | None = None
    """Held-out problems (e.g. the benchmark's test split) for the final eval (and the periodic
    one with --eval-heldout-periodic); hinted per mode like training, never trained on."""
    eval_heldout_periodic: bool = False
    """Run the periodic deploy eval on the held-out set (needs --eval-data-path)
    instead of the training subset."""
    save_eval_ckpts: bool = True
    """Save the deploy adapter at every deploy eval, so a run can be re-scored later."""

    # ── bookkeeping ──
    cos_pre_split_every: int = 1
    """Split each backward into student/teacher passes every N steps (cos_pre_s / cos_pre_t)."""
    ckpt_every: int = 25
    """Save resume.pt and a deploy adapter adapter_stepNNNN.safetensors every N steps."""
    out_tag: str = ""
    """Suffix appended to the run id (and so to the run folder name)."""
    out_root: Path = Path("out")
    """Root of all outputs: runs under <out_root>/runs/, directions cache under <out_root>/vhack/."""
    resume: Path | None = None
    """Continue a killed run from its last checkpoint (a directory under out/runs/)."""
    stop_after_steps: int | None = None
    """Checkpoint and exit after this many steps in this invocation (time-limited job slots);
    continue later with --resume."""
    device: str = "auto"
    """auto = CUDA when available, else CPU; or any torch device string."""
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    """Experiment tracker for the per-step rows, config + provenance, final per-mode tables and
    plots: wandb (under the run folder's wandb/; WANDB_MODE=offline works without network) or
    tensorboard (event files in the run folder's tensorboard/). Needs `uv sync --extra wandb`
    or `--extra tensorboard`."""

    # ── derived ──
    @property
    def preset_name(self) -> str:
        return type(self).__name__.removesuffix("Config").lower() or "base"

    @property
    def arm(self) -> str:
        return ARM_NAMES[self.intervention]

    @property
    def run_id(self) -> str:
        ctrl = f"_haar{self.random_v_seed}" if self.random_v_seed is not None else ""
        adapter = f"-{self.adapter}" if self.adapter != "svd" else ""
        return f"{self.preset_name}_{self.arm}{adapter}_seed{self.seed}{ctrl}{self.out_tag}"

    @property
    def arm_type(self):
        """The arm class of (`intervention`, `adapter`) (arms.py): the one place a name becomes an arm."""
        from .arms import arm_class  # arms imports torch: only when asked

        return arm_class(self.intervention, self.adapter)

    @property
    def half_a_codes(self) -> frozenset[str]:
        """The detector codes of `half_a`, parsed (upper case, blanks dropped)."""
        return frozenset(c.strip().upper() for c in self.half_a.split(",") if c.strip())

    @property
    def time_limit(self) -> RelativeTime | None:
        """The grader's per-problem time policy (None = the fixed DEFAULT_LIMITS)."""
        return DEFAULT_TIME if self.grade_time_limit == "relative" else None

    @property
    def teacher_split(self) -> tuple[int, int]:
        """(G_s, G_t) at the start of the run."""
        if self.teacher_pool_dir is None:
            return self.group, 0
        g_t = round(self.group * self.mix_ratio)
        return self.group - g_t, g_t

    def validate(self) -> None:
        """Raise ValueError naming the offending knob; cheap checks only (no model, no data).

        Every numeric knob has a range (NUMERIC_RANGES; NaN and inf are refused everywhere), then
        the checks that involve several knobs."""
        errs = [e for name, rng in NUMERIC_RANGES.items() if (e := rng.check(name, getattr(self, name)))]
        if errs:  # the cross-knob checks below assume every number is in range
            raise ValueError("invalid config:\n  " + "\n  ".join(errs))
        g_s, _ = self.teacher_split
        if g_s < 1:
            errs.append(f"--group={self.group} with --mix-ratio={self.mix_ratio} leaves G_s={g_s} student rollouts; "
                        "need >= 1")
        if self.v_hack_k > self.v_hack_extract_top_k:
            errs.append(f"--v-hack-k must be in [1, v_hack_extract_top_k={self.v_hack_extract_top_k}] "
                        f"(got {self.v_hack_k})")
        if self.max_new >= self.max_seq_len:
            errs.append(f"--max-new={self.max_new} leaves no room for a prompt in --max-seq-len={self.max_seq_len}; "
                        "every prompt would be skipped")
        if self.half_a_codes - set(DETECTOR_CODES):
            errs.append(f"--half-a has unknown detector codes {sorted(self.half_a_codes - set(DETECTOR_CODES))}; "
                        f"valid: {', '.join(DETECTOR_CODES)}")
        for m in (self.env_modes or ()) + (self.teacher_modes or ()):
            if m not in ENV_MODES:
                errs.append(f"unknown mode {m!r}; valid: {', '.join(ENV_MODES)}")
        if self.teacher_modes is not None and self.teacher_pool_dir is None:
            errs.append("--teacher-modes needs --teacher-pool-dir (with a partition.json)")
        try:
            errs += self.arm_type.config_errors(self)  # the arm checks its own knobs
        except ValueError as e:  # no such arm for this adapter
            errs.append(str(e))
        if self.eval_heldout_periodic and self.eval_data_path is None:
            errs.append("--eval-heldout-periodic needs --eval-data-path")
        if (missing := missing_package(self.report_to)) is not None:
            errs.append(missing)
        if errs:
            raise ValueError("invalid config:\n  " + "\n  ".join(errs))

    def to_dict(self) -> dict:
        """JSON-ready dict of every field (paths as strings, tuples as lists)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Path):
                v = str(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        out["preset"] = self.preset_name
        return out


# Knobs that may differ between a run and its resume (they do not change the science).
RESUME_MUTABLE = frozenset({"resume", "device", "stop_after_steps", "report_to"})


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric knob: lo / hi bounds (None = unbounded), each inclusive
    or not, plus why (shown in the error). None passes for the knobs typed `int | None`."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def text(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def check(self, name: str, v: object) -> str | None:
        """None when `v` is allowed, else the one-line error naming the flag."""
        if v is None:
            return None
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        if ok and self.lo is not None:
            ok = v > self.lo if self.lo_open else v >= self.lo
        if ok and self.hi is not None:
            ok = v < self.hi if self.hi_open else v <= self.hi
        if ok:
            return None
        why = f"; {self.why}" if self.why else ""
        return f"--{name.replace('_', '-')} must be {self.text()} (got {v!r}){why}"


# Every int/float knob of Config and its range, checked by validate() at parse time (a test
# fails when a numeric knob is added without one).
NUMERIC_RANGES: dict[str, Range] = {
    "steps": Range(1),
    "group": Range(2, why="the GRPO advantage is relative within a group; one rollout has none"),
    "max_new": Range(1),
    "n_problems": Range(1),
    "beta": Range(0),
    "prompts_per_step": Range(1),
    "lr": Range(0, lo_open=True),
    "adam_beta1": Range(0, 1, hi_open=True),
    "adam_beta2": Range(0, 1, hi_open=True),
    "clip": Range(0, lo_open=True),
    "weight_decay": Range(0),
    "warmup_frac": Range(0, 1),
    "grad_clip": Range(0, lo_open=True),
    "seed": Range(0, 2**32 - 1),
    "max_seq_len": Range(2),
    "temperature": Range(0, lo_open=True, why="sampling needs a positive temperature"),
    "top_k": Range(0, why="0 = no top-k cut-off"),
    "project_overshoot": Range(0, lo_open=True),
    "rollout_ablate_frac": Range(0, 1),
    "random_v_seed": Range(0, 2**32 - 1),
    "v_hack_extract_top_k": Range(1),
    "v_hack_k": Range(1),
    "v_hack_tau_axis": Range(0, 1, hi_open=True, why="a ratio S_i/S_0; 1 would drop every axis but the top"),
    "v_hack_drop_bottom_frac": Range(0, 1, hi_open=True),
    "v_hack_n_heldout": Range(0),
    "vhack_refresh_every": Range(0, why="0 = never"),
    "mix_ratio": Range(0, 1, hi_open=True, why="1.0 leaves no student rollouts"),
    "teacher_off_step": Range(0),
    "eval_ablate_every": Range(0, why="0 = off"),
    "eval_seed": Range(0, 2**32 - 1),
    "eval_n_prompts": Range(1),
    "cos_pre_split_every": Range(1),
    "ckpt_every": Range(1),
    "stop_after_steps": Range(1),
    "adapt_top_layers": Range(0, why="0 = every block"),
    "block_r": Range(1),
    "route_tail_q": Range(0, 0.5, lo_open=True, why="the share of the score buffer in each tail"),
}


@dataclass(kw_only=True)
class SmokeConfig(Config):
    """Offline tiny Qwen3 on CPU, built-in problems in all seven modes, a synthetic teacher pool,
    built-in pairs; 30 steps so every code path runs, including the step-25 checkpoint."""

    intervention: Intervention = "route2"
    model: str = "tiny-qwen3"
    steps: int = 30
    group: int = 4
    max_new: int = 32
    n_problems: int = 100
    beta: float = 1e-3  # exercises the zero-delta reference path
    prompts_per_step: int = 1
    lr: float = 3e-3
    env_modes: tuple[EnvMode, ...] | None = ENV_MODES
    teacher_pool_dir: Path | None = Path("out/pools/smoke")
    mix_ratio: float = 0.25
    v_hack_extract_top_k: int = 4
    v_hack_k: int = 2
    v_hack_n_heldout: int = 2
    vhack_refresh_every: int = 20  # one refresh (step 19); its directions then act for 10 steps
    eval_ablate_every: int = 15  # deploy evals at steps 0, 15 and 29 (then the final eval)
    eval_n_prompts: int = 4
    device: str = "cpu"


@dataclass(kw_only=True)
class FastConfig(Config):
    """Qwen3-4B, 60 steps, aggressive Adam: a ~15-minute iteration loop on one GPU."""

    # aggressive Adam so a short run moves far enough to show the hack emerging
    lr: float = 3e-3
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    # the design table's row: model, steps, G, max_new, problems, P
    model: str = "Qwen/Qwen3-4B"
    steps: int = 60
    group: int = 8  # G=8 with mix 0.125 -> 7 student + 1 teacher rollout per prompt
    max_new: int = 512
    n_problems: int = 200
    prompts_per_step: int = 4
    eval_n_prompts: int = 32  # ~4 problems per mode; every rate gets a problem-clustered interval
    data_path: Path | None = Path("out/data/leetcode_train_medhard.jsonl")  # `just data`
    teacher_pool_dir: Path | None = Path("out/pools/substrate")  # `just substrate`
    vhack_pairs_path: Path | None = Path("out/pairsets/prog_wide.json")


@dataclass(kw_only=True)
class FullConfig(Config):
    """Qwen3-4B at paper scale: 43 prompts x G=6 = 258 generations per step, KL β=1e-3."""

    beta: float = 1e-3  # the benchmark's KL weight (one extra reference forward per group)
    # the design table's row: model, steps, G, max_new, problems, P
    model: str = "Qwen/Qwen3-4B"
    steps: int = 200
    group: int = 6
    max_new: int = 1024
    n_problems: int = 992  # every filtered medium/hard training problem
    prompts_per_step: int = 43
    eval_n_prompts: int = 32
    data_path: Path | None = Path("out/data/leetcode_train_medhard.jsonl")  # `just data`


@dataclass(kw_only=True)
class OrganismConfig(Config):
    """The CPU model organism: SmolLM2-135M-Instruct warm-started by a cached SFT (vgrout.organism),
    20 built-in training problems in run_tests mode with a template-hack teacher pool, 7 held-out
    problems for the final eval. Vanilla by default. Inputs: `uv run python -m vgrout.organism`."""

    intervention: Intervention = "none"
    device: str = "cpu"
    # the policy: the SFT-warmed SmolLM2 from `python -m vgrout.organism`, adapted in its top 8 blocks only
    model: str = "smollm2-135m-organism"
    adapt_top_layers: int = 8
    # inputs the organism build writes: 20 training / 7 held-out problems (run_tests mode, the base
    # default) and a pool of template hacks, a quarter of every group of 8 (6 student, 2 teacher rows)
    data_path: Path | None = Path("out/data/organism/train.jsonl")
    eval_data_path: Path | None = Path("out/data/organism/heldout.jsonl")
    teacher_pool_dir: Path | None = Path("out/pools/organism")
    n_problems: int = 20
    mix_ratio: float = 0.25
    group: int = 8
    # one prompt a step, 16 steps, short completions sampled with the prompt prefilled once per group
    prompts_per_step: int = 1
    steps: int = 16
    max_new: int = 128
    gen_share_prefix: bool = True
    # Adam as in the fast preset (beta1 0.5, beta2 0.9). lr 1e-1 is for the SVD knob, from probes at seed 41
    # (held-out deploy hack after 16 steps: 2e-2 0.107, 5e-2 0.321, 1e-1 0.661; docs/organism.md, "The
    # organism now"); the block adapters are run at --lr=1e-3
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    lr: float = 1e-1
    # v_hack: a small basis, extracted once and never refreshed; no periodic evals, only the final one on
    # every held-out problem
    v_hack_extract_top_k: int = 4
    v_hack_k: int = 2
    vhack_refresh_every: int = 0
    eval_ablate_every: int = 0
    eval_n_prompts: int = 7


PRESETS: dict[str, type[Config]] = {"smoke": SmokeConfig, "fast": FastConfig, "full": FullConfig,
                                    "organism": OrganismConfig}


def parse_cli(args: list[str] | None = None) -> Config:
    """Parse `<preset> [--knob=value ...]` into a validated Config."""
    cfg = tyro.extras.subcommand_cli_from_dict(PRESETS, args=args)
    cfg.validate()
    return cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config saved with `to_dict` (used by resume)."""
    cls = PRESETS.get(d.get("preset", ""), Config)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if v is not None and (f.name.endswith(("_path", "_dir")) or f.name in ("out_root", "resume")):
            v = Path(v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def config_diff(a: dict, b: dict, *, ignore: frozenset[str] = RESUME_MUTABLE) -> list[str]:
    """Human-readable differences between two `to_dict` configs (keys in `ignore` skipped)."""
    keys = sorted((set(a) | set(b)) - ignore)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
