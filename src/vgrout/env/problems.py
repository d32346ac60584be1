"""Benchmark problems: load and validate rows, inject the mode hint, partitions, the built-in set.

(Contract stub written by the lead; the env-data helper fills in loading, validation and the
built-in offline problem set. Keep `Problem`'s fields: rewards, rollout and eval rely on them.)
"""

from __future__ import annotations

from dataclasses import dataclass

from .modes import EnvMode


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
