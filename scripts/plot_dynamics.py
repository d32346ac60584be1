"""Thin wrapper: the logic lives in `vgrout.plots` (see its docstring)."""

from vgrout.plots import main

if __name__ == "__main__":
    raise SystemExit(main())
