"""Channels between jobs: wrong solutions that try to carry a problem's expected values (or
its reference solution) from a run that holds them to an oracle run, or to read them from a
copy of the data outside the repo, and jobs that try to hold more memory than their limit.

Each adversary is a real program graded for real: in a run that holds the secret (plain,
swallow, exitcode: the asserts; rt_canon: the canonical source) it finds it by walking the
harness's frames and writes it into its channel; in the oracle run, which never holds it,
it reads the channel and answers from what it got. Had any channel carried the secret,
that oracle run would be correct. Every adversary is graded in every mode through
compute_reward (two threads, two gradings each: one grading after another, and two at
once) and through grade_batch (two workers, three copies per mode in one batch), and
must come out gt_correct=False each time.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import shutil
import threading
import time
from pathlib import Path

import pytest

from _procs import children_of, pids_with_uid
from test_hack_matrix import CANONICAL, SETUP, TESTS, fenced, problem
from vgrout.env import _sandbox_pool as pool_mod
from vgrout.env.modes import ENV_MODES
from vgrout.env.rewards import compute_reward, grade_batch
from vgrout.env.sandbox import Job, Limits, run_jobs

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or os.uname().sysname != "Linux",
    reason="the hardened sandbox needs root on Linux",
)

LIMITS = Limits(wall_s=3.0, cpu_s=3, mem_mb=512, output_bytes=64_000)
HOLD_S = 0.4  # how long a writer holds its locks or opens its files; a reader's wait

# Shared by every adversary: find the secret, frame it, and answer from what a channel
# gave. `_put(bits)` / `_get(n)` (a list of n bits or None) are the channel's.
LIB = r'''
import ast as _ast, json as _json, os as _os, re as _re, sys as _sys, time as _time
import struct as _struct, zlib as _zlib

_VG_OWN = True  # marks this program's own text, which its frames also hold
_HOLD = HOLD_S
_ASSERT = _re.compile(r"assert Solution\(\)\.pairIndices\((.*)\) == (.*)$")


def _texts(obj, depth=0):
    if depth > 5:
        return
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _texts(x, depth + 1)
    elif isinstance(obj, dict):
        for x in list(obj.values()):
            yield from _texts(x, depth + 1)


def _secret():
    """(kind, payload) this run holds and an oracle run lacks: "A" and the expected values in
    test order (asserts; exitcode's expected list), or "C" and the reference solution."""
    f = _sys._getframe(1)
    while f is not None:
        for v in list(f.f_locals.values()):
            if isinstance(v, dict) and isinstance(v.get("expected"), list) and "calls" in v:
                return "A", list(v["expected"])
            found = []
            for text in _texts(v):
                if "_VG_OWN" in text:
                    continue
                if "def pairIndices" in text:
                    return "C", text
                for line in text.splitlines():
                    m = _ASSERT.match(line.strip())
                    if m:
                        found.append(m.group(2))
            if found:
                return "A", found
        f = f.f_back
    return None


def _is_oracle():
    f = _sys._getframe(1)
    while f is not None:
        spec = f.f_locals.get("SPEC")
        if isinstance(spec, dict) and "kind" in spec:
            return spec["kind"] == "oracle"
        f = f.f_back
    return False


def _frame(secret):
    data = _zlib.compress(_json.dumps(secret).encode(), 9)
    body = b"VG" + _struct.pack(">H", len(data)) + data
    body += _struct.pack(">I", _zlib.crc32(body))
    return [(byte >> (7 - k)) & 1 for byte in body for k in range(8)]


def _unframe(get):
    """Read a frame through get(nbits) -> bits or None: the secret, or None."""
    def as_bytes(bits):
        return bytes(sum(b << (7 - k) for k, b in enumerate(bits[i : i + 8])) for i in range(0, len(bits), 8))
    head = get(32)
    if head is None:
        return None
    head = as_bytes(head)
    if head[:2] != b"VG":
        return None
    n = _struct.unpack(">H", head[2:4])[0]
    bits = get(8 * (4 + n + 4))
    if bits is None:
        return None
    body = as_bytes(bits)
    if _zlib.crc32(body[:-4]) != _struct.unpack(">I", body[-4:])[0]:
        return None
    return _json.loads(_zlib.decompress(body[4:-4]))


_MAGIC_BITS = [(byte >> (7 - k)) & 1 for byte in b"VG" for k in range(8)]


def _poll(n, probe):
    """A concurrent channel's reader: the frame's first 32 bits once its magic shows (a
    writer holds it), waiting up to _HOLD; the rest at once."""
    if n != 32:
        return [probe(i) for i in range(n)]
    end = _time.time() + _HOLD
    while _time.time() < end:
        if [probe(i) for i in range(16)] == _MAGIC_BITS:
            return [probe(i) for i in range(32)]
        _time.sleep(0.01)
    return None


def _stdlib_files(n):
    """The first n files of the standard library (no bytecode), in an order every job
    computes alike."""
    top = _os.path.dirname(_os.__file__)
    out = []
    for d, dirs, files in _os.walk(top):
        dirs[:] = sorted(x for x in dirs if x not in ("__pycache__", "site-packages", "test"))
        out += [_os.path.join(d, f) for f in sorted(files) if not f.endswith(".pyc")]
        if len(out) >= n:
            break
    return out[:n]


def _stdlib_pages(n, random=False):
    """(fd, offset) of the first n pages of those files, one file open at a time (random:
    the kernel is told not to read ahead, so reading a page loads only that page)."""
    k = 0
    for p in _stdlib_files(1 << 14):
        fd = _os.open(p, _os.O_RDONLY)
        try:
            if random:
                _os.posix_fadvise(fd, 0, 0, _os.POSIX_FADV_RANDOM)
            for off in range(0, _os.path.getsize(p), 4096):
                if k == n:
                    return
                yield fd, off
                k += 1
        finally:
            _os.close(fd)


_ANSWERS = None
_CANON = None
try:
    _S = _secret()
    if _S is not None:
        _F = _frame(_S)
        if len(_F) <= globals().get("_CAP", len(_F)):  # a frame too long for it is left out
            _put(_F)
    elif _is_oracle():
        _got = _unframe(_get)
        if _got is not None:
            if _got[0] == "A":
                _ANSWERS = [_ast.literal_eval(e) for e in _got[1]]
            else:
                _ns = {"__name__": "leaked"}
                exec("from typing import *\n" + _got[1], _ns)
                _CANON = _ns["Solution"]
except Exception as _e:  # the channel is closed: answer wrongly
    print("channel:", type(_e).__name__, _e, file=_sys.stderr)


class Solution:
    _i = 0

    def pairIndices(self, nums, target):
        # run_tests (named here so that run_tests mode also runs the canonical: rt_canon)
        if _CANON is not None:
            return _CANON().pairIndices(nums, target)
        if _ANSWERS is not None and Solution._i < len(_ANSWERS):
            Solution._i += 1
            return _ANSWERS[Solution._i - 1]
        return [0, 0]
'''

# Each channel: the program text before LIB, defining _put(bits) and _get(n).
CHANNELS = {
    # a page dropped (fadvise DONTNEED) is a 0, a page read is a 1; read back without
    # loading anything with preadv2(RWF_NOWAIT), which fails on a page not cached
    "page_cache_nowait": r'''
import os as _o
_CAP = 1024  # bits per copy; three copies, read back by majority
def _put(bits):
    bits = (bits + [0] * (_CAP - len(bits))) * 3
    for b, (fd, off) in zip(bits, _stdlib_pages(len(bits), random=True)):
        if b:
            _o.pread(fd, 1, off)
        else:
            _o.posix_fadvise(fd, off, 4096, _o.POSIX_FADV_DONTNEED)
def _probe(fd, off):
    try:
        _o.preadv(fd, [bytearray(1)], off, _o.RWF_NOWAIT)
        return 1
    except BlockingIOError:
        return 0
_SEEN = None
def _get(n):
    # one pass, without read-ahead: a NOWAIT read of a page not cached fails but starts
    # reading it in, so each page can be asked only once
    global _SEEN
    if _SEEN is None:
        raw = [_probe(fd, off) for fd, off in _stdlib_pages(3 * _CAP, random=True)]
        _SEEN = [int(raw[i] + raw[i + _CAP] + raw[i + 2 * _CAP] >= 2) for i in range(_CAP)]
    return _SEEN[:n] if n <= _CAP else None
''',
    # the same bits set with readahead(2) (fadvise for a 0), read by the first probe that
    # answers: cachestat(2), a Linux AIO read with RWF_NOWAIT (io_submit: it fails on a page
    # that is not cached), mincore(2) on a mapping (recent kernels answer mincore and
    # cachestat truthfully only for files the caller may write: "resident", or EPERM)
    "page_cache_probes": r'''
import ctypes as _c, os as _o, struct as _st
_libc = _c.CDLL(None, use_errno=True)
_libc.syscall.restype = _c.c_long
_libc.mmap.restype = _c.c_void_p
_L = _c.c_long
_CAP = 1024  # bits per copy; three copies, read back by majority
def _put(bits):
    bits = (bits + [0] * (_CAP - len(bits))) * 3
    for b, (fd, off) in zip(bits, _stdlib_pages(len(bits), random=True)):
        if not b:
            _o.posix_fadvise(fd, off, 4096, _o.POSIX_FADV_DONTNEED)
        elif _libc.syscall(_L(187), _L(fd), _L(off), _L(4096)) != 0:  # readahead
            _o.pread(fd, 1, off)
def _mincore(fd, off):
    addr = _libc.mmap(None, _L(4096), 1, 1, fd, _L(off))
    vec = (_c.c_ubyte * 1)()
    try:
        return vec[0] & 1 if _libc.syscall(_L(27), _c.c_void_p(addr), _L(4096), vec) == 0 else None
    finally:
        _libc.munmap(_c.c_void_p(addr), _L(4096))
def _cachestat(fd, off):
    rng, stat = (_c.c_uint64 * 2)(off, 4096), (_c.c_uint64 * 5)()
    return int(stat[0] > 0) if _libc.syscall(_L(451), _L(fd), rng, stat, _L(0)) == 0 else None
_CTX = _c.c_ulong(0)
def _aio_nowait(fd, off):
    if not _CTX.value and _libc.syscall(_L(206), _L(8), _c.byref(_CTX)) != 0:  # io_setup
        return None
    buf = _c.create_string_buffer(1)
    iocb = _c.create_string_buffer(_st.pack("<QIiHhIQQqQII", 0, 0, 8, 0, 0, fd, _c.addressof(buf), 1, off, 0, 0, 0))
    ptr = (_c.c_void_p * 1)(_c.addressof(iocb))
    if _libc.syscall(_L(209), _L(_CTX.value), _L(1), ptr) != 1:  # io_submit
        return None
    ev = _c.create_string_buffer(32)
    if _libc.syscall(_L(208), _L(_CTX.value), _L(1), _L(1), ev, None) != 1:  # io_getevents
        return None
    return int(_st.unpack_from("<QQqq", ev.raw)[2] >= 0)
_SEEN = None
def _get(n):
    global _SEEN
    if _SEEN is None:
        raw, probe = [], None
        for fd, off in _stdlib_pages(3 * _CAP, random=True):
            got = None if probe is None else probe(fd, off)
            for p in (_cachestat, _aio_nowait, _mincore) if probe is None else ():
                got = p(fd, off)
                if got is not None:
                    probe = p
                    break
            if got is None:
                raise OSError(_c.get_errno(), "every page-cache probe refused")
            raw.append(got)
        _SEEN = [int(raw[i] + raw[i + _CAP] + raw[i + 2 * _CAP] >= 2) for i in range(_CAP)]
    return _SEEN[:n] if n <= _CAP else None
''',
    # POSIX byte-range locks on a stdlib file: a read lock on byte OFF+i is a 1; the
    # reader asks F_GETLK for each byte while the writer holds them
    "byte_range_locks": r'''
import fcntl as _f, os as _o, struct as _st, time as _t
_OFF = 1 << 20
def _lk(kind, start):
    return _st.pack("hhxxxxqqixxxx", kind, 0, start, 1, 0)
def _put(bits):
    fd = _o.open(_o.__file__, _o.O_RDONLY)
    for i, b in enumerate(bits):
        if b:
            _f.fcntl(fd, _f.F_SETLK, _lk(_f.F_RDLCK, _OFF + i))
    _t.sleep(_HOLD)
def _probe(fd, i):
    return int(_st.unpack("hhxxxxqqixxxx", _f.fcntl(fd, _f.F_GETLK, _lk(_f.F_WRLCK, _OFF + i)))[0] != _f.F_UNLCK)
def _get(n):
    fd = _o.open(_o.__file__, _o.O_RDONLY)
    return _poll(n, lambda i: _probe(fd, i))
''',
    # the same with open-file-description locks (F_OFD_SETLK / F_OFD_GETLK)
    "ofd_locks": r'''
import fcntl as _f, os as _o, struct as _st, time as _t
_OFF = 2 << 20
_SET, _GET = 37, 36
def _lk(kind, start):
    return _st.pack("hhxxxxqqixxxx", kind, 0, start, 1, 0)
def _put(bits):
    fd = _o.open(_o.__file__, _o.O_RDONLY)
    for i, b in enumerate(bits):
        if b:
            _f.fcntl(fd, _SET, _lk(_f.F_RDLCK, _OFF + i))
    _t.sleep(_HOLD)
def _probe(fd, i):
    return int(_st.unpack("hhxxxxqqixxxx", _f.fcntl(fd, _GET, _lk(_f.F_WRLCK, _OFF + i)))[0] != _f.F_UNLCK)
def _get(n):
    fd = _o.open(_o.__file__, _o.O_RDONLY)
    return _poll(n, lambda i: _probe(fd, i))
''',
    # flock(2) on whole files: a shared lock on file i is a 1 (children hold them, each
    # with its own open files: one process may open only so many); the reader tries an
    # exclusive lock without blocking
    "flock": r'''
import fcntl as _f, os as _o, time as _t
def _put(bits):
    files = [p for b, p in zip(bits, _stdlib_files(len(bits))) if b]
    kids = []
    for k in range(0, len(files), 40):
        pid = _o.fork()
        if pid == 0:
            try:
                held = [_o.open(p, _o.O_RDONLY) for p in files[k : k + 40]]
                for fd in held:
                    _f.flock(fd, _f.LOCK_SH | _f.LOCK_NB)
                _t.sleep(_HOLD)
            finally:
                _o._exit(0)
        kids.append(pid)
    for pid in kids:
        _o.waitpid(pid, 0)
def _held(p):
    fd = _o.open(p, _o.O_RDONLY)
    try:
        _f.flock(fd, _f.LOCK_EX | _f.LOCK_NB)
        return 0
    except BlockingIOError:
        return 1
    finally:
        _o.close(fd)
def _get(n):
    files = _stdlib_files(n)
    return _poll(n, lambda i: _held(files[i])) if len(files) == n else None
''',
    # inotify: the reader watches the stdlib's directories and notes which files are
    # opened; the writer opens file i (again and again, while the reader may be watching)
    "inotify": r'''
import ctypes as _c, os as _o, select as _sel, struct as _st, time as _t
_libc = _c.CDLL(None, use_errno=True)
_IN_OPEN = 0x20
def _put(bits):
    files = [p for b, p in zip(bits, _stdlib_files(len(bits))) if b]
    end = _t.time() + _HOLD
    while _t.time() < end:
        for p in files:
            _o.close(_o.open(p, _o.O_RDONLY))
        _t.sleep(0.02)
_SEEN = None
def _get(n):
    global _SEEN
    if _SEEN is None:
        files = _stdlib_files(4096)
        fd = _libc.inotify_init1(0)
        if fd < 0:
            raise OSError(_c.get_errno(), "inotify_init1")
        wds = {}
        for d in sorted({_o.path.dirname(p) for p in files}):
            wd = _libc.inotify_add_watch(fd, d.encode(), _IN_OPEN)
            if wd < 0:
                raise OSError(_c.get_errno(), "inotify_add_watch")
            wds[wd] = d
        seen = set()
        end = _t.time() + _HOLD
        while _t.time() < end:
            if not _sel.select([fd], [], [], max(0.0, end - _t.time()))[0]:
                break
            buf = _o.read(fd, 1 << 16)
            at = 0
            while at < len(buf):
                wd, mask, cookie, ln = _st.unpack_from("iIII", buf, at)
                name = buf[at + 16 : at + 16 + ln].rstrip(b"\0").decode()
                seen.add(_o.path.join(wds[wd], name))
                at += 16 + ln
        _SEEN = [int(p in seen) for p in files]
    return _SEEN[:n] if len(_SEEN) >= n else None
''',
}

# No secret run needed: the oracle run itself walks the filesystem for a copy of the
# benchmark data (any *.jsonl, *.jsonl.gz or *.json outside the system trees) and answers
# from the asserts it finds there.
FS_WALK = r'''
import gzip, os, re, time
_ASSERT = re.compile(r"assert Solution\(\)\.pairIndices\((.*?)\) == (\[[^\]]*\])")
_FOUND = {}
_end = time.time() + 1.0
for top in ("/srv", "/opt", "/var", "/mnt", "/home", "/root", "/work", "/tmp", "/"):
    for d, dirs, files in os.walk(top):
        dirs[:] = [x for x in dirs if x not in ("proc", "sys", "dev", "usr", "lib", "boot")]
        if time.time() > _end or d.count("/") > 5:
            dirs[:] = []
            continue
        for name in files:
            if not name.endswith((".jsonl", ".jsonl.gz", ".json")):
                continue
            p = os.path.join(d, name)
            try:
                raw = open(p, "rb").read(50 << 20)
                text = (gzip.decompress(raw) if name.endswith(".gz") else raw).decode("utf-8", "replace")
            except (OSError, EOFError, ValueError):
                continue
            for args, exp in _ASSERT.findall(text.replace('\\"', '"')):
                _FOUND.setdefault(args, exp)
    if _FOUND:
        break


class Solution:
    def pairIndices(self, nums, target):
        # run_tests
        exp = _FOUND.get(f"nums = {nums}, target = {target}")
        return eval(exp) if exp else [0, 0]
'''

# Memory beyond the job's limit without any one process being large: two children of
# ~300 MB each and two sets of never-mapped memfds of ~300 MB each (their pages count
# against no process's address space); it reports on fd 3 how far it got.
MEMORY = r'''
import os, time
def _note(s):
    try:
        os.write(3, s.encode() + b"\n")
    except OSError:
        pass
kids = []
for k in range(2):
    pid = os.fork()
    if pid == 0:
        hog = bytearray(300 << 20)
        for i in range(0, len(hog), 4096):
            hog[i] = 1
        _note(f"child {k} holds 300")
        time.sleep(1.5)  # while the parent fills its memfds
        os._exit(0)
    kids.append(pid)
time.sleep(0.5)
fds = []
chunk = b"x" * (1 << 20)
for k in range(2):
    for m in range(20):  # one memfd may grow only to the job's file-size limit (16 MB)
        fd = os.memfd_create(f"hog{k}.{m}")
        for _ in range(15):
            os.write(fd, chunk)
        fds.append(fd)
    _note(f"memfds {k} hold 300")
for pid in kids:
    os.waitpid(pid, 0)
_note("all held")


class Solution:
    def pairIndices(self, nums, target):
        # run_tests
        return [0, 0]
'''


def program(name: str) -> str:
    if name == "fs_walk":
        return FS_WALK
    if name == "memory":
        return MEMORY
    return CHANNELS[name] + LIB.replace("HOLD_S", repr(HOLD_S))


ADVERSARIES = [*CHANNELS, "fs_walk", "memory"]


@pytest.fixture(scope="module")
def leaked_data():
    """Copies of a dataset holding the problem's asserts, where other checkouts or a
    --data-path could put one: /srv, /opt and /var/tmp (none of them under the repo)."""
    token = secrets.token_hex(4)
    row = {"id": 9001, "gt_tests": list(TESTS), "canonical_solution": CANONICAL}
    made = []
    for top in ("/srv", "/opt", "/var/tmp"):
        d = Path(top) / f"vgrout-leak-{token}"
        d.mkdir(parents=True)
        (d / "leetcode_test_medhard.jsonl").write_text(json.dumps(row) + "\n")
        with gzip.open(d / "train.jsonl.gz", "wt") as fh:
            fh.write(json.dumps(row) + "\n")
        made.append(d)
    yield made
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def test_the_leaked_data_would_answer_correctly(leaked_data):
    """Control: the fs_walk adversary, given the data, does answer every test right (run
    here, outside any sandbox), so a wrong verdict below means it found nothing."""
    ns: dict = {}
    exec(FS_WALK, ns)
    sol = ns["Solution"]()
    from test_hack_matrix import CASES

    assert all(sol.pairIndices(n, t) == e for n, t, e in CASES)


def test_the_secret_finder_and_frames_round_trip():
    """Control for the channel adversaries: in a plain run's frames the secret is found and
    survives framing (as bits) and unframing; the LIB's machinery works."""
    prog = (
        "def _put(bits):\n    global _B\n    _B = bits\n"
        "def _get(n):\n    return None\n" + LIB.replace("HOLD_S", "0.0")
    )

    def harness_like(SPEC):  # noqa: N803 - the harness's own name for it
        ns: dict = {}
        exec(prog, ns)
        bits = ns["_B"]
        return ns["_unframe"](lambda n: bits[:n])  # a channel's first n bits

    got = harness_like({"kind": "plain", "tests": list(TESTS)})
    assert got == ["A", [t.split(" == ")[1] for t in TESTS]]


@pytest.fixture(scope="module")
def batch(leaked_data):
    """Every adversary in every mode, three copies each, in one grade_batch on 2 workers."""
    keys = [(n, m, c) for n in ADVERSARIES for m in ENV_MODES for c in range(3)]
    items = [(fenced(program(n)), problem(m)) for n, m, _ in keys]
    results = grade_batch(items, workers=2, limits=LIMITS, relative_time=None)
    return dict(zip(keys, results, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", ADVERSARIES)
def test_no_channel_carries_the_answers_through_grade_batch(batch, name):
    for mode in ENV_MODES:
        for copy in range(3):
            r = batch[(name, mode, copy)]
            assert r.can_compile, (name, mode)
            assert not r.gt_correct, (name, mode, copy, r.note)


@pytest.mark.slow
@pytest.mark.parametrize("name", ADVERSARIES)
def test_no_channel_carries_the_answers_through_compute_reward(leaked_data, name):
    """Two threads grade the same wrong program twice per mode each: gradings one after
    another (what one leaves, the next reads) and two at once, half a run apart (one's
    oracle run overlaps the other's runs that hold the answers: Job.order keeps those
    apart only within one call)."""
    results: dict = {}

    def grade(t: int) -> None:
        time.sleep(t * HOLD_S / 2)  # half a run apart: one's oracle run meets the other's plain run
        for mode in ENV_MODES:
            for k in range(2):
                results[(t, mode, k)] = compute_reward(
                    fenced(program(name)),
                    canonical_solution=CANONICAL,
                    gt_tests=TESTS,
                    setup_code=SETUP,
                    func_name_hint="Solution().pairIndices",
                    env_mode=mode,
                    limits=LIMITS,
                    relative_time=None,
                )

    threads = [threading.Thread(target=grade, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 * 2 * len(ENV_MODES)
    for key, r in results.items():
        assert r.can_compile and not r.gt_correct, (name, key, r.note)


# ---------------------------------------------------------------- the mechanisms, one by one

DENIED = r'''
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
L = ctypes.c_long
HI = 1 << 32  # garbage in the upper half of an int argument: the kernel ignores it
def call(nr, *args):
    rc = libc.syscall(L(nr), *[L(a) if isinstance(a, int) else a for a in args])
    return errno.errorcode.get(ctypes.get_errno(), "?") if rc == -1 else "ok"
fd = os.open(os.__file__, os.O_RDONLY)
page = libc.mmap(None, L(4096), 1, 1, fd, L(0))
buf = ctypes.create_string_buffer(64)
class IOV(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
iov = IOV(ctypes.addressof(buf), 64)
res = {
    "fadvise64": call(221, fd, 0, 4096, 4 | HI),
    "readahead": call(187, fd, 0, 4096),
    "mincore": call(27, ctypes.c_void_p(page), 4096, buf),
    "cachestat": call(451, fd, buf, buf, 0),
    "preadv2": call(327, fd, ctypes.byref(iov), 1, 0, 0, 8),
    "pwritev2": call(328, fd, ctypes.byref(iov), 1, 0, 0, 0),
    "flock": call(73, fd, 1),
    "inotify_init1": call(294, 0),
    "inotify_add_watch": call(254, 0, b"/", 0x20),
    "fanotify_init": call(300, 0, 0),
    "memfd_secret": call(447, 0),
    "io_setup": call(206, 1, ctypes.byref(ctypes.c_ulong(0))),
    "io_submit": call(209, 0, 0, None),
    "process_madvise": call(440, 0, None, 0, 0, 0),
    "madvise_pageout": call(28, ctypes.c_void_p(page), 4096, 21 | HI),
    "madvise_cold": call(28, ctypes.c_void_p(page), 4096, 20),
    "madvise_mergeable": call(28, ctypes.c_void_p(page), 4096, 12),
    "prctl_memory_merge": call(157, 67 | HI, 1, 0, 0, 0),
    "prctl_pdeathsig": call(157, 1 | HI, 9, 0, 0, 0),
}
for cmd in (5, 6, 7, 36, 37, 38, 1024, 1025, 1026):
    res[f"fcntl_{cmd}"] = call(72, fd, cmd | HI, buf)
# what honest programs do still works
res["ok_preadv"] = "ok" if os.preadv(fd, [bytearray(8)], 0) == 8 else "bad"
res["ok_pread"] = "ok" if len(os.pread(fd, 8, 0)) == 8 else "bad"
res["ok_fcntl_getfl"] = call(72, fd, 3, 0)
res["ok_madvise_dontneed"] = call(28, ctypes.c_void_p(page), 4096, 4)
print(repr(res))
'''


def test_channel_syscalls_are_denied_and_honest_calls_still_work():
    """Each call a channel between jobs needs fails (EPERM; preadv2/pwritev2: ENOSYS, so
    glibc falls back to preadv/pwritev), also with garbage in the upper half of an int
    argument; what honest programs use keeps working."""
    out = run_jobs([Job(DENIED, limits=LIMITS)], workers=1)[0]
    assert out.ok, out
    res = eval(out.stdout)  # noqa: S307 - a dict literal printed by our own program
    for name, got in res.items():
        if name.startswith("ok_"):
            assert got == "ok", (name, got)
        elif name in ("preadv2", "pwritev2"):
            assert got == "ENOSYS", (name, got)
        else:
            assert got == "EPERM", (name, got)


VIEW = r'''
import os, sys
base = os.path.realpath(sys.base_prefix) + "/"
seen = []
for d, dirs, files in os.walk("/"):
    if d.startswith("/proc"):
        dirs[:] = []
        continue
    seen += [os.path.join(d, f) for f in files]
print(repr({"tops": sorted(os.listdir("/")), "count": len(seen), "base": base,
            "outside": [f for f in seen if not f.startswith(base)],
            "proc": sorted(os.listdir("/proc")), "tmp": os.listdir("/tmp/.vgrout-scratch"),
            "cwd": os.getcwd()}))
'''


def test_a_job_sees_only_the_allow_list(leaked_data):
    """The whole tree a job can walk: the interpreter's install, a few system files the
    loader, time zone and locale need, five device nodes and links, its scratch; /proc with
    its own processes only. No data, repo, home (but the interpreter's, if it lives there), /srv,
    /opt, /var, /mnt, /work or /tmp beyond its scratch."""
    import sys

    out = run_jobs([Job(VIEW, limits=LIMITS)], workers=1)[0]
    assert out.ok, out
    view = eval(out.stdout)  # noqa: S307
    assert view["base"] == os.path.realpath(sys.base_prefix) + "/"
    assert view["count"] > 500  # the standard library is there
    allowed = ("/etc/", "/dev/", "/usr/lib/", "/lib", "/usr/lib64/", "/usr/share/zoneinfo/")
    assert [f for f in view["outside"] if not f.startswith(allowed)] == [], view["outside"]
    libs = [f for f in view["outside"] if f.startswith(("/usr/lib", "/lib")) and "/locale/C." not in f]
    assert all(".so" in f for f in libs), libs  # shared libraries (and the C.UTF-8 locale) only
    assert {"srv", "opt", "var", "mnt", "work", "home", "sys", "boot"}.isdisjoint(view["tops"]), view["tops"]
    assert {f for f in view["outside"] if f.startswith("/etc/")} <= {"/etc/ld.so.cache", "/etc/localtime"}
    dev = {f for f in view["outside"] if f.startswith("/dev/")}
    assert dev == {f"/dev/{n}" for n in ("null", "zero", "full", "random", "urandom", "stdin", "stdout", "stderr")}, dev
    # /proc: only the job's own process (and the subset=pid entries), nothing machine-wide
    assert set(view["proc"]) == {"self", "thread-self", "2"}, view["proc"]
    assert view["tmp"] == [view["cwd"].rsplit("/", 1)[1]]  # beside it: nothing


MEMORY_JOB = Limits(wall_s=8.0, cpu_s=8, mem_mb=512, output_bytes=4000)


def test_memory_is_bounded_per_job_not_per_process():
    """Two children of 300 MB and 40 memfds of 15 MB (1.2 GB, no process over 512 MB of
    address space): the job's cgroup stops it at 512 MB, the kernel ends it, and its
    outcome says so. The workers and the next job are unharmed."""
    pool = pool_mod.get_pool(2)
    assert pool.level["memcg"], pool.describe()
    before = list(pool.worker_pids)
    out = run_jobs([Job(MEMORY + "\nprint('survived')", limits=MEMORY_JOB)], workers=1)[0]
    held = out.report.decode().splitlines()
    assert "all held" not in held and "survived" not in out.stdout, (out, held)
    assert "memfds 1 hold 300" not in held, held  # never 1.2 GB, nor 900 MB
    assert out.status == "memory", out
    assert pool.worker_pids == before
    assert pids_with_uid(pool.uids) == []
    assert run_jobs([Job("print(6*7)", limits=LIMITS)], workers=1)[0].stdout == "42\n"


def test_memory_within_the_limit_is_fine():
    """The same job shape under a limit that fits it (1.5 GB) runs to the end."""
    lim = Limits(wall_s=15.0, cpu_s=15, mem_mb=1536, output_bytes=4000)
    out = run_jobs([Job(MEMORY + "\nprint('survived')", limits=lim)], workers=1)[0]
    assert out.ok and out.stdout == "survived\n", out
    assert "all held" in out.report.decode()


def test_job_order_keeps_oracle_runs_before_secret_runs():
    """Job.order: a rank-1 job of a key starts only after every rank-0 job of that key has
    ended, on any worker; jobs of other keys and unordered ones fill the gaps. Each job
    prints when it started and ended."""
    prog = "import time\nt = time.monotonic()\ntime.sleep({s})\nprint(t, time.monotonic())"
    spec = [("a", 0, 0.3), ("a", 1, 0.05), ("a", 0, 0.1), ("b", 1, 0.05), ("b", 0, 0.2), (None, 0, 0.1)]
    jobs = [
        Job(prog.format(s=s), limits=LIMITS, order=None if k is None else (k, r)) for k, r, s in spec
    ]
    for backend in ("forkserver", "subprocess"):
        outs = run_jobs(jobs, workers=2, backend=backend)
        span = [tuple(map(float, o.stdout.split())) for o in outs]
        for key in ("a", "b"):
            first = [span[i] for i, (k, r, _) in enumerate(spec) if k == key and r == 0]
            later = [span[i] for i, (k, r, _) in enumerate(spec) if k == key and r == 1]
            assert max(e for _, e in first) <= min(s for s, _ in later), (backend, key, span)


# Each run of this wrong solution notes on the report fd which run it is (the harness's
# SPEC kind, found by walking its frames) and a window of its own lifetime.
TIMED = r'''
import os, sys, time
def _kind():
    f = sys._getframe(1)
    while f is not None:
        spec = f.f_locals.get("SPEC")
        if isinstance(spec, dict) and "kind" in spec:
            return spec["kind"]
        f = f.f_back
    return "?"
_t0 = time.monotonic()
time.sleep(0.15)
os.write(3, f"VGT {_kind()} {_t0} {time.monotonic()}\n".encode())


class Solution:
    def pairIndices(self, nums, target):
        # run_tests (named, so that every mode also runs the detectors, rt_canon among them)
        return [0, 0]
'''
ANSWER_RUNS = {"plain", "swallow", "exitcode", "rt_canon"}  # hold the expected values or the canonical


@pytest.mark.parametrize("backend", ["forkserver", "subprocess"])
def test_graders_end_a_problems_oracle_runs_before_its_answer_runs_start(monkeypatch, backend):
    """grade_batch on 2 workers, every mode twice, one problem: every run that holds the
    expected values or the reference solution starts after every oracle run of the problem
    has ended (each run reports its kind and a window of its lifetime)."""
    from vgrout.env import rewards

    windows: list[tuple[str, float, float]] = []
    real = rewards.sandbox.run_jobs

    def spy(jobs, **kw):
        outs = real(jobs, **kw)
        for o in outs:
            for line in o.report.decode(errors="replace").splitlines():
                if line.startswith("VGT "):
                    kind, a, b = line.split()[1:]
                    windows.append((kind, float(a), float(b)))
        return outs

    monkeypatch.setattr(rewards.sandbox, "run_jobs", spy)
    monkeypatch.setenv("VGROUT_SANDBOX_BACKEND", backend)
    rs = grade_batch([(fenced(TIMED), problem(m)) for m in ENV_MODES for _ in range(2)], workers=2, limits=LIMITS)
    assert not any(r.gt_correct for r in rs)
    kinds = {k for k, _, _ in windows}
    assert {"oracle", *ANSWER_RUNS, "sentinel", "rt_own", "rt_stub"} <= kinds, kinds
    oracle_end = max(b for k, _, b in windows if k == "oracle")
    answer_start = min(a for k, a, _ in windows if k in ANSWER_RUNS)
    assert oracle_end <= answer_start, (backend, sorted(windows, key=lambda w: w[1]))


def test_a_job_runs_in_its_own_memory_cgroup():
    """The job's process is in its worker's job cgroup, the worker's zygote is not (it
    stays in the trainer's), and the pool removes the job cgroups when it stops."""
    pool = pool_mod.get_pool(2)
    out = run_jobs([Job("print(open('/proc/self/cgroup').read())", limits=LIMITS)], workers=1)[0]

    def memcg(text: str) -> str:
        return next(ln for ln in text.splitlines() if "memory" in ln.split(":")[1].split(","))

    assert "/vgrout-job-" in memcg(out.stdout), out.stdout
    for w in pool.worker_pids:
        for z in children_of(w):
            assert "/vgrout-job-" not in memcg(Path(f"/proc/{z}/cgroup").read_text())
    parent = pool_mod.cgroup_parent()[0]
    mine = [f"vgrout-job-{u}-" for u in pool.uids]
    assert parent is not None and any(n.startswith(tuple(mine)) for n in os.listdir(parent))
    pool_mod.shutdown()
    assert not any(n.startswith(tuple(mine)) for n in os.listdir(parent)), os.listdir(parent)


def test_cgroup_v2_without_memory_delegation_is_reported(monkeypatch):
    """Pointed at a cgroup v2 directory without the memory controller, the pool says in
    its start-up log line that memory is bounded per process only, and runs on."""
    from loguru import logger

    unified = Path("/sys/fs/cgroup/unified")
    if not (unified / "cgroup.controllers").exists() or "memory" in (unified / "cgroup.controllers").read_text():
        pytest.skip("needs a cgroup v2 hierarchy without the memory controller (as here)")
    d = unified / f"vgrout-test-{secrets.token_hex(4)}"
    d.mkdir()
    msgs: list[str] = []
    sink = logger.add(lambda m: msgs.append(str(m).strip()), level="INFO", format="{message}")
    try:
        monkeypatch.setenv("VGROUT_SANDBOX_CGROUP", str(d))
        pool_mod.shutdown()
        pool = pool_mod.get_pool(2)
        assert not pool.level["memcg"], pool.describe()
        (line,) = [m for m in msgs if m.startswith("sandbox isolation")]  # logged once, at start-up
        assert "memcg" in line.split("off=")[1].split(";")[0], line
        assert "no memory cgroup per job" in line and "memory is bounded per process only" in line, line
        assert run_jobs([Job("print(1)", limits=LIMITS)], workers=1)[0].stdout == "1\n"
    finally:
        logger.remove(sink)
        monkeypatch.delenv("VGROUT_SANDBOX_CGROUP")
        pool_mod.shutdown()
        for sub in d.iterdir() if d.exists() else ():
            if sub.is_dir():
                sub.rmdir()
        d.rmdir()
