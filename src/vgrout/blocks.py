"""Block-split adapters: one rank-2r LoRA per block Linear, split into a deployed and a quarantine block.

Per target Linear (the same selection as the SVD knob: every `nn.Linear` inside `layers.<i>.`, optionally
only the last `top_layers` blocks) with frozen weight W [d_out, d_in]:

    A = [A_dep; A_quar] ∈ ℝ^{2r × d_in},   B = [B_dep | B_quar] ∈ ℝ^{d_out × 2r},
    W' = W + (B A − B0 A0) = W + Σ_blocks (B_k A_k − B0_k A0_k),

where A0, B0 are frozen copies of the initial values. Rows/columns [:r] form the deployed block, [r:] the
quarantine block; because B A = B_dep A_dep + B_quar A_quar there are no cross terms, so the blocks are two
independent adapters. Deploy = the quarantine reset to its initial value (its term is then exactly 0).

Parametrisation. The trainable leaves are the *offsets from the initial values*, a_k = A_k − A0_k and
b_k = B_k − B0_k (fp32, zero at init), one leaf per block and matrix. Each block's output is computed as

    out_k = B0_k (a_k x) + b_k ((A0_k + a_k) x)        (= B_k A_k x − B0_k A0_k x exactly in real arithmetic),

so a block whose offsets are zero contributes exactly 0.0 (not merely to rounding): the net delta at init
is exactly zero for every initialisation, and a reset quarantine is exactly absent. The gradients equal those
of A and B (a translation), Adam is translation-equivariant, and AdamW's decoupled weight decay on the
offsets decays A, B toward their initial values (the net delta toward 0), which is the decay this adapter
wants; one optimizer over `deployed_params + quarantine_params` with the run's weight decay is correct.

Initialisations (`INITS`), each giving A0 [2r, d_in], B0 [d_out, 2r]:
  lora2r      Gaussian, A0 ~ N(0, 1/d_in), B0 ~ N(0, 1/(2r)), seeded per module name.
  pissa       W's top-2r singular vectors (unit), alternating: components 0, 2, 4.. deployed, 1, 3, 5.. quarantine.
  corda       the top-2r components of W C^{1/2}, C the covariance of the pairs' contrastive input deltas
              (plus a small ridge); read directions C^{1/2} q (unit), the same alternating split.
  scorda      signed CorDA: the quarantine's top slot is (u_in, u_out), u_in = unit(mean of the pairs' input
              deltas x_hack − x_clean), u_out = unit(W u_in); every other slot is W's next singular pair
              Gram–Schmidt-orthonormalised against the seed (and the slots before it).
  scorda_rev  the same seed placed in the deployed block's top slot: the directional control.

Per-rollout masks (m, d) act on the two blocks' outputs, row by row:
  keep   (0,0)  the quarantine's output is 0 in forward and backward; only the deployed block trains.
  absorb (1,0)  both blocks in the forward, both train (= no mask).
  route  (1,1)  both in the forward; the deployed output is detached, so only the quarantine trains.
(0,1) would train nothing and is refused.

dtype policy: A0, B0 live in the weight's dtype on its device (bf16 on GPU) and the offsets are fp32 leaves
cast to the activation dtype in the forward; the offset path a x is computed on its own, so a small offset
is not rounded away against A0. Merging for generation forms the dense delta in fp32 and rounds W' once.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .adapter import (
    AdapterModule,
    _block_linears,
    _knob_list,
    _refuse_if_merged,
    read_checked_safetensors,
    svd_cached,
)

# the contexts and parameter lists are the adapter families' common ones (adapter.py), re-exported here
from .adapter import ablate_quarantine as ablate_quarantine
from .adapter import deployed_params as deployed_params
from .adapter import grad_mass as grad_mass
from .adapter import merged_for_generation as merged_for_generation
from .adapter import quarantine_mass as quarantine_mass
from .adapter import quarantine_norm as quarantine_norm
from .adapter import quarantine_params as quarantine_params
from .adapter import snapshot as snapshot
from .adapter import update_mass as update_mass
from .adapter import zero_delta as zero_delta
from .atomic import atomic_path
from .model import encode, model_slug
from .pairs import Pair, pairs_fingerprint_text

Init = Literal["lora2r", "pissa", "corda", "scorda", "scorda_rev"]
INITS: tuple[Init, ...] = get_args(Init)
NEEDS_PAIRS: frozenset[str] = frozenset({"corda", "scorda", "scorda_rev"})  # calibrated on contrastive pairs
SVD_INITS: frozenset[str] = frozenset({"pissa", "corda", "scorda", "scorda_rev"})  # need 2r <= min(d_out, d_in)
BLOCKS_SCHEMA = "vgrout.blocks/1"
CALIB_SCHEMA = "vgrout.calib/1"


# ── the module ───────────────────────────────────────────────────────────────────────────


class BlockLoRA(AdapterModule):
    """One frozen Linear plus a rank-2r block LoRA: W' = W + Σ_k (B_k A_k − B0_k A0_k), k ∈ {dep, quar}.

    Buffers A0_dep, A0_quar [r, d_in] and B0_dep, B0_quar [d_out, r] (weight dtype, frozen initial values);
    parameters a_dep, a_quar [r, d_in] and b_dep, b_quar [d_out, r] (fp32 offsets, zero-initialised).
    `seed_slot` is the row of A0 (column of B0) holding scorda's signed seed, else None.
    """

    def __init__(self, name: str, base: nn.Linear, A0: Tensor, B0: Tensor, r: int, *, init: str,
                 seed_slot: int | None = None) -> None:
        super().__init__()
        w = base.weight
        d_out, d_in = w.shape
        if r < 1 or A0.shape != (2 * r, d_in) or B0.shape != (d_out, 2 * r):
            raise ValueError(f"{name}: init A0{tuple(A0.shape)} B0{tuple(B0.shape)} does not fit weight "
                             f"{tuple(w.shape)} at r={r} (need A0 [2r, d_in], B0 [d_out, 2r])")
        if not (torch.isfinite(A0).all() and torch.isfinite(B0).all()):
            raise ValueError(f"{name}: non-finite initial values")
        self.name, self.base, self.r, self.init, self.seed_slot = name, base, r, init, seed_slot
        kw = {"device": w.device, "dtype": w.dtype}
        self.register_buffer("A0_dep", A0[:r].to(**kw).contiguous(), False)
        self.register_buffer("A0_quar", A0[r:].to(**kw).contiguous(), False)
        self.register_buffer("B0_dep", B0[:, :r].to(**kw).contiguous(), False)
        self.register_buffer("B0_quar", B0[:, r:].to(**kw).contiguous(), False)
        f32 = {"device": w.device, "dtype": torch.float32}
        self.a_dep = nn.Parameter(torch.zeros(r, d_in, **f32))
        self.b_dep = nn.Parameter(torch.zeros(d_out, r, **f32))
        self.a_quar = nn.Parameter(torch.zeros(r, d_in, **f32))
        self.b_quar = nn.Parameter(torch.zeros(d_out, r, **f32))
        self._mask: tuple[Tensor, Tensor] | None = None  # inside rollout_masks(): (m, d) bool [G]
        self._capture: _Pool | None = None  # inside capture_bottleneck()

    def deployed(self) -> list[nn.Parameter]:
        return [self.a_dep, self.b_dep]

    def quarantine(self) -> list[nn.Parameter]:
        return [self.a_quar, self.b_quar]

    @property
    def A0(self) -> Tensor:
        """The initial A [2r, d_in] (fp32 copy)."""
        return torch.cat([self.A0_dep, self.A0_quar]).float()

    @property
    def B0(self) -> Tensor:
        """The initial B [d_out, 2r] (fp32 copy)."""
        return torch.cat([self.B0_dep, self.B0_quar], 1).float()

    @property
    def A(self) -> Tensor:
        """The current A = A0 + a [2r, d_in] (fp32, detached)."""
        return self.A0 + torch.cat([self.a_dep, self.a_quar]).detach()

    @property
    def B(self) -> Tensor:
        """The current B = B0 + b [d_out, 2r] (fp32, detached)."""
        return self.B0 + torch.cat([self.b_dep, self.b_quar], 1).detach()

    @torch.no_grad()
    def merge_delta(self) -> Tensor:
        return self.delta_weight()

    def delta_weight(self, blocks: Sequence[str] = ("dep", "quar")) -> Tensor:
        """Σ over `blocks` of B_k A_k − B0_k A0_k as a dense fp32 [d_out, d_in] matrix (no grad)."""
        out = torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        for k in blocks:
            A0, B0 = getattr(self, f"A0_{k}").float(), getattr(self, f"B0_{k}").float()
            a, b = getattr(self, f"a_{k}"), getattr(self, f"b_{k}")
            out += B0 @ a + b @ (A0 + a)
        return out

    def read(self, x: Tensor) -> Tensor:
        """The deployed block's live bottleneck A_dep x = (A0_dep + a_dep) x, [..., r] (the gate reads it)."""
        return F.linear(x, self.A0_dep.to(x.dtype)) + F.linear(x, self.a_dep.to(x.dtype))

    def _block(self, x: Tensor, k: str) -> tuple[Tensor, Tensor]:
        """(B0 (a x) + b ((A0 + a) x), (A0 + a) x) for block k: its output and its live bottleneck."""
        dt = x.dtype
        A0, B0 = getattr(self, f"A0_{k}").to(dt), getattr(self, f"B0_{k}").to(dt)
        a, b = getattr(self, f"a_{k}").to(dt), getattr(self, f"b_{k}").to(dt)
        ax = F.linear(x, a)
        h = F.linear(x, A0) + ax
        return F.linear(ax, B0) + F.linear(h, b), h

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self._bypass or self._merged:
            if self._merged and self._mask is not None:
                raise RuntimeError(f"{self.name}: per-rollout masks inside merged_for_generation(); the merged "
                                   "weight cannot mask a block. Train outside the merge context.")
            if self._merged and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
                raise RuntimeError(f"{self.name}: forward with grad enabled inside merged_for_generation(); "
                                   "the offsets would get no gradient. Train outside the merge context.")
            if self._capture is not None:
                with torch.no_grad():
                    self._capture.add(self.name, self.read(x))
            return y
        dep, h_dep = self._block(x, "dep")
        if self._capture is not None:
            self._capture.add(self.name, h_dep)
        quar = None if self._quar_off else self._block(x, "quar")[0]
        if self._mask is not None:
            m, d = self._mask
            if x.dim() < 2 or x.shape[0] != m.shape[0]:
                raise ValueError(f"{self.name}: input {tuple(x.shape)} inside rollout_masks(G={m.shape[0]}); "
                                 "the leading dim must be the rollout dim, one row per rollout")
            shape = (m.shape[0],) + (1,) * (dep.dim() - 1)
            dep = torch.where(d.view(shape), dep.detach(), dep)
            if quar is not None:
                quar = torch.where(m.view(shape), quar, torch.zeros((), dtype=quar.dtype, device=quar.device))
        delta = dep if quar is None else dep + quar
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, r={self.r}, init={self.init!r}"


# ── target selection ─────────────────────────────────────────────────────────────────────


def target_linears(model: nn.Module, top_layers: int = 0) -> list[tuple[str, nn.Linear]]:
    """The Linears a block adapter wraps: exactly `adapter.wrap_model`'s selection (every Linear inside a
    transformer block, or those of the top `top_layers` blocks), so both families adapt the same modules."""
    return _block_linears(model, top_layers)


# ── initialisations (pure) ───────────────────────────────────────────────────────────────


def _unit(x: Tensor) -> Tensor:
    n = x.norm()
    if not float(n) > 0:
        raise ValueError("cannot normalise a zero vector")
    return x / n


def _unit_rows(M: Tensor) -> Tensor:
    return M / M.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def module_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, module name): a module's draw does not depend on which other
    modules are wrapped (e.g. with `top_layers`)."""
    return int.from_bytes(hashlib.blake2b(f"{int(seed)}:{name}".encode(), digest_size=8).digest(), "big") >> 1


def gaussian_init(d_out: int, d_in: int, r: int, seed: int) -> tuple[Tensor, Tensor]:
    """`lora2r`: A0 ~ N(0, 1/d_in) [2r, d_in], B0 ~ N(0, 1/(2r)) [d_out, 2r], fp32, from one seeded
    generator. Both blocks are drawn from the same distribution (statistically matched)."""
    gen = torch.Generator().manual_seed(int(seed))
    A0 = torch.randn(2 * r, d_in, generator=gen) / math.sqrt(d_in)
    B0 = torch.randn(d_out, 2 * r, generator=gen) / math.sqrt(2 * r)
    return A0, B0


def _check_svd_rank(r: int, d_out: int, d_in: int, what: str) -> None:
    if 2 * r > min(d_out, d_in):
        raise ValueError(f"{what} needs 2r <= min(d_out, d_in) = {min(d_out, d_in)}, got r={r}; "
                         f"use r <= {min(d_out, d_in) // 2} (or the Gaussian lora2r init)")


def interleave_blocks(in_dirs: Tensor, out_dirs: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Components 0, 2, 4, .. to the deployed block and 1, 3, 5, .. to the quarantine: in_dirs [≥2r, d_in]
    (rows) and out_dirs [d_out, ≥2r] (columns) -> (A0 [2r, d_in], B0 [d_out, 2r]). Each block gets r of the
    top 2r components, equally important and disjoint."""
    order = list(range(0, 2 * r, 2)) + list(range(1, 2 * r, 2))
    return in_dirs[order].contiguous(), out_dirs[:, order].contiguous()


def pissa_init(U: Tensor, Vh: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """`pissa`: W's top-2r singular vectors, singular values dropped (unit rows of A0, unit columns of
    B0), split by `interleave_blocks`. Invariant: A0 rows and B0 columns are orthonormal."""
    _check_svd_rank(r, U.shape[0], Vh.shape[1], "pissa")
    return interleave_blocks(_unit_rows(Vh[: 2 * r].float()), _unit_rows(U[:, : 2 * r].T.float()).T, r)


def contrast_metric_sqrt(D: Tensor, eps: float = 1e-3) -> tuple[float, Tensor, Tensor]:
    """C^{1/2} in low-rank form for C = DᵀD/P + a I, a = eps · tr(DᵀD/P)/d_in (a ridge scaled to the
    mean input-delta variance): returns (√a, Vd [k, d_in], g [k]) with

        C^{1/2} = √a I + Vdᵀ diag(g) Vd,   g = √(a + σ²/P) − √a,   (σ, Vd) the SVD of D [P, d_in].

    Invariant: (C^{1/2})² = C (Vd has orthonormal rows spanning D's row space). float64."""
    D = D.double()
    P, d_in = D.shape
    lam0 = float(D.pow(2).sum()) / P
    if not lam0 > 0:
        raise ValueError("contrastive input deltas are all zero: the pairs' hack and clean sides read the same")
    a = eps * lam0 / d_in
    _, sig, Vd = torch.linalg.svd(D, full_matrices=False)
    g = (a + sig.pow(2) / P).sqrt() - math.sqrt(a)
    return math.sqrt(a), Vd, g


def _apply_sqrt(X: Tensor, sqrt_a: float, Vd: Tensor, g: Tensor) -> Tensor:
    """X C^{1/2} for X [n, d_in] (C^{1/2} is symmetric)."""
    return sqrt_a * X + ((X @ Vd.T) * g) @ Vd


def corda_init(W: Tensor, D: Tensor, r: int, eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """`corda`: with C from the contrastive input deltas D [P, d_in] (`contrast_metric_sqrt`), the SVD
    W C^{1/2} = U S Qᵀ; output directions U[:, :2r], read directions unit(Qᵀ[:2r] C^{1/2}) (the input
    directions W C^{1/2} maps most strongly, mapped back to input space), split by `interleave_blocks`.
    Invariants: B0 columns orthonormal, A0 rows unit; a strong contrast axis u becomes the top read (±u)."""
    d_out, d_in = W.shape
    _check_svd_rank(r, d_out, d_in, "corda")
    if D.ndim != 2 or D.shape[1] != d_in:
        raise ValueError(f"corda: deltas {tuple(D.shape)} do not fit d_in={d_in}")
    sqrt_a, Vd, g = contrast_metric_sqrt(D, eps)  # float64 (small: P x d_in)
    Vd, g = Vd.to(device=W.device, dtype=torch.float32), g.to(device=W.device, dtype=torch.float32)
    M = _apply_sqrt(W.float(), sqrt_a, Vd, g)  # the big SVD runs in fp32 on the weight's device
    U, _, Qh = torch.linalg.svd(M, full_matrices=False)
    reads = _apply_sqrt(Qh[: 2 * r], sqrt_a, Vd, g)
    return interleave_blocks(_unit_rows(reads).cpu(), U[:, : 2 * r].cpu(), r)


def orthonormal_fill(candidates: Tensor, against: Tensor, count: int, tol: float = 1e-8) -> Tensor:
    """Gram–Schmidt (twice, float64) of `candidates` rows [n, dim], in order, against the orthonormal rows
    `against` [k, dim] and each other; rows whose residual is below tol · their norm are skipped. Returns
    the first `count` accepted rows [count, dim]. Invariant: [against; result] has orthonormal rows and
    result row j lies in span(against, candidates[:i_j+1])."""
    basis = [row for row in against.double()]
    out: list[Tensor] = []
    for v in candidates.double():
        n0 = float(v.norm())
        for _ in range(2):
            for b in basis:
                v = v - (v @ b) * b
        if n0 == 0 or float(v.norm()) <= tol * n0:
            continue
        v = v / v.norm()
        basis.append(v)
        out.append(v)
        if len(out) == count:
            return torch.stack(out)
    raise ValueError(f"only {len(out)} of {count} candidate directions are independent of the seed")


def scorda_seed(W: Tensor, D: Tensor) -> tuple[Tensor, Tensor]:
    """The signed hack seed (u_in [d_in], u_out [d_out]): u_in = unit(mean_i D_i) with D [P, d_in] the
    pairs' pooled input deltas x_hack − x_clean, u_out = unit(W u_in). Invariant: unit norms and
    u_in · mean(D) = ‖mean(D)‖ > 0 (hack-ward on the pairs it was computed from). float64."""
    mean = D.double().mean(0)
    if not float(mean.norm()) > 0:
        raise ValueError("scorda: the mean contrastive input delta is zero (hack and clean sides read the same)")
    u_in = _unit(mean)
    wu = W.double() @ u_in.to(W.device)
    if not float(wu.norm()) > 0:
        raise ValueError("scorda: W maps the hack input axis to zero (u_in lies in W's null space)")
    return u_in, _unit(wu).cpu()


def scorda_init(W: Tensor, U: Tensor, Vh: Tensor, D: Tensor, r: int, *, seed_block: str = "quar",
                ) -> tuple[Tensor, Tensor, int]:
    """`scorda` (seed_block="quar") / `scorda_rev` ("dep"): (A0, B0, seed slot). The seed slot (r, the
    quarantine's top slot, or 0, the deployed block's) holds (u_in, u_out) from `scorda_seed`; every other
    slot, in order, holds the next of W's singular pairs (Vh rows / U columns), Gram–Schmidt-orthonormalised
    against u_in (rows) / u_out (columns) and the earlier slots. Invariants: A0 rows orthonormal, B0
    columns orthonormal, so the seed is unit and orthogonal to every other slot."""
    d_out, d_in = W.shape
    _check_svd_rank(r, d_out, d_in, "scorda")
    if seed_block not in ("quar", "dep"):
        raise ValueError(f"seed_block must be 'quar' or 'dep', got {seed_block!r}")
    u_in, u_out = scorda_seed(W, D)
    ins = orthonormal_fill(Vh.cpu(), u_in[None], 2 * r - 1)
    outs = orthonormal_fill(U.cpu().T, u_out[None], 2 * r - 1)
    slot = r if seed_block == "quar" else 0
    A0 = torch.cat([ins[:slot], u_in[None], ins[slot:]])
    B0 = torch.cat([outs[:slot], u_out[None], outs[slot:]]).T
    return A0.float().contiguous(), B0.float().contiguous(), slot


# ── calibration: contrastive input deltas ────────────────────────────────────────────────


def pair_sequences(tok, pairs: Sequence[Pair], side: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each pair's `side` ("hack" or "clean"), tokenised as vhack does."""
    out = []
    for p in pairs:
        prompt, comp = encode(tok, p.prompt), encode(tok, getattr(p, side))
        if not prompt or not comp:
            raise ValueError(f"pair {p.name!r}: empty prompt or {side} completion")
        out.append((prompt, comp))
    return out


def completion_batch(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded ids [B, L] and pooling weights [B, L] (1 at each row's completion tokens, else 0).
    Causal attention keeps the padding after a row's last token from touching its real tokens."""
    L = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    w = torch.zeros(len(seqs), L)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        w[i, len(p) : len(p) + len(c)] = 1.0
    return ids, w


def completion_weights(plen: int, comp_mask: Tensor) -> Tensor:
    """Pooling weights [B, plen + Lc] for a group's right-padded batch (`rollout.Group.tensors`): 0 on the
    prompt, the completion mask after it."""
    return torch.cat([torch.zeros(comp_mask.shape[0], plen, device=comp_mask.device), comp_mask.float()], 1)


def pooled(x: Tensor, w: Tensor) -> Tensor:
    """Weighted mean over positions: x [B, L, n], w [B, L] -> [B, n] fp32 (each row's completion mean)."""
    if x.dim() != 3 or tuple(x.shape[:2]) != tuple(w.shape):
        raise ValueError(f"activations {tuple(x.shape)} do not match pooling weights {tuple(w.shape)}")
    w = w.to(device=x.device, dtype=torch.float32)
    return (x.detach().float() * w[..., None]).sum(1) / w.sum(1, keepdim=True)


def _check_weights(w: Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"pooling weights must be [B, L], got {tuple(w.shape)}")
    empty = (w.sum(1) <= 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty[:5]} have no completion token to pool over")


@torch.no_grad()
def input_deltas(model: nn.Module, tok, pairs: Sequence[Pair], names: Sequence[str],
                 device: str | torch.device, *, batch_size: int = 8) -> dict[str, Tensor]:
    """Per module, the pooled input to that Linear over each pair's completion tokens, hack minus clean:
    {m: [P, d_in]} fp32 CPU. Runs the plain (unwrapped) model's decoder in eval mode, no grad, `batch_size`
    pairs per forward; train/eval mode is restored."""
    if not pairs:
        raise ValueError("input_deltas: no pairs given")
    mods = {n: model.get_submodule(n) for n in names}
    bad = [n for n, m in mods.items() if not isinstance(m, nn.Linear)]
    if bad:
        raise ValueError(f"calibrate the plain model before wrapping it ({bad[:2]} are not nn.Linear)")
    dev = torch.device(device)
    sides: dict[str, dict[str, list[Tensor]]] = {"hack": {n: [] for n in names}, "clean": {n: [] for n in names}}
    was_training = model.training
    model.eval()
    try:
        for side in ("hack", "clean"):
            seqs = pair_sequences(tok, pairs, side)
            for s in range(0, len(seqs), batch_size):
                ids, w = completion_batch(seqs[s : s + batch_size])
                pool = _Pool(w.to(dev))
                hooks = [mod.register_forward_pre_hook(pool.input_hook(n)) for n, mod in mods.items()]
                try:
                    model.get_decoder()(input_ids=ids.to(dev), use_cache=False)
                finally:
                    for h in hooks:
                        h.remove()
                for n in names:
                    sides[side][n].append(pool.acts[n].cpu())
    finally:
        model.train(was_training)
    return {n: torch.cat(sides["hack"][n]) - torch.cat(sides["clean"][n]) for n in names}


@dataclass
class Calibration:
    """The contrastive input deltas of a pairset: deltas {module: [P, d_in]} (pairs in order), names of the
    pairs, and the file's metadata. Inits use the first P − n_heldout pairs; the rest check the seed."""

    deltas: dict[str, Tensor]
    pair_names: list[str]
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        return len(self.pair_names)


def pairs_hash(pairs: Sequence[Pair]) -> str:
    return hashlib.sha256(pairs_fingerprint_text(pairs).encode()).hexdigest()[:12]


def _names_hash(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:8]


def calibration_cache_path(out_dir: str | Path, model_id: str, pairs: Sequence[Pair], names: Sequence[str]) -> Path:
    """out_dir/calib_<model slug>_<module set hash>_<pairs hash>.safetensors."""
    return Path(out_dir) / f"calib_{model_slug(model_id)}_{_names_hash(names)}_{pairs_hash(pairs)}.safetensors"


def _read_calibration(path: Path, expect: Mapping[str, str], names: Sequence[str],
                      d_in: Mapping[str, int], n_pairs: int) -> dict[str, Tensor] | None:
    """The cached deltas, or None (with a warning) when unreadable or not what `expect` describes."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - any read failure means a bad entry
        logger.warning(f"calibration cache {path}: unreadable ({type(e).__name__}: {e}); recomputing")
        return None
    bad = [k for k, v in expect.items() if meta.get(k) != v]
    if bad:
        logger.warning(f"calibration cache {path}: metadata mismatch in {bad}; recomputing")
        return None
    out = {}
    for n in names:
        t = tensors.get(f"delta/{n}")
        if t is None or t.shape != (n_pairs, d_in[n]) or not torch.isfinite(t).all():
            logger.warning(f"calibration cache {path}: delta/{n} missing, misshapen or non-finite; recomputing")
            return None
        out[n] = t.float()
    return out


CALIB_STATS = {"computed": 0, "loaded": 0}  # process-wide cache traffic (tests read deltas)


def resolve_calibration(model: nn.Module, tok, pairs: Sequence[Pair], *, model_id: str, out_dir: str | Path,
                        top_layers: int = 0, device: str | torch.device = "cpu", batch_size: int = 8,
                        ) -> Calibration:
    """The contrastive input deltas of `pairs` on the plain `model`, from the cache file keyed by model id,
    module set and pairs content (`calibration_cache_path`) when valid, else computed (`input_deltas`) and
    written atomically. Call before `wrap_blocks`."""
    names = [n for n, _ in target_linears(model, top_layers)]
    d_in = {n: model.get_submodule(n).in_features for n in names}
    path = calibration_cache_path(out_dir, model_id, pairs, names)
    expect = {"schema": CALIB_SCHEMA, "model": model_id, "pairs_hash": pairs_hash(pairs),
              "n_pairs": str(len(pairs)), "modules": _names_hash(names), "pooling": "completion_mean"}
    deltas = _read_calibration(path, expect, names, d_in, len(pairs)) if path.is_file() else None
    if deltas is None:
        logger.info(f"block-adapter calibration: {len(pairs)} pairs -> pooled input deltas on {len(names)} modules")
        deltas = input_deltas(model, tok, pairs, names, device, batch_size=batch_size)
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file({f"delta/{n}": t.contiguous() for n, t in deltas.items()}, str(tmp),
                      metadata={**expect, "pair_names": json.dumps([p.name for p in pairs])})
        CALIB_STATS["computed"] += 1
    else:
        CALIB_STATS["loaded"] += 1
    return Calibration(deltas, [p.name for p in pairs], dict(expect))


def seed_heldout_report(u_in: Mapping[str, Tensor], heldout: Mapping[str, Tensor]) -> dict[str, float]:
    """How held-out pairs' input deltas {m: [n, d_in]} project on the seeds {m: [d_in]}: the mean over
    modules of the fraction of held-out pairs with d · u_in > 0, and the fraction of modules where the mean
    held-out delta projects positively (a working seed puts both above 0.5)."""
    fr, pos = [], []
    for m, u in u_in.items():
        p = heldout[m].double() @ u.double()
        fr.append(float((p > 0).double().mean()))
        pos.append(float(p.mean()) > 0)
    return {"mean_frac_pairs_pos": sum(fr) / len(fr), "frac_modules_mean_pos": sum(pos) / len(pos),
            "n_heldout": int(next(iter(heldout.values())).shape[0]), "n_modules": len(fr)}


# ── wrapping ─────────────────────────────────────────────────────────────────────────────


def wrap_blocks(model: nn.Module, model_id: str, *, init: str = "lora2r", r: int, seed: int = 0,
                top_layers: int = 0, calibration: Calibration | None = None, n_heldout: int = 2,
                svd_cache_root: Path = Path("svd_cache"), corda_eps: float = 1e-3,
                ) -> dict[str, BlockLoRA]:
    """Freeze `model` and replace each target Linear (`target_linears`) by a BlockLoRA with the `init`
    initialisation; return {name: adapter} in model order.

    `calibration` (from `resolve_calibration` on the plain model) is required for corda / scorda /
    scorda_rev; they use its first P − n_heldout pairs, and scorda logs how the n_heldout others project on
    the seed. SVDs of W come from the SVD knob's cache (`svd_cache_root/<model slug>/`)."""
    if init not in INITS:
        raise ValueError(f"unknown block-adapter init {init!r}; valid: {', '.join(INITS)}")
    if r < 1:
        raise ValueError(f"block rank r must be >= 1, got {r}")
    targets = target_linears(model, top_layers)
    if init in SVD_INITS:
        for name, lin in targets:
            _check_svd_rank(r, *lin.weight.shape, f"{init} (module {name})")
    train = held = None
    if init in NEEDS_PAIRS:
        if calibration is None:
            raise ValueError(f"init {init!r} needs contrastive pairs: pass calibration=resolve_calibration(...)")
        missing = [n for n, _ in targets if n not in calibration.deltas]
        if missing:
            raise ValueError(f"calibration has no deltas for {missing[:3]} (made for another module set?)")
        n_train = calibration.n_pairs - n_heldout
        if n_heldout < 0 or n_train < 1:
            raise ValueError(f"{calibration.n_pairs} calibration pairs with n_heldout={n_heldout} leave "
                             f"{n_train} to initialise from; need at least 1")
        train = {n: d[:n_train] for n, d in calibration.deltas.items()}
        held = {n: d[n_train:] for n, d in calibration.deltas.items()} if n_heldout else None
    for p in model.parameters():
        p.requires_grad_(False)
    cache_dir = Path(svd_cache_root) / model_slug(model_id)
    adapters: dict[str, BlockLoRA] = {}
    seeds: dict[str, Tensor] = {}
    for name, lin in targets:
        W = lin.weight.detach()
        d_out, d_in = W.shape
        slot = None
        if init == "lora2r":
            A0, B0 = gaussian_init(d_out, d_in, r, module_seed(seed, name))
        else:
            U, _, Vh = svd_cached(W, model_id, name, cache_dir)
            if init == "pissa":
                A0, B0 = pissa_init(U, Vh, r)
            elif init == "corda":
                A0, B0 = corda_init(W.float(), train[name].to(W.device), r, corda_eps)
            else:
                A0, B0, slot = scorda_init(W.float(), U, Vh, train[name], r,
                                           seed_block="quar" if init == "scorda" else "dep")
                seeds[name] = A0[slot]
        ad = BlockLoRA(name, lin, A0, B0, r, init=init, seed_slot=slot)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, ad)
        adapters[name] = ad
    n_par = sum(p.numel() for a in adapters.values() for p in a.deployed())
    logger.info(f"wrapped {len(adapters)} Linears with {init} block adapters (r={r} per block): "
                f"{n_par:,} deployed offsets (+ as many in the quarantine)")
    if seeds and held is not None:
        rep = seed_heldout_report(seeds, held)
        logger.info(f"{init} seed: held-out pairs project hack-ward in {rep['mean_frac_pairs_pos']:.2f} of "
                    f"(pair, module) cases; mean held-out delta hack-ward in {rep['frac_modules_mean_pos']:.2f} "
                    "of modules (SHOULD be > 0.5)")
    return adapters


# ── parameter lists ──────────────────────────────────────────────────────────────────────


def _blocks_only(adapters) -> list[BlockLoRA]:
    ads = _knob_list(adapters)
    for a in ads:
        if not isinstance(a, BlockLoRA):
            raise TypeError(f"expected BlockLoRA, got {type(a).__name__}")
    return ads


KEEP, ABSORB, ROUTE = (False, False), (True, False), (True, True)


def check_masks(m: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """(m, d) as bool [G] tensors; refuses other shapes, a length mismatch and (m=0, d=1) rows."""
    m, d = torch.as_tensor(m), torch.as_tensor(d)
    if m.dim() != 1 or d.shape != m.shape or m.numel() == 0:
        raise ValueError(f"masks must be two equal-length 1-D tensors [G], got m{tuple(m.shape)} d{tuple(d.shape)}")
    if m.dtype != torch.bool or d.dtype != torch.bool:
        if not (((m == 0) | (m == 1)).all() and ((d == 0) | (d == 1)).all()):
            raise ValueError("masks must be 0/1 (or bool)")
        m, d = m != 0, d != 0
    bad = (d & ~m).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rollouts {bad[:5]} have mask (0,1), which trains nothing; use keep (0,0), "
                         "absorb (1,0) or route (1,1)")
    return m, d


@contextmanager
def rollout_masks(adapters, m: Tensor, d: Tensor) -> Iterator[None]:
    """Forwards inside apply per-rollout block masks (row b of the batch is rollout b): keep (0,0) zeroes
    the quarantine's output (forward and backward), absorb (1,0) leaves both blocks, route (1,1) detaches
    the deployed block's output. Not re-entrant; refused inside merged_for_generation()."""
    ads = _blocks_only(adapters)
    _refuse_if_merged(ads, "rollout_masks")
    if any(a._mask is not None for a in ads):
        raise RuntimeError("rollout_masks() is not re-entrant")
    m, d = check_masks(m, d)
    dev = ads[0].A0_dep.device if ads else m.device
    mask = (m.to(dev), d.to(dev))
    for a in ads:
        a._mask = mask
    try:
        yield
    finally:
        for a in ads:
            a._mask = None


class _Pool:
    """Collects each module's pooled bottleneck [B, r] during a forward."""

    def __init__(self, weights: Tensor) -> None:
        _check_weights(weights)
        self.weights = weights
        self.acts: dict[str, Tensor] = {}

    def add(self, name: str, h: Tensor) -> None:
        self.acts[name] = pooled(h, self.weights)

    def input_hook(self, name: str):
        """A forward pre-hook that pools a Linear's input under `name`."""
        def hook(_module: nn.Module, args: tuple) -> None:
            self.add(name, args[0])
        return hook

    def stacked(self, names: Sequence[str]) -> Tensor:
        """[B, M, r] in the order of `names` (every module must have run)."""
        missing = [n for n in names if n not in self.acts]
        if missing:
            raise RuntimeError(f"no bottleneck recorded for {missing[:3]}: run the model's forward inside")
        return torch.stack([self.acts[n] for n in names], 1)


@contextmanager
def capture_bottleneck(adapters, weights: Tensor) -> Iterator[_Pool]:
    """Forwards inside record, per module, the deployed block's live bottleneck A_dep x pooled over each
    row's completion tokens (`weights` [B, L], e.g. `completion_weights`); `.stacked(names)` gives
    [B, M, r] fp32. Works in any mode (zero_delta, merged, ablated); recording is detached."""
    ads = _blocks_only(adapters)
    if any(a._capture is not None for a in ads):
        raise RuntimeError("capture_bottleneck() is not re-entrant")
    pool = _Pool(weights)
    for a in ads:
        a._capture = pool
    try:
        yield pool
    finally:
        for a in ads:
            a._capture = None


# ── save / load ──────────────────────────────────────────────────────────────────────────

_RESERVED_META = {"schema", "model", "dtype", "shapes", "init", "r", "include_quarantine"}


def adapter_fingerprint(adapters, *, blocks: Sequence[str] = ("dep",)) -> str:
    """blake2b-128 of every module's name, shapes, initial values and offsets of `blocks` (default the
    deployed block: what the deployed model's activations depend on)."""
    digest = hashlib.blake2b(digest_size=16)
    for a in _blocks_only(adapters):
        digest.update(f"{a.name}|{a.r}|{tuple(a.weight.shape)}|".encode())
        for k in blocks:
            for t in (getattr(a, f"A0_{k}"), getattr(a, f"B0_{k}"), getattr(a, f"a_{k}"), getattr(a, f"b_{k}")):
                digest.update(t.detach().float().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_blocks(path: str | Path, adapters: Mapping[str, BlockLoRA], *, model_id: str,
                include_quarantine: bool = False, metadata: dict[str, str] | None = None) -> None:
    """Write the deployed block (initial values A0_dep, B0_dep and offsets a_dep, b_dep: the deployed
    model is W + B_dep A_dep − B0_dep A0_dep, reproducible without the pairs that made the init) and, if
    asked, the quarantine's, as fp32 safetensors, atomically, with metadata: schema, model, dtype, init, r,
    shapes ({module: [d_out, d_in]}), include_quarantine, plus caller metadata."""
    ads = _blocks_only(adapters)
    extra = dict(metadata or {})
    clash = _RESERVED_META & extra.keys()
    if clash:
        raise ValueError(f"save_blocks: metadata keys {sorted(clash)} are reserved")
    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in extra.items()):
        raise TypeError("save_blocks: metadata must map str -> str")
    blocks = ("dep", "quar") if include_quarantine else ("dep",)
    tensors = {}
    for a in ads:
        for k in blocks:
            for t in ("A0", "B0", "a", "b"):
                tensors[f"{t}_{k}.{a.name}"] = getattr(a, f"{t}_{k}").detach().float().contiguous().cpu()
    inits = sorted({a.init for a in ads})
    meta = {"schema": BLOCKS_SCHEMA, "model": model_id, "dtype": "float32", "init": ",".join(inits),
            "r": str(ads[0].r if ads else 0), "include_quarantine": str(bool(include_quarantine)).lower(),
            "shapes": json.dumps({a.name: list(a.weight.shape) for a in ads}), **extra}
    with atomic_path(Path(path), suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_blocks(path: str | Path, adapters: Mapping[str, BlockLoRA], *, model_id: str,
                include_quarantine: bool = False) -> dict[str, str]:
    """Copy a saved deployed block (initial values and offsets; and the quarantine's if asked) into
    `adapters`, whatever their own init, so the model becomes the saved one exactly. Schema, model id, r,
    module set, shapes and finiteness are checked first; nothing is modified on error. Without
    include_quarantine the quarantine is left as it is. Returns the file's metadata."""
    path = Path(path)
    ads = _blocks_only(adapters)
    meta, tensors = read_checked_safetensors(path, schema=BLOCKS_SCHEMA, model_id=model_id, what="block adapter")
    want = {a.name: list(a.weight.shape) for a in ads}
    have = json.loads(meta.get("shapes", "{}"))
    if have != want:
        missing, extra = sorted(want.keys() - have.keys())[:3], sorted(have.keys() - want.keys())[:3]
        wrong = sorted(n for n in want.keys() & have.keys() if want[n] != have[n])[:3]
        raise ValueError(f"{path}: block adapter modules/shapes do not match the wrapped model "
                         f"(missing {missing}, unexpected {extra}, shape differs {wrong})")
    if ads and meta.get("r") != str(ads[0].r):
        raise ValueError(f"{path}: saved with r={meta.get('r')}, the wrapped adapters have r={ads[0].r}; "
                         f"wrap with --block-r={meta.get('r')}")
    if include_quarantine and meta.get("include_quarantine") != "true":
        raise ValueError(f"{path}: has no quarantine tensors (saved with include_quarantine=False)")
    blocks = ("dep", "quar") if include_quarantine else ("dep",)
    plan = []
    for a in ads:
        for k in blocks:
            for t in ("A0", "B0", "a", "b"):
                dst = getattr(a, f"{t}_{k}")
                src = tensors.get(f"{t}_{k}.{a.name}")
                if src is None or src.shape != dst.shape or not torch.isfinite(src).all():
                    raise ValueError(f"{path}: tensor {t}_{k}.{a.name} missing, misshapen or non-finite")
                plan.append((dst, src))
    with torch.no_grad():
        for dst, src in plan:
            dst.copy_(src)
    return meta
