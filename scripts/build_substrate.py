"""Thin wrapper: the logic lives in `vgrout.substrate` (see its docstring)."""

from vgrout.substrate import main

if __name__ == "__main__":
    raise SystemExit(main())
