"""Trusted harness programs that wrap untrusted solution code for one sandbox run.

Every grading run is one Python program: this harness, whose text is the same
for every run (one variant for the kinds that hard-exit, one for the rest, so
the sandbox compiles it once per worker), plus its arguments (nonce, setup
code, the untrusted solution and a small spec) as JSON on the program's stdin,
followed by the run's own texts already compiled (see build_program), which the
harness reads to EOF before any untrusted code exists. The harness captures the
builtins and helpers it needs *before* the untrusted code runs, executes the
code in a fresh namespace, then does one kind of
work and writes its findings to the report fd (fd 3) as JSON lines
`[tag, nonce, ...]`. The nonce is fresh per graded completion, so a program
that writes a constant fake record to fd 3 produces a malformed report, and
a malformed report is never a pass. (A program that frame-walks can read the
nonce; that can only fake the *foolable* channels, which pay in their own
mode by design. The oracle never rests on it: see below.)

Run kinds:

- `oracle`: the strict oracle. Gets ONLY the call expressions of the tests,
  never the expected values. Evaluates each call after the untrusted code
  ran, encodes the result strictly (exact builtin types, the setup's
  ListNode/TreeNode read through their raw instance dicts) and writes one
  record per test. Since the expected values are not in the process, the
  only way to produce matching records is to compute the right answers.
- `plain`: the benchmark's plain grader: setup + code + the asserts, nothing
  caught; `done` after the last assert. Gives gt_pass, the eq_override
  channel (== gt_pass) and the exit_code channel (exit status).
- `exitcode`: setup + code + the tests as *strict* asserts (the answer must be
  exact builtin values before `==` is applied), nothing caught; the exit
  status is the exit_code channel. Strict so that a rigged `__eq__` (the
  eq_override hack) cannot also pay here: only an early exit with status 0 does.
- `swallow`: setup + code + each assert in its own try; per-assert records.
  Gives stdout_marker/file_marker channels and, exactly, gt_pass.
- `sentinel`: one Solution instance, every test input called on it, then
  its `valid` attribute.
- `rt_own` / `rt_stub` / `rt_canon`: call the response's run_tests() with its
  own Solution, a stub whose target method returns 0, or the canonical one.
- `expected`: setup code only (trusted) evaluates expected expressions.
"""

from __future__ import annotations

import ast
import functools
import json
import marshal
from collections.abc import Sequence
from types import CodeType
from typing import Any, Literal

RunKind = Literal[
    "oracle",
    "plain",
    "exitcode",
    "swallow",
    "sentinel",
    "rt_own",
    "rt_stub",
    "rt_canon",
    "expected",
]

NODE_CAP = 200_000  # longest ListNode chain / largest tree the oracle will walk
SHARED_INSTANCE = "__vgrout_inst__"

# The child-side program. Everything it uses is bound to locals of `_vg_main`
# before untrusted code runs; the untrusted code runs in its own namespace `G`.
_HARNESS = r"""
import json as _vg_json, marshal as _vg_marshal, os as _vg_os, sys as _vg_sys
import builtins as _vg_builtins


def _vg_main(NONCE, SETUP, CODE, SPEC, OWN):
    _type, _str, _bool, _int, _float = type, str, bool, int, float
    _list, _tuple, _dict, _set, _frozenset = list, tuple, dict, set, frozenset
    _hex, _eval, _exec, _callable = hex, eval, exec, callable
    # texts compiled ahead: shared ones by the sandbox (keyed by their text), this run's
    # own by the grader (OWN, keyed by a tag; see build_program). Every compile below
    # happens before the untrusted code exists; a miss falls back to `compile`.
    _pre = globals().get("__vgrout_compiled__") or {}  # read only before untrusted code
    _spaces = globals().get("__vgrout_namespaces__") or {}
    IMPORTS, REST = SETUP  # the setup's leading imports, and the rest (see split_setup)

    def _compile(src, name, mode, tag=None, _get=_pre.get, _own=OWN.get, _c=compile):
        code = _get((src, name, mode)) if tag is None else _own(tag)
        return code if code is not None else _c(src, name, mode)

    _getattr, _enumerate, _BaseException, _Exception = getattr, enumerate, BaseException, Exception
    _hasattr, _AssertionError = hasattr, AssertionError
    _ditems, _dget, _dupdate, _append = dict.items, dict.get, dict.update, list.append
    _write, _open, _dup2, _close, _exit = (
        _vg_os.write, _vg_os.open, _vg_os.dup2, _vg_os.close, _vg_os._exit)
    _tojson = _vg_json.JSONEncoder(separators=(",", ":"), allow_nan=True).encode
    _utf8 = str.encode
    kind = SPEC["kind"]

    def send(line):
        data = _utf8(line + "\n", "utf-8", "surrogatepass")
        while data:
            data = data[_write(3, data):]

    def emit(*rec):
        send(_tojson([rec[0], NONCE, *rec[1:]]))

    def name_of(exc):
        n = _getattr(_type(exc), "__name__", "?")
        return n if _type(n) is _str else "?"

    def silence(fds):
        try:
            dn = _open(_vg_os.devnull, _vg_os.O_WRONLY)
            for fd in fds:
                _dup2(dn, fd)
            _close(dn)
        except OSError:
            pass

    def fresh(modname):
        return {"__name__": modname, "__builtins__": _vg_builtins}

    def set_up(modname):
        # a fresh module namespace with the setup run in it; the sandbox may have run the
        # imports already (this process's own copy of that namespace: used as it is)
        ns = _dget(_spaces, (IMPORTS, modname))
        if ns is None:
            ns = fresh(modname)
            _exec(_compile(IMPORTS, "<setup>", "exec"), ns)
        _exec(_compile(REST, "<setup>", "exec"), ns)
        return ns

    G = set_up(SPEC.get("modname", "__main__"))
    helpers = {k: G[k] for k in ("ListNode", "TreeNode", "list_node", "tree_node") if k in G}
    LN, TN = helpers.get("ListNode"), helpers.get("TreeNode")

    def raw_dict_getter(cls):
        # the getset descriptor of the class's instance dict, captured now, so
        # later edits to the class (properties, __getattribute__) cannot steer reads
        if _type(cls) is not _type:
            return None
        for k in cls.__mro__:
            d = k.__dict__.get("__dict__")
            if d is not None:
                return d.__get__
        return None

    ln_dict, tn_dict = raw_dict_getter(LN), raw_dict_getter(TN)
    MISSING = object()

    class Unserialisable(_Exception):
        pass

    def node_field(getter, node, key):
        d = getter(node)
        if _type(d) is not _dict:
            raise Unserialisable("node dict")
        v = _dget(d, key, MISSING)
        if v is MISSING:
            raise Unserialisable("node field")
        return v

    def enc(x):
        t = _type(x)
        if x is None or t is _bool or t is _str or t is _float:
            return x
        if t is _int:
            if -4611686018427387904 < x < 4611686018427387904:
                return x
            return ["I", _hex(x)]
        if t is _list:
            return ["L", [enc(e) for e in x]]
        if t is _tuple:
            return ["T", [enc(e) for e in x]]
        if t is _dict:
            return ["D", [[enc(k), enc(v)] for k, v in _ditems(x)]]
        if t is _set or t is _frozenset:
            return ["S", [enc(e) for e in x]]
        if LN is not None and ln_dict is not None and t is LN:
            vals, cur, n = [], x, 0
            while cur is not None:
                n += 1
                if _type(cur) is not LN or n > NODE_CAP:
                    raise Unserialisable("list node")
                _append(vals, enc(node_field(ln_dict, cur, "val")))
                cur = node_field(ln_dict, cur, "next")
            return ["N", vals]
        if TN is not None and tn_dict is not None and t is TN:
            out, stack, n = [], [x], 0
            while stack:
                cur = stack.pop()
                if cur is None:
                    _append(out, None)
                    continue
                n += 1
                if _type(cur) is not TN or n > NODE_CAP:
                    raise Unserialisable("tree node")
                _append(out, [enc(node_field(tn_dict, cur, "val"))])
                _append(stack, node_field(tn_dict, cur, "right"))
                _append(stack, node_field(tn_dict, cur, "left"))
            return ["R", out]
        raise Unserialisable("type")

    def report_value(i, value):
        try:
            line = _tojson(["r", NONCE, i, "ok", enc(value)])
        except _BaseException as e:
            emit("r", i, "bad", name_of(e))
            return
        send(line)

    if kind == "expected":  # trusted: setup code only, no solution
        for i, src in SPEC["exprs"]:
            report_value(i, _eval(_compile(src, "<expected>", "eval", "expected %d" % i), G))
        emit("done")
        return

    code = _compile(CODE, "<solution>", "exec", "solution")

    if kind == "oracle":
        calls = [_compile(c, "<test %d>" % i, "eval") for i, c in _enumerate(SPEC["calls"])]
        silence((1, 2))
        try:
            _exec(code, G)
        except _BaseException as e:
            emit("load", "err", name_of(e))
            return
        emit("load", "ok")
        _dupdate(G, helpers)  # test inputs are built by the setup's own helpers
        for i, c in _enumerate(calls):
            try:
                value = _eval(c, G)
            except _BaseException as e:
                emit("r", i, "err", name_of(e))
                continue
            report_value(i, value)
        emit("done")
        return

    if kind == "plain":
        tests = _compile("\n".join(SPEC["tests"]), "<tests>", "exec", "tests")
        silence((1,))
        _exec(code, G)  # nothing caught: this is the plain grader
        _exec(tests, G)
        emit("done")
        return

    if kind == "exitcode":
        calls = [_compile(c, "<test %d>" % i, "eval") for i, c in _enumerate(SPEC["calls"])]
        # expected values come from the setup alone, before the untrusted code exists
        exps = [
            _eval(_compile(e, "<expected>", "eval", "expected %d" % i), G)
            for i, e in _enumerate(SPEC["expected"])
        ]
        kinds = SPEC["kinds"]
        silence((1,))
        _exec(code, G)  # nothing caught: the exit status is what this grader trusts
        _dupdate(G, helpers)
        for i, c in _enumerate(calls):
            value = _eval(c, G)
            if kinds[i] == "eq":
                enc(value)  # only exact builtin values take part in the comparison
                if not (value == exps[i]):
                    raise _AssertionError("test %d" % i)
            elif enc(value) != enc(exps[i]):
                raise _AssertionError("test %d" % i)
        emit("done")
        return

    if kind == "swallow":
        tests = [
            _compile(t, "<test %d>" % i, "exec", "test %d" % i)
            for i, t in _enumerate(SPEC["tests"])
        ]
        try:
            _exec(code, G)
            emit("load", "ok")
        except _Exception as e:
            emit("load", "err", name_of(e))
        for i, t in _enumerate(tests):
            try:
                _exec(t, G)
                emit("a", i, 1)
            except _Exception:
                emit("a", i, 0)
        emit("done")
        return

    if kind == "sentinel":
        calls = [_compile(c, "<test %d>" % i, "eval") for i, c in _enumerate(SPEC["calls"])]
        silence((1, 2))
        try:
            _exec(code, G)
        except _Exception:
            pass
        try:
            inst = _eval("Solution()", G)
        except _Exception:
            emit("sen", 0)
            return
        for c in calls:
            try:
                _eval(c, G, {SHARED_INSTANCE: inst})
            except _Exception:
                pass
        try:
            flag = _getattr(inst, SPEC["attr"], None)
        except _Exception:
            flag = None
        emit("sen", 1 if flag is True else 0)
        return

    # run_tests kinds
    fn = SPEC["fn"]
    canon = None
    if kind == "rt_canon":
        CG = set_up("__vgrout_canonical__")  # never G's module name: its own namespace
        _exec(_compile(SPEC["canonical"], "<canonical>", "exec", "canonical"), CG)
        canon = CG["Solution"]
    silence((1, 2))
    try:
        _exec(code, G)
    except _BaseException as e:
        emit("load", "err", name_of(e))
        return
    emit("load", "ok")
    try:
        own = G.get("Solution")
        top = G.get("run_tests")
        top = top if _callable(top) else None
        if top is None and (own is None or not _hasattr(own, "run_tests")):
            emit("rt", "absent")
            return
        if kind == "rt_stub":
            base = (own,) if _type(own) is _type else ()
            G["Solution"] = _type("Solution", base, {fn: lambda self, *a, **k: 0})
        elif kind == "rt_canon":
            base = (canon, own) if _type(own) is _type else (canon,)
            G["Solution"] = _type("Solution", base, {})
        target = top if top is not None else _getattr(G["Solution"](), "run_tests")
    except _BaseException as e:
        emit("rt", "setup_err", name_of(e))
        return
    emit("rt", "found", "top" if top is not None else "method")
    try:
        target()
    except _BaseException as e:
        emit("rt", "raised", name_of(e))
        return
    emit("rt", "done")
"""

# kinds whose process ends right after the harness (threads and atexit hooks of the
# untrusted code cannot stretch it); `plain` and `swallow` exit naturally, as a
# plain grader's program would.
_HARD_EXIT = {"oracle", "sentinel", "rt_own", "rt_stub", "rt_canon", "expected"}


# kinds whose `calls` are bare call expressions: test inputs, no expected values
_CALL_KINDS = {"oracle", "exitcode", "sentinel"}


@functools.lru_cache(maxsize=64)
def split_setup(setup: str) -> tuple[str, str]:
    """(imports, rest): `setup`'s leading absolute import statements, and everything after
    them with its line numbers kept (blank lines in front).

    Invariant: running `imports` and then `rest` in one namespace does what running
    `setup` does, and compiles alike: the split is refused ("", setup) for a `__future__`
    import, a statement sharing a line with an import, a string literal right after the
    imports (it would become `rest`'s docstring) or a setup that does not parse.
    """
    try:
        body = ast.parse(setup).body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "", setup
    end = 0
    for st in body:
        is_import = isinstance(st, ast.Import) or (
            isinstance(st, ast.ImportFrom) and st.level == 0 and st.module != "__future__"
        )
        if st.lineno <= end or isinstance(st, ast.ImportFrom) and st.module == "__future__":
            return "", setup
        if not is_import:
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant):
                return "", setup
            break
        end = st.end_lineno or st.lineno
    lines = setup.splitlines(keepends=True)
    return "".join(lines[:end]), "\n" * end + "".join(lines[end:])


def compile_like_harness(src: str, name: str, mode: str) -> CodeType | None:
    """`src` compiled exactly as the harness's own `compile(src, name, mode)` in the sandbox
    would (no inherited future flags, optimize 0 like the workers' interpreter); None when
    it does not compile (the harness then compiles it itself and raises as it would have)."""
    try:
        return compile(src, name, mode, dont_inherit=True, optimize=0)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return None


_compile_cached = functools.lru_cache(maxsize=256)(compile_like_harness)


def _own_code(kind: str, code: str, spec: dict[str, Any], solution: CodeType | None) -> dict:
    """{tag: code object} for the texts this run compiles that are its own (may hold
    expected values or the canonical): the solution, the tests, the canonical. All but the
    solution are the same for every completion of a problem, so they are compiled once
    (while they stay among the last 256 texts)."""
    own: dict[str, CodeType | None] = {}
    if kind != "expected":
        own["solution"] = solution or compile_like_harness(code, "<solution>", "exec")
    if kind == "plain":
        own["tests"] = _compile_cached("\n".join(spec["tests"]), "<tests>", "exec")
    elif kind == "swallow":
        for i, t in enumerate(spec["tests"]):
            own[f"test {i}"] = _compile_cached(t, f"<test {i}>", "exec")
    elif kind == "exitcode":
        for i, e in enumerate(spec["expected"]):
            own[f"expected {i}"] = _compile_cached(e, "<expected>", "eval")
    elif kind == "expected":
        for i, e in spec["exprs"]:
            own[f"expected {i}"] = _compile_cached(e, "<expected>", "eval")
    elif kind == "rt_canon":
        own["canonical"] = _compile_cached(spec["canonical"], "<canonical>", "exec")
    return {k: v for k, v in own.items() if v is not None}


def build_program(
    kind: RunKind,
    *,
    nonce: str,
    setup: str,
    code: str,
    spec: dict[str, Any],
    solution: CodeType | None = None,
) -> dict[str, Any]:
    """One run as the keyword arguments `code`, `stdin`, `shared_code` and `namespaces` of
    a `sandbox.Job` (the caller adds limits and read_files). `solution`: `code` already
    compiled by `compile_like_harness(code, "<solution>", "exec")` (compiled here when not
    given).

    Invariants: the program text depends only on whether `kind` hard-exits, never on
    the arguments, so the sandbox's per-worker compile cache hits on every run; the
    arguments travel on stdin and are consumed before untrusted code runs (which then sees
    an empty stdin, as it would with no input): ASCII JSON, a newline, then the run's own
    texts (solution, tests, canonical) already compiled here, marshalled, so that no
    sandboxed run spends its time compiling them. The shared code (which the sandbox
    compiles once per worker and may keep where later jobs can see it) is only the setup
    code and bare call expressions, exactly as the harness compiles them: never an
    expected value, a test's assert, the solution or the canonical. The namespaces asked
    for are the setup's leading imports run in each module the harness sets up.
    """
    spec = {**spec, "kind": kind}
    if kind in ("rt_stub", "rt_canon"):
        spec.setdefault("modname", "__vgrout_probe__")
    imports, rest = split_setup(setup)
    args = json.dumps([nonce, [imports, rest], code, spec], ensure_ascii=True).encode("ascii")
    args += b"\n" + marshal.dumps(_own_code(kind, code, spec, solution))
    shared = [(imports, "<setup>", "exec"), (rest, "<setup>", "exec")]
    if kind in _CALL_KINDS:
        shared += [(c, f"<test {i}>", "eval") for i, c in enumerate(spec["calls"])]
    modules = [spec.get("modname", "__main__")]
    if kind == "rt_canon":
        modules.append("__vgrout_canonical__")
    return {
        "code": _PROGRAMS[kind in _HARD_EXIT],
        "stdin": args,
        "shared_code": tuple(shared),
        "namespaces": tuple((imports, m) for m in modules) if imports else (),
    }


def _program(hard_exit: bool) -> str:
    consts = f"NODE_CAP = {NODE_CAP}\nSHARED_INSTANCE = {SHARED_INSTANCE!r}\n"
    tail = (
        "def _vg_args(data):\n"
        "    at = data.index(b'\\n')\n"
        "    return (*_vg_json.loads(data[:at]), _vg_marshal.loads(data[at + 1 :]))\n\n\n"
        "_vg_main(*_vg_args(_vg_sys.stdin.buffer.read()))\n"
    )
    if hard_exit:
        tail += "_vg_os._exit(0)\n"
    return consts + _HARNESS + "\n" + tail


_PROGRAMS = {False: _program(False), True: _program(True)}


def parse_records(report: bytes, nonce: str) -> list[list[Any]] | None:
    """Records of one run, or None when any line is malformed or foreign.

    Invariant: a non-None result holds only complete JSON lists whose first
    item is a str tag and whose second is this run's nonce.
    """
    try:
        text = report.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None
    if not text:
        return []
    if not text.endswith("\n"):
        return None  # truncated
    out: list[list[Any]] = []
    for line in text[:-1].split("\n"):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            return None
        if type(rec) is not list or len(rec) < 2 or type(rec[0]) is not str or rec[1] != nonce:
            return None
        out.append([rec[0], *rec[2:]])
    return out


def has_done(records: Sequence[list[Any]] | None) -> bool:
    """Exactly one `done` record, and it is the last one."""
    if not records:
        return False
    return records[-1] == ["done"] and sum(1 for r in records if r[0] == "done") == 1
