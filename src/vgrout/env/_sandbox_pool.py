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
import heapq
import importlib.util
import math
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
    """(masks, keeps) for the workers' own filesystem view (jobs see only the allow-list
    of `_sandbox_worker.allow_list`).

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


def _start(cfg: dict, what: str) -> tuple[subprocess.Popen, socket.socket, dict]:
    """Start `python -I -S _sandbox_worker.py` with `cfg`: (process, socket, hello)."""
    ours, theirs = socket.socketpair()
    try:
        proc = subprocess.Popen(
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
    ours.settimeout(60.0)
    try:
        # settings travel on the socket, not argv: jobs can read their zygote's cmdline
        ours.sendall(wire.pack(cfg, []))
        hello = wire.recv_frame(ours)
    except OSError as e:
        _stop(proc, ours)
        raise RuntimeError(f"{what} did not start: {e}") from e
    if hello is None:
        _stop(proc, ours)
        raise RuntimeError(f"{what} exited during start-up (see its stderr above)")
    return proc, ours, hello[0]


def _stop(proc: subprocess.Popen, sock: socket.socket, grace: float = 0.0) -> None:
    """Close the socket (a worker then stops its zygote and removes its cgroup), give the
    process `grace` seconds to exit, then kill it and reap it."""
    try:
        sock.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        pass


class _View:
    """The view process: holds the mount namespace with the jobs' allow-list tree (one
    copy of the interpreter's install on a tmpfs, shared read-only by every worker)."""

    def __init__(self):
        masks, keeps = view_paths()
        cfg = {"role": "view", "masks": masks, "keeps": keeps}
        self.proc, self.sock, hello = _start(cfg, "sandbox view process")
        self.ok: bool = hello["ok"]
        self.notes: list[str] = hello["notes"]
        self.size = (hello["files"], hello["bytes"])

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.ok and self.proc.poll() is None else None

    def close(self) -> None:
        _stop(self.proc, self.sock)


def cgroup_parent() -> tuple[str | None, str]:
    """Where the workers make their jobs' memory cgroups (see _sandbox_worker.memcg_parent;
    VGROUT_SANDBOX_CGROUP overrides it)."""
    return wire.memcg_parent(os.environ.get("VGROUT_SANDBOX_CGROUP") or None)


def remove_cgroups(parent: str | None, uids) -> None:
    """Remove the job cgroups of `uids` (whatever their random suffix) under `parent`, and those
    left by trainers that no longer run; best effort (one still in use stays)."""
    if parent is None or not os.path.isdir(parent):
        return
    mine = {str(u) for u in uids}
    for name in os.listdir(parent):
        if not name.startswith(wire.CGROUP_PREFIX):
            continue
        uid = name[len(wire.CGROUP_PREFIX) :].split("-")[0]
        if not uid.isdigit():
            continue
        trainer = (int(uid) - UID_BASE) // MAX_WORKERS
        if uid in mine or not os.path.exists(f"/proc/{trainer}"):
            try:
                os.rmdir(os.path.join(parent, name))
            except OSError:
                pass


class _Worker:
    """One fork-server process and the trainer's end of its socket."""

    def __init__(self, idx: int, view: _View | None):
        self.idx = idx
        cfg = {
            "uid": uid_for(idx),
            "seccomp_dir": _seccomp_dir(),
            "view": view.pid if view is not None else None,
            "cgroup": os.environ.get("VGROUT_SANDBOX_CGROUP") or None,
            "zygote": os.environ.get("VGROUT_SANDBOX_ZYGOTE", "1") != "0",
        }
        self.proc, self.sock, hello = _start(cfg, f"sandbox worker {idx}")
        self.level: dict[str, bool] = hello["level"]
        self.notes: list[str] = hello["notes"]
        self.pid: int = hello["pid"]

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

    def close(self, grace: float = 0.0) -> None:
        """Stop the worker (its jobs die with it: their PID 1 has PDEATHSIG=SIGKILL) and reap
        it; with `grace`, it first gets that long to stop its zygote and remove its cgroup."""
        _stop(self.proc, self.sock, grace)


class Dispatch:
    """The jobs of one run_jobs call not yet started, in the order they start: jobs given
    back (their worker died) first, then the longest wall limit first (a grader's limits
    scale with the problem's expected runtime: a long job started last would leave the
    other workers idle at the end), ties in input order; a job with `order=(key, rank)`
    is held back until every job of its key with a lower rank is `done`."""

    def __init__(self, jobs: Sequence):
        self.jobs = jobs
        self.again: collections.deque[int] = collections.deque()
        self.ready: list[tuple[float, int]] = []
        self.held: dict = collections.defaultdict(list)  # key -> [(rank, index)]
        self.left: dict = collections.defaultdict(collections.Counter)  # key -> rank -> count
        for j in jobs:
            if j.order is not None:
                self.left[j.order[0]][j.order[1]] += 1
        for i, j in enumerate(jobs):
            if j.order is None or j.order[1] <= self._floor(j.order[0]):
                self.ready.append((-j.limits.wall_s, i))
            else:
                self.held[j.order[0]].append((j.order[1], i))
        heapq.heapify(self.ready)

    def _floor(self, key) -> float:
        """The lowest rank of `key` with a job not yet done (jobs of this rank may start)."""
        return min((r for r, n in self.left[key].items() if n > 0), default=math.inf)

    def __bool__(self) -> bool:
        return bool(self.again or self.ready or any(self.held.values()))

    def pop(self) -> int | None:
        """The next job to start, or None while every job left is held back."""
        if self.again:
            return self.again.popleft()
        return heapq.heappop(self.ready)[1] if self.ready else None

    def give_back(self, i: int) -> None:
        """Job i goes again, before all others (its worker died before it finished)."""
        self.again.append(i)

    def done(self, i: int) -> None:
        """Job i has its final outcome: release what waited only for it."""
        order = self.jobs[i].order
        if order is None:
            return
        key, rank = order
        self.left[key][rank] -= 1
        if self.left[key][rank] == 0 and self.held[key]:
            floor = self._floor(key)
            keep = []
            for r, k in self.held[key]:
                if r <= floor:
                    heapq.heappush(self.ready, (-self.jobs[k].limits.wall_s, k))
                else:
                    keep.append((r, k))
            self.held[key] = keep


class ForkServerPool:
    """N workers shared by all callers; `run_jobs` is thread-safe and returns input order."""

    def __init__(self, n: int):
        if not 1 <= n <= MAX_WORKERS:
            raise ValueError(f"sandbox: workers={n}; use 1..{MAX_WORKERS}")
        self.n = n
        self.uids = range(uid_for(0), uid_for(n - 1) + 1)
        self._idle: queue.Queue[_Worker | int] = queue.Queue()
        self._lock = threading.Lock()
        self._cgroups = cgroup_parent()[0]
        remove_cgroups(self._cgroups, self.uids)  # what crashed trainers left behind
        self._view: _View | None = _View() if os.geteuid() == 0 else None
        workers = [self._new_worker(i) for i in range(n)]
        self.level = workers[0].level
        notes = {note for w in workers for note in w.notes}
        notes.update(self._view.notes if self._view is not None else ())
        self.notes = sorted(notes)
        self.worker_pids = [w.pid for w in workers]
        for w in workers:
            self._idle.put(w)
        self._all = workers

    def _new_worker(self, idx: int) -> _Worker:
        """Start worker idx (and first the view process again, should it have died); a
        job cgroup its dead predecessor left is removed first."""
        remove_cgroups(self._cgroups, [uid_for(idx)])
        with self._lock:
            if self._view is not None and self._view.ok and self._view.pid is None:
                self._view.close()
                self._view = _View()
            view = self._view
        return _Worker(idx, view)

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
                if not isinstance(w, int):
                    w.close()
                try:
                    w = self._new_worker(idx)
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
            w = self._new_worker(dead.idx)
        except RuntimeError as e:
            logger.error(str(e))
            return None
        with self._lock:
            self._all[dead.idx] = w
            self.worker_pids[dead.idx] = w.pid
        return w

    def run_jobs(self, jobs: Sequence, workers: int | None = None) -> list:
        """Dispatch from the calling thread with a selector, in `Dispatch` order (longest
        wall limit first, `Job.order` kept); each worker keeps up to PIPELINE jobs queued so
        it never waits on the trainer (a job held back by its order is sent only once the
        jobs it waits for are done). A worker that dies is replaced and its queued jobs run
        once more elsewhere; one silent past its deadline (the current job's wall limit +
        GRACE_S) is killed and that job becomes `sandbox_error`."""
        from .sandbox import Outcome

        if not jobs:
            return []
        results: list = [None] * len(jobs)
        ws = self._checkout(max(1, min(len(jobs), workers or self.n, self.n)))
        pending = Dispatch(jobs)
        retried: set[int] = set()
        inflight: dict[_Worker, list[int]] = {}
        deadline: dict[_Worker, float] = {}
        sel = selectors.DefaultSelector()

        def error(i: int, why: str) -> None:
            results[i] = Outcome("sandbox_error", None, "", why, b"", {}, 0.0)
            pending.done(i)

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
                    pending.give_back(i)
            new = self._respawn(w)
            if new is not None:
                add(new)
            else:
                self._idle.put(w.idx)

        def top_up(w: _Worker) -> None:
            while len(inflight[w]) < PIPELINE and (i := pending.pop()) is not None:
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
                    while (i := pending.pop()) is not None:
                        error(i, "sandbox: no worker could be started (see the log)")
                    break
                for w in list(ws):
                    if not inflight.get(w):
                        top_up(w)
                busy = [w for w in ws if inflight.get(w)]
                if not busy:
                    if not (pending.again or pending.ready):  # cannot happen: fail loudly
                        raise RuntimeError("sandbox: jobs held back by Job.order, none running")
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
                    i = inflight[w].pop(0)
                    results[i] = out
                    pending.done(i)
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
        """Stop the workers (each gets a moment to stop its zygote and remove its job
        cgroup), the view process, and remove any job cgroup left behind."""
        live = [w for w in self._all if isinstance(w, _Worker)]
        for w in live:
            try:
                w.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for w in live:
            w.close(grace=2.0)
        if self._view is not None:
            self._view.close()
        remove_cgroups(self._cgroups, self.uids)


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
