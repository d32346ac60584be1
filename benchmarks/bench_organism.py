"""CPU cost of the model organism (SmolLM2-135M-Instruct): generation and one train step.

    uv run python benchmarks/bench_organism.py gen   [--attn sdpa,sdpa_gqa,eager] [--batch 2x6,4x8]
    uv run python benchmarks/bench_organism.py train [--top-layers 0,8,4] [--group 8]

gen: tokens/s of sampling exactly --max-new tokens (min_new_tokens = max_new, so every
configuration decodes the same number of tokens) for a batch of P prompts x n samples (`--batch
PxN`), the built-in problems' real prompts, left-padded as the trainer pads them, on merged
adapter weights as the trainer samples; `plain` is HF generate (every row prefills its prompt),
`shared` prefills each distinct prompt once (vgrout.prefix_gen). Also the prefill alone.
Configurations alternate within each repeat (so drift hits all alike); medians over --repeats.
train: seconds of one Dr.GRPO forward+backward of G right-padded rollouts (prompt + --completion
tokens) through the adapter, with all layers adapted (0) or only the top N; with only the top N, the
frozen blocks below either see the group's prompt once (`shared`, the trainer's path) or once per row
(`plain`, `completion_logprobs(share_prompt=False)`), alternating within each repeat, and the last line
is `organism_fb_ratio=<shared / plain>x` for the last --top-layers value.
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
    knobs = wrap_model(model, SMOLLM2, top_layers=top_layers)
    probs = load_problems(100, ["run_tests"], seed=0)
    prompts = [encode(tok, render_prompt(tok, p)) for p in probs]
    return model, tok, knobs, prompts


def bench_gen(args) -> None:
    from vgrout.adapter import merged_for_generation
    from vgrout.prefix_gen import generate_shared_prefix

    model, tok, knobs, prompts = _setup(args.threads)
    with torch.no_grad():
        for k in knobs.values():  # a trained-looking adapter, so the merge really happens
            k.delta_S.normal_(0, 1e-3)
    model.config.use_cache = True
    kw = dict(max_new_tokens=args.max_new, min_new_tokens=args.max_new, do_sample=True, temperature=0.7, top_k=20)
    configs = [(a, b, how) for a in args.attn.split(",") for b in args.batch.split(",") for how in args.how.split(",")]
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    prefill: dict[tuple, list[float]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        for attn, b, how in configs:
            n_p, n = (int(x) for x in b.split("x"))
            rows = [i for i in range(n_p) for _ in range(n)]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id)
            att = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                att[r, width - len(prompts[i]):] = 1
            model.set_attn_implementation(attn)
            with merged_for_generation(knobs), torch.no_grad():
                t = time.perf_counter()
                if how == "plain":
                    model(input_ids=ids, attention_mask=att, use_cache=True)
                else:
                    for i in range(n_p):
                        model(input_ids=torch.tensor([prompts[i][:-1]]), use_cache=True)
                prefill[(attn, b, how)].append(time.perf_counter() - t)
                t = time.perf_counter()
                if how == "plain":
                    model.generate(input_ids=ids, attention_mask=att, pad_token_id=tok.pad_token_id, **kw)
                else:
                    generate_shared_prefix(model, prompts[:n_p], rows, pad_id=tok.pad_token_id, **kw)
                times[(attn, b, how)].append(time.perf_counter() - t)
    for c in configs:
        attn, b, how = c
        n_p, n = (int(x) for x in b.split("x"))
        med = statistics.median(times[c])
        print(f"attn={attn:9s} batch={b:5s} ({n_p * n:3d} rows) {how:6s} max_new={args.max_new}: generate "
              f"{med:6.1f} s -> {n_p * n * args.max_new / med:6.1f} tokens/s; prefill alone "
              f"{statistics.median(prefill[c]):5.1f} s (medians of {args.repeats})", flush=True)


def bench_train(args) -> None:
    from contextlib import nullcontext

    from vgrout import grpo
    from vgrout.adapter import deployed_params, rollout_grads
    from vgrout.logprobs import completion_logprobs

    ratio = None
    for top in (int(x) for x in args.top_layers.split(",")):
        model, tok, knobs, prompts = _setup(args.threads, top_layers=top, per_rollout=args.per_rollout)
        model.train()
        g = args.group
        plen = len(prompts[0])
        ids = torch.randint(100, 40000, (g, plen + args.completion))
        ids[:, :plen] = torch.tensor(prompts[0])
        mask = torch.ones(g, args.completion)
        hows = ["plain", "shared"] if top else ["plain"]
        times: dict[str, list[float]] = {h: [] for h in hows}
        for _ in range(args.repeats):
            for how in hows:
                t = time.perf_counter()
                with rollout_grads(knobs, g) if args.per_rollout else nullcontext():
                    logp = completion_logprobs(model, ids, plen, share_prompt=how == "shared")
                    adv = torch.linspace(-1, 1, g)
                    tl = grpo.token_losses(logp, logp.detach(), adv, clip=0.2, beta=0.0, ref_logp=None)
                    loss = grpo.reduce_loss(tl, mask, unbiased=True, max_new=args.completion, group=g,
                                            prompts_per_step=1)
                    loss.backward()
                times[how].append(time.perf_counter() - t)
                for p in deployed_params(knobs):
                    p.grad = None
        n = sum(k.rank for k in knobs.values())
        for how in hows:
            print(f"top_layers={top or 'all':>3} ({len(knobs)} modules, {n:,} δS) G={g} tokens={plen}+"
                  f"{args.completion} per_rollout={args.per_rollout} prompt={how}: fwd+bwd "
                  f"{statistics.median(times[how]):5.1f} s median of {args.repeats}", flush=True)
        if top:
            ratio = statistics.median(times["shared"]) / statistics.median(times["plain"])
        del model, knobs
    if ratio is not None:
        print(f"organism_fb_ratio={ratio:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["gen", "train"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", default="sdpa,sdpa_gqa,eager")
    ap.add_argument("--batch", default="2x6,4x8", help="P prompts x N samples, comma-separated")
    ap.add_argument("--how", default="plain,shared")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--top-layers", default="0,8")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--per-rollout", action="store_true")
    args = ap.parse_args()
    bench_gen(args) if args.what == "gen" else bench_train(args)


if __name__ == "__main__":
    main()
