"""Hack directions from contrastive pairs: v_grad (mean difference) and v_hack (top-k basis).

For each pair the gradient on δS of "reinforce this completion" (advantage +1: loss = minus
the mean completion-token log-prob) is taken for the hack and for the clean completion, per
wrapped module. With d_i = g_hack_i - g_clean_i ([n, r] per module):

- v_grad[m]  = unit(mean_i d_i): route2's direction, hack-ward by construction;
- v_hack[m]  = top-k right singular vectors of the stacked d_i (uncentred), orthonormal rows,
  each signed so that mean_i d_i projects positively; singular values are kept.

Directions are saved as one safetensors file (`v_hack/<m>`, `sv/<m>`, `v_grad/<m>` + metadata)
holding the raw extraction; `k_use` / `drop_bottom_frac` are applied at load. Haar-random
directions are the directionality control and are never replaced by a refresh.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from safetensors.torch import save_file
from torch import Tensor, nn

from .adapter import SVDKnob, ablate_quarantine, read_checked_safetensors, rollout_grads
from .atomic import atomic_path
from .logprobs import completion_logprobs, head_logprobs
from .model import encode, model_slug
from .pairs import Pair, pairs_fingerprint_text
from .proj import nanmean

_LAYER_IDX = re.compile(r"(?:^|\.)layers\.(\d+)\.")

SCHEMA = "vgrout.vhack/1"
HAAR = "haar"


class DirectionsError(ValueError):
    """A directions file that does not fit the model or the request (message says why)."""


# ── per-pair gradients ────────────────────────────────────────────────────────────────────


PAIR_LOSS_NORMS = ("mean", "sum")


def _pair_loss(lp: Tensor, mask: Tensor, norm: str) -> Tensor:
    """Σ over rows of the "reinforce this completion" loss: -(1/n_i) Σ_t log p (`mean`, per-completion
    mean NLL, the reference) or -Σ_t log p (`sum`: every token weighs the same, as under Dr.GRPO's
    constant normaliser)."""
    nll = -(lp * mask).sum(1)
    if norm == "mean":
        return (nll / mask.sum(1)).sum()
    if norm == "sum":
        return nll.sum()
    raise ValueError(f"pair loss norm {norm!r} is not one of {PAIR_LOSS_NORMS}")


def _reinforce_grad(
    model: nn.Module, params: list[nn.Parameter], prompt_ids: list[int],
    completion_ids: list[int], device: torch.device, norm: str = "mean",
) -> list[Tensor]:
    """∂/∂δS of one pair side's reinforce loss (`_pair_loss`), one per module (not written to .grad)."""
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    lp = completion_logprobs(model, ids, len(prompt_ids))
    return list(torch.autograd.grad(_pair_loss(lp, torch.ones_like(lp), norm), params))


def _batched_reinforce_grads(
    model: nn.Module, knobs: Sequence[SVDKnob], seqs: Sequence[tuple[list[int], list[int]]],
    device: torch.device, norm: str = "mean",
) -> list[Tensor]:
    """Per-sequence δS gradients of the reinforce loss (`_pair_loss`) for a batch, one backward.

    Sequences are right-padded (causal attention: real tokens never see the padding, so no
    mask is needed); hidden states are gathered at each row's completion positions before
    the LM head, so no logits are computed for prompts or padding, and the head's log-softmax runs
    in chunks (`logprobs.head_logprobs`: no [B, Lc, V] tensor is kept for the backward). The
    adapter's per-rollout gradients give each row's gradient exactly: row i equals
    `_reinforce_grad` on pair i alone (up to fp reassociation). Returns one [B, r] fp32 CPU tensor per knob.
    """
    B = len(seqs)
    lens = [len(p) + len(c) for p, c in seqs]
    L, Lc = max(lens), max(len(c) for _, c in seqs)
    ids = torch.zeros((B, L), dtype=torch.long)
    pos = torch.zeros((B, Lc), dtype=torch.long)  # hidden position predicting each completion token
    tgt = torch.zeros((B, Lc), dtype=torch.long)
    mask = torch.zeros((B, Lc))
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        pos[i, : len(c)] = torch.arange(len(p) - 1, len(p) + len(c) - 1)
        tgt[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1.0
    ids, pos, tgt, mask = ids.to(device), pos.to(device), tgt.to(device), mask.to(device)
    with rollout_grads(knobs, B):
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        sel = hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        loss = _pair_loss(head_logprobs(sel, tgt, model.get_output_embeddings()), mask, norm)
        torch.autograd.grad(loss, [k.delta_S for k in knobs])
        out = [k.per_rollout_grad.detach().float().cpu() for k in knobs]
        for k in knobs:
            k.per_rollout_grad = None  # nothing of the pairs is left for the training step to read
        return out


def pair_grads(
    model: nn.Module, tok, knobs: Mapping[str, SVDKnob], pairs: Sequence[Pair],
    device: str | torch.device, *, batch_size: int = 8, norm: str = "mean",
) -> dict[str, Tensor]:
    """Per-pair δS gradients of reinforcing each completion: {"hack/<m>", "clean/<m>"} ->
    fp32 CPU [n_pairs, r].

    Runs in eval mode with the quarantine ablated (δS_hack = 0), `batch_size` pairs per
    forward/backward (per-row gradients from the adapter's per-rollout recording);
    gradients are taken with autograd.grad, so no `.grad` (hence no optimizer state) is
    touched; train/eval mode and δS_hack are restored afterwards.
    `batch_size=1` is the plain one-pair-at-a-time path. `norm` is the per-completion loss
    normalisation (`_pair_loss`).
    """
    if norm not in PAIR_LOSS_NORMS:
        raise ValueError(f"pair loss norm {norm!r} is not one of {PAIR_LOSS_NORMS}")
    if not pairs:
        raise ValueError("pair_grads: no pairs given")
    dev = torch.device(device)
    names = list(knobs)
    ks = [knobs[n] for n in names]
    params = [k.delta_S for k in ks]
    if not all(p.requires_grad for p in params):
        raise RuntimeError("pair_grads: every δS must require grad (the knobs are frozen?)")
    out = {f"{side}/{n}": torch.zeros(len(pairs), knobs[n].rank) for side in ("hack", "clean")
           for n in names}
    seqs: dict[str, list[tuple[list[int], list[int]]]] = {"hack": [], "clean": []}
    for p in pairs:
        prompt_ids = encode(tok, p.prompt)
        for side, text in (("hack", p.hack), ("clean", p.clean)):
            comp = encode(tok, text)
            if not comp or not prompt_ids:
                raise ValueError(f"pair {p.name!r}: empty prompt or {side} completion")
            seqs[side].append((prompt_ids, comp))
    was_training = model.training
    model.eval()
    try:
        with ablate_quarantine(ks), torch.enable_grad():
            for side in ("hack", "clean"):
                for s in range(0, len(pairs), batch_size):
                    chunk = seqs[side][s : s + batch_size]
                    if batch_size == 1:
                        grads = [g.detach().float().cpu()[None] for g in
                                 _reinforce_grad(model, params, *chunk[0], dev, norm)]
                    else:
                        grads = _batched_reinforce_grads(model, ks, chunk, dev, norm)
                    for n, g in zip(names, grads, strict=True):
                        out[f"{side}/{n}"][s : s + len(chunk)] = g
    finally:
        model.train(was_training)
    return out


def _diffs(grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    mods = sorted(k.split("/", 1)[1] for k in grads if k.startswith("hack/"))
    if not mods:
        raise ValueError("no 'hack/<module>' entries in the gradient dict")
    out = {}
    for m in mods:
        if f"clean/{m}" not in grads:
            raise ValueError(f"gradient dict has hack/{m} but no clean/{m}")
        h, c = grads[f"hack/{m}"], grads[f"clean/{m}"]
        if h.shape != c.shape or h.ndim != 2:
            raise ValueError(f"{m}: hack {tuple(h.shape)} vs clean {tuple(c.shape)}; need [n, r]")
        out[m] = (h - c).double()
    return out


def _unit(x: Tensor) -> Tensor:
    n = x.norm()
    return x / n if float(n) > 0 else torch.zeros_like(x)


def v_grad_from(grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """v_grad[m] = unit(mean_i (g_hack_i - g_clean_i)), fp32 [r].

    Invariant: unit norm and v·mean(d) = ‖mean(d)‖ > 0 (hack-ward); the zero vector when the
    mean difference is exactly zero (no signal in that module).
    """
    return {m: _unit(d.mean(0)).float() for m, d in _diffs(grads).items()}


SIGN_RULES = ("vote", "mean")


def axis_signs(D: Tensor, vh: Tensor, rule: str) -> Tensor:
    """±1 per row of vh [k, r] that makes it hack-ward for the pair differences D [n, r].

    `vote` (the reference extractor's): the sign of the majority of the pairs' projections
    d_i · v, ties positive. `mean`: the sign of the mean difference's projection, zero positive.
    Invariant: with every row multiplied by its sign, at least half the pairs (vote) / the mean
    difference (mean) project with a non-negative coefficient.
    """
    proj = D @ vh.T  # [n, k]
    if rule == "vote":
        score = (proj > 0).sum(0) - (proj < 0).sum(0)
    elif rule == "mean":
        score = proj.mean(0)
    else:
        raise ValueError(f"axis sign rule {rule!r} is not one of {SIGN_RULES}")
    return torch.where(score < 0, -1.0, 1.0).to(vh)


def null_tol(s0: float, shape: tuple[int, ...]) -> float:
    """The singular value at or below which an axis is numerically null: s0 · max(n, r) · eps(fp32)
    (numpy's matrix_rank rule). An exactly rank-deficient D comes out of the SVD with ~1e-7 · s0
    rather than 0 on some BLAS builds, and such an axis's direction is arbitrary."""
    return s0 * max(shape) * torch.finfo(torch.float32).eps


def v_hack_from(
    grads: Mapping[str, Tensor], *, top_k: int, tau_axis: float = 0.0, sign: str = "vote"
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Top-k right singular vectors of the stacked differences D [n, r] per module.

    Returns (V {m: [k', r]}, S {m: [k']}), fp32. Invariants: rows of V orthonormal; each row
    signed hack-ward by `axis_signs(sign)`; S descending; k' = min(top_k, n, r) minus axes with
    S_i / S_0 < tau_axis (and minus numerically null axes, `null_tol`, whose direction is arbitrary).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not 0.0 <= tau_axis <= 1.0:
        raise ValueError(f"tau_axis must be in [0, 1], got {tau_axis}")
    V, S = {}, {}
    for m, D in _diffs(grads).items():
        _, s, vh = torch.linalg.svd(D, full_matrices=False)
        k = min(top_k, s.numel())
        s, vh = s[:k], vh[:k]
        vh = vh * axis_signs(D, vh, sign)[:, None]
        s0 = float(s[0]) if s.numel() else 0.0
        keep = (s > null_tol(s0, D.shape)) & (s >= tau_axis * s0) if s0 > 0 else torch.zeros_like(s, dtype=torch.bool)
        V[m] = vh[keep].float().contiguous()
        S[m] = s[keep].float().contiguous()
    return V, S


def kept_axes(S: Mapping[str, Tensor], *, k_use: int, drop_bottom_frac: float) -> dict[str, list[int]]:
    """Indices of the axes the load-time selection keeps, per module (modules left empty are absent):
    the first `k_use` axes, minus those whose singular value is below the global `drop_bottom_frac`
    quantile of the sliced singular values of all modules."""
    if k_use < 1:
        raise ValueError(f"k_use (v_hack_k) must be >= 1, got {k_use}")
    if not 0.0 <= drop_bottom_frac < 1.0:
        raise ValueError(f"drop_bottom_frac must be in [0, 1), got {drop_bottom_frac}")
    sliced = {m: S[m][:k_use] for m in S}
    allsv = torch.cat(list(sliced.values())).double() if sliced else torch.zeros(0)
    thr = float(torch.quantile(allsv, drop_bottom_frac)) if drop_bottom_frac > 0 and allsv.numel() \
        else -math.inf
    out = {}
    for m in sorted(sliced):
        idx = [i for i, x in enumerate(sliced[m].tolist()) if x >= thr]
        if idx:
            out[m] = idx
    return out


def _postprocess(
    V: Mapping[str, Tensor], S: Mapping[str, Tensor], *, k_use: int, drop_bottom_frac: float
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    keep = kept_axes(S, k_use=k_use, drop_bottom_frac=drop_bottom_frac)
    outV = {m: V[m][idx] for m, idx in keep.items()}
    outS = {m: S[m][idx] for m, idx in keep.items()}
    return outV, outS, sorted(set(V) - set(keep))


def postprocess(
    V: Mapping[str, Tensor], S: Mapping[str, Tensor], *, k_use: int, drop_bottom_frac: float
) -> tuple[dict[str, Tensor], list[str]]:
    """Load-time selection: keep the first `k_use` axes of each module, then drop every axis
    whose singular value is below the global `drop_bottom_frac` quantile of all modules'
    (kept) singular values; modules left with no axis are dropped and listed (sorted).

    Invariant: surviving rows are a subset of the input rows, in the same order.
    """
    outV, _, dropped = _postprocess(V, S, k_use=k_use, drop_bottom_frac=drop_bottom_frac)
    return outV, dropped


# ── Haar-random controls ──────────────────────────────────────────────────────────────────


def haar_v_grad(shapes: Mapping[str, int], seed: int) -> dict[str, Tensor]:
    """Seeded uniformly random unit vectors, one per module ({m: r}); modules are visited in
    sorted order from one generator, so the draw depends only on (shapes, seed)."""
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for m in sorted(shapes):
        x = torch.randn(int(shapes[m]), generator=gen, dtype=torch.float64)
        out[m] = (x / x.norm()).float()
    return out


def haar_v_hack(shapes: Mapping[str, int], k: int, seed: int) -> dict[str, Tensor]:
    """Seeded Haar-random orthonormal k-frames [min(k, r), r] per module (QR of a Gaussian
    with the sign fix that makes the distribution exactly Haar); sorted module order."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return haar_v_hack_counts({m: (k, r) for m, r in shapes.items()}, seed)


def haar_v_hack_counts(counts: Mapping[str, tuple[int, int]], seed: int) -> dict[str, Tensor]:
    """{module: (k, r)} -> seeded Haar-random orthonormal frames [min(k, r), r], drawn in sorted module
    order from one generator (QR of a Gaussian, columns' signs fixed by R's diagonal)."""
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for m in sorted(counts):
        k, r = (int(x) for x in counts[m])
        if k < 1:
            raise ValueError(f"{m}: k must be >= 1, got {k}")
        q, rr = torch.linalg.qr(torch.randn(r, min(k, r), generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(rr))[None, :]
        out[m] = q.T.contiguous().float()
    return out


# ── the directions object ─────────────────────────────────────────────────────────────────


@dataclass
class Directions:
    """Hack directions for one model.

    v_hack {m: [k, r]} and sv {m: [k]} (as extracted, or after load-time postprocessing),
    v_grad {m: [r]}, meta (str -> str, as saved), heldout (the held-out projection report),
    dropped (modules removed by postprocessing).
    """

    v_hack: dict[str, Tensor]
    sv: dict[str, Tensor]
    v_grad: dict[str, Tensor]
    meta: dict[str, str] = field(default_factory=dict)
    heldout: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    @property
    def is_control(self) -> bool:
        return self.meta.get("control") == HAAR

    def n_axes(self) -> int:
        return sum(v.shape[0] for v in self.v_hack.values())


def heldout_report(
    grads: Mapping[str, Tensor], v_hack: Mapping[str, Tensor], v_grad: Mapping[str, Tensor],
    names: Sequence[str],
) -> dict[str, Any]:
    """How the held-out pairs' differences project: per pair, the fraction of modules where
    d·V[0] > 0 and where d·v_grad > 0, plus the number of pairs for which that fraction
    exceeds one half and the overall means."""
    diffs = _diffs(grads)
    n = len(names)
    top = [[] for _ in range(n)]
    mean = [[] for _ in range(n)]
    by_axis: dict[str, list[float]] = {}
    for m, D in diffs.items():
        if D.shape[0] != n:
            raise ValueError(f"{m}: {D.shape[0]} held-out rows but {n} names")
        if m in v_hack and v_hack[m].shape[0]:
            pos = (D @ v_hack[m].double().T) > 0  # [n pairs, k axes]
            by_axis[m] = pos.double().mean(0).tolist()
            for i, x in enumerate(pos[:, 0].tolist()):
                top[i].append(x)
        if m in v_grad:
            for i, x in enumerate((D @ v_grad[m].double()).tolist()):
                mean[i].append(x > 0)
    frac_top = [sum(t) / len(t) if t else float("nan") for t in top]
    frac_mean = [sum(t) / len(t) if t else float("nan") for t in mean]

    return {
        "names": list(names),
        "n_heldout": n,
        "frac_modules_top_axis_pos": frac_top,
        "frac_modules_v_grad_pos": frac_mean,
        "n_pairs_top_axis_hackward": sum(f > 0.5 for f in frac_top),
        "n_pairs_v_grad_hackward": sum(f > 0.5 for f in frac_mean),
        "mean_frac_top_axis_pos": nanmean(frac_top),
        "mean_frac_v_grad_pos": nanmean(frac_mean),
        "axis_frac_pairs_pos": by_axis,
    }


def heldout_on_kept_axes(report: Mapping[str, Any], keep: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """The held-out check over every kept axis (not only V[0]): of the kept (module, axis) pairs, how
    many have a majority of held-out pairs projecting hack-ward, and the mean fraction of pairs that
    do. Empty when the report has no per-axis data (no held-out pairs, or an older cache file)."""
    by_axis = report.get("axis_frac_pairs_pos") or {}
    fr = [by_axis[m][i] for m, idx in keep.items() if m in by_axis for i in idx if i < len(by_axis[m])]
    if not fr:
        return {}
    return {"n_axes": len(fr), "n_axes_hackward": sum(f > 0.5 for f in fr), "mean_frac_pairs_pos": sum(fr) / len(fr)}


def directions_from_grads(
    grads: Mapping[str, Tensor], *, top_k: int, tau_axis: float, n_heldout: int,
    names: Sequence[str] | None = None, sign: str = "vote",
) -> Directions:
    """Extract from precomputed per-pair gradients; the last `n_heldout` pairs are kept out
    of the extraction and reported on."""
    n = next(iter(grads.values())).shape[0]
    if n_heldout < 0 or n - n_heldout < 2:
        raise ValueError(
            f"{n} pairs with n_heldout={n_heldout} leaves {n - n_heldout} for extraction; "
            "need at least 2 (use more pairs or a smaller n_heldout)"
        )
    names = list(names) if names is not None else [f"pair{i}" for i in range(n)]
    n_tr = n - n_heldout
    train = {k: v[:n_tr] for k, v in grads.items()}
    V, S = v_hack_from(train, top_k=top_k, tau_axis=tau_axis, sign=sign)
    vg = v_grad_from(train)
    report: dict[str, Any] = {}
    if n_heldout:
        report = heldout_report({k: v[n_tr:] for k, v in grads.items()}, V, vg, names[n_tr:])
    return Directions(V, S, vg, heldout=report)


def extract(
    model: nn.Module, tok, knobs: Mapping[str, SVDKnob], pairs: Sequence[Pair], *,
    top_k: int, tau_axis: float = 0.0, n_heldout: int = 2, device: str | torch.device = "cpu",
    sign: str = "vote", pair_norm: str = "mean",
) -> Directions:
    """Per-pair gradients on the loaded model, then `directions_from_grads`."""
    grads = pair_grads(model, tok, knobs, pairs, device, norm=pair_norm)
    d = directions_from_grads(grads, top_k=top_k, tau_axis=tau_axis, n_heldout=n_heldout,
                              names=[p.name for p in pairs], sign=sign)
    if d.heldout:
        h = d.heldout
        logger.info(
            f"v_hack extracted from {len(pairs) - n_heldout} pairs ({n_heldout} held out): "
            f"held-out pairs hack-ward on the top axis in {h['n_pairs_top_axis_hackward']}/"
            f"{n_heldout}, on v_grad in {h['n_pairs_v_grad_hackward']}/{n_heldout} "
            f"(mean module fraction {h['mean_frac_top_axis_pos']:.2f} / "
            f"{h['mean_frac_v_grad_pos']:.2f}; SHOULD be > 0.5)"
        )
    return d


# ── save / load ───────────────────────────────────────────────────────────────────────────


def pairs_hash(pairs: Sequence[Pair]) -> str:
    """Short content hash of a pairset (prompt, hack, clean of every pair, in order)."""
    return hashlib.sha256(pairs_fingerprint_text(pairs).encode()).hexdigest()[:12]


def directions_cache_path(
    out_dir: str | Path, model_id: str, pairs: Sequence[Pair], top_k: int, tau_axis: float,
    n_heldout: int = 2, sign: str = "vote", pair_norm: str = "mean", modules: Iterable[str] | None = None,
) -> Path:
    """out_dir/v_hack_<model slug>_k<top_k>[_tau<t>]_h<n_heldout>[_L<a>-<b>]_s<sign>[_nsum]_<pairs hash>.safetensors.

    `_L<a>-<b>` names the adapted blocks when `modules` (the wrapped module names) do not start
    at block 0, i.e. when only the top blocks are adapted (`--adapt-top-layers`)."""
    tau = f"_tau{tau_axis:g}" if tau_axis > 0 else ""
    norm = "" if pair_norm == "mean" else f"_n{pair_norm}"
    layers = sorted({int(m.group(1)) for n in (modules or ()) if (m := _LAYER_IDX.search(n))})
    span = f"_L{layers[0]}-{layers[-1]}" if layers and layers[0] > 0 else ""
    name = f"v_hack_{model_slug(model_id)}_k{top_k}{tau}_h{n_heldout}{span}_s{sign}{norm}_{pairs_hash(pairs)}"
    return Path(out_dir) / f"{name}.safetensors"


def save_directions(
    path: str | Path, d: Directions, *, model_id: str, pairs_source: str,
    knobs_meta: Mapping[str, Any],
) -> Path:
    """Write `d` (raw, not postprocessed) to one safetensors file, atomically.

    Metadata: schema, model, dtype, k (max rows), ranks ({m: r}), pairs_source, heldout
    (JSON) and every `knobs_meta` entry (e.g. top_k, tau_axis, n_heldout, pairs_hash,
    control) as text.
    """
    path = Path(path)
    mods = sorted(d.v_hack)
    if set(d.v_grad) != set(mods) or set(d.sv) != set(mods):
        raise ValueError("save_directions: v_hack, sv and v_grad must cover the same modules")
    tensors: dict[str, Tensor] = {}
    for m in mods:
        tensors[f"v_hack/{m}"] = d.v_hack[m].detach().float().cpu().contiguous()
        tensors[f"sv/{m}"] = d.sv[m].detach().float().cpu().contiguous()
        tensors[f"v_grad/{m}"] = d.v_grad[m].detach().float().cpu().contiguous()
    meta = {k: v for k, v in d.meta.items() if k in ("control", "seed")}
    meta.update({str(k): str(v) for k, v in knobs_meta.items()})
    meta.update({
        "schema": SCHEMA,
        "model": model_id,
        "dtype": "float32",
        "k": str(max((d.v_hack[m].shape[0] for m in mods), default=0)),
        "ranks": json.dumps({m: int(d.v_grad[m].shape[0]) for m in mods}),
        "pairs_source": pairs_source,
        "heldout": json.dumps(d.heldout),
    })
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_directions(
    path: str | Path, *, model_id: str, k_use: int, drop_bottom_frac: float,
    knobs: Mapping[str, SVDKnob] | Mapping[str, int],
) -> Directions:
    """Read a directions file, check it fits `model_id` and the wrapped modules (knobs or
    {m: r}), and apply `postprocess(k_use, drop_bottom_frac)` to v_hack (v_grad is kept for
    every module)."""
    path = Path(path)
    meta, tensors = read_checked_safetensors(path, schema=SCHEMA, model_id=model_id, what="directions",
                                             error=DirectionsError)
    want = {m: (k.rank if isinstance(k, SVDKnob) else int(k)) for m, k in knobs.items()}
    V, S, G = {}, {}, {}
    for key, t in tensors.items():
        kind, _, m = key.partition("/")
        {"v_hack": V, "sv": S, "v_grad": G}.get(kind, {})[m] = t.float()
    missing = sorted(set(want) - set(G))
    extra = sorted(set(G) - set(want))
    if missing or extra or set(V) != set(G) or set(S) != set(G):
        raise DirectionsError(
            f"{path}: modules do not match the wrapped model (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); extracted for a different adapter?"
        )
    for m, r in want.items():
        if G[m].shape != (r,) or V[m].ndim != 2 or V[m].shape[1] != r \
                or S[m].shape != (V[m].shape[0],):
            raise DirectionsError(
                f"{path}: {m}: shapes v_hack {tuple(V[m].shape)}, sv {tuple(S[m].shape)}, "
                f"v_grad {tuple(G[m].shape)} do not fit rank {r}"
            )
        if not all(torch.isfinite(t).all() for t in (V[m], S[m], G[m])):
            raise DirectionsError(f"{path}: {m}: non-finite values")
    V2, S2, dropped = _postprocess(V, S, k_use=k_use, drop_bottom_frac=drop_bottom_frac)
    if dropped:
        logger.info(f"v_hack postprocess: dropped {len(dropped)} of {len(V)} modules with no "
                    f"axis above the {drop_bottom_frac:g} singular-value quantile")
    if not V2:
        raise DirectionsError(f"{path}: drop_bottom_frac={drop_bottom_frac} left no module")
    heldout = json.loads(meta.get("heldout", "{}"))
    kept = heldout_on_kept_axes(heldout, kept_axes(S, k_use=k_use, drop_bottom_frac=drop_bottom_frac))
    if kept:
        heldout["kept_axes"] = kept
        logger.info(f"held-out pairs project hack-ward on {kept['n_axes_hackward']}/{kept['n_axes']} kept axes "
                    f"(mean fraction of pairs {kept['mean_frac_pairs_pos']:.2f}; SHOULD be > 0.5)")
    return Directions(V2, S2, G, meta=meta, heldout=heldout, dropped=dropped)


def haar_directions(shapes: Mapping[str, int], k: int | Mapping[str, int], seed: int) -> Directions:
    """A Haar control as a Directions object (unit singular values, meta control=haar).

    `k` is the axis count of every module, or {module: axis count} to match a real basis: then
    v_hack covers exactly those modules with those counts (v_grad still covers every module).
    """
    counts = k if isinstance(k, Mapping) else dict.fromkeys(shapes, k)
    V = haar_v_hack_counts({m: (counts[m], shapes[m]) for m in counts}, seed)
    dropped = sorted(set(shapes) - set(counts))
    return Directions(V, {m: torch.ones(v.shape[0]) for m, v in V.items()},
                      haar_v_grad(shapes, seed),
                      meta={"control": HAAR, "seed": str(seed)}, dropped=dropped)


def haar_like(real: Directions, shapes: Mapping[str, int], seed: int) -> Directions:
    """The Haar control matched to a real basis: the same modules with the same number of axes
    (after v_hack_k, tau_axis and drop_bottom_frac), each module's axes a Haar-random frame."""
    return haar_directions(shapes, {m: int(v.shape[0]) for m, v in real.v_hack.items()}, seed)


def resolve_directions(
    model: nn.Module, tok, knobs: Mapping[str, SVDKnob], pairs: Sequence[Pair], *,
    model_id: str, pairs_source: str, out_dir: str | Path, path: str | Path | None = None,
    top_k: int = 12, tau_axis: float = 0.0, n_heldout: int = 2, k_use: int = 5,
    drop_bottom_frac: float = 0.25, device: str | torch.device = "cpu", sign: str = "vote",
    pair_norm: str = "mean",
) -> Directions:
    """Load the directions for this run, extracting them on the loaded model on a cache miss.

    An explicit `path` must exist (it is how a saved control is run; a typo must not silently
    re-extract). Otherwise the cache path derived from model + pairs + knobs is used.
    """
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"explicit directions path {path} does not exist")
        p = Path(path)
    else:
        p = directions_cache_path(out_dir, model_id, pairs, top_k, tau_axis, n_heldout, sign, pair_norm,
                                  modules=knobs)
        if not p.is_file():
            logger.info(f"v_hack cache miss at {p}: extracting from {len(pairs)} pairs")
            d = extract(model, tok, knobs, pairs, top_k=top_k, tau_axis=tau_axis,
                        n_heldout=n_heldout, device=device, sign=sign, pair_norm=pair_norm)
            save_directions(p, d, model_id=model_id, pairs_source=pairs_source, knobs_meta={
                "top_k": top_k, "tau_axis": tau_axis, "n_heldout": n_heldout, "sign": sign,
                "pair_norm": pair_norm, "pairs_hash": pairs_hash(pairs), "n_pairs": len(pairs),
            })
    return load_directions(p, model_id=model_id, k_use=k_use,
                           drop_bottom_frac=drop_bottom_frac, knobs=knobs)


# ── refresh ───────────────────────────────────────────────────────────────────────────────


def basis_overlap(old: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> float:
    """Mean over shared modules of ‖V_new V_oldᵀ‖_F² / k_old: the fraction of the old
    subspace spanned by the new one, in [0, 1] for orthonormal rows (NaN if none shared).
    Unit vectors [r] are treated as 1-row bases."""
    vals = []
    for m in sorted(set(old) & set(new)):
        # CPU float64: the old basis may live on the run's GPU, a fresh extraction on the CPU
        a = (old[m] if old[m].ndim == 2 else old[m][None]).detach().double().cpu()
        b = (new[m] if new[m].ndim == 2 else new[m][None]).detach().double().cpu()
        if a.shape[0] == 0:
            continue
        vals.append(float((b @ a.T).pow(2).sum()) / a.shape[0])
    return sum(vals) / len(vals) if vals else float("nan")


@dataclass
class RefreshResult:
    """Outcome of `refresh`: the directions to use from now on and how far they moved."""

    directions: Directions
    refreshed: bool
    overlap_v_hack: float
    overlap_v_grad: float
    reason: str = ""


def refresh(
    model: nn.Module, tok, knobs: Mapping[str, SVDKnob], pairs: Sequence[Pair],
    old: Directions, *, top_k: int, tau_axis: float = 0.0, n_heldout: int = 2,
    k_use: int = 5, drop_bottom_frac: float = 0.25, device: str | torch.device = "cpu",
    is_control: bool = False, sign: str = "vote", pair_norm: str = "mean",
) -> RefreshResult:
    """Re-extract against the current model (quarantine ablated), postprocess like a load,
    and report the basis overlap with `old`.

    A Haar control (`is_control` or old.meta control=haar) is never replaced: the result
    has refreshed=False and the old directions.
    """
    if is_control or old.is_control:
        return RefreshResult(old, False, float("nan"), float("nan"),
                             reason="Haar-random control: directions stay fixed")
    raw = extract(model, tok, knobs, pairs, top_k=top_k, tau_axis=tau_axis,
                  n_heldout=n_heldout, device=device, sign=sign, pair_norm=pair_norm)
    V, S, dropped = _postprocess(raw.v_hack, raw.sv, k_use=k_use,
                                 drop_bottom_frac=drop_bottom_frac)
    new = Directions(V, S, raw.v_grad, meta=dict(old.meta), heldout=raw.heldout,
                     dropped=dropped)
    return RefreshResult(new, True, basis_overlap(old.v_hack, V),
                         basis_overlap(old.v_grad, raw.v_grad))
