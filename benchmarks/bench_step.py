"""The cost of a training step, new code against a baseline measured in the same run.

1. The loss: one group's Dr.GRPO forward+backward through the log-probs (G=8 rollouts of a
   1024-token completion, the real Qwen vocabulary, a small random Qwen3 on CPU), the full
   [B, L, V] log-softmax (`logits_to_keep` + `grpo.per_token_logps`, the old path) against
   `logprobs.completion_logprobs` (chunked LM head + log-softmax, checkpointed). Peak growth of live
   heap memory (sampled after every aten op, each variant in a fresh process) and the best of a few
   timed repeats.
2. A `fast`-shaped step at CPU scale: the `fast` preset's inputs (benchmark rows, the published
   substrate pool, the published pairset, G=8, P=4) with `--model tiny-qwen3 --max-new 32`,
   trained for `--steps` steps by this checkout and by a baseline checkout (default: the commit
   before this work, built as a git worktree with its own environment); the median per-step wall
   (`sec` in rows.jsonl, so model loading and direction extraction are excluded) of each.

Ends with one line per ratio: `logp_mem_ratio=...x`, `logp_time_ratio=...x`, `fast_step_ratio=...x`.

    uv run python benchmarks/bench_step.py                 # both parts (needs ../shared/data, `just data`)
    uv run python benchmarks/bench_step.py --skip-step     # the loss part only (no data needed)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro

from vgrout.grpo import per_token_logps
from vgrout.logprobs import completion_logprobs
from vgrout.model import QWEN3_VOCAB_SIZE

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapter import _heap_bytes, _PeakHeap  # noqa: E402  (same measurement as the adapter benchmark)


@dataclass
class Bench:
    group: int = 8
    prompt_len: int = 64
    completion_len: int = 1024
    vocab_size: int = QWEN3_VOCAB_SIZE
    hidden_size: int = 64
    num_layers: int = 2
    repeats: int = 2
    threads: int = 2
    skip_loss: bool = False
    skip_step: bool = False
    steps: int = 3
    baseline_rev: str = "65193cb"  # main before the step-cost work
    baseline_dir: Path = Path("/tmp/vgrout-bench-baseline")
    data_path: Path = REPO / "out/data/leetcode_train_medhard.jsonl"
    shared: Path = REPO.parent / "shared" / "data"
    out: Path = REPO / "out/bench_step"
    worker: str = ""  # internal: "old" | "new" runs one measured loss and exits


def _model(cfg: Bench):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from vgrout.adapter import wrap_model

    config = Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=cfg.hidden_size // 4, tie_word_embeddings=True, use_cache=False,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).float()
    knobs = wrap_model(model, "bench-step-qwen3", cache_root=cfg.out / "svd")
    return model, knobs


def _loss(model, ids, adv, plen: int, kind: str) -> torch.Tensor:
    if kind == "old":
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=ids.shape[1] - plen + 1).logits[:, :-1]
        lp = per_token_logps(logits, ids[:, plen:])
    else:
        lp = completion_logprobs(model, ids, plen)
    return -(adv[:, None] * lp).sum() / lp.numel()


def _worker(cfg: Bench) -> None:
    """In a fresh process: one warm-up, then the peak heap growth of one fwd+bwd and the best time."""
    torch.set_num_threads(cfg.threads)
    model, knobs = _model(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 151643, (cfg.group, cfg.prompt_len + cfg.completion_len), generator=g)
    adv = torch.randn(cfg.group, generator=g)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        _loss(model, ids, adv, cfg.prompt_len, cfg.worker).backward()

    step()
    model.zero_grad(set_to_none=True)
    base = _heap_bytes()
    with _PeakHeap() as mode:
        step()
    times = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"peak_mib": (mode.peak - base) / 2**20, "sec": min(times)}))


def _run_worker(cfg: Bench, kind: str) -> dict:
    argv = [sys.executable, __file__]
    for key, val in {**asdict(cfg), "worker": kind}.items():
        flag = key.replace("_", "-")
        argv += [f"--{flag}" if val else f"--no-{flag}"] if isinstance(val, bool) else [f"--{flag}", str(val)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _baseline(cfg: Bench) -> Path:
    """A checkout of the baseline revision with its own environment (made once)."""
    d = cfg.baseline_dir
    if not (d / "src/vgrout/train.py").exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(d), cfg.baseline_rev], check=True)
    subprocess.run(["uv", "sync", "--frozen", "--quiet"], cwd=d, check=True)
    return d


def _step_run(cfg: Bench, repo: Path, tag: str) -> list[float]:
    """A `fast`-shaped run of `cfg.steps` steps in `repo`; its per-step walls from rows.jsonl."""
    out = cfg.out / tag
    sub = cfg.shared / "vgrout_pub"
    args = ["uv", "run", "python", "-m", "vgrout.train", "fast", "--model=tiny-qwen3", f"--steps={cfg.steps}",
            "--max-new=32", f"--data-path={cfg.data_path}", f"--teacher-pool-dir={sub / 'pools/substrate'}",
            f"--vhack-pairs-path={sub / 'pairsets/prog_wide_clean.json'}", "--intervention=route2",
            "--eval-ablate-every=0", f"--out-root={out}", "--device=cpu", "--ckpt-every=1000"]
    env = {**os.environ, "VGROUT_MODELS_DIR": str(REPO / "out/models")}
    t0 = time.perf_counter()
    subprocess.run(args, cwd=repo, check=True, env=env, stdout=subprocess.DEVNULL)
    run = sorted((out / "runs").iterdir())[-1]
    rows = [json.loads(x) for x in (run / "rows.jsonl").read_text().splitlines() if x.strip()]
    print(f"  {tag}: {len(rows)} steps, per-step sec {[round(r['sec'], 1) for r in rows]} "
          f"(gen {[round(r['gen'], 1) for r in rows]}, fb {[round(r['fb'], 1) for r in rows]}), "
          f"process wall {time.perf_counter() - t0:.0f}s", flush=True)
    return [r["sec"] for r in rows]


def main(cfg: Bench) -> None:
    if cfg.worker:
        _worker(cfg)
        return
    lines = []
    if not cfg.skip_loss:
        print(f"loss fwd+bwd: G={cfg.group}, completion {cfg.completion_len}, vocab {cfg.vocab_size}, "
              f"hidden {cfg.hidden_size} x {cfg.num_layers} layers, {cfg.threads} threads", flush=True)
        old, new = _run_worker(cfg, "old"), _run_worker(cfg, "new")
        print(f"  full log-softmax: peak +{old['peak_mib']:.0f} MiB, {old['sec']:.2f}s; "
              f"chunked: peak +{new['peak_mib']:.0f} MiB, {new['sec']:.2f}s", flush=True)
        lines += [f"logp_mem_ratio={new['peak_mib'] / old['peak_mib']:.2f}x",
                  f"logp_time_ratio={new['sec'] / old['sec']:.2f}x"]
    if not cfg.skip_step:
        for need in (cfg.data_path, cfg.shared / "vgrout_pub/pools/substrate"):
            if not need.exists():
                sys.exit(f"bench_step: {need} not found (`just data` builds the rows; ../shared/data has the pool)")
        base = _baseline(cfg)
        print(f"fast-shaped steps (tiny-qwen3, max_new 32, G=8, P=4): baseline {cfg.baseline_rev} vs this checkout",
              flush=True)
        b = statistics.median(_step_run(cfg, base, "baseline"))
        n = statistics.median(_step_run(cfg, REPO, "new"))
        lines.append(f"fast_step_ratio={n / b:.2f}x")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Bench))
