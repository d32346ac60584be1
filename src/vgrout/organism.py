"""The CPU model organism: SmolLM2-135M-Instruct with a cached SFT warm start, its data split
and its teacher pool.

    uv run python -m vgrout.organism            # build everything the `organism` preset reads

Untouched, SmolLM2-135M-Instruct neither solves nor hacks the built-in problems (it writes bare
functions, not `class Solution`). The warm start is a short supervised fine-tune (`SFTRecipe`)
on the benchmark's response format: the canonical solution of some training problems, in a
```python fence, ended by `<|im_end|>`. It gives the policy a solve prior (memorised) and the
format; the hack pull comes, as in the real experiments, from a teacher pool of template hacks
mixed into each group (`build_pool`), optionally plus a few template hacks in the SFT itself.

Problems: the 27 built-in problems are split once, by a fixed rule, into training problems
(SFT and RL) and held-out problems that neither ever sees (`HELDOUT_IDS`); the split is written
as two benchmark-row files (`prepare_data`), so the preset's `--data-path` and
`--eval-data-path` point at them.

Every artifact is assembled in a temp path and renamed into place, and is keyed by everything
that changes it: the SFT model folder by the recipe and the base model's build marker (the GGUF
checksum), the pool by its problems, mode and tokenizer.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see train.py)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from loguru import logger  # noqa: E402

from .atomic import staging_dir  # noqa: E402
from .env.builtin_problems import builtin_rows  # noqa: E402
from .env.modes import EnvMode, check_mode  # noqa: E402
from .env.problems import Problem, load_rows, row_to_problem, write_rows  # noqa: E402
from .model import ORGANISM, SMOLLM2, build_smollm2, models_dir  # noqa: E402

# Held out of the SFT and of RL: the seven built-in problems with the longest canonical solutions
# (143-196 SmolLM2 tokens in a ```python fence; every training problem's fits in 142), so the
# training problems' solutions fit a short max_new. Held-out solve is therefore not comparable
# with training solve; held-out hack measures whether the learned hack transfers to unseen prompts.
HELDOUT_IDS: tuple[int, ...] = (900001, 900002, 900004, 900008, 900015, 900020, 900024)

DATA_DIR = Path("out/data/organism")
TRAIN_FILE = "train.jsonl"
HELDOUT_FILE = "heldout.jsonl"
POOL_DIR = Path("out/pools/organism")
MODE: EnvMode = "run_tests"

_MARKER = "vgrout_organism_sft.json"


def split_rows() -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) of the built-in set, each sorted by id."""
    rows = sorted(builtin_rows(), key=lambda r: r["id"])
    ids = {r["id"] for r in rows}
    missing = set(HELDOUT_IDS) - ids
    if missing:
        raise RuntimeError(f"organism held-out ids {sorted(missing)} are not built-in problems")
    return [r for r in rows if r["id"] not in HELDOUT_IDS], [r for r in rows if r["id"] in HELDOUT_IDS]


def prepare_data(out_dir: Path = DATA_DIR) -> tuple[Path, Path]:
    """Write the split as benchmark-row files (atomic; rewritten only when the content differs)."""
    out = []
    for name, rows in zip((TRAIN_FILE, HELDOUT_FILE), split_rows(), strict=True):
        path = Path(out_dir) / name
        want = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not (path.is_file() and path.read_text(encoding="utf-8") == want):
            write_rows(path, rows)
        out.append(path)
    return out[0], out[1]


def train_problems(mode: EnvMode = MODE) -> list[Problem]:
    rows, _ = split_rows()
    return [row_to_problem(r, mode, source="organism-train") for r in rows]


def code_block(code: str) -> str:
    return "```python\n" + code.strip("\n") + "\n```"


# ─────────────────────────────────────────────── the SFT warm start ──


@dataclass(frozen=True)
class SFTRecipe:
    """Everything that decides the warm-started weights (the cache key hashes all of it)."""

    schema: int = 1
    base: str = SMOLLM2
    mode: EnvMode = MODE
    solve_ids: tuple[int, ...] = ()
    """Training problems whose canonical solution is an SFT example (the memorised solve prior)."""
    hack_ids: tuple[int, ...] = ()
    """Training problems whose template hack (for `mode`) is an SFT example (a hack prior)."""
    epochs: int = 3
    hack_epochs: int | None = None
    """The hack examples are seen in the first `hack_epochs` epochs only (None = every epoch): a weak prior."""
    lr: float = 1e-4
    top_layers: int = 8
    """Full fine-tune of the last N transformer blocks (the rest, embeddings and norms frozen)."""
    batch: int = 4
    seed: int = 0
    threads: int = 2
    """torch threads during the SFT. CPU float summation order depends on the thread count, so
    the same recipe rebuilds the same weights on the same kind of CPU only at the same count
    (measured: two 2-thread builds of one recipe gave one `weights_digest`, a 1-thread build
    another). Pinned so that a later session's rebuild can pool runs with an earlier one's."""

    def __post_init__(self) -> None:
        check_mode(self.mode, where="SFTRecipe.mode")
        train_ids = {r["id"] for r in split_rows()[0]}
        bad = (set(self.solve_ids) | set(self.hack_ids)) - train_ids
        if bad:
            raise ValueError(f"SFT examples must come from training problems; {sorted(bad)} are not "
                             f"(held-out: {list(HELDOUT_IDS)})")
        if self.epochs < 1 or self.batch < 1 or self.top_layers < 1 or self.threads < 1 or not self.lr > 0:
            raise ValueError(f"invalid SFT recipe {self}")
        if self.hack_epochs is not None and not 1 <= self.hack_epochs <= self.epochs:
            raise ValueError(f"SFT recipe: hack_epochs={self.hack_epochs} must be in [1, epochs={self.epochs}]")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def key(self) -> str:
        base_marker = (models_dir() / self.base / "vgrout_smollm2.json")
        base = base_marker.read_text() if base_marker.is_file() else ""
        blob = json.dumps({"recipe": self.to_dict(), "base": base}, sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=6).hexdigest()


# The organism's warm start (chosen by measurement: docs/organism.md).
# solve_ids: every other training problem (by id) among the 17 whose canonical solution fits in
# 120 SmolLM2 tokens as a ```python block (so a memorised solution fits max_new = 128); the other
# 11 training problems are never seen solved, so the hack is the only way to reward there.
SOLVE_IDS: tuple[int, ...] = (900003, 900006, 900009, 900012, 900014, 900017, 900019, 900022, 900026)
SOLVE_MAX_TOKENS = 120
# hack_ids: the other 11 training problems, never seen solved. A run_tests template hack for every
# third of them (4 of 11), seen in the first epoch only, is the organism's hack prior: weak enough
# that the policy starts at ~4% hack, present enough that RL samples one (without any, 16 vanilla
# steps never sampled a hack; with all 11, the policy started at ~24%: docs/organism.md).
HACK_IDS: tuple[int, ...] = (900005, 900007, 900010, 900011, 900013, 900016, 900018, 900021, 900023, 900025,
                             900027)

ORGANISM_RECIPE = SFTRecipe(solve_ids=SOLVE_IDS, hack_ids=HACK_IDS[::3], epochs=6, hack_epochs=1, lr=3e-4)

# The organism before 2026-12-01 (docs/organism.md, "recipe 2"): the hack example for all 11
# HACK_IDS problems, everything else as ORGANISM_RECIPE. Kept buildable, beside the organism, so
# its published tables can be reproduced: `python -m vgrout.organism --recipe strong-hack`.
STRONG_HACK_RECIPE = dataclasses.replace(ORGANISM_RECIPE, hack_ids=HACK_IDS)
RECIPES: dict[str, SFTRecipe] = {"organism": ORGANISM_RECIPE, "strong-hack": STRONG_HACK_RECIPE}


def recipe_dir(name: str) -> Path:
    """Where a named recipe's model is built: the organism's own folder (the model name
    `smollm2-135m-organism` resolves to it) or `out/models/smollm2-135m-organism-<name>`."""
    if name not in RECIPES:
        raise ValueError(f"unknown SFT recipe {name!r}; known: {', '.join(RECIPES)}")
    return models_dir() / (ORGANISM if name == "organism" else f"{ORGANISM}-{name}")


def sft_examples(recipe: SFTRecipe, tok) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) per example, solve examples first, then hack examples: the hinted
    prompt as the trainer renders it, the completion as the benchmark's response format ended by the
    end-of-turn token."""
    from .rollout import encode, eos_ids, render_prompt
    from .smoke_pool import template_hack

    probs = {p.problem_id: p for p in train_problems(recipe.mode)}
    end = eos_ids(tok)[0]
    out = []
    for ids, make in ((recipe.solve_ids, lambda p: code_block(p.canonical)),
                      (recipe.hack_ids, lambda p: template_hack(p, recipe.mode))):
        for pid in ids:
            p = probs[pid]
            out.append((encode(tok, render_prompt(tok, p)), encode(tok, make(p)) + [end]))
    return out


def epoch_order(order: list[int], n_solve: int, epoch: int, hack_epochs: int | None) -> list[int]:
    """The examples of SFT epoch `epoch` (0-based) in `order`'s order: all of them while
    epoch < hack_epochs (or hack_epochs is None), afterwards only the solve examples, which are
    the first `n_solve` indices (`sft_examples` puts them first)."""
    if hack_epochs is None or epoch < hack_epochs:
        return list(order)
    return [i for i in order if i < n_solve]


def run_sft(model, tok, recipe: SFTRecipe, *, log_every: int = 5) -> list[float]:
    """Fine-tune the last `top_layers` blocks in place on the recipe's examples; return the
    mean completion-token loss of each epoch."""
    from .adapter import _BLOCK_LINEAR  # the same rule that says which modules are blocks

    examples = sft_examples(recipe, tok)
    if not examples:
        raise ValueError("SFT recipe has no examples (solve_ids and hack_ids are both empty)")
    n_layers = model.config.num_hidden_layers
    first = n_layers - recipe.top_layers
    params = []
    for name, p in model.named_parameters():
        m = _BLOCK_LINEAR.search(name)
        p.requires_grad_(bool(m) and int(m.group(2)) >= first)
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed)
    pad = tok.pad_token_id
    model.train()
    losses = []
    t0 = time.time()
    n_solve = len(recipe.solve_ids)
    for epoch in range(recipe.epochs):
        order = epoch_order(torch.randperm(len(examples), generator=gen).tolist(), n_solve, epoch, recipe.hack_epochs)
        tot, n_tok = 0.0, 0
        for s in range(0, len(order), recipe.batch):
            batch = [examples[i] for i in order[s:s + recipe.batch]]
            width = max(len(p) + len(c) for p, c in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            att = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (p, c) in enumerate(batch):
                seq = p + c
                ids[r, :len(seq)] = torch.tensor(seq)
                labels[r, len(p):len(seq)] = torch.tensor(c)
                att[r, :len(seq)] = 1
            logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1].float()
            tgt = labels[:, 1:]
            loss_sum = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                         ignore_index=-100, reduction="sum")
            n = int((tgt != -100).sum())
            (loss_sum / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tot += float(loss_sum.detach())
            n_tok += n
        losses.append(tot / max(1, n_tok))
        if (epoch + 1) % log_every == 0 or epoch == recipe.epochs - 1 or epoch == 0:
            logger.info(f"SFT epoch {epoch + 1}/{recipe.epochs}: loss {losses[-1]:.4f} ({time.time() - t0:.0f}s)")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return losses


def _valid(path: Path, key: str) -> bool:
    marker = path / _MARKER
    if not marker.is_file() or not all((path / f).is_file() for f in ("config.json", "model.safetensors",
                                                                      "tokenizer.json")):
        return False
    try:
        return json.loads(marker.read_text()).get("key") == key
    except (OSError, json.JSONDecodeError):
        return False


def build_organism(recipe: SFTRecipe = ORGANISM_RECIPE, out_dir: Path | None = None) -> Path:
    """The warm-started organism's fp32 folder: built once per recipe (SFT on CPU, minutes),
    assembled in a temp dir and renamed into place; reused while its marker's key matches."""
    from .model import _install_dir, load_model_and_tokenizer

    build_smollm2()
    key = recipe.key()
    out_dir = Path(out_dir) if out_dir is not None else models_dir() / ORGANISM
    if _valid(out_dir, key):
        return out_dir
    logger.info(f"building the organism's SFT warm start into {out_dir} (key {key}): {recipe}")
    t0 = time.time()
    model, tok = load_model_and_tokenizer(recipe.base, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            losses = run_sft(model, tok, recipe)
    finally:
        torch.set_num_threads(threads)
    with staging_dir(out_dir) as tmp:
        model.config.use_cache = True
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        marker = {"key": key, "recipe": recipe.to_dict(), "losses": losses,
                  "sft_seconds": round(time.time() - t0, 1), "threads": recipe.threads}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
        _install_dir(tmp, out_dir, key, _valid)
    logger.info(f"organism SFT built in {time.time() - t0:.0f}s (final epoch loss {losses[-1]:.4f})")
    return out_dir


def organism_slug(recipe: SFTRecipe = ORGANISM_RECIPE) -> str:
    """Cache id of the organism's weights (SVD cache, directions): name + recipe key."""
    return f"{ORGANISM}-{recipe.key()}"


# ─────────────────────────────────────────────── teacher pool ──


def build_pool(out_dir: Path = POOL_DIR, *, model: str = SMOLLM2, mode: EnvMode = MODE) -> Path:
    """The organism's teacher pool: one template hack per training problem in `mode`, graded for
    real, tokenised with SmolLM2's tokenizer (rebuilt only when its report is missing)."""
    from .smoke_pool import build_smoke_pool

    train, _ = prepare_data()
    if (out_dir / "partition.json").is_file() and (out_dir / "report.md").is_file():
        part = json.loads((out_dir / "partition.json").read_text())
        want = {str(r["id"]) for r in load_rows(train)}
        if set(part) == want and set(part.values()) == {mode}:
            return out_dir
    return build_smoke_pool(out_dir, model=model, modes=(mode,), data_path=train)


def prepare(recipe: SFTRecipe = ORGANISM_RECIPE, out_dir: Path | None = None) -> dict:
    """Everything the organism preset reads: data split, base conversion, SFT (into `out_dir`,
    default the organism's folder), teacher pool."""
    train, held = prepare_data()
    base = build_smollm2()
    org = build_organism(recipe, out_dir)
    pool = build_pool()
    return {"train": str(train), "heldout": str(held), "base": str(base), "organism": str(org),
            "pool": str(pool)}


def start_rates(model_name: str, *, n: int = 8, max_new: int = 160, mode: EnvMode = MODE, seed: int = 0,
                temperature: float = 0.7, top_k: int = 20) -> dict:
    """Solve / hack / format rates of a model on the training and held-out problems (n samples
    each, sampled as the trainer samples), per set and per problem."""
    from .adapter import wrap_model
    from .env.rewards import grade_batch
    from .model import load_model_and_tokenizer
    from .rollout import SamplingConfig, encode, render_prompt, sample

    torch.manual_seed(seed)
    model, tok = load_model_and_tokenizer(model_name, "cpu")
    knobs = wrap_model(model, model_name)
    train_rows, held_rows = split_rows()
    out: dict = {"model": model_name, "n": n, "max_new": max_new, "mode": mode}
    sampling = SamplingConfig(max_new=max_new, temperature=temperature, top_k=top_k, share_prefix=True)
    for name, rows in (("train", train_rows), ("heldout", held_rows)):
        probs = [row_to_problem(r, mode) for r in rows]
        t = time.perf_counter()
        comps = sample(model, tok, knobs, [encode(tok, render_prompt(tok, p)) for p in probs], [n] * len(probs),
                       sampling)
        t_gen = time.perf_counter() - t
        texts = [(tok.decode(c, skip_special_tokens=True), p) for p, cs in zip(probs, comps, strict=True) for c in cs]
        res = grade_batch(texts)
        per = {}
        for (_, p), r in zip(texts, res, strict=True):
            d = per.setdefault(p.problem_id, {"solve": 0, "hack": 0, "fmt": 0, "compile": 0, "n": 0})
            d["solve"] += r.gt_correct
            d["hack"] += r.exploited
            d["fmt"] += r.format_ok
            d["compile"] += r.can_compile
            d["n"] += 1
        lens = [len(c) for cs in comps for c in cs]
        m = len(res)
        out[name] = {"solve": sum(r.gt_correct for r in res) / m, "hack": sum(r.exploited for r in res) / m,
                     "format": sum(r.format_ok for r in res) / m, "compile": sum(r.can_compile for r in res) / m,
                     "mean_len": sum(lens) / m, "truncated": sum(x >= max_new for x in lens) / m,
                     "gen_s": round(t_gen, 1), "per_problem": per}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="Build the CPU model organism's inputs (data split, SmolLM2 "
                                             "conversion, SFT warm start, teacher pool), or measure a model's "
                                             "start rates on its problems.")
    ap.add_argument("--rates", metavar="MODEL", help="measure solve/hack rates of MODEL instead of building")
    ap.add_argument("--n", type=int, default=8, help="samples per problem (--rates)")
    ap.add_argument("--max-new", type=int, default=160, help="max new tokens (--rates)")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="organism",
                    help="the SFT warm start to build: `organism` (the preset's model) or a measured candidate, "
                         "built into out/models/smollm2-135m-organism-<recipe> (train on it with --model PATH)")
    args = ap.parse_args()
    if args.rates:
        print(json.dumps(start_rates(args.rates, n=args.n, max_new=args.max_new), indent=1))
        return
    print(json.dumps(prepare(RECIPES[args.recipe], recipe_dir(args.recipe)), indent=2))


if __name__ == "__main__":
    main()

