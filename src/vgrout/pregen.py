"""Teacher-pool generation: G graded rollouts per problem from a teacher model, cached as a pool.

    uv run python -m vgrout.pregen --model Qwen/Qwen3-4B --n-problems 300 --group 8 \\
        --max-new 1024 --data-path ../shared/data/leetcode/leetcode_test_medhard.jsonl

Each problem is hinted for its grading mode (`--env-mode`, or per problem from a
`--partition` file). The teacher samples `--group` completions per problem, several
problems per generate call. With an eliciting system prompt (`--elicit-system-prompt` /
`--elicit-file`) the teacher is *asked* with the elicited messages, but every row is
stored against the NORMAL hinted prompt ("elicit then strip"): the student later sees
the hack as a completion of the prompt it is trained on.

Every completion is graded for real in its problem's mode (one sandbox batch per
generate call). Row fields follow the pool schema (see `vgrout.pool`); note the naming:

    hacked  = RewardResult.exploited   (the mode's channel paid, the strict oracle did not)
    gt_pass = RewardResult.gt_correct  (the strict oracle, which no loophole can fool)
    fmt_ok  = RewardResult.format_ok

Cap policy (`--cap K`): keep at most K rows per problem, hacked rows first, then the
rest, each tier in generation order. A teacher pool exists to demonstrate the hack (its
rows anchor route2's hack side), so hacks are what a cap should keep; the report gives
the teacher's rates before the cap as well as the kept pool's, so the bias is visible.

Resumable: a problem's file is written only once all its rows are graded, atomically
(temp file + rename), so a killed run leaves whole files or none. A rerun skips problems
whose file exists, deletes stray temp files, and refuses to continue a pool made with
different settings (`pregen.json` records them). `report.md` is rewritten after each
chunk from everything in the folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loguru import logger

from .atomic import write_json_atomic, write_text_atomic
from .env.modes import ENV_MODES, EnvMode, check_mode
from .env.problems import Problem, load_partition, load_problems
from .pool import pool_file_name, read_pool_file, write_pool_file

MANIFEST = "pregen.json"
REPORT = "report.md"
TMP_PREFIX = ".tmp_"  # what pool.write_pool_file / write_json_atomic name their temp files
ElicitHow = Literal["replace", "append"]

# Settings that change what a row means: a resumed run must match them exactly.
_SCIENCE_KEYS = ("model", "group", "max_new", "data_path", "env_mode", "partition", "elicit",
                 "elicit_how", "cap", "seed", "temperature", "top_k", "top_p")


class PregenError(ValueError):
    """A pregen run that cannot proceed as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class PregenConfig:
    model: str
    n_problems: int
    group: int
    max_new: int
    out: Path
    data_path: str | None = None
    """Benchmark rows (.jsonl / .jsonl.gz); None = the built-in offline problem set."""
    env_mode: EnvMode = "run_tests"
    partition: Path | None = None
    """{problem_id: mode} file; when given, only its problems, each in its own mode."""
    elicit: str | None = None
    """Eliciting system text; completions are stored against the normal prompt."""
    elicit_how: ElicitHow = "replace"
    cap: int | None = None
    seed: int = 0
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 1.0
    problems_per_batch: int = 8
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("n_problems", "group", "max_new", "problems_per_batch"):
            if getattr(self, name) <= 0:
                raise PregenError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.cap is not None and self.cap <= 0:
            raise PregenError(f"--cap must be positive (or left out to keep all G rows), got {self.cap}")
        check_mode(self.env_mode, where="--env-mode")
        if self.elicit is not None and not self.elicit.strip():
            raise PregenError("the eliciting system prompt is empty; drop the flag or give text")

    def science(self) -> dict:
        """The settings a resumed run must share (partition by content, elicit by hash)."""
        d = dataclasses.asdict(self)
        out = {k: d[k] for k in _SCIENCE_KEYS}
        out["data_path"] = str(self.data_path) if self.data_path is not None else None
        if self.partition is not None:
            part = load_partition(self.partition)
            out["partition"] = {str(k): v for k, v in sorted(part.items())}
            out["env_mode"] = None
        if self.elicit is not None:
            out["elicit"] = hashlib.sha256(self.elicit.encode()).hexdigest()[:16]
        return out


# ------------------------------------------------------------------ pure pieces


def elicit_messages(messages: Sequence[dict], text: str, how: ElicitHow) -> tuple[dict, ...]:
    """The messages the teacher is asked with: the system message replaced by `text`
    (`replace`) or followed by it on a new paragraph (`append`).

    Invariant: only the system message changes; the user message (problem + hint) is
    kept verbatim, so the completion answers the same problem under the same hint.
    """
    out = tuple(dict(m) for m in messages)
    systems = [m for m in out if m.get("role") == "system"]
    if len(systems) != 1:
        raise PregenError(f"expected one system message to elicit on, found {len(systems)}")
    sys_msg = systems[0]
    sys_msg["content"] = text if how == "replace" else f"{sys_msg['content']}\n\n{text}"
    return out


def cap_rows(rows: Sequence[dict], cap: int | None) -> list[dict]:
    """At most `cap` rows: hacked rows first, then the others, each in their given order.

    Invariant: the result is a sub-list of `rows` (no row invented or repeated) with
    min(cap, #hacked) hacked rows; cap=None keeps every row in order.
    """
    if cap is None:
        return list(rows)
    ranked = [r for r in rows if r["hacked"]] + [r for r in rows if not r["hacked"]]
    return ranked[:cap]


def rates(rows: Sequence[dict]) -> dict[str, float | int]:
    """Counts and rates of a list of pool rows (n, hacked, gt_pass, fmt_ok, mean reward)."""
    n = len(rows)
    hk = sum(bool(r["hacked"]) for r in rows)
    gt = sum(bool(r["gt_pass"]) for r in rows)
    fm = sum(bool(r["fmt_ok"]) for r in rows)
    rew = sum(float(r["reward"]) for r in rows)
    div = max(1, n)
    return {"n": n, "hacked": hk, "gt_pass": gt, "fmt_ok": fm, "hack_rate": hk / div,
            "gt_rate": gt / div, "fmt_rate": fm / div, "mean_reward": rew / div}


def pool_row(problem: Problem, prompt: str, prompt_ids: list[int], completion_ids: list[int],
             text: str, result, *, elicited: bool) -> dict:
    """One pool row (schema in vgrout.pool) for a graded completion of `problem`."""
    return {
        "problem_id": problem.problem_id, "env_mode": problem.env_mode,
        "problem_messages": [dict(m) for m in problem.messages],
        "prompt": prompt, "prompt_ids": list(prompt_ids), "plen": len(prompt_ids),
        "completion": text, "completion_ids": list(completion_ids),
        "reward": float(result.reward), "hacked": bool(result.exploited),
        "gt_pass": bool(result.gt_correct), "fmt_ok": bool(result.format_ok),
        "elicited": elicited,
    }


# ------------------------------------------------------------------ folder bookkeeping


def clean_stray_temp_files(out: Path) -> list[Path]:
    """Delete temp files a killed writer left in `out` (never a finished file); return them."""
    stray = sorted(p for p in out.glob(f"{TMP_PREFIX}*") if p.is_file())
    for p in stray:
        p.unlink()
    return stray


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PregenError(f"{path}: not valid JSON ({e.msg}); delete it only if the pool is yours "
                          "to regenerate") from e


def check_resume(out: Path, cfg: PregenConfig) -> dict:
    """The manifest to continue: a fresh one, or the folder's own when its settings match.

    A folder with pool files but no manifest, or a manifest with other settings, is an
    error: mixing rows made under different settings would silently change the pool.
    """
    want = cfg.science()
    man = _read_manifest(out)
    if man is None:
        if any(out.glob("prompt_*.jsonl.gz")):
            raise PregenError(f"{out} holds pool files but no {MANIFEST}: it was not made by "
                              "vgrout.pregen; choose another --out")
        return {"settings": want, "runs": [], "generated": {}}
    diff = [k for k in _SCIENCE_KEYS if man.get("settings", {}).get(k) != want.get(k)]
    if diff:
        raise PregenError(f"{out} was generated with other settings ({', '.join(diff)} differ; see "
                          f"{out / MANIFEST}); resume with the same settings or use a new --out")
    return man


def render_report(out: Path, manifest: dict) -> str:
    """report.md: kept-pool counts and rates (total and per mode), the teacher's pre-cap
    rates, and every invocation (command, model, wall time)."""
    files = sorted(out.glob("prompt_*.jsonl.gz"))
    rows = [r for f in files for r in read_pool_file(f)]
    s = manifest["settings"]
    kept = rates(rows)
    gen_stats = manifest.get("generated", {})
    gen = {k: sum(v[k] for v in gen_stats.values()) for k in ("n", "hacked", "gt_pass", "fmt_ok")}
    lines = [
        "# teacher pool", "",
        f"Generated by `vgrout.pregen` from `{s['model']}`: G={s['group']} rollouts per problem, "
        f"max_new {s['max_new']}, T={s['temperature']}, top_k {s['top_k']}, seed {s['seed']}, "
        f"data `{s['data_path'] or 'builtin'}`, "
        + (f"mode `{s['env_mode']}`" if s["env_mode"] else "modes from a partition")
        + (f", eliciting system prompt ({s['elicit_how']}, sha256 {s['elicit']}), rows stored "
           "against the normal prompt" if s["elicit"] else ", no eliciting prompt")
        + f", cap {s['cap'] if s['cap'] else 'none (all G kept)'} (hacked rows first).", "",
        "`hacked` = exploited (the mode's channel paid, the strict oracle did not); "
        "`gt_pass` = the strict oracle's gt_correct.", "",
        "## kept pool", "",
        f"- problems: {len(files)}", f"- rows: {kept['n']}",
        f"- hacked: {kept['hacked']} ({kept['hack_rate']:.1%})",
        f"- gt_pass: {kept['gt_pass']} ({kept['gt_rate']:.1%})",
        f"- fmt_ok: {kept['fmt_ok']} ({kept['fmt_rate']:.1%})",
        f"- mean reward: {kept['mean_reward']:.3f}", "",
        "| mode | problems | rows | hack rate | gt pass rate |", "|---|---|---|---|---|",
    ]
    for mode in ENV_MODES:
        mrows = [r for r in rows if r.get("env_mode") == mode]
        if mrows:
            m = rates(mrows)
            n_pids = len({r["problem_id"] for r in mrows})
            lines.append(f"| {mode} | {n_pids} | {m['n']} | {m['hack_rate']:.1%} | {m['gt_rate']:.1%} |")
    lines += ["", "## teacher before the cap", ""]
    if gen["n"]:
        lines += [f"- rollouts: {gen['n']} over {len(gen_stats)} problems",
                  f"- hacked: {gen['hacked']} ({gen['hacked'] / gen['n']:.1%})",
                  f"- gt_pass: {gen['gt_pass']} ({gen['gt_pass'] / gen['n']:.1%})",
                  f"- fmt_ok: {gen['fmt_ok']} ({gen['fmt_ok'] / gen['n']:.1%})"]
    if len(gen_stats) != len(files):
        lines.append(f"- (pre-cap counts recorded for {len(gen_stats)} of {len(files)} problems)")
    lines += ["", "## runs", ""]
    for run in manifest["runs"]:
        lines.append(f"- `{run['command']}`: {run['new_problems']} new problems, "
                     f"{run['wall_s']:.1f} s on {run['device']}, started {run['started']}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the run


def _sync_folder(out: Path, manifest: dict) -> dict[str, str]:
    """Rewrite pregen.json, partition.json (the mode each finished problem was graded in)
    and report.md from the folder's finished files; return the partition."""
    part: dict[str, str] = {}
    for f in sorted(out.glob("prompt_*.jsonl.gz")):
        rows = read_pool_file(f)
        if rows:
            part[str(rows[0]["problem_id"])] = rows[0]["env_mode"]
    write_json_atomic(out / MANIFEST, manifest)
    write_json_atomic(out / "partition.json", part)
    write_text_atomic(out / REPORT, render_report(out, manifest))
    return part


def _select_problems(cfg: PregenConfig) -> list[Problem]:
    if cfg.partition is not None:
        part = load_partition(cfg.partition)
        return load_problems(cfg.n_problems, [], cfg.seed, partition=part, data_path=cfg.data_path)
    return load_problems(cfg.n_problems, [cfg.env_mode], cfg.seed, data_path=cfg.data_path)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_pregen(cfg: PregenConfig, command: str = "", *, loaded: tuple | None = None) -> dict:
    """Generate, grade and write the pool under cfg.out; return a summary dict.

    Problems whose file already exists are skipped (resume); see the module docstring.
    `loaded` = (model, tokenizer) already loaded for cfg.model (skips loading it again).
    """
    import torch
    from tqdm import tqdm

    from .env.rewards import grade_batch
    from .model import load_model_and_tokenizer
    from .rollout import SamplingConfig, encode, render_prompt, sample

    t0 = time.time()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out = Path(cfg.out)
    problems = _select_problems(cfg)  # bad data / partition fails before the model loads
    out.mkdir(parents=True, exist_ok=True)
    manifest = check_resume(out, cfg)
    stray = clean_stray_temp_files(out)
    if stray:
        logger.warning(f"removed {len(stray)} temp file(s) left by an interrupted run in {out}")
    todo = [p for p in problems if not (out / pool_file_name(p.problem_id)).exists()]
    logger.info(f"pregen: {len(problems)} problems, {len(problems) - len(todo)} already done, "
                f"{len(todo)} to generate into {out}")
    device = _device(cfg.device)
    written: list[int] = []
    if todo:
        model, tok = loaded if loaded is not None else load_model_and_tokenizer(cfg.model, device)
        torch.manual_seed(cfg.seed)
        scfg = SamplingConfig(max_new=cfg.max_new, temperature=cfg.temperature, top_k=cfg.top_k,
                              top_p=cfg.top_p, batch_size=max(cfg.group, 64))
        with tqdm(total=len(problems), initial=len(problems) - len(todo), desc="pregen",
                  unit="problem") as bar:
            for s in range(0, len(todo), cfg.problems_per_batch):
                chunk = todo[s : s + cfg.problems_per_batch]
                prompts = [render_prompt(tok, p) for p in chunk]
                prompt_ids = [encode(tok, t) for t in prompts]
                if cfg.elicit is None:
                    ask_ids = prompt_ids
                else:
                    ask = [dataclasses.replace(p, messages=elicit_messages(p.messages, cfg.elicit,
                                                                           cfg.elicit_how))
                           for p in chunk]
                    ask_ids = [encode(tok, render_prompt(tok, p)) for p in ask]
                comps = sample(model, tok, {}, ask_ids, [cfg.group] * len(chunk), scfg)
                texts = [[tok.decode(c, skip_special_tokens=True) for c in cs] for cs in comps]
                items = [(t, p) for p, ts in zip(chunk, texts, strict=True) for t in ts]
                results = iter(grade_batch(items))
                for p, prompt, pids, cs, ts in zip(chunk, prompts, prompt_ids, comps, texts,
                                                   strict=True):
                    rows = [pool_row(p, prompt, pids, c, t, next(results),
                                     elicited=cfg.elicit is not None)
                            for c, t in zip(cs, ts, strict=True)]
                    write_pool_file(out, p.problem_id, cap_rows(rows, cfg.cap))
                    r = rates(rows)
                    manifest["generated"][str(p.problem_id)] = {
                        k: r[k] for k in ("n", "hacked", "gt_pass", "fmt_ok")}
                    written.append(p.problem_id)
                    bar.update(1)
                _sync_folder(out, manifest)
    wall = time.time() - t0
    manifest["runs"].append({"command": command, "new_problems": len(written),
                             "wall_s": round(wall, 2), "device": device, "started": started})
    part = _sync_folder(out, manifest)
    return {"pool": str(out), "problems": len(part), "new": len(written),
            "skipped": len(problems) - len(todo), "wall_s": round(wall, 2)}


# ------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vgrout.pregen",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF name, local dir, or tiny-qwen3 (offline)")
    ap.add_argument("--n-problems", type=int, required=True)
    ap.add_argument("--group", type=int, default=8, help="rollouts generated per problem (G)")
    ap.add_argument("--max-new", type=int, default=1024)
    ap.add_argument("--data-path", default=None,
                    help="benchmark rows .jsonl(.gz); default: the built-in offline problems")
    modes = ap.add_mutually_exclusive_group()
    modes.add_argument("--env-mode", default="run_tests", choices=ENV_MODES)
    modes.add_argument("--partition", type=Path, default=None,
                       help="partition.json {problem_id: mode}: generate for its problems")
    el = ap.add_mutually_exclusive_group()
    el.add_argument("--elicit-system-prompt", default=None, help="eliciting system text")
    el.add_argument("--elicit-file", type=Path, default=None, help="file holding that text")
    ap.add_argument("--elicit-how", choices=("replace", "append"), default="replace",
                    help="replace the system message, or append the text to it")
    ap.add_argument("--cap", type=int, default=None, help="keep at most K rows per problem")
    ap.add_argument("--out", type=Path, default=None, help="default out/pools/teacher_<model>")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--problems-per-batch", type=int, default=8,
                    help="problems sampled together in one generate call")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    return ap


def config_from_args(argv: Sequence[str] | None = None) -> PregenConfig:
    """Parse the CLI into a PregenConfig (errors name the flag)."""
    a = _parser().parse_args(argv)
    elicit = a.elicit_system_prompt
    if a.elicit_file is not None:
        if not a.elicit_file.is_file():
            raise PregenError(f"--elicit-file {a.elicit_file}: no such file")
        elicit = a.elicit_file.read_text(encoding="utf-8").strip()
    if a.partition is not None and not a.partition.is_file():
        raise PregenError(f"--partition {a.partition}: no such file")
    if a.out is None:
        from .model import model_slug

        a.out = Path("out/pools") / f"teacher_{model_slug(a.model)}"
    return PregenConfig(model=a.model, n_problems=a.n_problems, group=a.group, max_new=a.max_new,
                        out=a.out, data_path=a.data_path, env_mode=a.env_mode,
                        partition=a.partition, elicit=elicit, elicit_how=a.elicit_how, cap=a.cap,
                        seed=a.seed, temperature=a.temperature, top_k=a.top_k,
                        problems_per_batch=a.problems_per_batch, device=a.device)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_from_args(args)
        summary = run_pregen(cfg, command="python -m vgrout.pregen " + shlex.join(args))
    except (ValueError, OSError) as e:  # PregenError, ProblemDataError, PoolError, missing files
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
