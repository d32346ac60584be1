"""A sweep on a real SLURM: a single-node cluster on this machine runs the array script that
`just sweep ... --slurm` writes, and `just results` aggregates the runs it made.

The test starts its own munged (its own key and socket), slurmctld and slurmd (localhost,
free ports, a minimal slurm.conf written here; state, spool and logs in a temp folder), and
stops every one of them, and any job step they left, when it ends. It needs Debian's
`slurm-wlm` and `munge` (.ci/run installs them with apt as root) and skips with the reason
where they are missing or the test is not root (slurmd runs jobs as their submitting user).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel")


def skip_reason() -> str | None:
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b, path=SBIN_PATH) is None]
    if missing:
        return (f"SLURM not installed ({', '.join(missing)} missing): "
                "`apt-get install -y slurm-wlm munge` as root (.ci/run does)")
    if os.geteuid() != 0:
        return "the single-node SLURM test runs slurmd, which needs root"
    if shutil.which("uv") is None or shutil.which("just") is None:
        return "uv and just must be on PATH (the jobs run `uv run python -m vgrout.train`)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (read from /proc), children first."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    parent[int(d)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def stop(pids: list[int], timeout: float = 15.0) -> list[int]:
    """SIGTERM each pid, wait, SIGKILL what is left; returns the pids that had to be killed."""
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline, killed = time.monotonic() + timeout, []
    for p in pids:
        while time.monotonic() < deadline and Path(f"/proc/{p}").exists() and not _zombie(p):
            time.sleep(0.1)
        if Path(f"/proc/{p}").exists() and not _zombie(p):
            os.kill(p, signal.SIGKILL)
            killed.append(p)
    return killed


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Cluster:
    """munged + slurmctld + slurmd on localhost, all in `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        for d in ("munge", "state", "spool", "log"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.socket = root / "munge" / "munge.sock"
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=SBIN_PATH)

    def write_conf(self) -> None:
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=vgroutci",
            "SlurmctldHost=localhost",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=2048 State=UNKNOWN",
            "PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def start(self) -> None:
        r = self.root
        self._start("munged", ["munged", "--foreground", "--force", f"--key-file={r / 'munge' / 'munge.key'}",
                               f"--socket={self.socket}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                               f"--seed-file={r / 'munge' / 'munged.seed'}", f"--log-file={r / 'log' / 'munged.log'}"])
        self.wait_for(lambda: self.socket.exists(), 20, "munged's socket")
        self.write_conf()
        self._start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", "localhost"])
        self.wait_for(lambda: self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip() == "idle", 60,
                      "the node to be idle")

    def wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}:\n{self.logs()}")
            if cond():
                return
            time.sleep(0.3)
        raise TimeoutError(f"no {what} after {timeout} s:\n{self.logs()}")

    def wait_for_job(self, job_id: str, timeout: float) -> str | None:
        """Poll until no task of `job_id` is queued; None, or why waiting longer is pointless (a
        task held after a failed launch, or pending for a reason other than waiting its turn)."""
        waiting = {"None", "Priority", "Resources", "JobArrayTaskLimit", "BeginTime"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.run(["squeue", "-h", "-j", job_id, "-o", "%i %T %r"]).stdout.splitlines()
            if not lines:
                return None
            for ln in lines:
                task, state, reason = (ln.split(None, 2) + ["", ""])[:3]
                if state == "PENDING" and reason not in waiting:
                    return f"task {task} cannot start: {reason}"
            time.sleep(2)
        return f"job {job_id} still queued after {timeout} s"

    def run(self, argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{argv} -> {proc.returncode}: {proc.stderr}\n{self.logs()}")
        return proc

    def logs(self, tail: int = 30) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"── {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def shutdown(self) -> list[int]:
        """Cancel what is queued, then stop slurmd (and any job step it left), slurmctld, munged.
        Returns the pids that needed SIGKILL."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%A"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *sorted(set(jobs))], check=False)
        killed = []
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None:
                continue
            below = descendants(p.pid)  # slurmstepd and job processes still running, if any
            killed += stop([p.pid] + below)
            p.wait(timeout=10)
        return killed


@pytest.fixture
def cluster():
    # a short root: slurmstepd's socket <spool>/<node>_<job>.<step> must fit in 108 bytes, which
    # pytest's tmp_path under xdist (/tmp/pytest-of-root/pytest-N/popen-gwK/<test name>/) does not
    root = Path(tempfile.mkdtemp(prefix="vgslurm", dir="/tmp"))
    c = Cluster(root)
    try:
        c.start()
        yield c
    finally:
        pids = [p.pid for p in c.procs.values()]
        c.shutdown()
        left = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"daemons still running after the test: {left}"


def test_sweep_array_runs_on_slurm_and_results_aggregates_it(cluster, tmp_path):
    from vgrout.smoke_pool import build_smoke_pool

    t0 = time.monotonic()
    pool = build_smoke_pool(tmp_path / "pool")
    out, logs, script = tmp_path / "out", tmp_path / "slurm_logs", tmp_path / "sweep.sbatch"
    run_flags = [f"--out-root={out}", f"--teacher-pool-dir={pool}", "--steps=2", "--max-new=8",
                 "--eval-n-prompts=2", "--eval-ablate-every=0", "--ckpt-every=10"]
    sweep = cluster.run(
        ["just", "sweep", "smoke", "none", "41,42", "--slurm", str(script), "--workdir", str(REPO),
         "--slurm-gpus=0", "--slurm-cpus=1", "--slurm-mem=1G", "--slurm-time=00:20:00",
         f"--slurm-log-dir={logs}", "--parallel=2", *run_flags], cwd=REPO, timeout=120)
    assert f"sbatch {script}" in sweep.stdout
    assert "--gres" not in script.read_text() and "--array=0-1%2" in script.read_text()

    job_id = cluster.run(["sbatch", "--parsable", str(script)]).stdout.strip().split(";")[0]
    problem = cluster.wait_for_job(job_id, timeout=600)
    task_logs = {p.name: p.read_text() for p in sorted(logs.glob("*.out"))}
    detail = "\n".join(f"── {k}\n{v[-3000:]}" for k, v in task_logs.items()) + "\n" + cluster.logs()
    assert problem is None, f"{problem}\n{detail}"
    assert sorted(task_logs) == [f"vgrout-smoke_{job_id}_0.out", f"vgrout-smoke_{job_id}_1.out"], detail
    for i, seed in enumerate((41, 42)):
        text = task_logs[f"vgrout-smoke_{job_id}_{i}.out"]
        assert f"task {i} on " in text and f"--seed={seed}" in text, text[-2000:]
        assert "smoke ok: " in text, text[-2000:]
    # slurmctld's own record of both tasks: completed, exit 0
    for i in (0, 1):
        show = cluster.run(["scontrol", "show", "job", f"{job_id}_{i}"]).stdout
        assert "JobState=COMPLETED" in show and "ExitCode=0:0" in show, show

    runs = sorted((out / "runs").iterdir(), key=lambda r: r.name.split("_", 1)[1])  # <stamp>_<run id>
    assert [r.name.split("_", 1)[1] for r in runs] == ["smoke_vanilla_seed41", "smoke_vanilla_seed42"]
    for r in runs:
        assert json.loads((r / "status.json").read_text())["state"] == "complete"
        assert [json.loads(ln)["step"] for ln in (r / "rows.jsonl").read_text().splitlines()] == [0, 1]
        assert json.loads((r / "per_mode_deploy.json").read_text())["schema"] == "vgrout.per_mode_deploy/1"

    res = subprocess.run(["just", "results", "--runs", str(out / "runs"), "--out", str(tmp_path / "results")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(2 runs under" in res.stdout and "Not averaged" not in res.stdout, res.stdout
    (row,) = list(csv.DictReader((tmp_path / "results" / "results_latest.csv").open()))
    assert (row["preset"], row["arm"], row["n_seeds"], row["seeds"]) == ("smoke", "vanilla", "2", "41 42")
    print(f"SLURM sweep test: {time.monotonic() - t0:.0f} s after the cluster came up")
