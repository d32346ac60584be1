"""The full-rank SVD adapter: trainable singular-value offsets δS (kept) and δS_hack (quarantine).

Every `nn.Linear` inside the transformer blocks is replaced by an `SVDKnob` holding the thin SVD
of its frozen weight, W = U diag(S) Vh (computed in fp32, cached on disk), and two fp32 leaves
δS, δS_hack ∈ R^r, r = min(d_in, d_out), both zero-initialised. The effective weight is

    W' = W + U diag(δS + δS_hack) Vh,

computed token-wise as y = W x + U ((δS + δS_hack) ⊙ (Vh x)) so W' is never materialised while
training. δS = δS_hack = 0 is exactly the base model.

dtype policy. U and Vh are stored in the *base weight's* dtype on its device (bf16 on GPU), so
the two extra matmuls per Linear run at bf16 tensor-core speed and cost about as much memory as
the weight itself. The knob leaves stay fp32; the diagonal scaling of the projected activations
h = Vh x and the δS gradient Σ_tokens (∂L/∂z ⊙ h) are computed in fp32 and cast back to the
activation dtype, so the optimizer sees fp32 gradients. Merging for generation forms
W + U diag(δS + δS_hack) Vh from the same (possibly bf16) U, Vh used for training, adds in fp32
and rounds once to the weight dtype (for bf16 weights the rank-r product itself runs in bf16 with
fp32 accumulation: its error is far below the rounding of W' to bf16). The on-disk SVD cache
is fp32.

Per-rollout gradients: inside `rollout_grads`, the scaling step is a custom autograd
function whose backward first sums (∂L/∂z ⊙ h) over each rollout's tokens, giving g_b ∈ R^r
per rollout ([G, r] per module), and hands Σ_b g_b on as the δS gradient. Exact on every axis
(nothing is divided by δS) and O(G x r) extra memory.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .atomic import atomic_path
from .model import model_slug

SVD_SCHEMA = "vgrout.svd/1"
ADAPTER_SCHEMA = "vgrout.adapter/1"
_BLOCK_LINEAR = re.compile(r"(^|\.)layers\.(\d+)\.")


@dataclass
class SVDStats:
    """Process-wide counters of SVD cache traffic (tests read deltas of these)."""

    computed: int = 0  # torch.linalg.svd calls
    loaded: int = 0  # entries served from disk
    rebuilt: int = 0  # entries found corrupt / mismatched and recomputed


SVD_STATS = SVDStats()


class _ScaleByKnob(torch.autograd.Function):
    """z = h ⊙ s with s = δS + δS_hack; optionally records per-rollout ∂L/∂s in backward.

    Invariant: the gradient returned for s equals Σ_b knob.per_rollout_grad[b] exactly
    (it is computed as that sum), and each row b is Σ over rollout b's tokens of ∂L/∂z ⊙ h.
    """

    @staticmethod
    def forward(ctx, h: Tensor, s: Tensor, knob: SVDKnob, n_rollouts: int) -> Tensor:
        ctx.save_for_backward(h, s)
        ctx.knob = knob
        ctx.n_rollouts = n_rollouts
        return (h.float() * s).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_z: Tensor):
        h, s = ctx.saved_tensors
        grad_h = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad_z.float() * s).to(h.dtype)
        n = ctx.n_rollouts
        if ctx.needs_input_grad[1] or n:
            prod = grad_z.float() * h.float()  # [..., r] fp32
            r = prod.shape[-1]
            if n:
                per_rollout = prod.reshape(n, -1, r).sum(dim=1)  # [G, r]
                ctx.knob.per_rollout_grad = per_rollout
                grad_s = per_rollout.sum(dim=0)
            else:
                grad_s = prod.reshape(-1, r).sum(dim=0)
        return grad_h, grad_s, None, None


class AdapterModule(nn.Module):
    """What every adapter family's per-Linear module offers the loop and the contexts below.

    - `deployed()` / `quarantine()`: its trainable tensors; the quarantine's are zero at its initial
      value, so zeroing them is the deployed model (`ablate_quarantine`), zeroing both the base model.
    - `merge_delta()`: the dense weight delta for merged decoding (`merged_for_generation`).
    - flags the contexts set: `_bypass` (skip the adapter path: the base model), `_merged` (base.weight
      holds W + delta), `_quar_off` (the quarantine is zeroed: a module may skip computing it).
    Invariant every family keeps: with all of its trainable tensors zero it computes exactly its base Linear.
    """

    base: nn.Linear

    def __init__(self) -> None:
        super().__init__()
        self._bypass = False
        self._merged = False
        self._quar_off = False

    def deployed(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def quarantine(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def merge_delta(self) -> Tensor:
        raise NotImplementedError

    # Linear look-alike attributes, for code that inspects projections.
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


class SVDKnob(AdapterModule):
    """One frozen Linear plus its SVD knob: W' = W + U diag(δS + δS_hack) Vh.

    Buffers U [d_out, r] and Vh [r, d_in] in the weight dtype, S [r] fp32 (the base singular
    values, for reference); parameters delta_S, delta_S_hack fp32 [r], zero-initialised.
    `per_rollout_grad` is [G, r] after a backward run under `rollout_grads` (else None).
    """

    def __init__(self, name: str, base: nn.Linear, U: Tensor, S: Tensor, Vh: Tensor) -> None:
        super().__init__()
        w = base.weight
        r = S.numel()
        if U.shape != (w.shape[0], r) or Vh.shape != (r, w.shape[1]):
            raise ValueError(
                f"{name}: SVD shapes U{tuple(U.shape)} S{tuple(S.shape)} Vh{tuple(Vh.shape)} "
                f"do not fit weight {tuple(w.shape)}"
            )
        self.name = name
        self.base = base
        self.register_buffer("U", U.to(device=w.device, dtype=w.dtype).contiguous(), False)
        self.register_buffer("Vh", Vh.to(device=w.device, dtype=w.dtype).contiguous(), False)
        self.register_buffer("S", S.to(device=w.device, dtype=torch.float32), False)
        self.delta_S = nn.Parameter(torch.zeros(r, device=w.device, dtype=torch.float32))
        self.delta_S_hack = nn.Parameter(torch.zeros(r, device=w.device, dtype=torch.float32))
        self.per_rollout_grad: Tensor | None = None
        self._n_rollouts = 0  # > 0 inside rollout_grads()

    def deployed(self) -> list[nn.Parameter]:
        return [self.delta_S]

    def quarantine(self) -> list[nn.Parameter]:
        return [self.delta_S_hack]

    @property
    def rank(self) -> int:
        return self.S.numel()

    def scale(self) -> Tensor:
        """δS + δS_hack (fp32, differentiable)."""
        return self.delta_S + self.delta_S_hack

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """U diag(δS + δS_hack) Vh as a dense fp32 [d_out, d_in] matrix (no grad)."""
        return (self.U.float() * self.scale()) @ self.Vh.float()

    @torch.no_grad()
    def merge_delta(self) -> Tensor:
        """The delta for merging: fp32 for fp32 weights; for low-precision weights the rank-r product
        runs in their dtype on tensor cores (its rounding is tiny next to the final rounding of W')."""
        if self.base.weight.dtype == torch.float32:
            return self.delta_weight()
        return (self.U * self.scale().to(self.U.dtype)) @ self.Vh

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self._bypass:
            return y
        if self._merged:
            if torch.is_grad_enabled() and self.delta_S.requires_grad:
                raise RuntimeError(
                    f"{self.name}: forward with grad enabled inside merged_for_generation(); "
                    "the knobs would get no gradient. Train outside the merge context."
                )
            return y
        h = F.linear(x, self.Vh)
        n = 0
        if torch.is_grad_enabled():
            n = self._n_rollouts
            if n and h.numel() % (n * h.shape[-1]):
                raise ValueError(
                    f"{self.name}: input batch {tuple(x.shape)} does not split into "
                    f"{n} rollouts; the leading dim must be the rollout dim"
                )
            if n and h.dim() >= 3 and h.shape[0] != n:
                raise ValueError(
                    f"{self.name}: batch of {h.shape[0]} sequences inside "
                    f"rollout_grads(n_rollouts={n}); one row per rollout is required"
                )
        z = _ScaleByKnob.apply(h, self.scale(), self, n)
        return y + F.linear(z, self.U)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, rank={self.rank}"


# ── SVD cache ────────────────────────────────────────────────────────────────────────────


def weight_checksum(weight: Tensor) -> str:
    """blake2b-128 of the weight's raw bytes, dtype and shape (detects any changed element)."""
    w = weight.detach().contiguous().cpu()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{w.dtype}|{tuple(w.shape)}|".encode())
    digest.update(w.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_checked_safetensors(
    path: str | Path, *, schema: str, model_id: str, what: str, error: type[Exception] = ValueError,
) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Read a vgrout safetensors file and check its schema and model id before anything uses it.

    Raises FileNotFoundError when absent, `error` (naming the file) when unreadable, of another
    schema, or made for another model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001
        raise error(f"{path}: not a readable safetensors {what} file ({e})") from e
    if meta.get("schema") != schema:
        raise error(f"{path}: schema {meta.get('schema')!r}, expected {schema!r}")
    if meta.get("model") != model_id:
        raise error(f"{path}: this {what} was made for model {meta.get('model')!r}, not {model_id!r}; "
                    "use the file made for this model (or re-create it)")
    return meta, tensors


def _read_svd_entry(path: Path, expect: dict[str, str]) -> tuple[Tensor, Tensor, Tensor] | None:
    """Load one cached SVD; None (with a warning) when it is unreadable or mismatched."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            U, S, Vh = (f.get_tensor(k) for k in ("U", "S", "Vh"))
    except Exception as e:  # noqa: BLE001 - any read failure means a bad entry
        logger.warning(f"SVD cache {path}: unreadable ({type(e).__name__}: {e}); rebuilding")
        return None
    bad = [k for k, v in expect.items() if meta.get(k) != v]
    if bad:
        logger.warning(
            f"SVD cache {path}: metadata mismatch in {bad} "
            f"(have {[meta.get(k) for k in bad]}, want {[expect[k] for k in bad]}); rebuilding"
        )
        return None
    d_out, d_in = json.loads(expect["shape"])
    r = min(d_out, d_in)
    if U.shape != (d_out, r) or S.shape != (r,) or Vh.shape != (r, d_in):
        logger.warning(
            f"SVD cache {path}: tensor shapes do not match {expect['shape']}; rebuilding"
        )
        return None
    if not (torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()):
        logger.warning(f"SVD cache {path}: non-finite values; rebuilding")
        return None
    return U, S, Vh


def svd_cached(
    weight: Tensor, model_id: str, module_name: str, cache_dir: Path
) -> tuple[Tensor, Tensor, Tensor]:
    """Thin fp32 SVD (U, S, Vh) of `weight`, from `cache_dir/<module_name>.safetensors` when a
    valid entry exists, else computed on the weight's device and written atomically.

    Invariant: U diag(S) Vh == weight (to fp32 SVD accuracy) for the exact weight bytes named
    by the entry's checksum.
    """
    path = cache_dir / f"{module_name}.safetensors"
    expect = {
        "schema": SVD_SCHEMA,
        "model": model_id,
        "module": module_name,
        "shape": json.dumps(list(weight.shape)),
        "checksum": weight_checksum(weight),
    }
    if path.exists():
        entry = _read_svd_entry(path, expect)
        if entry is not None:
            SVD_STATS.loaded += 1
            return entry
        SVD_STATS.rebuilt += 1
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    SVD_STATS.computed += 1
    _atomic_save({"U": U, "S": S, "Vh": Vh}, path, expect)
    return U, S, Vh


# ── wrapping ─────────────────────────────────────────────────────────────────────────────


def _block_linears(model: nn.Module, top_layers: int = 0) -> list[tuple[str, nn.Linear]]:
    """Every Linear inside a transformer block (`...layers.<i>....`), in model order; with
    `top_layers` = N > 0, only those of the N blocks with the highest indices."""
    if top_layers < 0:
        raise ValueError(f"top_layers must be >= 0 (0 = every layer), got {top_layers}")
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterModule):
            raise ValueError(f"model already wrapped ({name} is a {type(mod).__name__}); wrap a fresh model")
        m = _BLOCK_LINEAR.search(name)
        if isinstance(mod, nn.Linear) and mod is not out_emb and m:
            found.append((name, mod, int(m.group(2))))
    if not found:
        raise ValueError("no nn.Linear found inside transformer blocks (`...layers.<i>....`)")
    n_layers = max(i for _, _, i in found) + 1
    if top_layers > n_layers:
        raise ValueError(f"top_layers={top_layers} but the model has {n_layers} layers")
    first = n_layers - top_layers if top_layers else 0
    return [(name, mod) for name, mod, i in found if i >= first]


def wrap_model(
    model: nn.Module,
    model_id: str,
    *,
    cache_root: Path = Path("svd_cache"),
    top_layers: int = 0,
) -> dict[str, SVDKnob]:
    """Freeze `model` and replace each block Linear by an SVDKnob; return {name: knob} in
    model order. SVDs come from `cache_root/<model_slug(model_id)>/`. Per-rollout gradients are
    recorded only inside `rollout_grads` (the one way to ask for them).

    `top_layers` = N > 0 wraps only the Linears of the last N transformer blocks (the rest stay
    frozen and plain, so a backward stops below the lowest adapted block); 0 wraps every block.
    """
    targets = _block_linears(model, top_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    cache_dir = Path(cache_root) / model_slug(model_id)
    knobs: dict[str, SVDKnob] = {}
    for name, lin in targets:
        U, S, Vh = svd_cached(lin.weight, model_id, name, cache_dir)
        knob = SVDKnob(name, lin, U, S, Vh)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, knob)
        knobs[name] = knob
    n_params = sum(k.rank for k in knobs.values())
    logger.info(f"wrapped {len(knobs)} Linears with SVD knobs: {n_params:,} δS (+ as many δS_hack)")
    return knobs


def _knob_list(knobs: Mapping[str, AdapterModule] | Iterable[AdapterModule]) -> list[AdapterModule]:
    items = list(knobs.values()) if isinstance(knobs, Mapping) else list(knobs)
    for k in items:
        if not isinstance(k, AdapterModule):
            raise TypeError(f"expected an adapter module (SVDKnob, BlockLoRA), got {type(k).__name__}")
    return items


def deployed_params(knobs: Mapping[str, AdapterModule] | Iterable[AdapterModule]) -> list[nn.Parameter]:
    """Every deployed trainable tensor (δS for the SVD knob), in model order."""
    return [p for k in _knob_list(knobs) for p in k.deployed()]


def quarantine_params(knobs: Mapping[str, AdapterModule] | Iterable[AdapterModule]) -> list[nn.Parameter]:
    """Every quarantine tensor (δS_hack for the SVD knob; reset to its initial value at deploy), model order."""
    return [p for k in _knob_list(knobs) for p in k.quarantine()]


def quarantine_norm(knobs: Mapping[str, AdapterModule] | Iterable[AdapterModule]) -> float:
    """Global L2 norm of the quarantine over all modules (0.0 exactly while it never moved)."""
    return float(sum(float(p.detach().double().pow(2).sum()) for p in quarantine_params(knobs)) ** 0.5)


def _sq(ts: Iterable[Tensor | None]) -> float:
    return sum(float(t.detach().double().pow(2).sum()) for t in ts if t is not None)


def quarantine_mass(deployed: Iterable[Tensor | None], quarantine: Iterable[Tensor | None]) -> float:
    """Share of the energy in the quarantine: Σ‖q‖² / (Σ‖d‖² + Σ‖q‖²) ∈ [0, 1] (None entries count 0;
    NaN when both are zero). Pass gradients (the update's direction) or parameter changes (what moved)."""
    d, q = _sq(deployed), _sq(quarantine)
    return q / (d + q) if d + q > 0 else float("nan")


def grad_mass(adapters) -> float:
    """`quarantine_mass` of the offsets' current .grad (after the step's backwards)."""
    return quarantine_mass([p.grad for p in deployed_params(adapters)],
                           [p.grad for p in quarantine_params(adapters)])


def snapshot(adapters) -> dict[str, list[Tensor]]:
    """Clones of every offset, for `update_mass` after the optimizer step."""
    return {"dep": [p.detach().clone() for p in deployed_params(adapters)],
            "quar": [p.detach().clone() for p in quarantine_params(adapters)]}


def update_mass(adapters, before: Mapping[str, list[Tensor]]) -> float:
    """`quarantine_mass` of the parameter change since `snapshot` (what the optimizer actually did)."""
    dep = [p.detach() - b for p, b in zip(deployed_params(adapters), before["dep"], strict=True)]
    quar = [p.detach() - b for p, b in zip(quarantine_params(adapters), before["quar"], strict=True)]
    return quarantine_mass(dep, quar)


# ── contexts ─────────────────────────────────────────────────────────────────────────────


# ── contexts ─────────────────────────────────────────────────────────────────────────────


def _refuse_if_merged(knobs: list[AdapterModule], what: str) -> None:
    if any(k._merged for k in knobs):
        raise RuntimeError(
            f"{what} inside merged_for_generation(): the merged weights would "
            "ignore it. Enter it before merging."
        )


@contextmanager
def _zeroed(params: list[nn.Parameter]) -> Iterator[None]:
    """Zero `params` in place; restore their exact bits on exit (exceptions included)."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p in params:
            p.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved, strict=True):
                p.copy_(v)


@contextmanager
def _flag(knobs: list[AdapterModule], name: str) -> Iterator[None]:
    """Set a boolean flag on every module inside; restore each previous value on exit."""
    prev = [getattr(k, name) for k in knobs]
    for k in knobs:
        setattr(k, name, True)
    try:
        yield
    finally:
        for k, v in zip(knobs, prev, strict=True):
            setattr(k, name, v)


@contextmanager
def ablate_quarantine(knobs: Mapping[str, AdapterModule] | Iterable[AdapterModule]) -> Iterator[None]:
    """The quarantine zeroed (its initial value) inside: the deployed model; restored bit-exactly afterwards."""
    ks = _knob_list(knobs)
    _refuse_if_merged(ks, "ablate_quarantine")
    with _zeroed(quarantine_params(ks)), _flag(ks, "_quar_off"):
        yield


@contextmanager
def zero_delta(knobs: Mapping[str, AdapterModule] | Iterable[AdapterModule]) -> Iterator[None]:
    """Every trainable tensor zeroed inside (the base model, i.e. the KL reference); restored bit-exactly.

    The adapter path is also skipped inside, so the forward costs what the base model costs.
    """
    ks = _knob_list(knobs)
    _refuse_if_merged(ks, "zero_delta")
    with _zeroed(deployed_params(ks) + quarantine_params(ks)), _flag(ks, "_bypass"):
        yield


@contextmanager
def merged_for_generation(knobs: Mapping[str, AdapterModule] | Iterable[AdapterModule]) -> Iterator[None]:
    """Inside, each base weight *is* W + the module's delta (`merge_delta`, added in fp32 and rounded once
    to the weight dtype) and the adapter path is off, so decoding costs exactly the plain model. On exit
    the original weight tensors are put back (no arithmetic undo), so the weights are bit-identical however
    often this runs. Modules whose trainable tensors are all zero keep their weight untouched (no copy)."""
    ks = _knob_list(knobs)
    if any(k._merged for k in ks):
        raise RuntimeError("merged_for_generation() is not re-entrant")
    if any(getattr(k, "_mask", None) is not None for k in ks):
        raise RuntimeError("merged_for_generation() inside rollout_masks(): masks act on the adapter path")
    swapped: list[tuple[AdapterModule, Tensor]] = []
    try:
        with torch.no_grad():
            for k in ks:
                k._merged = True
                if not any(bool((p != 0).any()) for p in k.deployed() + k.quarantine()):
                    continue
                original = k.base.weight.data
                merged = (original.float() + k.merge_delta().float()).to(original.dtype)
                swapped.append((k, original))
                k.base.weight.data = merged
        yield
    finally:
        for k, original in swapped:
            k.base.weight.data = original
        for k in ks:
            k._merged = False


@contextmanager
def rollout_grads(
    knobs: Mapping[str, SVDKnob] | Iterable[SVDKnob], n_rollouts: int
) -> Iterator[None]:
    """Forwards run inside record per-rollout δS gradients: after each backward,
    knob.per_rollout_grad is [n_rollouts, r] (one row per batch row) and its row sum is that
    backward's contribution to delta_S.grad. Each backward overwrites the previous value."""
    if n_rollouts < 1:
        raise ValueError(f"n_rollouts must be >= 1, got {n_rollouts}")
    ks = _knob_list(knobs)
    prev = [k._n_rollouts for k in ks]
    for k in ks:
        k._n_rollouts = n_rollouts
        k.per_rollout_grad = None
    try:
        yield
    finally:
        for k, p in zip(ks, prev, strict=True):
            k._n_rollouts = p


# ── save / load ──────────────────────────────────────────────────────────────────────────

_RESERVED_META = {"schema", "model", "dtype", "shapes", "include_hack"}


def save_adapter(
    path: str | Path,
    knobs: Mapping[str, SVDKnob],
    *,
    model_id: str,
    include_hack: bool = False,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write δS (and δS_hack if asked) as fp32 safetensors, atomically, with metadata:
    schema, model, dtype, shapes ({module: r}), include_hack, plus caller metadata."""
    ks = _knob_list(knobs)
    extra = dict(metadata or {})
    clash = _RESERVED_META & extra.keys()
    if clash:
        raise ValueError(f"save_adapter: metadata keys {sorted(clash)} are reserved")
    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in extra.items()):
        raise TypeError("save_adapter: metadata must map str -> str")
    tensors = {f"delta_S.{k.name}": k.delta_S.detach().float() for k in ks}
    if include_hack:
        tensors.update({f"delta_S_hack.{k.name}": k.delta_S_hack.detach().float() for k in ks})
    meta = {
        "schema": ADAPTER_SCHEMA,
        "model": model_id,
        "dtype": "float32",
        "shapes": json.dumps({k.name: k.rank for k in ks}),
        "include_hack": str(bool(include_hack)).lower(),
        **extra,
    }
    _atomic_save(tensors, Path(path), meta)


def load_adapter(
    path: str | Path, knobs: Mapping[str, SVDKnob], *, model_id: str, include_hack: bool = False
) -> dict[str, str]:
    """Copy saved δS (and δS_hack if asked) into `knobs`; validate schema, model id, module
    set and shapes first (nothing is modified on error). Returns the file's metadata."""
    path = Path(path)
    ks = _knob_list(knobs)
    meta, tensors = read_checked_safetensors(path, schema=ADAPTER_SCHEMA, model_id=model_id, what="adapter")
    want = {k.name: k.rank for k in ks}
    have = json.loads(meta.get("shapes", "{}"))
    if have != want:
        missing = sorted(want.keys() - have.keys())[:3]
        extra = sorted(have.keys() - want.keys())[:3]
        wrong = sorted(n for n in want.keys() & have.keys() if want[n] != have[n])[:3]
        raise ValueError(
            f"{path}: adapter modules/shapes do not match the wrapped model "
            f"(missing {missing}, unexpected {extra}, rank differs {wrong})"
        )
    if include_hack and meta.get("include_hack") != "true":
        raise ValueError(f"{path}: has no δS_hack tensors (saved with include_hack=False)")
    prefixes = ["delta_S"] + (["delta_S_hack"] if include_hack else [])
    for pre in prefixes:
        for k in ks:
            t = tensors.get(f"{pre}.{k.name}")
            if t is None or t.shape != (k.rank,) or not torch.isfinite(t).all():
                raise ValueError(f"{path}: tensor {pre}.{k.name} missing, misshapen or non-finite")
    with torch.no_grad():
        for k in ks:
            k.delta_S.copy_(tensors[f"delta_S.{k.name}"])
            if include_hack:
                k.delta_S_hack.copy_(tensors[f"delta_S_hack.{k.name}"])
    return meta
