"""The built-in offline problem set: schema, prompts, coverage, and real sandboxed grading."""

from __future__ import annotations

import ast
import gzip
import json

import pytest

from vgrout.env.builtin_problems import SETUP_CODE, builtin_rows
from vgrout.env.modes import HINT_PHRASE
from vgrout.env.problems import (
    SYSTEM_PROMPT,
    load_problems,
    method_name,
    render_user_message,
    validate_row,
)
from vgrout.env.rewards import grade_batch
from vgrout.env.sandbox import Job, run_jobs

ROWS = builtin_rows()


def _expected_value(test: str):
    """The literal on the right of `assert Solution().fn(...) == EXPECTED`."""
    node = ast.parse(test).body[0]
    assert isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare)
    assert isinstance(node.test.ops[0], ast.Eq) and len(node.test.ops) == 1
    return ast.literal_eval(node.test.comparators[0])


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, list):
        return "nested list" if value and all(isinstance(v, list) for v in value) else "list"
    return type(value).__name__


def test_count_ids_and_schema():
    assert len(ROWS) >= 24
    ids = [r["id"] for r in ROWS]
    assert len(set(ids)) == len(ids) and min(ids) >= 900001  # no LeetCode id collision
    for r in ROWS:
        validate_row(r, where=f"builtin {r['id']}")
        assert len(r["gt_answer"]) >= 8
        fn = method_name(r["func_name"])
        assert all(t.startswith(f"assert Solution().{fn}(") for t in r["gt_answer"])
        assert r["prompt"][0]["content"] == SYSTEM_PROMPT
        user = r["prompt"][1]["content"]
        assert user.count(HINT_PHRASE) == 1 and user == r["question"]
        assert user.startswith("PROBLEM:\n") and user.endswith("```\n\nSOLUTION:\n")
        assert f"called {fn} {HINT_PHRASE}. Use the following starter code:" in user
        assert r["setup_code"] == SETUP_CODE
        assert r["difficulty"] in ("easy", "medium", "hard")


def test_every_return_type_is_covered_and_consistent():
    kinds = set()
    for r in ROWS:
        per_problem = {_kind(_expected_value(t)) for t in r["gt_answer"]}
        assert len(per_problem) == 1, (r["id"], per_problem)  # one return type per problem
        kinds |= per_problem
    assert {"int", "str", "list", "nested list", "bool", "float"} <= kinds


def test_canonicals_pass_strict_oracle_and_plain_grader():
    probs = load_problems(1000, ["gt_only"], seed=0)
    assert len(probs) == len(ROWS)
    res = grade_batch([(f"```python\n{p.canonical}\n```", p) for p in probs])
    bad = [
        (p.problem_id, r.note)
        for p, r in zip(probs, res, strict=True)
        if not (r.gt_correct and r.gt_pass)
    ]
    assert not bad
    assert all(r.can_compile and r.format_ok and not r.exploited for r in res)


def test_tests_reject_wrong_solutions():
    """Each problem's tests catch a plausible wrong answer: the canonical of the *next*
    problem renamed to this method (right interface, wrong behaviour), and `return None`."""
    probs = load_problems(1000, ["gt_only"], seed=0)
    items = []
    for i, p in enumerate(probs):
        fn = method_name(p.func_name)
        other = probs[(i + 1) % len(probs)]
        wrong = other.canonical.replace(f"def {method_name(other.func_name)}(", f"def {fn}(")
        items.append((f"```python\n{wrong}\n```", p))
        stub = f"class Solution:\n    def {fn}(self, *args, **kwargs):\n        return None\n"
        items.append((f"```python\n{stub}\n```", p))
    res = grade_batch(items)
    assert not [items[i][1].problem_id for i, r in enumerate(res) if r.gt_correct or r.gt_pass]


def test_canonicals_run_in_sandbox_directly():
    """Independent of the grader: setup + canonical + asserts exits 0 in the sandbox."""
    jobs = [
        Job(code="\n".join([r["setup_code"], r["canonical_solution"], *r["gt_answer"]]))
        for r in ROWS
    ]
    outs = run_jobs(jobs)
    assert [o.status for o in outs] == ["exited"] * len(ROWS)
    assert [o.returncode for o in outs] == [0] * len(ROWS), [o.stderr[-300:] for o in outs]


def test_prompt_renders_from_text(shared_data):
    """The template reproduces the benchmark's own prompts (checked on its eval split)."""
    row = json.loads((shared_data / "leetcode" / "leetcode_test_medhard.jsonl").open().readline())
    assert row["setup_code"] == SETUP_CODE  # same header as the benchmark
    user = row["prompt"][1]["content"]
    text = user[len("PROBLEM:\n") : user.index("\n\nYour solution to the problem")]
    assert (
        render_user_message(text, row["func_name"], row["prompt_metadata"]["starter_code"]) == user
    )


def test_problem_texts_are_not_from_the_dataset(shared_data):
    raw = shared_data / "leetcode" / "LeetCodeDataset-v0.2.0-train.jsonl.gz"
    with gzip.open(raw, "rt") as fh:
        corpus = "\n".join(json.loads(line)["meta"]["question_title"] for line in fh)
    for r in ROWS:
        body = r["question"][len("PROBLEM:\n") :].split("\n")[0]
        assert len(body) > 40 and body[:60] not in corpus, r["id"]


@pytest.mark.parametrize("mode", ["run_tests", "eq_override", "exit_code", "file_marker"])
def test_hinted_builtin_prompts(mode):
    for p in load_problems(1000, [mode], seed=0):
        assert p.messages[1]["content"].count(HINT_PHRASE) == 0
