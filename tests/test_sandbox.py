"""The sandbox's contract, on both backends, and the fork-server's own guarantees."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace

import pytest

from _procs import alive, children_of, idle_worker_problems, pids_with_uid
from vgrout.env import _sandbox_pool as pool_mod
from vgrout.env import _sandbox_worker as wire
from vgrout.env.sandbox import REPORT_FD, Job, Limits, Outcome, run_job, run_jobs

FAST = Limits(wall_s=2.0, cpu_s=2, mem_mb=256, fsize_mb=1, nofile=32, nproc=16, output_bytes=10_000)
ISOLATED = os.geteuid() == 0 and os.uname().sysname == "Linux"
# "forkserver_plain": the fork-server with its job zygote switched off (VGROUT_SANDBOX_ZYGOTE=0),
# the level a machine without root or namespaces gets: one plain fork of the worker per job
BACKENDS = ["forkserver", "forkserver_plain", "subprocess"]


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    if name != "forkserver_plain":
        yield name
        return
    monkeypatch.setenv("VGROUT_SANDBOX_ZYGOTE", "0")
    pool_mod.shutdown()
    try:
        pool = pool_mod.get_pool(2)
        assert not pool.level["pidns"] and not pool.level["ipcns"], pool.describe()
        assert any("VGROUT_SANDBOX_ZYGOTE=0" in n for n in pool.notes), pool.describe()
        if ISOLATED:
            assert pool.level["uid_switch"] and pool.level["seccomp"] and pool.level["mountns"]
        yield "forkserver"
        for w in pool.worker_pids:
            assert children_of(w) == []  # each job was reaped, nothing it started is left
    finally:
        monkeypatch.delenv("VGROUT_SANDBOX_ZYGOTE")
        pool_mod.shutdown()  # later tests get the zygote pool again


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_io_report_files_and_exit_codes(backend):
    jobs = [
        Job(
            "import sys\nprint('out', sys.stdin.read())\nprint('err', file=sys.stderr)\n"
            f"import os\nos.write({REPORT_FD}, b'rep')\nopen('a.txt','w').write('A')\n"
            "os.symlink('/etc/passwd', 'link')\nos.mkfifo('fifo')",
            stdin=b"hello",
            read_files=("a.txt", "link", "fifo", "missing", "../etc/passwd"),
            limits=FAST,
        ),
        Job("raise SystemExit(3)", limits=FAST),
        Job("import sys; sys.exit('bye')", limits=FAST),
        Job("1/0", limits=FAST),
        Job("print(__name__)", limits=FAST),
    ]
    a, b, c, d, e = run_jobs(jobs, workers=2, backend=backend)
    assert (a.status, a.returncode, a.ok) == ("exited", 0, True)
    assert a.stdout == "out hello\n" and a.stderr == "err\n" and a.report == b"rep"
    assert a.files == {"a.txt": b"A"}  # no symlink, no fifo, nothing outside scratch
    assert (b.returncode, b.ok) == (3, False)
    assert c.returncode == 1 and "bye" in c.stderr
    assert d.returncode == 1 and "ZeroDivisionError" in d.stderr and 'File "<program>"' in d.stderr
    assert e.stdout == "__main__\n"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bounds_give_clear_statuses(backend):
    jobs = [
        Job("while True: pass", limits=Limits(wall_s=0.6, cpu_s=5, mem_mb=256)),
        Job("while True: pass", limits=Limits(wall_s=5.0, cpu_s=1, mem_mb=256)),
        Job("import time; time.sleep(30)", limits=Limits(wall_s=0.5, mem_mb=256)),
        Job("print('x' * 100_000)", limits=FAST),
        Job("x = bytearray(400 * 2**20)", limits=FAST),
    ]
    t0 = time.monotonic()
    wall, cpu, sleep, out, mem = run_jobs(jobs, workers=2, backend=backend)
    assert time.monotonic() - t0 < 8
    assert wall.status == "timeout" and cpu.status == "timeout" and sleep.status == "timeout"
    assert 0.5 <= sleep.wall_s < 3
    assert out.status == "output_limit" and len(out.stdout) == FAST.output_bytes
    assert mem.status == "memory" and not mem.ok


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_results_keep_input_order(backend):
    jobs = [
        Job(f"import time; time.sleep({0.05 * (i % 3)}); print({i})", limits=FAST)
        for i in range(12)
    ]
    outs = run_jobs(jobs, workers=2, backend=backend)
    assert [o.stdout for o in outs] == [f"{i}\n" for i in range(12)]
    assert run_jobs([], backend=backend) == []


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_programs_compile_like_a_fresh_interpreter(backend):
    """No compiler flags leak from the sandbox's own modules (they use lazy annotations):
    an annotation naming an undefined name raises at def time, in the program and in
    code the program compiles itself."""
    jobs = [
        Job("def f(x: Undefined): pass", limits=FAST),
        Job("exec(compile('def g(y: Nope): pass', 's', 'exec'))", limits=FAST),
        Job("def f(:\n", limits=FAST),
    ]
    direct, nested, broken = run_jobs(jobs, workers=2, backend=backend)
    assert direct.returncode == 1 and "NameError: name 'Undefined'" in direct.stderr
    assert nested.returncode == 1 and "NameError: name 'Nope'" in nested.stderr
    assert broken.returncode == 1 and "SyntaxError" in broken.stderr


def test_compile_cache_keeps_runs_independent():
    """One program text run many times (the compile cache's case) starts from a fresh
    module every time, and a text too large for the cache still runs."""
    prog = "import sys\nG = globals()\nG['n'] = G.get('n', 0) + 1\nprint(G['n'], sys.stdin.read())"
    outs = run_jobs([Job(prog, stdin=str(i).encode(), limits=FAST) for i in range(6)], workers=2)
    assert [o.stdout for o in outs] == [f"1 {i}\n" for i in range(6)]
    big = "x = 1\n" * (wire.COMPILE_CACHE_MAX // 6 + 10) + "print(x)"
    assert len(big) > wire.COMPILE_CACHE_MAX
    assert run_jobs([Job(big, limits=FAST)], workers=1)[0].stdout == "1\n"


def test_shared_code_is_compiled_once_per_worker_and_handed_over():
    """A job's shared_code reaches the program compiled, as the same object for every job
    of a worker (compiled once, inherited by each fork); a text that does not compile is
    left out, and the reference backend hands over nothing (programs then compile)."""
    good, bad = ("40 + 2", "<t>", "eval"), ("1 +", "<b>", "eval")
    prog = (
        "pre = __vgrout_compiled__\nc = pre[('40 + 2', '<t>', 'eval')]\n"
        "print(eval(c), c.co_filename, id(c), list(pre) == [('40 + 2', '<t>', 'eval')])"
    )
    outs = run_jobs([Job(prog, limits=FAST, shared_code=(good, bad))] * 4, workers=1)
    assert all(o.ok for o in outs), outs[0]
    assert len({o.stdout for o in outs}) == 1 and outs[0].stdout.startswith("42 <t> ")
    assert outs[0].stdout.endswith(" True\n")
    ref = run_job(Job("print('__vgrout_compiled__' in globals())", shared_code=(good,)), backend="subprocess")
    assert ref.stdout == "False\n"


@pytest.mark.parametrize("backend", ["forkserver", "forkserver_plain"], indirect=True)
def test_namespaces_are_made_once_per_worker_from_imports_only(backend):
    """A job's import-only namespace texts reach the program as finished module dicts,
    made once per worker (the same object in every job) and private to each job (what one
    job writes into its copy, the next job does not see). A text that would run any module
    code, or is not only imports, is refused; so the module it names was never imported."""
    ok = ("from math import *\nimport json\nfrom collections import deque as dq\n", "mod1")
    refused = (
        ("import xml.dom.minidom\n", "m2"),  # not imported by the worker
        ("import json\nx = 1\n", "m3"),  # not only imports
        ("from __future__ import annotations\n", "m4"),
        ("from json import no_such_name\n", "m5"),
        ("from . import x\n", "m6"),  # relative
    )
    prog = (
        "import sys\nns = __vgrout_namespaces__\n"
        f"g = ns[{ok!r}]\n"
        "print(sorted(k[1] for k in ns), g['__name__'], g['sqrt'](16.0), g['dq'].__name__, "
        "g['json'].__name__, g['__builtins__'] is __builtins__, id(g), 'mark' in g, "
        "'xml.dom.minidom' in sys.modules)\n"
        "g['mark'] = 1\n"
    )
    outs = run_jobs([Job(prog, limits=FAST, namespaces=(ok, *refused))] * 3, workers=1, backend=backend)
    assert all(o.ok for o in outs), outs[0]
    assert len({o.stdout for o in outs}) == 1, [o.stdout for o in outs]
    head, tail = outs[0].stdout.split(" True ")
    assert head == "['mod1'] mod1 4.0 deque json" and tail.endswith(" False False\n")
    ref = run_job(Job("print('__vgrout_namespaces__' in globals())", namespaces=(ok,)), backend="subprocess")
    assert ref.stdout == "False\n"


def test_jobs_start_without_threading_but_threads_work():
    """The zygote leaves `threading` unimported (each fork would run its at-fork hook); a
    job that starts a thread still gets a fresh interpreter's exit: non-daemon threads are
    joined before the process ends."""
    prog = (
        "import sys\nprint('threading' in sys.modules)\nimport threading, time\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('late'))).start()\nprint('main')"
    )
    for backend in ("forkserver", "subprocess"):
        out = run_job(Job(prog, limits=FAST), backend=backend)
        assert out.ok and out.stdout.endswith("main\nlate\n"), (backend, out)
    assert run_job(Job(prog, limits=FAST)).stdout == "False\nmain\nlate\n"


def test_longest_wall_limit_runs_first():
    """Jobs are started longest wall limit first (input order among equals), so a long job
    does not start last and leave the other workers idle; results keep input order."""
    walls = (1.0, 3.0, 2.0, 3.0)
    jobs = [Job("import time; print(time.monotonic())", limits=replace(FAST, wall_s=w)) for w in walls]
    outs = run_jobs(jobs, workers=1)
    t = [float(o.stdout) for o in outs]
    assert t[1] < t[3] < t[2] < t[0], t


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="VGROUT_SANDBOX_BACKEND"):
        run_job(Job("pass"), backend="docker")  # type: ignore[arg-type]


def test_wire_roundtrip():
    frame = wire.pack({"a": 1}, [b"", b"xyz", bytes(range(256))])
    h, blobs = wire.unpack(frame[8:])
    assert h["a"] == 1 and blobs == [b"", b"xyz", bytes(range(256))]
    with pytest.raises(ValueError):
        wire.unpack(frame[8:] + b"!")


@pytest.mark.skipif(not ISOLATED, reason="full isolation needs root on Linux")
def test_forkserver_isolation_is_complete_here():
    pool = pool_mod.get_pool(2)
    assert all(pool.level.values()), pool.describe()
    probe = (
        "import os, socket\n"
        "print(os.getuid(), os.getgid(), os.getpid(), sorted(os.listdir('/proc/self/fd')))\n"
        "print(sorted(os.environ))\n"
        "print(os.listdir('.'), len([p for p in os.listdir('/proc') if p.isdigit()]))\n"
        "open('mine', 'w').write('x')\n"
        "for p in ('/tmp/x', os.path.expanduser('~/x'), '/etc/x', '..', '/tmp'):\n"
        "    try: open(os.path.join(p, 'x') if os.path.isdir(p) else p, 'w'); print('WROTE', p)\n"
        "    except OSError as e: print('blocked', e.errno)\n"
        "for f in ('environ', 'mem', 'maps', 'fd', 'stat', 'cmdline'):\n"
        "    try: (os.listdir if f == 'fd' else open)('/proc/1/' + f); print('READ', f)\n"
        "    except OSError as e: print('denied', e.errno)\n"
    )
    a, b = run_jobs([Job(probe, limits=FAST), Job(probe, limits=FAST)], workers=1)
    lines = a.stdout.splitlines()
    uid, gid, pid, fds = lines[0].split(" ", 3)
    # PID 1 is the job zygote, rewound after every job: each job is PID 2
    assert int(uid) in pool.uids and int(gid) in pool.uids and pid == "2"
    assert fds == "['0', '1', '2', '3', '4']"  # 4 is listdir's own handle on /proc/self/fd
    assert lines[1] == "['HOME', 'LANG', 'PATH', 'PYTHONHASHSEED']"
    assert lines[2] == "[] 1"  # fresh scratch every job; in /proc only itself (hidepid)
    assert "WROTE" not in a.stdout and a.stdout.count("blocked") == 5  # not even beside scratch
    # the root zygote is invisible: nothing of its memory, environment, fds or counters
    assert a.stdout.count("denied 2") == 6 and "READ" not in a.stdout
    assert b.stdout == a.stdout


@pytest.mark.skipif(not ISOLATED, reason="full isolation needs root on Linux")
@pytest.mark.parametrize("backend", ["forkserver_plain"], indirect=True)
def test_plain_fork_level_kills_what_escapes_the_job(backend):
    """Without a PID namespace a job's child can leave its process group with setsid; as
    root the worker still kills every process of the job's uid (its own) after the job."""
    escape = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nprint('done')"
    out = run_jobs([Job(escape, limits=FAST)], workers=1, backend=backend)[0]
    assert out.ok and out.stdout == "done\n", out
    assert pids_with_uid(pool_mod.get_pool(2).uids) == []


@pytest.mark.skipif(not ISOLATED, reason="full isolation needs root on Linux")
def test_workers_respawn_and_nothing_leaks():
    pool = pool_mod.get_pool(2)
    run_jobs([Job("pass", limits=FAST)] * 4, workers=2)
    victim = pool.worker_pids[0]
    (zygote,) = children_of(victim)
    os.kill(victim, signal.SIGKILL)
    outs = run_jobs([Job("print(1)", limits=FAST) for _ in range(6)], workers=2)
    # the job that met the dead worker may be a sandbox_error; afterwards it is replaced
    assert sum(o.stdout == "1\n" for o in outs) >= 5
    assert victim not in pool.worker_pids
    assert all(o.ok for o in run_jobs([Job("print(1)", limits=FAST)] * 4, workers=2))
    assert not alive(zygote)  # its zygote died with it (parent-death signal)
    for w in pool.worker_pids:
        assert idle_worker_problems(w) == []
    assert pids_with_uid(pool.uids) == []


@pytest.mark.skipif(not ISOLATED, reason="full isolation needs root on Linux")
def test_concurrent_callers_share_the_pool():
    results: dict[int, list[Outcome]] = {}

    def call(k: int) -> None:
        results[k] = run_jobs([Job(f"print({k}*{i})", limits=FAST) for i in range(5)], workers=2)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [0, 1, 2, 3]
    for k, outs in results.items():
        assert [o.stdout for o in outs] == [f"{k * i}\n" for i in range(5)]
