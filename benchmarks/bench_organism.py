"""CPU cost of the model organism (SmolLM2-135M-Instruct): generation and one train step.

    uv run python benchmarks/bench_organism.py gen   [--attn sdpa,sdpa_gqa,eager] [--batch 8,16,32]
    uv run python benchmarks/bench_organism.py train [--top-layers 0,8,4] [--group 8]

gen: tokens/s of sampling exactly --max-new tokens (min_new_tokens = max_new, so every
configuration decodes the same number of tokens) for --batch sequences whose prompts are the
built-in problems' real prompts, left-padded as the trainer pads them; on merged adapter weights,
as the trainer samples. Medians over --repeats.
train: seconds of one Dr.GRPO forward+backward of G right-padded rollouts (prompt + --completion
tokens) through the adapter, with all layers adapted (0) or only the top N.
Run under the shared CPU lock on a shared machine: `flock /work/cpu.lock uv run python ...`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _setup(threads: int, top_layers: int = 0, per_rollout: bool = False):
    from vgrout.adapter import wrap_model
    from vgrout.env.problems import load_problems
    from vgrout.model import SMOLLM2, load_model_and_tokenizer
    from vgrout.rollout import encode, render_prompt

    torch.set_num_threads(threads)
    model, tok = load_model_and_tokenizer(SMOLLM2, "cpu")
    knobs = wrap_model(model, SMOLLM2, per_rollout_grads=per_rollout, top_layers=top_layers)
    probs = load_problems(100, ["run_tests"], seed=0)
    prompts = [encode(tok, render_prompt(tok, p)) for p in probs]
    return model, tok, knobs, prompts


def bench_gen(args) -> None:
    from vgrout.adapter import merged_for_generation

    model, tok, knobs, prompts = _setup(args.threads)
    with torch.no_grad():
        for k in knobs.values():  # a trained-looking adapter, so the merge really happens
            k.delta_S.normal_(0, 1e-3)
    rows = []
    for attn in args.attn.split(","):
        model.set_attn_implementation(attn)
        for b in (int(x) for x in args.batch.split(",")):
            chunk = [prompts[i % len(prompts)] for i in range(b)]
            width = max(map(len, chunk))
            ids = torch.full((b, width), tok.pad_token_id)
            att = torch.zeros((b, width), dtype=torch.long)
            for r, p in enumerate(chunk):
                ids[r, width - len(p):] = torch.tensor(p)
                att[r, width - len(p):] = 1
            times = []
            for _ in range(args.repeats):
                model.config.use_cache = True
                t = time.perf_counter()
                with merged_for_generation(knobs), torch.no_grad():
                    model.generate(input_ids=ids, attention_mask=att, max_new_tokens=args.max_new,
                                   min_new_tokens=args.max_new, do_sample=True, temperature=0.7, top_k=20,
                                   pad_token_id=tok.pad_token_id)
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            rows.append((attn, b, width, med, b * args.max_new / med))
            print(f"attn={attn:9s} batch={b:3d} prompt_width={width} max_new={args.max_new}: "
                  f"{med:6.1f} s median of {args.repeats} -> {b * args.max_new / med:6.1f} tokens/s", flush=True)


def bench_train(args) -> None:
    from vgrout import grpo
    from vgrout.adapter import knob_params

    for top in (int(x) for x in args.top_layers.split(",")):
        model, tok, knobs, prompts = _setup(args.threads, top_layers=top, per_rollout=args.per_rollout)
        model.train()
        g = args.group
        plen = len(prompts[0])
        ids = torch.randint(100, 40000, (g, plen + args.completion))
        ids[:, :plen] = torch.tensor(prompts[0])
        mask = torch.ones(g, args.completion)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=args.completion + 1).logits[:, :-1]
            logp = grpo.per_token_logps(logits, ids[:, plen:])
            adv = torch.linspace(-1, 1, g)
            loss = grpo.reduce_loss(grpo.token_losses(logp, logp.detach(), adv, clip=0.2, beta=0.0, ref_logp=None),
                                    mask, unbiased=True, max_new=args.completion, group=g, prompts_per_step=1)
            loss.backward()
            times.append(time.perf_counter() - t)
            for p in knob_params(knobs):
                p.grad = None
        n = sum(k.rank for k in knobs.values())
        print(f"top_layers={top or 'all':>3} ({len(knobs)} modules, {n:,} δS) G={g} tokens={plen}+{args.completion} "
              f"per_rollout={args.per_rollout}: fwd+bwd {statistics.median(times):5.1f} s median of {args.repeats}",
              flush=True)
        del model, knobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["gen", "train"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", default="sdpa,sdpa_gqa,eager")
    ap.add_argument("--batch", default="8,16,32")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--top-layers", default="0,8")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--per-rollout", action="store_true")
    args = ap.parse_args()
    bench_gen(args) if args.what == "gen" else bench_train(args)


if __name__ == "__main__":
    main()
