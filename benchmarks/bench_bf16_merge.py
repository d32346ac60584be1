"""The bf16 merged-decoding caveat (docs/method.md), measured on the organism's real weights.

Generation runs on W + U diag(δS + δS_hack) Vh rounded once to the weight dtype; in bf16 a delta smaller
than half a bf16 step of W rounds away, so early in training sampling can lag the trained policy. This
takes a trained δS from an organism run (its deploy adapter, `adapter_final.safetensors`), scales it
(the scales stand for the smaller δS of earlier steps), and compares, on the run's own graded student
completions (rollouts.jsonl), the per-token log-probs of
  - the fp32 adapter forward (what training differentiates), against
  - the same model cast to bf16 with the adapter merged into the bf16 weights (what bf16 decoding uses),
and, as the floor, the bf16 model with the adapter *unmerged* (the adapter path in bf16 activations).
Prints, per scale: ‖δS‖, mean and 99th-percentile |Δ log p| per token, and the share of tokens whose
greedy (argmax) choice differs from the fp32 adapter forward.

    uv run python benchmarks/bench_bf16_merge.py --run out/runs/<an organism run>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vgrout.adapter import load_adapter, merged_for_generation, wrap_model
from vgrout.model import load_model_and_tokenizer


def completions(run: Path, n: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of up to n graded student completions of the run, tokenised as trained."""
    from vgrout.model import encode

    cfg = json.loads((run / "config.json").read_text())["config"]
    _, tok = load_model_and_tokenizer(cfg["model"], "cpu")
    recs = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines() if x.strip()]
    out = []
    for r in recs[-n:]:
        comp = encode(tok, r["text"])
        if comp:
            out.append((encode(tok, r["prompt"]), comp[:128]))
    return out


@torch.no_grad()
def logps(model, seqs) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated per-token log p(target) and the argmax token at every completion position."""
    lp, am = [], []
    for p, c in seqs:
        ids = torch.tensor([p + c])
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(c) + 1).logits[0, :-1].float()
        logsm = torch.log_softmax(logits, -1)
        lp.append(logsm.gather(-1, torch.tensor(c)[:, None])[:, 0])
        am.append(logits.argmax(-1))
    return torch.cat(lp), torch.cat(am)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished organism run folder")
    ap.add_argument("--scales", default="0.1,0.3,1,3", help="multiples of the run's final δS")
    ap.add_argument("--n", type=int, default=12, help="completions scored")
    args = ap.parse_args()
    cfg = json.loads((args.run / "config.json").read_text())["config"]
    seqs = completions(args.run, args.n)
    model, _ = load_model_and_tokenizer(cfg["model"], "cpu")
    knobs = wrap_model(model, cfg["model"], top_layers=cfg.get("adapt_top_layers", 0))
    load_adapter(args.run / "adapter_final.safetensors", knobs, model_id=cfg["model"])
    final = {n: k.delta_S.detach().clone() for n, k in knobs.items()}
    print(f"{args.run.name}: {len(seqs)} completions, {sum(len(c) for _, c in seqs)} tokens; "
          f"final ‖δS‖ = {torch.cat(list(final.values())).norm():.4f}")
    scales = [float(x) for x in args.scales.split(",")]

    def set_scale(scale: float) -> None:
        with torch.no_grad():
            for n, k in knobs.items():
                k.delta_S.copy_(final[n] * scale)

    ref = {}
    for scale in scales:  # fp32 first: the base weights must not pass through bf16 before this
        set_scale(scale)
        ref[scale] = logps(model, seqs)
    model.to(torch.bfloat16)
    for k in knobs.values():  # the adapter's factors follow the weight dtype; its knobs stay fp32
        k.delta_S.data, k.delta_S_hack.data = k.delta_S.data.float(), k.delta_S_hack.data.float()
    print("| scale | ‖δS‖ | mean abs Δlogp, merged bf16 | p99 | argmax differs | mean abs Δlogp, unmerged bf16 |")
    print("|---|---|---|---|---|---|")
    for scale in scales:
        set_scale(scale)
        ref_lp, ref_am = ref[scale]
        unmerged_lp, _ = logps(model, seqs)
        with merged_for_generation(knobs):
            merged_lp, merged_am = logps(model, seqs)
        d, du = (merged_lp - ref_lp).abs(), (unmerged_lp - ref_lp).abs()
        norm = float(torch.cat([k.delta_S.detach() for k in knobs.values()]).norm())
        print(f"| {scale:g} | {norm:.4f} | {float(d.mean()):.4f} | {float(d.quantile(0.99)):.4f} | "
              f"{float((merged_am != ref_am).float().mean()):.3%} | {float(du.mean()):.4f} |", flush=True)

if __name__ == "__main__":
    main()
