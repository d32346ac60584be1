"""The GPU figures, in one prepared run (a lent GPU machine; never a test dependency).

1. `bench_adapter.py` at Qwen3-4B's shapes in bf16 (flash-attention where it imports).
2. Two `fast`-preset steps of a random-initialised Qwen3-4B built from its published config (no hub:
   the weights are random, the tokenizer is tiny-qwen3's real Qwen vocabulary), vanilla and route2, on the
   fast preset's inputs: gen / fb / t_rew per step, peak GPU memory, generated tokens per second.

    uv run python benchmarks/gpu_check.py --out $OUT     # writes gpu_check.md + the runs' rows under OUT

Needs ../shared/data (the published substrate pool and pairset) and `just data` for the benchmark rows; the
script builds what is missing first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
# Qwen/Qwen3-4B's config.json (the published values that shape compute and memory)
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=True)


def build_random_qwen3_4b(out: Path) -> Path:
    """A random Qwen3-4B (bf16 safetensors) with the real Qwen tokenizer, built once."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from vgrout.model import QWEN3_VOCAB_SIZE, build_tiny_qwen3

    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    cfg = Qwen3Config(vocab_size=QWEN3_VOCAB_SIZE, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
                      torch_dtype="bfloat16", **QWEN3_4B)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(build_tiny_qwen3()).save_pretrained(tmp)
    tmp.rename(out)
    return out


def sh(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = [f"# GPU check ({time.strftime('%Y-%m-%d')})\n"]
    import torch

    report.append(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA'}; "
                  f"torch {torch.__version__}\n")
    # 1. the adapter benchmark at Qwen3-4B shapes
    bench = [sys.executable, "benchmarks/bench_adapter.py", "--device", "cuda", "--dtype", "bfloat16",
             "--hidden-size", "2560", "--intermediate-size", "9728", "--num-layers", "36", "--num-heads", "32",
             "--num-kv-heads", "8", "--threads", "1"]
    sh(bench, out / "bench_adapter.log")
    report.append("## bench_adapter (Qwen3-4B shapes, bf16)\n\n```\n" + (out / "bench_adapter.log").read_text()[-3000:]
                  + "\n```\n")
    # 2. two fast steps of a random Qwen3-4B
    if not (REPO / "out/data/leetcode_train_medhard.jsonl").exists():
        sh(["uv", "run", "just", "data"], out / "data.log")
    model = build_random_qwen3_4b(REPO / "out/models/qwen3-4b-random")
    sub = SHARED / "vgrout_pub"
    for arm in ("none", "route2"):
        runs = out / f"runs_{arm}"
        cmd = [sys.executable, "-m", "vgrout.train", "fast", f"--model={model}", f"--intervention={arm}",
               f"--steps={args.steps}", "--eval-ablate-every=0", "--eval-n-prompts=4", f"--out-root={runs}",
               f"--teacher-pool-dir={sub / 'pools/substrate'}",
               f"--vhack-pairs-path={sub / 'pairsets/prog_wide_clean.json'}", "--ckpt-every=1000"]
        wall = sh(cmd, out / f"train_{arm}.log")
        run = sorted((runs / "runs").iterdir())[-1]
        rows = [json.loads(x) for x in (run / "rows.jsonl").read_text().splitlines() if x.strip()]
        report.append(f"## fast preset, random Qwen3-4B, {arm} ({wall:.0f} s for the whole process)\n")
        report.append("| step | gen s | fb s | t_rew s | rew_wait s | sec | peak GPU GiB | generated tok/s |")
        report.append("|---|---|---|---|---|---|---|---|")
        for r in rows:
            tok_s = r["gen_tok"] / r["gen"] if r["gen"] else float("nan")
            report.append(f"| {r['step']} | {r['gen']:.1f} | {r['fb']:.1f} | {r['t_rew']:.1f} | {r['rew_wait']:.1f} | "
                          f"{r['sec']:.1f} | {r['gpu_mem'] or float('nan'):.1f} | {tok_s:.0f} |")
        report.append("")
    (out / "gpu_check.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
