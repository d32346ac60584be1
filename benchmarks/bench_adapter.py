"""Adapter cost on a mid-size random Qwen3 with the real vocabulary size (CPU by default).

Prints, against the unwrapped model:
  gen_ratio         greedy `generate` (G rollouts) with the adapter merged, merge time included
                    (gen_decode_ratio: the decode alone, inside one merge)
  train_ratio       one forward+backward of a G-rollout batch with all δS trainable, vs the plain
                    model whose only trainable parameter is one hidden-sized vector added to the
                    embeddings (so its backward also traverses every layer)
  route2_mem_ratio  peak memory growth of one fwd+bwd under rollout_grads vs a plain adapter
                    fwd+bwd, each in a fresh subprocess (live C-heap bytes sampled after every aten op)
and the SVD cold-build and cache-load times.

Run: `uv run python benchmarks/bench_adapter.py` (`--help` for sizes).
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vgrout import adapter as A
from vgrout.grpo import per_token_logps
from vgrout.model import QWEN3_VOCAB_SIZE


@dataclass
class Bench:
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    vocab_size: int = QWEN3_VOCAB_SIZE
    group: int = 8  # G rollouts per batch
    prompt_len: int = 32
    completion_len: int = 32
    repeats: int = 3
    threads: int = 1  # 1 keeps timings stable on a shared box (2 threads oversubscribe there)
    device: str = "cpu"
    dtype: str = "float32"  # bfloat16 on GPU
    mem_worker: str = ""  # internal: "plain" | "route2" runs one measured step and exits


def _model(cfg: Bench) -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        tie_word_embeddings=True,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, cfg.dtype))
    try:
        with torch.device(cfg.device):  # initialise in place (fast for 4B params on a GPU)
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def _batch(cfg: Bench) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 151643, (cfg.group, cfg.prompt_len + cfg.completion_len), generator=g)
    adv = torch.randn(cfg.group, generator=g)
    return ids.to(cfg.device), adv.to(cfg.device)


def _loss(model: nn.Module, ids: torch.Tensor, adv: torch.Tensor, n_comp: int) -> torch.Tensor:
    """Dr.GRPO-shaped loss on the completion tokens (lm_head only on those positions)."""
    logits = model(input_ids=ids, logits_to_keep=n_comp + 1).logits[:, :-1]
    logp = per_token_logps(logits, ids[:, -n_comp:])
    return -(adv[:, None] * logp).sum() / logp.numel()


def _randomise(knobs: dict[str, A.SVDKnob]) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for k in knobs.values():
            k.delta_S.copy_(torch.randn(k.rank, generator=g) * 1e-2)


def _sync(cfg: Bench) -> None:
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(cfg: Bench, *fns) -> list[float]:
    """Best-of-`repeats` wall time of each fn after one warm-up; the fns run interleaved so a
    noisy (shared) machine disturbs them alike, and the minimum is the least-disturbed run."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()
    for _ in range(cfg.repeats):
        for i, fn in enumerate(fns):
            _sync(cfg)
            t0 = time.perf_counter()
            fn()
            _sync(cfg)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def _heap_bytes() -> int:
    """Bytes the C heap has handed out right now (malloc'd small blocks + mmap'd large ones)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return int(m.uordblks + m.hblkhd)


class _PeakHeap(TorchDispatchMode):
    """Samples the C heap after every aten op (forward and backward) and keeps the maximum.

    On CPU, torch tensors live on the C heap, so this is the peak of live tensor memory at
    op granularity; unlike peak RSS it does not depend on what the allocator kept cached.
    """

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_bytes())
        return out


def _mem_worker(cfg: Bench, cache_root: Path) -> None:
    """One measured fwd+bwd (after a warm-up one) in this fresh process; prints the peak
    growth of live heap memory over the level just before it, in MiB (CUDA: peak allocated)."""
    model = _model(cfg)
    knobs = A.wrap_model(model, "bench-qwen3", cache_root=cache_root)
    _randomise(knobs)
    ids, adv = _batch(cfg)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        if cfg.mem_worker == "route2":
            with A.rollout_grads(knobs, cfg.group):
                _loss(model, ids, adv, cfg.completion_len).backward()
            assert all(k.per_rollout_grad is not None for k in knobs.values())
        else:
            _loss(model, ids, adv, cfg.completion_len).backward()

    step()  # warm-up
    model.zero_grad(set_to_none=True)
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        growth = torch.cuda.max_memory_allocated() - base
    else:
        base = _heap_bytes()
        with _PeakHeap() as mode:
            step()
        growth = mode.peak - base
    print(json.dumps({"peak_growth_mib": growth / 2**20}))


def _run_mem_worker(cfg: Bench, kind: str, cache_root: Path) -> float:
    args = {**asdict(cfg), "mem_worker": kind}
    argv = [sys.executable, __file__]
    for key, val in args.items():
        argv += [f"--{key.replace('_', '-')}", str(val)]
    env = {**os.environ, "VGROUT_BENCH_CACHE": str(cache_root)}
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]


def main(cfg: Bench) -> None:
    torch.set_num_threads(cfg.threads)
    if cfg.mem_worker:
        _mem_worker(cfg, Path(os.environ["VGROUT_BENCH_CACHE"]))
        return
    print(f"config: {asdict(cfg)}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="vgrout-bench-") as tmp:
        cache_root = Path(tmp) / "svd"
        plain = _model(cfg)
        n_body = sum(p.numel() for n, p in plain.named_parameters() if ".layers." in n)
        n_emb = plain.get_input_embeddings().weight.numel()
        print(f"params: blocks {n_body / 1e6:.1f}M, embeddings/lm_head (tied) {n_emb / 1e6:.1f}M")

        # SVD: cold build, then cache load on a fresh copy
        wrapped = copy.deepcopy(plain)
        t0 = time.perf_counter()
        knobs = A.wrap_model(wrapped, "bench-qwen3", cache_root=cache_root)
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        A.wrap_model(copy.deepcopy(plain), "bench-qwen3", cache_root=cache_root)
        t_load = time.perf_counter() - t0
        n_knob = sum(k.rank for k in knobs.values())
        print(
            f"svd: {len(knobs)} modules, {n_knob:,} δS; cold build {t_cold:.2f}s, "
            f"cache load {t_load:.2f}s"
        )
        _randomise(knobs)
        ids, adv = _batch(cfg)
        prompt = ids[:, : cfg.prompt_len]

        # generation: plain vs adapter (merge + decode + restore)
        def gen(model: nn.Module) -> None:
            with torch.no_grad():
                model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=cfg.completion_len,
                    min_new_tokens=cfg.completion_len,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=151643,
                )

        def gen_adapter() -> None:
            with A.merged_for_generation(knobs):
                gen(wrapped)

        t_gen_plain, t_gen_adapter = _timed(cfg, lambda: gen(plain), gen_adapter)
        with A.merged_for_generation(knobs):  # decode alone, merge already done
            t_gen_plain2, t_gen_decode = _timed(cfg, lambda: gen(plain), lambda: gen(wrapped))
        print(
            f"generate G={cfg.group} x {cfg.completion_len} new: plain {t_gen_plain:.3f}s, "
            f"adapter (merge+decode+restore) {t_gen_adapter:.3f}s; decode only: plain "
            f"{t_gen_plain2:.3f}s vs merged {t_gen_decode:.3f}s"
        )

        # training step: plain (hidden-sized trainable vector at the embeddings) vs adapter
        bias = nn.Parameter(
            torch.zeros(cfg.hidden_size, device=cfg.device, dtype=getattr(torch, cfg.dtype))
        )
        for p in plain.parameters():
            p.requires_grad_(False)
        plain.get_input_embeddings().register_forward_hook(lambda m, i, out: out + bias)

        def step_plain() -> None:
            bias.grad = None
            _loss(plain, ids, adv, cfg.completion_len).backward()

        def step_adapter() -> None:
            wrapped.zero_grad(set_to_none=True)
            _loss(wrapped, ids, adv, cfg.completion_len).backward()

        def step_route2() -> None:
            wrapped.zero_grad(set_to_none=True)
            with A.rollout_grads(knobs, cfg.group):
                _loss(wrapped, ids, adv, cfg.completion_len).backward()

        t_tr_plain, t_tr_adapter, t_tr_route2 = _timed(cfg, step_plain, step_adapter, step_route2)
        print(
            f"fwd+bwd G={cfg.group} x {ids.shape[1]} tokens: plain {t_tr_plain:.3f}s, "
            f"adapter {t_tr_adapter:.3f}s, adapter+route2 {t_tr_route2:.3f}s"
        )

        # memory, each variant in a fresh process
        if cfg.device == "cpu":
            m_plain = _run_mem_worker(cfg, "plain", cache_root)
            m_route2 = _run_mem_worker(cfg, "route2", cache_root)
            print(
                f"peak live-heap growth of one fwd+bwd (fresh subprocess, sampled per aten op): adapter "
                f"{m_plain:.1f} MiB, adapter+route2 {m_route2:.1f} MiB"
            )
        else:
            m_plain = m_route2 = float("nan")
            for name, fn in (("plain", step_adapter), ("route2", step_route2)):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                m_plain, m_route2 = (peak, m_route2) if name == "plain" else (m_plain, peak)
            print(
                f"peak CUDA allocation growth of one fwd+bwd: adapter {m_plain:.1f} MiB, "
                f"adapter+route2 {m_route2:.1f} MiB"
            )

    print(f"svd_cold_s={t_cold:.2f}")
    print(f"svd_load_s={t_load:.2f}")
    print(f"route2_time_ratio={t_tr_route2 / t_tr_adapter:.2f}x")
    print(f"gen_decode_ratio={t_gen_decode / t_gen_plain2:.2f}x")
    print(f"gen_ratio={t_gen_adapter / t_gen_plain:.2f}x")
    print(f"train_ratio={t_tr_adapter / t_tr_plain:.2f}x")
    print(f"route2_mem_ratio={m_route2 / m_plain:.2f}x")


if __name__ == "__main__":
    main(tyro.cli(Bench))
