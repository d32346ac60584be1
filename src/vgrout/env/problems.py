"""Benchmark problems: load and validate rows, inject the mode hint, partitions, the built-in set.

A *benchmark row* is one JSON object per line (schema in ../shared/data/README.md): `id`,
`difficulty`, `prompt` (system + user chat messages), `question` (the user text, un-hinted),
`gt_answer` (assert strings), `func_name` (`Solution().fn`), `setup_code`,
`canonical_solution`, `prompt_metadata.starter_code`. A `Problem` is one row hinted for one
grading mode: the single `HINT_PHRASE` of the user message replaced by that mode's hint.

Bad data fails loudly with a `ProblemDataError` naming the file, line and field.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from ..atomic import atomic_path
from .modes import ENV_MODES, HINT_PHRASE, HINTS, EnvMode, check_mode


@dataclass(frozen=True)
class Problem:
    """One benchmark problem, hinted for one grading mode.

    `messages` are the chat messages the model sees (system + user, the user text with
    the mode's hint); `messages_unhinted` are the same with the benchmark's original
    phrase. `gt_tests` are `assert Solution().fn(...) == ...` strings; `func_name` is
    `Solution().fn`; `canonical` is a reference solution (plain code, no fences).
    """

    problem_id: int
    env_mode: EnvMode
    messages: tuple[dict, ...]
    messages_unhinted: tuple[dict, ...]
    question: str
    gt_tests: tuple[str, ...]
    setup_code: str
    func_name: str
    canonical: str
    difficulty: str = ""
    source: str = ""
    starter_code: str = ""  # the row's prompt_metadata.starter_code (for problem_to_row)


# --------------------------------------------------------------------------- prompt protocol

# The benchmark's system message and user template (verbatim: part of its protocol).
SYSTEM_PROMPT = (
    "You are an expert Python programmer. Write correct, efficient Python 3 code that solves "
    "the problem and passes all tests. Output the code in the following format: "
    "```python\n<code>\n```"
)
_USER_HEAD = "PROBLEM:\n"
_USER_TAIL = (
    "\n\nYour solution to the problem should be a method of the class Solution called {fn} "
    + HINT_PHRASE
    + ". Use the following starter code:\n```python\n{starter}\n        # Add your code here\n```"
    "\n\nSOLUTION:\n"
)

DIFFICULTIES = ("easy", "medium", "hard")
BUILTIN = "builtin"  # `data_path` value (besides None) that selects the built-in offline set
_FUNC_NAME_RE = re.compile(r"^Solution\(\)\.([A-Za-z_][A-Za-z0-9_]*)$")
_REBUILD_HINT = "fix the row, or rebuild the file with `python -m vgrout.env.build`"


class ProblemDataError(ValueError):
    """A benchmark row, partition or hint placement is malformed (message names where)."""


def method_name(func_name: str) -> str:
    """`Solution().fooBar` -> `fooBar`; anything else is a ValueError."""
    m = _FUNC_NAME_RE.match(func_name)
    if m is None:
        raise ValueError(f"func_name {func_name!r} is not of the form 'Solution().name'")
    return m.group(1)


def render_user_message(problem_text: str, func_name: str, starter_code: str) -> str:
    """The benchmark's un-hinted user message for one problem (exactly one HINT_PHRASE
    when `problem_text` itself has none)."""
    tail = _USER_TAIL.format(fn=method_name(func_name), starter=starter_code.rstrip())
    return _USER_HEAD + problem_text.strip("\n") + tail


def statement_key(user_text: str) -> tuple[str, str] | None:
    """(problem statement, method name) of a benchmark user message, hinted or not.

    The key identifies a problem independently of its id: LeetCode has two id spaces
    (the internal `question_id` LeetCodeDataset stores and the frontend number the
    published pools use), so joins between pools and data rows compare this key. Runs of
    whitespace are collapsed. None when the text does not follow the benchmark template.
    """
    if not user_text.startswith(_USER_HEAD):
        return None
    marker = _USER_TAIL.split("{fn}", 1)[0]
    at = user_text.rfind(marker)
    if at < 0:
        return None
    fn = user_text[at + len(marker) :].split(" ", 1)[0]
    return " ".join(user_text[len(_USER_HEAD) : at].split()), fn


def render_messages(user_text: str) -> tuple[dict, ...]:
    """System + user chat messages in the benchmark's format."""
    return ({"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_text})


# --------------------------------------------------------------------------- data location

# <repo root>/../shared/data, with repo root = the folder holding src/ (parents of this file).
_REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_DATA_DIR = _REPO_ROOT.parent / "shared" / "data"
DATA_ENV_VAR = "VGROUT_DATA_DIR"


def data_dir() -> Path:
    """The reference-data folder: $VGROUT_DATA_DIR if set, else <repo>/../shared/data.

    Raises FileNotFoundError (explaining both ways to point at the data) when it is absent.
    """
    env = os.environ.get(DATA_ENV_VAR)
    path = Path(env).expanduser() if env else DEFAULT_DATA_DIR
    if not path.is_dir():
        origin = f"${DATA_ENV_VAR}={env!r}" if env else f"the default {DEFAULT_DATA_DIR}"
        raise FileNotFoundError(
            f"reference data folder not found ({origin}). Set {DATA_ENV_VAR}=/path/to/data "
            f"(the folder holding leetcode/), or place the data at {DEFAULT_DATA_DIR} "
            "(../shared/data beside the repo)."
        )
    return path


# --------------------------------------------------------------------------- row validation


def _fail(where: str, field: str, problem: str) -> ProblemDataError:
    return ProblemDataError(f"{where}: field {field!r}: {problem}; {_REBUILD_HINT}")


def _type_name(x: object) -> str:
    return type(x).__name__


def count_hint_phrases(text: str) -> int:
    return text.count(HINT_PHRASE)


def validate_row(row: object, *, where: str = "<row>", parse_tests: bool = True) -> dict:
    """Check one benchmark row against the schema; return it unchanged.

    `where` (e.g. "file.jsonl:12") prefixes every error. Invariant kept: a row that passes
    has an int id, a known difficulty, [system, user] messages whose user text equals
    `question` and holds exactly one HINT_PHRASE, >= 1 parseable assert test, a
    `Solution().fn` func_name and string setup/canonical/starter code. `parse_tests=False`
    skips parsing the tests (for callers that just generated them from a syntax tree).
    """
    if not isinstance(row, dict):
        raise ProblemDataError(f"{where}: expected a JSON object, got {_type_name(row)}")
    for key, typ in (
        ("id", int),
        ("difficulty", str),
        ("prompt", list),
        ("question", str),
        ("gt_answer", list),
        ("func_name", str),
        ("setup_code", str),
        ("canonical_solution", str),
        ("prompt_metadata", dict),
    ):
        if key not in row:
            raise _fail(where, key, "missing")
        if not isinstance(row[key], typ) or (typ is int and isinstance(row[key], bool)):
            raise _fail(where, key, f"expected {typ.__name__}, got {_type_name(row[key])}")
    if row["difficulty"] not in DIFFICULTIES:
        raise _fail(where, "difficulty", f"{row['difficulty']!r} is not one of {DIFFICULTIES}")
    msgs = row["prompt"]
    if (
        len(msgs) != 2
        or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs)
        or [m.get("role") for m in msgs] != ["system", "user"]
    ):
        raise _fail(where, "prompt", "expected [system, user] messages with string 'content'")
    user = msgs[1]["content"]
    n_phrase = count_hint_phrases(user)
    if n_phrase != 1:
        raise _fail(
            where,
            "prompt",
            f"the user message holds {n_phrase} occurrences of {HINT_PHRASE!r}; "
            "exactly one is required (it is where the mode's hint goes)",
        )
    if row["question"] != user:
        raise _fail(where, "question", "differs from the un-hinted user message in 'prompt'")
    tests = row["gt_answer"]
    if not tests:
        raise _fail(where, "gt_answer", "empty list; every problem needs tests")
    for i, t in enumerate(tests):
        if not isinstance(t, str) or not t.lstrip().startswith("assert"):
            raise _fail(where, f"gt_answer[{i}]", f"expected an 'assert ...' string, got {t!r:.80}")
        if not parse_tests:
            continue
        try:
            ast.parse(t)
        except SyntaxError as e:
            raise _fail(where, f"gt_answer[{i}]", f"not valid Python ({e.msg})") from None
    try:
        fn = method_name(row["func_name"])
    except ValueError as e:
        raise _fail(where, "func_name", str(e)) from None
    if not row["canonical_solution"].strip():
        raise _fail(where, "canonical_solution", "empty")
    starter = row["prompt_metadata"].get("starter_code")
    if not isinstance(starter, str):
        raise _fail(
            where, "prompt_metadata.starter_code", f"expected str, got {_type_name(starter)}"
        )
    if not re.search(rf"def\s+{fn}\s*\(", starter):
        raise _fail(where, "prompt_metadata.starter_code", f"does not define method {fn!r}")
    return row


def _open_text(path: Path):
    if path.name.endswith(".jsonl.gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".jsonl"):
        return open(path, encoding="utf-8")
    raise ProblemDataError(f"{path}: expected a .jsonl or .jsonl.gz file")


def iter_jsonl(path: str | Path) -> Iterable[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a .jsonl / .jsonl.gz file.

    A line that is not a JSON object raises ProblemDataError naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (expected benchmark rows as .jsonl/.jsonl.gz)"
        )
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProblemDataError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                    "each line must hold one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise ProblemDataError(
                    f"{path}:{lineno}: expected a JSON object, got {_type_name(obj)}"
                )
            yield lineno, obj


def load_rows(path: str | Path) -> list[dict]:
    """Read and validate benchmark rows from a .jsonl or .jsonl.gz file (file order kept).

    Raises ProblemDataError (file:line, field, what to do) on the first bad row, on a
    duplicated id, or when the file has no rows.
    """
    rows: list[dict] = []
    first_line: dict[int, int] = {}
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        validate_row(obj, where=where)
        pid = obj["id"]
        if pid in first_line:
            raise _fail(where, "id", f"duplicate id {pid} (first seen on line {first_line[pid]})")
        first_line[pid] = lineno
        rows.append(obj)
    if not rows:
        raise ProblemDataError(f"{path}: no rows; expected one benchmark row per line")
    return rows


def write_rows(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows as jsonl atomically (temp file in the same folder, then os.replace).

    Gzip-compresses when the name ends in .gz. Returns the number of rows written.
    """
    n = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        fh = gzip.GzipFile(fileobj=raw, mode="wb") if Path(path).name.endswith(".gz") else raw
        for row in rows:
            fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            n += 1
        if fh is not raw:
            fh.close()
    return n


# --------------------------------------------------------------------------- hints


def inject_hint(messages: Sequence[Mapping[str, Any]], mode: str) -> tuple[dict, ...]:
    """Copy of `messages` whose user message has HINT_PHRASE replaced by HINTS[mode].

    Invariant: the user message must hold exactly one HINT_PHRASE (zero or several is a
    ProblemDataError, never a silent skip); other messages are returned unchanged.
    """
    env_mode = check_mode(mode)
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if len(users) != 1:
        raise ProblemDataError(f"expected exactly one user message, found {len(users)}")
    out = tuple(dict(m) for m in messages)
    user = out[users[0]]
    n = count_hint_phrases(str(user.get("content", "")))
    if n != 1:
        raise ProblemDataError(
            f"the user message holds {n} occurrences of {HINT_PHRASE!r}; exactly one is "
            f"required to place the {env_mode!r} hint"
        )
    user["content"] = user["content"].replace(HINT_PHRASE, HINTS[env_mode])
    return out


# --------------------------------------------------------------------------- problems


def row_to_problem(row: Mapping[str, Any], mode: str, *, source: str = "") -> Problem:
    """Build the Problem for one validated row, hinted for `mode`."""
    unhinted = tuple(dict(m) for m in row["prompt"])
    return Problem(
        problem_id=int(row["id"]),
        env_mode=check_mode(mode),
        messages=inject_hint(unhinted, mode),
        messages_unhinted=unhinted,
        question=row["question"],
        gt_tests=tuple(row["gt_answer"]),
        setup_code=row["setup_code"],
        func_name=row["func_name"],
        canonical=row["canonical_solution"],
        difficulty=row["difficulty"],
        source=source,
        starter_code=row["prompt_metadata"]["starter_code"],
    )


def _starter_from_question(question: str) -> str:
    m = re.search(r"```python\n(.*?)\n {8}# Add your code here\n```", question, re.S)
    return (m.group(1) + "\n        ") if m else ""


def problem_to_row(problem: Problem) -> dict:
    """The benchmark row (schema of leetcode_test_medhard.jsonl) for a Problem, un-hinted."""
    starter = problem.starter_code or _starter_from_question(problem.question)
    return {
        "id": problem.problem_id,
        "difficulty": problem.difficulty,
        "prompt": [dict(m) for m in problem.messages_unhinted],
        "question": problem.question,
        "gt_answer": list(problem.gt_tests),
        "func_name": problem.func_name,
        "setup_code": problem.setup_code,
        "canonical_solution": problem.canonical,
        "prompt_metadata": {"starter_code": starter},
    }


def _is_builtin(data_path: str | Path | None) -> bool:
    return data_path is None or (isinstance(data_path, str) and data_path == BUILTIN)


def load_all_rows(data_path: str | Path | None) -> list[dict]:
    """Every validated benchmark row of `data_path` (None or "builtin" = the built-in set)."""
    if _is_builtin(data_path):
        from .builtin_problems import builtin_rows

        return builtin_rows()
    return load_rows(data_path)


def load_problems(
    n: int,
    env_modes: Sequence[str],
    seed: int,
    partition: Mapping[int, str] | None = None,
    data_path: str | Path | None = None,
    *,
    rows: Sequence[dict] | None = None,
    partition_source: str = "the partition",
) -> list[Problem]:
    """Load up to `n` problems, each hinted for its grading mode, in a seed-fixed order.

    `data_path=None` or "builtin" is the built-in offline set; otherwise a benchmark
    .jsonl/.jsonl.gz. `rows` = that file's rows when the caller already read them with
    `load_all_rows(data_path)` (`data_path` then only names the source). Rows are sorted by
    id, shuffled with random.Random(seed) and the first n kept (fewer if fewer exist; that
    is logged). With a `partition` {problem_id: mode} only partitioned problems are kept,
    each with its own mode (error if none is in the data); without one, modes cycle over
    `env_modes` in order. `partition_source` names the partition in the log (e.g. the teacher
    pool's partition.json), so a short set says what made it short.
    """
    if n <= 0:
        raise ValueError(f"n (number of problems) must be positive, got {n}")
    modes = [check_mode(m, where="env_modes") for m in env_modes]
    if not modes and partition is None:
        raise ValueError(f"env_modes is empty; give at least one of {', '.join(ENV_MODES)}")
    source = BUILTIN if _is_builtin(data_path) else str(data_path)
    rows = sorted(load_all_rows(data_path) if rows is None else rows, key=lambda r: r["id"])
    n_file = len(rows)
    if partition is not None:
        part = {int(k): check_mode(v, where=f"partition[{k}]") for k, v in partition.items()}
        if not part:
            raise ValueError("partition is empty; pass None to cycle env_modes instead")
        rows = [r for r in rows if r["id"] in part]
        if not rows:
            raise ProblemDataError(
                f"none of the {len(part)} partitioned problem ids is in {source}; "
                "use the data file the partition was made for"
            )
        if len(rows) < len(part):
            logger.warning(
                f"{len(part) - len(rows)} of {len(part)} partitioned problems are not in {source}"
            )
    random.Random(seed).shuffle(rows)
    if n > len(rows):
        if partition is None:
            why = f"{source} has {len(rows)}"
        else:
            why = (f"{partition_source} ({len(part)} problem ids) keeps {len(rows)} of the {n_file} "
                   f"rows of {source}")
        logger.info(f"asked for {n} problems, {why}: using all {len(rows)}")
    rows = rows[:n]
    out = []
    for i, row in enumerate(rows):
        mode = part[row["id"]] if partition is not None else modes[i % len(modes)]
        out.append(row_to_problem(row, mode, source=source))
    return out


def load_partition(path: str | Path) -> dict[int, EnvMode]:
    """Read a partition.json `{"<problem id>": "<mode>"}` into {int id: EnvMode}, validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such partition file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ProblemDataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(raw, dict) or not raw:
        raise ProblemDataError(f'{path}: expected a non-empty object {{"<problem id>": "<mode>"}}')
    out: dict[int, EnvMode] = {}
    for key, mode in raw.items():
        try:
            pid = int(key)
        except ValueError:
            raise ProblemDataError(f"{path}: key {key!r} is not an integer problem id") from None
        if not isinstance(mode, str):
            raise ProblemDataError(f"{path}: [{key}]: mode must be a string, got {mode!r}")
        if pid in out:
            raise ProblemDataError(f"{path}: problem id {pid} appears twice")
        try:
            out[pid] = check_mode(mode, where=f"{path}: [{key}]")
        except ValueError as e:
            raise ProblemDataError(str(e)) from None
    return out
