"""Thin wrapper: the logic lives in `vgrout.results` (see its docstring)."""

from vgrout.results import main

if __name__ == "__main__":
    raise SystemExit(main())
