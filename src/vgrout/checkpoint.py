"""Run state on disk: atomic writes, resume state, and the run folder's bookkeeping.

A run folder holds `resume.pt` (everything a resume needs: knobs, optimizer,
scheduler, RNG states, route2 EMA state, directions, rows so far), deploy adapters
(`adapter_*.safetensors`, δS only), and append-only `rows.jsonl` / `rollouts.jsonl`.
Every file write goes through a temp file in the same directory and `os.replace`,
so a run killed at any instant leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

from .atomic import atomic_path

RESUME_FILE = "resume.pt"
CONFIG_FILE = "config.json"


def save_resume_state(run_dir: Path, state: dict) -> Path:
    """torch.save `state` to run_dir/resume.pt atomically."""
    dest = run_dir / RESUME_FILE
    with atomic_path(dest) as tmp:
        torch.save(state, tmp)
    return dest


def load_resume_state(run_dir: Path) -> dict:
    path = Path(run_dir) / RESUME_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the run never reached its first checkpoint (every --ckpt-every steps); "
            f"start it again instead of resuming."
        )
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Append records and fsync, so a kill loses at most the line being written."""
    if not records:
        return
    with open(path, "a", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Read a jsonl file, ignoring a torn last line (a kill mid-write)."""
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return out


def truncate_jsonl(path: Path, keep: Callable[[dict], bool]) -> int:
    """Rewrite `path` keeping only records where keep(r); returns how many were kept."""
    recs = [r for r in read_jsonl(path) if keep(r)]
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in recs:
                fh.write(json.dumps(r, default=str) + "\n")
    return len(recs)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).resolve().parent)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def provenance() -> dict:
    """The exact command, git commit, Python/platform and package versions of this process."""
    pkgs = {}
    for name in ("torch", "transformers", "safetensors", "tyro", "vgrout", "flash-attn", "vllm"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "argv": sys.argv,
        "command": " ".join(getattr(sys, "orig_argv", sys.argv)),
        "cwd": os.getcwd(),
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": pkgs,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
