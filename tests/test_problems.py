"""Loading, validating and hinting benchmark rows; partitions; bad input fails loudly."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest

from vgrout.env.builtin_problems import builtin_rows
from vgrout.env.modes import ENV_MODES, HINT_PHRASE, HINTS
from vgrout.env.problems import (
    DEFAULT_DATA_DIR,
    SYSTEM_PROMPT,
    ProblemDataError,
    data_dir,
    inject_hint,
    load_partition,
    load_problems,
    load_rows,
    problem_to_row,
    validate_row,
    write_rows,
)


def _write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Rows as jsonl; raw_lines {index: text} replaces those lines verbatim."""
    lines = [json.dumps(r) for r in rows]
    for i, text in (raw_lines or {}).items():
        lines[i] = text
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def rows() -> list[dict]:
    return builtin_rows()[:4]


# --------------------------------------------------------------------------- data_dir


def test_data_dir_env_var_and_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("VGROUT_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.setenv("VGROUT_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="VGROUT_DATA_DIR") as e:
        data_dir()
    assert "nope" in str(e.value) and str(DEFAULT_DATA_DIR) in str(e.value)
    assert DEFAULT_DATA_DIR.parts[-2:] == ("shared", "data")


# --------------------------------------------------------------------------- load_rows


def test_roundtrip_jsonl_and_gz(tmp_path, rows):
    for name in ("r.jsonl", "r.jsonl.gz"):
        assert write_rows(tmp_path / name, rows) == len(rows)
        assert load_rows(tmp_path / name) == rows
    with gzip.open(tmp_path / "r.jsonl.gz", "rt") as fh:  # really gzip
        assert json.loads(fh.readline())["id"] == rows[0]["id"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_malformed_json_line_names_file_and_line(tmp_path, rows):
    p = _write_jsonl(tmp_path / "bad.jsonl", rows, {2: '{"id": 5, "difficulty": '})
    with pytest.raises(ProblemDataError, match=r"bad\.jsonl:3: malformed JSON"):
        load_rows(p)
    p = _write_jsonl(tmp_path / "arr.jsonl", rows, {1: "[1, 2]"})
    with pytest.raises(ProblemDataError, match=r"arr\.jsonl:2: expected a JSON object"):
        load_rows(p)


@pytest.mark.parametrize(
    "field",
    [
        "id",
        "difficulty",
        "prompt",
        "question",
        "gt_answer",
        "func_name",
        "setup_code",
        "canonical_solution",
        "prompt_metadata",
    ],
)
def test_missing_field_names_file_line_field(tmp_path, rows, field):
    del rows[1][field]
    p = _write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(ProblemDataError, match=rf"m\.jsonl:2: field '{field}': missing"):
        load_rows(p)


@pytest.mark.parametrize(
    ("field", "value", "msg"),
    [
        ("id", "7", "expected int, got str"),
        ("id", True, "expected int, got bool"),
        ("difficulty", "tricky", "is not one of"),
        ("gt_answer", [], "empty list"),
        ("gt_answer", "assert 1", "expected list, got str"),
        ("func_name", "twoSum", "not of the form"),
        ("canonical_solution", "  ", "empty"),
        ("prompt", [{"role": "user", "content": "x"}], r"\[system, user\]"),
    ],
)
def test_ill_typed_fields(tmp_path, rows, field, value, msg):
    rows[0][field] = value
    p = _write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(ProblemDataError, match=rf"t\.jsonl:1: field '{field}'.*{msg}"):
        load_rows(p)


def test_bad_gt_test_and_starter(tmp_path, rows):
    rows[0]["gt_answer"] = rows[0]["gt_answer"] + ["assert Solution().f(1 == 2"]
    bad = _write_jsonl(tmp_path / "g.jsonl", rows)
    with pytest.raises(ProblemDataError, match=r"g\.jsonl:1: field 'gt_answer\[\d+\]': not valid"):
        load_rows(bad)
    rows = builtin_rows()[:2]
    rows[1]["prompt_metadata"] = {"starter_code": "class Solution:\n    def other(self):"}
    with pytest.raises(ProblemDataError, match=r"2: field 'prompt_metadata.starter_code'"):
        load_rows(_write_jsonl(tmp_path / "s.jsonl", rows))


@pytest.mark.parametrize("n_phrase", [0, 2])
def test_zero_or_two_hint_phrases_in_row(tmp_path, rows, n_phrase):
    user = rows[2]["prompt"][1]["content"]
    user = (
        user.replace(HINT_PHRASE, "and is graded")
        if n_phrase == 0
        else (user.replace("PROBLEM:\n", f"PROBLEM:\nIt {HINT_PHRASE}.\n"))
    )
    rows[2]["prompt"][1]["content"] = rows[2]["question"] = user
    p = _write_jsonl(tmp_path / "h.jsonl", rows)
    with pytest.raises(ProblemDataError, match=rf"h\.jsonl:3: field 'prompt'.* {n_phrase} occ"):
        load_rows(p)


def test_question_must_match_user_message_and_ids_unique(tmp_path, rows):
    rows[0]["question"] += " "
    with pytest.raises(ProblemDataError, match=r"q\.jsonl:1: field 'question'"):
        load_rows(_write_jsonl(tmp_path / "q.jsonl", rows))
    rows = builtin_rows()[:3]
    rows[2]["id"] = rows[0]["id"]
    with pytest.raises(ProblemDataError, match=r"d\.jsonl:3: field 'id': duplicate .* line 1"):
        load_rows(_write_jsonl(tmp_path / "d.jsonl", rows))


def test_empty_missing_and_wrong_suffix(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ProblemDataError, match="no rows"):
        load_rows(tmp_path / "e.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ProblemDataError, match=r"\.jsonl or \.jsonl\.gz"):
        load_rows(tmp_path / "x.json")


# --------------------------------------------------------------------------- hints


def test_inject_hint_every_mode(rows):
    msgs = rows[0]["prompt"]
    before = copy.deepcopy(msgs)
    for mode in ENV_MODES:
        out = inject_hint(msgs, mode)
        assert out[0] == msgs[0]
        want = msgs[1]["content"].replace(HINT_PHRASE, HINTS[mode])
        assert out[1]["content"] == want
        assert out[1]["content"].count(HINTS[mode]) == 1
        if mode != "gt_only":
            assert HINT_PHRASE not in out[1]["content"]
    assert msgs == before  # input untouched
    assert "calling a function called run_tests()" in inject_hint(msgs, "run_tests")[1]["content"]


def test_inject_hint_errors(rows):
    msgs = rows[0]["prompt"]
    with pytest.raises(ValueError, match="unknown grading mode 'nope'"):
        inject_hint(msgs, "nope")
    none = [msgs[0], {"role": "user", "content": "solve it"}]
    with pytest.raises(ProblemDataError, match="0 occurrences"):
        inject_hint(none, "run_tests")
    two = [msgs[0], {"role": "user", "content": f"x {HINT_PHRASE} y {HINT_PHRASE}"}]
    with pytest.raises(ProblemDataError, match="2 occurrences"):
        inject_hint(two, "gt_only")
    with pytest.raises(ProblemDataError, match="exactly one user message"):
        inject_hint([msgs[0]], "run_tests")


# --------------------------------------------------------------------------- load_problems


def test_load_problems_builtin_deterministic_and_cycling():
    a = load_problems(10, ["run_tests", "sentinel", "gt_only"], seed=3)
    b = load_problems(10, ["run_tests", "sentinel", "gt_only"], seed=3, data_path="builtin")
    c = load_problems(10, ["run_tests", "sentinel", "gt_only"], seed=4)
    assert a == b and len(a) == 10
    assert [p.problem_id for p in a] != [p.problem_id for p in c]
    assert [p.env_mode for p in a] == (["run_tests", "sentinel", "gt_only"] * 4)[:10]
    for p in a:
        assert p.source == "builtin" and p.func_name.startswith("Solution().")
        assert p.messages[0]["content"] == SYSTEM_PROMPT
        assert p.messages_unhinted[1]["content"] == p.question
        assert p.messages[1]["content"] == p.question.replace(HINT_PHRASE, HINTS[p.env_mode])
        assert len(p.gt_tests) >= 8 and "class Solution" in p.canonical


def test_load_problems_more_than_available_takes_all():
    everything = load_problems(10_000, ["eq_override"], seed=0)
    assert len(everything) == len(builtin_rows())
    assert len({p.problem_id for p in everything}) == len(everything)
    assert {p.env_mode for p in everything} == {"eq_override"}


def test_load_problems_partition_keeps_only_partitioned():
    ids = [r["id"] for r in builtin_rows()]
    part = {ids[0]: "file_marker", ids[5]: "sentinel", ids[9]: "run_tests", 123456789: "exit_code"}
    probs = load_problems(100, ["gt_only"], seed=1, partition=part)
    assert sorted(p.problem_id for p in probs) == sorted([ids[0], ids[5], ids[9]])
    assert all(p.env_mode == part[p.problem_id] for p in probs)
    assert (
        HINTS["sentinel"] in next(p for p in probs if p.problem_id == ids[5]).messages[1]["content"]
    )
    assert len(load_problems(2, ["gt_only"], seed=1, partition=part)) == 2
    with pytest.raises(ProblemDataError, match="none of the 1 partitioned"):
        load_problems(5, ["gt_only"], seed=0, partition={1: "run_tests"})


def test_short_problem_set_names_what_limited_it():
    """'asked for 200, <file> has 20' was printed when a partition, not the file, kept 20."""
    from loguru import logger

    rows = builtin_rows()
    ids = [r["id"] for r in rows]
    msgs: list[str] = []
    sink = logger.add(lambda m: msgs.append(str(m).strip()), level="INFO", format="{message}")
    try:
        part = {ids[0]: "sentinel", ids[3]: "run_tests", 999_999: "exit_code"}
        load_problems(200, ["gt_only"], seed=0, partition=part, partition_source="pool/partition.json")
        load_problems(200, ["gt_only"], seed=0)
    finally:
        logger.remove(sink)
    assert msgs == [
        "1 of 3 partitioned problems are not in builtin",
        f"asked for 200 problems, pool/partition.json (3 problem ids) keeps 2 of the {len(rows)} rows of "
        "builtin: using all 2",
        f"asked for 200 problems, builtin has {len(rows)}: using all {len(rows)}",
    ]


def test_load_problems_bad_modes_and_n(tmp_path):
    with pytest.raises(ValueError, match="env_modes: unknown grading mode 'hack_all'"):
        load_problems(3, ["run_tests", "hack_all"], seed=0)
    first = builtin_rows()[0]["id"]
    with pytest.raises(ValueError, match=rf"partition\[{first}\]: unknown grading mode 'x'"):
        load_problems(3, ["run_tests"], seed=0, partition={first: "x"})
    with pytest.raises(ValueError, match="must be positive"):
        load_problems(0, ["run_tests"], seed=0)
    with pytest.raises(ValueError, match="env_modes is empty"):
        load_problems(3, [], seed=0)
    with pytest.raises(FileNotFoundError):
        load_problems(3, ["run_tests"], seed=0, data_path=tmp_path / "missing.jsonl")


def test_load_problems_from_file_and_problem_to_row(tmp_path):
    rows = builtin_rows()
    path = tmp_path / "rows.jsonl"
    write_rows(path, rows)
    probs = load_problems(len(rows), ["stdout_marker"], seed=7, data_path=path)
    assert {p.source for p in probs} == {str(path)}
    by_id = {r["id"]: r for r in rows}
    for p in probs:
        back = problem_to_row(p)
        validate_row(back)
        want = {k: v for k, v in by_id[p.problem_id].items() if k in back}
        assert back == want
    # a Problem made without starter_code recovers it from the question text
    from dataclasses import replace

    back = problem_to_row(replace(probs[0], starter_code=""))
    assert back["prompt_metadata"] == by_id[probs[0].problem_id]["prompt_metadata"]


# --------------------------------------------------------------------------- partitions


def test_load_partition_shared_substrate(shared_data):
    part = load_partition(shared_data / "vgrout_pub/pools/substrate/partition.json")
    assert len(part) == 24
    assert set(part.values()) == {"file_marker", "sentinel", "run_tests", "stdout_marker"}
    assert all(isinstance(k, int) for k in part)


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ('{"4": "file_marker", "5": "nope"}', r"\[5\]: unknown grading mode 'nope'"),
        ('{"four": "file_marker"}', "key 'four' is not an integer"),
        ('{"4": "sentinel", "04": "sentinel"}', "id 4 appears twice"),
        ('{"4": 3}', "mode must be a string"),
        ('["run_tests"]', "expected a non-empty object"),
        ("{}", "expected a non-empty object"),
        ('{"4": "sentinel",', "malformed JSON"),
    ],
)
def test_load_partition_bad(tmp_path, text, msg):
    p = tmp_path / "partition.json"
    p.write_text(text)
    with pytest.raises(ProblemDataError, match=msg) as e:
        load_partition(p)
    assert str(p) in str(e.value)


# --------------------------------------------------------------------------- real data


def test_benchmark_eval_split_loads(shared_data):
    path = shared_data / "leetcode" / "leetcode_test_medhard.jsonl"
    rows = load_rows(path)
    assert len(rows) == 119
    assert {r["difficulty"] for r in rows} == {"medium", "hard"}
    probs = load_problems(1000, ["run_tests", "file_marker"], seed=0, data_path=path)
    assert len(probs) == 119
    rt = [p for p in probs if p.env_mode == "run_tests"]
    assert rt and all(HINTS["run_tests"] in p.messages[1]["content"] for p in rt)
