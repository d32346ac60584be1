"""Run untrusted Python programs: isolated, bounded, concurrent.

Every execution of model-written code in vgrout goes through this module. The
interface is deliberately small:

    run_jobs([Job(code=..., stdin=..., read_files=("result.txt",))]) -> [Outcome, ...]

A `Job` is a complete Python program (the caller composes its own trusted
harness around the untrusted text) plus optional bytes for stdin. An `Outcome`
says how the program ended (`status`), its exit code, its captured (capped)
stdout/stderr, the bytes the harness wrote to the *report fd* (fd 3, a pipe
the parent reads; the trusted harness writes its findings there), and the
scratch files the caller asked to read back.

This first backend is the reference one: a fresh interpreter per program
(`python -I -S -c`), in a new session, a fresh scratch directory as cwd, a
scrubbed environment, rlimits (address space, CPU, file size, open files,
processes) and a wall-clock timeout that kills the whole process group and
reaps it. It is also the baseline the sandbox benchmark compares against.
"""

from __future__ import annotations

import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Literal

Status = Literal["exited", "signaled", "timeout", "memory", "output_limit", "sandbox_error"]

REPORT_FD = 3  # the trusted harness writes its findings here; see Outcome.report


@dataclass(frozen=True)
class Limits:
    """Bounds for one execution. Defaults suit grading one LeetCode completion."""

    wall_s: float = 10.0
    cpu_s: int = 10
    mem_mb: int = 1024  # address space (RLIMIT_AS)
    fsize_mb: int = 16  # largest file the program may write
    nofile: int = 64
    nproc: int = 64  # only enforced for a non-root uid (Linux ignores it for root)
    output_bytes: int = 256_000  # stdout + stderr + report, each capped at this


@dataclass(frozen=True)
class Job:
    """One program to run. `code` is trusted harness text composed by the caller.

    What a job may keep from later jobs: its `stdin` reaches only its own process. Its
    `code` and `shared_code` may be kept (compiled) by the worker that ran it, where a later
    job on that worker could find them, so they must hold nothing a later job may not see:
    harness text, setup code and test *inputs*, never expected outputs or reference
    solutions (those go in `stdin`).

    `shared_code`: (source, filename, mode) texts the program will compile. The fork-server
    compiles each once per worker and hands the program the code objects in its
    `__vgrout_compiled__` global, a dict keyed by those triples (compiled as `compile`
    would, without inheriting any compiler flags); a program falls back to `compile` for
    anything it does not find there. The reference backend leaves the global out.

    `namespaces`: (source, module name) pairs, each an import-only text the program would
    run in a fresh module namespace `{"__name__": name, "__builtins__": builtins}`. The
    fork-server runs each once per worker, but only when every statement is an absolute
    `import` or `from ... import` of modules the worker has already imported (so running
    it only binds names: no module code runs), and hands the program the finished dicts in
    its `__vgrout_namespaces__` global, keyed by those pairs. Each job gets its own copy
    (a fork of the process that holds it), so the program may use such a dict as its
    module namespace, and skip the binding of hundreds of names that a star import costs
    each fresh process. Same secrecy rule as `shared_code`; the reference backend leaves
    the global out, so a program must run the text itself for any pair it does not find.

    `order`: (key, rank). Within one `run_jobs` call, the job starts only once every job
    with the same key and a lower rank has finished, on whatever worker, so the two never
    overlap and the lower rank never runs after the higher one. The graders give a
    problem's strict-oracle runs rank 0 and the runs that hold its expected values or
    reference solution rank 1: nothing those leave behind in the machine can reach an
    oracle run of the same problem in the same batch. None: no constraint.
    """

    code: str
    stdin: bytes = b""
    read_files: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    shared_code: tuple[tuple[str, str, str], ...] = ()
    namespaces: tuple[tuple[str, str], ...] = ()
    order: tuple[str, int] | None = None


@dataclass(frozen=True)
class Outcome:
    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    report: bytes
    files: dict[str, bytes]
    wall_s: float

    @property
    def ok(self) -> bool:
        """Exited normally with status 0 (what a *foolable* exit-code grader trusts)."""
        return self.status == "exited" and self.returncode == 0


# The reference backend's bootstrap: move the report pipe to fd 3, then read the
# program and its stdin data from stdin (a 12-byte length header, the program,
# the data), so neither size is bounded by the kernel's argv limit.
_BOOT = (
    "import os,sys,io\n"
    "os.dup2({fd},3);os.close({fd})\n"
    "_b=sys.stdin.buffer.read();_n=int(_b[:12]);_src=_b[12:12+_n].decode()\n"
    "sys.stdin=io.TextIOWrapper(io.BytesIO(_b[12+_n:]))\n"
    "del os,io,_b,_n\n"
    "exec(compile(_src,'<program>','exec'),{'__name__':'__main__','__builtins__':__builtins__})\n"
)


def _frame_stdin(code: str, data: bytes) -> bytes:
    src = code.encode()
    return b"%012d" % len(src) + src + data


_CLEAN_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "HOME": "/nonexistent",
}


def _limit_child(lim: Limits) -> None:
    """Runs in the child between fork and exec: apply rlimits."""
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (lim.mem_mb * mb, lim.mem_mb * mb))
    resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim.fsize_mb * mb, lim.fsize_mb * mb))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim.nofile, lim.nofile))
    resource.setrlimit(resource.RLIMIT_NPROC, (lim.nproc, lim.nproc))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run_subprocess(job: Job) -> Outcome:
    """Reference backend: one fresh interpreter per program."""
    lim = job.limits
    scratch = tempfile.mkdtemp(prefix="vgrout-sbx-")
    t0 = time.monotonic()
    report_r, report_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOT.replace("{fd}", str(report_w))],
            cwd=scratch,
            env=_CLEAN_ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(report_w,),
            start_new_session=True,
            preexec_fn=lambda: _limit_child(lim),
            close_fds=True,
        )
    except OSError as e:
        os.close(report_r)
        os.close(report_w)
        shutil.rmtree(scratch, ignore_errors=True)
        return Outcome("sandbox_error", None, "", f"spawn failed: {e}", b"", {}, 0.0)
    os.close(report_w)
    try:
        try:
            proc.stdin.write(_frame_stdin(job.code, job.stdin))
        except BrokenPipeError:
            pass
        proc.stdin.close()
        bufs = {
            proc.stdout.fileno(): bytearray(),
            proc.stderr.fileno(): bytearray(),
            report_r: bytearray(),
        }
        sel = selectors.DefaultSelector()
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        over_output = timed_out = False
        deadline = t0 + lim.wall_s
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                buf += chunk
                if len(buf) > lim.output_bytes:
                    del buf[lim.output_bytes :]
                    over_output = True
            if over_output:
                break
        sel.close()
        _kill_group(proc.pid)  # nothing it started may outlive the call
        try:
            rc = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            rc = None
        files = {}
        for name in job.read_files:
            p = os.path.join(scratch, name)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as fh:
                    files[name] = fh.read(lim.output_bytes)
        out = bytes(bufs[proc.stdout.fileno()]).decode("utf-8", "replace")
        err = bytes(bufs[proc.stderr.fileno()]).decode("utf-8", "replace")
        status: Status
        if timed_out:
            status = "timeout"
        elif over_output:
            status = "output_limit"
        elif rc is not None and rc < 0:
            status = "signaled"
            if -rc == signal.SIGXCPU:
                status = "timeout"
        elif "MemoryError" in err[-2000:]:
            status = "memory"
        else:
            status = "exited"
        return Outcome(status, rc, out, err, bytes(bufs[report_r]), files, time.monotonic() - t0)
    finally:
        for s in (proc.stdout, proc.stderr):
            s.close()
        try:
            os.close(report_r)
        except OSError:
            pass
        shutil.rmtree(scratch, ignore_errors=True)


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


Backend = Literal["forkserver", "subprocess"]
BACKENDS: tuple[str, ...] = ("forkserver", "subprocess")


def _pick_backend(backend: str | None) -> str:
    b = backend or os.environ.get("VGROUT_SANDBOX_BACKEND") or "forkserver"
    if b not in BACKENDS:
        raise ValueError(
            f"sandbox backend {b!r} (argument or VGROUT_SANDBOX_BACKEND) is not one of {BACKENDS}"
        )
    return b


def run_jobs(
    jobs: Sequence[Job], *, workers: int | None = None, backend: Backend | None = None
) -> list[Outcome]:
    """Run every job (concurrently across cores); results are in input order.

    backend "forkserver" (default): the hardened pool of pre-started workers
    (see `_sandbox_pool`); "subprocess": the reference one-interpreter-per-job backend,
    kept as the benchmark baseline. `VGROUT_SANDBOX_BACKEND` sets the default.
    """
    if not jobs:
        return []
    n = min(len(jobs), workers or default_workers())
    if _pick_backend(backend) == "forkserver":
        from ._sandbox_pool import get_pool

        return get_pool(min(max(n, default_workers()), 64)).run_jobs(jobs, workers=n)
    from ._sandbox_pool import Dispatch

    # the same dispatch order as the fork-server's (longest wall limit first, Job.order)
    results: list = [None] * len(jobs)
    todo = Dispatch(jobs)
    with ThreadPoolExecutor(max_workers=n) as ex:
        running: dict = {}
        while todo or running:
            while len(running) < n and (i := todo.pop()) is not None:
                running[ex.submit(_run_subprocess, jobs[i])] = i
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                i = running.pop(fut)
                results[i] = fut.result()
                todo.done(i)
    return results


def run_job(job: Job, *, backend: Backend | None = None) -> Outcome:
    return run_jobs([job], workers=1, backend=backend)[0]


def isolation_level() -> dict[str, bool]:
    """Which isolation mechanisms the fork-server backend runs with on this machine."""
    from ._sandbox_pool import get_pool

    return dict(get_pool(default_workers()).level)
