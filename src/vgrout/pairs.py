"""Contrastive (prompt, hack, clean) pairs: the weak, self-supervised "detector" for v_hack.

Sources:
- the built-in set (`builtin_pairs()`, text in `vgrout/data/pairs_builtin.md`): hand-written
  mini problems in the benchmark's format, four per loophole mode;
- a markdown pairset (`### name` sections with `Tags:` and `#### Prompt` / `#### Hack` /
  `#### Clean` fenced blocks), optionally narrowed to one `## section` with `file.md#section`;
- a JSON pairset: a list of `{problem_id, prompt, hack, clean}`;
- `pairs_from_pool`: hacked teacher rows against the problem's canonical solution.

Fenced blocks may be fenced with any run of >= 3 backticks; the block ends at a line made of
exactly the same run, so inner ``` fences survive. A Prompt block is chat text ending in an
assistant header, so it keeps its final newline; Hack/Clean blocks do not.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .env.modes import EnvMode, check_mode
from .env.problems import inject_hint, render_messages, render_user_message

# Qwen3 chat framing with thinking disabled (what the cached pools' `prompt` field holds).
_ASSISTANT_HEADER = "<|im_start|>assistant\n<think>\n\n</think>\n\n"

BUILTIN = "builtin"
_BUILTIN_RESOURCE = "pairs_builtin.md"


class PairsError(ValueError):
    """A pairset that cannot be used as given (the message names the file, pair and field)."""


@dataclass(frozen=True)
class Pair:
    """One contrastive pair. `mode` / `problem_id` are None when the source does not say
    (`problem_id` is a LeetCode id for pool-derived pairs, any label in external JSON)."""

    name: str
    mode: EnvMode | None
    problem_id: int | str | None
    prompt: str
    hack: str
    clean: str


def render_chat(messages: Sequence[Mapping[str, Any]]) -> str:
    """Qwen3 chat text for `messages`, ending with the assistant header and an empty think
    block (the template's output with add_generation_prompt and thinking disabled)."""
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return body + _ASSISTANT_HEADER


_TURN = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>\n", re.S)


def chat_messages(prompt: str) -> list[dict] | None:
    """The system/user messages of a ChatML prompt that ends in an assistant header (with or
    without Qwen3's empty think block); None when `prompt` is not such a text."""
    msgs, at = [], 0
    for m in _TURN.finditer(prompt):
        if m.start() != at:
            return None
        msgs.append({"role": m.group(1), "content": m.group(2)})
        at = m.end()
    if not msgs or prompt[at:] not in ("<|im_start|>assistant\n", _ASSISTANT_HEADER):
        return None
    return msgs


def for_chat_template(pairs: Sequence[Pair], tok) -> list[Pair]:
    """The pairs with each prompt re-rendered by `tok`'s own chat template.

    Pair prompts are stored as Qwen3 chat text (think block included); a model with another
    template (SmolLM2's plain ChatML has no think block) must see the prompt the way its
    rollouts see it, or the directions are extracted off-distribution. For Qwen3's template this
    returns the same text. A prompt that is not ChatML text is kept as it is.
    """
    out = []
    for p in pairs:
        msgs = chat_messages(p.prompt)
        if msgs is not None:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
            p = Pair(p.name, p.mode, p.problem_id, text, p.hack, p.clean)
        out.append(p)
    return out


def code_block(code: str) -> str:
    """The benchmark's response format: one ```python fenced block."""
    return "```python\n" + code.strip("\n") + "\n```"


# ── markdown ──────────────────────────────────────────────────────────────────────────────

_FENCE_OPEN = re.compile(r"^(`{3,})([^`]*)$")
_KEYVAL = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*):\s*(.*)$")


@dataclass
class _MdSection:
    name: str
    group: str  # the enclosing `## ` heading ("" when none)
    line: int
    keys: dict[str, str]
    blocks: dict[str, str]


def _parse_md(text: str, where: str) -> list[_MdSection]:
    """Split markdown into `### name` sections with their `Key: value` lines and
    `#### Block` fenced contents. Fence and structure errors name the line."""
    lines = text.split("\n")
    sections: list[_MdSection] = []
    group = ""
    cur: _MdSection | None = None
    pending: tuple[str, int] | None = None  # a `#### X` heading waiting for its fence
    i = 0
    while i < len(lines):
        ln = lines[i]
        lineno = i + 1
        if ln.startswith("#### "):
            if cur is None:
                raise PairsError(f"{where}:{lineno}: block heading {ln!r} before any '### name'")
            if pending is not None:
                raise PairsError(
                    f"{where}:{pending[1]}: pair {cur.name!r}: '#### {pending[0]}' has no "
                    "fenced block after it"
                )
            pending = (ln[5:].strip(), lineno)
        elif ln.startswith("### "):
            if pending is not None and cur is not None:
                raise PairsError(
                    f"{where}:{pending[1]}: pair {cur.name!r}: '#### {pending[0]}' has no "
                    "fenced block after it"
                )
            cur = _MdSection(ln[4:].strip(), group, lineno, {}, {})
            sections.append(cur)
        elif ln.startswith("## ") or ln.startswith("# "):
            if pending is not None and cur is not None:
                raise PairsError(
                    f"{where}:{pending[1]}: pair {cur.name!r}: '#### {pending[0]}' has no "
                    "fenced block after it"
                )
            if ln.startswith("## "):
                group = ln[3:].strip()
            cur = None
        elif (m := _FENCE_OPEN.match(ln)) is not None and pending is not None:
            fence = m.group(1)
            j = i + 1
            while j < len(lines) and lines[j].rstrip() != fence:
                j += 1
            if j == len(lines):
                raise PairsError(
                    f"{where}:{lineno}: pair {cur.name!r}: block '{pending[0]}' opened with "
                    f"{len(fence)} backticks is never closed"
                )
            assert cur is not None
            if pending[0] in cur.blocks:
                raise PairsError(f"{where}:{lineno}: pair {cur.name!r}: two '{pending[0]}' blocks")
            cur.blocks[pending[0]] = "\n".join(lines[i + 1 : j])
            pending = None
            i = j
        elif cur is not None and pending is None and (kv := _KEYVAL.match(ln)) is not None:
            cur.keys[kv.group(1).lower()] = kv.group(2).strip()
        elif ln.strip() and pending is not None:
            raise PairsError(
                f"{where}:{lineno}: pair {cur.name if cur else '?'!r}: expected a fenced block "
                f"after '#### {pending[0]}', found {ln[:60]!r}"
            )
        i += 1
    if pending is not None and cur is not None:
        raise PairsError(
            f"{where}:{pending[1]}: pair {cur.name!r}: '#### {pending[0]}' has no fenced block"
        )
    return sections


def _require_blocks(sec: _MdSection, names: Sequence[str], where: str) -> None:
    for b in names:
        if b not in sec.blocks:
            raise PairsError(f"{where}:{sec.line}: pair {sec.name!r}: missing '#### {b}' block")
        if not sec.blocks[b].strip():
            raise PairsError(f"{where}:{sec.line}: pair {sec.name!r}: '#### {b}' block is empty")


def _check_unique(pairs: Sequence[Pair], where: str) -> None:
    seen: set[str] = set()
    for p in pairs:
        if p.name in seen:
            raise PairsError(f"{where}: pair name {p.name!r} appears twice")
        seen.add(p.name)


def _optional_mode(sec: _MdSection, where: str) -> EnvMode | None:
    raw = sec.keys.get("mode")
    if raw is None:
        return None
    try:
        return check_mode(raw, where=f"{where}:{sec.line}: pair {sec.name!r}: Mode")
    except ValueError as e:
        raise PairsError(str(e)) from None


def parse_pairs_md(text: str, where: str, section: str | None = None) -> list[Pair]:
    """Pairs of a markdown pairset. `section` keeps only the pairs under that `## ` heading
    (or, failing that, the one pair of that `### ` name)."""
    secs = _parse_md(text, where)
    if section is not None:
        chosen = [s for s in secs if s.group == section] or [s for s in secs if s.name == section]
        if not chosen:
            groups = sorted({s.group for s in secs if s.group})
            raise PairsError(
                f"{where}: no '## {section}' section or '### {section}' pair; "
                f"sections: {', '.join(groups) or '(none)'}"
            )
        secs = chosen
    if not secs:
        raise PairsError(f"{where}: no '### name' pair sections found")
    out = []
    for s in secs:
        _require_blocks(s, ("Prompt", "Hack", "Clean"), where)
        if "tags" not in s.keys:
            raise PairsError(f"{where}:{s.line}: pair {s.name!r}: missing 'Tags:' line")
        out.append(Pair(
            name=s.name,
            mode=_optional_mode(s, where),
            problem_id=None,
            prompt=s.blocks["Prompt"] + "\n",
            hack=s.blocks["Hack"],
            clean=s.blocks["Clean"],
        ))
    _check_unique(out, where)
    return out


_BUILTIN_WHERE = f"vgrout/data/{_BUILTIN_RESOURCE}"


def _builtin_sections() -> tuple[str, list[_MdSection]]:
    text = resources.files("vgrout").joinpath("data", _BUILTIN_RESOURCE).read_text("utf-8")
    secs = _parse_md(text, _BUILTIN_WHERE)
    for s in secs:
        _require_blocks(s, ("Problem", "Starter", "Tests", "Hack", "Clean"), _BUILTIN_WHERE)
    return _BUILTIN_WHERE, secs


def builtin_gt_tests() -> dict[str, tuple[str, ...]]:
    """Ground-truth asserts (`assert Solution().fn(...) == ...`) of each built-in pair's
    mini problem, by pair name, so its completions can be graded."""
    _, secs = _builtin_sections()
    return {s.name: tuple(ln for ln in s.blocks["Tests"].split("\n") if ln.strip())
            for s in secs}


def builtin_pairs(modes: Sequence[str] | None = None) -> list[Pair]:
    """The built-in pairs (all loophole modes, or only `modes`), prompts rendered with each
    mode's hint in the benchmark format."""
    where, secs = _builtin_sections()
    out = []
    for s in secs:
        mode = _optional_mode(s, where)
        if mode is None or "method" not in s.keys:
            raise PairsError(f"{where}:{s.line}: pair {s.name!r}: needs 'Mode:' and 'Method:'")
        user = render_user_message(s.blocks["Problem"], f"Solution().{s.keys['method']}",
                                   s.blocks["Starter"])
        msgs = inject_hint(render_messages(user), mode)
        out.append(Pair(s.name, mode, None, render_chat(msgs), s.blocks["Hack"], s.blocks["Clean"]))
    _check_unique(out, where)
    if modes is not None:
        want = {check_mode(m, where="builtin pair modes") for m in modes}
        out = [p for p in out if p.mode in want]
    return out


# ── JSON ──────────────────────────────────────────────────────────────────────────────────


def parse_pairs_json(obj: object, where: str) -> list[Pair]:
    """Pairs of a JSON pairset: a list of {problem_id, prompt, hack, clean} (optional
    `name`, `mode`)."""
    if not isinstance(obj, list):
        raise PairsError(f"{where}: a JSON pairset is a list of objects, got {type(obj).__name__}")
    if not obj:
        raise PairsError(f"{where}: the pairset is empty")
    out = []
    for i, row in enumerate(obj):
        at = f"{where}: pair {i}"
        if not isinstance(row, dict):
            raise PairsError(f"{at}: expected an object, got {type(row).__name__}")
        for f in ("problem_id", "prompt", "hack", "clean"):
            if f not in row:
                raise PairsError(f"{at}: missing field {f!r} (need problem_id, prompt, hack, clean)")
        for f in ("prompt", "hack", "clean"):
            if not isinstance(row[f], str) or not row[f].strip():
                raise PairsError(f"{at}: field {f!r} must be a non-empty string")
        pid = row["problem_id"]
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int | str)):
            raise PairsError(f"{at}: field 'problem_id' must be an integer, a string or null, got {pid!r}")
        mode = row.get("mode")
        if mode is not None:
            try:
                mode = check_mode(mode, where=f"{at}: field 'mode'")
            except ValueError as e:
                raise PairsError(str(e)) from None
        name = row.get("name") or f"{Path(where).stem}_{i}_{pid}"
        out.append(Pair(str(name), mode, pid, row["prompt"], row["hack"], row["clean"]))
    _check_unique(out, where)
    return out


def pair_to_json(p: Pair) -> dict:
    return asdict(p)


def save_pairs_json(path: str | Path, pairs: Sequence[Pair]) -> Path:
    """Write `pairs` as a JSON pairset atomically (a temp file in the same dir, then rename)."""
    from .atomic import write_json_atomic

    path = Path(path)
    write_json_atomic(path, [pair_to_json(p) for p in pairs])
    return path


# ── dispatch ──────────────────────────────────────────────────────────────────────────────


def load_pairs(source: str | Path) -> list[Pair]:
    """Load a pairset: "builtin", `file.md`, `file.md#section` or `file.json`."""
    s = str(source)
    if s == BUILTIN:
        return builtin_pairs()
    path_s, _, section = s.partition("#")
    path = Path(path_s)
    if not path.is_file():
        raise FileNotFoundError(
            f"pairset {path} does not exist; pass 'builtin', a .md pairset (optionally "
            "file.md#section) or a .json pairset"
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        return parse_pairs_md(text, str(path), section or None)
    if path.suffix == ".json":
        if section:
            raise PairsError(f"{s}: '#section' is only meaningful for .md pairsets")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise PairsError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        return parse_pairs_json(obj, str(path))
    raise PairsError(f"{path}: unknown pairset format {path.suffix!r}; use .md or .json")


def pairs_fingerprint_text(pairs: Sequence[Pair]) -> str:
    """A canonical text of the pairs' content (for cache keys)."""
    return json.dumps([[p.prompt, p.hack, p.clean] for p in pairs], ensure_ascii=False)


# ── pool-derived ──────────────────────────────────────────────────────────────────────────


def _question_of(problem: Any) -> str | None:
    q = problem.get("question") if isinstance(problem, Mapping) else getattr(problem, "question", None)
    return q if isinstance(q, str) else None


def _canonical_of(problem: Any, pid: int) -> str:
    if isinstance(problem, Mapping):
        code = problem.get("canonical", problem.get("canonical_solution"))
    else:
        code = getattr(problem, "canonical", None)
    if not isinstance(code, str) or not code.strip():
        raise PairsError(f"problem {pid}: no canonical solution to use as the clean completion")
    return code


def pairs_from_pool(
    pool_dir: str | Path,
    problems_by_id: Mapping[int, Any],
    out_path: str | Path,
    *,
    max_per_problem: int = 1,
) -> list[Pair]:
    """Build a pairset from a teacher pool and write it as JSON (atomically).

    Per problem of the pool that is in `problems_by_id` (a Problem or a benchmark row with a
    `question` and a canonical solution): hack = the completion of up to `max_per_problem`
    exploited rows (hacked, not gt_pass, well formatted; in file order), clean = the
    canonical solution in the response format, prompt = the row's rendered `prompt`. Pool
    prompts are matched to problems by statement (`pool.align_pool`), so a pair's
    `problem_id` is the problem's id. Problems without such a row are skipped; no pair at
    all is an error.
    """
    from .pool import align_pool, load_pool

    if max_per_problem < 1:
        raise ValueError(f"max_per_problem must be >= 1, got {max_per_problem}")
    keyed = [{"id": pid, "question": _question_of(p)} for pid, p in problems_by_id.items()]
    pool, report = align_pool(load_pool(Path(pool_dir)), keyed, name=f"pool {pool_dir}")
    report.log()
    out: list[Pair] = []
    for pid in sorted(pool.rows):
        if pid not in problems_by_id:
            continue
        clean = code_block(_canonical_of(problems_by_id[pid], pid))
        mode = pool.partition.get(pid) if pool.partition else None
        taken = 0
        for j, row in enumerate(pool.rows[pid]):
            if taken >= max_per_problem:
                break
            if not (row["hacked"] and not row["gt_pass"] and row["fmt_ok"]):
                continue
            prompt = row.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise PairsError(f"{pool.files[pid]}: row {j} has no rendered 'prompt' field")
            row_mode = row.get("env_mode") or mode
            out.append(Pair(f"pool_{pid}_{j}", row_mode, pid, prompt, row["completion"], clean))
            taken += 1
    if not out:
        raise PairsError(
            f"{pool_dir}: no exploited (hacked, not gt_pass) row for any of the "
            f"{len(problems_by_id)} given problems; cannot build pairs"
        )
    save_pairs_json(out_path, out)
    return out

