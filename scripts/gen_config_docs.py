"""Regenerate docs/config.md from src/vgrout/config.py (see vgrout.configdoc).

    uv run python scripts/gen_config_docs.py           # rewrite docs/config.md
    uv run python scripts/gen_config_docs.py --check   # exit 1 when it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vgrout.configdoc import REGEN_COMMAND, render, write_atomic

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="file to write or check")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        have = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if have != text:
            print(f"{args.out} is out of date with src/vgrout/config.py; run `{REGEN_COMMAND}`",
                  file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    write_atomic(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
