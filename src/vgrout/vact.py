"""v_act, the hack direction in the block adapter's activation space, and the routeA gate.

v_act. For every contrastive pair (prompt, hack, clean) and side, one no-grad forward of prompt + completion
through the deployed model (block adapters wrapped, quarantine ablated, eval mode) records, per module m,
the deployed block's live bottleneck h_m = A_dep x = (A0_dep + a_dep) x ∈ ℝʳ pooled over the completion
tokens (`blocks.capture_bottleneck`). With d_{i,m} = h̄_{i,m}(hack) − h̄_{i,m}(clean):

    v_act[m] = unit(mean_i d_{i,m})  ∈ ℝʳ   (the zero vector if that mean is exactly 0).

The last `n_heldout` pairs are kept out and reported on. Saved as safetensors (`v_act/<m>` + metadata) and
cached under a name keyed by model, adapter (its deployed block's bytes), held-out count and pairs content.
The Haar control is a seeded uniformly random unit vector per module (never refreshed).

The routeA gate, per rollout b of a group (pure functions plus one stateful buffer):

    score_b = Σ_m ⟨h̄_{b,m}, v_act[m]⟩

the pooled bottleneck of the rollout's completion (the same deployed-model forward as the extraction)
dotted with v_act, summed over modules. Modules are combined by that sum, i.e. the dot product of the
concatenated pooled bottleneck with the concatenated unit directions (norm √M): every module's direction
counts once, and a module with larger activations along its direction weighs more. The cuts below are
quantiles, so a global rescaling of the scores changes nothing. A run-long buffer keeps the rollouts'
pooled bottlenecks (not their scores), so after a v_act refresh every buffered rollout is re-scored with
the current direction. With recency weights w = 0.5^(age / halflife) (age = rollouts observed after the
rollout's group, so the current group has age 0; all 1 without a half-life) the cuts are the weighted
lower q-quantile t_lo and upper q-quantile t_hi of the buffered scores (this group included): the
lowest / highest scores carrying a share q of the weight. Then

    score ≤ t_lo           keep   (0,0)   the low tail trains the deployed block only
    t_lo < score < t_hi    absorb (1,0)   both blocks train
    score ≥ t_hi (> t_lo)  route  (1,1)   only the quarantine trains

Until the buffer holds `warmup` rollouts every rollout absorbs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from safetensors.torch import save_file
from torch import Tensor, nn

from . import proj
from .adapter import read_checked_safetensors
from .atomic import atomic_path
from .blocks import (
    BlockLoRA,
    ablate_quarantine,
    adapter_fingerprint,
    capture_bottleneck,
    check_masks,
    completion_batch,
    pair_sequences,
    pairs_hash,
)
from .model import model_slug
from .pairs import Pair
from .vhack import haar_v_grad

SCHEMA = "vgrout.vact/1"
HAAR = "haar"


class VActError(ValueError):
    """A v_act file that does not fit the model or adapters (the message says why)."""


# ── pooled bottlenecks ───────────────────────────────────────────────────────────────────


@torch.no_grad()
def pooled_bottleneck(model: nn.Module, adapters: Mapping[str, BlockLoRA], ids: Tensor, weights: Tensor, *,
                      ablate: bool = True) -> Tensor:
    """The deployed block's bottleneck A_dep x of every module, pooled over each row's completion tokens:
    [B, M, r] fp32 (modules in `adapters` order). One no-grad decoder forward (no LM head), by default with
    the quarantine ablated (the deployed model, as in the extraction); nothing is modified."""
    names = list(adapters)
    with ablate_quarantine(adapters) if ablate else nullcontext(), \
            capture_bottleneck(adapters, weights.to(ids.device)) as pool:
        model.get_decoder()(input_ids=ids, use_cache=False)
    return pool.stacked(names)


def pair_bottlenecks(model: nn.Module, tok, adapters: Mapping[str, BlockLoRA], pairs: Sequence[Pair],
                     device: str | torch.device, *, batch_size: int = 8) -> dict[str, Tensor]:
    """{"hack", "clean"} -> [P, M, r] pooled bottlenecks of each pair side (`pooled_bottleneck`, eval mode,
    `batch_size` pairs per forward, right-padded); train/eval mode and the quarantine are restored."""
    if not pairs:
        raise ValueError("pair_bottlenecks: no pairs given")
    dev = torch.device(device)
    out = {}
    was_training = model.training
    model.eval()
    try:
        for side in ("hack", "clean"):
            seqs = pair_sequences(tok, pairs, side)
            parts = []
            for s in range(0, len(seqs), batch_size):
                ids, w = completion_batch(seqs[s : s + batch_size])
                parts.append(pooled_bottleneck(model, adapters, ids.to(dev), w.to(dev)).cpu())
            out[side] = torch.cat(parts)
    finally:
        model.train(was_training)
    return out


def v_act_from(hack: Tensor, clean: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """v_act[m] = unit(mean_i (hack[i, m] − clean[i, m])) for [P, M, r] inputs, fp32 [r] per module.
    Invariant: unit norm and v · mean(d) = ‖mean(d)‖ > 0 (hack-ward); the zero vector where the mean
    difference is exactly 0."""
    if hack.shape != clean.shape or hack.dim() != 3 or hack.shape[1] != len(names):
        raise ValueError(f"hack {tuple(hack.shape)} / clean {tuple(clean.shape)} must be [P, M={len(names)}, r]")
    mean = (hack.double() - clean.double()).mean(0)  # [M, r]
    out = {}
    for i, m in enumerate(names):
        n = mean[i].norm()
        out[m] = (mean[i] / n if float(n) > 0 else torch.zeros_like(mean[i])).float()
    return out


def heldout_report(diff: Tensor, v: Mapping[str, Tensor], names: Sequence[str], pair_names: Sequence[str],
                   ) -> dict[str, Any]:
    """How held-out pairs' bottleneck differences diff [n, M, r] project on v_act: per pair, the fraction
    of modules with d_m · v_m > 0 and the sign of the gate score Σ_m d_m · v_m (positive = the gate scores
    that pair's hack side above its clean side)."""
    V = torch.stack([v[m].double() for m in names])  # [M, r]
    proj_m = torch.einsum("nmr,mr->nm", diff.double(), V)
    frac = (proj_m > 0).double().mean(1).tolist()
    score = proj_m.sum(1).tolist()
    return {"names": list(pair_names), "n_heldout": len(frac), "frac_modules_pos": frac, "score_diff": score,
            "n_pairs_score_hackward": sum(s > 0 for s in score),
            "mean_frac_modules_pos": sum(frac) / len(frac) if frac else math.nan}


@dataclass
class VAct:
    """v_act {module: [r]} (unit, hack-ward) with the file's metadata and the held-out report."""

    v: dict[str, Tensor]
    meta: dict[str, str] = field(default_factory=dict)
    heldout: dict[str, Any] = field(default_factory=dict)

    @property
    def is_control(self) -> bool:
        return self.meta.get("control") == HAAR

    def stacked(self, names: Sequence[str]) -> Tensor:
        """[M, r] in the order of `names` (must be exactly v's modules)."""
        if set(names) != set(self.v):
            raise VActError(f"v_act covers {len(self.v)} modules, the adapters {len(names)}; "
                            f"missing {sorted(set(names) - set(self.v))[:3]}")
        return torch.stack([self.v[n] for n in names])


def extract_v_act(model: nn.Module, tok, adapters: Mapping[str, BlockLoRA], pairs: Sequence[Pair], *,
                  n_heldout: int = 2, device: str | torch.device = "cpu", batch_size: int = 8) -> VAct:
    """v_act from the first P − n_heldout pairs (`v_act_from`), the rest reported (`heldout_report`)."""
    n_tr = len(pairs) - n_heldout
    if n_heldout < 0 or n_tr < 1:
        raise ValueError(f"{len(pairs)} pairs with n_heldout={n_heldout} leave {n_tr} for extraction; need >= 1")
    names = list(adapters)
    acts = pair_bottlenecks(model, tok, adapters, pairs, device, batch_size=batch_size)
    v = v_act_from(acts["hack"][:n_tr], acts["clean"][:n_tr], names)
    rep: dict[str, Any] = {}
    if n_heldout:
        diff = acts["hack"][n_tr:] - acts["clean"][n_tr:]
        rep = heldout_report(diff, v, names, [p.name for p in pairs[n_tr:]])
        logger.info(f"v_act from {n_tr} pairs ({n_heldout} held out): the gate scores the hack side higher for "
                    f"{rep['n_pairs_score_hackward']}/{n_heldout} held-out pairs; mean module fraction "
                    f"hack-ward {rep['mean_frac_modules_pos']:.2f} (SHOULD be > 0.5)")
    return VAct(v, heldout=rep)


def haar_v_act(adapters: Mapping[str, BlockLoRA] | Mapping[str, int], seed: int) -> VAct:
    """The directionality control: a seeded uniformly random unit vector [r] per module (sorted module order
    from one generator, `vhack.haar_v_grad`); meta control=haar. Never refreshed."""
    shapes = {m: (a.r if isinstance(a, BlockLoRA) else int(a)) for m, a in adapters.items()}
    return VAct(haar_v_grad(shapes, seed), meta={"control": HAAR, "seed": str(seed)})


# ── save / load / cache ──────────────────────────────────────────────────────────────────


def v_act_cache_path(out_dir: str | Path, model_id: str, adapters, pairs: Sequence[Pair], n_heldout: int) -> Path:
    """out_dir/v_act_<model slug>_a<adapter fingerprint>_h<n_heldout>_<pairs hash>.safetensors (the
    fingerprint covers the deployed block's initial values and offsets, which the activations depend on)."""
    fp = adapter_fingerprint(adapters)[:12]
    return Path(out_dir) / f"v_act_{model_slug(model_id)}_a{fp}_h{n_heldout}_{pairs_hash(pairs)}.safetensors"


def save_v_act(path: str | Path, va: VAct, *, model_id: str, meta: Mapping[str, Any] | None = None) -> Path:
    """Write v_act to one safetensors file, atomically; metadata: schema, model, ranks, heldout (JSON),
    control / seed when a Haar control, plus `meta`."""
    path = Path(path)
    tensors = {f"v_act/{m}": t.detach().float().cpu().contiguous() for m, t in va.v.items()}
    md = {k: v for k, v in va.meta.items() if k in ("control", "seed")}
    md.update({str(k): str(v) for k, v in (meta or {}).items()})
    md.update({"schema": SCHEMA, "model": model_id, "dtype": "float32", "heldout": json.dumps(va.heldout),
               "ranks": json.dumps({m: int(t.shape[0]) for m, t in va.v.items()})})
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=md)
    return path


def load_v_act(path: str | Path, *, model_id: str, adapters: Mapping[str, BlockLoRA] | Mapping[str, int]) -> VAct:
    """Read a v_act file and check it fits `model_id` and the adapters' modules and rank (each vector
    unit or zero, finite)."""
    meta, tensors = read_checked_safetensors(path, schema=SCHEMA, model_id=model_id, what="v_act", error=VActError)
    want = {m: (a.r if isinstance(a, BlockLoRA) else int(a)) for m, a in adapters.items()}
    v = {k.partition("/")[2]: t.float() for k, t in tensors.items() if k.startswith("v_act/")}
    if set(v) != set(want):
        raise VActError(f"{path}: modules do not match the adapters (missing {sorted(set(want) - set(v))[:3]}, "
                        f"unexpected {sorted(set(v) - set(want))[:3]}); extracted for other adapters?")
    for m, r in want.items():
        n = float(v[m].norm()) if v[m].shape == (r,) and torch.isfinite(v[m]).all() else math.nan
        if not (abs(n - 1) < 1e-4 or n == 0):
            raise VActError(f"{path}: {m}: v_act {tuple(v[m].shape)} is not a finite unit vector of rank {r}")
    return VAct({m: v[m] for m in want}, meta=meta, heldout=json.loads(meta.get("heldout", "{}")))


def resolve_v_act(model: nn.Module, tok, adapters: Mapping[str, BlockLoRA], pairs: Sequence[Pair], *,
                  model_id: str, out_dir: str | Path, n_heldout: int = 2, device: str | torch.device = "cpu",
                  path: str | Path | None = None, batch_size: int = 8, pairs_source: str = "") -> VAct:
    """The run's v_act: an explicit `path` (must exist), else the cache file for (model, adapters, pairs,
    n_heldout), extracting and saving it on a miss."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"explicit v_act path {path} does not exist")
        return load_v_act(path, model_id=model_id, adapters=adapters)
    p = v_act_cache_path(out_dir, model_id, adapters, pairs, n_heldout)
    if not p.is_file():
        logger.info(f"v_act cache miss at {p}: extracting from {len(pairs)} pairs")
        va = extract_v_act(model, tok, adapters, pairs, n_heldout=n_heldout, device=device, batch_size=batch_size)
        save_v_act(p, va, model_id=model_id, meta={"n_heldout": n_heldout, "pairs_hash": pairs_hash(pairs),
                                                   "n_pairs": len(pairs), "pairs_source": pairs_source,
                                                   "adapter": adapter_fingerprint(adapters)})
    return load_v_act(p, model_id=model_id, adapters=adapters)


# ── the routeA gate ──────────────────────────────────────────────────────────────────────


def gate_scores(acts: Tensor, v: Tensor) -> Tensor:
    """score_b = Σ_m ⟨acts[b, m], v[m]⟩ for acts [B, M, r], v [M, r] -> [B] float64."""
    if acts.dim() != 3 or v.shape != acts.shape[1:]:
        raise ValueError(f"acts {tuple(acts.shape)} and v_act {tuple(v.shape)} must be [B, M, r] and [M, r]")
    return torch.einsum("bmr,mr->b", acts.double(), v.double().to(acts.device))


def weighted_quantile(values: Tensor, weights: Tensor, q: float) -> float:
    """The lower weighted q-quantile (inverse CDF): the smallest value v such that the values ≤ v carry at
    least a share q of the total weight. With equal weights and q = k/N it is the k-th smallest value."""
    if values.shape != weights.shape or values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"values {tuple(values.shape)} / weights {tuple(weights.shape)} must be equal, 1-D, non-empty")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    order = torch.argsort(values, stable=True)
    cw = torch.cumsum(weights.double()[order], 0)
    k = int(torch.searchsorted(cw, torch.tensor(q * float(cw[-1]) * (1 - 1e-12), dtype=cw.dtype)))
    return float(values[order][min(k, values.numel() - 1)])


def upper_quantile(values: Tensor, weights: Tensor, q: float) -> float:
    """The mirror of `weighted_quantile`: the largest value v such that the values ≥ v carry at least a
    share q of the total weight (the high-tail cut, symmetric with the low one)."""
    return -weighted_quantile(-values, weights, q)


def recency_weights(stamps: Tensor, newest: int, halflife: float | None) -> Tensor:
    """0.5 ** ((newest − stamp) / halflife) per buffered rollout (1 for the newest group); all ones if
    halflife is None."""
    if halflife is None:
        return torch.ones(stamps.shape, dtype=torch.float64)
    return 0.5 ** ((newest - stamps.double()) / float(halflife))


def band_masks(scores: Tensor, t_lo: float, t_hi: float) -> tuple[Tensor, Tensor]:
    """(m, d) bool [B]: keep (0,0) where score ≤ t_lo, route (1,1) where score ≥ t_hi and > t_lo, absorb
    (1,0) otherwise. Invariant: exactly one of keep / absorb / route per rollout, never (0,1)."""
    keep = scores <= t_lo
    route = (scores >= t_hi) & ~keep
    return ~keep, route


@dataclass
class GateDecision:
    """One group's gate output: masks m, d (bool [G]), scores [G], the cuts (NaN while warming up)."""

    m: Tensor
    d: Tensor
    scores: Tensor
    t_lo: float
    t_hi: float

    @property
    def warming_up(self) -> bool:
        return math.isnan(self.t_lo)


class RouteAGate:
    """The run-long buffer of pooled bottlenecks and the band gate (module docstring).

    `names` fixes the module order of acts [G, M, r] and v [M, r]; `capacity` rollouts are kept (oldest
    evicted first); `tail_q` ∈ (0, 0.5] is the share of weight in each tail; `halflife` (in rollouts,
    None = equal weights); `warmup`: absorb everything until the buffer holds that many rollouts. Memory is
    capacity · M · r · 4 bytes on the CPU.
    """

    def __init__(self, names: Sequence[str], r: int, *, tail_q: float = 0.1, halflife: float | None = 96.0,
                 capacity: int = 8192, warmup: int = 0) -> None:
        if not 0.0 < tail_q <= 0.5:
            raise ValueError(f"route_tail_q must be in (0, 0.5], got {tail_q}")
        if halflife is not None and not halflife > 0:
            raise ValueError(f"route half-life must be > 0 rollouts (or None), got {halflife}")
        if capacity < 1 or warmup < 0 or r < 1 or not names:
            raise ValueError(f"bad gate buffer: capacity={capacity}, warmup={warmup}, r={r}, {len(names)} modules")
        self.names, self.r = list(names), r
        self.tail_q, self.halflife, self.capacity, self.warmup = tail_q, halflife, capacity, warmup
        self._acts = torch.zeros(0, len(self.names), r)  # allocated to capacity on first use
        self._stamps = torch.zeros(capacity, dtype=torch.long)
        self._n = 0  # rows filled
        self._next = 0  # next row to write (the oldest once full)
        self.n_seen = 0  # rollouts observed over the run

    def __len__(self) -> int:
        return self._n

    def _add(self, acts: Tensor) -> None:
        """Buffer one group; its rollouts share one stamp (the rollout count after it), so their order
        within the group does not change their weights."""
        if self._acts.shape[0] == 0:
            self._acts = torch.zeros(self.capacity, len(self.names), self.r)
        self.n_seen += acts.shape[0]
        for row in acts.float().cpu():
            self._acts[self._next] = row
            self._stamps[self._next] = self.n_seen
            self._next = (self._next + 1) % self.capacity
            self._n = min(self._n + 1, self.capacity)

    def observe(self, acts: Tensor, v: Tensor) -> GateDecision:
        """Add a group's pooled bottlenecks acts [G, M, r] to the buffer and decide its masks against the
        current v_act v [M, r] (every buffered rollout re-scored with it)."""
        if acts.dim() != 3 or acts.shape[1:] != (len(self.names), self.r):
            raise ValueError(f"acts {tuple(acts.shape)} must be [G, {len(self.names)}, {self.r}]")
        if not torch.isfinite(acts).all() or not torch.isfinite(v).all():
            raise ValueError("non-finite bottleneck activations or v_act: the gate would decide on NaN")
        scores = gate_scores(acts, v).cpu()
        self._add(acts)
        G = acts.shape[0]
        if self._n < self.warmup:
            return GateDecision(torch.ones(G, dtype=torch.bool), torch.zeros(G, dtype=torch.bool), scores,
                                math.nan, math.nan)
        buf = gate_scores(self._acts[: self._n], v.cpu())
        w = recency_weights(self._stamps[: self._n], self.n_seen, self.halflife)
        t_lo, t_hi = weighted_quantile(buf, w, self.tail_q), upper_quantile(buf, w, self.tail_q)
        m, d = band_masks(scores, t_lo, t_hi)
        return GateDecision(m, d, scores, t_lo, t_hi)

    def state_dict(self) -> dict:
        """The buffer in chronological order (oldest first) and the rollout count."""
        order = torch.argsort(self._stamps[: self._n])
        acts = self._acts[: self._n][order].clone() if self._n else torch.zeros(0, len(self.names), self.r)
        return {"names": list(self.names), "r": self.r, "acts": acts,
                "stamps": self._stamps[: self._n][order].clone(), "n_seen": self.n_seen}

    def load_state_dict(self, state: Mapping) -> None:
        if list(state["names"]) != self.names or int(state["r"]) != self.r:
            raise ValueError("gate state was saved for other adapters (module names or rank differ)")
        acts, stamps = state["acts"], state["stamps"]
        if acts.shape[0] > self.capacity:
            acts, stamps = acts[-self.capacity :], stamps[-self.capacity :]
        self._acts = torch.zeros(self.capacity, len(self.names), self.r)
        self._stamps = torch.zeros(self.capacity, dtype=torch.long)
        n = acts.shape[0]
        self._acts[:n], self._stamps[:n] = acts.float(), stamps.long()
        self._n, self._next, self.n_seen = n, n % self.capacity, int(state["n_seen"])


# ── diagnostics ──────────────────────────────────────────────────────────────────────────


def mask_shares(m: Tensor, d: Tensor) -> dict[str, float]:
    """Share of rollouts in keep (0,0), absorb (1,0) and route (1,1); they sum to 1."""
    m, d = check_masks(m, d)
    n = m.numel()
    return {"keep": float((~m).sum()) / n, "absorb": float((m & ~d).sum()) / n, "route": float(d.sum()) / n}


def gate_stats(d: Sequence[bool] | Tensor, exploited: Sequence[bool], select: Sequence[bool] | None = None,
               ) -> dict[str, float]:
    """The route cut (d = 1) as a classifier of `exploited` (`proj.classifier_stats`: precision, recall,
    F0.5), over the rollouts where `select` is true (e.g. the student rows) or all."""
    d = [bool(x) for x in (d.tolist() if isinstance(d, Tensor) else d)]
    e = [bool(x) for x in exploited]
    if select is not None:
        s = [bool(x) for x in select]
        if len(s) != len(d):
            raise ValueError(f"select has {len(s)} labels but d has {len(d)}")
        d = [x for x, k in zip(d, s, strict=True) if k]
        e = [x for x, k in zip(e, s, strict=True) if k]
    return proj.classifier_stats(d, e)

