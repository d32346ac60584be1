"""Adversarial programs against the real sandbox (and, where it imports, compute_reward).

Each program gets the knowledge an attacker could guess or leak (the trainer's pid, the
workers' pids, a listener's port, paths outside scratch) and tries to escape, stall,
forge a verdict or read secrets. For every one we check: the verdict is not correct, the
trainer and the workers are alive (same pids, a later job works), nothing it started
outlives the call, nothing outside scratch changed, no connection arrived, no secret left.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest

from _procs import idle_worker_problems, pids_with_uid
from vgrout.env import _sandbox_pool as pool_mod
from vgrout.env.sandbox import Job, Limits, run_jobs

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or os.uname().sysname != "Linux",
    reason="the hardened sandbox needs root on Linux",
)

LIM = Limits(wall_s=1.0, cpu_s=1, mem_mb=256, fsize_mb=2, nofile=32, nproc=16, output_bytes=20_000)
SECRET = "vgrout-secret-" + secrets.token_hex(8)
os.environ["VGROUT_ADV_SECRET"] = SECRET  # the trainer's environment: must never be readable
TOKEN = secrets.token_hex(6)
REPO = Path(__file__).resolve().parents[1]
SETUP = "from typing import *\n"
CANON = "class Solution:\n    def add(self, a: int, b: int) -> int:\n        return a + b\n"
GT = ("assert Solution().add(a = 1, b = 2) == 3", "assert Solution().add(a = 5, b = 9) == 14")
WRONG = "class Solution:\n    def add(self, a, b):\n        return a - b\n"

CORPUS: dict[str, str] = {
    "fork_bomb": "while True:\n    try: os.fork()\n    except OSError: pass\n",
    "thread_bomb": "import threading, time\nwhile True:\n    try: threading.Thread(target=time.sleep, args=(99,)).start()\n    except Exception: pass\n",
    "memory_bomb": "x = []\nwhile True: x.append(bytearray(10**7))\n",
    "infinite_loop": "while True: pass\n",
    "sleep_past_timeout": "import time\ntime.sleep(60)\n",
    "ignore_sigterm_sigint": "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass\n",
    "double_fork_daemon": (
        "import time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(3)\n"
        "        open(CANARY + '/pwned_' + TOKEN, 'w').write('late')\n    os._exit(0)\n"
    ),
    "subprocess_spawn": (
        "import subprocess\nsubprocess.Popen(['sleep', '30'], start_new_session=True)\n"
        "os.system('nohup sleep 30 >/dev/null 2>&1 &')\n"
    ),
    "huge_stdout": "import sys\nwhile True: sys.stdout.write('x' * 65536)\n",
    "huge_stderr": "import sys\nwhile True: sys.stderr.write('y' * 65536)\n",
    "giant_file": "with open('big', 'wb') as f:\n    while True: f.write(b'z' * 2**20)\n",
    "write_home": "open(os.path.join(HOME, 'pwned_' + TOKEN), 'w').write('x')\n",
    "write_repo": "open(os.path.join(REPO, 'pwned_' + TOKEN), 'w').write('x')\n",
    "write_tmp_and_canary": (
        "for p in ('/tmp/pwned_' + TOKEN, CANARY + '/pwned_' + TOKEN, CANARY + '/canary.txt'):\n"
        "    try: open(p, 'w').write('x')\n    except OSError as e: print(e)\n"
    ),
    "read_parent_proc": (
        "for pid in (TRAINER_PID, os.getppid(), 1, *WORKER_PIDS):\n"
        "    for f in ('environ', 'cmdline', 'status'):\n"
        "        try: print(open(f'/proc/{pid}/{f}', 'rb').read()[:2000])\n        except OSError as e: print(e)\n"
        "    try: print(os.listdir(f'/proc/{pid}/fd'))\n    except OSError as e: print(e)\n"
    ),
    "kill_parent_and_workers": (
        "import signal\nfor pid in (TRAINER_PID, os.getppid(), *WORKER_PIDS):\n"
        "    try: os.kill(pid, signal.SIGKILL)\n    except OSError as e: print(e)\n"
    ),
    "kill_minus_one": "import signal\ntry: os.kill(-1, signal.SIGKILL)\nexcept OSError as e: print(e)\n",
    "socket_connect_loopback": (
        "import socket\nfor fam, host in ((socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::1')):\n"
        "    try:\n        s = socket.socket(fam); s.settimeout(0.5); s.connect((host, PORT)); s.send(b'hi')\n"
        "    except OSError as e: print(e)\n"
    ),
    "socket_abstract_unix": (
        "import socket\ns = socket.socket(socket.AF_UNIX)\n"
        "try: s.connect('\\0vgrout-adv-' + TOKEN); s.send(b'hi')\nexcept OSError as e: print(e)\n"
    ),
    "ctypes_libc": (
        "import ctypes, signal\nlibc = ctypes.CDLL(None)\n"
        "libc.system(('touch /tmp/pwned_' + TOKEN + ' ' + CANARY + '/pwned_' + TOKEN).encode())\n"
        "print(libc.kill(TRAINER_PID, 9), libc.unshare(0x10000000), libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))\n"
    ),
    "ctypes_ptrace": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for pid in (TRAINER_PID, *WORKER_PIDS):\n    print(libc.ptrace(16, pid, 0, 0), ctypes.get_errno())\n"
    ),
    "patch_builtins": (
        "import builtins\nclass E(Exception): pass\nbuiltins.AssertionError = E\n"
        "builtins.isinstance = lambda *a: True\nbuiltins.type = lambda *a: int\nbuiltins.repr = lambda *a: '3'\n"
    ),
    "patch_sys_modules": (
        "import sys, types\nfake = types.ModuleType('os')\nfake.write = lambda fd, b: len(b)\n"
        "fake._exit = lambda c: None\nsys.modules['os'] = fake\nsys.modules['json'] = fake\n"
    ),
    "atexit_exit_zero": "import atexit\natexit.register(lambda: os._exit(0))\n",
    "os_exit_before_asserts": "os._exit(0)\n",
    "sys_exit_before_asserts": "import sys\nsys.exit(0)\n",
    "raise_systemexit_in_method": (
        "class Solution:\n    def add(self, a, b):\n        raise SystemExit(0)\n"
    ),
    "rigged_eq_object": (
        "class Any_:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
        "    def __repr__(self): return '3'\n"
        "class Solution:\n    def add(self, a, b): return Any_()\n"
    ),
    "rigged_int_subclass": (
        "class int(int):\n    def __eq__(self, o): return True\n    __hash__ = object.__hash__\n"
        "class Solution:\n    def add(self, a, b): return int(0)\n"
    ),
    "printed_markers": (
        "print('all tests passed'); print('PASS'); open('result.txt', 'w').write('PASS')\n"
        "os.write(3, b'int:3\\nint:14\\nPASS\\nall tests passed\\n')\n"
    ),
    "frame_walking": (
        "import sys, gc\nf = sys._getframe()\nwhile f is not None:\n"
        "    print(f.f_code.co_filename, sorted(f.f_globals)[:20], sorted(f.f_locals)[:20]); f = f.f_back\n"
        "print([o for o in gc.get_objects() if isinstance(o, dict) and 'expected' in o][:5])\n"
    ),
    "read_env_secret": (
        "print(dict(os.environ))\nfor d in os.listdir('/proc'):\n"
        "    try: print(open(f'/proc/{d}/environ', 'rb').read())\n    except OSError: pass\n"
        "try: print(open(f'/proc/{TRAINER_PID}/environ', 'rb').read())\nexcept OSError as e: print(e)\n"
    ),
    "run_tests_loophole": "def run_tests():\n    return True\nclass Solution:\n    def add(self, a, b): return 0\n    def run_tests(self): return True\n",
    "sentinel_forgery": "class Solution:\n    valid = True\n    def __init__(self): self.valid = True\n    def add(self, a, b): return 0\n",
    "close_fds_then_spin": "for fd in (0, 1, 2, 3):\n    os.close(fd)\nwhile True: pass\n",
    "seccomp_denied_calls": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x40000000), libc.setns(0, 0), libc.syscall(321, 0, 0, 0))\n"
        "print(libc.prctl(1, 0, 0, 0, 0))\n"
    ),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Start the pool, a canary dir in /tmp, and the listeners the programs aim at."""
    pool = pool_mod.get_pool(2)
    canary = tmp_path_factory.mktemp("adv_canary")
    (canary / "canary.txt").write_text("untouched")
    tcp = socket.socket(socket.AF_INET)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    tcp6 = socket.socket(socket.AF_INET6)
    tcp6.bind(("::1", tcp.getsockname()[1]))
    tcp6.listen(8)
    tcp6.setblocking(False)
    unix = socket.socket(socket.AF_UNIX)
    unix.bind("\0vgrout-adv-" + TOKEN)
    unix.listen(8)
    unix.setblocking(False)
    yield {
        "pool": pool,
        "canary": canary,
        "port": tcp.getsockname()[1],
        "listeners": (tcp, tcp6, unix),
    }
    for s in (tcp, tcp6, unix):
        s.close()


def untrusted(name: str, env: dict) -> str:
    """The program's text: leaked facts, then the attack, then (unless it defines one) a wrong Solution."""
    pool = env["pool"]
    head = (
        f"import os\nTOKEN = {TOKEN!r}\nTRAINER_PID = {os.getpid()}\nWORKER_PIDS = {list(pool.worker_pids)}\n"
        f"PORT = {env['port']}\nCANARY = {str(env['canary'])!r}\nREPO = {str(REPO)!r}\n"
        f"HOME = {os.path.expanduser('~')!r}\n"
    )
    body = CORPUS[name]
    return head + ("" if "class Solution" in body else WRONG) + body


# The trusted raw harness: type-checked results go to fd 3 in a fixed encoding; the verdict
# is decided here. Its helpers are bound before the untrusted code runs.
PROLOGUE = (
    "def _vg_enc(v, _t=type, _i=int, _w=__import__('os').write):\n"
    "    _w(3, (b'int:%d\\n' % v) if _t(v) is _i else b'bad\\n')\n"
)
EPILOGUE = "_vg_enc(Solution().add(a=1, b=2))\n_vg_enc(Solution().add(a=5, b=9))\n"
CORRECT_REPORT = b"int:3\nint:14\n"


def raw_verdict(out) -> bool:
    return out.status == "exited" and out.returncode == 0 and out.report == CORRECT_REPORT


def snapshot(env: dict) -> dict:
    """What the programs must not change: the canary dir, and the pwned_* paths they aim at."""
    c = env["canary"]
    aims = [
        c / f"pwned_{TOKEN}",
        Path("/tmp") / f"pwned_{TOKEN}",
        REPO / f"pwned_{TOKEN}",
        Path(os.path.expanduser("~")) / f"pwned_{TOKEN}",
    ]
    return {
        "canary": sorted((p.name, p.stat().st_mtime_ns, p.read_bytes()) for p in c.iterdir()),
        "canary_mtime": c.stat().st_mtime_ns,
        "aims": [p.exists() for p in aims],
    }


def assert_contained(env: dict, before: dict, outs) -> None:
    pool = env["pool"]
    assert pool.worker_pids == env["workers_before"], "a worker died"
    for w in pool.worker_pids:
        assert os.path.exists(f"/proc/{w}")
        assert idle_worker_problems(w) == []
    assert pids_with_uid(pool.uids) == [], "a sandbox-uid process outlived the call"
    assert snapshot(env) == before, "something outside scratch changed"
    for s in env["listeners"]:
        with pytest.raises(BlockingIOError):
            s.accept()
    for o in outs:
        assert SECRET not in o.stdout + o.stderr + o.report.decode("latin-1")
    later = run_jobs([Job("print(6*7)", limits=LIM)], workers=1)[0]
    assert later.stdout == "42\n" and later.ok


def test_raw_harness_control_is_correct(env):
    """The verdict can be true: a right answer through the same harness passes."""
    out = run_jobs([Job(PROLOGUE + SETUP + CANON + EPILOGUE, limits=LIM)], workers=1)[0]
    assert raw_verdict(out), out


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_adversarial_program_in_raw_sandbox(env, name):
    env["workers_before"] = list(env["pool"].worker_pids)
    before = snapshot(env)
    code = PROLOGUE + SETUP + untrusted(name, env) + "\n" + EPILOGUE
    out = run_jobs([Job(code, limits=LIM)], workers=1)[0]
    assert not raw_verdict(out), out
    assert out.status in ("exited", "signaled", "timeout", "memory", "output_limit"), out
    if name == "double_fork_daemon":
        time.sleep(3.5)  # give the would-be daemon time to act, had it survived
    assert_contained(env, before, [out])


def _rewards():
    try:
        from vgrout.env.rewards import compute_reward
    except Exception as e:  # noqa: BLE001 - the module is written in parallel
        pytest.skip(f"vgrout.env.rewards does not import yet ({type(e).__name__}: {e})")
    return compute_reward


@pytest.mark.parametrize("mode", ["run_tests", "gt_only"])
def test_reward_control_is_correct(env, mode):
    r = _rewards()(
        f"```python\n{CANON}```",
        canonical_solution=CANON,
        gt_tests=GT,
        setup_code=SETUP,
        func_name_hint="Solution().add",
        env_mode=mode,
        limits=LIM,
    )
    assert r.gt_correct, r


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_adversarial_program_through_compute_reward(env, name):
    compute_reward = _rewards()
    env["workers_before"] = list(env["pool"].worker_pids)
    before = snapshot(env)
    r = compute_reward(
        f"```python\n{untrusted(name, env)}\n```",
        canonical_solution=CANON,
        gt_tests=GT,
        setup_code=SETUP,
        func_name_hint="Solution().add",
        env_mode="run_tests",
        limits=LIM,
    )
    assert not r.gt_correct, r
    assert_contained(env, before, [])


# A stash job tries every way it can think of to leave something for the job after it on
# the same worker (say a plain-grader run, which sees the expected values, handing them to
# the strict oracle's run of the same completion); the next job looks in all those places.
STASH = (
    "import ctypes, os, socket, time\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "KEY, CREAT = 0x5647, 0o1000\n"
    "print('shm', libc.shmget(KEY, 4096, CREAT | 0o666), 'msg', libc.msgget(KEY, CREAT | 0o666),\n"
    "      'sem', libc.semget(KEY, 1, CREAT | 0o666))\n"
    "try: print('mq', libc.mq_open(b'/vgstash', os.O_CREAT | os.O_RDWR, 0o666, None))\n"
    "except AttributeError: print('mq', -1)\n"
    "open('stash.txt', 'w').write(TOKEN); os.chmod('.', 0o777)\n"
    "for p in ('../stash.txt', '/tmp/stash.txt', '/dev/shm/stash.txt', '/dev/mqueue/stash'):\n"
    "    try: open(p, 'w').write(TOKEN); print('WROTE', p)\n"
    "    except OSError: pass\n"
    "for i in range(100):\n"  # move the PID and inode counters (a later job reads them)
    "    import threading; t = threading.Thread(target=int); t.start(); t.join()\n"
    "    open(f'f{i}', 'w').close(); os.unlink(f'f{i}')\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        s = socket.socket(socket.AF_UNIX); s.bind('\\0vgstash'); s.listen(4); s.setblocking(False)\n"
    "        end = time.time() + 4\n"
    "        while time.time() < end:\n"
    "            for d in os.listdir('..'):\n"
    "                try: open(os.path.join('..', d, 'stash.txt'), 'w').write(TOKEN)\n"
    "                except OSError: pass\n"
    "            try: s.accept()[0].send(TOKEN.encode())\n"
    "            except OSError: pass\n"
    "            time.sleep(0.01)\n"
    "    os._exit(0)\n"
    "time.sleep(0.2)\n"
)
LOOK = (
    "import ctypes, os, socket, time\n"
    "time.sleep(0.5)\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "KEY = 0x5647\n"
    "print('shm', libc.shmget(KEY, 0, 0), 'msg', libc.msgget(KEY, 0), 'sem', libc.semget(KEY, 0, 0))\n"
    "try: print('mq', libc.mq_open(b'/vgstash', os.O_RDONLY))\n"
    "except AttributeError: print('mq', -1)\n"
    "for d in ('.', '..', '/tmp', '/dev/shm'):\n"
    "    for root, _, files in os.walk(d):\n"
    "        for f in files:\n"
    "            try: print('FOUND', root, f, open(os.path.join(root, f)).read(64))\n"
    "            except OSError as e: print('seen', root, f, e.errno)\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "try: s.connect('\\0vgstash'); print('FOUND socket', s.recv(64))\n"
    "except OSError: print('no socket')\n"
    "lines = open('/proc/self/net/unix').read().splitlines()[1:]\n"
    "print('named sockets', [ln.split()[7:] for ln in lines if len(ln.split()) > 7])\n"
    "print('procs', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), os.getpid(), os.stat('.').st_ino)\n"
)


def test_nothing_passes_from_one_job_to_the_next(env):
    """Jobs on one worker share its zygote's namespaces one after another: the next job
    finds no IPC object, file, socket, process or moved counter of the one before."""
    env["workers_before"] = list(env["pool"].worker_pids)
    before = snapshot(env)
    token = "stash-" + secrets.token_hex(6)
    head = f"TOKEN = {token!r}\n"
    quiet = head + "import os\nprint('procs', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), os.getpid(), os.stat('.').st_ino)\n"
    slow = replace(LIM, wall_s=5.0, cpu_s=5)  # room for its hundred threads on a busy machine
    probe, stash, look = run_jobs(
        [Job(quiet, limits=LIM), Job(head + STASH, limits=slow), Job(head + LOOK, limits=LIM)],
        workers=1,
    )
    assert stash.ok and look.ok, (stash, look)
    assert stash.stdout.splitlines()[:2] == ["shm -1 msg -1 sem -1", "mq -1"], stash.stdout
    assert "WROTE" not in stash.stdout
    assert look.stdout.splitlines()[:2] == ["shm -1 msg -1 sem -1", "mq -1"], look.stdout
    assert token not in look.stdout and "FOUND" not in look.stdout, look.stdout
    assert "no socket" in look.stdout and "named sockets []" in look.stdout, look.stdout
    # PIDs and the scratch inode numbers start where they would after a quiet job
    assert look.stdout.splitlines()[-1] == probe.stdout.splitlines()[-1] == "procs [2] 2 1", look.stdout
    time.sleep(4)  # had the daemon survived, it would have written by now
    assert_contained(env, before, [look])


def test_a_socket_kept_alive_in_flight_is_gone_for_the_next_job(env):
    """A unix socket whose only reference is an fd of itself queued on itself outlives its
    process (until the kernel's unix GC happens to run), and its abstract name (~100 bytes)
    is readable by anyone in the network namespace; the worker sees it in /proc/net/unix
    after the job and gives the next jobs a fresh network namespace."""
    env["workers_before"] = list(env["pool"].worker_pids)
    before = snapshot(env)
    name = "vgkept-" + secrets.token_hex(6)
    kept = (
        "import array, socket\ng = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        f"g.bind('\\0{name}'); g.connect('\\0{name}')\n"
        "fds = array.array('i', [g.fileno()]).tobytes()\n"
        "g.sendmsg([b'x'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])\ng.close()\n"
    )
    look = (
        "lines = open('/proc/self/net/unix').read().splitlines()[1:]\n"
        "print([ln.split()[7:] for ln in lines if len(ln.split()) > 7])\n"
    )
    a, b = run_jobs([Job(kept, limits=LIM), Job(look, limits=LIM)], workers=1)
    assert a.ok and b.ok, (a, b)
    assert name not in b.stdout and b.stdout.strip() == "[]", b.stdout
    assert_contained(env, before, [b])
