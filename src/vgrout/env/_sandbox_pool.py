"""Trainer side of the fork-server sandbox: a pool of pre-started worker interpreters.

Each worker is `python -I -S _sandbox_worker.py` with a scrubbed environment and only its
end of a socketpair; the trainer sends it one job at a time and waits at most the job's
wall limit plus a grace period, so a wedged or dead worker costs one `sandbox_error`
outcome and a respawn, never a hang. Concurrency comes from one trainer thread per busy
worker; the pool is shared by every caller in the process.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import importlib.util
import os
import queue
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from loguru import logger

from . import _sandbox_worker as wire

# Worker i of the pool in trainer process P runs its jobs as uid/gid UID_BASE + 64*P + i:
# never a real account, never shared between jobs running at once on this machine.
UID_BASE = 100_000
MAX_WORKERS = 64


def uid_for(idx: int, trainer_pid: int | None = None) -> int:
    """The unprivileged uid that worker `idx` of this process's pool runs jobs as."""
    if not 0 <= idx < MAX_WORKERS:
        raise ValueError(f"sandbox: worker index {idx} outside 0..{MAX_WORKERS - 1}")
    return UID_BASE + MAX_WORKERS * (os.getpid() if trainer_pid is None else trainer_pid) + idx


GRACE_S = 10.0  # how long past a job's wall limit the trainer waits for its worker
PIPELINE = 2  # jobs queued per worker at once
_WORKER_FILE = wire.__file__
_CLEAN_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "HOME": "/nonexistent",
}
_SYSTEM_DIRS = {
    "/",
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/bin",
    "/sbin",
    "/etc",
    "/dev",
    "/proc",
    "/sys",
    "/tmp",
    "/run",
    "/var",
    "/opt",
    "/srv",
}


def view_paths() -> tuple[list[str], list[str]]:
    """(masks, keeps) for the worker's filesystem view.

    masks: trees hidden behind an empty read-only tmpfs (homes, the repo, the data dir,
    the trainer's cwd and temp dir); keeps: the interpreter install, bound back if a mask
    covers it. System directories are never masked.
    """
    repo = Path(__file__).resolve().parents[3]
    data = os.environ.get("VGROUT_DATA_DIR") or str(repo.parent / "shared" / "data")
    cands = [
        os.path.expanduser("~"),
        "/root",
        "/home",
        str(repo),
        data,
        os.getcwd(),
        os.environ.get("TMPDIR", "/tmp"),
        sys.prefix,
    ]
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
                [sys.executable, "-I", "-S", _WORKER_FILE, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=_CLEAN_ENV,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            theirs.close()
        self.sock = ours
        ours.settimeout(60.0)
        cfg = {
            "uid": uid_for(idx),
            "seccomp_dir": _seccomp_dir(),
            "masks": masks,
            "keeps": keeps,
            "zygote": os.environ.get("VGROUT_SANDBOX_ZYGOTE", "1") != "0",
        }
        try:
            # settings travel on the socket, not argv: jobs can read their zygote's cmdline
            ours.sendall(wire.pack(cfg, []))
            hello = wire.recv_frame(ours)
        except OSError as e:
            self.close()
            raise RuntimeError(f"sandbox worker {idx} did not start: {e}") from e
        if hello is None:
            self.close()
            raise RuntimeError(
                f"sandbox worker {idx} exited during start-up (see its stderr above)"
            )
        self.level: dict[str, bool] = hello[0]["level"]
        self.notes: list[str] = hello[0]["notes"]
        self.pid: int = hello[0]["pid"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, job) -> None:
        """Queue one job on the worker (it runs them in order, one at a time)."""
        enc = lambda t: t.encode("utf-8", "surrogateescape")  # noqa: E731
        # namespaces ride along with the shared code as (source, module name, NAMESPACE)
        shared = [*job.shared_code, *((src, mod, wire.NAMESPACE) for src, mod in job.namespaces)]
        msg = wire.pack(
            {
                "limits": dataclasses.asdict(job.limits),
                "read_files": list(job.read_files),
                "shared": [[name, mode] for _, name, mode in shared],
            },
            [enc(job.code), bytes(job.stdin), *(enc(src) for src, _, _ in shared)],
        )
        self.sock.settimeout(job.limits.wall_s + GRACE_S)
        self.sock.sendall(msg)

    def receive(self, timeout: float):
        """The next finished job's Outcome; raises OSError/EOFError if the worker is gone."""
        from .sandbox import Outcome

        self.sock.settimeout(max(timeout, 0.001))
        reply = wire.recv_frame(self.sock)
        if reply is None:
            raise EOFError("worker closed its socket")
        head, blobs = reply
        out, err, rep, *contents = blobs
        return Outcome(
            head["status"],
            head["returncode"],
            out.decode("utf-8", "replace"),
            err.decode("utf-8", "replace"),
            rep,
            dict(zip(head["files"], contents, strict=True)),
            float(head["wall_s"]),
        )

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
        if not 1 <= n <= MAX_WORKERS:
            raise ValueError(f"sandbox: workers={n}; use 1..{MAX_WORKERS}")
        self.n = n
        self.uids = range(uid_for(0), uid_for(n - 1) + 1)
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

    def _checkout(self, want: int) -> list[_Worker]:
        """Take 1..want idle workers (blocking for the first), respawning dead ones."""
        got = [self._idle.get()]
        while len(got) < want:
            try:
                got.append(self._idle.get_nowait())
            except queue.Empty:
                break
        live = []
        for w in got:
            if isinstance(w, int) or not w.alive():
                idx = w if isinstance(w, int) else w.idx
                try:
                    w = _Worker(idx)
                except RuntimeError as e:
                    logger.error(str(e))
                    self._idle.put(idx)
                    continue
                with self._lock:
                    self._all[idx] = w
                    self.worker_pids[idx] = w.pid
            live.append(w)
        if not live:
            raise RuntimeError("sandbox: no worker could be started (see the errors above)")
        return live

    def _respawn(self, dead: _Worker) -> _Worker | None:
        dead.close()
        try:
            w = _Worker(dead.idx)
        except RuntimeError as e:
            logger.error(str(e))
            return None
        with self._lock:
            self._all[dead.idx] = w
            self.worker_pids[dead.idx] = w.pid
        return w

    def run_jobs(self, jobs: Sequence, workers: int | None = None) -> list:
        """Dispatch from the calling thread with a selector, longest wall limit first; each
        worker keeps up to PIPELINE jobs queued so it never waits on the trainer. A worker
        that dies is replaced and its queued jobs run once more elsewhere; one silent past
        its deadline (the current job's wall limit + GRACE_S) is killed and that job becomes
        `sandbox_error`."""
        from .sandbox import Outcome

        if not jobs:
            return []
        results: list = [None] * len(jobs)
        ws = self._checkout(max(1, min(len(jobs), workers or self.n, self.n)))
        # longest wall limit first (a grader's limits scale with the problem's expected
        # runtime): a long job started last would leave the other workers idle at the end
        pending = collections.deque(sorted(range(len(jobs)), key=lambda i: -jobs[i].limits.wall_s))
        retried: set[int] = set()
        inflight: dict[_Worker, list[int]] = {}
        deadline: dict[_Worker, float] = {}
        sel = selectors.DefaultSelector()

        def error(i: int, why: str) -> None:
            results[i] = Outcome("sandbox_error", None, "", why, b"", {}, 0.0)

        def add(w: _Worker) -> None:
            ws.append(w)
            inflight[w] = []
            sel.register(w.sock, selectors.EVENT_READ, w)

        def fail(w: _Worker, why: str, *, retry: bool) -> None:
            """Drop worker w; requeue (once) or fail its jobs; start its replacement."""
            sel.unregister(w.sock)
            ws.remove(w)
            for k, i in enumerate(inflight.pop(w)):
                if k == 0 and not retry or i in retried:
                    error(i, f"sandbox worker {w.idx}: {why}")
                else:
                    retried.add(i)
                    pending.appendleft(i)
            new = self._respawn(w)
            if new is not None:
                add(new)
            else:
                self._idle.put(w.idx)

        def top_up(w: _Worker) -> None:
            while pending and len(inflight[w]) < PIPELINE:
                i = pending.popleft()
                inflight[w].append(i)
                if len(inflight[w]) == 1:
                    deadline[w] = time.monotonic() + jobs[i].limits.wall_s + GRACE_S
                try:
                    w.send(jobs[i])
                except OSError as e:
                    return fail(w, f"send failed: {e!r}", retry=True)

        start = list(ws)
        ws.clear()
        for w in start:
            add(w)
        try:
            for w in list(ws):
                top_up(w)
            while any(inflight.values()) or pending:
                if not ws:
                    for i in pending:
                        error(i, "sandbox: no worker could be started (see the log)")
                    break
                for w in list(ws):
                    if not inflight.get(w):
                        top_up(w)
                busy = [w for w in ws if inflight.get(w)]
                if not busy:
                    continue
                wait = min(deadline[w] for w in busy) - time.monotonic()
                for key, _ in sel.select(timeout=max(wait, 0)):
                    w = key.data
                    if w not in inflight:
                        continue
                    try:
                        out = w.receive(timeout=deadline[w] - time.monotonic())
                    except (OSError, EOFError, ValueError) as e:
                        fail(w, f"no reply ({e!r})", retry=not isinstance(e, TimeoutError))
                        continue
                    results[inflight[w].pop(0)] = out
                    if inflight[w]:
                        deadline[w] = (
                            time.monotonic() + jobs[inflight[w][0]].limits.wall_s + GRACE_S
                        )
                    top_up(w)
                now = time.monotonic()
                for w in list(ws):
                    if inflight.get(w) and now > deadline[w]:
                        fail(w, "timed out past its wall limit (worker wedged)", retry=False)
        finally:
            sel.close()
            for w in ws:
                if inflight.get(w):  # interrupted mid-flight (e.g. KeyboardInterrupt)
                    w.close()
                self._idle.put(w)
        return results

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
