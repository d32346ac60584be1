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
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from importlib import metadata
from pathlib import Path

import torch

from .atomic import atomic_path, write_json_atomic
from .config import Config, config_diff
from .runstate import TrainingDiverged

RESUME_FILE = "resume.pt"
CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
# 2: the arm's state under "arm" (route2's gate, route's span check) and the rollout draws under
#    "rollouts"; 1 (no "schema" key) kept them at top level ("gate", "problem_rng", "teacher_rng")
#    and in train_state ("span_checked").
RESUME_SCHEMA = "vgrout.resume/2"


def save_resume_state(run_dir: Path, state: dict) -> Path:
    """torch.save `state` (stamped with RESUME_SCHEMA) to run_dir/resume.pt atomically."""
    dest = run_dir / RESUME_FILE
    with atomic_path(dest) as tmp:
        torch.save({"schema": RESUME_SCHEMA, **state}, tmp)
    return dest


def load_resume_state(run_dir: Path) -> dict:
    """The saved state; a missing file or another schema is one clear error."""
    path = Path(run_dir) / RESUME_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the run never reached its first checkpoint (every --ckpt-every steps); "
            f"start it again instead of resuming."
        )
    state = torch.load(path, map_location="cpu", weights_only=False)
    schema = state.get("schema", "vgrout.resume/1") if isinstance(state, dict) else "unknown"
    if schema != RESUME_SCHEMA:
        raise ValueError(
            f"{path} has resume schema {schema}, this vgrout reads {RESUME_SCHEMA} (the arm's state moved under "
            "'arm'); finish the run with the vgrout commit that started it (config.json: provenance.git_commit) "
            "or start it again.")
    return state


def save_run_state(run_dir: Path, knobs: dict, parts: dict) -> None:
    """resume.pt from the adapter's trainable tensors (each module's deployed() + quarantine(): δS, δS_hack
    for the SVD knob), the RNGs and every stateful part of the run ({key: object with state_dict()}:
    optimizer, scheduler, arm, directions, rollout draws, loop state)."""
    save_resume_state(run_dir, {
        "adapter": {n: [p.detach().cpu().clone() for p in k.deployed() + k.quarantine()] for n, k in knobs.items()},
        "rng": rng_state(), **{key: part.state_dict() for key, part in parts.items()}})


def load_run_state(run_dir: Path, knobs: dict, parts: dict) -> None:
    """The inverse of `save_run_state`: adapter tensors, RNGs and each part's load_state_dict()."""
    saved = load_resume_state(run_dir)
    with torch.no_grad():
        for name, k in knobs.items():
            for p, v in zip(k.deployed() + k.quarantine(), saved["adapter"][name], strict=True):
                p.copy_(v)
    for key, part in parts.items():
        part.load_state_dict(saved[key])
    set_rng_state(saved["rng"])


def make_run_dir(cfg: Config, model_weights: str | None = None) -> Path:
    """A new run folder `<out_root>/runs/<stamp>_<run_id>[_n]`, or the `--resume` folder once its
    saved config, model weights (`model_weights`: model.weights_digest of the folder the run will
    load) and resume schema are checked (no folder is made on error)."""
    if cfg.resume is not None:
        run_dir = Path(cfg.resume)
        cfg_path = run_dir / CONFIG_FILE
        if not cfg_path.exists():
            raise FileNotFoundError(f"--resume {run_dir}: {cfg_path} not found (not a vgrout run folder?)")
        saved = json.loads(cfg_path.read_text())
        diff = config_diff(saved["config"], cfg.to_dict())
        if diff:
            raise ValueError(
                f"--resume {run_dir}: the config differs from the run's saved config; resume with the same "
                f"preset and flags. Differences (saved -> now):\n  " + "\n  ".join(diff))
        had = saved.get("provenance", {}).get("model_weights")
        if had is not None and had != model_weights:
            raise ValueError(
                f"--resume {run_dir}: {CONFIG_FILE} provenance.model_weights is {had} but the model folder "
                f"{cfg.model!r} resolves to now has weights {model_weights}: resuming would continue training "
                f"another model; point --model at the weights the run started with, or start a new run")
        load_resume_state(run_dir)  # a missing resume.pt or another schema fails here, before the model loads
        return run_dir
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    run_dir = cfg.out_root / "runs" / f"{stamp}_{cfg.run_id}"
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = cfg.out_root / "runs" / f"{stamp}_{cfg.run_id}_{n}"
    run_dir.mkdir(parents=True)
    return run_dir


def write_start(run_dir: Path, cfg: Config, prov: dict) -> None:
    """config.json (every knob + `prov`, this process's provenance) for a new run,
    resume_<stamp>.json for a resumed one; status `running`."""
    if cfg.resume is None:
        write_json_atomic(run_dir / CONFIG_FILE, {
            "config": cfg.to_dict(), "provenance": prov, "run_id": cfg.run_id, "preset": cfg.preset_name,
            "arm": cfg.arm, "seed": cfg.seed, "started": datetime.now().isoformat(timespec="seconds")})
    else:
        write_json_atomic(run_dir / f"resume_{datetime.now():%Y%m%dT%H%M%S}.json", {"provenance": prov})
    write_status(run_dir, "running", -1, cfg.steps)


def write_status(run_dir: Path, state: str, step: int, steps: int, error: str | None = None) -> None:
    """status.json: running / paused / complete / failed / diverged / killed, and the last finished step."""
    write_json_atomic(run_dir / STATUS_FILE, {
        "state": state, "step": step, "steps": steps,
        "updated": datetime.now().isoformat(timespec="seconds"), "error": error})


def mark_ended(run_dir: Path, state: str, steps: int, error: str) -> None:
    """Record an abnormal end, keeping the last finished step from the running status."""
    try:
        step = json.loads((run_dir / STATUS_FILE).read_text())["step"]
    except (OSError, ValueError, KeyError):
        step = -1
    write_status(run_dir, state, step, steps, error)


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


def provenance(model_weights: str | None = None) -> dict:
    """The exact command, git commit, Python/platform and package versions of this process, and
    `model_weights` (model.weights_digest of a local model folder; results groups runs by it) when
    given. Two builds of one recipe can differ in float rounding, so the digest, not the name, says
    which model a run trained."""
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
        "torch_threads": torch.get_num_threads(),  # wall times depend on it (sweep --local --parallel sets it)
    } | ({"model_weights": model_weights} if model_weights is not None else {})


class Terminated(Exception):
    """SIGTERM arrived (a queue or scheduler stopped the run)."""


def run_recorded(run_dir: Path, steps: int, body: Callable[[], int]) -> int:
    """`body()` with SIGTERM raised as `Terminated`; an abnormal end is written to status.json before
    returning: diverged (exit 3), killed by SIGTERM or ^C (exit 143, resumable), failed (re-raised)."""
    from loguru import logger

    def on_sigterm(signum, frame):  # pueue kill / scancel / timeout: record it, then stop
        raise Terminated(f"signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return body()
    except TrainingDiverged as e:
        mark_ended(run_dir, "diverged", steps, str(e))
        logger.error(str(e))
        return 3
    except (Terminated, KeyboardInterrupt) as e:
        mark_ended(run_dir, "killed", steps, f"{type(e).__name__}: {e}")
        logger.error(f"stopped by {type(e).__name__}; resume with --resume {run_dir}")
        return 143
    except BaseException as e:
        mark_ended(run_dir, "failed", steps, f"{type(e).__name__}: {e}")
        raise
    finally:
        signal.signal(signal.SIGTERM, old_handler)
