"""Process-table checks shared by the sandbox tests (read straight from /proc)."""

from __future__ import annotations

import os


def uid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(ln.split()[1]) for ln in fh if ln.startswith("Uid:"))
    except (OSError, StopIteration):
        return None


def alive(pid: int) -> bool:
    """Running or sleeping: not gone, and not a zombie waiting for its new parent to reap it."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(ln.split()[1] for ln in fh if ln.startswith("State:")) not in ("Z", "X")
    except (OSError, StopIteration):
        return False


def children_of(pid: int) -> list[int]:
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as fh:
            kids += [int(x) for x in fh.read().split()]
    return kids


def pids_with_uid(uids) -> list[int]:
    """Live processes running as one of `uids` (a pool's sandbox uids: none may exist between
    calls). Zombies do not count: they are dead, waiting for the host's init to reap them
    (what a killed process that had left its job's process group becomes)."""
    return [
        int(d) for d in os.listdir("/proc") if d.isdigit() and uid_of(int(d)) in uids and alive(int(d))
    ]


def idle_worker_problems(worker_pid: int) -> list[str]:
    """What is wrong with an idle worker's process tree: its only child may be its job zygote
    (root), and the zygote may have no children (no job, nothing a job started)."""
    kids = children_of(worker_pid)
    bad = [f"worker {worker_pid} has {len(kids)} children"] if len(kids) > 1 else []
    for z in kids:
        if uid_of(z) != 0:
            bad.append(f"worker {worker_pid}'s child {z} is not its root zygote")
        if children_of(z):
            bad.append(f"zygote {z} still has children {children_of(z)}: a job outlived its call")
    return bad
