"""Trainer side of the fork-server sandbox: a pool of pre-started worker interpreters.

Each worker is `python -I -S _sandbox_worker.py` with a scrubbed environment and only its
end of a socketpair; the trainer sends it one job at a time and waits at most the job's
wall limit plus a grace period, so a wedged or dead worker costs one `sandbox_error`
outcome and a respawn, never a hang. Concurrency comes from one trainer thread per busy
worker; the pool is shared by every caller in the process.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loguru import logger

from . import _sandbox_worker as wire

UID_BASE = 61000  # worker i runs its jobs as uid/gid UID_BASE + i (never a real account)
GRACE_S = 10.0  # how long past a job's wall limit the trainer waits for its worker
_WORKER_FILE = wire.__file__
_CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": "/nonexistent"}
_SYSTEM_DIRS = {"/", "/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/dev", "/proc",
                "/sys", "/tmp", "/run", "/var", "/opt", "/srv"}


def view_paths() -> tuple[list[str], list[str]]:
    """(masks, keeps) for the worker's filesystem view.

    masks: trees hidden behind an empty read-only tmpfs (homes, the repo, the data dir,
    the trainer's cwd and temp dir); keeps: the interpreter install, bound back if a mask
    covers it. System directories are never masked.
    """
    repo = Path(__file__).resolve().parents[3]
    data = os.environ.get("VGROUT_DATA_DIR") or str(repo.parent / "shared" / "data")
    cands = [os.path.expanduser("~"), "/root", "/home", str(repo), data, os.getcwd(),
             os.environ.get("TMPDIR", "/tmp"), sys.prefix]
    masks = sorted({os.path.realpath(p) for p in cands if os.path.isdir(p)} - _SYSTEM_DIRS, key=len)
    keeps = sorted({os.path.realpath(sys.base_prefix)})
    return masks, keeps


def _seccomp_dir() -> str:
    spec = importlib.util.find_spec("pyseccomp")
    return str(Path(spec.origin).parent) if spec and spec.origin else ""


class _Worker:
    """One fork-server process and the trainer's end of its socket."""

    def __init__(self, idx: int):
        self.idx = idx
        masks, keeps = view_paths()
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _WORKER_FILE, str(theirs.fileno()), str(UID_BASE + idx),
                 _seccomp_dir(), json.dumps(masks), json.dumps(keeps)],
                pass_fds=(theirs.fileno(),), env=_CLEAN_ENV, cwd="/", stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True,
            )
        finally:
            theirs.close()
        self.sock = ours
        ours.settimeout(60.0)
        try:
            hello = wire.recv_frame(ours)
        except OSError as e:
            self.close()
            raise RuntimeError(f"sandbox worker {idx} did not start: {e}") from e
        if hello is None:
            self.close()
            raise RuntimeError(f"sandbox worker {idx} exited during start-up (see its stderr above)")
        self.level: dict[str, bool] = hello[0]["level"]
        self.notes: list[str] = hello[0]["notes"]
        self.pid: int = hello[0]["pid"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, job):  # -> Outcome (imported lazily to avoid a cycle)
        from .sandbox import Outcome

        lim = job.limits
        msg = wire.pack({"limits": dataclasses.asdict(lim), "read_files": list(job.read_files)},
                        [job.code.encode("utf-8", "surrogateescape"), bytes(job.stdin)])
        try:
            self.sock.settimeout(lim.wall_s + GRACE_S)
            self.sock.sendall(msg)
            reply = wire.recv_frame(self.sock)
            if reply is None:
                raise EOFError("worker closed its socket")
        except (OSError, EOFError, ValueError) as e:
            self.close()
            return Outcome("sandbox_error", None, "", f"sandbox worker {self.idx} failed: {e!r}", b"", {}, 0.0)
        head, blobs = reply
        out, err, rep, *contents = blobs
        return Outcome(head["status"], head["returncode"], out.decode("utf-8", "replace"),
                       err.decode("utf-8", "replace"), rep, dict(zip(head["files"], contents, strict=True)),
                       float(head["wall_s"]))

    def close(self) -> None:
        """Kill the worker (its jobs die with it: their PID 1 has PDEATHSIG=SIGKILL) and reap it."""
        try:
            self.sock.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass


class ForkServerPool:
    """N workers shared by all callers; `run_jobs` is thread-safe and returns input order."""

    def __init__(self, n: int):
        self.n = n
        self._idle: queue.Queue[_Worker | int] = queue.Queue()
        workers = [_Worker(i) for i in range(n)]
        self.level = workers[0].level
        self.notes = sorted({note for w in workers for note in w.notes})
        self.worker_pids = [w.pid for w in workers]
        for w in workers:
            self._idle.put(w)
        self._all = workers
        self._lock = threading.Lock()

    def describe(self) -> str:
        on = [k for k, v in self.level.items() if v]
        off = [k for k, v in self.level.items() if not v]
        s = f"sandbox isolation ({self.n} fork-server workers): on={','.join(on) or '-'}"
        s += f" off={','.join(off) or '-'}"
        return s + (f"; {'; '.join(self.notes)}" if self.notes else "")

    def _run_one(self, job):
        from .sandbox import Outcome

        w = self._idle.get()  # every job is bounded, so a worker always comes back
        try:
            if isinstance(w, int) or not w.alive():
                idx = w if isinstance(w, int) else w.idx
                try:
                    w = _Worker(idx)
                except RuntimeError as e:
                    w = idx
                    return Outcome("sandbox_error", None, "", str(e), b"", {}, 0.0)
                with self._lock:
                    self._all[idx] = w
                    self.worker_pids[idx] = w.pid
            return w.run(job)
        finally:
            self._idle.put(w)

    def run_jobs(self, jobs: Sequence, workers: int | None = None) -> list:
        if not jobs:
            return []
        n = max(1, min(len(jobs), workers or self.n, self.n))
        if n == 1:
            return [self._run_one(j) for j in jobs]
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="sandbox") as ex:
            return list(ex.map(self._run_one, jobs))

    def close(self) -> None:
        for w in self._all:
            if isinstance(w, _Worker):
                w.close()


_POOL: ForkServerPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool(n: int) -> ForkServerPool:
    """The process-wide pool with at least n workers (started, and its level logged, once)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.n < n:
            first = _POOL is None
            if _POOL is not None:
                _POOL.close()
            _POOL = ForkServerPool(n)
            if first:
                logger.info(_POOL.describe())
        return _POOL


@atexit.register
def shutdown() -> None:
    """Stop the pool's workers (also runs at interpreter exit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None
