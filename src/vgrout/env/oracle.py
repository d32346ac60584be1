"""Parent-side half of the strict oracle: parse ground-truth asserts, decode results, compare.

The oracle splits every ground-truth test `assert <call> == <expected>` (or
`assert is_same_list(<call>, <expected>)` / `is_same_tree(...)`) into its two
expressions. Only the *call* expressions ever reach a sandboxed program that
also holds untrusted code (see `harness.py`); the expected expressions are
evaluated here, with `ast.literal_eval`, or, when they need the setup code
(`list_node([...])`, `-inf`), in a sandboxed program that holds setup code
only. Both sides arrive as the same strict tagged encoding and are decoded
here into plain builtin values, so every comparison runs on objects this
process built itself: no foreign `__eq__`, no subclass, no lazily computed
value can take part.

Encoding (JSON text, written by the child with builtins it captured before
the untrusted code ran):

    None, bool, str, float            -> the JSON value
    int                               -> JSON int, or ["I", hex] when large
    list / tuple / set|frozenset      -> ["L", [...]] / ["T", [...]] / ["S", [...]]
    dict                              -> ["D", [[key, value], ...]]
    setup ListNode chain              -> ["N", [val, ...]]
    setup TreeNode                    -> ["R", [null | [val], ...]]  (preorder, null = no child)

Anything else (a subclass included) never gets encoded: the child sends a
"bad" record for that test instead.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

CompareKind = Literal["eq", "same_list", "same_tree"]

_NODE_CHECKS: dict[str, CompareKind] = {"is_same_list": "same_list", "is_same_tree": "same_tree"}


@dataclass(frozen=True)
class GtTest:
    """One ground-truth assert split into what the child may see and what it may not."""

    source: str  # the assert statement as given
    call: str  # expression the child evaluates (the solution's answer)
    expected: str  # expression only trusted code evaluates
    kind: CompareKind


def parse_gt_test(source: str) -> GtTest:
    """Split `assert CALL == EXPECTED` / `assert is_same_list|is_same_tree(CALL, EXPECTED)`.

    Raises ValueError naming the test when it has any other shape: the oracle
    cannot judge such a test, and guessing would change the science.
    """
    try:
        tree = ast.parse(source.strip())
    except SyntaxError as e:
        raise ValueError(f"ground-truth test does not parse ({e.msg}): {source!r}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise ValueError(f"ground-truth test is not a single assert statement: {source!r}")
    test = tree.body[0].test
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
        return GtTest(source, ast.unparse(test.left), ast.unparse(test.comparators[0]), "eq")
    if (
        isinstance(test, ast.Call)
        and isinstance(test.func, ast.Name)
        and test.func.id in _NODE_CHECKS
        and len(test.args) == 2
        and not test.keywords
    ):
        kind = _NODE_CHECKS[test.func.id]
        return GtTest(source, ast.unparse(test.args[0]), ast.unparse(test.args[1]), kind)
    raise ValueError(
        "ground-truth test must be `assert CALL == EXPECTED` or "
        f"`assert is_same_list/is_same_tree(CALL, EXPECTED)`; got {source!r}"
    )


@lru_cache(maxsize=4096)
def parse_gt_tests(tests: tuple[str, ...]) -> tuple[GtTest, ...]:
    """Parse every test of a problem (cached: problems are graded many times)."""
    if not tests:
        raise ValueError("a problem needs at least one ground-truth test; got none")
    return tuple(parse_gt_test(t) for t in tests)


class _NoLiteral(Exception):
    pass


@lru_cache(maxsize=4096)
def literal_expected(tests: tuple[GtTest, ...]) -> tuple[tuple[int, Any], ...]:
    """(index, value) for every `eq` test whose expected side is a plain Python literal.

    The remaining tests (node builders, names such as `inf`) need the setup code and
    are evaluated in a sandboxed program without untrusted code.
    """
    out = []
    for i, t in enumerate(tests):
        if t.kind != "eq":
            continue
        try:
            out.append((i, ast.literal_eval(t.expected)))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
    return tuple(out)


def method_name(func_name_hint: str) -> str:
    """`Solution().fooBar` -> `fooBar`; ValueError for anything else."""
    head, _, name = func_name_hint.strip().rpartition(".")
    if head.replace(" ", "") != "Solution()" or not name.isidentifier():
        raise ValueError(
            f"func_name must look like 'Solution().methodName'; got {func_name_hint!r}"
        )
    return name


def on_shared_instance(call: str, inst_name: str) -> str:
    """Rewrite `Solution().f(args)` to `<inst_name>.f(args)` (other shapes unchanged).

    The sentinel grader calls every test input on ONE instance, whose `valid`
    attribute it then reads.
    """
    expr = ast.parse(call, mode="eval").body
    if (
        isinstance(expr, ast.Call)
        and isinstance(expr.func, ast.Attribute)
        and isinstance(expr.func.value, ast.Call)
        and isinstance(expr.func.value.func, ast.Name)
        and expr.func.value.func.id == "Solution"
        and not expr.func.value.args
        and not expr.func.value.keywords
    ):
        expr.func.value = ast.Name(inst_name, ast.Load())
        return ast.unparse(expr)
    return call


# ---------------------------------------------------------------- decoding


class MalformedRecord(ValueError):
    """A record the trusted harness could not have written."""


class Node:
    """A decoded ListNode chain or TreeNode; equal to nothing but itself under `==`.

    Under a plain `assert f() == list_node(...)` two distinct node objects are never
    equal (no `__eq__` in the setup classes), so identity semantics keep the oracle
    in step with the benchmark; `is_same_list` / `is_same_tree` compare `items`.
    """

    __slots__ = ("kind", "items")

    def __init__(self, kind: str, items: tuple):
        self.kind = kind
        self.items = items

    def __repr__(self) -> str:
        return f"Node({self.kind}, {self.items!r})"


def decode_value(obj: Any) -> Any:
    """Turn one encoded JSON value into plain builtins; MalformedRecord on anything unexpected,
    a value nested too deeply to decode included (untrusted code chooses the depth).

    Invariant: the result is built only from None, bool, int, float, str, list,
    tuple, dict, set/frozenset and `Node`, all created here.
    """
    try:
        return _decode(obj)
    except RecursionError:
        raise MalformedRecord("value nested too deeply to decode") from None


def _decode(obj: Any) -> Any:
    t = type(obj)
    if obj is None or t is bool or t is str or t is float or t is int:
        return obj
    if t is not list or len(obj) != 2 or type(obj[0]) is not str:
        raise MalformedRecord(f"not a tagged value: {str(obj)[:80]}")
    tag, body = obj
    if tag == "I":
        if type(body) is not str:
            raise MalformedRecord("bad big int")
        try:
            return int(body, 16)
        except ValueError:
            raise MalformedRecord("bad big int") from None
    if type(body) is not list:
        raise MalformedRecord(f"tag {tag!r} needs a list body")
    if tag == "L":
        return [_decode(e) for e in body]
    if tag == "T":
        return tuple(_decode(e) for e in body)
    if tag == "S":
        try:
            return {_decode(e) for e in body}
        except TypeError:
            raise MalformedRecord("unhashable set element") from None
    if tag == "D":
        out = {}
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise MalformedRecord("bad dict item")
            try:
                out[_decode(pair[0])] = _decode(pair[1])
            except TypeError:
                raise MalformedRecord("unhashable dict key") from None
        return out
    if tag == "N":
        return Node("list", tuple(_decode(e) for e in body))
    if tag == "R":
        items = []
        for e in body:
            if e is None:
                items.append(None)
            elif type(e) is list and len(e) == 1:
                items.append((_decode(e[0]),))
            else:
                raise MalformedRecord("bad tree entry")
        return Node("tree", tuple(items))
    raise MalformedRecord(f"unknown tag {tag!r}")


def decode_json_value(text: str) -> Any:
    """Parse then decode one encoded value (MalformedRecord on any failure)."""
    try:
        return decode_value(json.loads(text))
    except (ValueError, RecursionError) as e:
        raise MalformedRecord(str(e)[:200]) from None


def values_match(kind: CompareKind, actual: Any, expected: Any) -> bool:
    """The ground-truth comparison on decoded plain values.

    `eq` is Python `==` (so 2 == 2.0 as in the benchmark's asserts);
    `same_list` / `same_tree` follow the setup helpers: both empty, or the same
    shape with `==` values.
    """
    try:
        if kind == "eq":
            return bool(actual == expected)
        want = "list" if kind == "same_list" else "tree"
        if actual is None or expected is None:
            return actual is None and expected is None
        if not (isinstance(actual, Node) and isinstance(expected, Node)):
            return False
        if actual.kind != want or expected.kind != want:
            return False
        return bool(actual.items == expected.items)
    except (RecursionError, MemoryError, TypeError, ValueError):
        return False
