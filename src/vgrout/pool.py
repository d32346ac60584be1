"""Teacher pools: cached, already-graded rollouts mixed into each GRPO group.

A pool is a directory of `prompt_NNNN.jsonl.gz` files (NNNN = problem id), one JSON
row per cached rollout, plus an optional `partition.json` ({problem_id: env_mode}).
Row schema (the one the published Qwen3-4B pools use):

    problem_id  int       prompt       rendered chat text     prompt_ids  list[int]
    completion  str       completion_ids list[int] (Qwen vocabulary)
    reward      float     hacked bool  gt_pass bool  fmt_ok bool   env_mode str (optional)

Cached rewards and flags are reused verbatim (never re-graded in training), so a pool
is a fixed, reproducible teacher distribution.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_path
from .env.modes import EnvMode, check_mode

REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "completion": str,
    "completion_ids": list,
    "reward": (int, float),
    "hacked": bool,
    "gt_pass": bool,
    "fmt_ok": bool,
}


class PoolError(ValueError):
    """A teacher pool that cannot be used as given (the message says which file and why)."""


@dataclass
class TeacherPool:
    root: Path
    rows: dict[int, list[dict]]
    partition: dict[int, EnvMode] | None = None
    files: dict[int, Path] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return sum(len(v) for v in self.rows.values())

    def hack_rate(self) -> float:
        return sum(bool(r["hacked"]) for v in self.rows.values() for r in v) / max(1, self.n_rows)

    def restrict_modes(self, modes: Iterable[str]) -> TeacherPool:
        """Keep only problems whose partition mode is in `modes` (needs a partition)."""
        if self.partition is None:
            raise PoolError(f"{self.root}: --teacher-modes needs a partition.json in the pool directory")
        keep = set(modes)
        rows = {pid: r for pid, r in self.rows.items() if self.partition.get(pid) in keep}
        return TeacherPool(self.root, rows, self.partition, {p: self.files[p] for p in rows if p in self.files})


def pool_file_name(problem_id: int) -> str:
    return f"prompt_{problem_id:04d}.jsonl.gz"


def _problem_id_from_name(path: Path) -> int:
    stem = path.name.removeprefix("prompt_").split(".", 1)[0]
    try:
        return int(stem)
    except ValueError as e:
        raise PoolError(f"{path}: pool files must be named prompt_<problem id>.jsonl.gz") from e


def validate_row(row: object, where: str) -> dict:
    """Check one pool row has the schema's fields with the right types; return it."""
    if not isinstance(row, dict):
        raise PoolError(f"{where}: a pool row must be a JSON object, got {type(row).__name__}")
    for name, typ in REQUIRED_FIELDS.items():
        if name not in row:
            raise PoolError(f"{where}: missing field {name!r} (pool rows need {', '.join(REQUIRED_FIELDS)})")
        bad_reward = name == "reward" and isinstance(row[name], bool)
        if not isinstance(row[name], typ) or bad_reward:
            raise PoolError(f"{where}: field {name!r} has type {type(row[name]).__name__}")
    if not all(isinstance(t, int) for t in row["completion_ids"]):
        raise PoolError(f"{where}: completion_ids must be a list of ints")
    if "env_mode" in row and row["env_mode"] is not None:
        check_mode(row["env_mode"], where=f"{where}: env_mode")
    return row


def read_pool_file(path: Path) -> list[dict]:
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PoolError(f"{path}:{i}: not valid JSON ({e.msg})") from e
            rows.append(validate_row(row, f"{path}:{i}"))
    return rows


def load_partition(path: Path) -> dict[int, EnvMode]:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PoolError(f"{path}: not valid JSON ({e.msg})") from e
    if not isinstance(raw, dict):
        raise PoolError(f"{path}: a partition is a JSON object {{problem_id: env_mode}}")
    out: dict[int, EnvMode] = {}
    for k, v in raw.items():
        try:
            pid = int(k)
        except ValueError as e:
            raise PoolError(f"{path}: key {k!r} is not a problem id") from e
        out[pid] = check_mode(v, where=f"{path}: problem {k}")
    return out


def load_pool(root: Path) -> TeacherPool:
    """Load and validate every `prompt_*.jsonl.gz` under `root` (+ partition.json if present)."""
    root = Path(root)
    if not root.is_dir():
        raise PoolError(
            f"teacher pool directory {root} does not exist. Build one (`just pregen-teacher`, "
            f"`just substrate`, or `just smoke-pool` for the offline smoke pool) or drop --teacher-pool-dir."
        )
    files = sorted(root.glob("prompt_*.jsonl.gz"))
    if not files:
        raise PoolError(f"teacher pool directory {root} has no prompt_*.jsonl.gz files; build the pool first.")
    rows: dict[int, list[dict]] = {}
    by_pid: dict[int, Path] = {}
    for path in files:
        pid = _problem_id_from_name(path)
        got = read_pool_file(path)
        if got:
            rows[pid] = got
            by_pid[pid] = path
    if not rows:
        raise PoolError(f"teacher pool {root}: every prompt file is empty")
    part_path = root / "partition.json"
    partition = load_partition(part_path) if part_path.exists() else None
    return TeacherPool(root, rows, partition, by_pid)


def write_pool_file(root: Path, problem_id: int, rows: Sequence[dict]) -> Path:
    """Write one problem's rows atomically (temp file in the same dir, then rename)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(rows):
        validate_row(r, f"row {i} for problem {problem_id}")
    dest = root / pool_file_name(problem_id)
    with atomic_path(dest, suffix=".jsonl.gz") as tmp, gzip.open(tmp, "wb") as gz:
        for r in rows:
            gz.write((json.dumps(r) + "\n").encode())
    return dest


def sample_rows(rows: Sequence[dict], n: int, gen: torch.Generator) -> list[dict]:
    """n rows drawn without replacement while the cache lasts, then with replacement."""
    if n <= 0:
        return []
    idx = torch.randperm(len(rows), generator=gen)[:n].tolist()
    if len(idx) < n:
        idx += torch.randint(0, len(rows), (n - len(idx),), generator=gen).tolist()
    return [rows[i] for i in idx]


def completion_token_ids(row: dict, tok, *, pad_id: int, eos_ids: Sequence[int]) -> list[int]:
    """The row's completion as token ids for the live tokenizer.

    Cached ids are used when they decode to the cached text under `tok` (same
    vocabulary); otherwise the completion is re-tokenised from its text. Trailing
    padding is stripped and the sequence ends at its first end-of-sequence token.
    The result is memoised on the row (`_ids_live`).
    """
    if "_ids_live" in row:
        return row["_ids_live"]
    ids = list(row["completion_ids"])
    cut = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    ids = ids[: cut + 1] if cut is not None else ids
    while ids and ids[-1] == pad_id and pad_id not in eos_ids:
        ids.pop()
    try:
        same = tok.decode(ids, skip_special_tokens=True).strip() == row["completion"].strip()
    except Exception:  # ids outside this tokenizer's vocabulary
        same = False
    if not same:
        ids = tok(row["completion"], add_special_tokens=False)["input_ids"] + [eos_ids[0]]
    row["_ids_live"] = ids
    return ids
