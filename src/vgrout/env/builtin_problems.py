"""The built-in offline problem set: original LeetCode-style problems written for vgrout.

These are what the offline smoke run trains on, so nothing here needs ../shared/data.
Each problem is rendered into a benchmark row (the benchmark's system message and user
template, its standard setup header) with a canonical `class Solution` and at least eight
`assert Solution().fn(...) == ...` tests. Ids start at 900001 so they never collide with
LeetCode question ids. Together the return types cover int, str, list, nested list, bool
and float; float answers are rounded (or exact in binary) so `==` is well defined.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from functools import cache

from .problems import render_messages, render_user_message

# The import/helper header every benchmark row carries as `setup_code` (data, verbatim).
SETUP_CODE = """import random
import functools
import collections
import string
import math
import datetime

from typing import *
from functools import *
from collections import *
from itertools import *
from heapq import *
from bisect import *
from string import *
from operator import *
from math import *

inf = float('inf')

class ListNode:
    def __init__(self, val=0, next=None):
        self.val = val
        self.next = next

def list_node(values: list):
    if not values:
        return None
    head = ListNode(values[0])
    p = head
    for val in values[1:]:
        node = ListNode(val)
        p.next = node
        p = node
    return head

def is_same_list(p1, p2):
    if p1 is None and p2 is None:
        return True
    if not p1 or not p2:
        return False
    return p1.val == p2.val and is_same_list(p1.next, p2.next)

class TreeNode:
    def __init__(self, val=0, left=None, right=None):
        self.val = val
        self.left = left
        self.right = right

def tree_node(values: list):
    if not values:
        return None
    root = TreeNode(values[0])
    i = 1
    queue = deque()
    queue.append(root)
    while queue:
        node = queue.popleft()
        if i < len(values) and values[i] is not None:
            node.left = TreeNode(values[i])
            queue.append(node.left)
        i += 1
        if i < len(values) and values[i] is not None:
            node.right = TreeNode(values[i])
            queue.append(node.right)
        i += 1
    return root

def is_same_tree(p, q):
    if not p and not q:
        return True
    elif not p or not q:
        return False
    elif p.val != q.val:
        return False
    else:
        return is_same_tree(p.left, q.left) and is_same_tree(p.right, q.right)
"""

FIRST_ID = 900001


@dataclass(frozen=True)
class _Spec:
    """One authored problem; `tests` are (call arguments, expected expression) pairs."""

    pid: int
    difficulty: str
    text: str
    starter: str
    canonical: str
    tests: tuple[tuple[str, str], ...]


def _code(src: str) -> str:
    return textwrap.dedent(src).strip("\n") + "\n"


_SPECS: list[_Spec] = []


def _add(pid, difficulty, text, starter, canonical, tests) -> None:
    _SPECS.append(
        _Spec(
            pid,
            difficulty,
            textwrap.dedent(text).strip("\n"),
            starter,
            _code(canonical),
            tuple(tests),
        )
    )


# ----------------------------------------------------------------------------- int answers

_add(
    900001,
    "medium",
    """
    You are given an integer array nums and an integer k. A calm stretch is a non-empty
    contiguous part of nums in which the largest and the smallest element differ by at most k.
    Return the length of the longest calm stretch.

    Example 1:
    Input: nums = [4,2,2,6,3], k = 2
    Output: 3
    Explanation: [4,2,2] is calm (4 - 2 = 2); no calm stretch has length 4.

    Example 2:
    Input: nums = [1,5,9], k = 3
    Output: 1

    Constraints:
    1 <= nums.length <= 10^5
    -10^9 <= nums[i] <= 10^9
    0 <= k <= 10^9
    """,
    "class Solution:\n    def longestCalmStretch(self, nums: List[int], k: int) -> int:",
    """
    class Solution:
        def longestCalmStretch(self, nums: List[int], k: int) -> int:
            # two monotonic deques hold the window's max and min candidates
            hi, lo = deque(), deque()
            best = left = 0
            for right, x in enumerate(nums):
                while hi and nums[hi[-1]] <= x:
                    hi.pop()
                while lo and nums[lo[-1]] >= x:
                    lo.pop()
                hi.append(right)
                lo.append(right)
                while nums[hi[0]] - nums[lo[0]] > k:
                    left += 1
                    if hi[0] < left:
                        hi.popleft()
                    if lo[0] < left:
                        lo.popleft()
                best = max(best, right - left + 1)
            return best
    """,
    [
        ("nums = [4,2,2,6,3], k = 2", "3"),
        ("nums = [1,1,1], k = 0", "3"),
        ("nums = [1,5,9], k = 3", "1"),
        ("nums = [7], k = 0", "1"),
        ("nums = [1,3,5,7,9], k = 4", "3"),
        ("nums = [10,1,2,3,4,10], k = 3", "4"),
        ("nums = [5,5,4,4,6,6,3], k = 1", "4"),
        ("nums = [-3,-1,-2,0,5], k = 3", "4"),
        ("nums = [2,8,2,8,2], k = 6", "5"),
    ],
)

_add(
    900002,
    "medium",
    """
    Given an integer array nums and two integers lo and hi, return the number of index pairs
    (i, j) with i < j such that lo <= nums[i] + nums[j] <= hi.

    Example 1:
    Input: nums = [1,2,3,4], lo = 4, hi = 5
    Output: 3
    Explanation: the pairs of values (1,3), (1,4) and (2,3) qualify.

    Example 2:
    Input: nums = [0,0,0], lo = 0, hi = 0
    Output: 3

    Constraints:
    1 <= nums.length <= 10^5
    -10^9 <= nums[i] <= 10^9
    -10^9 <= lo <= hi <= 10^9
    """,
    "class Solution:\n    def countBoundedPairs(self, nums: List[int], lo: int, hi: int) -> int:",
    """
    class Solution:
        def countBoundedPairs(self, nums: List[int], lo: int, hi: int) -> int:
            vals = sorted(nums)

            def at_most(limit: int) -> int:
                # pairs whose sum is <= limit, by two pointers over the sorted values
                count, i, j = 0, 0, len(vals) - 1
                while i < j:
                    if vals[i] + vals[j] <= limit:
                        count += j - i
                        i += 1
                    else:
                        j -= 1
                return count

            return at_most(hi) - at_most(lo - 1)
    """,
    [
        ("nums = [1,2,3,4], lo = 4, hi = 5", "3"),
        ("nums = [0,0,0], lo = 0, hi = 0", "3"),
        ("nums = [5], lo = 0, hi = 100", "0"),
        ("nums = [1,1,1,1], lo = 3, hi = 10", "0"),
        ("nums = [-1,2,-3,4], lo = -2, hi = 1", "3"),
        ("nums = [10,20,30], lo = 30, hi = 50", "3"),
        ("nums = [3,3,3], lo = 6, hi = 6", "3"),
        ("nums = [1,9,4,6], lo = 10, hi = 10", "2"),
        ("nums = [2,7,11,15], lo = 9, hi = 18", "4"),
    ],
)

_add(
    900003,
    "medium",
    """
    Houses stand at integer positions on a straight street, given by the array houses (several
    houses may share a position). A lamp placed at integer position p lights every position x
    with p - r <= x <= p + r. Return the minimum number of lamps needed so that every house is lit.

    Example 1:
    Input: houses = [1,2,3,4], r = 1
    Output: 2
    Explanation: lamps at 2 and 4 light all four houses.

    Example 2:
    Input: houses = [7,1,4], r = 3
    Output: 1

    Constraints:
    1 <= houses.length <= 10^5
    -10^9 <= houses[i] <= 10^9
    0 <= r <= 10^9
    """,
    "class Solution:\n    def minLamps(self, houses: List[int], r: int) -> int:",
    """
    class Solution:
        def minLamps(self, houses: List[int], r: int) -> int:
            lamps = 0
            lit_until = None
            for x in sorted(houses):
                if lit_until is None or x > lit_until:
                    # the leftmost dark house: put the lamp as far right as still reaches it
                    lamps += 1
                    lit_until = x + 2 * r
            return lamps
    """,
    [
        ("houses = [1,2,3,4], r = 1", "2"),
        ("houses = [1,10], r = 4", "2"),
        ("houses = [5], r = 0", "1"),
        ("houses = [1,2,3], r = 0", "3"),
        ("houses = [7,1,4], r = 3", "1"),
        ("houses = [0,0,0], r = 0", "1"),
        ("houses = [1,5,9,13], r = 2", "2"),
        ("houses = [-10,-3,0,8,20], r = 5", "3"),
        ("houses = [1,3,5,7,9,11], r = 1", "3"),
    ],
)

_add(
    900004,
    "medium",
    """
    You are given an m x n grid where 0 marks an open cell and 1 marks a wall. Starting at the
    top-left cell you may only move right or down, and only through open cells. Return the
    number of different paths to the bottom-right cell, modulo 10^9 + 7. If the first or the
    last cell is a wall the answer is 0.

    Example 1:
    Input: grid = [[0,0,0],[0,1,0],[0,0,0]]
    Output: 2

    Example 2:
    Input: grid = [[0,1],[1,0]]
    Output: 0

    Constraints:
    1 <= m, n <= 200
    grid[i][j] is 0 or 1.
    """,
    "class Solution:\n    def countGridPaths(self, grid: List[List[int]]) -> int:",
    """
    class Solution:
        def countGridPaths(self, grid: List[List[int]]) -> int:
            mod = 10**9 + 7
            n = len(grid[0])
            ways = [0] * n  # ways[j]: paths reaching column j of the current row
            ways[0] = 1
            for row in grid:
                for j, cell in enumerate(row):
                    if cell == 1:
                        ways[j] = 0
                    elif j > 0:
                        ways[j] = (ways[j] + ways[j - 1]) % mod
            return ways[-1]
    """,
    [
        ("grid = [[0,0],[0,0]]", "2"),
        ("grid = [[0,0,0],[0,0,0],[0,0,0]]", "6"),
        ("grid = [[0,0,0],[0,1,0],[0,0,0]]", "2"),
        ("grid = [[1,0],[0,0]]", "0"),
        ("grid = [[0]]", "1"),
        ("grid = [[0,1],[1,0]]", "0"),
        ("grid = [[0,0,0,0]]", "1"),
        ("grid = [[0,0,1],[0,0,0],[1,0,0]]", "4"),
        ("grid = [[0] * 18 for _ in range(18)]", "333606206"),
    ],
)

_add(
    900005,
    "medium",
    """
    A cable car cabin carries at most two passengers at a time, and their total weight may not
    exceed limit. Given the passengers' weights (each at most limit), return the minimum number
    of cabin trips needed to carry everyone.

    Example 1:
    Input: weights = [3,2,2,1], limit = 3
    Output: 3
    Explanation: trips (1,2), (2) and (3).

    Example 2:
    Input: weights = [2,4,6,8], limit = 10
    Output: 2

    Constraints:
    1 <= weights.length <= 5 * 10^4
    1 <= weights[i] <= limit <= 3 * 10^4
    """,
    "class Solution:\n    def minCabinTrips(self, weights: List[int], limit: int) -> int:",
    """
    class Solution:
        def minCabinTrips(self, weights: List[int], limit: int) -> int:
            w = sorted(weights)
            i, j, trips = 0, len(w) - 1, 0
            while i <= j:
                # the heaviest rider goes now; the lightest joins when they fit together
                if i < j and w[i] + w[j] <= limit:
                    i += 1
                j -= 1
                trips += 1
            return trips
    """,
    [
        ("weights = [1,2], limit = 3", "1"),
        ("weights = [3,2,2,1], limit = 3", "3"),
        ("weights = [3,5,3,4], limit = 5", "4"),
        ("weights = [5], limit = 5", "1"),
        ("weights = [1,1,1,1], limit = 2", "2"),
        ("weights = [2,4,6,8], limit = 10", "2"),
        ("weights = [9,1,9,1], limit = 10", "2"),
        ("weights = [4,4,4], limit = 8", "2"),
        ("weights = [1,2,3,4,5], limit = 5", "3"),
    ],
)

_add(
    900006,
    "easy",
    """
    A rising run of an integer array is a maximal contiguous part in which every element is
    strictly greater than the one before it. Return how many rising runs of nums have length
    at least 3.

    Example 1:
    Input: nums = [1,2,3,2,3,4,4,5,6,7]
    Output: 3
    Explanation: the runs [1,2,3], [2,3,4] and [4,5,6,7] qualify.

    Example 2:
    Input: nums = [5,4,3]
    Output: 0

    Constraints:
    1 <= nums.length <= 10^5
    -10^9 <= nums[i] <= 10^9
    """,
    "class Solution:\n    def countRisingRuns(self, nums: List[int]) -> int:",
    """
    class Solution:
        def countRisingRuns(self, nums: List[int]) -> int:
            count, length = 0, 1
            for prev, cur in zip(nums, nums[1:]):
                if cur > prev:
                    length += 1
                else:
                    count += length >= 3
                    length = 1
            return count + (length >= 3)
    """,
    [
        ("nums = [1,2,3,1,2]", "1"),
        ("nums = [1,2,3,4,5]", "1"),
        ("nums = [5,4,3]", "0"),
        ("nums = [1,2,3,2,3,4,4,5,6,7]", "3"),
        ("nums = [7]", "0"),
        ("nums = [1,1,1]", "0"),
        ("nums = [1,3,2,4,3,5]", "0"),
        ("nums = [0,1,2,0,1,2,0,1,2]", "3"),
        ("nums = [-5,-4,-3,-2]", "1"),
    ],
)

# ----------------------------------------------------------------------------- str answers

_add(
    900007,
    "easy",
    """
    Compress a string of lowercase letters run by run: every maximal block of one repeated
    letter c of length L becomes c alone when L == 1, and c followed by the decimal digits of L
    otherwise. Return the compressed string.

    Example 1:
    Input: s = "aaabcc"
    Output: "a3bc2"

    Example 2:
    Input: s = "abc"
    Output: "abc"

    Constraints:
    1 <= s.length <= 10^5
    s consists of lowercase English letters.
    """,
    "class Solution:\n    def compressRuns(self, s: str) -> str:",
    """
    class Solution:
        def compressRuns(self, s: str) -> str:
            parts = []
            for ch, grp in groupby(s):
                n = len(list(grp))
                parts.append(ch if n == 1 else f"{ch}{n}")
            return "".join(parts)
    """,
    [
        ('s = "aaabcc"', '"a3bc2"'),
        ('s = "abc"', '"abc"'),
        ('s = "zzzzzzzzzzzz"', '"z12"'),
        ('s = "a"', '"a"'),
        ('s = "aabbaa"', '"a2b2a2"'),
        ('s = "a" + "b" * 10 + "c"', '"ab10c"'),
        ('s = "xyyx"', '"xy2x"'),
        ('s = "qqqwq"', '"q3wq"'),
        ('s = "mmnnnoooo"', '"m2n3o4"'),
    ],
)

_add(
    900008,
    "medium",
    """
    A pattern is built from lowercase letters, parenthesised groups "(...)" that may nest, and
    repeat marks "{k}". A repeat mark applies to the letter or the group immediately before it
    and repeats it k times (k may be 0). Return the string the pattern expands to.

    Example 1:
    Input: s = "(ab){2}c{3}"
    Output: "ababccc"

    Example 2:
    Input: s = "(a(bc){2}){2}"
    Output: "abcbcabcbc"

    Constraints:
    1 <= s.length <= 100
    Every repeat mark follows a letter or a closing parenthesis, 0 <= k <= 20.
    Parentheses are balanced and the expansion has at most 10^5 letters.
    """,
    "class Solution:\n    def expandPattern(self, s: str) -> str:",
    """
    class Solution:
        def expandPattern(self, s: str) -> str:
            pos = 0

            def sequence() -> str:
                # parse items until the end of s or the ')' closing the current group
                nonlocal pos
                out = []
                while pos < len(s) and s[pos] != ")":
                    if s[pos] == "(":
                        pos += 1
                        item = sequence()
                        pos += 1  # skip ')'
                    else:
                        item = s[pos]
                        pos += 1
                    if pos < len(s) and s[pos] == "{":
                        end = s.index("}", pos)
                        item *= int(s[pos + 1 : end])
                        pos = end + 1
                    out.append(item)
                return "".join(out)

            return sequence()
    """,
    [
        ('s = "(ab){2}c{3}"', '"ababccc"'),
        ('s = "abc"', '"abc"'),
        ('s = "a{5}"', '"aaaaa"'),
        ('s = "(a(bc){2}){2}"', '"abcbcabcbc"'),
        ('s = "x{1}y{0}z"', '"xz"'),
        ('s = "((a){2}){3}"', '"aaaaaa"'),
        ('s = "(ab)c"', '"abc"'),
        ('s = "a{10}"', '"aaaaaaaaaa"'),
        ('s = "m(n{2}o){2}p"', '"mnnonnop"'),
    ],
)

_add(
    900009,
    "medium",
    """
    A rotation of a string moves some prefix of it to its end. Return the lexicographically
    smallest rotation of s (s itself counts as a rotation).

    Example 1:
    Input: s = "bca"
    Output: "abc"

    Example 2:
    Input: s = "cabab"
    Output: "ababc"

    Constraints:
    1 <= s.length <= 2000
    s consists of lowercase English letters.
    """,
    "class Solution:\n    def smallestRotation(self, s: str) -> str:",
    """
    class Solution:
        def smallestRotation(self, s: str) -> str:
            doubled = s + s
            return min(doubled[i : i + len(s)] for i in range(len(s)))
    """,
    [
        ('s = "bca"', '"abc"'),
        ('s = "aaa"', '"aaa"'),
        ('s = "ba"', '"ab"'),
        ('s = "z"', '"z"'),
        ('s = "cabab"', '"ababc"'),
        ('s = "abab"', '"abab"'),
        ('s = "dcba"', '"adcb"'),
        ('s = "baaa"', '"aaab"'),
        ('s = "abcabd"', '"abcabd"'),
    ],
)

_add(
    900010,
    "easy",
    """
    Merge a list of words into one string by taking their letters in turns: the first letter of
    every word (in list order), then the second letter of every word that still has one, and
    so on. Return the merged string.

    Example 1:
    Input: words = ["abc","de"]
    Output: "adbec"

    Example 2:
    Input: words = ["ab","","cd"]
    Output: "acbd"

    Constraints:
    1 <= words.length <= 100
    0 <= words[i].length <= 100
    words[i] consists of lowercase English letters.
    """,
    "class Solution:\n    def interleaveWords(self, words: List[str]) -> str:",
    """
    class Solution:
        def interleaveWords(self, words: List[str]) -> str:
            longest = max((len(w) for w in words), default=0)
            return "".join(w[i] for i in range(longest) for w in words if i < len(w))
    """,
    [
        ('words = ["abc","de"]', '"adbec"'),
        ('words = ["a"]', '"a"'),
        ('words = ["ab","","cd"]', '"acbd"'),
        ('words = ["xyz","p","qr"]', '"xpqyrz"'),
        ('words = ["hello","world"]', '"hweolrllod"'),
        ('words = ["a","b","c"]', '"abc"'),
        ('words = ["",""]', '""'),
        ('words = ["abcd","e"]', '"aebcd"'),
    ],
)

_add(
    900011,
    "medium",
    """
    Convert an identifier written in camelCase or PascalCase (letters and digits only) to
    snake_case. A word boundary lies before an uppercase letter that follows a lowercase letter
    or a digit, and, inside a block of consecutive uppercase letters that is followed by a
    lowercase letter, before the last uppercase letter of the block. Join the words with "_"
    and write everything in lowercase.

    Example 1:
    Input: name = "parseHTTPResponse"
    Output: "parse_http_response"

    Example 2:
    Input: name = "version2Update"
    Output: "version2_update"

    Constraints:
    1 <= name.length <= 100
    name consists of English letters and digits and starts with a letter.
    """,
    "class Solution:\n    def camelToSnake(self, name: str) -> str:",
    """
    import re


    class Solution:
        def camelToSnake(self, name: str) -> str:
            # an uppercase block before a capitalised word: split before the block's last letter
            name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\\1_\\2", name)
            # a lowercase letter or digit followed by an uppercase letter
            name = re.sub(r"([a-z0-9])([A-Z])", r"\\1_\\2", name)
            return name.lower()
    """,
    [
        ('name = "parseHTTPResponse"', '"parse_http_response"'),
        ('name = "simple"', '"simple"'),
        ('name = "CamelCase"', '"camel_case"'),
        ('name = "getID"', '"get_id"'),
        ('name = "HTTPServer"', '"http_server"'),
        ('name = "version2Update"', '"version2_update"'),
        ('name = "ABC"', '"abc"'),
        ('name = "aB"', '"a_b"'),
        ('name = "XMLHttpRequest"', '"xml_http_request"'),
    ],
)

# ----------------------------------------------------------------------------- list answers

_add(
    900012,
    "medium",
    """
    You are given the daily prices of a stock. For each day i, return how many days you must
    wait after day i until a strictly lower price appears, or 0 if it never does.

    Example 1:
    Input: prices = [5,3,4,2,6]
    Output: [1,2,1,0,0]

    Example 2:
    Input: prices = [2,2,1]
    Output: [2,1,0]

    Constraints:
    1 <= prices.length <= 10^5
    1 <= prices[i] <= 10^9
    """,
    "class Solution:\n    def daysUntilCheaper(self, prices: List[int]) -> List[int]:",
    """
    class Solution:
        def daysUntilCheaper(self, prices: List[int]) -> List[int]:
            wait = [0] * len(prices)
            stack = []  # days still waiting, prices non-decreasing from bottom to top
            for day, p in enumerate(prices):
                while stack and prices[stack[-1]] > p:
                    earlier = stack.pop()
                    wait[earlier] = day - earlier
                stack.append(day)
            return wait
    """,
    [
        ("prices = [5,3,4,2,6]", "[1,2,1,0,0]"),
        ("prices = [1,2,3]", "[0,0,0]"),
        ("prices = [3,2,1]", "[1,1,0]"),
        ("prices = [4]", "[0]"),
        ("prices = [2,2,1]", "[2,1,0]"),
        ("prices = [6,7,8,5]", "[3,2,1,0]"),
        ("prices = [1,5,2,5,1]", "[0,1,2,1,0]"),
        ("prices = [9,8,9,7]", "[1,2,1,0]"),
    ],
)

_add(
    900013,
    "easy",
    """
    Rank the players by score: the highest score gets rank 1, equal scores share a rank, and
    the next lower distinct score gets the next integer rank (no gaps). Return the rank of each
    player in input order.

    Example 1:
    Input: scores = [50,80,80,70]
    Output: [3,1,1,2]

    Example 2:
    Input: scores = [5,5,5]
    Output: [1,1,1]

    Constraints:
    1 <= scores.length <= 10^5
    -10^9 <= scores[i] <= 10^9
    """,
    "class Solution:\n    def denseRank(self, scores: List[int]) -> List[int]:",
    """
    class Solution:
        def denseRank(self, scores: List[int]) -> List[int]:
            rank = {s: i + 1 for i, s in enumerate(sorted(set(scores), reverse=True))}
            return [rank[s] for s in scores]
    """,
    [
        ("scores = [50,80,80,70]", "[3,1,1,2]"),
        ("scores = [1]", "[1]"),
        ("scores = [5,5,5]", "[1,1,1]"),
        ("scores = [1,2,3]", "[3,2,1]"),
        ("scores = [10,-1,10,0]", "[1,3,1,2]"),
        ("scores = [7,3,9,3,7]", "[2,3,1,3,2]"),
        ("scores = [0,0,1]", "[2,2,1]"),
        ("scores = [100,90,80,70]", "[1,2,3,4]"),
    ],
)

_add(
    900014,
    "easy",
    """
    Read an m x n matrix column by column from left to right: columns with an even index
    (0, 2, ...) are read from top to bottom and columns with an odd index from bottom to top.
    Return the values in reading order.

    Example 1:
    Input: matrix = [[1,2,3],[4,5,6]]
    Output: [1,4,5,2,3,6]

    Example 2:
    Input: matrix = [[1],[2],[3]]
    Output: [1,2,3]

    Constraints:
    1 <= m, n <= 100
    -1000 <= matrix[i][j] <= 1000
    """,
    "class Solution:\n    def zigzagColumns(self, matrix: List[List[int]]) -> List[int]:",
    """
    class Solution:
        def zigzagColumns(self, matrix: List[List[int]]) -> List[int]:
            out = []
            for j in range(len(matrix[0])):
                column = [row[j] for row in matrix]
                out.extend(column if j % 2 == 0 else column[::-1])
            return out
    """,
    [
        ("matrix = [[1,2,3],[4,5,6]]", "[1,4,5,2,3,6]"),
        ("matrix = [[7]]", "[7]"),
        ("matrix = [[1],[2],[3]]", "[1,2,3]"),
        ("matrix = [[1,2,3]]", "[1,2,3]"),
        ("matrix = [[1,2],[3,4],[5,6]]", "[1,3,5,6,4,2]"),
        ("matrix = [[9,8],[7,6]]", "[9,7,6,8]"),
        ("matrix = [[1,2,3,4],[5,6,7,8]]", "[1,5,6,2,3,7,8,4]"),
        ("matrix = [[0,0],[0,1]]", "[0,0,1,0]"),
    ],
)

_add(
    900015,
    "medium",
    """
    Return, in increasing order, every prime number p with lo <= p <= hi.

    Example 1:
    Input: lo = 10, hi = 20
    Output: [11,13,17,19]

    Example 2:
    Input: lo = 14, hi = 16
    Output: []

    Constraints:
    0 <= lo <= hi <= 10^6
    """,
    "class Solution:\n    def primesBetween(self, lo: int, hi: int) -> List[int]:",
    """
    class Solution:
        def primesBetween(self, lo: int, hi: int) -> List[int]:
            if hi < 2:
                return []
            sieve = bytearray([1]) * (hi + 1)
            sieve[0] = sieve[1] = 0
            for p in range(2, isqrt(hi) + 1):
                if sieve[p]:
                    sieve[p * p :: p] = bytearray(len(range(p * p, hi + 1, p)))
            return [x for x in range(max(lo, 2), hi + 1) if sieve[x]]
    """,
    [
        ("lo = 1, hi = 10", "[2,3,5,7]"),
        ("lo = 10, hi = 20", "[11,13,17,19]"),
        ("lo = 14, hi = 16", "[]"),
        ("lo = 2, hi = 2", "[2]"),
        ("lo = 0, hi = 1", "[]"),
        ("lo = 90, hi = 110", "[97,101,103,107,109]"),
        ("lo = 20, hi = 30", "[23,29]"),
        ("lo = 7919, hi = 7920", "[7919]"),
        ("lo = 1, hi = 30", "[2,3,5,7,11,13,17,19,23,29]"),
    ],
)

_add(
    900016,
    "easy",
    """
    Sort a list of lowercase words by the number of vowels they contain (a, e, i, o and u),
    fewest first. Among words with the same number of vowels, longer words come first, and
    words that still tie are ordered alphabetically. Return the sorted list.

    Example 1:
    Input: words = ["apple","sky","tree"]
    Output: ["sky","apple","tree"]

    Example 2:
    Input: words = ["xyz","rhythm","bcd"]
    Output: ["rhythm","bcd","xyz"]

    Constraints:
    1 <= words.length <= 10^4
    1 <= words[i].length <= 50
    """,
    "class Solution:\n    def sortByVowels(self, words: List[str]) -> List[str]:",
    """
    class Solution:
        def sortByVowels(self, words: List[str]) -> List[str]:
            def key(w: str):
                return (sum(ch in "aeiou" for ch in w), -len(w), w)

            return sorted(words, key=key)
    """,
    [
        ('words = ["apple","sky","tree"]', '["sky","apple","tree"]'),
        ('words = ["b","a"]', '["b","a"]'),
        ('words = ["aa","bb","ab"]', '["bb","ab","aa"]'),
        ('words = ["cat","dog","pig"]', '["cat","dog","pig"]'),
        ('words = ["queue","q"]', '["q","queue"]'),
        ('words = ["xyz","rhythm","bcd"]', '["rhythm","bcd","xyz"]'),
        ('words = ["io","oi","ab"]', '["ab","io","oi"]'),
        ('words = ["banana","kiwi","fig"]', '["fig","kiwi","banana"]'),
    ],
)

# ----------------------------------------------------------------------------- nested lists

_add(
    900017,
    "medium",
    """
    Each element [a, b] of ranges stands for the integers a, a + 1, ..., b. Merge ranges that
    overlap or that are adjacent (the next range starts right after the previous one ends) and
    return the merged ranges sorted by their start.

    Example 1:
    Input: ranges = [[1,3],[2,5],[8,9]]
    Output: [[1,5],[8,9]]

    Example 2:
    Input: ranges = [[1,2],[3,4]]
    Output: [[1,4]]

    Constraints:
    1 <= ranges.length <= 10^4
    -10^9 <= a <= b <= 10^9
    """,
    "class Solution:\n    def mergeRanges(self, ranges: List[List[int]]) -> List[List[int]]:",
    """
    class Solution:
        def mergeRanges(self, ranges: List[List[int]]) -> List[List[int]]:
            merged = []
            for a, b in sorted(ranges):
                if merged and a <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            return merged
    """,
    [
        ("ranges = [[1,3],[2,5],[8,9]]", "[[1,5],[8,9]]"),
        ("ranges = [[1,2],[3,4]]", "[[1,4]]"),
        ("ranges = [[5,5]]", "[[5,5]]"),
        ("ranges = [[4,6],[1,2]]", "[[1,2],[4,6]]"),
        ("ranges = [[1,10],[2,3],[4,5]]", "[[1,10]]"),
        ("ranges = [[0,0],[2,2],[1,1]]", "[[0,2]]"),
        ("ranges = [[-5,-3],[-2,0],[2,3]]", "[[-5,0],[2,3]]"),
        ("ranges = [[3,4],[3,4]]", "[[3,4]]"),
    ],
)

_add(
    900018,
    "easy",
    """
    Group non-negative integers by the sum of their decimal digits. Return the groups ordered by
    increasing digit sum, each group sorted in increasing order (equal numbers are kept).

    Example 1:
    Input: nums = [12,3,30,21,5]
    Output: [[3,12,21,30],[5]]

    Example 2:
    Input: nums = [99,9,18,100]
    Output: [[100],[9,18],[99]]

    Constraints:
    1 <= nums.length <= 10^4
    0 <= nums[i] <= 10^9
    """,
    "class Solution:\n    def groupByDigitSum(self, nums: List[int]) -> List[List[int]]:",
    """
    class Solution:
        def groupByDigitSum(self, nums: List[int]) -> List[List[int]]:
            groups = defaultdict(list)
            for x in nums:
                groups[sum(map(int, str(x)))].append(x)
            return [sorted(groups[d]) for d in sorted(groups)]
    """,
    [
        ("nums = [12,3,30,21,5]", "[[3,12,21,30],[5]]"),
        ("nums = [0]", "[[0]]"),
        ("nums = [19,28,1,10]", "[[1,10],[19,28]]"),
        ("nums = [7,7]", "[[7,7]]"),
        ("nums = [99,9,18,100]", "[[100],[9,18],[99]]"),
        ("nums = [5,14,23,6]", "[[5,14,23],[6]]"),
        ("nums = [11,2,20,101]", "[[2,11,20,101]]"),
        ("nums = [1,2,3]", "[[1],[2],[3]]"),
    ],
)

_add(
    900019,
    "easy",
    """
    Return the m x n integer grid rotated by 90 degrees clockwise (the result is n x m).

    Example 1:
    Input: grid = [[1,2],[3,4]]
    Output: [[3,1],[4,2]]

    Example 2:
    Input: grid = [[1,2,3]]
    Output: [[1],[2],[3]]

    Constraints:
    1 <= m, n <= 100
    """,
    "class Solution:\n    def rotateClockwise(self, grid: List[List[int]]) -> List[List[int]]:",
    """
    class Solution:
        def rotateClockwise(self, grid: List[List[int]]) -> List[List[int]]:
            return [list(col) for col in zip(*grid[::-1])]
    """,
    [
        ("grid = [[1,2],[3,4]]", "[[3,1],[4,2]]"),
        ("grid = [[1,2,3]]", "[[1],[2],[3]]"),
        ("grid = [[1],[2],[3]]", "[[3,2,1]]"),
        ("grid = [[5]]", "[[5]]"),
        ("grid = [[1,2,3],[4,5,6]]", "[[4,1],[5,2],[6,3]]"),
        ("grid = [[1,2,3],[4,5,6],[7,8,9]]", "[[7,4,1],[8,5,2],[9,6,3]]"),
        ("grid = [[0,1],[1,0]]", "[[1,0],[0,1]]"),
        ("grid = [[1,2],[3,4],[5,6]]", "[[5,3,1],[6,4,2]]"),
    ],
)

_add(
    900020,
    "medium",
    """
    An undirected graph has n nodes labelled 0 to n - 1 and the given edges. Return its
    connected components, each as a sorted list of its nodes, with the components ordered by
    their smallest node.

    Example 1:
    Input: n = 5, edges = [[4,0],[1,2]]
    Output: [[0,4],[1,2],[3]]

    Example 2:
    Input: n = 3, edges = []
    Output: [[0],[1],[2]]

    Constraints:
    1 <= n <= 10^5
    0 <= edges.length <= 10^5
    edges[i] = [u, v] with 0 <= u, v < n (self-loops and repeated edges may occur)
    """,
    "class Solution:\n    def connectedGroups(self, n: int, edges: List[List[int]]) -> List[List[int]]:",
    """
    class Solution:
        def connectedGroups(self, n: int, edges: List[List[int]]) -> List[List[int]]:
            parent = list(range(n))

            def find(x: int) -> int:
                while parent[x] != x:
                    parent[x] = parent[parent[x]]
                    x = parent[x]
                return x

            for u, v in edges:
                parent[find(u)] = find(v)
            groups = defaultdict(list)
            for x in range(n):  # increasing order keeps every group sorted
                groups[find(x)].append(x)
            return sorted(groups.values())
    """,
    [
        ("n = 4, edges = [[0,1],[2,3]]", "[[0,1],[2,3]]"),
        ("n = 3, edges = []", "[[0],[1],[2]]"),
        ("n = 1, edges = []", "[[0]]"),
        ("n = 5, edges = [[4,0],[1,2]]", "[[0,4],[1,2],[3]]"),
        ("n = 4, edges = [[0,1],[1,2],[2,3]]", "[[0,1,2,3]]"),
        ("n = 6, edges = [[5,3],[3,1],[0,2]]", "[[0,2],[1,3,5],[4]]"),
        ("n = 3, edges = [[1,1]]", "[[0],[1],[2]]"),
        ("n = 5, edges = [[0,1],[0,1],[3,4]]", "[[0,1],[2],[3,4]]"),
    ],
)

# ----------------------------------------------------------------------------- bool answers

_add(
    900021,
    "easy",
    """
    Each meeting [start, end] occupies the half-open time interval from start (included) to end
    (excluded). Return true if no two meetings overlap, so one person can attend all of them.

    Example 1:
    Input: meetings = [[1,3],[3,5]]
    Output: true

    Example 2:
    Input: meetings = [[1,4],[3,5]]
    Output: false

    Constraints:
    1 <= meetings.length <= 10^4
    0 <= start < end <= 10^9
    """,
    "class Solution:\n    def noOverlap(self, meetings: List[List[int]]) -> bool:",
    """
    class Solution:
        def noOverlap(self, meetings: List[List[int]]) -> bool:
            ordered = sorted(meetings)
            return all(prev[1] <= cur[0] for prev, cur in zip(ordered, ordered[1:]))
    """,
    [
        ("meetings = [[1,3],[3,5]]", "True"),
        ("meetings = [[1,4],[3,5]]", "False"),
        ("meetings = [[0,10]]", "True"),
        ("meetings = [[5,6],[1,2],[2,5]]", "True"),
        ("meetings = [[1,10],[2,3]]", "False"),
        ("meetings = [[1,2],[1,2]]", "False"),
        ("meetings = [[0,1],[2,3],[1,2]]", "True"),
        ("meetings = [[7,9],[8,10]]", "False"),
        ("meetings = [[3,4],[0,3],[4,8]]", "True"),
    ],
)

_add(
    900022,
    "medium",
    """
    Given positive integers nums and a positive integer target, return true if some selection of
    the elements (each used at most once) adds up to exactly target.

    Example 1:
    Input: nums = [3,34,4,12,5,2], target = 9
    Output: true
    Explanation: 4 + 5 = 9.

    Example 2:
    Input: nums = [2,4,6], target = 5
    Output: false

    Constraints:
    1 <= nums.length <= 200
    1 <= nums[i] <= 1000
    1 <= target <= 10^4
    """,
    "class Solution:\n    def canReachTarget(self, nums: List[int], target: int) -> bool:",
    """
    class Solution:
        def canReachTarget(self, nums: List[int], target: int) -> bool:
            reachable = 1  # bit s set <=> some selection sums to s
            mask = (1 << (target + 1)) - 1
            for x in nums:
                reachable = (reachable | (reachable << x)) & mask
            return bool(reachable >> target & 1)
    """,
    [
        ("nums = [3,34,4,12,5,2], target = 9", "True"),
        ("nums = [3,34,4,12,5,2], target = 30", "False"),
        ("nums = [1], target = 1", "True"),
        ("nums = [2,4,6], target = 5", "False"),
        ("nums = [5,5,5], target = 10", "True"),
        ("nums = [7,3,2], target = 12", "True"),
        ("nums = [7,3,2], target = 11", "False"),
        ("nums = [1,2,4,8], target = 15", "True"),
        ("nums = [10,20,30], target = 25", "False"),
    ],
)

_add(
    900023,
    "hard",
    """
    Given a string s and an integer k, return true if s can be turned into a palindrome by
    deleting at most k of its characters.

    Example 1:
    Input: s = "abcdeca", k = 2
    Output: true
    Explanation: delete 'b' and 'e' to get "acdca".

    Example 2:
    Input: s = "abc", k = 1
    Output: false

    Constraints:
    1 <= s.length <= 1000
    0 <= k <= s.length
    s consists of lowercase English letters.
    """,
    "class Solution:\n    def withinKDeletions(self, s: str, k: int) -> bool:",
    """
    class Solution:
        def withinKDeletions(self, s: str, k: int) -> bool:
            # longest palindromic subsequence = LCS of s and its reverse (rolling rows)
            r = s[::-1]
            prev = [0] * (len(s) + 1)
            for a in s:
                cur = [0]
                for j, b in enumerate(r):
                    cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
                prev = cur
            return len(s) - prev[-1] <= k
    """,
    [
        ('s = "abcdeca", k = 2', "True"),
        ('s = "abc", k = 1', "False"),
        ('s = "a", k = 0', "True"),
        ('s = "ab", k = 1', "True"),
        ('s = "racecar", k = 0', "True"),
        ('s = "abca", k = 1', "True"),
        ('s = "abcd", k = 2', "False"),
        ('s = "aabb", k = 2', "True"),
        ('s = "xyzzyx", k = 0', "True"),
    ],
)

_add(
    900024,
    "medium",
    """
    A directed graph has n nodes labelled 0 to n - 1 and the given edges, where [u, v] is an
    edge from u to v. Return true if the graph contains a directed cycle (a self-loop counts).

    Example 1:
    Input: n = 2, edges = [[0,1],[1,0]]
    Output: true

    Example 2:
    Input: n = 4, edges = [[0,1],[0,2],[1,3],[2,3]]
    Output: false

    Constraints:
    1 <= n <= 10^5
    0 <= edges.length <= 10^5
    """,
    "class Solution:\n    def hasDirectedCycle(self, n: int, edges: List[List[int]]) -> bool:",
    """
    class Solution:
        def hasDirectedCycle(self, n: int, edges: List[List[int]]) -> bool:
            # Kahn's algorithm: a cycle exists iff some node is never freed
            indeg = [0] * n
            out = defaultdict(list)
            for u, v in edges:
                out[u].append(v)
                indeg[v] += 1
            ready = deque(x for x in range(n) if indeg[x] == 0)
            freed = 0
            while ready:
                u = ready.popleft()
                freed += 1
                for v in out[u]:
                    indeg[v] -= 1
                    if indeg[v] == 0:
                        ready.append(v)
            return freed < n
    """,
    [
        ("n = 2, edges = [[0,1],[1,0]]", "True"),
        ("n = 3, edges = [[0,1],[1,2]]", "False"),
        ("n = 1, edges = [[0,0]]", "True"),
        ("n = 1, edges = []", "False"),
        ("n = 4, edges = [[0,1],[1,2],[2,3],[3,1]]", "True"),
        ("n = 4, edges = [[0,1],[0,2],[1,3],[2,3]]", "False"),
        ("n = 5, edges = [[3,4],[4,3]]", "True"),
        ("n = 3, edges = [[2,1],[1,0]]", "False"),
        ("n = 6, edges = [[0,1],[1,2],[3,4],[4,5],[5,3]]", "True"),
    ],
)

# ----------------------------------------------------------------------------- float answers

_add(
    900025,
    "easy",
    """
    Given an integer array nums and an integer k, return the largest average of a contiguous
    part of nums of length exactly k, rounded to 5 decimal places (use round(x, 5)).

    Example 1:
    Input: nums = [1,12,-5,-6,50,3], k = 4
    Output: 12.75

    Example 2:
    Input: nums = [1,2,4], k = 3
    Output: 2.33333

    Constraints:
    1 <= k <= nums.length <= 10^5
    -10^4 <= nums[i] <= 10^4
    """,
    "class Solution:\n    def bestWindowAverage(self, nums: List[int], k: int) -> float:",
    """
    class Solution:
        def bestWindowAverage(self, nums: List[int], k: int) -> float:
            window = best = sum(nums[:k])
            for i in range(k, len(nums)):
                window += nums[i] - nums[i - k]
                best = max(best, window)
            return round(best / k, 5)
    """,
    [
        ("nums = [1,12,-5,-6,50,3], k = 4", "12.75"),
        ("nums = [5], k = 1", "5.0"),
        ("nums = [1,2,3], k = 3", "2.0"),
        ("nums = [1,2], k = 1", "2.0"),
        ("nums = [-1,-2,-3], k = 2", "-1.5"),
        ("nums = [1,1,2], k = 2", "1.5"),
        ("nums = [1,2,4], k = 3", "2.33333"),
        ("nums = [0,0,10,0], k = 3", "3.33333"),
        ("nums = [4,0,0,0,1], k = 2", "2.0"),
    ],
)

_add(
    900026,
    "medium",
    """
    The vertices of a simple polygon (its edges do not cross) are given in order, clockwise or
    counter-clockwise, as integer points [x, y]. Return the polygon's area as a float.

    Example 1:
    Input: points = [[0,0],[4,0],[4,3]]
    Output: 6.0

    Example 2:
    Input: points = [[0,0],[1,0],[0,1]]
    Output: 0.5

    Constraints:
    3 <= points.length <= 10^4
    -10^4 <= x, y <= 10^4
    """,
    "class Solution:\n    def polygonArea(self, points: List[List[int]]) -> float:",
    """
    class Solution:
        def polygonArea(self, points: List[List[int]]) -> float:
            # shoelace formula: twice the signed area is an integer
            twice = 0
            for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1]):
                twice += x1 * y2 - x2 * y1
            return abs(twice) / 2
    """,
    [
        ("points = [[0,0],[4,0],[4,3]]", "6.0"),
        ("points = [[0,0],[1,0],[1,1],[0,1]]", "1.0"),
        ("points = [[0,0],[2,0],[0,1]]", "1.0"),
        ("points = [[0,0],[1,0],[0,1]]", "0.5"),
        ("points = [[0,0],[0,1],[1,1],[1,0]]", "1.0"),
        ("points = [[1,1],[3,1],[2,4]]", "3.0"),
        ("points = [[0,0],[4,0],[4,4],[2,1],[0,4]]", "10.0"),
        ("points = [[0,0],[3,0],[3,1],[0,1]]", "3.0"),
        ("points = [[0,0],[5,0],[0,3]]", "7.5"),
    ],
)

_add(
    900027,
    "medium",
    """
    There are several goods; good i has total value values[i] and total weight weights[i], and
    any fraction of a good may be taken (taking a fraction f of it gives f * values[i] value for
    f * weights[i] weight). Return the largest total value that fits within capacity, rounded to
    5 decimal places (use round(x, 5)).

    Example 1:
    Input: values = [60,100,120], weights = [10,20,30], capacity = 50
    Output: 240.0

    Example 2:
    Input: values = [10], weights = [4], capacity = 1
    Output: 2.5

    Constraints:
    1 <= values.length == weights.length <= 10^5
    1 <= values[i], weights[i] <= 10^4
    0 <= capacity <= 10^9
    """,
    "class Solution:\n    def fractionalKnapsack(self, values: List[int], weights: List[int], "
    "capacity: int) -> float:",
    """
    class Solution:
        def fractionalKnapsack(self, values: List[int], weights: List[int], capacity: int) -> float:
            total = 0.0
            # best value per unit of weight first
            for v, w in sorted(zip(values, weights), key=lambda g: g[0] / g[1], reverse=True):
                if capacity <= 0:
                    break
                take = min(w, capacity)
                total += v * take / w
                capacity -= take
            return round(total, 5)
    """,
    [
        ("values = [60,100,120], weights = [10,20,30], capacity = 50", "240.0"),
        ("values = [10], weights = [5], capacity = 10", "10.0"),
        ("values = [10], weights = [4], capacity = 1", "2.5"),
        ("values = [1,2,3], weights = [1,1,1], capacity = 0", "0.0"),
        ("values = [5,5], weights = [2,3], capacity = 4", "8.33333"),
        ("values = [7,1], weights = [7,1], capacity = 3", "3.0"),
        ("values = [20,30], weights = [4,6], capacity = 5", "25.0"),
        ("values = [3,8], weights = [3,3], capacity = 1", "2.66667"),
    ],
)


# ----------------------------------------------------------------------------- rendering

_DEF_RE = re.compile(r"def ([A-Za-z_][A-Za-z0-9_]*)\(self")


def _to_row(spec: _Spec) -> dict:
    fn = _DEF_RE.search(spec.starter)
    if fn is None:  # pragma: no cover - authoring error
        raise ValueError(f"built-in problem {spec.pid}: starter defines no method")
    func_name = f"Solution().{fn.group(1)}"
    user = render_user_message(spec.text, func_name, spec.starter)
    return {
        "id": spec.pid,
        "difficulty": spec.difficulty,
        "prompt": [dict(m) for m in render_messages(user)],
        "question": user,
        "gt_answer": [f"assert {func_name}({args}) == {want}" for args, want in spec.tests],
        "func_name": func_name,
        "setup_code": SETUP_CODE,
        "canonical_solution": spec.canonical,
        "prompt_metadata": {"starter_code": spec.starter + "\n        "},
        "source": "vgrout-builtin",
    }


@cache
def _rows() -> tuple[dict, ...]:
    return tuple(_to_row(s) for s in _SPECS)


def builtin_rows() -> list[dict]:
    """The built-in problems as benchmark rows (fresh copies; safe to mutate)."""
    import copy

    return copy.deepcopy(list(_rows()))
