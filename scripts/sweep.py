"""Thin wrapper: the logic lives in `vgrout.sweep` (see its docstring)."""

from vgrout.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
