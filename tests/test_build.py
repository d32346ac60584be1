"""The data build: raw LeetCodeDataset rows -> benchmark rows, with real sandboxed grading."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vgrout.env.build import (
    RowDropped,
    build,
    convert_raw_file,
    convert_tests,
    main,
    parse_raw_row,
)
from vgrout.env.builtin_problems import SETUP_CODE
from vgrout.env.modes import HINT_PHRASE
from vgrout.env.problems import ProblemDataError, load_rows

REPO = Path(__file__).resolve().parents[1]

GOOD = "class Solution:\n    def addUp(self, a: int, b: int) -> int:\n        return a + b\n"
WRONG = "class Solution:\n    def addUp(self, a: int, b: int) -> int:\n        return a - b\n"
TEST = "def check(candidate):\n    assert candidate(a = 1, b = 2) == 3\n    assert candidate(a = 5, b = 0) == 5\n"


def _raw_v020(qid: int, *, difficulty="Medium", completion=GOOD, test=TEST, **over) -> dict:
    row = {
        "task_id": f"t{qid}",
        "prompt": SETUP_CODE,
        "completion": completion,
        "entry_point": "Solution().addUp",
        "test": test,
        "meta": {
            "question_id": qid,
            "difficulty": difficulty,
            "question_title": f"Add two integers (variant {qid}).\n\nExample 1:\nInput: a = 1, b = 2\nOutput: 3",
            "lang_code": "class Solution:\n    def addUp(self, a: int, b: int) -> int:",
        },
    }
    row.update(over)
    return row


def _raw_v031(qid: int) -> dict:
    return {
        "task_id": f"t{qid}",
        "question_id": qid,
        "difficulty": "Hard",
        "problem_description": "Add two integers a and b.",
        "starter_code": "class Solution:\n    def addUp(self, a: int, b: int) -> int:\n        ",
        "prompt": SETUP_CODE,
        "completion": GOOD,
        "entry_point": "Solution().addUp",
        "test": TEST,
    }


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- test conversion


def test_convert_simple_multiline_unicode_and_node_checks():
    src = (
        "def check(candidate):\n"
        '    assert candidate(s = "héllo wörld", k = 2) == "é"\n'
        "    assert candidate(grid = [\n        [1, 2],\n        [3, 4]\n    ]) == [\n        4\n    ]\n"
        "    assert is_same_list(candidate(head = list_node([1, 2])), list_node([2, 1]))\n"
    )
    out, problems = convert_tests(src, "f")
    assert problems == []
    assert out == [
        'assert Solution().f(s = "héllo wörld", k = 2) == "é"',
        "assert Solution().f(grid=[[1, 2], [3, 4]]) == [4]",
        "assert is_same_list(Solution().f(head = list_node([1, 2])), list_node([2, 1]))",
    ]


def test_convert_rejects_other_shapes():
    src = (
        "def check(candidate):\n"
        "    x = 3\n"
        "    assert candidate(a = 1) != 2\n"
        "    assert candidate(a = 1) == candidate(a = 2)\n"
        "    assert candidate(a = 1) == 2, 'message'\n"
        "    assert sorted(candidate(a = 1)) == [1]\n"
        "    assert candidate(a = 1) == 1\n"
    )
    out, problems = convert_tests(src, "f")
    assert out == ["assert Solution().f(a = 1) == 1"]
    assert len(problems) == 5 and problems[0] == "x = 3"
    with pytest.raises(RowDropped, match="not valid Python"):
        convert_tests("def check(candidate):\n    assert candidate(", "f")
    with pytest.raises(RowDropped, match="no `def check"):
        convert_tests("assert 1 == 1\n", "f")


# --------------------------------------------------------------------------- raw rows


def test_parse_both_schemas(tmp_path):
    a = parse_raw_row(_raw_v020(1), "f:1")
    b = parse_raw_row(_raw_v031(2), "f:2")
    assert (a.question_id, a.difficulty, b.question_id, b.difficulty) == (1, "medium", 2, "hard")
    assert a.starter.startswith("class Solution") and b.text == "Add two integers a and b."


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r["meta"].pop("question_id"), "meta.question_id"),
        (lambda r: r.pop("test"), "test"),
        (lambda r: r.update(completion=5), "completion"),
        (lambda r: r.pop("meta"), "meta"),
    ],
)
def test_raw_missing_field_names_file_line_field(tmp_path, mutate, field):
    rows = [_raw_v020(1), _raw_v020(2)]
    mutate(rows[1])
    p = _write(tmp_path / "raw.jsonl", rows)
    with pytest.raises(ProblemDataError, match=r"raw\.jsonl:2: ") as e:
        convert_raw_file(p)
    assert field.split(".")[0] in str(e.value)


def test_raw_malformed_line(tmp_path):
    p = tmp_path / "raw.jsonl"
    p.write_text(json.dumps(_raw_v020(1)) + "\n{not json\n")
    with pytest.raises(ProblemDataError, match=r"raw\.jsonl:2: malformed JSON"):
        convert_raw_file(p)
    assert main(["--in", str(p), "--out", str(tmp_path / "o.jsonl")]) == 1
    assert not (tmp_path / "o.jsonl").exists()


def test_filter_limit_and_drop_reasons(tmp_path):
    rows = [
        _raw_v020(1, difficulty="Easy"),
        _raw_v020(2),
        _raw_v020(3, difficulty="Hard"),
        _raw_v020(2),  # duplicate id
        _raw_v020(4, entry_point="addUp"),
        _raw_v020(
            5,
            test="def check(candidate):\n    for i in range(3):\n        assert candidate(a=i, b=0) == i\n",
        ),
        _raw_v020(6, meta={**_raw_v020(6)["meta"], "question_title": f"It {HINT_PHRASE}."}),
    ]
    p = _write(tmp_path / "raw.jsonl", rows)
    out, rep = convert_raw_file(p)
    assert [r["id"] for r in out] == [2, 3]
    assert rep.read == 7 and rep.selected == 6
    assert rep.dropped == {
        "duplicate question id": 1,
        "entry point is not Solution().fn": 1,
        "non-convertible test (not `assert candidate(ARGS) == OUT` or is_same_*)": 1,
        "problem text contains the hint phrase": 1,
    }
    assert rep.bad_tests == 1
    out, rep = convert_raw_file(p, difficulties=["hard"])
    assert [r["id"] for r in out] == [3]
    out, rep = convert_raw_file(p, limit=1)
    assert [r["id"] for r in out] == [2] and rep.selected == 1
    with pytest.raises(ValueError, match="choose from"):
        convert_raw_file(p, difficulties=["extreme"])


def test_build_end_to_end_small(tmp_path):
    rows = [
        _raw_v020(10),
        _raw_v020(11, completion=WRONG),
        _raw_v031(12),
        _raw_v020(13, difficulty="Easy"),
    ]
    raw = _write(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "out" / "rows.jsonl"
    rep = build(raw, out, workers=2, progress=False)
    assert rep.kept == 2 and rep.selected == 3
    assert rep.dropped == {"canonical solution fails its tests": 1}
    got = load_rows(out)  # validates every written row
    assert [r["id"] for r in got] == [10, 12]
    assert got[0]["gt_answer"] == [
        "assert Solution().addUp(a = 1, b = 2) == 3",
        "assert Solution().addUp(a = 5, b = 0) == 5",
    ]
    assert got[1]["prompt_metadata"]["starter_code"].endswith("-> int:\n        ")
    assert [p.name for p in out.parent.iterdir()] == ["rows.jsonl"]  # atomic: no temp left
    # nothing survives -> error, and no file is written
    with pytest.raises(ProblemDataError, match="no row survived"):
        build(_write(tmp_path / "bad.jsonl", [rows[1]]), tmp_path / "none.jsonl", progress=False)
    assert not (tmp_path / "none.jsonl").exists()


def test_cli_runs_as_module(tmp_path):
    raw = _write(tmp_path / "raw.jsonl", [_raw_v020(1), _raw_v020(2, completion=WRONG)])
    out = tmp_path / "o.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vgrout.env.build",
            "--in",
            str(raw),
            "--out",
            str(out),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "kept 1" in proc.stdout and "canonical solution fails its tests" in proc.stdout
    assert [r["id"] for r in load_rows(out)] == [1]
    assert main(["--in", str(raw), "--out", str(out), "--limit", "0"]) == 2


# --------------------------------------------------------------------------- hub


def _run_from_hub(
    tmp_path: Path, endpoint: str, timeout: float
) -> tuple[subprocess.CompletedProcess, float]:
    env = {"PATH": "/usr/bin:/bin", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vgrout.env.build",
            "--from-hub",
            "--out",
            str(tmp_path / "o.jsonl"),
            "--hub-timeout",
            str(timeout),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )
    return proc, time.monotonic() - t0


def test_from_hub_unreachable_fails_fast(tmp_path):
    # a closed local port: what "no hub" looks like, deterministically, with or without network
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, wall = _run_from_hub(tmp_path, f"http://127.0.0.1:{port}", 20)
    assert proc.returncode == 1 and wall < 15
    assert "newfacade/LeetCodeDataset" in proc.stderr and "unreachable" in proc.stderr
    assert "--in PATH" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_from_hub_silent_server_times_out(tmp_path):
    # a server that accepts connections and never answers: the download must not hang
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        proc, wall = _run_from_hub(tmp_path, f"http://127.0.0.1:{srv.getsockname()[1]}", 2)
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()
    assert proc.returncode == 1 and wall < 20
    assert "no answer within 2 s" in proc.stderr or "Timeout" in proc.stderr


# --------------------------------------------------------------------------- real data


def test_v031_reproduces_benchmark_prompts(shared_data):
    """Converting the raw v0.3.1 test split reproduces the benchmark's eval rows' prompts,
    setup and canonical code exactly, for all 119 of its problems."""
    lc = shared_data / "leetcode"
    rows, _ = convert_raw_file(lc / "LeetCodeDataset-v0.3.1-test.jsonl.gz")
    ours = {r["id"]: r for r in rows}
    bench = load_rows(lc / "leetcode_test_medhard.jsonl")
    for b in bench:
        o = ours[b["id"]]
        for key in (
            "prompt",
            "question",
            "func_name",
            "setup_code",
            "canonical_solution",
            "prompt_metadata",
            "difficulty",
        ):
            assert o[key] == b[key], (b["id"], key)


def test_v020_train_conversion_counts(shared_data):
    rows, rep = convert_raw_file(shared_data / "leetcode" / "LeetCodeDataset-v0.2.0-train.jsonl.gz")
    assert rep.read == 1890 and rep.selected == 1375
    assert len(rows) == 1375 and not rep.dropped


def test_v020_train_build_limited(shared_data, tmp_path):
    raw = shared_data / "leetcode" / "LeetCodeDataset-v0.2.0-train.jsonl.gz"
    rep = build(raw, tmp_path / "train.jsonl", limit=60, progress=False)
    assert rep.selected == 60 and rep.kept + sum(rep.dropped.values()) == 60
    assert rep.kept >= 55
    assert len(load_rows(tmp_path / "train.jsonl")) == rep.kept


@pytest.mark.slow
def test_v020_train_full_build(shared_data, tmp_path):
    """The whole medium+hard v0.2.0-train build (about a minute on 2 cores)."""
    raw = shared_data / "leetcode" / "LeetCodeDataset-v0.2.0-train.jsonl.gz"
    rep = build(raw, tmp_path / "train.jsonl", progress=False)
    assert rep.selected == 1375
    assert rep.kept + sum(rep.dropped.values()) == 1375
    assert rep.kept >= 1300  # measured: 1362 (the 13 drops import modules the sandbox lacks)
    assert len(load_rows(tmp_path / "train.jsonl")) == rep.kept
